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
 * bw_target_check_parent first. Returns 0; BW_EEXIST; BW_EPERM; BW_EINVAL (a size no
 * qcow2 holds); BW_EIO... On failure nothing is left behind (the file is removed).
 */
int bw_target_create(const struct bw_target *t, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Checks a parent image for an incremental: inside the repository after resolving
 * symlinks, a regular file, a qcow2 by `qemu-img info`, and not locked for writing by a
 * running process. Returns 0; BW_ENOENT; BW_EPERM (outside the repository); BW_EINVAL (not
 * a qcow2); BW_EBUSY (locked for writing); detail in err.
 */
int bw_target_check_parent(const char *qemu_img, const char *repository, const char *parent_path,
			   char *err, size_t errsize) BW_MUST_CHECK;

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
