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

static void wipe(char *s)
{
	if (s == NULL)
		return;
	volatile char *p = s;
	while (*p)
		*p++ = '\0';
}

void bw_credential_free(struct bw_credential *c)
{
	if (c == NULL)
		return;
	wipe(c->password);
	free(c->vcenter_host);
	free(c->username);
	free(c->password);
	free(c);
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
	char path[PATH_MAX], buf[CREDENTIAL_MAX_BYTES], why[160];
	struct bw_credential *c = NULL;
	struct json_object *doc = NULL;
	struct stat st;
	int rc;

	if ((size_t)snprintf(path, sizeof(path), "%s/%s.json", dir, id) >= sizeof(path)) {
		snprintf(err, errsize, "credential path too long");
		return BW_EINVAL;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		snprintf(err, errsize, "credential %s: %s", path, strerror(errno));
		return errno == ELOOP ? BW_EPERM : bw_err_from_errno(errno);
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		snprintf(err, errsize, "credential %s: not a regular file", path);
		rc = BW_EPERM;
		goto out;
	}
	if (st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
		snprintf(err, errsize,
			 "credential %s refused: mode %04o owner %u (must be 0600 or 0400, owned "
			 "by uid %u)",
			 path, (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid,
			 (unsigned)geteuid());
		rc = BW_EPERM;
		goto out;
	}
	ssize_t n = read(fd, buf, sizeof(buf));
	if (n < 0 || n == (ssize_t)sizeof(buf)) {
		snprintf(err, errsize, "credential %s: %s", path,
			 n < 0 ? strerror(errno) : "too large");
		rc = BW_EINVAL;
		goto out;
	}
	rc = bw_json_parse_strict(buf, (size_t)n, &doc, why, sizeof(why));
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
	explicit_bzero(buf, sizeof(buf));
	if (doc) {
		/* json-c keeps its own copy of the password: wipe it before freeing */
		struct json_object *p = NULL;
		if (json_object_object_get_ex(doc, "password", &p) &&
		    json_object_is_type(p, json_type_string))
			wipe((char *)json_object_get_string(p));
	}
	json_object_put(doc);
	bw_credential_free(c);
	close(fd);
	return rc;
}
