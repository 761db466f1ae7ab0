/* cancel.h: the backup.cancel message of CONTRACT §2.1: strict parsing and building. */
#ifndef BW_CANCEL_H
#define BW_CANCEL_H

#include <stdbool.h>
#include <stddef.h>

#include "buf.h"
#include "error.h"

/* A cancel is small: a body over this is refused unread. */
#define BW_CANCEL_MAX_BYTES 4096
#define BW_CANCEL_JOB_ID_MAX 128 /* characters of [A-Za-z0-9._-], as job_id in §2 */
#define BW_CANCEL_REASON_MAX 256 /* code points, no control characters */

/* A valid backup.cancel. */
struct bw_cancel {
	char job_id[BW_CANCEL_JOB_ID_MAX + 1];
	char reason[BW_CANCEL_REASON_MAX * 4 + 1]; /* UTF-8; "" when the message had none */
};

/*
 * Reads body[0..len) as a backup.cancel: one JSON object under the strict parser with
 * schema_version 1, a job_id that follows the job_id rule and an optional reason (a string
 * of at most 256 code points without control characters); unknown fields are ignored.
 * Returns 0 with *out filled, or BW_EMESSAGE with a one-line reason (safe to log: it never
 * quotes the body) in why[0..whysz).
 */
int bw_cancel_parse(const char *body, size_t len, struct bw_cancel *out, char *why,
		    size_t whysz) BW_MUST_CHECK;

/*
 * Appends the backup.cancel for job_id (and reason, NULL or "" for none) to out, after
 * checking both as bw_cancel_parse would. Returns 0, or BW_EINVAL with the reason in
 * why[0..whysz) and out unchanged.
 */
int bw_cancel_build(const char *job_id, const char *reason, struct bw_buf *out, char *why,
		    size_t whysz) BW_MUST_CHECK;

#endif
