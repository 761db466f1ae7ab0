/* credentials.h: vCenter credentials from <credentials.dir>/<credential_id>.json; never logged. */
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
 * Reads <dir>/<id>.json ({"vcenter_host", "username", "password"}, non-empty strings).
 * Refused unless it is a regular file (no symlink) owned by this process's user with no
 * group or other permission bits (0600 or 0400). Returns 0 and a new credential in *out;
 * BW_ENOENT, BW_EPERM (mode or owner), BW_EINVAL (content) with a reason in err that
 * never holds the secret.
 */
int bw_credential_load(const char *dir, const char *id, struct bw_credential **out, char *err,
		       size_t errsize) BW_MUST_CHECK;

void bw_credential_free(struct bw_credential *c);

#endif
