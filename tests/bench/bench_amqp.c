/* bench_amqp.c: confirmed publishes/s and consume+ack/s via common/amqp and direct librabbitmq. */
#include "amqp.h"
#include "error.h"

#include "bench_rabbit.h"

#include <amqp.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

/*
 * bench_amqp --impl bw|direct --test batch|each|consume --count N --queue Q URL
 *
 * One run of one test through one implementation; prints one line
 *   bench_amqp impl=… test=… count=… seconds=… msg_s=…
 * (scripts/bench-amqp reads it) followed by cpu_us_msg=…, this process's user+system CPU
 * time over the timed span per message: the throughput is mostly the broker's (a quorum
 * queue's fsyncs), the CPU time is what the code under test costs. Both implementations
 * share everything but the code under test:
 *
 *   setup (untimed)  Q is declared through bw_amqp_declare (a quorum queue, durable, with
 *                    the topology's DLX; the other names are Q.jobs, Q.events, Q.dlx,
 *                    Q.dlq) and purged; for consume, N messages are published beforehand
 *                    with the direct batch loop and their connection closed.
 *   message          1 KiB body, persistent (delivery mode 2), content-type
 *                    application/json, message_id "bench-<i>", mandatory, to the default
 *                    exchange with routing key Q: exactly what bw_amqp_publish sends, so the
 *                    direct loop sets the same properties.
 *   batch            publish BATCH (100), wait until all of them are confirmed, repeat.
 *   each             publish one, wait for its confirm, N times.
 *   consume          basic.qos prefetch PREFETCH (50), basic.consume with manual acks, then
 *                    receive and ack N messages one by one.
 *   check (untimed)  a passive declare on a fresh connection: N messages in Q after a
 *                    publish test, 0 after consume (its connection closed first: an unacked
 *                    message would be back). Then Q is purged.
 *
 * After the last ack the consumer's connection stays open SETTLE_MS before it is closed
 * (untimed): RabbitMQ 3.10 drops a quorum queue's settles that its channel still buffers
 * when the channel closes (rabbitmq-server#10327), so an ack followed at once by a close
 * leaves a few acked messages to be redelivered; neither channel.close nor a basic.qos round
 * trip first prevents it (tried: 1-16 of 500-20000 left in about 1 run in 3), a pause does.
 *
 * The clock runs from just before confirm.select (or basic.qos) to the last confirm (or
 * the last ack handed to the socket). Both connections are opened the same way (frame max
 * 131072, heartbeat HEARTBEAT_S). bw is driven as an event loop drives it: poll() on
 * bw_amqp_fd (skipped while bw_amqp_pending), then bw_amqp_poll_confirms, or bw_amqp_poll
 * until it has nothing (never spinning); direct waits inside librabbitmq
 * (amqp_simple_wait_frame_noblock, amqp_consume_message), the way its examples do. Exit 0
 * when the run and its check succeeded, 1 otherwise, 2 usage.
 */

enum {
	BODY_LEN = 1024,
	BATCH = 100,
	PREFETCH = 50,
	HEARTBEAT_S = BENCH_RABBIT_HEARTBEAT_S, /* the direct connection's: the same for both */
	TIMEOUT_MS =
	    BENCH_RABBIT_TIMEOUT_MS, /* connect, RPCs, the longest wait for a confirm or delivery */
	SETTLE_MS = 250,	     /* after the last ack, before the close: see above */
};

enum impl { IMPL_BW, IMPL_DIRECT };
enum test { TEST_BATCH, TEST_EACH, TEST_CONSUME };

struct opts {
	enum impl impl;
	enum test test;
	long count;
	const char *queue;
	const char *url;
};

static const char *const impl_names[] = {"bw", "direct"};
static const char *const test_names[] = {"batch", "each", "consume"};

static char body[BODY_LEN + 1];

void bench_fail(const char *fmt, ...)
{
	va_list ap;
	fputs("bench_amqp: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void pause_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* User+system CPU seconds of this process so far. */
static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A JSON object of exactly BODY_LEN bytes (the content type says JSON). */
static void make_body(void)
{
	static const char head[] = "{\"pad\":\"", tail[] = "\"}";
	size_t pad = BODY_LEN - (sizeof(head) - 1) - (sizeof(tail) - 1);
	memcpy(body, head, sizeof(head) - 1);
	memset(body + sizeof(head) - 1, 'x', pad);
	memcpy(body + sizeof(head) - 1 + pad, tail, sizeof(tail));
}

static void message_id(char *buf, size_t size, uint64_t i)
{
	snprintf(buf, size, "bench-%" PRIu64, i);
}

/* ---- direct: plain librabbitmq-c 0.11 ---------------------------------------------------- */

static int direct_publish(amqp_connection_state_t conn, const char *queue, uint64_t i)
{
	char id[32];
	message_id(id, sizeof(id), i);
	amqp_basic_properties_t props;
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
		       AMQP_BASIC_MESSAGE_ID_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = 2;
	props.message_id = amqp_cstring_bytes(id);
	amqp_bytes_t b = {BODY_LEN, body};
	int st = amqp_basic_publish(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(""),
				    amqp_cstring_bytes(queue), 1, 0, &props, b);
	if (st != AMQP_STATUS_OK) {
		bench_fail("basic.publish: %s", amqp_error_string2(st));
		return -1;
	}
	return 0;
}

/*
 * Reads frames until every publish with sequence number in [first, last] is acked: a
 * basic.ack with multiple settles all up to its tag. A nack, a return or anything else
 * is a failure (nothing else is expected on this channel).
 */
static int direct_wait_confirms(amqp_connection_state_t conn, uint64_t first, uint64_t last)
{
	bool done[BATCH] = {false};
	uint64_t left = last - first + 1;

	while (left > 0) {
		amqp_frame_t f;
		struct timeval tv = {TIMEOUT_MS / 1000, 0};
		int st = amqp_simple_wait_frame_noblock(conn, &f, &tv);
		if (st != AMQP_STATUS_OK) {
			bench_fail("waiting for confirms %" PRIu64 "-%" PRIu64 ": %s", first, last,
				   amqp_error_string2(st));
			return -1;
		}
		if (f.frame_type != AMQP_FRAME_METHOD ||
		    f.payload.method.id != AMQP_BASIC_ACK_METHOD) {
			bench_fail("waiting for confirms: unexpected frame type %u method 0x%08x",
				   f.frame_type,
				   f.frame_type == AMQP_FRAME_METHOD ? f.payload.method.id : 0);
			return -1;
		}
		amqp_basic_ack_t *m = f.payload.method.decoded;
		uint64_t lo = m->multiple ? first : m->delivery_tag;
		for (uint64_t t = lo; t <= m->delivery_tag && t <= last; t++) {
			if (t >= first && !done[t - first]) {
				done[t - first] = true;
				left--;
			}
		}
	}
	return 0;
}

/* Publishes n messages in batches of `batch`, each batch confirmed before the next. */
static int direct_publish_run(amqp_connection_state_t conn, const char *queue, long n, int batch)
{
	amqp_confirm_select(conn, BENCH_RABBIT_CHANNEL);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "confirm.select") != 0)
		return -1;
	uint64_t seq = 1;
	for (long done = 0; done < n;) {
		long k = n - done < batch ? n - done : batch;
		for (long j = 0; j < k; j++) {
			if (direct_publish(conn, queue, seq + (uint64_t)j) != 0)
				return -1;
		}
		if (direct_wait_confirms(conn, seq, seq + (uint64_t)k - 1) != 0)
			return -1;
		seq += (uint64_t)k;
		done += k;
		amqp_maybe_release_buffers(conn);
	}
	return 0;
}

static int direct_consume_run(amqp_connection_state_t conn, const char *queue, long n)
{
	amqp_basic_qos(conn, BENCH_RABBIT_CHANNEL, 0, PREFETCH, 0);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "basic.qos") != 0)
		return -1;
	amqp_basic_consume(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(queue), amqp_empty_bytes,
			   0, 0, 0, amqp_empty_table);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "basic.consume") != 0)
		return -1;
	for (long got = 0; got < n;) {
		amqp_envelope_t env;
		struct timeval tv = {TIMEOUT_MS / 1000, 0};
		amqp_maybe_release_buffers(conn);
		amqp_rpc_reply_t r = amqp_consume_message(conn, &env, &tv, 0);
		if (r.reply_type != AMQP_RESPONSE_NORMAL) {
			char what[64];
			snprintf(what, sizeof(what), "consume (after %ld)", got);
			bench_rabbit_ok(r, what); /* nothing but deliveries is expected here */
			return -1;
		}
		int st = amqp_basic_ack(conn, BENCH_RABBIT_CHANNEL, env.delivery_tag, 0);
		size_t len = env.message.body.len;
		amqp_destroy_envelope(&env);
		if (st != AMQP_STATUS_OK) {
			bench_fail("basic.ack: %s", amqp_error_string2(st));
			return -1;
		}
		if (len != BODY_LEN) {
			bench_fail("delivery of %zu bytes, expected %d", len, BODY_LEN);
			return -1;
		}
		got++;
	}
	return 0;
}

/* ---- bw: through common/amqp ------------------------------------------------------------ */

struct confirms {
	uint64_t ok;
	uint64_t failed;
	char why[128];
};

static void on_confirm_cb(void *arg, uint64_t seq, bool ok, const char *why)
{
	struct confirms *k = arg;
	(void)seq;
	if (ok) {
		k->ok++;
		return;
	}
	if (k->failed++ == 0)
		snprintf(k->why, sizeof(k->why), "%s", why ? why : "?");
}

/* Waits up to ms for input on c unless the library already holds some. 0, or -1 on error. */
static int bw_wait(struct bw_amqp *c, int ms)
{
	if (bw_amqp_pending(c))
		return 0;
	struct pollfd p = {bw_amqp_fd(c), POLLIN, 0};
	int r;
	do
		r = poll(&p, 1, ms);
	while (r < 0 && errno == EINTR);
	if (r < 0) {
		bench_fail("poll: %s", strerror(errno));
		return -1;
	}
	return 0;
}

static int bw_connect(struct bw_amqp **out, const char *url, const char *name)
{
	struct bw_amqp_opts o = {url, HEARTBEAT_S, TIMEOUT_MS, name, NULL, NULL, NULL, true, true};
	char err[512] = "";
	int rc = bw_amqp_connect(out, &o, err, sizeof(err));
	if (rc != 0)
		bench_fail("bw_amqp_connect: %s: %s", bw_err_name(rc), err);
	return rc;
}

/*
 * Waits until nothing c published is unsettled; every settle must be an ack. As an event
 * loop does: wait for input on the fd (or the library's buffer), then handle all of it.
 */
static int bw_wait_confirms(struct bw_amqp *c, struct confirms *k)
{
	char err[512] = "";
	double deadline = now_s() + TIMEOUT_MS / 1000.0;

	while (bw_amqp_unconfirmed(c) > 0) {
		double left = deadline - now_s();
		if (left <= 0) {
			bench_fail("no confirm within %d ms", TIMEOUT_MS);
			return -1;
		}
		if (bw_wait(c, (int)(left * 1000) + 1) != 0)
			return -1;
		int rc = bw_amqp_poll_confirms(c, on_confirm_cb, k, err, sizeof(err));
		if (rc != 0) {
			bench_fail("bw_amqp_poll_confirms: %s: %s", bw_err_name(rc), err);
			return -1;
		}
		if (k->failed) {
			bench_fail("a publish was not confirmed: %s", k->why);
			return -1;
		}
	}
	return 0;
}

static int bw_publish_run(struct bw_amqp *c, const char *queue, long n, int batch)
{
	struct confirms k = {0, 0, ""};
	char err[512] = "";
	int rc = bw_amqp_confirm_select(c, err, sizeof(err));
	if (rc != 0) {
		bench_fail("bw_amqp_confirm_select: %s: %s", bw_err_name(rc), err);
		return -1;
	}
	uint64_t i = 1;
	for (long done = 0; done < n;) {
		long k_n = n - done < batch ? n - done : batch;
		for (long j = 0; j < k_n; j++, i++) {
			char id[32];
			uint64_t seq;
			message_id(id, sizeof(id), i);
			rc = bw_amqp_publish(c, "", queue, id, body, BODY_LEN, &seq);
			if (rc != 0) {
				bench_fail("bw_amqp_publish: %s", bw_err_name(rc));
				return -1;
			}
		}
		if (bw_wait_confirms(c, &k) != 0)
			return -1;
		done += k_n;
	}
	if (k.ok != (uint64_t)n) {
		bench_fail("%" PRIu64 " acks for %ld publishes", k.ok, n);
		return -1;
	}
	return 0;
}

static int bw_consume_run(struct bw_amqp *c, const char *queue, long n)
{
	char err[512] = "";
	int rc = bw_amqp_consume(c, queue, PREFETCH, err, sizeof(err));
	if (rc != 0) {
		bench_fail("bw_amqp_consume: %s: %s", bw_err_name(rc), err);
		return -1;
	}
	double deadline = now_s() + TIMEOUT_MS / 1000.0;
	for (long got = 0; got < n;) {
		struct bw_delivery d;
		bool have = false;
		rc = bw_amqp_poll(c, &d, &have, err, sizeof(err));
		if (rc != 0) {
			bench_fail("bw_amqp_poll (after %ld): %s: %s", got, bw_err_name(rc), err);
			return -1;
		}
		if (!have) {
			double left = deadline - now_s();
			if (left <= 0) {
				bench_fail("no delivery within %d ms (after %ld)", TIMEOUT_MS, got);
				return -1;
			}
			if (bw_wait(c, (int)(left * 1000) + 1) != 0)
				return -1;
			continue;
		}
		rc = bw_amqp_ack(c, &d);
		size_t len = d.len;
		bw_delivery_free(&d);
		if (rc != 0) {
			bench_fail("bw_amqp_ack: %s", bw_err_name(rc));
			return -1;
		}
		if (len != BODY_LEN) {
			bench_fail("delivery of %zu bytes, expected %d", len, BODY_LEN);
			return -1;
		}
		got++;
		deadline = now_s() + TIMEOUT_MS / 1000.0;
	}
	return 0;
}

/* ---- setup and check (untimed, the same for both) ---------------------------------------- */

/* Declares the topology whose queue is q (quorum, durable) through bw_amqp_declare. */
static int declare(const char *url, const char *q)
{
	char names[4][256];
	snprintf(names[0], sizeof(names[0]), "%s.jobs", q);
	snprintf(names[1], sizeof(names[1]), "%s.events", q);
	snprintf(names[2], sizeof(names[2]), "%s.dlx", q);
	snprintf(names[3], sizeof(names[3]), "%s.dlq", q);
	struct bw_amqp_topology t = {q, names[0], names[1], names[2], names[3], 5, false, NULL, 0};
	struct bw_amqp *c = NULL;
	char err[512] = "";
	if (bw_connect(&c, url, "bench_amqp setup") != 0)
		return -1;
	int rc = bw_amqp_declare(c, &t, err, sizeof(err));
	if (rc != 0)
		bench_fail("bw_amqp_declare: %s: %s", bw_err_name(rc), err);
	bw_amqp_close(c);
	return rc == 0 ? 0 : -1;
}

/* Purges q (when purge) and stores its ready message count in *count. */
static int queue_count(const char *url, const char *q, bool purge, uint32_t *count)
{
	amqp_connection_state_t conn = bench_rabbit_connect(url);
	int rc = -1;
	if (conn == NULL)
		return -1;
	if (purge) {
		amqp_queue_purge(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(q));
		if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "queue.purge") != 0)
			goto out;
	}
	amqp_queue_declare_ok_t *ok = amqp_queue_declare(
	    conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(q), 1, 0, 0, 0, amqp_empty_table);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "queue.declare (passive)") != 0)
		goto out;
	*count = ok->message_count;
	rc = 0;
out:
	bench_rabbit_close(conn);
	return rc;
}

/* Publishes n messages to q with the direct batch loop, untimed. */
static int prefill(const char *url, const char *q, long n)
{
	amqp_connection_state_t conn = bench_rabbit_connect(url);
	if (conn == NULL)
		return -1;
	int rc = direct_publish_run(conn, q, n, BATCH);
	bench_rabbit_close(conn);
	return rc;
}

/* ---- main -------------------------------------------------------------------------------- */

static int run(const struct opts *o, double *seconds, double *cpu)
{
	int batch = o->test == TEST_EACH ? 1 : BATCH;
	int rc = -1;
	double t0, t1, c0, c1;

	if (o->impl == IMPL_DIRECT) {
		amqp_connection_state_t conn = bench_rabbit_connect(o->url);
		if (conn == NULL)
			return -1;
		c0 = cpu_s();
		t0 = now_s();
		rc = o->test == TEST_CONSUME ? direct_consume_run(conn, o->queue, o->count)
					     : direct_publish_run(conn, o->queue, o->count, batch);
		t1 = now_s();
		c1 = cpu_s();
		if (o->test == TEST_CONSUME)
			pause_ms(SETTLE_MS);
		bench_rabbit_close(conn);
	} else {
		struct bw_amqp *c = NULL;
		if (bw_connect(&c, o->url, "bench_amqp") != 0)
			return -1;
		c0 = cpu_s();
		t0 = now_s();
		rc = o->test == TEST_CONSUME ? bw_consume_run(c, o->queue, o->count)
					     : bw_publish_run(c, o->queue, o->count, batch);
		t1 = now_s();
		c1 = cpu_s();
		if (o->test == TEST_CONSUME)
			pause_ms(SETTLE_MS);
		bw_amqp_close(c);
	}
	*seconds = t1 - t0;
	*cpu = c1 - c0;
	return rc;
}

static void usage(void)
{
	fprintf(stderr, "usage: bench_amqp --impl bw|direct --test batch|each|consume --count N "
			"--queue Q URL\n");
}

static int pick(const char *s, const char *const *names, int n)
{
	for (int i = 0; i < n; i++) {
		if (strcmp(s, names[i]) == 0)
			return i;
	}
	return -1;
}

int main(int argc, char **argv)
{
	struct opts o = {IMPL_BW, TEST_BATCH, 0, NULL, NULL};
	int impl = -1, test = -1;
	static const struct option longopts[] = {
	    {"impl", required_argument, NULL, 'i'},
	    {"test", required_argument, NULL, 't'},
	    {"count", required_argument, NULL, 'n'},
	    {"queue", required_argument, NULL, 'q'},
	    {NULL, 0, NULL, 0},
	};
	int ch;
	char *end;

	while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (ch) {
		case 'i':
			impl = pick(optarg, impl_names, 2);
			break;
		case 't':
			test = pick(optarg, test_names, 3);
			break;
		case 'n':
			errno = 0;
			o.count = strtol(optarg, &end, 10);
			if (errno || *end || end == optarg || o.count <= 0)
				o.count = -1;
			break;
		case 'q':
			o.queue = optarg;
			break;
		default:
			usage();
			return 2;
		}
	}
	if (impl < 0 || test < 0 || o.count <= 0 || o.queue == NULL || o.queue[0] == '\0' ||
	    optind != argc - 1) {
		usage();
		return 2;
	}
	o.impl = (enum impl)impl;
	o.test = (enum test)test;
	o.url = argv[optind];
	signal(SIGPIPE, SIG_IGN);
	make_body();

	uint32_t n = 0;
	if (declare(o.url, o.queue) != 0 || queue_count(o.url, o.queue, true, &n) != 0)
		return 1;
	if (o.test == TEST_CONSUME && prefill(o.url, o.queue, o.count) != 0) {
		bench_fail("publishing %ld messages before consuming failed", o.count);
		return 1;
	}

	double seconds = 0, cpu = 0;
	int rc = run(&o, &seconds, &cpu);

	uint32_t want = o.test == TEST_CONSUME ? 0 : (uint32_t)o.count;
	if (queue_count(o.url, o.queue, false, &n) != 0)
		rc = -1;
	else if (rc == 0 && n != want) {
		bench_fail("%s %s: %" PRIu32 " messages in %s after the run, expected %" PRIu32,
			   impl_names[o.impl], test_names[o.test], n, o.queue, want);
		rc = -1;
	}
	uint32_t left;
	if (queue_count(o.url, o.queue, true, &left) != 0)
		rc = -1;
	if (rc != 0)
		return 1;
	printf("bench_amqp impl=%s test=%s count=%ld seconds=%.3f msg_s=%.0f cpu_us_msg=%.2f\n",
	       impl_names[o.impl], test_names[o.test], o.count, seconds,
	       seconds > 0 ? (double)o.count / seconds : 0.0, cpu * 1e6 / (double)o.count);
	return 0;
}
