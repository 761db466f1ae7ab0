#!/usr/bin/python3
"""Differential test: bw-ctl validate against schemas/backup.start.json over the message corpus.

Usage: differential.py BW_CTL CORPUS_DIR

For every CORPUS_DIR/*.json, runs `BW_CTL validate FILE` (exit 0 = valid, 1 = invalid,
anything else = a failure) and compares its verdict with check() below (the schema plus the
document-level rules) and with the file's name (valid-* / invalid-*). For an invalid file the
set of `path: rule` lines bw-ctl prints (`FILE: path: rule`) must equal the file's .expect,
and every line but `$: truncated` must also be a violation the schema finds (schema_lines():
jsonschema's errors written in bw's path and rule names), so a line in an .expect that the
schema would not report fails too.

Bounded verdicts (CONTRACT §2: at most 100 errors, then {"path": "$", "rule": "truncated"}):
bw stops checking once a violation has to be left out, while jsonschema reports all of them,
so the two lists cannot be equal there. What is compared instead, for a file whose output
holds `$: truncated`: bw printed exactly 101 lines with `$: truncated` last; its 100 other
lines are schema violations (the subset check above, as for every file); and the schema
finds more than 100 distinct violations, so the truncation was due. A file with at most 100
schema violations must not be truncated. Which 100 bw lists (the first in its checking
order) is held by the .expect, exactly as for any other file.
Prints every disagreement, then `N passed, M failed`; exits 1 on any failure, 2 on usage errors.

Importable: check(raw_bytes) -> (valid, reason) is the reference validator that
tests/schema/corpus_check.py also uses. Needs Debian's python3-jsonschema (4.10+).
"""

import functools
import json
import os
import re
import subprocess
import sys
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dialect import Validator, all_patterns, ecma_regex  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.normpath(os.path.join(HERE, "..", "..", "schemas", "backup.start.json"))

MAX_BODY = 262144   # CONTRACT.md §2: config default 256 KiB
MAX_DEPTH = 64      # arrays + objects, the top-level object counting as 1
MAX_ERRORS = 100    # CONTRACT.md §2: errors[] of backup.rejected, then one "truncated" entry
TRUNCATED = "$: truncated"
BW_CTL_TIMEOUT_S = 30

_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidJSON(Exception):
    """The body is not strict RFC 8259 JSON in strict UTF-8 (reason invalid_json)."""


# --- the schema dialect (tests/schema/dialect.py) ----------------------------------------

@functools.lru_cache(maxsize=None)
def load_validator(schema_path=SCHEMA_PATH):
    with open(schema_path, "rb") as f:
        schema = json.loads(f.read().decode("utf-8"))
    Validator.check_schema(schema)
    for p in all_patterns(schema):
        ecma_regex(p)  # refuse untranslatable patterns up front
    return Validator(schema)


# --- strict decoding ---------------------------------------------------------------------

def _reject_constant(name):
    raise InvalidJSON("%s is not JSON" % name)


def _parse_int(text):
    # Python 3.11 refuses int() of more than 4300 digits; JSON has no such limit.
    if len(text) > 4000:
        return int(Decimal(text))
    return int(text)


def decode_strict(raw):
    """Decode a backup.start body under the document-level rules; raises InvalidJSON."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise InvalidJSON("byte-order mark")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise InvalidJSON("invalid UTF-8: %s" % e)
    try:
        doc = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError:
        raise InvalidJSON("nesting too deep for the parser")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise InvalidJSON(str(e))
    # Walk iteratively: depth, and lone surrogates from \u escapes (in keys too).
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_DEPTH:
                raise InvalidJSON("nesting depth over %d" % MAX_DEPTH)
            for k, v in node.items():
                if _SURROGATE.search(k):
                    raise InvalidJSON("lone surrogate in an object key")
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > MAX_DEPTH:
                raise InvalidJSON("nesting depth over %d" % MAX_DEPTH)
            for v in node:
                stack.append((v, depth + 1))
        elif isinstance(node, str):
            if _SURROGATE.search(node):
                raise InvalidJSON("lone surrogate in a string")
    return doc


def _json_path(error):
    path = "$"
    for p in error.absolute_path:
        path += "[%d]" % p if isinstance(p, int) else "." + str(p)
    return path


def schema_errors(doc, schema_path=SCHEMA_PATH):
    """Every schema violation of a decoded document, as jsonschema errors."""
    return sorted(load_validator(schema_path).iter_errors(doc),
                  key=lambda e: (list(map(str, e.absolute_path)), e.validator))


@functools.lru_cache(maxsize=2)
def _evaluate(raw_bytes, schema_path):
    """(doc, errors) of a body within the size limit; raises InvalidJSON. Cached: a 256 KiB
    body of empty disks has some 175,000 schema errors and takes seconds to check."""
    doc = decode_strict(raw_bytes)
    return doc, schema_errors(doc, schema_path)


def check(raw_bytes, schema_path=SCHEMA_PATH):
    """Validate one raw backup.start body exactly as CONTRACT.md §2 says.

    Returns (True, None) or (False, reason) where reason starts with the rejection code:
    'too_large', 'invalid_json' or 'invalid_message', then ': ' and a human detail."""
    if len(raw_bytes) > MAX_BODY:
        return False, "too_large: %d bytes > %d" % (len(raw_bytes), MAX_BODY)
    try:
        doc, errors = _evaluate(raw_bytes, schema_path)
    except InvalidJSON as e:
        return False, "invalid_json: %s" % e
    if errors:
        e = errors[0]
        more = " (+%d more)" % (len(errors) - 1) if len(errors) > 1 else ""
        return False, "invalid_message: %s: %s%s" % (_json_path(e), e.message[:200], more)
    return True, None


# --- the schema's errors in bw's words ------------------------------------------------------

_KEYWORD_RULES = {
    "type": "type", "const": "const", "enum": "enum", "minLength": "min_length",
    "maxLength": "max_length", "minimum": "minimum", "maximum": "maximum",
    "multipleOf": "multiple_of", "minItems": "min_items", "maxItems": "max_items",
    "maxProperties": "max_properties", "x-uniqueKey": "unique", "contains": "incremental_base",
}
_SIMPLE_TAG_KEY = re.compile(r"[A-Za-z0-9_-]+")
PATH_DISPLAY_MAX = 300  # common/message.c: a longer tag key is shown cut in a path


def _tag_segment(key):
    """A tag key in a bw path: .team, or ["cost center"] JSON-escaped and cut as bw cuts it."""
    if _SIMPLE_TAG_KEY.fullmatch(key) and len(key.encode("utf-8")) < PATH_DISPLAY_MAX:
        return "." + key
    quoted = json.dumps(key)
    if len(quoted) > PATH_DISPLAY_MAX:
        quoted = quoted[:PATH_DISPLAY_MAX - 5] + '..."'
    return "[%s]" % quoted


def bw_path(parts):
    """A jsonschema path (deque of str/int) as bw writes it: disks[1].key, tags["a b"], $."""
    out = ""
    for i, p in enumerate(parts):
        if isinstance(p, int):
            out += "[%d]" % p
        elif i == 1 and parts[0] == "tags":
            out += _tag_segment(p)
        else:
            out += ("." if out else "") + p
    return out or "$"


def _pattern_rule(pattern, schema):
    defs = schema.get("$defs", {})
    if pattern == defs.get("identifier", {}).get("pattern"):
        return "charset"
    if pattern == defs.get("no_control", {}).get("pattern"):
        return "control_chars"
    return "relative_path"  # the one other pattern: parent_path's


def schema_lines(doc, errors, schema_path=SCHEMA_PATH):
    """The set of `path: rule` lines the schema's errors stand for, in bw's names (README:
    violation names). A keyword this does not know gives `path: ?<keyword>`, which bw never
    prints, so a new keyword in the schema shows up as a disagreement, not a silent pass."""
    with open(schema_path, "rb") as f:
        schema = json.loads(f.read().decode("utf-8"))
    lines = set()
    for e in errors:
        parts = list(e.absolute_path)
        path = bw_path(parts)
        kw = e.validator
        in_names = "propertyNames" in e.absolute_schema_path
        if in_names:  # jsonschema reports a key's errors on the object, the key as instance
            path = bw_path(parts + [e.instance])
        if kw is None:  # the `false` schema: parent_path / previous_change_id in a full job
            lines.add("%s: forbidden_in_full" % path)
        elif kw == "required":
            for name in e.validator_value:
                if isinstance(e.instance, dict) and name not in e.instance:
                    lines.add("%s: required" % bw_path(parts + [name]))
        elif kw == "dependentRequired":
            for name, deps in e.validator_value.items():
                for dep in deps:
                    if isinstance(e.instance, dict) and name in e.instance and dep not in e.instance:
                        lines.add("%s: required" % bw_path(parts + [dep]))
        elif kw == "pattern":
            rule = _pattern_rule(e.validator_value, schema)
            lines.add("%s: %s%s" % (path, "key_" if in_names else "", rule))
        elif kw in ("minLength", "maxLength") and in_names:
            lines.add("%s: key_%s" % (path, _KEYWORD_RULES[kw]))
        elif kw in _KEYWORD_RULES:
            lines.add("%s: %s" % (path, _KEYWORD_RULES[kw]))
        else:
            lines.add("%s: ?%s" % (path, kw))
    return lines


# --- the differential run ----------------------------------------------------------------

def read_expect(path):
    with open(path, "r", encoding="utf-8") as f:
        return [line for line in f.read().split("\n") if line != ""]


def parse_bw_ctl_output(stdout, file_arg):
    """Split `FILE: path: rule` lines; returns (list of 'path: rule', list of bad lines)."""
    prefix = file_arg + ": "
    got, bad = [], []
    for line in stdout.split("\n"):
        if line == "":
            continue
        if not line.startswith(prefix):
            bad.append(line)
            continue
        rest = line[len(prefix):]
        path, sep, rule = rest.rpartition(": ")
        if not sep or not path or not rule:
            bad.append(line)
            continue
        got.append("%s: %s" % (path, rule))
    return got, bad


def compare_with_schema(raw, got):
    """bw's lines for an invalid_message body against the schema's (module docstring)."""
    problems = []
    doc, errors = _evaluate(raw, SCHEMA_PATH)
    ref = schema_lines(doc, errors)
    for line in got:
        if line != TRUNCATED and line not in ref:
            problems.append("bw-ctl: %s is not a violation the schema finds" % line)
    if TRUNCATED in got:
        if len(got) != MAX_ERRORS + 1 or got[-1] != TRUNCATED:
            problems.append("bw-ctl: a truncated verdict must be %d lines with %s last (got %d, last %s)"
                            % (MAX_ERRORS + 1, TRUNCATED, len(got), got[-1] if got else "-"))
        if len(ref) <= MAX_ERRORS:
            problems.append("bw-ctl: truncated, but the schema finds only %d violations" % len(ref))
    elif len(got) > MAX_ERRORS:
        problems.append("bw-ctl: %d lines, more than %d without %s" % (len(got), MAX_ERRORS, TRUNCATED))
    return problems


def run_one(bw_ctl, file_arg, name):
    """Returns a list of disagreement strings (empty = passed)."""
    problems = []
    with open(file_arg, "rb") as f:
        raw = f.read()
    named_valid = name.startswith("valid-")
    if not named_valid and not name.startswith("invalid-"):
        return ["corpus: name is neither valid-* nor invalid-*"]
    ref_valid, ref_reason = check(raw)
    if ref_valid != named_valid:
        problems.append("corpus: check() says %s (%s) but the file is named %s"
                        % ("valid" if ref_valid else "invalid", ref_reason, name))
    try:
        proc = subprocess.run([bw_ctl, "validate", file_arg], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=BW_CTL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return problems + ["bw-ctl: no answer within %d s" % BW_CTL_TIMEOUT_S]
    except OSError as e:
        return problems + ["bw-ctl: cannot run: %s" % e]
    stdout = proc.stdout.decode("utf-8", errors="backslashreplace")
    stderr = proc.stderr.decode("utf-8", errors="backslashreplace").strip()
    if proc.returncode not in (0, 1):
        how = ("killed by signal %d" % -proc.returncode) if proc.returncode < 0 \
            else "exit %d" % proc.returncode
        problems.append("bw-ctl: %s (0 or 1 expected)%s" % (how, (": " + stderr[:500]) if stderr else ""))
        return problems
    got_valid = proc.returncode == 0
    if got_valid != ref_valid:
        problems.append("verdict: bw-ctl says %s, the schema says %s%s"
                        % ("valid" if got_valid else "invalid", "valid" if ref_valid else "invalid",
                           "" if ref_valid else " (%s)" % ref_reason))
    got, bad = parse_bw_ctl_output(stdout, file_arg)
    for line in bad:
        problems.append("bw-ctl: unparsable line (want '%s: path: rule'): %r" % (file_arg, line))
    dups = sorted({g for g in got if got.count(g) > 1})
    for d in dups:
        problems.append("bw-ctl: line printed more than once (one per violated rule): %s" % d)
    expect_path = file_arg[:-len(".json")] + ".expect"
    if named_valid:
        if got:
            problems.append("bw-ctl: violations printed for a valid file: %s" % "; ".join(got))
        if os.path.exists(expect_path):
            problems.append("corpus: a valid file has an .expect")
    else:
        if not os.path.exists(expect_path):
            problems.append("corpus: %s is missing" % os.path.basename(expect_path))
            return problems
        want = set(read_expect(expect_path))
        have = set(got)
        for line in sorted(want - have):
            problems.append("missing  %s" % line)
        for line in sorted(have - want):
            problems.append("extra    %s" % line)
        if ref_reason and ref_reason.startswith("invalid_message"):
            problems += compare_with_schema(raw, got)
    if problems and stderr:
        problems.append("bw-ctl stderr: %s" % stderr[:500])
    return problems


def run_files(names, check, failed=0):
    """check(name) gives the problems of each name: "FAIL name" and each problem are printed,
    then "N passed, M failed" (failed: how many failed before). Returns the exit code."""
    passed = 0
    for name in names:
        problems = check(name)
        if problems:
            failed += 1
            print("FAIL %s" % name)
            for p in problems:
                print("     %s" % p)
        else:
            passed += 1
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


def main(argv):
    if len(argv) != 3:
        print("usage: %s BW_CTL CORPUS_DIR" % os.path.basename(argv[0]), file=sys.stderr)
        return 2
    bw_ctl, corpus = argv[1], argv[2]
    if not os.path.isdir(corpus):
        print("%s: not a directory" % corpus, file=sys.stderr)
        return 2
    names = sorted(n for n in os.listdir(corpus) if n.endswith(".json"))
    if not names:
        print("%s: no *.json files" % corpus, file=sys.stderr)
        return 2
    return run_files(names, lambda name: run_one(bw_ctl, os.path.join(corpus, name), name))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
