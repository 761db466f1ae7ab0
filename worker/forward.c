/* forward.c: placement: a backup.start for a repository this host lacks goes to that repository's queue, confirmed before the ack. */
#include "worker.h"

#include "clock.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* As the relay's: a broker that has not confirmed by then is not answering. */
#define CONFIRM_TIMEOUT_MS 30000
/* A nacked forward is published again this much later, not at once (a full queue nacks). */
#define RETRY_MS 1000

/*
 * One forward, from the moment its original was taken from backup.start until that
 * original is settled on the consumer link:
 *   WAITING → (published) SENT → ROUTED (ack) | UNROUTABLE (reject unknown_repository)
 *   SENT → (nack, publisher lost) WAITING again: the original stays unacked meanwhile, so
 *   it is never lost and never counted toward the delivery limit by us.
 * An original whose consumer connection or channel is gone was given back to its queue by
 * the broker: the forward is dropped (at worst its copy in the per-repository queue is a
 * duplicate, which the owning host's ledger ignores by job_id).
 */
enum fwd_state { FWD_WAITING, FWD_SENT, FWD_ROUTED, FWD_UNROUTABLE };

struct forward {
	struct bw_delivery d;       /* the original, unacked */
	uint64_t consumer_connects; /* the consumer link's connection it came on */
	char routing_key[BW_AMQP_NAME_MAX + 1];
	enum fwd_state state;
	uint64_t seq;                /* SENT: the publish's confirm sequence number */
	uint64_t publisher_connects; /* SENT: on this publisher connection */
	int64_t sent_ms;
	int64_t retry_at_ms; /* WAITING: not before */
	struct forward *next;
};

struct forwards {
	struct forward *head;
	size_t n;
};

void delivery_settle(struct worker *w, const struct bw_delivery *d, int rc)
{
	struct bw_amqp *c = w->consumer.c;
	int arc;
	if (rc == 0)
		arc = bw_amqp_ack(c, d); /* after the claim's commit, or the forward's confirm */
	else if (rc == BW_EMESSAGE)
		arc = bw_amqp_reject(c, d); /* to the DLQ with x-death */
	else {
		bw_log_warnx("a backup.start could not be taken (%s): given back to the queue",
			     bw_strerror(rc));
		arc = bw_amqp_requeue(c, d);
	}
	if (arc == BW_EAMQP)
		bw_amqp_link_down(&w->consumer);
}

static void count(struct worker *w, const char *outcome)
{
	bw_metrics_add(w->metrics, BW_METRIC_FORWARDED, (const char *const[]){outcome}, 1);
}

/* The relay's foreign confirms: one of our publishes was settled. */
static void confirm_cb(void *arg, uint64_t seq, bool ok, const char *why)
{
	struct worker *w = arg;
	for (struct forward *f = w->forwards->head; f; f = f->next) {
		if (f->state != FWD_SENT || f->seq != seq ||
		    f->publisher_connects != w->publisher.connects)
			continue;
		if (ok) {
			f->state = FWD_ROUTED;
		} else if (why == bw_amqp_why_returned) {
			f->state = FWD_UNROUTABLE;
		} else {
			bw_log_warnx("forward to %s not confirmed (%s): published again later",
				     f->routing_key, why ? why : "?");
			count(w, "failed");
			f->state = FWD_WAITING;
			f->retry_at_ms = bw_clock_mono_ms() + RETRY_MS;
		}
		return;
	}
}

int forward_open(struct worker *w)
{
	w->forwards = calloc(1, sizeof(*w->forwards));
	if (w->forwards == NULL)
		return -1;
	bw_relay_set_foreign_cb(w->relay, confirm_cb, w);
	static const char *const outcomes[] = {"routed", "unroutable", "failed"};
	for (size_t i = 0; i < sizeof(outcomes) / sizeof(outcomes[0]); i++)
		bw_metrics_touch(w->metrics, BW_METRIC_FORWARDED, &outcomes[i]);
	return 0;
}

static void forward_free(struct forward *f)
{
	bw_delivery_free(&f->d);
	free(f);
}

void forward_close(struct worker *w)
{
	if (w->forwards == NULL)
		return;
	while (w->forwards->head) {
		struct forward *f = w->forwards->head;
		w->forwards->head = f->next;
		forward_free(f);
	}
	free(w->forwards);
	w->forwards = NULL;
}

size_t forward_pending(const struct worker *w)
{
	return w->forwards ? w->forwards->n : 0;
}

int forward_start(struct worker *w, struct bw_delivery *d, const char *repository_id)
{
	struct forward *f = calloc(1, sizeof(*f));
	if (f == NULL)
		return BW_ENOMEM;
	int rc = bw_amqp_repo_queue(f->routing_key, sizeof(f->routing_key), w->cfg->amqp_queue,
				    repository_id);
	if (rc != 0) {
		free(f);
		return rc;
	}
	f->d = *d;
	memset(d, 0, sizeof(*d)); /* the forward's now */
	f->consumer_connects = w->consumer.connects;
	f->state = FWD_WAITING;
	struct forward **tail = &w->forwards->head; /* in arrival order */
	while (*tail)
		tail = &(*tail)->next;
	*tail = f;
	w->forwards->n++;
	return 0;
}

/* Whether f's original can still be settled: its consumer connection and channel live. */
static bool original_live(const struct worker *w, const struct forward *f)
{
	return w->consumer.c && f->consumer_connects == w->consumer.connects &&
	       f->d.channel_epoch == bw_amqp_channel_epoch(w->consumer.c);
}

/* Publishes a waiting forward when the publisher can take it. */
static void send(struct worker *w, struct forward *f, int64_t now)
{
	if (w->publisher.c == NULL || bw_amqp_blocked(w->publisher.c) || now < f->retry_at_ms)
		return;
	struct bw_amqp_outgoing m = {f->d.body, f->d.len,
				     f->d.content_type ? f->d.content_type : "application/json",
				     f->d.message_id};
	uint64_t seq;
	if (bw_amqp_publish_message(w->publisher.c, w->cfg->amqp_jobs_exchange, f->routing_key,
				    &m, &seq) != 0)
		return; /* blocked, or the connection broke: the relay's step notices */
	f->state = FWD_SENT;
	f->seq = seq;
	f->publisher_connects = w->publisher.connects;
	f->sent_ms = now;
	crash_point("forwarded", 0); /* published, not confirmed: the original is unacked */
}

/*
 * Settles the original of a forward that came back: acked when routed; when unroutable,
 * handled as a message from a per-repository queue (no forward: rejected unknown_repository
 * exactly as without placement).
 */
static void settle(struct worker *w, struct forward *f)
{
	if (f->state == FWD_ROUTED) {
		count(w, "routed");
		bw_log_info("forwarded a backup.start to %s (confirmed)", f->routing_key);
		delivery_settle(w, &f->d, 0);
		return;
	}
	count(w, "unroutable");
	bw_log_info("forward to %s came back unroutable: no host has declared that queue",
		    f->routing_key);
	delivery_settle(w, &f->d, job_receive(w, &f->d, NULL));
}

int forward_step(struct worker *w)
{
	int64_t now = bw_clock_mono_ms();
	int rc = 0;
	for (struct forward **pf = &w->forwards->head; *pf;) {
		struct forward *f = *pf;
		if (!original_live(w, f)) {
			bw_log_info("forward to %s: its original went back to the queue with its "
				    "connection; dropped",
				    f->routing_key);
		} else if (f->state == FWD_ROUTED || f->state == FWD_UNROUTABLE) {
			settle(w, f);
		} else {
			if (f->state == FWD_WAITING)
				send(w, f, now);
			else if (now - f->sent_ms > CONFIRM_TIMEOUT_MS)
				rc = BW_EAMQP;
			pf = &f->next;
			continue;
		}
		*pf = f->next;
		w->forwards->n--;
		forward_free(f);
	}
	return rc;
}

void forward_lost(struct worker *w)
{
	for (struct forward *f = w->forwards ? w->forwards->head : NULL; f; f = f->next) {
		if (f->state != FWD_SENT)
			continue;
		count(w, "failed");
		f->state = FWD_WAITING; /* on the next connection */
		f->retry_at_ms = 0;
	}
}
