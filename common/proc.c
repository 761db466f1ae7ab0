/* proc.c: reads /proc to tell one process from another that reused its pid. */
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

/* Reads /proc/<pid>/stat; stores the state letter and the start time. */
static int read_stat(pid_t pid, char *state, uint64_t *start)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT || errno == ESRCH ? BW_ENOENT : BW_EIO;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	int err = errno;
	close(fd);
	if (n <= 0)
		return n == 0 || err == ESRCH ? BW_ENOENT : BW_EIO;
	buf[n] = '\0';

	/* "pid (comm) S ...": comm may hold spaces and parentheses; the last ')' ends it. */
	char *p = strrchr(buf, ')');
	if (p == NULL || p[1] != ' ')
		return BW_EIO;
	p += 2;
	*state = *p;
	/* After comm: field 3 is the state; the start time is field 22. */
	for (int field = 3; field < 22; field++) {
		p = strchr(p, ' ');
		if (p == NULL)
			return BW_EIO;
		p++;
	}
	char *end;
	errno = 0;
	unsigned long long v = strtoull(p, &end, 10);
	if (errno || end == p)
		return BW_EIO;
	*start = v;
	return 0;
}

int bw_proc_start_time(pid_t pid, uint64_t *out)
{
	char state;
	uint64_t start;
	int rc = read_stat(pid, &state, &start);
	if (rc == 0)
		*out = start;
	return rc;
}

int bw_proc_boot_id(char *out)
{
	char buf[64];
	int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return BW_EIO;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < BW_BOOT_ID_LEN)
		return BW_EIO;
	memcpy(out, buf, BW_BOOT_ID_LEN);
	out[BW_BOOT_ID_LEN] = '\0';
	return 0;
}

bool bw_proc_same(pid_t pid, uint64_t start_time)
{
	char state;
	uint64_t start;
	if (pid <= 0 || read_stat(pid, &state, &start) != 0)
		return false;
	return start == start_time && state != 'Z' && state != 'X';
}

int bw_proc_undumpable(void)
{
	const struct rlimit no_core = {0, 0};
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 || setrlimit(RLIMIT_CORE, &no_core) != 0)
		return BW_ESYS;
	return 0;
}
