#!/usr/bin/python3
"""ctl.py: bw-ctl's broker and host commands (CONTRACT §6) against the real bw-worker, the
private broker (tests/with-broker) and the SNA simulator: publish, events, cancel, retry,
dlq list/show/requeue, reap, verify. Usage: ctl.py BW_WORKER BW_CTL [CASE...]"""
import json
import os
import signal
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, check_events, leftovers, vm_message  # noqa: E402

# not the other suites' ports (ctest may run them at once)
e2e.PORT_MIN, e2e.PORT_MAX = 22480, 22499
VM = "/DC/vm/ctl"
DISKS = [{"key": 2000, "size_bytes": 4 * MiB}, {"key": 2001, "size_bytes": 2 * MiB}]


class Ctl(e2e.Env):
    def run_ctl(self, *args, timeout=120, sets=()):
        """Runs bw-ctl with the suite's config (and --set sets); returns the CompletedProcess."""
        argv = [self.ctl_bin, "--config", self.config("ctl")]
        for s in sets:
            argv += ["--set", s]
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout)

    def ctl_json(self, *args, **kw):
        r = self.run_ctl(*args, "--json", **kw)
        try:
            return r, json.loads(r.stdout)
        except ValueError:
            return r, None

    def message_file(self, msg, name=None):
        path = os.path.join(self.tmp, (name or msg["job_id"]) + ".json")
        with open(path, "w") as f:
            f.write(msg if isinstance(msg, str) else json.dumps(msg))
        return path

    def publish_ctl(self, msg, failures, what):
        """Publishes msg with bw-ctl publish; the workers' queue is declared by then."""
        r = self.run_ctl("publish", self.message_file(msg))
        if r.returncode != 0:
            failures.append(f"{what}: bw-ctl publish exit {r.returncode}: {r.stderr.strip()}")
        return r

    def dlq_count(self):
        ch = self.conn.channel()
        n = ch.queue_declare("backup.start.dlq", passive=True).method.message_count
        ch.close()
        return n

    def wait_consumer(self):
        """Waits until a worker consumes backup.start (a worker stopped before its signalfd
        is set up would die of the SIGTERM)."""
        for _ in range(300):
            ch = self.conn.channel()
            try:
                if ch.queue_declare("backup.start", passive=True).method.consumer_count:
                    return
            finally:
                if ch.is_open:
                    ch.close()
            time.sleep(0.05)
        raise AssertionError("no worker consumes backup.start")

    def job_state(self, job_id):
        r, j = self.ctl_json("show", job_id)
        return j.get("state") if isinstance(j, dict) else None


def make_env(worker, ctl):
    env = Ctl(worker, ctl)
    env.ctl_bin = ctl
    env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 9,
                              "disks": {"2000": {"size": 4 * MiB}, "2001": {"size": 2 * MiB}}})
    return env


def describe(r):
    return f"exit {r.returncode}, stdout {r.stdout.strip()[:300]!r}, stderr {r.stderr.strip()[:300]!r}"


# ---- cases ------------------------------------------------------------------------------

def case_publish(env, failures):
    """A valid message: confirmed, and the job completes. An invalid one: its violations,
    exit 1, nothing published. An exchange without a binding: unroutable, exit 2."""
    r = env.publish_ctl(vm_message("ctl-pub-1", VM, DISKS), failures, "publish")
    if "confirmed" not in r.stdout:
        failures.append(f"publish: no confirmation printed: {describe(r)}")
    if env.wait_terminal("ctl-pub-1") != "completed":
        failures.append("publish: ctl-pub-1 did not complete")
    check_events(env, "ctl-pub-1", failures)

    before = env.dlq_count()
    bad = vm_message("ctl-pub-bad", VM, [{"key": 2000, "size_bytes": 1000}], backup_type="weekly")
    path = env.message_file(bad)
    r = env.run_ctl("publish", path)
    want = {f"{path}: backup_type: enum", f"{path}: disks[0].size_bytes: multiple_of"}
    if r.returncode != 1 or not want <= set(r.stdout.splitlines()):
        failures.append(f"publish invalid: want exit 1 and {sorted(want)}: {describe(r)}")
    r, j = env.ctl_json("publish", path)
    if r.returncode != 1 or not j or {v["rule"] for v in j.get("violations", [])} != {"enum", "multiple_of"}:
        failures.append(f"publish invalid --json: {describe(r)}")
    r = env.run_ctl("publish", env.message_file(vm_message("ctl-pub-norepo", VM, DISKS, repository_id="repo-x")))
    if r.returncode != 1 or "repository_id: unknown_repository" not in r.stdout:
        failures.append(f"publish with an unknown repository (a host rule): {describe(r)}")
    env.drain_events(1.5)
    if env.job_events("ctl-pub-bad") or env.dlq_count() != before:
        failures.append("publish invalid: something reached the broker")

    env.ch.exchange_declare("ctl.unbound", "direct", durable=False, auto_delete=True)
    r = env.run_ctl("publish", env.message_file(vm_message("ctl-pub-unrouted", VM, DISKS)),
                sets=["amqp.jobs_exchange=ctl.unbound"])
    if r.returncode != 2 or "unroutable" not in r.stderr:
        failures.append(f"publish unroutable: want exit 2 saying unroutable: {describe(r)}")
    r = env.run_ctl("publish", env.message_file(vm_message("ctl-pub-nox", VM, DISKS)),
                sets=["amqp.jobs_exchange=ctl.missing"])
    if r.returncode != 2 or "does not exist" not in r.stderr:
        failures.append(f"publish to a missing exchange: want exit 2: {describe(r)}")
    r = env.run_ctl("publish", env.message_file(vm_message("ctl-pub-down", VM, DISKS)),
                sets=["amqp.url=amqp://guest:guest@127.0.0.1:1"])
    if r.returncode != 2:
        failures.append(f"publish without a broker: want exit 2: {describe(r)}")


def follow(env, *args):
    """Starts bw-ctl events ARGS in the background; returns it once its queue is bound."""
    err = open(os.path.join(env.tmp, "events.err"), "w+")
    p = subprocess.Popen([env.ctl_bin, "--config", env.config("ctl"), "events", *args],
                         stdout=subprocess.PIPE, stderr=err, text=True)
    for _ in range(200):
        err.seek(0)
        if "following" in err.read():
            return p
        if p.poll() is not None:
            break
        time.sleep(0.05)
    err.seek(0)
    raise AssertionError(f"bw-ctl events never bound its queue: {err.read()}")


def case_events(env, failures):
    """events --job (human and --json) shows the job's events once each, in seq order, and
    ends after backup.completed; --count with nothing coming ends 1 at the timeout."""
    jid = "ctl-ev-1"
    human = follow(env, "--job", jid, "--timeout", "90")
    raw = follow(env, "--job", jid, "--timeout", "90", "--json")
    other = follow(env, "--count", "2", "--timeout", "90", "--json")
    env.publish_ctl(vm_message(jid, VM, DISKS), failures, "events")
    try:
        out_h, _ = human.communicate(timeout=120)
        out_r, _ = raw.communicate(timeout=120)
        out_o, _ = other.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for p in (human, raw, other):
            p.kill()
            p.wait()
        failures.append("events: did not end after the job's backup.completed")
        return
    evs = [json.loads(line) for line in out_r.splitlines()]
    seqs = [e["seq"] for e in evs]
    names = [e["event"] for e in evs]
    if raw.returncode != 0 or seqs != list(range(1, len(seqs) + 1)) or names[:1] != ["backup.accepted"] \
            or names[-1:] != ["backup.completed"] or {e["job_id"] for e in evs} != {jid}:
        failures.append(f"events --json: exit {raw.returncode}, seqs {seqs}, events {names}")
    lines = [line.split() for line in out_h.splitlines()]
    hnames = [x[1] for x in lines if len(x) > 3]
    hseqs = [int(x[3]) for x in lines if len(x) > 3]
    if human.returncode != 0 or hnames != names or hseqs != seqs or any(x[2] != jid for x in lines):
        failures.append(f"events: exit {human.returncode}, lines {out_h!r}")
    if not any("2 disk(s) in" in line for line in out_h.splitlines()):
        failures.append(f"events: no summary of backup.completed in {out_h!r}")
    if other.returncode != 0 or len(out_o.splitlines()) != 2:
        failures.append(f"events --count 2: exit {other.returncode}, {len(out_o.splitlines())} lines")
    env.wait_terminal(jid)
    # its events are over: waiting for more of them is a negative answer at the timeout
    t0 = time.time()
    r = env.run_ctl("events", "--job", jid, "--timeout", "2")
    if r.returncode != 1 or r.stdout or time.time() - t0 > 20:
        failures.append(f"events after the job's end: want exit 1 after 2 s of silence: {describe(r)}")
    r = env.run_ctl("events", "--count", "0")
    if r.returncode != 2:
        failures.append(f"events --count 0: want exit 2: {describe(r)}")


def case_cancel(env, failures):
    """cancel publishes the backup.cancel (bw_cancel_build) on the control exchange, confirmed;
    with no exchange or no queue bound: no worker is listening, exit 1; invalid: exit 2.
    Its own exchange (amqp.control_exchange), so a worker's queue changes nothing here."""
    sets = ["amqp.control_exchange=ctl.control"]
    r = env.run_ctl("cancel", "ctl-c-1", sets=sets)
    if r.returncode != 1 or "no worker is listening" not in r.stderr:
        failures.append(f"cancel, no exchange: {describe(r)}")
    ch = env.conn.channel()
    ch.exchange_declare("ctl.control", "fanout", durable=True)
    r = env.run_ctl("cancel", "ctl-c-1", sets=sets)
    if r.returncode != 1 or "no worker is listening" not in r.stderr:
        failures.append(f"cancel, no queue bound: {describe(r)}")
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "ctl.control")
    r = env.run_ctl("cancel", "ctl-c-1", "--reason", "maintenance window closed \u00e9", sets=sets)
    m, p, b = ch.basic_get(q, auto_ack=True)
    want = {"schema_version": 1, "job_id": "ctl-c-1", "reason": "maintenance window closed \u00e9"}
    if r.returncode != 0 or m is None or json.loads(b) != want or p.delivery_mode != 2:
        failures.append(f"cancel: {describe(r)}; got {b!r}")
    r, j = env.ctl_json("cancel", "ctl-c-2", sets=sets)
    m, p, b = ch.basic_get(q, auto_ack=True)
    if r.returncode != 0 or not j or j.get("job_id") != "ctl-c-2" or m is None \
            or json.loads(b) != {"schema_version": 1, "job_id": "ctl-c-2"}:
        failures.append(f"cancel --json without a reason: {describe(r)}; got {b!r}")
    for args in (["bad:id"], ["ctl-c-3", "--reason", "tab\there"], ["ctl-c-3", "--reason", "x" * 257], []):
        r = env.run_ctl("cancel", *args, sets=sets)
        if r.returncode != 2:
            failures.append(f"cancel {args[:1]}: want exit 2: {describe(r)}")
    m, p, b = ch.basic_get(q, auto_ack=True)
    if m is not None:
        failures.append(f"an invalid cancel was published: {b!r}")
    ch.close()


def case_retry(env, failures):
    """A job failed retryably (sna_failed) is published again as .r1; .r1 failed too gives .r2,
    which completes; an older attempt, a non-retryable failure (sna_rejected), a completed or
    unknown job: exit 1."""
    base = "ctl-rt-1"
    env.sim_post(f"/_sim/faults?job={base}", {"fail_disk": 2001})
    env.sim_post(f"/_sim/faults?job={base}.r1", {"fail_disk": 2000})
    env.publish_ctl(vm_message(base, VM, DISKS), failures, "retry")
    env.wait_terminal(base, cleanup=True)
    failed = [e for e in env.job_events(base) if e["event"] == "backup.failed"]
    if not failed or failed[0]["reason"] != "sna_failed":
        failures.append(f"retry: {base} should fail sna_failed: {failed}")
        return
    for _ in range(100):  # compensation ends with the job compensated
        if env.job_state(base) in ("failed", "compensated"):
            break
        time.sleep(0.1)
    r = env.run_ctl("retry", base)
    if r.returncode != 0 or f"{base}.r1" not in r.stdout:
        failures.append(f"retry {base}: {describe(r)}")
        return
    env.wait_terminal(f"{base}.r1", cleanup=True)
    r = env.run_ctl("retry", base)
    if r.returncode != 1 or f"{base}.r1" not in r.stderr:
        failures.append(f"retry of an attempt with a newer one: want exit 1 naming {base}.r1: {describe(r)}")
    for _ in range(100):
        if env.job_state(f"{base}.r1") in ("failed", "compensated"):
            break
        time.sleep(0.1)
    r, j = env.ctl_json("retry", f"{base}.r1")
    if r.returncode != 0 or not j or j.get("job_id") != f"{base}.r2":
        failures.append(f"retry {base}.r1: want {base}.r2: {describe(r)}")
        return
    if env.wait_terminal(f"{base}.r2") != "completed":
        failures.append(f"retry: {base}.r2 did not complete")
    evs = check_events(env, f"{base}.r2", failures)
    acc = [e for e in evs if e["event"] == "backup.accepted"]
    orig = vm_message(base, VM, DISKS)
    if not acc or acc[0]["vm"] != orig["vm"] or acc[0].get("tags") != orig["tags"] \
            or acc[0].get("policy_id") != orig["policy_id"] or acc[0].get("disk_count") != 2:
        failures.append(f"retry: {base}.r2 is not the same message: {acc}")
    r = env.run_ctl("retry", f"{base}.r2")
    if r.returncode != 1 or "not failed" not in r.stderr:
        failures.append(f"retry of a completed job: want exit 1: {describe(r)}")
    r = env.run_ctl("retry", "ctl-rt-nope")
    if r.returncode != 1:
        failures.append(f"retry of an unknown job: want exit 1: {describe(r)}")

    nr = "ctl-rt-4xx"
    env.sim_post("/_sim/faults", {"start_4xx": True})
    env.publish_ctl(vm_message(nr, VM, DISKS), failures, "retry")
    env.wait_terminal(nr, cleanup=True)
    env.sim_post("/_sim/faults", {})
    for _ in range(100):
        if env.job_state(nr) in ("failed", "compensated"):
            break
        time.sleep(0.1)
    r = env.run_ctl("retry", nr)
    if r.returncode != 1 or "sna_rejected" not in r.stderr:
        failures.append(f"retry of a non-retryable failure: want exit 1 naming sna_rejected: {describe(r)}")
    env.drain_events(1)
    if env.job_events(f"{nr}.r1"):
        failures.append("retry of a non-retryable failure published something")
    # a retry whose id would pass 128 characters
    long_id = "L" * 127
    env.sim_post(f"/_sim/faults?job={long_id}", {"fail_disk": 2000})
    env.publish_ctl(vm_message(long_id, VM, DISKS), failures, "retry")
    env.wait_terminal(long_id, cleanup=True)
    for _ in range(100):
        if env.job_state(long_id) in ("failed", "compensated"):
            break
        time.sleep(0.1)
    r = env.run_ctl("retry", long_id)
    if r.returncode != 1 or "128" not in r.stderr:
        failures.append(f"retry past 128 characters: want exit 1: {describe(r)}")


def case_dlq(env, failures):
    """Invalid messages are rejected into the DLQ; list shows them in order with their x-death,
    show gives headers and body; requeue of a valid dead letter runs the job and removes only
    that message; requeue of an invalid one sends it back through the worker (rejected again:
    it comes back as a new dead letter at the tail). Nothing is lost: the count is checked after every step."""
    bodies = [json.dumps({"schema_version": 1, "job_id": f"ctl-dlq-{i}", "vm": {"name": "x"}})
              for i in range(3)]
    before = env.dlq_count()
    for b in bodies:
        env.ch.basic_publish("backup.jobs", "backup.start", b.encode(), pika.BasicProperties(delivery_mode=2))
    for _ in range(200):
        if env.dlq_count() >= before + 3:
            break
        time.sleep(0.05)
    # a valid message dead-lettered by hand (no x-death: requeued to backup.jobs/backup.start)
    good = vm_message("ctl-dlq-good", VM, DISKS)
    env.ch.basic_publish("backup.dlx", "", json.dumps(good).encode(), pika.BasicProperties(delivery_mode=2))
    for _ in range(100):
        if env.dlq_count() >= before + 4:
            break
        time.sleep(0.05)
    n = env.dlq_count()
    if n != before + 4:
        failures.append(f"dlq: {n} messages, want {before + 4}")
    for _ in range(2):  # listing twice: same order, nothing lost
        r, rows = env.ctl_json("dlq", "list")
        if r.returncode != 0 or rows is None:
            failures.append(f"dlq list: {describe(r)}")
            return
        mine = [x for x in rows if (x["job_id"] or "").startswith("ctl-dlq-")]
        if [x["job_id"] for x in mine] != ["ctl-dlq-0", "ctl-dlq-1", "ctl-dlq-2", "ctl-dlq-good"]:
            failures.append(f"dlq list: order {[x['job_id'] for x in mine]}")
        if any(x["reason"] != "rejected" or x["queue"] != "backup.start" or x["count"] != 1 for x in mine[:3]):
            failures.append(f"dlq list: x-death {mine[:3]}")
        if env.dlq_count() != n:
            failures.append(f"dlq list lost messages: {env.dlq_count()} of {n}")
    r = env.run_ctl("dlq", "list")
    if r.returncode != 0 or not any(line.split()[1:2] == ["ctl-dlq-1"] for line in r.stdout.splitlines()[1:]):
        failures.append(f"dlq list table: {describe(r)}")
    pos = {x["job_id"]: x["position"] for x in rows}
    r, m = env.ctl_json("dlq", "show", str(pos["ctl-dlq-1"]))
    if r.returncode != 0 or not m or m.get("body") != bodies[1] \
            or m["properties"]["headers"]["x-death"][0]["reason"] != "rejected" \
            or m["properties"]["headers"].get("x-first-death-exchange") != "backup.jobs":
        failures.append(f"dlq show: {describe(r)}")
    r = env.run_ctl("dlq", "show", str(n + 1))
    if r.returncode != 1:
        failures.append(f"dlq show past the end: want exit 1: {describe(r)}")
    r = env.run_ctl("dlq", "requeue", "--job", "ctl-dlq-0", str(pos["ctl-dlq-good"]))
    if r.returncode != 1 or env.dlq_count() != n:
        failures.append(f"dlq requeue --job of another job: want exit 1, nothing moved: {describe(r)}")
    r = env.run_ctl("dlq", "requeue", "--job", "ctl-dlq-good", str(pos["ctl-dlq-good"]))
    if r.returncode != 0:
        failures.append(f"dlq requeue: {describe(r)}")
    elif env.wait_terminal("ctl-dlq-good") != "completed":
        failures.append("dlq requeue: the requeued job did not complete")
    if env.dlq_count() != n - 1:
        failures.append(f"dlq requeue: {env.dlq_count()} messages left, want {n - 1}")
    # an invalid one goes back through the worker and is dead-lettered again: a new message
    # (message_id dlq-requeue/JOB, a fresh x-death), now at the tail
    r, rows = env.ctl_json("dlq", "list")
    pos = {x["job_id"]: x["position"] for x in rows or []}
    r = env.run_ctl("dlq", "requeue", str(pos.get("ctl-dlq-2", 0)))
    if r.returncode != 0 or "backup.jobs" not in r.stdout:
        failures.append(f"dlq requeue of an invalid message: {describe(r)}")
    again = []
    for _ in range(100):
        r, rows = env.ctl_json("dlq", "list")
        again = [x for x in rows or [] if x["job_id"] == "ctl-dlq-2"]
        if again and again[0]["message_id"] == "dlq-requeue/ctl-dlq-2":
            break
        time.sleep(0.1)
    if not again or again[0]["message_id"] != "dlq-requeue/ctl-dlq-2" or again[0]["position"] != len(rows) \
            or again[0]["reason"] != "rejected" or env.dlq_count() != n - 1:
        failures.append(f"dlq requeue of an invalid message: {again}, {env.dlq_count()} messages")
    mine = [x["job_id"] for x in rows or [] if (x["job_id"] or "").startswith("ctl-dlq-")]
    if sorted(mine) != ["ctl-dlq-0", "ctl-dlq-1", "ctl-dlq-2"]:
        failures.append(f"dlq: left {mine}")


def case_reap(env, failures):
    """A worker dies while transferring; the only other worker's recovery pass is an hour away;
    bw-ctl reap makes it run now: it adopts and completes the job. With no live worker: 1."""
    jid = "ctl-reap-1"
    codes = env.stop_workers()  # w1: the victim must take the job
    keeper = env.start_worker("keeper", env={**os.environ, "BW_WORKER_RECOVERY_INTERVAL_S": "3600",
                                             "BW_AMQP_QUEUE": "keeper.idle", "BW_AMQP_JOBS_EXCHANGE": "keeper.jobs",
                                             "BW_AMQP_DLX": "keeper.dlx", "BW_AMQP_DLQ": "keeper.dlq"})
    env.sim_post(f"/_sim/faults?job={jid}", {"slow_bytes_per_s": 4 * MiB})
    victim = env.start_worker("victim", env={**os.environ, "BW_CRASH_AT": "transferring"})
    try:
        env.wait_queue()
        env.publish_ctl(vm_message(jid, VM, DISKS), failures, "reap")
        code = victim.wait(60)
        env.workers.pop("victim")
        if code != -signal.SIGKILL:
            failures.append(f"reap: the victim did not die at transferring (exit {code})")
            return
        time.sleep(3)
        r, j = env.ctl_json("show", jid)
        if not j or j.get("owner") != "victim":
            failures.append(f"reap: adopted before bw-ctl reap: {j and j.get('owner')}")
        r, j = env.ctl_json("reap")
        if r.returncode != 0 or not j or j.get("asked") != ["keeper"] or "victim" not in j.get("dead_before", []) \
                or j.get("dead_left") != []:
            failures.append(f"reap: {describe(r)}")
        if env.wait_terminal(jid, timeout=120) != "completed":
            failures.append(f"reap: {jid} did not complete")
        r, j = env.ctl_json("show", jid)
        if not j or j.get("owner") != "keeper":
            failures.append(f"reap: {jid} owned by {j and j.get('owner')}, want keeper")
        with open(os.path.join(env.tmp, "keeper.log")) as f:
            if "SIGUSR2" not in f.read():
                failures.append("reap: the keeper never logged its SIGUSR2")
    finally:
        codes.update(env.stop_workers())
        env.start_worker("w1")
        env.wait_consumer()
        # a job nobody ended leaves the victim's servers: stop them (ours: they serve our repo)
        for line in subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout.splitlines():
            if env.repo in line and jid in line:
                os.kill(int(line.split()[0]), signal.SIGTERM)
    if any(c not in (0, -signal.SIGKILL) for c in codes.values()):
        failures.append(f"reap: worker exit codes {codes}")
    r = env.run_ctl("reap", "--wait", "1", sets=["worker.state_dir=" + os.path.join(env.tmp, "nowhere")])
    if r.returncode != 1:
        failures.append(f"reap without a ledger: want exit 1: {describe(r)}")


def case_verify(env, failures):
    """A completed job's images verify (0); truncated or with a wrong virtual size they do
    not (1, naming the disk); a failed or unknown job: 1."""
    jid = "ctl-ver-1"
    env.publish_ctl(vm_message(jid, VM, DISKS), failures, "verify")
    if env.wait_terminal(jid) != "completed":
        failures.append("verify: the job did not complete")
        return
    evs = check_events(env, jid, failures)
    r, j = env.ctl_json("verify", jid)
    if r.returncode != 0 or not j or not j["ok"] or len(j["disks"]) != 2 \
            or any(d["check"] != "ok" or d["chain"] != "ok" or d["size"] != "ok" for d in j["disks"]):
        failures.append(f"verify of a good job: {describe(r)}")
    r = env.run_ctl("verify", jid)
    if r.returncode != 0 or "every image verified" not in r.stdout:
        failures.append(f"verify table: {describe(r)}")
    paths = {e["key"]: e["qcow2_path"] for e in evs if e["event"] == "backup.disk.completed"}
    # disk 2001: cut in the middle of its metadata
    with open(paths[2001], "r+b") as f:
        f.truncate(200 * 1024)
    r, j = env.ctl_json("verify", jid)
    bad = [d for d in (j or {}).get("disks", []) if not d["ok"]]
    if r.returncode != 1 or [d["key"] for d in bad] != [2001] or bad[0]["check"] != "failed":
        failures.append(f"verify of a truncated image: want exit 1 naming 2001: {describe(r)}")
    # disk 2000: a virtual size that is not the disk's (qemu-img check still passes)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", paths[2000], str(8 * MiB)], check=True)
    r, j = env.ctl_json("verify", jid)
    d2000 = [d for d in (j or {}).get("disks", []) if d["key"] == 2000]
    if r.returncode != 1 or not d2000 or d2000[0]["size"] != "wrong" or d2000[0]["check"] != "ok":
        failures.append(f"verify of a resized image: {describe(r)}")
    os.unlink(paths[2000])
    r, j = env.ctl_json("verify", jid)
    d2000 = [d for d in (j or {}).get("disks", []) if d["key"] == 2000]
    if r.returncode != 1 or not d2000 or d2000[0]["exists"]:
        failures.append(f"verify of a missing image: {describe(r)}")
    r = env.run_ctl("verify", "ctl-nope")
    if r.returncode != 1:
        failures.append(f"verify of an unknown job: {describe(r)}")
    failed = [x["job_id"] for x in env.ctl_json("jobs")[1] or [] if x["state"] in ("failed", "compensated")]
    if failed:
        r = env.run_ctl("verify", failed[0])
        if r.returncode != 1 or "not completed" not in r.stderr:
            failures.append(f"verify of a failed job: {describe(r)}")
    failures += [f"verify: {x}" for x in leftovers(env)]


CASES = {"publish": case_publish, "events": case_events, "cancel": case_cancel,
         "retry": case_retry, "dlq": case_dlq, "reap": case_reap, "verify": case_verify}

if __name__ == "__main__":
    sys.exit(e2e.suite_main(make_env, CASES, 40, workers=("w1",)))
