/* fuzz_sna_cleanup.c: libFuzzer target for the cleanup reply's body (CONTRACT §3.3), with its invariants as oracle. */
#include "sna.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char text[BW_SNA_TEXT_SIZE];
	memset(text, 'z', sizeof(text));
	bool said = bw_sna_cleanup_reply_parse((const char *)data, size, text);
	size_t len = strnlen(text, sizeof(text));
	if (len > BW_TEXT_OUTSIDE_MAX || (!said && len != 0))
		abort();
	/* escaped: nothing in it can break a log line */
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)text[i] < 0x20 || text[i] == 0x7f)
			abort();
	return 0;
}
