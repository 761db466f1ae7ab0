/* credentials.c: reads a credential file with strict ownership and mode checks. */
#include "credentials.h"
#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CREDENTIAL_MAX_BYTES 65536

void bw_credential_wipe(char *s, size_t len)
{
	if (s == NULL)
		return;
	explicit_bzero(s, len);
	free(s);
}

void bw_credential_free(struct bw_credential *c)
{
	if (c == NULL)
		return;
	if (c->password)
		bw_credential_wipe(c->password, strlen(c->password));
	free(c->vcenter_host);
	free(c->username);
	free(c);
}

int bw_credential_read_file(const char *path, size_t max, char **out, size_t *len, char *err,
			    size_t errsize)
{
	char *buf = NULL;
	struct stat st;
	size_t n = 0;
	int rc;

	/* O_NONBLOCK: a FIFO planted under the name must not hang the open; fstat refuses it. */
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		snprintf(err, errsize, "%s: %s", path,
			 e == ELOOP ? "is a symbolic link (refused)" : strerror(e));
		return e == ELOOP ? BW_EPERM : bw_err_from_errno(e);
	}
	if (fstat(fd, &st) != 0) {
		snprintf(err, errsize, "%s: %s", path, strerror(errno));
		rc = BW_EIO;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(err, errsize, "%s: not a regular file (refused)", path);
		rc = BW_EPERM;
		goto out;
	}
	if (st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
		snprintf(err, errsize,
			 "%s refused: mode %04o owner %u (must be 0600 or 0400, owned by uid %u)",
			 path, (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid,
			 (unsigned)geteuid());
		rc = BW_EPERM;
		goto out;
	}
	buf = malloc(max + 1);
	if (buf == NULL) {
		rc = BW_ENOMEM;
		goto out;
	}
	for (;;) {
		ssize_t r = read(fd, buf + n, max + 1 - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			snprintf(err, errsize, "%s: %s", path, strerror(errno));
			rc = BW_EIO;
			goto out;
		}
		if (r == 0)
			break;
		n += (size_t)r;
		if (n > max) {
			snprintf(err, errsize, "%s: too large (at most %zu bytes)", path, max);
			rc = BW_EINVAL;
			goto out;
		}
	}
	buf[n] = '\0';
	*out = buf;
	*len = n;
	buf = NULL;
	rc = 0;
out:
	bw_credential_wipe(buf, max + 1);
	close(fd);
	return rc;
}

static char *field(struct json_object *o, const char *name)
{
	struct json_object *v = NULL;
	if (!json_object_object_get_ex(o, name, &v) || !json_object_is_type(v, json_type_string) ||
	    json_object_get_string_len(v) == 0 ||
	    strlen(json_object_get_string(v)) != (size_t)json_object_get_string_len(v))
		return NULL;
	return strdup(json_object_get_string(v));
}

int bw_credential_load(const char *dir, const char *id, struct bw_credential **out, char *err,
		       size_t errsize)
{
	char path[PATH_MAX], why[160], detail[PATH_MAX + 128];
	struct bw_credential *c = NULL;
	struct json_object *doc = NULL;
	char *buf = NULL;
	size_t len = 0;
	int rc;

	if ((size_t)snprintf(path, sizeof(path), "%s/%s.json", dir, id) >= sizeof(path)) {
		snprintf(err, errsize, "credential path too long");
		return BW_EINVAL;
	}
	rc = bw_credential_read_file(path, CREDENTIAL_MAX_BYTES, &buf, &len, detail,
				     sizeof(detail));
	if (rc != 0) {
		snprintf(err, errsize, "credential %s", detail);
		return rc;
	}
	rc = bw_json_parse_strict(buf, len, &doc, why, sizeof(why));
	if (rc != 0 || !json_object_is_type(doc, json_type_object)) {
		snprintf(err, errsize, "credential %s: not a JSON object", path);
		rc = rc == BW_ENOMEM ? rc : BW_EINVAL;
		goto out;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL) {
		rc = BW_ENOMEM;
		goto out;
	}
	c->vcenter_host = field(doc, "vcenter_host");
	c->username = field(doc, "username");
	c->password = field(doc, "password");
	if (!c->vcenter_host || !c->username || !c->password) {
		snprintf(err, errsize,
			 "credential %s: vcenter_host, username and password must be non-empty "
			 "strings",
			 path);
		rc = BW_EINVAL;
		goto out;
	}
	*out = c;
	c = NULL;
	rc = 0;
out:
	bw_credential_wipe(buf, len);
	if (doc) {
		/* json-c keeps its own copy of the password (NULs and all): wipe it before freeing */
		struct json_object *p = NULL;
		if (json_object_object_get_ex(doc, "password", &p) &&
		    json_object_is_type(p, json_type_string))
			explicit_bzero((char *)json_object_get_string(p),
				       (size_t)json_object_get_string_len(p));
	}
	json_object_put(doc);
	bw_credential_free(c);
	return rc;
}
