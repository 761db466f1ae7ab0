/* bench_rabbit.h: bare librabbitmq-c as its examples use it, the benches' peer for bw. */
#ifndef BW_BENCH_RABBIT_H
#define BW_BENCH_RABBIT_H

#include <amqp.h>

/* The one channel a bench connection opens; its login's frame max and heartbeat. */
enum {
	BENCH_RABBIT_CHANNEL = 1,
	BENCH_RABBIT_FRAME_MAX = 131072,
	BENCH_RABBIT_HEARTBEAT_S = 60,
	BENCH_RABBIT_TIMEOUT_MS = 10000, /* connect and every RPC */
};

/* Says why a bench step failed, one line on stderr with the program's prefix: each program
 * that links this file defines it. */
void bench_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* 0 for a normal RPC reply; else -1, and what happened (bench_fail, naming what). */
int bench_rabbit_ok(amqp_rpc_reply_t r, const char *what);

/* A connection to the amqp:// url, logged in, BENCH_RABBIT_CHANNEL open; NULL (said why). */
amqp_connection_state_t bench_rabbit_connect(const char *url);

/* Closes the channel and the connection, frees it; NULL is a no-op. */
void bench_rabbit_close(amqp_connection_state_t conn);

#endif
