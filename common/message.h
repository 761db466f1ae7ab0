/* message.h: the backup.start message: strict parsing, every rule of CONTRACT §2, host rules. */
#ifndef BW_MESSAGE_H
#define BW_MESSAGE_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "error.h"

#define BW_MESSAGE_MAX_BYTES_DEFAULT 262144
#define BW_MESSAGE_MAX_DISKS 64
#define BW_DISK_SIZE_MAX 70368744177664LL /* 64 TiB */

/* Why a backup.start was rejected: the `reason` of backup.rejected. */
enum bw_reject_reason {
	BW_REJECT_NONE = 0,
	BW_REJECT_INVALID_JSON,
	BW_REJECT_TOO_LARGE,
	BW_REJECT_INVALID_MESSAGE,
	BW_REJECT_UNKNOWN_REPOSITORY,
	BW_REJECT_UNKNOWN_CREDENTIAL,
	BW_REJECT_INVALID_PARENT,
};

/* Returns the contract's name of reason ("invalid_json", ...). */
const char *bw_reject_reason_name(enum bw_reject_reason reason);

/* One violated rule: `path` like "disks[1].key" ("$" for the whole document). */
struct bw_violation {
	char *path;
	const char *rule; /* static: "required", "type", "max_length", ... (schemas/README.md) */
	char *message;    /* human text, safe to print (no raw control characters) */
};

/*
 * A verdict lists at most this many violations (CONTRACT §2: errors[] of backup.rejected);
 * past it, one more entry {"$", "truncated", "... N more ..."} ends the list, so n is at
 * most BW_VERDICT_MAX_ERRORS + 1. The listed ones are the first found, in the order the
 * rules are checked; walks over disks and tags stop once one had to be left out.
 */
#define BW_VERDICT_MAX_ERRORS 100

/* The outcome of a rejected message. */
struct bw_verdict {
	enum bw_reject_reason reason; /* the first failing class, in the order of the enum */
	struct bw_violation *v;
	size_t n; /* at most BW_VERDICT_MAX_ERRORS + 1 (the last one then "truncated") */
	char *job_id;   /* the body's job_id when it is a string that follows the rule, else NULL */
	bool vm_valid;  /* vm, policy_id and tags may be echoed in backup.rejected only when valid */
	bool policy_valid;
	bool tags_valid;
	struct json_object *doc; /* the parsed body (NULL when not JSON); owned */
};

enum bw_backup_type { BW_BACKUP_FULL, BW_BACKUP_INCREMENTAL };

struct bw_disk_spec {
	int64_t key;
	int64_t size_bytes;
	char *label;              /* NULL when absent */
	char *parent_path;        /* incremental disks only, else NULL */
	char *previous_change_id; /* incremental disks only, else NULL */
};

/* A valid backup.start. Strings are NUL-free UTF-8 (the rules forbid control characters). */
struct bw_job_spec {
	char *job_id;
	char *vm_name;
	char *vm_path;
	char *vm_id; /* NULL when absent */
	enum bw_backup_type backup_type;
	char *repository_id;
	char *credential_id;
	char *policy_id;          /* NULL when absent */
	struct json_object *tags; /* NULL when absent; owned reference */
	struct bw_disk_spec *disks;
	size_t n_disks;
	int64_t max_duration_s; /* 0 when absent (use the config's default) */
	char *unknown_fields;   /* "a, vm.b, disks[0].c" of ignored fields, or NULL; about 4 KiB
				   at most, then ", and N more" */
};

/*
 * Validates body[0..len) against every message rule of CONTRACT §2 (not the host's rules).
 * Returns 0 and stores a new spec in *spec (free with bw_job_spec_free); or BW_EMESSAGE
 * and stores in *verdict every violated rule, bounded as BW_VERDICT_MAX_ERRORS says (free
 * with bw_verdict_free); or BW_ENOMEM.
 * A body over max_bytes is rejected unread (too_large).
 */
int bw_message_parse(const char *body, size_t len, size_t max_bytes, struct bw_job_spec **spec,
		     struct bw_verdict **verdict) BW_MUST_CHECK;

/*
 * Checks the host's rules for a valid spec: the repository is configured, the credential
 * file <credentials.dir>/<credential_id>.json exists, and every parent_path passes
 * bw_target_check_chain (resolved beneath the repository, its whole backing chain inside
 * it, in qcow2 with explicit formats): one violation per bad parent, path
 * "disks[N].parent_path", rule bw_target_chain_rule() of its fault. Returns 0, or
 * BW_EMESSAGE with *verdict (reason unknown_repository, unknown_credential or
 * invalid_parent; its job_id is the spec's, its doc NULL), or BW_ENOMEM.
 */
int bw_message_check_host(const struct bw_job_spec *spec, const struct bw_config *cfg,
			  struct bw_verdict **verdict) BW_MUST_CHECK;

void bw_job_spec_free(struct bw_job_spec *spec);
void bw_verdict_free(struct bw_verdict *verdict);

#endif
