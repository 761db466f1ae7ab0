/* sna.h: the SNA client (CONTRACT §3) over the libcurl multi interface: nothing ever blocks. */
#ifndef BW_SNA_H
#define BW_SNA_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>

#include "error.h"

struct bw_sna_opts {
	const char *url;   /* base, e.g. http://127.0.0.1:8081 (no trailing slash needed) */
	const char *token; /* Bearer token; NULL or "" for none */
	int connect_timeout_s;
	int timeout_s; /* the whole exchange, connection included */
	int max_attempts;
	int backoff_base_ms;
	int backoff_cap_s;
};

enum bw_sna_outcome {
	BW_SNA_OK,          /* 2xx (start: or 409, already known there = accepted) */
	BW_SNA_REJECTED,    /* a 4xx other than 409 (start) / 404 (progress, cleanup): permanent */
	BW_SNA_NOT_FOUND,   /* progress or cleanup: 404 */
	BW_SNA_UNAVAILABLE, /* 5xx, timeouts, connection errors after every attempt */
};

struct bw_sna_result {
	enum bw_sna_outcome outcome;
	int http_status; /* of the last response; 0 when none came */
	int attempts;
	char *body;      /* the last response's body, NUL-terminated (may be empty) */
	size_t len;
	char error[256]; /* the last transport error or status line, for logs */
};

typedef void (*bw_sna_done_cb)(void *arg, const struct bw_sna_result *r);

struct bw_sna;
struct bw_sna_call;

int bw_sna_new(struct bw_sna **out, const struct bw_sna_opts *o) BW_MUST_CHECK;
/* Frees the client and cancels every call in progress (their callbacks are not called). */
void bw_sna_free(struct bw_sna *s);

/*
 * POST /api/v1/backup/start with body (copied), Idempotency-Key: job_id, the token, retried
 * on 5xx, timeouts and connection errors with full jitter (attempt n+1 waits a uniform time
 * in [0, min(backoff_cap_s, backoff_base_ms * 2^(n-1))]) up to max_attempts requests in
 * all, always with the same key; 200/202/409 = OK; another 4xx ends at once (REJECTED).
 * cb runs once, from bw_sna_perform. *call (may be NULL) identifies it for bw_sna_cancel.
 */
int bw_sna_start(struct bw_sna *s, const char *job_id, const char *body, bw_sna_done_cb cb,
		 void *arg, struct bw_sna_call **call) BW_MUST_CHECK;

/* GET /api/v1/progress/<job_id>: one attempt (the caller polls again). */
int bw_sna_progress(struct bw_sna *s, const char *job_id, bw_sna_done_cb cb, void *arg,
		    struct bw_sna_call **call) BW_MUST_CHECK;

/* POST /api/v1/cleanup {"job_id", "action": "cleanup_all"}: retried like start; 2xx or 404
 * is OK (404: nothing left there). */
int bw_sna_cleanup(struct bw_sna *s, const char *job_id, bw_sna_done_cb cb, void *arg,
		   struct bw_sna_call **call) BW_MUST_CHECK;

/* Forgets a call in progress: its callback will not run. */
void bw_sna_cancel(struct bw_sna *s, struct bw_sna_call *call);

/* Calls in progress (transfers and retries waiting). */
size_t bw_sna_active(const struct bw_sna *s);

/*
 * Event-loop integration: bw_sna_pollfds fills at most max entries with the sockets curl
 * waits on and returns how many; bw_sna_timeout_ms says how long the loop may sleep (-1:
 * no limit); bw_sna_perform drives the transfers and retries and runs the callbacks.
 */
int bw_sna_pollfds(struct bw_sna *s, struct pollfd *fds, int max);
int bw_sna_timeout_ms(struct bw_sna *s);
void bw_sna_perform(struct bw_sna *s);

/* A blocking helper for tools and tests: performs until no call is active or timeout_ms. */
void bw_sna_run(struct bw_sna *s, int timeout_ms);

#endif
