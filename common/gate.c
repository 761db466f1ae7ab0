/* gate.c: the writers' gate: a robust process-shared pthread mutex in an mmap'd file. */
#include "gate.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GATE_MAGIC 0x62776761u /* "bwga": the file holds an initialised gate */
#define GATE_VERSION 1
#define GATE_FILE_SIZE 4096 /* one page: the mutex and its header, room to grow */

/* The file's layout, shared by every process of the host: change it only with
 * GATE_VERSION. */
struct gate_file {
	uint32_t magic;
	uint32_t version;
	pthread_mutex_t mutex;
};

struct bw_gate {
	struct gate_file *f; /* mmap'd MAP_SHARED */
};

int bw_gate_open(struct bw_gate **out, const char *path)
{
	struct bw_gate *g = NULL;
	struct gate_file *f = MAP_FAILED;
	struct stat st;
	int rc = 0;

	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return bw_err_from_errno(errno);
	/* Initialisation is a one-time race between processes: the file lock settles it. */
	while (flock(fd, LOCK_EX) != 0) {
		if (errno != EINTR) {
			rc = bw_err_from_errno(errno);
			goto out;
		}
	}
	if (fstat(fd, &st) != 0 ||
	    (st.st_size < GATE_FILE_SIZE && ftruncate(fd, GATE_FILE_SIZE) != 0)) {
		rc = bw_err_from_errno(errno);
		goto out;
	}
	f = mmap(NULL, GATE_FILE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (f == MAP_FAILED) {
		rc = bw_err_from_errno(errno);
		goto out;
	}
	if (f->magic != GATE_MAGIC) {
		pthread_mutexattr_t a;
		pthread_mutexattr_init(&a);
		pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
		pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
		pthread_mutex_init(&f->mutex, &a);
		pthread_mutexattr_destroy(&a);
		f->version = GATE_VERSION;
		f->magic = GATE_MAGIC;
	}
	g = malloc(sizeof(*g));
	if (g == NULL) {
		rc = BW_ENOMEM;
		goto out;
	}
	g->f = f;
	f = MAP_FAILED;
	*out = g;
out:
	if (f != MAP_FAILED)
		munmap(f, GATE_FILE_SIZE);
	/* Unlock explicitly: the mapping keeps the open file, and with it a lock, alive. */
	flock(fd, LOCK_UN);
	close(fd);
	return rc;
}

void bw_gate_close(struct bw_gate *g)
{
	if (g == NULL)
		return;
	munmap(g->f, GATE_FILE_SIZE);
	free(g);
}

int bw_gate_lock(struct bw_gate *g, int wait_ms, char *err, size_t errsize)
{
	/*
	 * pthread_mutex_timedlock takes a CLOCK_REALTIME deadline: read that clock itself, not
	 * bw_clock_wall_ms, which a test or benchmark may move (days pass in bench_retention)
	 * and which would then make the bound a wait of days, or none.
	 */
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	int64_t ns = (int64_t)ts.tv_nsec + (int64_t)wait_ms * 1000000;
	ts.tv_sec += (time_t)(ns / 1000000000);
	ts.tv_nsec = (long)(ns % 1000000000);
	int rc;
	while ((rc = pthread_mutex_timedlock(&g->f->mutex, &ts)) == EINTR)
		;
	if (rc == EOWNERDEAD) {
		pthread_mutex_consistent(&g->f->mutex);
		return 0;
	}
	if (rc == 0)
		return 0;
	snprintf(err, errsize, "writers' gate: %s", strerror(rc));
	return rc == ETIMEDOUT ? BW_EBUSY : BW_EIO;
}

void bw_gate_unlock(struct bw_gate *g)
{
	pthread_mutex_unlock(&g->f->mutex);
}
