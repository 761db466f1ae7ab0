/* child.h: starting child programs safely (argv, no shell, clean fds and signals) and running tools. */
#ifndef BW_CHILD_H
#define BW_CHILD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

struct bw_spawn {
	const char *const *argv;    /* argv[0]: a path, or a name looked up in PATH */
	const char *const *env_add; /* "NAME=value" added to the environment; NULL-terminated or NULL */
	const char *log_path;       /* stdout and stderr appended here (created 0640); NULL: /dev/null */
	bool new_session;           /* setsid(): the child outlives its parent's session */
};

/*
 * Starts a child: fork, then in the child reset every signal disposition and the mask,
 * optionally start a new session, stdin from /dev/null, stdout/stderr to the log, every
 * other descriptor closed on exec, and exec argv (never through a shell). An exec failure
 * is reported here, synchronously, through a close-on-exec pipe.
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
