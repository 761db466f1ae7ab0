/* child.h: starting child programs safely (argv, no shell, clean fds and signals) and running tools. */
#ifndef BW_CHILD_H
#define BW_CHILD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

/*
 * Where a program given by a bare name (no '/') is looked up: a fixed list of directories
 * only root can write to, never $PATH (which the worker's own environment could point
 * anywhere).
 */
#define BW_CHILD_TRUSTED_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/*
 * The whole environment of every child, before what the caller adds: the worker's own
 * (which may hold BW_SNA_TOKEN, BW_AMQP_URL and the like) never reaches a child.
 */
#define BW_CHILD_ENV_PATH "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
#define BW_CHILD_ENV_LOCALE "LC_ALL=C"

struct bw_spawn {
	const char *const *argv;    /* argv[0]: a path used as is, or a bare name looked up in
				       BW_CHILD_TRUSTED_PATH */
	const char *const *env_add; /* "NAME=value" added to the child's short environment
				       (BW_CHILD_ENV_PATH, BW_CHILD_ENV_LOCALE; an added PATH= or
				       LC_ALL= replaces those); NULL-terminated or NULL */
	const char *log_path;       /* stdout and stderr appended here (created 0640); NULL: /dev/null */
	bool new_session;           /* setsid(): the child outlives its parent's session */
};

/*
 * Looks a bare program name up in BW_CHILD_TRUSTED_PATH (never $PATH): the first regular,
 * executable file of that name. Returns 0 and its absolute path in out[0..size); BW_ENOENT
 * when none is found; BW_EINVAL when name holds a '/' or is empty, or the path does not
 * fit in size.
 */
int bw_child_find_program(const char *name, char *out, size_t size) BW_MUST_CHECK;

/*
 * Starts a child with posix_spawn (vfork semantics: this process waits only for the
 * child's exec): every signal disposition back to its default and an empty mask,
 * optionally a new session, stdin from /dev/null, stdout/stderr to the log, every other
 * descriptor closed, and argv executed (never through a shell) with the short environment
 * of struct bw_spawn, never the worker's own. A bare argv[0] is resolved with
 * bw_child_find_program first. An exec failure is reported here, synchronously.
 * Returns 0 and stores the pid and its start time (see proc.h); BW_ENOENT when the program
 * does not exist, BW_EPERM when it cannot be executed, BW_EIO when the log cannot be
 * opened, BW_ESYS otherwise. Details in err[0..errsize) when err is not NULL.
 */
int bw_spawn(const struct bw_spawn *s, pid_t *pid, uint64_t *start_time, char *err,
	     size_t errsize) BW_MUST_CHECK;

/*
 * Runs a tool to its end, waiting at most timeout_ms (then SIGKILL). Blocking: for short
 * tools (qemu-img) outside the event loop's hot path. Returns 0 when it exited 0;
 * BW_ECHILD when it exited otherwise (*status holds the wait status); BW_ETIMEDOUT;
 * or bw_spawn's errors.
 */
int bw_run(const struct bw_spawn *s, int timeout_ms, int *status, char *err, size_t errsize)
	BW_MUST_CHECK;

/* Writes "exited with status 1" / "killed by signal 9 (Killed)" for a wait status. */
void bw_status_text(int status, char *buf, size_t size);

/*
 * Reads up to the last max bytes of a log file into out as one printable line (newlines
 * become " | ", control bytes '?'), starting at a line boundary when it can. Returns 0 or
 * a BW error (out then holds "").
 */
int bw_log_tail(const char *path, size_t max, char *out, size_t size) BW_MUST_CHECK;

#endif
