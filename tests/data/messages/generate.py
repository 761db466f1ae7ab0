#!/usr/bin/python3
"""Generates the backup.start corpus next to this script: valid-*.json, invalid-*.json, invalid-*.expect.

Run it after changing a case: ./generate.py (it deletes the old valid-*/invalid-* files of this
directory first and writes every body byte-exactly), then tests/schema/corpus_check.py.

Each invalid-*.expect lists the violations `bw-ctl validate` must print for its file (as
`FILE: path: rule`), one `path: rule` per line, sorted. Paths: `job_id`, `vm.name`,
`disks[1].key`, `tags.team`, `tags["cost center"]` (a tag key that is not [A-Za-z0-9_-]+,
JSON-escaped), `$` for the whole document; a missing field's path names the field. Rules:
  $: too_large | invalid_json | type      the only line when it applies
  required, type, const, enum, min_length, max_length (code points), charset (the id alphabet;
  an empty id gets only min_length), control_chars, minimum, maximum, multiple_of,
  min_items, max_items, max_properties, key_min_length, key_max_length, key_control_chars
  (tag keys), unique (every later duplicate disk key), forbidden_in_full, incremental_base
  (on `disks`), relative_path; `$: truncated` after the first 100 when more are broken.
Every rule is checked independently, except that a wrong-typed value gets only `type` and a
missing object gets only its own `required`. In a full job a disk with one of parent_path /
previous_change_id gets forbidden_in_full only (no `required` for the other).
"""

import copy
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BODY = 262144
TIB64 = 64 * 1024 ** 4  # 70368744177664


# --- a serializer that can also write what json.dumps cannot -----------------------------

class Raw:
    """Bytes emitted verbatim where a value goes (NaN, 1e400, 2000.0, malformed tokens)."""

    def __init__(self, b):
        self.b = b if isinstance(b, bytes) else b.encode("utf-8")


class Str:
    """A string (value or key) from parts: str parts are JSON-escaped as usual (non-ASCII
    written raw as UTF-8), bytes parts go between the quotes verbatim (escapes, bad UTF-8)."""

    def __init__(self, *parts):
        self.parts = parts

    def encode(self):
        out = b'"'
        for p in self.parts:
            out += p if isinstance(p, bytes) else json.dumps(p, ensure_ascii=False).encode("utf-8")[1:-1]
        return out + b'"'


class Pairs:
    """An object with an explicit member list, so a key may appear twice."""

    def __init__(self, *pairs):
        self.pairs = pairs


def ser(v, level=0):
    pad = b"  " * (level + 1)
    end = b"  " * level
    if isinstance(v, Raw):
        return v.b
    if isinstance(v, Str):
        return v.encode()
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).encode("utf-8")
    if v is None:
        return b"null"
    if isinstance(v, bool):
        return b"true" if v else b"false"
    if isinstance(v, int):
        return str(v).encode()
    if isinstance(v, float):
        return repr(v).encode()
    if isinstance(v, (dict, Pairs)):
        items = list(v.items()) if isinstance(v, dict) else list(v.pairs)
        if not items:
            return b"{}"
        return (b"{\n" + b",\n".join(pad + ser(k) + b": " + ser(x, level + 1) for k, x in items)
                + b"\n" + end + b"}")
    if isinstance(v, list):
        if not v:
            return b"[]"
        return b"[\n" + b",\n".join(pad + ser(x, level + 1) for x in v) + b"\n" + end + b"]"
    raise TypeError(type(v))


def body(v):
    return v if isinstance(v, bytes) else ser(v) + b"\n"


# --- base messages -----------------------------------------------------------------------

EXAMPLE = {
    "schema_version": 1,
    "job_id": "bk-2026-11-22-0001",
    "vm": {"name": "pgtest1", "path": "/DatabanxDC/vm/pgtest1", "id": "vm-1234"},
    "backup_type": "full",
    "repository_id": "repo-001",
    "credential_id": "vcenter-main",
    "policy_id": "gold",
    "tags": {"team": "db"},
    "disks": [
        {"key": 2000, "size_bytes": 107374182400, "label": "Hard disk 1"},
        {"key": 2001, "size_bytes": 5368709120},
        {"key": 16000, "size_bytes": 1073741824},
    ],
}

CHANGE_ID_2000 = "52 de c0 d9 98 ae e0 6b-bd 5b 7d 4e 94 1c 2e 3a/12"
CHANGE_ID_2001 = "52 de c0 d9 98 ae e0 6b-bd 5b 7d 4e 94 1c 2e 3b/7"


def full():
    """The CONTRACT.md §2 example: a valid full job with three disks."""
    return copy.deepcopy(EXAMPLE)


def incremental():
    """A valid incremental job: both disks based on the previous backup."""
    m = full()
    m["job_id"] = "bk-2026-11-23-0001"
    m["backup_type"] = "incremental"
    m["disks"] = [
        {"key": 2000, "size_bytes": 107374182400, "label": "Hard disk 1",
         "parent_path": "vm-1234/2000/bk-2026-11-22-0001.qcow2", "previous_change_id": CHANGE_ID_2000},
        {"key": 2001, "size_bytes": 5368709120,
         "parent_path": "vm-1234/2001/bk-2026-11-22-0001.qcow2", "previous_change_id": CHANGE_ID_2001},
    ]
    return m


def minimal():
    return {
        "schema_version": 1,
        "job_id": "bk-1",
        "vm": {"name": "pgtest1", "path": "/DatabanxDC/vm/pgtest1"},
        "backup_type": "full",
        "repository_id": "repo-001",
        "credential_id": "vcenter-main",
        "disks": [{"key": 2000, "size_bytes": 1073741824}],
    }


def with_(m, path, value):
    """Sets m[path] (dotted, integers index lists) and returns m; value DELETE removes it."""
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = m
    for p in parts[:-1]:
        node = node[p]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return m


DELETE = object()


def f(path, value):
    return with_(full(), path, value)


def inc(path, value):
    return with_(incremental(), path, value)


def disks(n, base=2000):
    return [{"key": base + i, "size_bytes": 1073741824} for i in range(n)]


def padded_to(m, total):
    """m with an unknown field x_padding sized so the body is exactly `total` bytes."""
    m = copy.deepcopy(m)
    m["x_padding"] = ""
    n = len(body(m))
    m["x_padding"] = "x" * (total - n)
    b = body(m)
    assert len(b) == total, (len(b), total)
    return b


def nested_arrays(depth):
    return Raw("[" * depth + "]" * depth)


def nested_objects(depth):
    return Raw('{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1))


# Strings whose length counts code points: 2-, 3- and 4-byte UTF-8 characters.
MB3 = "é€😀"          # 3 code points, 9 bytes
EMOJI = "😀"


def mb(n):
    return (MB3 * (n // 3 + 1))[:n]


# --- the cases -----------------------------------------------------------------------------

CASES = []


def valid(name, v):
    CASES.append(("valid-" + name, body(v), None))


def invalid(name, v, *expect):
    assert expect, name
    CASES.append(("invalid-" + name, body(v), list(expect)))


# The contract's own example, and shapes of whole messages.
valid("contract-example", full())
valid("minimal-one-disk", minimal())
valid("disks-64", f("disks", disks(64)))
valid("disks-unordered-keys", f("disks", [{"key": 16000, "size_bytes": 512}, {"key": 2000, "size_bytes": 512},
                                           {"key": 3000, "size_bytes": 512}, {"key": 31000, "size_bytes": 512}]))
valid("incremental-all-disks-based", incremental())
valid("incremental-one-based-one-new", with_(incremental(), "disks.1", {"key": 2001, "size_bytes": 5368709120}))
valid("unknown-fields-everywhere", {
    "schema_version": 1,
    "x_trace": {"id": "abc", "spans": [1, 2.5, None, True, {"deep": []}]},
    "job_id": "bk-2026-11-22-0001",
    "vm": {"name": "pgtest1", "path": "/DatabanxDC/vm/pgtest1", "folder": "prod",
           "disks": "not the disks: unknown at this level", "job_id": "x:y"},
    "backup_type": "full",
    "repository_id": "repo-001",
    "credential_id": "vcenter-main",
    "disks": [{"key": 2000, "size_bytes": 512, "controller": "scsi0", "job_id": "a b:c",
               "unit": {"bus": 0, "slot": 1}}],
    "key": "not a disk key: unknown at the top level",
    "parent_path": "/absolute/../unknown/at/the/top",
    "priority": -1,
})
valid("unknown-field-control-chars", f("x_note", "line1\nline2\u0000\u007f\u0085end"))
valid("unknown-field-huge-numbers", f("x_numbers", [Raw("1e400"), Raw("-1e400"), Raw("1" * 5000),
                                                      Raw("0.000000000000000000000000001")]))
valid("whitespace-everywhere",
      b" \t\r\n" + json.dumps(full(), separators=(" \t,\r\n ", "\n:\t")).encode() + b"\r\n\t ")
valid("compact", json.dumps(full(), separators=(",", ":")).encode())
valid("string-escapes", with_(f("vm.path", Str(b"\\/DatabanxDC\\/vm\\/pg\\u0074est1")),
                              "vm.name", Str(b"pg \\\"t\\\\e\\u0073t\\\" 1")))

# Duplicate object keys: the last one wins.
valid("duplicate-key-last-wins", Pairs(*([("job_id", "bk:bad")] + list(full().items()))))
invalid("duplicate-key-last-wins", Pairs(*(list(full().items()) + [("job_id", "bk:bad")])), "job_id: charset")
invalid("duplicate-key-vm-replaced", Pairs(*(list(full().items()) + [("vm", {"path": "/DC/vm/x"})])),
        "vm.name: required")
valid("tags-33-members-32-distinct", f("tags", Pairs(*([("t%02d" % i, "v") for i in range(32)] + [("t00", "w")]))))

# schema_version
valid("schema-version-float-integral", f("schema_version", 1.0))
valid("schema-version-exponent", f("schema_version", Raw("1e0")))
invalid("schema-version-2", f("schema_version", 2), "schema_version: const")
invalid("schema-version-0", f("schema_version", 0), "schema_version: const")
invalid("schema-version-string", f("schema_version", "1"), "schema_version: type")
invalid("schema-version-fraction", f("schema_version", 1.5), "schema_version: type")
invalid("schema-version-bool", f("schema_version", True), "schema_version: type")
invalid("schema-version-null", f("schema_version", None), "schema_version: type")

# Every required field, one file each.
for fld in ["schema_version", "job_id", "vm", "backup_type", "repository_id", "credential_id", "disks"]:
    invalid("missing-" + fld.replace("_", "-"), f(fld, DELETE), "%s: required" % fld)
invalid("missing-vm-name", f("vm.name", DELETE), "vm.name: required")
invalid("missing-vm-path", f("vm.path", DELETE), "vm.path: required")
invalid("missing-disk-key", f("disks.1.key", DELETE), "disks[1].key: required")
invalid("missing-disk-size-bytes", f("disks.0.size_bytes", DELETE), "disks[0].size_bytes: required")
invalid("missing-everything", {}, *["%s: required" % k for k in
                                    ["schema_version", "job_id", "vm", "backup_type", "repository_id",
                                     "credential_id", "disks"]])

# job_id, repository_id, credential_id: [A-Za-z0-9][A-Za-z0-9._-]*, 1-128
valid("job-id-128", f("job_id", ("bk-2026-11-22." * 10)[:127] + "9"))
valid("job-id-one-char", f("job_id", "7"))
valid("job-id-whole-alphabet", f("job_id", "Az09._-AZaz.09__--..x"))
invalid("job-id-129", f("job_id", "b" * 129), "job_id: max_length")
invalid("job-id-empty", f("job_id", ""), "job_id: min_length")
invalid("job-id-leading-dot", f("job_id", ".bk-1"), "job_id: charset")
invalid("job-id-leading-dash", f("job_id", "-bk-1"), "job_id: charset")
invalid("job-id-leading-underscore", f("job_id", "_bk-1"), "job_id: charset")
invalid("job-id-dotdot", f("job_id", ".."), "job_id: charset")
invalid("job-id-colon", f("job_id", "bk:2026"), "job_id: charset")
invalid("job-id-slash", f("job_id", "bk/2026"), "job_id: charset")
invalid("job-id-space", f("job_id", "bk 2026"), "job_id: charset")
invalid("job-id-unicode", f("job_id", "bk-é"), "job_id: charset")
invalid("job-id-fullwidth-digit", f("job_id", "bk-\uff11"), "job_id: charset")
invalid("job-id-nul-escape", f("job_id", Str("bk-1", b"\\u0000", "x")), "job_id: charset")
invalid("job-id-trailing-newline", f("job_id", "bk-1\n"), "job_id: charset")
invalid("job-id-129-with-colon", f("job_id", "bk:" + "a" * 126), "job_id: charset", "job_id: max_length")
invalid("job-id-number", f("job_id", 20261122), "job_id: type")
invalid("job-id-null", f("job_id", None), "job_id: type")
valid("repository-id-128", f("repository_id", "r" * 128))
invalid("repository-id-empty", f("repository_id", ""), "repository_id: min_length")
invalid("repository-id-colon", f("repository_id", "repo:001"), "repository_id: charset")
invalid("repository-id-array", f("repository_id", ["repo-001"]), "repository_id: type")
invalid("credential-id-traversal", f("credential_id", "../../etc/shadow"), "credential_id: charset")
invalid("credential-id-129", f("credential_id", "c" * 129), "credential_id: max_length")

# vm
invalid("vm-not-object", f("vm", "pgtest1"), "vm: type")
invalid("vm-array", f("vm", [{"name": "pgtest1", "path": "/x"}]), "vm: type")
invalid("vm-null", f("vm", None), "vm: type")
valid("vm-without-id", f("vm.id", DELETE))
valid("vm-name-one-char", f("vm.name", "x"))
valid("vm-name-spaces-commas-slashes", f("vm.name", "db01, primary / EU west (old)"))
valid("vm-name-quotes", f("vm.name", "the \"prod\" db's box `x`"))
valid("vm-name-dotdot", f("vm.name", "../../etc/passwd"))
valid("vm-name-emoji", f("vm.name", "db \U0001F418 prod \U0001F680"))
valid("vm-name-255-multibyte", f("vm.name", mb(255)))
valid("vm-name-255-emoji", f("vm.name", EMOJI * 255))
valid("vm-name-surrogate-pair-escape", f("vm.name", Str("db ", b"\\ud83d\\ude00", " prod")))
valid("vm-name-nbsp-after-c1", f("vm.name", "a\u00a0b"))
valid("vm-name-line-separator", f("vm.name", "a\u2028b\u2029c"))
valid("vm-name-zero-width-no-break-space", f("vm.name", "\ufeffpgtest1"))
valid("vm-name-nul-lookalike", f("vm.name", "\\u0000 is not a NUL here"))
invalid("vm-name-256-multibyte", f("vm.name", mb(256)), "vm.name: max_length")
invalid("vm-name-256-ascii", f("vm.name", "n" * 256), "vm.name: max_length")
invalid("vm-name-empty", f("vm.name", ""), "vm.name: min_length")
invalid("vm-name-number", f("vm.name", 42), "vm.name: type")
invalid("vm-name-nul-escape", f("vm.name", Str("pg", b"\\u0000", "test1")), "vm.name: control_chars")
invalid("vm-name-tab-escape", f("vm.name", Str("pg", b"\\t", "test1")), "vm.name: control_chars")
invalid("vm-name-u001f-escape", f("vm.name", Str("pg", b"\\u001F", "test1")), "vm.name: control_chars")
invalid("vm-name-del-escape", f("vm.name", Str("pg", b"\\u007f", "test1")), "vm.name: control_chars")
invalid("vm-name-del-raw", f("vm.name", Str("pg", b"\x7f", "test1")), "vm.name: control_chars")
invalid("vm-name-c1-escape", f("vm.name", Str("pg", b"\\u0085", "test1")), "vm.name: control_chars")
invalid("vm-name-c1-raw", f("vm.name", Str("pg", b"\xc2\x85", "test1")), "vm.name: control_chars")
invalid("vm-name-u009f-raw", f("vm.name", Str("pg", b"\xc2\x9f", "test1")), "vm.name: control_chars")
invalid("vm-name-256-with-control", f("vm.name", "\u0080" + "n" * 255), "vm.name: control_chars",
        "vm.name: max_length")
valid("vm-path-1024-multibyte", f("vm.path", "/" + mb(1023)))
invalid("vm-path-1025", f("vm.path", "/" + "p" * 1024), "vm.path: max_length")
invalid("vm-path-empty", f("vm.path", ""), "vm.path: min_length")
invalid("vm-path-newline", f("vm.path", "/DC/vm/pg\ntest1"), "vm.path: control_chars")
invalid("vm-path-object", f("vm.path", {"dc": "DC"}), "vm.path: type")
valid("vm-id-128", f("vm.id", "5" * 128))
invalid("vm-id-129", f("vm.id", "5" * 129), "vm.id: max_length")
invalid("vm-id-empty", f("vm.id", ""), "vm.id: min_length")
invalid("vm-id-null", f("vm.id", None), "vm.id: type")
invalid("vm-id-control", f("vm.id", "vm-1234\r"), "vm.id: control_chars")

# backup_type
invalid("backup-type-other", f("backup_type", "differential"), "backup_type: enum")
invalid("backup-type-case", f("backup_type", "Full"), "backup_type: enum")
invalid("backup-type-empty", f("backup_type", ""), "backup_type: enum")
invalid("backup-type-number", f("backup_type", 1), "backup_type: type")

# policy_id
valid("policy-id-128-multibyte", f("policy_id", mb(128)))
invalid("policy-id-empty", f("policy_id", ""), "policy_id: min_length")
invalid("policy-id-129", f("policy_id", "g" * 129), "policy_id: max_length")
invalid("policy-id-null", f("policy_id", None), "policy_id: type")
invalid("policy-id-control", f("policy_id", "gold\u001b[0m"), "policy_id: control_chars")

# tags
valid("tags-empty", f("tags", {}))
valid("tags-32", f("tags", {"t%02d" % i: "v%d" % i for i in range(32)}))
valid("tag-key-64", f("tags", {"k" * 64: "v"}))
valid("tag-key-64-multibyte", f("tags", {mb(64): "v"}))
valid("tag-key-unicode-and-spaces", f("tags", {"équipe de garde": "db", "cost.center": "4711"}))
valid("tag-value-256-multibyte", f("tags", {"team": mb(256)}))
valid("tag-value-empty", f("tags", {"team": ""}))
invalid("tags-33", f("tags", {"t%02d" % i: "v" for i in range(33)}), "tags: max_properties")
invalid("tags-array", f("tags", ["team", "db"]), "tags: type")
invalid("tags-string", f("tags", "team=db"), "tags: type")
invalid("tag-key-empty", f("tags", {"": "db"}), 'tags[""]: key_min_length')
invalid("tag-key-65", f("tags", {"k." + "a" * 63: "v"}), 'tags["k.%s"]: key_max_length' % ("a" * 63))
invalid("tag-key-control", f("tags", {"a\u0001b": "v"}), 'tags["a\\u0001b"]: key_control_chars')
invalid("tag-value-number", f("tags", {"team": 7}), "tags.team: type")
invalid("tag-value-null", f("tags", {"team": None}), "tags.team: type")
invalid("tag-value-object", f("tags", {"team": {"name": "db"}}), "tags.team: type")
invalid("tag-value-257", f("tags", {"team": "v" * 257}), "tags.team: max_length")
invalid("tag-value-control", f("tags", {"team": "db\u0085"}), "tags.team: control_chars")
invalid("tag-value-type-key-with-space", f("tags", {"cost center": 4711}), 'tags["cost center"]: type')
invalid("tag-value-type-key-with-quote", f("tags", {'say "hi"': False}), 'tags["say \\"hi\\""]: type')

# disks: the array
invalid("disks-empty", f("disks", []), "disks: min_items")
invalid("disks-65", f("disks", disks(65)), "disks: max_items")
invalid("disks-object", f("disks", {"0": {"key": 2000, "size_bytes": 512}}), "disks: type")
invalid("disks-null", f("disks", None), "disks: type")
invalid("disk-not-object", f("disks.1", 2001), "disks[1]: type")
invalid("disk-null", f("disks.0", None), "disks[0]: type")
invalid("disk-array", f("disks.2", [16000, 1073741824]), "disks[2]: type")

# disks[].key
valid("disk-key-1", f("disks.0.key", 1))
valid("disk-key-2147483647", f("disks.0.key", 2147483647))
valid("disk-key-float-integral", f("disks.0.key", 2000.0))
valid("disk-key-exponent", f("disks.0.key", Raw("2e3")))
valid("disk-key-exponent-fraction-form", f("disks.0.key", Raw("2.0E+3")))
invalid("disk-key-string", f("disks.0.key", "2000"), "disks[0].key: type")
invalid("disk-key-fraction", f("disks.0.key", 2000.5), "disks[0].key: type")
invalid("disk-key-bool", f("disks.0.key", True), "disks[0].key: type")
invalid("disk-key-null", f("disks.0.key", None), "disks[0].key: type")
invalid("disk-key-huge-exponent", f("disks.0.key", Raw("1e400")), "disks[0].key: type")
invalid("disk-key-0", f("disks.0.key", 0), "disks[0].key: minimum")
invalid("disk-key-negative", f("disks.0.key", -2000), "disks[0].key: minimum")
invalid("disk-key-2147483648", f("disks.0.key", 2147483648), "disks[0].key: maximum")
invalid("disk-key-wraps-uint32", f("disks.0.key", 2 ** 32 + 2000), "disks[0].key: maximum")
invalid("disk-key-2pow64", f("disks.0.key", 2 ** 64), "disks[0].key: maximum")
invalid("disk-key-duplicate", f("disks.1.key", 2000), "disks[1].key: unique")
invalid("disk-key-duplicate-twice", f("disks", [{"key": 2000, "size_bytes": 512}, {"key": 2001, "size_bytes": 512},
                                                {"key": 2000, "size_bytes": 512}, {"key": 2000, "size_bytes": 512}]),
        "disks[2].key: unique", "disks[3].key: unique")
invalid("disk-key-duplicate-float-form", f("disks.2.key", 2001.0), "disks[2].key: unique")
invalid("disk-key-duplicate-in-64", with_(f("disks", disks(64)), "disks.63.key", 2000), "disks[63].key: unique")

# disks[].size_bytes
valid("size-512", f("disks.0.size_bytes", 512))
valid("size-64tib", f("disks.0.size_bytes", TIB64))
valid("size-float-integral", f("disks.0.size_bytes", 1024.0))
valid("size-exponent", f("disks.0.size_bytes", Raw("1.073741824E9")))
valid("size-odd-gib", f("disks.0.size_bytes", 1073741824 + 512))
invalid("size-0", f("disks.0.size_bytes", 0), "disks[0].size_bytes: minimum")
invalid("size-1", f("disks.0.size_bytes", 1), "disks[0].size_bytes: minimum", "disks[0].size_bytes: multiple_of")
invalid("size-511", f("disks.0.size_bytes", 511), "disks[0].size_bytes: minimum", "disks[0].size_bytes: multiple_of")
invalid("size-negative-512", f("disks.0.size_bytes", -512), "disks[0].size_bytes: minimum")
invalid("size-not-multiple", f("disks.0.size_bytes", 1073741824 + 100), "disks[0].size_bytes: multiple_of")
invalid("size-exponent-not-multiple", f("disks.0.size_bytes", Raw("1e3")), "disks[0].size_bytes: multiple_of")
invalid("size-64tib-plus-512", f("disks.0.size_bytes", TIB64 + 512), "disks[0].size_bytes: maximum")
invalid("size-64tib-plus-1", f("disks.0.size_bytes", TIB64 + 1), "disks[0].size_bytes: maximum",
        "disks[0].size_bytes: multiple_of")
invalid("size-2pow53-plus-1", f("disks.0.size_bytes", 2 ** 53 + 1), "disks[0].size_bytes: maximum",
        "disks[0].size_bytes: multiple_of")
invalid("size-2pow63", f("disks.0.size_bytes", 2 ** 63), "disks[0].size_bytes: maximum")
invalid("size-2pow64", f("disks.0.size_bytes", 2 ** 64), "disks[0].size_bytes: maximum")
invalid("size-string", f("disks.0.size_bytes", "1073741824"), "disks[0].size_bytes: type")
invalid("size-fraction", f("disks.0.size_bytes", 512.5), "disks[0].size_bytes: type")

# disks[].label
valid("label-255-multibyte", f("disks.0.label", mb(255)))
valid("label-empty", f("disks.0.label", ""))
invalid("label-256", f("disks.0.label", "L" * 256), "disks[0].label: max_length")
invalid("label-escape-sequence", f("disks.0.label", "Hard disk \u001b[31m1"), "disks[0].label: control_chars")
invalid("label-number", f("disks.0.label", 1), "disks[0].label: type")

# max_duration_s
valid("max-duration-60", f("max_duration_s", 60))
valid("max-duration-2592000", f("max_duration_s", 2592000))
valid("max-duration-float-integral", f("max_duration_s", 3600.0))
invalid("max-duration-59", f("max_duration_s", 59), "max_duration_s: minimum")
invalid("max-duration-2592001", f("max_duration_s", 2592001), "max_duration_s: maximum")
invalid("max-duration-fraction", f("max_duration_s", 60.5), "max_duration_s: type")
invalid("max-duration-string", f("max_duration_s", "3600"), "max_duration_s: type")
invalid("max-duration-nan", body(f("max_duration_s", Raw("NaN"))), "$: invalid_json")

# Full and incremental rules.
invalid("incremental-no-base", with_(incremental(), "disks", [{"key": 2000, "size_bytes": 512},
                                                             {"key": 2001, "size_bytes": 512}]),
        "disks: incremental_base")
invalid("incremental-parent-path-only", with_(incremental(), "disks", [
    {"key": 2000, "size_bytes": 512, "parent_path": "vm-1234/2000/bk-1.qcow2"}]),
    "disks: incremental_base", "disks[0].previous_change_id: required")
invalid("incremental-change-id-only", with_(incremental(), "disks", [
    {"key": 2000, "size_bytes": 512, "previous_change_id": CHANGE_ID_2000}]),
    "disks: incremental_base", "disks[0].parent_path: required")
invalid("incremental-parent-path-only-beside-based", inc("disks.1.previous_change_id", DELETE),
        "disks[1].previous_change_id: required")
invalid("incremental-change-id-only-beside-based", inc("disks.1.parent_path", DELETE),
        "disks[1].parent_path: required")
invalid("full-with-parent-path", f("disks.1.parent_path", "vm-1234/2001/bk-1.qcow2"),
        "disks[1].parent_path: forbidden_in_full")
invalid("full-with-change-id", f("disks.0.previous_change_id", CHANGE_ID_2000),
        "disks[0].previous_change_id: forbidden_in_full")
invalid("full-with-both", with_(incremental(), "backup_type", "full"),
        "disks[0].parent_path: forbidden_in_full", "disks[0].previous_change_id: forbidden_in_full",
        "disks[1].parent_path: forbidden_in_full", "disks[1].previous_change_id: forbidden_in_full")

# disks[].parent_path (decisions: 1-4096, no control chars, relative, no '..' component)
valid("parent-path-dotdot-prefix-name", inc("disks.0.parent_path", "a/..b/c.qcow2"))
valid("parent-path-dot-names", inc("disks.0.parent_path", "..a/b../.../.x/./c.qcow2"))
PARENT_4096 = ("d/" + mb(100) + "/") * 39
PARENT_4096 += "p" * (4096 - len(PARENT_4096) - len(".qcow2")) + ".qcow2"
assert len(PARENT_4096) == 4096
valid("parent-path-4096", inc("disks.0.parent_path", PARENT_4096))
valid("parent-path-spaces-unicode", inc("disks.0.parent_path", "Ünïcode VM/2000/bk 1.qcow2"))
invalid("parent-path-absolute", inc("disks.0.parent_path", "/srv/repo/vm-1234/2000/bk-1.qcow2"),
        "disks[0].parent_path: relative_path")
invalid("parent-path-dotdot-component", inc("disks.0.parent_path", "vm-1234/../../etc/x.qcow2"),
        "disks[0].parent_path: relative_path")
invalid("parent-path-dotdot-leading", inc("disks.0.parent_path", "../x.qcow2"), "disks[0].parent_path: relative_path")
invalid("parent-path-dotdot-only", inc("disks.0.parent_path", ".."), "disks[0].parent_path: relative_path")
invalid("parent-path-dotdot-trailing", inc("disks.0.parent_path", "vm-1234/.."), "disks[0].parent_path: relative_path")
invalid("parent-path-dotdot-after-double-slash", inc("disks.0.parent_path", "vm-1234//../x.qcow2"),
        "disks[0].parent_path: relative_path")
invalid("parent-path-dotdot-after-line-separator", inc("disks.0.parent_path", "a\u2028/../x.qcow2"),
        "disks[0].parent_path: relative_path")
invalid("parent-path-empty", inc("disks.0.parent_path", ""), "disks[0].parent_path: min_length")
invalid("parent-path-4097", inc("disks.0.parent_path", "p" * 4091 + ".qcow2"), "disks[0].parent_path: max_length")
invalid("parent-path-control", inc("disks.0.parent_path", "vm-1234/2000/bk-1.qcow2\n"),
        "disks[0].parent_path: control_chars")
invalid("parent-path-not-string", inc("disks.0.parent_path", 5), "disks[0].parent_path: type")
invalid("parent-path-absolute-and-dotdot", inc("disks.1.parent_path", "/../x.qcow2"),
        "disks[1].parent_path: relative_path")

# disks[].previous_change_id (decisions: 1-1024, no control chars)
valid("previous-change-id-1024", inc("disks.0.previous_change_id", mb(1024)))
valid("previous-change-id-star", inc("disks.0.previous_change_id", "*"))
invalid("previous-change-id-empty", inc("disks.0.previous_change_id", ""), "disks[0].previous_change_id: min_length")
invalid("previous-change-id-1025", inc("disks.0.previous_change_id", "c" * 1025),
        "disks[0].previous_change_id: max_length")
invalid("previous-change-id-control", inc("disks.1.previous_change_id", "52 de\t3a/7"),
        "disks[1].previous_change_id: control_chars")
invalid("previous-change-id-null", inc("disks.0.previous_change_id", None), "disks[0].previous_change_id: type")

# Several rules broken at once: every one is reported.
invalid("multiple-violations-full", with_(with_(with_(with_(with_(full(),
        "job_id", "bk:1"), "policy_id", ""), "vm", {"name": "", "path": "/DC/vm/x"}),
        "disks", [{"key": 2000, "size_bytes": 512, "parent_path": "a.qcow2"},
                  {"key": 2000, "size_bytes": TIB64 + 1}]), "schema_version", 2),
        "disks[0].parent_path: forbidden_in_full", "disks[1].key: unique", "disks[1].size_bytes: maximum",
        "disks[1].size_bytes: multiple_of", "job_id: charset", "policy_id: min_length", "schema_version: const",
        "vm.name: min_length")
invalid("multiple-violations-incremental", with_(with_(with_(incremental(), "credential_id", DELETE),
        "disks", [{"key": 0, "size_bytes": 1, "parent_path": "/abs.qcow2", "previous_change_id": ""},
                  {"key": 2001, "size_bytes": 512, "parent_path": "x.qcow2", "label": 7}]),
        "tags", {"t%02d" % i: "v" for i in range(33)}),
        "credential_id: required", "disks[0].key: minimum", "disks[0].previous_change_id: min_length",
        "disks[0].parent_path: relative_path", "disks[0].size_bytes: minimum", "disks[0].size_bytes: multiple_of",
        "disks[1].label: type", "disks[1].previous_change_id: required", "tags: max_properties")
invalid("multiple-violations-types", with_(with_(with_(with_(minimal(), "job_id", 7), "vm", "pg"),
        "disks", [{"key": "2000", "size_bytes": 512.5}, "disk"]), "max_duration_s", None),
        "disks[0].key: type", "disks[0].size_bytes: type", "disks[1]: type", "job_id: type",
        "max_duration_s: type", "vm: type")

# Top level not an object.
invalid("top-array", b"[" + ser(full()) + b"]\n", "$: type")
invalid("top-string", b'"backup.start"\n', "$: type")
invalid("top-null", b"null\n", "$: type")
invalid("top-number", b"1\n", "$: type")

# Not JSON, or not strict JSON.
J = ser(full())


def rep(b, old, new):
    assert old in b, old
    return b.replace(old, new, 1)


invalid("empty-file", b"", "$: invalid_json")
invalid("whitespace-only", b" \n", "$: invalid_json")
invalid("truncated", J[:len(J) // 2], "$: invalid_json")
invalid("truncated-in-string", J[:J.index(b"pgtest1") + 3], "$: invalid_json")
invalid("nan", body(f("disks.0.size_bytes", Raw("NaN"))), "$: invalid_json")
invalid("infinity-in-unknown-field", body(f("x_limit", Raw("Infinity"))), "$: invalid_json")
invalid("negative-infinity", body(f("max_duration_s", Raw("-Infinity"))), "$: invalid_json")
invalid("comment-line", rep(J, b'"job_id"', b'// the job\n  "job_id"') + b"\n", "$: invalid_json")
invalid("comment-block", rep(J, b'"job_id"', b'/* the job */ "job_id"') + b"\n", "$: invalid_json")
invalid("single-quotes", rep(J, b'"gold"', b"'gold'") + b"\n", "$: invalid_json")
invalid("unquoted-key", rep(J, b'"policy_id"', b"policy_id") + b"\n", "$: invalid_json")
invalid("trailing-comma-object", rep(J, b'"team": "db"', b'"team": "db",') + b"\n", "$: invalid_json")
invalid("trailing-comma-array", rep(J, b'"size_bytes": 1073741824\n    }', b'"size_bytes": 1073741824\n    },')
        + b"\n", "$: invalid_json")
invalid("trailing-garbage", J + b"\nx\n", "$: invalid_json")
invalid("two-objects", J + b"\n" + J + b"\n", "$: invalid_json")
invalid("trailing-nul-byte", J + b"\x00", "$: invalid_json")
invalid("leading-zero-number", body(f("disks.0.key", Raw("02000"))), "$: invalid_json")
invalid("plus-sign-number", body(f("disks.0.key", Raw("+2000"))), "$: invalid_json")
invalid("hex-number", body(f("disks.0.key", Raw("0x7d0"))), "$: invalid_json")
invalid("bare-decimal-point", body(f("disks.0.key", Raw("2000."))), "$: invalid_json")
invalid("leading-decimal-point", body(f("max_duration_s", Raw(".5e3"))), "$: invalid_json")
invalid("non-ascii-digits", body(f("disks.0.key", Raw("\u0662\u0660\u0660\u0660"))), "$: invalid_json")
invalid("capitalised-literal", body(f("x_flag", Raw("True"))), "$: invalid_json")
invalid("invalid-escape", body(f("vm.name", Str(b"pg\\x41"))), "$: invalid_json")
invalid("single-quote-escape", body(f("vm.name", Str(b"pg\\'s"))), "$: invalid_json")
invalid("short-unicode-escape", body(f("vm.name", Str(b"pg\\u00e"))), "$: invalid_json")
invalid("raw-control-in-string", body(f("vm.name", Str(b"pg\x01test1"))), "$: invalid_json")
invalid("raw-newline-in-string", body(f("vm.path", Str(b"/DC/vm/\npgtest1"))), "$: invalid_json")
invalid("raw-tab-in-string", body(f("vm.name", Str(b"pg\ttest1"))), "$: invalid_json")
invalid("raw-nul-in-string", body(f("vm.name", Str(b"pg\x00test1"))), "$: invalid_json")
invalid("form-feed-whitespace", rep(J, b'\n  "job_id"', b'\n\x0c  "job_id"'), "$: invalid_json")
invalid("nbsp-whitespace", rep(J, b'\n  "job_id"', b'\n\xc2\xa0"job_id"'), "$: invalid_json")

# Encodings: strict UTF-8, no BOM, no lone surrogates from escapes.
invalid("bom", b"\xef\xbb\xbf" + J + b"\n", "$: invalid_json")
invalid("utf16le", ("\ufeff" + J.decode()).encode("utf-16-le"), "$: invalid_json")
invalid("utf8-byte-ff", body(f("vm.name", Str(b"pg\xfftest1"))), "$: invalid_json")
invalid("utf8-overlong-slash", body(f("vm.name", Str(b"pg\xc0\xaftest1"))), "$: invalid_json")
invalid("utf8-overlong-nul", body(f("vm.name", Str(b"pg\xc0\x80test1"))), "$: invalid_json")
invalid("utf8-encoded-surrogate", body(f("vm.name", Str(b"pg\xed\xa0\x80test1"))), "$: invalid_json")
invalid("utf8-above-u10ffff", body(f("vm.name", Str(b"pg\xf4\x90\x80\x80test1"))), "$: invalid_json")
invalid("utf8-truncated-sequence", body(f("vm.name", Str(b"pg\xe2\x82"))), "$: invalid_json")
invalid("utf8-lone-continuation", body(f("vm.name", Str(b"pg\x80test1"))), "$: invalid_json")
invalid("utf8-latin1-in-unknown-field", body(f("x_note", Str(b"caf\xe9"))), "$: invalid_json")
invalid("utf8-invalid-in-key", body(f("tags", {Str(b"t\xffeam"): "db"})), "$: invalid_json")
invalid("lone-high-surrogate-escape", body(f("vm.name", Str(b"pg\\ud800test1"))), "$: invalid_json")
invalid("lone-low-surrogate-escape", body(f("vm.name", Str(b"pg\\udc00test1"))), "$: invalid_json")
invalid("reversed-surrogate-pair-escape", body(f("vm.name", Str(b"pg\\ude00\\ud83dtest1"))), "$: invalid_json")
invalid("high-surrogate-escape-at-end", body(f("vm.name", Str(b"pg\\ud83d"))), "$: invalid_json")
invalid("lone-surrogate-in-unknown-field", body(f("x_note", Str(b"\\udfff"))), "$: invalid_json")
invalid("lone-surrogate-in-key", body(f("x_map", {Str(b"k\\ud800"): 1})), "$: invalid_json")

# Nesting depth: at most 64, the top-level object counting as 1.
valid("depth-64-arrays", f("x_deep", nested_arrays(63)))
valid("depth-64-objects", f("x_deep", nested_objects(63)))
valid("depth-64-in-disk", f("disks.0.x_deep", nested_arrays(61)))
invalid("depth-65-arrays", body(f("x_deep", nested_arrays(64))), "$: invalid_json")
invalid("depth-65-objects", body(f("x_deep", nested_objects(64))), "$: invalid_json")
invalid("depth-65-in-disk", body(f("disks.0.x_deep", nested_arrays(62))), "$: invalid_json")
invalid("depth-100000", body(f("x_deep", nested_arrays(100000))), "$: invalid_json")

# Size limit: 262144 bytes of raw body.
valid("size-limit-exact", padded_to(full(), MAX_BODY))
invalid("size-limit-plus-one", padded_to(full(), MAX_BODY + 1), "$: too_large")
invalid("size-limit-garbage", b"\xff" * (MAX_BODY + 4096), "$: too_large")


# Bounded verdicts (CONTRACT §2): at most 100 violations are listed, then the line
# "$: truncated". bw lists the first 100 in its checking order (the top-level fields in the
# contract's order, then the tags, then the disks one by one, each disk's fields in order)
# and stops checking once one had to be left out; these expectations follow that order.
BAD_DISK = {"key": 0, "size_bytes": 1}  # 3 violations: key minimum, size minimum and multiple_of


def bad_disks(n):
    return [dict(BAD_DISK) for _ in range(n)]


def bad_disk_lines(n):
    return [line % i for i in range(n) for line in
            ("disks[%d].key: minimum", "disks[%d].size_bytes: minimum", "disks[%d].size_bytes: multiple_of")]


invalid("violations-100-listed-in-full", with_(f("disks", bad_disks(33)), "schema_version", 2),
        "schema_version: const", *bad_disk_lines(33))
invalid("violations-101-truncated", with_(with_(f("disks", bad_disks(33)), "schema_version", 2), "job_id", "bk:1"),
        "schema_version: const", "job_id: charset", *bad_disk_lines(33)[:98], "$: truncated")
invalid("violations-192-truncated", f("disks", bad_disks(64)), *bad_disk_lines(64)[:100], "$: truncated")
invalid("violations-tags-200-truncated", f("tags", {"t%03d" % i: i for i in range(200)}),
        "tags: max_properties", *["tags.t%03d: type" % i for i in range(99)], "$: truncated")


def empty_disks_at_limit():
    """The CONTRACT example whose disks are as many {} as fit in exactly MAX_BODY bytes."""
    m = full()
    m["disks"] = []
    head, tail = json.dumps(m, separators=(",", ":")).encode().split(b"[]")
    n = (MAX_BODY - len(head) - len(tail) - 1) // 3
    b = head + b"[" + b",".join([b"{}"] * n) + b"]" + tail
    b += b" " * (MAX_BODY - len(b))
    assert len(b) == MAX_BODY and n > 87000, (len(b), n)
    return b


# 87,000 disks of {}: 174,000 violations, which once made a 12.8 MB backup.rejected.
invalid("violations-empty-disks-at-size-limit", empty_disks_at_limit(), "disks: max_items",
        *[line % i for i in range(50) for line in ("disks[%d].key: required", "disks[%d].size_bytes: required")][:99],
        "$: truncated")


# --- writing -------------------------------------------------------------------------------

NAME = re.compile(r"^(valid|invalid)-[a-z0-9]+(-[a-z0-9]+)*$")
RULE = re.compile(r"^(type|required|const|enum|min_length|max_length|charset|control_chars|minimum|maximum|"
                  r"multiple_of|min_items|max_items|max_properties|key_min_length|key_max_length|"
                  r"key_control_chars|unique|forbidden_in_full|incremental_base|relative_path|"
                  r"invalid_json|too_large|truncated)$")


def main():
    names = [c[0] for c in CASES]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        sys.exit("duplicate case names: %s" % ", ".join(sorted(dups)))
    for name, _, expect in CASES:
        if not NAME.match(name):
            sys.exit("bad case name: %s" % name)
        for line in expect or []:
            path, _, rule = line.rpartition(": ")
            if not path or not RULE.match(rule):
                sys.exit("%s: bad expect line %r" % (name, line))
    for old in glob.glob(os.path.join(HERE, "valid-*.json")) + glob.glob(os.path.join(HERE, "invalid-*.json")) \
            + glob.glob(os.path.join(HERE, "invalid-*.expect")):
        os.remove(old)
    for name, raw, expect in CASES:
        with open(os.path.join(HERE, name + ".json"), "wb") as out:
            out.write(raw)
        if expect is not None:
            with open(os.path.join(HERE, name + ".expect"), "w", encoding="utf-8", newline="\n") as out:
                out.write("".join(line + "\n" for line in sorted(set(expect))))
    n_valid = sum(1 for c in CASES if c[2] is None)
    print("%d files: %d valid, %d invalid (+ %d .expect)" % (len(CASES), n_valid, len(CASES) - n_valid,
                                                             len(CASES) - n_valid))


if __name__ == "__main__":
    main()
