/* testutil.h: what the C tests and benchmarks share: scratch dirs, files, shell commands, full writes, reaped children (test code only). */
#ifndef BW_TESTUTIL_H
#define BW_TESTUTIL_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* Runs a formatted shell command; returns its exit status (-1 when it did not exit). */
static inline int bw_test_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline int bw_test_sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int rc = system(cmd);
	return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/*
 * Takes a child that waitpid reaped (pid, status) off pids[n]: its slot becomes 0. Returns
 * the slot, or -1 when pid is none of them. A child that did not exit 0 is counted in *failed
 * and reported on out: "<prefix>child N exited S" or "<prefix>child N killed by signal S".
 */
static inline int bw_test_child_reaped(pid_t *pids, int n, pid_t pid, int status, FILE *out,
				       const char *prefix, int *failed)
{
	for (int i = 0; i < n; i++) {
		if (pids[i] != pid)
			continue;
		pids[i] = 0;
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			(*failed)++;
			fprintf(out, "%schild %d %s %d\n", prefix, i,
				WIFEXITED(status) ? "exited" : "killed by signal",
				WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
		}
		return i;
	}
	return -1;
}

/* Writes text to path (created or emptied) and gives it mode; 0, or -1 on an error. */
static inline int bw_test_write_file(const char *path, const char *text, mode_t mode)
{
	FILE *f = fopen(path, "w");
	if (f == NULL)
		return -1;
	int rc = fputs(text, f) < 0 ? -1 : 0;
	if (fclose(f) != 0)
		rc = -1;
	return rc == 0 ? chmod(path, mode) : rc;
}

/* Makes a new scratch directory /tmp/bw-test-<name>-XXXXXX into dir[size]; true on success. */
static inline bool bw_test_mkdir(char *dir, size_t size, const char *name)
{
	snprintf(dir, size, "/tmp/bw-test-%s-XXXXXX", name);
	return mkdtemp(dir) != NULL;
}

/* Removes a scratch directory and everything in it; 0 on success. */
static inline int bw_test_rmdir(const char *dir)
{
	return bw_test_sh("rm -rf '%s'", dir) == 0 ? 0 : -1;
}

#ifndef BW_TEST_NAME
#define BW_TEST_NAME "c" /* bw_add_unit_test and bw_add_process_test give the target's name */
#endif

/*
 * The scratch directory of a cmocka test program: bw_test_scratch_setup makes it
 * (/tmp/bw-test-<BW_TEST_NAME>-XXXXXX), bw_test_scratch_teardown removes it and everything in
 * it. Both are cmocka fixtures, for the group or for each test.
 */
static char bw_test_dir[64] __attribute__((unused));

static inline int bw_test_scratch_setup(void **state)
{
	(void)state;
	return bw_test_mkdir(bw_test_dir, sizeof(bw_test_dir), BW_TEST_NAME) ? 0 : -1;
}

static inline int bw_test_scratch_teardown(void **state)
{
	(void)state;
	return bw_test_rmdir(bw_test_dir);
}

#endif
