/* stress.c: processes reserve and release ports at once; a checker that trusts no table. */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
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
#include "../testutil.h"

/*
 * What is proved, and why the proof does not trust the ledger.
 *
 * Every child records, for each port it was given, the interval [acq, rel] in
 * CLOCK_MONOTONIC nanoseconds (one clock for the whole host): acq is read after
 * bw_ledger_reserve returned, rel before bw_ledger_release is called. A correct ledger
 * hands a port to a second holder only after the first holder's release committed, which
 * happens after rel; the second holder reads acq after its own reserve committed. So for
 * a correct ledger every two intervals of one port are disjoint, whatever the ledger's
 * tables, keys or constraints look like; an overlap is proof of two live holders. The
 * checker sorts all intervals of a port by acq and reports every interval that starts
 * before an earlier one ended.
 *
 * --broken swaps the ledger for a naive allocator written here (check-then-act against
 * its own table, delete by port only) to show the same checker catches double holders.
 */

#define MAX_DISKS 16
#define MAX_PROCS 64
#define SETUP_TIMEOUT_MS 60000
#define EXIT_GRACE_S 60

struct opts {
	int procs;
	int seconds;
	int port_min;
	int port_max;
	int min_cycles;
	bool broken;
	bool expect_overlaps;
	bool keep;
	const char *dir;
};

/* One holding of one port by one process, as written to intervals-<i>. */
struct hold {
	int32_t port;
	int32_t proc;
	int64_t acq;
	int64_t rel;
};

struct child_stats {
	long cycles;	   /* reserve + hold + release completed */
	long reservations; /* ports handed out */
	long enoports;	   /* BW_ENOPORTS: a normal outcome */
	long busy;	   /* BW_EBUSY that escaped the ledger's retry bound */
	long other;	   /* any other failure */
	char first_error[256];
};

struct child {
	int idx;
	const struct opts *o;
	struct bw_ledger *l;
	sqlite3 *naive; /* --broken only */
	char job_id[64];
	char worker_id[64];
	int64_t generation;
	uint64_t rng;
	FILE *intervals;
	FILE *latencies;
	struct child_stats st;
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* xorshift64*: each child has its own stream. */
static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1DULL;
}

/* Uniform in [lo, hi]. */
static long rng_range(uint64_t *s, long lo, long hi)
{
	return lo + (long)(rng_next(s) % (uint64_t)(hi - lo + 1));
}

static void sleep_us(long us)
{
	if (us <= 0)
		return;
	struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static void path_in(char *out, size_t size, const char *dir, const char *name, int idx)
{
	if (idx >= 0)
		snprintf(out, size, "%s/%s-%d", dir, name, idx);
	else
		snprintf(out, size, "%s/%s", dir, name);
}

/* Counts a failure of what; the first one's text is kept for the summary. */
static void child_error(struct child *c, const char *what, int rc)
{
	if (rc == BW_EBUSY)
		c->st.busy++;
	else
		c->st.other++;
	if (c->st.first_error[0] == '\0')
		snprintf(c->st.first_error, sizeof(c->st.first_error), "%s: %s (%s)", what,
			 bw_err_name(rc), c->l ? bw_ledger_errmsg(c->l) : "no ledger");
	fprintf(stderr, "stress[%d]: %s: %s\n", c->idx, what, bw_err_name(rc));
}

/* ---- the naive allocator of --broken ---------------------------------------------------- */

static int naive_rc(int src)
{
	return src == SQLITE_BUSY || src == SQLITE_LOCKED ? BW_EBUSY : BW_EIO;
}

static int naive_release(struct child *c, int port)
{
	sqlite3_stmt *st = NULL;
	int src =
	    sqlite3_prepare_v2(c->naive, "DELETE FROM naive_ports WHERE port = ?", -1, &st, NULL);
	if (src == SQLITE_OK) {
		sqlite3_bind_int(st, 1, port);
		src = sqlite3_step(st);
	}
	sqlite3_finalize(st);
	return src == SQLITE_DONE ? 0 : naive_rc(src);
}

/*
 * Check-then-act, the bug under demonstration: reads the taken ports in autocommit mode,
 * picks the lowest free one, waits a few microseconds (as real code does work between the
 * two), then INSERT OR REPLACE, which silently steals a port taken meanwhile.
 */
static int naive_reserve(struct child *c, size_t n, int *ports)
{
	const struct opts *o = c->o;
	size_t range = (size_t)(o->port_max - o->port_min + 1);
	bool *taken = calloc(range, sizeof(*taken));
	sqlite3_stmt *sel = NULL, *ins = NULL;
	size_t got = 0;
	int rc = 0, src;

	if (taken == NULL)
		return BW_ENOMEM;
	src = sqlite3_prepare_v2(c->naive, "SELECT port FROM naive_ports", -1, &sel, NULL);
	if (src == SQLITE_OK)
		src = sqlite3_prepare_v2(c->naive,
					 "INSERT OR REPLACE INTO naive_ports(port, holder) "
					 "VALUES(?, ?)",
					 -1, &ins, NULL);
	if (src != SQLITE_OK) {
		rc = naive_rc(src);
		goto out;
	}
	for (got = 0; got < n; got++) {
		memset(taken, 0, range * sizeof(*taken));
		sqlite3_reset(sel);
		while ((src = sqlite3_step(sel)) == SQLITE_ROW) {
			int p = sqlite3_column_int(sel, 0);
			if (p >= o->port_min && p <= o->port_max)
				taken[p - o->port_min] = true;
		}
		if (src != SQLITE_DONE) {
			rc = naive_rc(src);
			goto out;
		}
		for (size_t i = 0; i < got; i++)
			taken[ports[i] - o->port_min] = true;
		size_t pick = 0;
		while (pick < range && taken[pick])
			pick++;
		if (pick == range) {
			rc = BW_ENOPORTS;
			goto out;
		}
		sleep_us(rng_range(&c->rng, 1, 20));
		sqlite3_reset(ins);
		sqlite3_bind_int(ins, 1, o->port_min + (int)pick);
		sqlite3_bind_text(ins, 2, c->worker_id, -1, SQLITE_STATIC);
		src = sqlite3_step(ins);
		if (src != SQLITE_DONE) {
			rc = naive_rc(src);
			goto out;
		}
		ports[got] = o->port_min + (int)pick;
	}
out:
	if (rc != 0)
		for (size_t i = 0; i < got; i++)
			(void)naive_release(c, ports[i]);
	sqlite3_finalize(ins);
	sqlite3_finalize(sel);
	free(taken);
	return rc;
}

static int naive_create(const char *dir)
{
	char path[4096];
	sqlite3 *db = NULL;
	path_in(path, sizeof(path), dir, "naive.db", -1);
	int src = sqlite3_open(path, &db);
	if (src == SQLITE_OK)
		src = sqlite3_exec(db,
				   "PRAGMA journal_mode=WAL;"
				   "CREATE TABLE IF NOT EXISTS naive_ports("
				   "port INTEGER PRIMARY KEY, holder TEXT NOT NULL);"
				   "DELETE FROM naive_ports;",
				   NULL, NULL, NULL);
	if (src != SQLITE_OK)
		fprintf(stderr, "stress: %s: %s\n", path, db ? sqlite3_errmsg(db) : "no memory");
	sqlite3_close(db);
	return src == SQLITE_OK ? 0 : -1;
}

/* ---- a child ---------------------------------------------------------------------------- */

/* Opens the ledger, registers and claims this child's job. Returns 0 or the failed code. */
static int child_setup(struct child *c)
{
	const struct opts *o = c->o;
	char path[4096];
	struct bw_job_disk_new disks[MAX_DISKS];
	char exports[MAX_DISKS][32], qcow2[MAX_DISKS][128], event_id[128];
	int rc;

	path_in(path, sizeof(path), o->dir, "ledger.db", -1);
	rc = bw_ledger_open(&c->l, path, o->port_min, o->port_max);
	if (rc != 0) {
		c->l = NULL;
		child_error(c, "bw_ledger_open", rc);
		return rc;
	}
	rc = bw_ledger_register(c->l, c->worker_id, o->dir);
	if (rc != 0) {
		child_error(c, "bw_ledger_register", rc);
		return rc;
	}
	for (int i = 0; i < MAX_DISKS; i++) {
		snprintf(exports[i], sizeof(exports[i]), "disk-%d", 2000 + i);
		snprintf(qcow2[i], sizeof(qcow2[i]), "/nonexistent/%s/%d.qcow2", c->job_id, i);
		disks[i].key = 2000 + i;
		disks[i].export_name = exports[i];
		disks[i].qcow2_path = qcow2[i];
	}
	snprintf(event_id, sizeof(event_id), "%s/backup.accepted", c->job_id);
	struct bw_event accepted = {event_id, "backup.accepted", 1, "{}"};
	rc = bw_ledger_claim(c->l, c->job_id, "{}", disks, MAX_DISKS, &accepted, &c->generation,
			     NULL);
	if (rc != 0) {
		child_error(c, "bw_ledger_claim", rc);
		return rc;
	}
	if (o->broken) {
		path_in(path, sizeof(path), o->dir, "naive.db", -1);
		int src = sqlite3_open_v2(path, &c->naive, SQLITE_OPEN_READWRITE, NULL);
		if (src == SQLITE_OK)
			src = sqlite3_busy_timeout(c->naive, 10000);
		if (src == SQLITE_OK)
			src =
			    sqlite3_exec(c->naive, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
		if (src != SQLITE_OK) {
			child_error(c, "open naive.db", BW_EIO);
			return BW_EIO;
		}
	}
	return 0;
}

static void write_hold(struct child *c, int port, int64_t acq, int64_t rel)
{
	struct hold h = {port, c->idx, acq, rel};
	if (fwrite(&h, sizeof(h), 1, c->intervals) != 1)
		child_error(c, "write intervals", BW_EIO);
}

/* One reserve, hold, release cycle. */
static void child_cycle(struct child *c)
{
	struct bw_fence f = {c->job_id, c->generation};
	int64_t keys[MAX_DISKS];
	int ports[MAX_DISKS];
	int64_t rel[MAX_DISKS];
	size_t n = (size_t)rng_range(&c->rng, 1, MAX_DISKS);
	int rc;

	for (size_t i = 0; i < n; i++)
		keys[i] = 2000 + (int64_t)i;
	int64_t t0 = now_ns();
	rc =
	    c->o->broken ? naive_reserve(c, n, ports) : bw_ledger_reserve(c->l, &f, keys, n, ports);
	int64_t acq = now_ns();
	if (rc == BW_ENOPORTS) {
		c->st.enoports++;
		sleep_us(rng_range(&c->rng, 0, 1000));
		return;
	}
	if (rc != 0) {
		child_error(c, "reserve", rc);
		sleep_us(rng_range(&c->rng, 0, 1000));
		return;
	}
	int64_t lat = acq - t0;
	if (fwrite(&lat, sizeof(lat), 1, c->latencies) != 1)
		child_error(c, "write latencies", BW_EIO);
	c->st.reservations += (long)n;

	sleep_us(rng_range(&c->rng, 0, 2000));

	bool failed = false;
	if (!c->o->broken && c->st.cycles % 4 == 3) {
		size_t released = 0;
		int64_t t = now_ns();
		for (size_t i = 0; i < n; i++)
			rel[i] = t;
		rc = bw_ledger_release_all(c->l, &f, &released);
		if (rc != 0) {
			child_error(c, "bw_ledger_release_all", rc);
			failed = true;
		} else if (released != n) {
			c->st.other++;
			if (c->st.first_error[0] == '\0')
				snprintf(c->st.first_error, sizeof(c->st.first_error),
					 "bw_ledger_release_all released %zu of %zu", released, n);
		}
	} else {
		for (size_t i = 0; i < n; i++) {
			rel[i] = now_ns();
			rc = c->o->broken ? naive_release(c, ports[i])
					  : bw_ledger_release(c->l, &f, ports[i]);
			if (rc != 0) {
				child_error(c, "release", rc);
				failed = true;
			}
		}
	}
	for (size_t i = 0; i < n; i++)
		write_hold(c, ports[i], acq, rel[i]);
	if (failed && !c->o->broken) {
		/* Leave no port behind for the next cycle; counted already. */
		size_t released;
		if (bw_ledger_release_all(c->l, &f, &released) != 0)
			c->st.other++;
	}
	c->st.cycles++;
	sleep_us(rng_range(&c->rng, 0, 1000));
}

static void child_write_stats(const struct child *c)
{
	char path[4096];
	path_in(path, sizeof(path), c->o->dir, "stats", c->idx);
	FILE *fp = fopen(path, "w");
	if (fp == NULL) {
		perror(path);
		return;
	}
	fprintf(fp, "%ld %ld %ld %ld %ld\n%s\n", c->st.cycles, c->st.reservations, c->st.enoports,
		c->st.busy, c->st.other, c->st.first_error);
	fclose(fp);
}

/*
 * The child: set up, report one byte on ready_fd ('R' ready, 'F' failed), wait for the
 * parent to close go_fd, run the cycles for o->seconds, release everything and leave.
 * Returns the exit status.
 */
static int child_main(const struct opts *o, int idx, int ready_fd, int go_fd)
{
	struct child c;
	char path[4096];
	int status = 0;

	memset(&c, 0, sizeof(c));
	c.idx = idx;
	c.o = o;
	c.rng = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
	snprintf(c.worker_id, sizeof(c.worker_id), "stress-%d", idx);
	snprintf(c.job_id, sizeof(c.job_id), "stress-job-%d-0", idx);

	path_in(path, sizeof(path), o->dir, "intervals", idx);
	c.intervals = fopen(path, "wb");
	path_in(path, sizeof(path), o->dir, "latencies", idx);
	c.latencies = fopen(path, "wb");
	int rc = c.intervals && c.latencies ? child_setup(&c) : BW_EIO;
	char byte = rc == 0 ? 'R' : 'F';
	if (write(ready_fd, &byte, 1) != 1 || rc != 0) {
		status = 2;
		goto out;
	}
	close(ready_fd);
	ready_fd = -1;
	/* The parent closes its end when every child is ready: read returns 0. */
	while (read(go_fd, &byte, 1) < 0 && errno == EINTR)
		;

	int64_t end = now_ns() + (int64_t)o->seconds * 1000000000;
	int64_t next_heartbeat = 0;
	while (now_ns() < end) {
		if (!o->broken && now_ns() >= next_heartbeat) {
			rc = bw_ledger_heartbeat(c.l);
			if (rc != 0)
				child_error(&c, "bw_ledger_heartbeat", rc);
			next_heartbeat = now_ns() + 200000000;
		}
		child_cycle(&c);
	}

	/* A clean exit: nothing held, the job finished, the worker gone. */
	struct bw_fence f = {c.job_id, c.generation};
	size_t released = 0;
	rc = bw_ledger_release_all(c.l, &f, &released);
	if (rc != 0)
		child_error(&c, "final bw_ledger_release_all", rc);
	else if (released != 0 && !o->broken)
		child_error(&c, "final bw_ledger_release_all found ports still held", BW_EEXIST);
	/* The job's end: failed, then compensated (the only legal way to compensated). */
	rc = bw_ledger_transition(c.l, &f, BW_JOB_FAILED, "stress run over", NULL, 0);
	if (rc == 0)
		rc = bw_ledger_transition(c.l, &f, BW_JOB_COMPENSATED, NULL, NULL, 0);
	if (rc != 0)
		child_error(&c, "bw_ledger_transition(failed, compensated)", rc);
	rc = bw_ledger_unregister(c.l);
	if (rc != 0)
		child_error(&c, "bw_ledger_unregister", rc);
out:
	if (ready_fd >= 0)
		close(ready_fd);
	close(go_fd);
	child_write_stats(&c);
	if (c.intervals && fclose(c.intervals) != 0)
		status = 2;
	if (c.latencies && fclose(c.latencies) != 0)
		status = 2;
	sqlite3_close(c.naive);
	bw_ledger_close(c.l);
	return status;
}

/* ---- the parent: run and check ---------------------------------------------------------- */

static int cmp_hold(const void *a, const void *b)
{
	const struct hold *x = a, *y = b;
	if (x->port != y->port)
		return x->port < y->port ? -1 : 1;
	if (x->acq != y->acq)
		return x->acq < y->acq ? -1 : 1;
	return (x->rel > y->rel) - (x->rel < y->rel);
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static int cmp_long(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;
	return (x > y) - (x < y);
}

/* Appends the records of file path to *buf (count *n, capacity *cap). Returns 0 or -1. */
static int slurp(const char *path, size_t size, void **buf, size_t *n, size_t *cap)
{
	FILE *fp = fopen(path, "rb");
	if (fp == NULL) {
		perror(path);
		return -1;
	}
	for (;;) {
		if (*n == *cap) {
			size_t ncap = *cap ? *cap * 2 : 4096;
			void *nb = realloc(*buf, ncap * size);
			if (nb == NULL) {
				fclose(fp);
				return -1;
			}
			*buf = nb;
			*cap = ncap;
		}
		size_t got = fread((char *)*buf + *n * size, size, *cap - *n, fp);
		*n += got;
		if (got == 0)
			break;
	}
	int bad = ferror(fp);
	fclose(fp);
	return bad ? -1 : 0;
}

struct verdict {
	int passed;
	int failed;
};

static void check(struct verdict *v, bool ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void check(struct verdict *v, bool ok, const char *fmt, ...)
{
	va_list ap;
	printf("  [%s] ", ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	if (ok)
		v->passed++;
	else
		v->failed++;
}

/* Finds overlapping holds: returns their count, prints the first few. */
static long find_overlaps(struct hold *h, size_t n, const struct opts *o, long *out_of_range)
{
	long overlaps = 0;
	*out_of_range = 0;
	qsort(h, n, sizeof(*h), cmp_hold);
	for (size_t i = 0; i < n;) {
		size_t j = i;
		size_t longest = i; /* the earlier hold that ends last */
		if (h[i].port < o->port_min || h[i].port > o->port_max)
			(*out_of_range)++;
		for (j = i + 1; j < n && h[j].port == h[i].port; j++) {
			if (h[j].acq < h[longest].rel) {
				if (overlaps < 5)
					printf("  overlap: port %d held by proc %d [%" PRId64
					       ", %" PRId64
					       "] while proc %d acquired it at %" PRId64
					       " (%.1f us before the release)\n",
					       h[j].port, h[longest].proc, h[longest].acq,
					       h[longest].rel, h[j].proc, h[j].acq,
					       (double)(h[longest].rel - h[j].acq) / 1e3);
				overlaps++;
			}
			if (h[j].rel > h[longest].rel)
				longest = j;
		}
		i = j;
	}
	return overlaps;
}

/* The ledger afterwards: rows of list_ports and list_workers; -1 when it cannot be read. */
static void ledger_leftovers(const char *path, long *ports, long *workers)
{
	struct bw_ledger *l = NULL;
	struct json_object *arr = NULL;
	*ports = -1;
	*workers = -1;
	int rc = bw_ledger_open_readonly(&l, path);
	if (rc != 0) {
		printf("  bw_ledger_open_readonly: %s\n", bw_err_name(rc));
		return;
	}
	for (int which = 0; which < 2; which++) {
		rc = which == 0 ? bw_ledger_list_ports(l, &arr) : bw_ledger_list_workers(l, &arr);
		if (rc != 0) {
			printf("  bw_ledger_list_%s: %s (%s)\n", which == 0 ? "ports" : "workers",
			       bw_err_name(rc), bw_ledger_errmsg(l));
			continue;
		}
		long rows = (long)json_object_array_length(arr);
		for (long i = 0; i < rows && i < 5; i++)
			printf(
			    "  left in %s: %s\n", which == 0 ? "ports" : "workers",
			    json_object_to_json_string(json_object_array_get_idx(arr, (size_t)i)));
		*(which == 0 ? ports : workers) = rows;
		json_object_put(arr);
		arr = NULL;
	}
	bw_ledger_close(l);
}

/* Runs PRAGMA integrity_check on a read-only connection; stores the first row in out. */
static bool integrity_ok(const char *path, char *out, size_t size)
{
	sqlite3 *db = NULL;
	sqlite3_stmt *st = NULL;
	bool ok = false;
	snprintf(out, size, "cannot open");
	int src = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL);
	if (src == SQLITE_OK)
		src = sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL);
	if (src == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
		const unsigned char *t = sqlite3_column_text(st, 0);
		snprintf(out, size, "%s", t ? (const char *)t : "(null)");
		ok = t && strcmp((const char *)t, "ok") == 0 && sqlite3_step(st) == SQLITE_DONE;
	} else if (db) {
		snprintf(out, size, "%s", sqlite3_errmsg(db));
	}
	sqlite3_finalize(st);
	sqlite3_close(db);
	return ok;
}

/* Removes the run's directory: it holds files only. */
static void remove_dir(const char *dir)
{
	char path[4096];
	DIR *d = opendir(dir);
	if (d == NULL) {
		perror(dir);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if (unlink(path) != 0)
			perror(path);
	}
	closedir(d);
	if (rmdir(dir) != 0)
		perror(dir);
}

static int pipe_cloexec(int fds[2])
{
	if (pipe(fds) != 0)
		return -1;
	fcntl(fds[0], F_SETFD, FD_CLOEXEC);
	fcntl(fds[1], F_SETFD, FD_CLOEXEC);
	return 0;
}

/* Waits for every child until deadline (then kills what is left). Returns how many failed. */
static int wait_children(pid_t *pids, int n, int64_t deadline)
{
	int failed = 0, left = 0;
	for (int i = 0; i < n; i++)
		left += pids[i] > 0;
	while (left > 0) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid > 0) {
			if (bw_test_child_reaped(pids, n, pid, status, stdout, "  ", &failed) >= 0)
				left--;
			continue;
		}
		if (pid < 0 && errno != EINTR)
			break;
		if (now_ns() > deadline) {
			for (int i = 0; i < n; i++)
				if (pids[i] > 0) {
					printf("  child %d still running at the deadline: killed\n",
					       i);
					kill(pids[i], SIGKILL);
				}
			deadline = INT64_MAX;
		}
		sleep_us(20000);
	}
	return failed;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: stress [--procs N] [--seconds S] [--ports-min P --ports-max Q]\n"
		"              [--min-cycles C] [--broken] [--expect-overlaps] [--keep] [DIR]\n"
		"Without DIR a fresh directory under /tmp is used and removed afterwards.\n");
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		int *target = NULL, lo = 1, hi = 0;
		if (strcmp(a, "--procs") == 0) {
			target = &o->procs;
			hi = MAX_PROCS;
		} else if (strcmp(a, "--seconds") == 0) {
			target = &o->seconds;
			hi = 3600;
		} else if (strcmp(a, "--ports-min") == 0) {
			target = &o->port_min;
			hi = 65535;
		} else if (strcmp(a, "--ports-max") == 0) {
			target = &o->port_max;
			hi = 65535;
		} else if (strcmp(a, "--min-cycles") == 0) {
			target = &o->min_cycles;
			lo = 0;
			hi = INT32_MAX;
		} else if (strcmp(a, "--broken") == 0) {
			o->broken = true;
		} else if (strcmp(a, "--expect-overlaps") == 0) {
			o->expect_overlaps = true;
		} else if (strcmp(a, "--keep") == 0) {
			o->keep = true;
		} else if (a[0] == '-' || o->dir != NULL) {
			return -1;
		} else {
			o->dir = a;
		}
		if (target != NULL && (i + 1 >= argc || parse_int(argv[++i], lo, hi, target) != 0))
			return -1;
	}
	if (o->port_min > o->port_max)
		return -1;
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o = {8, 10, 20000, 20100, 20, false, false, false, NULL};
	char tmpl[] = "/tmp/bw-stress-XXXXXX";
	char path[4096];
	bool made_dir = false;
	pid_t pids[MAX_PROCS] = {0};
	struct hold *holds = NULL;
	int64_t *lat = NULL;
	size_t n_holds = 0, cap_holds = 0, n_lat = 0, cap_lat = 0;
	struct child_stats st[MAX_PROCS];
	long cycles[MAX_PROCS];
	struct verdict v = {0, 0};
	int ready_pipe[2] = {-1, -1}, go_pipe[2] = {-1, -1};
	int status = 1;

	signal(SIGPIPE, SIG_IGN);
	if (parse_opts(argc, argv, &o) != 0) {
		usage();
		return 2;
	}
	if (o.dir == NULL) {
		if (mkdtemp(tmpl) == NULL) {
			perror("mkdtemp");
			return 2;
		}
		o.dir = tmpl;
		made_dir = true;
	}
	printf("stress: %d processes x %d s, ports %d-%d (%d), %s, dir %s\n", o.procs, o.seconds,
	       o.port_min, o.port_max, o.port_max - o.port_min + 1,
	       o.broken ? "BROKEN naive allocator" : "bw_ledger", o.dir);
	if (o.broken && naive_create(o.dir) != 0)
		goto out;
	if (pipe_cloexec(ready_pipe) != 0 || pipe_cloexec(go_pipe) != 0) {
		perror("pipe");
		goto out;
	}

	fflush(stdout);
	fflush(stderr);
	int started = 0;
	for (int i = 0; i < o.procs; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			break;
		}
		if (pid == 0) {
			close(ready_pipe[0]);
			close(go_pipe[1]);
			exit(child_main(&o, i, ready_pipe[1], go_pipe[0]));
		}
		pids[i] = pid;
		started++;
	}
	close(ready_pipe[1]);
	ready_pipe[1] = -1;
	close(go_pipe[0]);
	go_pipe[0] = -1;

	/* The start line: every child has opened, registered and claimed (or failed). */
	int ready = 0, setup_failed = o.procs - started;
	int64_t setup_deadline = now_ns() + (int64_t)SETUP_TIMEOUT_MS * 1000000;
	while (ready + setup_failed < o.procs) {
		struct pollfd pfd = {ready_pipe[0], POLLIN, 0};
		int64_t left_ms = (setup_deadline - now_ns()) / 1000000;
		if (left_ms <= 0 || poll(&pfd, 1, (int)left_ms) == 0) {
			printf("  setup timed out: %d of %d ready\n", ready, o.procs);
			break;
		}
		char byte;
		ssize_t got = read(ready_pipe[0], &byte, 1);
		if (got == 1 && byte == 'R')
			ready++;
		else if (got == 1)
			setup_failed++;
		else if (got == 0 || errno != EINTR)
			break;
	}
	close(go_pipe[1]);
	go_pipe[1] = -1;
	int64_t t_start = now_ns();
	int exit_failed = wait_children(pids, o.procs,
					t_start + ((int64_t)o.seconds + EXIT_GRACE_S) * 1000000000);
	double wall = (double)(now_ns() - t_start) / 1e9;

	/* Gather what the children wrote. */
	long total_cycles = 0, total_res = 0, total_enoports = 0, total_busy = 0, total_other = 0;
	int missing = 0;
	printf("\nper process (%.1f s):\n  proc  cycles  ports  enoports  busy  other\n", wall);
	for (int i = 0; i < o.procs; i++) {
		memset(&st[i], 0, sizeof(st[i]));
		path_in(path, sizeof(path), o.dir, "stats", i);
		FILE *fp = fopen(path, "r");
		if (fp == NULL ||
		    fscanf(fp, "%ld %ld %ld %ld %ld\n", &st[i].cycles, &st[i].reservations,
			   &st[i].enoports, &st[i].busy, &st[i].other) != 5) {
			printf("  %4d  no stats\n", i);
			missing++;
			st[i].other++;
		} else if (fgets(st[i].first_error, sizeof(st[i].first_error), fp) != NULL) {
			st[i].first_error[strcspn(st[i].first_error, "\n")] = '\0';
		}
		if (fp)
			fclose(fp);
		cycles[i] = st[i].cycles;
		total_cycles += st[i].cycles;
		total_res += st[i].reservations;
		total_enoports += st[i].enoports;
		total_busy += st[i].busy;
		total_other += st[i].other;
		printf("  %4d  %6ld  %5ld  %8ld  %4ld  %5ld%s%s\n", i, st[i].cycles,
		       st[i].reservations, st[i].enoports, st[i].busy, st[i].other,
		       st[i].first_error[0] ? "  first error: " : "", st[i].first_error);
		path_in(path, sizeof(path), o.dir, "intervals", i);
		if (slurp(path, sizeof(struct hold), (void **)&holds, &n_holds, &cap_holds) != 0)
			missing++;
		path_in(path, sizeof(path), o.dir, "latencies", i);
		if (slurp(path, sizeof(int64_t), (void **)&lat, &n_lat, &cap_lat) != 0)
			missing++;
	}
	qsort(cycles, (size_t)o.procs, sizeof(cycles[0]), cmp_long);
	long min_cycles = cycles[0];
	printf("cycles per process: min %ld, median %ld, max %ld; total %ld cycles, %ld port "
	       "reservations, %ld BW_ENOPORTS\n",
	       min_cycles, cycles[o.procs / 2], cycles[o.procs - 1], total_cycles, total_res,
	       total_enoports);
	if (n_lat > 0) {
		qsort(lat, n_lat, sizeof(*lat), cmp_i64);
		printf("reserve latency (%zu calls that succeeded): p50 %.3f ms, p99 %.3f ms, max "
		       "%.3f ms\n",
		       n_lat, (double)lat[n_lat / 2] / 1e6, (double)lat[n_lat * 99 / 100] / 1e6,
		       (double)lat[n_lat - 1] / 1e6);
	}

	long out_of_range = 0;
	long overlaps = find_overlaps(holds, n_holds, &o, &out_of_range);
	printf("holding intervals checked: %zu, overlaps found: %ld\n", n_holds, overlaps);

	path_in(path, sizeof(path), o.dir, "ledger.db", -1);
	long port_rows, worker_rows;
	ledger_leftovers(path, &port_rows, &worker_rows);
	char integrity[256];
	bool integ = integrity_ok(path, integrity, sizeof(integrity));

	printf("\nchecks:\n");
	check(&v, ready == o.procs && setup_failed == 0 && exit_failed == 0 && missing == 0,
	      "every process set up, exited 0 and wrote its records (%d ready, %d failed "
	      "set-up, %d bad exits, %d missing files)",
	      ready, setup_failed, exit_failed, missing);
	check(&v, overlaps == 0 && out_of_range == 0 && n_holds > 0,
	      "no port ever had two live holders (%ld overlaps, %ld out of range, %zu intervals)",
	      overlaps, out_of_range, n_holds);
	check(&v, total_busy == 0, "no BW_EBUSY escaped the retry bound (%ld)", total_busy);
	check(&v, total_other == 0, "no other errors (%ld)", total_other);
	check(&v, min_cycles >= o.min_cycles,
	      "every process made progress (min %ld cycles, need %d)", min_cycles, o.min_cycles);
	check(&v, port_rows == 0, "ports table empty afterwards (%ld rows)", port_rows);
	check(&v, worker_rows == 0, "every worker unregistered cleanly (%ld rows left)",
	      worker_rows);
	check(&v, integ, "PRAGMA integrity_check: %s", integrity);
	printf("%d passed, %d failed\n", v.passed, v.failed);

	if (o.expect_overlaps) {
		bool ok = v.failed > 0 && overlaps > 0;
		printf("expect-overlaps: the run %s with %ld overlaps: the checker %s\n",
		       v.failed > 0 ? "failed" : "passed", overlaps,
		       ok ? "caught the broken allocator (PASS)" : "did NOT catch it (FAIL)");
		status = ok ? 0 : 1;
	} else {
		status = v.failed == 0 ? 0 : 1;
	}
out:
	for (int i = 0; i < 2; i++) {
		if (ready_pipe[i] >= 0)
			close(ready_pipe[i]);
		if (go_pipe[i] >= 0)
			close(go_pipe[i]);
	}
	free(holds);
	free(lat);
	if (made_dir && !o.keep) {
		remove_dir(o.dir);
	} else {
		printf("records kept in %s\n", o.dir);
	}
	return status;
}
