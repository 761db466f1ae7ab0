/* fuzz_sna_start.c: libFuzzer target for the start reply's body (CONTRACT §3.1), with its invariants as oracle. */
#include "sna.h"
#include "text.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char id[BW_SNA_TEXT_SIZE];
	memset(id, 'z', sizeof(id));
	bool named = bw_sna_start_reply_parse((const char *)data, size, "bk-fuzz", id);
	size_t len = strnlen(id, sizeof(id));
	/* an id that reaches backup.started is bounded, valid UTF-8, without control characters */
	if (len == 0 || len > BW_TEXT_OUTSIDE_MAX || bw_utf8_length(id, len) == SIZE_MAX ||
	    bw_text_has_control(id, len))
		abort();
	if (!named && strcmp(id, "bk-fuzz") != 0)
		abort();
	return 0;
}
