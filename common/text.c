/* text.c: UTF-8 decoding, identifier alphabet, escaping and hashing without locale state. */
#include "text.h"

#include <stdio.h>
#include <string.h>

static bool is_alnum(unsigned char c)
{
	return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

bool bw_text_is_safe_id(const char *s, size_t n)
{
	if (n == 0 || !is_alnum((unsigned char)s[0]))
		return false;
	for (size_t i = 1; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!is_alnum(c) && c != '.' && c != '_' && c != '-')
			return false;
	}
	return true;
}

size_t bw_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
	if (n == 0)
		return 0;
	unsigned char c = s[0];
	size_t len;
	uint32_t v, min;

	if (c < 0x80) {
		*cp = c;
		return 1;
	} else if ((c & 0xe0) == 0xc0) {
		len = 2, v = c & 0x1f, min = 0x80;
	} else if ((c & 0xf0) == 0xe0) {
		len = 3, v = c & 0x0f, min = 0x800;
	} else if ((c & 0xf8) == 0xf0) {
		len = 4, v = c & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		v = (v << 6) | (s[i] & 0x3f);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	*cp = v;
	return len;
}

size_t bw_utf8_length(const char *s, size_t n)
{
	size_t count = 0;
	for (size_t i = 0; i < n; count++) {
		uint32_t cp;
		size_t len = bw_utf8_decode((const unsigned char *)s + i, n - i, &cp);
		if (len == 0)
			return SIZE_MAX;
		i += len;
	}
	return count;
}

bool bw_is_control(uint32_t cp)
{
	return cp <= 0x1f || (cp >= 0x7f && cp <= 0x9f);
}

bool bw_text_has_control(const char *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		uint32_t cp;
		size_t len = bw_utf8_decode((const unsigned char *)s + i, n - i, &cp);
		if (len == 0)
			return true; /* not text at all: treat as unsafe */
		if (bw_is_control(cp))
			return true;
		i += len;
	}
	return false;
}

static void put_u(struct bw_buf *b, uint32_t unit)
{
	static const char hex[] = "0123456789abcdef";
	char tmp[6] = {'\\', 'u', hex[(unit >> 12) & 15], hex[(unit >> 8) & 15],
		       hex[(unit >> 4) & 15], hex[unit & 15]};
	bw_buf_append(b, tmp, 6);
}

void bw_text_json_quote(struct bw_buf *b, const char *s, size_t n)
{
	bw_buf_append(b, "\"", 1);
	for (size_t i = 0; i < n;) {
		uint32_t cp;
		size_t len = bw_utf8_decode((const unsigned char *)s + i, n - i, &cp);
		if (len == 0) { /* not UTF-8: escape the byte as a replacement */
			cp = 0xfffd;
			len = 1;
		}
		i += len;
		switch (cp) {
		case '"':
			bw_buf_append(b, "\\\"", 2);
			continue;
		case '\\':
			bw_buf_append(b, "\\\\", 2);
			continue;
		case '\b':
			bw_buf_append(b, "\\b", 2);
			continue;
		case '\f':
			bw_buf_append(b, "\\f", 2);
			continue;
		case '\n':
			bw_buf_append(b, "\\n", 2);
			continue;
		case '\r':
			bw_buf_append(b, "\\r", 2);
			continue;
		case '\t':
			bw_buf_append(b, "\\t", 2);
			continue;
		default:
			break;
		}
		if (cp >= 0x20 && cp <= 0x7e) {
			char c = (char)cp;
			bw_buf_append(b, &c, 1);
		} else if (cp < 0x10000) {
			put_u(b, cp);
		} else {
			cp -= 0x10000;
			put_u(b, 0xd800 | (cp >> 10));
			put_u(b, 0xdc00 | (cp & 0x3ff));
		}
	}
	bw_buf_append(b, "\"", 1);
}

/* One step of bw_text_escape: the length of the character at s[i..n) (1 for a bad byte)
 * and whether it is written escaped. */
static size_t escape_unit(const char *s, size_t i, size_t n, bool *escape)
{
	uint32_t cp = 0;
	size_t len = bw_utf8_decode((const unsigned char *)s + i, n - i, &cp);
	*escape = len == 0 || bw_is_control(cp) || cp == '\\';
	return len ? len : 1;
}

size_t bw_text_escape(char *dst, size_t size, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	bool escape;
	/* the whole text when it fits, else as much as fits before "..." */
	size_t full = 0, limit = size - 1;
	for (size_t i = 0; i < n && full <= limit; i += escape_unit(s, i, n, &escape)) {
		size_t take = escape_unit(s, i, n, &escape);
		full += escape ? 4 * take : take;
	}
	if (full > limit)
		limit = size - 4;
	size_t o = 0;
	for (size_t i = 0, take; i < n; i += take) {
		take = escape_unit(s, i, n, &escape);
		if (o + (escape ? 4 * take : take) > limit)
			break;
		for (size_t k = 0; k < take; k++) {
			unsigned char c = (unsigned char)s[i + k];
			if (!escape) {
				dst[o++] = (char)c;
				continue;
			}
			dst[o++] = '\\';
			dst[o++] = 'x';
			dst[o++] = hex[c >> 4];
			dst[o++] = hex[c & 15];
		}
	}
	if (full > size - 1) {
		memcpy(dst + o, "...", 3);
		o += 3;
	}
	dst[o] = '\0';
	return o;
}

uint64_t bw_fnv1a64_more(uint64_t h, const void *data, size_t n)
{
	const unsigned char *p = data;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

uint64_t bw_fnv1a64(const void *data, size_t n)
{
	return bw_fnv1a64_more(BW_FNV1A64_INIT, data, n);
}
