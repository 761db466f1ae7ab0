/* config.h: the worker's configuration: INI file, then BW_<SECTION>_<KEY>, then --set. */
#ifndef BW_CONFIG_H
#define BW_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

struct bw_repository {
	char *id;   /* [A-Za-z0-9][A-Za-z0-9._-]* */
	char *path; /* absolute */
};

/* Plain data: read it anywhere, change it only through bw_config_load. */
struct bw_config {
	char *amqp_url;
	char *amqp_queue;
	char *amqp_jobs_exchange;
	char *amqp_events_exchange;
	char *amqp_dlx;
	char *amqp_dlq;
	char *amqp_control_exchange; /* fanout: backup.cancel (CONTRACT §2.1) */
	int amqp_heartbeat_s;
	int amqp_prefetch;
	int amqp_delivery_limit;
	bool amqp_declare;      /* false: only check the topology (the operator owns it) */
	char *amqp_tls_ca_file; /* amqps:// only; empty: the system's CAs */
	char *amqp_tls_cert_file;
	char *amqp_tls_key_file;
	bool amqp_tls_verify_peer;
	bool amqp_tls_verify_hostname;
	char *amqp_password_file; /* empty: the password in amqp.url */

	char *worker_id;
	char *worker_host; /* the host of events (default: the host name); set only to run the
			      workers of several simulated hosts on one machine */
	int worker_max_jobs;
	char *worker_state_dir;
	int worker_recovery_interval_s; /* how often dead workers' jobs are looked for */
	int worker_shutdown_grace_s;    /* SIGTERM: preparing jobs rolled back within this */

	char *ledger_path;
	int ledger_retention_days; /* finished jobs older than this are pruned */

	int nbd_port_min;
	int nbd_port_max;
	char *nbd_bind_address;
	char *nbd_advertise_host;
	int nbd_shared;
	char *nbd_qemu_nbd;
	char *nbd_qemu_img;
	char *nbd_tls;            /* "auto", "psk" or "off" as written (bw_config_nbd_tls) */
	bool nbd_allow_plaintext; /* a non-loopback bind with nbd.tls = off is meant */

	char *sna_url;
	char *sna_token; /* secret: never logged */
	int sna_connect_timeout_s;
	int sna_timeout_s;
	int sna_max_attempts;
	int sna_backoff_base_ms;
	int sna_backoff_cap_s;
	int sna_poll_interval_s;
	int sna_lost_after;
	char *sna_token_file; /* empty: sna.token */
	char *sna_tls_ca_file; /* empty: the system's CAs */
	char *sna_tls_cert_file;
	char *sna_tls_key_file;
	bool sna_allow_plaintext; /* http:// to a non-loopback SNA is meant */

	char *credentials_dir;

	int job_max_duration_s;
	int job_port_wait_s;
	int job_max_message_bytes;
	int job_cancel_memory_s; /* a cancel for a job no host knows yet is kept this long */

	char *metrics_listen; /* "host:port" of /metrics and /healthz; empty: off */

	char *log_level;
	bool log_timestamps;
	char *log_format; /* "text" or "json" */

	struct bw_repository *repositories;
	size_t n_repositories;

	/* What is allowed but unwise (an unverified or plain-text broker): one line each,
	 * "FILE:LINE: key: warning: reason", never a secret; NULL when there is none. */
	char *warnings;
};

/*
 * Loads the configuration: defaults, then the INI file at path (NULL: none), then every
 * BW_<SECTION>_<KEY> environment variable, then each "section.key=value" of sets, in that
 * order; then derived defaults and cross-key checks.
 * What would expose a backup or a password is an error unless the config says it is meant
 * (nbd.allow_plaintext, sna.allow_plaintext); an unverified or plain-text broker is a
 * warning, in cfg->warnings.
 * On success stores a new config in *out (free with bw_config_free) and returns 0.
 * On failure returns BW_ECONFIG (or BW_ENOMEM, BW_ENOENT/BW_EPERM/BW_EIO for an unreadable
 * file) and, when errors is not NULL, stores in *errors a malloc'd text of one line per
 * problem, "FILE:LINE: key: reason" (env: "BW_X_Y: key: reason"; --set: "--set: key: reason"),
 * then the warnings; the caller frees it. No line holds a secret.
 */
int bw_config_load(struct bw_config **out, const char *path, char *const *sets, size_t nsets,
		   char **errors) BW_MUST_CHECK;

void bw_config_free(struct bw_config *cfg);

/* True for 127.0.0.0/8, ::1, ::ffff:127.x.y.z (brackets allowed) and "localhost". */
bool bw_config_host_is_loopback(const char *host);

/* Whether exports are served with TLS and a per-job key: nbd.tls = psk, or auto with a
 * bind address that is not loopback (CONTRACT §5). */
bool bw_config_nbd_psk(const struct bw_config *cfg);

/* Returns the path configured for repository id, or NULL (borrowed from cfg). */
const char *bw_config_repository(const struct bw_config *cfg, const char *id);

/*
 * Writes the effective configuration, one "section.key = value" line each, with
 * secrets masked (sna.token, the password in amqp.url), to a malloc'd text in *out.
 */
int bw_config_format(const struct bw_config *cfg, char **out) BW_MUST_CHECK;

/* The default config file of bw-ctl and bw-worker. */
#define BW_CONFIG_DEFAULT_PATH "/etc/bw-worker/bw-worker.conf"

#endif
