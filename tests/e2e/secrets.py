#!/usr/bin/python3
"""secrets.py: no secret leaks out of a worker (CONTRACT.md §3.1, §5, §6; STYLE "secrets never
reach a log line"). Real broker (tests/with-broker), real qemu-nbd, the SNA simulator with
--test-reveal-secrets. Usage: secrets.py BW_WORKER BW_CTL

One job with nbd.tls = psk (exports over TLS with a per-job key), a distinctive vCenter
password in the credential file and a distinctive sna.token given through sna.token_file
(0600). The copy is slowed (slow_bytes_per_s) and, while it runs, the argv and environ of the
worker and of every descendant (qemu-nbd, qemu-img) are sampled every 50 ms; the PSK is taken
from the start request the simulator received (/_sim/requests?reveal=1). After the job the
three secrets (the PSK as hex in any case, and as raw bytes) are searched in: those argv and
environ, the worker's log, every event, the ledger (sqlite3 .dump and the raw db/wal/shm
bytes), every file under the worker's state dir, and the simulator's log. 0 hits expected.

Dumpable: the worker runs as an unprivileged user (nobody) when the test runs as root, because
the only outside observable of PR_SET_DUMPABLE 0 is that the kernel makes /proc/PID/environ
(and the other ptrace-protected files) owned by root:root instead of the process's user
(proc(5), "/proc/pid/"); for a root worker both owners are root, so nothing can be told.
"""
import json
import os
import pwd
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, check_events, leftovers, vm_message  # noqa: E402
e2e.PORT_MIN, e2e.PORT_MAX = 22560, 22571  # NBD ports of this suite alone: suites run side by side

VM = "/DC/vm/secrets"
SIZES = {2000: 16 * MiB, 2001: 8 * MiB}
RATE = 4 * MiB  # slow_bytes_per_s: a ~4 s transfer to sample
JOB = "sec-1"


def proc_read(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read()
    except OSError:
        return None


def children_of(root):
    """root and every descendant, from /proc/*/stat (ppid is field 4, after the ")" of comm)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_read(d, "stat")
            if st:
                parent[int(d)] = int(st[st.rindex(b")") + 2:].split()[1])
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


class Sampler(threading.Thread):
    """Every 50 ms: argv and environ of the worker and its descendants, by (pid, comm)."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root = root
        self.seen = {}  # (pid, comm) -> {"cmdline": bytes, "environ": bytes}
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            for pid in children_of(self.root):
                comm = proc_read(pid, "comm")
                if comm is None:  # gone already
                    continue
                comm = comm.strip().decode(errors="replace")
                rec = self.seen.setdefault((pid, comm), {"cmdline": b"", "environ": b""})
                for f in ("cmdline", "environ"):
                    v = proc_read(pid, f)
                    if v and v not in rec[f]:
                        rec[f] += v + b"\n"
            self.stop_ev.wait(0.05)


def hits(data, needles):
    """The names of the needles found in data (bytes), case-insensitively for text."""
    low = data.lower()
    return [name for name, n in needles.items() if (n.lower() in low if isinstance(n, bytes) else False)]


class Env(e2e.Env):
    def __init__(self, worker, ctl):
        self.password = "bwPW-" + os.urandom(10).hex()
        self.token = "bwTOK-" + os.urandom(10).hex()
        self.make_dirs(worker, ctl, "bw-e2e-sec-", self.password)
        os.chmod(self.tmp, 0o755)
        self.token_file = os.path.join(self.tmp, "sna.token")
        with open(self.token_file, "w") as f:
            f.write(self.token + "\n")
        os.chmod(self.token_file, 0o600)
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("nobody")
            for d, dirs, files in os.walk(self.tmp):
                for x in [d] + [os.path.join(d, y) for y in dirs + files]:
                    os.chown(x, self.user.pw_uid, self.user.pw_gid)
        self.sim_port = e2e.free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.spawn_sim("--test-reveal-secrets")
        self.connect()

    def config(self, wid, extra=""):
        return super().config(wid, extra) if wid == "ctl" else self.worker_config(wid)

    def worker_config(self, wid):
        path = super().config(wid)
        with open(path) as f:
            text = f.read()
        text = text.replace("[nbd]\n", "[nbd]\ntls = psk\n", 1)
        text = text.replace("[sna]\n", f"[sna]\ntoken_file = {self.token_file}\n", 1)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_worker(self, wid, extra=""):
        cfg = self.worker_config(wid)
        log = open(os.path.join(self.tmp, f"{wid}.log"), "a")
        cmd = [self.worker, "--config", cfg]
        if self.user is not None:
            os.chown(cfg, self.user.pw_uid, self.user.pw_gid)
            cmd = ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups",
                   "--"] + cmd
        self.workers[wid] = subprocess.Popen(cmd, stdout=log, stderr=log, env={
            k: v for k, v in os.environ.items() if k.startswith(("PATH", "LANG", "LC_"))})
        return self.workers[wid]

    def revealed_start(self):
        for r in self.sim_get("/_sim/requests?reveal=1")["requests"]:
            if r["path"].endswith("/backup/start") and (r.get("body") or {}).get("job_id") == JOB:
                return r
        return None


def run(env, failures, notes):
    env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 4, "disks": {str(k): {"size": s} for k, s in SIZES.items()}})
    env.sim_post(f"/_sim/faults?job={JOB}", {"slow_bytes_per_s": RATE})
    worker = env.start_worker("w1")
    sampler = Sampler(worker.pid)
    sampler.start()
    env.wait_queue()
    env.publish(vm_message(JOB, VM, [{"key": k, "size_bytes": s} for k, s in SIZES.items()]))

    # while the copy runs: the key, the dumpable flag, files holding the key
    psk, start, during = None, None, []
    dumpable = None
    end = time.time() + 60
    while time.time() < end:
        env.drain_events(0.1)
        if any(e["event"] in ("backup.completed", "backup.failed") for e in env.job_events(JOB)):
            break
        jobs = [j for j in env.sim_get("/_sim/jobs")["jobs"] if j["job_id"] == JOB]
        if jobs and jobs[0]["status"] == "running":
            start = env.revealed_start()
            tls = (start or {}).get("body", {}).get("nbd_tls")
            psk = tls.get("psk") if isinstance(tls, dict) else None
            st = os.stat(f"/proc/{worker.pid}/environ")
            dumpable = st.st_uid != 0 if env.user is not None else None
            if psk:
                for d, _, files in os.walk(env.state):
                    for f in files:
                        p = os.path.join(d, f)
                        try:
                            with open(p, "rb") as fh:
                                if psk.lower().encode() in fh.read().lower():
                                    during.append((p, os.stat(p).st_mode & 0o777, os.stat(d).st_mode & 0o777))
                        except OSError:
                            pass
            break
        time.sleep(0.1)
    got = env.wait_terminal(JOB, timeout=120, cleanup=False)
    time.sleep(0.5)
    sampler.stop_ev.set()
    sampler.join(5)
    codes = env.stop_workers()
    if codes.get("w1") != 0:
        failures.append(f"the worker exited {codes.get('w1')} on SIGTERM")
    if got != "completed":
        f = [e for e in env.job_events(JOB) if e["event"] == "backup.failed"]
        failures.append(f"job {got}: " + (f"{f[0]['reason']}: {f[0]['message']}" if f else ""))
    check_events(env, JOB, failures)

    # what the SNA received: the secrets really were in play
    start = env.revealed_start() or start
    body = (start or {}).get("body") or {}
    if body.get("vcenter_password") != env.password:
        failures.append("the SNA did not receive the credential's password")
    auth = ((start or {}).get("headers") or {}).get("Authorization")
    if auth != f"Bearer {env.token}":
        failures.append(f"the SNA did not receive the token of sna.token_file (Authorization {auth!r})")
    tls = body.get("nbd_tls")
    psk = tls.get("psk") if isinstance(tls, dict) else None
    if not psk:
        failures.append("the start request has no nbd_tls.psk (nbd.tls = psk not honoured)")
    urls = [d.get("nbd_url", "") for d in body.get("disks", [])]
    if not urls or not all(u.startswith("nbds://") for u in urls):
        failures.append(f"the NBD URLs are not nbds:// ({urls[:1]})")
    if dumpable is None:
        notes.append("dumpable: not checked (the test does not run as root, so the worker runs as the test's user)")
    elif dumpable:
        failures.append("the worker is dumpable (/proc/PID/environ owned by its user, not root:root)")
    for p, mode, dmode in during:
        notes.append(f"during the job the key was in {os.path.relpath(p, env.state)} (mode {oct(mode)}, dir {oct(dmode)})")
        if mode & 0o077 or dmode & 0o077:
            failures.append(f"{p}: holds the key with mode {oct(mode)} in a dir of mode {oct(dmode)}")

    needles = {"vCenter password": env.password.encode(), "SNA token": env.token.encode()}
    if psk:
        needles["NBD PSK (hex)"] = psk.encode()
        needles["NBD PSK (bytes)"] = bytes.fromhex(psk)

    # controls: the search finds a secret where it must be, the dumpable observable works here
    with open(os.path.join(env.creds, "vcenter-main.json"), "rb") as fh:
        if hits(fh.read(), needles) != ["vCenter password"]:
            failures.append("control: the search does not find the password in the credential file")
    if env.user is not None:
        for flag in (1, 0):
            p = subprocess.Popen(["setpriv", f"--reuid={env.user.pw_uid}", f"--regid={env.user.pw_gid}",
                                  "--clear-groups", "--", "/usr/bin/python3", "-c",
                                  f"import ctypes,sys; ctypes.CDLL(None).prctl(4, {flag}, 0, 0, 0); "
                                  "print(1, flush=True); sys.stdin.read()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            p.stdout.readline()
            owner = os.stat(f"/proc/{p.pid}/environ").st_uid
            p.stdin.close()
            p.wait(10)
            if (owner != 0) != bool(flag):
                failures.append(f"control: a process with PR_SET_DUMPABLE {flag} has /proc/PID/environ owned by {owner}")

    def search(where, data):
        for name in hits(data, needles):
            failures.append(f"{name} found in {where}")

    procs = sorted({comm for (_, comm) in sampler.seen})
    notes.append(f"sampled {len(sampler.seen)} process(es): {', '.join(procs)}")
    if not any(c.startswith("qemu-nbd") for c in procs):
        failures.append("no qemu-nbd was sampled: the argv/environ check saw only the worker")
    for (pid, comm), rec in sampler.seen.items():
        search(f"argv of {comm} (pid {pid})", rec["cmdline"])
        search(f"environ of {comm} (pid {pid})", rec["environ"])
    with open(os.path.join(env.tmp, "w1.log"), "rb") as fh:
        search("the worker's log", fh.read())
    with open(os.path.join(env.tmp, "sim.log"), "rb") as fh:
        search("the simulator's log", fh.read())
    search("the events", json.dumps(env.events, ensure_ascii=False).encode())
    ledger = os.path.join(env.state, "ledger.db")
    try:
        dump = "\n".join(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True).iterdump())
        search("the ledger (sqlite3 dump)", dump.encode())
    except sqlite3.Error as e:
        failures.append(f"ledger: {e}")
    nfiles = 0
    for d, _, files in os.walk(env.state):
        for f in files:
            p = os.path.join(d, f)
            nfiles += 1
            try:
                with open(p, "rb") as fh:
                    search(f"state dir file {os.path.relpath(p, env.state)}", fh.read())
            except OSError as e:
                failures.append(f"{p}: {e}")
    notes.append(f"searched {nfiles} file(s) under the state dir, {len(env.events)} event(s)")
    failures += leftovers(env)


def main():
    worker, ctl = sys.argv[1], sys.argv[2]
    env = Env(worker, ctl)
    failures, notes = [], []
    t0 = time.time()
    try:
        run(env, failures, notes)
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        env.stop_workers()
        for n in notes:
            print(f"note: {n}")
        print(f"{'FAIL' if failures else 'ok  '} secrets ({time.time() - t0:.1f} s)")
        for f in failures:
            print(f"     {f}")
        e2e.finish(env, bool(failures), 15, ["w1.log"])
    return e2e.summary({"secrets": not failures})


if __name__ == "__main__":
    sys.exit(main())
