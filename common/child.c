/* child.c: posix_spawn (vfork semantics) with reset signals, no inherited descriptors, per-child logs. */
#define _GNU_SOURCE /* POSIX_SPAWN_SETSID, posix_spawn_file_actions_addclosefrom_np */
#include "child.h"
#include "clock.h"
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/*
 * The child's whole environment: PATH and LC_ALL=C, then add[] (an added PATH= or LC_ALL=
 * replaces the base one), in one malloc'd array (built before fork: no malloc in the child).
 */
static char **child_env(const char *const *add)
{
	static const char *const base[] = {BW_CHILD_ENV_PATH, BW_CHILD_ENV_LOCALE};
	size_t nbase = sizeof(base) / sizeof(base[0]), k = 0;
	while (add && add[k])
		k++;
	char **env = calloc(nbase + k + 1, sizeof(*env));
	if (env == NULL)
		return NULL;
	size_t out = 0;
	for (size_t i = 0; i < nbase; i++) {
		size_t len = (size_t)(strchr(base[i], '=') - base[i]) + 1; /* "NAME=" */
		bool replaced = false;
		for (size_t j = 0; j < k && !replaced; j++)
			replaced = strncmp(add[j], base[i], len) == 0;
		if (!replaced)
			env[out++] = (char *)base[i];
	}
	for (size_t j = 0; j < k; j++)
		env[out++] = (char *)add[j];
	return env;
}

int bw_child_find_program(const char *name, char *out, size_t size)
{
	if (name[0] == '\0' || strchr(name, '/') != NULL)
		return BW_EINVAL;
	const char *dir = BW_CHILD_TRUSTED_PATH;
	while (*dir) {
		size_t n = strcspn(dir, ":");
		char path[PATH_MAX];
		struct stat st;
		if ((size_t)snprintf(path, sizeof(path), "%.*s/%s", (int)n, dir, name) <
			    sizeof(path) &&
		    stat(path, &st) == 0 && S_ISREG(st.st_mode) &&
		    faccessat(AT_FDCWD, path, X_OK, AT_EACCESS) == 0) {
			if ((size_t)snprintf(out, size, "%s", path) >= size)
				return BW_EINVAL;
			return 0;
		}
		dir += n;
		if (*dir == ':')
			dir++;
	}
	return BW_ENOENT;
}

int bw_spawn(const struct bw_spawn *s, pid_t *pid, uint64_t *start_time, char *err,
	     size_t errsize)
{
	int log_fd = -1, null_fd = -1, e;
	char **env = NULL;
	char dummy[1], found[PATH_MAX];
	const char *program = s->argv[0];
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	bool fa_init = false, at_init = false;
	sigset_t none, all;
	pid_t child;
	int rc;

	if (err == NULL) {
		err = dummy;
		errsize = 1;
	}
	err[0] = '\0';
	if (strchr(program, '/') == NULL) {
		rc = bw_child_find_program(program, found, sizeof(found));
		if (rc != 0) {
			snprintf(err, errsize, "%s: not found in %s", program, BW_CHILD_TRUSTED_PATH);
			rc = BW_ENOENT;
			goto out;
		}
		program = found;
	}
	env = child_env(s->env_add);
	if (env == NULL) {
		rc = BW_ENOMEM;
		goto out;
	}
	log_fd = open(s->log_path ? s->log_path : "/dev/null",
		      O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0640);
	null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (log_fd < 0 || null_fd < 0) {
		snprintf(err, errsize, "%s: %s", s->log_path ? s->log_path : "/dev/null",
			 strerror(errno));
		rc = BW_EIO;
		goto out;
	}
	/*
	 * posix_spawn: glibc clones with CLONE_VM|CLONE_VFORK, so this process is suspended
	 * only until the child's exec (or its failure, returned here), and the child runs at
	 * once instead of waiting in the run queue as a forked one does; no page tables are
	 * copied. Every signal back to its default, an empty mask, optionally a new session,
	 * stdin /dev/null, stdout and stderr the log, every other descriptor closed.
	 */
	sigemptyset(&none);
	sigfillset(&all);
	if ((e = posix_spawn_file_actions_init(&fa)) != 0)
		goto spawn_error;
	fa_init = true;
	if ((e = posix_spawnattr_init(&at)) != 0)
		goto spawn_error;
	at_init = true;
	if ((e = posix_spawn_file_actions_adddup2(&fa, null_fd, STDIN_FILENO)) != 0 ||
	    (e = posix_spawn_file_actions_adddup2(&fa, log_fd, STDOUT_FILENO)) != 0 ||
	    (e = posix_spawn_file_actions_adddup2(&fa, log_fd, STDERR_FILENO)) != 0 ||
	    (e = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) != 0 ||
	    (e = posix_spawnattr_setsigdefault(&at, &all)) != 0 ||
	    (e = posix_spawnattr_setsigmask(&at, &none)) != 0 ||
	    (e = posix_spawnattr_setflags(&at, (short)(POSIX_SPAWN_SETSIGDEF |
						       POSIX_SPAWN_SETSIGMASK |
						       (s->new_session ? POSIX_SPAWN_SETSID : 0)))) != 0)
		goto spawn_error;
	e = posix_spawn(&child, program, &fa, &at, (char *const *)s->argv, env);
	if (e != 0) {
		snprintf(err, errsize, "%s: %s", s->argv[0], strerror(e));
		rc = e == ENOENT ? BW_ENOENT : e == EACCES ? BW_EPERM : BW_ESYS;
		goto out;
	}
	/*
	 * The start time does not change on exec; read it now that the exec is done, while the
	 * child, unreaped, certainly exists. (Before its exec the child would be undumpable like
	 * this process, and a /proc mounted with hidepid (systemd's ProtectProc=invisible) hides
	 * an undumpable process even from its own user.)
	 */
	uint64_t st = 0;
	if (bw_proc_start_time(child, &st) != 0)
		st = 0; /* it already exited (and is a zombie we have not reaped): keep the pid */
	*pid = child;
	if (start_time)
		*start_time = st;
	rc = 0;
	goto out;
spawn_error:
	snprintf(err, errsize, "posix_spawn set-up: %s", strerror(e));
	rc = BW_ESYS;
out:
	if (at_init)
		posix_spawnattr_destroy(&at);
	if (fa_init)
		posix_spawn_file_actions_destroy(&fa);
	if (log_fd >= 0)
		close(log_fd);
	if (null_fd >= 0)
		close(null_fd);
	free(env);
	return rc;
}

int bw_run(const struct bw_spawn *s, int timeout_ms, int *status, char *err, size_t errsize)
{
	pid_t pid;
	int rc = bw_spawn(s, &pid, NULL, err, errsize);
	if (rc != 0)
		return rc;
	/* Wait on a pidfd: woken the moment the tool exits, not at the next poll tick. */
	int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
	int64_t deadline = bw_clock_mono_ms() + timeout_ms;
	int st = 0;
	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);
		if (r == pid)
			break;
		if (r < 0 && errno != EINTR) {
			rc = BW_ESYS;
			break;
		}
		int64_t left = deadline - bw_clock_mono_ms();
		if (left <= 0) {
			kill(pid, SIGKILL);
			waitpid(pid, &st, 0);
			if (pfd >= 0)
				close(pfd);
			if (err)
				snprintf(err, errsize, "%s: no result after %d ms (killed)",
					 s->argv[0], timeout_ms);
			return BW_ETIMEDOUT;
		}
		if (pfd >= 0) {
			struct pollfd p = {pfd, POLLIN, 0};
			poll(&p, 1, (int)left);
		} else {
			usleep(1000);
		}
	}
	if (pfd >= 0)
		close(pfd);
	if (status)
		*status = st;
	if (rc == 0 && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
		if (err) {
			char what[96];
			bw_status_text(st, what, sizeof(what));
			snprintf(err, errsize, "%s %s", s->argv[0], what);
		}
		rc = BW_ECHILD;
	}
	return rc;
}

void bw_status_text(int status, char *buf, size_t size)
{
	if (WIFEXITED(status))
		snprintf(buf, size, "exited with status %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(buf, size, "killed by signal %d (%s)", WTERMSIG(status),
			 strsignal(WTERMSIG(status)));
	else
		snprintf(buf, size, "stopped (status 0x%x)", (unsigned)status);
}

int bw_log_tail(const char *path, size_t max, char *out, size_t size)
{
	out[0] = '\0';
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return bw_err_from_errno(errno);
	struct stat st;
	char *buf = NULL;
	int rc = 0;
	if (fstat(fd, &st) != 0) {
		rc = bw_err_from_errno(errno);
		goto out;
	}
	off_t from = st.st_size > (off_t)max ? st.st_size - (off_t)max : 0;
	buf = malloc(max + 1);
	if (buf == NULL) {
		rc = BW_ENOMEM;
		goto out;
	}
	ssize_t n = pread(fd, buf, max, from);
	if (n < 0) {
		rc = bw_err_from_errno(errno);
		goto out;
	}
	size_t i = 0, o = 0;
	if (from > 0) { /* start after the first (partial) line */
		while (i < (size_t)n && buf[i] != '\n')
			i++;
		if (i < (size_t)n)
			i++;
	}
	size_t end = (size_t)n;
	while (end > i && (buf[end - 1] == '\n' || buf[end - 1] == '\r'))
		end--;
	for (; i < end && o + 4 < size; i++) {
		unsigned char c = (unsigned char)buf[i];
		if (c == '\n') {
			memcpy(out + o, " | ", 3);
			o += 3;
		} else {
			out[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
		}
	}
	out[o] = '\0';
out:
	free(buf);
	close(fd);
	return rc;
}
