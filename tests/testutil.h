/* testutil.h: what the C tests share: a scratch directory and a shell command (test code only). */
#ifndef BW_TESTUTIL_H
#define BW_TESTUTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

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

#endif
