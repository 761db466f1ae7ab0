/* fuzz_cancel.c: libFuzzer target for backup.cancel (CONTRACT §2.1), with its rules as oracle and a build/parse round trip. */
#include "cancel.h"
#include "text.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bw_cancel c, again;
	char why[256];
	memset(why, 'z', sizeof(why));
	if (bw_cancel_parse((const char *)data, size, &c, why, sizeof(why)) != 0) {
		/* the reason is one safe line: it never quotes the body */
		size_t len = strnlen(why, sizeof(why));
		if (len == 0 || len == sizeof(why))
			abort();
		for (size_t i = 0; i < len; i++)
			if ((unsigned char)why[i] < 0x20 || why[i] == 0x7f)
				abort();
		return 0;
	}
	size_t n = strlen(c.job_id), r = strlen(c.reason);
	if (n > BW_CANCEL_JOB_ID_MAX || !bw_text_is_safe_id(c.job_id, n))
		abort();
	size_t cps = bw_utf8_length(c.reason, r);
	if (cps == SIZE_MAX || cps > BW_CANCEL_REASON_MAX || bw_text_has_control(c.reason, r))
		abort();
	/* what was accepted can be sent again and reads back the same */
	struct bw_buf b = {0};
	if (bw_cancel_build(c.job_id, c.reason, &b, why, sizeof(why)) != 0)
		abort();
	if (bw_cancel_parse(b.data, b.len, &again, why, sizeof(why)) != 0 ||
	    strcmp(again.job_id, c.job_id) != 0 || strcmp(again.reason, c.reason) != 0)
		abort();
	bw_buf_free(&b);
	return 0;
}
