/* notify.h: the service manager's view of a worker (sd_notify): ready, status, watchdog, stopping. */
#ifndef BW_NOTIFY_H
#define BW_NOTIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

struct bw_notify;

/* What the STATUS= line says; given every turn, sent when it changes. */
struct bw_notify_state {
	int jobs;            /* running jobs */
	bool consumer_up;    /* the consumer link to the broker */
	bool publisher_up;   /* the publisher link */
	bool stopping;       /* SIGTERM: winding down */
	bool draining;       /* SIGUSR1: running jobs run to their end */
};

/*
 * A notifier for this process: active when NOTIFY_SOCKET is set (systemd's Type=notify),
 * with a watchdog when WATCHDOG_USEC is set for this pid (sd_watchdog_enabled). Without
 * NOTIFY_SOCKET every call below does nothing. Returns 0 and *out (free with
 * bw_notify_free), or BW_ENOMEM.
 */
int bw_notify_new(struct bw_notify **out) BW_MUST_CHECK;
void bw_notify_free(struct bw_notify *n);

/* True when a service manager listens (NOTIFY_SOCKET was set). */
bool bw_notify_active(const struct bw_notify *n);

/*
 * One turn of the loop (now: monotonic ms): READY=1 the first time both broker links are
 * up (the set-up, first recovery pass included, is done by then); STATUS= when the text
 * of s changed, at most once per BW_NOTIFY_STATUS_MIN_MS (a change in between is sent
 * when that time is up); WATCHDOG=1 every half of the watchdog interval.
 */
void bw_notify_update(struct bw_notify *n, int64_t now, const struct bw_notify_state *s);

/* STOPPING=1 (SIGTERM, SIGINT or a drain), with the state as STATUS=; once. */
void bw_notify_stopping(struct bw_notify *n, const struct bw_notify_state *s);

/* Milliseconds until bw_notify_update has something to send (a watchdog ping, a held
 * status); -1: nothing pending. */
int bw_notify_timeout_ms(const struct bw_notify *n, int64_t now);

/* STATUS= is sent at most this often: a busy worker's changes would flood the manager. */
#define BW_NOTIFY_STATUS_MIN_MS 1000

/* Writes the STATUS= text of s into out[size]. */
void bw_notify_status_text(const struct bw_notify_state *s, char *out, size_t size);

#endif
