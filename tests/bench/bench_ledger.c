/* bench_ledger.c: ledger reserve+release cycles/s and latency next to a raw SQLite loop. */
#include "error.h"
#include "ledger.h"
#include "ledger_views.h"
#include "io.h"
#include "../testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/*
 * N children each run "reserve K ports, release them" back to back for S seconds against
 * one database file in DIR, and time every cycle. Two modes share everything but the code
 * under test: --mode ledger goes through bw_ledger_reserve/bw_ledger_release_all on
 * DIR/ledger.db; --mode raw runs the same two-transaction shape with bare sqlite3 calls on
 * DIR/raw.db (WAL, synchronous=FULL, busy_timeout 5000), the floor the ledger is held to.
 *
 * A cycle is counted only when both halves succeeded; a half that fails with BUSY (it
 * escaped the ledger's own retries, or the raw busy_timeout) is counted as an escaped BUSY
 * and retried, and the wait stays inside that cycle's latency. Any other error is counted,
 * its first text kept, and ends that child's loop after MAX_ERRORS.
 *
 * Two cheap cross-checks ride along: a shared map from port to holder, set when a reserve
 * returns and cleared just before the release starts, counts a port handed to a second child
 * while the first still holds it (an overlap; the window is short, the schema's keys are the
 * real guard); and after the run the parent counts the reservations left behind (every
 * child released all it held).
 *
 * Children are forked, not exec'd: they run the measured loop in this same image. No SQLite
 * handle is open across fork (the parent creates the schema and closes it first). Each child
 * writes its figures and every latency sample to DIR/child-<i>.res; the parent prints one
 * line of key=value pairs (scripts/bench-ledger reads it). Exit 0 when every child ran
 * without a non-BUSY error, no overlap and nothing left reserved; 1 otherwise; 2 usage.
 */

enum {
	PORT_MIN = 30000,
	PORT_MAX = 30100,
	N_PORTS = PORT_MAX - PORT_MIN + 1,
	MAX_PROCS = 64,
	MAX_DISKS = 16,
	MAX_ERRORS = 100,
	RAW_BUSY_TIMEOUT_MS = 5000,
	RESULT_MAGIC = 0x62776c62, /* "bwlb" */
};

enum mode { MODE_LEDGER, MODE_RAW, MODE_RAW_FAIR };

struct opts {
	enum mode mode;
	int procs;
	double seconds;
	int disks;
	const char *dir;
};

/* What one child reports, followed in its file by n_samples uint64_t cycle times in ns. */
struct child_result {
	uint32_t magic;
	int32_t setup_ok;
	uint64_t cycles;
	uint64_t busy;
	uint64_t errors;
	uint64_t overlaps;
	uint64_t n_samples;
	double elapsed_s;
	char first_error[256];
};

/* One child's state while it runs. */
struct child {
	int index;
	const struct opts *o;
	_Atomic int *holder; /* shared: port - PORT_MIN -> child index + 1, 0 free */
	struct child_result res;
	uint64_t *samples;
	size_t cap;
	int held[MAX_DISKS];
	int n_held;
	/* ledger mode */
	struct bw_ledger *ledger;
	char job_id[64];
	int64_t generation;
	/* raw mode */
	sqlite3 *db;
	sqlite3_stmt *begin, *commit, *rollback, *select_free, *insert, *delete_job;
	int gate; /* raw-fair: a blocking flock around each transaction, else -1 */
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void child_error(struct child *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void child_error(struct child *c, const char *fmt, ...)
{
	c->res.errors++;
	if (c->res.first_error[0] != '\0')
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->res.first_error, sizeof(c->res.first_error), fmt, ap);
	va_end(ap);
}

static int add_sample(struct child *c, uint64_t ns)
{
	if (c->res.n_samples == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 16384;
		uint64_t *p = realloc(c->samples, cap * sizeof(*p));
		if (p == NULL)
			return -1;
		c->samples = p;
		c->cap = cap;
	}
	c->samples[c->res.n_samples++] = ns;
	return 0;
}

/* Records the ports just reserved as held by this child; counts any already held by another. */
static void hold_ports(struct child *c, const int *ports, int n)
{
	c->n_held = 0;
	for (int i = 0; i < n; i++) {
		if (ports[i] < PORT_MIN || ports[i] > PORT_MAX) {
			child_error(c, "reserve returned port %d outside [%d, %d]", ports[i],
				    PORT_MIN, PORT_MAX);
			continue;
		}
		int expected = 0;
		if (!atomic_compare_exchange_strong(&c->holder[ports[i] - PORT_MIN], &expected,
						    c->index + 1)) {
			c->res.overlaps++;
			if (c->res.first_error[0] == '\0')
				snprintf(c->res.first_error, sizeof(c->res.first_error),
					 "port %d reserved by child %d while child %d holds it",
					 ports[i], c->index, expected - 1);
			continue;
		}
		c->held[c->n_held++] = ports[i];
	}
}

/* Forgets the held ports before they are released, so that no other child can see them
 * reserved in the database and still marked here. */
static void unhold_ports(struct child *c)
{
	for (int i = 0; i < c->n_held; i++) {
		int expected = c->index + 1;
		atomic_compare_exchange_strong(&c->holder[c->held[i] - PORT_MIN], &expected, 0);
	}
	c->n_held = 0;
}

/* ---- ledger mode ------------------------------------------------------------------------ */

static int ledger_path(char *buf, size_t size, const char *dir)
{
	int n = snprintf(buf, size, "%s/ledger.db", dir);
	return n < 0 || (size_t)n >= size ? -1 : 0;
}

static int ledger_setup(struct child *c)
{
	char path[4096], worker_id[32], event_id[96], message[128];
	char export_name[MAX_DISKS][32], qcow2[MAX_DISKS][64];
	struct bw_job_disk_new disks[MAX_DISKS];
	struct bw_known existing;
	int rc;

	if (ledger_path(path, sizeof(path), c->o->dir) != 0) {
		child_error(c, "path too long");
		return -1;
	}
	rc = bw_ledger_open(&c->ledger, path, PORT_MIN, PORT_MAX);
	if (rc != 0) {
		child_error(c, "bw_ledger_open: %s", bw_err_name(rc));
		return -1;
	}
	snprintf(worker_id, sizeof(worker_id), "bench-%d", c->index);
	rc = bw_ledger_register(c->ledger, worker_id, c->o->dir);
	if (rc != 0) {
		child_error(c, "bw_ledger_register: %s: %s", bw_err_name(rc),
			    bw_ledger_errmsg(c->ledger));
		return -1;
	}
	snprintf(c->job_id, sizeof(c->job_id), "bench-job-%d", c->index);
	for (int i = 0; i < c->o->disks; i++) {
		snprintf(export_name[i], sizeof(export_name[i]), "bench-%d-disk-%d", c->index, i);
		snprintf(qcow2[i], sizeof(qcow2[i]), "/nonexistent/bench-%d-disk-%d.qcow2",
			 c->index, i);
		disks[i] = (struct bw_job_disk_new){
		    .key = 2000 + i, .export_name = export_name[i], .qcow2_path = qcow2[i]};
	}
	snprintf(event_id, sizeof(event_id), "%s/backup.accepted", c->job_id);
	snprintf(message, sizeof(message), "{\"job_id\": \"%s\"}", c->job_id);
	struct bw_event accepted = {
	    .event_id = event_id, .routing_key = "backup.accepted", .seq = 1, .body = "{}"};
	rc = bw_ledger_claim(c->ledger, c->job_id, message, disks, (size_t)c->o->disks, &accepted,
			     &c->generation, &existing);
	if (rc != 0) {
		child_error(c, "bw_ledger_claim: %s: %s", bw_err_name(rc),
			    bw_ledger_errmsg(c->ledger));
		return -1;
	}
	return 0;
}

/* One reserve+release; returns 0, or -1 when the cycle failed with a non-BUSY error. */
static int ledger_cycle(struct child *c)
{
	struct bw_fence f = {.job_id = c->job_id, .generation = c->generation};
	int64_t keys[MAX_DISKS];
	int ports[MAX_DISKS];
	size_t released = 0;
	int rc;

	for (int i = 0; i < c->o->disks; i++)
		keys[i] = 2000 + i;
	while ((rc = bw_ledger_reserve(c->ledger, &f, keys, (size_t)c->o->disks, ports)) ==
	       BW_EBUSY)
		c->res.busy++;
	if (rc != 0) {
		child_error(c, "bw_ledger_reserve: %s: %s", bw_err_name(rc),
			    bw_ledger_errmsg(c->ledger));
		return -1;
	}
	hold_ports(c, ports, c->o->disks);
	unhold_ports(c);
	while ((rc = bw_ledger_release_all(c->ledger, &f, &released)) == BW_EBUSY)
		c->res.busy++;
	if (rc != 0) {
		child_error(c, "bw_ledger_release_all: %s: %s", bw_err_name(rc),
			    bw_ledger_errmsg(c->ledger));
		return -1;
	}
	if (released != (size_t)c->o->disks) {
		child_error(c, "bw_ledger_release_all released %zu of %d ports", released,
			    c->o->disks);
		return -1;
	}
	return 0;
}

static void ledger_teardown(struct child *c)
{
	bw_ledger_close(c->ledger);
	c->ledger = NULL;
}

/* ---- raw mode --------------------------------------------------------------------------- */

static const char raw_schema[] =
    "PRAGMA journal_mode=WAL;"
    "CREATE TABLE pool(port INTEGER PRIMARY KEY);"
    "CREATE TABLE reservations(port INTEGER PRIMARY KEY, job TEXT NOT NULL,"
    " disk INTEGER NOT NULL);";

static int raw_path(char *buf, size_t size, const char *dir)
{
	int n = snprintf(buf, size, "%s/raw.db", dir);
	return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* Creates DIR/raw.db with its pool (parent, before forking); says why not on stderr. */
static int raw_create(const char *dir)
{
	char path[4096], sql[64];
	sqlite3 *db = NULL;
	int rc = -1;

	if (raw_path(path, sizeof(path), dir) != 0) {
		fprintf(stderr, "bench_ledger: path too long\n");
		goto out;
	}
	if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
		SQLITE_OK ||
	    sqlite3_exec(db, raw_schema, NULL, NULL, NULL) != SQLITE_OK ||
	    sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
		goto sqlerr;
	for (int p = PORT_MIN; p <= PORT_MAX; p++) {
		snprintf(sql, sizeof(sql), "INSERT INTO pool VALUES(%d)", p);
		if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
			goto sqlerr;
	}
	if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
		goto sqlerr;
	rc = 0;
	goto out;
sqlerr:
	fprintf(stderr, "bench_ledger: %s: %s\n", path, db ? sqlite3_errmsg(db) : "out of memory");
out:
	sqlite3_close(db);
	return rc;
}

static int raw_prepare(struct child *c, sqlite3_stmt **st, const char *sql)
{
	if (sqlite3_prepare_v2(c->db, sql, -1, st, NULL) != SQLITE_OK) {
		child_error(c, "prepare %s: %s", sql, sqlite3_errmsg(c->db));
		return -1;
	}
	return 0;
}

static int raw_setup(struct child *c)
{
	char path[4096];

	if (raw_path(path, sizeof(path), c->o->dir) != 0) {
		child_error(c, "path too long");
		return -1;
	}
	snprintf(c->job_id, sizeof(c->job_id), "bench-job-%d", c->index);
	c->gate = -1;
	if (c->o->mode == MODE_RAW_FAIR) {
		char gp[4200];
		snprintf(gp, sizeof(gp), "%s.gate", path);
		c->gate = open(gp, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		if (c->gate < 0) {
			child_error(c, "open %s: %s", gp, strerror(errno));
			return -1;
		}
	}
	if (sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK ||
	    sqlite3_busy_timeout(c->db, RAW_BUSY_TIMEOUT_MS) != SQLITE_OK ||
	    sqlite3_exec(c->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", NULL, NULL,
			 NULL) != SQLITE_OK) {
		child_error(c, "open %s: %s", path,
			    c->db ? sqlite3_errmsg(c->db) : "out of memory");
		return -1;
	}
	if (raw_prepare(c, &c->begin, "BEGIN IMMEDIATE") != 0 ||
	    raw_prepare(c, &c->commit, "COMMIT") != 0 ||
	    raw_prepare(c, &c->rollback, "ROLLBACK") != 0 ||
	    raw_prepare(c, &c->select_free,
			"SELECT port FROM pool WHERE port NOT IN (SELECT port FROM reservations)"
			" ORDER BY port LIMIT ?1") != 0 ||
	    raw_prepare(c, &c->insert,
			"INSERT INTO reservations(port, job, disk) VALUES(?1, ?2, ?3)") != 0 ||
	    raw_prepare(c, &c->delete_job, "DELETE FROM reservations WHERE job = ?1") != 0)
		return -1;
	return 0;
}

/* Steps a statement that returns no row, then resets it; returns the step's code. */
static int raw_step_done(sqlite3_stmt *st)
{
	int rc = sqlite3_step(st);
	sqlite3_reset(st);
	return rc;
}

/* The result of one raw transaction attempt. */
enum raw_outcome { RAW_DONE, RAW_BUSY, RAW_ERROR };

static enum raw_outcome raw_fail(struct child *c, int rc, const char *what)
{
	if (!sqlite3_get_autocommit(c->db))
		raw_step_done(c->rollback);
	if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
		return RAW_BUSY;
	child_error(c, "raw %s: %s", what, sqlite3_errstr(rc));
	return RAW_ERROR;
}

static enum raw_outcome raw_reserve_txn(struct child *c, int *ports)
{
	int rc, n = 0;

	if ((rc = raw_step_done(c->begin)) != SQLITE_DONE)
		return raw_fail(c, rc, "BEGIN IMMEDIATE");
	sqlite3_bind_int(c->select_free, 1, c->o->disks);
	while ((rc = sqlite3_step(c->select_free)) == SQLITE_ROW)
		ports[n++] = sqlite3_column_int(c->select_free, 0);
	sqlite3_reset(c->select_free);
	if (rc != SQLITE_DONE)
		return raw_fail(c, rc, "SELECT");
	if (n < c->o->disks) {
		raw_step_done(c->rollback);
		child_error(c, "raw: only %d free ports", n);
		return RAW_ERROR;
	}
	for (int i = 0; i < n; i++) {
		sqlite3_bind_int(c->insert, 1, ports[i]);
		sqlite3_bind_text(c->insert, 2, c->job_id, -1, SQLITE_STATIC);
		sqlite3_bind_int(c->insert, 3, 2000 + i);
		if ((rc = raw_step_done(c->insert)) != SQLITE_DONE)
			return raw_fail(c, rc, "INSERT");
	}
	if ((rc = raw_step_done(c->commit)) != SQLITE_DONE)
		return raw_fail(c, rc, "COMMIT");
	return RAW_DONE;
}

static enum raw_outcome raw_release_txn(struct child *c)
{
	int rc;

	if ((rc = raw_step_done(c->begin)) != SQLITE_DONE)
		return raw_fail(c, rc, "BEGIN IMMEDIATE");
	sqlite3_bind_text(c->delete_job, 1, c->job_id, -1, SQLITE_STATIC);
	if ((rc = raw_step_done(c->delete_job)) != SQLITE_DONE)
		return raw_fail(c, rc, "DELETE");
	if (sqlite3_changes(c->db) != c->o->disks) {
		raw_step_done(c->rollback);
		child_error(c, "raw: released %d of %d ports", sqlite3_changes(c->db), c->o->disks);
		return RAW_ERROR;
	}
	if ((rc = raw_step_done(c->commit)) != SQLITE_DONE)
		return raw_fail(c, rc, "COMMIT");
	return RAW_DONE;
}

/* raw-fair: the same transactions behind a blocking flock, so waiters sleep and take turns
 * (the fair baseline for the ledger, whose writers queue on a gate too). */
static void gate(struct child *c, int op)
{
	if (c->gate >= 0)
		while (flock(c->gate, op) != 0 && errno == EINTR)
			;
}

static enum raw_outcome raw_reserve(struct child *c, int *ports)
{
	gate(c, LOCK_EX);
	enum raw_outcome r = raw_reserve_txn(c, ports);
	gate(c, LOCK_UN);
	return r;
}

static enum raw_outcome raw_release(struct child *c)
{
	gate(c, LOCK_EX);
	enum raw_outcome r = raw_release_txn(c);
	gate(c, LOCK_UN);
	return r;
}

static int raw_cycle(struct child *c)
{
	int ports[MAX_DISKS];
	enum raw_outcome r;

	while ((r = raw_reserve(c, ports)) == RAW_BUSY)
		c->res.busy++;
	if (r != RAW_DONE)
		return -1;
	hold_ports(c, ports, c->o->disks);
	unhold_ports(c);
	while ((r = raw_release(c)) == RAW_BUSY)
		c->res.busy++;
	return r == RAW_DONE ? 0 : -1;
}

static void raw_teardown(struct child *c)
{
	sqlite3_finalize(c->begin);
	sqlite3_finalize(c->commit);
	sqlite3_finalize(c->rollback);
	sqlite3_finalize(c->select_free);
	sqlite3_finalize(c->insert);
	sqlite3_finalize(c->delete_job);
	sqlite3_close(c->db);
	c->db = NULL;
}

/* ---- children --------------------------------------------------------------------------- */

static int result_path(char *buf, size_t size, const char *dir, int index)
{
	int n = snprintf(buf, size, "%s/child-%d.res", dir, index);
	return n < 0 || (size_t)n >= size ? -1 : 0;
}

static int write_result(const struct child *c)
{
	char path[4096];
	int fd, rc = -1;

	if (result_path(path, sizeof(path), c->o->dir, c->index) != 0)
		return -1;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	if (bw_write_all(fd, &c->res, sizeof(c->res)) == 0 &&
	    bw_write_all(fd, c->samples, c->res.n_samples * sizeof(uint64_t)) == 0)
		rc = 0;
	if (close(fd) != 0)
		rc = -1;
	return rc;
}

/*
 * The child's whole life: set up (not timed), say ready on ready_fd, wait for the start
 * (EOF on go_fd), run cycles until the deadline, write the result file. Returns the exit code.
 */
static int child_main(struct child *c, int ready_fd, int go_fd)
{
	char byte = 'r';
	int setup;

	c->res.magic = RESULT_MAGIC;
	setup = c->o->mode == MODE_LEDGER ? ledger_setup(c) : raw_setup(c);
	c->res.setup_ok = setup == 0;
	(void)bw_write_all(ready_fd, &byte, 1);
	close(ready_fd);
	while (read(go_fd, &byte, 1) < 0 && errno == EINTR)
		;
	close(go_fd);

	if (setup == 0) {
		uint64_t start = now_ns();
		uint64_t deadline = start + (uint64_t)(c->o->seconds * 1e9);
		uint64_t t = start;
		while (t < deadline && c->res.errors < MAX_ERRORS) {
			int rc = c->o->mode == MODE_LEDGER ? ledger_cycle(c) : raw_cycle(c);
			uint64_t end = now_ns();
			if (rc == 0) {
				c->res.cycles++;
				if (add_sample(c, end - t) != 0) {
					child_error(c, "out of memory for samples");
					break;
				}
			}
			t = end;
		}
		c->res.elapsed_s = (double)(t - start) / 1e9;
	}
	if (c->o->mode == MODE_LEDGER)
		ledger_teardown(c);
	else
		raw_teardown(c);
	if (write_result(c) != 0) {
		fprintf(stderr, "bench_ledger: child %d: cannot write its result\n", c->index);
		return 1;
	}
	return 0;
}

/* ---- the parent ------------------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples, in ms. */
static double percentile_ms(const uint64_t *sorted, size_t n, double q)
{
	if (n == 0)
		return 0;
	size_t rank = (size_t)(q * (double)n + 0.999999);
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return (double)sorted[rank - 1] / 1e6;
}

/* Reads one child's result file; appends its samples to *all. Returns 0 or -1. */
static int read_result(const char *dir, int index, struct child_result *res, uint64_t **all,
		       size_t *n_all)
{
	char path[4096];
	FILE *f = NULL;
	int rc = -1;

	if (result_path(path, sizeof(path), dir, index) != 0)
		goto out;
	f = fopen(path, "rbe");
	if (f == NULL || fread(res, sizeof(*res), 1, f) != 1 || res->magic != RESULT_MAGIC)
		goto out;
	res->first_error[sizeof(res->first_error) - 1] = '\0';
	uint64_t *p = realloc(*all, (*n_all + res->n_samples + 1) * sizeof(*p));
	if (p == NULL)
		goto out;
	*all = p;
	if (fread(*all + *n_all, sizeof(uint64_t), res->n_samples, f) != res->n_samples)
		goto out;
	*n_all += res->n_samples;
	rc = 0;
out:
	if (f)
		fclose(f);
	return rc;
}

/* Counts the reservations left in the database after the run; -1 when it cannot tell. */
static long leftover_reservations(const struct opts *o)
{
	char path[4096];
	long n = -1;

	if (o->mode == MODE_LEDGER) {
		struct bw_ledger *l = NULL;
		struct json_object *ports = NULL;
		if (ledger_path(path, sizeof(path), o->dir) == 0 &&
		    bw_ledger_open_readonly(&l, path) == 0 && bw_ledger_list_ports(l, &ports) == 0)
			n = (long)json_object_array_length(ports);
		json_object_put(ports);
		bw_ledger_close(l);
	} else {
		sqlite3 *db = NULL;
		sqlite3_stmt *st = NULL;
		if (raw_path(path, sizeof(path), o->dir) == 0 &&
		    sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
		    sqlite3_prepare_v2(db, "SELECT count(*) FROM reservations", -1, &st, NULL) ==
			SQLITE_OK &&
		    sqlite3_step(st) == SQLITE_ROW)
			n = sqlite3_column_int(st, 0);
		sqlite3_finalize(st);
		sqlite3_close(db);
	}
	return n;
}

/* Creates the database the children share, and closes it before any fork. */
static int create_database(const struct opts *o)
{
	char path[4096];

	if (o->mode != MODE_LEDGER)
		return raw_create(o->dir);
	struct bw_ledger *l = NULL;
	int rc = ledger_path(path, sizeof(path), o->dir) == 0
		     ? bw_ledger_open(&l, path, PORT_MIN, PORT_MAX)
		     : BW_EINVAL;
	bw_ledger_close(l);
	if (rc != 0) {
		fprintf(stderr, "bench_ledger: bw_ledger_open %s: %s\n", path, bw_err_name(rc));
		return -1;
	}
	return 0;
}

static void kill_children(const pid_t *pids, int n, int sig)
{
	for (int i = 0; i < n; i++)
		if (pids[i] > 0)
			kill(pids[i], sig);
}

/* Reaps every child; after the deadline (or a signal) TERM, then KILL after a grace. */
static int reap_children(pid_t *pids, int n, double deadline_s)
{
	uint64_t deadline = now_ns() + (uint64_t)(deadline_s * 1e9), killed_at = 0;
	int left = n, failed = 0;

	while (left > 0) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid > 0) {
			if (bw_test_child_reaped(pids, n, pid, status, stderr,
						 "bench_ledger: ", &failed) >= 0)
				left--;
			continue;
		}
		if (pid < 0 && errno != EINTR)
			break;
		uint64_t t = now_ns();
		if (killed_at == 0 && (stop_requested || t > deadline)) {
			if (!stop_requested)
				fprintf(stderr,
					"bench_ledger: children still running %.0f s after "
					"the end; stopping them\n",
					deadline_s);
			kill_children(pids, n, SIGTERM);
			killed_at = t;
		} else if (killed_at != 0 && t > killed_at + 2000000000u) {
			kill_children(pids, n, SIGKILL);
		}
		struct timespec ts = {0, 20 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	return failed || stop_requested ? -1 : 0;
}

static int run(const struct opts *o)
{
	pid_t pids[MAX_PROCS] = {0};
	int ready[2] = {-1, -1}, go[2] = {-1, -1};
	_Atomic int *holder = MAP_FAILED;
	struct child_result res;
	uint64_t *all = NULL, min_cycles = UINT64_MAX, max_cycles = 0, cycles = 0, busy = 0,
		 errors = 0, overlaps = 0;
	size_t n_all = 0;
	double rate = 0;
	char first_error[300] = "";
	int rc = 1, started = 0;

	if (create_database(o) != 0)
		goto out;
	holder = mmap(NULL, N_PORTS * sizeof(*holder), PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (holder == MAP_FAILED || pipe(ready) != 0 || pipe(go) != 0) {
		perror("bench_ledger: setup");
		goto out;
	}
	for (int i = 0; i < 2; i++) {
		fcntl(ready[i], F_SETFD, FD_CLOEXEC);
		fcntl(go[i], F_SETFD, FD_CLOEXEC);
	}
	for (int i = 0; i < N_PORTS; i++)
		atomic_init(&holder[i], 0);

	fflush(NULL);
	for (int i = 0; i < o->procs; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("bench_ledger: fork");
			stop_requested = 1;
			break;
		}
		if (pid == 0) {
			struct child c = {.index = i, .o = o, .holder = holder};
			signal(SIGINT, SIG_DFL);
			signal(SIGTERM, SIG_DFL);
			close(ready[0]);
			close(go[1]);
			_exit(child_main(&c, ready[1], go[0]));
		}
		pids[i] = pid;
		started++;
	}
	close(ready[1]);
	ready[1] = -1;
	close(go[0]);
	go[0] = -1;

	/* Every child is set up (or gave up) before the clock starts for all at once. */
	for (int got = 0; got < started && !stop_requested;) {
		char buf[MAX_PROCS];
		ssize_t r = read(ready[0], buf, sizeof(buf));
		if (r == 0)
			break;
		if (r > 0)
			got += (int)r;
		else if (errno != EINTR)
			break;
	}
	close(go[1]);
	go[1] = -1;
	if (reap_children(pids, o->procs, o->seconds + 60) != 0)
		goto out;

	for (int i = 0; i < o->procs; i++) {
		if (read_result(o->dir, i, &res, &all, &n_all) != 0) {
			fprintf(stderr, "bench_ledger: child %d left no readable result\n", i);
			goto out;
		}
		if (!res.setup_ok)
			fprintf(stderr, "bench_ledger: child %d: setup failed: %s\n", i,
				res.first_error);
		cycles += res.cycles;
		busy += res.busy;
		errors += res.errors;
		overlaps += res.overlaps;
		if (res.cycles < min_cycles)
			min_cycles = res.cycles;
		if (res.cycles > max_cycles)
			max_cycles = res.cycles;
		if (res.elapsed_s > 0)
			rate += (double)res.cycles / res.elapsed_s;
		if (first_error[0] == '\0' && res.first_error[0] != '\0')
			snprintf(first_error, sizeof(first_error), "child %d: %s", i,
				 res.first_error);
	}
	qsort(all, n_all, sizeof(*all), cmp_u64);
	long leftover = leftover_reservations(o);

	printf("bench_ledger mode=%s procs=%d disks=%d seconds=%g cycles=%llu cyc_s=%.1f "
	       "p50_ms=%.3f p99_ms=%.3f max_ms=%.3f min_cycles=%llu max_cycles=%llu busy=%llu "
	       "errors=%llu overlaps=%llu leftover=%ld\n",
	       o->mode == MODE_LEDGER ? "ledger" : o->mode == MODE_RAW ? "raw" : "raw-fair", o->procs, o->disks, o->seconds,
	       (unsigned long long)cycles, rate, percentile_ms(all, n_all, 0.50),
	       percentile_ms(all, n_all, 0.99), n_all ? (double)all[n_all - 1] / 1e6 : 0.0,
	       (unsigned long long)min_cycles, (unsigned long long)max_cycles,
	       (unsigned long long)busy, (unsigned long long)errors, (unsigned long long)overlaps,
	       leftover);
	if (first_error[0] != '\0')
		fprintf(stderr, "bench_ledger: first error: %s\n", first_error);
	rc = errors == 0 && overlaps == 0 && leftover == 0 ? 0 : 1;
out:
	kill_children(pids, o->procs, SIGKILL);
	for (int i = 0; i < o->procs; i++)
		if (pids[i] > 0)
			waitpid(pids[i], NULL, 0);
	for (int i = 0; i < 2; i++) {
		if (ready[i] >= 0)
			close(ready[i]);
		if (go[i] >= 0)
			close(go[i]);
	}
	if (holder != MAP_FAILED)
		munmap(holder, N_PORTS * sizeof(*holder));
	free(all);
	return rc;
}

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: bench_ledger --mode ledger|raw|raw-fair [--procs N] [--seconds S] [--disks K] DIR\n"
	    "\n"
	    "N processes (default 1, at most %d) reserve K ports (default 4, at most %d) and\n"
	    "release them, back to back, for S seconds (default 5), on DIR/ledger.db through\n"
	    "bw_ledger or on DIR/raw.db with bare SQLite. DIR must exist and be empty.\n"
	    "Prints one line of key=value figures. Exit 0 ok, 1 failed or incorrect, 2 usage.\n",
	    MAX_PROCS, MAX_DISKS);
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
	    {"mode", required_argument, NULL, 'm'},    {"procs", required_argument, NULL, 'p'},
	    {"seconds", required_argument, NULL, 's'}, {"disks", required_argument, NULL, 'k'},
	    {"help", no_argument, NULL, 'h'},	       {NULL, 0, NULL, 0},
	};
	struct opts o = {.mode = MODE_LEDGER, .procs = 1, .seconds = 5, .disks = 4};
	int mode_set = 0, ch;
	char *end;

	while ((ch = getopt_long(argc, argv, "m:p:s:k:h", longopts, NULL)) != -1) {
		switch (ch) {
		case 'm':
			if (strcmp(optarg, "ledger") != 0 && strcmp(optarg, "raw") != 0 &&
			    strcmp(optarg, "raw-fair") != 0)
				goto bad;
			o.mode = strcmp(optarg, "raw") == 0	       ? MODE_RAW
				 : strcmp(optarg, "raw-fair") == 0 ? MODE_RAW_FAIR
								   : MODE_LEDGER;
			mode_set = 1;
			break;
		case 'p':
			if (parse_int(optarg, 1, MAX_PROCS, &o.procs) != 0)
				goto bad;
			break;
		case 's':
			o.seconds = strtod(optarg, &end);
			if (end == optarg || *end != '\0' || !(o.seconds > 0 && o.seconds <= 3600))
				goto bad;
			break;
		case 'k':
			if (parse_int(optarg, 1, MAX_DISKS, &o.disks) != 0)
				goto bad;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			goto bad;
		}
	}
	if (!mode_set || optind != argc - 1)
		goto bad;
	o.dir = argv[optind];
	if (o.procs * o.disks > N_PORTS) {
		fprintf(stderr, "bench_ledger: %d processes x %d disks exceed the %d-port pool\n",
			o.procs, o.disks, N_PORTS);
		return 2;
	}

	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = {.sa_handler = on_signal};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	return run(&o);
bad:
	usage(stderr);
	return 2;
}
