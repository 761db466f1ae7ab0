/* notify.c: sd_notify for Type=notify units: READY=1, STATUS=, WATCHDOG=1, STOPPING=1; nothing without NOTIFY_SOCKET. */
#include "notify.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#define STATUS_MAX 200

struct bw_notify {
	bool active;          /* NOTIFY_SOCKET is set */
	bool ready;           /* READY=1 sent */
	bool stopping;        /* STOPPING=1 sent */
	int64_t watchdog_ms;  /* ping interval (half the manager's); 0: no watchdog */
	int64_t next_ping_ms; /* 0: at the next update */
	int64_t status_sent_ms;
	bool status_held;     /* a changed text waits for the rate limit */
	char status[STATUS_MAX]; /* the last text sent */
};

int bw_notify_new(struct bw_notify **out)
{
	struct bw_notify *n = calloc(1, sizeof(*n));
	if (n == NULL)
		return BW_ENOMEM;
	const char *sock = getenv("NOTIFY_SOCKET");
	n->active = sock != NULL && sock[0] != '\0';
	uint64_t usec = 0;
	/* 0: do not unset WATCHDOG_USEC, children never get it anyway (child.c's short
	 * environment); > 0 only when WATCHDOG_PID is unset or names this process */
	if (n->active && sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
		n->watchdog_ms = (int64_t)(usec / 2000);
		if (n->watchdog_ms < 1)
			n->watchdog_ms = 1;
	}
	*out = n;
	return 0;
}

void bw_notify_free(struct bw_notify *n)
{
	free(n);
}

bool bw_notify_active(const struct bw_notify *n)
{
	return n != NULL && n->active;
}

void bw_notify_status_text(const struct bw_notify_state *s, char *out, size_t size)
{
	const char *mode = s->stopping ? "stopping: "
			   : s->draining ? "draining: "
					 : "";
	const char *broker = s->consumer_up && s->publisher_up ? "up"
			     : s->publisher_up && (s->stopping || s->draining) ? "up (not consuming)"
			     : s->consumer_up ? "publisher down"
			     : s->publisher_up ? "consumer down"
					       : "down";
	snprintf(out, size, "%s%d job(s) running; broker %s", mode, s->jobs, broker);
}

/* sd_notify, its failure logged at debug level (the manager may be gone: nothing to do). */
static void notify_send(const char *text)
{
	int rc = sd_notify(0, text);
	if (rc < 0)
		bw_log_debug("sd_notify %.16s: %s", text, strerror(-rc));
}

static void send_status(struct bw_notify *n, int64_t now, const char *text)
{
	char line[STATUS_MAX + 8];
	snprintf(line, sizeof(line), "STATUS=%s", text);
	notify_send(line);
	snprintf(n->status, sizeof(n->status), "%s", text);
	n->status_sent_ms = now;
	n->status_held = false;
}

void bw_notify_update(struct bw_notify *n, int64_t now, const struct bw_notify_state *s)
{
	if (!bw_notify_active(n))
		return;
	char text[STATUS_MAX];
	bw_notify_status_text(s, text, sizeof(text));
	if (!n->ready && s->consumer_up && s->publisher_up) {
		char line[STATUS_MAX + 16];
		snprintf(line, sizeof(line), "READY=1\nSTATUS=%s", text);
		notify_send(line);
		n->ready = true;
		snprintf(n->status, sizeof(n->status), "%s", text);
		n->status_sent_ms = now;
	} else if (strcmp(text, n->status) != 0) {
		/* a change within the rate limit waits (bw_notify_timeout_ms wakes the loop) */
		n->status_held = n->status_sent_ms != 0 && now - n->status_sent_ms < BW_NOTIFY_STATUS_MIN_MS;
		if (!n->status_held)
			send_status(n, now, text);
	} else {
		n->status_held = false;
	}
	if (n->watchdog_ms > 0 && now >= n->next_ping_ms) {
		notify_send("WATCHDOG=1");
		n->next_ping_ms = now + n->watchdog_ms;
	}
}

void bw_notify_stopping(struct bw_notify *n, const struct bw_notify_state *s)
{
	if (!bw_notify_active(n) || n->stopping)
		return;
	char text[STATUS_MAX], line[STATUS_MAX + 24];
	bw_notify_status_text(s, text, sizeof(text));
	snprintf(line, sizeof(line), "STOPPING=1\nSTATUS=%s", text);
	notify_send(line);
	snprintf(n->status, sizeof(n->status), "%s", text);
	n->stopping = true;
}

int bw_notify_timeout_ms(const struct bw_notify *n, int64_t now)
{
	if (!bw_notify_active(n))
		return -1;
	int64_t t = -1;
	if (n->watchdog_ms > 0)
		t = n->next_ping_ms > now ? n->next_ping_ms - now : 0;
	if (n->status_held) {
		int64_t due = n->status_sent_ms + BW_NOTIFY_STATUS_MIN_MS - now;
		if (due < 0)
			due = 0;
		if (t < 0 || due < t)
			t = due;
	}
	return (int)t;
}
