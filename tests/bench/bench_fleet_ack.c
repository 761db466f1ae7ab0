/* bench_fleet_ack.c: N bare librabbitmq-c consumers that only ack, the broker's own limit. */
#include "bench_rabbit.h"

#include <amqp.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/*
 * bench_fleet_ack --consumers N --count M [--prefetch P] [--body-bytes B] --queue Q URL
 *
 * The peer of scripts/bench-fleet and scripts/bench-burst: what the broker of this machine
 * gives N consumers that do nothing but ack, on the same kind of queue bw-worker consumes
 * (quorum, durable), with messages of about a backup.start's size. Prints one line
 *   bench_fleet_ack consumers=N count=M seconds=S acks_s=R cpu_s=C
 * where seconds runs from the moment every consumer is connected with its basic.qos done
 * ("go") to the last ack handed to a socket by any of them, and cpu_s is the consumers'
 * own user+system CPU time (the broker's is measured by the caller, from /proc).
 *
 *   setup (untimed)  Q is declared (quorum, durable) and purged, then M persistent messages
 *                    of B bytes (a JSON object) are published to it through the default
 *                    exchange, in batches of BATCH each confirmed before the next.
 *   consumers        N processes (fork), each its own connection and channel: connect,
 *                    basic.qos P, tell the parent, wait for "go" (the parent closes a pipe:
 *                    all are released at once), basic.consume with manual acks, then
 *                    receive and ack one by one until the M acks of all of them (a counter
 *                    in shared memory) are done; the connection stays open SETTLE_MS after
 *                    (RabbitMQ 3.10 can drop a quorum queue's settles still buffered when a
 *                    channel closes: see bench_amqp.c), then closes.
 *   check (untimed)  a passive declare on a fresh connection: 0 messages left; then the
 *                    queue is deleted.
 *
 * Exit 0 when every consumer exited 0 and the check passed, 1 otherwise, 2 usage.
 */

enum {
	BATCH = 100,
	TIMEOUT_MS = 10000, /* connect and RPCs */
	IDLE_LIMIT_MS =
	    60000,     /* a consumer that sees no delivery and no progress this long fails */
	POLL_MS = 100, /* a consumer's longest wait for a delivery before it looks at the counter */
	SETTLE_MS = 250,
	MAX_CONSUMERS = 256,
	MAX_BODY = 65536,
};

struct opts {
	int consumers;
	long count;
	int prefetch;
	int body_bytes;
	const char *queue;
	const char *url;
};

/* Shared by the parent and every consumer (MAP_SHARED | MAP_ANONYMOUS). */
struct shared {
	atomic_long acked;
	double last_ack[MAX_CONSUMERS]; /* CLOCK_MONOTONIC seconds of each consumer's last ack */
};

static char body[MAX_BODY + 1];

void bench_fail(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "bench_fleet_ack[%d]: ", (int)getpid());
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

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* User+system CPU seconds of the waited-for children. */
static double children_cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_CHILDREN, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* A JSON object of exactly len bytes. */
static void make_body(int len)
{
	static const char head[] = "{\"pad\":\"", tail[] = "\"}";
	size_t pad = (size_t)len - (sizeof(head) - 1) - (sizeof(tail) - 1);
	memcpy(body, head, sizeof(head) - 1);
	memset(body + sizeof(head) - 1, 'x', pad);
	memcpy(body + sizeof(head) - 1 + pad, tail, sizeof(tail));
}

/* Declares the queue (quorum, durable; passive: only asks) and returns its message count in
 * *messages; 0 or -1. */
static int declare(amqp_connection_state_t conn, const char *queue, bool passive,
		   uint32_t *messages)
{
	amqp_table_entry_t e = {amqp_cstring_bytes("x-queue-type"),
				{AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("quorum")}}};
	amqp_table_t args = {1, &e};
	amqp_queue_declare_ok_t *ok =
	    amqp_queue_declare(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(queue), passive, 1, 0,
			       0, passive ? amqp_empty_table : args);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "queue.declare") != 0 || ok == NULL)
		return -1;
	*messages = ok->message_count;
	return 0;
}

/* Reads frames until every publish in [first, last] is acked; a nack or anything else fails. */
static int wait_confirms(amqp_connection_state_t conn, uint64_t first, uint64_t last)
{
	uint64_t upto = first - 1; /* every tag <= upto is confirmed (acks come in order here) */
	while (upto < last) {
		amqp_frame_t f;
		struct timeval tv = {TIMEOUT_MS / 1000, 0};
		int st = amqp_simple_wait_frame_noblock(conn, &f, &tv);
		if (st != AMQP_STATUS_OK) {
			bench_fail("waiting for confirms: %s", amqp_error_string2(st));
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
		if (m->delivery_tag > upto)
			upto = m->delivery_tag;
	}
	return 0;
}

/* Declares and purges the queue, then fills it with count confirmed messages. */
static int fill(const struct opts *o)
{
	int rc = -1;
	uint32_t n = 0;
	amqp_connection_state_t conn = bench_rabbit_connect(o->url);
	if (conn == NULL)
		return -1;
	if (declare(conn, o->queue, false, &n) != 0)
		goto out;
	amqp_queue_purge(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(o->queue));
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "queue.purge") != 0)
		goto out;
	amqp_confirm_select(conn, BENCH_RABBIT_CHANNEL);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "confirm.select") != 0)
		goto out;
	amqp_basic_properties_t props;
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = 2;
	amqp_bytes_t b = {(size_t)o->body_bytes, body};
	uint64_t seq = 1;
	for (long done = 0; done < o->count;) {
		long k = o->count - done < BATCH ? o->count - done : BATCH;
		for (long j = 0; j < k; j++) {
			int st =
			    amqp_basic_publish(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(""),
					       amqp_cstring_bytes(o->queue), 0, 0, &props, b);
			if (st != AMQP_STATUS_OK) {
				bench_fail("basic.publish: %s", amqp_error_string2(st));
				goto out;
			}
		}
		if (wait_confirms(conn, seq, seq + (uint64_t)k - 1) != 0)
			goto out;
		seq += (uint64_t)k;
		done += k;
		amqp_maybe_release_buffers(conn);
	}
	rc = 0;
out:
	bench_rabbit_close(conn);
	return rc;
}

/* One consumer: see the file's comment. Runs in a child; returns its exit code. */
static int consumer(const struct opts *o, struct shared *sh, int index, int ready_fd, int go_fd)
{
	int rc = 1;
	char c = 'r', g;
	amqp_connection_state_t conn = bench_rabbit_connect(o->url);
	if (conn == NULL)
		goto out;
	amqp_basic_qos(conn, BENCH_RABBIT_CHANNEL, 0, (uint16_t)o->prefetch, 0);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "basic.qos") != 0)
		goto out;
	if (write(ready_fd, &c, 1) != 1) {
		bench_fail("write to the parent: %s", strerror(errno));
		goto out;
	}
	close(ready_fd); /* so that the parent sees EOF, not a hang, if another one dies first */
	while (read(go_fd, &g, 1) < 0 && errno == EINTR)
		; /* EOF: the parent closed the pipe, go */
	amqp_basic_consume(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(o->queue),
			   amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "basic.consume") != 0)
		goto out;
	double idle_since = now_s();
	long seen = atomic_load(&sh->acked);
	while (atomic_load(&sh->acked) < o->count) {
		amqp_envelope_t env;
		struct timeval tv = {0, POLL_MS * 1000};
		amqp_maybe_release_buffers(conn);
		amqp_rpc_reply_t r = amqp_consume_message(conn, &env, &tv, 0);
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    r.library_error == AMQP_STATUS_TIMEOUT) {
			long now_acked = atomic_load(&sh->acked);
			if (now_acked != seen) {
				seen = now_acked;
				idle_since = now_s();
			} else if (now_s() - idle_since > IDLE_LIMIT_MS / 1000.0) {
				bench_fail("no progress for %d ms at %ld of %ld acks",
					   IDLE_LIMIT_MS, now_acked, o->count);
				goto out;
			}
			continue;
		}
		if (bench_rabbit_ok(r, "consume") != 0)
			goto out;
		int st = amqp_basic_ack(conn, BENCH_RABBIT_CHANNEL, env.delivery_tag, 0);
		amqp_destroy_envelope(&env);
		if (st != AMQP_STATUS_OK) {
			bench_fail("basic.ack: %s", amqp_error_string2(st));
			goto out;
		}
		sh->last_ack[index] = now_s();
		atomic_fetch_add(&sh->acked, 1);
		idle_since = now_s();
	}
	pause_ms(SETTLE_MS);
	rc = 0;
out:
	bench_rabbit_close(conn);
	return rc;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option longopts[] = {
	    {"consumers", required_argument, NULL, 'n'},
	    {"count", required_argument, NULL, 'c'},
	    {"prefetch", required_argument, NULL, 'p'},
	    {"body-bytes", required_argument, NULL, 'b'},
	    {"queue", required_argument, NULL, 'q'},
	    {NULL, 0, NULL, 0},
	};
	int ch;
	*o = (struct opts){.prefetch = 4, .body_bytes = 512};
	while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		char *end = NULL;
		long v = optarg ? strtol(optarg, &end, 10) : 0;
		bool num = optarg && *optarg && end && *end == '\0';
		switch (ch) {
		case 'n':
			if (!num || v < 1 || v > MAX_CONSUMERS)
				return -1;
			o->consumers = (int)v;
			break;
		case 'c':
			if (!num || v < 1)
				return -1;
			o->count = v;
			break;
		case 'p':
			if (!num || v < 1 || v > 65535)
				return -1;
			o->prefetch = (int)v;
			break;
		case 'b':
			if (!num || v < 16 || v > MAX_BODY)
				return -1;
			o->body_bytes = (int)v;
			break;
		case 'q':
			o->queue = optarg;
			break;
		default:
			return -1;
		}
	}
	if (optind != argc - 1 || o->consumers == 0 || o->count == 0 || o->queue == NULL)
		return -1;
	o->url = argv[optind];
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o;
	pid_t pids[MAX_CONSUMERS];
	int ready[2] = {-1, -1}, go[2] = {-1, -1};
	int rc = 1, started = 0;
	struct shared *sh = MAP_FAILED;

	if (parse_opts(argc, argv, &o) != 0) {
		fprintf(stderr, "usage: bench_fleet_ack --consumers N --count M [--prefetch P] "
				"[--body-bytes B] --queue Q URL\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	make_body(o.body_bytes);
	if (fill(&o) != 0)
		return 1;
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) {
		bench_fail("mmap: %s", strerror(errno));
		return 1;
	}
	atomic_init(&sh->acked, 0);
	if (pipe(ready) != 0 || pipe(go) != 0) {
		bench_fail("pipe: %s", strerror(errno));
		goto out;
	}
	for (int i = 0; i < o.consumers; i++) {
		fflush(NULL);
		pid_t p = fork();
		if (p < 0) {
			bench_fail("fork: %s", strerror(errno));
			goto out;
		}
		if (p == 0) {
			close(ready[0]);
			close(go[1]);
			_exit(consumer(&o, sh, i, ready[1], go[0]));
		}
		pids[started++] = p;
	}
	close(ready[1]);
	ready[1] = -1;
	close(go[0]);
	go[0] = -1;
	for (int i = 0; i < o.consumers; i++) {
		char c;
		ssize_t r;
		while ((r = read(ready[0], &c, 1)) < 0 && errno == EINTR)
			;
		if (r != 1) {
			bench_fail("a consumer did not get ready (%d of %d)", i, o.consumers);
			goto out;
		}
	}
	double t0 = now_s();
	close(go[1]); /* go */
	go[1] = -1;
	int bad = 0;
	for (int i = 0; i < started; i++) {
		int st;
		while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR)
			;
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			bad++;
	}
	started = 0;
	double cpu = children_cpu_s();
	double last = t0;
	for (int i = 0; i < o.consumers; i++)
		if (sh->last_ack[i] > last)
			last = sh->last_ack[i];
	long acked = atomic_load(&sh->acked);
	if (bad || acked != o.count) {
		bench_fail("%d consumer(s) failed; %ld of %ld acked", bad, acked, o.count);
		goto out;
	}
	amqp_connection_state_t conn = bench_rabbit_connect(o.url);
	uint32_t left = 1;
	if (conn == NULL || declare(conn, o.queue, true, &left) != 0) {
		bench_rabbit_close(conn);
		goto out;
	}
	amqp_queue_delete(conn, BENCH_RABBIT_CHANNEL, amqp_cstring_bytes(o.queue), 0, 0);
	(void)bench_rabbit_ok(amqp_get_rpc_reply(conn), "queue.delete");
	bench_rabbit_close(conn);
	if (left != 0) {
		bench_fail("%" PRIu32 " message(s) left in %s after %ld acks", left, o.queue,
			   acked);
		goto out;
	}
	double secs = last - t0;
	printf("bench_fleet_ack consumers=%d count=%ld seconds=%.3f acks_s=%.1f cpu_s=%.3f\n",
	       o.consumers, o.count, secs, secs > 0 ? (double)o.count / secs : 0.0, cpu);
	rc = 0;
out:
	for (int i = 0; i < started; i++) {
		kill(pids[i], SIGKILL);
		while (waitpid(pids[i], NULL, 0) < 0 && errno == EINTR)
			;
	}
	for (int i = 0; i < 2; i++) {
		if (ready[i] >= 0)
			close(ready[i]);
		if (go[i] >= 0)
			close(go[i]);
	}
	munmap(sh, sizeof(*sh));
	return rc;
}
