#!/usr/bin/python3
"""validate_events.py DIR|FILE...: every JSON event file against schemas/events (and its cross-field rules)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_event_schemas as schemas  # noqa: E402


def main(args):
    files = []
    for a in args:
        if os.path.isdir(a):
            files += sorted(os.path.join(a, f) for f in os.listdir(a) if f.endswith(".json"))
        else:
            files.append(a)
    passed = failed = 0
    for f in files:
        with open(f, "rb") as fh:
            doc = json.loads(fh.read())
        errs = schemas.check(doc.get("event", "?"), doc)
        if errs:
            failed += 1
            print(f"FAIL {f}:")
            for e in errs:
                print(f"     {e}")
        else:
            passed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not files else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
