/* events.h: the backup.* events of CONTRACT §4: the common envelope and backup.rejected. */
#ifndef BW_EVENTS_H
#define BW_EVENTS_H

#include <json-c/json.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "message.h"

/* What every event of one job carries (borrowed pointers). */
struct bw_event_ctx {
	const char *job_id;
	const char *host;
	const char *worker_id;
	struct json_object *vm;   /* {name, path, id?} */
	const char *policy_id;    /* NULL when absent */
	struct json_object *tags; /* NULL when absent */
};

/* The {name, path, id?} object of a spec, new (caller puts). NULL on allocation failure. */
struct json_object *bw_event_vm(const struct bw_job_spec *spec);

/*
 * Starts an event: a new object with schema_version, event, event_id
 * ("<job_id>/<event>", plus "/<id_extra>" when not NULL: the disk key of a per-disk event,
 * the seq of a progress event), job_id, seq, occurred_at (RFC 3339 UTC, milliseconds),
 * host, worker_id, vm, and policy_id and tags when present. The caller adds the event's
 * own fields, then calls bw_event_finish. NULL on allocation failure.
 */
struct json_object *bw_event_begin(const struct bw_event_ctx *c, const char *event, int64_t seq,
				   const char *id_extra);

/*
 * Serializes an event (and puts o): stores malloc'd copies of its JSON text in *body and of
 * its event_id in *event_id. Returns 0 or BW_ENOMEM.
 */
int bw_event_finish(struct json_object *o, char **body, char **event_id) BW_MUST_CHECK;

/*
 * backup.rejected for the raw body and its verdict: event_id "rejected/<FNV-1a 64 of the
 * raw body>", seq 0, job_id only when the body's job_id follows the rule (else null),
 * reason, errors[] one per violated rule, and vm, policy_id and tags echoed only when
 * valid. Returns 0 with malloc'd *body and *event_id, or BW_ENOMEM.
 */
int bw_event_rejected(const char *raw, size_t len, const struct bw_verdict *vd, const char *host,
		      const char *worker_id, char **body, char **event_id) BW_MUST_CHECK;

/* The current time as RFC 3339 UTC with milliseconds into out[32]. */
void bw_event_now(char *out);

#endif
