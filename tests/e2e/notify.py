#!/usr/bin/python3
"""notify.py: the worker speaks sd_notify as a Type=notify unit wants (deploy/bw-worker@.service):
the real bw-worker under a real broker (tests/with-broker) and the SNA simulator, with
NOTIFY_SOCKET naming a unix datagram socket this test listens on, as systemd's does, and
WATCHDOG_USEC set. Usage: notify.py BW_WORKER BW_CTL

Wants: READY=1 only once both broker links are up (with STATUS= saying so); WATCHDOG=1 every
half interval (WATCHDOG_USEC=1 s: about every 500 ms, never a gap over 1.2 s); STATUS= following
the running jobs ("1 job(s) running" while a slowed copy runs, "0 job(s)" after), never two
STATUS= within BW_NOTIFY_STATUS_MIN_MS (1 s); STOPPING=1 on SIGTERM, then exit 0. A second
worker whose WATCHDOG_PID names another process sends no WATCHDOG=1 (sd_watchdog_enabled's
rule), and still READY=1. Under systemd (INVOCATION_ID) with no system bus, moving each qemu-nbd
to bw-nbd.service fails: one warning for the job, and the job completes all the same.
"""
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, vm_message  # noqa: E402
e2e.PORT_MIN, e2e.PORT_MAX = 22520, 22531  # NBD ports of this suite alone: suites run side by side

VM = "/DC/vm/notify"
JOB = "notify-1"
SIZES = {2000: 8 * MiB, 2001: 4 * MiB}


class Listener(threading.Thread):
    """A unix datagram socket like systemd's notify socket; records (time, fields) per datagram."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got, self.stop_ev = [], threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(l.split("=", 1) for l in data.decode().split("\n") if "=" in l)
            self.got.append((time.time(), fields))

    def wait(self, pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            for t, f in list(self.got):
                if pred(f):
                    return t, f
            time.sleep(0.05)
        return None

    def close(self):
        self.stop_ev.set()
        self.join(2)
        self.sock.close()


def worker_env(sock, **extra):
    env = dict(os.environ, NOTIFY_SOCKET=sock, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    env.update(extra)
    return env


def case_notify(env, failures):
    lis = Listener(os.path.join(env.tmp, "notify.sock"))
    lis.start()
    try:
        run(env, lis, failures)
    finally:
        lis.close()


def run(env, lis, failures):
    env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 7, "disks": {str(k): {"size": s} for k, s in SIZES.items()}})
    env.sim_post(f"/_sim/faults?job={JOB}", {"slow_bytes_per_s": 2 * MiB})  # a ~4 s copy
    # as under systemd (INVOCATION_ID) but with no system bus: the job's qemu-nbd cannot be moved
    # to bw-nbd.service; a warning, and the job goes on
    w = env.start_worker("w1", env=worker_env(lis.path, INVOCATION_ID="0123456789abcdef0123456789abcdef",
                                              DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={env.tmp}/no-bus"))
    ready = lis.wait(lambda f: "READY" in f, 60)
    if ready is None:
        failures.append(f"no READY=1 within 60 s; got {[f for _, f in lis.got]}")
        return
    t_ready, f_ready = ready
    if f_ready.get("READY") != "1" or "broker up" not in f_ready.get("STATUS", ""):
        failures.append(f"READY datagram: {f_ready} (want READY=1 and STATUS ... broker up)")
    if sum("READY" in f for _, f in lis.got) != 1:
        failures.append("READY=1 sent more than once")

    # the watchdog: every ~500 ms
    time.sleep(3.2)
    pings = [t for t, f in lis.got if f.get("WATCHDOG") == "1" and t_ready <= t <= t_ready + 3.2]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    if len(pings) < 5 or max(gaps, default=9) > 1.2:
        failures.append(f"WATCHDOG=1: {len(pings)} in 3.2 s, gaps {[round(g, 2) for g in gaps]} "
                        f"(want every ~0.5 s)")

    # a job: STATUS follows it
    env.wait_queue()
    env.publish(vm_message(JOB, VM, [{"key": k, "size_bytes": s} for k, s in SIZES.items()]))
    if lis.wait(lambda f: f.get("STATUS", "").startswith("1 job(s) running"), 30) is None:
        failures.append(f"no STATUS=1 job(s) running; statuses {[f.get('STATUS') for _, f in lis.got if 'STATUS' in f]}")
    got = env.wait_terminal(JOB, timeout=120)
    if got != "completed":
        failures.append(f"{JOB}: {got}")
    if lis.wait(lambda f: f.get("STATUS", "").startswith("0 job(s) running") and "READY" not in f, 10) is None:
        failures.append("no STATUS=0 job(s) running after the job")
    with open(os.path.join(env.tmp, "w1.log"), errors="replace") as fh:
        stays = [l for l in fh if f"job={JOB} its {len(SIZES)} qemu-nbd stay in the worker's unit" in l
                 and "system bus" in l]
    if len(stays) != 1:
        failures.append(f"{len(stays)} 'qemu-nbd stay in the worker's unit' warnings (want 1 for the "
                        "job: no bus to move its servers out)")

    # SIGTERM: STOPPING=1, exit 0
    t_term = time.time()
    w.send_signal(signal.SIGTERM)
    code = w.wait(60)
    del env.workers["w1"]
    stop = lis.wait(lambda f: f.get("STOPPING") == "1", 5)
    if stop is None or stop[0] < t_term:
        failures.append("no STOPPING=1 after SIGTERM")
    elif not stop[1].get("STATUS", "").startswith("stopping:"):
        failures.append(f"STOPPING datagram: {stop[1]}")
    if code != 0:
        failures.append(f"worker exited {code} on SIGTERM")

    # STATUS= rate limit: plain STATUS datagrams at least ~1 s apart
    st = [t for t, f in lis.got if "STATUS" in f and "READY" not in f and "STOPPING" not in f]
    close = [round(b - a, 3) for a, b in zip(st, st[1:]) if b - a < 0.9]
    if close:
        failures.append(f"STATUS= sent twice within 1 s: gaps {close}")

    # WATCHDOG_PID names another process: no pings for this one (but READY all the same)
    n = len(lis.got)
    w2 = env.start_worker("w2", env=worker_env(lis.path, WATCHDOG_PID=str(os.getpid())))
    end = time.time() + 60
    while time.time() < end and not any("READY" in f for _, f in lis.got[n:]):
        time.sleep(0.05)
    if not any("READY" in f for _, f in lis.got[n:]):
        failures.append("w2: no READY=1")
    time.sleep(2)
    if any("WATCHDOG" in f for _, f in lis.got[n:]):
        failures.append("w2 pinged the watchdog although WATCHDOG_PID names another process")
    w2.send_signal(signal.SIGTERM)
    w2.wait(60)
    del env.workers["w2"]


if __name__ == "__main__":
    sys.exit(e2e.suite_main(e2e.Env, {"notify": case_notify}, 40, ["w1.log", "w2.log"], workers=()))
