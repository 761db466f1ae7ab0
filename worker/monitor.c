/* monitor.c: what the worker shows on /metrics and /healthz, and the job hook that feeds the registry. */
#include "worker.h"

#include "clock.h"
#include "log.h"

#include <stdio.h>
#include <string.h>

#ifndef BW_VERSION
#define BW_VERSION "unknown"
#endif

/* /healthz writes to the ledger at most this often: probes cannot hammer it. */
#define HEALTH_LEDGER_CACHE_MS 1000

#define LABELS(...) ((const char *const[]){__VA_ARGS__})

/* The link label of the broker metrics, and the link. */
static const char *const link_names[] = {"consumer", "publisher"};

static const struct bw_amqp_link *link_of(const struct worker *w, size_t i)
{
	return i == 0 ? &w->consumer : &w->publisher;
}

/* ---- the job hook ---------------------------------------------------------------------- */

void monitor_job(struct job *j)
{
	struct bw_metrics *m = j->w->metrics;
	int64_t now = bw_clock_mono_ms();
	if (!j->seen) {
		/* a job claimed here starts now; one taken over from a dead worker entered its
		 * state some time ago, unknown: that stage is not timed */
		j->seen = true;
		j->seen_state = j->state;
		j->seen_since_ms = j->generation == 1 ? now : 0;
		return;
	}
	if (j->state == j->seen_state)
		return;
	enum bw_job_state from = j->seen_state, to = j->state;
	if (j->seen_since_ms > 0)
		bw_metrics_observe(m, BW_METRIC_JOB_STAGE_DURATION, LABELS(bw_job_state_name(from)),
				   (double)(now - j->seen_since_ms) / 1000);
	if (to == BW_JOB_TRANSFERRING && from == BW_JOB_SNA_REQUESTED && j->generation == 1)
		bw_metrics_observe(m, BW_METRIC_JOB_START_LATENCY, NULL,
				   (double)(now - j->claimed_ms) / 1000);
	if (to == BW_JOB_COMPLETED || to == BW_JOB_FAILED) {
		bool ok = to == BW_JOB_COMPLETED;
		const char *result = ok ? "completed" : "failed";
		bw_metrics_add(m, BW_METRIC_JOB_OUTCOMES,
			       LABELS(result, ok ? "none" : bw_fail_reason_name(j->reason)), 1);
		bw_metrics_observe(m, BW_METRIC_JOB_DURATION, LABELS(result),
				   (double)(now - j->claimed_ms) / 1000);
		if (ok)
			bw_metrics_set(m, BW_METRIC_LAST_COMPLETED, NULL,
				       (double)bw_clock_wall_ms() / 1000);
	}
	j->seen_state = to;
	j->seen_since_ms = now;
}

/* ---- /metrics --------------------------------------------------------------------------- */

/* Sets what is counted at scrape time: this worker's jobs and servers, the host's ports and
 * outbox, the links, the relay's and the ledger's totals, the process. */
static void collect(struct worker *w)
{
	struct bw_metrics *m = w->metrics;
	size_t by_state[BW_JOB_COMPENSATED + 1] = {0};
	size_t servers = 0;
	for (const struct job *j = w->jobs; j; j = j->next) {
		if ((unsigned)j->state <= BW_JOB_COMPENSATED)
			by_state[j->state]++;
		for (size_t i = 0; i < j->n_disks; i++)
			servers += j->disks[i].spawned && !j->disks[i].nbd.exited;
	}
	for (int s = 0; s <= BW_JOB_COMPENSATED; s++)
		bw_metrics_set(m, BW_METRIC_JOBS, LABELS(bw_job_state_name((enum bw_job_state)s)),
			       (double)by_state[s]);
	bw_metrics_set(m, BW_METRIC_QEMU_NBD, NULL, (double)servers);

	struct bw_port_counts pc;
	int rc = bw_ledger_port_counts(w->ledger, &pc);
	if (rc == 0) {
		bw_metrics_set(m, BW_METRIC_PORTS, LABELS("free"), (double)pc.free);
		bw_metrics_set(m, BW_METRIC_PORTS, LABELS("reserved"), (double)pc.reserved);
		bw_metrics_set(m, BW_METRIC_PORTS, LABELS("quarantined"), (double)pc.quarantined);
	} else {
		bw_log_debug("metrics: ports not counted: %s", bw_strerror(rc));
	}
	size_t backlog = 0;
	int64_t age_ms = 0;
	rc = bw_ledger_outbox_backlog(w->ledger, &backlog, &age_ms);
	if (rc == 0) {
		bw_metrics_set(m, BW_METRIC_OUTBOX_BACKLOG, NULL, (double)backlog);
		bw_metrics_set(m, BW_METRIC_OUTBOX_AGE, NULL, (double)(age_ms > 0 ? age_ms : 0) / 1000);
	} else {
		bw_log_debug("metrics: outbox not counted: %s", bw_strerror(rc));
	}
	for (size_t i = 0; i < BW_NAMES(link_names); i++) {
		const struct bw_amqp_link *l = link_of(w, i);
		bw_metrics_set(m, BW_METRIC_BROKER_UP, LABELS(link_names[i]), l->c != NULL);
		bw_metrics_set(m, BW_METRIC_BROKER_RECONNECTS, LABELS(link_names[i]),
			       l->connects > 1 ? (double)(l->connects - 1) : 0);
	}
	/* only the node each link is on now: the series of the one it left go */
	bw_metrics_clear(m, BW_METRIC_BROKER_NODE);
	for (size_t i = 0; i < BW_NAMES(link_names); i++) {
		const struct bw_amqp_link *l = link_of(w, i);
		const char *node = bw_amqp_link_node(l, NULL);
		if (node)
			bw_metrics_set(m, BW_METRIC_BROKER_NODE, LABELS(link_names[i], node), 1);
		for (size_t k = 0; k < l->n_nodes; k++)
			bw_metrics_set(m, BW_METRIC_BROKER_NODE_CONNECTS,
				       LABELS(link_names[i], l->nodes[k].name),
				       (double)l->nodes[k].connects);
	}
	uint64_t confirmed = 0, failed = 0, waits = 0, retries = 0;
	bw_relay_stats(w->relay, &confirmed, &failed);
	bw_metrics_set(m, BW_METRIC_RELAY_CONFIRMED, NULL, (double)confirmed);
	bw_metrics_set(m, BW_METRIC_RELAY_FAILED, NULL, (double)failed);
	bw_ledger_busy_stats(w->ledger, &waits, &retries);
	bw_metrics_set(m, BW_METRIC_LEDGER_BUSY_WAITS, NULL, (double)waits);
	bw_metrics_set(m, BW_METRIC_LEDGER_BUSY_RETRIES, NULL, (double)retries);
	if (bw_metrics_collect_process(m) != 0)
		bw_log_debug("metrics: /proc/self/stat unreadable");
}

/* ---- /healthz --------------------------------------------------------------------------- */

/* Appends "; " between reasons. */
static void reason(struct bw_buf *b, const char *fmt, const char *a, const char *c)
{
	if (b->len)
		bw_buf_puts(b, "; ");
	bw_buf_printf(b, fmt, a, c);
}

/*
 * 200 "ok" when both broker links are up and the ledger takes a write (the worker's
 * heartbeat row, written at most once per HEALTH_LEDGER_CACHE_MS); else 503 with every
 * reason on one line.
 */
static void health(struct worker *w, struct bw_http_reply *r)
{
	int64_t now = bw_clock_mono_ms();
	struct bw_buf why = BW_BUF_INIT;
	for (size_t i = 0; i < BW_NAMES(link_names); i++) {
		const struct bw_amqp_link *l = link_of(w, i);
		if (l->c != NULL)
			continue;
		const char *what = l->why[0] ? l->why : "not connected yet";
		if (i == 0 && w->draining)
			what = "draining: no new jobs";
		else if (i == 0 && w->stopping)
			what = "stopping";
		reason(&why, "%s link down: %s", link_names[i], what);
	}
	if (w->health_checked_ms == 0 || now - w->health_checked_ms >= HEALTH_LEDGER_CACHE_MS) {
		w->health_ledger_rc = bw_ledger_heartbeat(w->ledger);
		w->health_checked_ms = now;
	}
	if (w->health_ledger_rc != 0)
		reason(&why, "%s: %s", "ledger takes no write", bw_strerror(w->health_ledger_rc));
	if (why.len == 0) {
		bw_buf_puts(&r->body, "ok\n");
	} else {
		r->status = 503;
		bw_buf_append(&r->body, why.data, why.len);
		bw_buf_puts(&r->body, "\n");
	}
	bw_buf_free(&why);
}

static void page_cb(void *arg, const char *path, struct bw_http_reply *r)
{
	struct worker *w = arg;
	if (strcmp(path, "/metrics") == 0) {
		collect(w);
		bw_metrics_render(w->metrics, &r->body);
		r->content_type = BW_METRICS_CONTENT_TYPE;
	} else if (strcmp(path, "/healthz") == 0) {
		health(w, r);
	} else {
		r->status = 404;
		bw_buf_puts(&r->body, "not found: /metrics or /healthz\n");
	}
}

/* ---- set-up ------------------------------------------------------------------------------ */

/* The series a scrape shows before their first event (at 0), so that rate() has a start. */
static void declare(struct worker *w)
{
	struct bw_metrics *m = w->metrics;
	bw_metrics_set(m, BW_METRIC_INFO, LABELS(BW_VERSION, w->cfg->worker_id, w->host), 1);
	bw_metrics_touch(m, BW_METRIC_JOB_OUTCOMES, LABELS("completed", "none"));
#define BW__TOUCH_FAILED(name, text, retryable)                                                    \
	bw_metrics_touch(m, BW_METRIC_JOB_OUTCOMES, LABELS("failed", text));
	BW_FAIL_REASON_MAP(BW__TOUCH_FAILED)
#undef BW__TOUCH_FAILED
	bw_metrics_touch(m, BW_METRIC_JOB_DURATION, LABELS("completed"));
	bw_metrics_touch(m, BW_METRIC_JOB_DURATION, LABELS("failed"));
	bw_metrics_touch(m, BW_METRIC_JOB_START_LATENCY, NULL);
	bw_metrics_touch(m, BW_METRIC_CONFIRM_LATENCY, NULL);
	static const char *const calls[] = {"start", "progress", "cleanup"};
	for (size_t i = 0; i < BW_NAMES(calls); i++) {
		bw_metrics_touch(m, BW_METRIC_SNA_REQUESTS, LABELS(calls[i], "ok"));
		bw_metrics_touch(m, BW_METRIC_SNA_DURATION, LABELS(calls[i]));
	}
	for (int r = BW_REJECT_INVALID_JSON; r <= BW_REJECT_INVALID_PARENT; r++)
		bw_metrics_touch(m, BW_METRIC_REJECTED,
				 LABELS(bw_reject_reason_name((enum bw_reject_reason)r)));
	bw_metrics_set(m, BW_METRIC_LAST_COMPLETED, NULL, 0);
}

int monitor_open(struct worker *w)
{
	char err[512];
	if (bw_metrics_new(&w->metrics) != 0) {
		bw_log_warnx("out of memory");
		return -1;
	}
	declare(w);
	const char *listen = w->cfg->metrics_listen;
	if (listen == NULL || listen[0] == '\0')
		return 0;
	if (bw_http_open(&w->http, listen, page_cb, w, err, sizeof(err)) != 0) {
		bw_log_warnx("metrics.listen %s: %s", listen, err);
		return -1;
	}
	bw_log_info("metrics: GET /metrics and /healthz on http://%s (metrics.listen %s)",
		    bw_http_address(w->http), listen);
	return 0;
}

void monitor_close(struct worker *w)
{
	bw_http_close(w->http);
	w->http = NULL;
	bw_metrics_free(w->metrics);
	w->metrics = NULL;
}
