"""dialect.py: the JSON Schema dialect of schemas/: ECMA-262 patterns on Python's re and the
custom keyword x-uniqueKey. Shared by differential.py and test_event_schemas.py."""

import functools
import json
import re

import jsonschema
import jsonschema.validators
from jsonschema import Draft202012Validator

# --- the dialect shared with schemas/backup.start.json ---------------------------------
# JSON Schema patterns are ECMA-262; Python's re differs where it matters here: '$' also
# matches before a final newline, '.' matches \r and U+2028/9, '\d' matches any Unicode
# digit. Those are translated; the other Unicode-dependent classes are refused.

@functools.lru_cache(maxsize=None)
def ecma_regex(pattern):
    """Compiles an ECMA-262 pattern (no flags) with Python's re, with ECMA's meaning of
    '$', '.', '\\d' and '\\D'. Raises ValueError for a construct it cannot translate."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1:i + 2]
            if nxt == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif nxt == "D" and not in_class:
                out.append("[^0-9]")
            elif nxt in ("D", "w", "W", "s", "S", "b", "B"):
                raise ValueError(f"pattern {pattern!r}: \\{nxt} is not translated to ECMA-262 semantics")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            out.append(c)
        elif c == "[":
            if pattern[i + 1:i + 2] == "]" or pattern[i + 1:i + 3] == "^]":
                raise ValueError(f"pattern {pattern!r}: empty class is not translated")
            in_class = True
            out.append(c)
        elif c == "$":
            out.append(r"\Z")
        elif c == ".":
            out.append("[^\n\r\u2028\u2029]")
        else:
            out.append(c)
        i += 1
    return re.compile("".join(out))


def _pattern_keyword(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield jsonschema.exceptions.ValidationError(f"{instance!r} does not match {pattern!r}")


def canonical(value):
    """A hashable form under JSON equality (2000 == 2000.0, but true != 1)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", int(value) if isinstance(value, float) and value.is_integer() else value)
    if isinstance(value, str):
        return ("string", value)
    if value is None:
        return ("null",)
    return ("json", json.dumps(value, sort_keys=True))


def _unique_key_keyword(validator, member, instance, schema):
    """x-uniqueKey: MEMBER on an array: no two object items have equal values of MEMBER."""
    if not validator.is_type(instance, "array"):
        return
    first = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict) or member not in item:
            continue
        try:
            canon = canonical(item[member])
        except (TypeError, ValueError):
            continue
        if canon in first:
            yield jsonschema.exceptions.ValidationError(
                f"{member} {item[member]!r} of item {index} repeats item {first[canon]}",
                path=[index, member])
        else:
            first[canon] = index


Validator = jsonschema.validators.extend(
    Draft202012Validator, {"pattern": _pattern_keyword, "x-uniqueKey": _unique_key_keyword})


def all_patterns(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "pattern" and isinstance(v, str):
                yield v
            elif k not in ("const", "enum", "examples", "default"):
                yield from all_patterns(v)
    elif isinstance(node, list):
        for v in node:
            yield from all_patterns(v)


