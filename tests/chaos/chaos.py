#!/usr/bin/python3
"""chaos.py: bw's chaos suite. Runs the scenarios of tests/chaos/scn_*.py against the real
bw-worker, a private broker, real qemu-nbd and the SNA simulator, and prints one table in
Jepsen's words; or, with --soak, a steady stream of jobs under random faults for MINUTES.

Usage: chaos.py [--quick] [--soak MINUTES] [--only NAME[,NAME]] [--list] BW_WORKER BW_CTL
  (normally through scripts/chaos, which builds the binaries when none are given)

Exit: 0 every loss and leak column is 0 and no scenario failed or raised (soak: and every
      per-minute series is flat); 1 otherwise; 2 usage (unknown scenario, bad arguments).

The scenario interface (tests/chaos/README.md): each scn_*.py has SCENARIOS = [(name,
function, trials in --quick, trials in the full run)], function(ctx, trials) -> dict of the
columns below plus "notes" and "failures". This module also holds the pieces scenarios share
(Rig: a private_broker.Broker, a fleet of simulated hosts, workers started and killed by PID, the
checker's verdict and the leak count); importing it has no side effect.
"""
import argparse
import glob
import importlib.util
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime

import pika

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "fleet"))
import checker  # noqa: E402
from private_broker import Broker  # noqa: E402
# the fleet's workers listen for /metrics at 24800+ (ctest fleet) and 24900+ (fleet_cluster),
# on the same loopback addresses: chaos's own base, so that ctest -j2 can run them side by side
os.environ.setdefault("BW_FLEET_METRICS_BASE", "26600")
import fleet as F  # noqa: E402

MiB = 1 << 20
COLUMNS = ("trials", "jobs", "lost", "dup_starts", "contradicting", "recovered", "leaked_ports",
           "leaked_children", "leaked_files")
HEADER = ("scenario", "trials", "jobs", "lost", "duplicated starts", "contradicting terminals",
          "recovered", "leaked ports", "leaked children", "leaked files", "s")
BAD = ("lost", "dup_starts", "contradicting", "leaked_ports", "leaked_children", "leaked_files")
# NBD port ranges handed to scenarios: this helper's modules and the rest (SNA, disk, broker)
OWN_MODULES = ("scn_crash", "scn_memory")
OWN_RANGE = (26200, 26399)
OTHER_RANGE = (26400, 26599)
TERMINAL_WAIT_S = 120      # how long a scenario waits for its jobs' terminal events by default


def stamp():
    return time.strftime("%H:%M:%S")


def log(msg):
    print(f"[{stamp()}] chaos: {msg}", file=sys.stderr, flush=True)


def result(**kw):
    """A scenario's result with every column 0 and empty lists, updated by kw."""
    r = {c: 0 for c in COLUMNS}
    r["notes"], r["failures"] = [], []
    r.update(kw)
    return r


class Ctx:
    """What a scenario is given (see the module's comment)."""

    def __init__(self, worker, ctl, quick, tmp, nbd_lo, nbd_hi, name=""):
        self.root, self.worker, self.ctl = ROOT, os.path.abspath(worker), os.path.abspath(ctl)
        self.quick, self.tmp, self.nbd_lo, self.nbd_hi = quick, tmp, nbd_lo, nbd_hi
        self.name = name

    def log(self, msg):
        log(f"{self.name}: {msg}" if self.name else msg)


def occurred(e):
    """An event's occurred_at as unix time (0 when it has none)."""
    try:
        return datetime.strptime(e["occurred_at"].replace("Z", "+0000"),
                                 "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except (KeyError, ValueError, AttributeError):
        return 0.0


def consumers(url, queue):
    """Consumers on queue (0 when it does not exist yet)."""
    conn = pika.BlockingConnection(F._params(url))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


def wait_consumers(url, queue, n, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if consumers(url, queue) >= n:
            return True
        time.sleep(0.1)
    return False


# ---- processes ----------------------------------------------------------------------------

def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def procs_mentioning(text, exclude=()):
    """[(pid, cmdline)] of live processes whose command line contains text."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in exclude or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            out.append((int(d), cmd.strip()))
    return out


# ---- a rig: broker, fleet, workers, verdict -----------------------------------------------

class Rig:
    """A private broker and a fleet (tests/fleet/fleet.py) of simulated hosts on it, with NBD
    ports from ctx's range (host i: nbd_lo + 100 i, `ports` of them). Workers are started by
    start() (optionally with extra environment, e.g. BW_CRASH_AT, or a preexec hook) and
    killed by PID; every death the test caused or saw is recorded (deaths) so that the jobs it
    hit can be told. finish() waits for the terminal events, stops the workers, counts leaks
    and returns the scenario's result; close() ends everything (always call it)."""

    def __init__(self, ctx, tag, hosts, conf=None):
        self.ctx = ctx
        self.deaths = []          # (time.time(), host name, worker id, how)
        self.known_hit = set()    # job_ids the test knows a death hit (the victim held them)
        self.exit_codes = {}
        self.broker = self.fleet = None
        self.broker = Broker(os.path.join(ctx.tmp, "broker"))
        ctx.log(f"broker on {self.broker.url}")
        self.fleet = F.Fleet(ctx.worker, ctx.ctl, F.SingleBroker(self.broker.url),
                             f"{tag}-{os.getpid()}")
        for i, spec in enumerate(hosts):
            h = self.fleet.add_host(repos=spec.get("repos", ("repo-001",)),
                                    workers=spec.get("workers", 2),
                                    max_jobs=spec.get("max_jobs", 4),
                                    conf={"worker.recovery_interval_s": 1, "job.port_wait_s": 5,
                                          **(conf or {}), **spec.get("conf", {})})
            h.port_min = ctx.nbd_lo + 100 * i
            h.port_max = min(h.port_min + spec.get("ports", 48) - 1, ctx.nbd_hi)
            if h.port_min > ctx.nbd_hi:
                raise RuntimeError(f"host {i}: no NBD ports left in {ctx.nbd_lo}-{ctx.nbd_hi}")

    def host(self, i=0):
        return self.fleet.hosts[i]

    def start(self, host, wid, env=None, preexec=None):
        """Starts (or restarts) worker wid of host; returns its Popen."""
        p = host.workers.get(wid)
        if p is not None and p.poll() is None:
            raise RuntimeError(f"{wid} is running")
        logf = open(os.path.join(host.dir, f"{wid}.log"), "a")
        host.workers[wid] = subprocess.Popen(
            [self.fleet.worker, "--config", host.config(wid)], stdout=logf, stderr=logf,
            env={**os.environ, **(env or {})}, preexec_fn=preexec)
        logf.close()
        return host.workers[wid]

    def start_all(self):
        for h in self.fleet.hosts:
            for wid in h.worker_ids():
                self.start(h, wid)

    def kill(self, host, wid, how="SIGKILL"):
        p = host.workers[wid]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        self.deaths.append((time.time(), host.name, wid, how))

    def saw_death(self, host, wid, how):
        self.deaths.append((time.time(), host.name, wid, how))

    def stop_worker(self, host, wid, timeout=60):
        p = host.workers.get(wid)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = "killed after SIGTERM timeout"
        self.exit_codes.setdefault(wid, []).append(code)
        return code

    def publish(self, i, job_faults=None, msg=None):
        """Publishes job i (fleet.message(i), or msg) with confirms; returns its job_id."""
        msg = msg or self.fleet.message(i)
        outcome = self.fleet.publish(msg, job_faults)
        # pika's blocking connection answers heartbeats only while called: a connection left
        # idle while the test waits would be closed by the broker, and the next publish lost
        self.fleet.publisher.close()
        if outcome != "ok":
            self.ctx.log(f"publish of {msg['job_id']}: {outcome}")
        return msg["job_id"]

    # -- the verdict --

    def hit_jobs(self):
        """{job_id: death} of the jobs a recorded death hit: the dead worker had written an
        event of the job by then and the job had no terminal event before it."""
        by_job = {}
        for e in self.fleet.collector.events():
            by_job.setdefault(e.get("job_id"), []).append(e)
        hit = {}
        for jid, evs in by_job.items():
            if jid is None:
                continue
            for t, hname, wid, how in self.deaths:
                mine = [e for e in evs if e.get("host") == hname and e.get("worker_id") == wid
                        and occurred(e) <= t + 0.05]
                ended = [e for e in evs if e.get("event") in checker.TERMINALS and occurred(e) <= t]
                if mine and not ended:
                    hit.setdefault(jid, (t, hname, wid, how))
        for jid in self.known_hit:
            hit.setdefault(jid, "known")
        return hit

    def leaks(self):
        """(ports, children, files, details) left once every worker stopped: reserved ledger
        rows, processes naming a host's directory, files in a repository that no
        backup.disk.completed reported and NBD TLS keys in a state directory."""
        ports = children = files = 0
        details = []
        kept = {e.get("qcow2_path") for e in self.fleet.collector.events()
                if e.get("event") == "backup.disk.completed"}
        for h in self.fleet.hosts:
            r = subprocess.run([self.fleet.ctl, "--config", h.config(h.name + "-ctl"), "ports",
                                "--json"], capture_output=True, text=True)
            try:
                held = [p for p in json.loads(r.stdout or "[]") if p.get("state") == "reserved"]
            except ValueError:
                held = []
                details.append(f"{h.name}: bw-ctl ports: {r.stderr.strip()[:200]}")
            ports += len(held)
            details += [f"{h.name}: port {p.get('port')} still reserved by {p.get('job_id')}"
                        for p in held]
            left = procs_mentioning(h.dir + "/")
            children += len(left)
            details += [f"{h.name}: process left: {pid} {cmd[:160]}" for pid, cmd in left]
            for repo in h.repos.values():
                for d, _, names in os.walk(repo):
                    for n in names:
                        path = os.path.join(d, n)
                        if path not in kept:
                            files += 1
                            details.append(f"{h.name}: file left: {path}")
            tls = os.path.join(h.state, "tls")
            if os.path.isdir(tls) and os.listdir(tls):
                files += len(os.listdir(tls))
                details.append(f"{h.name}: NBD TLS keys left: {os.listdir(tls)}")
        return ports, children, files, details

    def finish(self, res, timeout=TERMINAL_WAIT_S, trials=0):
        """Waits for every published job's terminal event, stops every worker (SIGTERM), then
        judges: checker columns, recovered, leaks. Fills and returns res."""
        fl = self.fleet
        left = fl.wait_terminal(timeout)
        if left:
            res["failures"].append(f"{len(left)} job(s) without a terminal event after "
                                   f"{timeout} s: {sorted(left)[:5]}")
        fl.collector.drain(quiet=2, timeout=30)
        for h in fl.hosts:
            for wid in list(h.workers):
                code = self.stop_worker(h, wid)
                if code not in (0, None):
                    res["failures"].append(f"{wid} exited {code} on SIGTERM (see its log)")
        time.sleep(0.3)
        verdict = checker.check(fl.history())
        hit = self.hit_jobs()
        terms = fl.terminal()
        res["trials"] = res.get("trials") or trials
        res["jobs"] = verdict.jobs
        res["lost"] = verdict.lost
        res["dup_starts"] = verdict.dup_starts
        res["contradicting"] = verdict.contradicting
        res["recovered"] = sum(1 for j in hit if j in terms)
        for c in ("seq_gaps", "unexpected", "images_bad"):
            if getattr(verdict, c):
                res["failures"].append(f"checker: {c} {getattr(verdict, c)}")
        res["failures"] += [f"checker: {d}" for d in verdict.details[:10]]
        res["leaked_ports"], res["leaked_children"], res["leaked_files"], det = self.leaks()
        res["failures"] += det[:20]
        unrecovered = sorted(j for j in hit if j not in terms)
        res["notes"].append(f"{len(self.deaths)} worker death(s); {len(hit)} job(s) hit, "
                            f"{res['recovered']} recovered; outcomes: {verdict.completed} completed, "
                            f"{verdict.failed} failed; {verdict.images_compared} image(s) compared")
        if unrecovered:
            res["failures"].append(f"hit and never ended: {unrecovered[:5]}")
        self.hit = hit
        return res

    def close(self):
        """Stops what is still running (workers, simulator, proxies, collector, broker) and
        removes the fleet's directory; leftover qemu-nbd of our hosts are SIGKILLed (the
        leak count was taken before)."""
        if self.fleet is not None:
            for h in self.fleet.hosts:
                for wid, p in list(h.workers.items()):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            for h in self.fleet.hosts:
                for pid, _ in procs_mentioning(h.dir + "/"):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            if os.environ.get("BW_CHAOS_KEEP"):
                with open(os.path.join(self.fleet.tmp, "events.json"), "w") as f:
                    json.dump(self.fleet.collector.events(), f, indent=1)
                with open(os.path.join(self.fleet.tmp, "deaths.json"), "w") as f:
                    json.dump(self.deaths, f)
                self.ctx.log(f"kept {self.fleet.tmp} (events.json, deaths.json, worker logs)")
            self.fleet.close(keep=bool(os.environ.get("BW_CHAOS_KEEP")))
        if self.broker is not None:
            self.broker.close()


# ---- discovery, table, main -----------------------------------------------------------------

def discover():
    """[(module name, module)] of every tests/chaos/scn_*.py, sorted."""
    mods = []
    for path in sorted(glob.glob(os.path.join(HERE, "scn_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods.append((name, mod))
    return mods


def nbd_range(module):
    return OWN_RANGE if module in OWN_MODULES else OTHER_RANGE


def row(name, r, secs):
    cells = [name] + [str(r.get(c, "?")) for c in COLUMNS] + [f"{secs:.0f}"]
    return "| " + " | ".join(cells) + " |"


def table(rows):
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += [row(n, r, s) for n, r, s in rows]
    return "\n".join(out)


def failed(r):
    return r.get("raised") or r.get("failures") or any(r.get(c, 0) != 0 for c in BAD)


def run_scenarios(worker, ctl, quick, chosen):
    """Runs chosen [(module, name, fn, trials)]; prints the table; returns the exit code."""
    rows = []
    t_all = time.time()
    for module, name, fn, trials in chosen:
        lo, hi = nbd_range(module)
        tmp = tempfile.mkdtemp(prefix=f"bw-chaos-{name}-")
        ctx = Ctx(worker, ctl, quick, tmp, lo, hi, name)
        ctx.log(f"start: {trials} trial(s), NBD ports {lo}-{hi}")
        t0 = time.time()
        try:
            r = fn(ctx, trials)
            if not isinstance(r, dict):
                r = result(failures=[f"returned {type(r).__name__}, not a dict"])
        except Exception:  # noqa: BLE001 - a scenario that raised is a failed row
            r = result(trials=trials, failures=["raised: " + traceback.format_exc()[-1500:]])
            r["raised"] = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        secs = time.time() - t0
        ctx.log(f"done in {secs:.0f} s: " + ", ".join(f"{c} {r.get(c)}" for c in COLUMNS))
        rows.append((name, r, secs))
    print(table(rows))
    for name, r, _ in rows:
        for n in r.get("notes", []):
            print(f"  {name}: note: {n}")
        for f in r.get("failures", []):
            print(f"  {name}: FAIL: {f}")
    bad = [n for n, r, _ in rows if failed(r)]
    print(f"chaos: {len(rows)} scenario(s) in {time.time() - t_all:.0f} s; "
          + (f"FAILED: {', '.join(bad)}" if bad else "every loss and leak column 0, no failures"),
          flush=True)
    return 1 if bad else 0


def standalone(scenarios, module_name):
    """A module's own main: BW_WORKER BW_CTL [--quick] [NAME...]; returns the exit code."""
    ap = argparse.ArgumentParser(description=f"run the scenarios of {module_name} alone")
    ap.add_argument("worker")
    ap.add_argument("ctl")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    known = {s[0]: s for s in scenarios}
    unknown = [n for n in a.names if n not in known]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    chosen = [(module_name, n, fn, q if a.quick else full)
              for n, fn, q, full in scenarios if not a.names or n in a.names]
    return run_scenarios(a.worker, a.ctl, a.quick, chosen)


# ---- soak ---------------------------------------------------------------------------------

# A series is flat when the max of its last third <= the max of its first third x FLAT_RATIO
# + its slack (noise that is not a trend: a few pages, a few fds, one WAL checkpoint).
FLAT_RATIO = 1.2
SLACK = {"rss_mib": 4.0, "fds": 8, "wal_kib": 512, "db_b_per_job": 2048, "outbox": 20}
# The WAL file is not truncated by SQLite's own (passive) auto-checkpoint, only by bw's
# TRUNCATE checkpoint, which gives up while a reader needs the WAL: under a steady load it
# grows to about wal_autocheckpoint (1000 pages) and is then rewritten from its start (and
# cut back to the ledger's journal_size_limit, 4 MiB, should a reader have made it grow). So
# its series is judged against that ceiling as well as by the rule: bounded when its max <=
# 1000 pages x the page size + the slack.
WAL_PAGES = 1000
SOAK_KNOBS = [None, None, None, {"fail_disk": 2000}, {"progress_garbage": "not_json",
              "progress_garbage_n": 2}, {"slow_bytes_per_s": 2 * MiB},
              {"progress_garbage": "wrong_types", "progress_garbage_n": 1}, {"complete_early": True}]


def flat(series, slack):
    """(flat?, first third's max, last third's max) of a list of numbers."""
    if len(series) < 3:
        return True, max(series or [0]), max(series or [0])
    k = len(series) // 3
    first, last = max(series[:k]), max(series[-k:])
    return last <= first * FLAT_RATIO + slack, first, last


def page_size(host):
    try:
        c = sqlite3.connect(f"file:{os.path.join(host.state, 'ledger.db')}?mode=ro", uri=True)
        n = c.execute("PRAGMA page_size").fetchone()[0]
        c.close()
        return n
    except sqlite3.Error:
        return 4096


def ledger_figures(host):
    db = os.path.join(host.state, "ledger.db")
    size = lambda p: os.path.getsize(p) if os.path.exists(p) else 0  # noqa: E731
    backlog = jobs = 0
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        backlog = c.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]
        jobs = c.execute("SELECT count(*) FROM jobs").fetchone()[0]
        c.close()
    except sqlite3.Error:
        pass
    return size(db), size(db + "-wal"), backlog, jobs


def soak(worker, ctl, minutes, seed=None):
    """Jobs every ~2.5 s through two workers for `minutes`, with random faults; prints the
    per-minute table, the flatness verdict and the loss table; returns the exit code."""
    seed = seed if seed is not None else int(time.time())
    rnd = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="bw-chaos-soak-")
    ctx = Ctx(worker, ctl, False, tmp, *OWN_RANGE, "soak")
    ctx.log(f"{minutes} minute(s), seed {seed}")
    rig = None
    res = result(trials=1)
    code = 1
    try:
        rig = Rig(ctx, "soak", [{"workers": 2, "max_jobs": 8, "ports": 100}],
                  conf={"worker.recovery_interval_s": 2})
        fl, h = rig.fleet, rig.host()
        fl.make_vms(12, seed=seed, min_disks=1, max_disks=3, min_mib=2, max_mib=4)
        rig.start_all()
        wait_consumers(rig.broker.url, "backup.start", 2)
        faults = []
        t0 = time.time()
        end = t0 + minutes * 60
        next_job, next_fault, minute = t0, t0 + rnd.uniform(20, 40), 1
        i = 0
        rows = []
        print("| minute | jobs published | jobs done | " + " | ".join(
            f"{w} RSS MiB | {w} fds" for w in h.worker_ids())
              + " | ledger db KiB | wal KiB | db B/job | outbox backlog | faults |", flush=True)
        print("|" + "---|" * (8 + 2 * len(h.worker_ids())), flush=True)
        while time.time() < end or minute <= minutes:
            now = time.time()
            if now >= next_job and now < end:
                knobs = rnd.choice(SOAK_KNOBS)
                rig.publish(i, knobs)
                i += 1
                next_job += rnd.uniform(2.0, 3.0)
            if now >= next_fault and now < end - 10:
                faults.append(soak_fault(rig, rnd))
                next_fault = now + rnd.uniform(25, 50)
            for wid in h.worker_ids():  # a worker that died on its own: recorded, restarted
                p = h.workers.get(wid)
                if p is not None and p.poll() is not None:
                    res["failures"].append(f"{wid} died on its own (exit {p.returncode}) at "
                                           f"{now - t0:.0f} s")
                    rig.saw_death(h, wid, f"exit {p.returncode}")
                    rig.start(h, wid)
            if now >= t0 + minute * 60:
                db, wal, backlog, njobs = ledger_figures(h)
                done = len(fl.terminal())
                fig = {"minute": minute, "published": i, "done": done, "db": db, "wal": wal,
                       "backlog": backlog, "db_b_per_job": db / max(njobs, 1),
                       "rss": {}, "fds": {}, "faults": len(faults)}
                cells = []
                for wid in h.worker_ids():
                    pid = h.workers[wid].pid
                    fig["rss"][wid] = proc_rss_kib(pid) / 1024
                    fig["fds"][wid] = proc_fds(pid)
                    cells.append(f"{fig['rss'][wid]:.1f} | {fig['fds'][wid]}")
                rows.append(fig)
                print(f"| {minute} | {i} | {done} | " + " | ".join(cells)
                      + f" | {db / 1024:.0f} | {wal / 1024:.0f} | {fig['db_b_per_job']:.0f} | "
                      f"{backlog} | {', '.join(faults[-3:]) if faults else '-'} |", flush=True)
                minute += 1
            time.sleep(0.1)
        verdicts = []
        for wid in h.worker_ids():
            verdicts.append((f"{wid} RSS MiB", [r["rss"][wid] for r in rows], SLACK["rss_mib"]))
            verdicts.append((f"{wid} fds", [r["fds"][wid] for r in rows], SLACK["fds"]))
        wal_series = [r["wal"] / 1024 for r in rows]
        verdicts.append(("ledger db bytes per job row", [r["db_b_per_job"] for r in rows],
                         SLACK["db_b_per_job"]))
        verdicts.append(("outbox backlog", [r["backlog"] for r in rows], SLACK["outbox"]))
        print(f"flat: max of the last third <= max of the first third x {FLAT_RATIO} + slack "
              f"(RSS {SLACK['rss_mib']} MiB, fds {SLACK['fds']}, WAL {SLACK['wal_kib']} KiB, "
              f"db {SLACK['db_b_per_job']} B/job, outbox {SLACK['outbox']}); a worker killed "
              "and restarted starts its series over, which can only lower a last third")
        all_flat = True
        for name, series, slack in verdicts:
            ok, first, last = flat(series, slack)
            all_flat &= ok
            print(f"  {name:28} first third max {first:10.1f}  last third max {last:10.1f}  "
                  f"{'flat' if ok else 'NOT FLAT'}")
        ok, first, last = flat(wal_series, SLACK["wal_kib"])
        ceiling = WAL_PAGES * page_size(h) / 1024 + SLACK["wal_kib"]
        bounded = max(wal_series or [0]) <= ceiling
        all_flat &= ok or bounded
        print(f"  {'ledger WAL KiB':28} first third max {first:10.1f}  last third max {last:10.1f}  "
              f"{'flat' if ok else 'not flat by the rule'}; max {max(wal_series or [0]):.0f} "
              f"<= {ceiling:.0f} (wal_autocheckpoint ceiling + slack): "
              f"{'bounded' if bounded else 'NOT BOUNDED'}")
        print(f"faults ({len(faults)}): {'; '.join(faults)}")
        ctx.log("stream over; waiting for the last jobs")
        res["trials"] = len(faults)
        rig.finish(res, timeout=180)
        print(table([("soak", res, time.time() - t0)]))
        for n in res["notes"]:
            print(f"  soak: note: {n}")
        for f in res["failures"]:
            print(f"  soak: FAIL: {f}")
        code = 0 if all_flat and not failed(res) else 1
        print(f"soak: {'flat and no loss' if code == 0 else 'FAILED'} (seed {seed})", flush=True)
    except Exception:  # noqa: BLE001
        print("soak: raised: " + traceback.format_exc()[-1500:], flush=True)
        code = 1
    finally:
        if rig is not None:
            rig.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return code


def busy_workers(rig):
    """Worker ids of host 0 that hold a job now (accepted by them, no terminal event yet)."""
    owner, done = {}, set()
    for e in rig.fleet.collector.events():
        if e.get("event") in checker.TERMINALS:
            done.add(e.get("job_id"))
        elif e.get("host") == rig.host().name:
            owner[e.get("job_id")] = e.get("worker_id")
    return sorted({w for j, w in owner.items() if j not in done})


def soak_fault(rig, rnd):
    """One random fault of the soak's list; returns what it did (a short text)."""
    h = rig.host()
    kind = rnd.choice(["kill", "kill", "close_connections", "broker_restart"])
    at = time.strftime("%H:%M:%S")
    if kind == "kill":
        time.sleep(rnd.uniform(0, 2))
        busy = busy_workers(rig)
        wid = rnd.choice(busy or h.worker_ids())
        rig.kill(h, wid)
        rig.start(h, wid)
        return f"{at} kill -9 {wid}"
    if kind == "close_connections":
        rc, _ = rig.broker.ctl("close_all_connections", "chaos soak")
        return f"{at} close_all_connections (exit {rc})"
    r1 = rig.broker.stop()
    time.sleep(rnd.uniform(1, 5))
    r2 = rig.broker.start()
    # the observer's connections reconnect by themselves (collector) or on the next publish
    rig.fleet.publisher.close()
    return f"{at} broker stop/start (exit {r1}/{r2})"


def main():
    ap = argparse.ArgumentParser(description="bw's chaos suite (tests/chaos/README.md)")
    ap.add_argument("--quick", action="store_true", help="the CI form: fewer trials")
    ap.add_argument("--soak", type=float, metavar="MINUTES", help="a soak of MINUTES instead")
    ap.add_argument("--only", default="", help="NAME[,NAME]: these scenarios alone")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--seed", type=int, help="the soak's random seed")
    ap.add_argument("worker")
    ap.add_argument("ctl")
    a = ap.parse_args()
    if a.soak is not None:
        if a.soak <= 0:
            print("chaos: --soak wants a positive number of minutes", file=sys.stderr)
            return 2
        return soak(a.worker, a.ctl, a.soak, a.seed)
    every = []
    for module, mod in discover():
        for name, fn, q, full in getattr(mod, "SCENARIOS", []):
            every.append((module, name, fn, q if a.quick else full))
    if a.list:
        for module, name, _, n in every:
            print(f"{name:32} {module} ({n} trial(s){' in --quick' if a.quick else ''})")
        return 0
    only = [n for n in a.only.split(",") if n]
    unknown = [n for n in only if n not in {e[1] for e in every}]
    if unknown:
        print(f"chaos: unknown scenario(s) {unknown}; --list shows them", file=sys.stderr)
        return 2
    # a scenario with no trials in this mode (a quick-only mix, or a full-only one) is left out
    chosen = [e for e in every if (not only or e[1] in only) and (e[3] > 0 or e[1] in only)]
    return run_scenarios(a.worker, a.ctl, a.quick, chosen)


if __name__ == "__main__":
    sys.exit(main())
