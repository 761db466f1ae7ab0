/* error.h: the one error convention: 0 on success, a negative BW_E... code on failure. */
#ifndef BW_ERROR_H
#define BW_ERROR_H

#include <stdbool.h>

#define BW_MUST_CHECK __attribute__((warn_unused_result))

/* The number of entries of a name table built from an X-macro (static const char *const[]). */
#define BW_NAMES(table) (sizeof(table) / sizeof((table)[0]))

/*
 * X(name, value, transient, text)
 * transient: a retry (or a requeue) can help; permanent: fail or reject now.
 * Values are stable: they may appear in logs and the ledger. Append only, and never give a
 * removed code's value to another (retired, unused: 10 ETOOBIG, 19 ESNAREJECT,
 * 22 ECANCELED).
 */
#define BW_ERRNO_MAP(X)                                                                    \
	X(EINVAL, 1, false, "invalid argument")                                            \
	X(ENOMEM, 2, true, "out of memory")                                                \
	X(EIO, 3, true, "input/output error")                                              \
	X(ENOENT, 4, false, "no such file or object")                                      \
	X(EEXIST, 5, false, "already exists")                                              \
	X(EPERM, 6, false, "permission or ownership refused")                              \
	X(ERANGE, 7, false, "value out of range")                                          \
	X(ECONFIG, 8, false, "invalid configuration")                                      \
	X(EJSON, 9, false, "invalid JSON")                                                 \
	X(EMESSAGE, 11, false, "invalid message")                                          \
	X(EBUSY, 12, true, "resource busy")                                                \
	X(ETIMEDOUT, 13, true, "timed out")                                                \
	X(ENOPORTS, 14, true, "no free ports")                                             \
	X(EADDRINUSE, 15, true, "address in use")                                          \
	X(ECHILD, 16, true, "child process failed")                                        \
	X(EAMQP, 17, true, "broker error")                                                 \
	X(ESNA, 18, true, "no answer from the SNA (a reply of another shape)")             \
	X(EFENCED, 20, false, "stale owner generation")                                    \
	X(ESTATE, 21, false, "invalid state transition")                                   \
	X(ESYS, 23, true, "unexpected system error")                                       \
	X(ENOTSUP, 24, false, "not supported")                                             \
	X(ECANCELREC, 25, false, "a backup.cancel is recorded for this job")

enum bw_errno {
	BW_OK = 0,
#define BW__ERR_ENUM(name, value, transient, text) BW_##name = -(value),
	BW_ERRNO_MAP(BW__ERR_ENUM)
#undef BW__ERR_ENUM
};

/* Returns a static human text for code ("unknown error" for an unknown code). */
const char *bw_strerror(int code);

/* Returns the static symbolic name, e.g. "BW_ENOPORTS" ("BW_OK" for 0). */
const char *bw_err_name(int code);

/* True when a retry or a requeue can help (BW_ETIMEDOUT), false when it cannot. */
bool bw_err_transient(int code);

/* Translates an errno value into a BW_E code (never 0). */
int bw_err_from_errno(int err);

#endif
