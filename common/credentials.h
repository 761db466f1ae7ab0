/* credentials.h: vCenter credentials from <credentials.dir>/<credential_id>.json, and secret files; never logged. */
#ifndef BW_CREDENTIALS_H
#define BW_CREDENTIALS_H

#include <stddef.h>

#include "error.h"

struct bw_credential {
	char *vcenter_host;
	char *username;
	char *password; /* wiped by bw_credential_free */
};

/*
 * Reads <dir>/<id>.json ({"vcenter_host", "username", "password"}, non-empty strings)
 * with bw_credential_read_file. Returns 0 and a new credential in *out; BW_ENOENT,
 * BW_EPERM (symlink, not a regular file, mode or owner), BW_EINVAL (content) with a reason
 * in err that never holds the secret. Every copy of the file's text and of the password
 * that this call made (the read buffer, json-c's string) is wiped before it is freed.
 */
int bw_credential_load(const char *dir, const char *id, struct bw_credential **out, char *err,
		       size_t errsize) BW_MUST_CHECK;

void bw_credential_free(struct bw_credential *c);

/*
 * Reads a file that holds a secret (a credential, amqp.password_file, sna.token_file).
 * It is opened O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC, so neither a symlink nor a FIFO
 * (which would block the open) is followed, then fstat decides: it must be a regular file
 * owned by this process's effective user with no group or other permission bits (0600 or
 * 0400), of at most max bytes. Returns 0 and a malloc'd copy of the content, NUL-terminated,
 * in *out and its length in *len; the caller releases it with bw_credential_wipe.
 * BW_ENOENT (no such file), BW_EPERM (symlink, not a regular file, mode, owner), BW_EINVAL
 * (larger than max), BW_EIO, BW_ENOMEM; err gets "PATH: reason", never the content.
 */
int bw_credential_read_file(const char *path, size_t max, char **out, size_t *len, char *err,
			    size_t errsize) BW_MUST_CHECK;

/* Overwrites len bytes of s (explicit_bzero, which the compiler may not drop), then frees
 * it. Accepts NULL. */
void bw_credential_wipe(char *s, size_t len);

#endif
