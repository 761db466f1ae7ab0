#!/usr/bin/python3
"""hostile.py: the worker against a hostile SNA (tests/sna/README.md, "A hostile SNA"): progress
replies of every garbage class, a few garbage replies then the truth, start replies of every
garbage class, and lies about completion (CONTRACT.md §3.1, §3.2, §4). Real broker
(tests/with-broker), real qemu-nbd, the SNA simulator, two bw-worker processes; the jobs of a
case run at once, each with its own knobs (/_sim/faults?job=ID).
Usage: hostile.py BW_WORKER BW_CTL [CASE...]

Every case checks, for each of its jobs: it ended as the contract says (reason, cleanup), no
backup.disk.completed / backup.completed unless the SNA really completed, every event valid
against schemas/, no SNA text over 512 bytes or with control characters in an event; and after
the case: every worker still alive (restarted if not, so the other cases still run), no new
worker log line over 2048 bytes, with a raw control character, starting with the forged log
line, or from a sanitizer; no qemu-nbd, reserved port or image file left behind."""
import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import Env, MiB, check_events, compare_images, images, leftovers, run_suite, summary, vm_message  # noqa: E402

# not e2e.py's (22300-) nor recovery.py's (22320-) ports: ctest may run them at once. 48 ports:
# 16 jobs of 2 disks at once (2 workers x 8 jobs).
e2e.PORT_MIN, e2e.PORT_MAX = 22400, 22447
MAX_JOBS = 8          # per worker (BW_WORKER_MAX_JOBS), so that a whole case runs at once
MAX_ATTEMPTS = 3      # sna.max_attempts in e2e.Env.config (poll_interval_s = 1)
DEADLINE_S = 60       # every job's max_duration_s: a worker that never gives up ends there
WAIT_GRACE_S = 30     # how long past it a case waits for its jobs' last events
VM = "/DC/vm/hostile"
DISKS = [{"key": 2000, "size_bytes": 4 * MiB, "label": "Hard disk 1"}, {"key": 2001, "size_bytes": MiB}]
SNA_TEXT_MAX = 512    # CONTRACT §3.2: no SNA text over 512 bytes in an event or a log
FIELD_MAX = 1024      # no event string here is that long unless it carries SNA text
LOG_LINE_MAX = 2048
HUGE_UNIT = "HUGE\u2603"  # what the simulator's huge text is made of (tests/sna/sna_sim.py)
FORGED = re.compile(rb"^2026-12-01T00:00:00\.000Z bw-worker: job=")
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")
SANITIZER = re.compile(rb"AddressSanitizer|LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer")

UNCOUNTED = ["wrong_types", "nulls", "deep", "not_json", "oversize", "unknown_status", "foreign_key"]


def jid_of(prefix, cls):
    return f"h-{prefix}-{cls.replace('_', '-')}"


# ---- helpers ------------------------------------------------------------------------------

class Logs:
    """Reads what the workers logged since the last call."""

    def __init__(self, env):
        self.env, self.offsets = env, {}

    def new_lines(self):
        out = []
        for wid in ("w1", "w2"):
            path = os.path.join(self.env.tmp, f"{wid}.log")
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                f.seek(self.offsets.get(wid, 0))
                data = f.read()
            self.offsets[wid] = self.offsets.get(wid, 0) + len(data)
            out += [(wid, line) for line in data.split(b"\n")]
        return out


def short(b, n=160):
    return repr(b[:n]) + (f"... ({len(b)} bytes)" if len(b) > n else "")


def check_logs(logs, failures):
    """(e): bounded, escaped worker logs; the forged line never starts a line; no sanitizer."""
    bad = {"long": [], "control": [], "forged": [], "sanitizer": []}
    for wid, line in logs.new_lines():
        if len(line) > LOG_LINE_MAX:
            bad["long"].append(f"{wid}: {len(line)} bytes: {short(line)}")
        if CONTROL_BYTES.search(line):
            bad["control"].append(f"{wid}: {short(line)}")
        if FORGED.match(line):
            bad["forged"].append(f"{wid}: {short(line)}")
        if SANITIZER.search(line):
            bad["sanitizer"].append(f"{wid}: {short(line)}")
    what = {"long": f"worker log lines over {LOG_LINE_MAX} bytes (SNA text logged unbounded)",
            "control": "worker log lines with raw control characters (SNA text logged unescaped)",
            "forged": "a forged log line from the SNA starts a line of the worker's log",
            "sanitizer": "sanitizer reports in the worker's log"}
    for k, lines in bad.items():
        if lines:
            failures.append(f"{what[k]}: {len(lines)}, e.g. " + " | ".join(lines[:3]))


def check_workers(env, failures):
    """(a): every worker alive; a dead one is reported and started again."""
    for wid, p in list(env.workers.items()):
        rc = p.poll()
        if rc is not None:
            how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
            failures.append(f"worker {wid} died ({how}): a hostile SNA reply must never crash it; see {wid}.log")
            env.start_worker(wid)


def tolerant_drain(env):
    """env.drain_events that survives an event that is not UTF-8 (SNA text cut inside a
    character): it is kept, decoded with replacement characters, and named in env.bad_utf8."""
    env.bad_utf8 = []

    def parse(body):
        try:
            return json.loads(body)
        except UnicodeDecodeError:
            e = json.loads(body.decode("utf-8", "replace"))
            env.bad_utf8.append(e.get("event_id"))
            return e
    env.parse_event = parse


def kill_left_servers(env):
    """qemu-nbd servers of this run's repository still running (a job handed over at shutdown
    and never adopted): stopped by pid, so that the test leaves no process behind."""
    ps = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in ps.splitlines() if env.repo in line]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1 if pids and sig == signal.SIGTERM else 0)


def strings(obj, path="$"):
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from strings(v, f"{path}[{i}]")


def check_bounded(evs, jid, failures):
    """(e) for events: no SNA text over 512 bytes, none with control characters."""
    for e in evs:
        for path, s in strings(e):
            n = len(s.encode("utf-8", "surrogatepass"))
            huge = s.count(HUGE_UNIT) * len(HUGE_UNIT.encode())
            where = f"{jid}: {e['event']} {path}"
            if huge > SNA_TEXT_MAX + len(HUGE_UNIT.encode()):
                failures.append(f"{where} carries {huge} bytes of the SNA's huge text (at most {SNA_TEXT_MAX})")
            elif path.endswith((".sna_job_id", ".change_id")) and n > SNA_TEXT_MAX:
                failures.append(f"{where} is {n} bytes of SNA text (at most {SNA_TEXT_MAX}): {s[:80]!r}...")
            elif n > FIELD_MAX:
                failures.append(f"{where} is {n} bytes (only unbounded SNA text gets this long): {s[:80]!r}...")
            if CONTROL.search(s):
                failures.append(f"{where} holds raw control characters (SNA text unescaped): {s[:120]!r}")


def progress_requests(env, jid):
    return [r for r in env.sim_get("/_sim/requests")["requests"] if r["path"] == f"/api/v1/progress/{jid}"]


def run_jobs(env, jobs, failures):
    """jobs: {job_id: knobs}. Sets each job's knobs, publishes them all, waits for each to end
    (a failure with its backup.cleanup); returns {job_id: its events}, schema-checked."""
    for jid, knobs in jobs.items():
        env.sim_post(f"/_sim/faults?job={jid}", knobs)
    for jid in jobs:
        env.publish(vm_message(jid, VM, DISKS, max_duration_s=DEADLINE_S))
    end = time.time() + DEADLINE_S + WAIT_GRACE_S
    pending = set(jobs)
    while pending and time.time() < end:
        env.drain_events(0.3)
        check_workers(env, failures)  # a crashed worker is started again at once
        for jid in list(pending):
            names = {e["event"] for e in env.job_events(jid)}
            if "backup.completed" in names or {"backup.failed", "backup.cleanup"} <= names:
                pending.discard(jid)
    for jid in sorted(pending):
        failures.append(f"{jid}: not ended {DEADLINE_S + WAIT_GRACE_S} s after it was published (its "
                        f"max_duration_s is {DEADLINE_S}); events {[e['event'] for e in env.job_events(jid)]}")
    out = {}
    for jid in jobs:
        out[jid] = check_events(env, jid, failures)
        for e in out[jid]:
            if e["event_id"] in env.bad_utf8:
                failures.append(f"{jid}: {e['event_id']} is not valid UTF-8 (SNA text cut inside a character?)")
        check_bounded(out[jid], jid, failures)
    return out


def expect_completed(env, jid, evs, failures):
    names = [e["event"] for e in evs]
    failed = [e for e in evs if e["event"] == "backup.failed"]
    if failed:
        f = failed[0]
        failures.append(f"{jid}: want backup.completed, got backup.failed reason {f['reason']} "
                        f"in {f['stage']}: {f['message'][:200]!r}")
        return
    if names.count("backup.disk.completed") != len(DISKS) or not names or names[-1] != "backup.completed":
        failures.append(f"{jid}: want {len(DISKS)} backup.disk.completed then backup.completed, got {names}")
    compare_images(env, jid, evs, failures)


def expect_failed(env, jid, evs, reasons, failures, why):
    """The SNA never really completed: no disk.completed, no completed; failed with one of reasons
    (why: the contract's reason) and its cleanup, the SNA asked to clean up. Returns the failure."""
    names = [e["event"] for e in evs]
    done = [e["key"] for e in evs if e["event"] == "backup.disk.completed"]
    if done:
        failures.append(f"{jid}: backup.disk.completed for disk(s) {done} although the SNA never really "
                        f"completed them ({why})")
    if "backup.completed" in names:
        failures.append(f"{jid}: backup.completed although the SNA never really completed ({why})")
    failed = [e for e in evs if e["event"] == "backup.failed"]
    if not failed:
        if "backup.completed" not in names:
            failures.append(f"{jid}: no backup.failed; events {names}")
        return None
    f = failed[0]
    if f["reason"] not in reasons:
        failures.append(f"{jid}: backup.failed reason {f['reason']} ({f['message'][:160]!r}); want "
                        f"{' or '.join(reasons)}: {why}")
    cleanup = [e for e in evs if e["event"] == "backup.cleanup"]
    if not cleanup:
        failures.append(f"{jid}: no backup.cleanup after backup.failed")
    elif not any(a["kind"] == "sna_cleanup_requested" for a in cleanup[0]["actions"]):
        failures.append(f"{jid}: the SNA accepted the start but was not asked to clean up: "
                        f"{sorted({a['kind'] for a in cleanup[0]['actions']})}")
    return f


def expect_unanswered(env, jid, evs, failures, why):
    """sna_unavailable after exactly sna.max_attempts unanswered polls."""
    f = expect_failed(env, jid, evs, ["sna_unavailable"], failures,
                      f"{why}: {MAX_ATTEMPTS} such replies in a row are sna_unavailable")
    reqs = progress_requests(env, jid)
    polls = len(reqs) if f is None else len([r for r in reqs if r["at"] <= f["occurred_at"]])
    if f is not None and f["reason"] == "sna_unavailable" and polls != MAX_ATTEMPTS:
        failures.append(f"{jid}: sna_unavailable after {polls} progress polls; want exactly "
                        f"sna.max_attempts = {MAX_ATTEMPTS} unanswered polls in a row")
    elif f is not None and f["reason"] != "sna_unavailable":
        failures.append(f"{jid}: (the SNA was polled {polls} times)")


def case_end(env, logs, failures, label):
    """(a), (e) logs, (f): after every job of a case ended."""
    check_workers(env, failures)
    check_logs(logs, failures)
    failures += [f"{label}: {x}" for x in leftovers(env)]
    kept = {e["qcow2_path"] for e in env.events if e["event"] == "backup.disk.completed"}
    stray = sorted(set(images(env)) - kept)
    if stray:
        failures.append(f"{label}: image files left that no backup.disk.completed names: {stray}")


# ---- cases --------------------------------------------------------------------------------

def case_progress_garbage(env, logs, failures):
    """Every progress reply garbage: uncountable ones are unanswered polls (sna_unavailable after
    sna.max_attempts, nothing moved forward); huge is a counted failure (sna_failed, bounded);
    huge_padding is a counted truth (completes); control is unanswered (its job_id breaks the
    alphabet) or, if counted, a failure whose text is escaped."""
    classes = UNCOUNTED + ["huge", "huge_padding", "control"]
    evs = run_jobs(env, {jid_of("pg", c): {"progress_garbage": c} for c in classes}, failures)
    for c in UNCOUNTED:
        expect_unanswered(env, jid_of("pg", c), evs[jid_of("pg", c)], failures,
                          f"every progress reply is {c} garbage, an unanswered poll (§3.2)")
    jid = jid_of("pg", "huge")
    expect_failed(env, jid, evs[jid], ["sna_failed"], failures,
                  "a counted reply (right types, under 1 MiB) says the job failed")
    jid = jid_of("pg", "control")
    expect_failed(env, jid, evs[jid], ["sna_unavailable", "sna_failed"], failures,
                  "a reply whose job_id breaks the alphabet is unanswered; counted, it says failed")
    jid = jid_of("pg", "huge_padding")
    expect_completed(env, jid, evs[jid], failures)
    case_end(env, logs, failures, "progress_garbage")


def case_garbage_then_truth(env, logs, failures):
    """The first 2 (< sna.max_attempts) replies garbage, then the truth: the job completes, its
    images equal the snapshot, and no disk moved forward on a garbage reply. The copy is slowed
    (2 s for the 4 MiB disk) so that the garbage comes while it still runs."""
    n = MAX_ATTEMPTS - 1
    jobs = {jid_of("gt", c): {"progress_garbage": c, "progress_garbage_n": n, "slow_bytes_per_s": 2 * MiB}
            for c in UNCOUNTED}
    evs = run_jobs(env, jobs, failures)
    for jid in jobs:
        expect_completed(env, jid, evs[jid], failures)
        reqs = progress_requests(env, jid)
        garbage = [r for r in reqs if r.get("fault")]
        if len(garbage) != n:
            failures.append(f"{jid}: the SNA sent {len(garbage)} garbage replies (want {n}): the test did not test")
        truth = [r["at"] for r in reqs if not r.get("fault")]
        for e in evs[jid]:
            if e["event"] == "backup.disk.completed" and (not truth or e["occurred_at"] < truth[0]):
                failures.append(f"{jid}: disk {e['key']} completed at {e['occurred_at']}, before the SNA's first "
                                f"truthful reply ({truth[0] if truth else 'none'}): a garbage reply moved it forward")
    case_end(env, logs, failures, "garbage_then_truth")


def case_start_garbage(env, logs, failures):
    """A 200 start reply with a garbage body: the status decides (§3.1), the job proceeds and
    completes; sna_job_id is the job_id when the body has no usable string job_id, never over
    512 bytes, never with control characters (check_bounded)."""
    classes = UNCOUNTED + ["huge", "huge_padding", "control"]
    jobs = {jid_of("sg", c): {"start_garbage": c} for c in classes}
    evs = run_jobs(env, jobs, failures)
    for c in classes:
        jid = jid_of("sg", c)
        expect_completed(env, jid, evs[jid], failures)
        started = [e for e in evs[jid] if e["event"] == "backup.started"]
        if not started:
            continue
        got = started[0]["sna_job_id"]
        if c in ("wrong_types", "nulls", "deep", "not_json", "huge_padding", "oversize", "unknown_status"):
            want = {jid}  # no string job_id, or the job's own
        elif c == "foreign_key":
            want = {jid, "someone-elses-job-1"}
        else:             # huge, control: the job_id or a bounded, escaped rendering of the SNA's
            want = None
        if want is not None and got not in want:
            failures.append(f"{jid}: backup.started.sna_job_id {got[:80]!r} ({len(got)} chars); want "
                            f"{' or '.join(sorted(want))} (the {c} start reply has no usable string job_id)")
    case_end(env, logs, failures, "start_garbage")


def case_lies(env, logs, failures):
    """lie_complete from the first reply while the copy still runs (slowed to 512 KiB/s): a
    counted reply that calls a disk completed without the evidence is sna_failed; one of the
    wrong types is an unanswered poll (sna_unavailable). Never a disk.completed."""
    lies = {"no_bytes": "sna_failed", "short_total": "sna_failed", "empty_change_id": "sna_failed",
            "null_change_id": "sna_unavailable", "object_change_id": "sna_unavailable"}
    jobs = {jid_of("lie", c): {"lie_complete": c, "slow_bytes_per_s": 512 * 1024} for c in lies}
    evs = run_jobs(env, jobs, failures)
    for c, reason in lies.items():
        jid = jid_of("lie", c)
        if reason == "sna_unavailable":
            expect_unanswered(env, jid, evs[jid], failures, f"every reply is the {c} lie, of the wrong types")
        else:
            expect_failed(env, jid, evs[jid], [reason], failures,
                          f"the {c} lie calls a disk completed without the evidence: the SNA's failure")
    case_end(env, logs, failures, "lies")


def deduplicated(failures):
    """The same failure of many progress events, or of many worker deaths, once with a count."""
    out, count = [], {}
    for f in failures:
        k = re.sub(r"/backup\.progress/\d+", "/backup.progress/N", f)
        if k not in count:
            out.append(k)
        count[k] = count.get(k, 0) + 1
    return [f"{k} (x{count[k]})" if count[k] > 1 else k for k in out]


def hostile_case(case, logs):
    def run(env, failures):
        mine = []
        try:
            case(env, logs, mine)
        finally:
            failures += deduplicated(mine)
    return run


CASES = {"progress_garbage": case_progress_garbage, "garbage_then_truth": case_garbage_then_truth,
         "start_garbage": case_start_garbage, "lies": case_lies}


def main():
    worker, ctl = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CASES)
    os.environ["BW_WORKER_MAX_JOBS"] = str(MAX_JOBS)  # the workers inherit it
    env = Env(worker, ctl)
    tolerant_drain(env)
    logs = Logs(env)
    results = {}
    t0 = time.time()
    try:
        env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 13,
                                  "disks": {str(d["key"]): {"size": d["size_bytes"]} for d in DISKS}})
        run_suite(env, CASES, names, results, wrap=lambda case: hostile_case(case, logs))
    finally:
        failed = False in results.values()
        if failed and os.environ.get("BW_E2E_KEEP"):
            kept = tempfile.mkdtemp(prefix="bw-hostile-kept-")
            for f in ("w1.log", "w2.log", "sim.log"):
                if os.path.exists(os.path.join(env.tmp, f)):
                    shutil.copy(os.path.join(env.tmp, f), kept)
            print(f"kept the logs in {kept}")
        elif failed:
            for wid in ("w1", "w2"):
                log = os.path.join(env.tmp, f"{wid}.log")
                if os.path.exists(log):
                    with open(log, "rb") as f:
                        tail = f.read().split(b"\n")[-25:]
                    print(f"--- {wid}.log (tail, lines cut at 300 bytes)")
                    print("\n".join(short(x, 300) for x in tail))
        kill_left_servers(env)
        env.close()
    return summary(results, t0)


if __name__ == "__main__":
    sys.exit(main())
