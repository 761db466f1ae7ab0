/* test_message.c: backup.start validation: the spec it yields, the rules it names, host rules. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "buf.h"
#include "message.h"

static const char example[] =
	"{\"schema_version\":1,\"job_id\":\"bk-2026-11-22-0001\","
	"\"vm\":{\"name\":\"db, \\\"prod\\\" / shard 1\",\"path\":\"/DatabanxDC/vm/pgtest1\","
	"\"id\":\"vm-1234\"},\"backup_type\":\"full\",\"repository_id\":\"repo-001\","
	"\"credential_id\":\"vcenter-main\",\"policy_id\":\"gold\",\"tags\":{\"team\":\"db\"},"
	"\"disks\":[{\"key\":2000,\"size_bytes\":107374182400,\"label\":\"Hard disk 1\"},"
	"{\"key\":2001,\"size_bytes\":5368709120},{\"key\":16000,\"size_bytes\":1073741824}],"
	"\"extra\":{\"x\":1}}";

static struct bw_verdict *reject(const char *body, size_t max)
{
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	assert_int_equal(bw_message_parse(body, strlen(body), max, &spec, &vd), BW_EMESSAGE);
	assert_null(spec);
	assert_non_null(vd);
	return vd;
}

/* The verdict has exactly the given "path: rule" lines, in order. */
static void assert_rules(const struct bw_verdict *vd, const char *const *want)
{
	size_t n = 0;
	for (; want[n]; n++) {
		char got[512];
		assert_true(n < vd->n);
		snprintf(got, sizeof(got), "%s: %s", vd->v[n].path, vd->v[n].rule);
		assert_string_equal(got, want[n]);
	}
	assert_int_equal(vd->n, n);
}

static void test_contract_example(void **state)
{
	(void)state;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	assert_int_equal(bw_message_parse(example, strlen(example), 262144, &spec, &vd), 0);
	assert_null(vd);
	assert_string_equal(spec->job_id, "bk-2026-11-22-0001");
	assert_string_equal(spec->vm_name, "db, \"prod\" / shard 1");
	assert_string_equal(spec->vm_id, "vm-1234");
	assert_int_equal(spec->backup_type, BW_BACKUP_FULL);
	assert_int_equal(spec->n_disks, 3);
	assert_int_equal(spec->disks[0].key, 2000);
	assert_true(spec->disks[0].size_bytes == 107374182400LL);
	assert_string_equal(spec->disks[0].label, "Hard disk 1");
	assert_null(spec->disks[1].label);
	assert_int_equal(spec->disks[2].key, 16000);
	assert_non_null(spec->tags);
	assert_string_equal(spec->unknown_fields, "\"extra\"");
	assert_int_equal(spec->max_duration_s, 0);
	bw_job_spec_free(spec);
}

static void test_every_rule_reported(void **state)
{
	(void)state;
	const char *body =
		"{\"schema_version\":2,\"job_id\":\"-bad:id\",\"vm\":{\"name\":\"a\\u0000\"},"
		"\"backup_type\":\"full\",\"repository_id\":\"\",\"credential_id\":5,"
		"\"tags\":{\"\":\"x\",\"ok\":7},"
		"\"disks\":[{\"key\":2000,\"size_bytes\":1},{\"key\":2000.0,\"size_bytes\":512,"
		"\"parent_path\":\"p.qcow2\"},{\"key\":1.5,\"size_bytes\":512}],\"max_duration_s\":59}";
	struct bw_verdict *vd = reject(body, 262144);
	const char *want[] = {"schema_version: const",
			      "job_id: charset",
			      "vm.name: control_chars",
			      "vm.path: required",
			      "repository_id: min_length",
			      "credential_id: type",
			      "tags[\"\"]: key_min_length",
			      "tags.ok: type",
			      "disks[0].size_bytes: minimum",
			      "disks[0].size_bytes: multiple_of",
			      "disks[1].key: unique",
			      "disks[1].parent_path: forbidden_in_full",
			      "disks[2].key: type",
			      "max_duration_s: minimum",
			      NULL};
	assert_rules(vd, want);
	assert_int_equal(vd->reason, BW_REJECT_INVALID_MESSAGE);
	assert_null(vd->job_id);
	assert_false(vd->vm_valid);
	assert_false(vd->tags_valid);
	assert_true(vd->policy_valid);
	bw_verdict_free(vd);
}

static void test_incremental_rules(void **state)
{
	(void)state;
	const char *body =
		"{\"schema_version\":1,\"job_id\":\"j1\",\"vm\":{\"name\":\"n\",\"path\":\"/p\"},"
		"\"backup_type\":\"incremental\",\"repository_id\":\"r\",\"credential_id\":\"c\","
		"\"disks\":[{\"key\":1,\"size_bytes\":512,\"parent_path\":\"/abs.qcow2\"},"
		"{\"key\":2,\"size_bytes\":512,\"previous_change_id\":\"52 3c/1\"},"
		"{\"key\":3,\"size_bytes\":512,\"parent_path\":\"a/../b\",\"previous_change_id\":\"\"}]}";
	struct bw_verdict *vd = reject(body, 262144);
	const char *want[] = {"disks[0].parent_path: relative_path",
			      "disks[0].previous_change_id: required",
			      "disks[1].parent_path: required",
			      "disks[2].parent_path: relative_path",
			      "disks[2].previous_change_id: min_length",
			      NULL};
	assert_rules(vd, want);
	assert_string_equal(vd->job_id, "j1");
	bw_verdict_free(vd);

	const char *none = "{\"schema_version\":1,\"job_id\":\"j1\",\"vm\":{\"name\":\"n\","
			   "\"path\":\"/p\"},\"backup_type\":\"incremental\",\"repository_id\":"
			   "\"r\",\"credential_id\":\"c\",\"disks\":[{\"key\":1,\"size_bytes\":512}]}";
	vd = reject(none, 262144);
	const char *want2[] = {"disks: incremental_base", NULL};
	assert_rules(vd, want2);
	bw_verdict_free(vd);
}

static void test_document_level(void **state)
{
	(void)state;
	struct bw_verdict *vd = reject(example, 100);
	const char *too_large[] = {"$: too_large", NULL};
	assert_rules(vd, too_large);
	assert_int_equal(vd->reason, BW_REJECT_TOO_LARGE);
	bw_verdict_free(vd);

	vd = reject("{\"job_id\":\"x\",", 262144);
	const char *invalid[] = {"$: invalid_json", NULL};
	assert_rules(vd, invalid);
	assert_int_equal(vd->reason, BW_REJECT_INVALID_JSON);
	assert_null(vd->doc);
	bw_verdict_free(vd);

	vd = reject("[1]", 262144);
	const char *type[] = {"$: type", NULL};
	assert_rules(vd, type);
	assert_int_equal(vd->reason, BW_REJECT_INVALID_MESSAGE);
	bw_verdict_free(vd);
}

/*
 * Starts a full job "job" with schema_version sv in b: every field but "disks", then
 * "disks":[ for the caller to go on; tags (a JSON object) when not NULL.
 */
static void job_head(struct bw_buf *b, const char *job, int sv, const char *tags)
{
	bw_buf_printf(b,
		      "{\"schema_version\":%d,\"job_id\":\"%s\",\"vm\":{\"name\":\"n\",\"path\":"
		      "\"/p\"},\"backup_type\":\"full\",\"repository_id\":\"r\",\"credential_id\":"
		      "\"c\",%s%s%s\"disks\":[",
		      sv, job, tags ? "\"tags\":" : "", tags ? tags : "", tags ? "," : "");
}

/* Ends what b holds with tail; returns it (malloc'd). */
static char *job_end(struct bw_buf *b, const char *tail)
{
	char *out = NULL;
	bw_buf_puts(b, tail);
	assert_false(b->failed);
	assert_int_equal(bw_buf_steal(b, &out), 0);
	return out;
}

/* A full job "job" of n copies of disk, with schema_version sv and tags; malloc'd. */
static char *many_disks(const char *job, int sv, const char *tags, const char *disk, size_t n)
{
	struct bw_buf b = BW_BUF_INIT;
	job_head(&b, job, sv, tags);
	for (size_t i = 0; i < n; i++)
		bw_buf_printf(&b, "%s%s", i ? "," : "", disk);
	return job_end(&b, "]}");
}

static void assert_entry(const struct bw_verdict *vd, size_t i, const char *want)
{
	char got[512];
	assert_true(i < vd->n);
	snprintf(got, sizeof(got), "%s: %s", vd->v[i].path, vd->v[i].rule);
	assert_string_equal(got, want);
}

/* CONTRACT §2: at most 100 errors, then one "$: truncated" saying how many more. */
static void test_bounded_verdict(void **state)
{
	(void)state;
	/* 3 rules each: key minimum, size_bytes minimum and multiple_of */
	const char *bad = "{\"key\":0,\"size_bytes\":1}";

	/* 1 + 33 * 3 = 100: listed in full, no truncated entry */
	char *body = many_disks("bk-1", 2, "{}", bad, 33);
	struct bw_verdict *vd = reject(body, 262144);
	assert_int_equal(vd->n, 100);
	assert_entry(vd, 0, "schema_version: const");
	assert_entry(vd, 99, "disks[32].size_bytes: multiple_of");
	bw_verdict_free(vd);
	free(body);

	/* 101: the last one checked is left out and counted exactly (nothing stopped early) */
	body = many_disks("bk:1", 2, "{}", bad, 33);
	vd = reject(body, 262144);
	assert_int_equal(vd->n, 101);
	assert_entry(vd, 1, "job_id: charset");
	assert_entry(vd, 99, "disks[32].size_bytes: minimum");
	assert_entry(vd, 100, "$: truncated");
	assert_string_equal(vd->v[100].message,
			    "only the first 100 violations are listed: 1 more left out");
	assert_int_equal(vd->reason, BW_REJECT_INVALID_MESSAGE);
	assert_null(vd->job_id);
	bw_verdict_free(vd);
	free(body);

	/* 90,000 empty disks (180,001 broken rules): the walk stops at disks[50] */
	body = many_disks("bk-1", 1, "{}", "{}", 90000);
	vd = reject(body, 32u << 20);
	assert_int_equal(vd->n, 101);
	assert_entry(vd, 0, "disks: max_items");
	assert_entry(vd, 1, "disks[0].key: required");
	assert_entry(vd, 99, "disks[49].key: required");
	assert_entry(vd, 100, "$: truncated");
	assert_non_null(
	    strstr(vd->v[100].message, "1 more found before the check stopped at disks[50]"));
	assert_string_equal(vd->job_id, "bk-1");
	assert_true(vd->vm_valid);
	bw_verdict_free(vd);
	free(body);

	/* 200,000 empty disks: more values than any message holds, refused before a tree is
	 * built (BW_JSON_MAX_VALUES) */
	body = many_disks("bk-1", 1, "{}", "{}", 200000);
	vd = reject(body, 32u << 20);
	assert_int_equal(vd->reason, BW_REJECT_INVALID_JSON);
	assert_int_equal(vd->n, 1);
	assert_non_null(strstr(vd->v[0].message, "more than 100000 values"));
	bw_verdict_free(vd);
	free(body);

	/* 300 tags of the wrong type: the tags walk stops too, and tags are not echoed */
	struct bw_buf t = BW_BUF_INIT;
	char *tags = NULL;
	bw_buf_puts(&t, "{");
	for (int i = 0; i < 300; i++)
		bw_buf_printf(&t, "%s\"t%03d\":%d", i ? "," : "", i, i);
	bw_buf_puts(&t, "}");
	assert_int_equal(bw_buf_steal(&t, &tags), 0);
	body = many_disks("bk-1", 1, tags, "{\"key\":1,\"size_bytes\":512}", 1);
	vd = reject(body, 262144);
	assert_int_equal(vd->n, 101);
	assert_entry(vd, 0, "tags: max_properties");
	assert_entry(vd, 99, "tags.t098: type");
	assert_entry(vd, 100, "$: truncated");
	assert_non_null(strstr(vd->v[100].message, "stopped at tags.t100"));
	assert_false(vd->tags_valid);
	bw_verdict_free(vd);
	free(body);
	free(tags);
}

/* A repeated disk key names the first disk that has it, however many disks come between. */
static void test_duplicate_keys(void **state)
{
	(void)state;
	const char *three = "{\"schema_version\":1,\"job_id\":\"j\",\"vm\":{\"name\":\"n\","
			    "\"path\":\"/p\"},\"backup_type\":\"full\",\"repository_id\":\"r\","
			    "\"credential_id\":\"c\",\"disks\":[{\"key\":7,\"size_bytes\":512},"
			    "{\"key\":0,\"size_bytes\":512},{\"key\":7.0,\"size_bytes\":512},"
			    "{\"key\":7,\"size_bytes\":512},{\"key\":0,\"size_bytes\":512}]}";
	struct bw_verdict *vd = reject(three, 262144);
	const char *want[] = {"disks[1].key: minimum", "disks[2].key: unique",
			      "disks[3].key: unique", "disks[4].key: minimum", NULL};
	assert_rules(vd, want);
	assert_string_equal(vd->v[1].message, "disk key 7 is already used by disks[0]");
	assert_string_equal(vd->v[2].message, "disk key 7 is already used by disks[0]");
	bw_verdict_free(vd);

	/* 30,000 disks, keys 1..15000 twice: disks[15000+i] repeats disks[i] */
	struct bw_buf b = BW_BUF_INIT;
	job_head(&b, "j", 1, NULL);
	for (int i = 0; i < 30000; i++)
		bw_buf_printf(&b, "%s{\"key\":%d,\"size_bytes\":512}", i ? "," : "", i % 15000 + 1);
	char *body = job_end(&b, "]}");
	vd = reject(body, 4u << 20);
	assert_int_equal(vd->n, 101);
	assert_entry(vd, 0, "disks: max_items");
	assert_entry(vd, 1, "disks[15000].key: unique");
	assert_string_equal(vd->v[1].message, "disk key 1 is already used by disks[0]");
	assert_entry(vd, 99, "disks[15098].key: unique");
	assert_string_equal(vd->v[99].message, "disk key 99 is already used by disks[98]");
	assert_entry(vd, 100, "$: truncated");
	bw_verdict_free(vd);
	free(body);
}

/*
 * Repeats planted across the blocks the walk classifies disks in (64, 128, 256, 512...):
 * each must name the first disk with its key, even when an earlier repeat sits between.
 */
static void test_duplicate_keys_across_blocks(void **state)
{
	(void)state;
	static const struct {
		size_t at, repeats; /* disks[at] gets the key of disks[repeats] */
		size_t first;	    /* the disk the message must name */
	} plant[] = {{64, 63, 63},    {127, 64, 63}, {128, 0, 0},     {300, 127, 63},
		     {511, 510, 510}, {512, 5, 5},   {1000, 300, 63}, {1999, 1500, 1500}};
	int64_t keys[2000];
	for (size_t i = 0; i < 2000; i++)
		keys[i] = 1000000 + (int64_t)((i * 7919) % 2000) * 3; /* distinct, unordered */
	for (size_t p = 0; p < sizeof(plant) / sizeof(plant[0]); p++)
		keys[plant[p].at] = keys[plant[p].repeats];

	struct bw_buf b = BW_BUF_INIT;
	job_head(&b, "j", 1, NULL);
	for (size_t i = 0; i < 2000; i++)
		bw_buf_printf(&b, "%s{\"key\":%" PRId64 "%s,\"size_bytes\":512}", i ? "," : "",
			      keys[i], i == 512 ? ".0" : "");
	char *body = job_end(&b, "]}");
	struct bw_verdict *vd = reject(body, 262144);
	size_t n_plant = sizeof(plant) / sizeof(plant[0]);
	assert_int_equal(vd->n, 1 + n_plant);
	assert_entry(vd, 0, "disks: max_items");
	for (size_t p = 0; p < n_plant; p++) {
		char path[64], msg[128];
		snprintf(path, sizeof(path), "disks[%zu].key: unique", plant[p].at);
		snprintf(msg, sizeof(msg), "disk key %" PRId64 " is already used by disks[%zu]",
			 keys[plant[p].at], plant[p].first);
		assert_entry(vd, 1 + p, path);
		assert_string_equal(vd->v[1 + p].message, msg);
	}
	bw_verdict_free(vd);
	free(body);
}

/* The ignored-fields list of a valid spec is bounded and says how many it left out. */
static void test_unknown_fields_bounded(void **state)
{
	(void)state;
	struct bw_buf b = BW_BUF_INIT;
	job_head(&b, "j", 1, NULL);
	bw_buf_puts(&b, "{\"key\":1,\"size_bytes\":512}]");
	for (int i = 0; i < 5000; i++)
		bw_buf_printf(&b, ",\"x_%04d\":%d", i, i);
	char *body = job_end(&b, "}");

	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	assert_int_equal(bw_message_parse(body, strlen(body), 262144, &spec, &vd), 0);
	const char *u = spec->unknown_fields;
	assert_true(strlen(u) < 4096 + 64);
	assert_memory_equal(u, "\"x_0000\", \"x_0001\"", 18);
	size_t listed = 1, more = 0;
	for (const char *p = u; (p = strstr(p, ", \"")) != NULL; p++)
		listed++;
	const char *tail = strstr(u, ", and ");
	assert_non_null(tail);
	assert_int_equal(sscanf(tail, ", and %zu more", &more), 1);
	assert_int_equal(listed + more, 5000);
	bw_job_spec_free(spec);
	free(body);
}

static void write_file(const char *path, const void *data, size_t n, mode_t mode)
{
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, n, f), n);
	fclose(f);
	chmod(path, mode);
}

static void test_host_rules(void **state)
{
	(void)state;
	char dir[] = "/tmp/bw-test-host-XXXXXX";
	char path[PATH_MAX], conf[PATH_MAX], set_repo[PATH_MAX], set_cred[PATH_MAX];
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/repo", dir);
	assert_int_equal(mkdir(path, 0700), 0);
	snprintf(path, sizeof(path), "%s/repo/vm", dir);
	assert_int_equal(mkdir(path, 0700), 0);
	snprintf(path, sizeof(path), "%s/creds", dir);
	assert_int_equal(mkdir(path, 0700), 0);
	snprintf(path, sizeof(path), "%s/creds/vc.json", dir);
	write_file(path, "{}", 2, 0600);
	snprintf(path, sizeof(path), "%s/repo/vm/raw.img", dir);
	write_file(path, "RAW!", 4, 0640);
	snprintf(path, sizeof(path), "%s/repo/vm/cut.qcow2", dir);
	write_file(path, "QFI\xfb\0\0\0\3", 8, 0640); /* the magic, then nothing */
	snprintf(path, sizeof(path), "%s/repo/vm/escape.qcow2", dir);
	assert_int_equal(symlink("../../outside.qcow2", path), 0);
	/* real images: a parent, chains leaving the repository, with a raw backing, a loop */
	char cmd[4096];
	snprintf(cmd, sizeof(cmd),
		 "cd '%s' && qemu-img create -q -f qcow2 outside.qcow2 1M && cd repo/vm && "
		 "qemu-img create -q -f qcow2 parent.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -b parent.qcow2 -F qcow2 inc.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -u -b ../../outside.qcow2 -F qcow2 out.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -u -b '%s/outside.qcow2' -F qcow2 abs.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -u -b raw.img -F raw on-raw.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -u -b 'nbd://127.0.0.1:10809/x' -F qcow2 nbd.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -u -b loop2.qcow2 -F qcow2 loop1.qcow2 1M && "
		 "qemu-img create -q -f qcow2 -u -b loop1.qcow2 -F qcow2 loop2.qcow2 1M && "
		 "mkfifo fifo.qcow2",
		 dir, dir);
	assert_int_equal(system(cmd), 0);

	snprintf(set_repo, sizeof(set_repo), "repositories.repo-001=%s/repo", dir);
	snprintf(set_cred, sizeof(set_cred), "credentials.dir=%s/creds", dir);
	char *sets[] = {set_repo, set_cred};
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, sets, 2, &errors), 0);
	(void)conf;

	const char *fmt = "{\"schema_version\":1,\"job_id\":\"j\",\"vm\":{\"name\":\"n\","
			  "\"path\":\"/p\"},\"backup_type\":\"incremental\",\"repository_id\":"
			  "\"%s\",\"credential_id\":\"%s\",\"disks\":["
			  "{\"key\":1,\"size_bytes\":512,\"parent_path\":\"vm/parent.qcow2\","
			  "\"previous_change_id\":\"c\"},"
			  "{\"key\":2,\"size_bytes\":512,\"parent_path\":\"%s\","
			  "\"previous_change_id\":\"c\"}]}";
	struct {
		const char *repo, *cred, *parent;
		enum bw_reject_reason reason;
		const char *rule;
	} cases[] = {
		{"repo-001", "vc", "vm/parent.qcow2", BW_REJECT_NONE, NULL},
		{"repo-002", "vc", "vm/parent.qcow2", BW_REJECT_UNKNOWN_REPOSITORY,
		 "repository_id: unknown_repository"},
		{"repo-001", "nope", "vm/parent.qcow2", BW_REJECT_UNKNOWN_CREDENTIAL,
		 "credential_id: unknown_credential"},
		{"repo-001", "vc", "vm/missing.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: not_found"},
		{"repo-001", "vc", "vm/raw.img", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: not_qcow2"},
		{"repo-001", "vc", "vm/escape.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: outside_repository"},
		{"repo-001", "vc", "vm", BW_REJECT_INVALID_PARENT, "disks[1].parent_path: not_found"},
		{"repo-001", "vc", "vm/fifo.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: not_found"},
		{"repo-001", "vc", "vm/inc.qcow2", BW_REJECT_NONE, NULL},
		{"repo-001", "vc", "vm/out.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: outside_repository"},
		{"repo-001", "vc", "vm/abs.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: outside_repository"},
		{"repo-001", "vc", "vm/on-raw.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: backing_format_not_qcow2"},
		{"repo-001", "vc", "vm/nbd.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: backing_protocol"},
		{"repo-001", "vc", "vm/loop1.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: chain_loop"},
		{"repo-001", "vc", "vm/cut.qcow2", BW_REJECT_INVALID_PARENT,
		 "disks[1].parent_path: bad_header"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char body[1024];
		snprintf(body, sizeof(body), fmt, cases[i].repo, cases[i].cred, cases[i].parent);
		struct bw_job_spec *spec = NULL;
		struct bw_verdict *vd = NULL;
		assert_int_equal(bw_message_parse(body, strlen(body), 262144, &spec, &vd), 0);
		int rc = bw_message_check_host(spec, cfg, &vd);
		if (cases[i].reason == BW_REJECT_NONE) {
			assert_int_equal(rc, 0);
		} else {
			assert_int_equal(rc, BW_EMESSAGE);
			assert_int_equal(vd->reason, cases[i].reason);
			assert_non_null(vd->job_id); /* CONTRACT §4: the message's job_id */
			assert_string_equal(vd->job_id, "j");
			assert_int_equal(vd->n, 1);
			char got[256];
			snprintf(got, sizeof(got), "%s: %s", vd->v[0].path, vd->v[0].rule);
			assert_string_equal(got, cases[i].rule);
		}
		bw_verdict_free(vd);
		bw_job_spec_free(spec);
	}

	/* every bad parent gets its own violation, in disk order, with its own rule */
	const char *two = "{\"schema_version\":1,\"job_id\":\"j\",\"vm\":{\"name\":\"n\","
			  "\"path\":\"/p\"},\"backup_type\":\"incremental\",\"repository_id\":"
			  "\"repo-001\",\"credential_id\":\"vc\",\"disks\":["
			  "{\"key\":1,\"size_bytes\":512,\"parent_path\":\"vm/out.qcow2\","
			  "\"previous_change_id\":\"c\"},"
			  "{\"key\":2,\"size_bytes\":512,\"parent_path\":\"vm/inc.qcow2\","
			  "\"previous_change_id\":\"c\"},"
			  "{\"key\":3,\"size_bytes\":512,\"parent_path\":\"vm/loop2.qcow2\","
			  "\"previous_change_id\":\"c\"}]}";
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	assert_int_equal(bw_message_parse(two, strlen(two), 262144, &spec, &vd), 0);
	assert_int_equal(bw_message_check_host(spec, cfg, &vd), BW_EMESSAGE);
	assert_int_equal(vd->reason, BW_REJECT_INVALID_PARENT);
	assert_int_equal(vd->n, 2);
	assert_string_equal(vd->v[0].path, "disks[0].parent_path");
	assert_string_equal(vd->v[0].rule, "outside_repository");
	assert_non_null(strstr(vd->v[0].message, "outside.qcow2"));
	assert_string_equal(vd->v[1].path, "disks[2].parent_path");
	assert_string_equal(vd->v[1].rule, "chain_loop");
	bw_verdict_free(vd);
	bw_job_spec_free(spec);

	bw_config_free(cfg);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_contract_example),
	    cmocka_unit_test(test_every_rule_reported),
	    cmocka_unit_test(test_incremental_rules),
	    cmocka_unit_test(test_document_level),
	    cmocka_unit_test(test_bounded_verdict),
	    cmocka_unit_test(test_duplicate_keys),
	    cmocka_unit_test(test_duplicate_keys_across_blocks),
	    cmocka_unit_test(test_unknown_fields_bounded),
	    cmocka_unit_test(test_host_rules),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
