/* metrics.h: a worker's metrics registry (counters, gauges, histograms from one table) and its Prometheus text rendering. */
#ifndef BW_METRICS_H
#define BW_METRICS_H

#include <stddef.h>

#include "buf.h"
#include "error.h"

/*
 * One registry per worker process, owned by the worker and passed by pointer to whatever
 * records into it (the relay, the SNA client, the job state machine). Nothing here blocks
 * or does I/O but bw_metrics_collect_process (a few reads of /proc/self). Every recording
 * function accepts a NULL registry and then does nothing, so a module used without metrics
 * (bw-ctl, a test) needs no special case.
 *
 * Names follow the Prometheus conventions: the bw_ prefix (process_* as every client
 * library names them), base units (seconds, bytes), _total on counters, a HELP and a TYPE
 * line each. Series are made on first use, keyed by their label values; a metric holds at
 * most BW_METRICS_MAX_SERIES of them (label values come from vocabularies, so the bound is
 * never reached; past it new series are dropped, never the process's memory).
 */

/* Histogram bucket layouts: upper bounds in seconds, ascending (+Inf is implied). */
/* a whole backup: seconds to a day */
#define BW_BUCKETS_JOB 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400
/* claimed -> the SNA accepted the start: milliseconds (idle) to minutes (waiting for ports) */
#define BW_BUCKETS_START 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600
/* one job state: a commit (ms) to a transfer (hours) */
#define BW_BUCKETS_STAGE                                                                           \
	0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 14400, 86400
/* one HTTP request to the SNA: loopback ms to the 30 s default timeout */
#define BW_BUCKETS_SNA 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60
/* publish -> broker confirm: sub-ms on a quiet broker, seconds under an alarm */
#define BW_BUCKETS_CONFIRM 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30

/*
 * Every metric: X(id, name, type, help, buckets, label names...). buckets is one of the
 * BW_BUCKETS_* lists for a histogram, NONE otherwise; at most BW_METRICS_MAX_LABELS labels.
 */
#define BW_METRIC_MAP(X)                                                                           \
	X(INFO, "bw_info", GAUGE, "Always 1: the worker's version, id and host.", NONE,            \
	  "version", "worker_id", "host")                                                          \
	X(JOBS, "bw_jobs", GAUGE, "Jobs of this worker in memory, by ledger state.", NONE, "state") \
	X(JOB_OUTCOMES, "bw_job_outcomes_total", COUNTER,                                          \
	  "Jobs this worker ended, by result (completed, failed) and failure reason.", NONE,       \
	  "result", "reason")                                                                      \
	X(JOB_DURATION, "bw_job_duration_seconds", HISTOGRAM,                                      \
	  "From claim to backup.completed or backup.failed, by result.", JOB, "result")            \
	X(JOB_START_LATENCY, "bw_job_start_latency_seconds", HISTOGRAM,                            \
	  "From claim to the SNA accepting the start request.", START)                             \
	X(JOB_STAGE_DURATION, "bw_job_stage_duration_seconds", HISTOGRAM,                          \
	  "Time a job spent in one ledger state before it left it, by state.", STAGE, "stage")     \
	X(PORTS, "bw_ports", GAUGE,                                                                \
	  "NBD ports of the host's pool (all workers), by state (free, reserved, quarantined).",   \
	  NONE, "state")                                                                           \
	X(QEMU_NBD, "bw_qemu_nbd_processes", GAUGE,                                                \
	  "qemu-nbd servers of this worker's jobs still running.", NONE)                           \
	X(SNA_REQUESTS, "bw_sna_requests_total", COUNTER,                                          \
	  "HTTP requests to the SNA, by call (start, progress, cleanup) and outcome.", NONE,       \
	  "call", "outcome")                                                                       \
	X(SNA_DURATION, "bw_sna_request_duration_seconds", HISTOGRAM,                              \
	  "Duration of one HTTP request to the SNA, by call.", SNA, "call")                        \
	X(CONFIRM_LATENCY, "bw_relay_confirm_latency_seconds", HISTOGRAM,                          \
	  "From publishing an event to the broker's confirm of it.", CONFIRM)                      \
	X(RELAY_CONFIRMED, "bw_relay_events_confirmed_total", COUNTER,                             \
	  "Events the broker confirmed and the relay marked published.", NONE)                     \
	X(RELAY_FAILED, "bw_relay_publish_failures_total", COUNTER,                                \
	  "Publishes that were nacked, returned or lost (sent again later).", NONE)                \
	X(OUTBOX_BACKLOG, "bw_outbox_backlog_events", GAUGE,                                       \
	  "Events in the host's outbox not yet confirmed by the broker.", NONE)                    \
	X(OUTBOX_AGE, "bw_outbox_oldest_age_seconds", GAUGE,                                       \
	  "Age of the oldest unpublished event of the outbox (0 when none).", NONE)                \
	X(BROKER_RECONNECTS, "bw_broker_reconnects_total", COUNTER,                                \
	  "Broker connections made again after the first, by link (consumer, publisher).", NONE,   \
	  "link")                                                                                  \
	X(BROKER_UP, "bw_broker_link_up", GAUGE,                                                   \
	  "1 while the link's broker connection is up, by link (consumer, publisher).", NONE,      \
	  "link")                                                                                  \
	X(BROKER_NODE, "bw_broker_link_node_info", GAUGE,                                          \
	  "1 for the amqp.url node (host:port) each link is on; no series while it is down.",     \
	  NONE, "link", "node")                                                                    \
	X(BROKER_NODE_CONNECTS, "bw_broker_connects_total", COUNTER,                               \
	  "Successful broker connections, by link and amqp.url node (host:port).", NONE, "link",  \
	  "node")                                                                                  \
	X(REJECTED, "bw_rejected_messages_total", COUNTER,                                         \
	  "backup.start messages rejected (to the DLQ), by reason.", NONE, "reason")               \
	X(FORWARDED, "bw_forwarded_messages_total", COUNTER,                                       \
	  "backup.start messages forwarded to a per-repository queue (placement), by outcome "     \
	  "(routed, unroutable, failed).",                                                         \
	  NONE, "outcome")                                                                         \
	X(LEDGER_BUSY_WAITS, "bw_ledger_busy_waits_total", COUNTER,                                \
	  "Sleeps of the ledger's busy handler while another process held the write lock.", NONE)  \
	X(LEDGER_BUSY_RETRIES, "bw_ledger_busy_retries_total", COUNTER,                            \
	  "Ledger transactions tried again after staying busy past the busy handler's bound.",     \
	  NONE)                                                                                    \
	X(LAST_COMPLETED, "bw_last_completed_backup_timestamp_seconds", GAUGE,                     \
	  "Unix time of the last backup this worker completed (0: none yet).", NONE)               \
	X(RSS, "process_resident_memory_bytes", GAUGE, "Resident memory size in bytes.", NONE)     \
	X(VSZ, "process_virtual_memory_bytes", GAUGE, "Virtual memory size in bytes.", NONE)       \
	X(CPU, "process_cpu_seconds_total", COUNTER, "User and system CPU time spent in seconds.",  \
	  NONE)                                                                                    \
	X(START_TIME, "process_start_time_seconds", GAUGE,                                         \
	  "Start time of the process since the Unix epoch in seconds.", NONE)                      \
	X(OPEN_FDS, "process_open_fds", GAUGE, "Number of open file descriptors.", NONE)           \
	X(MAX_FDS, "process_max_fds", GAUGE, "Maximum number of open file descriptors.", NONE)

enum bw_metric {
#define BW__METRIC_ENUM(id, ...) BW_METRIC_##id,
	BW_METRIC_MAP(BW__METRIC_ENUM)
#undef BW__METRIC_ENUM
	BW_METRIC_COUNT
};

#define BW_METRICS_MAX_LABELS 3
#define BW_METRICS_MAX_SERIES 256

struct bw_metrics;

/* A new, empty registry in *out (free with bw_metrics_free). Returns 0 or BW_ENOMEM. */
int bw_metrics_new(struct bw_metrics **out) BW_MUST_CHECK;
/* Frees the registry and every series. Accepts NULL. */
void bw_metrics_free(struct bw_metrics *m);

/* The metric's name ("bw_jobs"), static. */
const char *bw_metric_name(enum bw_metric id);

/*
 * Recording. labels holds one value per label name of the metric, in the table's order
 * (NULL when it has none); values are copied, and escaped when rendered. A series that
 * cannot be made (no memory, BW_METRICS_MAX_SERIES reached) is dropped silently.
 *  - bw_metrics_add: a counter grows by v (>= 0; a negative v is ignored), a gauge by v.
 *  - bw_metrics_set: a gauge takes v; so does a counter whose total another module keeps
 *    (the relay's confirms, a link's connects), copied at scrape time.
 *  - bw_metrics_observe: a histogram counts v (seconds) in its buckets, sum and count.
 *  - bw_metrics_touch: the series exists (at 0) before its first event, so that a scrape
 *    shows it and rate() has a start.
 * A call that does not fit the metric's type is ignored.
 */
void bw_metrics_add(struct bw_metrics *m, enum bw_metric id, const char *const *labels, double v);
void bw_metrics_set(struct bw_metrics *m, enum bw_metric id, const char *const *labels, double v);
void bw_metrics_observe(struct bw_metrics *m, enum bw_metric id, const char *const *labels,
			double v);
void bw_metrics_touch(struct bw_metrics *m, enum bw_metric id, const char *const *labels);

/* Drops every series of metric id (a gauge whose label values change: the link's node). */
void bw_metrics_clear(struct bw_metrics *m, enum bw_metric id);

/*
 * The value of a series (a counter's or gauge's value, a histogram's count); 0 when it does
 * not exist. For tests and for the worker's own checks.
 */
double bw_metrics_value(const struct bw_metrics *m, enum bw_metric id, const char *const *labels);

/*
 * Sets the process_* gauges from /proc/self (stat, fd/) and getrlimit: resident and virtual
 * memory, CPU seconds, start time, open and maximum descriptors. Returns 0, or BW_EIO when
 * /proc/self/stat cannot be read (the others are then unchanged).
 */
int bw_metrics_collect_process(struct bw_metrics *m) BW_MUST_CHECK;

/*
 * Appends the whole registry to out in the Prometheus text exposition format 0.0.4 (serve
 * it as BW_METRICS_CONTENT_TYPE): per metric its HELP and TYPE lines, then its series in the
 * order they were made; histograms as cumulative _bucket{le=...} lines ending in le="+Inf",
 * then _sum and _count. A metric without series shows only HELP and TYPE. Label values are
 * escaped as the format says (\\, \", \n). Allocation failures show as out->failed.
 */
void bw_metrics_render(const struct bw_metrics *m, struct bw_buf *out);

#define BW_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
