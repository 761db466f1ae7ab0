#!/usr/bin/python3
"""bench_fleet.py: how fast bw starts jobs when nothing but bw limits it, next to the broker's own
limit (bare librabbitmq-c consumers that only ack). The engine of scripts/bench-fleet and
scripts/bench-burst; run it through them (they build the binaries and start the broker).

    bench_fleet.py fleet|burst --worker BW_WORKER --ctl BW_CTL --acker BENCH_FLEET_ACK [--short]

Needs the private broker of tests/with-broker (BW_TEST_AMQP_URL, BW_TEST_BROKER_DIR).

One run ("config") = a fresh tests/fleet/fleet.py Fleet: one SNA simulator, H simulated hosts
(own worker.host, state dir and ledger, loopback address 127.0.0.{2+i}, NBD ports
BASE + 1000 i .. + 899, BASE = BW_FLEET_NBD_BASE, 30000 by default) with W bw-workers each,
worker.max_jobs = the run's job count (so amqp.prefetch too: slots never limit), ports for
every disk of every job, sna.poll_interval_s 3600 (no progress poll while measured), a patient
SNA client (sna.timeout_s 60, sna.max_attempts 10: the simulator answers slowly on a loaded
machine, and a job must not fail for it), and the simulator's knob slow_bytes_per_s = 1: each disk gets one 4 KiB write and then waits about an
hour, so every transfer stays open and no job ends while measured. J VMs of D disks of 1 MiB.

  1. The workers start; the bench waits until H x W consumers are on backup.start.
  2. The J backup.start messages are published at once (persistent, one pika channel without
     confirms, so the publisher is not the bottleneck; publish time recorded per job).
  3. Started = the SNA simulator received the job's one start request and accepted it (200):
     the request's arrival time, as the simulator records it in /_sim/requests (ms
     resolution, taken before it reads the body: its own reply, which checks the body
     against the schemas first, is the SNA's time, not bw's). Each job must also have its
     backup.started event (the worker publishes it after that 200) before the run counts:
     the bench waits for J of them.
     time to all started = last start - first publish; jobs started/s = J / that;
     start latency = a job's start - its publish (p50, p99).
  4. CPU: utime+stime (+ reaped children) from /proc between the first publish and the moment
     the J-th backup.started arrived, of the workers, the broker (beam.smp), the simulator
     (with its cp children) and the qemu-nbd processes of the run; "machine" is the busy
     time of every CPU in /proc/stat over the same span (the shared machine's noise included).
     Peak RSS per worker: VmHWM from /proc/<pid>/status before it is stopped.
  5. Side by side, right after: the same number of bare consumers (bench_fleet_ack, one
     process and connection each, prefetch = the workers') ack a pre-filled quorum queue of
     messages of the same size; acks/s, the median of ACK_ROUNDS runs.
     A job started twice fails the run: two accepted (200/202) start requests, or start
     requests with different NBD targets (two owners); a retry of the same request (a
     timeout, then 409) is counted apart.
  6. Clean-up: a backup.cancel for every job (backup.control), every job must end failed
     `cancelled` with its backup.cleanup; workers SIGTERMed (exit 0), no qemu-nbd left, no
     port reserved; the Fleet's files removed.

fleet: hosts 1, 2 x workers 1, 2, 4; J = 400 (--short: 100), D = 1. burst: one host, workers
1, 2, 4, J = 200 VMs x D = 2 disks (--short: 100).
Prints a table, then tab-separated SUMMARY lines (figure, ours, limit or peer, ratio, goal, met)
for scripts/bench. Exit 0 when every run completed cleanly, 1 otherwise, 2 usage.
"""
import argparse
import calendar
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "fleet"))
import fleet as F  # noqa: E402
import pika  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PORTS_PER_HOST = 900          # host i: BASE + 1000 i .. + 899 (BASE = BW_FLEET_NBD_BASE)
HOLD_RATE = 1                 # slow_bytes_per_s: one 4 KiB write, then the copy waits ~4096 s
POLL_S = 3600                 # sna.poll_interval_s: no progress poll while measured
SNA_TIMEOUT_S = 60            # sna.timeout_s: the simulator answers slowly on a loaded machine
SNA_ATTEMPTS = 10             # sna.max_attempts (fleet.py's 5 x 5 s failed jobs at load 20)
START_TIMEOUT_S = 300         # every job started by then, or the run failed
END_TIMEOUT_S = 180           # every cancelled job ended (failed + cleanup) by then
ACK_QUEUE = "bench.fleet.ack"
ACK_ROUNDS = 3                # bare consumer runs per config (the median is shown)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] bench_fleet: {msg}", file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def proc_cpu(pid, children=True):
    """User+system CPU seconds of pid (its threads; with children, its reaped children too),
    or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])          # utime, stime (fields 14, 15)
    if children:
        ticks += int(fields[13]) + int(fields[14])     # cutime, cstime
    return ticks / TICK


def machine_busy():
    """Busy and total CPU seconds of the whole machine (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / TICK


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def task_cpu(pid):
    """CPU seconds of every thread of pid from /proc/PID/task/*/schedstat (nanoseconds: a
    qemu-nbd's few milliseconds are below /proc/PID/stat's 10 ms ticks), or None."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def qemu_nbd_pids(tmp):
    out = subprocess.run(["pgrep", "-f", "qemu-nbd"], capture_output=True, text=True).stdout
    pids = []
    for p in out.split():
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if tmp.encode() in f.read():
                    pids.append(int(p))
        except OSError:
            pass
    return pids


def beam_pid():
    d = os.environ["BW_TEST_BROKER_DIR"]
    with open(os.path.join(d, "run", "beam.pid")) as f:
        return int(f.read().split()[0])


def rfc3339(s):
    """'2026-12-02T03:46:23.123Z' as unix time."""
    base, frac = s.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1000


def pct(values, p):
    """The p-th percentile (nearest rank) of values."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def ledger_history(state_dirs, jobs):
    """job_id -> {state: wall-clock seconds of its first entry} from every host's ledger
    (job_history, read-only), for the jobs in jobs."""
    out = {}
    for d in state_dirs:
        db = sqlite3.connect(f"file:{d}/ledger.db?mode=ro", uri=True, timeout=10)
        try:
            for job_id, state, at in db.execute("SELECT job_id, state, at FROM job_history ORDER BY id"):
                if job_id in jobs:
                    out.setdefault(job_id, {}).setdefault(state, at / 1000)
        finally:
            db.close()
    return out


def consumers_on(url, queue="backup.start"):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


class Config:
    def __init__(self, kind, hosts, workers, jobs, disks):
        self.kind, self.hosts, self.workers, self.jobs, self.disks = kind, hosts, workers, jobs, disks
        self.tag = f"{kind[0]}h{hosts}w{workers}"
        self.result, self.failures = {}, []


def run_bw(cfg, args, url):
    """One measured run of bw: fills cfg.result; appends to cfg.failures."""
    broker = F.SingleBroker(url)
    fl = F.Fleet(args.worker, args.ctl, broker, f"bench-{cfg.tag}-{os.getpid()}")
    r, fails = cfg.result, cfg.failures
    try:
        fl.sim.post("/_sim/faults", {"slow_bytes_per_s": HOLD_RATE})
        fl.make_vms(cfg.jobs, seed=7, min_disks=cfg.disks, max_disks=cfg.disks, min_mib=1, max_mib=1)
        base = F.NBD_PORT_BASE
        for i in range(cfg.hosts):
            h = fl.add_host(workers=cfg.workers, max_jobs=cfg.jobs,
                            conf={"sna.poll_interval_s": POLL_S, "sna.timeout_s": SNA_TIMEOUT_S,
                                  "sna.max_attempts": SNA_ATTEMPTS,
                                  "log.level": os.environ.get("BW_BENCH_FLEET_LOG", "info")})
            h.port_min = base + 1000 * i
            h.port_max = h.port_min + PORTS_PER_HOST - 1
        need = cfg.jobs * cfg.disks
        if need > PORTS_PER_HOST:
            raise RuntimeError(f"{need} disks need more than {PORTS_PER_HOST} ports per host")
        for h in fl.hosts:
            h.start()
        n = cfg.hosts * cfg.workers
        end = time.time() + 60
        while consumers_on(url) < n:
            dead = [w for h in fl.hosts for w, p in h.workers.items() if p.poll() is not None]
            if dead or time.time() > end:
                for h in fl.hosts:
                    h.tail()
                raise RuntimeError(f"workers not consuming (dead: {dead})")
            time.sleep(0.2)
        msgs = [fl.message(i) for i in range(cfg.jobs)]
        bodies = [json.dumps(m).encode() for m in msgs]
        r["body_bytes"] = max(len(b) for b in bodies)
        pids = {w: p.pid for h in fl.hosts for w, p in h.workers.items()}
        beam, sim = beam_pid(), fl.sim.proc.pid
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        r["load_before"] = loadavg()
        c0 = {w: proc_cpu(p) for w, p in pids.items()}
        b0, s0, m0 = proc_cpu(beam), proc_cpu(sim), machine_busy()
        pub = {}
        t0 = time.time()
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for m, b in zip(msgs, bodies):
            pub[m["job_id"]] = time.time()
            ch.basic_publish("backup.jobs", "backup.start", b, props)
        conn.process_data_events(0)
        r["publish_s"] = time.time() - t0
        want = set(pub)
        end = time.time() + START_TIMEOUT_S
        started_at = {}
        while True:
            for at, e in fl.collector.since(t0):
                if e.get("event") == "backup.started" and e.get("job_id") in want:
                    started_at.setdefault(e["job_id"], (at, e.get("worker_id")))
            if len(started_at) == len(want) or time.time() > end:
                break
            failed = [e.get("job_id") for e in fl.collector.events()
                      if e.get("event") in ("backup.failed", "backup.rejected")]
            if failed:
                break
            time.sleep(0.05)
        t_seen = time.time()
        c1 = {w: proc_cpu(p) for w, p in pids.items()}
        b1, s1, m1 = proc_cpu(beam), proc_cpu(sim), machine_busy()
        nbd = qemu_nbd_pids(fl.tmp)
        qn = sum(x for x in (task_cpu(p) for p in nbd) if x is not None)
        r["load_after"] = loadavg()
        r["hwm_kib"] = {w: vm_hwm_kib(p) for w, p in pids.items()}
        conn.close()
        if len(started_at) != len(want):
            fails.append(f"{len(started_at)} of {len(want)} jobs started (backup.started) in "
                         f"{START_TIMEOUT_S} s; failed/rejected: "
                         f"{[e.get('job_id') for e in fl.collector.events() if e.get('event') in ('backup.failed', 'backup.rejected')][:5]}")
        # the SNA's view: one accepted start per job
        reqs = fl.sim.get("/_sim/requests")["requests"]
        starts = {}
        for q in reqs:
            if q["path"] == "/api/v1/backup/start" and q["method"] == "POST":
                jid = (q.get("body") or {}).get("job_id")
                starts.setdefault(jid, []).append(q)
        accepted, retried = {}, 0
        for jid in want:
            qs = starts.get(jid, [])
            ok = [q for q in qs if q["status"] in (200, 202, 409)]
            # one owner per job: every start request of a job names the same NBD targets
            # (a retry after a timeout is the same request again, and the simulator answers
            # it 409); two different target lists are two workers that started the job
            owners = {(q.get("body") or {}).get("nbd_targets") for q in qs}
            if len(owners) > 1 or sum(q["status"] in (200, 202) for q in qs) > 1:
                fails.append(f"{jid}: started twice: " + ", ".join(
                    f"{q['status']} at {q['at']} targets {(q.get('body') or {}).get('nbd_targets')}" for q in qs))
            retried += len(qs) > 1
            if ok:
                accepted[jid] = rfc3339(ok[0]["at"])
        r["retried"] = retried
        polls = sum(1 for q in reqs if q["path"].startswith("/api/v1/progress/"))
        if len(accepted) != len(want):
            fails.append(f"{len(want) - len(accepted)} job(s) without an accepted SNA start")
        r["progress_polls"] = polls
        # bw's view: the ledger's job_history (wall-clock ms) of every host
        hist = ledger_history([h.state for h in fl.hosts], want)
        ready = {j: st["sna_requested"] for j, st in hist.items() if "sna_requested" in st}
        if len(ready) != len(want):
            fails.append(f"{len(want) - len(ready)} job(s) without sna_requested in a ledger")
        for key, when in (("bw", ready), ("sna", accepted)):
            if not when:
                continue
            span = max(when.values()) - t0
            lat = [when[j] - pub[j] for j in when]
            r[f"{key}_all_s"] = span
            r[f"{key}_jobs_s"] = len(when) / span if span > 0 else float("inf")
            r[f"{key}_p50_ms"] = pct(lat, 50) * 1000
            r[f"{key}_p99_ms"] = pct(lat, 99) * 1000
        # where bw's time goes, medians over the jobs: publish -> claimed (delivery, parse,
        # claim), -> reserved (the ports, one ledger transaction), -> targets_created (the
        # images), -> serving (every qemu-nbd spawned), -> sna_requested (every server
        # greeted), -> the SNA's receipt (HTTP and the simulator's receive delay)
        steps = (("claim", None, "claimed"), ("ports", "claimed", "reserved"),
                 ("images", "reserved", "targets_created"), ("spawn", "targets_created", "serving"),
                 ("greet", "serving", "sna_requested"))
        phases = {k: [] for k, _, _ in steps}
        phases["http"] = []
        for j, st in hist.items():
            if not {"claimed", "reserved", "targets_created", "serving", "sna_requested"} <= set(st):
                continue
            for k, a, b in steps:
                phases[k].append(st[b] - (pub[j] if a is None else st[a]))
            if j in accepted:
                phases["http"].append(accepted[j] - st["sna_requested"])
        r["phases_ms"] = {k: round(statistics.median(v) * 1000) for k, v in phases.items() if v}
        if started_at:
            r["events_seen_s"] = max(a for a, _ in started_at.values()) - t0
            # from the SNA's receipt of the start to the backup.started event here: the
            # simulator's reply (it checks the body against the schemas before answering),
            # the worker's commit and the outbox relay's confirmed publish
            after = [started_at[j][0] - accepted[j] for j in accepted if j in started_at]
            r["to_event_p50_ms"] = pct(after, 50) * 1000 if after else None
        window = t_seen - t0
        r["window_s"] = window
        wcpu = sum((c1[w] or 0) - (c0[w] or 0) for w in pids)
        r["worker_cpu_job"] = wcpu / cfg.jobs
        r["broker_cpu_job"] = (b1 - b0) / cfg.jobs
        r["sim_cpu_job"] = (s1 - s0) / cfg.jobs
        r["qemu_nbd_cpu_job"] = qn / cfg.jobs
        r["cores_ours"] = (wcpu + (b1 - b0) + (s1 - s0) + qn) / window if window > 0 else 0
        r["cores_machine"] = (m1 - m0) / window if window > 0 else 0
        # what this machine's CPUs could start if they did nothing else: bw's own cost per
        # job (workers, broker, qemu-nbd; a real SNA runs elsewhere), and with the simulator
        own = r["worker_cpu_job"] + r["broker_cpu_job"] + r["qemu_nbd_cpu_job"]
        ncpu = os.cpu_count() or 1
        r["ceiling"] = ncpu / own if own > 0 else None
        r["ceiling_sim"] = ncpu / (own + r["sim_cpu_job"]) if own + r["sim_cpu_job"] > 0 else None
        per = {}
        for _, w in started_at.values():
            per[w] = per.get(w, 0) + 1
        r["per_worker"] = per
        r["qemu_nbd"] = len(nbd)
        # clean-up: cancel every job, every one must end cancelled with its cleanup
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        for jid in want:
            ch.basic_publish("backup.control", "", json.dumps(
                {"schema_version": 1, "job_id": jid, "reason": "bench over"}).encode(),
                pika.BasicProperties(delivery_mode=2, content_type="application/json"))
        conn.close()
        t_c = time.time()
        end = time.time() + END_TIMEOUT_S
        while time.time() < end:
            evs = fl.collector.events()
            cleaned = {e.get("job_id") for e in evs if e.get("event") == "backup.cleanup"}
            if want <= cleaned:
                break
            time.sleep(0.25)
        r["cancel_s"] = time.time() - t_c
        evs = fl.collector.events()
        cleaned = {e.get("job_id") for e in evs if e.get("event") == "backup.cleanup"}
        reasons = {}
        for e in evs:
            if e.get("event") == "backup.completed" and e.get("job_id") in want:
                reasons.setdefault(e["job_id"], set()).add("completed")
            if e.get("event") == "backup.failed" and e.get("job_id") in want:
                reasons.setdefault(e["job_id"], set()).add(e.get("reason"))
        not_cancelled = [j for j in want if reasons.get(j) != {"cancelled"}]
        if want - cleaned:
            fails.append(f"{len(want - cleaned)} job(s) without backup.cleanup {END_TIMEOUT_S} s after the cancel")
        if not_cancelled:
            fails.append(f"{len(not_cancelled)} job(s) not ended exactly 'cancelled', e.g. "
                         f"{not_cancelled[0]}: {reasons.get(not_cancelled[0])}")
    except Exception as e:  # noqa: BLE001 - a run that could not complete is a failure
        fails.append(f"{type(e).__name__}: {e}")
    finally:
        keep = os.environ.get("BW_BENCH_FLEET_KEEP") == "1" or (
            bool(fails) and os.environ.get("BW_FLEET_KEEP") == "1")
        codes, left = fl.close(keep=keep)
        if keep:
            log(f"{cfg.tag}: kept {fl.tmp}")
        bad = {w: c for w, c in codes.items() if c != 0}
        if bad:
            fails.append(f"workers did not exit 0 on SIGTERM: {bad}")
        fails.extend(left)
        if fl.collector.errors:
            log(f"{cfg.tag}: collector: {fl.collector.errors[:3]}")


def run_acker(cfg, args, url):
    """The bare consumers, right after bw's run, on the same broker: ACK_ROUNDS runs, the
    median acks/s (one run is a fraction of a second: the shared machine's noise moves it)."""
    r = cfg.result
    count = 5000 if args.short else 20000
    n = cfg.hosts * cfg.workers
    beam = beam_pid()
    rates, bcpu, ccpu = [], [], []
    for _ in range(ACK_ROUNDS):
        b0 = proc_cpu(beam)
        p = subprocess.run([args.acker, "--consumers", str(n), "--count", str(count),
                            "--prefetch", str(min(cfg.jobs, 65535)),
                            "--body-bytes", str(r.get("body_bytes", 512)), "--queue", ACK_QUEUE, url],
                           capture_output=True, text=True, timeout=300)
        b1 = proc_cpu(beam)
        line = next((l for l in p.stdout.splitlines() if l.startswith("bench_fleet_ack ")), None)
        if p.returncode != 0 or line is None:
            cfg.failures.append(f"bench_fleet_ack exit {p.returncode}: {p.stderr.strip()[-300:]}")
            return
        log(f"{cfg.tag}: {line}")
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        rates.append(float(kv["acks_s"]))
        bcpu.append((b1 - b0) / count)      # the untimed fill included: an upper bound
        ccpu.append(float(kv["cpu_s"]) / count)
    r["acks_s"] = statistics.median(rates)
    r["acks_range"] = f"{min(rates):.0f}-{max(rates):.0f}"
    r["ack_broker_cpu"] = statistics.median(bcpu)
    r["ack_cpu"] = statistics.median(ccpu)


def configs(kind, short):
    if kind == "fleet":
        out = []
        for h in (1, 2):
            for w in (1, 2, 4):
                out.append(Config(kind, h, w, 100 if short else 400, 1))
        return out
    j = 100 if short else 200
    return [Config(kind, 1, w, j, 2) for w in (1, 2, 4)]


def on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")   # the finally blocks stop every process


def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=("fleet", "burst"))
    ap.add_argument("--worker", required=True)
    ap.add_argument("--ctl", required=True)
    ap.add_argument("--acker", required=True)
    ap.add_argument("--short", action="store_true")
    try:
        args = ap.parse_args()
    except SystemExit:
        return 2
    url = os.environ.get("BW_TEST_AMQP_URL")
    if not url or not os.environ.get("BW_TEST_BROKER_DIR"):
        print("bench_fleet: run under tests/with-broker (BW_TEST_AMQP_URL, BW_TEST_BROKER_DIR)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_term)
    cfgs = configs(args.kind, args.short)
    only = os.environ.get("BW_BENCH_FLEET_ONLY")   # e.g. "fh1w2": one run (debugging)
    if only:
        cfgs = [c for c in cfgs if c.tag in only.split(",")]
    log(f"{args.kind}: {len(cfgs)} runs; {os.cpu_count()} CPUs; load {loadavg()}")
    for cfg in cfgs:
        log(f"{cfg.tag}: {cfg.hosts} host(s) x {cfg.workers} worker(s), {cfg.jobs} jobs x "
            f"{cfg.disks} disk(s)")
        run_bw(cfg, args, url)
        if not cfg.failures:
            run_acker(cfg, args, url)
        r = cfg.result
        log(f"{cfg.tag}: {fmt(r.get('bw_jobs_s'))} jobs/s (at the SNA {fmt(r.get('sna_jobs_s'))}), "
            f"all started in {fmt(r.get('bw_all_s'), '{:.2f}')} s, "
            f"per worker {r.get('per_worker')}, load {r.get('load_before')} -> {r.get('load_after')}"
            + (f"; FAILED: {cfg.failures}" if cfg.failures else ""))
    print_table(args.kind, cfgs, args.short)
    return 1 if any(c.failures for c in cfgs) else 0


def print_table(kind, cfgs, short):
    def two(r, key, f):
        return f"{fmt(r.get('bw_' + key), f)}/{fmt(r.get('sna_' + key), f)}"

    if kind == "fleet":
        head = ("hosts", "workers", "jobs", "started/s bw/SNA", "bare acks/s", "ratio bw/bare",
                "worker CPU s/job", "broker CPU s/job", "sim CPU s/job", "qemu-nbd CPU s/job",
                "CPU ceiling jobs/s", "cores ours/machine", "load 1m before/after")
    else:
        head = ("workers", "jobs", "disks", "all started s bw/SNA", "started/s bw/SNA",
                "p50 ms bw/SNA", "p99 ms bw/SNA", "bare acks/s", "ratio bw/bare", "worker CPU s/job",
                "broker CPU s/job", "sim CPU s/job", "qemu-nbd CPU s/job", "peak RSS/worker MiB",
                "cores ours/machine", "load 1m before/after")
    rows = []
    for c in cfgs:
        r = c.result
        ratio = (r["bw_jobs_s"] / r["acks_s"]) if r.get("bw_jobs_s") and r.get("acks_s") else None
        r["ratio"] = ratio
        cores = f"{fmt(r.get('cores_ours'), '{:.2f}')}/{fmt(r.get('cores_machine'), '{:.2f}')}"
        load = f"{(r.get('load_before') or '-').split()[0]}/{(r.get('load_after') or '-').split()[0]}"
        hwm = [v for v in (r.get("hwm_kib") or {}).values() if v]
        cpu = (fmt(r.get("worker_cpu_job"), "{:.4f}"), fmt(r.get("broker_cpu_job"), "{:.4f}"),
               fmt(r.get("sim_cpu_job"), "{:.4f}"), fmt(r.get("qemu_nbd_cpu_job"), "{:.4f}"))
        if kind == "fleet":
            ceil = f"{fmt(r.get('ceiling'), '{:.0f}')}/{fmt(r.get('ceiling_sim'), '{:.0f}')}"
            rows.append((c.hosts, c.workers, c.jobs, two(r, "jobs_s", "{:.1f}"),
                         fmt(r.get("acks_s"), "{:.0f}"), fmt(ratio, "{:.4f}"), *cpu, ceil, cores, load))
        else:
            rows.append((c.workers, c.jobs, c.jobs * c.disks, two(r, "all_s", "{:.2f}"),
                         two(r, "jobs_s", "{:.1f}"), two(r, "p50_ms", "{:.0f}"),
                         two(r, "p99_ms", "{:.0f}"), fmt(r.get("acks_s"), "{:.0f}"),
                         fmt(ratio, "{:.4f}"), *cpu,
                         fmt(max(hwm) / 1024 if hwm else None, "{:.1f}"), cores, load))
    widths = [max(len(str(h)), *(len(str(row[i])) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(str(h).rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print("started: bw = the job's sna_requested row in its host's ledger (claimed, ports, images, "
          "every qemu-nbd greeted: the start request leaves); SNA = the simulator received that "
          "request and answered 200 (its arrival time). Every job also has its backup.started "
          "event. Rates: jobs / (last start - first publish); latency: start - the job's publish. "
          "ratio: bw started/s / bare acks/s (the same number of bench_fleet_ack consumers on a "
          "pre-filled quorum queue, median of 3). CPU: /proc, first publish -> last backup.started "
          f"seen; cores = CPU seconds / that span. CPU ceiling: {os.cpu_count()} CPUs / (workers + "
          f"broker + qemu-nbd CPU s/job), and / (the same + the simulator's): the rate if this "
          f"machine did nothing else. {'short form' if short else 'full form'}; "
          f"{os.cpu_count()} CPUs.")
    for c in cfgs:
        r = c.result
        extra = (f"phases p50 ms {r.get('phases_ms')}, publish {fmt(r.get('publish_s'), '{:.2f}')} s, "
                 f"last backup.started seen {fmt(r.get('events_seen_s'), '{:.2f}')} s (SNA receipt -> "
                 f"event p50 {fmt(r.get('to_event_p50_ms'), '{:.0f}')} ms), per worker "
                 f"{r.get('per_worker')}, jobs with a retried start {r.get('retried')}, progress polls {r.get('progress_polls')}, qemu-nbd "
                 f"{r.get('qemu_nbd')}, cancel+cleanup of all {fmt(r.get('cancel_s'), '{:.1f}')} s, "
                 f"bare acks/s of {ACK_ROUNDS} runs {r.get('acks_range')}, their broker CPU s/ack "
                 f"(fill included) {fmt(r.get('ack_broker_cpu'), '{:.5f}')}")
        print(f"  {c.tag}: {extra}" + (f"; FAILED: {'; '.join(c.failures)}" if c.failures else ""))
    for c in cfgs:
        r = c.result
        acks = f"bare acks/s {fmt(r.get('acks_s'), '{:.0f}')}"
        ratio = fmt(r.get("ratio"), "{:.4f}")
        if kind == "fleet":
            hw = f"{c.hosts} host{'s' if c.hosts > 1 else ''} x {c.workers} workers"
            summary(f"fleet jobs/s {hw}", fmt(r.get("bw_jobs_s")), acks, ratio)
            summary(f"fleet jobs/s at the SNA {hw}", fmt(r.get("sna_jobs_s")))
            summary(f"fleet worker CPU s/job {hw}", fmt(r.get("worker_cpu_job"), "{:.4f}"))
        else:
            w = f"burst {c.jobs}x{c.disks} {c.workers} worker{'s' if c.workers > 1 else ''}"
            hwm = [v for v in (r.get("hwm_kib") or {}).values() if v]
            summary(f"{w}: jobs started/s", fmt(r.get("bw_jobs_s")), acks, ratio)
            summary(f"{w}: time until all started s", fmt(r.get("bw_all_s"), "{:.2f}"))
            summary(f"{w}: p50 start latency ms", fmt(r.get("bw_p50_ms"), "{:.0f}"))
            summary(f"{w}: p99 start latency ms", fmt(r.get("bw_p99_ms"), "{:.0f}"))
            summary(f"{w}: jobs started/s at the SNA", fmt(r.get("sna_jobs_s")))
            summary(f"{w}: worker CPU s/job", fmt(r.get("worker_cpu_job"), "{:.4f}"))
            summary(f"{w}: peak RSS per worker MiB", fmt(max(hwm) / 1024 if hwm else None))


def summary(figure, ours, peer="-", ratio="-", goal="-", met="-"):
    print("\t".join(("SUMMARY", figure, ours, peer, ratio, goal, met)))


if __name__ == "__main__":
    sys.exit(main())
