/* test_ledger.c: the ledger's functions one by one, with their error paths, on a real SQLite file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ledger.h"
#include "ledger_views.h"
#include "proc.h"

struct fixture {
	char dir[64];
	char path[PATH_MAX];
	struct bw_ledger *l;
};

static int setup(void **state)
{
	struct fixture *fx = calloc(1, sizeof(*fx));
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/bw-test-ledger-XXXXXX");
	if (mkdtemp(fx->dir) == NULL)
		return -1;
	snprintf(fx->path, sizeof(fx->path), "%s/ledger.db", fx->dir);
	if (bw_ledger_open(&fx->l, fx->path, 10100, 10104) != 0)
		return -1;
	if (bw_ledger_register(fx->l, "w1", fx->dir) != 0)
		return -1;
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *fx = *state;
	char cmd[PATH_MAX + 16];
	bw_ledger_close(fx->l);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->dir);
	if (system(cmd) != 0)
		return -1;
	free(fx);
	return 0;
}

/* Claims job with n disks keyed 2000.. ; returns its fence generation. */
static int64_t claim(struct bw_ledger *l, const char *job, size_t n)
{
	struct bw_job_disk_new disks[16];
	char event_id[160];
	snprintf(event_id, sizeof(event_id), "%s/backup.accepted", job);
	for (size_t i = 0; i < n; i++)
		disks[i] = (struct bw_job_disk_new){(int64_t)(2000 + i), "export", "/repo/x.qcow2"};
	struct bw_event accepted = {event_id, "backup.accepted", 1, "{\"seq\":1}"};
	int64_t gen = 0;
	assert_int_equal(bw_ledger_claim(l, job, "{}", disks, n, &accepted, &gen, NULL), 0);
	return gen;
}

static size_t array_len(struct json_object *a)
{
	size_t n = json_object_array_length(a);
	json_object_put(a);
	return n;
}

static size_t held_ports(struct bw_ledger *l)
{
	struct json_object *a = NULL;
	assert_int_equal(bw_ledger_list_ports(l, &a), 0);
	return array_len(a);
}

static void test_files_are_private_and_reopen_is_idempotent(void **state)
{
	struct fixture *fx = *state;
	char p[PATH_MAX + 8];
	struct stat st;
	const char *suffix[] = {"", "-wal", "-shm"};
	for (int i = 0; i < 3; i++) {
		snprintf(p, sizeof(p), "%s%s", fx->path, suffix[i]);
		assert_int_equal(stat(p, &st), 0);
		assert_int_equal(st.st_mode & 0777, 0600);
	}
	struct bw_ledger *again = NULL;
	assert_int_equal(bw_ledger_open(&again, fx->path, 10100, 10104), 0);
	bw_ledger_close(again);

	/* A ledger from a newer schema is refused, not misread. */
	char newer[PATH_MAX + 16];
	snprintf(newer, sizeof(newer), "%s/newer.db", fx->dir);
	sqlite3 *db;
	assert_int_equal(sqlite3_open(newer, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "PRAGMA user_version = 99", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	assert_int_equal(bw_ledger_open(&again, newer, 10100, 10104), BW_ENOTSUP);
	assert_int_equal(bw_ledger_open_readonly(&again, newer), BW_ENOTSUP);
	snprintf(newer, sizeof(newer), "%s/none.db", fx->dir);
	assert_int_equal(bw_ledger_open_readonly(&again, newer), BW_ENOENT);
	assert_int_equal(access(newer, F_OK), -1); /* read-only open creates nothing */
	assert_int_equal(bw_ledger_open(&again, fx->path, 10105, 10100), BW_EINVAL);
}

static void test_worker_id_held_once(void **state)
{
	struct fixture *fx = *state;
	struct bw_ledger *other = NULL;
	assert_int_equal(bw_ledger_open(&other, fx->path, 10100, 10104), 0);
	assert_int_equal(bw_ledger_register(other, "w1", fx->dir), BW_EEXIST);
	assert_int_equal(bw_ledger_register(other, "w2", fx->dir), 0);
	assert_int_equal(bw_ledger_heartbeat(other), 0);
	struct json_object *w = NULL;
	assert_int_equal(bw_ledger_list_workers(other, &w), 0);
	assert_int_equal(json_object_array_length(w), 2);
	struct json_object *first = json_object_array_get_idx(w, 0), *v;
	assert_true(json_object_object_get_ex(first, "alive", &v));
	assert_true(json_object_get_boolean(v));
	json_object_put(w);
	assert_int_equal(bw_ledger_unregister(other), 0);
	bw_ledger_close(other);
	char lock[PATH_MAX + 16];
	snprintf(lock, sizeof(lock), "%s/w2.lock", fx->dir);
	assert_int_equal(access(lock, F_OK), -1); /* clean exit: lock file gone */
}

static void test_claim_once(void **state)
{
	struct fixture *fx = *state;
	int64_t gen = claim(fx->l, "job-1", 3);
	assert_int_equal(gen, 1);
	struct bw_event again = {"job-1/backup.accepted", "backup.accepted", 1, "{}"};
	struct bw_known existing = {BW_JOB_COMPLETED, false};
	int64_t g2 = 0;
	assert_int_equal(bw_ledger_claim(fx->l, "job-1", "{}", NULL, 0, &again, &g2, &existing),
			 BW_EEXIST);
	assert_int_equal(existing.state, BW_JOB_CLAIMED);
	assert_true(existing.same_message);
	assert_int_equal(bw_ledger_claim(fx->l, "job-1", "{\"other\":1}", NULL, 0, &again, &g2,
					 &existing),
			 BW_EEXIST);
	assert_false(existing.same_message);

	struct bw_outbox_row *rows = NULL;
	size_t n = 0;
	assert_int_equal(bw_ledger_outbox_next(fx->l, 0, 10, &rows, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(rows[0].event_id, "job-1/backup.accepted");
	bw_outbox_free(rows, n);

	/* A constraint broken inside a transaction is permanent (not a transient I/O error):
	 * another job that reuses job-1's accepted event id changes nothing. */
	struct bw_event stolen = {"job-1/backup.accepted", "backup.accepted", 1, "{}"};
	assert_int_equal(bw_ledger_claim(fx->l, "job-x", "{}", NULL, 0, &stolen, &g2, NULL),
			 BW_EEXIST);
	assert_non_null(strstr(bw_ledger_errmsg(fx->l), "UNIQUE"));
	struct json_object *jobs = NULL;
	assert_int_equal(bw_ledger_list_jobs(fx->l, &jobs), 0);
	assert_int_equal(array_len(jobs), 1);

	/* Not registered: no claim. */
	struct bw_ledger *anon = NULL;
	assert_int_equal(bw_ledger_open(&anon, fx->path, 10100, 10104), 0);
	assert_int_equal(bw_ledger_claim(anon, "job-2", "{}", NULL, 0, &again, &g2, NULL),
			 BW_EINVAL);
	bw_ledger_close(anon);
}

static void test_transition_seq_and_fence(void **state)
{
	struct fixture *fx = *state;
	int64_t gen = claim(fx->l, "job-t", 1);
	struct bw_fence f = {"job-t", gen};
	struct bw_event ev[2] = {{"job-t/backup.started", "backup.started", 2, "{}"},
				 {"job-t/backup.progress/3", "backup.progress", 3, "{}"}};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_SERVING, NULL, NULL, 0), 0);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_TRANSFERRING, NULL, ev, 2), 0);
	/* seq must follow on: 3 again is refused and nothing changes */
	struct bw_event dup = {"job-t/x", "backup.progress", 3, "{}"};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_FAILED, "boom", &dup, 1), BW_EINVAL);
	struct bw_fence stale = {"job-t", gen + 1};
	assert_int_equal(bw_ledger_transition(fx->l, &stale, BW_JOB_FAILED, NULL, NULL, 0),
			 BW_EFENCED);
	struct bw_fence none = {"job-none", 1};
	assert_int_equal(bw_ledger_transition(fx->l, &none, BW_JOB_FAILED, NULL, NULL, 0),
			 BW_ENOENT);
	/* an event that keeps the state (progress): no history row of its own */
	struct bw_event more = {"job-t/backup.progress/4", "backup.progress", 4, "{}"};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_TRANSFERRING, NULL, &more, 1), 0);

	struct json_object *job = NULL, *v;
	assert_int_equal(bw_ledger_show_job(fx->l, "job-t", &job), 0);
	assert_true(json_object_object_get_ex(job, "state", &v));
	assert_string_equal(json_object_get_string(v), "transferring");
	assert_true(json_object_object_get_ex(job, "seq", &v));
	assert_int_equal(json_object_get_int(v), 4);
	assert_true(json_object_object_get_ex(job, "history", &v));
	assert_int_equal(json_object_array_length(v), 3); /* claimed, serving, transferring */
	assert_true(json_object_object_get_ex(job, "events", &v));
	assert_int_equal(json_object_array_length(v), 4);
	json_object_put(job);
	assert_int_equal(bw_ledger_show_job(fx->l, "job-none", &job), BW_ENOENT);

	assert_int_equal(bw_ledger_disk_update(fx->l, &f, 2000, BW_DISK_ROW_SERVING, 4242, 99, true), 0);
	assert_int_equal(bw_ledger_disk_update(fx->l, &f, 2999, BW_DISK_ROW_SERVING, 1, 1, true), BW_ENOENT);
	assert_int_equal(bw_ledger_disk_update(fx->l, &stale, 2000, BW_DISK_ROW_COMPLETED, 0, 0, false), BW_EFENCED);

	/* The state machine only moves forward, to failed, and from failed to compensated. */
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_CLAIMED, NULL, NULL, 0), BW_ESTATE);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_COMPENSATED, NULL, NULL, 0),
			 BW_ESTATE);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_FAILED, "sna_lost_job", NULL, 0), 0);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_FINALIZING, NULL, NULL, 0),
			 BW_ESTATE);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_COMPENSATED, NULL, NULL, 0), 0);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_FAILED, NULL, NULL, 0), BW_ESTATE);
}

static void test_reserve_all_or_nothing_rotating(void **state)
{
	struct fixture *fx = *state; /* pool 10100..10104: five ports */
	struct bw_fence a = {"job-a", claim(fx->l, "job-a", 3)};
	struct bw_fence b = {"job-b", claim(fx->l, "job-b", 3)};
	int64_t keys[3] = {2000, 2001, 2002};
	int pa[3], pb[3] = {0, 0, 0};

	assert_int_equal(bw_ledger_reserve(fx->l, &a, keys, 3, pa), 0);
	assert_int_equal(pa[0], 10100);
	assert_int_equal(pa[1], 10101);
	assert_int_equal(pa[2], 10102);
	/* three more do not fit in the two left: nothing is reserved */
	assert_int_equal(bw_ledger_reserve(fx->l, &b, keys, 3, pb), BW_ENOPORTS);
	assert_int_equal(held_ports(fx->l), 3);
	/* a key that already holds a port; a key the job does not have */
	assert_int_equal(bw_ledger_reserve(fx->l, &a, keys, 1, pb), BW_EEXIST);
	int64_t stranger = 4242;
	assert_int_equal(bw_ledger_reserve(fx->l, &b, &stranger, 1, pb), BW_ENOENT);
	assert_int_equal(held_ports(fx->l), 3);

	/* release exactly once */
	assert_int_equal(bw_ledger_release(fx->l, &a, 10101), 0);
	assert_int_equal(bw_ledger_release(fx->l, &a, 10101), BW_ENOENT);
	assert_int_equal(bw_ledger_release(fx->l, &b, 10100), BW_ENOENT); /* not b's */
	assert_int_equal(held_ports(fx->l), 2);

	/* rotating: after 10102 come 10103, 10104, then wrap to the freed 10101 */
	assert_int_equal(bw_ledger_reserve(fx->l, &b, keys, 3, pb), 0);
	assert_int_equal(pb[0], 10103);
	assert_int_equal(pb[1], 10104);
	assert_int_equal(pb[2], 10101);

	size_t released = 0;
	assert_int_equal(bw_ledger_release_all(fx->l, &a, &released), 0);
	assert_int_equal(released, 2);
	assert_int_equal(bw_ledger_release_all(fx->l, &a, &released), 0);
	assert_int_equal(released, 0);
	struct bw_fence stale = {"job-b", 7};
	assert_int_equal(bw_ledger_release_all(fx->l, &stale, &released), BW_EFENCED);
	assert_int_equal(bw_ledger_release(fx->l, &stale, 10103), BW_EFENCED);
	assert_int_equal(held_ports(fx->l), 3);

	/* ports --json: the contract's fields */
	struct json_object *ports = NULL, *v;
	assert_int_equal(bw_ledger_list_ports(fx->l, &ports), 0);
	struct json_object *p0 = json_object_array_get_idx(ports, 0);
	assert_true(json_object_object_get_ex(p0, "port", &v));
	assert_int_equal(json_object_get_int(v), 10101);
	assert_true(json_object_object_get_ex(p0, "state", &v));
	assert_string_equal(json_object_get_string(v), "reserved");
	assert_true(json_object_object_get_ex(p0, "job_id", &v));
	assert_string_equal(json_object_get_string(v), "job-b");
	assert_true(json_object_object_get_ex(p0, "disk_key", &v));
	assert_true(json_object_is_type(v, json_type_int));
	assert_int_equal(json_object_get_int(v), 2002);
	assert_true(json_object_object_get_ex(p0, "owner", &v));
	assert_string_equal(json_object_get_string(v), "w1");
	assert_true(json_object_object_get_ex(p0, "until", &v));
	assert_null(v);
	json_object_put(ports);
}

/* The job's state in the ledger's show view (static buffer). */
static const char *job_state(struct bw_ledger *l, const char *job)
{
	static char out[32];
	struct json_object *o = NULL, *v;
	assert_int_equal(bw_ledger_show_job(l, job, &o), 0);
	assert_true(json_object_object_get_ex(o, "state", &v));
	snprintf(out, sizeof(out), "%s", json_object_get_string(v));
	json_object_put(o);
	return out;
}

static void test_reserve_and_move_is_one_transaction(void **state)
{
	struct fixture *fx = *state; /* pool 10100..10104: five ports */
	struct bw_fence a = {"job-a", claim(fx->l, "job-a", 3)};
	struct bw_fence b = {"job-b", claim(fx->l, "job-b", 3)};
	int64_t keys[3] = {2000, 2001, 2002};
	struct bw_disk_update u[3];
	for (int i = 0; i < 3; i++)
		u[i] = (struct bw_disk_update){keys[i], BW_DISK_ROW_CREATING, 0, 0, true};
	int pa[3], pb[3];

	assert_int_equal(bw_ledger_reserve_and_move(fx->l, &a, keys, 3, pa, BW_JOB_RESERVED, u, 3), 0);
	assert_string_equal(job_state(fx->l, "job-a"), "reserved");
	/* no ports for b: neither its state nor its disks move */
	assert_int_equal(bw_ledger_reserve_and_move(fx->l, &b, keys, 3, pb, BW_JOB_RESERVED, u, 3),
			 BW_ENOPORTS);
	assert_string_equal(job_state(fx->l, "job-b"), "claimed");
	/* an illegal move takes no port either */
	assert_int_equal(bw_ledger_transition(fx->l, &b, BW_JOB_FAILED, "x", NULL, 0), 0);
	assert_int_equal(bw_ledger_release_all(fx->l, &a, &(size_t){0}), 0);
	assert_int_equal(bw_ledger_reserve_and_move(fx->l, &b, keys, 3, pb, BW_JOB_RESERVED, u, 3),
			 BW_ESTATE);
	assert_int_equal(held_ports(fx->l), 0);
	assert_string_equal(job_state(fx->l, "job-b"), "failed");
	/* an event's body comes back by its id */
	char *body = NULL;
	assert_int_equal(bw_ledger_event_body(fx->l, "job-a/backup.accepted", &body), 0);
	assert_string_equal(body, "{\"seq\":1}");
	free(body);
	assert_int_equal(bw_ledger_event_body(fx->l, "job-a/nope", &body), BW_ENOENT);
}

static void test_quarantine(void **state)
{
	struct fixture *fx = *state;
	struct bw_fence a = {"job-q", claim(fx->l, "job-q", 2)};
	int64_t keys[2] = {2000, 2001};
	int p[2], repl = 0;
	assert_int_equal(bw_ledger_reserve(fx->l, &a, keys, 2, p), 0);
	assert_int_equal(bw_ledger_quarantine(fx->l, &a, p[0], 1, &repl), 0);
	assert_int_equal(repl, 10102);
	assert_int_equal(bw_ledger_quarantine(fx->l, &a, p[0], 1, &repl), BW_ENOENT);

	struct json_object *ports = NULL, *v;
	assert_int_equal(bw_ledger_list_ports(fx->l, &ports), 0);
	struct json_object *q = json_object_array_get_idx(ports, 0);
	assert_true(json_object_object_get_ex(q, "state", &v));
	assert_string_equal(json_object_get_string(v), "quarantined");
	assert_true(json_object_object_get_ex(q, "until", &v));
	assert_non_null(v);
	json_object_put(ports);

	/* Fill the pool: the quarantined port is skipped, then no replacement is left. */
	struct bw_fence b = {"job-q2", claim(fx->l, "job-q2", 2)};
	int pb[2];
	assert_int_equal(bw_ledger_reserve(fx->l, &b, keys, 2, pb), 0);
	assert_int_not_equal(pb[0], 10100);
	assert_int_not_equal(pb[1], 10100);
	assert_int_equal(bw_ledger_quarantine(fx->l, &b, pb[0], 1, &repl), BW_ENOPORTS);
	assert_int_equal(held_ports(fx->l), 5); /* 3 held + 2 quarantined */

	/* After the quarantine ends the port is free again. */
	sleep(1);
	usleep(100000);
	assert_int_equal(bw_ledger_maintain(fx->l), 0);
	assert_int_equal(held_ports(fx->l), 3);
	int64_t k = 2000;
	assert_int_equal(bw_ledger_reserve(fx->l, &b, &k, 1, pb), 0);
}

/* The port the show view gives disk key of job (0: none). */
static int disk_port(struct bw_ledger *l, const char *job, int64_t key)
{
	struct json_object *o = NULL, *disks, *v;
	int port = -1;
	assert_int_equal(bw_ledger_show_job(l, job, &o), 0);
	assert_true(json_object_object_get_ex(o, "disks", &disks));
	for (size_t i = 0; i < json_object_array_length(disks); i++) {
		struct json_object *d = json_object_array_get_idx(disks, i);
		assert_true(json_object_object_get_ex(d, "key", &v));
		if (json_object_get_int64(v) != key)
			continue;
		assert_true(json_object_object_get_ex(d, "port", &v));
		port = v ? json_object_get_int(v) : 0;
	}
	json_object_put(o);
	assert_int_not_equal(port, -1); /* the job has that disk */
	return port;
}

/* A disk's port is its reservation's: set by a reserve, gone with a release or a quarantine. */
static void test_disk_port_follows_its_reservation(void **state)
{
	struct fixture *fx = *state;
	struct bw_fence a = {"job-dp", claim(fx->l, "job-dp", 2)};
	int64_t keys[2] = {2000, 2001};
	int p[2], repl = 0;
	assert_int_equal(disk_port(fx->l, "job-dp", 2000), 0);
	assert_int_equal(bw_ledger_reserve(fx->l, &a, keys, 2, p), 0);
	assert_int_equal(disk_port(fx->l, "job-dp", 2000), p[0]);
	assert_int_equal(disk_port(fx->l, "job-dp", 2001), p[1]);
	assert_int_equal(bw_ledger_quarantine(fx->l, &a, p[0], 60, &repl), 0);
	assert_int_equal(disk_port(fx->l, "job-dp", 2000), repl);
	assert_int_equal(bw_ledger_release(fx->l, &a, p[1]), 0);
	assert_int_equal(disk_port(fx->l, "job-dp", 2001), 0);
	int first = repl;
	assert_int_equal(bw_ledger_quarantine(fx->l, &a, first, 60, &repl), 0);
	assert_int_not_equal(repl, first);
	assert_int_equal(disk_port(fx->l, "job-dp", 2000), repl);
	size_t released = 0;
	assert_int_equal(bw_ledger_release_all(fx->l, &a, &released), 0);
	assert_int_equal(released, 1);
	assert_int_equal(disk_port(fx->l, "job-dp", 2000), 0);
}

/* What /metrics shows of the host's ports: free, reserved, and live quarantines only. */
static void test_port_counts(void **state)
{
	struct fixture *fx = *state;
	struct bw_port_counts c;
	assert_int_equal(bw_ledger_port_counts(fx->l, &c), 0);
	assert_true(c.free == 5 && c.reserved == 0 && c.quarantined == 0);
	struct bw_fence a = {"job-c", claim(fx->l, "job-c", 2)};
	int64_t keys[2] = {2000, 2001};
	int p[2], repl = 0;
	assert_int_equal(bw_ledger_reserve(fx->l, &a, keys, 2, p), 0);
	assert_int_equal(bw_ledger_port_counts(fx->l, &c), 0);
	assert_true(c.free == 3 && c.reserved == 2 && c.quarantined == 0);
	assert_int_equal(bw_ledger_quarantine(fx->l, &a, p[0], 1, &repl), 0);
	assert_int_equal(bw_ledger_port_counts(fx->l, &c), 0);
	assert_true(c.free == 2 && c.reserved == 2 && c.quarantined == 1);
	/* an expired quarantine is free, upkeep or not */
	usleep(1100000);
	assert_int_equal(bw_ledger_port_counts(fx->l, &c), 0);
	assert_true(c.free == 3 && c.reserved == 2 && c.quarantined == 0);
}

/* The busy handler's sleeps are counted: another process holds the write lock a moment. */
static void test_busy_stats(void **state)
{
	struct fixture *fx = *state;
	uint64_t waits = 1, retries = 1;
	assert_int_equal(bw_ledger_heartbeat(fx->l), 0);
	bw_ledger_busy_stats(fx->l, &waits, &retries);
	assert_true(waits == 0 && retries == 0);
	int ready[2];
	assert_int_equal(pipe(ready), 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		sqlite3 *db = NULL;
		if (sqlite3_open(fx->path, &db) != SQLITE_OK ||
		    sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
			_exit(1);
		if (write(ready[1], "x", 1) != 1)
			_exit(1);
		usleep(200000);
		_exit(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK ? 0 : 1);
	}
	char x;
	assert_int_equal(read(ready[0], &x, 1), 1);
	assert_int_equal(bw_ledger_heartbeat(fx->l), 0); /* waits for the child's commit */
	int status = 0;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	close(ready[0]);
	close(ready[1]);
	bw_ledger_busy_stats(fx->l, &waits, &retries);
	assert_true(waits > 0);
	assert_int_equal(retries, 0);
}

static void test_outbox(void **state)
{
	struct fixture *fx = *state;
	claim(fx->l, "job-o1", 1);
	struct bw_event rej = {"rejected/00000000deadbeef", "backup.rejected", 0, "{}"};
	assert_int_equal(bw_ledger_outbox_append(fx->l, &rej), 0);
	assert_int_equal(bw_ledger_outbox_append(fx->l, &rej), 0); /* a known id: no-op */
	claim(fx->l, "job-o2", 1);

	struct bw_outbox_row *rows = NULL;
	size_t n = 0, backlog = 0;
	int64_t age = -1;
	assert_int_equal(bw_ledger_outbox_backlog(fx->l, &backlog, &age), 0);
	assert_int_equal(backlog, 3);
	assert_true(age >= 0 && age < 60000);
	assert_int_equal(bw_ledger_outbox_next(fx->l, 0, 10, &rows, &n), 0);
	assert_int_equal(n, 3);
	assert_string_equal(rows[0].event_id, "job-o1/backup.accepted");
	assert_string_equal(rows[1].event_id, "rejected/00000000deadbeef");
	assert_string_equal(rows[2].event_id, "job-o2/backup.accepted");
	assert_string_equal(rows[2].routing_key, "backup.accepted");
	assert_int_equal(bw_ledger_outbox_failed(fx->l, rows[0].id, "returned: NO_ROUTE"), 0);
	int64_t ids[2] = {rows[1].id, rows[2].id};
	bw_outbox_free(rows, n);
	assert_int_equal(bw_ledger_outbox_published(fx->l, ids, 2), 0);

	assert_int_equal(bw_ledger_outbox_next(fx->l, 0, 10, &rows, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(rows[0].event_id, "job-o1/backup.accepted");
	assert_int_equal(rows[0].attempts, 1);
	int64_t first = rows[0].id;
	bw_outbox_free(rows, n);
	assert_int_equal(bw_ledger_outbox_next(fx->l, first, 10, &rows, &n), 0);
	assert_int_equal(n, 0); /* nothing unpublished after it */
	bw_outbox_free(rows, n);
	assert_int_equal(bw_ledger_outbox_backlog(fx->l, &backlog, &age), 0);
	assert_int_equal(backlog, 1);
}

static long long file_size(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

/* Appends n outbox events of about 64 KiB each, numbered from first. */
static void append_big(struct bw_ledger *l, int first, int n)
{
	static char payload[64 * 1024];
	memset(payload, 'x', sizeof(payload) - 1);
	for (int i = first; i < first + n; i++) {
		char id[32];
		snprintf(id, sizeof(id), "wal/%d", i);
		struct bw_event e = {id, "backup.rejected", 0, payload};
		assert_int_equal(bw_ledger_outbox_append(l, &e), 0);
	}
}

/*
 * A reader that keeps an old snapshot makes the WAL grow past the auto-checkpoint; once it
 * left, the WAL file is cut back to journal_size_limit (4 MiB) when it is next reset, not
 * kept at its peak size for the life of the host (SQLite's default).
 */
static void test_wal_is_cut_back_after_a_long_reader(void **state)
{
	struct fixture *fx = *state;
	char wal[PATH_MAX + 8];
	snprintf(wal, sizeof(wal), "%s-wal", fx->path);
	sqlite3 *reader = NULL;
	sqlite3_stmt *q = NULL;
	assert_int_equal(sqlite3_open_v2(fx->path, &reader, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_exec(reader, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(reader, "SELECT count(*) FROM outbox", -1, &q, NULL),
			 SQLITE_OK);
	assert_int_equal(sqlite3_step(q), SQLITE_ROW); /* the snapshot is held from here */
	append_big(fx->l, 0, 160);
	long long peak = file_size(wal);
	assert_true(peak > 8LL << 20);
	sqlite3_finalize(q);
	assert_int_equal(sqlite3_exec(reader, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(reader);
	/* the first commit's auto-checkpoint copies every frame back, the next one resets */
	append_big(fx->l, 1000, 3);
	long long after = file_size(wal);
	print_message("WAL %lld KiB with the reader, %lld KiB after it left\n", peak >> 10,
		      after >> 10);
	assert_true(after >= 0 && after <= (4LL << 20) + (512LL << 10));
}

static void test_readonly_views(void **state)
{
	struct fixture *fx = *state;
	claim(fx->l, "job-r", 2);
	struct bw_ledger *ro = NULL;
	assert_int_equal(bw_ledger_open_readonly(&ro, fx->path), 0);
	struct json_object *jobs = NULL, *v;
	assert_int_equal(bw_ledger_list_jobs(ro, &jobs), 0);
	assert_int_equal(json_object_array_length(jobs), 1);
	struct json_object *j = json_object_array_get_idx(jobs, 0);
	assert_true(json_object_object_get_ex(j, "disk_count", &v));
	assert_int_equal(json_object_get_int(v), 2);
	assert_true(json_object_object_get_ex(j, "created_at", &v));
	assert_int_equal(strlen(json_object_get_string(v)), 24); /* 2026-11-22T10:00:00.000Z */
	json_object_put(jobs);
	assert_int_equal(bw_ledger_register(ro, "w9", fx->dir), BW_EINVAL);
	bw_ledger_close(ro);
}

/* --drain's calls: the worker's row (pid and start time) and the jobs it still owns. */
static void test_worker_row_and_owned_jobs(void **state)
{
	struct fixture *fx = *state;
	struct bw_worker_row row = {0, 0, 0, 0, 0};
	uint64_t start = 0;
	size_t n = 99;
	assert_int_equal(bw_ledger_worker_get(fx->l, "w1", &row), 0);
	assert_int_equal(bw_proc_start_time(getpid(), &start), 0);
	assert_int_equal(row.pid, getpid());
	assert_true(row.start_time == start);
	assert_true(row.incarnation >= 1);
	assert_true(row.started_at_ms > 0 && row.heartbeat_at_ms >= row.started_at_ms);
	assert_true(bw_proc_same(row.pid, row.start_time));
	row.pid = 0;
	assert_int_equal(bw_ledger_worker_get(fx->l, "nobody", &row), BW_ENOENT);
	assert_int_equal(row.pid, 0); /* untouched on failure */

	assert_int_equal(bw_ledger_worker_jobs(fx->l, "w1", &n), 0);
	assert_int_equal(n, 0);
	int64_t gen = claim(fx->l, "job-w1", 1);
	claim(fx->l, "job-w2", 1);
	struct bw_fence f = {"job-w1", gen};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_COMPLETED, NULL, NULL, 0), 0);
	f.job_id = "job-w2";
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_FAILED, "x", NULL, 0), 0);
	assert_int_equal(bw_ledger_worker_jobs(fx->l, "w1", &n), 0);
	assert_int_equal(n, 1); /* the failed one still owes its compensation */

	struct bw_ledger *ro = NULL;
	assert_int_equal(bw_ledger_open_readonly(&ro, fx->path), 0);
	assert_int_equal(bw_ledger_worker_get(ro, "w1", &row), 0);
	assert_int_equal(row.pid, getpid());
	assert_int_equal(bw_ledger_worker_jobs(ro, "w1", &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(bw_ledger_worker_jobs(ro, "w2", &n), 0);
	assert_int_equal(n, 0);
	bw_ledger_close(ro);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_files_are_private_and_reopen_is_idempotent,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_worker_id_held_once, setup, teardown),
		cmocka_unit_test_setup_teardown(test_claim_once, setup, teardown),
		cmocka_unit_test_setup_teardown(test_transition_seq_and_fence, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reserve_all_or_nothing_rotating, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_reserve_and_move_is_one_transaction, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_quarantine, setup, teardown),
		cmocka_unit_test_setup_teardown(test_disk_port_follows_its_reservation, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_port_counts, setup, teardown),
		cmocka_unit_test_setup_teardown(test_busy_stats, setup, teardown),
		cmocka_unit_test_setup_teardown(test_outbox, setup, teardown),
		cmocka_unit_test_setup_teardown(test_wal_is_cut_back_after_a_long_reader, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_readonly_views, setup, teardown),
		cmocka_unit_test_setup_teardown(test_worker_row_and_owned_jobs, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
