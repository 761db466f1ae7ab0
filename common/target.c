/* target.c: qcow2 images under <repository>/<vm dir>/<key>/<job_id>.qcow2, created without following symlinks. */
#include "target.h"
#include "child.h"
#include "text.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define READABLE_MAX 48
#define QEMU_IMG_TIMEOUT_MS 60000

void bw_target_vm_dir(const char *vm_id, const char *vm_name, char *out)
{
	const char *src = vm_id ? vm_id : vm_name;
	char readable[READABLE_MAX + 1];
	size_t n = 0;
	for (const unsigned char *p = (const unsigned char *)src; *p && n < READABLE_MAX; p++) {
		unsigned char c = *p;
		if (c >= 'A' && c <= 'Z')
			c = (unsigned char)(c - 'A' + 'a');
		if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-')
			readable[n++] = (char)c;
		else if (n == 0 || readable[n - 1] != '_')
			readable[n++] = '_';
	}
	readable[n] = '\0';
	snprintf(out, BW_VM_DIR_MAX, "%s-%s-%016" PRIx64, vm_id ? "id" : "name", readable,
		 bw_fnv1a64(src, strlen(src)));
}

int bw_target_path(const struct bw_target *t, char *out, size_t size)
{
	int n = snprintf(out, size, "%s/%s/%" PRId64 "/%s.qcow2", t->repository, t->vm_dir, t->key,
			 t->job_id);
	return n < 0 || (size_t)n >= size ? BW_ERANGE : 0;
}

/* Opens (creating) directory name below dirfd, refusing a symlink. */
static int subdir(int dirfd, const char *name, int *out, char *err, size_t errsize)
{
	if (mkdirat(dirfd, name, 0750) != 0 && errno != EEXIST) {
		snprintf(err, errsize, "mkdir %s: %s", name, strerror(errno));
		return bw_err_from_errno(errno);
	}
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		snprintf(err, errsize, "%s: %s", name,
			 e == ELOOP || e == ENOTDIR ? "is a symlink or not a directory (refused)"
						    : strerror(e));
		return e == ELOOP || e == ENOTDIR ? BW_EPERM : bw_err_from_errno(e);
	}
	*out = fd;
	return 0;
}

/* Runs qemu-img with argv; on failure puts its own words (from its output) into err. */
static int qemu_img(const char *const *argv, char *out_path, char *err, size_t errsize)
{
	char log[] = "/tmp/bw-qemu-img-XXXXXX";
	int fd = mkstemp(log); /* closed at once: never inherited */
	if (fd < 0) {
		snprintf(err, errsize, "mkstemp: %s", strerror(errno));
		return BW_EIO;
	}
	close(fd);
	struct bw_spawn s = {argv, NULL, log, false};
	int status = 0;
	int rc = bw_run(&s, QEMU_IMG_TIMEOUT_MS, &status, err, errsize);
	if (rc == BW_ECHILD) {
		char tail[512];
		if (bw_log_tail(log, 400, tail, sizeof(tail)) == 0 && tail[0])
			snprintf(err, errsize, "%s", tail);
	}
	if (rc == 0 && out_path)
		snprintf(out_path, PATH_MAX, "%s", log); /* the caller reads and removes it */
	else
		unlink(log);
	return rc;
}

/* qcow2 version 3 (docs/interop/qcow2.txt in QEMU), laid out as `qemu-img create` does:
 * the header in cluster 0, the refcount table in 1, its one refcount block in 2, the L1
 * table from 3 on (all zero: nothing allocated yet), 64 KiB clusters, 16-bit refcounts. */
#define QCOW2_CLUSTER_BITS 16
#define QCOW2_CLUSTER (1 << QCOW2_CLUSTER_BITS)
#define QCOW2_HEADER_LEN 104
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau

static void be32(unsigned char *p, uint32_t v)
{
	for (int i = 3; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

static void be64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

/* Writes an empty qcow2 of size bytes into the new, empty file fd; an overlay over backing
 * (relative to the image, a qcow2) when backing is not NULL. */
static int write_qcow2(int fd, int64_t size, const char *backing, char *err, size_t errsize)
{
	/* one L1 entry maps an L2 table of CLUSTER/8 entries of a cluster each */
	uint64_t per_l1 = (uint64_t)QCOW2_CLUSTER * (QCOW2_CLUSTER / 8);
	uint64_t l1_size = ((uint64_t)size + per_l1 - 1) / per_l1;
	uint64_t l1_clusters = (l1_size * 8 + QCOW2_CLUSTER - 1) / QCOW2_CLUSTER;
	uint64_t clusters = 3 + (l1_clusters ? l1_clusters : 1);
	size_t blen = backing ? strlen(backing) : 0;
	if (size <= 0 || l1_size > 0x2000000 || blen > 1023) {
		snprintf(err, errsize, "cannot make a qcow2 of %" PRId64 " bytes%s", size,
			 blen > 1023 ? " with so long a backing path" : "");
		return BW_EINVAL;
	}

	unsigned char *c = calloc(3, QCOW2_CLUSTER);
	if (c == NULL)
		return BW_ENOMEM;
	unsigned char *h = c, *reftable = c + QCOW2_CLUSTER, *refblock = c + 2 * QCOW2_CLUSTER;
	memcpy(h, "QFI\xfb", 4);
	be32(h + 4, 3);                               /* version */
	be32(h + 20, QCOW2_CLUSTER_BITS);
	be64(h + 24, (uint64_t)size);
	be32(h + 36, (uint32_t)l1_size);
	be64(h + 40, 3 * (uint64_t)QCOW2_CLUSTER);    /* L1 table */
	be64(h + 48, 1 * (uint64_t)QCOW2_CLUSTER);    /* refcount table */
	be32(h + 56, 1);                              /* refcount table clusters */
	be32(h + 96, 4);                              /* refcount order: 16 bits */
	be32(h + 100, QCOW2_HEADER_LEN);
	size_t at = QCOW2_HEADER_LEN;
	if (backing) {
		be32(h + at, QCOW2_EXT_BACKING_FORMAT); /* then the end-of-extensions entry (0) */
		be32(h + at + 4, 5);
		memcpy(h + at + 8, "qcow2", 5);
		at += 8 + 8 + 8;
		be64(h + 8, at);                      /* the backing file name follows */
		be32(h + 16, (uint32_t)blen);
		memcpy(h + at, backing, blen);
	}
	be64(reftable, 2 * (uint64_t)QCOW2_CLUSTER);  /* its one refcount block */
	for (uint64_t i = 0; i < clusters; i++)
		refblock[2 * i + 1] = 1;                  /* every metadata cluster used once */

	int rc = 0;
	if (ftruncate(fd, (off_t)(clusters * QCOW2_CLUSTER)) != 0 ||
	    pwrite(fd, c, 3 * QCOW2_CLUSTER, 0) != 3 * QCOW2_CLUSTER) {
		snprintf(err, errsize, "writing the qcow2: %s", strerror(errno));
		rc = bw_err_from_errno(errno);
	}
	free(c);
	return rc;
}

/* The directories and the image (O_EXCL: a new file), without following symlinks. */
int bw_target_create(const struct bw_target *t, char *err, size_t errsize)
{
	char path[PATH_MAX], key[24], file[160], backing[PATH_MAX];
	int repo = -1, vm = -1, kd = -1, fd = -1;
	int rc;

	if ((rc = bw_target_path(t, path, sizeof(path))) != 0) {
		snprintf(err, errsize, "image path too long");
		return rc;
	}
	/* from <repo>/<vm dir>/<key>/ back to the repository root: the repository can move */
	if (t->parent_path &&
	    (size_t)snprintf(backing, sizeof(backing), "../../%s", t->parent_path) >= sizeof(backing)) {
		snprintf(err, errsize, "parent path too long");
		return BW_ERANGE;
	}
	snprintf(key, sizeof(key), "%" PRId64, t->key);
	snprintf(file, sizeof(file), "%s.qcow2", t->job_id);
	repo = open(t->repository, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (repo < 0) {
		snprintf(err, errsize, "repository %s: %s", t->repository, strerror(errno));
		rc = bw_err_from_errno(errno);
		goto out;
	}
	if ((rc = subdir(repo, t->vm_dir, &vm, err, errsize)) != 0 ||
	    (rc = subdir(vm, key, &kd, err, errsize)) != 0)
		goto out;
	fd = openat(kd, file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, t->mode);
	if (fd < 0) {
		snprintf(err, errsize, "%s: %s", path, strerror(errno));
		rc = errno == EEXIST ? BW_EEXIST : bw_err_from_errno(errno);
		goto out;
	}
	if (fchmod(fd, t->mode) != 0) { /* the umask may have taken bits away */
		snprintf(err, errsize, "chmod %s: %s", path, strerror(errno));
		rc = BW_EIO;
	} else {
		rc = write_qcow2(fd, t->size_bytes, t->parent_path ? backing : NULL, err, errsize);
	}
	if (rc != 0)
		unlinkat(kd, file, 0); /* nothing is left behind */
out:
	if (fd >= 0)
		close(fd);
	if (kd >= 0)
		close(kd);
	if (vm >= 0)
		close(vm);
	if (repo >= 0)
		close(repo);
	return rc;
}

int bw_image_check_start(const char *qemu_img, const char *path, const char *log_path,
			 pid_t *pid, char *err, size_t errsize)
{
	const char *argv[] = {qemu_img, "check", "-q", path, NULL};
	struct bw_spawn s = {argv, NULL, log_path, false};
	return bw_spawn(&s, pid, NULL, err, errsize);
}

int bw_image_check_finish(pid_t pid, const char *path, const char *log_path,
			  int64_t *virtual_size, int64_t *actual_size, char *err, size_t errsize)
{
	int st;
	pid_t r = waitpid(pid, &st, WNOHANG);
	if (r == 0)
		return BW_EBUSY;
	if (r != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		char tail[512] = "", what[96] = "vanished";
		if (r == pid)
			bw_status_text(st, what, sizeof(what));
		if (log_path && bw_log_tail(log_path, 400, tail, sizeof(tail)) == 0 && tail[0])
			snprintf(err, errsize, "qemu-img check %s: %s", what, tail);
		else
			snprintf(err, errsize, "qemu-img check %s", what);
		return BW_ECHILD;
	}
	int rc = bw_image_sizes(path, virtual_size, actual_size);
	if (rc != 0)
		snprintf(err, errsize, "%s: cannot read its size: %s", path, bw_strerror(rc));
	return rc;
}

int bw_image_sizes(const char *path, int64_t *virtual_size, int64_t *actual_size)
{
	/* QCowHeader: magic "QFI\xfb", version, backing file offset and size, cluster bits,
	 * then the virtual size at byte 24, all big-endian */
	unsigned char h[32];
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return bw_err_from_errno(errno);
	ssize_t got = pread(fd, h, sizeof(h), 0);
	int rc = fstat(fd, &st) == 0 ? 0 : BW_EIO;
	close(fd);
	if (rc != 0 || got != (ssize_t)sizeof(h))
		return BW_EIO;
	if (memcmp(h, "QFI\xfb", 4) != 0)
		return BW_EINVAL;
	uint64_t size = 0;
	for (int i = 24; i < 32; i++)
		size = size << 8 | h[i];
	*virtual_size = (int64_t)size;
	*actual_size = (int64_t)st.st_blocks * 512;
	return 0;
}

int bw_target_check_parent(const char *qemu_img_bin, const char *repository,
			   const char *parent_path, char *err, size_t errsize)
{
	char joined[PATH_MAX], real_repo[PATH_MAX], real[PATH_MAX], out[PATH_MAX];
	struct stat st;

	if (realpath(repository, real_repo) == NULL) {
		snprintf(err, errsize, "repository %s: %s", repository, strerror(errno));
		return BW_ENOENT;
	}
	if ((size_t)snprintf(joined, sizeof(joined), "%s/%s", repository, parent_path) >=
		    sizeof(joined) ||
	    realpath(joined, real) == NULL) {
		snprintf(err, errsize, "parent %s: %s", parent_path, strerror(errno));
		return BW_ENOENT;
	}
	size_t rn = strlen(real_repo);
	if (strncmp(real, real_repo, rn) != 0 || real[rn] != '/') {
		snprintf(err, errsize, "parent %s resolves outside the repository", parent_path);
		return BW_EPERM;
	}
	if (stat(real, &st) != 0 || !S_ISREG(st.st_mode)) {
		snprintf(err, errsize, "parent %s is not a regular file", parent_path);
		return BW_ENOENT;
	}

	/* Without -U: fails when a running process holds the image's write lock. */
	const char *locked_argv[] = {qemu_img_bin, "info", "--output=json", real, NULL};
	int rc = qemu_img(locked_argv, out, err, errsize);
	if (rc == BW_ECHILD && strstr(err, "lock") != NULL) {
		char detail[256];
		snprintf(detail, sizeof(detail), "%s", err);
		snprintf(err, errsize, "parent %s is in use: %s", parent_path, detail);
		return BW_EBUSY;
	}
	if (rc != 0)
		return rc == BW_ECHILD ? BW_EINVAL : rc;

	struct json_object *info = json_object_from_file(out);
	unlink(out);
	struct json_object *format = NULL;
	const char *f = info && json_object_object_get_ex(info, "format", &format)
				? json_object_get_string(format)
				: NULL;
	rc = f && strcmp(f, "qcow2") == 0 ? 0 : BW_EINVAL;
	if (rc != 0)
		snprintf(err, errsize, "parent %s is %s, not a qcow2 image", parent_path,
			 f ? f : "unreadable");
	json_object_put(info);
	return rc;
}
