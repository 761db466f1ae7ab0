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

/* The directories and the empty image file (O_EXCL), without following symlinks. */
static int prepare(const struct bw_target *t, char *path, size_t size, char *err, size_t errsize)
{
	char key[24], file[160];
	int repo = -1, vm = -1, kd = -1, fd = -1;
	int rc;

	if ((rc = bw_target_path(t, path, size)) != 0) {
		snprintf(err, errsize, "image path too long");
		return rc;
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
		unlinkat(kd, file, 0);
		rc = BW_EIO;
	}
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

int bw_target_start(const struct bw_target *t, const char *log_path, pid_t *pid, char *err,
		    size_t errsize)
{
	char path[PATH_MAX], size[24], backing[PATH_MAX];
	int rc = prepare(t, path, sizeof(path), err, errsize);
	if (rc != 0)
		return rc;
	snprintf(size, sizeof(size), "%" PRId64, t->size_bytes);
	/* from <repo>/<vm dir>/<key>/ back to the repository root */
	if (t->parent_path)
		snprintf(backing, sizeof(backing), "../../%s", t->parent_path);
	const char *full[] = {t->qemu_img, "create", "-q", "-f", "qcow2", path, size, NULL};
	const char *overlay[] = {t->qemu_img, "create", "-q", "-f", "qcow2", "-b", backing,
				 "-F", "qcow2", path, size, NULL};
	struct bw_spawn s = {t->parent_path ? overlay : full, NULL, log_path, false};
	rc = bw_spawn(&s, pid, NULL, err, errsize);
	if (rc != 0)
		unlink(path);
	return rc;
}

int bw_target_finish(const struct bw_target *t, pid_t pid, const char *log_path, char *err,
		     size_t errsize)
{
	int st;
	pid_t r = waitpid(pid, &st, WNOHANG);
	if (r == 0)
		return BW_EBUSY;
	if (r == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0)
		return 0;
	char tail[512] = "", what[96] = "vanished";
	if (r == pid)
		bw_status_text(st, what, sizeof(what));
	if (log_path && bw_log_tail(log_path, 400, tail, sizeof(tail)) == 0 && tail[0])
		snprintf(err, errsize, "qemu-img create %s: %s", what, tail);
	else
		snprintf(err, errsize, "qemu-img create %s", what);
	if (bw_target_remove(t) != 0)
		snprintf(err + strlen(err), errsize - strlen(err), " (and the image is still there)");
	return BW_ECHILD;
}

int bw_target_create(const struct bw_target *t, char *err, size_t errsize)
{
	char log[] = "/tmp/bw-qemu-img-XXXXXX";
	int fd = mkstemp(log); /* closed at once: never inherited */
	if (fd < 0) {
		snprintf(err, errsize, "mkstemp: %s", strerror(errno));
		return BW_EIO;
	}
	close(fd);
	pid_t pid;
	int rc = bw_target_start(t, log, &pid, err, errsize);
	if (rc == 0) {
		struct pollfd p = {(int)syscall(SYS_pidfd_open, pid, 0), POLLIN, 0};
		while ((rc = bw_target_finish(t, pid, log, err, errsize)) == BW_EBUSY)
			poll(&p, p.fd >= 0 ? 1 : 0, 1000);
		if (p.fd >= 0)
			close(p.fd);
	}
	unlink(log);
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

int bw_target_remove(const struct bw_target *t)
{
	char path[PATH_MAX];
	int rc = bw_target_path(t, path, sizeof(path));
	if (rc != 0)
		return rc;
	if (unlink(path) != 0 && errno != ENOENT)
		return bw_err_from_errno(errno);
	return 0;
}
