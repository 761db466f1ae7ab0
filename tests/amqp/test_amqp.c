/* test_amqp.c: the AMQP layer against a real private broker (run through tests/with-broker). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "amqp.h"
#include "text.h"

#include <signal.h>
#include <time.h>

static const char *url;

static struct bw_amqp_opts opts(const char *name)
{
	return (struct bw_amqp_opts){url, 10, 5000, name, NULL, NULL, NULL, true, true};
}

static struct bw_amqp *connect_ok(const char *name)
{
	struct bw_amqp *c = NULL;
	char err[512] = "";
	struct bw_amqp_opts o = opts(name);
	int rc = bw_amqp_connect(&c, &o, err, sizeof(err));
	if (rc != 0)
		print_message("connect: %s\n", err);
	assert_int_equal(rc, 0);
	return c;
}

static int ctl(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int ctl(const char *fmt, ...)
{
	char args[1024], cmd[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof(args), fmt, ap);
	va_end(ap);
	snprintf(cmd, sizeof(cmd), "\"$BW_TEST_BROKER\" ctl \"$BW_TEST_BROKER_DIR\" %s", args);
	int rc = system(cmd);
	return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static struct bw_amqp_topology topo(const char *prefix, char names[5][64])
{
	snprintf(names[0], 64, "%s.start", prefix);
	snprintf(names[1], 64, "%s.jobs", prefix);
	snprintf(names[2], 64, "%s.events", prefix);
	snprintf(names[3], 64, "%s.dlx", prefix);
	snprintf(names[4], 64, "%s.start.dlq", prefix);
	return (struct bw_amqp_topology){names[0], names[1], names[2], names[3], names[4], 2, false,
					 NULL, 0};
}

/* Polls c until a delivery arrives or ms pass. */
static bool next_delivery(struct bw_amqp *c, struct bw_delivery *d, int ms)
{
	char err[512];
	for (int waited = 0; waited < ms; waited += 10) {
		bool got = false;
		int rc = bw_amqp_poll(c, d, &got, err, sizeof(err));
		if (rc != 0)
			print_message("poll: %s\n", err);
		assert_int_equal(rc, 0);
		if (got)
			return true;
		struct pollfd p = {bw_amqp_fd(c), POLLIN, 0};
		poll(&p, 1, 10);
	}
	return false;
}

struct confirms {
	int ok, failed;
	char why[128];
};

static void confirm_cb(void *arg, uint64_t seq, bool ok, const char *why)
{
	struct confirms *s = arg;
	(void)seq;
	if (ok) {
		s->ok++;
	} else {
		s->failed++;
		snprintf(s->why, sizeof(s->why), "%s", why ? why : "");
	}
}

static void settle_all(struct bw_amqp *c, struct confirms *s)
{
	char err[512];
	for (int i = 0; i < 500 && bw_amqp_unconfirmed(c) > 0; i++) {
		assert_int_equal(bw_amqp_poll_confirms(c, confirm_cb, s, err, sizeof(err)), 0);
		struct pollfd p = {bw_amqp_fd(c), POLLIN, 0};
		poll(&p, 1, 10);
	}
	assert_int_equal(bw_amqp_unconfirmed(c), 0);
}

static void publish(struct bw_amqp *c, const char *x, const char *key, const char *id,
		    const char *body)
{
	uint64_t seq;
	assert_int_equal(bw_amqp_publish(c, x, key, id, body, strlen(body), &seq), 0);
}

static void test_topology_idempotent_passive_and_mismatch(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t1", names);
	struct bw_amqp *c = connect_ok("test-topology");
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	t.passive = true;
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);

	/* an operator-owned queue with another delivery limit: a clear error naming it */
	t.passive = false;
	t.delivery_limit = 7;
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), BW_ECONFIG);
	print_message("mismatch: %s\n", err);
	assert_non_null(strstr(err, "queue t1.start"));
	assert_non_null(strstr(err, "x-delivery-limit"));
	/* the connection stays usable after the channel error */
	t.delivery_limit = 2;
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);

	struct bw_amqp_topology missing = topo("t-missing", names);
	missing.passive = true;
	assert_int_equal(bw_amqp_declare(c, &missing, err, sizeof(err)), BW_ECONFIG);
	assert_non_null(strstr(err, "NOT_FOUND"));
	bw_amqp_close(c);

	/* the quorum queue really has the contract's arguments */
	assert_int_equal(ctl("list_queues name type arguments | grep '^t1.start\\s' | "
			     "grep quorum | grep -q 'reject-publish'"),
			 0);
}

static void test_publish_consume_ack_nothing_redelivered(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t2", names);
	struct bw_amqp *pub = connect_ok("test-pub");
	struct bw_amqp *con = connect_ok("test-con");
	assert_int_equal(bw_amqp_declare(con, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_confirm_select(pub, err, sizeof(err)), 0);
	struct confirms s = {0, 0, ""};
	for (int i = 0; i < 10; i++) {
		char id[32], body[64];
		snprintf(id, sizeof(id), "m-%d", i);
		snprintf(body, sizeof(body), "{\"n\":%d}", i);
		publish(pub, t.jobs_exchange, "backup.start", id, body);
	}
	settle_all(pub, &s);
	assert_int_equal(s.ok, 10);

	assert_int_equal(bw_amqp_consume(con, t.queue, 4, err, sizeof(err)), 0);
	for (int i = 0; i < 10; i++) {
		struct bw_delivery d;
		assert_true(next_delivery(con, &d, 5000));
		char want[64];
		snprintf(want, sizeof(want), "{\"n\":%d}", i);
		assert_string_equal(d.body, want);
		assert_false(d.redelivered);
		assert_int_equal(bw_amqp_ack(con, &d), 0);
		bw_delivery_free(&d);
	}
	bw_amqp_close(con);
	/* a new consumer finds nothing: every ack landed */
	con = connect_ok("test-con2");
	assert_int_equal(bw_amqp_consume(con, t.queue, 4, err, sizeof(err)), 0);
	struct bw_delivery d;
	assert_false(next_delivery(con, &d, 500));
	bw_amqp_close(con);
	bw_amqp_close(pub);
}

static void test_rejected_goes_to_dlq_with_x_death(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t3", names);
	struct bw_amqp *c = connect_ok("test-dlq");
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_confirm_select(c, err, sizeof(err)), 0);
	struct confirms s = {0, 0, ""};
	publish(c, t.jobs_exchange, "backup.start", "poison", "{not json");
	settle_all(c, &s);
	assert_int_equal(s.ok, 1);
	bw_amqp_close(c);

	c = connect_ok("test-dlq-consumer");
	assert_int_equal(bw_amqp_consume(c, t.queue, 1, err, sizeof(err)), 0);
	struct bw_delivery d;
	assert_true(next_delivery(c, &d, 5000));
	assert_int_equal(bw_amqp_reject(c, &d), 0);
	bw_delivery_free(&d);
	bw_amqp_close(c);

	/* read it back from the DLQ with an independent client, x-death and all */
	char cmd[1024];
	snprintf(cmd, sizeof(cmd),
		 "/usr/bin/python3 -c '\n"
		 "import pika, sys, time\n"
		 "c = pika.BlockingConnection(pika.URLParameters(\"%s\"))\n"
		 "ch = c.channel()\n"
		 "for _ in range(50):\n"
		 "    m, p, b = ch.basic_get(\"t3.start.dlq\", auto_ack=True)\n"
		 "    if m: break\n"
		 "    time.sleep(0.1)\n"
		 "d = p.headers[\"x-death\"][0]\n"
		 "assert b == b\"{not json\", b\n"
		 "assert d[\"queue\"] == \"t3.start\" and d[\"reason\"] == \"rejected\", d\n"
		 "'",
		 url);
	assert_int_equal(system(cmd), 0);
}

/* The next delivery: its body must be want and its source src; acked. */
static void expect_delivery(struct bw_amqp *c, const char *want, enum bw_amqp_source src)
{
	struct bw_delivery d;
	assert_true(next_delivery(c, &d, 5000));
	print_message("delivery %s from consumer %d\n", d.body, (int)d.source);
	assert_string_equal(d.body, want);
	assert_int_equal(d.source, src);
	assert_int_equal(bw_amqp_ack(c, &d), 0);
	bw_delivery_free(&d);
}

/* backup.control next to backup.start: each delivery says its consumer, in every order, and
 * the control queue comes back after the broker closed the channel (its auto-delete queue
 * went with it). */
static void test_control_consumer_tagged_and_back_after_channel_close(void **state)
{
	(void)state;
	char names[5][64], err[512], control[64];
	struct bw_amqp_topology t = topo("t14", names);
	snprintf(control, sizeof(control), "t14.control");
	struct bw_amqp *pub = connect_ok("test-control-pub");
	struct bw_amqp *con = connect_ok("test-control-con");
	assert_int_equal(bw_amqp_declare(con, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_confirm_select(pub, err, sizeof(err)), 0);
	/* amqp.declare = false: the exchange is only checked, and it is not there */
	assert_int_equal(bw_amqp_consume_control(con, control, true, err, sizeof(err)), BW_ECONFIG);
	print_message("passive: %s\n", err);
	assert_non_null(strstr(err, "NOT_FOUND"));
	/* declared (fanout, durable), then checked */
	assert_int_equal(bw_amqp_consume_control(con, control, false, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_consume_control(con, control, false, err, sizeof(err)), 0);
	struct bw_amqp *chk = connect_ok("test-control-check");
	assert_int_equal(bw_amqp_consume_control(chk, control, true, err, sizeof(err)), 0);
	bw_amqp_close(chk);
	assert_int_equal(bw_amqp_consume(con, t.queue, 4, err, sizeof(err)), 0);
	struct confirms s = {0, 0, ""};
	publish(pub, t.jobs_exchange, "backup.start", "s1", "S1");
	settle_all(pub, &s);
	publish(pub, control, "", "c1", "C1");
	settle_all(pub, &s);
	publish(pub, t.jobs_exchange, "backup.start", "s2", "S2");
	settle_all(pub, &s);
	assert_int_equal(s.ok, 3);
	expect_delivery(con, "S1", BW_AMQP_FROM_START);
	expect_delivery(con, "C1", BW_AMQP_FROM_CONTROL);
	expect_delivery(con, "S2", BW_AMQP_FROM_START);

	/* an ack of a tag never delivered: the broker closes the channel (406) */
	struct bw_delivery bogus = {.tag = 999999, .channel_epoch = bw_amqp_channel_epoch(con)};
	assert_int_equal(bw_amqp_ack(con, &bogus), 0);
	struct bw_delivery d;
	assert_false(next_delivery(con, &d, 500)); /* channel reopened, consumers registered */
	publish(pub, control, "", "c2", "C2");
	settle_all(pub, &s);
	publish(pub, t.jobs_exchange, "backup.start", "s3", "S3");
	settle_all(pub, &s);
	assert_int_equal(s.ok, 5);
	assert_int_equal(s.failed, 0);
	expect_delivery(con, "C2", BW_AMQP_FROM_CONTROL);
	expect_delivery(con, "S3", BW_AMQP_FROM_START);
	/* one control queue bound, the first one gone with its channel */
	assert_int_equal(ctl("list_bindings source_name destination_name | grep -c '^t14.control[[:space:]]' | "
			     "grep -qx 1"),
			 0);
	bw_amqp_close(con);
	bw_amqp_close(pub);
}

/* Outcomes by sequence number (bw_amqp_publish_message: returns matched by seq). */
struct outcomes {
	int n;
	uint64_t seq[16];
	bool ok[16];
	bool returned[16];
};

static void outcome_cb(void *arg, uint64_t seq, bool ok, const char *why)
{
	struct outcomes *o = arg;
	assert_true(o->n < 16);
	o->seq[o->n] = seq;
	o->ok[o->n] = ok;
	o->returned[o->n] = why == bw_amqp_why_returned;
	o->n++;
}

static int outcome_of(const struct outcomes *o, uint64_t seq)
{
	for (int i = 0; i < o->n; i++)
		if (o->seq[i] == seq)
			return o->ok[i] ? 1 : o->returned[i] ? -1 : -2;
	return 0;
}

static void test_repo_queues_placement(void **state)
{
	(void)state;
	char names[5][64], err[512], rq[BW_AMQP_NAME_MAX + 1];
	const char *repos[] = {"ra", "rb"};
	struct bw_amqp_topology t = topo("t15", names);
	struct bw_amqp *pub = connect_ok("test-repo-pub");
	struct bw_amqp *con = connect_ok("test-repo-con");
	assert_int_equal(bw_amqp_repo_queue(rq, sizeof(rq), t.queue, "rb"), 0);
	assert_string_equal(rq, "t15.start.repo.rb");
	char longname[300];
	memset(longname, 'x', 250);
	longname[250] = '\0';
	assert_int_equal(bw_amqp_repo_queue(rq, sizeof(rq), longname, "rb"), BW_ERANGE);

	/* the base topology only: a passive check with repositories names the missing queue */
	assert_int_equal(bw_amqp_declare(con, &t, err, sizeof(err)), 0);
	t.repositories = repos;
	t.n_repositories = 2;
	t.passive = true;
	assert_int_equal(bw_amqp_declare(con, &t, err, sizeof(err)), BW_ECONFIG);
	print_message("passive: %s\n", err);
	assert_non_null(strstr(err, "queue t15.start.repo.ra"));
	assert_non_null(strstr(err, "NOT_FOUND"));
	t.passive = false;
	assert_int_equal(bw_amqp_declare(con, &t, err, sizeof(err)), 0);
	t.passive = true;
	assert_int_equal(bw_amqp_declare(con, &t, err, sizeof(err)), 0);
	t.passive = false;
	assert_int_equal(ctl("list_queues name type arguments | grep '^t15.start.repo.rb\\s' | "
			     "grep quorum | grep -q 'reject-publish'"),
			 0);

	assert_int_equal(bw_amqp_consume(con, t.queue, 4, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_consume_repos(con, &t, 4, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_confirm_select(pub, err, sizeof(err)), 0);
	/* one message id twice: the unroutable one, not the routed one, is the returned one */
	struct bw_amqp_outgoing routed = {"RB", 2, "application/json", "same-id"};
	struct bw_amqp_outgoing lost = {"RZ", 2, NULL, "same-id"};
	uint64_t s1, s2, s3;
	assert_int_equal(bw_amqp_publish_message(pub, t.jobs_exchange, "t15.start.repo.rb", &routed,
						 &s1),
			 0);
	assert_int_equal(bw_amqp_publish_message(pub, t.jobs_exchange, "t15.start.repo.rz", &lost,
						 &s2),
			 0);
	struct bw_amqp_outgoing plain = {"S1", 2, NULL, NULL};
	assert_int_equal(bw_amqp_publish_message(pub, t.jobs_exchange, "backup.start", &plain, &s3),
			 0);
	struct outcomes o = {0};
	for (int i = 0; i < 500 && bw_amqp_unconfirmed(pub) > 0; i++) {
		assert_int_equal(bw_amqp_poll_confirms(pub, outcome_cb, &o, err, sizeof(err)), 0);
		struct pollfd p = {bw_amqp_fd(pub), POLLIN, 0};
		poll(&p, 1, 10);
	}
	assert_int_equal(outcome_of(&o, s1), 1);
	assert_int_equal(outcome_of(&o, s2), -1);
	assert_int_equal(outcome_of(&o, s3), 1);

	/* each delivery says its consumer; the properties a forward keeps come along */
	for (int k = 0; k < 2; k++) {
		struct bw_delivery d;
		assert_true(next_delivery(con, &d, 5000));
		if (strcmp(d.body, "RB") == 0) {
			assert_int_equal(d.source, BW_AMQP_FROM_REPO);
			assert_string_equal(d.content_type, "application/json");
			assert_string_equal(d.message_id, "same-id");
		} else {
			assert_string_equal(d.body, "S1");
			assert_int_equal(d.source, BW_AMQP_FROM_START);
			assert_null(d.content_type);
			assert_null(d.message_id);
		}
		assert_int_equal(bw_amqp_ack(con, &d), 0);
		bw_delivery_free(&d);
	}

	/* a channel error: the repository consumers come back with the start consumer */
	struct bw_delivery bogus = {.tag = 999999, .channel_epoch = bw_amqp_channel_epoch(con)};
	assert_int_equal(bw_amqp_ack(con, &bogus), 0);
	struct bw_delivery d;
	assert_false(next_delivery(con, &d, 500));
	assert_int_equal(bw_amqp_publish_message(pub, t.jobs_exchange, "t15.start.repo.ra", &routed,
						 &s1),
			 0);
	o.n = 0;
	for (int i = 0; i < 500 && bw_amqp_unconfirmed(pub) > 0; i++) {
		assert_int_equal(bw_amqp_poll_confirms(pub, outcome_cb, &o, err, sizeof(err)), 0);
		struct pollfd p = {bw_amqp_fd(pub), POLLIN, 0};
		poll(&p, 1, 10);
	}
	assert_int_equal(outcome_of(&o, s1), 1);
	assert_true(next_delivery(con, &d, 5000));
	assert_int_equal(d.source, BW_AMQP_FROM_REPO);
	assert_int_equal(bw_amqp_ack(con, &d), 0);
	bw_delivery_free(&d);

	/* drained: no more from any start queue */
	assert_int_equal(bw_amqp_stop_start_consumer(con, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_publish_message(pub, t.jobs_exchange, "t15.start.repo.rb", &routed,
						 &s1),
			 0);
	assert_false(next_delivery(con, &d, 500));
	bw_amqp_close(con);
	bw_amqp_close(pub);
}

static void test_unroutable_event_is_not_confirmed(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t4", names);
	struct bw_amqp *c = connect_ok("test-unroutable");
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_confirm_select(c, err, sizeof(err)), 0);
	struct confirms s = {0, 0, ""};
	publish(c, t.events_exchange, "backup.completed", "job/backup.completed", "{}");
	settle_all(c, &s);
	assert_int_equal(s.ok, 0);
	assert_int_equal(s.failed, 1);
	assert_non_null(strstr(s.why, "returned"));

	assert_int_equal(ctl("-q declare_queue --vhost=/ name=t4.sink durable=true 2>/dev/null || "
			     "true"),
			 0);
	bw_amqp_close(c);
}

static void test_connection_closed_by_operator_is_reported(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t5", names);
	struct bw_amqp *c = connect_ok("test-close-me");
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_consume(c, t.queue, 1, err, sizeof(err)), 0);
	assert_int_equal(ctl("-q close_all_connections 'closed by test' >/dev/null"), 0);
	int rc = 0;
	for (int i = 0; i < 500 && rc == 0; i++) {
		bool got;
		struct bw_delivery d;
		rc = bw_amqp_poll(c, &d, &got, err, sizeof(err));
		usleep(10000);
	}
	assert_int_equal(rc, BW_EAMQP);
	print_message("closed: %s\n", err);
	bw_amqp_close(c);
	/* and a new connection works */
	c = connect_ok("test-reconnected");
	assert_int_equal(bw_amqp_consume(c, t.queue, 1, err, sizeof(err)), 0);
	bw_amqp_close(c);
}

static void test_queue_deleted_consumer_comes_back(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t6", names);
	struct bw_amqp *c = connect_ok("test-cancel");
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_consume(c, t.queue, 1, err, sizeof(err)), 0);
	assert_int_equal(ctl("-q delete_queue t6.start >/dev/null"), 0);
	struct bw_delivery d;
	assert_false(next_delivery(c, &d, 300)); /* basic.cancel handled, no error */

	struct bw_amqp *other = connect_ok("test-recreate");
	assert_int_equal(bw_amqp_declare(other, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_confirm_select(other, err, sizeof(err)), 0);
	struct confirms s = {0, 0, ""};
	publish(other, t.jobs_exchange, "backup.start", "after", "{\"after\":1}");
	settle_all(other, &s);
	assert_true(next_delivery(c, &d, 5000));
	assert_string_equal(d.body, "{\"after\":1}");
	assert_int_equal(bw_amqp_ack(c, &d), 0);
	bw_delivery_free(&d);
	bw_amqp_close(other);
	bw_amqp_close(c);
}

static void test_bad_credentials_and_port(void **state)
{
	(void)state;
	struct bw_amqp *c = NULL;
	char err[512], bad[256];
	snprintf(bad, sizeof(bad), "amqp://guest:wrong@127.0.0.1:%s", getenv("BW_TEST_AMQP_PORT"));
	struct bw_amqp_opts o = opts("bad");
	o.url = bad;
	assert_int_equal(bw_amqp_connect(&c, &o, err, sizeof(err)), BW_ECONFIG);
	print_message("bad credentials: %s\n", err);
	o.url = "amqp://guest:guest@127.0.0.1:1";
	assert_int_equal(bw_amqp_connect(&c, &o, err, sizeof(err)), BW_EAMQP);
}

/* How long a dead-lettered message may take to show in the DLQ's count (a few metric ticks). */
#define DLQ_WAIT_MS 30000

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long rss_kib(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kib = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
			break;
	if (f)
		fclose(f);
	return kib;
}

static struct bw_amqp_link link_of(enum bw_amqp_role role, const struct bw_amqp_topology *t,
				   int heartbeat_s)
{
	struct bw_amqp_link l;
	memset(&l, 0, sizeof(l));
	l.opts = opts(role == BW_AMQP_CONSUMER ? "link-consumer" : "link-publisher");
	l.opts.heartbeat_s = heartbeat_s;
	l.role = role;
	l.topology = t;
	l.queue = role == BW_AMQP_CONSUMER ? t->queue : NULL;
	l.prefetch = 50;
	l.backoff_base_ms = 50;
	l.backoff_cap_ms = 1000;
	return l;
}

/* Brings the link up within ms (reconnecting as often as needed). */
static void link_up(struct bw_amqp_link *l, int ms)
{
	char err[512];
	bool fresh;
	int64_t until = now_ms() + ms;
	while (bw_amqp_link_up(l, &fresh, err, sizeof(err)) != 0) {
		assert_true(now_ms() < until);
		usleep(20000);
	}
}

/* Consumes (and acks) until n deliveries arrived or ms pass; survives a lost connection. */
static int consume_n(struct bw_amqp_link *l, int n, int ms)
{
	char err[512];
	int got_n = 0;
	int64_t until = now_ms() + ms;
	while (got_n < n && now_ms() < until) {
		link_up(l, 20000);
		bool got = false;
		struct bw_delivery d;
		if (bw_amqp_poll(l->c, &d, &got, err, sizeof(err)) != 0) {
			bw_amqp_link_down(l);
			continue;
		}
		if (!got) {
			struct pollfd p = {bw_amqp_fd(l->c), POLLIN, 0};
			poll(&p, 1, 5);
			continue;
		}
		if (bw_amqp_ack(l->c, &d) == 0)
			got_n++;
		bw_delivery_free(&d);
	}
	return got_n;
}

static void publish_n(struct bw_amqp_link *l, const char *x, int n, size_t size)
{
	char *body = malloc(size + 1);
	memset(body, 'x', size);
	body[size] = '\0';
	struct confirms s = {0, 0, ""};
	link_up(l, 20000);
	for (int i = 0; i < n; i++) {
		uint64_t seq;
		char id[32];
		snprintf(id, sizeof(id), "bulk-%d", i);
		assert_int_equal(bw_amqp_publish(l->c, x, "backup.start", id, body, size, &seq), 0);
		if (bw_amqp_unconfirmed(l->c) >= 100)
			settle_all(l->c, &s);
	}
	settle_all(l->c, &s);
	assert_int_equal(s.ok, n);
	free(body);
}

static void test_links_recover_from_closed_connections(void **state)
{
	(void)state;
	char names[5][64];
	struct bw_amqp_topology t = topo("t7", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 10);
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	link_up(&con, 10000);
	link_up(&pub, 10000);
	assert_int_equal(ctl("-q close_all_connections 'test' >/dev/null"), 0);
	/* both notice, come back on their own, and the flow goes on */
	struct confirms s = {0, 0, ""};
	char err[512];
	int64_t until = now_ms() + 10000;
	while (pub.connects < 2 && now_ms() < until) {
		if (pub.c && bw_amqp_poll_confirms(pub.c, confirm_cb, &s, err, sizeof(err)) != 0)
			bw_amqp_link_down(&pub);
		if (!pub.c)
			link_up(&pub, 10000);
		usleep(10000);
	}
	assert_int_equal(pub.connects, 2);
	publish_n(&pub, t.jobs_exchange, 10, 100);
	assert_int_equal(consume_n(&con, 10, 10000), 10);
	assert_int_equal(con.connects, 2);
	bw_amqp_link_down(&con);
	bw_amqp_link_down(&pub);
}

/*
 * A delivery taken on one connection is never settled on the next one (a reconnect to the
 * same node here; a move to another node is the same thing): the ack is refused with
 * BW_ESTATE, and the broker gives the message again on the new connection. Both
 * connections' channels are at their first epoch, so only a per-connection epoch tells
 * them apart; acking the old tag would have acked the redelivery (tag 1 again).
 */
static void test_delivery_of_an_older_connection_is_never_acked(void **state)
{
	(void)state;
	char names[5][64];
	struct bw_amqp_topology t = topo("t14", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 10);
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	link_up(&con, 10000);
	publish_n(&pub, t.jobs_exchange, 1, 16);
	struct bw_delivery old;
	assert_true(next_delivery(con.c, &old, 5000));
	assert_false(old.redelivered);
	bw_amqp_link_down(&con);
	link_up(&con, 10000);
	assert_int_equal(con.connects, 2);
	assert_int_equal(bw_amqp_ack(con.c, &old), BW_ESTATE);
	assert_int_equal(bw_amqp_reject(con.c, &old), BW_ESTATE);
	assert_int_equal(bw_amqp_requeue(con.c, &old), BW_ESTATE);
	struct bw_delivery again;
	assert_true(next_delivery(con.c, &again, 5000));
	assert_true(again.redelivered);
	assert_int_equal(again.len, old.len);
	assert_memory_equal(again.body, old.body, old.len);
	print_message("old delivery: tag %llu epoch %llu; redelivered: tag %llu epoch %llu\n",
		      (unsigned long long)old.tag, (unsigned long long)old.channel_epoch,
		      (unsigned long long)again.tag, (unsigned long long)again.channel_epoch);
	assert_int_equal(bw_amqp_ack(con.c, &again), 0);
	bw_delivery_free(&again);
	bw_delivery_free(&old);
	/* the ack of the redelivery landed, the refused ones did nothing: the queue is empty */
	bw_amqp_link_down(&con);
	link_up(&con, 10000);
	struct bw_delivery none;
	assert_false(next_delivery(con.c, &none, 500));
	bw_amqp_link_down(&con);
	bw_amqp_link_down(&pub);
}

/*
 * One whole connection attempt of the link: bw_amqp_link_up, and while its probe waits for
 * the node, a poll of the probe's socket and bw_amqp_link_up again, as the worker's loop
 * does. Returns the attempt's result.
 */
static int attempt(struct bw_amqp_link *l, bool *fresh, char *err, size_t errsize)
{
	for (;;) {
		int rc = bw_amqp_link_up(l, fresh, err, errsize);
		short events = 0;
		int fd = bw_amqp_link_pollfd(l, &events);
		if (fd < 0)
			return rc;
		assert_int_equal(rc, BW_EBUSY);
		struct pollfd pfd = {fd, events, 0};
		poll(&pfd, 1, bw_amqp_link_timeout_ms(l));
	}
}

/*
 * amqp.url with a node that refuses (port 1) and the real broker: whichever comes first
 * in the round's random order, the link is up after at most two attempts with no wait
 * between them (the backoff, 5 s here, only follows a whole failed round), logs which
 * node it is on, and the failed node's reason names that node. Twenty fresh links see
 * the refusing node first at least once (a fresh shuffle each; all twenty missing it has
 * a chance of 2^-20).
 */
static void test_first_node_down_connects_to_the_next_at_once(void **state)
{
	(void)state;
	char names[5][64], list[700], err[512], want[64];
	struct bw_amqp_topology t = topo("t15", names);
	snprintf(list, sizeof(list), "amqp://guest:guest@127.0.0.1:1,%s", url);
	snprintf(want, sizeof(want), "127.0.0.1:%s", getenv("BW_TEST_AMQP_PORT"));
	int refused_first = 0;
	for (int run = 0; run < 20; run++) {
		struct bw_amqp_link l = link_of(BW_AMQP_CONSUMER, &t, 10);
		l.opts.url = list;
		l.backoff_base_ms = l.backoff_cap_ms = 5000;
		bool fresh = false;
		int64_t start = now_ms();
		int rc = attempt(&l, &fresh, err, sizeof(err));
		if (rc != 0) {
			refused_first++;
			assert_int_equal(rc, BW_EBUSY);
			assert_int_equal(bw_amqp_link_timeout_ms(&l), 0); /* the next node: now */
			assert_non_null(strstr(l.why, "127.0.0.1:1 (node 1 of 2): connect: "));
			assert_null(strstr(l.why, "guest"));
			rc = attempt(&l, &fresh, err, sizeof(err));
		}
		if (rc != 0)
			print_message("link_up: %s\n", err);
		assert_int_equal(rc, 0);
		assert_true(fresh);
		assert_true(now_ms() - start < 2000);
		size_t index = 9;
		assert_string_equal(bw_amqp_link_node(&l, &index), want);
		assert_int_equal(index, 1);
		assert_int_equal(l.nodes[1].connects, 1);
		assert_int_equal(l.nodes[0].connects, 0);
		bw_amqp_link_down(&l);
		assert_null(bw_amqp_link_node(&l, NULL));
	}
	print_message("the refusing node came first in %d of 20 rounds\n", refused_first);
	assert_true(refused_first > 0 && refused_first < 20);
}

/*
 * Every node down: a round is every node once, with no wait inside it; then the backoff
 * (and only then). A stable connection lost moves to the other node at once.
 */
static void test_backoff_only_after_a_whole_round(void **state)
{
	(void)state;
	char names[5][64], list[700], err[512];
	struct bw_amqp_topology t = topo("t16", names);
	struct bw_amqp_link l = link_of(BW_AMQP_CONSUMER, &t, 10);
	l.opts.url = "amqp://guest:guest@127.0.0.1:1,amqp://guest:guest@127.0.0.1:2";
	l.backoff_base_ms = l.backoff_cap_ms = 60000;
	bool fresh;
	assert_int_equal(bw_amqp_link_up(&l, &fresh, err, sizeof(err)), BW_EBUSY);
	assert_int_equal(l.attempts, 0);
	assert_int_equal(l.next_try_ms, 0);
	assert_int_equal(bw_amqp_link_up(&l, &fresh, err, sizeof(err)), BW_EBUSY);
	assert_int_equal(l.attempts, 1); /* the round failed: now the backoff */
	assert_true(l.next_try_ms > 0);
	assert_int_equal(bw_amqp_link_up(&l, &fresh, err, sizeof(err)), BW_EBUSY);
	assert_int_equal(l.attempts, 1); /* waiting: no attempt */

	/* the real broker next to a refusing node: a connection that served, lost, moves on */
	snprintf(list, sizeof(list), "%s,amqp://guest:guest@127.0.0.1:1", url);
	struct bw_amqp_link m = link_of(BW_AMQP_CONSUMER, &t, 10);
	m.opts.url = list;
	m.backoff_base_ms = m.backoff_cap_ms = 60000;
	while (bw_amqp_link_up(&m, &fresh, err, sizeof(err)) != 0)
		assert_int_equal(m.next_try_ms, 0);
	m.up_since_ms -= 60000; /* as if up for a minute */
	bw_amqp_link_lost(&m, "as if lost");
	assert_non_null(strstr(m.why, "(node 1 of 2): as if lost"));
	assert_int_equal(m.next_try_ms, 0); /* the other node at once */
	assert_int_equal(m.order[m.pos], 1);
	assert_int_equal(bw_amqp_link_up(&m, &fresh, err, sizeof(err)), BW_EBUSY);
	assert_true(m.next_try_ms > 0); /* it refused: the round is over, the backoff runs */
	assert_int_equal(m.attempts, 1);
}

/*
 * A node that takes connections and never answers (a listening socket nobody accepts from:
 * the kernel completes the handshake, as for a frozen broker or a cut that swallows the
 * bytes) next to the real broker. No call of bw_amqp_link_up ever waits for it: each
 * returns at once while the probe waits on the caller's poll; the silent node fails after
 * opts.timeout_ms with a reason that says so, and the link moves on to the real broker.
 * Before the probe, one call waited the whole timeout inside librabbitmq's login.
 */
static void test_silent_node_never_holds_the_caller(void **state)
{
	(void)state;
	char names[5][64], list[700], err[512];
	struct bw_amqp_topology t = topo("t17", names);
	int silent = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(sa);
	assert_int_equal(bind(silent, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(silent, 16), 0);
	assert_int_equal(getsockname(silent, (struct sockaddr *)&sa, &len), 0);
	snprintf(list, sizeof(list), "amqp://guest:guest@127.0.0.1:%d,%s", ntohs(sa.sin_port), url);

	int silent_seen = 0;
	for (int run = 0; run < 6; run++) {
		struct bw_amqp_link l = link_of(BW_AMQP_CONSUMER, &t, 10);
		l.opts.url = list;
		l.opts.timeout_ms = 400;
		l.backoff_base_ms = l.backoff_cap_ms = 5000;
		bool fresh = false, was_silent = false;
		int64_t start = now_ms(), longest = 0;
		int rc, calls = 0;
		for (;;) {
			int64_t t0 = now_ms();
			rc = bw_amqp_link_up(&l, &fresh, err, sizeof(err));
			if (rc == 0)
				break;
			longest = now_ms() - t0 > longest ? now_ms() - t0 : longest;
			calls++;
			assert_int_equal(rc, BW_EBUSY);
			short events = 0;
			int fd = bw_amqp_link_pollfd(&l, &events);
			if (fd >= 0 && l.order[l.pos] == 0) {
				was_silent = true;
				assert_true(bw_amqp_link_timeout_ms(&l) <= 400);
			}
			if (fd < 0) { /* the silent node failed: the broker is next, at once */
				assert_non_null(strstr(l.why, "(node 1 of 2): no answer to the AMQP header "
							      "in 400 ms"));
				assert_int_equal(bw_amqp_link_timeout_ms(&l), 0);
			}
			struct pollfd pfd = {fd, events, 0};
			poll(&pfd, fd >= 0 ? 1 : 0, 20);
			assert_true(now_ms() - start < 5000);
		}
		assert_true(fresh);
		assert_int_equal(l.nodes[1].connects, 1);
		if (was_silent) {
			silent_seen++;
			assert_true(now_ms() - start >= 400); /* it waited for the silent node ... */
			print_message("silent node first: up after %" PRId64 " ms, %d call(s), the "
				      "longest %" PRId64 " ms\n",
				      now_ms() - start, calls, longest);
		}
		assert_true(longest < 200); /* ... but never inside a call */
		bw_amqp_link_down(&l);
	}
	close(silent);
	print_message("the silent node came first in %d of 6 rounds\n", silent_seen);
}

/* Method ids (class << 16 | method) the holding proxy holds from. */
#define QUEUE_BIND 0x00320014u
#define BASIC_CONSUME 0x003C0014u
#define BASIC_CANCEL 0x003C001Eu

/*
 * A proxy (a child process) in front of the real broker that holds a connection's
 * client-to-broker bytes for hold_ms from its first method frame of id id_a or id_b on: a
 * broker whose channel waits in them, as a cluster's does while a quorum leader or a
 * Mnesia peer is frozen (freeze_rpcs.py: a bind waited 10 s there, a consume 7 s). One
 * connection at a time (the link's probe, then its connection). Returns the child's pid;
 * *port its port.
 */
static pid_t holding_proxy(int hold_ms, unsigned id_a, unsigned id_b, int *port)
{
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(sa);
	int one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	assert_int_equal(bind(ls, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(ls, 16), 0);
	assert_int_equal(getsockname(ls, (struct sockaddr *)&sa, &len), 0);
	*port = ntohs(sa.sin_port);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid > 0) {
		close(ls);
		return pid;
	}
	/* a test that fails before its kill must not leave the proxy behind */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	alarm(120);
	struct sockaddr_in up = {.sin_family = AF_INET,
				 .sin_port = htons((uint16_t)atoi(getenv("BW_TEST_AMQP_PORT"))),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	static unsigned char buf[1 << 20];
	for (;;) {
		int cl = accept(ls, NULL, NULL);
		int br = socket(AF_INET, SOCK_STREAM, 0);
		if (cl < 0 || connect(br, (struct sockaddr *)&up, sizeof(up)) != 0)
			_exit(1);
		size_t have = 0, sent = 0, scan = 8; /* past the protocol header: frames */
		int64_t hold_until = 0;
		for (bool open = true; open;) {
			int64_t now = now_ms();
			struct pollfd p[2] = {{cl, POLLIN, 0}, {br, POLLIN, 0}};
			int wait = hold_until > now ? (int)(hold_until - now) : -1;
			if (poll(p, 2, wait > 0 ? wait : 100) < 0)
				_exit(1);
			if (p[1].revents) { /* broker to client: always relayed */
				unsigned char b[65536];
				ssize_t n = read(br, b, sizeof(b));
				open = n > 0 && write(cl, b, (size_t)n) == n;
			}
			if (open && p[0].revents) {
				ssize_t n = read(cl, buf + have, sizeof(buf) - have);
				open = n > 0;
				have += n > 0 ? (size_t)n : 0;
			}
			/* whole frames: type, channel, size, payload (class, method, ...), end */
			while (hold_until == 0 && scan + 7 <= have) {
				const unsigned char *f = buf + scan;
				size_t size = (size_t)f[3] << 24 | (size_t)f[4] << 16 | f[5] << 8 | f[6];
				if (scan + 8 + size > have)
					break;
				unsigned id = (unsigned)f[7] << 24 | f[8] << 16 | f[9] << 8 | f[10];
				if (f[0] == 1 && (id == id_a || id == id_b))
					hold_until = now_ms() + hold_ms;
				else
					scan += 8 + size;
			}
			size_t upto = hold_until && now_ms() < hold_until ? scan : have;
			if (open && upto > sent) {
				ssize_t n = write(br, buf + sent, upto - sent);
				open = n > 0;
				sent += n > 0 ? (size_t)n : 0;
			}
		}
		close(cl);
		close(br);
	}
}

/*
 * A broker whose channel holds binds and consumes for 2 s (the proxy above): the link's
 * restore does not wait for them. It is up within a fraction of the hold, and the consumer
 * it registered without waiting takes a message once the broker's channel moves on. Nor
 * does a drain's basic.cancel wait, held the same way. Before, the restore waited for every
 * bind-ok and consume-ok, and the drain for cancel-ok: the hold, in one call.
 */
static void test_restore_never_waits_for_binds_and_consumes(void **state)
{
	(void)state;
	char names[5][64], proxied[700], err[512];
	struct bw_amqp_topology t = topo("t18", names);
	const char *repos[] = {"r1"};
	t.repositories = repos;
	t.n_repositories = 1;
	int port = 0;
	pid_t proxy = holding_proxy(2000, QUEUE_BIND, BASIC_CONSUME, &port);
	snprintf(proxied, sizeof(proxied), "amqp://guest:guest@127.0.0.1:%d", port);

	/* first declared and bound the usual way, so that the held restore only re-binds */
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	link_up(&pub, 10000);

	struct bw_amqp_link l = link_of(BW_AMQP_CONSUMER, &t, 10);
	l.opts.url = proxied;
	l.control_exchange = "t18.control";
	bool fresh = false;
	int64_t start = now_ms();
	int rc = attempt(&l, &fresh, err, sizeof(err));
	int64_t took = now_ms() - start;
	if (rc != 0)
		print_message("link_up: %s\n", err);
	assert_int_equal(rc, 0);
	print_message("link up through a 2 s hold of binds and consumes in %" PRId64 " ms\n", took);
	assert_true(took < 1000);

	struct confirms s = {0, 0, ""};
	publish(pub.c, t.jobs_exchange, "backup.start", "held-1", "{}");
	settle_all(pub.c, &s);
	assert_int_equal(s.ok, 1);
	struct bw_delivery d;
	assert_true(next_delivery(l.c, &d, 10000));
	print_message("first delivery %" PRId64 " ms after the link_up call\n", now_ms() - start);
	assert_true(now_ms() - start >= 1900); /* the broker's channel did hold them */
	assert_int_equal(d.source, BW_AMQP_FROM_START);
	assert_int_equal(bw_amqp_ack(l.c, &d), 0);
	bw_delivery_free(&d);
	assert_false(bw_amqp_channel_closed(l.c, err, sizeof(err)));
	bw_amqp_link_down(&l);
	kill(proxy, SIGKILL);
	waitpid(proxy, NULL, 0);

	/* a draining worker's basic.cancel, held the same way: the call does not wait either */
	proxy = holding_proxy(2000, BASIC_CANCEL, BASIC_CANCEL, &port);
	snprintf(proxied, sizeof(proxied), "amqp://guest:guest@127.0.0.1:%d", port);
	struct bw_amqp_link drain = link_of(BW_AMQP_CONSUMER, &t, 10);
	drain.opts.url = proxied;
	assert_int_equal(attempt(&drain, &fresh, err, sizeof(err)), 0);
	start = now_ms();
	rc = bw_amqp_stop_start_consumer(drain.c, err, sizeof(err));
	took = now_ms() - start;
	print_message("start consumers cancelled through a 2 s hold in %" PRId64 " ms\n", took);
	assert_int_equal(rc, 0);
	assert_true(took < 1000);
	bw_amqp_link_down(&drain);
	bw_amqp_link_down(&pub);
	kill(proxy, SIGKILL);
	waitpid(proxy, NULL, 0);
}

static void test_memory_flat_over_100k_messages(void **state)
{
	(void)state;
	char names[5][64];
	struct bw_amqp_topology t = topo("t8", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 10);
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	link_up(&con, 10000);
	publish_n(&pub, t.jobs_exchange, 10000, 1024);
	assert_int_equal(consume_n(&con, 10000, 60000), 10000);
	long before = rss_kib();
	for (int round = 0; round < 9; round++) {
		publish_n(&pub, t.jobs_exchange, 10000, 1024);
		assert_int_equal(consume_n(&con, 10000, 60000), 10000);
	}
	long after = rss_kib();
	print_message("100k messages: RSS %ld KiB after the first 10k, %ld KiB after 100k\n",
		      before, after);
	assert_true(after - before < 4096);
	bw_amqp_link_down(&con);
	bw_amqp_link_down(&pub);
}

static void test_never_acked_message_ends_in_dlq(void **state)
{
	(void)state;
	char names[5][64];
	struct bw_amqp_topology t = topo("t9", names); /* x-delivery-limit 2 */
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	publish_n(&pub, t.jobs_exchange, 1, 10);
	bw_amqp_link_down(&pub);
	int deliveries = 0;
	for (int i = 0; i < 6; i++) {
		/* a consumer that dies before it acks, every time */
		struct bw_amqp *c = connect_ok("dies");
		char err[512];
		assert_int_equal(bw_amqp_consume(c, t.queue, 1, err, sizeof(err)), 0);
		struct bw_delivery d;
		if (next_delivery(c, &d, 1500)) {
			deliveries++;
			bw_delivery_free(&d);
		}
		bw_amqp_close(c);
	}
	print_message("delivered %d times before dead-lettering (x-delivery-limit 2)\n",
		      deliveries);
	assert_int_equal(deliveries, 3);
	/*
	 * The broker dead-letters after the last consumer has gone, and list_queues shows a
	 * quorum queue's length only as of its last metrics tick: the count reached the DLQ
	 * about 5 s after the third consumer closed (RabbitMQ 3.10), later than the empty
	 * rounds above last in a fast build. Wait for it, bounded.
	 */
	int64_t until = now_ms() + DLQ_WAIT_MS;
	int in_dlq;
	while ((in_dlq = ctl("-q list_queues name messages --no-table-headers | "
			     "grep -Eq '^t9.start.dlq\\s+1$'")) != 0 &&
	       now_ms() < until)
		usleep(200000);
	assert_int_equal(in_dlq, 0);
}

static pid_t beam_pid(void)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/run/beam.pid", getenv("BW_TEST_BROKER_DIR"));
	FILE *f = fopen(path, "r");
	long pid = 0;
	if (f && fscanf(f, "%ld", &pid) != 1)
		pid = 0;
	if (f)
		fclose(f);
	return (pid_t)pid;
}

static void test_frozen_broker_detected_within_two_heartbeats(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t10", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 2);
	link_up(&con, 10000);
	pid_t beam = beam_pid();
	assert_true(beam > 0);
	assert_int_equal(kill(beam, SIGSTOP), 0);
	int64_t start = now_ms();
	int rc = 0;
	while (rc == 0 && now_ms() - start < 10000) {
		bool got;
		struct bw_delivery d;
		rc = bw_amqp_poll(con.c, &d, &got, err, sizeof(err));
		struct pollfd p = {bw_amqp_fd(con.c), POLLIN, 0};
		poll(&p, 1, 50);
	}
	int64_t took = now_ms() - start;
	kill(beam, SIGCONT);
	print_message("frozen broker detected after %lld ms (heartbeat 2 s): %s\n",
		      (long long)took, err);
	assert_int_equal(rc, BW_EAMQP);
	assert_true(took <= 4000 + 500);
	bw_amqp_link_down(&con);
	link_up(&con, 30000); /* and back once it thaws */
	bw_amqp_link_down(&con);
}

static void test_busy_loop_recovers_cleanly(void **state)
{
	(void)state;
	char names[5][64];
	struct bw_amqp_topology t = topo("t11", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 1);
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	link_up(&con, 10000);
	sleep(3); /* busy elsewhere for 3 heartbeat intervals: no library call */
	publish_n(&pub, t.jobs_exchange, 5, 10);
	assert_int_equal(consume_n(&con, 5, 15000), 5);
	print_message("after a 3 s stall with a 1 s heartbeat: %llu connect(s)\n",
		      (unsigned long long)con.connects);
	bw_amqp_link_down(&con);
	bw_amqp_link_down(&pub);
}

static void test_resource_alarm_blocks_publishing_not_consuming(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t12", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 10);
	struct bw_amqp_link pub = link_of(BW_AMQP_PUBLISHER, &t, 10);
	link_up(&con, 10000);
	publish_n(&pub, t.jobs_exchange, 20, 10);

	assert_int_equal(ctl("-q set_disk_free_limit 100000GB >/dev/null"), 0);
	struct confirms s = {0, 0, ""};
	uint64_t seq;
	int64_t until = now_ms() + 10000;
	while (!bw_amqp_blocked(pub.c) && now_ms() < until) {
		if (bw_amqp_unconfirmed(pub.c) == 0)
			assert_int_equal(bw_amqp_publish(pub.c, t.jobs_exchange, "backup.start",
							 "during-alarm", "{}", 2, &seq),
					 0);
		assert_int_equal(bw_amqp_poll_confirms(pub.c, confirm_cb, &s, err, sizeof(err)), 0);
		usleep(20000);
	}
	assert_true(bw_amqp_blocked(pub.c));
	int64_t t0 = now_ms();
	assert_int_equal(bw_amqp_publish(pub.c, t.jobs_exchange, "backup.start", "refused", "{}", 2,
					 &seq),
			 BW_EBUSY); /* bounded: refused at once, never stuck in write() */
	assert_true(now_ms() - t0 < 100);
	/* consuming goes on meanwhile */
	assert_int_equal(consume_n(&con, 20, 10000), 20);

	assert_int_equal(ctl("-q set_disk_free_limit 1MB >/dev/null"), 0);
	until = now_ms() + 30000;
	while ((bw_amqp_blocked(pub.c) || bw_amqp_unconfirmed(pub.c)) && now_ms() < until) {
		assert_int_equal(bw_amqp_poll_confirms(pub.c, confirm_cb, &s, err, sizeof(err)), 0);
		usleep(20000);
	}
	assert_false(bw_amqp_blocked(pub.c));
	assert_int_equal(bw_amqp_unconfirmed(pub.c), 0);
	assert_true(s.ok >= 1); /* what was pending went out after the alarm */
	bw_amqp_link_down(&con);
	bw_amqp_link_down(&pub);
}

#ifdef __SANITIZE_ADDRESS__
/* ASan's allocator interface (gcc 12 ships no header for it). */
int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void *, size_t),
					      void (*free_hook)(const volatile void *));
size_t __sanitizer_get_allocated_size(const volatile void *p);

/* Heap bytes allocated and not freed since tracking began, and their peak. */
static bool heap_tracking;
static int64_t heap_live, heap_peak;

static void heap_malloc_hook(const volatile void *p, size_t n)
{
	(void)p;
	if (heap_tracking && (heap_live += (int64_t)n) > heap_peak)
		heap_peak = heap_live;
}

static void heap_free_hook(const volatile void *p)
{
	if (heap_tracking && p)
		heap_live -= (int64_t)__sanitizer_get_allocated_size(p);
}
#endif

/*
 * Polls for one delivery and stores in *peak how far the process's heap grew meanwhile, at
 * its highest (every allocation of ours and librabbitmq's counts), or -1 when the build
 * has no ASan to count with.
 */
static bool next_delivery_heap(struct bw_amqp *c, struct bw_delivery *d, int ms, int64_t *peak)
{
#ifdef __SANITIZE_ADDRESS__
	heap_live = heap_peak = 0;
	heap_tracking = true;
	bool got = next_delivery(c, d, ms);
	heap_tracking = false;
	*peak = heap_peak;
#else
	bool got = next_delivery(c, d, ms);
	*peak = -1;
#endif
	return got;
}

#define MIB (1024 * 1024)

static char *patterned(size_t n, unsigned seed)
{
	char *b = malloc(n);
	assert_non_null(b);
	for (size_t i = 0; i < n; i++)
		b[i] = (char)('a' + (i * 7 + seed) % 26);
	return b;
}

static void test_body_over_the_limit_is_dropped_unheld(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("t13", names);
	struct bw_amqp_link con = link_of(BW_AMQP_CONSUMER, &t, 10);
	con.prefetch = 1; /* one message in flight: the heap measured is that message's */
	con.max_message_bytes = MIB;
	link_up(&con, 10000);

	/* 2 MiB (over), exactly 1 MiB (at the limit: kept), then a small one */
	char *big = patterned(2 * MIB, 1), *edge = patterned(MIB, 2);
	struct bw_amqp *pub = connect_ok("test-big-pub");
	assert_int_equal(bw_amqp_confirm_select(pub, err, sizeof(err)), 0);
	uint64_t seq;
	assert_int_equal(bw_amqp_publish(pub, t.jobs_exchange, "backup.start", "big", big, 2 * MIB,
					 &seq),
			 0);
	assert_int_equal(bw_amqp_publish(pub, t.jobs_exchange, "backup.start", "edge", edge, MIB,
					 &seq),
			 0);
	publish(pub, t.jobs_exchange, "backup.start", "small", "{\"after\":1}");
	struct confirms s = {0, 0, ""};
	settle_all(pub, &s);
	assert_int_equal(s.ok, 3);
	bw_amqp_close(pub);

	struct bw_delivery d;
	int64_t peak;
	long rss0 = rss_kib();
	assert_true(next_delivery_heap(con.c, &d, 10000, &peak));
	long rss1 = rss_kib();
	print_message("2 MiB body, 1 MiB limit: heap peak %lld bytes, RSS %ld -> %ld KiB\n",
		      (long long)peak, rss0, rss1);
	assert_true(d.too_large);
	assert_null(d.body);
	assert_int_equal(d.len, 2 * MIB);
	assert_true(d.digest == bw_fnv1a64(big, 2 * MIB)); /* the rejected event's id */
	if (peak >= 0)
		assert_true(peak < MIB / 4); /* a frame or two, never the body */
	assert_true(rss1 - rss0 < 1024);
	assert_int_equal(bw_amqp_reject(con.c, &d), 0);
	bw_delivery_free(&d);

	/* at the limit: kept whole; and the measure does see a body when one is held */
	assert_true(next_delivery_heap(con.c, &d, 10000, &peak));
	print_message("1 MiB body, 1 MiB limit: heap peak %lld bytes\n", (long long)peak);
	assert_false(d.too_large);
	assert_int_equal(d.len, MIB);
	assert_non_null(d.body);
	assert_memory_equal(d.body, edge, MIB);
	assert_int_equal(d.body[MIB], '\0');
	assert_true(d.digest == 0);
	if (peak >= 0)
		assert_true(peak > MIB);
	assert_int_equal(bw_amqp_ack(con.c, &d), 0);
	bw_delivery_free(&d);

	/* the frame stream is still in step after the dropped body */
	assert_true(next_delivery(con.c, &d, 10000));
	assert_false(d.too_large);
	assert_string_equal(d.body, "{\"after\":1}");
	assert_int_equal(bw_amqp_ack(con.c, &d), 0);
	bw_delivery_free(&d);
	bw_amqp_link_down(&con);

	/* the broker still had the whole body: the dead-lettered copy is intact */
	char cmd[1024];
	snprintf(cmd, sizeof(cmd),
		 "/usr/bin/python3 -c '\n"
		 "import pika, time\n"
		 "c = pika.BlockingConnection(pika.URLParameters(\"%s\"))\n"
		 "ch = c.channel()\n"
		 "for _ in range(50):\n"
		 "    m, p, b = ch.basic_get(\"t13.start.dlq\", auto_ack=True)\n"
		 "    if m: break\n"
		 "    time.sleep(0.1)\n"
		 "assert len(b) == %d and p.message_id == \"big\", (len(b), p.message_id)\n"
		 "'",
		 url, 2 * MIB);
	assert_int_equal(system(cmd), 0);
	free(big);
	free(edge);
}

int main(void)
{
	url = getenv("BW_TEST_AMQP_URL");
	if (url == NULL) {
		fprintf(stderr, "test_amqp: run me through tests/with-broker\n");
		return 1;
	}
#ifdef __SANITIZE_ADDRESS__
	__sanitizer_install_malloc_and_free_hooks(heap_malloc_hook, heap_free_hook);
#endif
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_topology_idempotent_passive_and_mismatch),
		cmocka_unit_test(test_publish_consume_ack_nothing_redelivered),
		cmocka_unit_test(test_rejected_goes_to_dlq_with_x_death),
		cmocka_unit_test(test_unroutable_event_is_not_confirmed),
		cmocka_unit_test(test_repo_queues_placement),
		cmocka_unit_test(test_control_consumer_tagged_and_back_after_channel_close),
		cmocka_unit_test(test_connection_closed_by_operator_is_reported),
		cmocka_unit_test(test_queue_deleted_consumer_comes_back),
		cmocka_unit_test(test_bad_credentials_and_port),
		cmocka_unit_test(test_body_over_the_limit_is_dropped_unheld),
		cmocka_unit_test(test_links_recover_from_closed_connections),
		cmocka_unit_test(test_delivery_of_an_older_connection_is_never_acked),
		cmocka_unit_test(test_first_node_down_connects_to_the_next_at_once),
		cmocka_unit_test(test_backoff_only_after_a_whole_round),
		cmocka_unit_test(test_silent_node_never_holds_the_caller),
		cmocka_unit_test(test_restore_never_waits_for_binds_and_consumes),
		cmocka_unit_test(test_memory_flat_over_100k_messages),
		cmocka_unit_test(test_never_acked_message_ends_in_dlq),
		cmocka_unit_test(test_busy_loop_recovers_cleanly),
		cmocka_unit_test(test_resource_alarm_blocks_publishing_not_consuming),
		cmocka_unit_test(test_frozen_broker_detected_within_two_heartbeats),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
