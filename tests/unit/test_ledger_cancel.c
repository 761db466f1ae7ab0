/* test_ledger_cancel.c: the ledger's memory of backup.cancel (CONTRACT §2.1): remember, take at claim, expiry, known jobs, the migration from v1 (through retention's v2 to v3). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ledger.h"
#include "ledger_views.h"

struct fixture {
	char dir[64];
	char path[PATH_MAX];
	struct bw_ledger *l;
};

static int setup(void **state)
{
	struct fixture *fx = calloc(1, sizeof(*fx));
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/bw-test-cancel-XXXXXX");
	if (mkdtemp(fx->dir) == NULL)
		return -1;
	snprintf(fx->path, sizeof(fx->path), "%s/ledger.db", fx->dir);
	if (bw_ledger_open(&fx->l, fx->path, 10100, 10104) != 0 ||
	    bw_ledger_register(fx->l, "w1", fx->dir) != 0)
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

/* Runs sql on the ledger file through a second handle (what no API may do). */
static void sql(const struct fixture *fx, const char *text)
{
	sqlite3 *db;
	assert_int_equal(sqlite3_open(fx->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, text, NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
}

static int64_t sql_int(const struct fixture *fx, const char *text)
{
	sqlite3 *db;
	sqlite3_stmt *s;
	assert_int_equal(sqlite3_open(fx->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, text, -1, &s, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	int64_t v = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	sqlite3_close(db);
	return v;
}

static const struct bw_job_disk_new disks[2] = {{2000, "e-2000", "/r/2000.qcow2"},
						 {2001, "e-2001", "/r/2001.qcow2"}};

static int claim(struct bw_ledger *l, const char *job)
{
	char id[160];
	snprintf(id, sizeof(id), "%s/backup.accepted", job);
	struct bw_event accepted = {id, "backup.accepted", 1, "{}"};
	int64_t gen = 0;
	return bw_ledger_claim(l, job, "{}", disks, 2, &accepted, &gen, NULL);
}

static int claim_cancelled(struct bw_ledger *l, const char *job)
{
	char id[3][160];
	snprintf(id[0], sizeof(id[0]), "%s/backup.accepted", job);
	snprintf(id[1], sizeof(id[1]), "%s/backup.failed", job);
	snprintf(id[2], sizeof(id[2]), "%s/backup.cleanup", job);
	struct bw_event ev[3] = {{id[0], "backup.accepted", 1, "{}"},
				 {id[1], "backup.failed", 2, "{}"},
				 {id[2], "backup.cleanup", 3, "{}"}};
	return bw_ledger_claim_cancelled(l, job, "{}", disks, 2, ev, NULL);
}

static const char *job_state(struct bw_ledger *l, const char *job, char *buf, size_t size)
{
	struct json_object *o = NULL, *v;
	if (bw_ledger_show_job(l, job, &o) != 0)
		return NULL;
	assert_true(json_object_object_get_ex(o, "state", &v));
	snprintf(buf, size, "%s", json_object_get_string(v));
	json_object_put(o);
	return buf;
}

static void test_remembered_then_taken_at_claim(void **state)
{
	struct fixture *fx = *state;
	struct bw_cancel_record r;
	char reason[64], st[32];
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-a", "window closed", 60, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_REMEMBERED);
	/* the same cancel again (every worker of the host gets it): the first reason stays */
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-a", "another", 120, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_REMEMBERED);
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-a", reason, sizeof(reason)), 0);
	assert_string_equal(reason, "window closed");
	assert_true(sql_int(fx, "SELECT until_ms - received_at_ms FROM cancels") >= 119000);

	/* an ordinary claim writes nothing and says why */
	assert_int_equal(claim(fx->l, "job-a"), BW_ECANCELREC);
	assert_null(job_state(fx->l, "job-a", st, sizeof(st)));
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM outbox"), 0);

	/* claimed and ended in one transaction; the row is taken */
	assert_int_equal(claim_cancelled(fx->l, "job-a"), 0);
	assert_string_equal(job_state(fx->l, "job-a", st, sizeof(st)), "compensated");
	assert_int_equal(sql_int(fx, "SELECT seq FROM jobs WHERE job_id = 'job-a'"), 3);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM outbox WHERE job_id = 'job-a'"), 3);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM job_history WHERE job_id = 'job-a'"), 3);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM ports"), 0);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM cancels"), 0);
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-a", reason, sizeof(reason)), BW_ENOENT);

	/* the start again: a duplicate; a cancel now: the job ended, nothing written */
	assert_int_equal(claim(fx->l, "job-a"), BW_EEXIST);
	assert_int_equal(claim_cancelled(fx->l, "job-a"), BW_EEXIST);
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-a", "late", 60, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_ENDED);
	assert_int_equal(r.state, BW_JOB_COMPENSATED);
	assert_string_equal(r.owner, "w1");
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM cancels"), 0);
}

static void test_expiry(void **state)
{
	struct fixture *fx = *state;
	struct bw_cancel_record r;
	char reason[64];
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-x", "", 60, &r), 0);
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-y", "keep", 60, &r), 0);
	sql(fx, "UPDATE cancels SET until_ms = received_at_ms WHERE job_id = 'job-x'");
	/* expired: not seen, not taken at claim (claim_cancelled changes nothing) */
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-x", reason, sizeof(reason)), BW_ENOENT);
	assert_int_equal(claim_cancelled(fx->l, "job-x"), BW_ENOENT);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM jobs"), 0);
	assert_int_equal(bw_ledger_maintain(fx->l), 0);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM cancels"), 1); /* job-y stays */
	assert_int_equal(claim(fx->l, "job-x"), 0);
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-y", reason, sizeof(reason)), 0);
	assert_string_equal(reason, "keep");

	/* job.cancel_memory_s = 0: an unknown job_id is not remembered */
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-z", "r", 0, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_NOT_KEPT);
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-z", reason, sizeof(reason)), BW_ENOENT);
	assert_int_equal(claim(fx->l, "job-z"), 0);
}

static void test_known_job_recorded_for_its_owner(void **state)
{
	struct fixture *fx = *state;
	struct bw_cancel_record r;
	char reason[64];
	assert_int_equal(claim(fx->l, "job-k"), 0);
	struct bw_fence f = {"job-k", 1};
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_TRANSFERRING, NULL, NULL, 0), 0);
	/* even with memory 0: the owner (or its adopter) must see it */
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-k", "stop it", 0, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_KNOWN);
	assert_int_equal(r.state, BW_JOB_TRANSFERRING);
	assert_string_equal(r.owner, "w1");
	/* its expiry has passed, but the job is unfinished: seen and kept */
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-k", reason, sizeof(reason)), 0);
	assert_string_equal(reason, "stop it");
	assert_int_equal(bw_ledger_maintain(fx->l), 0);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM cancels"), 1);
	/* once the job is finished, the expired row goes */
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_FAILED, "cancelled", NULL, 0), 0);
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-k", reason, sizeof(reason)), 0);
	assert_int_equal(bw_ledger_transition(fx->l, &f, BW_JOB_COMPENSATED, NULL, NULL, 0), 0);
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-k", reason, sizeof(reason)), BW_ENOENT);
	assert_int_equal(bw_ledger_maintain(fx->l), 0);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM cancels"), 0);
}

/* Two handles of one host: what a second worker process sees. */
static void test_other_worker_of_the_host(void **state)
{
	struct fixture *fx = *state;
	struct bw_ledger *b = NULL;
	struct bw_cancel_record r;
	assert_int_equal(bw_ledger_open(&b, fx->path, 10100, 10104), 0);
	assert_int_equal(bw_ledger_register(b, "w2", fx->dir), 0);
	/* w2 remembers it before w1's claim: w1's claim sees it */
	assert_int_equal(bw_ledger_cancel_record(b, "job-r1", "x", 60, &r), 0);
	assert_int_equal(claim(fx->l, "job-r1"), BW_ECANCELREC);
	assert_int_equal(claim_cancelled(fx->l, "job-r1"), 0);
	/* w1 claims first: w2 records it for w1 */
	assert_int_equal(claim(fx->l, "job-r2"), 0);
	assert_int_equal(bw_ledger_cancel_record(b, "job-r2", "y", 60, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_KNOWN);
	char reason[16];
	assert_int_equal(bw_ledger_cancel_get(fx->l, "job-r2", reason, sizeof(reason)), 0);
	assert_string_equal(reason, "y");
	assert_int_equal(bw_ledger_unregister(b), 0);
	bw_ledger_close(b);
}

static void test_migration_from_v1(void **state)
{
	struct fixture *fx = *state;
	struct bw_cancel_record r;
	assert_int_equal(claim(fx->l, "job-old"), 0);
	bw_ledger_close(fx->l);
	fx->l = NULL;
	/* a version 1 ledger: neither retention's tombstones (v2) nor the cancels (v3) */
	sql(fx, "DROP TABLE cancels; DROP TABLE job_tombstones; DROP INDEX jobs_finished;"
		" PRAGMA user_version = 1");
	assert_int_equal(bw_ledger_open(&fx->l, fx->path, 10100, 10104), 0);
	assert_int_equal(sql_int(fx, "PRAGMA user_version"), 3);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM sqlite_master WHERE name IN"
				     " ('cancels', 'job_tombstones', 'jobs_finished')"),
			 3);
	assert_int_equal(sql_int(fx, "SELECT count(*) FROM jobs WHERE job_id = 'job-old'"), 1);
	assert_int_equal(bw_ledger_register(fx->l, "w1", fx->dir), 0);
	assert_int_equal(bw_ledger_cancel_record(fx->l, "job-new", "", 60, &r), 0);
	assert_int_equal(r.outcome, BW_CANCEL_REMEMBERED);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_remembered_then_taken_at_claim, setup, teardown),
		cmocka_unit_test_setup_teardown(test_expiry, setup, teardown),
		cmocka_unit_test_setup_teardown(test_known_job_recorded_for_its_owner, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_other_worker_of_the_host, setup, teardown),
		cmocka_unit_test_setup_teardown(test_migration_from_v1, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
