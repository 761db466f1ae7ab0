/* test_retention.c: the ledger's retention pass (bw_ledger_prune) on a real SQLite file, days moved by its now. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "gate.h"
#include "ledger.h"
#include "nbd.h"

#define DAY_MS INT64_C(86400000)
#define RETENTION_DAYS 14
/* A pass that meets a busy lock must give up in about BW_PRUNE_LOCK_WAIT_MS, never in the
 * seconds an ordinary write waits (2 s, retried 5 times): far below the one, far above the
 * other. */
#define SKIP_BOUND_MS 1000

struct fixture {
	char dir[64];
	char path[PATH_MAX];
	struct bw_ledger *l;
	sqlite3 *db; /* a raw connection to look at rows and move times back */
};

static int setup(void **state)
{
	struct fixture *fx = calloc(1, sizeof(*fx));
	char logs[PATH_MAX];
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/bw-test-retention-XXXXXX");
	if (mkdtemp(fx->dir) == NULL)
		return -1;
	snprintf(fx->path, sizeof(fx->path), "%s/ledger.db", fx->dir);
	snprintf(logs, sizeof(logs), "%s/logs", fx->dir);
	if (mkdir(logs, 0750) != 0)
		return -1;
	if (bw_ledger_open(&fx->l, fx->path, 10100, 10109) != 0 ||
	    bw_ledger_register(fx->l, "w1", fx->dir) != 0)
		return -1;
	if (sqlite3_open(fx->path, &fx->db) != SQLITE_OK)
		return -1;
	sqlite3_busy_timeout(fx->db, 5000);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *fx = *state;
	char cmd[PATH_MAX + 16];
	sqlite3_close(fx->db);
	bw_ledger_close(fx->l);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->dir);
	if (system(cmd) != 0)
		return -1;
	free(fx);
	return 0;
}

/* Runs one SQL statement with job as ?1 on the raw connection; returns the first column. */
static int64_t sql(struct fixture *fx, const char *text, const char *job)
{
	sqlite3_stmt *s = NULL;
	assert_int_equal(sqlite3_prepare_v2(fx->db, text, -1, &s, NULL), SQLITE_OK);
	if (job)
		sqlite3_bind_text(s, 1, job, -1, SQLITE_STATIC);
	int rc = sqlite3_step(s);
	assert_true(rc == SQLITE_ROW || rc == SQLITE_DONE);
	int64_t v = rc == SQLITE_ROW ? sqlite3_column_int64(s, 0) : 0;
	sqlite3_finalize(s);
	return v;
}

/* How many rows of the job are left in each of its tables, summed. */
static int64_t job_rows(struct fixture *fx, const char *job)
{
	return sql(fx,
		   "SELECT (SELECT count(*) FROM jobs WHERE job_id = ?1)"
		   " + (SELECT count(*) FROM job_history WHERE job_id = ?1)"
		   " + (SELECT count(*) FROM job_disks WHERE job_id = ?1)"
		   " + (SELECT count(*) FROM outbox WHERE job_id = ?1)",
		   job);
}

/* Moves the job's last change (when it finished) days back. */
static void age(struct fixture *fx, const char *job, int days)
{
	char text[160];
	snprintf(text, sizeof(text),
		 "UPDATE jobs SET updated_at = updated_at - %" PRId64 " WHERE job_id = ?1",
		 (int64_t)days * DAY_MS);
	sql(fx, text, job);
}

/* Marks every unpublished event published, as the relay does on the broker's confirm. */
static void publish_all(struct bw_ledger *l)
{
	struct bw_outbox_row *rows = NULL;
	size_t n = 0;
	assert_int_equal(bw_ledger_outbox_next(l, 0, 1000, &rows, &n), 0);
	int64_t *ids = calloc(n + 1, sizeof(*ids));
	for (size_t i = 0; i < n; i++)
		ids[i] = rows[i].id;
	assert_int_equal(bw_ledger_outbox_published(l, ids, n), 0);
	free(ids);
	bw_outbox_free(rows, n);
}

/* Claims job with n disks keyed 2000..; its message is body. Returns its fence generation. */
static int64_t claim(struct bw_ledger *l, const char *job, size_t n, const char *body)
{
	struct bw_job_disk_new disks[8];
	char event_id[160];
	snprintf(event_id, sizeof(event_id), "%s/backup.accepted", job);
	for (size_t i = 0; i < n; i++)
		disks[i] = (struct bw_job_disk_new){(int64_t)(2000 + i), "export", "/repo/x.qcow2"};
	struct bw_event accepted = {event_id, "backup.accepted", 1, "{}"};
	int64_t gen = 0;
	assert_int_equal(bw_ledger_claim(l, job, body, disks, n, &accepted, &gen, NULL), 0);
	return gen;
}

enum end { END_RUNNING, END_COMPLETED, END_FAILED, END_COMPENSATED };

/* A job with n disks that went as far as end, with its events (seq 2, 3). */
static void job(struct bw_ledger *l, const char *id, size_t n, enum end end)
{
	struct bw_fence f = {id, claim(l, id, n, "{\"m\":1}")};
	char e1[160], e2[160];
	if (end == END_RUNNING) {
		assert_int_equal(bw_ledger_transition(l, &f, BW_JOB_TRANSFERRING, NULL, NULL, 0),
				 0);
		return;
	}
	if (end == END_COMPLETED) {
		snprintf(e1, sizeof(e1), "%s/backup.completed", id);
		struct bw_event ev = {e1, "backup.completed", 2, "{}"};
		assert_int_equal(bw_ledger_transition(l, &f, BW_JOB_COMPLETED, NULL, &ev, 1), 0);
		return;
	}
	snprintf(e1, sizeof(e1), "%s/backup.failed", id);
	struct bw_event failed = {e1, "backup.failed", 2, "{}"};
	assert_int_equal(bw_ledger_transition(l, &f, BW_JOB_FAILED, "x", &failed, 1), 0);
	if (end == END_COMPENSATED) {
		snprintf(e2, sizeof(e2), "%s/backup.cleanup", id);
		struct bw_event cleanup = {e2, "backup.cleanup", 3, "{}"};
		assert_int_equal(bw_ledger_transition(l, &f, BW_JOB_COMPENSATED, NULL, &cleanup, 1),
				 0);
	}
}

/* Creates the job's disk log and check log for disk key, as the worker names them. */
static void make_logs(struct fixture *fx, const char *id, int64_t key)
{
	char path[PATH_MAX], check[PATH_MAX + 8];
	assert_int_equal(bw_nbd_log_path(path, sizeof(path), fx->dir, id, key), 0);
	snprintf(check, sizeof(check), "%s" BW_NBD_CHECK_LOG_SUFFIX, path);
	for (int i = 0; i < 2; i++) {
		int fd = open(i ? check : path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		assert_true(fd >= 0);
		assert_int_equal(write(fd, "qemu-nbd: x\n", 12), 12);
		close(fd);
	}
}

static bool log_exists(struct fixture *fx, const char *id, int64_t key)
{
	char path[PATH_MAX];
	assert_int_equal(bw_nbd_log_path(path, sizeof(path), fx->dir, id, key), 0);
	return access(path, F_OK) == 0;
}

static int prune(struct fixture *fx, int64_t now, size_t batch, size_t max,
		 struct bw_prune_stats *st)
{
	struct bw_prune p = {now, RETENTION_DAYS, fx->dir, batch, max};
	return bw_ledger_prune(fx->l, &p, st);
}

static void test_prunes_old_finished_jobs_only(void **state)
{
	struct fixture *fx = *state;
	struct bw_prune_stats st;
	int64_t now = bw_clock_wall_ms();

	job(fx->l, "old-completed", 2, END_COMPLETED);
	job(fx->l, "old-compensated", 3, END_COMPENSATED);
	job(fx->l, "recent-completed", 1, END_COMPLETED);
	job(fx->l, "old-running", 1, END_RUNNING);
	job(fx->l, "old-failed", 1, END_FAILED); /* still owes its compensation */
	job(fx->l, "old-holds-port", 1, END_COMPLETED);
	struct bw_event rejected = {"rejected/0123456789abcdef", "backup.rejected", 0, "{}"};
	assert_int_equal(bw_ledger_outbox_append(fx->l, &rejected), 0);
	publish_all(fx->l);
	job(fx->l, "old-unpublished", 1, END_COMPLETED); /* its backup.completed not confirmed */
	struct bw_event fresh_reject = {"rejected/fedcba9876543210", "backup.rejected", 0, "{}"};
	assert_int_equal(bw_ledger_outbox_append(fx->l, &fresh_reject), 0);

	/* a port still reserved by an old finished job, a quarantined one of another job */
	struct bw_fence holder = {"old-holds-port", 1};
	int64_t key = 2000;
	int port = 0, repl = 0;
	assert_int_equal(bw_ledger_reserve(fx->l, &holder, &key, 1, &port), 0);
	struct bw_fence q = {"old-running", 1};
	assert_int_equal(bw_ledger_reserve(fx->l, &q, &key, 1, &port), 0);
	assert_int_equal(bw_ledger_quarantine(fx->l, &q, port, 3600, &repl), 0);
	int64_t ports_before = sql(fx, "SELECT count(*) FROM ports", NULL);
	assert_int_equal(ports_before, 3); /* reserved, quarantined, its replacement */

	const char *old[] = {"old-completed", "old-compensated", "old-running",
			     "old-failed",    "old-holds-port",	 "old-unpublished"};
	for (size_t i = 0; i < sizeof(old) / sizeof(old[0]); i++)
		age(fx, old[i], RETENTION_DAYS + 1);
	age(fx, "recent-completed", RETENTION_DAYS - 1);
	sql(fx, "UPDATE outbox SET created_at = created_at - 15 * 86400000 WHERE job_id IS NULL",
	    NULL);
	make_logs(fx, "old-completed", 2001);
	make_logs(fx, "old-compensated", 2000);
	make_logs(fx, "old-compensated", 2002);
	make_logs(fx, "old-running", 2000);
	make_logs(fx, "old-failed", 2000);
	make_logs(fx, "recent-completed", 2000);

	int64_t kept_rows = job_rows(fx, "old-running") + job_rows(fx, "old-failed") +
			    job_rows(fx, "old-holds-port") + job_rows(fx, "old-unpublished") +
			    job_rows(fx, "recent-completed");
	assert_true(job_rows(fx, "old-compensated") >= 1 + 3 + 3 + 3);

	assert_int_equal(prune(fx, now, 0, 0, &st), 0);
	assert_int_equal(st.jobs, 2);
	assert_int_equal(st.files, 6);	/* 3 disks with a log and a check log each */
	assert_int_equal(st.events, 1); /* the old published rejection, not the unpublished */
	assert_int_equal(st.txns, 1);
	assert_false(st.more);
	assert_false(st.skipped);

	/* every row of the two old finished jobs is gone, and their logs */
	assert_int_equal(job_rows(fx, "old-completed"), 0);
	assert_int_equal(job_rows(fx, "old-compensated"), 0);
	assert_false(log_exists(fx, "old-completed", 2001));
	assert_false(log_exists(fx, "old-compensated", 2000));
	assert_false(log_exists(fx, "old-compensated", 2002));
	assert_int_equal(sql(fx, "SELECT count(*) FROM job_tombstones", NULL), 2);
	/* nothing else moved: running, failed, holding a port, unpublished, recent */
	assert_int_equal(job_rows(fx, "old-running") + job_rows(fx, "old-failed") +
			     job_rows(fx, "old-holds-port") + job_rows(fx, "old-unpublished") +
			     job_rows(fx, "recent-completed"),
			 kept_rows);
	assert_true(log_exists(fx, "old-running", 2000));
	assert_true(log_exists(fx, "old-failed", 2000));
	assert_true(log_exists(fx, "recent-completed", 2000));
	assert_int_equal(sql(fx, "SELECT count(*) FROM ports", NULL), ports_before);
	assert_int_equal(sql(fx, "SELECT count(*) FROM outbox WHERE job_id IS NULL", NULL), 1);

	/* a second pass at once finds nothing */
	assert_int_equal(prune(fx, now, 0, 0, &st), 0);
	assert_int_equal(st.jobs + st.events + st.tombstones + st.txns, 0);

	/* once published, released, compensated, each goes in its turn */
	publish_all(fx->l);
	assert_int_equal(prune(fx, now, 0, 0, &st), 0);
	assert_int_equal(st.jobs, 1);
	assert_int_equal(job_rows(fx, "old-unpublished"), 0);
	struct bw_fence f = {"old-failed", 1};
	struct bw_event cleanup = {"old-failed/backup.cleanup", "backup.cleanup", 3, "{}"};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_COMPENSATED, NULL, &cleanup, 1), 0);
	publish_all(fx->l);
	/* compensated just now: its retention starts at its end */
	assert_int_equal(prune(fx, now, 0, 0, &st), 0);
	assert_int_equal(st.jobs, 0);
	assert_int_equal(prune(fx, now + (RETENTION_DAYS + 1) * DAY_MS, 0, 0, &st), 0);
	assert_true(job_rows(fx, "old-failed") == 0 && !log_exists(fx, "old-failed", 2000));
	assert_int_equal(job_rows(fx, "recent-completed"), 0);
	assert_true(job_rows(fx, "old-running") > 0 && job_rows(fx, "old-holds-port") > 0);

	struct bw_prune bad = {now, 0, NULL, 0, 0};
	assert_int_equal(bw_ledger_prune(fx->l, &bad, &st), BW_EINVAL);
	bad.retention_days = 36501;
	assert_int_equal(bw_ledger_prune(fx->l, &bad, &st), BW_EINVAL);
}

static void test_batches_are_bounded(void **state)
{
	struct fixture *fx = *state;
	struct bw_prune_stats st;
	char id[32];
	for (int i = 0; i < 10; i++) {
		snprintf(id, sizeof(id), "job-%02d", i);
		job(fx->l, id, 1, i % 2 ? END_COMPLETED : END_COMPENSATED);
	}
	publish_all(fx->l);
	int64_t later = bw_clock_wall_ms() + (RETENTION_DAYS + 1) * DAY_MS;

	/* 3 jobs a transaction, 7 a pass: 3 + 3 + 1, and the pass says more is due */
	assert_int_equal(prune(fx, later, 3, 7, &st), 0);
	assert_int_equal(st.jobs, 7);
	assert_int_equal(st.txns, 3);
	assert_true(st.more);
	assert_true(st.lock_max_us > 0 && st.lock_max_us < 1000000);
	assert_int_equal(sql(fx, "SELECT count(*) FROM jobs", NULL), 3);
	/* oldest first: the first seven claimed are gone */
	assert_int_equal(job_rows(fx, "job-06"), 0);
	assert_true(job_rows(fx, "job-07") > 0);

	assert_int_equal(prune(fx, later, 3, 7, &st), 0);
	assert_int_equal(st.jobs, 3);
	assert_int_equal(st.txns, 1);
	assert_false(st.more);
	assert_int_equal(prune(fx, later, 3, 7, &st), 0);
	assert_int_equal(st.txns, 0); /* nothing due: no write at all */
	assert_int_equal(sql(fx, "SELECT count(*) FROM job_tombstones", NULL), 10);
	assert_int_equal(sql(fx, "SELECT count(*) FROM job_history", NULL), 0);
	assert_int_equal(sql(fx, "SELECT count(*) FROM job_disks", NULL), 0);
	assert_int_equal(sql(fx, "SELECT count(*) FROM outbox", NULL), 0);
}

/*
 * CONTRACT §2: a second message with a known job_id never starts a second backup. A pruned
 * job's tombstone keeps its id known for BW_PRUNE_TOMBSTONE_FACTOR retention periods after
 * it finished; after that the ledger has forgotten it (the window retention bounds).
 */
static void test_pruned_job_id_stays_known_for_a_while(void **state)
{
	struct fixture *fx = *state;
	struct bw_prune_stats st;
	const char *body = "{\"job\":\"once\"}";
	struct bw_fence f = {"once", claim(fx->l, "once", 1, body)};
	struct bw_event done = {"once/backup.completed", "backup.completed", 2, "{}"};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_COMPLETED, NULL, &done, 1), 0);
	publish_all(fx->l);
	int64_t finished = sql(fx, "SELECT updated_at FROM jobs WHERE job_id = ?1", "once");
	assert_int_equal(prune(fx, finished + RETENTION_DAYS * DAY_MS + 1, 0, 0, &st), 0);
	assert_int_equal(st.jobs, 1);
	assert_int_equal(job_rows(fx, "once"), 0);

	struct bw_event accepted = {"once/backup.accepted", "backup.accepted", 1, "{}"};
	struct bw_known existing = {BW_JOB_CLAIMED, false};
	int64_t gen = 0;
	assert_int_equal(bw_ledger_claim(fx->l, "once", body, NULL, 0, &accepted, &gen, &existing),
			 BW_EEXIST);
	assert_int_equal(existing.state, BW_JOB_COMPLETED);
	assert_true(existing.same_message);
	assert_int_equal(
	    bw_ledger_claim(fx->l, "once", "{\"other\":1}", NULL, 0, &accepted, &gen, &existing),
	    BW_EEXIST);
	assert_false(existing.same_message);
	assert_int_equal(job_rows(fx, "once"), 0); /* nothing claimed, no event */
	assert_int_equal(bw_ledger_republish_terminal(fx->l, "once"), 0);
	assert_int_equal(sql(fx, "SELECT count(*) FROM outbox", NULL), 0);

	/* still known just before the tombstone's end */
	int64_t forget = finished + BW_PRUNE_TOMBSTONE_FACTOR * RETENTION_DAYS * DAY_MS;
	assert_int_equal(prune(fx, forget, 0, 0, &st), 0);
	assert_int_equal(st.tombstones, 0);
	assert_int_equal(bw_ledger_claim(fx->l, "once", body, NULL, 0, &accepted, &gen, &existing),
			 BW_EEXIST);
	/* then forgotten: the same job_id is a new job */
	assert_int_equal(prune(fx, forget + 1, 0, 0, &st), 0);
	assert_int_equal(st.tombstones, 1);
	assert_int_equal(st.txns, 1);
	assert_int_equal(bw_ledger_claim(fx->l, "once", body, NULL, 0, &accepted, &gen, &existing),
			 0);
}

/* A child that holds the write lock (SQLite's, or the writers' gate) until told to stop. */
struct holder {
	pid_t pid;
	int release_fd; /* closing it lets the child go */
};

static struct holder hold_lock(struct fixture *fx, bool gate)
{
	int ready[2], release[2];
	assert_int_equal(pipe(ready), 0);
	assert_int_equal(pipe(release), 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		char c = 0, gate_path[PATH_MAX + 8];
		struct bw_gate *g = NULL;
		sqlite3 *db = NULL;
		int ok;
		close(ready[0]);
		close(release[1]);
		if (gate) {
			snprintf(gate_path, sizeof(gate_path), "%s-gate", fx->path);
			ok = bw_gate_open(&g, gate_path) == 0 && bw_gate_lock(g, 1000, &c, 1) == 0;
		} else {
			ok = sqlite3_open(fx->path, &db) == SQLITE_OK &&
			     sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK;
		}
		if (!ok || write(ready[1], "r", 1) != 1)
			_exit(1);
		while (read(release[0], &c, 1) > 0)
			;
		if (gate)
			bw_gate_unlock(g);
		else
			sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
		_exit(0);
	}
	close(ready[1]);
	close(release[0]);
	char c;
	assert_int_equal(read(ready[0], &c, 1), 1);
	close(ready[0]);
	return (struct holder){pid, release[1]};
}

static void let_go(struct holder *h)
{
	int st;
	close(h->release_fd);
	assert_int_equal(waitpid(h->pid, &st, 0), h->pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static void test_busy_lock_skips_the_pass(void **state)
{
	struct fixture *fx = *state;
	struct bw_prune_stats st;
	job(fx->l, "old", 1, END_COMPLETED);
	publish_all(fx->l);
	int64_t later = bw_clock_wall_ms() + (RETENTION_DAYS + 1) * DAY_MS;

	for (int gate = 0; gate < 2; gate++) {
		struct holder h = hold_lock(fx, gate);
		int64_t t0 = bw_clock_mono_ms();
		assert_int_equal(prune(fx, later, 0, 0, &st), 0);
		int64_t took = bw_clock_mono_ms() - t0;
		assert_true(st.skipped);
		assert_int_equal(st.jobs, 0);
		assert_int_equal(st.txns, 0);
		assert_int_equal(st.lock_max_us, 0);
		assert_true(took < SKIP_BOUND_MS);
		if (gate)
			assert_true(took >= BW_PRUNE_LOCK_WAIT_MS - 5); /* it did wait, briefly */
		assert_true(job_rows(fx, "old") > 0);
		let_go(&h);
	}
	assert_int_equal(prune(fx, later, 0, 0, &st), 0);
	assert_false(st.skipped);
	assert_int_equal(st.jobs, 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_prunes_old_finished_jobs_only, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_batches_are_bounded, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_pruned_job_id_stays_known_for_a_while, setup,
					    teardown),
	    cmocka_unit_test_setup_teardown(test_busy_lock_skips_the_pass, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
