/* relay.h: the outbox relay: publishes the ledger's committed events with confirms, marks them on ack. */
#ifndef BW_RELAY_H
#define BW_RELAY_H

#include <stddef.h>
#include <stdint.h>

#include "amqp.h"
#include "error.h"
#include "ledger.h"
#include "metrics.h"

/*
 * Events are written to the ledger in the same transaction as the state they report
 * (DESIGN decision 3); the relay publishes them in outbox order (each job's in seq order),
 * persistent and mandatory, and marks one published only on a confirm with no
 * basic.return before it. A nack, a return, a closed channel or a lost connection leaves it
 * unpublished: it is sent again (same event_id: consumers deduplicate) after a capped,
 * jittered backoff. Events can be duplicated, never lost.
 */
struct bw_relay;

/* window: publishes in flight at most. Returns 0 or BW_ENOMEM. */
int bw_relay_new(struct bw_relay **out, struct bw_ledger *l, const char *exchange, size_t window)
	BW_MUST_CHECK;
void bw_relay_free(struct bw_relay *r);

/*
 * One step, never waiting: settles the confirms that arrived on c, marks the confirmed
 * events published, then publishes the next unpublished ones up to the window (unless the
 * broker blocks c or a backoff runs). Returns 0; BW_EAMQP when c is lost, a confirm is
 * 30 s late or the broker nacked an event (every event in flight is unsent again:
 * reconnect and call bw_relay_reset); ledger errors (transient). An event returned
 * unroutable is sent again on the same connection after a backoff.
 */
int bw_relay_step(struct bw_relay *r, struct bw_amqp *c, char *err, size_t errsize) BW_MUST_CHECK;

/* After a new publisher connection: forget what was in flight; send from the oldest again. */
void bw_relay_reset(struct bw_relay *r);

/* Events in flight (published, not yet confirmed). */
size_t bw_relay_inflight(const struct bw_relay *r);

/* Milliseconds until the relay wants to run again (0: now; -1: only when input arrives). */
int bw_relay_timeout_ms(const struct bw_relay *r);

/* Counters since bw_relay_new: confirmed, failed attempts. */
void bw_relay_stats(const struct bw_relay *r, uint64_t *confirmed, uint64_t *failed);

/*
 * The publisher connection is shared: confirms of publishes the relay did not make (the
 * worker's forwards, CONTRACT §2 placement) go to cb(arg, ...) as bw_relay_step settles
 * them, and so do their failures when the connection is lost. NULL: dropped.
 */
void bw_relay_set_foreign_cb(struct bw_relay *r, bw_amqp_confirm_cb cb, void *arg);

/* Records each confirm's latency (publish to ack) into m (borrowed; NULL: none). */
void bw_relay_set_metrics(struct bw_relay *r, struct bw_metrics *m);

#endif
