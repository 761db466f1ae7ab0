/* bench_retention.c: the ledger's size over many jobs with retention on, and the writer stall its passes cause. */
#include "clock.h"
#include "error.h"
#include "ledger.h"
#include "nbd.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/*
 * One process (the worker) runs --jobs jobs through the ledger's real API, one after the
 * other, as bw-worker does: claim (the job row, its disks, backup.accepted) → reserve every
 * port and move on → transferring with backup.started and a few backup.progress → ports
 * released → completed with a backup.disk.completed per disk and backup.completed; every
 * --fail-every-th job instead fails (backup.failed), releases its ports, is compensated
 * (backup.cleanup) and leaves a qemu-nbd log per disk in DIR/logs, as a failed job does. Then
 * the relay's part: every event marked published.
 *
 * Time is simulated: the ledger's wall clock is this program's (-Wl,--wrap=bw_clock_wall_ms,
 * shared through a MAP_SHARED page), and job i happens at day i / --per-day. A second
 * process (the maintainer) runs the maintenance pass as the worker's loop does, once per
 * simulated minute: bw_ledger_prune (now = the simulated time, --retention-days) and then
 * bw_ledger_maintain (quarantine expiry, TRUNCATE checkpoint). With --no-prune it runs
 * bw_ledger_maintain alone: the same load without retention, for the latency baseline.
 *
 * Every --report jobs one line: the simulated day, the ledger's size (db + wal, and the
 * db's free pages), its rows, the log files left, and the worker's claim latency in that
 * interval (p50/p99/max, each claim one BEGIN IMMEDIATE transaction with its fsync), next
 * to the worst of all its writes and the longest a prune batch held the write lock (what it
 * can have made a writer wait, bw_prune_stats.lock_max_us). At the end one line of
 * key=value pairs (scripts/bench-retention reads it). No timing is asserted: exit 0 when
 * every job went through, 1 on an error, 2 usage.
 */

enum {
	PORT_MIN = 31000,
	PORT_MAX = 31100,
	MAX_DISKS = 16,
	PROGRESS_EVENTS = 3, /* backup.progress events of a job (every 5 s while it runs) */
	BODY_SIZE = 4096,
	EVENT_BODY_BYTES = 420, /* about what events.c writes for a 2-disk VM */
	MESSAGE_BYTES = 640,	/* about a 2-disk backup.start */
	LOG_BYTES = 300,	/* a failed disk's qemu-nbd log: a few lines */
};

/* The worker's loop runs maintenance once a minute; here once a simulated minute. */
#define MAINTAIN_SIM_MS INT64_C(60000)
#define DAY_MS INT64_C(86400000)
/* The maintainer looks at the simulated clock this often (real time). */
#define MAINTAINER_POLL_US 200
/* The simulation starts at a fixed instant, so two runs write the same timestamps. */
#define SIM_EPOCH_MS INT64_C(1798761600000) /* 2027-01-01T00:00:00Z */

/* Shared between the worker and the maintainer (MAP_SHARED, made before the fork). */
struct shared {
	int64_t sim_now_ms; /* 0: the real clock */
	int stop;
	/* the maintainer's figures, cumulative */
	int64_t passes, pruned_jobs, pruned_files, pruned_tombstones, skipped, errors;
	int64_t max_pass_us, max_prune_us, max_maintain_us;
	int64_t max_lock_us;	      /* the longest a prune batch held the write lock */
	int64_t interval_max_lock_us; /* the same, reset by the worker at each report */
};

static struct shared *sh;

int64_t __real_bw_clock_wall_ms(void);
int64_t __wrap_bw_clock_wall_ms(void);

/* The ledger's wall clock: the simulated one once the run starts. */
int64_t __wrap_bw_clock_wall_ms(void)
{
	int64_t sim = sh ? __atomic_load_n(&sh->sim_now_ms, __ATOMIC_ACQUIRE) : 0;
	return sim ? sim : __real_bw_clock_wall_ms();
}

static void max_into(int64_t *at, int64_t v)
{
	int64_t cur = __atomic_load_n(at, __ATOMIC_RELAXED);
	while (v > cur &&
	       !__atomic_compare_exchange_n(at, &cur, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
}

struct opts {
	long jobs, per_day, report, fail_every, compare;
	int retention_days, disks;
	bool prune;
	const char *dir;
	char ledger[PATH_MAX];
};

/* ---- the maintainer ---------------------------------------------------------------------- */

static int maintainer(const struct opts *o)
{
	struct bw_ledger *l = NULL;
	int rc = bw_ledger_open(&l, o->ledger, PORT_MIN, PORT_MAX);
	if (rc != 0) {
		fprintf(stderr, "maintainer: open: %s\n", bw_strerror(rc));
		return 1;
	}
	int64_t last = 0;
	while (!__atomic_load_n(&sh->stop, __ATOMIC_ACQUIRE)) {
		int64_t now = __atomic_load_n(&sh->sim_now_ms, __ATOMIC_ACQUIRE);
		if (now == 0 || now - last < MAINTAIN_SIM_MS) {
			usleep(MAINTAINER_POLL_US);
			continue;
		}
		last = now;
		int64_t t0 = bw_clock_mono_us(), t1 = t0;
		if (o->prune) {
			struct bw_prune p = {now, o->retention_days, o->dir, 0, 0};
			struct bw_prune_stats st;
			rc = bw_ledger_prune(l, &p, &st);
			t1 = bw_clock_mono_us();
			if (rc != 0) {
				fprintf(stderr, "maintainer: prune: %s (%s)\n", bw_strerror(rc),
					bw_ledger_errmsg(l));
				__atomic_add_fetch(&sh->errors, 1, __ATOMIC_RELAXED);
			}
			__atomic_add_fetch(&sh->pruned_jobs, (int64_t)st.jobs, __ATOMIC_RELAXED);
			__atomic_add_fetch(&sh->pruned_files, (int64_t)st.files, __ATOMIC_RELAXED);
			__atomic_add_fetch(&sh->pruned_tombstones, (int64_t)st.tombstones,
					   __ATOMIC_RELAXED);
			__atomic_add_fetch(&sh->skipped, st.skipped ? 1 : 0, __ATOMIC_RELAXED);
			max_into(&sh->max_lock_us, st.lock_max_us);
			max_into(&sh->interval_max_lock_us, st.lock_max_us);
		}
		rc = bw_ledger_maintain(l);
		int64_t t2 = bw_clock_mono_us();
		if (rc != 0) {
			fprintf(stderr, "maintainer: maintain: %s\n", bw_strerror(rc));
			__atomic_add_fetch(&sh->errors, 1, __ATOMIC_RELAXED);
		}
		__atomic_add_fetch(&sh->passes, 1, __ATOMIC_RELAXED);
		max_into(&sh->max_prune_us, t1 - t0);
		max_into(&sh->max_maintain_us, t2 - t1);
		max_into(&sh->max_pass_us, t2 - t0);
	}
	bw_ledger_close(l);
	return 0;
}

/* ---- the worker -------------------------------------------------------------------------- */

/* A JSON-ish body of about n bytes naming the job (the ledger stores text, unparsed). */
static void body(char *out, size_t n, const char *kind, const char *job)
{
	int len =
	    snprintf(out, BODY_SIZE, "{\"event\":\"%s\",\"job_id\":\"%s\",\"pad\":\"", kind, job);
	while ((size_t)len + 3 < n && len + 3 < BODY_SIZE)
		out[len++] = 'x';
	snprintf(out + len, (size_t)(BODY_SIZE - len), "\"}");
}

struct job_ctx {
	struct bw_ledger *l;
	const struct opts *o;
	char id[64];
	int64_t gen, seq;
	int64_t write_max_us;	  /* the worst write of the interval */
	int64_t job_write_max_us; /* and of the current job */
};

static int timed(struct job_ctx *j, int rc, int64_t t0)
{
	int64_t us = bw_clock_mono_us() - t0;
	if (us > j->write_max_us)
		j->write_max_us = us;
	if (us > j->job_write_max_us)
		j->job_write_max_us = us;
	return rc;
}

/* Appends n events named kind (with /key suffixes when keyed) in one transition to state. */
static int step(struct job_ctx *j, enum bw_job_state state, const char *kind, int n,
		const struct bw_disk_update *disks, size_t n_disks)
{
	struct bw_event ev[MAX_DISKS + 1];
	char ids[MAX_DISKS + 1][160], bodies[MAX_DISKS + 1][BODY_SIZE];
	for (int i = 0; i < n; i++) {
		snprintf(ids[i], sizeof(ids[i]), "%s/%s/%" PRId64, j->id, kind, j->seq + 1 + i);
		body(bodies[i], EVENT_BODY_BYTES, kind, j->id);
		ev[i] = (struct bw_event){ids[i], kind, j->seq + 1 + i, bodies[i]};
	}
	struct bw_fence f = {j->id, j->gen};
	int64_t t0 = bw_clock_mono_us();
	int rc = bw_ledger_transition_disks(j->l, &f, state, NULL, ev, (size_t)n, disks, n_disks);
	if (rc == 0)
		j->seq += n;
	return timed(j, rc, t0);
}

static int make_log(const struct opts *o, const char *job, int64_t key)
{
	char path[PATH_MAX], text[LOG_BYTES];
	if (bw_nbd_log_path(path, sizeof(path), o->dir, job, key) != 0)
		return BW_ERANGE;
	memset(text, 'l', sizeof(text));
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return BW_EIO;
	bool ok = write(fd, text, sizeof(text)) == (ssize_t)sizeof(text);
	close(fd);
	return ok ? 0 : BW_EIO;
}

/* One job, start to end; its claim's latency in *claim_us. */
static int run_job(struct job_ctx *j, long i, int64_t *claim_us)
{
	const struct opts *o = j->o;
	struct bw_job_disk_new disks[MAX_DISKS];
	struct bw_disk_update upd[MAX_DISKS];
	int64_t keys[MAX_DISKS];
	char exports[MAX_DISKS][96], paths[MAX_DISKS][160], msg[BODY_SIZE], acc[BODY_SIZE],
	    acc_id[160];
	int ports[MAX_DISKS];
	bool fail = o->fail_every > 0 && i % o->fail_every == o->fail_every - 1;
	int rc;

	snprintf(j->id, sizeof(j->id), "bench-%07ld", i);
	for (int k = 0; k < o->disks; k++) {
		keys[k] = 2000 + k;
		snprintf(exports[k], sizeof(exports[k]), "%s-%" PRId64, j->id, keys[k]);
		snprintf(paths[k], sizeof(paths[k]), "/srv/repo/id-vm-%ld/%" PRId64 "/%s.qcow2",
			 i % 500, keys[k], j->id);
		disks[k] = (struct bw_job_disk_new){keys[k], exports[k], paths[k]};
	}
	body(msg, MESSAGE_BYTES, "backup.start", j->id);
	body(acc, EVENT_BODY_BYTES, "backup.accepted", j->id);
	snprintf(acc_id, sizeof(acc_id), "%s/backup.accepted", j->id);
	struct bw_event accepted = {acc_id, "backup.accepted", 1, acc};

	int64_t t0 = bw_clock_mono_us();
	rc = bw_ledger_claim(j->l, j->id, msg, disks, (size_t)o->disks, &accepted, &j->gen, NULL);
	*claim_us = bw_clock_mono_us() - t0;
	if ((rc = timed(j, rc, t0)) != 0)
		return rc;
	j->seq = 1;
	struct bw_fence f = {j->id, j->gen};

	for (int k = 0; k < o->disks; k++)
		upd[k] = (struct bw_disk_update){keys[k], BW_DISK_ROW_SERVING, 4242, 1, true};
	t0 = bw_clock_mono_us();
	rc = bw_ledger_reserve_and_move(j->l, &f, keys, (size_t)o->disks, ports, BW_JOB_SERVING,
					upd, (size_t)o->disks);
	if ((rc = timed(j, rc, t0)) != 0 ||
	    (rc = step(j, BW_JOB_TRANSFERRING, "backup.started", 1, NULL, 0)) != 0 ||
	    (rc = step(j, BW_JOB_TRANSFERRING, "backup.progress", PROGRESS_EVENTS, NULL, 0)) != 0)
		return rc;
	if (fail && (rc = step(j, BW_JOB_FAILED, "backup.failed", 1, NULL, 0)) != 0)
		return rc;
	t0 = bw_clock_mono_us();
	if ((rc = timed(j, bw_ledger_release_all(j->l, &f, NULL), t0)) != 0)
		return rc;
	if (fail) {
		for (int k = 0; k < o->disks; k++)
			if ((rc = make_log(o, j->id, keys[k])) != 0)
				return rc;
		return step(j, BW_JOB_COMPENSATED, "backup.cleanup", 1, NULL, 0);
	}
	for (int k = 0; k < o->disks; k++)
		upd[k] = (struct bw_disk_update){keys[k], BW_DISK_ROW_COMPLETED, 0, 0, true};
	if ((rc = step(j, BW_JOB_FINALIZING, "backup.disk.completed", o->disks, upd,
		       (size_t)o->disks)) != 0)
		return rc;
	return step(j, BW_JOB_COMPLETED, "backup.completed", 1, NULL, 0);
}

/* The relay's part: every unpublished event marked published (confirmed by the broker). */
static int relay(struct job_ctx *j)
{
	struct bw_outbox_row *rows = NULL;
	size_t n = 0;
	int64_t ids[64];
	int rc = bw_ledger_outbox_next(j->l, 0, 64, &rows, &n);
	if (rc != 0)
		return rc;
	for (size_t i = 0; i < n; i++)
		ids[i] = rows[i].id;
	bw_outbox_free(rows, n);
	int64_t t0 = bw_clock_mono_us();
	return timed(j, bw_ledger_outbox_published(j->l, ids, n), t0);
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static double mib(int64_t bytes)
{
	return (double)bytes / (1024.0 * 1024.0);
}

static int64_t file_size(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 ? (int64_t)st.st_size : 0;
}

static long count_files(const char *dir)
{
	DIR *d = opendir(dir);
	long n = 0;
	if (d == NULL)
		return -1;
	for (struct dirent *e; (e = readdir(d)) != NULL;)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/* One integer from a read-only look at the ledger (closed again: it holds no snapshot). */
static int64_t peek(const char *ledger, const char *sql)
{
	sqlite3 *db = NULL;
	sqlite3_stmt *s = NULL;
	int64_t v = -1;
	if (sqlite3_open_v2(ledger, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
	    sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	sqlite3_close(db);
	return v;
}

static int worker(const struct opts *o, pid_t maint)
{
	struct bw_ledger *l = NULL;
	struct job_ctx j = {0};
	char wal[PATH_MAX + 8], logs[PATH_MAX];
	int64_t *lat = calloc((size_t)o->report, sizeof(*lat));
	int64_t first_size = -1, steady_size = -1, last_size = -1, peak_size = 0;
	long steady_at = 0, settled_at = 0;
	int64_t settled_size = -1;
	int64_t worst_claim = 0, worst_write = 0, window_write = 0;
	/* past the retention window every pass has jobs to prune: the latency that counts */
	long window = (long)o->retention_days * o->per_day;
	int64_t *all = calloc((size_t)o->jobs, sizeof(*all));
	int rc;

	snprintf(wal, sizeof(wal), "%s-wal", o->ledger);
	snprintf(logs, sizeof(logs), "%s/logs", o->dir);
	if (lat == NULL || all == NULL)
		return 1;
	if ((rc = bw_ledger_open(&l, o->ledger, PORT_MIN, PORT_MAX)) != 0 ||
	    (rc = bw_ledger_register(l, "bench-worker", o->dir)) != 0) {
		fprintf(stderr, "worker: %s\n", bw_strerror(rc));
		return 1;
	}
	j.l = l;
	j.o = o;
	printf("%8s %6s %9s %8s %9s %8s %7s %10s %6s %22s %13s %13s\n", "jobs", "day", "db MiB",
	       "wal MiB", "total MiB", "free MiB", "jobs", "tombstones", "logs",
	       "claim p50/p99/max ms", "write max ms", "prune lock ms");
	int64_t t_start = bw_clock_mono_us();
	for (long i = 0; i < o->jobs; i++) {
		__atomic_store_n(&sh->sim_now_ms, SIM_EPOCH_MS + i * DAY_MS / o->per_day,
				 __ATOMIC_RELEASE);
		int64_t claim_us = 0;
		j.job_write_max_us = 0;
		if ((rc = run_job(&j, i, &claim_us)) != 0 || (rc = relay(&j)) != 0) {
			fprintf(stderr, "worker: job %ld: %s (%s)\n", i, bw_strerror(rc),
				bw_ledger_errmsg(l));
			break;
		}
		lat[i % o->report] = claim_us;
		all[i] = claim_us;
		if (i >= window && j.job_write_max_us > window_write)
			window_write = j.job_write_max_us;
		if ((i + 1) % o->report != 0)
			continue;
		qsort(lat, (size_t)o->report, sizeof(*lat), cmp_i64);
		int64_t size = file_size(o->ledger) + file_size(wal);
		int64_t page = peek(o->ledger, "PRAGMA page_size");
		int64_t free_pages = peek(o->ledger, "PRAGMA freelist_count");
		double day = (double)(i + 1) / (double)o->per_day;
		int64_t held = __atomic_exchange_n(&sh->interval_max_lock_us, 0, __ATOMIC_RELAXED);
		printf("%8ld %6.1f %9.1f %8.1f %9.1f %8.1f %7" PRId64 " %10" PRId64 " %6ld"
		       " %8.2f/%5.2f/%7.2f %13.2f %13.2f\n",
		       i + 1, day, mib(file_size(o->ledger)), mib(file_size(wal)), mib(size),
		       mib(page * free_pages), peek(o->ledger, "SELECT count(*) FROM jobs"),
		       peek(o->ledger, "SELECT count(*) FROM job_tombstones"), count_files(logs),
		       (double)lat[o->report / 2] / 1000.0,
		       (double)lat[o->report * 99 / 100] / 1000.0,
		       (double)lat[o->report - 1] / 1000.0, (double)j.write_max_us / 1000.0,
		       (double)held / 1000.0);
		fflush(stdout);
		if (first_size < 0)
			first_size = size;
		/* steady: the first point a whole interval past the retention window */
		if (steady_size < 0 && day >= o->retention_days + (double)o->report / o->per_day) {
			steady_size = size;
			steady_at = i + 1;
		}
		/* settled: also a whole interval past the tombstones' window (they stop growing) */
		if (settled_size < 0 &&
		    day >= (double)o->retention_days * BW_PRUNE_TOMBSTONE_FACTOR +
				   (double)o->report / o->per_day) {
			settled_size = size;
			settled_at = i + 1;
		}
		last_size = size;
		if (size > peak_size)
			peak_size = size;
		if (lat[o->report - 1] > worst_claim)
			worst_claim = lat[o->report - 1];
		if (j.write_max_us > worst_write)
			worst_write = j.write_max_us;
		j.write_max_us = 0;
	}
	int64_t elapsed = bw_clock_mono_us() - t_start;
	__atomic_store_n(&sh->stop, 1, __ATOMIC_RELEASE);
	int st = 0;
	waitpid(maint, &st, 0);
	long done = rc == 0 ? o->jobs : 0;
	long in_window = done > window ? done - window : 0;
	int64_t *w = in_window > 0 ? all + window : NULL;
	char win[512] = "";
	int wlen = 0;
	if (w) {
		/* the first --compare jobs past the window: as many as the baseline has */
		long nc = o->compare > 0 && o->compare < in_window ? o->compare : in_window;
		int64_t *c = calloc((size_t)nc, sizeof(*c));
		if (c == NULL)
			return 1;
		memcpy(c, all + window, (size_t)nc * sizeof(*c));
		qsort(c, (size_t)nc, sizeof(*c), cmp_i64);
		wlen = snprintf(win, sizeof(win),
				" cmp_n=%ld cmp_claim_p50_ms=%.3f cmp_claim_p99_ms=%.3f"
				" cmp_claim_p999_ms=%.3f cmp_claim_max_ms=%.3f",
				nc, (double)c[nc / 2] / 1000.0, (double)c[nc * 99 / 100] / 1000.0,
				(double)c[nc * 999 / 1000] / 1000.0, (double)c[nc - 1] / 1000.0);
		free(c);
		qsort(w, (size_t)in_window, sizeof(*w), cmp_i64); /* after the copy: in job order */
	}
	if (w)
		snprintf(win + wlen, sizeof(win) - (size_t)wlen,
			 " window_from=%ld win_claim_p50_ms=%.3f win_claim_p99_ms=%.3f"
			 " win_claim_p999_ms=%.3f win_claim_max_ms=%.3f win_write_max_ms=%.3f",
			 window + 1, (double)w[in_window / 2] / 1000.0,
			 (double)w[in_window * 99 / 100] / 1000.0,
			 (double)w[in_window * 999 / 1000] / 1000.0,
			 (double)w[in_window - 1] / 1000.0, (double)window_write / 1000.0);
	qsort(all, (size_t)done, sizeof(*all), cmp_i64);
	if (done > 0)
		printf("bench_retention mode=%s jobs=%ld per_day=%ld retention_days=%d disks=%d"
		       " seconds=%.1f first_mib=%.2f steady_at=%ld steady_mib=%.2f settled_at=%ld"
		       " settled_mib=%.2f last_mib=%.2f"
		       " peak_mib=%.2f claim_p50_ms=%.3f claim_p99_ms=%.3f claim_p999_ms=%.3f"
		       " claim_max_ms=%.3f write_max_ms=%.3f passes=%" PRId64 " pruned=%" PRId64
		       " files=%" PRId64 " tombstones_expired=%" PRId64 " skipped=%" PRId64
		       " pass_max_ms=%.3f prune_max_ms=%.3f maintain_max_ms=%.3f"
		       " prune_lock_max_ms=%.3f errors=%" PRId64 "%s\n",
		       o->prune ? "prune" : "no-prune", done, o->per_day, o->retention_days,
		       o->disks, (double)elapsed / 1e6, mib(first_size), steady_at,
		       mib(steady_size), settled_at, mib(settled_size), mib(last_size), mib(peak_size),
		       (double)all[done / 2] / 1000.0, (double)all[done * 99 / 100] / 1000.0,
		       (double)all[done * 999 / 1000] / 1000.0, (double)all[done - 1] / 1000.0,
		       (double)worst_write / 1000.0, sh->passes, sh->pruned_jobs, sh->pruned_files,
		       sh->pruned_tombstones, sh->skipped, (double)sh->max_pass_us / 1000.0,
		       (double)sh->max_prune_us / 1000.0, (double)sh->max_maintain_us / 1000.0,
		       (double)sh->max_lock_us / 1000.0, sh->errors, win);
	free(all);
	free(lat);
	bw_ledger_close(l);
	bool ok = rc == 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0 && sh->errors == 0;
	return ok ? 0 : 1;
}

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: bench_retention [--jobs N] [--per-day N] [--retention-days D] [--disks K]\n"
	    "                       [--report N] [--fail-every N] [--compare N] [--no-prune] DIR\n"
	    "Runs N jobs (default 100000, 1000 a simulated day, 2 disks, every 10th failing)\n"
	    "through the ledger DIR/ledger.db with retention D days (14), a line every N jobs\n"
	    "(10000). --compare N: latency figures also over the first N jobs past the window.\n"
	    "Exit 0 ok, 1 an error, 2 usage.\n");
}

int main(int argc, char **argv)
{
	struct opts o = {100000, 1000, 10000, 10, 0, 14, 2, true, NULL, {0}};
	static const struct option longopts[] = {{"jobs", required_argument, NULL, 'n'},
						 {"per-day", required_argument, NULL, 'd'},
						 {"retention-days", required_argument, NULL, 'r'},
						 {"disks", required_argument, NULL, 'k'},
						 {"report", required_argument, NULL, 'e'},
						 {"fail-every", required_argument, NULL, 'f'},
						 {"compare", required_argument, NULL, 'c'},
						 {"no-prune", no_argument, NULL, 'P'},
						 {"help", no_argument, NULL, 'h'},
						 {NULL, 0, NULL, 0}};
	int ch;
	while ((ch = getopt_long(argc, argv, "n:d:r:k:e:f:c:Ph", longopts, NULL)) != -1) {
		switch (ch) {
		case 'n':
			o.jobs = atol(optarg);
			break;
		case 'd':
			o.per_day = atol(optarg);
			break;
		case 'r':
			o.retention_days = atoi(optarg);
			break;
		case 'k':
			o.disks = atoi(optarg);
			break;
		case 'e':
			o.report = atol(optarg);
			break;
		case 'f':
			o.fail_every = atol(optarg);
			break;
		case 'c':
			o.compare = atol(optarg);
			break;
		case 'P':
			o.prune = false;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc - 1 || o.jobs < 1 || o.per_day < 1 || o.report < 1 ||
	    o.report > o.jobs || o.retention_days < 1 || o.disks < 1 || o.disks > MAX_DISKS ||
	    o.fail_every < 0) {
		usage(stderr);
		return 2;
	}
	o.dir = argv[optind];
	char logs[PATH_MAX];
	snprintf(o.ledger, sizeof(o.ledger), "%s/ledger.db", o.dir);
	snprintf(logs, sizeof(logs), "%s/logs", o.dir);
	if (mkdir(logs, 0750) != 0 && errno != EEXIST) {
		perror(logs);
		return 1;
	}
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(sh, 0, sizeof(*sh));
	/* The schema first, so that the two processes do not race to create it. */
	struct bw_ledger *l = NULL;
	int rc = bw_ledger_open(&l, o.ledger, PORT_MIN, PORT_MAX);
	bw_ledger_close(l);
	if (rc != 0) {
		fprintf(stderr, "open %s: %s\n", o.ledger, bw_strerror(rc));
		return 1;
	}
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0)
		_exit(maintainer(&o));
	return worker(&o, pid);
}
