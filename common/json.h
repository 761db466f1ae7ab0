/* json.h: strict RFC 8259 parsing (json-c alone accepts NaN, comments, bad UTF-8) and small helpers. */
#ifndef BW_JSON_H
#define BW_JSON_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* Arrays and objects nested deeper than this (the top level counting as 1) are refused. */
#define BW_JSON_MAX_DEPTH 64
/*
 * A document of more values than this is refused before any tree is built: json-c spends
 * about 770 bytes per value, so a 16 MiB body of "{}," would cost 4 GiB and seconds. Every
 * document bw reads (a backup.start of at most 64 disks, an SNA reply) has a few hundred.
 */
#define BW_JSON_MAX_VALUES 100000
#define BW_JSON_MAX_VALUES_TEXT "100000"

/*
 * Parses buf[0..len) as exactly one JSON value under RFC 8259 with strict UTF-8: no BOM,
 * no comments, no NaN/Infinity, no raw control characters in strings, no \u escape that
 * decodes to a lone surrogate, no U+0000 in an object key (json-c would cut the key there),
 * no trailing data, nesting at most BW_JSON_MAX_DEPTH, at most BW_JSON_MAX_VALUES values.
 * Duplicate object keys: the last one wins.
 * Returns 0 and stores the tree in *out (caller releases with json_object_put), or
 * BW_EJSON with a one-line reason in why[0..whysz) (BW_ENOMEM when allocation fails).
 */
int bw_json_parse_strict(const char *buf, size_t len, struct json_object **out, char *why,
			 size_t whysz) BW_MUST_CHECK;

/*
 * Reads a JSON number that is an integer in the JSON Schema sense (a number with a zero
 * fractional part: 1.0 is 1). Returns true and stores it, saturated to the int64 range,
 * in *out; false for any other type, a fraction, or a non-finite number.
 */
bool bw_json_get_integer(struct json_object *o, int64_t *out);

/*
 * For an integer o (see bw_json_get_integer): false when it is certainly not a multiple of
 * m (> 0), computed on the exact value; true otherwise, including values beyond what json-c
 * keeps exactly (above 2^64-1 or below -2^63), whose remainder is unknown.
 */
bool bw_json_integer_multiple_of(struct json_object *o, int64_t m);

#endif
