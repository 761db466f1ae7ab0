#!/usr/bin/python3
"""io_env.py: the shared pieces of the chaos suite's SNA, disk and broker scenarios
(scn_sna.py, scn_disk.py, scn_broker.py): a private broker, a rig of simulated hosts built
from tests/fleet/fleet.py (workers, the SNA simulator, the observer), the loss count of
tests/fleet/checker.py, the leak count, and a stand-alone runner so that each scenario module
runs without the driver (tests/chaos/chaos.py).

Not a script: imported. Every process it starts (broker, simulator, workers, proxies) is
stopped by PID by the object that started it; nothing outside 127.0.0.0/8."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "fleet"))
import checker  # noqa: E402
from private_broker import Broker  # noqa: E402,F401  (scenarios use io_env.Broker)
# the fleet's workers listen for /metrics at 24800+ (ctest fleet) and 24900+ (fleet_cluster),
# on the same loopback addresses: chaos's own base, so that ctest -j2 can run them side by side
os.environ.setdefault("BW_FLEET_METRICS_BASE", "26600")
import fleet  # noqa: E402

MiB = 1 << 20
PUBLISHER_IDLE_S = 3   # under the observer's 5 s heartbeat
RESULT_KEYS = ("trials", "jobs", "lost", "dup_starts", "contradicting", "recovered", "leaked_ports",
               "leaked_children", "leaked_files")
LOSS_KEYS = ("lost", "dup_starts", "contradicting", "leaked_ports", "leaked_children", "leaked_files")


def new_result(trials=0):
    r = {k: 0 for k in RESULT_KEYS}
    r.update(trials=trials, notes=[], failures=[])
    return r


def add(total, part):
    """Adds result part into total (counts summed, lists joined)."""
    for k in RESULT_KEYS:
        if k != "trials":
            total[k] += part.get(k, 0)
    total["notes"] += part.get("notes", [])
    total["failures"] += part.get("failures", [])
    return total


# ---- a rig: simulated hosts, one simulator, the observer -------------------------------

class Rig(fleet.Fleet):
    """fleet.Fleet with its files under base (a scenario's ctx.tmp), the hosts' NBD ports from
    the scenario's range, and an optional SNA url the workers use instead of the simulator's
    (a proxy in front of it)."""

    def __init__(self, ctx, broker, tag, sim_args=()):
        self.worker, self.ctl, self.broker = ctx.worker, ctx.ctl, broker
        self.ctx = ctx
        self.tag = tag
        self.tmp = os.path.join(ctx.tmp, "rig-" + tag)
        os.makedirs(self.tmp)
        self.hub = fleet.ProxyHub()
        self.sim_state = os.path.join(self.tmp, "sim")
        self.sim = fleet.Sim(self.sim_state, os.path.join(self.tmp, "sim.log"))
        self.hosts = []
        self.collector = fleet.Collector(broker.urls, fleet.EVENTS_QUEUE_PREFIX + tag)
        self.publisher = fleet.Publisher(broker.urls)
        self.published, self.indeterminate = [], []
        self.unsent = []
        self.publish_times = {}
        self.vms = []
        self.next_port = ctx.nbd_lo

    def add_host(self, ports=24, **kw):
        """A host with ports NBD ports of the scenario's range (its own, disjoint)."""
        h = fleet.Host(self, len(self.hosts), **kw)
        h.port_min, h.port_max = self.next_port, self.next_port + ports - 1
        if h.port_max > self.ctx.nbd_hi:
            raise RuntimeError(f"NBD ports {h.port_min}-{h.port_max} beyond the range's {self.ctx.nbd_hi}")
        self.next_port += ports
        self.hosts.append(h)
        return h

    def vm(self, name, disks, seed=1):
        """A VM in the simulator: disks {key: size}; returns its path and backup.start disks."""
        path = f"/DC/vm/{self.tag}-{name}"
        self.sim.post("/_sim/vm", {"vm_path": path, "seed": seed,
                                   "disks": {str(k): {"size": s} for k, s in disks.items()}})
        return path, [{"key": k, "size_bytes": s} for k, s in disks.items()]

    def msg(self, name, vm, repository="repo-001", **extra):
        path, disks = vm
        m = {"schema_version": 1, "job_id": f"{fleet.JOB_PREFIX}{self.tag}-{name}",
             "vm": {"name": f"vm {name}", "path": path}, "backup_type": "full",
             "repository_id": repository, "credential_id": "vcenter-main", "disks": disks}
        m.update(extra)
        return m

    def send(self, msg, job_faults=None):
        """Publishes msg (confirmed); a publish that could not even be sent is "unsent" (no
        broker answered: nothing went out), not an error. A publisher idle for a while gets a
        new connection first: pika's blocking connection answers no heartbeat while the test
        sleeps, so the broker may have closed it, and a publish on it would be unconfirmed."""
        now = time.time()
        if now - getattr(self, "last_send", now) > PUBLISHER_IDLE_S:
            self.publisher.close()
        self.last_send = now
        try:
            return self.publish(msg, job_faults)
        except RuntimeError:
            self.unsent.append(msg["job_id"])
            self.publisher.close()
            return "unsent"

    def events_of(self, jid):
        seen, out = set(), []
        for e in self.collector.events():
            if e.get("job_id") == jid and e.get("event_id") not in seen:
                seen.add(e.get("event_id"))
                out.append(e)
        return sorted(out, key=lambda e: e.get("seq", 0))

    def failed_event(self, jid):
        return next((e for e in self.events_of(jid) if e.get("event") == "backup.failed"), None)

    def wait_cleanup(self, job_ids, timeout):
        """Until every failed one of job_ids also has its backup.cleanup (or timeout)."""
        end = time.time() + timeout
        while time.time() < end:
            left = [j for j in job_ids if self.failed_event(j) is not None
                    and not any(e.get("event") == "backup.cleanup" for e in self.events_of(j))]
            if not left:
                return
            time.sleep(0.3)

    def finish(self, result, settle=2.0):
        """The end of a scenario: waits for the last events, stops every worker, counts losses
        (checker) and leaks into result, stops the simulator, proxies and collector. The hosts'
        directories are kept (ctx.tmp goes with the scenario)."""
        self.collector.drain(quiet=settle, timeout=30)
        hist = self.history()
        res = checker.check(hist)
        result["jobs"] += res.jobs
        result["lost"] += res.lost
        result["dup_starts"] += res.dup_starts
        result["contradicting"] += res.contradicting
        for line in res.details:
            col = line.split(":", 1)[0]
            if col in ("seq_gaps", "unexpected", "images_bad"):
                result["failures"].append(f"checker {line}")
            else:
                result["notes"].append(f"checker {line}")
        if self.unsent:
            result["notes"].append(f"{len(self.unsent)} publishes not sent (no broker answered)")
        if self.indeterminate:
            result["notes"].append(f"{len(self.indeterminate)} publishes without a confirm (indeterminate)")
        codes = {}
        for h in self.hosts:
            codes.update(h.stop(timeout=60))
        for wid, c in codes.items():
            if c not in (0, None):
                result["failures"].append(f"worker {wid} ended with {c} (want 0 after SIGTERM)")
        count_leaks(self, result)
        for h in self.hosts:
            sanitizer_lines(h, result)
            for p in h.proxies:
                try:
                    p.close()
                except Exception:  # noqa: BLE001
                    pass
        self.publisher.close()
        self.collector.close()
        self.sim.stop()
        self.hub.close()
        return res

    def abort(self):
        """Stops what finish() would have stopped, after an exception (idempotent)."""
        for h in self.hosts:
            try:
                h.stop(timeout=30)
            except Exception:  # noqa: BLE001
                pass
        kill_strays(self.tmp)
        for closer in (self.publisher.close, lambda: self.collector.close(delete=False), self.sim.stop,
                       self.hub.close):
            try:
                closer()
            except Exception:  # noqa: BLE001
                pass


def strays(path):
    """[(pid, cmdline)] of the processes whose command line names path (qemu-nbd of a host's
    repository, nbdcopy of the simulator's state, ...), this process excluded."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmd:
            out.append((int(pid), cmd.strip()))
    return out


def kill_strays(path):
    """SIGTERM, then SIGKILL, the processes strays(path) names; returns them."""
    found = strays(path)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in found:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if found and sig == signal.SIGTERM:
            time.sleep(1)
    return found


def count_leaks(rig, result):
    """After the workers stopped: reserved ports in each host's ledger, processes that name a
    host's directory, image files no backup.disk.completed names, TLS key files left."""
    kept = {e.get("qcow2_path") for e in rig.collector.events() if e.get("event") == "backup.disk.completed"}
    for h in rig.hosts:
        r = subprocess.run([rig.ctl, "--config", h.config(h.name + "-ctl"), "ports", "--json"],
                           capture_output=True, text=True)
        try:
            held = [p for p in json.loads(r.stdout or "[]") if p.get("state") == "reserved"]
        except ValueError:
            held = []
            result["failures"].append(f"{h.name}: bw-ctl ports --json said {r.stdout[:200]!r} {r.stderr[:200]!r}")
        if held:
            result["leaked_ports"] += len(held)
            result["failures"].append(f"{h.name}: ports still reserved: {held[:5]}")
        left = kill_strays(h.dir)
        if left:
            result["leaked_children"] += len(left)
            result["failures"].append(f"{h.name}: processes left after the workers stopped: "
                                      f"{[c[:160] for _, c in left[:3]]}")
        for repo in h.repos.values():
            for d, _, files in os.walk(repo):
                for f in files:
                    p = os.path.join(d, f)
                    if p not in kept:
                        result["leaked_files"] += 1
                        result["failures"].append(f"{h.name}: file left that no backup.disk.completed names: {p}")
        tls = os.path.join(h.state, "tls")
        if os.path.isdir(tls) and os.listdir(tls):
            result["leaked_files"] += len(os.listdir(tls))
            result["failures"].append(f"{h.name}: NBD TLS keys left: {os.listdir(tls)}")


def sanitizer_lines(h, result):
    for wid in h.workers:
        path = os.path.join(h.dir, f"{wid}.log")
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        for marker in (b"AddressSanitizer", b"LeakSanitizer", b"runtime error:"):
            if marker in data:
                result["failures"].append(f"{h.name}/{wid}: sanitizer report in its log ({marker.decode()})")
                break


# ---- checks shared by the scenarios -------------------------------------------------------

def expect(rig, jid, want, result, why):
    """want: "completed" or a set of failure reasons. A failure of the job's end as expected
    is one line in result["failures"]; returns what it ended as."""
    evs = rig.events_of(jid)
    names = [e.get("event") for e in evs]
    failed = rig.failed_event(jid)
    if "backup.completed" in names:
        got = "completed"
    elif failed is not None:
        got = failed.get("reason")
    else:
        got = None
    if got is None:
        return None  # the checker counts it lost (or indeterminate)
    if want == "completed":
        if got != "completed":
            result["failures"].append(f"{jid}: failed {got} ({str(failed.get('message'))[:160]!r}); want "
                                      f"completed: {why}")
    elif got not in want:
        result["failures"].append(f"{jid}: ended {got}; want {' or '.join(sorted(want))}: {why}")
    if got != "completed" and "backup.cleanup" not in names:
        result["failures"].append(f"{jid}: backup.failed ({got}) without its backup.cleanup")
    return got


def cleanup_actions(rig, jid):
    c = next((e for e in rig.events_of(jid) if e.get("event") == "backup.cleanup"), None)
    return (c or {}).get("actions", []), (c or {}).get("pending", [])


# ---- stand-alone runner -------------------------------------------------------------------

class Ctx:
    def __init__(self, root, worker, ctl, tmp, quick, nbd_lo, nbd_hi):
        self.root, self.worker, self.ctl, self.tmp = root, worker, ctl, tmp
        self.quick, self.nbd_lo, self.nbd_hi = quick, nbd_lo, nbd_hi

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


NBD_LO, NBD_HI = 26400, 26599  # this suite's NBD ports when a module runs alone
TABLE = ("scenario", "trials", "jobs", "lost", "duplicated starts", "contradicting terminals",
         "recovered", "leaked ports", "leaked children", "leaked files", "seconds")


def standalone(scenarios, argv):
    """`MODULE BW_WORKER BW_CTL [--quick] [NAME...]`: runs the module's scenarios (all, or the
    named ones) as chaos.py would, prints the table; exit 1 on any loss, leak or failure."""
    args = [a for a in argv[1:] if a != "--quick"]
    if len(args) < 2:
        print(f"usage: {argv[0]} BW_WORKER BW_CTL [--quick] [NAME...]", file=sys.stderr)
        return 2
    quick = "--quick" in argv
    worker, ctl = os.path.abspath(args[0]), os.path.abspath(args[1])
    names = args[2:] or [s[0] for s in scenarios]
    unknown = set(names) - {s[0] for s in scenarios}
    if unknown:
        print(f"unknown scenario(s): {sorted(unknown)}", file=sys.stderr)
        return 2
    rows, bad = [], False
    t_all = time.time()
    for name, fn, q, full in scenarios:
        if name not in names:
            continue
        tmp = tempfile.mkdtemp(prefix=f"bw-chaos-{name}-")
        ctx = Ctx(ROOT, worker, ctl, tmp, quick, NBD_LO, NBD_HI)
        t0 = time.time()
        ctx.log(f"{name}: {q if quick else full} trial(s)")
        try:
            r = fn(ctx, q if quick else full)
        except Exception:  # noqa: BLE001 - a scenario that raised is a failure of the run
            r = new_result()
            r["failures"].append("raised: " + traceback.format_exc()[-1500:])
        finally:
            kill_strays(tmp)
            if os.environ.get("BW_CHAOS_KEEP"):
                ctx.log(f"{name}: kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        secs = time.time() - t0
        rows.append((name, r, secs))
        if r["failures"] or any(r[k] for k in LOSS_KEYS):
            bad = True
        for n in r["notes"]:
            ctx.log(f"{name}: note: {n}")
        for f in r["failures"]:
            ctx.log(f"{name}: FAILURE: {f}")
    print("| " + " | ".join(TABLE) + " |")
    print("|" + "---|" * len(TABLE))
    for name, r, secs in rows:
        print("| " + " | ".join([name] + [str(r[k]) for k in RESULT_KEYS] + [f"{secs:.0f}"]) + " |")
    print(f"total {time.time() - t_all:.0f} s, {'FAILED' if bad else 'ok'}", flush=True)
    return 1 if bad else 0
