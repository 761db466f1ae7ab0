/* buf.c: a growable byte buffer with sticky allocation failure. */
#include "buf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool reserve(struct bw_buf *b, size_t extra)
{
	if (b->failed)
		return false;
	if (b->len + extra + 1 <= b->cap)
		return true;
	size_t cap = b->cap ? b->cap : 64;
	while (cap < b->len + extra + 1) {
		if (cap > SIZE_MAX / 2) {
			b->failed = true;
			return false;
		}
		cap *= 2;
	}
	char *p = realloc(b->data, cap);
	if (p == NULL) {
		b->failed = true;
		return false;
	}
	b->data = p;
	b->cap = cap;
	return true;
}

void bw_buf_append(struct bw_buf *b, const char *s, size_t n)
{
	if (!reserve(b, n))
		return;
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
}

void bw_buf_puts(struct bw_buf *b, const char *s)
{
	bw_buf_append(b, s, strlen(s));
}

void bw_buf_printf(struct bw_buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || !reserve(b, (size_t)n))
		return;
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

int bw_buf_steal(struct bw_buf *b, char **out)
{
	if (b->failed || !reserve(b, 0)) {
		bw_buf_free(b);
		return BW_ENOMEM;
	}
	b->data[b->len] = '\0';
	*out = b->data;
	*b = (struct bw_buf)BW_BUF_INIT;
	return 0;
}

void bw_buf_free(struct bw_buf *b)
{
	free(b->data);
	*b = (struct bw_buf)BW_BUF_INIT;
}
