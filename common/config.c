/* config.c: one table of every key: its type, default, bounds and check; INI, env and --set feed it. */
#include "config.h"
#include "amqp.h"
#include "buf.h"
#include "child.h"
#include "credentials.h"
#include "log.h"
#include "text.h"

#include <amqp.h>
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

enum key_type { T_STR, T_INT, T_BOOL };

/* A check returns NULL when the value is fine, else the reason (a static string). */
typedef const char *(*check_fn)(const char *value);

struct key_def {
	const char *section;
	const char *key;
	enum key_type type;
	size_t offset;
	const char *def; /* default as text; NULL = derived after loading */
	long min, max;   /* T_INT bounds */
	check_fn check;  /* T_STR check */
	bool secret;
};

static const char *check_amqp_url(const char *v);
static const char *check_http_url(const char *v);
static const char *check_amqp_name(const char *v);
static const char *check_safe_id(const char *v);
static const char *check_abs_path(const char *v);
static const char *check_ip(const char *v);
static const char *check_opt_path(const char *v);
static const char *check_host(const char *v);
static const char *check_program(const char *v);
static const char *check_token(const char *v);
static const char *check_log_level(const char *v);
static const char *check_nbd_tls(const char *v);
static const char *check_listen(const char *v);
static const char *check_log_format(const char *v);

#define OFF(f) offsetof(struct bw_config, f)

static const struct key_def keys[] = {
	{"amqp", "url", T_STR, OFF(amqp_url), "amqp://guest:guest@127.0.0.1:5672", 0, 0,
	 check_amqp_url, false},
	{"amqp", "queue", T_STR, OFF(amqp_queue), "backup.start", 0, 0, check_amqp_name, false},
	{"amqp", "jobs_exchange", T_STR, OFF(amqp_jobs_exchange), "backup.jobs", 0, 0,
	 check_amqp_name, false},
	{"amqp", "events_exchange", T_STR, OFF(amqp_events_exchange), "backup.events", 0, 0,
	 check_amqp_name, false},
	{"amqp", "dlx", T_STR, OFF(amqp_dlx), "backup.dlx", 0, 0, check_amqp_name, false},
	{"amqp", "dlq", T_STR, OFF(amqp_dlq), "backup.start.dlq", 0, 0, check_amqp_name, false},
	{"amqp", "control_exchange", T_STR, OFF(amqp_control_exchange), "backup.control", 0, 0,
	 check_amqp_name, false},
	{"amqp", "heartbeat_s", T_INT, OFF(amqp_heartbeat_s), "30", 1, 600, NULL, false},
	{"amqp", "prefetch", T_INT, OFF(amqp_prefetch), NULL, 1, 65535, NULL, false},
	{"amqp", "delivery_limit", T_INT, OFF(amqp_delivery_limit), "5", 1, 1000, NULL, false},
	{"amqp", "declare", T_BOOL, OFF(amqp_declare), "true", 0, 0, NULL, false},
	{"amqp", "tls_ca_file", T_STR, OFF(amqp_tls_ca_file), "", 0, 0, check_opt_path, false},
	{"amqp", "tls_cert_file", T_STR, OFF(amqp_tls_cert_file), "", 0, 0, check_opt_path, false},
	{"amqp", "tls_key_file", T_STR, OFF(amqp_tls_key_file), "", 0, 0, check_opt_path, false},
	{"amqp", "tls_verify_peer", T_BOOL, OFF(amqp_tls_verify_peer), "true", 0, 0, NULL, false},
	{"amqp", "tls_verify_hostname", T_BOOL, OFF(amqp_tls_verify_hostname), "true", 0, 0, NULL,
	 false},
	{"amqp", "password_file", T_STR, OFF(amqp_password_file), "", 0, 0, check_opt_path, false},

	{"worker", "id", T_STR, OFF(worker_id), NULL, 0, 0, check_safe_id, false},
	{"worker", "host", T_STR, OFF(worker_host), NULL, 0, 0, check_host, false},
	{"worker", "max_jobs", T_INT, OFF(worker_max_jobs), "4", 1, 1024, NULL, false},
	{"worker", "state_dir", T_STR, OFF(worker_state_dir), "/var/lib/bw-worker", 0, 0,
	 check_abs_path, false},
	{"worker", "recovery_interval_s", T_INT, OFF(worker_recovery_interval_s), "10", 1, 3600,
	 NULL, false},
	{"worker", "shutdown_grace_s", T_INT, OFF(worker_shutdown_grace_s), "60", 1, 3600, NULL,
	 false},

	{"ledger", "path", T_STR, OFF(ledger_path), NULL, 0, 0, check_abs_path, false},
	{"ledger", "retention_days", T_INT, OFF(ledger_retention_days), "14", 1, 36500, NULL,
	 false},

	{"nbd", "port_min", T_INT, OFF(nbd_port_min), "10100", 1, 65535, NULL, false},
	{"nbd", "port_max", T_INT, OFF(nbd_port_max), "10200", 1, 65535, NULL, false},
	{"nbd", "bind_address", T_STR, OFF(nbd_bind_address), "127.0.0.1", 0, 0, check_ip, false},
	{"nbd", "advertise_host", T_STR, OFF(nbd_advertise_host), "127.0.0.1", 0, 0, check_host,
	 false},
	{"nbd", "shared", T_INT, OFF(nbd_shared), "8", 1, 1024, NULL, false},
	{"nbd", "qemu_nbd", T_STR, OFF(nbd_qemu_nbd), "qemu-nbd", 0, 0, check_program, false},
	{"nbd", "qemu_img", T_STR, OFF(nbd_qemu_img), "qemu-img", 0, 0, check_program, false},
	{"nbd", "tls", T_STR, OFF(nbd_tls), "auto", 0, 0, check_nbd_tls, false},
	{"nbd", "allow_plaintext", T_BOOL, OFF(nbd_allow_plaintext), "false", 0, 0, NULL, false},

	{"sna", "url", T_STR, OFF(sna_url), "http://127.0.0.1:8081", 0, 0, check_http_url, false},
	{"sna", "token", T_STR, OFF(sna_token), "", 0, 0, check_token, true},
	{"sna", "connect_timeout_s", T_INT, OFF(sna_connect_timeout_s), "5", 1, 300, NULL, false},
	{"sna", "timeout_s", T_INT, OFF(sna_timeout_s), "30", 1, 3600, NULL, false},
	{"sna", "max_attempts", T_INT, OFF(sna_max_attempts), "5", 1, 100, NULL, false},
	{"sna", "backoff_base_ms", T_INT, OFF(sna_backoff_base_ms), "1000", 1, 600000, NULL,
	 false},
	{"sna", "backoff_cap_s", T_INT, OFF(sna_backoff_cap_s), "60", 1, 3600, NULL, false},
	{"sna", "poll_interval_s", T_INT, OFF(sna_poll_interval_s), "5", 1, 3600, NULL, false},
	{"sna", "lost_after", T_INT, OFF(sna_lost_after), "3", 1, 1000, NULL, false},
	{"sna", "token_file", T_STR, OFF(sna_token_file), "", 0, 0, check_opt_path, false},
	{"sna", "tls_ca_file", T_STR, OFF(sna_tls_ca_file), "", 0, 0, check_opt_path, false},
	{"sna", "tls_cert_file", T_STR, OFF(sna_tls_cert_file), "", 0, 0, check_opt_path, false},
	{"sna", "tls_key_file", T_STR, OFF(sna_tls_key_file), "", 0, 0, check_opt_path, false},
	{"sna", "allow_plaintext", T_BOOL, OFF(sna_allow_plaintext), "false", 0, 0, NULL, false},

	{"credentials", "dir", T_STR, OFF(credentials_dir), "/etc/bw-worker/credentials", 0, 0,
	 check_abs_path, false},

	{"job", "max_duration_s", T_INT, OFF(job_max_duration_s), "86400", 60, 2592000, NULL,
	 false},
	{"job", "port_wait_s", T_INT, OFF(job_port_wait_s), "600", 0, 86400, NULL, false},
	{"job", "max_message_bytes", T_INT, OFF(job_max_message_bytes), "262144", 1024,
	 16777216, NULL, false},
	{"job", "cancel_memory_s", T_INT, OFF(job_cancel_memory_s), "86400", 0, 31536000, NULL,
	 false},

	{"metrics", "listen", T_STR, OFF(metrics_listen), "", 0, 0, check_listen, false},

	{"log", "level", T_STR, OFF(log_level), "info", 0, 0, check_log_level, false},
	{"log", "timestamps", T_BOOL, OFF(log_timestamps), "true", 0, 0, NULL, false},
	{"log", "format", T_STR, OFF(log_format), "text", 0, 0, check_log_format, false},
};

#define NKEYS (sizeof(keys) / sizeof(keys[0]))
#define ORIGIN_MAX 300

/* Loading state: where each value came from, and the problems found. */
struct loader {
	struct bw_config *cfg;
	char origin[NKEYS][ORIGIN_MAX]; /* "FILE:LINE" / "BW_X_Y" / "--set"; "" = default */
	struct bw_buf errors;
	int nerrors;
	struct bw_buf warnings; /* same form; a warning does not fail the load */
	bool oom;
};

/* Appends "ORIGIN: SECTION[.KEY]: KIND REASON" to list, the reason from fmt and ap. */
static void note(struct bw_buf *list, const char *origin, const char *section, const char *key,
		 const char *kind, const char *fmt, va_list ap) BW_PRINTF(6, 0);

static void note(struct bw_buf *list, const char *origin, const char *section, const char *key,
		 const char *kind, const char *fmt, va_list ap)
{
	char reason[512];
	vsnprintf(reason, sizeof(reason), fmt, ap);
	bw_buf_printf(list, "%s: %s%s%s: %s%s\n", origin, section, key ? "." : "", key ? key : "",
		      kind, reason);
}

/* An error: the load fails. */
static void problem(struct loader *ld, const char *origin, const char *section, const char *key,
		    const char *fmt, ...) BW_PRINTF(5, 6);

static void problem(struct loader *ld, const char *origin, const char *section, const char *key,
		    const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	note(&ld->errors, origin, section, key, "", fmt, ap);
	va_end(ap);
	ld->nerrors++;
}

/* A warning: cfg->warnings says it, the load goes on. */
static void warning(struct loader *ld, const char *origin, const char *section, const char *key,
		    const char *fmt, ...) BW_PRINTF(5, 6);

static void warning(struct loader *ld, const char *origin, const char *section, const char *key,
		    const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	note(&ld->warnings, origin, section, key, "warning: ", fmt, ap);
	va_end(ap);
}

/* ---- URLs -------------------------------------------------------------------------------- */

/*
 * amqp.url may list the nodes of one cluster, comma-separated (CONTRACT 6). Returns a
 * malloc'd copy of the i-th node (0-based), NULL past the last one (or out of memory:
 * *oom set). The copy may hold a password: release it with free_secret.
 */
static char *url_node(const char *list, size_t i, bool *oom)
{
	const char *p = list;
	for (; i > 0; i--) {
		p = strchr(p, ',');
		if (p == NULL)
			return NULL;
		p++;
	}
	char *node = strndup(p, strcspn(p, ","));
	if (node == NULL)
		*oom = true;
	return node;
}

/* Overwrites a string that may hold a secret, then frees it. Accepts NULL. */
static void free_secret(char *s)
{
	if (s)
		bw_credential_wipe(s, strlen(s));
}

/*
 * The host of scheme://[user[:password]@]host[:port][/path]: without the user part (so
 * never a password), IPv6 literals with their brackets. out is "" when there is none.
 */
static void url_host(const char *url, char *out, size_t size)
{
	out[0] = '\0';
	const char *a = strstr(url, "://");
	if (a == NULL)
		return;
	a += 3;
	const char *end = a + strcspn(a, "/?#");
	for (const char *p = a; p < end; p++)
		if (*p == '@')
			a = p + 1; /* the last '@' ends the user part */
	const char *h = a;
	if (*a == '[') {
		while (h < end && *h != ']')
			h++;
		if (h < end)
			h++;
	} else {
		while (h < end && *h != ':')
			h++;
	}
	size_t n = (size_t)(h - a);
	if (n >= size)
		n = size - 1;
	memcpy(out, a, n);
	out[n] = '\0';
}

/* ---- value checks --------------------------------------------------------------------- */

static const char *check_amqp_node(const char *v)
{
	if (strncmp(v, "amqp://", 7) != 0 && strncmp(v, "amqps://", 8) != 0)
		return "must start with amqp:// or amqps://";
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p < 0x20 || *p == 0x7f)
			return "must not contain control characters (percent-encode them)";
	char *copy = strdup(v);
	if (copy == NULL)
		return "out of memory";
	struct amqp_connection_info info;
	int rc = amqp_parse_url(copy, &info);
	bool empty_host = rc == AMQP_STATUS_OK && info.host[0] == '\0';
	/* the parser cuts and decodes in place: wipe the whole original length */
	bw_credential_wipe(copy, strlen(v));
	if (rc != AMQP_STATUS_OK)
		return "is not a valid AMQP URL (amqp[s]://user:password@host:port/vhost)";
	if (empty_host)
		return "has no host";
	return NULL;
}

#define BW__CONFIG_STR2(x) #x
#define BW__CONFIG_STR(x) BW__CONFIG_STR2(x)

/* One URL, or the comma-separated URLs of a cluster's nodes (at most BW_AMQP_MAX_NODES, what
 * a link holds): each must be valid. */
static const char *check_amqp_url(const char *v)
{
	bool oom = false;
	char *node;
	for (size_t i = 0; (node = url_node(v, i, &oom)) != NULL; i++) {
		const char *why = i < BW_AMQP_MAX_NODES ? check_amqp_node(node) : NULL;
		free_secret(node);
		if (i >= BW_AMQP_MAX_NODES)
			return "lists more than " BW__CONFIG_STR(BW_AMQP_MAX_NODES) " nodes";
		if (why)
			return why;
	}
	return oom ? "out of memory" : NULL;
}

static const char *check_http_url(const char *v)
{
	const char *rest;
	if (strncmp(v, "http://", 7) == 0)
		rest = v + 7;
	else if (strncmp(v, "https://", 8) == 0)
		rest = v + 8;
	else
		return "must start with http:// or https://";
	if (*rest == '\0' || *rest == '/' || *rest == ':')
		return "has no host";
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p <= 0x20 || *p == 0x7f)
			return "must not contain spaces or control characters";
	return NULL;
}

static const char *check_amqp_name(const char *v)
{
	size_t n = strlen(v);
	if (n == 0 || n > 255)
		return "must be 1-255 characters";
	for (const char *p = v; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("._:-", *p))
			return "may only contain letters, digits, '.', '_', ':' and '-'";
	return NULL;
}

static const char *check_safe_id(const char *v)
{
	size_t n = strlen(v);
	if (n == 0 || n > 128)
		return "must be 1-128 characters";
	if (!bw_text_is_safe_id(v, n))
		return "must start with a letter or digit and contain only [A-Za-z0-9._-]";
	return NULL;
}

static const char *check_abs_path(const char *v)
{
	if (v[0] != '/')
		return "must be an absolute path";
	if (strlen(v) >= PATH_MAX)
		return "is too long";
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p < 0x20 || *p == 0x7f)
			return "must not contain control characters";
	return NULL;
}

static const char *check_opt_path(const char *v)
{
	return v[0] ? check_abs_path(v) : NULL;
}

static const char *check_ip(const char *v)
{
	unsigned char addr[16];
	if (inet_pton(AF_INET, v, addr) == 1 || inet_pton(AF_INET6, v, addr) == 1)
		return NULL;
	return "must be a numeric IPv4 or IPv6 address";
}

static const char *check_host(const char *v)
{
	unsigned char addr[16];
	if (inet_pton(AF_INET6, v, addr) == 1)
		return NULL;
	size_t n = strlen(v);
	if (n == 0 || n > 253)
		return "must be a host name or an IP address";
	for (const char *p = v; *p; p++)
		if (!isalnum((unsigned char)*p) && *p != '.' && *p != '-')
			return "must be a host name or an IP address";
	return NULL;
}

/* metrics.listen: empty (off), or host:port with an IPv6 address in brackets. */
static const char *check_listen(const char *v)
{
	if (v[0] == '\0')
		return NULL;
	const char *colon = strrchr(v, ':');
	if (colon == NULL || colon == v)
		return "must be host:port (an IPv6 address in brackets), or empty for off";
	char host[300];
	size_t hn = (size_t)(colon - v);
	if (hn >= sizeof(host))
		return "host is too long";
	memcpy(host, v, hn);
	host[hn] = '\0';
	if (host[0] == '[') {
		if (hn < 3 || host[hn - 1] != ']')
			return "must be host:port (an IPv6 address in brackets), or empty for off";
		host[hn - 1] = '\0';
		unsigned char addr[16];
		if (inet_pton(AF_INET6, host + 1, addr) != 1)
			return "is not an IPv6 address in brackets";
	} else if (strchr(host, ':') != NULL) {
		return "an IPv6 address must be in brackets";
	} else if (check_host(host) != NULL) {
		return "must name a host or an IP address before the port";
	}
	char *end;
	errno = 0;
	long port = strtol(colon + 1, &end, 10);
	if (colon[1] == '\0' || *end != '\0' || errno != 0 || port < 1 || port > 65535)
		return "port must be 1-65535";
	return NULL;
}

static const char *check_log_format(const char *v)
{
	if (strcmp(v, "text") == 0 || strcmp(v, "json") == 0)
		return NULL;
	return "must be text or json";
}

static const char *check_program(const char *v)
{
	if (v[0] == '\0')
		return "must not be empty";
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p <= 0x20 || *p == 0x7f)
			return "must be a program name or path without spaces";
	if (v[0] != '/' && strchr(v, '/') != NULL)
		return "must be an absolute path or a bare program name (looked up in "
		       BW_CHILD_TRUSTED_PATH ")";
	if (strlen(v) >= PATH_MAX)
		return "is too long";
	return NULL;
}

static const char *check_token(const char *v)
{
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p < 0x20 || *p == 0x7f || *p == ' ')
			return "must not contain spaces or control characters";
	return NULL;
}

static const char *check_nbd_tls(const char *v)
{
	if (strcmp(v, "auto") == 0 || strcmp(v, "psk") == 0 || strcmp(v, "off") == 0)
		return NULL;
	return "must be auto, psk or off";
}

static const char *check_log_level(const char *v)
{
	if (strcmp(v, "warn") && strcmp(v, "info") && strcmp(v, "debug"))
		return "must be warn, info or debug";
	return NULL;
}

/* ---- setting values ------------------------------------------------------------------- */

static int find_key(const char *section, const char *key)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].key, key) == 0)
			return (int)i;
	return -1;
}

static bool parse_long(const char *v, long *out)
{
	char *end;
	errno = 0;
	long n = strtol(v, &end, 10);
	if (errno || end == v || *end != '\0' || isspace((unsigned char)*v))
		return false;
	*out = n;
	return true;
}

static bool parse_bool(const char *v, bool *out)
{
	static const char *yes[] = {"true", "yes", "on", "1"};
	static const char *no[] = {"false", "no", "off", "0"};
	for (unsigned i = 0; i < 4; i++) {
		if (strcasecmp(v, yes[i]) == 0) {
			*out = true;
			return true;
		}
		if (strcasecmp(v, no[i]) == 0) {
			*out = false;
			return true;
		}
	}
	return false;
}

/* Stores value into key k, or records why it cannot; origin names where it came from. */
static void set_value(struct loader *ld, size_t k, const char *value, const char *origin)
{
	const struct key_def *d = &keys[k];
	char *field = (char *)ld->cfg + d->offset;
	char num[32];

	switch (d->type) {
	case T_INT: {
		long n;
		if (!parse_long(value, &n)) {
			problem(ld, origin, d->section, d->key, "not an integer: \"%s\"", value);
			return;
		}
		if (n < d->min || n > d->max) {
			snprintf(num, sizeof(num), "%ld-%ld", d->min, d->max);
			problem(ld, origin, d->section, d->key, "out of range (allowed %s)", num);
			return;
		}
		*(int *)field = (int)n;
		break;
	}
	case T_BOOL:
		if (!parse_bool(value, (bool *)field)) {
			problem(ld, origin, d->section, d->key,
				"not a boolean (true/false, yes/no, on/off, 1/0): \"%s\"", value);
			return;
		}
		break;
	case T_STR: {
		const char *why = d->check ? d->check(value) : NULL;
		if (why) {
			problem(ld, origin, d->section, d->key, "%s", why);
			return;
		}
		char *copy = strdup(value);
		if (copy == NULL) {
			ld->oom = true;
			return;
		}
		free_secret(*(char **)field);
		*(char **)field = copy;
		break;
	}
	}
	snprintf(ld->origin[k], ORIGIN_MAX, "%s", origin);
}

static int repo_index(const struct bw_config *cfg, const char *id)
{
	for (size_t i = 0; i < cfg->n_repositories; i++)
		if (strcmp(cfg->repositories[i].id, id) == 0)
			return (int)i;
	return -1;
}

static void set_repository(struct loader *ld, const char *id, const char *path, const char *origin)
{
	struct bw_config *cfg = ld->cfg;
	const char *why = check_safe_id(id);
	if (why) {
		problem(ld, origin, "repositories", id, "repository id %s", why);
		return;
	}
	if ((why = check_abs_path(path)) != NULL) {
		problem(ld, origin, "repositories", id, "%s", why);
		return;
	}
	char *copy = strdup(path);
	if (copy == NULL) {
		ld->oom = true;
		return;
	}
	int i = repo_index(cfg, id);
	if (i >= 0) {
		free(cfg->repositories[i].path);
		cfg->repositories[i].path = copy;
		return;
	}
	struct bw_repository *r =
		realloc(cfg->repositories, (cfg->n_repositories + 1) * sizeof(*r));
	char *idc = strdup(id);
	if (r == NULL || idc == NULL) {
		if (r)
			cfg->repositories = r;
		free(idc);
		free(copy);
		ld->oom = true;
		return;
	}
	cfg->repositories = r;
	r[cfg->n_repositories].id = idc;
	r[cfg->n_repositories].path = copy;
	cfg->n_repositories++;
}

/* One "section.key = value" from any source. */
static void assign(struct loader *ld, const char *section, const char *key, const char *value,
		   const char *origin)
{
	if (strcmp(section, "repositories") == 0) {
		set_repository(ld, key, value, origin);
		return;
	}
	int k = find_key(section, key);
	if (k < 0) {
		bool known_section = false;
		for (size_t i = 0; i < NKEYS; i++)
			known_section |= strcmp(keys[i].section, section) == 0;
		problem(ld, origin, section, key, "%s",
			known_section ? "unknown key" : "unknown section");
		return;
	}
	set_value(ld, (size_t)k, value, origin);
}

/* ---- the INI file --------------------------------------------------------------------- */

/*
 * Cuts s after its first word (up to a blank, ':' or '='), which names what was meant;
 * returns whether anything was cut. What follows may be a secret that lost its key.
 */
static bool first_word(char *s)
{
	char *cut = s + strcspn(s, " \t:=");
	bool rest = *cut != '\0';
	*cut = '\0';
	return rest;
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

static int read_file(struct loader *ld, const char *path)
{
	FILE *f = fopen(path, "re");
	if (f == NULL) {
		int err = errno;
		bw_buf_printf(&ld->errors, "%s: cannot open: %s\n", path, strerror(err));
		ld->nerrors++;
		return bw_err_from_errno(err);
	}

	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	unsigned lineno = 0;
	char section[128] = "";
	char origin[ORIGIN_MAX];
	/* Lines of every key set in the file, to refuse a key given twice. */
	unsigned seen_line[NKEYS] = {0};

	while ((n = getline(&line, &cap, f)) >= 0) {
		lineno++;
		snprintf(origin, sizeof(origin), "%s:%u", path, lineno);
		if (memchr(line, '\0', (size_t)n) != NULL) {
			problem(ld, origin, "", NULL, "%s", "NUL byte in line");
			continue;
		}
		char *s = trim(line);
		if (*s == '\0' || *s == '#' || *s == ';')
			continue;
		if (*s == '[') {
			char *end = strchr(s, ']');
			if (end == NULL || end[1] != '\0' || end - s - 1 <= 0 ||
			    (size_t)(end - s) >= sizeof(section)) {
				problem(ld, origin, s, NULL, "%s", "malformed section header");
				section[0] = '\0';
				continue;
			}
			*end = '\0';
			snprintf(section, sizeof(section), "%s", trim(s + 1));
			continue;
		}
		char *eq = strchr(s, '=');
		if (eq == NULL) {
			bool rest = first_word(s);
			problem(ld, origin, s, NULL, "%s",
				rest ? "expected \"key = value\" (the rest of the line is not shown)" :
				       "expected \"key = value\"");
			continue;
		}
		*eq = '\0';
		char *key = trim(s);
		char *value = trim(eq + 1);
		size_t vlen = strlen(value);
		if (vlen >= 2 && value[0] == '"' && value[vlen - 1] == '"') {
			value[vlen - 1] = '\0';
			value++;
		}
		if (section[0] == '\0') {
			problem(ld, origin, key, NULL, "%s", "key outside of any [section]");
			continue;
		}
		if (*key == '\0') {
			problem(ld, origin, section, NULL, "%s", "empty key");
			continue;
		}
		int k = find_key(section, key);
		if (k >= 0 && seen_line[k]) {
			char first[32];
			snprintf(first, sizeof(first), "%u", seen_line[k]);
			problem(ld, origin, section, key, "set twice (first on line %s)", first);
			continue;
		}
		if (k >= 0)
			seen_line[k] = lineno;
		if (strcmp(section, "repositories") == 0 && repo_index(ld->cfg, key) >= 0) {
			problem(ld, origin, section, key, "%s", "repository defined twice");
			continue;
		}
		assign(ld, section, key, value, origin);
	}
	int err = ferror(f) ? errno : 0;
	if (line)
		explicit_bzero(line, cap); /* the file may hold a password or a token */
	free(line);
	fclose(f);
	if (err) {
		bw_buf_printf(&ld->errors, "%s: read error: %s\n", path, strerror(err));
		ld->nerrors++;
		return BW_EIO;
	}
	return 0;
}

/* ---- environment and --set ------------------------------------------------------------ */

/* BW_<SECTION>_<KEY>: upper case, every character outside [A-Za-z0-9] becomes '_'. */
static void env_name(char *out, size_t size, const char *section, const char *key)
{
	snprintf(out, size, "BW_%s_%s", section, key);
	for (char *p = out; *p; p++)
		*p = isalnum((unsigned char)*p) ? (char)toupper((unsigned char)*p) : '_';
}

static void apply_env(struct loader *ld)
{
	char name[300];
	for (size_t k = 0; k < NKEYS; k++) {
		env_name(name, sizeof(name), keys[k].section, keys[k].key);
		const char *v = getenv(name);
		if (v)
			set_value(ld, k, v, name);
	}
	/* Repositories named in the file may be overridden too (their id upper-cased). */
	for (size_t i = 0; i < ld->cfg->n_repositories; i++) {
		env_name(name, sizeof(name), "repositories", ld->cfg->repositories[i].id);
		const char *v = getenv(name);
		if (v)
			set_repository(ld, ld->cfg->repositories[i].id, v, name);
	}
}

static void apply_set(struct loader *ld, const char *arg)
{
	size_t len = strlen(arg);
	char *copy = strdup(arg);
	if (copy == NULL) {
		ld->oom = true;
		return;
	}
	char *eq = strchr(copy, '=');
	char *dot = strchr(copy, '.');
	if (eq == NULL || dot == NULL || dot > eq || dot == copy || dot + 1 == eq) {
		bool rest = eq ? (*eq = '\0', true) : first_word(copy);
		problem(ld, "--set", copy, NULL, "%s",
			rest ? "expected section.key=value (the value is not shown)" :
			       "expected section.key=value");
	} else {
		*eq = '\0';
		*dot = '\0';
		assign(ld, copy, dot + 1, eq + 1, "--set");
	}
	explicit_bzero(copy, len);
	free(copy);
}

/* ---- derived defaults and cross-key checks --------------------------------------------- */

static const char *origin_of(struct loader *ld, const char *section, const char *key)
{
	int k = find_key(section, key);
	return ld->origin[k][0] ? ld->origin[k] : "default";
}

/* A password or a token in a file: at most this many bytes (a real one is far shorter). */
#define SECRET_FILE_MAX 4096

/*
 * Reads the secret file named by key (section.key) into a malloc'd string in *out, without
 * one trailing newline; reports why not at the key's origin. Returns true on success; the
 * caller wipes *out with free_secret.
 */
static bool read_secret(struct loader *ld, const char *section, const char *key, const char *path,
			char **out)
{
	char why[PATH_MAX + 128];
	char *buf = NULL;
	size_t len = 0;
	const char *origin = origin_of(ld, section, key);
	int rc = bw_credential_read_file(path, SECRET_FILE_MAX, &buf, &len, why, sizeof(why));
	if (rc == BW_ENOMEM) {
		ld->oom = true;
		return false;
	}
	if (rc != 0) {
		problem(ld, origin, section, key, "%s", why);
		return false;
	}
	size_t n = len;
	if (n > 0 && buf[n - 1] == '\n')
		n--;
	if (n > 0 && buf[n - 1] == '\r')
		n--;
	buf[n] = '\0';
	const char *bad = n == 0 ? "is empty" : NULL;
	for (size_t i = 0; i < n && !bad; i++)
		if ((unsigned char)buf[i] < 0x20 || buf[i] == 0x7f)
			bad = "must hold one line without control characters";
	if (bad) {
		problem(ld, origin, section, key, "%s: %s", path, bad);
		bw_credential_wipe(buf, len);
		return false;
	}
	*out = buf; /* wiped by its owner with free_secret: the bytes past n are zero */
	return true;
}

/* Appends s to b with every byte outside RFC 3986's unreserved set as %XX. */
static void put_percent_encoded(struct bw_buf *b, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
			bw_buf_append(b, (const char *)&c, 1);
		} else {
			char esc[3] = {'%', hex[c >> 4], hex[c & 15]};
			bw_buf_append(b, esc, 3);
		}
	}
}

/*
 * amqp.password_file: its content replaces the password of every node of amqp.url (each
 * must name its user: amqp://USER[:…]@host). The old URL and every copy are wiped.
 */
static void apply_amqp_password(struct loader *ld, const char *password)
{
	struct bw_config *cfg = ld->cfg;
	struct bw_buf b = BW_BUF_INIT;
	bool ok = true;
	size_t i = 1;
	for (const char *node = cfg->amqp_url; ok; i++) {
		size_t n = strcspn(node, ",");
		const char *end = node + n;
		const char *user = strstr(node, "://");
		const char *at = NULL;
		if (user && user < end) {
			user += 3;
			for (const char *p = user; p < end; p++)
				if (*p == '@')
					at = p;
		}
		if (at == NULL || at == user || *user == ':') {
			problem(ld, origin_of(ld, "amqp", "password_file"), "amqp", "password_file",
				"needs a user name in every node of amqp.url (amqp://USER@host), "
				"node %zu has none",
				i);
			ok = false;
			break;
		}
		const char *user_end = memchr(user, ':', (size_t)(at - user));
		if (user_end == NULL)
			user_end = at;
		bw_buf_append(&b, node, (size_t)(user_end - node));
		bw_buf_puts(&b, ":");
		put_percent_encoded(&b, password);
		bw_buf_append(&b, at, (size_t)(end - at));
		if (*end == '\0')
			break;
		bw_buf_puts(&b, ",");
		node = end + 1;
	}
	char *url = NULL;
	if (ok && bw_buf_steal(&b, &url) == 0) {
		free_secret(cfg->amqp_url);
		cfg->amqp_url = url;
	} else if (ok) {
		ld->oom = true;
	}
	if (b.data)
		explicit_bzero(b.data, b.len);
	bw_buf_free(&b);
}

/* Secrets from files win over the inline values (CONTRACT 6). */
static void read_secret_files(struct loader *ld)
{
	struct bw_config *cfg = ld->cfg;
	char *secret = NULL;
	if (cfg->sna_token_file[0] &&
	    read_secret(ld, "sna", "token_file", cfg->sna_token_file, &secret)) {
		if (check_token(secret)) {
			problem(ld, origin_of(ld, "sna", "token_file"), "sna", "token_file",
				"%s: must hold one token without spaces", cfg->sna_token_file);
			free_secret(secret);
		} else {
			free_secret(cfg->sna_token);
			cfg->sna_token = secret;
		}
		secret = NULL;
	}
	if (cfg->amqp_password_file[0] &&
	    read_secret(ld, "amqp", "password_file", cfg->amqp_password_file, &secret)) {
		apply_amqp_password(ld, secret);
		free_secret(secret);
	}
}

/*
 * What would expose a backup or a password on the network (DESIGN 9). Refused unless the
 * operator says in the config that they mean it: plain NBD exports on a non-loopback
 * address (anyone who reaches the port reads and overwrites them), http:// to a
 * non-loopback SNA (the vCenter password and the NBD key travel in the body). Warned
 * about: an unverified broker, and amqp:// to a non-loopback broker.
 */
static void check_exposure(struct loader *ld)
{
	struct bw_config *cfg = ld->cfg;
	char host[256];

	if (strcmp(cfg->nbd_tls, "off") == 0 && !cfg->nbd_allow_plaintext &&
	    !bw_config_host_is_loopback(cfg->nbd_bind_address))
		problem(ld, origin_of(ld, "nbd", "tls"), "nbd", "tls",
			"off with the non-loopback nbd.bind_address %s (%s) serves every backup as "
			"plain NBD that anyone who reaches the port can read and overwrite; use "
			"auto or psk, or set nbd.allow_plaintext = true if you mean it",
			cfg->nbd_bind_address, origin_of(ld, "nbd", "bind_address"));

	if (strncmp(cfg->sna_url, "http://", 7) == 0) {
		url_host(cfg->sna_url, host, sizeof(host));
		bool remote = !bw_config_host_is_loopback(host);
		if (remote && !cfg->sna_allow_plaintext)
			problem(ld, origin_of(ld, "sna", "url"), "sna", "url",
				"http:// to the non-loopback host %s sends the vCenter password and "
				"the NBD key in clear text; use https://, or set sna.allow_plaintext = "
				"true if you mean it",
				host);
		else if (remote && bw_config_nbd_psk(cfg))
			/* CONTRACT 3.1: the key goes only over https or to a loopback SNA */
			problem(ld, origin_of(ld, "sna", "url"), "sna", "url",
				"http:// to the non-loopback host %s cannot carry the NBD key of "
				"nbd.tls (%s): sna.allow_plaintext covers the password, never the key; "
				"use https://, or nbd.tls = off with nbd.allow_plaintext",
				host, origin_of(ld, "nbd", "tls"));
	}

	bool tls = false, oom = false;
	char *node;
	size_t nodes = 0;
	while ((node = url_node(cfg->amqp_url, nodes, &oom)) != NULL) {
		nodes++;
		free_secret(node);
	}
	for (size_t i = 0; (node = url_node(cfg->amqp_url, i, &oom)) != NULL; i++) {
		/* the host the client will connect to, as its own parser reads it */
		struct amqp_connection_info info;
		size_t len = strlen(node); /* the parser cuts it in place */
		if (amqp_parse_url(node, &info) != AMQP_STATUS_OK) {
			bw_credential_wipe(node, len);
			continue; /* reported by check_amqp_url */
		}
		snprintf(host, sizeof(host), "%s", info.host);
		bool ssl = info.ssl;
		bw_credential_wipe(node, len);
		if (ssl) {
			tls = true;
		} else {
			char which[32] = "";
			if (nodes > 1)
				snprintf(which, sizeof(which), "node %zu: ", i + 1);
			if (!bw_config_host_is_loopback(host))
				warning(ld, origin_of(ld, "amqp", "url"), "amqp", "url",
					"%samqp:// to the non-loopback broker %s sends the broker "
					"password and every message in clear text; use amqps://",
					which, host);
		}
	}
	if (oom)
		ld->oom = true;
	if (tls && !cfg->amqp_tls_verify_peer)
		warning(ld, origin_of(ld, "amqp", "tls_verify_peer"), "amqp", "tls_verify_peer",
			"%s", "false: the broker's certificate is not verified, so anyone on the "
			      "path can pose as the broker and read the password and every message");
	if (tls && !cfg->amqp_tls_verify_hostname)
		warning(ld, origin_of(ld, "amqp", "tls_verify_hostname"), "amqp",
			"tls_verify_hostname", "%s",
			"false: any certificate the CA signed, for any host, is taken for the "
			"broker's");
}

/*
 * nbd.qemu_nbd / nbd.qemu_img: an absolute path is used as is, a bare name is resolved now
 * in the trusted path (never $PATH) and stored absolute, so children are exec'd by path.
 */
static void resolve_program(struct loader *ld, const char *key)
{
	int k = find_key("nbd", key);
	char **field = (char **)((char *)ld->cfg + keys[k].offset);
	char found[PATH_MAX];
	struct stat st;
	if ((*field)[0] != '/') {
		if (bw_child_find_program(*field, found, sizeof(found)) != 0) {
			problem(ld, origin_of(ld, "nbd", key), "nbd", key,
				"%s not found in " BW_CHILD_TRUSTED_PATH
				" (give an absolute path to use another)",
				*field);
			return;
		}
		char *copy = strdup(found);
		if (copy == NULL) {
			ld->oom = true;
			return;
		}
		free(*field);
		*field = copy;
		return;
	}
	if (stat(*field, &st) != 0)
		problem(ld, origin_of(ld, "nbd", key), "nbd", key, "%s", strerror(errno));
	else if (!S_ISREG(st.st_mode) || faccessat(AT_FDCWD, *field, X_OK, AT_EACCESS) != 0)
		problem(ld, origin_of(ld, "nbd", key), "nbd", key, "%s",
			"is not an executable file");
}

static void finish(struct loader *ld)
{
	struct bw_config *cfg = ld->cfg;
	char tmp[PATH_MAX + 32];

	if (cfg->worker_id == NULL) {
		char host[256] = "localhost";
		if (gethostname(host, sizeof(host) - 1) != 0)
			snprintf(host, sizeof(host), "localhost");
		host[sizeof(host) - 1] = '\0';
		for (char *p = host; *p; p++)
			if (!isalnum((unsigned char)*p) && *p != '.' && *p != '-')
				*p = '_';
		snprintf(tmp, sizeof(tmp), "%.100s-%ld", host, (long)getpid());
		if (!isalnum((unsigned char)tmp[0]))
			tmp[0] = 'w';
		cfg->worker_id = strdup(tmp);
	}
	if (cfg->worker_host == NULL) {
		char host[256] = "localhost";
		if (gethostname(host, sizeof(host) - 1) != 0)
			snprintf(host, sizeof(host), "localhost");
		host[sizeof(host) - 1] = '\0';
		cfg->worker_host = strdup(host);
	}
	if (cfg->ledger_path == NULL) {
		snprintf(tmp, sizeof(tmp), "%s/ledger.db", cfg->worker_state_dir);
		cfg->ledger_path = strdup(tmp);
	}
	if (cfg->amqp_prefetch == 0)
		cfg->amqp_prefetch = cfg->worker_max_jobs;
	if (cfg->worker_id == NULL || cfg->ledger_path == NULL)
		ld->oom = true;

	read_secret_files(ld);
	resolve_program(ld, "qemu_nbd");
	resolve_program(ld, "qemu_img");

	if (cfg->nbd_port_min > cfg->nbd_port_max) {
		char lo[16];
		snprintf(lo, sizeof(lo), "%d", cfg->nbd_port_min);
		problem(ld, origin_of(ld, "nbd", "port_max"), "nbd", "port_max",
			"must not be below nbd.port_min (%s)", lo);
	}
	if ((cfg->amqp_tls_cert_file[0] == '\0') != (cfg->amqp_tls_key_file[0] == '\0'))
		problem(ld, origin_of(ld, "amqp", "tls_key_file"), "amqp", "tls_key_file", "%s",
			"amqp.tls_cert_file and amqp.tls_key_file go together");
	if (cfg->sna_tls_cert_file[0] && !cfg->sna_tls_key_file[0])
		problem(ld, origin_of(ld, "sna", "tls_cert_file"), "sna", "tls_cert_file", "%s",
			"needs sna.tls_key_file (a client certificate and its key go together)");
	if (cfg->sna_tls_key_file[0] && !cfg->sna_tls_cert_file[0])
		problem(ld, origin_of(ld, "sna", "tls_key_file"), "sna", "tls_key_file", "%s",
			"needs sna.tls_cert_file (a client certificate and its key go together)");
	check_exposure(ld);
	if (cfg->sna_backoff_base_ms > cfg->sna_backoff_cap_s * 1000)
		problem(ld, origin_of(ld, "sna", "backoff_base_ms"), "sna", "backoff_base_ms", "%s",
			"must not exceed sna.backoff_cap_s");
	if (cfg->sna_connect_timeout_s > cfg->sna_timeout_s)
		problem(ld, origin_of(ld, "sna", "connect_timeout_s"), "sna", "connect_timeout_s",
			"%s", "must not exceed sna.timeout_s (which bounds the whole exchange)");
}

/* ---- public ----------------------------------------------------------------------------- */

int bw_config_load(struct bw_config **out, const char *path, char *const *sets, size_t nsets,
		   char **errors)
{
	struct loader *ld = NULL;
	struct bw_config *cfg = NULL;
	int rc = BW_ENOMEM;

	ld = calloc(1, sizeof(*ld));
	cfg = calloc(1, sizeof(*cfg));
	if (ld == NULL || cfg == NULL)
		goto out;
	ld->cfg = cfg;

	for (size_t k = 0; k < NKEYS; k++)
		if (keys[k].def)
			set_value(ld, k, keys[k].def, "default");
	memset(ld->origin, 0, sizeof(ld->origin));

	rc = 0;
	if (path)
		rc = read_file(ld, path);
	if (rc == 0) {
		apply_env(ld);
		for (size_t i = 0; i < nsets; i++)
			apply_set(ld, sets[i]);
		finish(ld);
	}

	if (ld->oom || ld->errors.failed || ld->warnings.failed)
		rc = BW_ENOMEM;
	else if (rc == 0 && ld->nerrors)
		rc = BW_ECONFIG;
	if (rc == 0) {
		if (ld->warnings.len && bw_buf_steal(&ld->warnings, &cfg->warnings) != 0) {
			rc = BW_ENOMEM;
			goto out;
		}
		*out = cfg;
		cfg = NULL;
	} else if (errors) {
		/* the warnings too: who fixes the errors wants to see them */
		if (ld->warnings.len)
			bw_buf_append(&ld->errors, ld->warnings.data, ld->warnings.len);
		if (bw_buf_steal(&ld->errors, errors) != 0)
			*errors = NULL;
	}
out:
	if (ld) {
		bw_buf_free(&ld->errors);
		bw_buf_free(&ld->warnings);
	}
	free(ld);
	bw_config_free(cfg);
	return rc;
}

void bw_config_free(struct bw_config *cfg)
{
	if (cfg == NULL)
		return;
	/* every string: sna.token, amqp.url and sna.url may hold secrets */
	for (size_t k = 0; k < NKEYS; k++)
		if (keys[k].type == T_STR)
			free_secret(*(char **)((char *)cfg + keys[k].offset));
	for (size_t i = 0; i < cfg->n_repositories; i++) {
		free(cfg->repositories[i].id);
		free(cfg->repositories[i].path);
	}
	free(cfg->repositories);
	free(cfg->warnings);
	free(cfg);
}

bool bw_config_host_is_loopback(const char *host)
{
	unsigned char a[16];
	size_t n = strlen(host);
	char buf[64];
	if (n >= 2 && host[0] == '[' && host[n - 1] == ']' && n - 2 < sizeof(buf)) {
		memcpy(buf, host + 1, n - 2);
		buf[n - 2] = '\0';
		host = buf;
	}
	if (strcasecmp(host, "localhost") == 0)
		return true;
	if (inet_pton(AF_INET, host, a) == 1)
		return a[0] == 127;
	if (inet_pton(AF_INET6, host, a) != 1)
		return false;
	static const unsigned char v6_loopback[16] = {[15] = 1};
	static const unsigned char v4_mapped[12] = {[10] = 0xff, [11] = 0xff};
	return memcmp(a, v6_loopback, 16) == 0 || (memcmp(a, v4_mapped, 12) == 0 && a[12] == 127);
}

bool bw_config_nbd_psk(const struct bw_config *cfg)
{
	if (strcmp(cfg->nbd_tls, "auto") == 0)
		return !bw_config_host_is_loopback(cfg->nbd_bind_address);
	return strcmp(cfg->nbd_tls, "psk") == 0;
}

const char *bw_config_repository(const struct bw_config *cfg, const char *id)
{
	int i = repo_index(cfg, id);
	return i >= 0 ? cfg->repositories[i].path : NULL;
}

/*
 * scheme://user:secret@host → scheme://user:***@host, for every node of a comma-separated
 * list. The user part ends at the node's last '@' (not at the first '/': a password with a
 * raw '/' is still masked; a '@' in a path masks too much, never too little).
 */
static void put_masked_url(struct bw_buf *b, const char *url)
{
	for (const char *node = url;;) {
		size_t n = strcspn(node, ",");
		const char *end = node + n;
		const char *scheme_end = strstr(node, "://");
		const char *at = NULL, *colon = NULL;
		if (scheme_end && scheme_end < end) {
			for (const char *p = scheme_end + 3; p < end; p++)
				if (*p == '@')
					at = p;
			for (const char *p = scheme_end + 3; at && p < at && !colon; p++)
				if (*p == ':')
					colon = p;
		}
		if (colon) {
			bw_buf_append(b, node, (size_t)(colon + 1 - node));
			bw_buf_puts(b, "***");
			bw_buf_append(b, at, (size_t)(end - at));
		} else {
			bw_buf_append(b, node, n);
		}
		if (*end == '\0')
			break;
		bw_buf_puts(b, ",");
		node = end + 1;
	}
}

int bw_config_format(const struct bw_config *cfg, char **out)
{
	struct bw_buf b = BW_BUF_INIT;
	for (size_t k = 0; k < NKEYS; k++) {
		const struct key_def *d = &keys[k];
		const char *field = (const char *)cfg + d->offset;
		bw_buf_printf(&b, "%s.%s = ", d->section, d->key);
		switch (d->type) {
		case T_INT:
			bw_buf_printf(&b, "%d", *(const int *)field);
			break;
		case T_BOOL:
			bw_buf_puts(&b, *(const bool *)field ? "true" : "false");
			break;
		case T_STR: {
			const char *v = *(char *const *)field;
			if (d->secret)
				bw_buf_puts(&b, v && v[0] ? "***" : "(unset)");
			else if (d->check == check_amqp_url || d->check == check_http_url)
				put_masked_url(&b, v);
			else
				bw_buf_puts(&b, v ? v : "");
			break;
		}
		}
		bw_buf_puts(&b, "\n");
	}
	for (size_t i = 0; i < cfg->n_repositories; i++)
		bw_buf_printf(&b, "repositories.%s = %s\n", cfg->repositories[i].id,
			      cfg->repositories[i].path);
	return bw_buf_steal(&b, out);
}
