/* test_relay.c: the outbox relay against a real private broker: confirms, no binding, broker restart. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "amqp.h"
#include "ledger.h"
#include "relay.h"
#include "../testutil.h"

static const char *url;
static char dir[64];
static struct bw_ledger *ledger;

static int setup(void **state)
{
	(void)state;
	char path[PATH_MAX];
	if (!bw_test_mkdir(dir, sizeof(dir), "relay"))
		return -1;
	snprintf(path, sizeof(path), "%s/ledger.db", dir);
	if (bw_ledger_open(&ledger, path, 10100, 10200) != 0 ||
	    bw_ledger_register(ledger, "relay-test", dir) != 0)
		return -1;
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	bw_ledger_close(ledger);
	return bw_test_rmdir(dir);
}

static struct bw_amqp *publisher(void)
{
	struct bw_amqp *c = NULL;
	char err[512];
	struct bw_amqp_opts o = {url, 5, 5000, "relay-test", NULL, NULL, NULL, true, true};
	if (bw_amqp_connect(&c, &o, err, sizeof(err)) != 0)
		return NULL;
	if (bw_amqp_confirm_select(c, err, sizeof(err)) != 0) {
		bw_amqp_close(c);
		return NULL;
	}
	return c;
}

/* Claims n jobs "<prefix>-<i>": n backup.accepted events in the outbox. */
static void claim_jobs(const char *prefix, int from, int n)
{
	for (int i = from; i < from + n; i++) {
		char job[64], id[128], body[160];
		snprintf(job, sizeof(job), "%s-%d", prefix, i);
		snprintf(id, sizeof(id), "%s/backup.accepted", job);
		snprintf(body, sizeof(body), "{\"event_id\":\"%s\",\"seq\":1}", id);
		struct bw_event e = {id, "backup.accepted", 1, body};
		int64_t gen;
		assert_int_equal(bw_ledger_claim(ledger, job, "{}", NULL, 0, &e, &gen, NULL), 0);
	}
}

static size_t unpublished(void)
{
	struct bw_outbox_row *rows = NULL;
	size_t n = 0;
	assert_int_equal(bw_ledger_outbox_next(ledger, 0, 100000, &rows, &n), 0);
	bw_outbox_free(rows, n);
	return n;
}

/* Steps the relay until the outbox is empty or ms pass; reconnects when the broker is gone. */
static void drain(struct bw_relay *r, struct bw_amqp **c, int ms)
{
	char err[512];
	for (int waited = 0; waited < ms; waited += 5) {
		if (*c == NULL) {
			*c = publisher();
			if (*c == NULL) {
				usleep(100000);
				waited += 100;
				continue;
			}
			bw_relay_reset(r);
		}
		if (bw_relay_step(r, *c, err, sizeof(err)) == BW_EAMQP) {
			bw_amqp_close(*c);
			*c = NULL;
			continue;
		}
		if (bw_relay_inflight(r) == 0 && unpublished() == 0)
			return;
		struct pollfd p = {bw_amqp_fd(*c), POLLIN, 0};
		poll(&p, 1, 5);
	}
}

static int queue_count(const char *q)
{
	char cmd[512];
	snprintf(cmd, sizeof(cmd),
		 "\"$BW_TEST_BROKER\" ctl \"$BW_TEST_BROKER_DIR\" -q list_queues name messages "
		 "--no-table-headers | awk '$1 == \"%s\" { print $2 }'",
		 q);
	FILE *p = popen(cmd, "r");
	int n = -1;
	if (p && fscanf(p, "%d", &n) != 1)
		n = -1;
	if (p)
		pclose(p);
	return n;
}

/* Runs Python lines against the broker, with ch a channel of a pika connection to it. */
static void broker_py(const char *lines)
{
	assert_int_equal(bw_test_sh("/usr/bin/python3 -c '\n"
			    "import pika\n"
			    "c = pika.BlockingConnection(pika.URLParameters(\"%s\"))\n"
			    "ch = c.channel()\n"
			    "%s\n"
			    "c.close()'",
			    url, lines),
			 0);
}

static void declare_sink(const char *exchange, const char *q)
{
	char lines[512];
	snprintf(lines, sizeof(lines),
		 "ch.exchange_declare(\"%s\", \"topic\", durable=True)\n"
		 "ch.queue_declare(\"%s\", durable=True)\n"
		 "ch.queue_bind(\"%s\", \"%s\", \"backup.#\")",
		 exchange, q, q, exchange);
	broker_py(lines);
}

static void test_published_on_confirm_in_order(void **state)
{
	(void)state;
	declare_sink("r1.events", "r1.sink");
	claim_jobs("r1", 0, 500);
	struct bw_relay *r = NULL;
	assert_int_equal(bw_relay_new(&r, ledger, "r1.events", 64), 0);
	struct bw_amqp *c = publisher();
	assert_non_null(c);
	drain(r, &c, 20000);
	assert_int_equal(unpublished(), 0);
	uint64_t ok, failed;
	bw_relay_stats(r, &ok, &failed);
	assert_int_equal(ok, 500);
	assert_int_equal(failed, 0);
	assert_int_equal(queue_count("r1.sink"), 500);
	bw_relay_free(r);
	bw_amqp_close(c);
}

static void test_no_binding_kept_until_one_exists(void **state)
{
	(void)state;
	broker_py("ch.exchange_declare(\"r2.events\", \"topic\", durable=True)");
	claim_jobs("r2", 0, 3);
	struct bw_relay *r = NULL;
	assert_int_equal(bw_relay_new(&r, ledger, "r2.events", 64), 0);
	struct bw_amqp *c = publisher();
	drain(r, &c, 1500);
	assert_int_equal(unpublished(), 3); /* returned: kept, not dropped */
	uint64_t ok, failed;
	bw_relay_stats(r, &ok, &failed);
	assert_int_equal(ok, 0);
	assert_true(failed >= 3);

	declare_sink("r2.events", "r2.sink");
	drain(r, &c, 60000); /* after the backoff it goes out */
	assert_int_equal(unpublished(), 0);
	assert_int_equal(queue_count("r2.sink"), 3);
	bw_relay_free(r);
	bw_amqp_close(c);
}

/*
 * Every publish nacked (a queue that rejects what it cannot hold: x-max-length 0 with
 * reject-publish): the step says so with BW_EAMQP, so the caller takes a new connection
 * rather than sending into the same channel again; once the queue takes them, all go out.
 */
static void test_nacked_means_a_new_connection(void **state)
{
	(void)state;
	broker_py("ch.exchange_declare(\"r4.events\", \"topic\", durable=True)\n"
		  "ch.queue_declare(\"r4.full\", durable=True, arguments={\"x-max-length\": 0,"
		  " \"x-overflow\": \"reject-publish\"})\n"
		  "ch.queue_bind(\"r4.full\", \"r4.events\", \"backup.#\")");
	claim_jobs("r4", 0, 3);
	struct bw_relay *r = NULL;
	assert_int_equal(bw_relay_new(&r, ledger, "r4.events", 64), 0);
	struct bw_amqp *c = publisher();
	assert_non_null(c);
	char err[512] = "";
	int rc = 0;
	for (int i = 0; i < 400 && rc == 0; i++) {
		rc = bw_relay_step(r, c, err, sizeof(err));
		struct pollfd p = {bw_amqp_fd(c), POLLIN, 0};
		poll(&p, 1, 5);
	}
	assert_int_equal(rc, BW_EAMQP);
	assert_non_null(strstr(err, "nacked"));
	print_message("relay: %s\n", err);
	assert_int_equal(unpublished(), 3);
	bw_amqp_close(c);
	c = NULL;

	broker_py("ch.queue_delete(\"r4.full\")");
	declare_sink("r4.events", "r4.sink");
	drain(r, &c, 60000);
	assert_int_equal(unpublished(), 0);
	assert_int_equal(queue_count("r4.sink"), 3);
	bw_relay_free(r);
	bw_amqp_close(c);
}

static void test_broker_restart_loses_nothing(void **state)
{
	(void)state;
	char err[512];
	declare_sink("r3.events", "r3.sink");
	struct bw_relay *r = NULL;
	assert_int_equal(bw_relay_new(&r, ledger, "r3.events", 64), 0);
	struct bw_amqp *c = publisher();
	/* The broker goes down while events stream out: some are in flight when it does. */
	assert_int_equal(bw_test_sh("(sleep 0.5; \"$BW_TEST_BROKER\" stop \"$BW_TEST_BROKER_DIR\") "
			    ">/dev/null 2>&1 &"),
			 0);
	int n = 0, lost_connection = 0;
	for (int round = 0; round < 300; round++) {
		claim_jobs("r3", n, 5);
		n += 5;
		if (c == NULL) {
			usleep(10000);
			continue;
		}
		if (bw_relay_step(r, c, err, sizeof(err)) == BW_EAMQP) {
			lost_connection++;
			bw_amqp_close(c);
			c = NULL;
		}
		usleep(5000);
	}
	assert_true(lost_connection > 0);
	assert_int_equal(bw_test_sh("\"$BW_TEST_BROKER\" start \"$BW_TEST_BROKER_DIR\" >/dev/null"), 0);
	drain(r, &c, 60000);
	assert_int_equal(unpublished(), 0);
	int in_queue = queue_count("r3.sink");
	uint64_t ok, failed;
	bw_relay_stats(r, &ok, &failed);
	print_message("broker restart: %d events, %d in the queue (%d duplicates), "
		      "%llu confirmed, %llu failed attempts\n",
		      n, in_queue, in_queue - n, (unsigned long long)ok, (unsigned long long)failed);
	assert_true(in_queue >= n); /* lost = 0; duplicates are counted, not failed */
	bw_relay_free(r);
	bw_amqp_close(c);
}

int main(void)
{
	url = getenv("BW_TEST_AMQP_URL");
	if (url == NULL) {
		fprintf(stderr, "test_relay: run me through tests/with-broker\n");
		return 1;
	}
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_published_on_confirm_in_order),
		cmocka_unit_test(test_no_binding_kept_until_one_exists),
		cmocka_unit_test(test_nacked_means_a_new_connection),
		cmocka_unit_test(test_broker_restart_loses_nothing),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
