/* crash.c: SIGKILLed workers: bw_ledger_reap takes exactly the dead ones' jobs and ports, once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "error.h"
#include "ledger.h"
#include "ledger_views.h"
#include "proc.h"

/*
 * Every worker here is a real process: a child forked by the test that opens the ledger
 * itself, registers (taking its flock), claims jobs and reserves ports, reports what it
 * got through a pipe and then waits for commands on another pipe (EOF: it leaves). The
 * test kills some of them with SIGKILL and reaps from its own registration.
 *
 * Children are forked only while the test holds no SQLite connection and no worker lock:
 * a forked child would otherwise inherit the test's flock (same open file description)
 * and SQLite's in-process lock bookkeeping, and a killed "worker" would look alive.
 */

#define PORT_MIN 30000
#define PORT_MAX 30099
#define MAX_KIDS 80
#define MAX_JOBS 8
#define MAX_DISKS 8
#define IO_TIMEOUT_MS 30000
#define ROUNDS 20
#define OTHER_BOOT_ID "00000000-0000-4000-8000-000000000000"

struct kid {
	pid_t pid;
	int cmd_w; /* test -> child: one command byte */
	int rep_r; /* child -> test: the report, then one int per command */
};

struct fixture {
	char dir[64];
	char db[128];
	struct bw_ledger *l; /* the test's own registration ("R") */
	struct kid kids[MAX_KIDS];
	int n_kids;
};

/* What a worker child does. */
struct worker_spec {
	const char *dir; /* the ledger and lock files are here */
	const char *worker_id;
	size_t n_jobs;
	const char *job_ids[MAX_JOBS];
	size_t n_disks;
};

/* What a worker child reports once it is set up. */
struct worker_report {
	int rc;	       /* 0, or the code of the failed step */
	char step[32]; /* the step that failed */
	pid_t pid;
	int ports[MAX_JOBS][MAX_DISKS];
};

/* What a reaper child of the exactly-once test reports. */
struct reap_report {
	int rc;
	int n;
	char job_ids[MAX_JOBS * 2][32];
	int64_t generation[MAX_JOBS * 2];
};

/* ---- plumbing --------------------------------------------------------------------------- */

static int read_full(int fd, void *buf, size_t n, int timeout_ms)
{
	char *p = buf;
	while (n > 0) {
		struct pollfd pfd = {fd, POLLIN, 0};
		int pr = poll(&pfd, 1, timeout_ms);
		if (pr == 0)
			return -ETIMEDOUT;
		if (pr < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		ssize_t got = read(fd, p, n);
		if (got == 0)
			return -EPIPE;
		if (got < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += got;
		n -= (size_t)got;
	}
	return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n > 0) {
		ssize_t put = write(fd, p, n);
		if (put < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += put;
		n -= (size_t)put;
	}
	return 0;
}

static void rm_tree(const char *path)
{
	char sub[4096];
	DIR *d = opendir(path);
	if (d == NULL) {
		unlink(path);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name);
		struct stat sb;
		if (lstat(sub, &sb) == 0 && S_ISDIR(sb.st_mode))
			rm_tree(sub);
		else
			unlink(sub);
	}
	closedir(d);
	rmdir(path);
}

/* Runs one SQL statement (sqlite3_mprintf format) straight on the ledger file. */
static int sql_exec(const char *db_path, const char *fmt, ...)
{
	sqlite3 *db = NULL;
	va_list ap;
	va_start(ap, fmt);
	char *sql = sqlite3_vmprintf(fmt, ap);
	va_end(ap);
	int src = sql ? sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL) : SQLITE_NOMEM;
	if (src == SQLITE_OK)
		src = sqlite3_busy_timeout(db, 10000);
	if (src == SQLITE_OK)
		src = sqlite3_exec(db, sql, NULL, NULL, NULL);
	if (src == SQLITE_OK && sqlite3_changes(db) != 1)
		src = SQLITE_NOTFOUND; /* every statement here changes exactly one row */
	if (src != SQLITE_OK)
		fprintf(stderr, "sql_exec: %s: %s\n", sql ? sql : "?",
			db ? sqlite3_errmsg(db) : "");
	sqlite3_free(sql);
	sqlite3_close(db);
	return src;
}

/* ---- the children ----------------------------------------------------------------------- */

static int fence_cmd(struct bw_ledger *l, const struct worker_spec *s,
		     const struct worker_report *rep, char cmd)
{
	struct bw_fence f = {s->job_ids[0], 1}; /* the generation this process was given */
	char event_id[64];
	size_t released;
	int replacement;
	snprintf(event_id, sizeof(event_id), "%s/backup.failed", s->job_ids[0]);
	struct bw_event ev = {event_id, "backup.failed", 2, "{}"};
	switch (cmd) {
	case 'T':
		return bw_ledger_transition(l, &f, BW_JOB_FAILED, "zombie", &ev, 1);
	case 'R':
		return bw_ledger_release(l, &f, rep->ports[0][0]);
	case 'A':
		return bw_ledger_release_all(l, &f, &released);
	case 'D':
		return bw_ledger_disk_update(l, &f, 2000, BW_DISK_ROW_COMPLETED, 4242, 4242, true);
	case 'Q':
		return bw_ledger_quarantine(l, &f, rep->ports[0][0], 60, &replacement);
	case 'H':
		return bw_ledger_heartbeat(l);
	default:
		return BW_EINVAL;
	}
}

/*
 * The worker child: open, register, claim each job (its disks keys 2000...), move it to
 * waiting_ports, reserve one port per disk, move it to reserved; report; then obey
 * commands until EOF. Never returns.
 */
static void worker_child(const struct worker_spec *s, int cmd_r, int rep_w)
{
	struct worker_report rep;
	struct bw_ledger *l = NULL;
	char db[256], ev_id[64], msg[64], exports[MAX_DISKS][32], paths[MAX_DISKS][64];
	struct bw_job_disk_new disks[MAX_DISKS];
	int64_t keys[MAX_DISKS], gen = 0;
	int rc;

	memset(&rep, 0, sizeof(rep));
	rep.pid = getpid();
	snprintf(db, sizeof(db), "%s/ledger.db", s->dir);
	snprintf(rep.step, sizeof(rep.step), "open");
	rc = bw_ledger_open(&l, db, PORT_MIN, PORT_MAX);
	if (rc == 0) {
		snprintf(rep.step, sizeof(rep.step), "register");
		rc = bw_ledger_register(l, s->worker_id, s->dir);
	}
	for (size_t j = 0; rc == 0 && j < s->n_jobs; j++) {
		const char *job = s->job_ids[j];
		for (size_t k = 0; k < s->n_disks; k++) {
			keys[k] = 2000 + (int64_t)k;
			snprintf(exports[k], sizeof(exports[k]), "%s-%zu", job, k);
			snprintf(paths[k], sizeof(paths[k]), "/nonexistent/%s/%zu.qcow2", job, k);
			disks[k] = (struct bw_job_disk_new){keys[k], exports[k], paths[k]};
		}
		snprintf(ev_id, sizeof(ev_id), "%s/backup.accepted", job);
		snprintf(msg, sizeof(msg), "{\"job_id\":\"%s\"}", job);
		struct bw_event accepted = {ev_id, "backup.accepted", 1, "{}"};
		struct bw_fence f = {job, 0};
		snprintf(rep.step, sizeof(rep.step), "claim %s", job);
		rc = bw_ledger_claim(l, job, msg, disks, s->n_disks, &accepted, &gen, NULL);
		f.generation = gen;
		if (rc == 0) {
			snprintf(rep.step, sizeof(rep.step), "waiting_ports %s", job);
			rc = bw_ledger_transition(l, &f, BW_JOB_WAITING_PORTS, NULL, NULL, 0);
		}
		if (rc == 0) {
			snprintf(rep.step, sizeof(rep.step), "reserve %s", job);
			rc = bw_ledger_reserve(l, &f, keys, s->n_disks, rep.ports[j]);
		}
		if (rc == 0) {
			snprintf(rep.step, sizeof(rep.step), "reserved %s", job);
			rc = bw_ledger_transition(l, &f, BW_JOB_RESERVED, NULL, NULL, 0);
		}
	}
	rep.rc = rc;
	if (rc == 0)
		rep.step[0] = '\0';
	if (write_full(rep_w, &rep, sizeof(rep)) != 0 || rc != 0)
		_exit(1);
	for (;;) {
		char cmd;
		ssize_t got = read(cmd_r, &cmd, 1);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			_exit(0); /* the test is done with us: leave without cleaning up */
		int32_t out = fence_cmd(l, s, &rep, cmd);
		if (write_full(rep_w, &out, sizeof(out)) != 0)
			_exit(1);
	}
}

/* The reaper child: open, register, say ready, wait for the start, reap, report. */
static void reaper_child(const char *dir, const char *worker_id, int go_r, int hold_r, int rep_w)
{
	struct reap_report rep;
	struct bw_ledger *l = NULL;
	struct bw_reaped_job *jobs = NULL;
	size_t n = 0;
	char db[256], byte = 'R';

	memset(&rep, 0, sizeof(rep));
	snprintf(db, sizeof(db), "%s/ledger.db", dir);
	int rc = bw_ledger_open(&l, db, PORT_MIN, PORT_MAX);
	if (rc == 0)
		rc = bw_ledger_register(l, worker_id, dir);
	if (rc != 0)
		byte = 'F';
	if (write_full(rep_w, &byte, 1) != 0)
		_exit(1);
	/* The barrier: the test closes the write end when both reapers are ready. */
	while (read(go_r, &byte, 1) < 0 && errno == EINTR)
		;
	if (rc == 0)
		rc = bw_ledger_reap(l, &jobs, &n);
	rep.rc = rc;
	for (size_t i = 0; rc == 0 && i < n && i < MAX_JOBS * 2; i++) {
		snprintf(rep.job_ids[i], sizeof(rep.job_ids[i]), "%s", jobs[i].job_id);
		rep.generation[i] = jobs[i].generation;
		rep.n++;
	}
	if (rc == 0 && n > MAX_JOBS * 2)
		rep.rc = BW_ERANGE;
	bw_reaped_free(jobs, n);
	int code = write_full(rep_w, &rep, sizeof(rep)) == 0 ? 0 : 1;
	/* Alive (its lock held) until both have reported: a reaper that exited early would be a
	 * dead worker whose jobs the other one rightly takes over again. */
	while (read(hold_r, &byte, 1) < 0 && errno == EINTR)
		;
	_exit(code);
}

/* Forks; in the child closes every other kid's pipes. Returns the pid (0 in the child). */
static pid_t fork_kid(struct fixture *fx, struct kid *k, int cmd[2], int rep[2])
{
	assert_null(fx->l); /* see the note at the top */
	assert_int_equal(pipe(cmd), 0);
	assert_int_equal(pipe(rep), 0);
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		for (int i = 0; i < fx->n_kids; i++) {
			if (fx->kids[i].cmd_w >= 0)
				close(fx->kids[i].cmd_w);
			if (fx->kids[i].rep_r >= 0)
				close(fx->kids[i].rep_r);
		}
		close(cmd[1]);
		close(rep[0]);
		return 0;
	}
	close(cmd[0]);
	close(rep[1]);
	k->pid = pid;
	k->cmd_w = cmd[1];
	k->rep_r = rep[0];
	return pid;
}

static struct kid *kid_new(struct fixture *fx)
{
	assert_true(fx->n_kids < MAX_KIDS);
	struct kid *k = &fx->kids[fx->n_kids++];
	k->pid = 0;
	k->cmd_w = -1;
	k->rep_r = -1;
	return k;
}

/* Starts a worker child and waits for its report; fails the test when it failed. */
static struct kid *spawn_worker(struct fixture *fx, const struct worker_spec *s,
				struct worker_report *rep)
{
	int cmd[2], rp[2];
	struct kid *k = kid_new(fx);
	if (fork_kid(fx, k, cmd, rp) == 0)
		worker_child(s, cmd[0], rp[1]);
	int rc = read_full(k->rep_r, rep, sizeof(*rep), IO_TIMEOUT_MS);
	if (rc != 0)
		fail_msg("worker %s: no report (%s)", s->worker_id, strerror(-rc));
	if (rep->rc != 0)
		fail_msg("worker %s: %s: %s", s->worker_id, rep->step, bw_err_name(rep->rc));
	return k;
}

/* Sends one command to a worker child; returns the BW code its ledger call gave. */
static int kid_command(struct kid *k, char cmd)
{
	int32_t out = 1;
	assert_int_equal(write_full(k->cmd_w, &cmd, 1), 0);
	assert_int_equal(read_full(k->rep_r, &out, sizeof(out), IO_TIMEOUT_MS), 0);
	return out;
}

/* SIGKILLs a child and reaps it (the process, not the ledger). */
static void kid_kill(struct kid *k)
{
	int status;
	if (k->pid <= 0)
		return;
	kill(k->pid, SIGKILL);
	while (waitpid(k->pid, &status, 0) < 0 && errno == EINTR)
		;
	k->pid = 0;
	if (k->cmd_w >= 0)
		close(k->cmd_w);
	if (k->rep_r >= 0)
		close(k->rep_r);
	k->cmd_w = k->rep_r = -1;
}

/* Waits for a child that leaves by itself; returns its exit status (-1: signalled). */
static int kid_wait(struct kid *k)
{
	int status = 0;
	pid_t r;
	while ((r = waitpid(k->pid, &status, 0)) < 0 && errno == EINTR)
		;
	k->pid = 0;
	if (k->cmd_w >= 0)
		close(k->cmd_w);
	if (k->rep_r >= 0)
		close(k->rep_r);
	k->cmd_w = k->rep_r = -1;
	return r > 0 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Opens the test's own ledger handle and registers it as "R". */
static void open_reaper(struct fixture *fx)
{
	assert_int_equal(bw_ledger_open(&fx->l, fx->db, PORT_MIN, PORT_MAX), 0);
	assert_int_equal(bw_ledger_register(fx->l, "R", fx->dir), 0);
}

static void reap(struct fixture *fx, struct bw_reaped_job **jobs, size_t *n)
{
	*jobs = NULL;
	*n = 0;
	int rc = bw_ledger_reap(fx->l, jobs, n);
	if (rc != 0)
		fail_msg("bw_ledger_reap: %s (%s)", bw_err_name(rc), bw_ledger_errmsg(fx->l));
}

/* ---- reading the ledger ----------------------------------------------------------------- */

static struct json_object *find_by(struct json_object *arr, const char *field, const char *value)
{
	for (size_t i = 0; i < json_object_array_length(arr); i++) {
		struct json_object *o = json_object_array_get_idx(arr, i), *v;
		if (json_object_object_get_ex(o, field, &v) &&
		    strcmp(json_object_get_string(v), value) == 0)
			return o;
	}
	return NULL;
}

static const char *field_str(struct json_object *o, const char *field)
{
	struct json_object *v;
	assert_non_null(o);
	assert_true(json_object_object_get_ex(o, field, &v));
	return json_object_get_string(v);
}

static int64_t field_int(struct json_object *o, const char *field)
{
	struct json_object *v;
	assert_non_null(o);
	assert_true(json_object_object_get_ex(o, field, &v));
	return json_object_get_int64(v);
}

/* Checks that job_id is owned by owner under generation, in state. */
static void expect_job(struct bw_ledger *l, const char *job_id, const char *owner, int64_t gen,
		       const char *state)
{
	struct json_object *jobs = NULL;
	assert_int_equal(bw_ledger_list_jobs(l, &jobs), 0);
	struct json_object *j = find_by(jobs, "job_id", job_id);
	if (j == NULL) {
		json_object_put(jobs);
		fail_msg("job %s is not in list_jobs", job_id);
	}
	assert_string_equal(field_str(j, "owner"), owner);
	assert_int_equal(field_int(j, "generation"), gen);
	assert_string_equal(field_str(j, "state"), state);
	json_object_put(jobs);
}

/* The ports list_ports shows for job_id, each with its owner; returns how many. */
static size_t ports_of(struct bw_ledger *l, const char *job_id, const char *owner, int *out,
		       size_t max)
{
	struct json_object *ports = NULL;
	size_t n = 0;
	assert_int_equal(bw_ledger_list_ports(l, &ports), 0);
	for (size_t i = 0; i < json_object_array_length(ports); i++) {
		struct json_object *p = json_object_array_get_idx(ports, i), *v;
		if (!json_object_object_get_ex(p, "job_id", &v) || v == NULL ||
		    strcmp(json_object_get_string(v), job_id) != 0)
			continue;
		assert_string_equal(field_str(p, "state"), "reserved");
		if (owner)
			assert_string_equal(field_str(p, "owner"), owner);
		assert_true(n < max);
		out[n++] = (int)field_int(p, "port");
	}
	json_object_put(ports);
	return n;
}

static size_t count_rows(struct bw_ledger *l,
			 int (*list)(struct bw_ledger *, struct json_object **))
{
	struct json_object *arr = NULL;
	assert_int_equal(list(l, &arr), 0);
	size_t n = json_object_array_length(arr);
	json_object_put(arr);
	return n;
}

static int cmp_int(const void *a, const void *b)
{
	int x = *(const int *)a, y = *(const int *)b;
	return (x > y) - (x < y);
}

/* True when a[0..n) and b[0..n) hold the same ports in any order. */
static bool same_ports(const int *a, const int *b, size_t n)
{
	int x[MAX_DISKS], y[MAX_DISKS];
	memcpy(x, a, n * sizeof(*a));
	memcpy(y, b, n * sizeof(*b));
	qsort(x, n, sizeof(*x), cmp_int);
	qsort(y, n, sizeof(*y), cmp_int);
	return memcmp(x, y, n * sizeof(*x)) == 0;
}

/* ---- fixture ---------------------------------------------------------------------------- */

static int setup(void **state)
{
	struct fixture *fx = calloc(1, sizeof(*fx));
	if (fx == NULL)
		return -1;
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/bw-crash-XXXXXX");
	if (mkdtemp(fx->dir) == NULL) {
		free(fx);
		return -1;
	}
	snprintf(fx->db, sizeof(fx->db), "%s/ledger.db", fx->dir);
	*state = fx;
	return 0;
}

/* Kills and waits for every child still there, closes the ledger, removes the directory. */
static int teardown(void **state)
{
	struct fixture *fx = *state;
	for (int i = 0; i < fx->n_kids; i++)
		kid_kill(&fx->kids[i]);
	bw_ledger_close(fx->l);
	rm_tree(fx->dir);
	free(fx);
	return 0;
}

/* ---- 1. SIGKILL: exactly the dead worker's job and ports, exactly once -------------------- */

static void test_kill_then_reap(void **state)
{
	struct fixture *fx = *state;
	struct worker_report ra, rb;
	struct bw_reaped_job *jobs;
	size_t n, released;
	int ports[MAX_DISKS];

	struct worker_spec a = {fx->dir, "A", 1, {"a1"}, 3};
	struct worker_spec b = {fx->dir, "B", 1, {"b1"}, 2};
	struct kid *ka = spawn_worker(fx, &a, &ra);
	spawn_worker(fx, &b, &rb);
	open_reaper(fx);

	/* Both alive: nothing to take. */
	reap(fx, &jobs, &n);
	bw_reaped_free(jobs, n);
	assert_int_equal(n, 0);

	kid_kill(ka);
	reap(fx, &jobs, &n);
	if (n != 1) {
		bw_reaped_free(jobs, n);
		fail_msg("reap after killing A took %zu jobs, want 1", n);
	}
	struct bw_reaped_job *j = &jobs[0];
	assert_string_equal(j->job_id, "a1");
	assert_int_equal(j->state, BW_JOB_RESERVED);
	assert_int_equal(j->generation, 2);
	assert_string_equal(j->previous_owner, "A");
	assert_false(j->boot_changed);
	assert_string_equal(j->message, "{\"job_id\":\"a1\"}");
	assert_int_equal(j->seq, 1);
	assert_int_equal(j->n_disks, 3);
	for (size_t k = 0; k < 3; k++) {
		char want[32];
		assert_int_equal(j->disks[k].key, 2000 + (int64_t)k);
		assert_int_equal(j->disks[k].port, ra.ports[0][k]);
		snprintf(want, sizeof(want), "a1-%zu", k);
		assert_string_equal(j->disks[k].export_name, want);
		assert_false(j->disks[k].qcow2_created);
		assert_int_equal(j->disks[k].nbd_pid, 0);
	}
	bw_reaped_free(jobs, n);

	/* The ports moved with the job; B's job and ports are untouched. */
	assert_int_equal(ports_of(fx->l, "a1", "R", ports, MAX_DISKS), 3);
	assert_true(same_ports(ports, ra.ports[0], 3));
	assert_int_equal(ports_of(fx->l, "b1", "B", ports, MAX_DISKS), 2);
	assert_true(same_ports(ports, rb.ports[0], 2));
	assert_int_equal(count_rows(fx->l, bw_ledger_list_ports), 5);
	expect_job(fx->l, "a1", "R", 2, "reserved");
	expect_job(fx->l, "b1", "B", 1, "reserved");

	/* A is gone from the workers, with its lock file; B and R are alive. */
	struct json_object *workers = NULL;
	assert_int_equal(bw_ledger_list_workers(fx->l, &workers), 0);
	assert_null(find_by(workers, "worker_id", "A"));
	struct json_object *wb = find_by(workers, "worker_id", "B");
	struct json_object *alive = NULL;
	assert_non_null(wb);
	assert_true(json_object_object_get_ex(wb, "alive", &alive));
	assert_true(json_object_get_boolean(alive));
	json_object_put(workers);
	char lock[160];
	snprintf(lock, sizeof(lock), "%s/A.lock", fx->dir);
	assert_int_equal(access(lock, F_OK), -1);

	/* Exactly once. */
	reap(fx, &jobs, &n);
	bw_reaped_free(jobs, n);
	assert_int_equal(n, 0);

	/* The old fence is dead; the new one releases. */
	struct bw_fence old = {"a1", 1}, cur = {"a1", 2};
	int64_t key = 2000;
	assert_int_equal(bw_ledger_release(fx->l, &old, ra.ports[0][0]), BW_EFENCED);
	assert_int_equal(bw_ledger_release_all(fx->l, &old, &released), BW_EFENCED);
	assert_int_equal(bw_ledger_reserve(fx->l, &old, &key, 1, ports), BW_EFENCED);
	assert_int_equal(ports_of(fx->l, "a1", "R", ports, MAX_DISKS), 3);
	released = 99;
	assert_int_equal(bw_ledger_release_all(fx->l, &cur, &released), 0);
	assert_int_equal(released, 3);
	assert_int_equal(ports_of(fx->l, "a1", NULL, ports, MAX_DISKS), 0);
	assert_int_equal(ports_of(fx->l, "b1", "B", ports, MAX_DISKS), 2);
	assert_int_equal(count_rows(fx->l, bw_ledger_list_ports), 2);
}

/* ---- 2. Two reapers at the same moment: each job to exactly one -------------------------- */

static void one_round(struct fixture *fx, int round, int *split)
{
	char dir[160], wid[16], jobs_buf[5][16];
	struct worker_report rw;
	struct reap_report rr[2];
	struct kid *reapers[2];
	int go[2], hold[2], cmd[2], rep[2];

	snprintf(dir, sizeof(dir), "%s/round-%d", fx->dir, round);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(wid, sizeof(wid), "W%d", round);
	struct worker_spec w = {dir, wid, 5, {NULL}, 2};
	for (int i = 0; i < 5; i++) {
		snprintf(jobs_buf[i], sizeof(jobs_buf[i]), "w%d-j%d", round, i);
		w.job_ids[i] = jobs_buf[i];
	}
	kid_kill(spawn_worker(fx, &w, &rw));

	assert_int_equal(pipe(go), 0);
	assert_int_equal(pipe(hold), 0);
	for (int r = 0; r < 2; r++) {
		char id[16];
		snprintf(id, sizeof(id), "P%d%c", round, 'a' + r);
		reapers[r] = kid_new(fx);
		if (fork_kid(fx, reapers[r], cmd, rep) == 0) {
			close(go[1]);
			close(hold[1]);
			reaper_child(dir, id, go[0], hold[0], rep[1]);
		}
	}
	close(go[0]);
	close(hold[0]);
	for (int r = 0; r < 2; r++) {
		char byte = 0;
		assert_int_equal(read_full(reapers[r]->rep_r, &byte, 1, IO_TIMEOUT_MS), 0);
		assert_int_equal(byte, 'R');
	}
	close(go[1]); /* both start reaping now */
	for (int r = 0; r < 2; r++)
		assert_int_equal(read_full(reapers[r]->rep_r, &rr[r], sizeof(rr[r]), IO_TIMEOUT_MS),
				 0);
	close(hold[1]); /* both reported: now they may exit */
	for (int r = 0; r < 2; r++) {
		assert_int_equal(kid_wait(reapers[r]), 0);
		if (rr[r].rc != 0)
			fail_msg("round %d reaper %d: %s", round, r, bw_err_name(rr[r].rc));
	}

	/* Union: exactly the five jobs; intersection: empty. */
	int seen[5] = {0};
	for (int r = 0; r < 2; r++) {
		for (int i = 0; i < rr[r].n; i++) {
			int found = -1;
			for (int k = 0; k < 5; k++)
				if (strcmp(rr[r].job_ids[i], jobs_buf[k]) == 0)
					found = k;
			if (found < 0)
				fail_msg("round %d: reaper %d took %s, not W's", round, r,
					 rr[r].job_ids[i]);
			seen[found]++;
			assert_int_equal(rr[r].generation[i], 2);
		}
	}
	for (int k = 0; k < 5; k++)
		if (seen[k] != 1)
			fail_msg("round %d: job %s was taken %d times (a: %d jobs, b: %d jobs)",
				 round, jobs_buf[k], seen[k], rr[0].n, rr[1].n);
	if (rr[0].n > 0 && rr[1].n > 0)
		(*split)++;

	/* The ledger agrees: every job at generation 2, owned by the reaper that said so. */
	struct bw_ledger *l = NULL;
	char db[200];
	snprintf(db, sizeof(db), "%s/ledger.db", dir);
	assert_int_equal(bw_ledger_open_readonly(&l, db), 0);
	for (int r = 0; r < 2; r++) {
		char id[16];
		snprintf(id, sizeof(id), "P%d%c", round, 'a' + r);
		for (int i = 0; i < rr[r].n; i++)
			expect_job(l, rr[r].job_ids[i], id, 2, "reserved");
	}
	bw_ledger_close(l);
}

static void test_two_reapers(void **state)
{
	struct fixture *fx = *state;
	int split = 0;
	for (int round = 0; round < ROUNDS; round++)
		one_round(fx, round, &split);
	print_message("%d rounds: each job taken exactly once; %d rounds split the jobs between "
		      "both reapers\n",
		      ROUNDS, split);
}

/* ---- 3. The lock decides, not the pid, start time or heartbeat --------------------------- */

static void test_liveness_is_the_lock(void **state)
{
	struct fixture *fx = *state;
	struct worker_report rz, rz2, ry;
	struct bw_reaped_job *jobs;
	size_t n;
	uint64_t my_start = 0;

	struct worker_spec z = {fx->dir, "Z", 1, {"z1"}, 1};
	struct worker_spec z2 = {fx->dir, "Z2", 1, {"z2"}, 1};
	struct worker_spec y = {fx->dir, "Y", 1, {"y1"}, 2};
	struct kid *kz = spawn_worker(fx, &z, &rz);
	struct kid *kz2 = spawn_worker(fx, &z2, &rz2);
	struct kid *ky = spawn_worker(fx, &y, &ry);
	pid_t dead_pid = kz->pid;
	kid_kill(kz);
	kid_kill(kz2);

	/* Pid reuse: Z's pid now names a live process (this one) with another start time. */
	assert_int_equal(bw_proc_start_time(getpid(), &my_start), 0);
	assert_int_equal(
	    sql_exec(fx->db, "UPDATE workers SET pid = %d, start_time = %lld WHERE worker_id = 'Z'",
		     (int)getpid(), (long long)my_start + 12345),
	    SQLITE_OK);
	/* Worse: Z2's row names this live process exactly (pid and start time). */
	assert_int_equal(
	    sql_exec(fx->db,
		     "UPDATE workers SET pid = %d, start_time = %lld WHERE worker_id = 'Z2'",
		     (int)getpid(), (long long)my_start),
	    SQLITE_OK);
	/* The reverse: Y is alive but frozen, silent since 1970 and names a dead pid. */
	assert_int_equal(kill(ky->pid, SIGSTOP), 0);
	assert_int_equal(
	    sql_exec(fx->db, "UPDATE workers SET heartbeat_at = 0, pid = %d WHERE worker_id = 'Y'",
		     (int)dead_pid),
	    SQLITE_OK);

	open_reaper(fx);
	reap(fx, &jobs, &n);
	bool z1 = false, z2_taken = false, other = false;
	for (size_t i = 0; i < n; i++) {
		if (strcmp(jobs[i].job_id, "z1") == 0 && strcmp(jobs[i].previous_owner, "Z") == 0)
			z1 = true;
		else if (strcmp(jobs[i].job_id, "z2") == 0 &&
			 strcmp(jobs[i].previous_owner, "Z2") == 0)
			z2_taken = true;
		else
			other = true;
		if (jobs[i].generation != 2)
			other = true;
	}
	bw_reaped_free(jobs, n);
	assert_true(z1);       /* pid reused: still dead, its lock is free */
	assert_true(z2_taken); /* even a perfect pid + start time match does not make it alive */
	assert_false(other);   /* nothing of Y */
	assert_int_equal(n, 2);
	expect_job(fx->l, "y1", "Y", 1, "reserved");
	int ports[MAX_DISKS];
	assert_int_equal(ports_of(fx->l, "y1", "Y", ports, MAX_DISKS), 2);
	assert_true(same_ports(ports, ry.ports[0], 2));

	/* Still nothing of Y on a second pass, and bw-ctl's view agrees. */
	reap(fx, &jobs, &n);
	bw_reaped_free(jobs, n);
	assert_int_equal(n, 0);
	struct json_object *workers = NULL, *alive = NULL;
	assert_int_equal(bw_ledger_list_workers(fx->l, &workers), 0);
	struct json_object *wy = find_by(workers, "worker_id", "Y");
	assert_non_null(wy);
	assert_true(json_object_object_get_ex(wy, "alive", &alive));
	assert_true(json_object_get_boolean(alive));
	json_object_put(workers);
	kill(ky->pid, SIGCONT);
}

/* ---- 4. A changed boot id: the ledger trusts it ----------------------------------------- */

/*
 * A reboot changes the boot id of everything written before it: the worker row and the
 * job rows it owned. The worker here is really alive (it still holds its flock): the test
 * documents that the boot id outranks the lock, as DESIGN.md decision 5 says.
 */
static struct kid *rebooted_worker(struct fixture *fx, struct worker_report *rc)
{
	struct worker_spec c = {fx->dir, "C", 1, {"c1"}, 2};
	struct kid *k = spawn_worker(fx, &c, rc);
	assert_int_equal(sql_exec(fx->db, "UPDATE workers SET boot_id = %Q WHERE worker_id = 'C'",
				  OTHER_BOOT_ID),
			 SQLITE_OK);
	assert_int_equal(sql_exec(fx->db, "UPDATE jobs SET owner_boot_id = %Q WHERE job_id = 'c1'",
				  OTHER_BOOT_ID),
			 SQLITE_OK);
	return k;
}

static void test_boot_id_changed(void **state)
{
	struct fixture *fx = *state;
	struct worker_report rc;
	struct bw_reaped_job *jobs;
	size_t n;
	int ports[MAX_DISKS];

	rebooted_worker(fx, &rc);
	open_reaper(fx);
	reap(fx, &jobs, &n);
	if (n != 1) {
		bw_reaped_free(jobs, n);
		fail_msg("reap took %zu jobs, want c1 only", n);
	}
	assert_string_equal(jobs[0].job_id, "c1");
	assert_true(jobs[0].boot_changed);
	assert_string_equal(jobs[0].previous_owner, "C");
	assert_int_equal(jobs[0].generation, 2);
	assert_int_equal(jobs[0].n_disks, 2);
	assert_int_equal(jobs[0].disks[0].port, rc.ports[0][0]);
	assert_int_equal(jobs[0].disks[1].port, rc.ports[0][1]);
	bw_reaped_free(jobs, n);
	assert_int_equal(ports_of(fx->l, "c1", "R", ports, MAX_DISKS), 2);

	struct json_object *workers = NULL;
	assert_int_equal(bw_ledger_list_workers(fx->l, &workers), 0);
	assert_null(find_by(workers, "worker_id", "C"));
	json_object_put(workers);

	reap(fx, &jobs, &n);
	bw_reaped_free(jobs, n);
	assert_int_equal(n, 0);
}

/* ---- 5. The zombie: the old owner's writes are fenced and change nothing ------------------ */

static char *job_snapshot(struct bw_ledger *l, const char *job_id)
{
	struct json_object *job = NULL, *ports = NULL;
	assert_int_equal(bw_ledger_show_job(l, job_id, &job), 0);
	assert_int_equal(bw_ledger_list_ports(l, &ports), 0);
	const char *a = json_object_to_json_string(job), *b = json_object_to_json_string(ports);
	size_t size = strlen(a) + strlen(b) + 2;
	char *s = malloc(size);
	assert_non_null(s);
	snprintf(s, size, "%s\n%s", a, b);
	json_object_put(job);
	json_object_put(ports);
	return s;
}

static void test_zombie_is_fenced(void **state)
{
	struct fixture *fx = *state;
	struct worker_report rc;
	struct bw_reaped_job *jobs;
	size_t n;

	struct kid *zombie = rebooted_worker(fx, &rc);
	open_reaper(fx);
	reap(fx, &jobs, &n);
	bw_reaped_free(jobs, n);
	assert_int_equal(n, 1);

	/* The old owner is still running and still believes it owns c1 at generation 1. */
	char *before = job_snapshot(fx->l, "c1");
	assert_int_equal(kid_command(zombie, 'T'), BW_EFENCED);
	assert_int_equal(kid_command(zombie, 'R'), BW_EFENCED);
	assert_int_equal(kid_command(zombie, 'A'), BW_EFENCED);
	assert_int_equal(kid_command(zombie, 'D'), BW_EFENCED);
	assert_int_equal(kid_command(zombie, 'Q'), BW_EFENCED);
	char *after = job_snapshot(fx->l, "c1");
	int same = strcmp(before, after) == 0;
	if (!same)
		print_error("before: %s\nafter:  %s\n", before, after);
	free(before);
	free(after);
	assert_true(same);

	/* The same write from this process with the old fence: fenced; with the new one: ok. */
	struct bw_fence old = {"c1", 1}, cur = {"c1", 2};
	assert_int_equal(bw_ledger_transition(fx->l, &old, BW_JOB_FAILED, "x", NULL, 0),
			 BW_EFENCED);
	expect_job(fx->l, "c1", "R", 2, "reserved");
	assert_int_equal(bw_ledger_transition(fx->l, &cur, BW_JOB_FAILED, "taken over", NULL, 0),
			 0);
	expect_job(fx->l, "c1", "R", 2, "failed");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_kill_then_reap, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_two_reapers, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_liveness_is_the_lock, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_boot_id_changed, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_zombie_is_fenced, setup, teardown),
	};
	signal(SIGPIPE, SIG_IGN);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
