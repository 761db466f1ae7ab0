/* relay.c: outbox → broker with publisher confirms; at least once, in order, never blocking. */
#include "relay.h"

#include "clock.h"
#include "rand.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Waits before sending again after failed publishes (full jitter, bw_backoff_ms): the
 * first soon, since most failures are one lost connection; then at most every 30 s. */
#define BACKOFF_BASE_MS 100
#define BACKOFF_CAP_MS 30000
#define CONFIRM_TIMEOUT_MS 30000 /* no confirm by then: the connection is treated as lost */

struct flight {
	uint64_t seq;
	int64_t id;
	int64_t sent_ms;
	int64_t sent_us; /* for the confirm latency */
	bool settled;
	bool ok;
	bool nacked;
	char why[96];
};

struct bw_relay {
	struct bw_ledger *ledger;
	char *exchange;
	size_t window;
	struct flight *f;
	size_t n;
	int64_t cursor;         /* highest outbox id sent on this connection */
	int64_t retry_at_ms;    /* backoff after a failure: nothing is sent before */
	unsigned failures;      /* consecutive failed attempts, for the backoff */
	size_t nacked;          /* nacks settled since the last step */
	uint64_t confirmed, failed;
	struct bw_metrics *metrics; /* borrowed; NULL: none */
	bw_amqp_confirm_cb foreign_cb; /* confirms of publishes not the relay's */
	void *foreign_arg;
};

int bw_relay_new(struct bw_relay **out, struct bw_ledger *l, const char *exchange, size_t window)
{
	struct bw_relay *r = calloc(1, sizeof(*r));
	if (r == NULL)
		return BW_ENOMEM;
	r->exchange = strdup(exchange);
	r->f = calloc(window ? window : 1, sizeof(*r->f));
	if (r->exchange == NULL || r->f == NULL) {
		bw_relay_free(r);
		return BW_ENOMEM;
	}
	r->ledger = l;
	r->window = window ? window : 1;
	*out = r;
	return 0;
}

void bw_relay_free(struct bw_relay *r)
{
	if (r == NULL)
		return;
	free(r->exchange);
	free(r->f);
	free(r);
}

void bw_relay_reset(struct bw_relay *r)
{
	r->n = 0;
	r->cursor = 0;
	r->nacked = 0;
}

size_t bw_relay_inflight(const struct bw_relay *r)
{
	return r->n;
}

void bw_relay_stats(const struct bw_relay *r, uint64_t *confirmed, uint64_t *failed)
{
	*confirmed = r->confirmed;
	*failed = r->failed;
}

void bw_relay_set_foreign_cb(struct bw_relay *r, bw_amqp_confirm_cb cb, void *arg)
{
	r->foreign_cb = cb;
	r->foreign_arg = arg;
}

void bw_relay_set_metrics(struct bw_relay *r, struct bw_metrics *m)
{
	r->metrics = m;
}

int bw_relay_timeout_ms(const struct bw_relay *r)
{
	if (r->retry_at_ms == 0)
		return -1;
	int64_t left = r->retry_at_ms - bw_clock_mono_ms();
	return left > 0 ? (int)left : 0;
}

static void confirm_cb(void *arg, uint64_t seq, bool ok, const char *why)
{
	struct bw_relay *r = arg;
	for (size_t i = 0; i < r->n; i++) {
		if (r->f[i].seq == seq) {
			r->f[i].settled = true;
			r->f[i].ok = ok;
			r->f[i].nacked = why == bw_amqp_why_nacked;
			if (ok)
				bw_metrics_observe(r->metrics, BW_METRIC_CONFIRM_LATENCY, NULL,
						   (double)(bw_clock_mono_us() - r->f[i].sent_us) / 1e6);
			snprintf(r->f[i].why, sizeof(r->f[i].why), "%s", why ? why : "");
			return;
		}
	}
	if (r->foreign_cb)
		r->foreign_cb(r->foreign_arg, seq, ok, why);
}

/* Records the settled flights: published ones in one transaction, failures one by one. */
static int settle(struct bw_relay *r)
{
	int64_t ids[256];
	size_t n_ok = 0, keep = 0;
	int64_t first_failed = 0;
	int rc = 0;

	for (size_t i = 0; i < r->n; i++) {
		struct flight *f = &r->f[i];
		if (!f->settled) {
			r->f[keep++] = *f;
			continue;
		}
		if (f->ok) {
			if (n_ok < sizeof(ids) / sizeof(ids[0]))
				ids[n_ok++] = f->id;
			else
				r->f[keep++] = *f; /* next time */
			continue;
		}
		r->failed++;
		if (f->nacked)
			r->nacked++;
		if (first_failed == 0 || f->id < first_failed)
			first_failed = f->id;
		int frc = bw_ledger_outbox_failed(r->ledger, f->id, f->why);
		if (frc != 0)
			rc = frc;
	}
	r->n = keep;
	if (n_ok) {
		int prc = bw_ledger_outbox_published(r->ledger, ids, n_ok);
		if (prc != 0) {
			/* not marked: they stay unpublished and go out again (duplicates, not loss) */
			rc = prc;
		} else {
			r->confirmed += n_ok;
			r->failures = 0;
		}
	}
	if (first_failed) {
		/* Send again from the oldest failed event, after a capped, jittered backoff. */
		if (first_failed - 1 < r->cursor)
			r->cursor = first_failed - 1;
		r->failures++;
		int attempt = r->failures < INT_MAX ? (int)r->failures : INT_MAX;
		r->retry_at_ms = bw_clock_mono_ms() +
				 bw_backoff_ms(BACKOFF_BASE_MS, BACKOFF_CAP_MS, attempt);
	}
	return rc;
}

int bw_relay_step(struct bw_relay *r, struct bw_amqp *c, char *err, size_t errsize)
{
	int rc = bw_amqp_poll_confirms(c, confirm_cb, r, err, errsize);
	int src = settle(r);
	if (rc != 0) {
		bw_relay_reset(r);
		return rc;
	}
	if (src != 0) {
		snprintf(err, errsize, "ledger: %s", bw_strerror(src));
		return src;
	}
	if (r->nacked) {
		/*
		 * The broker could not take them. A new connection, not the same channel again: a
		 * quorum queue whose leader was lost can leave a channel that nacks every publish
		 * to it (a test client saw it; the worker's events then never went out, without a
		 * word). The nacked events go out again on the next connection.
		 */
		snprintf(err, errsize, "the broker nacked %zu event(s)", r->nacked);
		bw_relay_reset(r); /* the count too */
		return BW_EAMQP;
	}
	if (r->n > 0 && bw_clock_mono_ms() - r->f[0].sent_ms > CONFIRM_TIMEOUT_MS) {
		/* f[0] is the oldest in flight: a broker that takes this long is not answering */
		snprintf(err, errsize, "no publisher confirm within %d ms", CONFIRM_TIMEOUT_MS);
		bw_relay_reset(r);
		return BW_EAMQP;
	}
	if (r->retry_at_ms) {
		if (bw_clock_mono_ms() < r->retry_at_ms)
			return 0;
		r->retry_at_ms = 0;
	}
	if (bw_amqp_blocked(c) || r->n >= r->window)
		return 0;

	/* The next unpublished events after the last one sent on this connection. */
	struct bw_outbox_row *rows = NULL;
	size_t n = 0;
	rc = bw_ledger_outbox_next(r->ledger, r->cursor, r->window - r->n, &rows, &n);
	if (rc != 0) {
		snprintf(err, errsize, "ledger: %s", bw_strerror(rc));
		return rc;
	}
	for (size_t i = 0; i < n; i++) {
		uint64_t seq;
		rc = bw_amqp_publish(c, r->exchange, rows[i].routing_key, rows[i].event_id,
				     rows[i].body, strlen(rows[i].body), &seq);
		if (rc == BW_EBUSY) { /* blocked meanwhile */
			rc = 0;
			break;
		}
		if (rc != 0) {
			snprintf(err, errsize, "publish %s failed", rows[i].event_id);
			bw_relay_reset(r);
			break;
		}
		r->f[r->n++] = (struct flight){seq, rows[i].id, bw_clock_mono_ms(), bw_clock_mono_us(),
					       false, false, false, ""};
		r->cursor = rows[i].id;
	}
	bw_outbox_free(rows, n);
	return rc;
}
