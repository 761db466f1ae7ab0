/* target.c: qcow2 images under <repository>/<vm dir>/<key>/<job_id>.qcow2, created without following symlinks. */
#define _GNU_SOURCE /* F_OFD_GETLK */
#include "target.h"
#include "child.h"
#include "text.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define READABLE_MAX 48

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

/* Opens (with create: creating) directory name below dirfd, refusing a symlink. */
static int subdir(int dirfd, const char *name, bool create, int *out, char *err, size_t errsize)
{
	if (create && mkdirat(dirfd, name, 0750) != 0 && errno != EEXIST) {
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

/* The descriptors of an image's directories: the repository, the VM's, the disk's. */
struct disk_dir {
	int repo, vm, key;
};

static void disk_dir_close(struct disk_dir *d)
{
	if (d->key >= 0)
		close(d->key);
	if (d->vm >= 0)
		close(d->vm);
	if (d->repo >= 0)
		close(d->repo);
}

/*
 * Opens <repository>/<vm dir>/<key>/ one component at a time, never following a symlink
 * below the repository (create: making what is missing). On failure every descriptor
 * opened is closed and err says why.
 */
static int disk_dir_open(const struct bw_target *t, bool create, struct disk_dir *d, char *err,
			 size_t errsize)
{
	char key[24];
	int rc;
	*d = (struct disk_dir){-1, -1, -1};
	snprintf(key, sizeof(key), "%" PRId64, t->key);
	d->repo = open(t->repository, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (d->repo < 0) {
		snprintf(err, errsize, "repository %s: %s", t->repository, strerror(errno));
		return bw_err_from_errno(errno);
	}
	if ((rc = subdir(d->repo, t->vm_dir, create, &d->vm, err, errsize)) != 0 ||
	    (rc = subdir(d->vm, key, create, &d->key, err, errsize)) != 0)
		disk_dir_close(d);
	return rc;
}

/* The directories and the image (O_EXCL: a new file), without following symlinks. */
int bw_target_create(const struct bw_target *t, char *err, size_t errsize)
{
	char path[PATH_MAX], file[160], backing[PATH_MAX];
	struct disk_dir d;
	int fd = -1, rc;

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
	snprintf(file, sizeof(file), "%s.qcow2", t->job_id);
	if ((rc = disk_dir_open(t, true, &d, err, errsize)) != 0)
		return rc;
	fd = openat(d.key, file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, t->mode);
	if (fd < 0) {
		snprintf(err, errsize, "%s: %s", path, strerror(errno));
		rc = errno == EEXIST ? BW_EEXIST : bw_err_from_errno(errno);
	} else if (fchmod(fd, t->mode) != 0) { /* the umask may have taken bits away */
		snprintf(err, errsize, "chmod %s: %s", path, strerror(errno));
		rc = BW_EIO;
	} else {
		rc = write_qcow2(fd, t->size_bytes, t->parent_path ? backing : NULL, err, errsize);
	}
	if (fd >= 0 && rc != 0)
		unlinkat(d.key, file, 0); /* nothing is left behind */
	if (fd >= 0)
		close(fd);
	disk_dir_close(&d);
	return rc;
}

int bw_target_remove(const struct bw_target *t, char *err, size_t errsize)
{
	char file[160];
	struct disk_dir d;
	snprintf(file, sizeof(file), "%s.qcow2", t->job_id);
	int rc = disk_dir_open(t, false, &d, err, errsize);
	if (rc != 0)
		return rc == BW_ENOENT ? 0 : rc; /* nothing there: nothing to remove */
	if (unlinkat(d.key, file, 0) != 0 && errno != ENOENT) {
		snprintf(err, errsize, "unlink %s: %s", file, strerror(errno));
		rc = bw_err_from_errno(errno);
	}
	disk_dir_close(&d);
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

/* ---- the backing chain of a parent ------------------------------------------------------ */

/*
 * Where qemu puts what the walk reads (docs/interop/qcow2.txt): header, extensions and
 * backing name all follow one another at the start of the file; 64 KiB holds them for
 * every image qemu-img or bw writes, and bounds the read.
 */
#define HEADER_READ 65536
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_BACKING_NAME_MAX 1023 /* qemu refuses a longer one */
#define QCOW2_FORMAT_NAME_MAX 15    /* qemu's backing_format[16] */
#define QCOW2_INCOMPAT_DIRTY 0x1u
#define QCOW2_INCOMPAT_CORRUPT 0x2u
#define QCOW2_INCOMPAT_DATA_FILE 0x4u
#define QCOW2_INCOMPAT_KNOWN 0x1fu /* dirty, corrupt, data file, compression type, extended L2 */
/* qemu's file-posix locks: a process with write permission holds a shared lock on byte
 * RAW_LOCK_PERM_BASE (100) + the bit number of BLK_PERM_WRITE (1). */
#define QEMU_LOCK_WRITE_BYTE 101
/* the path qemu opens for a chain image is "<repository>/<vm dir>/<key>/../../<rel>":
 * at most this many bytes come between the repository and rel */
#define OVERLAY_PREFIX_MAX (1 + (BW_VM_DIR_MAX - 1) + 1 + 10 + 1 + 6)
/* openat2 gives EAGAIN when a rename raced with a ".." walk under RESOLVE_BENEATH */
#define OPENAT2_TRIES 8

static const char *const chain_rules[] = {
	[BW_CHAIN_OK] = "ok",
#define BW__CHAIN_RULE(name, rule, code) [BW_CHAIN_##name] = rule,
	BW_CHAIN_FAULT_MAP(BW__CHAIN_RULE)
#undef BW__CHAIN_RULE
};

static const int chain_codes[] = {
	[BW_CHAIN_OK] = 0,
#define BW__CHAIN_CODE(name, rule, code) [BW_CHAIN_##name] = code,
	BW_CHAIN_FAULT_MAP(BW__CHAIN_CODE)
#undef BW__CHAIN_CODE
};

const char *bw_target_chain_rule(enum bw_chain_fault fault)
{
	return (size_t)fault < sizeof(chain_rules) / sizeof(chain_rules[0]) ? chain_rules[fault]
									      : "unknown";
}

/* The walk's state: what a fault is reported with. */
struct chain {
	enum bw_chain_fault fault;
	int code;
	char *err;
	size_t errsize;
};

static int chain_fail(struct chain *c, enum bw_chain_fault fault, int code, const char *rel,
		      const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int chain_fail(struct chain *c, enum bw_chain_fault fault, int code, const char *rel,
		      const char *fmt, ...)
{
	char what[512], name[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	bw_text_escape(name, sizeof(name), rel, strlen(rel));
	snprintf(c->err, c->errsize, "%s: %s", name, what);
	c->fault = fault;
	c->code = code ? code : chain_codes[fault];
	return c->code;
}

static uint32_t rd32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t rd64(const unsigned char *p)
{
	return (uint64_t)rd32(p) << 32 | rd32(p + 4);
}

/* What the walk needs of one qcow2 header. */
struct qcow2_head {
	char backing[QCOW2_BACKING_NAME_MAX + 1];  /* "" when it has no backing file */
	char format[QCOW2_FORMAT_NAME_MAX + 1];    /* the backing format extension's */
	bool has_format;
};

/*
 * Parses b[0..got) (got < HEADER_READ: the whole file) the way qemu's qcow2_do_open reads
 * it, as far as the chain is concerned. Returns 0 or a fault with its words in why.
 */
static enum bw_chain_fault parse_head(const unsigned char *b, size_t got, struct qcow2_head *h,
				      char *why, size_t whysize)
{
	const char *cut = got < HEADER_READ ? "the file ends" : "bw reads 64 KiB";
	if (got < 4 || memcmp(b, "QFI\xfb", 4) != 0) {
		snprintf(why, whysize, "not a qcow2 image (no qcow2 magic)");
		return BW_CHAIN_NOT_QCOW2;
	}
	if (got < 8) {
		snprintf(why, whysize, "truncated qcow2 header: %zu bytes", got);
		return BW_CHAIN_BAD_HEADER;
	}
	uint32_t version = rd32(b + 4);
	if (version != 2 && version != 3) {
		snprintf(why, whysize, "qcow2 version %" PRIu32 " (bw reads 2 and 3)", version);
		return BW_CHAIN_NOT_QCOW2;
	}
	size_t need = version == 2 ? QCOW2_V2_HEADER_LEN : QCOW2_HEADER_LEN;
	if (got < need) {
		snprintf(why, whysize, "truncated qcow2 header: %zu of %zu bytes", got, need);
		return BW_CHAIN_BAD_HEADER;
	}
	uint64_t backing_offset = rd64(b + 8);
	uint32_t backing_size = rd32(b + 16);
	uint32_t cluster_bits = rd32(b + 20);
	uint32_t crypt = rd32(b + 32);
	if (cluster_bits < 9 || cluster_bits > 21) {
		snprintf(why, whysize, "cluster_bits %" PRIu32 " (9 to 21)", cluster_bits);
		return BW_CHAIN_BAD_HEADER;
	}
	uint64_t cluster = (uint64_t)1 << cluster_bits;
	uint64_t ext_start = need;
	if (version == 3) {
		uint64_t incompat = rd64(b + 72);
		uint32_t header_len = rd32(b + 100);
		if (incompat & QCOW2_INCOMPAT_CORRUPT) {
			snprintf(why, whysize, "marked corrupt by qemu (repair it: qemu-img check -r)");
			return BW_CHAIN_CORRUPT;
		}
		if (incompat & QCOW2_INCOMPAT_DIRTY) {
			snprintf(why, whysize, "marked dirty: not closed cleanly by its last writer");
			return BW_CHAIN_DIRTY;
		}
		if (incompat & QCOW2_INCOMPAT_DATA_FILE) {
			snprintf(why, whysize, "keeps its data in an external data file");
			return BW_CHAIN_UNSUPPORTED;
		}
		if (incompat & ~(uint64_t)QCOW2_INCOMPAT_KNOWN) {
			snprintf(why, whysize, "unknown incompatible features 0x%" PRIx64, incompat);
			return BW_CHAIN_UNSUPPORTED;
		}
		if (header_len < QCOW2_HEADER_LEN || header_len > cluster) {
			snprintf(why, whysize, "header_length %" PRIu32, header_len);
			return BW_CHAIN_BAD_HEADER;
		}
		ext_start = header_len;
	}
	if (crypt != 0) {
		snprintf(why, whysize, "encrypted (method %" PRIu32 ")", crypt);
		return BW_CHAIN_UNSUPPORTED;
	}

	h->backing[0] = '\0';
	if (backing_offset != 0 && backing_size != 0) {
		if (backing_size > QCOW2_BACKING_NAME_MAX || backing_offset > cluster ||
		    backing_size > cluster - backing_offset) {
			snprintf(why, whysize, "backing file name at %" PRIu64 " of %" PRIu32 " bytes",
				 backing_offset, backing_size);
			return BW_CHAIN_BAD_HEADER;
		}
		if (backing_offset + backing_size > got) {
			snprintf(why, whysize, "truncated: the backing file name passes %zu bytes (%s)",
				 got, cut);
			return BW_CHAIN_BAD_HEADER;
		}
		if (memchr(b + backing_offset, '\0', backing_size) != NULL) {
			snprintf(why, whysize, "a NUL byte in the backing file name");
			return BW_CHAIN_BAD_HEADER;
		}
		memcpy(h->backing, b + backing_offset, backing_size);
		h->backing[backing_size] = '\0';
	}

	/* the extensions run from the header's end to the backing name (or the cluster's end),
	 * each {be32 type, be32 length, data padded to 8}, type 0 ending them */
	uint64_t ext_end = backing_offset != 0 ? backing_offset : cluster;
	h->has_format = false;
	for (uint64_t at = ext_start; at < ext_end;) { /* qemu: no room, no extensions */
		if (at + 8 > ext_end) {
			snprintf(why, whysize, "header extensions overflow at %" PRIu64, at);
			return BW_CHAIN_BAD_HEADER;
		}
		if (at + 8 > got) {
			snprintf(why, whysize, "truncated: the header extensions pass %zu bytes (%s)",
				 got, cut);
			return BW_CHAIN_BAD_HEADER;
		}
		uint32_t type = rd32(b + at), len = rd32(b + at + 4);
		if (type == 0)
			break;
		if (len > ext_end - at - 8) {
			snprintf(why, whysize, "header extension 0x%08" PRIx32 " of %" PRIu32
				 " bytes overflows", type, len);
			return BW_CHAIN_BAD_HEADER;
		}
		if (at + 8 + len > got) {
			snprintf(why, whysize, "truncated: a header extension passes %zu bytes (%s)",
				 got, cut);
			return BW_CHAIN_BAD_HEADER;
		}
		if (type == QCOW2_EXT_BACKING_FORMAT) {
			if (len > QCOW2_FORMAT_NAME_MAX || memchr(b + at + 8, '\0', len) != NULL) {
				snprintf(why, whysize, "a backing format name of %" PRIu32 " bytes",
					 len);
				return BW_CHAIN_BAD_HEADER;
			}
			memcpy(h->format, b + at + 8, len);
			h->format[len] = '\0';
			h->has_format = true;
		}
		at += 8 + (((uint64_t)len + 7) & ~(uint64_t)7);
	}
	return BW_CHAIN_OK;
}

/* qemu's path_has_protocol: a ':' before the first '/' ("nbd:...", "json:{...}", "file:x"). */
static bool has_protocol(const char *name)
{
	return name[strcspn(name, ":/")] == ':';
}

/*
 * Strips the repository from an absolute name: returns the part below it ("" for the
 * repository itself), or NULL when name does not begin with repo's path. Compared
 * component by component, so "/srv/repo" matches "/srv//repo/x" but not "/srv/repo2/x".
 */
static const char *below(const char *name, const char *repo)
{
	const char *n = name, *r = repo;
	for (;;) {
		while (*r == '/')
			r++;
		while (*n == '/')
			n++;
		if (*r == '\0')
			return n; /* at a component's start: matched whole components */
		size_t rl = strcspn(r, "/"), nl = strcspn(n, "/");
		if (rl != nl || memcmp(r, n, rl) != 0)
			return NULL;
		r += rl;
		n += nl;
		if (*n != '\0' && *n != '/')
			return NULL;
	}
}

/* openat2 beneath the repository, a FIFO or a device never waited on; -1 and errno. */
static int open_beneath(int repo, const char *rel)
{
	struct open_how how = {
		.flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY,
		.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
	};
	for (int i = 0; i < OPENAT2_TRIES; i++) {
		long fd = syscall(SYS_openat2, repo, rel[0] ? rel : ".", &how, sizeof(how));
		if (fd >= 0 || errno != EAGAIN)
			return (int)fd;
	}
	return -1;
}

static const char *file_kind(mode_t mode)
{
	return S_ISDIR(mode)    ? "a directory"
	       : S_ISFIFO(mode) ? "a FIFO"
	       : S_ISSOCK(mode) ? "a socket"
	       : S_ISCHR(mode)  ? "a character device"
	       : S_ISBLK(mode)  ? "a block device"
				: "not a regular file";
}

/*
 * One image of the chain: opened beneath repo, checked, its header parsed into *h.
 * seen[0..*n_seen) are the images met before; this one is added.
 */
static int check_image(struct chain *c, int repo, const char *rel, unsigned char *buf,
		       struct stat *seen, size_t *n_seen, struct qcow2_head *h)
{
	char why[256];
	struct stat st;
	int fd = open_beneath(repo, rel);
	if (fd < 0) {
		int e = errno;
		switch (e) {
		case ENOENT:
		case ENOTDIR:
			return chain_fail(c, BW_CHAIN_NOT_FOUND, 0, rel, "no such file");
		case EXDEV:
			return chain_fail(c, BW_CHAIN_OUTSIDE, 0, rel,
					  "leads out of the repository (\"..\", an absolute "
					  "symlink or a symlink pointing out)");
		case ELOOP:
			return chain_fail(c, BW_CHAIN_NOT_FOUND, 0, rel,
					  "a symlink loop, or a /proc magic link");
		case ENAMETOOLONG:
			return chain_fail(c, BW_CHAIN_TOO_LONG, 0, rel, "path too long");
		case ENOSYS:
			return chain_fail(c, BW_CHAIN_UNREADABLE, BW_ENOTSUP, rel,
					  "this kernel has no openat2 (Linux 5.6 or later, not "
					  "filtered by seccomp, is needed to resolve a parent "
					  "beneath the repository)");
		default:
			return chain_fail(c, BW_CHAIN_UNREADABLE, bw_err_from_errno(e), rel, "%s",
					  strerror(e));
		}
	}
	int rc = 0;
	if (fstat(fd, &st) != 0) {
		rc = chain_fail(c, BW_CHAIN_UNREADABLE, bw_err_from_errno(errno), rel, "fstat: %s",
				strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = chain_fail(c, BW_CHAIN_NOT_FOUND, 0, rel, "%s, not a regular file",
				file_kind(st.st_mode));
		goto out;
	}
	for (size_t i = 0; i < *n_seen; i++)
		if (seen[i].st_dev == st.st_dev && seen[i].st_ino == st.st_ino) {
			rc = chain_fail(c, BW_CHAIN_LOOP, 0, rel,
					"the backing chain loops: image %zu of the chain is this "
					"file again",
					i + 1);
			goto out;
		}
	seen[(*n_seen)++] = st;

	/* would a write lock on qemu's byte conflict? (a filesystem that cannot answer, as
	 * some network ones, is not refused: qemu itself then runs without locks) */
	struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
			   .l_start = QEMU_LOCK_WRITE_BYTE, .l_len = 1};
	if (fcntl(fd, F_OFD_GETLK, &lk) == 0 && lk.l_type != F_UNLCK) {
		rc = chain_fail(c, BW_CHAIN_IN_USE, 0, rel,
				"held for writing by a running process (qemu's write lock)");
		goto out;
	}

	ssize_t got = pread(fd, buf, HEADER_READ, 0);
	if (got < 0) {
		rc = chain_fail(c, BW_CHAIN_UNREADABLE, bw_err_from_errno(errno), rel, "read: %s",
				strerror(errno));
		goto out;
	}
	enum bw_chain_fault f = parse_head(buf, (size_t)got, h, why, sizeof(why));
	if (f != BW_CHAIN_OK) {
		rc = chain_fail(c, f, 0, rel, "%s", why);
		goto out;
	}
	if (h->backing[0] == '\0')
		goto out;
	char name[256];
	bw_text_escape(name, sizeof(name), h->backing, strlen(h->backing));
	if (has_protocol(h->backing))
		rc = chain_fail(c, BW_CHAIN_PROTOCOL, 0, rel,
				"backing file \"%s\" names a protocol, not a file", name);
	else if (!h->has_format)
		rc = chain_fail(c, BW_CHAIN_NO_FORMAT, 0, rel,
				"backing file \"%s\" has no backing format (qemu would guess it)",
				name);
	else if (strcmp(h->format, "qcow2") != 0)
		rc = chain_fail(c, BW_CHAIN_FORMAT, 0, rel,
				"backing file \"%s\" has format \"%s\", not qcow2", name, h->format);
out:
	close(fd);
	return rc;
}

/*
 * The next image's path below the repository into next[PATH_MAX], and in *prefix the
 * length of what precedes it in the path qemu opens. A relative name follows the directory
 * of rel, as qemu's path_combine does (no "..", no symlink resolved); an absolute one
 * loses the repository's path (as given or real_repo, its real path).
 */
static int next_path(struct chain *c, const char *repository, const char *real_repo,
		     const char *rel, const char *backing, char *next, size_t *prefix)
{
	if (backing[0] == '/') {
		const char *r = below(backing, repository);
		if (r == NULL && real_repo[0])
			r = below(backing, real_repo);
		if (r == NULL)
			return chain_fail(c, BW_CHAIN_OUTSIDE, 0, rel,
					  "backing file \"%s\" lies outside the repository", backing);
		*prefix = (size_t)(r - backing);
		snprintf(next, PATH_MAX, "%s", r);
		return 0;
	}
	const char *slash = strrchr(rel, '/');
	int dir = slash ? (int)(slash - rel + 1) : 0;
	if ((size_t)dir + strlen(backing) >= PATH_MAX)
		return chain_fail(c, BW_CHAIN_TOO_LONG, 0, rel,
				  "the path of its backing file passes %d bytes", PATH_MAX - 1);
	snprintf(next, PATH_MAX, "%.*s%s", dir, rel, backing);
	return 0;
}

int bw_target_check_chain(const char *repository, const char *parent_path,
			  enum bw_chain_fault *fault, char *err, size_t errsize)
{
	struct chain c = {BW_CHAIN_OK, 0, err, errsize};
	char real_repo[PATH_MAX] = "";
	char *rel = NULL, *next = NULL;
	unsigned char *buf = NULL;
	struct stat *seen = NULL;
	struct qcow2_head h;
	size_t n_seen = 0;
	int repo = -1;
	int rc;

	rel = malloc(PATH_MAX);
	next = malloc(PATH_MAX);
	buf = malloc(HEADER_READ);
	seen = calloc(BW_CHAIN_MAX, sizeof(*seen));
	if (rel == NULL || next == NULL || buf == NULL || seen == NULL) {
		rc = chain_fail(&c, BW_CHAIN_UNREADABLE, BW_ENOMEM, parent_path, "out of memory");
		goto out;
	}
	repo = open(repository, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (repo < 0) {
		int e = errno;
		rc = chain_fail(&c, e == ENOENT || e == ENOTDIR ? BW_CHAIN_NOT_FOUND
								: BW_CHAIN_UNREADABLE,
				bw_err_from_errno(e), parent_path, "repository %s: %s", repository,
				strerror(e));
		goto out;
	}
	if (realpath(repository, real_repo) == NULL)
		real_repo[0] = '\0'; /* then absolute names must use the path as given */

	/* the overlay's "<vm dir>/<key>/../../" stands between the repository and the chain */
	size_t prefix = strlen(repository) + OVERLAY_PREFIX_MAX;
	if (strlen(parent_path) >= PATH_MAX) {
		rc = chain_fail(&c, BW_CHAIN_TOO_LONG, 0, "parent", "path too long");
		goto out;
	}
	snprintf(rel, PATH_MAX, "%s", parent_path);
	for (size_t depth = 1;; depth++) {
		if (depth > BW_CHAIN_MAX) {
			rc = chain_fail(&c, BW_CHAIN_TOO_DEEP, 0, parent_path,
					"its backing chain holds more than %d images", BW_CHAIN_MAX);
			goto out;
		}
		if (prefix + strlen(rel) >= PATH_MAX) {
			rc = chain_fail(&c, BW_CHAIN_TOO_LONG, 0, rel,
					"the path qemu would open (image %zu of the chain) passes "
					"%d bytes",
					depth, PATH_MAX - 1);
			goto out;
		}
		if ((rc = check_image(&c, repo, rel, buf, seen, &n_seen, &h)) != 0)
			goto out;
		if (h.backing[0] == '\0')
			break;
		if ((rc = next_path(&c, repository, real_repo, rel, h.backing, next, &prefix)) != 0)
			goto out;
		char *t = rel;
		rel = next;
		next = t;
	}
	rc = 0;
out:
	if (rc != 0 && fault)
		*fault = c.fault;
	if (repo >= 0)
		close(repo);
	free(seen);
	free(buf);
	free(next);
	free(rel);
	return rc;
}
