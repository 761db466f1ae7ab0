/* nbd.h: the qemu-nbd supervisor: one server per disk, loopback by default, ready = NBD greeting. */
#ifndef BW_NBD_H
#define BW_NBD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

struct bw_nbd_opts {
	const char *qemu_nbd;     /* binary */
	const char *image;        /* the qcow2 file; must exist */
	const char *export_name;  /* [A-Za-z0-9._-] */
	const char *bind_address; /* numeric; NULL: 127.0.0.1 */
	int port;
	int shared;               /* --shared: at least the SNA's connections per disk */
	const char *log_path;     /* its stdout/stderr, appended */
	const char *tls_dir;      /* NULL: plain NBD; else TLS with the PSK in <tls_dir>/keys.psk */
};

/* One supervised server. */
struct bw_nbd {
	pid_t pid;
	uint64_t start_time; /* with pid: the identity recorded in the ledger */
	int port;
	char bind_address[64];
	char log_path[4096];
	bool ready;  /* its greeting was read */
	bool exited; /* reaped */
	int status;  /* wait status once exited */
	bool adopted; /* not our child: watched through a pidfd */
	off_t log_size; /* adopted: its log's size then (an exit that wrote to it failed) */
	int pidfd;
	/* a stop in progress (bw_nbd_stop_step) */
	bool stopping;
	bool stop_killed;
	int64_t stop_start_ms;
	int64_t stop_term_ms;
	/* the readiness probe in progress (non-blocking across calls) */
	int probe_fd;
	size_t probe_got;
	unsigned char probe_buf[18];
};

/*
 * Starts qemu-nbd for one image with an argv (never a shell): --format=qcow2, the export
 * name, --persistent, --shared, --bind, --port, --discard=unmap, --detect-zeroes=unmap,
 * with tls_dir also --object tls-creds-psk,...,dir=<tls_dir> --tls-creds (a client without
 * the key is refused; the greeting still comes before TLS, so readiness is probed alike),
 * in its own session (it outlives this worker and can be adopted), signals and mask
 * reset, stdin /dev/null, output to the log, no other descriptor inherited. Started with
 * GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432 (see the README's benchmark).
 * Returns 0 and fills *n; BW_ENOENT when the image or the program is missing; BW_ECHILD.
 */
int bw_nbd_spawn(const struct bw_nbd_opts *o, struct bw_nbd *n, char *err, size_t errsize)
	BW_MUST_CHECK;

/*
 * One readiness check that never waits: advances a non-blocking connect to the port and
 * the read of the NBD newstyle greeting (NBDMAGIC IHAVEOPT) as far as it can, then ends
 * the handshake politely (NBD_OPT_ABORT) so the server logs no error. Returns 0 when
 * ready (n->ready set);
 * BW_EBUSY when not yet (try again shortly); BW_EADDRINUSE when the server died because
 * its port is taken by another process (quarantine the port, try another); BW_ECHILD when
 * it died for another reason (its status and the tail of its log in err).
 */
int bw_nbd_poll_ready(struct bw_nbd *n, char *err, size_t errsize) BW_MUST_CHECK;

/* Polls until ready or timeout_ms; same results, BW_ETIMEDOUT on timeout (blocking). */
int bw_nbd_wait_ready(struct bw_nbd *n, int timeout_ms, char *err, size_t errsize) BW_MUST_CHECK;

/* Reaps the server if it exited (non-blocking); true when it has (status in n->status). */
bool bw_nbd_reap(struct bw_nbd *n);

enum bw_nbd_stop_mode {
	BW_NBD_KEEP,    /* its image holds data to keep: SIGTERM only (its exit flushes) */
	BW_NBD_DISCARD, /* its image is being removed: SIGTERM, then SIGKILL after a grace */
};

/*
 * Stops a server and waits for its end, at most timeout_ms (blocking). qemu-nbd 7.2 loses
 * a SIGTERM that arrives before its main loop runs: a server whose greeting was never seen
 * is first given up to half the timeout to greet, and SIGTERM is sent again every 200 ms
 * until it exits. Returns 0 when it exited with status 0 (the image is flushed and closed);
 * BW_ECHILD when it exited otherwise (err says how); BW_ETIMEDOUT when a KEEP server is
 * still running at the timeout (never SIGKILLed: its data would be lost).
 */
int bw_nbd_stop(struct bw_nbd *n, enum bw_nbd_stop_mode mode, int timeout_ms, char *err,
		size_t errsize) BW_MUST_CHECK;

/*
 * The same for an event loop: one step that never waits. The first call starts the stop
 * (its clock included); call again until it returns something other than BW_EBUSY (every
 * few ms, or when SIGCHLD or the pidfd says the server exited; SIGTERM is re-sent every
 * 200 ms from here). Results as bw_nbd_stop.
 */
int bw_nbd_stop_step(struct bw_nbd *n, enum bw_nbd_stop_mode mode, int timeout_ms, char *err,
		     size_t errsize) BW_MUST_CHECK;

/*
 * Takes over a server started by another (dead) worker, known by pid and start time:
 * returns 0 and fills *n (watched through a pidfd) when that very process is alive; its
 * exit is judged from its log (qemu-nbd writes every error there; n->status stays -1);
 * BW_ENOENT when it is gone or the pid now names another process (never signalled).
 */
int bw_nbd_adopt(pid_t pid, uint64_t start_time, int port, const char *log_path,
		 struct bw_nbd *n) BW_MUST_CHECK;

/*
 * Finds a running qemu-nbd serving export_name (its command line), for a server whose
 * start was never recorded (its worker died between starting and recording it). Returns
 * 0 with its pid and start time (then bw_nbd_adopt it), BW_ENOENT when none runs.
 */
int bw_nbd_find(const char *export_name, pid_t *pid, uint64_t *start_time) BW_MUST_CHECK;

/* A server record before anything is known of it (no process, no descriptors). */
void bw_nbd_init(struct bw_nbd *n);

/*
 * Records a server of a dead worker that is not running any more or must not be touched
 * (the pid may name another process now): never signalled, its end judged as clean (what
 * it served is checked by qemu-img check before use); log_path is its log.
 */
void bw_nbd_mark_gone(struct bw_nbd *n, pid_t pid, const char *log_path);

/* Releases what n holds (its pidfd); never signals the process. */
void bw_nbd_release(struct bw_nbd *n);

/*
 * The per-disk log of a job's disk: <state_dir>/logs/<job_id>-<key>.log, its qemu-nbd's
 * output; its qemu-img check writes to the same path plus BW_NBD_CHECK_LOG_SUFFIX. One name
 * for the worker that writes them and for the ledger's retention that removes them
 * (bw_ledger_prune). Writes the path into out; returns 0, or BW_ERANGE when it does not fit.
 */
#define BW_NBD_CHECK_LOG_SUFFIX ".check"
int bw_nbd_log_path(char *out, size_t size, const char *state_dir, const char *job_id,
		    int64_t key) BW_MUST_CHECK;

#endif
