/* ctl.h: what the parts of bw-ctl share: exit codes, output, the ledger and the broker. */
#ifndef BW_CTL_H
#define BW_CTL_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>

#include "amqp.h"
#include "config.h"
#include "ledger.h"
#include "message.h"

/* The exit codes of every command (--help): 2 wins over 1. */
enum { CTL_OK = 0, CTL_NO = 1, CTL_USAGE = 2 };

/* The routing key the worker binds its queue to on amqp.jobs_exchange (CONTRACT §1). */
#define CTL_START_KEY "backup.start"

/* Connect, login and each broker RPC; a confirm is waited for this long. */
#define CTL_AMQP_TIMEOUT_MS 5000
#define CTL_CONFIRM_TIMEOUT_MS 10000

/* Reads a whole file (or stdin for "-") into a malloc'd buffer; returns 0 or an errno value. */
int ctl_read_file(const char *path, char **out, size_t *len);

/* Prints one line "FILE: path: rule" per violation (verbose: ": explanation" too). */
void ctl_print_verdict(const char *file, const struct bw_verdict *vd, bool verbose);

/* The violations of vd as a JSON array of {path, rule, message}. */
struct json_object *ctl_verdict_json(const struct bw_verdict *vd);

/*
 * Checks body[0..len) as validate --config does (message rules, then the host's). Returns
 * 0 and stores the spec in *spec (free with bw_job_spec_free); BW_EMESSAGE with *vd (free
 * with bw_verdict_free); BW_ENOMEM.
 */
int ctl_check_message(const char *body, size_t len, const struct bw_config *cfg,
		      struct bw_job_spec **spec, struct bw_verdict **vd);

/* Prints o pretty (--json of a document) or on one line (a stream of events). */
void ctl_print_json(struct json_object *o);

struct ctl_column {
	const char *key;
	const char *header;
};

/* Prints rows (a JSON array of objects) as an aligned table with the given columns. */
void ctl_print_table(struct json_object *rows, const struct ctl_column *cols, size_t ncols);

/* The string member key of o, or NULL. */
const char *ctl_str(struct json_object *o, const char *key);

/*
 * Opens the host's ledger read-only. Returns CTL_OK with *l set; CTL_OK with *l NULL when
 * there is no ledger (no worker has run here: nothing is created); CTL_USAGE when it
 * cannot be read (said on stderr).
 */
int ctl_ledger_open(const struct bw_config *cfg, struct bw_ledger **l);

/*
 * Connects to the broker of the config (each node of amqp.url in turn, the worker's TLS
 * options; amqp.password_file already applied by the config), in confirm mode when
 * confirms. Returns CTL_OK with *out, or CTL_USAGE with the reason on stderr.
 */
int ctl_connect(const struct bw_config *cfg, const char *name, bool confirms, struct bw_amqp **out);

/* The commands: argv[0] is the command's name; each returns an exit code. */
int ctl_publish(int argc, char **argv, const struct bw_config *cfg);
int ctl_cancel(int argc, char **argv, const struct bw_config *cfg);
int ctl_retry(int argc, char **argv, const struct bw_config *cfg);
int ctl_events(int argc, char **argv, const struct bw_config *cfg);
int ctl_dlq(int argc, char **argv, const struct bw_config *cfg);
int ctl_reap(int argc, char **argv, const struct bw_config *cfg);
int ctl_verify(int argc, char **argv, const struct bw_config *cfg);

#endif
