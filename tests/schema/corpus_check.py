#!/usr/bin/python3
"""Schema-only self-check of the backup.start corpus (no bw-ctl needed).

Usage: corpus_check.py [--schema SCHEMA] [CORPUS_DIR]
  (defaults: schemas/backup.start.json and tests/data/messages of this checkout)

Runs differential.check() over every CORPUS_DIR/*.json: each valid-* must be valid, each
invalid-* invalid with a non-empty, well-formed, sorted .expect whose document-level line
($: too_large / invalid_json / type) agrees with check(). Prints failures, then
`N passed, M failed`; exits 1 on any failure, 2 on usage errors.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import differential  # noqa: E402

DEFAULT_CORPUS = os.path.normpath(os.path.join(HERE, "..", "data", "messages"))

RULES = {
    "type", "required", "const", "enum", "min_length", "max_length", "charset", "control_chars",
    "minimum", "maximum", "multiple_of", "min_items", "max_items", "max_properties",
    "key_min_length", "key_max_length", "key_control_chars", "unique", "forbidden_in_full",
    "incremental_base", "relative_path", "invalid_json", "too_large", "truncated",
}
DOC_LEVEL = {"$: too_large": "too_large", "$: invalid_json": "invalid_json", "$: type": "invalid_message"}
PATH = re.compile(r'^(\$|[a-z_]+(\[\d+\])?(\.[A-Za-z0-9_-]+|\["(?:[^"\\]|\\.)*"\])*(\[\d+\])?)$')


def check_expect(name, lines, valid, reason, doc):
    problems = []
    if not lines:
        return ["empty .expect"]
    if lines != sorted(lines):
        problems.append(".expect is not sorted")
    if len(set(lines)) != len(lines):
        problems.append(".expect repeats a line")
    for line in lines:
        path, sep, rule = line.rpartition(": ")
        if not sep or rule not in RULES or not PATH.match(path):
            problems.append(".expect: malformed line %r" % line)
    code = reason.split(":", 1)[0] if reason else None
    doc_lines = [line for line in lines if line in DOC_LEVEL]
    if doc_lines:
        if len(lines) != 1:
            problems.append(".expect: %s must be the only line" % doc_lines[0])
        elif DOC_LEVEL[lines[0]] != code:
            problems.append(".expect says %r but check() says %s" % (lines[0], reason))
        elif lines[0] == "$: type" and isinstance(doc, dict):
            problems.append(".expect says '$: type' but the document is an object")
    elif code in ("too_large", "invalid_json"):
        problems.append("check() says %s; .expect should be the single line '$: %s'" % (reason, code))
    return problems


def check_file(corpus, name, schema):
    """The problems of corpus/name against schema: its name says valid or invalid, and an
    invalid one has an .expect that check() agrees with."""
    path = os.path.join(corpus, name)
    with open(path, "rb") as f:
        raw = f.read()
    valid, reason = differential.check(raw, schema)
    doc = None
    if reason is None or reason.startswith("invalid_message"):
        doc = differential.decode_strict(raw)
    expect_path = path[:-len(".json")] + ".expect"
    problems = []
    if name.startswith("valid-"):
        if not valid:
            problems.append("named valid, but check() says %s" % reason)
        if os.path.exists(expect_path):
            problems.append("a valid file has an .expect")
    elif name.startswith("invalid-"):
        if valid:
            problems.append("named invalid, but check() says valid")
        if not os.path.exists(expect_path):
            problems.append("no .expect")
        else:
            lines = differential.read_expect(expect_path)
            problems += check_expect(name, lines, valid, reason, doc)
    else:
        problems.append("name is neither valid-* nor invalid-*")
    return problems


def main(argv):
    args = argv[1:]
    schema = differential.SCHEMA_PATH
    if args[:1] == ["--schema"]:
        if len(args) < 2:
            print("usage: corpus_check.py [--schema SCHEMA] [CORPUS_DIR]", file=sys.stderr)
            return 2
        schema, args = args[1], args[2:]
    if len(args) > 1:
        print("usage: corpus_check.py [--schema SCHEMA] [CORPUS_DIR]", file=sys.stderr)
        return 2
    corpus = args[0] if args else DEFAULT_CORPUS
    try:
        differential.load_validator(schema)
    except Exception as e:  # a schema that does not load is a failure, not a crash
        print("%s: cannot load the schema: %s" % (schema, e))
        print("0 passed, 1 failed")
        return 1
    files = sorted(os.listdir(corpus))
    names = [n for n in files if n.endswith(".json")]
    failed = 0
    if not names:
        print("%s: no *.json files" % corpus)
        failed += 1
    for stray in (n for n in files if n.endswith(".expect")):
        if stray[:-len(".expect")] + ".json" not in files:
            print("FAIL %s: no matching .json" % stray)
            failed += 1
    return differential.run_files(names, lambda name: check_file(corpus, name, schema), failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
