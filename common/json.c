/* json.c: a strict grammar pass over the raw bytes, then json-c builds the tree. */
#include "json.h"
#include "text.h"

#include <json-c/printbuf.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

struct scan {
	const unsigned char *p;
	const unsigned char *start;
	const unsigned char *end;
	int depth;
	size_t values; /* every value, containers and members included */
	char *why;
	size_t whysz;
};

static bool fail(struct scan *s, const char *what)
{
	snprintf(s->why, s->whysz, "invalid JSON at byte %zu: %s", (size_t)(s->p - s->start), what);
	return false;
}

static void skip_ws(struct scan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

static bool literal(struct scan *s, const char *word)
{
	size_t n = strlen(word);
	if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
		return fail(s, "unexpected character");
	s->p += n;
	return true;
}

static int hex4(const unsigned char *p)
{
	int v = 0;
	for (int i = 0; i < 4; i++) {
		int c = p[i], d;
		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (c >= 'a' && c <= 'f')
			d = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			d = c - 'A' + 10;
		else
			return -1;
		v = v * 16 + d;
	}
	return v;
}

/* \uXXXX at s->p (after the backslash and 'u'); pairs surrogates. */
static bool unicode_escape(struct scan *s)
{
	if (s->end - s->p < 4 || hex4(s->p) < 0)
		return fail(s, "bad \\u escape");
	int u = hex4(s->p);
	s->p += 4;
	if (u >= 0xdc00 && u <= 0xdfff)
		return fail(s, "\\u escape is a lone low surrogate");
	if (u >= 0xd800 && u <= 0xdbff) {
		if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u')
			return fail(s, "\\u escape is a lone high surrogate");
		int lo = hex4(s->p + 2);
		if (lo < 0xdc00 || lo > 0xdfff)
			return fail(s, "\\u escape is a lone high surrogate");
		s->p += 6;
	}
	return true;
}

/* A string; a key may not hold U+0000 (json-c keys are C strings: it would cut them). */
static bool string(struct scan *s, bool key)
{
	s->p++; /* opening quote */
	while (s->p < s->end) {
		unsigned char c = *s->p;
		if (c == '"') {
			s->p++;
			return true;
		}
		if (c < 0x20)
			return fail(s, "control character in string");
		if (c == '\\') {
			if (++s->p >= s->end)
				break;
			c = *s->p++;
			if (c == 'u') {
				if (key && s->end - s->p >= 4 && memcmp(s->p, "0000", 4) == 0)
					return fail(s, "object key holds U+0000");
				if (!unicode_escape(s))
					return false;
			} else if (!strchr("\"\\/bfnrt", c) || c == '\0') {
				s->p--;
				return fail(s, "bad escape");
			}
			continue;
		}
		if (c < 0x80) {
			s->p++;
			continue;
		}
		uint32_t cp;
		size_t n = bw_utf8_decode(s->p, (size_t)(s->end - s->p), &cp);
		if (n == 0)
			return fail(s, "invalid UTF-8");
		s->p += n;
	}
	return fail(s, "unterminated string");
}

static bool digits(struct scan *s)
{
	const unsigned char *from = s->p;
	while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
		s->p++;
	return s->p > from;
}

static bool number(struct scan *s)
{
	if (*s->p == '-')
		s->p++;
	if (s->p < s->end && *s->p == '0') {
		s->p++;
	} else if (!digits(s)) {
		return fail(s, "bad number");
	}
	if (s->p < s->end && *s->p == '.') {
		s->p++;
		if (!digits(s))
			return fail(s, "bad number: digits expected after '.'");
	}
	if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
		s->p++;
		if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
			s->p++;
		if (!digits(s))
			return fail(s, "bad number: digits expected in exponent");
	}
	return true;
}

static bool value(struct scan *s);

static bool container(struct scan *s, bool object)
{
	char close = object ? '}' : ']';
	if (++s->depth > BW_JSON_MAX_DEPTH)
		return fail(s, "nested deeper than 64 levels");
	s->p++;
	skip_ws(s);
	if (s->p < s->end && *s->p == close) {
		s->p++;
		s->depth--;
		return true;
	}
	for (;;) {
		if (object) {
			skip_ws(s);
			if (s->p >= s->end || *s->p != '"')
				return fail(s, "object key expected");
			if (!string(s, true))
				return false;
			skip_ws(s);
			if (s->p >= s->end || *s->p != ':')
				return fail(s, "':' expected");
			s->p++;
		}
		if (!value(s))
			return false;
		skip_ws(s);
		if (s->p >= s->end)
			return fail(s, "unexpected end of input");
		if (*s->p == ',') {
			s->p++;
			continue;
		}
		if (*s->p == close) {
			s->p++;
			s->depth--;
			return true;
		}
		return fail(s, object ? "',' or '}' expected" : "',' or ']' expected");
	}
}

static bool value(struct scan *s)
{
	skip_ws(s);
	if (s->p >= s->end)
		return fail(s, "unexpected end of input");
	if (++s->values > BW_JSON_MAX_VALUES)
		return fail(s, "more than " BW_JSON_MAX_VALUES_TEXT " values");
	switch (*s->p) {
	case '{':
		return container(s, true);
	case '[':
		return container(s, false);
	case '"':
		return string(s, false);
	case 't':
		return literal(s, "true");
	case 'f':
		return literal(s, "false");
	case 'n':
		return literal(s, "null");
	default:
		if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9'))
			return number(s);
		return fail(s, "unexpected character");
	}
}

int bw_json_parse_strict(const char *buf, size_t len, struct json_object **out, char *why,
			 size_t whysz)
{
	struct scan s = {(const unsigned char *)buf, (const unsigned char *)buf,
			 (const unsigned char *)buf + len, 0, 0, why, whysz};
	if (len > INT32_MAX) {
		snprintf(why, whysz, "invalid JSON: input too large");
		return BW_EJSON;
	}
	if (!value(&s))
		return BW_EJSON;
	skip_ws(&s);
	if (s.p != s.end) {
		fail(&s, "trailing data after the JSON value");
		return BW_EJSON;
	}

	/* The grammar is proven; json-c only builds the tree. Its depth counts one extra. */
	struct json_tokener *tok = json_tokener_new_ex(BW_JSON_MAX_DEPTH + 1);
	if (tok == NULL)
		return BW_ENOMEM;
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	struct json_object *o = json_tokener_parse_ex(tok, buf, (int)len);
	enum json_tokener_error err = json_tokener_get_error(tok);
	if (err == json_tokener_continue) { /* a bare scalar waits for a delimiter */
		o = json_tokener_parse_ex(tok, " ", 1);
		err = json_tokener_get_error(tok);
	}
	/* the tokener's scratch buffer holds the last strings it read (a password, a key):
	 * wiped before json-c frees it (its fields are deprecated to touch, not gone) */
	if (tok->pb && tok->pb->buf && tok->pb->size > 0)
		explicit_bzero(tok->pb->buf, (size_t)tok->pb->size);
	json_tokener_free(tok);
	if (o == NULL && err == json_tokener_success) {
		/* a bare "null" */
		*out = NULL;
		return 0;
	}
	if (err != json_tokener_success) {
		json_object_put(o);
		snprintf(why, whysz, "invalid JSON: %s", json_tokener_error_desc(err));
		return BW_EJSON;
	}
	*out = o;
	return 0;
}

bool bw_json_get_integer(struct json_object *o, int64_t *out)
{
	if (json_object_get_type(o) == json_type_int) {
		*out = json_object_get_int64(o);
		return true;
	}
	if (json_object_get_type(o) != json_type_double)
		return false;
	double d = json_object_get_double(o);
	if (!isfinite(d) || d != floor(d))
		return false;
	if (d >= 9223372036854775807.0)
		*out = INT64_MAX;
	else if (d <= -9223372036854775808.0)
		*out = INT64_MIN;
	else
		*out = (int64_t)d;
	return true;
}

bool bw_json_integer_multiple_of(struct json_object *o, int64_t m)
{
	if (json_object_get_type(o) == json_type_double)
		return fmod(json_object_get_double(o), (double)m) == 0.0;
	int64_t v = json_object_get_int64(o);
	if (v == INT64_MIN)
		return true; /* saturated: unknown */
	if (v == INT64_MAX) {
		/* json-c keeps 2^63..2^64-1 exactly as unsigned, and saturates beyond that */
		uint64_t u = json_object_get_uint64(o);
		return u == UINT64_MAX || u % (uint64_t)m == 0;
	}
	return v % m == 0;
}
