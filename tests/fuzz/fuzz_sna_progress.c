/* fuzz_sna_progress.c: libFuzzer target for the progress reply (CONTRACT §3.2), with the contract's invariants as oracle. */
#include "sna.h"
#include "text.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The job the replies are read against: a full disk, an incremental one, a tiny full one. */
static const struct bw_sna_disk_ref refs[] = {
	{2000, 1048576, true}, {2001, 2097152, false}, {16000, 512, true}};
#define N_REFS (sizeof(refs) / sizeof(refs[0]))

static bool printable(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return false;
	return true;
}

/* What an accepted reply promises the job state machine; a broken promise aborts. */
static void check(const struct bw_sna_progress *p)
{
	if ((unsigned)p->status > BW_SNA_FAILED || p->n_disks > N_REFS)
		abort();
	if (strlen(p->error) > BW_TEXT_OUTSIDE_MAX || !printable(p->error))
		abort();
	for (size_t i = 0; i < p->n_disks; i++) {
		const struct bw_sna_disk_progress *d = &p->disks[i];
		const struct bw_sna_disk_ref *ref = NULL;
		for (size_t k = 0; k < N_REFS; k++)
			if (refs[k].key == d->key)
				ref = &refs[k];
		if (ref == NULL || (unsigned)d->status > BW_SNA_FAILED)
			abort();
		for (size_t k = 0; k < i; k++)
			if (p->disks[k].key == d->key)
				abort();
		if (d->bytes_transferred < 0 || d->total_bytes < 0)
			abort();
		size_t len = strlen(d->change_id);
		size_t cps = bw_utf8_length(d->change_id, len);
		if (cps == SIZE_MAX || cps > BW_SNA_CHANGE_ID_MAX_CP ||
		    bw_text_has_control(d->change_id, len))
			abort();
		/* completed only on evidence (§3.2) */
		bool evidence = len > 0 && d->bytes_transferred == d->total_bytes &&
				(!ref->full || d->total_bytes == ref->size_bytes);
		if (d->proven && (d->status != BW_SNA_COMPLETED || !evidence))
			abort();
		if (d->status == BW_SNA_COMPLETED && evidence != d->proven)
			abort();
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bw_sna_progress *p = NULL;
	char why[200] = "";
	int rc = bw_sna_progress_parse((const char *)data, size, refs, N_REFS, &p, why, sizeof(why));
	if (rc == 0) {
		check(p);
		free(p);
	} else if (rc != BW_ESNA || why[0] == '\0' || p != NULL) {
		abort();
	}
	return 0;
}
