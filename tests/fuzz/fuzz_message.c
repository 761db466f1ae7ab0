/* fuzz_message.c: libFuzzer target for the backup.start parse+validate path, with invariants. */
#include "message.h"
#include "text.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* What a valid spec promises its users; a broken promise is a crash for the fuzzer. */
static void check_spec(const struct bw_job_spec *s)
{
	if (!s->job_id || !bw_text_is_safe_id(s->job_id, strlen(s->job_id)) ||
	    strlen(s->job_id) > 128)
		abort();
	if (!s->vm_name || !s->vm_path || !s->repository_id || !s->credential_id)
		abort();
	if (bw_text_has_control(s->vm_name, strlen(s->vm_name)))
		abort();
	if (s->n_disks < 1 || s->n_disks > BW_MESSAGE_MAX_DISKS)
		abort();
	bool base = false;
	for (size_t i = 0; i < s->n_disks; i++) {
		const struct bw_disk_spec *d = &s->disks[i];
		if (d->key < 1 || d->key > 2147483647 || d->size_bytes < 512 ||
		    d->size_bytes > BW_DISK_SIZE_MAX || d->size_bytes % 512)
			abort();
		for (size_t j = 0; j < i; j++)
			if (s->disks[j].key == d->key)
				abort();
		if ((d->parent_path == NULL) != (d->previous_change_id == NULL))
			abort();
		if (s->backup_type == BW_BACKUP_FULL && d->parent_path)
			abort();
		if (d->parent_path && (d->parent_path[0] == '/' || strstr(d->parent_path, "\n")))
			abort();
		base |= d->parent_path != NULL;
	}
	if (s->backup_type == BW_BACKUP_INCREMENTAL && !base)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	int rc = bw_message_parse((const char *)data, size, BW_MESSAGE_MAX_BYTES_DEFAULT, &spec,
				  &vd);
	if (rc == 0) {
		check_spec(spec);
	} else if (rc == BW_EMESSAGE) {
		if (vd->n == 0 || vd->reason == BW_REJECT_NONE)
			abort();
		for (size_t i = 0; i < vd->n; i++)
			for (const char *p = vd->v[i].path; *p; p++)
				if ((unsigned char)*p < 0x20) /* paths are printed raw */
					abort();
	} else if (rc != BW_ENOMEM) {
		abort();
	}
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return 0;
}
