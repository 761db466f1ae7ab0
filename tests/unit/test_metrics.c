/* test_metrics.c: the metrics registry: recording by type, label escaping, histogram buckets, process gauges and the exact text it renders. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "metrics.h"
#include "../testutil.h"

#define L(...) ((const char *const[]){__VA_ARGS__})

static char *render(const struct bw_metrics *m)
{
	struct bw_buf b = BW_BUF_INIT;
	bw_metrics_render(m, &b);
	assert_false(b.failed);
	char *s = NULL;
	assert_int_equal(bw_buf_steal(&b, &s), 0);
	return s;
}

/* The lines of page that start with prefix, joined by \n (each line ends in \n). */
static char *lines_of(const char *page, const char *prefix)
{
	struct bw_buf b = BW_BUF_INIT;
	size_t n = strlen(prefix);
	for (const char *p = page; *p;) {
		const char *end = strchr(p, '\n');
		size_t len = end ? (size_t)(end - p) + 1 : strlen(p);
		if (strncmp(p, prefix, n) == 0)
			bw_buf_append(&b, p, len);
		p += len;
	}
	char *s = NULL;
	assert_int_equal(bw_buf_steal(&b, &s), 0);
	return s;
}

static void test_empty_registry_declares_every_metric(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	char *page = render(m);
	size_t help = 0, type = 0, samples = 0;
	for (const char *p = page; *p; p = strchr(p, '\n') + 1) {
		help += strncmp(p, "# HELP ", 7) == 0;
		type += strncmp(p, "# TYPE ", 7) == 0;
		samples += p[0] != '#';
	}
	assert_int_equal(help, BW_METRIC_COUNT);
	assert_int_equal(type, BW_METRIC_COUNT);
	assert_int_equal(samples, 0);
	assert_non_null(strstr(page, "# TYPE bw_job_outcomes_total counter\n"));
	assert_non_null(strstr(page, "# TYPE bw_job_duration_seconds histogram\n"));
	assert_non_null(strstr(page, "# TYPE bw_jobs gauge\n"));
	assert_non_null(strstr(page, "# TYPE process_cpu_seconds_total counter\n"));
	assert_string_equal(bw_metric_name(BW_METRIC_PORTS), "bw_ports");
	free(page);
	bw_metrics_free(m);
}

static void test_counters_and_gauges(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	bw_metrics_touch(m, BW_METRIC_JOB_OUTCOMES, L("completed", "none"));
	bw_metrics_add(m, BW_METRIC_JOB_OUTCOMES, L("failed", "no_ports"), 1);
	bw_metrics_add(m, BW_METRIC_JOB_OUTCOMES, L("failed", "no_ports"), 2);
	bw_metrics_add(m, BW_METRIC_JOB_OUTCOMES, L("failed", "no_ports"), -5); /* ignored */
	bw_metrics_set(m, BW_METRIC_JOBS, L("serving"), 3);
	bw_metrics_add(m, BW_METRIC_JOBS, L("serving"), -1); /* a gauge may go down */
	bw_metrics_set(m, BW_METRIC_OUTBOX_AGE, NULL, 0.25);
	bw_metrics_set(m, BW_METRIC_RELAY_CONFIRMED, NULL, 7); /* a total kept by the relay */
	bw_metrics_observe(m, BW_METRIC_JOBS, L("serving"), 9); /* not a histogram: ignored */
	bw_metrics_add(m, BW_METRIC_JOB_DURATION, L("completed"), 9); /* a histogram: ignored */
	bw_metrics_add(m, BW_METRIC_REJECTED, NULL, 1); /* labels missing: ignored */
	bw_metrics_add(NULL, BW_METRIC_JOBS, L("serving"), 1);     /* no registry: nothing */

	assert_true(bw_metrics_value(m, BW_METRIC_JOB_OUTCOMES, L("failed", "no_ports")) == 3);
	assert_true(bw_metrics_value(m, BW_METRIC_JOB_OUTCOMES, L("completed", "none")) == 0);
	assert_true(bw_metrics_value(m, BW_METRIC_JOBS, L("serving")) == 2);
	assert_true(bw_metrics_value(m, BW_METRIC_JOBS, L("claimed")) == 0);
	assert_true(bw_metrics_value(m, BW_METRIC_JOB_DURATION, L("completed")) == 0);

	char *page = render(m);
	char *got = lines_of(page, "bw_");
	assert_string_equal(got, "bw_jobs{state=\"serving\"} 2\n"
				 "bw_job_outcomes_total{result=\"completed\",reason=\"none\"} 0\n"
				 "bw_job_outcomes_total{result=\"failed\",reason=\"no_ports\"} 3\n"
				 "bw_relay_events_confirmed_total 7\n"
				 "bw_outbox_oldest_age_seconds 0.25\n");
	free(got);
	free(page);
	bw_metrics_free(m);
}

/* The node a link is on: the series of the node it left go, the others stay. */
static void test_clear_drops_every_series_of_one_metric(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	bw_metrics_set(m, BW_METRIC_BROKER_NODE, L("consumer", "127.0.0.1:5672"), 1);
	bw_metrics_set(m, BW_METRIC_BROKER_UP, L("consumer"), 1);
	bw_metrics_clear(m, BW_METRIC_BROKER_NODE);
	bw_metrics_set(m, BW_METRIC_BROKER_NODE, L("consumer", "127.0.0.1:5673"), 1);
	char *page = render(m);
	assert_null(strstr(page, "5672"));
	assert_non_null(strstr(page, "bw_broker_link_node_info{link=\"consumer\",node=\"127.0.0.1:5673\"} 1\n"));
	assert_non_null(strstr(page, "bw_broker_link_up{link=\"consumer\"} 1\n"));
	free(page);
	bw_metrics_clear(m, BW_METRIC_BROKER_NODE);
	assert_true(bw_metrics_value(m, BW_METRIC_BROKER_NODE, L("consumer", "127.0.0.1:5673")) == 0);
	bw_metrics_clear(NULL, BW_METRIC_BROKER_NODE); /* no registry: nothing */
	bw_metrics_free(m);
}

static void test_label_values_escaped(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	bw_metrics_set(m, BW_METRIC_INFO, L("0.1.0", "w\"1\\x\ny", "host é"), 1);
	char *page = render(m);
	char *got = lines_of(page, "bw_info");
	assert_string_equal(got,
			    "bw_info{version=\"0.1.0\",worker_id=\"w\\\"1\\\\x\\ny\",host=\"host é\"} 1\n");
	free(got);
	free(page);
	bw_metrics_free(m);
}

static void test_histogram_buckets(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	/* BW_BUCKETS_CONFIRM: 0.0005, 0.001, 0.0025, ... 5, 30 */
	bw_metrics_observe(m, BW_METRIC_CONFIRM_LATENCY, NULL, 0.0005); /* on a bound: in it */
	bw_metrics_observe(m, BW_METRIC_CONFIRM_LATENCY, NULL, 0.002);
	bw_metrics_observe(m, BW_METRIC_CONFIRM_LATENCY, NULL, 0.75);
	bw_metrics_observe(m, BW_METRIC_CONFIRM_LATENCY, NULL, 31); /* only +Inf */
	bw_metrics_observe(m, BW_METRIC_CONFIRM_LATENCY, NULL, NAN); /* ignored */
	assert_true(bw_metrics_value(m, BW_METRIC_CONFIRM_LATENCY, NULL) == 4);
	char *page = render(m);
	char *got = lines_of(page, "bw_relay_confirm_latency_seconds");
	assert_string_equal(got, "bw_relay_confirm_latency_seconds_bucket{le=\"0.0005\"} 1\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.001\"} 1\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.0025\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.005\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.01\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.025\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.05\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.1\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.25\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"0.5\"} 2\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"1\"} 3\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"5\"} 3\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"30\"} 3\n"
				 "bw_relay_confirm_latency_seconds_bucket{le=\"+Inf\"} 4\n"
				 "bw_relay_confirm_latency_seconds_sum 31.7525\n"
				 "bw_relay_confirm_latency_seconds_count 4\n");
	free(got);
	/* a labelled histogram puts le after its own labels */
	bw_metrics_observe(m, BW_METRIC_SNA_DURATION, L("start"), 0.02);
	free(page);
	page = render(m);
	assert_non_null(strstr(page, "bw_sna_request_duration_seconds_bucket{call=\"start\",le=\"0.01\"} 0\n"
				     "bw_sna_request_duration_seconds_bucket{call=\"start\",le=\"0.025\"} 1\n"));
	assert_non_null(strstr(page, "bw_sna_request_duration_seconds_sum{call=\"start\"} 0.02\n"
				     "bw_sna_request_duration_seconds_count{call=\"start\"} 1\n"));
	free(page);
	bw_metrics_free(m);
}

static void test_series_bounded(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	char v[32];
	for (int i = 0; i < BW_METRICS_MAX_SERIES + 10; i++) {
		snprintf(v, sizeof(v), "r%d", i);
		bw_metrics_add(m, BW_METRIC_REJECTED, L(v), 1);
	}
	assert_true(bw_metrics_value(m, BW_METRIC_REJECTED, L("r0")) == 1);
	snprintf(v, sizeof(v), "r%d", BW_METRICS_MAX_SERIES - 1);
	assert_true(bw_metrics_value(m, BW_METRIC_REJECTED, L(v)) == 1);
	snprintf(v, sizeof(v), "r%d", BW_METRICS_MAX_SERIES);
	assert_true(bw_metrics_value(m, BW_METRIC_REJECTED, L(v)) == 0); /* dropped */
	bw_metrics_free(m);
}

static void test_process_metrics(void **state)
{
	(void)state;
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	/* burn a little CPU so that the counter is above 0 */
	volatile double x = 0;
	clock_t c0 = clock();
	while (clock() - c0 < CLOCKS_PER_SEC / 20)
		x += 1;
	assert_int_equal(bw_metrics_collect_process(m), 0);
	double rss = bw_metrics_value(m, BW_METRIC_RSS, NULL);
	double vsz = bw_metrics_value(m, BW_METRIC_VSZ, NULL);
	double start = bw_metrics_value(m, BW_METRIC_START_TIME, NULL);
	double fds = bw_metrics_value(m, BW_METRIC_OPEN_FDS, NULL);
	assert_true(rss > 1 << 20 && rss < vsz);
	assert_true(bw_metrics_value(m, BW_METRIC_CPU, NULL) > 0.01);
	/* started within the last hour (a test process), by the wall clock */
	double now = (double)time(NULL);
	assert_true(start > now - 3600 && start <= now + 1);
	/* one more open descriptor shows */
	int fd = dup(0);
	assert_true(fd >= 0);
	assert_int_equal(bw_metrics_collect_process(m), 0);
	assert_true(bw_metrics_value(m, BW_METRIC_OPEN_FDS, NULL) == fds + 1);
	close(fd);
	assert_true(bw_metrics_value(m, BW_METRIC_MAX_FDS, NULL) >= fds);
	bw_metrics_free(m);
}

/* A registry with a bit of everything, through promtool's own parser and linter. */
static void test_promtool_accepts(void **state)
{
	(void)state;
	if (bw_test_sh("command -v promtool >/dev/null") != 0) {
		print_message("promtool missing: skipped\n");
		return;
	}
	struct bw_metrics *m = NULL;
	assert_int_equal(bw_metrics_new(&m), 0);
	bw_metrics_set(m, BW_METRIC_INFO, L("0.1.0", "w\"1", "h\\x\ny"), 1);
	bw_metrics_add(m, BW_METRIC_JOB_OUTCOMES, L("completed", "none"), 1);
	bw_metrics_observe(m, BW_METRIC_JOB_STAGE_DURATION, L("serving"), 0.3);
	bw_metrics_observe(m, BW_METRIC_JOB_START_LATENCY, NULL, 1.5);
	assert_int_equal(bw_metrics_collect_process(m), 0);
	char *page = render(m);
	char path[] = "/tmp/bw-test-metrics.XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, page, strlen(page)), (ssize_t)strlen(page));
	close(fd);
	int rc = bw_test_sh("promtool check metrics < %s", path);
	/* and it does fail on a broken page: a sample without its value */
	int broken = bw_test_sh("printf 'bw_x{a=\"1\"}\\n' | promtool check metrics 2>/dev/null");
	unlink(path);
	free(page);
	bw_metrics_free(m);
	assert_int_equal(rc, 0);
	assert_int_not_equal(broken, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_empty_registry_declares_every_metric),
		cmocka_unit_test(test_counters_and_gauges),
		cmocka_unit_test(test_clear_drops_every_series_of_one_metric),
		cmocka_unit_test(test_label_values_escaped),
		cmocka_unit_test(test_histogram_buckets),
		cmocka_unit_test(test_series_bounded),
		cmocka_unit_test(test_process_metrics),
		cmocka_unit_test(test_promtool_accepts),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
