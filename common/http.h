/* http.h: a small HTTP/1.1 listener inside the event loop (libmicrohttpd without threads of its own): GET only, answered at once. */
#ifndef BW_HTTP_H
#define BW_HTTP_H

#include <stddef.h>

#include "buf.h"
#include "error.h"

/*
 * One listening socket served by libmicrohttpd in its "external epoll" mode: no thread,
 * nothing waits. The loop polls bw_http_fd for input, folds bw_http_timeout_ms into its
 * next deadline and calls bw_http_run, which accepts, reads, answers and writes whatever
 * is ready and returns. A GET goes to the handler, which fills the reply synchronously
 * from memory (it must not wait either); any other method gets 405 with Allow: GET.
 * Connections are bounded in number and idle time, so a client cannot hold the listener.
 */
struct bw_http;

/* What the handler answers: status (default 200), content type (default text/plain), body. */
struct bw_http_reply {
	int status;
	const char *content_type; /* static */
	struct bw_buf body;
};

/* Called once per GET with its path (without the query string); fills reply. */
typedef void (*bw_http_handler_cb)(void *arg, const char *path, struct bw_http_reply *reply);

/*
 * Listens on listen ("host:port", an IPv6 address in brackets; a host name is resolved
 * once, here) and serves it with cb. Returns 0 and a new listener in *out; BW_EADDRINUSE
 * when the port is taken, BW_ECONFIG when the address cannot be resolved or bound
 * (EADDRNOTAVAIL, EACCES), BW_ESYS, BW_ENOMEM; err says which, naming the address.
 */
int bw_http_open(struct bw_http **out, const char *listen, bw_http_handler_cb cb, void *arg,
		 char *err, size_t errsize) BW_MUST_CHECK;

/* Stops listening, drops every connection and frees. Accepts NULL. */
void bw_http_close(struct bw_http *h);

/* The address really bound, "127.0.0.1:9464" / "[::1]:9464" (static until close). */
const char *bw_http_address(const struct bw_http *h);

/* The descriptor to poll for POLLIN (libmicrohttpd's epoll set). */
int bw_http_fd(const struct bw_http *h);

/* Milliseconds until bw_http_run must be called even without input (-1: only on input). */
int bw_http_timeout_ms(struct bw_http *h);

/* Serves whatever is ready, never waiting. */
void bw_http_run(struct bw_http *h);

#endif
