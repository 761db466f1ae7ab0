/* ledger_fixture.c: fills a ledger with one job of two disks holding ports (and, with "failed",
 * failed jobs for bw-ctl retry), then holds its worker lock. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ledger.h"

/* A job of one disk claimed and then failed with reason, its backup.failed at seq 2. */
static int failed_job(struct bw_ledger *l, const char *job_id, const char *reason)
{
	char msg[512], acc_id[200], fail_id[200], fail_body[200], export[200], path[300];
	snprintf(msg, sizeof(msg),
		 "{\"schema_version\":1,\"job_id\":\"%s\",\"vm\":{\"name\":\"v\",\"path\":\"/v\"},"
		 "\"backup_type\":\"full\",\"repository_id\":\"repo-001\",\"credential_id\":\"c\","
		 "\"disks\":[{\"key\":2000,\"size_bytes\":1048576}]}",
		 job_id);
	snprintf(acc_id, sizeof(acc_id), "%s/backup.accepted", job_id);
	snprintf(fail_id, sizeof(fail_id), "%s/backup.failed", job_id);
	snprintf(fail_body, sizeof(fail_body), "{\"event\":\"backup.failed\",\"reason\":\"%s\"}",
		 reason);
	snprintf(export, sizeof(export), "%s-2000", job_id);
	snprintf(path, sizeof(path), "/repo/vm/2000/%s.qcow2", job_id);
	struct bw_job_disk_new disk = {2000, export, path};
	struct bw_event accepted = {acc_id, "backup.accepted", 1, "{}"};
	struct bw_event failed = {fail_id, "backup.failed", 2, fail_body};
	int64_t gen = 0;
	if (bw_ledger_claim(l, job_id, msg, &disk, 1, &accepted, &gen, NULL) != 0)
		return -1;
	struct bw_fence f = {job_id, gen};
	if (reason == NULL)
		return 0;
	return bw_ledger_transition(l, &f, BW_JOB_FAILED, reason, &failed, 1);
}

int main(int argc, char **argv)
{
	if (argc != 3 && !(argc == 4 && strcmp(argv[3], "failed") == 0)) {
		fprintf(stderr, "usage: ledger_fixture LEDGER LOCKDIR [failed]\n");
		return 2;
	}
	struct bw_ledger *l = NULL;
	struct bw_job_disk_new disks[2] = {{2000, "bk-1-2000", "/repo/vm/2000/bk-1.qcow2"},
					   {16000, "bk-1-16000", "/repo/vm/16000/bk-1.qcow2"}};
	struct bw_event accepted = {"bk-1/backup.accepted", "backup.accepted", 1, "{}"};
	int64_t gen = 0, keys[2] = {2000, 16000};
	int ports[2];
	if (bw_ledger_open(&l, argv[1], 10100, 10110) != 0 ||
	    bw_ledger_register(l, "fixture-w1", argv[2]) != 0 ||
	    bw_ledger_claim(l, "bk-1", "{\"job_id\":\"bk-1\"}", disks, 2, &accepted, &gen, NULL) != 0)
		return 1;
	struct bw_fence f = {"bk-1", gen};
	if (bw_ledger_transition(l, &f, BW_JOB_RESERVED, NULL, NULL, 0) != 0 ||
	    bw_ledger_reserve(l, &f, keys, 2, ports) != 0)
		return 1;
	/* bk-2 cancelled (no retry helps), bk-3 sna_failed with a newer attempt bk-3.r1 */
	if (argc == 4 && (failed_job(l, "bk-2", "cancelled") != 0 ||
			  failed_job(l, "bk-3", "sna_failed") != 0 || failed_job(l, "bk-3.r1", NULL) != 0))
		return 1;
	printf("ready %d %d\n", ports[0], ports[1]);
	fflush(stdout);
	/* Hold the worker lock until stdin closes, so bw-ctl workers shows it alive. */
	char c;
	while (read(0, &c, 1) > 0)
		;
	bw_ledger_close(l);
	return 0;
}
