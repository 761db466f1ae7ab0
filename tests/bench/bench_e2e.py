#!/usr/bin/python3
"""bench_e2e.py: publish-to-SNA latency of bw-worker next to the limit of its primitives, then a burst.

Usage: bench_e2e.py BW_WORKER BW_CTL [--jobs N] [--vms N] [--max-jobs N] [--keep]
(normally through scripts/bench-e2e, which builds the binaries first).

Part 1, latency. A private broker (scripts/broker), the SNA simulator (tests/sna/sna_sim.py)
and two bw-worker processes sharing one ledger. For k = 1, 4, 16 disks (1 MiB each) one
backup.start at a time: the publisher puts time.time() taken right before basic_publish into
the message as "bench_published_at" (an unknown field: the worker ignores it); the simulator
records the arrival of the start request in GET /_sim/requests ("at", wall clock, cut to the
millisecond: we add 0.5 ms); latency = at - published. The next job is published once
backup.completed of the previous one arrived (an exclusive queue bound to backup.events), so
no job waits behind another. Interleaved with it, the limit: this script runs k `qemu-img
create -f qcow2` in parallel, then k `qemu-nbd` in parallel (the worker's argv and
GLIBC_TUNABLES, common/nbd.c), and probes every port until it read the 18-byte NBD greeting
(NBDMAGIC IHAVEOPT + flags; 1 ms between sweeps), timed from the first create to the last
greeting; the servers are stopped and the images removed after each repetition (not timed).
Order per repetition: ours then limit, or limit then ours, alternating.

The phases of our latency come from the ledger's job_history (wall-clock ms of each state):
publish -> claimed (broker delivery, parse, claim), -> reserved (ports), -> targets_created
(every qcow2), -> serving (every qemu-nbd spawned), -> sna_requested (all greeted,
credential read), -> the simulator's "at" (HTTP). A baseline row gives the simulator's own
receive delay: a plain urllib GET of /api/v1/progress/x, from before the call to its "at".

Part 2, burst: VMS backup.start messages of 2 disks each (spread over 10 simulator VMs)
published back to back into the same two workers: time from the first publish until the
simulator has received every start request, and until every backup.completed arrived; then
each worker's peak RSS (VmHWM in /proc/PID/status) before it is stopped.

Ports: workers' NBD range 22500-22799, the limit's servers 22800-22991 (12 slabs of 16,
rotating), the simulator one free port in 23500-23599, the broker a free port in 12100-12999
(+20000, +21000 for its distribution and epmd). With BW_BENCH_PORT=P (scripts/bench sets it)
all but the broker's move into P..P+299: workers P..P+99, the limit P+100..P+291 (12 slabs of
16), the simulator P+292..P+299. Every process started here is stopped by its
PID (the broker by scripts/broker stop); no qemu-nbd of this run is left (checked).
Exit 0 when every job completed, no port stayed reserved (bw-ctl ports) and nothing was left
running; 1 otherwise.
"""
import argparse
import datetime
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
WORKER_PORT_MIN, WORKER_PORT_MAX = 22500, 22799
LIMIT_PORT0, LIMIT_SLABS, LIMIT_SLAB = 22800, 12, 16
SIM_PORTS = range(23500, 23600)
if os.environ.get("BW_BENCH_PORT"):
    _p = int(os.environ["BW_BENCH_PORT"])
    WORKER_PORT_MIN, WORKER_PORT_MAX = _p, _p + 99
    LIMIT_PORT0 = _p + 100
    SIM_PORTS = range(_p + 292, _p + 300)
BROKER_PORTS = range(12100, 13000)
NBD_TUNABLES = "glibc.malloc.mmap_threshold=33554432"  # as common/nbd.c
KS = (1, 4, 16)
GOAL = 1.3


class Stop(Exception):
    pass


def on_signal(signum, frame):
    raise Stop(f"signal {signum}")


def log(msg):
    print(f"bench-e2e: {msg}", file=sys.stderr, flush=True)


def port_free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False


def pct(values, p):
    """Nearest-rank percentile (p99 of 20 values is the largest)."""
    v = sorted(values)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def parse_at(s):
    t = datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    return t.timestamp() + 0.0005  # the simulator cuts to the millisecond: the middle of it


def stop_proc(p, timeout=10.0, resend_ms=200):
    """SIGTERM (again every resend_ms: qemu-nbd 7.2 can lose an early one), SIGKILL after timeout."""
    if p.poll() is not None:
        return p.returncode
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return p.wait(resend_ms / 1000)
        except subprocess.TimeoutExpired:
            continue
    p.kill()
    return p.wait()


class Bench:
    def __init__(self, a):
        self.a = a
        base = os.environ.get("BW_BENCH_DIR") or os.environ.get("TMPDIR") or "/tmp"
        self.tmp = tempfile.mkdtemp(prefix="bw-bench-e2e.", dir=base)
        self.broker_dir = os.path.join(self.tmp, "broker")
        self.broker_up = False
        self.sim = None
        self.workers = {}
        self.limit_servers = []
        self.conn = None
        self.terminal = {}  # job_id -> (event name, time received)
        self.failures = []
        self.slab = 0

    # ---- processes --------------------------------------------------------------------

    def start_broker(self):
        for _ in range(8):
            p = random.choice(BROKER_PORTS)
            if not all(port_free(x) for x in (p, p + 20000, p + 21000)):
                continue
            r = subprocess.run([os.path.join(ROOT, "scripts", "broker"), "start", self.broker_dir, str(p)],
                               capture_output=True, text=True)
            self.broker_up = True  # stop it whatever happened: it cleans up after a failed start too
            if r.returncode == 0:
                with open(os.path.join(self.broker_dir, "ports")) as f:
                    self.url = [l.split("=", 1)[1].strip() for l in f if l.startswith("AMQP_URL=")][0]
                return
            log(f"broker on {p} failed: {r.stderr.strip()[-300:]}")
        raise RuntimeError("could not start a broker")

    def start_sim(self):
        ports = list(SIM_PORTS)
        random.shuffle(ports)
        for p in ports:
            if not port_free(p):
                continue
            self.sim = subprocess.Popen(
                ["/usr/bin/python3", os.path.join(ROOT, "tests", "sna", "sna_sim.py"), "--port", str(p),
                 "--state", os.path.join(self.tmp, "sim")],
                stdout=subprocess.PIPE, stderr=open(os.path.join(self.tmp, "sim.log"), "a"),
                start_new_session=True)
            line = self.sim.stdout.readline().decode()
            if "listening" in line:
                self.sim_url = f"http://127.0.0.1:{p}"
                return
            stop_proc(self.sim)
        raise RuntimeError("could not start the simulator")

    def write_config(self, wid, max_jobs):
        path = os.path.join(self.tmp, f"{wid}.conf")
        with open(path, "w") as f:
            f.write(f"""[amqp]
url = {self.url}
[worker]
id = {wid}
max_jobs = {max_jobs}
state_dir = {self.tmp}/state
[nbd]
port_min = {WORKER_PORT_MIN}
port_max = {WORKER_PORT_MAX}
[sna]
url = {self.sim_url}
poll_interval_s = 1
[credentials]
dir = {self.tmp}/creds
[log]
level = info
[repositories]
repo-001 = {self.tmp}/repo
""")
        return path

    def start_workers(self, max_jobs):
        for d in ("repo", "state", "creds"):
            os.makedirs(os.path.join(self.tmp, d), exist_ok=True)
        cred = os.path.join(self.tmp, "creds", "vcenter-main.json")
        with open(cred, "w") as f:
            json.dump({"vcenter_host": "vcenter.example", "username": "backup@vsphere.local",
                       "password": "bench"}, f)
        os.chmod(cred, 0o600)
        for wid in ("bench-w1", "bench-w2"):
            cfg = self.write_config(wid, max_jobs)
            out = open(os.path.join(self.tmp, f"{wid}.log"), "a")
            self.workers[wid] = subprocess.Popen([self.a.worker, "--config", cfg], stdout=out, stderr=out,
                                                 start_new_session=True)
        self.ctl_config = self.write_config("bench-ctl", max_jobs)

    def stop_workers(self):
        codes = {}
        for p in self.workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # one signal: a second one means "stop now"
        for wid, p in self.workers.items():
            try:
                codes[wid] = p.wait(90)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[wid] = "killed"
        self.workers = {}
        return codes

    def our_qemu_nbds(self):
        out = subprocess.run(["pgrep", "-x", "qemu-nbd"], capture_output=True, text=True).stdout.split()
        mine = []
        for pid in out:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.tmp.encode() in f.read():
                        mine.append(int(pid))
            except OSError:
                pass
        return mine

    def close(self):
        for p in self.limit_servers:
            stop_proc(p, 5)
        self.limit_servers = []
        if self.workers:
            codes = self.stop_workers()
            if any(c != 0 for c in codes.values()):
                self.failures.append(f"worker exit codes {codes}")
        if self.sim and self.sim.poll() is None:
            stop_proc(self.sim, 20, 20000)
        if self.conn:
            try:
                self.conn.close()
            except Exception:
                pass
        if self.broker_up:
            subprocess.run([os.path.join(ROOT, "scripts", "broker"), "stop", self.broker_dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        left = self.our_qemu_nbds()
        if left:
            self.failures.append(f"qemu-nbd left running: {left} (killed)")
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        if self.a.keep or (self.failures and os.environ.get("BW_BENCH_KEEP")):
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- simulator and broker ---------------------------------------------------------

    def sim_get(self, path):
        with urllib.request.urlopen(self.sim_url + path, timeout=30) as r:
            return json.loads(r.read())

    def sim_post(self, path, body):
        req = urllib.request.Request(self.sim_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"{}")

    def connect(self):
        self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.ch = self.conn.channel()
        for _ in range(300):  # the workers declare the topology
            try:
                self.ch.queue_declare("backup.start", passive=True)
                break
            except pika.exceptions.ChannelClosedByBroker:
                self.ch = self.conn.channel()
                time.sleep(0.1)
        else:
            raise RuntimeError("the workers never declared backup.start")
        q = self.ch.queue_declare("", exclusive=True).method.queue
        # every event: the relay publishes mandatory, and an event no queue takes is returned
        # and sent again and again (an outbox backlog that also holds up the workers' stop)
        self.ch.queue_bind(q, "backup.events", "#")
        self.ch.basic_consume(q, self.on_event, auto_ack=True)

    def on_event(self, ch, method, props, body):
        e = json.loads(body)
        if e["event"] in ("backup.completed", "backup.failed"):
            self.terminal.setdefault(e["job_id"], (e["event"], time.time()))

    def publish(self, msg):
        msg["bench_published_at"] = t = time.time()
        self.ch.basic_publish("backup.jobs", "backup.start", json.dumps(msg).encode(),
                              pika.BasicProperties(delivery_mode=2, content_type="application/json"))
        return t

    def wait_terminal(self, job_ids, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(j in self.terminal for j in job_ids):
                return True
            self.conn.process_data_events(time_limit=0.005)
        return False

    # ---- part 1 -----------------------------------------------------------------------

    def ours(self, k, n):
        job_id = f"bench-k{k}-{n:03d}"
        disks = [{"key": 2000 + i, "size_bytes": MiB} for i in range(k)]
        msg = {"schema_version": 1, "job_id": job_id, "vm": {"name": f"bench-k{k}", "path": f"/bench/vm/k{k}"},
               "backup_type": "full", "repository_id": "repo-001", "credential_id": "vcenter-main",
               "disks": disks}
        t = self.publish(msg)
        if not self.wait_terminal([job_id], 120):
            raise RuntimeError(f"{job_id}: no terminal event within 120 s")
        if self.terminal[job_id][0] != "backup.completed":
            self.failures.append(f"{job_id}: {self.terminal[job_id][0]}")
        return job_id, t

    def limit(self, k):
        port0 = LIMIT_PORT0 + LIMIT_SLAB * (self.slab % LIMIT_SLABS)
        self.slab += 1
        d = os.path.join(self.tmp, "limit")
        os.makedirs(d, exist_ok=True)
        imgs = [os.path.join(d, f"d{i}.qcow2") for i in range(k)]
        env = dict(os.environ, GLIBC_TUNABLES=NBD_TUNABLES)
        logs = [open(os.path.join(d, f"nbd-{i}.log"), "w") for i in range(k)]
        t0 = time.perf_counter()
        creators = [subprocess.Popen(["qemu-img", "create", "-q", "-f", "qcow2", img, str(MiB)])
                    for img in imgs]
        for p in creators:
            if p.wait() != 0:
                raise RuntimeError("limit: qemu-img create failed")
        tc = time.perf_counter()
        for i in range(k):
            self.limit_servers.append(subprocess.Popen(
                ["qemu-nbd", "--format=qcow2", f"--export-name=disk-{i}", "--persistent", "--shared=8",
                 "--bind=127.0.0.1", f"--port={port0 + i}", "--discard=unmap", "--detect-zeroes=unmap",
                 imgs[i]], env=env, stdin=subprocess.DEVNULL, stdout=logs[i], stderr=logs[i],
                start_new_session=True))
        ts = time.perf_counter()
        pending = set(range(k))
        while pending:
            for i in sorted(pending):
                if self.greets(port0 + i):
                    pending.discard(i)
                elif self.limit_servers[i].poll() is not None:
                    with open(os.path.join(d, f"nbd-{i}.log")) as f:
                        raise RuntimeError(f"limit: qemu-nbd on port {port0 + i} died: {f.read()[-300:]}")
            if pending:
                if time.perf_counter() - ts > 30:
                    raise RuntimeError(f"limit: {len(pending)} of {k} servers silent after 30 s")
                time.sleep(0.001)
        t1 = time.perf_counter()
        for p in self.limit_servers:
            p.send_signal(signal.SIGTERM)
        for p in self.limit_servers:
            if stop_proc(p, 10) != 0:
                self.failures.append(f"limit: qemu-nbd exit {p.returncode}")
        self.limit_servers = []
        for f in logs:
            f.close()
        for img in imgs:
            os.unlink(img)
        return (t1 - t0) * 1000, (tc - t0) * 1000, (ts - tc) * 1000, (t1 - ts) * 1000

    @staticmethod
    def greets(port):
        """Reads the NBD greeting, then NBD_OPT_ABORT and an RST close (as the worker's probe)."""
        s = socket.socket()
        try:
            s.settimeout(1.0)
            try:
                s.connect(("127.0.0.1", port))
            except (ConnectionRefusedError, socket.timeout):
                return False
            got = b""
            while len(got) < 18:
                c = s.recv(18 - len(got))
                if not c:
                    return False
                got += c
            if got[:16] != b"NBDMAGICIHAVEOPT":
                raise RuntimeError(f"port {port}: not an NBD greeting: {got!r}")
            s.sendall(struct.pack(">I", got[17] & 3) + b"IHAVEOPT" + struct.pack(">II", 2, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return True
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            return False
        finally:
            s.close()

    def sim_baseline(self, n=20):
        """The simulator's own delay: from before a plain client's request to its "at"."""
        out = []
        for i in range(n):
            path = f"/api/v1/progress/bench-baseline-{i}"
            t = time.time()
            try:
                urllib.request.urlopen(self.sim_url + path, timeout=10).read()
            except urllib.error.HTTPError:
                pass  # 404: no such job; the request is recorded all the same
            out.append((path, t))
        reqs = {r["path"]: r["at"] for r in self.sim_get("/_sim/requests")["requests"]}
        return [(parse_at(reqs[p]) - t) * 1000 for p, t in out]

    def start_times(self):
        """job_id -> the simulator's arrival time of its first start request."""
        out = {}
        for r in self.sim_get("/_sim/requests")["requests"]:
            if r["path"] == "/api/v1/backup/start" and isinstance(r.get("body"), dict):
                out.setdefault(r["body"].get("job_id"), parse_at(r["at"]))
        return out

    def phases(self, jobs):
        """job_id -> {state: wall-clock seconds} from the ledger's job_history."""
        db = sqlite3.connect(f"file:{self.tmp}/state/ledger.db?mode=ro", uri=True, timeout=10)
        out = {}
        try:
            for job_id, state, at in db.execute("SELECT job_id, state, at FROM job_history ORDER BY id"):
                if job_id in jobs:
                    out.setdefault(job_id, {}).setdefault(state, at / 1000 + 0.0005)
        finally:
            db.close()
        return out

    def part1(self):
        n = self.a.jobs
        for k in KS:
            self.sim_post("/_sim/vm", {"vm_path": f"/bench/vm/k{k}", "seed": k,
                                       "disks": {str(2000 + i): {"size": MiB} for i in range(k)}})
        # one warm-up job per k (first connections, page cache, the ledger's first pages)
        for k in KS:
            self.ours(k, 0)
            self.limit(k)
        published = {k: [] for k in KS}
        lim = {k: [] for k in KS}
        t_start = time.monotonic()
        for r in range(n):
            for j in range(len(KS)):
                k = KS[(r + j) % len(KS)]
                if (r + j) % 2 == 0:
                    published[k].append(self.ours(k, r + 1))
                    lim[k].append(self.limit(k))
                else:
                    lim[k].append(self.limit(k))
                    published[k].append(self.ours(k, r + 1))
            if r == 0 or (r + 1) % 5 == 0:
                log(f"part 1: {r + 1}/{n} repetitions, {time.monotonic() - t_start:.0f} s")
        starts = self.start_times()
        hist = self.phases({j for k in KS for j, _ in published[k]})
        rows, goal_miss, phase_rows = [], [], []
        base = self.sim_baseline()
        for k in KS:
            lat, ph = [], {x: [] for x in ("deliver+claim", "reserve", "create", "spawn", "greet", "http")}
            for job_id, t in published[k]:
                if job_id not in starts:
                    self.failures.append(f"{job_id}: the simulator got no start request")
                    continue
                lat.append((starts[job_id] - t) * 1000)
                h = hist.get(job_id, {})
                seq = [t, h.get("claimed"), h.get("reserved"), h.get("targets_created"), h.get("serving"),
                       h.get("sna_requested"), starts[job_id]]
                if None not in seq:
                    for name, a, b in zip(ph, seq, seq[1:]):
                        ph[name].append((b - a) * 1000)
            tot = [x[0] for x in lim[k]]
            if not lat or not tot:
                continue
            om, lm = statistics.median(lat), statistics.median(tot)
            ratio = om / lm
            if ratio > GOAL:
                goal_miss.append(f"k={k} {ratio:.2f}x")
            rows.append((k, om, pct(lat, 99), lm, pct(tot, 99), ratio, om / k,
                         statistics.median(x[1] for x in lim[k]), statistics.median(x[2] for x in lim[k]),
                         statistics.median(x[3] for x in lim[k])))
            phase_rows.append((k, [statistics.median(v) if v else float("nan") for v in ph.values()]))
        return rows, goal_miss, phase_rows, base, list(ph)

    # ---- part 2 -----------------------------------------------------------------------

    def part2(self):
        nvms = 10
        for v in range(nvms):
            self.sim_post("/_sim/vm", {"vm_path": f"/bench/vm/burst{v}", "seed": 100 + v,
                                       "disks": {"2000": {"size": MiB}, "2001": {"size": MiB}}})
        msgs = []
        for i in range(self.a.vms):
            v = i % nvms
            msgs.append({"schema_version": 1, "job_id": f"bench-burst-{i:04d}",
                         "vm": {"name": f"burst{v}", "path": f"/bench/vm/burst{v}"}, "backup_type": "full",
                         "repository_id": "repo-001", "credential_id": "vcenter-main",
                         "disks": [{"key": 2000, "size_bytes": MiB}, {"key": 2001, "size_bytes": MiB}]})
        ids = [m["job_id"] for m in msgs]
        t_first = None
        for m in msgs:
            t = self.publish(m)
            t_first = t_first or t
        t_published = time.time()
        if not self.wait_terminal(ids, 600):
            done = sum(1 for j in ids if j in self.terminal)
            raise RuntimeError(f"burst: {done} of {len(ids)} jobs ended within 600 s")
        failed = [j for j in ids if self.terminal[j][0] != "backup.completed"]
        if failed:
            self.failures.append(f"burst: {len(failed)} job(s) failed: {failed[:5]}")
        starts = self.start_times()
        missing = [j for j in ids if j not in starts]
        if missing:
            self.failures.append(f"burst: {len(missing)} job(s) never reached the simulator")
        got = [starts[j] for j in ids if j in starts]
        all_started = (max(got) - t_first) if got else float("nan")
        all_done = max(self.terminal[j][1] for j in ids) - t_first
        lat = sorted((starts[j] - m["bench_published_at"]) * 1000 for j, m in zip(ids, msgs) if j in starts)
        rss = {}
        for wid, p in self.workers.items():
            with open(f"/proc/{p.pid}/status") as f:
                st = dict(l.split(":", 1) for l in f if ":" in l)
            rss[wid] = (int(st["VmHWM"].split()[0]), int(st["VmRSS"].split()[0]))
        per_worker = {}
        hist = self.phases(set(ids))
        db = sqlite3.connect(f"file:{self.tmp}/state/ledger.db?mode=ro", uri=True, timeout=10)
        try:
            for job_id, owner in db.execute("SELECT job_id, owner FROM job_history WHERE state = 'claimed'"):
                if job_id in hist:
                    per_worker[owner] = per_worker.get(owner, 0) + 1
        finally:
            db.close()
        waited = sum(1 for h in hist.values() if "waiting_ports" in h)
        claimed = [h["claimed"] for h in hist.values() if "claimed" in h]
        all_claimed = (max(claimed) - t_first) if len(claimed) == len(ids) else float("nan")
        return {"all_claimed_s": all_claimed, "publish_s": t_published - t_first,
                "all_started_s": all_started, "all_done_s": all_done, "lat": lat, "rss": rss,
                "per_worker": per_worker, "waited": waited}

    # ---- the run ----------------------------------------------------------------------

    def run(self):
        t0 = time.monotonic()
        log(f"in {self.tmp}; {os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.2f}; "
            f"{subprocess.run(['qemu-nbd', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
        self.start_broker()
        self.start_sim()
        self.start_workers(self.a.max_jobs)
        self.connect()
        log(f"broker {self.url.rsplit('@', 1)[1]}, simulator {self.sim_url}, 2 workers "
            f"(max_jobs {self.a.max_jobs}), up in {time.monotonic() - t0:.1f} s")
        rows, goal_miss, phase_rows, base, phase_names = self.part1()
        log(f"part 1 done at {time.monotonic() - t0:.0f} s; part 2: {self.a.vms} VMs x 2 disks")
        burst = self.part2() if self.a.vms > 0 else None
        ports = json.loads(subprocess.run([self.a.ctl, "--config", self.ctl_config, "ports", "--json"],
                                          capture_output=True, text=True).stdout or "[]")
        held = [p for p in ports if p.get("state") == "reserved"]
        if held:
            self.failures.append(f"{len(held)} NBD port(s) still reserved after every job ended: {held[:3]}")
        log(f"part 2 done at {time.monotonic() - t0:.0f} s")

        print(f"Publish backup.start -> SNA start request received; 1 MiB disks; {self.a.jobs} jobs per k, "
              f"one at a time, 2 workers (max_jobs {self.a.max_jobs}); limit: k qemu-img create "
              f"in parallel + k qemu-nbd in parallel until all greet")
        print(f"{'k':>3}  {'ours med':>9}  {'ours p99':>9}  {'limit med':>9}  {'limit p99':>9}  "
              f"{'ratio':>5}  {'ours/disk':>9}  {'lim create':>10}  {'lim spawn':>9}  {'lim greet':>9}")
        for k, om, op, lm, lp, ratio, per, lc, ls, lg in rows:
            print(f"{k:>3}  {om:9.1f}  {op:9.1f}  {lm:9.1f}  {lp:9.1f}  {ratio:5.2f}  {per:9.1f}  "
                  f"{lc:10.1f}  {ls:9.1f}  {lg:9.1f}")
        print(f"(ms; p99 = nearest rank, the largest of {self.a.jobs}; ratio = ours median / limit median;"
              " lim create/spawn/greet: the limit's medians per step)")
        if goal_miss or len(rows) < len(KS):
            print(f"goal (ours <= {GOAL}x the limit at k = 1, 4, 16): NOT met: {', '.join(goal_miss)}")
        else:
            print(f"goal (ours <= {GOAL}x the limit at k = 1, 4, 16): met")
        summary = []
        for k, om, op, lm, lp, ratio, per, lc, ls, lg in rows:
            summary.append(f"SUMMARY\te2e k={k}: publish -> SNA start ms (limit: create + serve + greet)\t"
                           f"{om:.1f}\t{lm:.1f}\t{ratio:.2f}\t<= {GOAL}x\t{'yes' if ratio <= GOAL else 'no'}")
        print()
        print("Where ours goes (medians, ms, from the ledger's job_history; each boundary cut to the ms):")
        print(f"{'k':>3}  " + "  ".join(f"{n:>13}" for n in phase_names))
        for k, v in phase_rows:
            print(f"{k:>3}  " + "  ".join(f"{x:13.1f}" for x in v))
        print("(deliver+claim: publish -> claimed; reserve: -> reserved; create: -> targets_created;"
              " spawn: -> serving; greet: -> sna_requested; http: -> the simulator's arrival)")
        print(f"simulator receive baseline (plain urllib GET -> its \"at\"): median {statistics.median(base):.1f} ms,"
              f" max {max(base):.1f} ms")
        if burst:
            print()
            b = burst
            print(f"Burst: {self.a.vms} VMs x 2 disks (1 MiB) published at once into 2 workers, max_jobs "
                  f"{self.a.max_jobs} each (prefetch 1):")
            print(f"  published all in        {b['publish_s'] * 1000:8.0f} ms")
            print(f"  all {self.a.vms} claimed       {b['all_claimed_s'] * 1000:8.0f} ms after the first publish (ledger)")
            print(f"  all {self.a.vms} started (SNA)   {b['all_started_s'] * 1000:8.0f} ms after the first publish")
            print(f"  all {self.a.vms} completed       {b['all_done_s'] * 1000:8.0f} ms")
            if b["lat"]:
                print(f"  publish->start per job: median {statistics.median(b['lat']):.0f} ms, "
                      f"p99 {pct(b['lat'], 99):.0f} ms, max {max(b['lat']):.0f} ms")
            print(f"  jobs per worker: {b['per_worker']}; jobs that waited for ports: {b['waited']}")
            for wid, (hwm, now) in sorted(b["rss"].items()):
                print(f"  {wid}: peak RSS (VmHWM) {hwm / 1024:.1f} MiB, RSS at the end {now / 1024:.1f} MiB")
            summary.append(f"SUMMARY\te2e burst {self.a.vms} VMs x 2 disks, 2 workers: all started s\t"
                           f"{b['all_started_s']:.1f}\t-\t-\t-\t-")
        print(f"(total {time.monotonic() - t0:.0f} s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        for line in summary:
            print(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("worker")
    ap.add_argument("ctl")
    ap.add_argument("--jobs", type=int, default=20, help="jobs per k (and limit repetitions) [20]")
    ap.add_argument("--vms", type=int, default=200, help="VMs of the burst [200]; 0 skips it")
    ap.add_argument("--max-jobs", type=int, default=16, help="worker.max_jobs [16]")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    if a.jobs < 1 or a.vms < 0 or a.max_jobs < 1:
        ap.error("--jobs >= 1, --vms >= 0, --max-jobs >= 1")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    b = Bench(a)
    try:
        b.run()
    except (Stop, Exception) as e:
        b.failures.append(f"{type(e).__name__}: {e}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        b.close()
    for f in b.failures:
        print(f"bench-e2e: FAILED: {f}", file=sys.stderr)
    return 1 if b.failures else 0


if __name__ == "__main__":
    sys.exit(main())
