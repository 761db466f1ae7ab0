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

static char out_dir[64];

static void save(const char *name, const char *body)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s.json", out_dir, name);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(body, f);
	fclose(f);
}

static void test_accepted_has_the_envelope(void **state)
{
	(void)state;
	const char *msg = "{\"schema_version\":1,\"job_id\":\"bk-1\",\"vm\":{\"name\":\"db, \\\"prod\\\" "
			  "/ shard 1\",\"path\":\"/DC/vm/db\"},\"backup_type\":\"full\","
			  "\"repository_id\":\"r\",\"credential_id\":\"c\",\"policy_id\":\"gold\","
			  "\"tags\":{\"team\":\"db\"},\"disks\":[{\"key\":2000,\"size_bytes\":512}]}";
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	assert_int_equal(bw_message_parse(msg, strlen(msg), 262144, &spec, &vd), 0);
	struct json_object *vm = bw_event_vm(spec);
	struct bw_event_ctx c = {spec->job_id, "hub1", "hub1-42", vm, spec->policy_id, spec->tags};
	struct json_object *e = bw_event_begin(&c, "backup.accepted", 1, NULL);
	json_object_object_add(e, "backup_type", json_object_new_string("full"));
	json_object_object_add(e, "disk_count", json_object_new_int(1));
	char *body = NULL, *id = NULL;
	assert_int_equal(bw_event_finish(e, &body, &id), 0);
	assert_string_equal(id, "bk-1/backup.accepted");
	assert_non_null(strstr(body, "\"vm\":{\"name\":\"db, \\\"prod\\\" / shard 1\""));
	assert_non_null(strstr(body, "\"tags\":{\"team\":\"db\"}"));
	save("accepted", body);
	free(body);
	free(id);

	e = bw_event_begin(&c, "backup.disk.completed", 7, "2000");
	json_object_object_add(e, "key", json_object_new_int(2000));
	json_object_object_add(e, "qcow2_path", json_object_new_string("/repo/x/2000/bk-1.qcow2"));
	json_object_object_add(e, "change_id", json_object_new_string("52 3c 5f 1a/4"));
	json_object_object_add(e, "virtual_size", json_object_new_int64(512));
	json_object_object_add(e, "actual_size", json_object_new_int64(196608));
	json_object_object_add(e, "check", json_object_new_string("ok"));
	assert_int_equal(bw_event_finish(e, &body, &id), 0);
	assert_string_equal(id, "bk-1/backup.disk.completed/2000");
	save("disk-completed", body);
	free(body);
	free(id);
	json_object_put(vm);
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
	snprintf(cmd, sizeof(cmd), "/usr/bin/python3 %s/tests/schema/validate_events.py %s | tail -3",
		 BW_SOURCE_DIR, out_dir);
	assert_int_equal(system(cmd), 0);
	snprintf(cmd, sizeof(cmd), "/usr/bin/python3 %s/tests/schema/validate_events.py %s >/dev/null",
		 BW_SOURCE_DIR, out_dir);
	assert_int_equal(system(cmd), 0);
}

static int setup(void **state)
{
	(void)state;
	return bw_test_mkdir(out_dir, sizeof(out_dir), "events") ? 0 : -1;
}

static int teardown(void **state)
{
	(void)state;
	return bw_test_rmdir(out_dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_accepted_has_the_envelope),
		cmocka_unit_test(test_rejected_for_the_whole_corpus),
		cmocka_unit_test(test_all_valid_against_schemas),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
