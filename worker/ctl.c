/* ctl.c: bw-ctl, the operator's tool: validate backup.start messages, read the host's ledger. */
#include "config.h"
#include "error.h"
#include "ledger.h"
#include "ledger_views.h"
#include "log.h"
#include "message.h"
#include "proc.h"
#include "cli.h"
#include "ctl.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { EXIT_VALID = CTL_OK, EXIT_INVALID = CTL_NO, EXIT_USAGE = CTL_USAGE };

static void usage(FILE *f)
{
	fprintf(f, "usage: bw-ctl [--config FILE] [--set section.key=value]... COMMAND ...\n"
		   "\n"
		   "Every command but validate reads the config (default\n"
		   BW_CONFIG_DEFAULT_PATH ") for the host's ledger (ledger.path) or the\n"
		   "broker (amqp.url, amqp.password_file, amqp.tls_*). Human tables by default;\n"
		   "--json prints JSON for scripts.\n"
		   "Exit status: 0 success; 1 a negative answer (invalid, not found, check failed,\n"
		   "nobody listening); 2 usage or I/O error, the broker or the ledger unreachable\n"
		   "(2 wins over 1).\n"
		   "\n"
		   "messages:\n"
		   "  validate [-v] FILE...   check backup.start messages as the worker does;\n"
		   "                          one line \"FILE: path: rule\" per violated rule\n"
		   "                          (-v adds the explanation and prints valid files).\n"
		   "                          Without --config only the message rules are checked;\n"
		   "                          with it also the host's (repository, credential,\n"
		   "                          parent images). 1: any invalid.\n"
		   "\n"
		   "the host's ledger (no ledger yet: jobs, ports and workers list nothing, exit 0,\n"
		   "and nothing is created):\n"
		   "  jobs [--json]           the jobs, newest first\n"
		   "  ports [--json]          reserved and quarantined NBD ports\n"
		   "  workers [--json]        worker processes of this host and whether they live\n"
		   "  show [--json] JOB       one job: disks, every state with its time, events;\n"
		   "                          1: no such job\n"
		   "  verify [--json] JOB     a completed job's images: each exists, passes\n"
		   "                          qemu-img check (nbd.qemu_img), has the disk's\n"
		   "                          size_bytes as virtual size, and its backing chain\n"
		   "                          stays inside the repository; 1: a fault, no such\n"
		   "                          job, or the job is not completed\n"
		   "  reap [--json] [--wait S]\n"
		   "                          a recovery pass now: SIGUSR2 to every live worker of\n"
		   "                          this host (pid and start time checked, as the ledger\n"
		   "                          records them), then waits up to S seconds (10) until\n"
		   "                          no dead worker is left in the ledger; 1: no live\n"
		   "                          worker (each runs a pass when it starts), or dead\n"
		   "                          workers still listed after S seconds\n"
		   "\n"
		   "the broker (amqp.*):\n"
		   "  publish [--json] FILE   validate FILE as validate --config does (1: invalid,\n"
		   "                          with its violations), then publish it persistent,\n"
		   "                          mandatory and confirmed to amqp.jobs_exchange with\n"
		   "                          routing key " CTL_START_KEY "; 2: unroutable, nacked,\n"
		   "                          no confirm\n"
		   "  events [--json] [--job JOB] [--count N] [--timeout S]\n"
		   "                          follow amqp.events_exchange through a temporary\n"
		   "                          exclusive queue bound with \"#\" (only events\n"
		   "                          published from then on); one line per event: time,\n"
		   "                          event, job, seq, summary (--json: the raw event, one\n"
		   "                          per line). --job shows only that job (each event_id\n"
		   "                          once). Stops after N events; after S seconds without\n"
		   "                          an event shown; with --job after its\n"
		   "                          backup.completed, its backup.rejected, or the\n"
		   "                          backup.cleanup that follows its backup.failed; else\n"
		   "                          on SIGINT/SIGTERM. 1: the silence ended it before\n"
		   "                          N events or the job's end\n"
		   "  cancel [--json] JOB [--reason TEXT]\n"
		   "                          publish a backup.cancel to amqp.control_exchange,\n"
		   "                          mandatory and confirmed; 1: no worker is listening\n"
		   "                          (the exchange is missing or no queue is bound);\n"
		   "                          2: an invalid JOB or TEXT\n"
		   "  retry [--json] JOB      publish a failed job again as JOB.rN (for a job\n"
		   "                          X.rK: X.r(K+1)): the accepted body from this host's\n"
		   "                          ledger with only job_id changed; N is one more than\n"
		   "                          the highest .rK of the same base the ledger knows.\n"
		   "                          1: not found, not failed, its reason not retryable,\n"
		   "                          a newer attempt exists, or the new id passes 128\n"
		   "  dlq list [--json] [--max N]\n"
		   "                          the dead-letter queue (amqp.dlq) from its head:\n"
		   "                          position, job_id, size, the last x-death's reason,\n"
		   "                          queue, count and time (at most N messages, 1000)\n"
		   "  dlq show [--json] [--max N] N\n"
		   "                          message N: its properties, headers (x-death), body\n"
		   "  dlq requeue [--json] [--max N] [--job JOB] N\n"
		   "                          republish message N to the exchange and routing key it\n"
		   "                          was first dead-lettered from (x-death; else\n"
		   "                          amqp.jobs_exchange/" CTL_START_KEY "), persistent,\n"
		   "                          mandatory, confirmed, and only then ack it; --job:\n"
		   "                          only if its job_id is JOB. 1: no message N, not JOB;\n"
		   "                          2: unroutable.\n"
		   "                          The dlq commands take the same number of messages\n"
		   "                          from the head (--max, or N when larger) with\n"
		   "                          basic.get and give every other one back in order\n"
		   "                          (nack, requeue): none is lost, even if bw-ctl dies\n"
		   "                          (the broker gives back what it held)\n");
}

/* Reads a whole file (or stdin for "-") into a malloc'd buffer; returns 0 or an errno value. */
int ctl_read_file(const char *path, char **out, size_t *len)
{
	int fd = strcmp(path, "-") == 0 ? STDIN_FILENO : open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	char *buf = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;
	for (;;) {
		if (n == cap) {
			cap = cap ? cap * 2 : 65536;
			char *p = realloc(buf, cap);
			if (p == NULL) {
				rc = ENOMEM;
				break;
			}
			buf = p;
		}
		ssize_t r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			rc = errno;
			break;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	if (fd != STDIN_FILENO)
		close(fd);
	if (rc != 0) {
		free(buf);
		return rc;
	}
	*out = buf;
	*len = n;
	return 0;
}

void ctl_print_verdict(const char *file, const struct bw_verdict *vd, bool verbose)
{
	for (size_t i = 0; i < vd->n; i++) {
		if (verbose)
			printf("%s: %s: %s: %s\n", file, vd->v[i].path, vd->v[i].rule,
			       vd->v[i].message);
		else
			printf("%s: %s: %s\n", file, vd->v[i].path, vd->v[i].rule);
	}
}

/* Validates one file; returns EXIT_VALID, EXIT_INVALID or EXIT_USAGE. */
static int validate_file(const char *file, const struct bw_config *cfg, bool verbose)
{
	char *body = NULL;
	size_t len = 0;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	size_t max = cfg ? (size_t)cfg->job_max_message_bytes : BW_MESSAGE_MAX_BYTES_DEFAULT;
	int status = EXIT_USAGE;

	int rc = ctl_read_file(file, &body, &len);
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: cannot read: %s\n", file, strerror(rc));
		goto out;
	}
	/* with a config, the very check publish makes */
	rc = cfg ? ctl_check_message(body, len, cfg, &spec, &vd)
		 : bw_message_parse(body, len, max, &spec, &vd);
	if (rc == BW_EMESSAGE) {
		ctl_print_verdict(file, vd, verbose);
		status = EXIT_INVALID;
	} else if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: %s\n", file, bw_strerror(rc));
	} else {
		if (verbose)
			printf("%s: ok\n", file);
		status = EXIT_VALID;
	}
out:
	free(body);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return status;
}

static int cmd_validate(int argc, char **argv, const struct bw_config *cfg)
{
	bool verbose = false;
	int opt;
	optind = 1;
	while ((opt = getopt(argc, argv, "+v")) != -1) {
		if (opt != 'v') {
			usage(stderr);
			return EXIT_USAGE;
		}
		verbose = true;
	}
	if (optind >= argc) {
		fprintf(stderr, "bw-ctl: validate: no FILE given\n");
		return EXIT_USAGE;
	}
	int worst = EXIT_VALID;
	for (int i = optind; i < argc; i++) {
		int status = validate_file(argv[i], cfg, verbose);
		if (status > worst)
			worst = status;
	}
	return worst;
}

/* ---- ledger views ------------------------------------------------------------------------- */

static const char *cell(struct json_object *row, const char *key, char *buf, size_t size)
{
	struct json_object *v = NULL;
	if (!json_object_object_get_ex(row, key, &v) || v == NULL)
		return "-";
	if (json_object_is_type(v, json_type_string))
		return json_object_get_string(v);
	snprintf(buf, size, "%s", json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN));
	return buf;
}

const char *ctl_str(struct json_object *o, const char *key)
{
	struct json_object *v = NULL;
	if (o == NULL || !json_object_object_get_ex(o, key, &v) ||
	    !json_object_is_type(v, json_type_string))
		return NULL;
	return json_object_get_string(v);
}

void ctl_print_table(struct json_object *rows, const struct ctl_column *cols, size_t ncols)
{
	size_t width[16] = {0};
	char buf[64];
	size_t n = json_object_array_length(rows);
	for (size_t c = 0; c < ncols && c < 16; c++) {
		width[c] = strlen(cols[c].header);
		for (size_t r = 0; r < n; r++) {
			size_t w = strlen(cell(json_object_array_get_idx(rows, r), cols[c].key, buf,
					       sizeof(buf)));
			if (w > width[c])
				width[c] = w;
		}
	}
	for (size_t c = 0; c < ncols; c++)
		printf("%-*s%s", c + 1 < ncols ? (int)width[c] : 0, cols[c].header,
		       c + 1 < ncols ? "  " : "\n");
	for (size_t r = 0; r < n; r++) {
		struct json_object *row = json_object_array_get_idx(rows, r);
		for (size_t c = 0; c < ncols; c++)
			printf("%-*s%s", c + 1 < ncols ? (int)width[c] : 0,
			       cell(row, cols[c].key, buf, sizeof(buf)), c + 1 < ncols ? "  " : "\n");
	}
}

void ctl_print_json(struct json_object *o)
{
	printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY |
							     JSON_C_TO_STRING_NOSLASHESCAPE));
}

int ctl_ledger_open(const struct bw_config *cfg, struct bw_ledger **l)
{
	*l = NULL;
	int rc = bw_ledger_open_readonly(l, cfg->ledger_path);
	if (rc == BW_ENOENT) {
		*l = NULL;
		return CTL_OK;
	}
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: %s\n", cfg->ledger_path, bw_strerror(rc));
		return CTL_USAGE;
	}
	return CTL_OK;
}

static void print_job(struct json_object *job)
{
	static const char *const fields[] = {"job_id",	"state",      "owner",	    "generation",
					     "attempt", "created_at", "updated_at", "last_error"};
	static const struct ctl_column disk_cols[] = {
		{"key", "DISK"},	  {"state", "STATE"},	     {"port", "PORT"},
		{"nbd_pid", "QEMU-NBD"}, {"export_name", "EXPORT"}, {"qcow2_path", "QCOW2"}};
	static const struct ctl_column history_cols[] = {
		{"at", "AT"}, {"state", "STATE"}, {"owner", "WORKER"}, {"generation", "GEN"}};
	static const struct ctl_column event_cols[] = {{"seq", "SEQ"},
						       {"routing_key", "EVENT"},
						       {"created_at", "CREATED"},
						       {"published_at", "PUBLISHED"},
						       {"attempts", "ATTEMPTS"}};
	char buf[64];
	struct json_object *v;
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
		printf("%-11s %s\n", fields[i], cell(job, fields[i], buf, sizeof(buf)));
	if (json_object_object_get_ex(job, "disks", &v)) {
		printf("\n");
		ctl_print_table(v, disk_cols, 6);
	}
	if (json_object_object_get_ex(job, "history", &v)) {
		printf("\n");
		ctl_print_table(v, history_cols, 4);
	}
	if (json_object_object_get_ex(job, "events", &v)) {
		printf("\n");
		ctl_print_table(v, event_cols, 5);
	}
}

/* What a list command says when the host has no ledger: nothing, exit 0 (CONTRACT §6). */
static void print_no_ledger(const char *cmd, const struct bw_config *cfg, bool json)
{
	if (json)
		printf("[]\n");
	else
		printf("no %s: no worker has run on this host (no ledger at %s)\n", cmd,
		       cfg->ledger_path);
}

static int cmd_ledger(const char *cmd, int argc, char **argv, const struct bw_config *cfg)
{
	static const struct ctl_column job_cols[] = {
		{"job_id", "JOB"},	   {"state", "STATE"},	     {"disk_count", "DISKS"},
		{"owner", "WORKER"},	   {"generation", "GEN"},    {"created_at", "CREATED"},
		{"updated_at", "UPDATED"}, {"last_error", "ERROR"}};
	static const struct ctl_column port_cols[] = {
		{"port", "PORT"},   {"state", "STATE"},	 {"job_id", "JOB"},
		{"disk_key", "DISK"}, {"owner", "WORKER"}, {"until", "UNTIL"}};
	static const struct ctl_column worker_cols[] = {
		{"worker_id", "WORKER"}, {"pid", "PID"},	      {"alive", "ALIVE"},
		{"started_at", "STARTED"}, {"heartbeat_at", "HEARTBEAT"}, {"lock_path", "LOCK"}};
	bool json = false;
	const char *job_id = NULL;
	struct bw_ledger *l = NULL;
	struct json_object *out = NULL;
	int rc;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0)
			json = true;
		else if (strcmp(cmd, "show") == 0 && job_id == NULL && argv[i][0] != '-')
			job_id = argv[i];
		else {
			fprintf(stderr, "bw-ctl: %s: unexpected argument \"%s\"\n", cmd, argv[i]);
			return EXIT_USAGE;
		}
	}
	if (strcmp(cmd, "show") == 0 && job_id == NULL) {
		fprintf(stderr, "bw-ctl: show: no JOB given\n");
		return EXIT_USAGE;
	}
	if ((rc = ctl_ledger_open(cfg, &l)) != CTL_OK)
		return rc;
	if (l == NULL && job_id == NULL) {
		print_no_ledger(cmd, cfg, json);
		return CTL_OK;
	}
	if (l == NULL) {
		fprintf(stderr, "bw-ctl: no job \"%s\": no worker has run on this host (no ledger at %s)\n",
			job_id, cfg->ledger_path);
		return CTL_NO;
	}
	if (strcmp(cmd, "jobs") == 0)
		rc = bw_ledger_list_jobs(l, &out);
	else if (strcmp(cmd, "ports") == 0)
		rc = bw_ledger_list_ports(l, &out);
	else if (strcmp(cmd, "workers") == 0)
		rc = bw_ledger_list_workers(l, &out);
	else
		rc = bw_ledger_show_job(l, job_id, &out);
	if (rc == BW_ENOENT) {
		fprintf(stderr, "bw-ctl: no job \"%s\" in %s\n", job_id, cfg->ledger_path);
	} else if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: %s (%s)\n", cfg->ledger_path, bw_strerror(rc),
			bw_ledger_errmsg(l));
	} else if (json) {
		ctl_print_json(out);
	} else if (strcmp(cmd, "jobs") == 0) {
		ctl_print_table(out, job_cols, 8);
	} else if (strcmp(cmd, "ports") == 0) {
		ctl_print_table(out, port_cols, 6);
	} else if (strcmp(cmd, "workers") == 0) {
		ctl_print_table(out, worker_cols, 6);
	} else {
		print_job(out);
	}
	json_object_put(out);
	bw_ledger_close(l);
	return rc == 0 ? 0 : rc == BW_ENOENT ? EXIT_INVALID : EXIT_USAGE;
}

/* The commands that read the config (the default one when none is named), by name. */
static const struct {
	const char *name;
	int (*run)(int argc, char **argv, const struct bw_config *cfg);
} commands[] = {
	{"publish", ctl_publish}, {"events", ctl_events}, {"cancel", ctl_cancel},
	{"retry", ctl_retry},	  {"dlq", ctl_dlq},	  {"reap", ctl_reap},
	{"verify", ctl_verify},
};

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"set", required_argument, NULL, 's'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *config_path = NULL;
	char **sets = NULL;
	size_t nsets = 0;
	struct bw_config *cfg = NULL;
	int status = EXIT_USAGE;
	int opt;

	bw_log_init("bw-ctl", BW_LOG_WARN, false);
	if (bw_proc_undumpable() != 0) { /* it reads the same config and its secrets */
		bw_log_warn("cannot make the process undumpable");
		return EXIT_USAGE;
	}
	sets = calloc((size_t)argc, sizeof(*sets));
	if (sets == NULL)
		return EXIT_USAGE;
	while ((opt = getopt_long(argc, argv, "+c:s:h", opts, NULL)) != -1) {
		if (cli_config_option(opt, &config_path, sets, &nsets))
			continue;
		switch (opt) {
		case 'h':
			usage(stdout);
			status = 0;
			goto out;
		default:
			usage(stderr);
			goto out;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		goto out;
	}
	const char *cmd = argv[optind];

	bool ledger_cmd = strcmp(cmd, "jobs") == 0 || strcmp(cmd, "ports") == 0 ||
			  strcmp(cmd, "workers") == 0 || strcmp(cmd, "show") == 0;
	int (*run)(int, char **, const struct bw_config *) = NULL;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(cmd, commands[i].name) == 0)
			run = commands[i].run;
	if ((ledger_cmd || run) && config_path == NULL)
		config_path = BW_CONFIG_DEFAULT_PATH;
	if (config_path || nsets) {
		char *errors = NULL;
		int rc = bw_config_load(&cfg, config_path, sets, nsets, &errors);
		if (rc != 0) {
			fprintf(stderr, "%s", errors ? errors : bw_strerror(rc));
			free(errors);
			goto out;
		}
	}

	if (strcmp(cmd, "validate") == 0) {
		status = cmd_validate(argc - optind, argv + optind, cfg);
	} else if (ledger_cmd) {
		status = cmd_ledger(cmd, argc - optind, argv + optind, cfg);
	} else if (run) {
		status = run(argc - optind, argv + optind, cfg);
	} else {
		fprintf(stderr, "bw-ctl: unknown command \"%s\"\n", cmd);
		usage(stderr);
	}
out:
	bw_config_free(cfg);
	free(sets);
	return status;
}
