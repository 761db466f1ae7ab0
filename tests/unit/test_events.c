/* test_events.c: events built by common/events hold to schemas/events (checked by python3-jsonschema). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "events.h"
#include "../testutil.h"

static void save(const char *name, const char *body)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s.json", bw_test_dir, name);
	assert_int_equal(bw_test_write_file(path, body, 0644), 0);
}

static const char *msg_incremental =
	"{\"schema_version\":1,\"job_id\":\"bk-1\",\"vm\":{\"name\":\"db, \\\"prod\\\" "
	"/ shard 1\",\"path\":\"/DC/vm/db\",\"id\":\"vm-7\"},\"backup_type\":\"incremental\","
	"\"repository_id\":\"r\",\"credential_id\":\"c\",\"policy_id\":\"gold\","
	"\"tags\":{\"team\":\"db\"},\"disks\":[{\"key\":2000,\"size_bytes\":512,"
	"\"parent_path\":\"x/2000/bk-0.qcow2\",\"previous_change_id\":\"52 3c/3\"},"
	"{\"key\":2001,\"size_bytes\":1024}]}";

/* Saves a built event under name and frees it. */
static void save_event(const char *name, struct bw_event_text *e)
{
	save(name, e->body);
	bw_event_text_free(e);
}

static void test_every_builder(void **state)
{
	(void)state;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	assert_int_equal(bw_message_parse(msg_incremental, strlen(msg_incremental), 262144, &spec, &vd), 0);
	struct bw_event_ctx c = {spec, "hub1", "hub1-42"};
	struct bw_event_text e;

	assert_int_equal(bw_event_accepted(&c, &e), 0);
	assert_string_equal(e.event_id, "bk-1/backup.accepted");
	assert_string_equal(e.name, "backup.accepted");
	assert_int_equal(e.seq, 1);
	assert_non_null(strstr(e.body, "\"vm\":{\"name\":\"db, \\\"prod\\\" / shard 1\""));
	assert_non_null(strstr(e.body, "\"tags\":{\"team\":\"db\"}"));
	assert_non_null(strstr(e.body, "\"backup_type\":\"incremental\",\"disk_count\":2"));
	save_event("accepted", &e);

	struct bw_event_started_disk sd[2] = {
		{2000, 10100, "bk-1-2000", "nbd://127.0.0.1:10100/bk-1-2000", "/repo/x/2000/bk-1.qcow2",
		 4242, "x/2000/bk-0.qcow2"},
		{2001, 10101, "bk-1-2001", "nbd://127.0.0.1:10101/bk-1-2001", "/repo/x/2001/bk-1.qcow2",
		 4243, NULL},
	};
	assert_int_equal(bw_event_started(&c, 2, "sna-77", "2000:nbd://127.0.0.1:10100/bk-1-2000,"
				       "2001:nbd://127.0.0.1:10101/bk-1-2001", sd, 2, &e), 0);
	assert_string_equal(e.event_id, "bk-1/backup.started");
	assert_non_null(strstr(e.body, "\"mode\":\"incremental\""));
	assert_non_null(strstr(e.body, "\"mode\":\"full\""));
	save_event("started", &e);

	/* sums saturate instead of wrapping; percent stays within 0-100 */
	struct bw_event_progress_disk pd[2] = {{2000, BW_SNA_RUNNING, INT64_MAX, INT64_MAX},
					       {2001, BW_SNA_PENDING, INT64_MAX, 5}};
	assert_int_equal(bw_event_progress(&c, 3, pd, 2, &e), 0);
	assert_string_equal(e.event_id, "bk-1/backup.progress/3");
	assert_non_null(strstr(e.body, "\"bytes_transferred\":9223372036854775807,\"total_bytes\":"
				       "9223372036854775807"));
	assert_non_null(strstr(e.body, "\"percent\":100"));
	save_event("progress-saturated", &e);

	struct bw_disk_result r[2] = {{2000, "/repo/x/2000/bk-1.qcow2", "52 3c/4", 512, 196608},
				      {2001, "/repo/x/2001/bk-1.qcow2", "52 3d/1", 1024, 196608}};
	assert_int_equal(bw_event_disk_completed(&c, 4, &r[0], &e), 0);
	assert_string_equal(e.event_id, "bk-1/backup.disk.completed/2000");
	char change[64];
	int64_t vs = 0, as = 0;
	assert_int_equal(bw_event_disk_completed_read(e.body, change, sizeof(change), &vs, &as), 0);
	assert_string_equal(change, "52 3c/4");
	assert_int_equal(vs, 512);
	assert_int_equal(as, 196608);
	assert_int_equal(bw_event_disk_completed_read("{\"change_id\":7}", change, sizeof(change),
						      &vs, &as), BW_EJSON);
	assert_int_equal(bw_event_disk_completed_read("not json", change, sizeof(change), &vs, &as),
			 BW_EJSON);
	save_event("disk-completed", &e);
	assert_int_equal(bw_event_completed(&c, 5, 1234, r, 2, &e), 0);
	save_event("completed", &e);

	/* every reason, with its retryable, against the schema's list */
	struct bw_event_failed_disk fd[2] = {{2000, BW_DISK_COMPLETED, NULL},
					     {2001, BW_DISK_FAILED, "the SNA reported this disk failed"}};
	enum bw_fail_reason reasons[] = {
#define R(name, text, retryable) BW_FAIL_##name,
		BW_FAIL_REASON_MAP(R)
#undef R
	};
	for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++) {
		assert_int_equal(bw_event_failed(&c, 5, BW_JOB_FINALIZING, reasons[i], "it failed", fd,
						 2, &e), 0);
		assert_non_null(strstr(e.body, bw_fail_reason_name(reasons[i])));
		char name[64];
		snprintf(name, sizeof(name), "failed-%s", bw_fail_reason_name(reasons[i]));
		save_event(name, &e);
	}
	assert_false(bw_fail_reason_retryable(BW_FAIL_SNA_REJECTED));
	assert_true(bw_fail_reason_retryable(BW_FAIL_SNA_FAILED));

	/* a failed action is pending; a done one is not */
	struct bw_cleanup_action a[3] = {
		{BW_ACTION_QEMU_NBD_STOPPED, 2001, 0, 4243, NULL, true, NULL},
		{BW_ACTION_QCOW2_KEPT, 2000, 0, 0, "/repo/x/2000/bk-1.qcow2", true, NULL},
		{BW_ACTION_SNA_CLEANUP_REQUESTED, 0, 0, 0, NULL, false, "HTTP 500"},
	};
	assert_int_equal(bw_event_cleanup(&c, 7, a, 3, &e), 0);
	assert_non_null(strstr(e.body, "\"pending\":[{\"kind\":\"sna_cleanup_requested\","
				       "\"error\":\"HTTP 500\"}]"));
	save_event("cleanup", &e);
	assert_int_equal(bw_event_cleanup(&c, 7, NULL, 0, &e), 0);
	assert_non_null(strstr(e.body, "\"actions\":[],\"pending\":[]"));
	save_event("cleanup-empty", &e);
	bw_job_spec_free(spec);
}

/* Every invalid corpus message yields a schema-valid backup.rejected. */
static void test_rejected_for_the_whole_corpus(void **state)
{
	(void)state;
	DIR *d = opendir(BW_SOURCE_DIR "/tests/data/messages");
	assert_non_null(d);
	struct dirent *ent;
	int n = 0;
	while ((ent = readdir(d)) != NULL) {
		if (strncmp(ent->d_name, "invalid-", 8) != 0 || !strstr(ent->d_name, ".json"))
			continue;
		char path[PATH_MAX];
		snprintf(path, sizeof(path), "%s/tests/data/messages/%s", BW_SOURCE_DIR, ent->d_name);
		FILE *f = fopen(path, "rb");
		assert_non_null(f);
		static char raw[1 << 20];
		size_t len = fread(raw, 1, sizeof(raw), f);
		fclose(f);
		struct bw_job_spec *spec = NULL;
		struct bw_verdict *vd = NULL;
		assert_int_equal(bw_message_parse(raw, len, 262144, &spec, &vd), BW_EMESSAGE);
		char *body = NULL, *id = NULL;
		assert_int_equal(bw_event_rejected(raw, len, vd, "hub1", "hub1-42", &body, &id), 0);
		assert_int_equal(strncmp(id, "rejected/", 9), 0);
		assert_int_equal(strlen(id), 9 + 16);
		char name[300];
		snprintf(name, sizeof(name), "rejected-%s", ent->d_name);
		name[strlen(name) - 5] = '\0';
		save(name, body);
		free(body);
		free(id);
		bw_verdict_free(vd);
		n++;
	}
	closedir(d);
	assert_true(n > 100);
}

static void test_all_valid_against_schemas(void **state)
{
	(void)state;
	char cmd[PATH_MAX];
	snprintf(cmd, sizeof(cmd),
		 "/usr/bin/python3 %s/tests/schema/validate_events.py %s | tail -3", BW_SOURCE_DIR,
		 bw_test_dir);
	assert_int_equal(system(cmd), 0);
	snprintf(cmd, sizeof(cmd),
		 "/usr/bin/python3 %s/tests/schema/validate_events.py %s >/dev/null", BW_SOURCE_DIR,
		 bw_test_dir);
	assert_int_equal(system(cmd), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_every_builder),
		cmocka_unit_test(test_rejected_for_the_whole_corpus),
		cmocka_unit_test(test_all_valid_against_schemas),
	};
	return cmocka_run_group_tests(tests, bw_test_scratch_setup, bw_test_scratch_teardown);
}
