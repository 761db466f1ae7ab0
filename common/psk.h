/* psk.h: a job's NBD TLS pre-shared key (CONTRACT §3.1, §5): made from the kernel's random source, kept in a 0700 directory for qemu-nbd, removed when the job ends. */
#ifndef BW_PSK_H
#define BW_PSK_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

/* The PSK identity the SNA presents (qemu-nbd's keys.psk holds "<identity>:<hex key>"). */
#define BW_PSK_IDENTITY "bw"
/* 32 random bytes as 64 lower-case hex digits, NUL included. */
#define BW_PSK_HEX_SIZE 65

/*
 * The directory of job_id's key, "<state_dir>/tls/<job_id>", into dir[size]. Returns 0, or
 * BW_ERANGE when it does not fit.
 */
int bw_psk_dir(const char *state_dir, const char *job_id, char *dir, size_t size) BW_MUST_CHECK;

/*
 * Makes job_id's key: 32 bytes from getrandom, written as "bw:<hex>" to <dir>/keys.psk
 * (mode 0600, created exclusively) in a new directory of mode 0700 (its parent
 * <state_dir>/tls is created 0700 when missing). A key left by an earlier attempt of the
 * same job is replaced. Nothing of the key is kept in memory. Returns 0, or BW_ESYS / BW_EIO
 * with the reason in err.
 */
int bw_psk_create(const char *state_dir, const char *job_id, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Reads job_id's key into hex[BW_PSK_HEX_SIZE] (the caller wipes it after use). Returns 0,
 * BW_ENOENT when the job has no key (its exports are plain), or BW_EIO.
 */
int bw_psk_read(const char *state_dir, const char *job_id, char *hex) BW_MUST_CHECK;

/* True when job_id has a key directory (its exports were started with TLS). */
bool bw_psk_exists(const char *state_dir, const char *job_id);

/*
 * Removes job_id's key: the file overwritten with zeros and unlinked, then the directory.
 * Idempotent (0 when nothing is left); BW_EIO with the reason in err otherwise.
 */
int bw_psk_remove(const char *state_dir, const char *job_id, char *err, size_t errsize) BW_MUST_CHECK;

#endif
