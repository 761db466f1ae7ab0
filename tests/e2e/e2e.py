#!/usr/bin/python3
"""e2e.py: the job pipeline end to end: real broker (tests/with-broker), real qemu-nbd, the SNA
simulator, two bw-worker processes. Usage: e2e.py BW_WORKER BW_CTL [CASE...]"""
import atexit
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "schema"))
import test_event_schemas as schemas  # noqa: E402

URL = os.environ["BW_TEST_AMQP_URL"]
BROKER = os.environ["BW_TEST_BROKER"]
BROKER_DIR = os.environ["BW_TEST_BROKER_DIR"]
# nbd.tls of every worker: the suites run once plain ("off") and once with a per-job key
# ("psk"); ctest registers both.
NBD_TLS = os.environ.get("BW_E2E_NBD_TLS", "")  # "": the worker's default (auto: off on loopback)
# the two runs may go side by side under ctest -j; BW_E2E_PORT_SHIFT moves a hand run aside
PORT_SHIFT = int(os.environ.get("BW_E2E_PORT_SHIFT", 1000 if NBD_TLS == "psk" else 0))
PORT_MIN, PORT_MAX = 22300, 22311  # 12 ports: two 3-disk jobs fit, three do not
MiB = 1 << 20


# Ports handed out by free_port, one file each naming the suite's pid, so that two suites
# that ctest runs side by side never pick the same one between the check and the bind (seen:
# a worker's metrics.listen 'Address already in use' in e2e_placement).
PORT_CLAIMS = "/tmp/bw-e2e-port-claims"
_claimed = []


def _release_ports():
    for p in _claimed:
        try:
            os.unlink(os.path.join(PORT_CLAIMS, str(p)))
        except OSError:
            pass


atexit.register(_release_ports)


def _claimed_by_other(p):
    try:
        with open(os.path.join(PORT_CLAIMS, str(p))) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid != os.getpid() or p in _claimed
    except (OSError, ValueError):
        return False  # no claim, or its suite is gone


def free_port():
    """A port in 23000-23899 that is free now and that no other running suite was given."""
    os.makedirs(PORT_CLAIMS, exist_ok=True)
    with open(PORT_CLAIMS + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(200):
            p = 23000 + int.from_bytes(os.urandom(2), "big") % 900
            if _claimed_by_other(p):
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    continue
            with open(os.path.join(PORT_CLAIMS, str(p)), "w") as f:
                f.write(str(os.getpid()))
            _claimed.append(p)
            return p
    raise RuntimeError("no free port")


class Env:
    def __init__(self, worker, ctl):
        self.make_dirs(worker, ctl, "bw-e2e-", "e2e-secret")
        self.sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.spawn_sim()
        self.connect()

    def make_dirs(self, worker, ctl, prefix, password):
        """A new tmp (mkdtemp with prefix): repo/, state/ and creds/ with vcenter-main.json (0600)."""
        self.worker, self.ctl = worker, ctl
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.repo = os.path.join(self.tmp, "repo")
        self.state = os.path.join(self.tmp, "state")
        self.creds = os.path.join(self.tmp, "creds")
        for d in (self.repo, self.state, self.creds):
            os.makedirs(d)
        with open(os.path.join(self.creds, "vcenter-main.json"), "w") as f:
            json.dump({"vcenter_host": "vcenter.example", "username": "backup@vsphere.local",
                       "password": password}, f)
        os.chmod(os.path.join(self.creds, "vcenter-main.json"), 0o600)
        self.sim, self.sim_ctx, self.workers, self.events = None, None, {}, []

    def connect(self):
        """The broker connection, and e2e.events bound to every event."""
        self.conn = pika.BlockingConnection(pika.URLParameters(URL))
        self.pub = None  # publish() opens a confirmed channel on this connection
        self.ch = self.conn.channel()
        self.ch.exchange_declare("backup.events", "topic", durable=True)
        self.ch.queue_declare("e2e.events", durable=True)
        self.ch.queue_bind("e2e.events", "backup.events", "#")

    def spawn_sim(self, *args):
        """The simulator on sim_port with more options args; its state in tmp/sim, so that a new
        one after a dead one knows the old one's jobs. Returns its "listening" line."""
        self.sim = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(ROOT, "tests", "sna", "sna_sim.py"), "--port",
             str(self.sim_port), "--state", os.path.join(self.tmp, "sim"), *args],
            stdout=subprocess.PIPE, stderr=open(os.path.join(self.tmp, "sim.log"), "a"))
        line = self.sim.stdout.readline().decode()
        assert "listening" in line, line
        return line

    def config(self, wid, extra="", sna_url=None, sna_lines=()):
        path = os.path.join(self.tmp, f"{wid}.conf")
        sna = "\n".join(sna_lines)
        with open(path, "w") as f:
            f.write(f"""[amqp]
url = {URL}
heartbeat_s = 10
[worker]
id = {wid}
max_jobs = 4
state_dir = {self.state}
[nbd]
port_min = {PORT_MIN + PORT_SHIFT}
port_max = {PORT_MAX + PORT_SHIFT}
{"tls = " + NBD_TLS if NBD_TLS else ""}
[sna]
url = {sna_url or self.sim_url}
poll_interval_s = 1
max_attempts = 3
backoff_base_ms = 100
backoff_cap_s = 1
connect_timeout_s = 2
timeout_s = 5
lost_after = 3
{sna}
[credentials]
dir = {self.creds}
[log]
level = debug
[repositories]
repo-001 = {self.repo}
{extra}""")
        return path

    def start_worker(self, wid, extra="", env=None, **config):
        old = self.workers.get(wid)
        if old is not None and old.poll() is None:
            # replacing it in the dict would hide it from stop_workers: it would outlive the test
            raise RuntimeError(f"worker {wid} (pid {old.pid}) is still running; stop it first")
        cfg = self.config(wid, extra, **config)
        log = open(os.path.join(self.tmp, f"{wid}.log"), "a")
        self.workers[wid] = subprocess.Popen([self.worker, "--config", cfg], stdout=log, stderr=log, env=env)
        return self.workers[wid]

    def stop_workers(self):
        codes = {}
        for wid, p in self.workers.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for wid, p in self.workers.items():
            try:
                codes[wid] = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[wid] = "killed"
        self.workers = {}
        return codes

    def sim_get(self, path):
        with urllib.request.urlopen(self.sim_url + path, timeout=10, context=self.sim_ctx) as r:
            return json.loads(r.read())

    def sim_post(self, path, body):
        req = urllib.request.Request(self.sim_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30, context=self.sim_ctx) as r:
            return json.loads(r.read() or b"{}")

    def publish(self, msg, timeout=30):
        """Publishes a backup.start, confirmed and routed: a worker may have declared the
        queue but not yet bound it, and an unroutable message would be dropped silently."""
        if self.pub is None:
            self.pub = self.conn.channel()
            self.pub.confirm_delivery()
        end = time.time() + timeout
        while True:
            try:
                self.pub.basic_publish("backup.jobs", "backup.start", json.dumps(msg).encode(),
                                       pika.BasicProperties(delivery_mode=2,
                                                            content_type="application/json"),
                                       mandatory=True)
                return
            except (pika.exceptions.UnroutableError, pika.exceptions.ChannelClosedByBroker):
                if time.time() > end:
                    raise AssertionError("backup.start could not be routed to a queue")
                if self.pub.is_closed:
                    self.pub = self.conn.channel()
                    self.pub.confirm_delivery()
                time.sleep(0.1)

    def wait_queue(self):
        for _ in range(200):
            try:
                self.ch.queue_declare("backup.start", passive=True)
                return
            except pika.exceptions.ChannelClosedByBroker:
                self.ch = self.conn.channel()
                time.sleep(0.1)
        raise AssertionError("the workers never declared backup.start")

    def drain_events(self, timeout=1.0):
        end = time.time() + timeout
        while time.time() < end:
            m, p, b = self.ch.basic_get("e2e.events", auto_ack=True)
            if m is None:
                time.sleep(0.05)
                continue
            self.events.append(self.parse_event(b))

    def parse_event(self, body):
        """An event's body (bytes) as a dict; hostile.py puts in one that survives broken UTF-8."""
        return json.loads(body)

    def wait_terminal(self, job_id, timeout=120, cleanup=False):
        end = time.time() + timeout
        while time.time() < end:
            self.drain_events(0.2)
            names = [e["event"] for e in self.job_events(job_id)]
            if "backup.completed" in names:
                return "completed"
            if "backup.failed" in names and (not cleanup or "backup.cleanup" in names):
                return "failed"
        raise AssertionError(f"job {job_id}: no terminal event within {timeout} s; "
                             f"got {[e['event'] for e in self.job_events(job_id)]}")

    def job_events(self, job_id):
        seen, out = set(), []
        for e in self.events:
            if e.get("job_id") == job_id and e["event_id"] not in seen:
                seen.add(e["event_id"])
                out.append(e)
        return sorted(out, key=lambda e: e["seq"])

    def stop_sim(self):
        if self.sim is not None and self.sim.poll() is None:
            self.sim.send_signal(signal.SIGTERM)
            try:
                self.sim.wait(20)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait()
        if self.sim is not None and self.sim.stdout:
            self.sim.stdout.close()
        self.sim = None

    def close(self, keep_tmp=False):
        self.stop_workers()
        self.stop_sim()
        try:
            self.conn.close()
        except Exception:
            pass
        if not keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def vm_message(job_id, vm_path, disks, name="db, \"prod\" / shard 1", backup_type="full", **extra):
    msg = {"schema_version": 1, "job_id": job_id, "vm": {"name": name, "path": vm_path},
           "backup_type": backup_type, "repository_id": "repo-001",
           "credential_id": "vcenter-main", "policy_id": "gold", "tags": {"team": "db"},
           "disks": disks}
    msg.update(extra)
    return msg


def check_events(env, job_id, failures):
    evs = env.job_events(job_id)
    seqs = [e["seq"] for e in evs]
    if seqs != list(range(1, len(seqs) + 1)):
        failures.append(f"{job_id}: seq not rising by one: {seqs}")
    for e in evs:
        for err in schemas.check(e["event"], e):
            failures.append(f"{job_id}: {e['event_id']}: {err}")
    check_requests(env, job_id, failures)
    return evs


def check_requests(env, job_id, failures):
    """Every start and cleanup request the simulator got for job_id held to schemas/sna/
    (the simulator records what jsonschema says of each body once it has answered; None: it
    could not check)."""
    for r in env.sim_get("/_sim/requests")["requests"]:
        if (r.get("body") or {}).get("job_id") != job_id or not r["path"].endswith(("/backup/start", "/cleanup")):
            continue
        if r.get("status") is None:
            continue  # still being answered (a hanging SNA): checked once it is
        errs = r.get("contract_errors")
        if errs is None or errs:
            failures.append(f"{job_id}: {r['path']} body against schemas/sna/: {errs}")


def leftovers(env):
    out = []
    ps = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    mine = [l for l in ps.splitlines() if env.repo in l]
    if mine:
        out.append(f"qemu-nbd left: {mine}")
    ports = json.loads(subprocess.run([env.ctl, "--config", env.config("ctl"), "ports", "--json"],
                                      capture_output=True, text=True).stdout or "[]")
    held = [p for p in ports if p["state"] == "reserved"]
    if held:
        out.append(f"ports held: {held}")
    keys = os.path.join(env.state, "tls")
    if os.path.isdir(keys) and os.listdir(keys):
        out.append(f"NBD TLS keys left: {os.listdir(keys)}")
    return out


def compare_images(env, jid, evs, failures, what=None):
    """Each completed disk's image of job jid against the SNA's snapshot of it (qemu-img
    compare); returns the paths of the images compared."""
    what = what or jid
    snaps = [s for s in env.sim_get("/_sim/snapshots")["snapshots"] if s["job_id"] == jid]
    done = {e["key"]: e for e in evs if e["event"] == "backup.disk.completed"}
    if len(snaps) != 1:
        failures.append(f"{what}: {len(snaps)} snapshots (want 1)")
        return set()
    compared = set()
    for key, d in snaps[0]["disks"].items():
        if int(key) not in done:
            continue
        img = done[int(key)]["qcow2_path"]
        compared.add(img)
        r = subprocess.run(["qemu-img", "compare", "-q", d["path"], img], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{what}: disk {key} differs from its snapshot {r.stderr.strip()[:200]}")
    return compared


def images(env):
    found = []
    for d, _, files in os.walk(env.repo):
        found += [os.path.join(d, f) for f in files]
    return sorted(found)


# ---- cases ------------------------------------------------------------------------------

def case_full_and_incremental(env, failures):
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/db", "seed": 7,
                              "disks": {"2000": {"size": 64 * MiB}, "2001": {"size": 32 * MiB + 512},
                                        "16000": {"size": 8 * MiB}}})
    disks = [{"key": 2000, "size_bytes": 64 * MiB, "label": "Hard disk 1"},
             {"key": 2001, "size_bytes": 32 * MiB + 512}, {"key": 16000, "size_bytes": 8 * MiB}]
    env.publish(vm_message("e2e-full-1", "/DC/vm/db", disks))
    if env.wait_terminal("e2e-full-1") != "completed":
        failures.append(f"full: not completed: {env.job_events('e2e-full-1')[-1]}")
        return
    evs = check_events(env, "e2e-full-1", failures)
    names = [e["event"] for e in evs]
    want = ["backup.accepted", "backup.started"]
    if names[:2] != want or names.count("backup.disk.completed") != 3 or names[-1] != "backup.completed":
        failures.append(f"full: events {names}")
    started = [e for e in evs if e["event"] == "backup.started"][0]
    for key in ("2000:", "2001:", "16000:"):
        if key not in started["nbd_targets"]:
            failures.append(f"full: {key} missing in nbd_targets {started['nbd_targets']}")
    starts = [r for r in env.sim_get("/_sim/requests")["requests"] if r["path"].endswith("/backup/start")
              and r["body"].get("job_id") == "e2e-full-1"]
    snaps = [s for s in env.sim_get("/_sim/snapshots")["snapshots"] if s["job_id"] == "e2e-full-1"]
    if len(starts) != 1 or len(snaps) != 1:
        failures.append(f"full: {len(starts)} start requests, {len(snaps)} snapshots (want 1, 1)")
    done = {e["key"]: e for e in evs if e["event"] == "backup.disk.completed"}
    if len(compare_images(env, "e2e-full-1", evs, failures, "full")) != 3:
        failures.append(f"full: disks completed {sorted(done)}")
    failures += [f"full: {x}" for x in leftovers(env)]
    logs = [f for f in os.listdir(os.path.join(env.state, "logs")) if f.startswith("e2e-full-1-")]
    if logs:
        failures.append(f"full: per-disk logs left for a completed job: {logs}")

    # an incremental on top: each overlay, read through its chain, equals the new source
    for key in ("2000", "16000"):
        env.sim_post("/_sim/write", {"vm_path": "/DC/vm/db", "key": key, "offset": 3 * MiB,
                                     "length": 2 * MiB, "seed": 11})
    inc_disks = []
    for d in disks:
        c = done[d["key"]]
        inc_disks.append({"key": d["key"], "size_bytes": d["size_bytes"],
                          "parent_path": os.path.relpath(c["qcow2_path"], env.repo),
                          "previous_change_id": c["change_id"]})
    env.publish(vm_message("e2e-inc-1", "/DC/vm/db", inc_disks, backup_type="incremental"))
    if env.wait_terminal("e2e-inc-1") != "completed":
        failures.append(f"incremental: not completed: {env.job_events('e2e-inc-1')[-1]}")
        return
    evs = check_events(env, "e2e-inc-1", failures)
    snaps = [s for s in env.sim_get("/_sim/snapshots")["snapshots"] if s["job_id"] == "e2e-inc-1"]
    idone = {e["key"]: e for e in evs if e["event"] == "backup.disk.completed"}
    for key, d in snaps[0]["disks"].items():
        img = idone[int(key)]["qcow2_path"]
        if subprocess.run(["qemu-img", "compare", "-q", d["path"], img]).returncode != 0:
            failures.append(f"incremental: disk {key} differs from its snapshot")
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", img],
                                         capture_output=True, text=True).stdout)
        parent = [x for x in inc_disks if x["key"] == int(key)][0]["parent_path"]
        if info.get("backing-filename") != "../../" + parent:
            failures.append(f"incremental: disk {key} backing {info.get('backing-filename')}")
    failures += [f"incremental: {x}" for x in leftovers(env)]


def case_faults(env, failures):
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/f", "seed": 3,
                              "disks": {"2000": {"size": 16 * MiB}, "2001": {"size": 8 * MiB}}})
    disks = [{"key": 2000, "size_bytes": 16 * MiB}, {"key": 2001, "size_bytes": 8 * MiB}]
    cases = [
        ("e2e-f-5xx", {"start_5xx": 10}, "sna_unavailable"),
        ("e2e-f-4xx", {"start_4xx": True}, "sna_rejected"),
        ("e2e-f-disk", {"fail_disk": 2001}, "sna_failed"),
        ("e2e-f-lost", {"forget_job": True}, "sna_lost_job"),
        # a lying SNA: "completed" while the bytes are still on their way
        ("e2e-f-early", {"complete_early": True, "slow_bytes_per_s": 2 * MiB}, "sna_failed"),
        ("e2e-f-hang", {"hang_start_s": 8}, "sna_unavailable"),
        ("e2e-f-slow-deadline", {"slow_bytes_per_s": 256 * 1024}, "deadline_exceeded"),
        ("e2e-f-die", {"die_mid_transfer": True, "slow_bytes_per_s": 4 * MiB}, "sna_unavailable"),
    ]
    for job_id, knobs, reason in cases:
        env.sim_post("/_sim/faults", knobs)
        before = set(images(env))
        extra = {"max_duration_s": 60} if "deadline" in job_id else {}
        env.publish(vm_message(job_id, "/DC/vm/f", disks, **extra))
        env.wait_terminal(job_id, timeout=120, cleanup=True)
        if env.sim.poll() is not None:  # it died on purpose: a new one, same state dir
            env.spawn_sim()
        env.sim_post("/_sim/faults", {})
        evs = check_events(env, job_id, failures)
        failed = [e for e in evs if e["event"] == "backup.failed"]
        cleanup = [e for e in evs if e["event"] == "backup.cleanup"]
        if not failed or failed[0]["reason"] != reason:
            failures.append(f"{job_id}: reason {failed[0]['reason'] if failed else None}, want {reason}")
        if not cleanup:
            failures.append(f"{job_id}: no backup.cleanup")
        else:
            kinds = {a["kind"] for a in cleanup[0]["actions"]}
            if not {"qemu_nbd_stopped", "port_released", "qcow2_removed"} <= kinds and reason != "sna_failed":
                failures.append(f"{job_id}: cleanup actions {sorted(kinds)}")
            cleaned = [a for a in cleanup[0]["actions"] if a["kind"] == "sna_cleanup_requested"]
            if reason == "sna_unavailable" and "die" in job_id and (
                    not cleaned or cleaned[0]["result"] != "failed" or not cleanup[0]["pending"]):
                failures.append(f"{job_id}: a dead SNA's cleanup must be failed and pending: {cleanup[0]}")
            if (reason != "sna_rejected") != ("sna_cleanup_requested" in kinds):
                failures.append(f"{job_id}: sna cleanup {'missing' if reason != 'sna_rejected' else 'sent after a 4xx'}")
        kept = {a["path"] for c in cleanup for a in c["actions"] if a["kind"] == "qcow2_kept"}
        completed = {e["qcow2_path"] for e in evs if e["event"] == "backup.disk.completed"}
        if kept != completed:
            failures.append(f"{job_id}: kept {sorted(kept)} but completed {sorted(completed)}")
        new = set(images(env)) - before - kept
        if new:
            failures.append(f"{job_id}: stray files {sorted(new)}")
        failures += [f"{job_id}: {x}" for x in leftovers(env)]


def case_duplicate_and_ports(env, failures):
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/d", "seed": 5,
                              "disks": {str(k): {"size": 4 * MiB} for k in range(2000, 2007)}})
    disks7 = [{"key": k, "size_bytes": 4 * MiB} for k in range(2000, 2007)]
    env.sim_post("/_sim/faults", {"slow_bytes_per_s": 4 * MiB})
    # the same job_id twice, also while the first runs
    env.publish(vm_message("e2e-dup", "/DC/vm/d", disks7))
    env.publish(vm_message("e2e-dup", "/DC/vm/d", disks7))
    # 7 + 7 disks > 12 ports: the second waits, then runs
    env.publish(vm_message("e2e-wait", "/DC/vm/d", disks7))
    time.sleep(2)
    env.publish(vm_message("e2e-dup", "/DC/vm/d", disks7))
    a = env.wait_terminal("e2e-dup", timeout=120)
    b = env.wait_terminal("e2e-wait", timeout=120)
    env.sim_post("/_sim/faults", {})
    starts = [r for r in env.sim_get("/_sim/requests")["requests"] if r["path"].endswith("/backup/start")
              and r["body"].get("job_id") == "e2e-dup"]
    if len(starts) != 1:
        failures.append(f"duplicate: {len(starts)} SNA start requests for one job_id")
    if (a, b) != ("completed", "completed"):
        failures.append(f"ports: e2e-dup {a}, e2e-wait {b}")
    # whichever of the two got the ports second waited for them
    waited = [j for j in ("e2e-dup", "e2e-wait")
              if "waiting_ports" in subprocess.run(
                  [env.ctl, "--config", env.config("ctl"), "show", j],
                  capture_output=True, text=True).stdout]
    if len(waited) != 1:
        failures.append(f"ports: jobs that waited for ports: {waited} (want exactly one)")
    check_events(env, "e2e-dup", failures)
    check_events(env, "e2e-wait", failures)
    failures += [f"ports: {x}" for x in leftovers(env)]


def dlq_get(env):
    """The next message of backup.start.dlq as (method, properties, body), waiting up to 5 s;
    (None, None, None) when none came."""
    for _ in range(50):
        m, p, b = env.ch.basic_get("backup.start.dlq", auto_ack=True)
        if m:
            return m, p, b
        time.sleep(0.1)
    return None, None, None


def case_rejected(env, failures):
    env.ch.basic_publish("backup.jobs", "backup.start", b"{not json",
                         pika.BasicProperties(delivery_mode=2))
    end = time.time() + 20
    while time.time() < end:
        env.drain_events(0.3)
        if any(e["event"] == "backup.rejected" for e in env.events):
            break
    rej = [e for e in env.events if e["event"] == "backup.rejected"]
    if not rej or rej[0]["reason"] != "invalid_json":
        failures.append(f"rejected: {rej}")
    for e in rej:
        failures += [f"rejected: {x}" for x in schemas.check("backup.rejected", e)]
    m, p, b = dlq_get(env)
    if m is None or b != b"{not json" or "x-death" not in (p.headers or {}):
        failures.append("rejected: not in the DLQ with x-death")


def case_too_large(env, failures):
    body = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    env.ch.basic_publish("backup.jobs", "backup.start", body, pika.BasicProperties(delivery_mode=2))
    h = 0xcbf29ce484222325
    for c in body:
        h = ((h ^ c) * 0x100000001b3) & 0xffffffffffffffff
    end = time.time() + 30
    rej = []
    while time.time() < end and not rej:
        env.drain_events(0.3)
        rej = [e for e in env.events if e["event"] == "backup.rejected" and e["reason"] == "too_large"]
    if not rej or rej[0]["event_id"] != "rejected/%016x" % h:
        failures.append(f"too_large: {rej} (want id rejected/{h:016x})")
    else:
        print("too_large event:", rej[0]["event_id"], rej[0]["errors"])
    m, p, b = dlq_get(env)
    if m is None or b != body:
        failures.append("too_large: not in the DLQ whole")


def case_tls_exports(env, failures):
    """nbd.tls = psk: while the copy runs, a plain client and one with a wrong key are refused
    by every export; the job completes with identical images; no key is left."""
    if NBD_TLS != "psk":
        print("     (tls_exports runs with BW_E2E_NBD_TLS=psk: see ctest e2e_psk)")
        return
    env.sim_post("/_sim/vm", {"vm_path": "/DC/vm/tls", "seed": 5,
                              "disks": {"2000": {"size": 16 * MiB}, "2001": {"size": 8 * MiB}}})
    env.sim_post("/_sim/faults?job=e2e-tls-1", {"slow_bytes_per_s": 4 * MiB})
    env.publish(vm_message("e2e-tls-1", "/DC/vm/tls", [{"key": 2000, "size_bytes": 16 * MiB},
                                                       {"key": 2001, "size_bytes": 8 * MiB}]))
    end, started = time.time() + 60, None
    while time.time() < end and started is None:
        env.drain_events(0.3)
        started = next((e for e in env.job_events("e2e-tls-1") if e["event"] == "backup.started"), None)
    if started is None:
        failures.append("tls: never started")
        return
    wrong = os.path.join(env.tmp, "wrong.psk")
    with open(wrong, "w") as f:
        f.write("bw:" + "ab" * 32 + "\n")
    for d in started["disks"]:
        url = d["nbd_url"]
        if not url.startswith("nbds://"):
            failures.append(f"tls: disk {d['key']} served as {url}")
            continue
        host_port_export = url[len("nbds://"):]
        probes = {"plain": "nbd://" + host_port_export,
                  "wrong key": f"nbds://bw@{host_port_export}?tls-psk-file={wrong}"}
        for what, probe in probes.items():
            r = subprocess.run(["nbdinfo", "--size", probe], capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                failures.append(f"tls: a {what} client read disk {d['key']}: {r.stdout.strip()}")
    if any(e["event"] == "backup.completed" for e in env.job_events("e2e-tls-1")):
        failures.append("tls: the copy ended before the probes (they proved nothing)")
    if env.wait_terminal("e2e-tls-1") != "completed":
        failures.append(f"tls: not completed: {env.job_events('e2e-tls-1')[-1]}")
        return
    evs = check_events(env, "e2e-tls-1", failures)
    if len(compare_images(env, "e2e-tls-1", evs, failures, "tls")) != 2:
        failures.append("tls: not every disk completed")
    failures += [f"tls: {x}" for x in leftovers(env)]


CASES = {"full_and_incremental": case_full_and_incremental, "tls_exports": case_tls_exports, "rejected": case_rejected, "too_large": case_too_large,
         "faults": case_faults, "duplicate_and_ports": case_duplicate_and_ports}


def run_case(env, name, case, after=None):
    """Runs one case (then after(), if given) and prints ok or FAIL with every failure; a
    broken case fails, the others still run. Returns True when it passed."""
    failures = []
    t0 = time.time()
    try:
        case(env, failures)
    except Exception as e:
        failures.append(f"{type(e).__name__}: {e}")
    if after:
        after()
    print(f"{'FAIL' if failures else 'ok  '} {name} ({time.time() - t0:.1f} s)")
    for f in failures:
        print(f"     {f}")
    return not failures


def run_suite(env, cases, names, results, workers=("w1", "w2"), wrap=None):
    """The body of a suite's main: starts workers (none: each case starts its own), runs the
    named cases with run_case (each case through wrap(case), if given), then wants every worker
    to exit 0 on SIGTERM and nothing left behind. Records {name: passed} in results, with
    "shutdown" (when there were workers) and "leftovers" (when there were some)."""
    for wid in workers:
        env.start_worker(wid)
    if workers:
        env.wait_queue()
    for name in names:
        results[name] = run_case(env, name, wrap(cases[name]) if wrap else cases[name])
        if not results[name] and not workers and env.workers:
            # a case that starts its own workers and broke midway: the next starts clean
            print(f"     stopped what it left running: {env.stop_workers()}")
    if workers:
        codes = env.stop_workers()
        results["shutdown"] = all(c == 0 for c in codes.values())
        if results["shutdown"]:
            print(f"ok   shutdown: {len(codes)} workers exited 0 on SIGTERM")
        else:
            print(f"FAIL shutdown: exit codes {codes}")
    left = leftovers(env)
    if left:
        results["leftovers"] = False
        print(f"FAIL leftovers: {left}")


def finish(env, failed, lines, logs=None):
    """Ends a suite: when it failed, keeps env.tmp (BW_E2E_KEEP set) or prints the last lines
    of each worker log (logs: their names; every *.log in env.tmp but sim.log when None). Then
    closes env."""
    keep = bool(failed and os.environ.get("BW_E2E_KEEP"))
    if keep:
        print(f"kept {env.tmp}")
    elif failed:
        for name in logs or sorted(f for f in os.listdir(env.tmp) if f.endswith(".log") and f != "sim.log"):
            path = os.path.join(env.tmp, name)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    print(f"--- {name} (tail)\n" + "".join(fh.readlines()[-lines:]))
    env.close(keep_tmp=keep)


def summary(results, t0=None):
    """Prints how many passed and failed (and the time since t0); returns the exit code."""
    failed = list(results.values()).count(False)
    took = f" ({time.time() - t0:.0f} s)" if t0 is not None else ""
    print(f"{len(results) - failed} passed, {failed} failed{took}")
    return 1 if failed else 0


def suite_main(make_env, cases, lines, logs=None, workers=("w1", "w2"), notes=None):
    """A suite's main: argv is BW_WORKER BW_CTL [CASE...]; runs the cases (all when none is
    named) in make_env(worker, ctl) with run_suite, then notes(results), if given, then
    finish(env, failed, lines, logs). Returns the exit code."""
    worker, ctl = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(cases)
    env = make_env(worker, ctl)
    results = {}
    try:
        run_suite(env, cases, names, results, workers)
        if notes:
            notes(results)
    finally:
        finish(env, False in results.values(), lines, logs)
    return summary(results)


if __name__ == "__main__":
    sys.exit(suite_main(Env, CASES, 40, ["w1.log", "w2.log"]))
