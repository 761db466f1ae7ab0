/* ledger_views.c: bw-ctl's read-only views of the ledger: rows of the statement table as JSON. */
#include "ledger_views.h"

#include "clock.h"
#include "ledger_internal.h"
#include "proc.h"

#include <fcntl.h>
#include <stdbool.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

/* A stored time as an RFC 3339 string; NULL (JSON null) for none (0) or one out of range. */
static struct json_object *time_json(int64_t ms)
{
	char buf[BW_RFC3339_SIZE];
	if (ms <= 0 || bw_clock_rfc3339(ms, buf)[0] == '\0')
		return NULL;
	return json_object_new_string(buf);
}

/*
 * Turns every row of s (a bound statement of the table) into an object named by its
 * columns; kinds per column: 's' string (NULL stays null), 'i' integer, 't' time
 * (ms -> RFC 3339), 'b' boolean. Resets s. Stores a new array in *out.
 */
static int rows_json(struct bw_ledger *l, sqlite3_stmt *s, const char *kinds,
		     struct json_object **out)
{
	int rc;
	struct json_object *arr = json_object_new_array();
	if (arr == NULL) {
		sqlite3_reset(s);
		return BW_ENOMEM;
	}
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct json_object *o = json_object_new_object();
		for (int c = 0; kinds[c]; c++) {
			struct json_object *v = NULL;
			bool null = sqlite3_column_type(s, c) == SQLITE_NULL;
			if (!null && kinds[c] == 's')
				v = json_object_new_string((const char *)sqlite3_column_text(s, c));
			else if (!null && kinds[c] == 'i')
				v = json_object_new_int64(sqlite3_column_int64(s, c));
			else if (!null && kinds[c] == 't')
				v = time_json(sqlite3_column_int64(s, c));
			else if (!null && kinds[c] == 'b')
				v = json_object_new_boolean(sqlite3_column_int(s, c) != 0);
			json_object_object_add(o, sqlite3_column_name(s, c), v);
		}
		json_object_array_add(arr, o);
	}
	sqlite3_reset(s);
	if (rc != SQLITE_DONE) {
		json_object_put(arr);
		return bw__ledger_sql_err(l, rc);
	}
	*out = arr;
	return 0;
}

/* One view: the statement id bound with job_id (NULL: no parameter), as rows_json. */
static int view(struct bw_ledger *l, enum bw__stmt id, const char *job_id, const char *kinds,
		struct json_object **out)
{
	int err = 0;
	sqlite3_stmt *s =
	    job_id ? bw__ledger_query(l, id, &err, "t", job_id) : bw__ledger_query(l, id, &err, "");
	if (s == NULL)
		return err;
	return rows_json(l, s, kinds, out);
}

int bw_ledger_list_jobs(struct bw_ledger *l, struct json_object **out)
{
	return view(l, BW__ST_VIEW_JOBS, NULL, "sssiiitts", out);
}

int bw_ledger_list_ports(struct bw_ledger *l, struct json_object **out)
{
	int err = 0;
	/* An expired quarantine is free: it is not listed even before maintenance drops it. */
	sqlite3_stmt *s = bw__ledger_query(l, BW__ST_VIEW_PORTS, &err, "i", bw_clock_wall_ms());
	if (s == NULL)
		return err;
	return rows_json(l, s, "issist", out);
}

/* alive: the same test the reaper makes (never the heartbeat age), without taking the lock
 * from its holder (a shared lock, let go at once). */
static bool worker_alive(struct json_object *w, const char *host_boot_id)
{
	struct json_object *v;
	const char *lock =
	    json_object_object_get_ex(w, "lock_path", &v) ? json_object_get_string(v) : "";
	const char *b =
	    json_object_object_get_ex(w, "boot_id", &v) ? json_object_get_string(v) : "";
	pid_t pid = json_object_object_get_ex(w, "pid", &v) ? json_object_get_int(v) : 0;
	uint64_t st =
	    json_object_object_get_ex(w, "start_time", &v) ? (uint64_t)json_object_get_int64(v) : 0;
	if (strcmp(b, host_boot_id) != 0)
		return false;
	int fd = open(lock, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return bw_proc_same(pid, st);
	bool alive = flock(fd, LOCK_SH | LOCK_NB) != 0;
	close(fd);
	return alive;
}

int bw_ledger_list_workers(struct bw_ledger *l, struct json_object **out)
{
	struct json_object *arr = NULL;
	char boot[BW_BOOT_ID_LEN + 1] = "";
	int rc = view(l, BW__ST_VIEW_WORKERS, NULL, "siiisstt", &arr);
	if (rc != 0)
		return rc;
	if (bw_proc_boot_id(boot) != 0)
		boot[0] = '\0';
	for (size_t i = 0; i < json_object_array_length(arr); i++) {
		struct json_object *w = json_object_array_get_idx(arr, i);
		json_object_object_add(w, "alive", json_object_new_boolean(worker_alive(w, boot)));
	}
	*out = arr;
	return 0;
}

int bw_ledger_show_job(struct bw_ledger *l, const char *job_id, struct json_object **out)
{
	struct json_object *job = NULL, *part = NULL;
	int rc = view(l, BW__ST_VIEW_JOB, job_id, "sssiiittss", &part);
	if (rc != 0)
		return rc;
	if (json_object_array_length(part) == 0) {
		json_object_put(part);
		return BW_ENOENT;
	}
	job = json_object_get(json_object_array_get_idx(part, 0));
	json_object_put(part);

	static const struct {
		const char *name;
		enum bw__stmt id;
		const char *kinds;
	} parts[] = {
	    {"disks", BW__ST_VIEW_JOB_DISKS, "isissbii"},
	    {"history", BW__ST_VIEW_JOB_HISTORY, "ssit"},
	    {"events", BW__ST_VIEW_JOB_EVENTS, "issttis"},
	};
	for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
		if ((rc = view(l, parts[i].id, job_id, parts[i].kinds, &part)) != 0) {
			json_object_put(job);
			return rc;
		}
		json_object_object_add(job, parts[i].name, part);
	}
	*out = job;
	return 0;
}
