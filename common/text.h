/* text.h: small text primitives: UTF-8, safe identifiers, JSON-style escaping, FNV-1a. */
#ifndef BW_TEXT_H
#define BW_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/*
 * True when s[0..n) is 1+ characters of [A-Za-z0-9._-] starting with a letter or digit:
 * the alphabet of job_id, repository_id, credential_id and worker ids.
 */
bool bw_text_is_safe_id(const char *s, size_t n);

/*
 * Decodes one UTF-8 sequence at s[0..n): stores the code point in *cp and returns its
 * length (1-4), or 0 when it is not well-formed (overlong, surrogate, > U+10FFFF,
 * truncated, stray continuation byte).
 */
size_t bw_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* The number of code points of valid UTF-8 text s[0..n), or SIZE_MAX when it is not valid. */
size_t bw_utf8_length(const char *s, size_t n);

/* True for U+0000-U+001F and U+007F-U+009F: "control characters" in CONTRACT §2. */
bool bw_is_control(uint32_t cp);

/* True when valid UTF-8 s[0..n) holds a control character. */
bool bw_text_has_control(const char *s, size_t n);

/*
 * Appends s[0..n) (valid UTF-8) as a JSON string literal in pure ASCII, the way
 * Python's json.dumps does: "\"", "\\", \b \f \n \r \t, anything else outside
 * 0x20-0x7e as \u00xx (lower-case hex), astral planes as a surrogate pair.
 */
void bw_text_json_quote(struct bw_buf *b, const char *s, size_t n);

/* Text from outside (an SNA reply, a transport error) is cut to this many bytes. */
#define BW_TEXT_OUTSIDE_MAX 512

/*
 * Writes s[0..n) into dst[0..size) (size >= 8) fit for one log line or one event field:
 * valid UTF-8 without control characters is kept; a control character (U+0000-U+001F,
 * U+007F-U+009F), a backslash and every byte that is not valid UTF-8 are written as \xNN
 * escapes of their bytes. Never cuts an escape or a character in two; when the text does
 * not fit it ends with "...". Returns the length written (always NUL-terminated).
 */
size_t bw_text_escape(char *dst, size_t size, const char *s, size_t n);

/* FNV-1a, 64 bit, of data[0..n). */
#define BW_FNV1A64_INIT 0xcbf29ce484222325ULL

/* FNV-1a 64 continued over more bytes: from BW_FNV1A64_INIT over every piece of a text in
 * order it gives bw_fnv1a64 of the whole (a body read frame by frame). */
uint64_t bw_fnv1a64_more(uint64_t h, const void *data, size_t n);

uint64_t bw_fnv1a64(const void *data, size_t n);

#endif
