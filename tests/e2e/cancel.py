#!/usr/bin/python3
"""cancel.py: backup.cancel (CONTRACT §2.1) end to end: the real bw-worker (two processes of one
host), the private broker, the SNA simulator; cancels published with pika to the fanout
backup.control. Usage: cancel.py BW_WORKER BW_CTL [CASE...]"""
import json
import os
import signal
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, check_events, images, leftovers, vm_message  # noqa: E402

# ports of their own (ctest may run the other suites at the same time): 12, so a second
# 7-disk job waits for ports while a first one holds 7
e2e.PORT_MIN, e2e.PORT_MAX = 22460, 22471
CONTROL = "backup.control"


class Cancel(e2e.Env):
    def cancel(self, job_id, reason=None, raw=None):
        """Publishes a backup.cancel (or raw bytes) to the fanout exchange, confirmed."""
        if self.pub is None:
            self.pub = self.conn.channel()
            self.pub.confirm_delivery()
        self.pub.exchange_declare(CONTROL, "fanout", durable=True)
        body = raw if raw is not None else json.dumps(
            {"schema_version": 1, "job_id": job_id, **({"reason": reason} if reason else {})}).encode()
        self.pub.basic_publish(CONTROL, "", body, pika.BasicProperties(content_type="application/json"))

    def log(self, wid):
        with open(os.path.join(self.tmp, f"{wid}.log"), errors="replace") as f:
            return f.read()

    def wait_log(self, wids, text, timeout=30):
        """Until every worker's log holds text; the workers whose log does not, else []."""
        end = time.time() + timeout
        while True:
            late = [w for w in wids if text not in self.log(w)]
            if not late or time.time() > end:
                return late
            time.sleep(0.1)

    def control_ready(self, wids=("w1", "w2")):
        """Every worker consumes backup.control: a cancel of a probe job_id reaches each."""
        for n in range(1, 100):
            probe = f"probe-{os.getpid()}-{time.time_ns()}"
            self.cancel(probe)
            if not self.wait_log(wids, f"job={probe} cancel:", timeout=5):
                return
        raise AssertionError("the workers never consumed backup.control")

    def sim_requests(self, job_id, endpoint):
        return [r for r in self.sim_get("/_sim/requests")["requests"]
                if r["path"].endswith(endpoint) and (r.get("body") or {}).get("job_id") == job_id]

    def wait_event(self, job_id, name, timeout=60, key=None):
        end = time.time() + timeout
        while time.time() < end:
            self.drain_events(0.2)
            for e in self.job_events(job_id):
                if e["event"] == name and (key is None or e.get("key") == key):
                    return e
        raise AssertionError(f"{job_id}: no {name} within {timeout} s; "
                             f"got {[e['event'] for e in self.job_events(job_id)]}")


def owner_of(env, job_id):
    return env.job_events(job_id)[0]["worker_id"]


def check_cancelled(env, job_id, failures, stage, reason_text=None):
    """The job's events: one backup.failed (cancelled, not retryable, stage, the reason in
    message), then its backup.cleanup; returns (failed, cleanup) or (None, None)."""
    env.wait_terminal(job_id, timeout=60, cleanup=True)
    evs = check_events(env, job_id, failures)
    failed = [e for e in evs if e["event"] == "backup.failed"]
    cleanup = [e for e in evs if e["event"] == "backup.cleanup"]
    if len(failed) != 1 or len(cleanup) != 1 or evs[-1]["event"] != "backup.cleanup":
        failures.append(f"{job_id}: events {[e['event'] for e in evs]}")
        return None, None
    f = failed[0]
    if f["reason"] != "cancelled" or f["retryable"] is not False or stage not in (None, f["stage"]):
        failures.append(f"{job_id}: failed {f['reason']} retryable {f['retryable']} stage {f['stage']}, "
                        f"want cancelled false {stage}")
    if reason_text and reason_text not in f["message"]:
        failures.append(f"{job_id}: the reason is not in the message: {f['message']!r}")
    if any(e["event"] in ("backup.completed",) for e in evs):
        failures.append(f"{job_id}: completed and failed")
    return f, cleanup[0]


def kinds(cleanup):
    return sorted({a["kind"] for a in cleanup["actions"]})


# ---- cases ------------------------------------------------------------------------------------

def case_preparing(env, failures):
    """A job waiting for ports (another one holds them) is cancelled: failed cancelled, stage
    waiting_ports, never an SNA start, no image; the other job completes."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c1", "seed": 5,
                              "disks": {str(k): {"size": 4 * MiB} for k in range(2000, 2007)}})
    disks7 = [{"key": k, "size_bytes": 4 * MiB} for k in range(2000, 2007)]
    env.sim_post("/_sim/faults?job=c-hold", {"slow_bytes_per_s": 1 * MiB})
    env.publish(vm_message("c-hold", "/DC/vm/c1", disks7))
    env.wait_event("c-hold", "backup.started")
    env.publish(vm_message("c-wait", "/DC/vm/c1", disks7))
    env.wait_event("c-wait", "backup.accepted")
    late = env.wait_log([owner_of(env, "c-wait")], "job=c-wait waiting for")
    if late:
        failures.append("c-wait: never waited for ports")
    before = set(images(env))
    env.cancel("c-wait", "operator: maintenance window closed")
    f, cleanup = check_cancelled(env, "c-wait", failures, "waiting_ports", "maintenance window closed")
    if f and any(d["status"] != "not_started" for d in f["disks"]):
        failures.append(f"c-wait: disks {f['disks']}")
    if cleanup and (cleanup["actions"] or cleanup["pending"]):
        failures.append(f"c-wait: nothing to undo, but {cleanup}")
    if env.sim_requests("c-wait", "/backup/start") or env.sim_requests("c-wait", "/cleanup"):
        failures.append("c-wait: the SNA was called")
    if set(images(env)) - before:
        failures.append(f"c-wait: new files {sorted(set(images(env)) - before)}")
    env.sim_post("/_sim/faults?job=c-hold", {"slow_bytes_per_s": 64 * MiB})
    if env.wait_terminal("c-hold", timeout=120) != "completed":
        failures.append("c-hold: not completed")
    check_events(env, "c-hold", failures)
    failures += [f"preparing: {x}" for x in leftovers(env)]


def case_sna_requested(env, failures):
    """A job whose start request hangs at the SNA: cancelled, the request is abandoned and,
    as the start may have been accepted, the SNA is asked to clean up; everything local is
    undone."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c9", "seed": 12, "disks": {"2000": {"size": 4 * MiB},
                                                                            "2001": {"size": 4 * MiB}}})
    env.sim_post("/_sim/faults", {"hang_start_s": 4})
    before = set(images(env))
    f = cleanup = None
    try:
        env.publish(vm_message("c-hang", "/DC/vm/c9", [{"key": 2000, "size_bytes": 4 * MiB},
                                                      {"key": 2001, "size_bytes": 4 * MiB}]))
        env.wait_event("c-hang", "backup.accepted")
        if env.wait_log([owner_of(env, "c-hang")], "job=c-hang SNA start requested"):
            failures.append("c-hang: the start was never requested")
        env.cancel("c-hang", "no time left")
        f, cleanup = check_cancelled(env, "c-hang", failures, "sna_requested", "no time left")
    finally:
        env.sim_post("/_sim/faults", {})
    if cleanup:
        sna = [a for a in cleanup["actions"] if a["kind"] == "sna_cleanup_requested"]
        if len(sna) != 1 or sna[0]["result"] != "done":
            failures.append(f"c-hang: sna_cleanup_requested {sna}")
        if not {"qemu_nbd_stopped", "port_released", "qcow2_removed"} <= set(kinds(cleanup)):
            failures.append(f"c-hang: cleanup actions {kinds(cleanup)}")
    if f and sorted(d["status"] for d in f["disks"]) != ["aborted", "aborted"]:
        failures.append(f"c-hang: disks {f['disks']}")
    if len(env.sim_requests("c-hang", "/cleanup")) != 1:
        failures.append("c-hang: no SNA cleanup request")
    if set(images(env)) - before:
        failures.append(f"c-hang: files left {sorted(set(images(env)) - before)}")
    failures += [f"sna_requested: {x}" for x in leftovers(env)]


def case_transferring(env, failures):
    """A transferring job, cancelled: its owner asks the SNA to clean up (the simulator sees the
    request and stops the copy), failed cancelled with the reason, backup.cleanup with
    sna_cleanup_requested done, partial images removed; the other worker only records it."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c2", "seed": 9,
                              "disks": {"2000": {"size": 32 * MiB}, "2001": {"size": 16 * MiB}}})
    env.sim_post("/_sim/faults?job=c-xfer", {"slow_bytes_per_s": 1 * MiB})
    env.publish(vm_message("c-xfer", "/DC/vm/c2", [{"key": 2000, "size_bytes": 32 * MiB},
                                                  {"key": 2001, "size_bytes": 16 * MiB}]))
    env.wait_event("c-xfer", "backup.started")
    time.sleep(1.5)  # some bytes written: the images are partial
    owner = owner_of(env, "c-xfer")
    other = "w2" if owner == "w1" else "w1"
    reason = "stop it: \u00e9t\u00e9 \u2603 \"quoted\""
    env.cancel("c-xfer", reason)
    f, cleanup = check_cancelled(env, "c-xfer", failures, "transferring", reason)
    if cleanup:
        sna = [a for a in cleanup["actions"] if a["kind"] == "sna_cleanup_requested"]
        if len(sna) != 1 or sna[0]["result"] != "done":
            failures.append(f"c-xfer: sna_cleanup_requested {sna}")
        removed = [a for a in cleanup["actions"] if a["kind"] == "qcow2_removed"]
        if len(removed) != 2 or any(a["result"] != "done" or os.path.exists(a["path"]) for a in removed):
            failures.append(f"c-xfer: images not removed: {removed}")
        if not {"qemu_nbd_stopped", "port_released"} <= set(kinds(cleanup)):
            failures.append(f"c-xfer: cleanup actions {kinds(cleanup)}")
    if f and sorted(d["status"] for d in f["disks"]) != ["aborted", "aborted"]:
        failures.append(f"c-xfer: disks {f['disks']}")
    if len(env.sim_requests("c-xfer", "/cleanup")) != 1:
        failures.append(f"c-xfer: {len(env.sim_requests('c-xfer', '/cleanup'))} cleanup requests (want 1)")
    jobs = [j for j in env.sim_get("/_sim/jobs")["jobs"] if j["job_id"] == "c-xfer"]
    if not jobs or not jobs[0]["cleaned"] or jobs[0]["status"] == "completed":
        failures.append(f"c-xfer: the SNA's copy was not stopped: {jobs}")
    if env.wait_log([owner], "job=c-xfer cancel: ended by its owner in transferring"):
        failures.append(f"c-xfer: the owner {owner} did not log its decision")
    # the other worker records it for the owner, or finds the job already ended by it
    if env.wait_log([other], "job=c-xfer cancel:"):
        failures.append(f"c-xfer: the other worker {other} did not log its decision")
    elif not any(t in env.log(other) for t in (f"job=c-xfer cancel: owned by worker {owner}",
                                               f"job=c-xfer cancel: the job already ended (failed, worker {owner})")):
        failures.append(f"c-xfer: the other worker {other} decided otherwise")
    if f"job=c-xfer failed" in env.log(other):
        failures.append(f"c-xfer: the other worker {other} acted")
    failures += [f"transferring: {x}" for x in leftovers(env)]


def case_before_start(env, failures):
    """Cancel first, then the backup.start: accepted and failed cancelled at once (stage
    claimed): no port, no file, no SNA call."""
    env.control_ready()
    env.cancel("c-early", "never mind")
    if env.wait_log(["w1", "w2"], "job=c-early cancel: unknown on this host: remembered"):
        failures.append("c-early: not remembered by every worker")
    before = set(images(env))
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c3", "seed": 2, "disks": {"2000": {"size": 4 * MiB}}})
    env.publish(vm_message("c-early", "/DC/vm/c3", [{"key": 2000, "size_bytes": 4 * MiB}]))
    f, cleanup = check_cancelled(env, "c-early", failures, "claimed", "never mind")
    names = [e["event"] for e in env.job_events("c-early")]
    if names != ["backup.accepted", "backup.failed", "backup.cleanup"]:
        failures.append(f"c-early: events {names}")
    if cleanup and (cleanup["actions"] or cleanup["pending"]):
        failures.append(f"c-early: actions {cleanup['actions']}")
    if env.sim_requests("c-early", "/backup/start") or env.sim_requests("c-early", "/cleanup"):
        failures.append("c-early: the SNA was called")
    if set(images(env)) - before:
        failures.append(f"c-early: files {sorted(set(images(env)) - before)}")
    # the same backup.start again: a duplicate, nothing new
    env.publish(vm_message("c-early", "/DC/vm/c3", [{"key": 2000, "size_bytes": 4 * MiB}]))
    time.sleep(2)
    env.drain_events(0.5)
    if len(env.job_events("c-early")) != 3:
        failures.append(f"c-early: events after a duplicate {[e['event'] for e in env.job_events('c-early')]}")
    failures += [f"before_start: {x}" for x in leftovers(env)]


def case_after_completion(env, failures):
    """A completed job, cancelled: nothing changes (no event, the images stay), logged."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c4", "seed": 4, "disks": {"2000": {"size": 4 * MiB}}})
    env.publish(vm_message("c-done", "/DC/vm/c4", [{"key": 2000, "size_bytes": 4 * MiB}]))
    if env.wait_terminal("c-done") != "completed":
        failures.append("c-done: not completed")
        return
    env.drain_events(1.0)
    n = len(env.job_events("c-done"))
    paths = [e["qcow2_path"] for e in env.job_events("c-done") if e["event"] == "backup.disk.completed"]
    env.cancel("c-done", "too late")
    if env.wait_log(["w1", "w2"], "job=c-done cancel: the job already ended (completed"):
        failures.append("c-done: the workers did not log that it already ended")
    env.drain_events(2.0)
    evs = check_events(env, "c-done", failures)
    if len(evs) != n:
        failures.append(f"c-done: new events {[e['event'] for e in evs[n:]]}")
    if not paths or not all(os.path.exists(p) for p in paths):
        failures.append(f"c-done: images gone {paths}")
    if env.sim_requests("c-done", "/cleanup"):
        failures.append("c-done: an SNA cleanup after completion")
    failures += [f"after_completion: {x}" for x in leftovers(env)]


def case_invalid(env, failures):
    """Invalid cancels while a job runs: each logged and dropped; the job completes."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c5", "seed": 6, "disks": {"2000": {"size": 8 * MiB}}})
    env.sim_post("/_sim/faults?job=c-live", {"slow_bytes_per_s": 2 * MiB})
    env.publish(vm_message("c-live", "/DC/vm/c5", [{"key": 2000, "size_bytes": 8 * MiB}]))
    env.wait_event("c-live", "backup.started")
    before = {w: env.log(w).count("an invalid backup.cancel dropped") for w in ("w1", "w2")}
    bad = [b"{not json",
           json.dumps({"schema_version": 1, "job_id": "c-live:x"}).encode(),
           json.dumps({"schema_version": 1, "job_id": "c-live", "reason": "a\nb\u0085"}).encode(),
           json.dumps({"schema_version": 2, "job_id": "c-live"}).encode(),
           json.dumps({"schema_version": 1, "job_id": "c-live", "reason": "x" * 257}).encode(),
           b"\xff\xfe" + b"x" * 10]
    for body in bad:
        env.cancel(None, raw=body)
    end = time.time() + 20
    while time.time() < end:
        got = {w: env.log(w).count("an invalid backup.cancel dropped") - before[w] for w in before}
        if all(v >= len(bad) for v in got.values()):
            break
        time.sleep(0.2)
    if any(v != len(bad) for v in got.values()):
        failures.append(f"invalid: dropped per worker {got}, want {len(bad)} each")
    for w in ("w1", "w2"):
        if "c-live:x" in env.log(w):
            failures.append(f"invalid: {w} quoted a body in its log")
    if env.wait_terminal("c-live", timeout=60) != "completed":
        failures.append(f"invalid: c-live not completed: {[e['event'] for e in env.job_events('c-live')]}")
    check_events(env, "c-live", failures)
    if env.sim_requests("c-live", "/cleanup"):
        failures.append("invalid: an SNA cleanup for c-live")
    failures += [f"invalid: {x}" for x in leftovers(env)]


def case_disk_completed_kept(env, failures):
    """A 2-disk job whose small disk completed before the cancel: that disk stays completed
    and kept, the other is aborted and removed."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c6", "seed": 8,
                              "disks": {"2000": {"size": 1 * MiB}, "2001": {"size": 48 * MiB}}})
    env.sim_post("/_sim/faults?job=c-half", {"slow_bytes_per_s": 2 * MiB})
    env.publish(vm_message("c-half", "/DC/vm/c6", [{"key": 2000, "size_bytes": 1 * MiB},
                                                  {"key": 2001, "size_bytes": 48 * MiB}]))
    done = env.wait_event("c-half", "backup.disk.completed", key=2000)
    env.cancel("c-half", "half is enough")
    f, cleanup = check_cancelled(env, "c-half", failures, "finalizing", "half is enough")
    if f:
        st = {d["key"]: d["status"] for d in f["disks"]}
        if st != {2000: "completed", 2001: "aborted"}:
            failures.append(f"c-half: disks {st}")
    if cleanup:
        kept = [a for a in cleanup["actions"] if a["kind"] == "qcow2_kept"]
        removed = [a for a in cleanup["actions"] if a["kind"] == "qcow2_removed"]
        if [a.get("key") for a in kept] != [2000] or kept[0]["path"] != done["qcow2_path"]:
            failures.append(f"c-half: kept {kept}")
        if [a.get("key") for a in removed] != [2001]:
            failures.append(f"c-half: removed {removed}")
    if not os.path.exists(done["qcow2_path"]):
        failures.append("c-half: the completed image is gone")
    else:
        r = subprocess.run(["qemu-img", "check", "-q", done["qcow2_path"]], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"c-half: the kept image fails qemu-img check: {r.stderr[:200]}")
    if len(env.sim_requests("c-half", "/cleanup")) != 1:
        failures.append("c-half: no SNA cleanup request")
    failures += [f"disk_completed_kept: {x}" for x in leftovers(env)]


def case_dead_owner(env, failures):
    """The owner is SIGKILLed mid-transfer, then the job is cancelled: the other worker records
    it for the job and its recovery pass ends the job (cancelled) instead of adopting it."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c7", "seed": 1, "disks": {"2000": {"size": 32 * MiB}}})
    env.sim_post("/_sim/faults?job=c-orphan", {"slow_bytes_per_s": 1 * MiB})
    env.publish(vm_message("c-orphan", "/DC/vm/c7", [{"key": 2000, "size_bytes": 32 * MiB}]))
    env.wait_event("c-orphan", "backup.started")
    owner = owner_of(env, "c-orphan")
    other = "w2" if owner == "w1" else "w1"
    p = env.workers[owner]
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    env.cancel("c-orphan", "owner gone")
    f, cleanup = check_cancelled(env, "c-orphan", failures, "transferring", "owner gone")
    if f and f["worker_id"] != other:
        failures.append(f"c-orphan: failed by {f['worker_id']}, want {other}")
    if cleanup:
        sna = [a for a in cleanup["actions"] if a["kind"] == "sna_cleanup_requested"]
        if len(sna) != 1 or sna[0]["result"] != "done":
            failures.append(f"c-orphan: sna cleanup {sna}")
    if env.wait_log([other], "job=c-orphan cancel:"):
        failures.append(f"c-orphan: {other} logged no cancel decision")
    failures += [f"dead_owner: {x}" for x in leftovers(env)]
    # the killed worker again, for the cases after this one and the shutdown check (a
    # SIGTERM before it set up its signalfd would kill it)
    env.start_worker(owner)
    env.control_ready()


def case_held_start(env, failures):
    """One worker with one job slot, busy: a second backup.start waits unacked for the slot,
    and a cancel for it, arriving behind it, is handled at once (remembered); once the slot
    is free the start is accepted and failed cancelled (stage claimed)."""
    codes = env.stop_workers()
    if any(c != 0 for c in codes.values()):
        failures.append(f"held_start: workers exited {codes}")
    try:
        env.start_worker("w3", env={**os.environ, "BW_WORKER_MAX_JOBS": "1"})
        env.control_ready(("w3",))
        env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c10", "seed": 4, "disks": {"2000": {"size": 8 * MiB}}})
        env.sim_post("/_sim/faults?job=c-busy", {"slow_bytes_per_s": 512 * 1024})
        disks = [{"key": 2000, "size_bytes": 8 * MiB}]
        env.publish(vm_message("c-busy", "/DC/vm/c10", disks))
        env.wait_event("c-busy", "backup.started")
        env.publish(vm_message("c-held", "/DC/vm/c10", disks))
        time.sleep(0.5)  # delivered to w3 and held there
        env.cancel("c-held", "held back")
        if env.wait_log(["w3"], "job=c-held cancel: unknown on this host: remembered", timeout=10):
            failures.append("c-held: the cancel was not handled while the start was held")
        env.drain_events(0.3)
        if any(e["event"] in ("backup.completed", "backup.failed") for e in env.job_events("c-busy")):
            failures.append("c-held: the busy job ended before the cancel was handled (proves nothing)")
        env.sim_post("/_sim/faults?job=c-busy", {"slow_bytes_per_s": 64 * MiB})
        if env.wait_terminal("c-busy") != "completed":
            failures.append("c-busy: not completed")
        check_events(env, "c-busy", failures)
        check_cancelled(env, "c-held", failures, "claimed", "held back")
        if env.sim_requests("c-held", "/backup/start"):
            failures.append("c-held: the SNA was called")
        failures += [f"held_start: {x}" for x in leftovers(env)]
    finally:
        codes = env.stop_workers()
        if any(c != 0 for c in codes.values()):
            failures.append(f"held_start: w3 exited {codes}")
        env.start_worker("w1")
        env.start_worker("w2")
        env.control_ready()


def case_draining(env, failures):
    """A draining worker (SIGUSR1), the only one of its host, still hears cancels for the jobs
    it runs to their end: its own delivery ends the job; it takes no new start; it exits 0."""
    codes = env.stop_workers()
    if any(c != 0 for c in codes.values()):
        failures.append(f"draining: workers exited {codes}")
    try:
        p = env.start_worker("w4")
        env.control_ready(("w4",))
        env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c11", "seed": 5, "disks": {"2000": {"size": 16 * MiB}}})
        env.sim_post("/_sim/faults?job=c-drain", {"slow_bytes_per_s": 1 * MiB})
        env.publish(vm_message("c-drain", "/DC/vm/c11", [{"key": 2000, "size_bytes": 16 * MiB}]))
        env.wait_event("c-drain", "backup.started")
        p.send_signal(signal.SIGUSR1)
        if env.wait_log(["w4"], "SIGUSR1: draining"):
            failures.append("draining: w4 did not drain")
        env.publish(vm_message("c-after-drain", "/DC/vm/c11", [{"key": 2000, "size_bytes": 16 * MiB}]))
        env.cancel("c-drain", "drained and cancelled")
        check_cancelled(env, "c-drain", failures, "transferring", "drained and cancelled")
        if "job=c-drain cancel: ended by its owner in transferring" not in env.log("w4"):
            failures.append("draining: w4 did not end the job on its own delivery")
        try:
            code = p.wait(60)
        except subprocess.TimeoutExpired:
            code = "still running"
        if code != 0:
            failures.append(f"draining: w4 exited {code} (want 0 once its job ended)")
        env.workers.pop("w4", None)
        if env.job_events("c-after-drain") or "job=c-after-drain" in env.log("w4"):
            failures.append("draining: w4 took a backup.start while draining")
        if env.sim_requests("c-drain", "/cleanup") == []:
            failures.append("draining: no SNA cleanup request")
        failures += [f"draining: {x}" for x in leftovers(env)]
    finally:
        env.stop_workers()
        env.start_worker("w1")
        env.start_worker("w2")
        env.control_ready()
        # the start published while w4 drained runs now
        if env.wait_terminal("c-after-drain", timeout=120) != "completed":
            failures.append("draining: c-after-drain not completed afterwards")


def case_race(env, failures):
    """Starts and cancels published together, in both orders, to both workers of the host:
    every job ends cancelled (at claim, or by its owner, or through the ledger), none
    completes, none is left running."""
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/c8", "seed": 3, "disks": {"2000": {"size": 8 * MiB}}})
    jobs = [f"c-race-{i}" for i in range(8)]
    for i, j in enumerate(jobs):
        env.sim_post(f"/_sim/faults?job={j}", {"slow_bytes_per_s": 1 * MiB})
    for i, j in enumerate(jobs):
        msg = vm_message(j, "/DC/vm/c8", [{"key": 2000, "size_bytes": 8 * MiB}])
        if i % 2:
            env.cancel(j, "race")
            env.publish(msg)
        else:
            env.publish(msg)
            env.cancel(j, "race")
    stages = {}
    for j in jobs:
        f, cleanup = check_cancelled(env, j, failures, None, "race")
        if f:
            stages[j] = f["stage"]
    print(f"     race: stages {stages}")
    failures += [f"race: {x}" for x in leftovers(env)]


CASES = {"preparing": case_preparing, "sna_requested": case_sna_requested,
         "transferring": case_transferring,
         "before_start": case_before_start, "after_completion": case_after_completion,
         "invalid": case_invalid, "disk_completed_kept": case_disk_completed_kept,
         "dead_owner": case_dead_owner, "held_start": case_held_start,
         "draining": case_draining, "race": case_race}


class CancelEnv(Cancel):
    def config(self, wid, extra="", sna_url=None, sna_lines=()):
        path = super().config(wid, extra, sna_url, sna_lines)
        with open(path) as f:
            text = f.read()
        # recovery every second: a dead owner's job is taken over soon
        text = text.replace("[worker]\n", "[worker]\nrecovery_interval_s = 1\n", 1)
        with open(path, "w") as f:
            f.write(text)
        return path


if __name__ == "__main__":
    sys.exit(e2e.suite_main(CancelEnv, CASES, 60, ["w1.log", "w2.log"]))
