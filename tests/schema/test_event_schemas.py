#!/usr/bin/python3
"""Holds the event and SNA JSON Schemas (schemas/) to their examples (tests/schema/examples/).

Run:  /usr/bin/python3 tests/schema/test_event_schemas.py [REPO_ROOT]
Needs Debian's python3-jsonschema (4.10.x). Nothing is fetched from the network: every
schema is loaded from schemas/ and registered under its $id; any other remote $ref fails.

Checks:
  * every schema under schemas/ passes Draft202012Validator.check_schema, has the $id of its
    path and a unique one, and only patterns ecma_regex() can translate;
  * every schema in schemas/events/ and schemas/sna/ has at least one valid example;
  * every example is named <schema>.valid[-suffix].json or <schema>.invalid-<what>.json and
    names a known schema; valid ones pass the schema and cross_field_errors(), invalid ones
    are rejected by the schema itself;
  * cross_field_errors() catches the mutations in CROSS_FIELD_CASES;
  * backup.failed accepts each reason only with its retryable value (RETRYABLE, the table).
Prints one line per failure, then "N passed, M failed"; exits 1 on any failure.

Importable by other tests (e.g. the ones checking events published by the real worker):
  validator_for(name)        -> a Draft202012Validator (extended: ECMA-262 patterns,
                                x-uniqueKey, as schemas/backup.start.json states); name is an event name
                                ("backup.failed"), "envelope", or an SNA schema name
                                ("backup-start-request", "progress-response", "cleanup-request")
  cross_field_errors(name, doc) -> list of str: rules the schema cannot express
  check(name, doc)           -> list of str: schema errors + cross-field errors ([] = valid)
  rejected_event_id(raw)     -> "rejected/<FNV-1a 64 of the raw body bytes, 16 lower-case hex>"
"""

import copy
import datetime
import json
import os
import re
import sys

import jsonschema
from jsonschema import Draft202012Validator

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.path.dirname(os.path.dirname(HERE))
# Schemas that must have examples. Other schema files under schemas/ (e.g. backup.start)
# are still registered and meta-checked, but their examples live with their own tests.
EXAMPLE_DIRS = ("events", "sna")

EXAMPLE_RE = re.compile(r"^(?P<schema>.+?)\.(?P<kind>valid(?:-[A-Za-z0-9_-]+)?|invalid-[A-Za-z0-9_-]+)\.json$")

_root = DEFAULT_ROOT
_schemas = None  # name -> (path, schema dict); name = file name without .json
_store = None  # $id -> schema dict
_load_errors = []  # files under schemas/ that could not be registered
_validators = {}


def set_root(root):
    """Use the schemas of another checkout (drops cached schemas and validators)."""
    global _root, _schemas, _store
    _root = os.path.abspath(root)
    _schemas = None
    _store = None
    _load_errors.clear()
    _validators.clear()


def _load():
    global _schemas, _store
    if _schemas is not None:
        return
    schemas, store, errs = {}, {}, []
    base = os.path.join(_root, "schemas")
    for dirpath, _dirs, names in sorted(os.walk(base)):
        for fn in sorted(names):
            if not fn.endswith(".json"):
                continue
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, _root)
            try:
                with open(path, encoding="utf-8") as f:
                    schema = json.load(f)
            except (OSError, ValueError) as e:
                errs.append(f"{rel}: cannot load: {e}")
                continue
            name = fn[: -len(".json")]
            sid = schema.get("$id") if isinstance(schema, dict) else None
            if not isinstance(sid, str):
                errs.append(f"{rel}: no $id")
                continue
            if name in schemas:
                errs.append(f"{rel}: schema name {name} also in {schemas[name][0]}")
                continue
            if sid in store:
                errs.append(f"{rel}: duplicate $id {sid}")
                continue
            schemas[name] = (rel, schema)
            store[sid] = schema
    _load_errors[:] = errs
    _schemas, _store = schemas, store


from dialect import Validator, all_patterns as _all_patterns, ecma_regex  # noqa: E402,F401


def _no_network(uri):
    raise jsonschema.exceptions.RefResolutionError(
        f"refusing to fetch {uri}: not a local schema (check the $id and the $ref)")


def validator_for(name):
    """Returns a cached validator (Draft202012Validator extended with ECMA-262 patterns
    and x-uniqueKey, see above) for the schema called `name`.

    `name` is the schema file's name without .json: an event name ("backup.started"),
    "envelope", or an SNA body ("backup-start-request", "progress-response",
    "cleanup-request"). Raises KeyError for an unknown (or unloadable) name,
    jsonschema.exceptions.SchemaError when the schema is not a valid draft 2020-12 schema.
    $refs resolve only against the local schemas; validating raises RefResolutionError
    for a $ref that does not resolve locally.
    """
    v = _validators.get(name)
    if v is not None:
        return v
    _load()
    if name not in _schemas:
        raise KeyError(f"no schema named {name!r} under {_root}/schemas")
    schema = _schemas[name][1]
    Validator.check_schema(schema)
    resolver = jsonschema.RefResolver(
        base_uri=schema["$id"], referrer=schema, store=dict(_store),
        handlers={"http": _no_network, "https": _no_network, "ftp": _no_network, "file": _no_network})
    v = Validator(schema, resolver=resolver)
    _validators[name] = v
    return v


def schema_names():
    _load()
    return sorted(_schemas)


# ---------------------------------------------------------------- cross-field rules

def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def rejected_event_id(raw):
    """event_id of the backup.rejected event for the raw body `raw` (bytes or str as UTF-8)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    return "rejected/%016x" % fnv1a64(raw)


REJECTED_MAX_ERRORS = 100  # CONTRACT.md §2: errors[] of backup.rejected, then "truncated"


def _targets(disks):
    return ",".join(f"{d.get('key')}:{d.get('nbd_url')}" for d in disks)


def cross_field_errors(name, doc):
    """Rules the schemas cannot express. Assumes `doc` already passed the schema
    (it is defensive, but reports nothing useful about a malformed document)."""
    errs = []
    if not isinstance(doc, dict):
        return errs
    _load()
    rel = _schemas[name][0] if name in _schemas else ""
    if os.path.basename(os.path.dirname(rel)) == "events":
        event = doc.get("event")
        if name != "envelope" and event != name:
            errs.append(f"event: {event!r} is not {name!r}")
        ts = doc.get("occurred_at")
        if isinstance(ts, str):
            try:
                datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
            except ValueError:
                errs.append(f"occurred_at: {ts!r} is not a real date and time")
        job, eid, seq = doc.get("job_id"), doc.get("event_id"), doc.get("seq")
        if event == "backup.rejected":
            if isinstance(eid, str) and not re.fullmatch(r"rejected/[0-9a-f]{16}", eid):
                errs.append(f"event_id: {eid!r} is not rejected/<16 hex>")
            # CONTRACT §2: past 100 errors, the last entry is the one "truncated".
            errors = doc.get("errors")
            if isinstance(errors, list):
                at = [i for i, e in enumerate(errors) if isinstance(e, dict) and e.get("rule") == "truncated"]
                if (at and at != [REJECTED_MAX_ERRORS]) or (len(errors) == REJECTED_MAX_ERRORS + 1 and not at):
                    errs.append(f"errors: {len(errors)} entries, truncated at {at}: a truncated entry "
                                f"comes only last, after {REJECTED_MAX_ERRORS} others, and only then")
        elif isinstance(job, str) and isinstance(event, str):
            if event == "backup.progress":
                want = f"{job}/{event}/{seq}"
            elif event == "backup.disk.completed":
                want = f"{job}/{event}/{doc.get('key')}"
            else:
                want = f"{job}/{event}"
            if eid != want:
                errs.append(f"event_id: {eid!r}, expected {want!r}")
        disks = doc.get("disks")
        if event == "backup.started" and isinstance(disks, list):
            if doc.get("nbd_targets") != _targets(disks):
                errs.append(f"nbd_targets: {doc.get('nbd_targets')!r} does not list disks[] "
                            f"key:nbd_url in order ({_targets(disks)!r})")
            for i, d in enumerate(disks):
                if not isinstance(d, dict):
                    continue
                url = d.get("nbd_url", "")
                m = re.fullmatch(r"nbds?://(.+):(\d+)/(.+)", url) if isinstance(url, str) else None
                if not m or m.group(2) != str(d.get("nbd_port")) or m.group(3) != d.get("export_name"):
                    errs.append(f"disks[{i}].nbd_url: {url!r} does not match nbd_port/export_name")
        if event == "backup.progress" and isinstance(disks, list):
            for fld in ("bytes_transferred", "total_bytes"):
                s = sum(d.get(fld, 0) for d in disks if isinstance(d, dict))
                s = min(s, 2**63 - 1)  # the sums saturate (an SNA may report any byte count)
                if doc.get(fld) != s:
                    errs.append(f"{fld}: {doc.get(fld)!r} is not the sum over disks ({s})")
    elif name == "backup-start-request":
        disks = doc.get("disks")
        if isinstance(disks, list):
            if doc.get("nbd_targets") != _targets(disks):
                errs.append(f"nbd_targets: does not list disks[] key:nbd_url in order ({_targets(disks)!r})")
            first = next((d.get("previous_change_id") for d in disks
                          if isinstance(d, dict) and d.get("previous_change_id")), "")
            if doc.get("previous_change_id") != first:
                errs.append(f"previous_change_id: {doc.get('previous_change_id')!r} is not the "
                            f"first non-empty per-disk value {first!r}")
    return errs


def _path(err):
    """The error's location written like backup.rejected paths: disks[1].key, $ for the root."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".") or "$"


def _error_lines(err):
    return f"{_path(err)}: {err.message} [{err.validator}]"


def check(name, doc):
    """All problems of `doc` as the schema `name`: schema errors then cross-field errors."""
    v = validator_for(name)
    errs = [_error_lines(e) for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    if not errs:
        errs = cross_field_errors(name, doc)
    return errs


# Mutations of valid examples that only cross_field_errors() can catch: (example, mutate, why).
def _m_set(path, value):
    def f(doc):
        d = doc
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
    return f


CROSS_FIELD_CASES = [
    ("backup.accepted.valid", _m_set(["event_id"], "other-job/backup.accepted"), "event_id of another job"),
    ("backup.progress.valid", _m_set(["event_id"], "bk-2026-11-22-0001/backup.progress/99"), "progress id seq != seq"),
    ("backup.progress.valid", _m_set(["bytes_transferred"], 1), "bytes not the sum over disks"),
    ("backup.disk.completed.valid", _m_set(["event_id"], "bk-2026-11-22-0001/backup.disk.completed/2000"), "id key != key"),
    ("backup.started.valid", _m_set(["nbd_targets"], "2000:nbd://127.0.0.1:10100/x"), "targets not matching disks"),
    ("backup.started.valid", _m_set(["disks", 0, "nbd_port"], 10199), "nbd_port not in nbd_url"),
    ("backup.failed.valid", _m_set(["occurred_at"], "2026-02-30T10:00:00.000Z"), "no such date"),
    ("backup.failed.valid", _m_set(["event"], "backup.completed"), "event of another schema (with a matching id)"),
    ("backup-start-request.valid-2", _m_set(["previous_change_id"], "other"), "top-level change id not the first per-disk"),
    ("backup.rejected.valid-truncated", lambda d: d["errors"].insert(0, d["errors"].pop()), "truncated not last"),
    ("backup.rejected.valid-truncated", lambda d: d["errors"].pop(0), "100 errors ending with truncated"),
    ("backup.rejected.valid-truncated", lambda d: d["errors"].__setitem__(100, dict(d["errors"][0])),
     "101 errors without truncated"),
    ("backup.rejected.valid", lambda d: d["errors"].append({"path": "$", "rule": "truncated", "message": "x"}),
     "truncated after 2 errors"),
    ("backup-start-request.valid", _m_set(["nbd_targets"], "2000:nbd://127.0.0.1:10100/x"), "targets not matching disks"),
]


# Why each invalid example must be rejected: "<path> <keyword>[ <property>]", where path is
# written as in backup.rejected errors ("disks[0].status", "$" for the document), keyword is
# the JSON Schema keyword that must report it there, and property (for "required") the
# missing field. So an invalid example that fails for another reason (a typo) fails the test.
# Every invalid example needs an entry.
INVALID_EXPECT = {
    "envelope.invalid-event-name": "event pattern",
    "envelope.invalid-missing-worker-id": "$ required worker_id",
    "envelope.invalid-negative-seq": "seq minimum",
    "envelope.invalid-tag-value": "tags.team type",
    "envelope.invalid-vm-without-path": "vm required path",
    "backup.accepted.invalid-backup-type": "backup_type enum",
    "backup.accepted.invalid-empty-host": "host minLength",
    "backup.accepted.invalid-event-name": "event const",
    "backup.accepted.invalid-job-id-colon": "job_id pattern",
    "backup.accepted.invalid-job-id-trailing-newline": "job_id pattern",
    "backup.accepted.invalid-occurred-at-non-ascii-digits": "occurred_at pattern",
    "backup.accepted.invalid-job-id-null": "job_id type",
    "backup.accepted.invalid-missing-event-id": "$ required event_id",
    "backup.accepted.invalid-missing-vm": "$ required vm",
    "backup.accepted.invalid-occurred-at-no-millis": "occurred_at pattern",
    "backup.accepted.invalid-occurred-at-offset": "occurred_at pattern",
    "backup.accepted.invalid-schema-version": "schema_version const",
    "backup.accepted.invalid-seq": "seq const",
    "backup.started.invalid-disk-key-too-big": "disks[2].key maximum",
    "backup.started.invalid-duplicate-key": "disks[1].key x-uniqueKey",
    "backup.started.invalid-disk-key-zero": "disks[2].key minimum",
    "backup.started.invalid-disk-status": "disks[0].status const",
    "backup.started.invalid-event-id": "event_id pattern",
    "backup.started.invalid-export-name": "disks[0].export_name pattern",
    "backup.started.invalid-full-with-parent": "disks[1] not",
    "backup.started.invalid-incremental-without-parent": "disks[0] required parent_path",
    "backup.started.invalid-mode": "disks[0].mode enum",
    "backup.started.invalid-nbd-targets-empty": "nbd_targets pattern",
    "backup.started.invalid-nbd-targets": "nbd_targets pattern",
    "backup.progress.invalid-disk-status": "disks[0].status enum",
    "backup.progress.invalid-event-id-no-seq": "event_id pattern",
    "backup.progress.invalid-fractional-bytes": "total_bytes type",
    "backup.progress.invalid-negative-bytes": "bytes_transferred minimum",
    "backup.progress.invalid-percent": "percent maximum",
    "backup.progress.invalid-seq-zero": "seq minimum",
    "backup.disk.completed.invalid-actual-size-type": "actual_size type",
    "backup.disk.completed.invalid-check": "check const",
    "backup.disk.completed.invalid-empty-change-id": "change_id minLength",
    "backup.disk.completed.invalid-event-id-no-key": "event_id pattern",
    "backup.disk.completed.invalid-missing-key": "$ required key",
    "backup.disk.completed.invalid-virtual-size": "virtual_size multipleOf",
    "backup.completed.invalid-disk-without-check": "disks[1] required check",
    "backup.completed.invalid-duration": "duration_ms minimum",
    "backup.completed.invalid-no-disks": "disks minItems",
    "backup.failed.invalid-disk-status": "disks[2].status enum",
    "backup.failed.invalid-duplicate-key-float": "disks[1].key x-uniqueKey",
    "backup.failed.invalid-missing-disks": "$ required disks",
    "backup.failed.invalid-reason": "reason enum",
    "backup.failed.invalid-retryable-for-credential-error": "retryable const",
    "backup.failed.invalid-retryable-for-sna-failed": "retryable const",
    "backup.failed.invalid-retryable-type": "retryable type",
    "backup.failed.invalid-stage": "stage enum",
    "backup.cleanup.invalid-failed-action-not-pending": "pending minItems",
    "backup.cleanup.invalid-kind": "actions[0].kind pattern",
    "backup.cleanup.invalid-missing-pending": "$ required pending",
    "backup.cleanup.invalid-port": "actions[2].port maximum",
    "backup.cleanup.invalid-result": "actions[0].result enum",
    "backup.rejected.invalid-error-without-rule": "errors[0] required rule",
    "backup.rejected.invalid-102-errors": "errors maxItems",
    "backup.rejected.invalid-truncated-path": "errors[100].path const",
    "backup.rejected.invalid-two-truncated": "errors maxContains",
    "backup.rejected.invalid-event-id-job": "event_id pattern",
    "backup.rejected.invalid-event-id-upper-hex": "event_id pattern",
    "backup.rejected.invalid-job-id-absent": "$ required job_id",
    "backup.rejected.invalid-job-id": "job_id pattern",
    "backup.rejected.invalid-missing-event-id": "$ required event_id",
    "backup.rejected.invalid-no-errors": "errors minItems",
    "backup.rejected.invalid-reason": "reason enum",
    "backup.rejected.invalid-seq": "seq const",
    "backup.rejected.invalid-vm-control-char": "vm.name pattern",
    "backup-start-request.invalid-backup-type": "backup_type enum",
    "backup-start-request.invalid-duplicate-key": "disks[2].key x-uniqueKey",
    "backup-start-request.invalid-full-disk-with-change-id": "disks[0].previous_change_id const",
    "backup-start-request.invalid-full-with-change-id": "previous_change_id const",
    "backup-start-request.invalid-incremental-no-disk-change-id": "disks contains",
    "backup-start-request.invalid-incremental-without-change-id": "previous_change_id minLength",
    "backup-start-request.invalid-missing-password": "$ required vcenter_password",
    "backup-start-request.invalid-nbd-targets": "nbd_targets pattern",
    "backup-start-request.invalid-no-disks": "disks minItems",
    "backup-start-request.invalid-size-bytes": "disks[0].size_bytes multipleOf",
    "backup-start-request.invalid-tls-nbd-urls": "nbd_targets pattern",
    "backup-start-request.invalid-nbds-without-tls": "nbd_targets pattern",
    "backup-start-request.invalid-tls-short-psk": "nbd_tls.psk pattern",
    "backup-start-request.invalid-tls-mode": "nbd_tls.mode const",
    "backup-start-request.invalid-tls-identity": "nbd_tls.identity pattern",
    "progress-response.invalid-change-id-control": "disks[0].change_id pattern",
    "progress-response.invalid-disk-status": "disks[0].status enum",
    "progress-response.invalid-missing-status": "$ required status",
    "progress-response.invalid-status": "status enum",
    "cleanup-request.invalid-action": "action const",
    "cleanup-request.invalid-missing-job-id": "$ required job_id",
}


def _all_errors(errs):
    for e in errs:
        yield e
        yield from _all_errors(e.context or [])


def _has_expected_error(errs, expect):
    parts = expect.split()
    path, keyword, prop = parts[0], parts[1], (parts[2] if len(parts) > 2 else None)
    for e in _all_errors(errs):
        if _path(e) == path and e.validator == keyword and (prop is None or f"{prop!r}" in e.message):
            return True
    return False


# CONTRACT.md §4, backup.failed reasons and whether a retry can help, copied from the table
# independently of the schema: every reason is tried with both values of retryable.
RETRYABLE = {
    "no_ports": True, "target_error": False, "credential_error": False,
    "qemu_nbd_failed": True, "check_failed": True, "cancelled": False,
    "internal_error": True, "sna_rejected": False, "sna_unavailable": True,
    "sna_failed": True, "sna_lost_job": True, "deadline_exceeded": True,
    "worker_shutdown": True, "worker_lost": True,
}


# ---------------------------------------------------------------- the test run

def run(root):
    set_root(root)
    passed, failed = 0, []

    def ok(cond, what):
        nonlocal passed
        if cond:
            passed += 1
        else:
            failed.append(what)

    names = schema_names()
    for e in _load_errors:
        ok(False, e)
    ok(bool(names), "no schemas found under schemas/")

    for name in names:
        rel, schema = _schemas[name]
        try:
            Draft202012Validator.check_schema(schema)
            ok(True, "")
        except jsonschema.exceptions.SchemaError as e:
            ok(False, f"{rel}: not a valid draft 2020-12 schema: {e.message} at {list(e.absolute_path)}")
        bad = []
        for pat in _all_patterns(schema):
            try:
                ecma_regex(pat)
            except (ValueError, re.error) as e:
                bad.append(str(e))
        ok(not bad, f"{rel}: untranslatable pattern: " + "; ".join(bad))
        ok(schema.get("$schema") == "https://json-schema.org/draft/2020-12/schema",
           f"{rel}: $schema is not draft 2020-12")
        want_id = "https://bw.invalid/" + rel.replace(os.sep, "/")
        ok(schema.get("$id") == want_id, f"{rel}: $id {schema.get('$id')!r}, expected {want_id!r}")
        if name.startswith("backup.") and rel.startswith(os.path.join("schemas", "events")):
            pinned = schema.get("properties", {}).get("event", {}).get("const")
            ok(pinned == name, f"{rel}: event not pinned to {name!r} with const")

    exdir = os.path.join(root, "tests", "schema", "examples")
    examples = sorted(f for f in os.listdir(exdir) if f.endswith(".json")) if os.path.isdir(exdir) else []
    have_valid = set()
    by_name = {}
    for fn in examples:
        m = EXAMPLE_RE.match(fn)
        if not m:
            ok(False, f"examples/{fn}: name is not <schema>.valid[-x].json or <schema>.invalid-<what>.json")
            continue
        name, kind = m.group("schema"), m.group("kind")
        if name not in (_schemas or {}):
            ok(False, f"examples/{fn}: no schema named {name!r}")
            continue
        try:
            with open(os.path.join(exdir, fn), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            ok(False, f"examples/{fn}: cannot load: {e}")
            continue
        by_name[fn[: -len(".json")]] = (name, doc)
        try:
            v = validator_for(name)
            schema_errs = list(v.iter_errors(doc))
        except jsonschema.exceptions.SchemaError:
            ok(False, f"examples/{fn}: not checked: schemas/{name}.json is not a valid schema")
            continue
        except Exception as e:  # an unresolvable $ref is a schema bug: report, go on
            ok(False, f"examples/{fn}: validation crashed: {type(e).__name__}: {e}")
            continue
        if kind.startswith("valid"):
            have_valid.add(name)
            try:
                msgs = [_error_lines(e) for e in schema_errs] or cross_field_errors(name, doc)
            except Exception as e:
                msgs = [f"cross_field_errors crashed: {type(e).__name__}: {e}"]
            ok(not msgs, f"examples/{fn}: valid example rejected: " + "; ".join(msgs))
        else:
            base = fn[: -len(".json")]
            expect = INVALID_EXPECT.get(base)
            if not schema_errs:
                ok(False, f"examples/{fn}: invalid example accepted by schemas/{name}.json")
            elif expect is None:
                ok(False, f"examples/{fn}: no entry in INVALID_EXPECT (errors: "
                          + "; ".join(_error_lines(e) for e in schema_errs) + ")")
            else:
                ok(_has_expected_error(schema_errs, expect),
                   f"examples/{fn}: rejected, but not with {expect!r}: "
                   + "; ".join(_error_lines(e) for e in schema_errs))

    for base in sorted(set(INVALID_EXPECT) - set(by_name)):
        ok(False, f"INVALID_EXPECT names {base}, which is not in tests/schema/examples/")

    for name in names:
        rel = _schemas[name][0]
        if os.path.basename(os.path.dirname(rel)) in EXAMPLE_DIRS:
            ok(name in have_valid, f"{rel}: no valid example in tests/schema/examples/")

    for base, mutate, why in CROSS_FIELD_CASES:
        if base not in by_name:
            ok(False, f"cross-field case {why!r}: example {base} missing")
            continue
        name, doc = by_name[base]
        doc = copy.deepcopy(doc)
        mutate(doc)
        try:
            ok(bool(check(name, doc)), f"cross-field case {base} + {why}: not detected")
        except Exception as e:
            ok(False, f"cross-field case {base} + {why}: crashed: {type(e).__name__}: {e}")

    if "backup.failed.valid" in by_name:
        _name, base_doc = by_name["backup.failed.valid"]
        for reason, retryable in sorted(RETRYABLE.items()):
            for value in (retryable, not retryable):
                doc = dict(base_doc, reason=reason, retryable=value)
                try:
                    errs = check("backup.failed", doc)
                except Exception as e:
                    errs = [f"crashed: {type(e).__name__}: {e}"]
                if value == retryable:
                    ok(not errs, f"backup.failed reason {reason} retryable {value}: rejected: " + "; ".join(errs))
                else:
                    ok(any(err.startswith("retryable:") for err in errs),
                       f"backup.failed reason {reason} retryable {value}: not rejected on retryable")
    else:
        ok(False, "retryable table: example backup.failed.valid missing")

    # The FNV-1a implementation against published test vectors.
    ok(rejected_event_id(b"") == "rejected/cbf29ce484222325", "fnv1a64('') wrong")
    ok(rejected_event_id(b"a") == "rejected/af63dc4c8601ec8c", "fnv1a64('a') wrong")
    ok(rejected_event_id("foobar") == "rejected/85944171f73967e8", "fnv1a64('foobar') wrong")

    for f in failed:
        print("FAIL:", f)
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(run(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT))
