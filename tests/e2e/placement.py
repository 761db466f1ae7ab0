#!/usr/bin/python3
"""placement.py: jobs placed by repository (CONTRACT §2 Placement, DESIGN decision 11). Real
broker (tests/with-broker), real qemu-nbd, the SNA simulator, two simulated hosts on this
machine: host-a (worker.host, its own state dir, ledger, NBD ports, loopback 127.0.0.2) has
repo-a, host-b (127.0.0.3) has repo-b. Usage: placement.py BW_WORKER BW_CTL [CASE...]

Cases:
- forwarded_and_rejected: only host-a consumes backup.start (host-b's workers declared
  backup.start.repo.repo-b once, then stopped): a repo-b job is forwarded by host-a and waits in
  that queue; a repo-x job comes back unroutable and is rejected unknown_repository (DLQ,
  backup.rejected); host-b started: the repo-b job ends there.
- mixed_stream: both hosts, two workers each; repo-a, repo-b and repo-x jobs all published to
  backup.start, and one repo-b job with the routing key backup.start.repo.repo-b: each ends on
  its host (event host, images in its repository, one SNA start each), repo-x rejected.
- cut_before_confirm: host-a's only worker is SIGKILLed (BW_CRASH_AT=forwarded) between the
  forward's publish and its confirm: the original comes back from backup.start, is forwarded
  again by the next worker and ends on host-b once (one SNA start, nothing in the DLQ).
- alarm_cut_before_confirm: a resource alarm (disk free limit) blocks host-a's publisher under
  a forward; the worker drops that connection when no confirm came in 30 s: nothing acked,
  published again after the alarm, ends on host-b once.
- passive_check: amqp.declare = false on a host with repo-c: a start-up error naming
  backup.start.repo.repo-c until the queue exists, then the worker consumes.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, URL, check_events, dlq_get, vm_message  # noqa: E402

# NBD ports of the simulated hosts: 25000-25999, moved aside for a hand run
PORT_BASE = 25100 + (500 if e2e.PORT_SHIFT else 0)
HOSTS = {"a": ("host-a", "repo-a", "127.0.0.2", PORT_BASE),
         "b": ("host-b", "repo-b", "127.0.0.3", PORT_BASE + 50),
         "c": ("host-c", "repo-c", "127.0.0.4", PORT_BASE + 100)}
VM = "/DC/vm/place"
DISKS = [{"key": 2000, "size_bytes": 4 * MiB}, {"key": 2001, "size_bytes": 2 * MiB}]


class Env(e2e.Env):
    def __init__(self, worker, ctl):
        self.make_dirs(worker, ctl, "bw-e2e-place-", "place-secret")
        self.hosts = {}
        for h, (name, repo, addr, port) in HOSTS.items():
            d = os.path.join(self.tmp, name)
            self.hosts[h] = {"name": name, "repo_id": repo, "addr": addr, "port": port,
                             "repo": os.path.join(d, repo), "state": os.path.join(d, "state")}
            os.makedirs(self.hosts[h]["repo"])
            os.makedirs(self.hosts[h]["state"])
        self.metrics, self.log_from = {}, {}
        self.sim_port = e2e.free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.spawn_sim()
        self.connect()

    def host_config(self, h, wid, extra=""):
        x = self.hosts[h]
        path = os.path.join(self.tmp, f"{wid}.conf")
        with open(path, "w") as f:
            f.write(f"""[amqp]
url = {URL}
heartbeat_s = 10
{extra}
[worker]
id = {wid}
host = {x["name"]}
max_jobs = 4
state_dir = {x["state"]}
[nbd]
port_min = {x["port"]}
port_max = {x["port"] + 11}
bind_address = {x["addr"]}
advertise_host = {x["addr"]}
[sna]
url = {self.sim_url}
poll_interval_s = 1
max_attempts = 3
backoff_base_ms = 100
backoff_cap_s = 1
connect_timeout_s = 2
timeout_s = 5
[credentials]
dir = {self.creds}
[log]
level = debug
[metrics]
listen = 127.0.0.1:{self.metrics.setdefault(wid, e2e.free_port())}
[repositories]
{x["repo_id"]} = {x["repo"]}
""")
        return path

    def config(self, wid, extra="", **kw):
        return self.host_config(wid[-1] if wid[-1] in self.hosts else "a", wid, extra)

    def start_host_worker(self, h, wid, extra="", env=None):
        old = self.workers.get(wid)
        if old is not None and old.poll() is None:
            # replacing it in the dict would hide it from teardown: it would outlive the suite
            raise RuntimeError(f"worker {wid} (pid {old.pid}) is still running; stop it first")
        cfg = self.host_config(h, wid, extra)
        path = os.path.join(self.tmp, f"{wid}.log")
        self.log_from[wid] = os.path.getsize(path) if os.path.exists(path) else 0
        log = open(path, "a")
        self.workers[wid] = subprocess.Popen([self.worker, "--config", cfg], stdout=log, stderr=log,
                                             env=env)
        return self.workers[wid]

    def wait_consuming(self, wid):
        """wid's consumer is up: backup.start and its repository's queue consumed."""
        self.wait_for(f"{wid} consuming", lambda: "consuming backup.start" in self.log(wid))

    def stop_worker(self, wid):
        p = self.workers.pop(wid)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        return p.wait(60)

    def log(self, wid):
        """What wid logged since its last start."""
        with open(os.path.join(self.tmp, f"{wid}.log"), "rb") as f:
            f.seek(self.log_from.get(wid, 0))
            return f.read().decode(errors="replace")

    def queue_depth(self, name):
        """Messages ready in queue name, or None when it does not exist."""
        try:
            return self.ch.queue_declare(name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            self.ch = self.conn.channel()
            return None

    def wait_for(self, what, pred, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def publish_to(self, msg, routing_key):
        """A confirmed, mandatory publish with routing_key (the queue must exist)."""
        if self.pub is None:
            self.pub = self.conn.channel()
            self.pub.confirm_delivery()
        self.pub.basic_publish("backup.jobs", routing_key, json.dumps(msg).encode(),
                               pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                                    message_id="mid-" + msg["job_id"]),
                               mandatory=True)

    def scrape(self, wid):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[wid]}/metrics", timeout=5) as r:
            return r.read().decode()

    def forwarded(self, wid):
        """{outcome: count} of bw_forwarded_messages_total of worker wid."""
        out = {}
        for m in re.finditer(r'^bw_forwarded_messages_total\{outcome="(\w+)"\} (\S+)$', self.scrape(wid), re.M):
            out[m.group(1)] = float(m.group(2))
        return out


def job(job_id, repo):
    return vm_message(job_id, VM, DISKS, repository_id=repo)


def ends_on(env, job_id, h, failures):
    """job_id completed on host h: every event names it, its images are in h's repository, the
    SNA got one start request."""
    if env.wait_terminal(job_id, timeout=120) != "completed":
        failures.append(f"{job_id}: not completed: {env.job_events(job_id)[-1:]}")
        return
    evs = check_events(env, job_id, failures)
    hosts = {e["host"] for e in evs}
    if hosts != {HOSTS[h][0]}:
        failures.append(f"{job_id}: events from hosts {sorted(hosts)}, want {HOSTS[h][0]}")
    for e in evs:
        if e["event"] == "backup.disk.completed" and not e["qcow2_path"].startswith(env.hosts[h]["repo"] + "/"):
            failures.append(f"{job_id}: image {e['qcow2_path']} outside {env.hosts[h]['repo']}")
        if e["event"] == "backup.started" and any(f"//{HOSTS[h][2]}:" not in d["nbd_url"] for d in e["disks"]):
            failures.append(f"{job_id}: NBD URLs not on {HOSTS[h][2]}: {[d['nbd_url'] for d in e['disks']]}")
    starts = [r for r in env.sim_get("/_sim/requests")["requests"]
              if r["path"].endswith("/backup/start") and (r.get("body") or {}).get("job_id") == job_id]
    if len(starts) != 1:
        failures.append(f"{job_id}: {len(starts)} SNA start requests (want 1)")


def rejected_unknown(env, job_id, failures):
    """job_id rejected unknown_repository: backup.rejected, and its body in the DLQ."""
    end, rej = time.time() + 30, []
    while time.time() < end and not rej:
        env.drain_events(0.3)
        rej = [e for e in env.events if e["event"] == "backup.rejected" and e.get("job_id") == job_id]
    if not rej or rej[0]["reason"] != "unknown_repository":
        failures.append(f"{job_id}: rejected {rej}")
    else:
        failures += [f"{job_id}: {x}" for x in e2e.schemas.check("backup.rejected", rej[0])]
    m, p, b = dlq_get(env)
    if m is None or json.loads(b).get("job_id") != job_id or "x-death" not in (p.headers or {}):
        failures.append(f"{job_id}: not in the DLQ with x-death ({b[:80] if b else None})")
    if env.queue_depth("backup.start.repo.repo-x") is not None:
        failures.append("a queue backup.start.repo.repo-x exists")


def leftovers(env, failures, hosts=("a", "b")):
    for h in hosts:
        ports = json.loads(subprocess.run([env.ctl, "--config", env.host_config(h, f"ctl-{h}"), "ports", "--json"],
                                          capture_output=True, text=True).stdout or "[]")
        held = [p for p in ports if p["state"] == "reserved"]
        if held:
            failures.append(f"{HOSTS[h][0]}: ports held: {held}")
    ps = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    mine = [l for l in ps.splitlines() if env.tmp in l]
    if mine:
        failures.append(f"qemu-nbd left: {mine}")


def setup_vm(env):
    try:
        env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 9,
                                  "disks": {"2000": {"size": 4 * MiB}, "2001": {"size": 2 * MiB}}})
    except urllib.error.HTTPError as e:
        if e.code != 409:  # made by an earlier case
            raise


def declare_b(env):
    """host-b's queue exists (a worker of host-b declared it), and no host-b worker runs."""
    env.start_host_worker("b", "wb1")
    env.wait_consuming("wb1")
    if env.stop_worker("wb1") != 0:
        raise AssertionError("wb1 did not exit 0")


# ---- cases ------------------------------------------------------------------------------

def case_forwarded_and_rejected(env, failures):
    setup_vm(env)
    declare_b(env)
    env.start_host_worker("a", "wa1")
    env.wait_consuming("wa1")
    env.publish(job("pl-fw-b", "repo-b"))
    env.publish(job("pl-fw-x", "repo-x"))
    # forwarded and confirmed: the original is gone from backup.start, the copy waits for host-b
    env.wait_for("the forward of pl-fw-b", lambda: env.queue_depth("backup.start.repo.repo-b") == 1)
    rejected_unknown(env, "pl-fw-x", failures)
    env.drain_events(0.5)
    if env.job_events("pl-fw-b"):
        failures.append(f"pl-fw-b: events before host-b runs: {[e['event'] for e in env.job_events('pl-fw-b')]}")
    if env.queue_depth("backup.start") != 0:
        failures.append("backup.start not empty after the forward")
    fw = env.forwarded("wa1")
    if fw.get("routed") != 1 or fw.get("unroutable") != 1:
        failures.append(f"wa1 bw_forwarded_messages_total {fw} (want routed 1, unroutable 1)")
    env.start_host_worker("b", "wb1")
    ends_on(env, "pl-fw-b", "b", failures)
    codes = {wid: env.stop_worker(wid) for wid in ("wa1", "wb1")}  # both, whatever the first says
    if any(codes.values()):
        failures.append(f"a worker did not exit 0: {codes}")
    leftovers(env, failures)


def case_mixed_stream(env, failures):
    setup_vm(env)
    for h, wid in (("a", "wa1"), ("a", "wa2"), ("b", "wb1"), ("b", "wb2")):
        env.start_host_worker(h, wid)
    for wid in ("wa1", "wa2", "wb1", "wb2"):
        env.wait_consuming(wid)
    jobs = [(f"pl-mix-{r}-{i}", r) for i in range(4) for r in ("a", "b")]
    for jid, r in jobs:
        env.publish(job(jid, "repo-" + r))
    env.publish(job("pl-mix-x", "repo-x"))
    env.publish_to(job("pl-direct-b", "repo-b"), "backup.start.repo.repo-b")
    for jid, r in jobs + [("pl-direct-b", "b")]:
        ends_on(env, jid, r, failures)
    rejected_unknown(env, "pl-mix-x", failures)
    # what the checks above found, for the reader: which host's events each repository's jobs have
    ended = {}
    for jid, r in jobs + [("pl-direct-b", "b")]:
        evs = env.job_events(jid)
        key = f"repo-{r} on {','.join(sorted({e['host'] for e in evs}))}, {evs[-1]['event'] if evs else 'no event'}"
        ended[key] = ended.get(key, 0) + 1
    rej = sorted({(e["event_id"], e.get("reason")) for e in env.events
                  if e["event"] == "backup.rejected" and e.get("job_id") == "pl-mix-x"})
    print(f"     jobs by repository, the host of their events and their last event: {ended}; repo-x: "
          f"backup.rejected {rej}")
    fw = {}
    for wid in ("wa1", "wa2", "wb1", "wb2"):
        for k, v in env.forwarded(wid).items():
            fw[k] = fw.get(k, 0) + v
    print(f"     forwards of the four workers: {fw}")
    if fw.get("unroutable") != 1 or fw.get("failed", 0) != 0:
        failures.append(f"bw_forwarded_messages_total summed {fw} (want unroutable 1, failed 0)")
    for wid in ("wa1", "wa2", "wb1", "wb2"):
        if env.stop_worker(wid) != 0:
            failures.append(f"{wid} did not exit 0")
    leftovers(env, failures)


def case_cut_before_confirm(env, failures):
    setup_vm(env)
    declare_b(env)
    crash = dict(os.environ, BW_CRASH_AT="forwarded")
    p = env.start_host_worker("a", "wa-crash", env=crash)
    env.wait_consuming("wa-crash")
    env.publish(job("pl-cut-b", "repo-b"))
    try:
        code = p.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    env.workers.pop("wa-crash", None)
    if code != -signal.SIGKILL or "crash point forwarded reached" not in env.log("wa-crash"):
        failures.append(f"wa-crash: exit {code}, not killed at the crash point")
        return
    # the original was never acked: it is back in backup.start; the next worker forwards it
    env.wait_for("pl-cut-b back in backup.start", lambda: env.queue_depth("backup.start") == 1)
    print(f"     after the kill: backup.start 1, backup.start.repo.repo-b {env.queue_depth('backup.start.repo.repo-b')}")
    env.start_host_worker("a", "wa3")
    env.wait_for("the second forward", lambda: env.queue_depth("backup.start") == 0
                 and (env.queue_depth("backup.start.repo.repo-b") or 0) >= 1)
    env.start_host_worker("b", "wb1")
    ends_on(env, "pl-cut-b", "b", failures)
    env.wait_for("backup.start.repo.repo-b drained", lambda: env.queue_depth("backup.start.repo.repo-b") == 0)
    m, _, b = dlq_get(env)
    if m is not None:
        failures.append(f"cut: something in the DLQ: {b[:100]}")
    codes = {wid: env.stop_worker(wid) for wid in ("wa3", "wb1")}  # both, whatever the first says
    if any(codes.values()):
        failures.append(f"a worker did not exit 0: {codes}")
    leftovers(env, failures)


def broker_ctl(*args):
    return subprocess.run([e2e.BROKER, "ctl", e2e.BROKER_DIR, *args], capture_output=True, text=True,
                          timeout=60)


def case_alarm_cut_before_confirm(env, failures):
    """A resource alarm blocks the publisher connection under a forward (published, never
    confirmed) until the worker gives up on the confirm (30 s) and drops that connection: the
    original is still unacked, published again on a new connection once the alarm is over,
    acked then, and ends on host-b once."""
    setup_vm(env)
    declare_b(env)
    env.publish(job("pl-alarm-b", "repo-b"))  # waits in backup.start: no worker consumes it yet
    if broker_ctl("-q", "set_disk_free_limit", "100000GB").returncode != 0:
        failures.append("alarm: set_disk_free_limit failed")
        return
    try:
        env.start_host_worker("a", "wa-alarm")
        env.wait_for("the forward cut before its confirm",
                     lambda: "no confirm of a forward in time" in env.log("wa-alarm"), timeout=60)
        time.sleep(1)
        if "forwarded a backup.start" in env.log("wa-alarm"):
            failures.append("alarm: acked before a confirm")
        if (env.queue_depth("backup.start.repo.repo-b") or 0) != 0:
            failures.append("alarm: the forward was routed although its connection was blocked")
    finally:
        broker_ctl("-q", "set_disk_free_limit", "1MB")
    env.wait_for("the forward after the alarm", lambda: "forwarded a backup.start" in env.log("wa-alarm"),
                 timeout=60)
    env.start_host_worker("b", "wb1")
    ends_on(env, "pl-alarm-b", "b", failures)
    fw = env.forwarded("wa-alarm")
    print(f"     wa-alarm forwards: {fw}")
    if fw.get("routed") != 1 or fw.get("failed", 0) < 1:
        failures.append(f"alarm: wa-alarm bw_forwarded_messages_total {fw} (want routed 1, failed >= 1)")
    m, _, b = dlq_get(env)
    if m is not None:
        failures.append(f"alarm: something in the DLQ: {b[:100]}")
    if env.stop_worker("wa-alarm") != 0 or env.stop_worker("wb1") != 0:
        failures.append("a worker did not exit 0")
    leftovers(env, failures)


def case_passive_check(env, failures):
    env.start_host_worker("a", "wa1")  # the rest of the topology exists
    env.wait_consuming("wa1")
    if env.stop_worker("wa1") != 0:
        failures.append("wa1 did not exit 0")
    p = env.start_host_worker("c", "wc1", extra="declare = false")
    name = "backup.start.repo.repo-c"
    try:
        env.wait_for("the passive check's error", lambda: name in env.log("wc1") and "NOT_FOUND" in env.log("wc1"))
    except AssertionError as e:
        failures.append(f"passive: {e}: {env.log('wc1')[-600:]}")
        return
    line = [l for l in env.log("wc1").splitlines() if name in l][0]
    print(f"     {line.strip()[:200]}")
    if "consuming backup.start" in env.log("wc1"):
        failures.append("passive: consuming although the queue is missing")
    args = {"x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "backup.dlx",
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    env.ch.queue_declare(name, durable=True, arguments=args)
    env.ch.queue_bind(name, "backup.jobs", name)
    try:
        env.wait_for("consuming after the declare", lambda: "consuming backup.start" in env.log("wc1"), timeout=60)
    except AssertionError as e:
        failures.append(f"passive: {e}")
    if p.poll() is not None:
        failures.append(f"passive: the worker exited {p.returncode}")
    if env.stop_worker("wc1") != 0:
        failures.append("wc1 did not exit 0")


CASES = {"forwarded_and_rejected": case_forwarded_and_rejected, "mixed_stream": case_mixed_stream,
         "cut_before_confirm": case_cut_before_confirm,
         "alarm_cut_before_confirm": case_alarm_cut_before_confirm, "passive_check": case_passive_check}


if __name__ == "__main__":
    sys.exit(e2e.suite_main(Env, CASES, 60, workers=()))
