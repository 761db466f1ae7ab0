/* ctl_host.c: bw-ctl's host commands: reap (a recovery pass now) and verify (a completed job's
 * images). */
#define _GNU_SOURCE /* pidfd_open */
#include "child.h"
#include "clock.h"
#include "ledger_views.h"
#include "proc.h"
#include "target.h"
#include "ctl.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* reap waits this long (default) for the dead workers to leave the ledger; it looks this often. */
#define REAP_WAIT_DEFAULT_S 10
#define REAP_POLL_MS 200
/* One qemu-img check of an image: a few seconds even for a large one (it reads metadata). */
#define VERIFY_CHECK_TIMEOUT_MS 120000

enum { OPT_JSON = 256, OPT_WAIT };

/* ---- reap -------------------------------------------------------------------------------- */

/*
 * Sends SIGUSR2 to the very process the row names: through a pidfd taken before the pid and
 * start time are checked, so a pid reused after the check cannot be signalled.
 */
static int signal_worker(struct json_object *w)
{
	struct json_object *v;
	pid_t pid = json_object_object_get_ex(w, "pid", &v) ? json_object_get_int(v) : 0;
	uint64_t st =
	    json_object_object_get_ex(w, "start_time", &v) ? (uint64_t)json_object_get_int64(v) : 0;
	if (pid <= 0)
		return BW_ENOENT;
	int fd = pidfd_open(pid, 0);
	if (fd < 0)
		return BW_ENOENT;
	int rc = BW_ENOENT;
	if (bw_proc_same(pid, st))
		rc = syscall(SYS_pidfd_send_signal, fd, SIGUSR2, NULL, 0) == 0
			 ? 0
			 : bw_err_from_errno(errno);
	close(fd);
	return rc;
}

/* The ids of the workers whose alive is want, as a JSON array of strings. */
static struct json_object *ids(struct json_object *workers, bool want)
{
	struct json_object *a = json_object_new_array(), *v;
	for (size_t i = 0; i < json_object_array_length(workers); i++) {
		struct json_object *w = json_object_array_get_idx(workers, i);
		if (json_object_object_get_ex(w, "alive", &v) && json_object_get_boolean(v) == want)
			json_object_array_add(a, json_object_new_string(ctl_str(w, "worker_id")));
	}
	return a;
}

/* The ids of the dead workers of rows whose row (that incarnation) is still in the ledger. */
static struct json_object *still_listed(struct bw_ledger *l, struct json_object *workers)
{
	struct json_object *a = json_object_new_array(), *v;
	for (size_t i = 0; a && i < json_object_array_length(workers); i++) {
		struct json_object *w = json_object_array_get_idx(workers, i);
		const char *id = ctl_str(w, "worker_id");
		struct bw_worker_row row;
		if (id == NULL || !json_object_object_get_ex(w, "alive", &v) ||
		    json_object_get_boolean(v))
			continue;
		int64_t inc =
		    json_object_object_get_ex(w, "incarnation", &v) ? json_object_get_int64(v) : 0;
		int rc = bw_ledger_worker_get(l, id, &row);
		if (rc == BW_ENOENT || (rc == 0 && row.incarnation != inc))
			continue; /* reaped (or registered again: a new process) */
		json_object_array_add(a, json_object_new_string(id));
	}
	return a;
}

static void print_ids(const char *what, struct json_object *a)
{
	printf("%s:", what);
	for (size_t i = 0; i < json_object_array_length(a); i++)
		printf(" %s", json_object_get_string(json_object_array_get_idx(a, i)));
	printf("%s\n", json_object_array_length(a) ? "" : " none");
}

int ctl_reap(int argc, char **argv, const struct bw_config *cfg)
{
	static const struct option opts[] = {{"json", no_argument, NULL, OPT_JSON},
					     {"wait", required_argument, NULL, OPT_WAIT},
					     {NULL, 0, NULL, 0}};
	bool json = false;
	long wait_s = REAP_WAIT_DEFAULT_S;
	struct bw_ledger *l = NULL;
	struct json_object *workers = NULL, *asked = json_object_new_array(), *dead = NULL,
			   *left = NULL;
	char *end;
	int opt, status;
	optind = 0;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == OPT_JSON) {
			json = true;
		} else if (opt == OPT_WAIT) {
			wait_s = strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end != '\0' || wait_s < 0 || wait_s > 3600) {
				fprintf(stderr, "bw-ctl: reap: --wait wants 0 to 3600 seconds\n");
				json_object_put(asked);
				return CTL_USAGE;
			}
		} else {
			fprintf(stderr, "bw-ctl: reap: unknown option (see --help)\n");
			json_object_put(asked);
			return CTL_USAGE;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "bw-ctl: reap: unexpected argument \"%s\"\n", argv[optind]);
		json_object_put(asked);
		return CTL_USAGE;
	}
	if ((status = ctl_ledger_open(cfg, &l)) != CTL_OK)
		goto out;
	status = CTL_NO;
	if (l == NULL) {
		fprintf(stderr, "bw-ctl: reap: no worker has run on this host (no ledger at %s)\n",
			cfg->ledger_path);
		goto out;
	}
	int rc = bw_ledger_list_workers(l, &workers);
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: %s\n", cfg->ledger_path, bw_strerror(rc));
		status = CTL_USAGE;
		goto out;
	}
	dead = ids(workers, false);
	for (size_t i = 0; i < json_object_array_length(workers); i++) {
		struct json_object *w = json_object_array_get_idx(workers, i), *v;
		if (!json_object_object_get_ex(w, "alive", &v) || !json_object_get_boolean(v))
			continue;
		rc = signal_worker(w);
		if (rc == 0)
			json_object_array_add(asked,
					      json_object_new_string(ctl_str(w, "worker_id")));
		else if (rc != BW_ENOENT) /* gone meanwhile is no news; anything else is */
			fprintf(stderr, "bw-ctl: reap: cannot signal worker %s: %s\n",
				ctl_str(w, "worker_id"), bw_strerror(rc));
	}
	if (json_object_array_length(asked) == 0) {
		fprintf(stderr, "bw-ctl: reap: no live worker on this host to ask (a worker runs a "
				"recovery pass when it starts)\n");
		goto out;
	}
	/*
	 * The pass removes the dead workers' rows as it takes their jobs over. Watched by SQL
	 * alone: the liveness test of bw_ledger_list_workers takes each lock for a moment, and a
	 * reaper that met that moment would think the dead worker alive and leave it.
	 */
	int64_t until = bw_clock_mono_ms() + wait_s * 1000;
	for (;;) {
		json_object_put(left);
		left = still_listed(l, workers);
		if (left == NULL || json_object_array_length(left) == 0 ||
		    bw_clock_mono_ms() >= until)
			break;
		usleep(REAP_POLL_MS * 1000);
	}
	status = left && json_object_array_length(left) == 0 ? CTL_OK : CTL_NO;
	if (json) {
		struct json_object *o = json_object_new_object();
		json_object_object_add(o, "asked", json_object_get(asked));
		json_object_object_add(o, "dead_before", json_object_get(dead));
		json_object_object_add(o, "dead_left", left ? json_object_get(left) : NULL);
		ctl_print_json(o);
		json_object_put(o);
	} else {
		print_ids("asked for a recovery pass (SIGUSR2)", asked);
		print_ids("dead workers before", dead);
		print_ids("dead workers left", left ? left : dead);
	}
	if (status != CTL_OK)
		fprintf(stderr, "bw-ctl: reap: dead workers are still listed after %ld s\n",
			wait_s);
out:
	json_object_put(left);
	json_object_put(dead);
	json_object_put(asked);
	json_object_put(workers);
	bw_ledger_close(l);
	return status;
}

/* ---- verify ------------------------------------------------------------------------------- */

/* The message's size_bytes of disk key, or -1. */
static int64_t disk_size(const struct bw_job_spec *spec, int64_t key)
{
	for (size_t i = 0; i < spec->n_disks; i++)
		if (spec->disks[i].key == key)
			return spec->disks[i].size_bytes;
	return -1;
}

/* qemu-img check of path: 0, or BW_ECHILD/... with its words in err. */
static int image_check(const struct bw_config *cfg, const char *path, char *err, size_t errsize)
{
	char log[] = "/tmp/bw-ctl-verify-XXXXXX";
	int fd = mkstemp(log);
	if (fd < 0) {
		snprintf(err, errsize, "cannot make a log file: %s", strerror(errno));
		return BW_EIO;
	}
	close(fd);
	const char *argv[] = {cfg->nbd_qemu_img, "check", "-q", path, NULL};
	struct bw_spawn s = {argv, NULL, log, false};
	int status = 0;
	int rc = bw_run(&s, VERIFY_CHECK_TIMEOUT_MS, &status, err, errsize);
	if (rc == BW_ECHILD) {
		char tail[400] = "", what[96];
		bw_status_text(status, what, sizeof(what));
		if (bw_log_tail(log, 300, tail, sizeof(tail)) != 0)
			tail[0] = '\0';
		snprintf(err, errsize, "qemu-img check %s%s%s", what, tail[0] ? ": " : "", tail);
	}
	unlink(log);
	return rc;
}

/* Verifies one disk; fills o with its findings. Returns true when everything holds. */
static bool verify_disk(const struct bw_config *cfg, const char *repo, const char *path,
			int64_t size_bytes, struct json_object *o)
{
	char err[600];
	struct stat st;
	bool exists = stat(path, &st) == 0 && S_ISREG(st.st_mode);
	json_object_object_add(o, "exists", json_object_new_boolean(exists));
	if (!exists) {
		json_object_object_add(o, "ok", json_object_new_boolean(false));
		json_object_object_add(o, "error", json_object_new_string("no image file"));
		return false;
	}
	const char *fault = NULL;
	int rc = image_check(cfg, path, err, sizeof(err));
	json_object_object_add(o, "check", json_object_new_string(rc == 0 ? "ok" : "failed"));
	if (rc != 0)
		fault = err;

	int64_t vsize = -1, actual = 0;
	char buf[600];
	rc = bw_image_sizes(path, &vsize, &actual);
	json_object_object_add(o, "virtual_size", rc == 0 ? json_object_new_int64(vsize) : NULL);
	json_object_object_add(o, "size_bytes", json_object_new_int64(size_bytes));
	bool size_ok = rc == 0 && vsize == size_bytes;
	json_object_object_add(o, "size", json_object_new_string(size_ok ? "ok" : "wrong"));
	if (!size_ok && fault == NULL) {
		snprintf(buf, sizeof(buf), "virtual size %" PRId64 ", the disk has %" PRId64, vsize,
			 size_bytes);
		fault = buf;
	}

	/* the image and its whole backing chain, as qemu opens them, beneath the repository */
	size_t n = strlen(repo);
	while (n > 1 && repo[n - 1] == '/')
		n--;
	const char *chain = "outside_repository";
	char cerr[600] = "the image is not inside the repository";
	if (strncmp(path, repo, n) == 0 && path[n] == '/') {
		enum bw_chain_fault cf = BW_CHAIN_OK;
		rc = bw_target_check_chain(repo, path + n + 1, &cf, cerr, sizeof(cerr));
		chain = rc == 0 ? "ok" : bw_target_chain_rule(cf);
	}
	json_object_object_add(o, "chain", json_object_new_string(chain));
	if (strcmp(chain, "ok") != 0 && fault == NULL)
		fault = cerr;
	json_object_object_add(o, "ok", json_object_new_boolean(fault == NULL));
	json_object_object_add(o, "error", fault ? json_object_new_string(fault) : NULL);
	return fault == NULL;
}

int ctl_verify(int argc, char **argv, const struct bw_config *cfg)
{
	static const struct option opts[] = {{"json", no_argument, NULL, OPT_JSON},
					     {NULL, 0, NULL, 0}};
	static const struct ctl_column cols[] = {
	    {"key", "DISK"},	{"exists", "EXISTS"},	 {"check", "CHECK"}, {"size", "SIZE"},
	    {"chain", "CHAIN"}, {"qcow2_path", "QCOW2"}, {"error", "ERROR"}};
	bool json = false;
	struct bw_ledger *l = NULL;
	struct json_object *job = NULL, *rows = NULL;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	int opt, status;
	optind = 0;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt != OPT_JSON) {
			fprintf(stderr, "bw-ctl: verify: unknown option (see --help)\n");
			return CTL_USAGE;
		}
		json = true;
	}
	if (optind != argc - 1) {
		fprintf(stderr, "bw-ctl: verify: give one JOB\n");
		return CTL_USAGE;
	}
	const char *job_id = argv[optind];
	if ((status = ctl_ledger_open(cfg, &l)) != CTL_OK)
		return status;
	status = CTL_NO;
	int rc = l ? bw_ledger_show_job(l, job_id, &job) : BW_ENOENT;
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: verify: %s\n",
			rc == BW_ENOENT ? "no such job in this host's ledger" : bw_strerror(rc));
		status = rc == BW_ENOENT ? CTL_NO : CTL_USAGE;
		goto out;
	}
	const char *state = ctl_str(job, "state"), *message = ctl_str(job, "message");
	if (state == NULL || strcmp(state, "completed") != 0) {
		fprintf(stderr, "bw-ctl: verify: job %s is %s, not completed\n", job_id,
			state ? state : "?");
		goto out;
	}
	if (message == NULL ||
	    bw_message_parse(message, strlen(message), SIZE_MAX, &spec, &vd) != 0) {
		fprintf(stderr, "bw-ctl: verify: the stored message of %s is unusable\n", job_id);
		goto out;
	}
	const char *repo = bw_config_repository(cfg, spec->repository_id);
	if (repo == NULL) {
		fprintf(stderr, "bw-ctl: verify: repository %s is not configured here\n",
			spec->repository_id);
		status = CTL_USAGE;
		goto out;
	}
	struct json_object *disks = NULL;
	json_object_object_get_ex(job, "disks", &disks);
	rows = json_object_new_array();
	bool all = disks && json_object_array_length(disks) == spec->n_disks;
	for (size_t i = 0; disks && i < json_object_array_length(disks); i++) {
		struct json_object *d = json_object_array_get_idx(disks, i), *v = NULL;
		int64_t key =
		    json_object_object_get_ex(d, "key", &v) ? json_object_get_int64(v) : 0;
		const char *path = ctl_str(d, "qcow2_path");
		struct json_object *o = json_object_new_object();
		json_object_object_add(o, "key", json_object_new_int64(key));
		json_object_object_add(o, "qcow2_path", path ? json_object_new_string(path) : NULL);
		if (!verify_disk(cfg, repo, path ? path : "", disk_size(spec, key), o))
			all = false;
		json_object_array_add(rows, o);
	}
	status = all ? CTL_OK : CTL_NO;
	if (json) {
		struct json_object *o = json_object_new_object();
		json_object_object_add(o, "job_id", json_object_new_string(job_id));
		json_object_object_add(o, "ok", json_object_new_boolean(all));
		json_object_object_add(o, "disks", json_object_get(rows));
		ctl_print_json(o);
		json_object_put(o);
	} else {
		ctl_print_table(rows, cols, 7);
		printf("%s: %s\n", job_id, all ? "every image verified" : "FAULTS found");
	}
out:
	json_object_put(rows);
	json_object_put(job);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	bw_ledger_close(l);
	return status;
}
