/* target.h: the qcow2 images of a job, confined to their repository. */
#ifndef BW_TARGET_H
#define BW_TARGET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

#define BW_VM_DIR_MAX 80 /* "name-" + 48 + "-" + 16 hex + NUL fits */

/*
 * The repository directory of a VM: "id-<readable>-<hash>" from vm.id when present, else
 * "name-<readable>-<hash>" from vm.name. <readable> is the source lower-cased with every
 * run of characters outside [a-z0-9._-] turned into one '_', cut at 48 bytes; <hash> is
 * the FNV-1a 64 of the exact source bytes in 16 hex digits. Deterministic; always a single
 * safe path component (never "." or ".."); VMs whose names differ only in case or in a
 * replaced character get different directories; an id never meets a name.
 * Writes it to out[BW_VM_DIR_MAX].
 */
void bw_target_vm_dir(const char *vm_id, const char *vm_name, char *out);

/* The image of one disk of a job: <repository>/<vm dir>/<key>/<job_id>.qcow2 (job_id safe). */
struct bw_target {
	const char *repository;   /* absolute path of the repository root */
	const char *vm_dir;       /* from bw_target_vm_dir */
	int64_t key;              /* disk key */
	const char *job_id;       /* safe alphabet (CONTRACT §2) */
	int64_t size_bytes;       /* exact virtual size */
	const char *parent_path;  /* incremental: relative to the repository root; else NULL */
	unsigned mode;            /* file mode, e.g. 0640 */
};

/* Writes the image path into out[size]. Returns 0 or BW_ERANGE. */
int bw_target_path(const struct bw_target *t, char *out, size_t size) BW_MUST_CHECK;

/*
 * Creates the image: the directories below the repository (each opened without following
 * symlinks: a symlink that would lead out of the repository is refused, BW_EPERM), the
 * file itself new (O_EXCL: an existing file is never overwritten, BW_EEXIST) with t->mode,
 * written here as an empty qcow2 (version 3, 64 KiB clusters) of exactly size_bytes, as
 * `qemu-img create -f qcow2` makes it but without a process (it cost 20 ms per image);
 * for an incremental disk an overlay with backing format qcow2 and the backing path
 * stored relative to the image, so the repository can move. For a parent, see
 * bw_target_check_chain first. Returns 0; BW_EEXIST; BW_EPERM; BW_EINVAL (a size no
 * qcow2 holds); BW_EIO... On failure nothing is left behind (the file is removed).
 */
int bw_target_create(const struct bw_target *t, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Removes the image of t (compensation), by its name relative to its disk directory opened
 * beneath the repository one component at a time without following symlinks: a directory
 * replaced by a symlink since the image was made is refused (BW_EPERM), never followed.
 * Returns 0 also when there is nothing to remove; else a BW_E code with the reason in err.
 */
int bw_target_remove(const struct bw_target *t, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Why a parent's backing chain is refused: X(NAME, rule, code). rule is the violation
 * name of the host rule (README, "Violation names"), code what bw_target_check_chain
 * returns for it.
 */
#define BW_CHAIN_FAULT_MAP(X)                                                              \
	X(NOT_FOUND, "not_found", BW_ENOENT)         /* missing, or not a regular file */   \
	X(OUTSIDE, "outside_repository", BW_EPERM)   /* resolves out of the repository */   \
	X(PROTOCOL, "backing_protocol", BW_EPERM)    /* json:, nbd:, file:... (qemu's rule) */ \
	X(NOT_QCOW2, "not_qcow2", BW_EINVAL)         /* no qcow2 magic, or version not 2/3 */ \
	X(BAD_HEADER, "bad_header", BW_EINVAL)       /* truncated or inconsistent header */ \
	X(NO_FORMAT, "backing_format_missing", BW_EINVAL) /* qemu would probe it */         \
	X(FORMAT, "backing_format_not_qcow2", BW_EINVAL)  /* raw, vmdk... */                \
	X(CORRUPT, "image_corrupt", BW_EINVAL)       /* incompatible feature bit 1 */       \
	X(DIRTY, "image_dirty", BW_EINVAL)           /* incompatible feature bit 0 */       \
	X(UNSUPPORTED, "unsupported_feature", BW_ENOTSUP) /* external data file, encryption */ \
	X(LOOP, "chain_loop", BW_EINVAL)             /* an image met twice (device, inode) */ \
	X(TOO_DEEP, "chain_too_deep", BW_EINVAL)     /* more than BW_CHAIN_MAX images */    \
	X(TOO_LONG, "path_too_long", BW_ERANGE)      /* qemu's path to it passes PATH_MAX */ \
	X(IN_USE, "in_use", BW_EBUSY)                /* a process holds its write lock */   \
	X(UNREADABLE, "unreadable", BW_EIO)          /* a system error; code from errno */

enum bw_chain_fault {
	BW_CHAIN_OK = 0,
#define BW__CHAIN_ENUM(name, rule, code) BW_CHAIN_##name,
	BW_CHAIN_FAULT_MAP(BW__CHAIN_ENUM)
#undef BW__CHAIN_ENUM
};

/* Returns the static rule name of fault ("ok" for BW_CHAIN_OK, "unknown" past the table). */
const char *bw_target_chain_rule(enum bw_chain_fault fault);

/* The most images a parent's chain may hold, the parent included (a header read each). */
#define BW_CHAIN_MAX 256

/*
 * Checks the parent of an incremental and its whole backing chain, as qemu will open them
 * when the overlay <repository>/<vm dir>/<key>/<job>.qcow2 (backing "../../<parent_path>")
 * is served. Every image:
 *   - is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) from the repository's
 *     directory: "..", an absolute symlink, or a relative symlink that leads out is refused
 *     (outside_repository); a relative symlink that stays inside is followed, as qemu will;
 *   - is a regular file (a FIFO or a directory is refused, never opened for reading), met
 *     once (device, inode), at most BW_CHAIN_MAX deep, held for writing by no process
 *     (qemu's write-permission lock byte, tested with F_OFD_GETLK: never waits);
 *   - is a qcow2 of version 2 or 3 whose header (first 64 KiB) is complete and consistent,
 *     neither corrupt nor dirty, without an external data file or encryption;
 *   - names its backing file, if any, as a plain path (no protocol prefix or json:) with
 *     the backing format extension saying "qcow2". A relative name is taken relative to
 *     the directory of the name of the image that holds it (qemu's rule: lexically, not
 *     after resolving a symlink); an absolute one must begin with the repository's path
 *     (as given, or after resolving its symlinks).
 * Reads headers only: no process, no lock taken, nothing written; a few system calls per
 * image. Returns 0; else writes a one-line reason naming the image into err and, when fault
 * is not NULL, the fault into *fault, and returns the fault's code (BW_CHAIN_FAULT_MAP):
 * BW_ENOENT, BW_EPERM, BW_EINVAL, BW_ERANGE, BW_ENOTSUP, BW_EBUSY; for UNREADABLE the
 * errno's (BW_EPERM for EACCES, BW_ENOTSUP when the kernel has no openat2 (Linux < 5.6 or
 * a seccomp filter), BW_EIO, BW_ENOMEM...).
 */
int bw_target_check_chain(const char *repository, const char *parent_path,
			  enum bw_chain_fault *fault, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Checks a finished image in two halves, for an event loop: bw_image_check_start starts
 * `qemu-img check -q` in the background (output appended to log_path) and stores its pid;
 * bw_image_check_finish never waits: BW_EBUSY while it runs; 0 when the image is
 * consistent, with its sizes; BW_ECHILD when qemu-img found it damaged or failed (its
 * words in err); BW_EIO when the sizes cannot be read.
 */
int bw_image_check_start(const char *qemu_img, const char *path, const char *log_path,
			 pid_t *pid, char *err, size_t errsize) BW_MUST_CHECK;
int bw_image_check_finish(pid_t pid, const char *path, const char *log_path,
			  int64_t *virtual_size, int64_t *actual_size, char *err, size_t errsize)
	BW_MUST_CHECK;

/*
 * A qcow2's virtual size (from its header, no qemu-img needed) and the bytes its file
 * takes on disk (allocated blocks, as `qemu-img info` reports actual-size). Returns 0,
 * BW_EINVAL (not a qcow2), BW_EIO.
 */
int bw_image_sizes(const char *path, int64_t *virtual_size, int64_t *actual_size) BW_MUST_CHECK;

#endif
