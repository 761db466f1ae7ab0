/* psk.c: per-job NBD TLS keys: made, read back for the one start request, wiped and removed. */
#include "psk.h"

#include "io.h"
#include "rand.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KEY_BYTES 32
#define KEY_FILE "keys.psk" /* the name qemu's tls-creds-psk reads */
/* "bw:" + 64 hex + "\n" */
#define LINE_SIZE (sizeof(BW_PSK_IDENTITY) + 2 * KEY_BYTES + 1)

int bw_psk_dir(const char *state_dir, const char *job_id, char *dir, size_t size)
{
	int n = snprintf(dir, size, "%s/tls/%s", state_dir, job_id);
	return n < 0 || (size_t)n >= size ? BW_ERANGE : 0;
}

static int key_path(const char *state_dir, const char *job_id, char *path, size_t size)
{
	int n = snprintf(path, size, "%s/tls/%s/" KEY_FILE, state_dir, job_id);
	return n < 0 || (size_t)n >= size ? BW_ERANGE : 0;
}

int bw_psk_create(const char *state_dir, const char *job_id, char *err, size_t errsize)
{
	static const char hexdigits[] = "0123456789abcdef";
	char dir[4096], path[4200], line[LINE_SIZE];
	unsigned char key[KEY_BYTES];
	int rc = BW_ESYS, fd = -1;
	if (bw_psk_dir(state_dir, job_id, dir, sizeof(dir)) != 0 ||
	    key_path(state_dir, job_id, path, sizeof(path)) != 0) {
		snprintf(err, errsize, "the state directory's path is too long for a key");
		return BW_ERANGE;
	}
	int rrc = bw_psk_remove(state_dir, job_id, err, errsize); /* an earlier attempt's */
	if (rrc != 0)
		return rrc;
	char parent[4100];
	snprintf(parent, sizeof(parent), "%s/tls", state_dir);
	if (mkdir(parent, 0700) != 0 && errno != EEXIST) {
		snprintf(err, errsize, "mkdir %s: %s", parent, strerror(errno));
		return BW_ESYS;
	}
	if (mkdir(dir, 0700) != 0) {
		snprintf(err, errsize, "mkdir %s: %s", dir, strerror(errno));
		return BW_ESYS;
	}
	if (bw_rand_bytes(key, sizeof(key)) != 0) {
		snprintf(err, errsize, "getrandom: %s", strerror(errno));
		goto out;
	}
	size_t n = (size_t)snprintf(line, sizeof(line), "%s:", BW_PSK_IDENTITY);
	for (size_t i = 0; i < KEY_BYTES; i++) {
		line[n++] = hexdigits[key[i] >> 4];
		line[n++] = hexdigits[key[i] & 15];
	}
	line[n++] = '\n';
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0 || bw_write_all(fd, line, n) != 0 || fsync(fd) != 0) {
		snprintf(err, errsize, "%s: %s", path, strerror(errno));
		rc = BW_EIO;
		goto out;
	}
	rc = 0;
out:
	explicit_bzero(key, sizeof(key));
	explicit_bzero(line, sizeof(line));
	if (fd >= 0)
		close(fd);
	if (rc != 0) {
		char more[8];
		if (bw_psk_remove(state_dir, job_id, more, sizeof(more)) != 0) {
			/* left for the job's compensation, which removes it again */
		}
	}
	return rc;
}

int bw_psk_read(const char *state_dir, const char *job_id, char *hex)
{
	char path[4200], line[LINE_SIZE + 1];
	if (key_path(state_dir, job_id, path, sizeof(path)) != 0)
		return BW_ERANGE;
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? BW_ENOENT : BW_EIO;
	ssize_t got = read(fd, line, sizeof(line));
	close(fd);
	const size_t prefix = sizeof(BW_PSK_IDENTITY); /* "bw:" */
	int rc = BW_EIO;
	if (got == (ssize_t)LINE_SIZE && memcmp(line, BW_PSK_IDENTITY ":", prefix) == 0 &&
	    line[LINE_SIZE - 1] == '\n') {
		memcpy(hex, line + prefix, 2 * KEY_BYTES);
		hex[2 * KEY_BYTES] = '\0';
		rc = 0;
	}
	explicit_bzero(line, sizeof(line));
	return rc;
}

bool bw_psk_exists(const char *state_dir, const char *job_id)
{
	char dir[4096];
	struct stat st;
	return bw_psk_dir(state_dir, job_id, dir, sizeof(dir)) == 0 && lstat(dir, &st) == 0 &&
	       S_ISDIR(st.st_mode);
}

int bw_psk_remove(const char *state_dir, const char *job_id, char *err, size_t errsize)
{
	char dir[4096], path[4200];
	if (bw_psk_dir(state_dir, job_id, dir, sizeof(dir)) != 0 ||
	    key_path(state_dir, job_id, path, sizeof(path)) != 0)
		return BW_ERANGE;
	int fd = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd >= 0) {
		char zeros[LINE_SIZE] = {0};
		(void)bw_write_all(fd, zeros, sizeof(zeros));
		(void)fsync(fd);
		close(fd);
	}
	if (unlink(path) != 0 && errno != ENOENT) {
		snprintf(err, errsize, "unlink %s: %s", path, strerror(errno));
		return BW_EIO;
	}
	if (rmdir(dir) != 0 && errno != ENOENT) {
		snprintf(err, errsize, "rmdir %s: %s", dir, strerror(errno));
		return BW_EIO;
	}
	return 0;
}
