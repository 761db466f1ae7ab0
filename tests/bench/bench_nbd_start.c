/* bench_nbd_start.c: the qemu-nbd supervisor and qcow2 targets under load, driven by scripts/bench-nbd and scripts/bench-start. */
#define _GNU_SOURCE /* POSIX_SPAWN_SETSID */
#include "child.h"
#include "error.h"
#include "nbd.h"
#include "proc.h"
#include "target.h"
#include "io.h"
#include "../testutil.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
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

/*
 * Subcommands (every result is one line of key=value pairs on stdout; diagnostics on
 * stderr; exit 0 when everything it checked was right, 1 otherwise, 2 usage):
 *
 *   gen PATH SIZE_MIB [SEED]
 *	Writes the benchmark source: SIZE_MIB chunks of 1 MiB, each pseudo-random bytes, zero
 *	bytes or compressible text (numbered log-like lines, no zero sector; a three-sided die
 *	per chunk), from a seeded splitmix64; the same seed gives the same file. Zero chunks
 *	are written (the file has no holes), then fsync'd.
 *
 *   serve IMAGE PORT EXPORT LOG
 *	bw_nbd_spawn (127.0.0.1, --shared=10, as the earlier hub), bw_nbd_wait_ready, prints
 *	"ready pid=… wait_ms=…", waits for a line (or EOF, or SIGTERM/SIGINT/SIGHUP) on stdin,
 *	then bw_nbd_stop(BW_NBD_KEEP) and prints "stopped pid=… stop_ms=… rc=… status=…"
 *	(a server that never greeted is stopped with BW_NBD_DISCARD instead).
 *
 *   prepare K DIR BASEPORT SIZE_MIB many|serial|fork|parallel [pss]
 *	Times "prepare K disks" to "all K servers ready". many, serial: bw_target_create
 *	for each disk (the API: the qcow2 written in-process), then bw_nbd_spawn for each, none
 *	waiting for another's greeting (what the worker does; "many" is the older name); fork: the same
 *	images, then each server started the way bw_spawn did before it used posix_spawn
 *	(old_spawn below: fork, in the child reset every signal, setsid, dup2, close_range,
 *	execve; the parent blocked on a close-on-exec pipe until the exec: the "before" of
 *	that change, kept here to compare in one run); parallel: the same directories, then every `qemu-img create`
 *	started at once with bw_spawn and reaped with a blocking waitpid (the primitive
 *	bw_target_create replaced), then bw_nbd_spawn for each. Then bw_nbd_poll_ready round-robin with 1 ms sleeps until all are ready. With
 *	"pss", sums Pss/Rss of every server from /proc/<pid>/smaps_rollup. Then stops all
 *	(BW_NBD_DISCARD), counts those left alive and removes the images. Every server pid is
 *	appended to DIR/pids as it is spawned, for the script's cleanup should this die.
 *	Ports BASEPORT..BASEPORT+K-1; a server that finds its port taken (BW_EADDRINUSE: on a
 *	port inside the kernel's ephemeral range a client socket, even one in TIME_WAIT, can
 *	hold it) is started again on the next spare port from BASEPORT+K, as the worker will;
 *	port_retries counts them and the time includes them.
 *
 *   limit K DIR BASEPORT SIZE_MIB [pss]
 *	The limit of start latency without bw: K images made first by `qemu-img create` (not
 *	timed: bw writes its own, in its time), then, timed, every qemu-nbd started with
 *	posix_spawn (glibc: vfork semantics, the cheapest way to start a process; the same argv
 *	and GLIBC_TUNABLES as bw_nbd_spawn, a new session, output to DIR/nbd-I.log) and plain
 *	blocking connects to 127.0.0.1 reading the 16-byte greeting of each port until all
 *	answered (1 ms sleeps between sweeps). Prints a line like prepare's (mode=limit-c,
 *	create_ms=0). A port found taken: that server is started again on a spare port from
 *	BASEPORT+K, as prepare does. Then SIGTERM to all (again every 200 ms) and waitpid.
 *
 *   create-cost N DIR
 *	N times, alternately: bw_target_create (the qcow2 written in-process) and the same
 *	image by `qemu-img create` through bw_spawn + a blocking waitpid; prints the median,
 *	minimum and 90th percentile of both.
 */

enum {
	SHARED = 10,		  /* --shared of the earlier hub */
	READY_TIMEOUT_MS = 20000, /* 100 servers on 2 cores take seconds */
	KEEP_STOP_TIMEOUT_MS = 120000,
	DISCARD_STOP_TIMEOUT_MS = 5000,
	POLL_SLEEP_US = 1000,
	MAX_DISKS = 512,
	MAX_RETRIES = 99, /* spare ports: BASEPORT+K .. BASEPORT+K+98 */
	CHUNK = 1 << 20,
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

/* SIGTERM/SIGINT/SIGHUP set a flag and interrupt blocking calls (no SA_RESTART): the
 * servers live in their own sessions and must be stopped by us, never orphaned. */
static void install_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double ms_since(int64_t t0)
{
	return (double)(now_ns() - t0) / 1e6;
}

static int parse_int(const char *s, long min, long max, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, size_t n)
{
	if (n == 0)
		return 0;
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* ---- gen ---------------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15u);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
	return z ^ (z >> 31);
}

static int cmd_gen(int argc, char **argv)
{
	long size_mib, seed = 1;
	if (argc < 2 || argc > 3 || parse_int(argv[1], 1, 1L << 20, &size_mib) != 0 ||
	    (argc == 3 && parse_int(argv[2], 0, LONG_MAX, &seed) != 0)) {
		fprintf(stderr, "usage: bench_nbd_start gen PATH SIZE_MIB [SEED]\n");
		return 2;
	}
	uint64_t *buf = malloc(CHUNK), *zero = calloc(1, CHUNK);
	char *text = malloc(CHUNK + 128);
	int fd = open(argv[0], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	int rc = 1;
	long n_random = 0, n_text = 0;
	if (buf == NULL || zero == NULL || text == NULL || fd < 0) {
		fprintf(stderr, "gen: %s: %s\n", argv[0], strerror(errno));
		goto out;
	}
	uint64_t state = (uint64_t)seed;
	for (long i = 0; i < size_mib; i++) {
		unsigned kind = (unsigned)(splitmix64(&state) % 3); /* 0 random, 1 zero, 2 text */
		const void *chunk = zero;
		if (kind == 0) {
			for (size_t j = 0; j < CHUNK / sizeof(*buf); j++)
				buf[j] = splitmix64(&state);
			n_random++;
			chunk = buf;
		} else if (kind == 2) {
			/* about 6:1 under zlib: lines that differ in a counter and one value */
			size_t o = 0;
			for (uint64_t line = 0; o < CHUNK; line++)
				o += (size_t)snprintf(text + o, 128,
						      "2026-12-02T03:%02u:%02u chunk=%06ld line=%06" PRIu64
						      " status=ok value=%04u\n",
						      (unsigned)(line / 60 % 60), (unsigned)(line % 60), i,
						      line, (unsigned)(splitmix64(&state) % 10000));
			n_text++;
			chunk = text;
		}
		if (bw_write_all(fd, chunk, CHUNK) != 0) {
			fprintf(stderr, "gen: write %s: %s\n", argv[0], strerror(errno));
			goto out;
		}
	}
	if (fsync(fd) != 0) {
		fprintf(stderr, "gen: fsync %s: %s\n", argv[0], strerror(errno));
		goto out;
	}
	printf("gen size_mib=%ld random_chunks=%ld zero_chunks=%ld text_chunks=%ld seed=%ld\n",
	       size_mib, n_random, size_mib - n_random - n_text, n_text, seed);
	rc = 0;
out:
	if (fd >= 0)
		close(fd);
	if (rc != 0)
		unlink(argv[0]);
	free(text);
	free(zero);
	free(buf);
	return rc;
}

/* ---- serve -------------------------------------------------------------------------- */

static int cmd_serve(int argc, char **argv)
{
	long port;
	char err[1024] = "";
	struct bw_nbd n;
	if ((argc != 4 && argc != 5) || parse_int(argv[1], 1, 65535, &port) != 0) {
		fprintf(stderr, "usage: bench_nbd_start serve IMAGE PORT EXPORT LOG [TLS_DIR]\n");
		return 2;
	}
	struct bw_nbd_opts o = {"qemu-nbd", argv[0], argv[2], "127.0.0.1", (int)port, SHARED,
				argv[3], argc == 5 ? argv[4] : NULL};
	int rc = bw_nbd_spawn(&o, &n, err, sizeof(err));
	if (rc != 0) {
		fprintf(stderr, "serve: bw_nbd_spawn: %s: %s\n", bw_err_name(rc), err);
		return 1;
	}
	int64_t t0 = now_ns();
	rc = bw_nbd_wait_ready(&n, READY_TIMEOUT_MS, err, sizeof(err));
	if (rc != 0) {
		fprintf(stderr, "serve: bw_nbd_wait_ready: %s: %s\n", bw_err_name(rc), err);
	} else {
		printf("ready pid=%ld wait_ms=%.1f\n", (long)n.pid, ms_since(t0));
		fflush(stdout);
		/* one line, EOF or a signal: then stop */
		char c;
		while (!stop_requested) {
			ssize_t r = read(STDIN_FILENO, &c, 1);
			if (r == 0 || (r < 0 && errno != EINTR) || (r == 1 && c == '\n'))
				break;
		}
	}
	/* Never greeted: its image is of no use, and a KEEP stop would wait for the greeting
	 * to the end of its timeout before signalling. */
	int64_t t1 = now_ns();
	int src = bw_nbd_stop(&n, rc == 0 ? BW_NBD_KEEP : BW_NBD_DISCARD,
			      rc == 0 ? KEEP_STOP_TIMEOUT_MS : DISCARD_STOP_TIMEOUT_MS, err,
			      sizeof(err));
	double stop_ms = ms_since(t1);
	char status[96] = "unknown";
	if (n.exited)
		bw_status_text(n.status, status, sizeof(status));
	printf("stopped pid=%ld stop_ms=%.1f rc=%s status=\"%s\"\n", (long)n.pid, stop_ms,
	       bw_err_name(src), status);
	if (src != 0)
		fprintf(stderr, "serve: bw_nbd_stop: %s: %s\n", bw_err_name(src), err);
	bw_nbd_release(&n);
	return rc == 0 && src == 0 ? 0 : 1;
}

/* ---- prepare ------------------------------------------------------------------------ */

/* Pss and Rss (kB) of pid from /proc/<pid>/smaps_rollup; 0 when unreadable. */
static void pss_rss(pid_t pid, long *pss, long *rss)
{
	char path[64], line[256];
	*pss = *rss = 0;
	snprintf(path, sizeof(path), "/proc/%ld/smaps_rollup", (long)pid);
	FILE *f = fopen(path, "re");
	if (f == NULL)
		return;
	while (fgets(line, sizeof(line), f)) {
		long v;
		if (sscanf(line, "Pss: %ld kB", &v) == 1)
			*pss = v;
		else if (sscanf(line, "Rss: %ld kB", &v) == 1)
			*rss = v;
	}
	fclose(f);
}

/* True while pid names a live process that is not a zombie. */
static bool alive(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	FILE *f = fopen(path, "re");
	if (f == NULL)
		return false;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	const char *p = strrchr(buf, ')');
	return p && p[1] == ' ' && p[2] != 'Z' && p[2] != 'X';
}

/* mkdir -p DIR/<vm dir>/<key> for the parallel variant (the API walks them safely). */
static int make_dirs(const char *repo, const char *vm_dir, int64_t key)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s", repo, vm_dir);
	if (mkdir(path, 0750) != 0 && errno != EEXIST)
		return -1;
	snprintf(path, sizeof(path), "%s/%s/%" PRId64, repo, vm_dir, key);
	if (mkdir(path, 0750) != 0 && errno != EEXIST)
		return -1;
	return 0;
}

/* Starts `qemu-img create -q -f qcow2 PATH SIZE` through bw_spawn (the caller reaps it). */
static int spawn_qemu_img(const char *path, int64_t size, pid_t *pid)
{
	char size_s[24], err[512];
	snprintf(size_s, sizeof(size_s), "%" PRId64, size);
	const char *argv[] = {"qemu-img", "create", "-q", "-f", "qcow2", path, size_s, NULL};
	struct bw_spawn s = {argv, NULL, NULL, false};
	int rc = bw_spawn(&s, pid, NULL, err, sizeof(err));
	if (rc != 0)
		fprintf(stderr, "bw_spawn qemu-img: %s: %s\n", bw_err_name(rc), err);
	return rc;
}

static int wait_ok(pid_t pid)
{
	int st;
	pid_t r;
	do
		r = waitpid(pid, &st, 0);
	while (r < 0 && errno == EINTR);
	return r == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/*
 * The way bw_spawn started a child before it used posix_spawn (for mode fork: the change
 * side by side): fork; in the child every signal to its default, an empty mask, setsid,
 * stdin /dev/null, stdout and stderr the log, everything else close-on-exec, execve; the
 * parent blocked until the exec closed the close-on-exec error pipe. qemu-nbd's argv and
 * environment are bw_nbd_spawn's (plain NBD only). Fills n as bw_nbd_spawn does.
 */
static int old_nbd_spawn(const struct bw_nbd_opts *o, struct bw_nbd *n, char *err, size_t errsize)
{
	char export[300], shared[32], bind[96], port[32], program[PATH_MAX];
	snprintf(export, sizeof(export), "--export-name=%s", o->export_name);
	snprintf(shared, sizeof(shared), "--shared=%d", o->shared);
	snprintf(bind, sizeof(bind), "--bind=%s", o->bind_address);
	snprintf(port, sizeof(port), "--port=%d", o->port);
	const char *argv[] = {o->qemu_nbd,	   "--format=qcow2",	    export, "--persistent",
			      shared,		   bind,		    port,   "--discard=unmap",
			      "--detect-zeroes=unmap", o->image,	    NULL};
	const char *env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C",
			     "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432", NULL};
	if (access(o->image, F_OK) != 0 ||
	    bw_child_find_program(o->qemu_nbd, program, sizeof(program)) != 0) {
		snprintf(err, errsize, "no image or no qemu-nbd");
		return BW_ENOENT;
	}
	int log_fd = open(o->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0640);
	int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC), pipefd[2];
	if (log_fd < 0 || null_fd < 0 || pipe2(pipefd, O_CLOEXEC) != 0) {
		snprintf(err, errsize, "open: %s", strerror(errno));
		return BW_EIO;
	}
	pid_t child = fork();
	if (child == 0) {
		struct sigaction dfl;
		sigset_t none;
		memset(&dfl, 0, sizeof(dfl));
		dfl.sa_handler = SIG_DFL;
		for (int sig = 1; sig < NSIG; sig++)
			sigaction(sig, &dfl, NULL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		if (dup2(null_fd, STDIN_FILENO) >= 0 && dup2(log_fd, STDOUT_FILENO) >= 0 &&
		    dup2(log_fd, STDERR_FILENO) >= 0) {
			close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
			execve(program, (char *const *)argv, (char *const *)env);
		}
		int e = errno;
		ssize_t w = write(pipefd[1], &e, sizeof(e));
		(void)w;
		_exit(127);
	}
	close(pipefd[1]);
	close(log_fd);
	close(null_fd);
	int e = 0;
	ssize_t r;
	do
		r = child > 0 ? read(pipefd[0], &e, sizeof(e)) : 0;
	while (r < 0 && errno == EINTR);
	close(pipefd[0]);
	if (child < 0 || r == (ssize_t)sizeof(e)) {
		if (child > 0)
			waitpid(child, NULL, 0);
		snprintf(err, errsize, "fork/exec: %s", strerror(child < 0 ? errno : e));
		return BW_ECHILD;
	}
	memset(n, 0, sizeof(*n));
	n->pid = child;
	n->pidfd = -1;
	n->probe_fd = -1;
	n->port = o->port;
	snprintf(n->bind_address, sizeof(n->bind_address), "%s", o->bind_address);
	snprintf(n->log_path, sizeof(n->log_path), "%s", o->log_path);
	if (bw_proc_start_time(child, &n->start_time) != 0)
		n->start_time = 0;
	return 0;
}

struct disk {
	char job_id[32];
	struct bw_target t;
	char path[PATH_MAX];
	char log[PATH_MAX];
	char export_name[32];
	struct bw_nbd n;
	bool created, spawned;
};

static int cmd_prepare(int argc, char **argv)
{
	long k, base_port, size_mib;
	char vm_dir[BW_VM_DIR_MAX], err[1024], pidfile[PATH_MAX];
	struct disk *d = NULL;
	FILE *pids = NULL;
	int rc = 1;
	bool parallel, old, want_pss = false;

	if (argc < 5 || argc > 6 || parse_int(argv[0], 1, MAX_DISKS, &k) != 0 ||
	    parse_int(argv[2], 1, 65535 - MAX_DISKS, &base_port) != 0 ||
	    parse_int(argv[3], 1, 1L << 20, &size_mib) != 0 ||
	    (strcmp(argv[4], "serial") != 0 && strcmp(argv[4], "parallel") != 0 &&
	     strcmp(argv[4], "many") != 0 && strcmp(argv[4], "fork") != 0) ||
	    (argc == 6 && strcmp(argv[5], "pss") != 0) || argv[1][0] != '/') {
		fprintf(stderr, "usage: bench_nbd_start prepare K /ABS/DIR BASEPORT SIZE_MIB "
				"many|serial|fork|parallel [pss]\n");
		return 2;
	}
	const char *repo = argv[1];
	parallel = strcmp(argv[4], "parallel") == 0;
	old = strcmp(argv[4], "fork") == 0;
	want_pss = argc == 6;
	d = calloc((size_t)k, sizeof(*d));
	snprintf(pidfile, sizeof(pidfile), "%s/pids", repo);
	pids = fopen(pidfile, "ae");
	if (d == NULL || pids == NULL) {
		fprintf(stderr, "prepare: %s: %s\n", pidfile, strerror(errno));
		goto out;
	}
	bw_target_vm_dir("bench-nbd-start", NULL, vm_dir);
	for (long i = 0; i < k; i++) {
		struct disk *x = &d[i];
		snprintf(x->job_id, sizeof(x->job_id), "bench-%ld", (long)getpid());
		x->t = (struct bw_target){repo, vm_dir, 2000 + i, x->job_id,
					  (int64_t)size_mib << 20, NULL, 0640};
		snprintf(x->export_name, sizeof(x->export_name), "disk-%ld", 2000 + i);
		snprintf(x->log, sizeof(x->log), "%s/nbd-%ld.log", repo, i);
		if (bw_target_path(&x->t, x->path, sizeof(x->path)) != 0) {
			fprintf(stderr, "prepare: path too long\n");
			goto out;
		}
	}

	int64_t t0 = now_ns();
	if (!parallel) {
		for (long i = 0; i < k && !stop_requested; i++) {
			int r = bw_target_create(&d[i].t, err, sizeof(err));
			if (r != 0) {
				fprintf(stderr, "prepare: bw_target_create %s: %s: %s\n", d[i].path,
					bw_err_name(r), err);
				goto stop;
			}
			d[i].created = true;
		}
	} else {
		pid_t *imgs = calloc((size_t)k, sizeof(*imgs));
		bool failed = imgs == NULL;
		long started = 0;
		for (long i = 0; i < k && !failed; i++) {
			if (make_dirs(repo, vm_dir, d[i].t.key) != 0 ||
			    spawn_qemu_img(d[i].path, d[i].t.size_bytes, &imgs[i]) != 0)
				failed = true;
			else
				started++;
		}
		for (long i = 0; i < started; i++) {
			if (wait_ok(imgs[i]) == 0)
				d[i].created = true;
			else
				failed = true;
		}
		free(imgs);
		if (failed) {
			fprintf(stderr, "prepare: parallel qemu-img create failed\n");
			goto stop;
		}
	}
	double create_ms = ms_since(t0);

	int64_t t1 = now_ns();
	for (long i = 0; i < k && !stop_requested; i++) {
		struct bw_nbd_opts o = {"qemu-nbd", d[i].path, d[i].export_name, "127.0.0.1",
					(int)(base_port + i), SHARED, d[i].log, NULL};
		int r = old ? old_nbd_spawn(&o, &d[i].n, err, sizeof(err))
			    : bw_nbd_spawn(&o, &d[i].n, err, sizeof(err));
		if (r != 0) {
			fprintf(stderr, "prepare: bw_nbd_spawn: %s: %s\n", bw_err_name(r), err);
			goto stop;
		}
		d[i].spawned = true;
		fprintf(pids, "%ld\n", (long)d[i].n.pid);
		fflush(pids);
	}
	double spawn_ms = ms_since(t1);

	long n_ready = 0, retries = 0, next_spare = base_port + k;
	int64_t t2 = now_ns();
	while (n_ready < k && !stop_requested) {
		for (long i = 0; i < k; i++) {
			if (d[i].n.ready)
				continue;
			int r = bw_nbd_poll_ready(&d[i].n, err, sizeof(err));
			if (r == 0) {
				n_ready++;
			} else if (r == BW_EADDRINUSE && retries < MAX_RETRIES) {
				/* As the worker will: quarantine the port, start on another. */
				int old_port = d[i].n.port;
				bw_nbd_release(&d[i].n);
				d[i].spawned = false;
				struct bw_nbd_opts o = {"qemu-nbd", d[i].path, d[i].export_name,
							"127.0.0.1", (int)next_spare++, SHARED,
							d[i].log, NULL};
				retries++;
				r = old ? old_nbd_spawn(&o, &d[i].n, err, sizeof(err))
					: bw_nbd_spawn(&o, &d[i].n, err, sizeof(err));
				if (r != 0) {
					fprintf(stderr, "prepare: bw_nbd_spawn: %s: %s\n",
						bw_err_name(r), err);
					goto stop;
				}
				d[i].spawned = true;
				fprintf(pids, "%ld\n", (long)d[i].n.pid);
				fflush(pids);
				fprintf(stderr, "prepare: port %d in use, disk %ld moved to %d\n",
					old_port, i, d[i].n.port);
			} else if (r != BW_EBUSY) {
				fprintf(stderr, "prepare: bw_nbd_poll_ready port %d: %s: %s\n",
					d[i].n.port, bw_err_name(r), err);
				goto stop;
			}
		}
		if (n_ready < k && ms_since(t2) > READY_TIMEOUT_MS) {
			fprintf(stderr, "prepare: %ld of %ld ready after %d ms\n", n_ready, k,
				READY_TIMEOUT_MS);
			goto stop;
		}
		if (n_ready < k)
			usleep(POLL_SLEEP_US);
	}
	if (stop_requested)
		goto stop;
	double ready_ms = ms_since(t2), total_ms = ms_since(t0);

	long pss_sum = 0, rss_sum = 0;
	if (want_pss) {
		for (long i = 0; i < k; i++) {
			long pss, rss;
			pss_rss(d[i].n.pid, &pss, &rss);
			pss_sum += pss;
			rss_sum += rss;
		}
	}
	printf("prepare k=%ld mode=%s total_ms=%.1f create_ms=%.1f spawn_ms=%.1f ready_ms=%.1f "
	       "pss_kib=%ld rss_kib=%ld port_retries=%ld",
	       k, argv[4], total_ms, create_ms, spawn_ms, ready_ms, pss_sum, rss_sum, retries);
	rc = 0;

stop:;
	/* Stop everything we started, whatever happened above. */
	int64_t t3 = now_ns();
	long stop_errors = 0, left = 0;
	for (long i = 0; i < k; i++) {
		if (!d[i].spawned)
			continue;
		int r = bw_nbd_stop(&d[i].n, BW_NBD_DISCARD, DISCARD_STOP_TIMEOUT_MS, err,
				    sizeof(err));
		if (r != 0) {
			stop_errors++;
			fprintf(stderr, "prepare: bw_nbd_stop port %d: %s: %s\n", d[i].n.port,
				bw_err_name(r), err);
		}
	}
	double stop_ms = ms_since(t3);
	for (long i = 0; i < k; i++) {
		if (d[i].spawned && alive(d[i].n.pid))
			left++;
		if (d[i].spawned)
			bw_nbd_release(&d[i].n);
		if (d[i].created && unlink(d[i].path) != 0)
			fprintf(stderr, "prepare: cannot remove %s\n", d[i].path);
	}
	if (rc == 0)
		printf(" stop_ms=%.1f stop_errors=%ld left=%ld\n", stop_ms, stop_errors, left);
	if (stop_errors || left)
		rc = 1;
out:
	if (pids)
		fclose(pids);
	free(d);
	return rc;
}

/* ---- create-cost -------------------------------------------------------------------- */

static int cmd_create_cost(int argc, char **argv)
{
	long n;
	char vm_dir[BW_VM_DIR_MAX], err[1024], job[32];
	if (argc != 2 || parse_int(argv[0], 1, 10000, &n) != 0 || argv[1][0] != '/') {
		fprintf(stderr, "usage: bench_nbd_start create-cost N /ABS/DIR\n");
		return 2;
	}
	double *api = calloc((size_t)n, sizeof(double)), *raw = calloc((size_t)n, sizeof(double));
	int rc = 1;
	if (api == NULL || raw == NULL)
		goto out;
	bw_target_vm_dir("bench-create-cost", NULL, vm_dir);
	snprintf(job, sizeof(job), "cost-%ld", (long)getpid());
	for (long i = 0; i < n && !stop_requested; i++) {
		struct bw_target t = {argv[1], vm_dir, i, job, 1L << 30, NULL, 0640};
		char path[PATH_MAX];
		if (bw_target_path(&t, path, sizeof(path)) != 0)
			goto out;
		int64_t t0 = now_ns();
		int r = bw_target_create(&t, err, sizeof(err));
		api[i] = ms_since(t0);
		if (r != 0) {
			fprintf(stderr, "create-cost: bw_target_create: %s: %s\n", bw_err_name(r), err);
			goto out;
		}
		if (unlink(path) != 0)
			goto out;
		pid_t pid;
		t0 = now_ns();
		if (spawn_qemu_img(path, t.size_bytes, &pid) != 0 || wait_ok(pid) != 0)
			goto out;
		raw[i] = ms_since(t0);
		if (unlink(path) != 0)
			goto out;
	}
	double ma = median(api, (size_t)n), mr = median(raw, (size_t)n); /* sorts them */
	printf("create-cost n=%ld bw_target_create_ms=%.1f(min %.1f p90 %.1f) "
	       "spawn_waitpid_ms=%.1f(min %.1f p90 %.1f)\n",
	       n, ma, api[0], api[(size_t)n * 9 / 10], mr, raw[0], raw[(size_t)n * 9 / 10]);
	rc = 0;
out:
	free(api);
	free(raw);
	return rc;
}

/* ---- limit ------------------------------------------------------------------------- */

/* Starts qemu-nbd for image on port with posix_spawnp; output appended to log. */
static int limit_spawn(const char *image, const char *export_name, int port, const char *log,
		       pid_t *pid)
{
	char exp[300], prt[32];
	snprintf(exp, sizeof(exp), "--export-name=%s", export_name);
	snprintf(prt, sizeof(prt), "--port=%d", port);
	const char *argv[] = {"qemu-nbd", "--format=qcow2", exp, "--persistent", "--shared=10",
			"--bind=127.0.0.1", prt, "--discard=unmap", "--detect-zeroes=unmap",
			image, NULL};
	const char *envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C",
			"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432", NULL};
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t none, all;
	sigemptyset(&none);
	sigfillset(&all);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log, O_WRONLY | O_CREAT | O_APPEND, 0640);
	posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
	posix_spawnattr_init(&at);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
					      POSIX_SPAWN_SETSIGDEF);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &all);
	int e = posix_spawnp(pid, "qemu-nbd", &fa, &at, (char *const *)argv, (char *const *)envp);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	if (e != 0)
		fprintf(stderr, "limit: posix_spawnp qemu-nbd: %s\n", strerror(e));
	return e == 0 ? 0 : -1;
}

/* 1: the port greeted; 0: not yet; the socket is closed either way. */
static int limit_greets(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	char g[16];
	size_t got = 0;
	if (fd < 0)
		return 0;
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
		struct pollfd p = {fd, POLLIN, 0};
		while (got < sizeof(g) && poll(&p, 1, 200) == 1) {
			ssize_t r = read(fd, g + got, sizeof(g) - got);
			if (r <= 0)
				break;
			got += (size_t)r;
		}
	}
	close(fd);
	return got == sizeof(g) && memcmp(g, "NBDMAGICIHAVEOPT", 16) == 0;
}

static int cmd_limit(int argc, char **argv)
{
	long k, base_port, size_mib;
	int rc = 1;
	if (argc < 4 || argc > 5 || parse_int(argv[0], 1, MAX_DISKS, &k) != 0 ||
	    parse_int(argv[2], 1, 65535 - MAX_DISKS - MAX_RETRIES, &base_port) != 0 ||
	    parse_int(argv[3], 1, 1L << 20, &size_mib) != 0 || argv[1][0] != '/' ||
	    (argc == 5 && strcmp(argv[4], "pss") != 0)) {
		fprintf(stderr, "usage: bench_nbd_start limit K /ABS/DIR BASEPORT SIZE_MIB [pss]\n");
		return 2;
	}
	const char *dir = argv[1];
	bool want_pss = argc == 5;
	char (*img)[PATH_MAX] = calloc((size_t)k, PATH_MAX), (*log)[PATH_MAX] = calloc((size_t)k, PATH_MAX);
	char (*name)[32] = calloc((size_t)k, 32);
	pid_t *pid = calloc((size_t)k, sizeof(*pid));
	int *port = calloc((size_t)k, sizeof(*port));
	bool *ready = calloc((size_t)k, sizeof(*ready));
	long started = 0, made = 0, retries = 0, next_spare = base_port + k, left = 0;
	char pidfile[PATH_MAX];
	snprintf(pidfile, sizeof(pidfile), "%s/pids", dir);
	FILE *pids = fopen(pidfile, "ae"); /* for the script's cleanup should this die */
	if (!img || !log || !name || !pid || !port || !ready || !pids)
		goto out;
	char size_s[32];
	snprintf(size_s, sizeof(size_s), "%ldM", size_mib);
	for (long i = 0; i < k; i++) {
		snprintf(img[i], PATH_MAX, "%s/limit-%ld.qcow2", dir, i);
		snprintf(log[i], PATH_MAX, "%s/nbd-%ld.log", dir, i);
		snprintf(name[i], 32, "disk-%ld", 2000 + i);
		port[i] = (int)(base_port + i);
	}
	/* the images: not timed */
	for (long i = 0; i < k; i++, made++) {
		pid_t p;
		const char *qa[] = {"qemu-img", "create", "-q", "-f", "qcow2", img[i], size_s, NULL};
		struct bw_spawn sp = {qa, NULL, NULL, false};
		char err[512];
		if (bw_spawn(&sp, &p, NULL, err, sizeof(err)) != 0 || wait_ok(p) != 0) {
			fprintf(stderr, "limit: qemu-img create %s failed %s\n", img[i], err);
			goto stop;
		}
	}
	sync();

	int64_t t0 = now_ns();
	for (; started < k && !stop_requested; started++) {
		if (limit_spawn(img[started], name[started], port[started], log[started],
				&pid[started]) != 0)
			goto stop;
		fprintf(pids, "%ld\n", (long)pid[started]);
	}
	fflush(pids);
	double spawn_ms = ms_since(t0);
	long n_ready = 0;
	int64_t t1 = now_ns();
	while (n_ready < k && !stop_requested) {
		for (long i = 0; i < k; i++) {
			if (ready[i])
				continue;
			if (limit_greets(port[i])) {
				ready[i] = true;
				n_ready++;
				continue;
			}
			int st;
			if (waitpid(pid[i], &st, WNOHANG) == pid[i]) {
				char tail[400] = "";
				if (bw_log_tail(log[i], 300, tail, sizeof(tail)) == 0 &&
				    strstr(tail, "Address already in use") && retries < MAX_RETRIES) {
					retries++;
					port[i] = (int)next_spare++;
					if (truncate(log[i], 0) != 0 ||
					    limit_spawn(img[i], name[i], port[i], log[i], &pid[i]) != 0)
						goto stop;
					fprintf(pids, "%ld\n", (long)pid[i]);
					fflush(pids);
					continue;
				}
				pid[i] = 0;
				fprintf(stderr, "limit: qemu-nbd port %d died: %s\n", port[i], tail);
				goto stop;
			}
		}
		if (n_ready < k && ms_since(t1) > READY_TIMEOUT_MS) {
			fprintf(stderr, "limit: %ld of %ld ready after %d ms\n", n_ready, k, READY_TIMEOUT_MS);
			goto stop;
		}
		if (n_ready < k)
			usleep(POLL_SLEEP_US);
	}
	if (stop_requested)
		goto stop;
	double ready_ms = ms_since(t1), total_ms = ms_since(t0);
	long pss_sum = 0, rss_sum = 0;
	for (long i = 0; want_pss && i < k; i++) {
		long pss, rss;
		pss_rss(pid[i], &pss, &rss);
		pss_sum += pss;
		rss_sum += rss;
	}
	printf("prepare k=%ld mode=limit-c total_ms=%.1f create_ms=0.0 spawn_ms=%.1f ready_ms=%.1f "
	       "pss_kib=%ld rss_kib=%ld port_retries=%ld",
	       k, total_ms, spawn_ms, ready_ms, pss_sum, rss_sum, retries);
	rc = 0;
stop:;
	int64_t t3 = now_ns();
	/* SIGTERM, again every 200 ms (qemu-nbd 7.2 can lose an early one), SIGKILL after 5 s */
	for (int round = 0; round < 25; round++) {
		long running = 0;
		for (long i = 0; i < started; i++) {
			if (pid[i] <= 0)
				continue;
			if (waitpid(pid[i], NULL, WNOHANG) == pid[i]) {
				pid[i] = 0;
				continue;
			}
			kill(pid[i], round == 24 ? SIGKILL : SIGTERM);
			running++;
		}
		if (running == 0)
			break;
		usleep(200000);
	}
	for (long i = 0; i < started; i++) {
		if (pid[i] > 0) {
			waitpid(pid[i], NULL, 0);
			if (alive(pid[i]))
				left++;
		}
	}
	double stop_ms = ms_since(t3);
	if (rc == 0)
		printf(" stop_ms=%.1f stop_errors=0 left=%ld\n", stop_ms, left);
	for (long i = 0; i < made; i++)
		unlink(img[i]);
	if (left)
		rc = 1;
out:
	if (pids)
		fclose(pids);
	free(img);
	free(log);
	free(name);
	free(pid);
	free(port);
	free(ready);
	return rc;
}

static void usage(void)
{
	fprintf(stderr, "usage: bench_nbd_start gen PATH SIZE_MIB [SEED]\n"
			"       bench_nbd_start serve IMAGE PORT EXPORT LOG\n"
			"       bench_nbd_start prepare K /ABS/DIR BASEPORT SIZE_MIB "
			"many|serial|fork|parallel [pss]\n"
			"       bench_nbd_start limit K /ABS/DIR BASEPORT SIZE_MIB [pss]\n"
			"       bench_nbd_start create-cost N /ABS/DIR\n");
}

int main(int argc, char **argv)
{
	install_signals();
	if (argc < 2) {
		usage();
		return 2;
	}
	if (strcmp(argv[1], "gen") == 0)
		return cmd_gen(argc - 2, argv + 2);
	if (strcmp(argv[1], "serve") == 0)
		return cmd_serve(argc - 2, argv + 2);
	if (strcmp(argv[1], "prepare") == 0)
		return cmd_prepare(argc - 2, argv + 2);
	if (strcmp(argv[1], "limit") == 0)
		return cmd_limit(argc - 2, argv + 2);
	if (strcmp(argv[1], "create-cost") == 0)
		return cmd_create_cost(argc - 2, argv + 2);
	usage();
	return 2;
}
