/* loop.c: the worker's one event loop: broker, SNA, children and signals, never waiting past a deadline. */
#include "worker.h"

#include "clock.h"
#include "log.h"
#include "notify.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

/* Ledger upkeep (retention, WAL truncation, quarantine expiry) is cheap: once a minute is
 * enough. */
#define MAINTAIN_MS 60000
/* A retention pass that stopped at its bound (a backlog, e.g. retention just shortened)
 * goes on this soon, not a minute later. */
#define PRUNE_AGAIN_MS 5000
/* The ledger's heartbeat time is for monitoring only: coarse is enough. */
#define HEARTBEAT_MS 10000
/* Connect, login and each broker RPC: a broker slower than this would stall the whole loop. */
#define AMQP_TIMEOUT_MS 5000
/* Reconnects: the first one soon (most losses are brief), then at least twice a minute. */
#define AMQP_BACKOFF_BASE_MS 200
#define AMQP_BACKOFF_CAP_MS 30000
/* Events published and not yet confirmed: keeps the broker busy and the memory bounded. */
#define RELAY_WINDOW 256
/* Deliveries taken per turn, so that a full queue cannot starve the rest of the loop. */
#define CONSUME_BATCH 16
/* librabbitmq-c answers heartbeats only inside its calls and the broker wants a frame every
 * heartbeat / 2: wait at most a quarter of the interval, which leaves a margin. */
#define HEARTBEAT_WAIT_DIVISOR 4
/* Input already read by the library, or confirms awaited, do not wake poll: look again soon. */
#define BUSY_WAIT_MS 5
/* Nothing wakes the loop for what other processes write to the shared ledger (their events
 * in the outbox): it looks at least once a second. */
#define MAX_WAIT_MS 1000
/* The signalfd, the two broker sockets, the metrics listener and the SNA's curl sockets (the
 * rest waits a turn). */
#define MAX_POLLFDS 80

/*
 * backup.start deliveries held while every job slot is busy, oldest first. The consumer
 * keeps reading past them so that a backup.cancel is never stuck behind a start; the
 * broker's prefetch bounds how many starts come, HELD_MAX bounds the memory all the same.
 */
#define HELD_MAX 64

/*
 * A backup.start this host could not take for a passing reason of its own (the ledger's
 * disk full or its lock busy, memory) stays first in the held list, unacked, and is tried
 * again after a backoff (RETRY_FIRST_MS doubling to RETRY_CAP_MS). Given back at once, as
 * before, it came straight back: each return counts toward the queue's delivery limit, and
 * a few milliseconds of a full ledger dead-lettered the job without any event (chaos
 * ledger_full: 18 deliveries in 25 ms, three confirmed jobs lost). Only after
 * RETRY_GIVE_BACK_MS of failing does it go back to the queue, where a worker of another
 * host may take it: one count of the limit a minute, not a burst.
 */
#define RETRY_FIRST_MS 250
#define RETRY_CAP_MS 5000
#define RETRY_GIVE_BACK_MS 60000

struct held {
	size_t n;
	uint64_t connects; /* the consumer link's connection they came on */
	struct bw_delivery d[HELD_MAX];
	/* d[0] failed to be taken: since when, the last wait, and when it is tried again */
	int64_t failing_since_ms; /* 0: it has not failed */
	int retry_wait_ms;
	int64_t retry_at_ms;
};

static void held_retry_reset(struct held *held)
{
	held->failing_since_ms = 0;
	held->retry_wait_ms = 0;
	held->retry_at_ms = 0;
}

/*
 * Forgets held deliveries whose connection or channel is gone: the broker gave them back
 * to the queue, maybe to a worker of another host, so claiming one here could run the job
 * twice.
 */
static void drop_stale_held(struct worker *w, struct held *held)
{
	size_t keep = 0;
	for (size_t i = 0; i < held->n; i++) {
		if (w->consumer.c && held->connects == w->consumer.connects &&
		    held->d[i].channel_epoch == bw_amqp_channel_epoch(w->consumer.c)) {
			held->d[keep++] = held->d[i];
		} else {
			if (i == 0)
				held_retry_reset(held); /* the one that failed is gone */
			bw_delivery_free(&held->d[i]);
		}
	}
	held->n = keep;
}

static int make_dirs(const struct bw_config *cfg)
{
	char logs[PATH_MAX];
	int len = snprintf(logs, sizeof(logs), "%s/logs", cfg->worker_state_dir);
	if (len < 0 || (size_t)len >= sizeof(logs)) {
		bw_log_warnx("worker.state_dir is too long: %s", cfg->worker_state_dir);
		return -1;
	}
	if ((mkdir(cfg->worker_state_dir, 0750) != 0 && errno != EEXIST) ||
	    (mkdir(logs, 0750) != 0 && errno != EEXIST)) {
		bw_log_warn("cannot create %s", logs);
		return -1;
	}
	return 0;
}

/* A delivery of the worker's own backup.control queue: acked after the ledger write. */
static void handle_control(struct worker *w, struct bw_delivery *d)
{
	int rc = control_receive(w, d);
	int arc = rc == 0 ? bw_amqp_ack(w->consumer.c, d) : bw_amqp_requeue(w->consumer.c, d);
	if (arc == BW_EAMQP)
		bw_amqp_link_down(&w->consumer);
}

/*
 * Forwards d (from backup.start) to the queue of repository (placement, CONTRACT §2): d is
 * the forward's then, settled once the publish is confirmed. A queue name that cannot
 * exist is unroutable at once: rejected unknown_repository.
 */
static void forward(struct worker *w, struct bw_delivery *d, const char *repository)
{
	int rc = forward_start(w, d, repository);
	if (rc == BW_ERANGE)
		delivery_settle(w, d, job_receive(w, d, NULL));
	else if (rc != 0)
		delivery_settle(w, d, rc);
}

/*
 * A backup.start from backup.start (which may be forwarded) or from a per-repository queue
 * (never forwarded again: a repository this host lacks is unknown_repository). Returns 0
 * when d was settled (or is the forward's), else the passing error (bw_err_transient) that
 * kept it unsettled (only when may_keep: see RETRY_FIRST_MS); any other error gives it back
 * at once, as a message no retry here can help.
 */
static int handle_delivery(struct worker *w, struct bw_delivery *d, bool may_keep)
{
	if (d->source != BW_AMQP_FROM_START && d->source != BW_AMQP_FROM_REPO) {
		/* never taken for a backup.start: consumer tags are ours */
		bw_log_warnx("a delivery of an unknown consumer: given back");
		if (bw_amqp_requeue(w->consumer.c, d) == BW_EAMQP)
			bw_amqp_link_down(&w->consumer);
		return 0;
	}
	char *to = NULL;
	int rc = job_receive(w, d, d->source == BW_AMQP_FROM_START ? &to : NULL);
	bool keep = rc != 0 && bw_err_transient(rc) && may_keep; /* an invalid one never is */
	if (rc == 0 && to)
		forward(w, d, to); /* acked after the confirm */
	else if (!keep)
		delivery_settle(w, d, rc); /* acked after the claim's commit (DESIGN decision 2) */
	free(to);
	return keep ? rc : 0; /* kept: tried again (job_receive changed nothing) */
}

/*
 * Takes the first held delivery, or keeps it for a retry after a passing error. Returns
 * true when it was taken (settled, forwarded or given back), false when it waits.
 */
static bool take_first_held(struct worker *w, struct held *held, int64_t now)
{
	bool may_keep = held->failing_since_ms == 0 ||
			now - held->failing_since_ms < RETRY_GIVE_BACK_MS;
	int rc = handle_delivery(w, &held->d[0], may_keep);
	if (rc == 0) {
		if (held->failing_since_ms && may_keep)
			bw_log_info("a backup.start kept after a failure was taken after %" PRId64
				    " ms",
				    now - held->failing_since_ms);
		held_retry_reset(held);
		return true;
	}
	if (held->failing_since_ms == 0) {
		held->failing_since_ms = now;
		bw_log_warnx("a backup.start could not be taken (%s): kept and tried again, "
			     "given back to the queue if that still fails after %d s",
			     bw_strerror(rc), RETRY_GIVE_BACK_MS / 1000);
	}
	held->retry_wait_ms = held->retry_wait_ms == 0 ? RETRY_FIRST_MS
			      : held->retry_wait_ms >= RETRY_CAP_MS / 2 ? RETRY_CAP_MS
								    : held->retry_wait_ms * 2;
	held->retry_at_ms = now + held->retry_wait_ms;
	return false;
}

/*
 * Every job slot is busy: a start from backup.start whose repository this host lacks needs
 * no slot and is forwarded at once rather than held. Returns true when d was taken so.
 */
static bool forward_unheld(struct worker *w, struct bw_delivery *d)
{
	char *to = NULL;
	if (d->source != BW_AMQP_FROM_START || w->n_jobs < w->cfg->worker_max_jobs ||
	    job_placement(w, d, &to) != 0 || to == NULL)
		return false;
	forward(w, d, to);
	free(to);
	return true;
}

/*
 * Draining: the consumer connection serves backup.control alone; a backup.start that was on
 * its way when the start consumer stopped goes back to the queue.
 */
static void consume_control_only(struct worker *w)
{
	char err[512];
	for (int k = 0; k < CONSUME_BATCH && w->consumer.c; k++) {
		bool got = false;
		struct bw_delivery d;
		if (bw_amqp_poll(w->consumer.c, &d, &got, err, sizeof(err)) != 0) {
			bw_log_warnx("consumer: %s; draining: not reconnected", err);
			bw_amqp_link_down(&w->consumer);
			return;
		}
		if (!got)
			return;
		if (d.source == BW_AMQP_FROM_CONTROL)
			handle_control(w, &d);
		else if (bw_amqp_requeue(w->consumer.c, &d) == BW_EAMQP)
			bw_amqp_link_down(&w->consumer);
		bw_delivery_free(&d);
	}
}

static void consume(struct worker *w, struct held *held)
{
	char err[512];
	if (w->draining && !w->stopping && w->consumer.c) {
		consume_control_only(w);
		return;
	}
	if (w->stopping || w->draining || w->consumer.c == NULL)
		return;
	for (int k = 0; k < CONSUME_BATCH; k++) {
		drop_stale_held(w, held);
		int64_t now = bw_clock_mono_ms();
		while (held->n > 0 && w->n_jobs < w->cfg->worker_max_jobs &&
		       now >= held->retry_at_ms) {
			if (!take_first_held(w, held, now))
				break; /* it waits for its retry; the ones behind it wait too */
			bw_delivery_free(&held->d[0]);
			memmove(&held->d[0], &held->d[1], (held->n - 1) * sizeof(held->d[0]));
			held->n--;
			if (w->consumer.c == NULL)
				return;
		}
		if (held->n == HELD_MAX)
			return;
		bool got = false;
		struct bw_delivery d;
		if (bw_amqp_poll(w->consumer.c, &d, &got, err, sizeof(err)) != 0) {
			bw_log_warnx("consumer: %s; reconnecting", err);
			bw_amqp_link_lost(&w->consumer, err);
			return;
		}
		if (!got)
			return;
		if (d.source == BW_AMQP_FROM_CONTROL) {
			handle_control(w, &d); /* at once: a cancel never waits behind a start */
			bw_delivery_free(&d);
			if (w->consumer.c == NULL)
				return;
			continue;
		}
		if (forward_unheld(w, &d)) {
			bw_delivery_free(&d);
			if (w->consumer.c == NULL)
				return;
			continue;
		}
		held->connects = w->consumer.connects;
		held->d[held->n++] = d;
	}
}

/* "consumer link connected to 127.0.0.1:5673 (node 2 of 3)" at every (re)connect. */
static void log_connected(const char *role, const struct bw_amqp_link *l, const char *more)
{
	size_t i = 0;
	const char *node = bw_amqp_link_node(l, &i);
	bw_log_info("%s link connected to %s (node %zu of %zu)%s", role, node ? node : "?", i + 1,
		    l->n_nodes, more);
}

/*
 * A channel the broker closed, which the link opened again: said once, with the broker's
 * words (binds and consumes go without waiting for replies: a failed one shows here).
 */
static void log_channel_closed(const char *role, const struct bw_amqp_link *l)
{
	char why[256];
	if (l->c && bw_amqp_channel_closed(l->c, why, sizeof(why)))
		bw_log_warnx("%s: %s; channel opened again", role, why);
}

static void publish(struct worker *w)
{
	char err[512];
	bool fresh;
	int rc = 0;
	if (w->publisher.c == NULL) {
		rc = bw_amqp_link_up(&w->publisher, &fresh, err, sizeof(err));
		if (rc == BW_ECONFIG)
			bw_log_warnx("publisher: %s", w->publisher.why);
		if (rc == 0) {
			bw_relay_reset(w->relay); /* what the last connection left unconfirmed goes again */
			log_connected("publisher", &w->publisher, "");
		}
	}
	if (rc == 0 && bw_relay_step(w->relay, w->publisher.c, err, sizeof(err)) == BW_EAMQP) {
		bw_log_warnx("publisher: %s; reconnecting", err);
		bw_amqp_link_lost(&w->publisher, err);
		forward_lost(w);
	}
	/* also while the publisher is down: forwards whose original went back are dropped */
	if (forward_step(w) == BW_EAMQP && w->publisher.c) {
		bw_log_warnx("publisher: no confirm of a forward in time; reconnecting");
		bw_amqp_link_lost(&w->publisher, "no confirm of a forward in time");
		forward_lost(w);
	}
	log_channel_closed("publisher", &w->publisher);
}

static int min_timeout(int a, int b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

/* Everything the loop keeps between turns. */
struct loop {
	struct worker w;
	struct held held;
	int sfd;         /* signalfd of SIGTERM, SIGINT, SIGCHLD, SIGUSR1, SIGUSR2 */
	int64_t stop_by; /* stopping: leave by then, whatever is left (monotonic ms) */
	struct bw_notify *notify; /* the service manager (sd_notify; inert without one) */
};

/* Tells the service manager the worker's state (READY=1, STATUS=, WATCHDOG=1), or that it
 * stops (STOPPING=1). */
static void service_notify(struct loop *lp, int64_t now, bool stopping)
{
	const struct worker *w = &lp->w;
	struct bw_notify_state s = {w->n_jobs, w->consumer.c != NULL, w->publisher.c != NULL,
				    w->stopping, w->draining};
	if (stopping)
		bw_notify_stopping(lp->notify, &s);
	else
		bw_notify_update(lp->notify, now, &s);
}

/* Forgets the deliveries held for a free slot: unacked, the broker gives them to another. */
static void drop_held(struct loop *lp)
{
	for (size_t i = 0; i < lp->held.n; i++)
		bw_delivery_free(&lp->held.d[i]);
	lp->held.n = 0;
	held_retry_reset(&lp->held);
}

/*
 * Draining: the backup.start consumer stops and the starts held for a slot go back to the
 * queue, but the connection stays for backup.control, so the running jobs can still be
 * cancelled. When that fails, the connection goes (unacked deliveries go back at once).
 */
static void drain_consumer(struct loop *lp)
{
	struct worker *w = &lp->w;
	char err[512];
	bool kept = w->consumer.c &&
		    bw_amqp_stop_start_consumer(w->consumer.c, err, sizeof(err)) == 0;
	for (size_t i = 0; kept && i < lp->held.n; i++)
		kept = bw_amqp_requeue(w->consumer.c, &lp->held.d[i]) != BW_EAMQP;
	drop_held(lp);
	if (!kept)
		bw_amqp_link_down(&w->consumer);
}

/*
 * The topology with this host's repositories (a per-repository queue each, declared and
 * consumed: placement, CONTRACT §2) and the forwards. Returns 0, or -1 logged.
 */
static int placement_setup(struct worker *w)
{
	const struct bw_config *cfg = w->cfg;
	w->repository_ids = calloc(cfg->n_repositories + 1, sizeof(*w->repository_ids));
	if (w->repository_ids == NULL || forward_open(w) != 0) {
		bw_log_warnx("out of memory");
		return -1;
	}
	for (size_t i = 0; i < cfg->n_repositories; i++)
		w->repository_ids[i] = cfg->repositories[i].id;
	w->topology = (struct bw_amqp_topology){cfg->amqp_queue,
						cfg->amqp_jobs_exchange,
						cfg->amqp_events_exchange,
						cfg->amqp_dlx,
						cfg->amqp_dlq,
						cfg->amqp_delivery_limit,
						!cfg->amqp_declare,
						w->repository_ids,
						cfg->n_repositories};
	return 0;
}

/*
 * Set-up: directories, the signalfd, the ledger registration, the SNA client, the relay,
 * the two broker links, then one recovery pass before the first delivery (what dead
 * workers left comes first). Returns 0, or -1 with the reason logged.
 */
static int loop_setup(struct loop *lp, const struct bw_config *cfg)
{
	struct worker *w = &lp->w;
	sigset_t mask;

	memset(lp, 0, sizeof(*lp));
	lp->sfd = -1;
	if (bw_notify_new(&lp->notify) != 0)
		return -1;
	w->cfg = cfg;
	snprintf(w->host, sizeof(w->host), "%s", cfg->worker_host);
	if (make_dirs(cfg) != 0)
		return -1;

	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGUSR2); /* bw-ctl reap: a recovery pass now */
	/*
	 * Blocked signals reach the loop only through the signalfd: without one, SIGTERM would
	 * stay blocked and the worker could not be stopped but by SIGKILL. Refuse to start.
	 */
	if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0 ||
	    (lp->sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
		bw_log_warn("cannot receive signals through a signalfd");
		return -1;
	}

	int rc = bw_ledger_open(&w->ledger, cfg->ledger_path, cfg->nbd_port_min, cfg->nbd_port_max);
	if (rc != 0) {
		bw_log_warnx("ledger %s: %s", cfg->ledger_path, bw_strerror(rc));
		return -1;
	}
	rc = bw_ledger_register(w->ledger, cfg->worker_id, cfg->worker_state_dir);
	if (rc != 0) {
		bw_log_warnx("cannot register worker %s: %s%s", cfg->worker_id, bw_strerror(rc),
			     rc == BW_EEXIST ? " (another process runs with this worker.id)" : "");
		return -1;
	}
	if (monitor_open(w) != 0)
		return -1;
	struct bw_sna_opts so = {.url = cfg->sna_url,
				 .token = cfg->sna_token,
				 .connect_timeout_s = cfg->sna_connect_timeout_s,
				 .timeout_s = cfg->sna_timeout_s,
				 .max_attempts = cfg->sna_max_attempts,
				 .backoff_base_ms = cfg->sna_backoff_base_ms,
				 .backoff_cap_s = cfg->sna_backoff_cap_s,
				 .tls_ca_file = cfg->sna_tls_ca_file,
				 .tls_cert_file = cfg->sna_tls_cert_file,
				 .tls_key_file = cfg->sna_tls_key_file,
				 .metrics = w->metrics};
	if (bw_sna_new(&w->sna, &so) != 0 ||
	    bw_relay_new(&w->relay, w->ledger, cfg->amqp_events_exchange, RELAY_WINDOW) != 0) {
		bw_log_warnx("out of memory");
		return -1;
	}
	bw_relay_set_metrics(w->relay, w->metrics);
	if (placement_setup(w) != 0)
		return -1;
	struct bw_amqp_opts ao = {cfg->amqp_url,
				  cfg->amqp_heartbeat_s,
				  AMQP_TIMEOUT_MS,
				  cfg->worker_id,
				  cfg->amqp_tls_ca_file[0] ? cfg->amqp_tls_ca_file : NULL,
				  cfg->amqp_tls_cert_file[0] ? cfg->amqp_tls_cert_file : NULL,
				  cfg->amqp_tls_key_file[0] ? cfg->amqp_tls_key_file : NULL,
				  cfg->amqp_tls_verify_peer,
				  cfg->amqp_tls_verify_hostname};
	w->consumer = (struct bw_amqp_link){.opts = ao,
					    .role = BW_AMQP_CONSUMER,
					    .topology = &w->topology,
					    .queue = cfg->amqp_queue,
					    .prefetch = cfg->amqp_prefetch,
					    .max_message_bytes = (size_t)cfg->job_max_message_bytes,
					    .backoff_base_ms = AMQP_BACKOFF_BASE_MS,
					    .backoff_cap_ms = AMQP_BACKOFF_CAP_MS};
	if (cfg->amqp_control_exchange && cfg->amqp_control_exchange[0])
		w->consumer.control_exchange = cfg->amqp_control_exchange; /* backup.cancel */
	w->publisher = w->consumer;
	w->publisher.role = BW_AMQP_PUBLISHER;
	w->publisher.queue = NULL;
	w->publisher.control_exchange = NULL;
	bw_log_info("worker %s up: ledger %s, ports %d-%d, up to %d job(s)", cfg->worker_id,
		    cfg->ledger_path, cfg->nbd_port_min, cfg->nbd_port_max, cfg->worker_max_jobs);
	recover_pass(w); /* before the first delivery: what dead workers left comes first */
	w->last_recovery_ms = bw_clock_mono_ms();
	return 0;
}

/* Releases what loop_setup made; unregisters when no job is left. Safe after a failed set-up. */
static void loop_teardown(struct loop *lp)
{
	struct worker *w = &lp->w;
	drop_held(lp);
	bw_amqp_link_down(&w->consumer);
	bw_amqp_link_down(&w->publisher);
	forward_close(w);
	free(w->repository_ids);
	bw_relay_free(w->relay);
	bw_sna_free(w->sna);
	monitor_close(w);
	if (w->ledger && w->jobs == NULL && bw_ledger_unregister(w->ledger) != 0)
		bw_log_warnx("could not unregister: the next worker's recovery pass will");
	bw_ledger_close(w->ledger);
	if (lp->sfd >= 0)
		close(lp->sfd);
	bw_notify_free(lp->notify);
}

/* Milliseconds from now until due_ms (0 when due). */
static int until_ms(int64_t due_ms, int64_t now)
{
	int64_t left = due_ms - now;
	if (left <= 0)
		return 0;
	return left < INT_MAX ? (int)left : INT_MAX;
}

static bool taking_jobs(const struct worker *w)
{
	return !w->stopping && !w->draining;
}

/*
 * The time to the next deadline (ms): the broker's heartbeats, the jobs', the SNA client's,
 * the relay's, a link's reconnect, the loop's own timers; soon when input is already
 * buffered; never more than MAX_WAIT_MS.
 */
static int next_deadline_ms(struct loop *lp, int64_t now)
{
	struct worker *w = &lp->w;
	const struct bw_config *cfg = w->cfg;
	int t = cfg->amqp_heartbeat_s * 1000 / HEARTBEAT_WAIT_DIVISOR;
	t = min_timeout(t, jobs_timeout_ms(w));
	t = min_timeout(t, bw_sna_timeout_ms(w->sna));
	t = min_timeout(t, bw_relay_timeout_ms(w->relay));
	if (w->http)
		t = min_timeout(t, bw_http_timeout_ms(w->http));
	if (w->consumer.c == NULL && taking_jobs(w))
		t = min_timeout(t, bw_amqp_link_timeout_ms(&w->consumer));
	if (w->publisher.c == NULL)
		t = min_timeout(t, bw_amqp_link_timeout_ms(&w->publisher));
	if ((w->consumer.c && bw_amqp_pending(w->consumer.c)) ||
	    (w->publisher.c && bw_amqp_pending(w->publisher.c)) || bw_relay_inflight(w->relay) > 0)
		t = min_timeout(t, BUSY_WAIT_MS);
	int64_t recovery_due = w->last_recovery_ms + (int64_t)cfg->worker_recovery_interval_s * 1000;
	if (taking_jobs(w))
		t = min_timeout(t, until_ms(recovery_due, now));
	if (lp->held.n > 0 && lp->held.retry_at_ms)
		t = min_timeout(t, until_ms(lp->held.retry_at_ms, now)); /* a start kept to retry */
	t = min_timeout(t, until_ms(w->last_maintain_ms + MAINTAIN_MS, now));
	t = min_timeout(t, until_ms(w->last_heartbeat_ms + HEARTBEAT_MS, now));
	if (w->stopping)
		t = min_timeout(t, until_ms(lp->stop_by, now));
	t = min_timeout(t, bw_notify_timeout_ms(lp->notify, now));
	if (t < 0 || t > MAX_WAIT_MS)
		t = MAX_WAIT_MS;
	return t;
}

/*
 * Waits up to timeout_ms for input on the signalfd, the broker sockets (a link's probe of a
 * node among them), the metrics endpoint or the SNA's.
 */
static void wait_ready(struct loop *lp, int timeout_ms)
{
	struct worker *w = &lp->w;
	struct pollfd fds[MAX_POLLFDS];
	int n = 0;
	fds[n++] = (struct pollfd){lp->sfd, POLLIN, 0};
	if (w->consumer.c)
		fds[n++] = (struct pollfd){bw_amqp_fd(w->consumer.c), POLLIN, 0};
	if (w->publisher.c)
		fds[n++] = (struct pollfd){bw_amqp_fd(w->publisher.c), POLLIN, 0};
	struct bw_amqp_link *links[] = {&w->consumer, &w->publisher};
	for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++) {
		short events = 0;
		int fd = bw_amqp_link_pollfd(links[i], &events); /* a node's answer to a probe */
		if (fd >= 0)
			fds[n++] = (struct pollfd){fd, events, 0};
	}
	if (w->http)
		fds[n++] = (struct pollfd){bw_http_fd(w->http), POLLIN, 0};
	n += bw_sna_pollfds(w->sna, fds + n, MAX_POLLFDS - n);
	poll(fds, (nfds_t)n, timeout_ms);
}

enum turn { TURN_GO_ON, TURN_STOP };

/* SIGUSR2 (bw-ctl reap): the recovery pass runs now rather than at its next interval. */
static void recover_now(struct worker *w)
{
	if (!taking_jobs(w)) {
		bw_log_info("SIGUSR2: no recovery pass while stopping or draining");
		return;
	}
	bw_log_info("SIGUSR2: a recovery pass now");
	recover_pass(w);
	w->last_recovery_ms = bw_clock_mono_ms();
}

/*
 * Handles the signals that arrived: SIGCHLD is only a wake-up (jobs_step reaps), SIGUSR1
 * drains, a first SIGTERM/SIGINT stops taking jobs and winds down, a second one stops now.
 */
static enum turn read_signals(struct loop *lp)
{
	struct worker *w = &lp->w;
	struct signalfd_siginfo si;
	while (read(lp->sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGCHLD)
			continue; /* jobs_step reaps its own children */
		if (si.ssi_signo == SIGUSR2) {
			recover_now(w);
			continue;
		}
		if (si.ssi_signo == SIGUSR1) {
			if (!taking_jobs(w))
				continue;
			bw_log_info("SIGUSR1: draining: no new jobs; %d running job(s) run to "
				    "their end, then the worker exits",
				    w->n_jobs);
			w->draining = true;
			service_notify(lp, 0, true);
			drain_consumer(lp);
			continue;
		}
		if (w->stopping) {
			bw_log_warnx("second signal: stopping now; the ledger stays consistent");
			return TURN_STOP;
		}
		bw_log_info("signal %u: no new jobs; jobs still preparing are rolled back, "
			    "transferring ones handed over (%d job(s))",
			    si.ssi_signo, w->n_jobs);
		w->stopping = true;
		service_notify(lp, 0, true);
		lp->stop_by = bw_clock_mono_ms() + (int64_t)w->cfg->worker_shutdown_grace_s * 1000;
		bw_amqp_link_down(&w->consumer); /* stop consuming at once */
		drop_held(lp);                   /* unacked: the broker redelivers it */
		jobs_shutdown(w);
	}
	return TURN_GO_ON;
}

/* Stopping or draining: done when no job and no unpublished event is left (or time is up). */
static bool wound_down(struct loop *lp, int64_t now)
{
	struct worker *w = &lp->w;
	size_t backlog = 0;
	int64_t age = 0;
	if (taking_jobs(w))
		return false;
	if (bw_ledger_outbox_backlog(w->ledger, &backlog, &age) != 0)
		backlog = 1; /* unknown: assume something is left */
	if (!((w->jobs == NULL && backlog == 0 && forward_pending(w) == 0) ||
	      (w->stopping && now > lp->stop_by)))
		return false;
	if (w->jobs || backlog)
		bw_log_warnx("stopping with %d job(s) and %zu event(s) left "
			     "(the next worker on this host takes them)",
			     w->n_jobs, backlog);
	return true;
}

/*
 * One retention pass (ledger.retention_days): old finished jobs, their rows and the logs of
 * their disks go, in short transactions that never wait long for the write lock. Before
 * the checkpoint, which then truncates the WAL the pass wrote. Returns true when the pass
 * stopped at its bound and more is due.
 */
static bool prune(struct worker *w)
{
	const struct bw_config *cfg = w->cfg;
	struct bw_prune p = {bw_clock_wall_ms(), cfg->ledger_retention_days, cfg->worker_state_dir,
			     0, 0};
	struct bw_prune_stats st;
	int rc = bw_ledger_prune(w->ledger, &p, &st);
	if (rc != 0)
		bw_log_warnx("ledger retention: %s (%s)", bw_strerror(rc),
			     bw_ledger_errmsg(w->ledger));
	/* a line a minute on a busy host: at info level only when a backlog is worked off */
	if (st.more)
		bw_log_info("ledger retention: %zu job(s) older than %d day(s) removed with their "
			    "history and %zu log file(s); %zu old job-less event(s), %zu expired "
			    "tombstone(s); more to do",
			    st.jobs, cfg->ledger_retention_days, st.files, st.events, st.tombstones);
	else if (st.jobs || st.events || st.tombstones)
		bw_log_debug("ledger retention: %zu job(s) removed, %zu log file(s), %zu event(s), "
			     "%zu tombstone(s)",
			     st.jobs, st.files, st.events, st.tombstones);
	if (st.skipped)
		bw_log_debug("ledger retention: the write lock was busy; the next pass goes on");
	return rc == 0 && st.more;
}

/* Runs the loop's own timers: recovery passes, ledger upkeep, the ledger heartbeat. */
static void run_timers(struct worker *w, int64_t now)
{
	int rc;
	if (taking_jobs(w) &&
	    now - w->last_recovery_ms >= (int64_t)w->cfg->worker_recovery_interval_s * 1000) {
		recover_pass(w);
		w->last_recovery_ms = now;
	}
	if (now - w->last_maintain_ms >= MAINTAIN_MS) {
		bool more = prune(w);
		if ((rc = bw_ledger_maintain(w->ledger)) != 0)
			bw_log_debug("ledger maintenance: %s", bw_strerror(rc));
		w->last_maintain_ms = more ? now - MAINTAIN_MS + PRUNE_AGAIN_MS : now;
	}
	if (now - w->last_heartbeat_ms >= HEARTBEAT_MS) {
		if ((rc = bw_ledger_heartbeat(w->ledger)) != 0)
			bw_log_debug("ledger heartbeat: %s", bw_strerror(rc));
		w->last_heartbeat_ms = now;
	}
}

/*
 * Dispatch: the signals that arrived are handled, then everything that is ready runs and
 * none of it waits: the consumer link comes up, deliveries are taken, events published,
 * the SNA's transfers advanced, the jobs stepped, the timers run. TURN_STOP on a second
 * stop signal, or when a stopping or draining worker is done.
 */
static enum turn dispatch(struct loop *lp)
{
	struct worker *w = &lp->w;
	char err[512];
	bool fresh;
	if (read_signals(lp) == TURN_STOP)
		return TURN_STOP;
	int64_t now = bw_clock_mono_ms();
	if (w->http)
		bw_http_run(w->http); /* a scrape or a probe, answered from memory */
	if (taking_jobs(w) && w->consumer.c == NULL) {
		int rc = bw_amqp_link_up(&w->consumer, &fresh, err, sizeof(err));
		if (rc == BW_ECONFIG)
			bw_log_warnx("consumer: %s", w->consumer.why);
		else if (rc == 0) {
			char more[300];
			snprintf(more, sizeof(more), "; consuming %s", w->cfg->amqp_queue);
			log_connected("consumer", &w->consumer, more);
		}
	}
	consume(w, &lp->held);
	log_channel_closed("consumer", &w->consumer);
	publish(w);
	bw_sna_perform(w->sna);
	bw_log_set_job(NULL); /* the SNA's callbacks set the job they answer */
	control_step(w, now); /* cancels another worker recorded for our jobs */
	jobs_step(w);
	publish(w);
	run_timers(w, now);
	service_notify(lp, now, false);
	return wound_down(lp, now) ? TURN_STOP : TURN_GO_ON;
}

/*
 * The loop, as beanstalkd's prottick: after the set-up, dispatch what is ready, compute
 * the time to the next deadline and wait that long (or until input), again. Returns the
 * exit status: 0 after a stop or a drain, 1 when the set-up failed.
 */
int worker_run(const struct bw_config *cfg)
{
	struct loop lp;
	int status = 1;
	if (loop_setup(&lp, cfg) == 0) {
		while (dispatch(&lp) == TURN_GO_ON)
			wait_ready(&lp, next_deadline_ms(&lp, bw_clock_mono_ms()));
		status = 0;
	}
	loop_teardown(&lp);
	return status;
}
