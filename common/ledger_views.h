/* ledger_views.h: bw-ctl's read-only views of the ledger as JSON: jobs, ports, workers, a job. */
#ifndef BW_LEDGER_VIEWS_H
#define BW_LEDGER_VIEWS_H

#include <json-c/json.h>

#include "error.h"
#include "ledger.h"

/*
 * Read-only views for bw-ctl (any handle, bw_ledger_open_readonly's too), as new json-c
 * values in *out (the caller puts them):
 * jobs: [{job_id, state, owner, generation, attempt, disk_count, created_at, updated_at,
 *         last_error}], newest first;
 * ports: [{port, state, job_id, disk_key, owner, until}] (reserved and quarantined ports);
 * workers: [{worker_id, incarnation, pid, start_time, boot_id, lock_path, started_at,
 *            heartbeat_at, alive}];
 * a job (object): the job fields, its disks, its state history with times, its events.
 * Times are RFC 3339 UTC strings. Returns 0, BW_ENOMEM, BW_EBUSY, BW_EIO; BW_ENOENT when
 * show names an unknown job.
 */
int bw_ledger_list_jobs(struct bw_ledger *l, struct json_object **out) BW_MUST_CHECK;
int bw_ledger_list_ports(struct bw_ledger *l, struct json_object **out) BW_MUST_CHECK;
int bw_ledger_list_workers(struct bw_ledger *l, struct json_object **out) BW_MUST_CHECK;
int bw_ledger_show_job(struct bw_ledger *l, const char *job_id, struct json_object **out)
	BW_MUST_CHECK;

#endif
