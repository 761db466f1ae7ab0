#!/usr/bin/python3
"""failover.py: amqp.url with two nodes (CONTRACT §1, §6): a real bw-worker moves between two
independent private brokers (tests/with-broker's, and one this test starts; not a cluster:
the worker only needs two nodes to move between).
Usage: failover.py BW_WORKER BW_CTL [CASE...]

Each link of the worker connects to one node (each in its own random order); a job runs
slowly; the publisher's node is stopped mid-transfer; the worker moves to the other node (logged, in /metrics and /healthz), declares the topology
there, consumes a new job and publishes every event there, the events of the job that was
running included (the outbox sends again what the lost node never confirmed): each job's
events, read from both nodes, have no seq gap. Then the first node comes back, the second is
stopped, and the worker moves back. Every move prints its failover time."""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
import metrics  # noqa: E402
from e2e import MiB, check_events, leftovers, vm_message  # noqa: E402

VM = "/DC/vm/failover"
SIZES = {2000: 8 * MiB, 2001: 4 * MiB}
WORKER = "f1"
# heartbeat 10 s: a stopped node closes its connections at once, so a move takes the broker's
# stop plus a connect; a lost round waits at most the backoff cap (30 s).
MOVE_S = 45


def free_broker_port(n=1):
    """An AMQP port in 13000-13600 such that it and the n - 1 after it, with their distribution
    (+20000) and epmd (+21000) ports, are free (tests/with-broker's approach)."""
    for _ in range(100):
        p = 13000 + int.from_bytes(os.urandom(2), "big") % (601 - n)
        ok = True
        for q in [q + d for q in range(p, p + n) for d in (0, 20000, 21000)]:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
        if ok:
            return p
    raise RuntimeError("no free broker port")


class Env(metrics.Env):
    def __init__(self, worker, ctl):
        self.b_dir = tempfile.mkdtemp(prefix="bw-broker-b.")
        self.b_port = free_broker_port()
        subprocess.run([e2e.BROKER, "start", self.b_dir, str(self.b_port)], check=True,
                       capture_output=True, timeout=180)
        self.nodes = {"a": {"url": e2e.URL, "dir": e2e.BROKER_DIR,
                            "port": int(os.environ["BW_TEST_AMQP_PORT"])},
                      "b": {"url": f"amqp://guest:guest@127.0.0.1:{self.b_port}", "dir": self.b_dir,
                            "port": self.b_port}}
        self.conns = {}
        self.seen_on = {}  # event_id -> the nodes it was read from
        super().__init__(worker, ctl)
        self.connect_node("b")

    def connect(self):
        super().connect()
        self.conns["a"] = (self.conn, self.ch)

    def connect_node(self, name):
        """The test's own connection to a node, with e2e.events bound to every event there."""
        conn = pika.BlockingConnection(pika.URLParameters(self.nodes[name]["url"]))
        ch = conn.channel()
        ch.exchange_declare("backup.events", "topic", durable=True)
        ch.queue_declare("e2e.events", durable=True)
        ch.queue_bind("e2e.events", "backup.events", "#")
        self.conns[name] = (conn, ch)

    def config(self, wid, extra="", **kw):
        path = super().config(wid, extra, **kw)
        with open(path) as f:
            text = f.read()
        urls = ",".join(n["url"] for n in self.nodes.values())
        with open(path, "w") as f:
            f.write(text.replace(f"url = {e2e.URL}\n", f"url = {urls}\n", 1))
        return path

    def drain_events(self, timeout=1.0):
        """Events from every node the test is connected to (a stopped node's are read once it
        is back)."""
        end = time.time() + timeout
        while time.time() < end:
            got = False
            for name, (conn, ch) in list(self.conns.items()):
                try:
                    m, p, b = ch.basic_get("e2e.events", auto_ack=True)
                except Exception:
                    del self.conns[name]
                    continue
                if m is not None:
                    got = True
                    ev = self.parse_event(b)
                    self.events.append(ev)
                    self.seen_on.setdefault(ev["event_id"], set()).add(name)
            if not got:
                time.sleep(0.05)

    def publish_to(self, name, msg):
        """A confirmed, routed backup.start on one node."""
        conn, _ = self.conns[name]
        ch = conn.channel()
        ch.confirm_delivery()
        end = time.time() + 30
        while True:
            try:
                ch.basic_publish("backup.jobs", "backup.start", json.dumps(msg).encode(),
                                 pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                                 mandatory=True)
                break
            except (pika.exceptions.UnroutableError, pika.exceptions.ChannelClosedByBroker,
                    pika.exceptions.NackError):
                # a quorum queue that just lost its leader nacks (seen: 'NackError: 0
                # message(s) NACKed' right after a SIGKILL); the same job_id again is safe
                # here: one worker, one ledger, a duplicate is acked and ignored
                if time.time() > end:
                    raise AssertionError(f"backup.start could not be routed on node {name}")
                try:
                    ch.close()  # pika's channel keeps failing after a nack: a new one
                except Exception:  # noqa: BLE001
                    pass
                ch = conn.channel()
                ch.confirm_delivery()
                time.sleep(0.1)
        ch.close()

    def wait_queue(self):
        """Both links up (on either node): /healthz 200 (the listener comes up first)."""
        end = time.time() + 60
        while True:
            try:
                st, body = metrics.wait_health(self, 200, 60)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.2)
        assert (st, body) == (200, "ok\n"), f"the worker never came up: {st} {body!r}"

    def broker(self, verb, name):
        args = [e2e.BROKER, verb, self.nodes[name]["dir"]]
        subprocess.run(args, check=True, capture_output=True, timeout=180)
        if verb == "stop":
            self.conns.pop(name, None)

    def close(self, keep_tmp=False):
        super().close(keep_tmp)
        for _, (conn, _) in list(self.conns.items()):
            try:
                conn.close()
            except Exception:
                pass
        subprocess.run([e2e.BROKER, "stop", self.b_dir], capture_output=True, timeout=180)
        if not keep_tmp:
            subprocess.run(["rm", "-rf", self.b_dir])


def where(env, failures, what):
    """{link: "127.0.0.1:PORT"} from bw_broker_link_node_info (one series per link that is up)."""
    s = metrics.scrape(env, failures, what)
    out = {}
    for (name, labels), val in s.items():
        if name == "bw_broker_link_node_info":
            d = dict(labels)
            if d["link"] in out:
                failures.append(f"{what}: two nodes for link {d['link']}")
            if val != 1:
                failures.append(f"{what}: {name}{d} = {val}")
            out[d["link"]] = d["node"]
    return out, s


def node_of(env, addr):
    return next(n for n, v in env.nodes.items() if addr == f"127.0.0.1:{v['port']}")


def wait_on(env, failures, name, what, timeout=MOVE_S):
    """Waits until both links are on node name and /healthz is 200 ok; returns the seconds
    it took, or None."""
    t0, want = time.time(), f"127.0.0.1:{env.nodes[name]['port']}"
    while time.time() - t0 < timeout:
        st, body = metrics.http(env, "/healthz")[0::2]
        if st == 200:
            on, _ = where(env, failures, what)
            if on == {"consumer": want, "publisher": want}:
                return time.time() - t0
        time.sleep(0.1)
    failures.append(f"{what}: not on node {name} ({want}) within {timeout} s: "
                    f"{where(env, failures, what)[0]}, /healthz {metrics.http(env, '/healthz')[0::2]}")
    return None


def log_text(env):
    with open(os.path.join(env.tmp, f"{WORKER}.log"), errors="replace") as fh:
        return fh.read()


def run_job(env, failures, name, jid, slow=None):
    vm = f"{VM}/{jid}"
    env.sim_post("/_sim/vm", {"vm_path": vm, "seed": 7,
                              "disks": {str(k): {"size": s} for k, s in SIZES.items()}})
    if slow:
        env.sim_post(f"/_sim/faults?job={jid}", {"slow_bytes_per_s": slow})
    env.publish_to(name, vm_message(jid, vm, [{"key": k, "size_bytes": s} for k, s in SIZES.items()]))


def case_move_and_back(env, failures):
    on, _ = where(env, failures, "start")
    # each link shuffles its own round: they may be on different nodes. The publisher's node
    # is the one stopped, so that the events of the running job are split between the nodes.
    x = node_of(env, on["publisher"])
    y = "b" if x == "a" else "a"
    print(f"     publisher on node {x} ({on['publisher']}), consumer on node "
          f"{node_of(env, on['consumer'])} ({on['consumer']}); the other: {y}")
    log = log_text(env)
    for link in ("consumer", "publisher"):
        if not re.search(rf"{link} link connected to {re.escape(on[link])} \(node [12] of 2\)", log):
            failures.append(f"no '{link} link connected to {on[link]} (node i of 2)' line")
    if "guest:guest" in log:
        failures.append("a broker password in the log")

    # a slow job runs on x; x stops mid-transfer
    run_job(env, failures, node_of(env, on["consumer"]), "fo-1", slow=1 * MiB)
    end = time.time() + 60
    while time.time() < end and not any(e["event"] == "backup.progress" for e in env.job_events("fo-1")):
        env.drain_events(0.2)
    if not any(e["event"] == "backup.progress" for e in env.job_events("fo-1")):
        failures.append(f"fo-1: no backup.progress on node {x}: {[e['event'] for e in env.job_events('fo-1')]}")
    t0 = time.time()
    env.broker("stop", x)
    stopped = time.time() - t0
    took = wait_on(env, failures, y, f"after node {x} stopped")
    if took is None:
        return
    print(f"     failover {x} -> {y}: {stopped + took:.1f} s from the stop's start "
          f"(the stop itself took {stopped:.1f} s; {took:.1f} s after it returned)")
    st, body = metrics.http(env, "/healthz")[0::2]
    if (st, body) != (200, "ok\n"):
        failures.append(f"/healthz on {y}: {st} {body!r}")
    # the topology was declared on y: a new job is consumed there, its events published there
    run_job(env, failures, y, "fo-2")
    for jid in ("fo-1", "fo-2"):
        got = env.wait_terminal(jid, 180)
        if got != "completed":
            failures.append(f"{jid}: {got}: {[e['event'] for e in env.job_events(jid)]}")
    # back: x restarts, y stops
    env.broker("start", x)
    env.connect_node(x) if x == "b" else env.connect()
    env.drain_events(1.0)  # what x had confirmed before it stopped
    t0 = time.time()
    env.broker("stop", y)
    took = wait_on(env, failures, x, f"after node {y} stopped")
    if took is not None:
        print(f"     failover {y} -> {x}: {time.time() - t0:.1f} s from the stop's start")
    run_job(env, failures, x, "fo-3")
    if env.wait_terminal("fo-3", 180) != "completed":
        failures.append(f"fo-3: {[e['event'] for e in env.job_events('fo-3')]}")
    env.broker("start", y)
    env.connect_node(y) if y == "b" else env.connect()
    env.drain_events(2.0)
    for jid in ("fo-1", "fo-2", "fo-3"):
        evs = check_events(env, jid, failures)  # seq 1, 2, ... with no gap, across both nodes
        by_node = {n: sum(1 for e in evs if n in env.seen_on.get(e["event_id"], ())) for n in env.nodes}
        print(f"     {jid}: {len(evs)} events, {[e['event'] for e in evs][-1]}; read from each node: {by_node}")
        if jid == "fo-1" and not all(by_node.values()):
            failures.append(f"fo-1: its events were not published on both nodes: {by_node}")
    down = metrics.http(env, "/healthz")  # both up again
    _, s = where(env, failures, "end")
    for link in ("consumer", "publisher"):
        for n, v in env.nodes.items():
            c = metrics.v(s, "bw_broker_connects_total", link=link, node=f"127.0.0.1:{v['port']}")
            print(f"     bw_broker_connects_total{{link={link},node={n}}} {c:g}")
            if c < 1:
                failures.append(f"{link} never connected to node {n}")
    if down[0] != 200:
        failures.append(f"/healthz at the end: {down}")
    failures += [f"leftovers: {x}" for x in leftovers(env)]


def case_healthz_names_the_node(env, failures):
    """Both nodes down: 503, and the reason names a node (host:port, node i of 2), no password."""
    for n in env.nodes:
        env.broker("stop", n)
    try:
        st, body = metrics.wait_health(env, 503, 30)
        print(f"     both nodes stopped: {st} {body.strip()!r}")
        if st != 503 or not re.search(r"consumer link down: 127\.0\.0\.1:\d+ \(node [12] of 2\): ", body) \
                or "guest" in body:
            failures.append(f"/healthz with both nodes stopped: {st} {body!r}")
        on, _ = where(env, failures, "both down")
        if on:
            failures.append(f"bw_broker_link_node_info with both nodes down: {on}")
    finally:
        for n in env.nodes:
            env.broker("start", n)
        env.connect()
        env.connect_node("b")
    st, body = metrics.wait_health(env, 200, 120)
    if (st, body) != (200, "ok\n"):
        failures.append(f"/healthz after both came back: {st} {body!r}")


CASES = {"move_and_back": case_move_and_back, "healthz_names_the_node": case_healthz_names_the_node}


# ---- a real cluster (BW_E2E_CLUSTER=N: scripts/broker cluster) ------------------------------

class ClusterEnv(Env):
    """N nodes of one cluster (scripts/broker cluster start), amqp.url listing them all;
    tests/with-broker's own broker is not used. e2e.events is a quorum queue here, so that
    it outlives any one node."""

    def __init__(self, worker, ctl, n):
        self.c_dir = tempfile.mkdtemp(prefix="bw-cluster.")
        port = free_broker_port(n)
        t0 = time.time()
        r = subprocess.run([e2e.BROKER, "cluster", "start", self.c_dir, str(n), str(port)],
                           capture_output=True, text=True, timeout=400)
        if r.returncode != 0:
            subprocess.run([e2e.BROKER, "cluster", "stop", self.c_dir], capture_output=True, timeout=300)
            raise AssertionError(f"cluster start: {r.stdout[-500:]} {r.stderr[-1000:]}")
        print(f"     cluster of {n} nodes on ports {port}-{port + n - 1} up in {time.time() - t0:.0f} s")
        self.nodes = {str(i + 1): {"url": f"amqp://guest:guest@127.0.0.1:{port + i}", "port": port + i}
                      for i in range(n)}
        self.conns, self.seen_on = {}, {}
        self.down, self.last_reconnect = set(), 0.0
        metrics.Env.__init__(self, worker, ctl)

    def connect(self):
        for name in self.nodes:
            try:
                self.connect_node(name)
            except Exception:
                pass
        self.conn, self.ch = next(iter(self.conns.values()))

    def connect_node(self, name):
        conn = pika.BlockingConnection(pika.URLParameters(self.nodes[name]["url"]))
        ch = conn.channel()
        ch.exchange_declare("backup.events", "topic", durable=True)
        ch.queue_declare("e2e.events", durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind("e2e.events", "backup.events", "#")
        self.conns[name] = (conn, ch)

    def quorum_members(self):
        """{queue: (members, online)} of every quorum queue, as node 1 sees them."""
        r = subprocess.run([e2e.BROKER, "ctl", os.path.join(self.c_dir, "node1"), "-q",
                            "list_queues", "name", "type", "members", "online", "--formatter",
                            "json"], capture_output=True, text=True, timeout=60)
        try:
            rows = json.loads(r.stdout)
        except ValueError:
            return {}
        return {q["name"]: (len(q.get("members") or []), len(q.get("online") or []))
                for q in rows if q.get("type") == "quorum"}

    def wait_whole(self, timeout=60):
        """Every quorum queue (the worker's and e2e.events) with a member on every node, all
        online: a queue declared while a node had not joined yet has fewer, and losing one
        node of two then leaves it without a leader (seen: no event after a node's SIGKILL)."""
        n, end = len(self.nodes), time.time() + timeout
        while True:
            q = self.quorum_members()
            short = {k: v for k, v in q.items() if v != (n, n)}
            if q and not short:
                print(f"     {len(q)} quorum queues, each with {n} members online")
                return
            if time.time() > end:
                raise AssertionError(f"quorum queues without a member online on every node: {short or q}")
            time.sleep(1)

    def node(self, op, name):
        subprocess.run([e2e.BROKER, "cluster", "node", op, self.c_dir, name], check=True,
                       capture_output=True, timeout=300)
        if op in ("kill", "stop"):
            self.conns.pop(name, None)
            self.down.add(name)
        elif op == "start":
            self.down.discard(name)

    def drain_events(self, timeout=1.0):
        """As Env's, and the test's connection to every node not stopped or killed is opened
        again when it went: a basic.get while a quorum queue elects its new leader can end
        the connection (internal_error: nodedown), and a test that stayed with no connection
        would see no event again (seen: 'no terminal event within 180 s')."""
        self.reconnect()
        super().drain_events(timeout)
        self.reconnect()

    def reconnect(self):
        if time.time() - self.last_reconnect < 1.0:
            return
        self.last_reconnect = time.time()
        for name in self.nodes:
            if name not in self.conns and name not in self.down:
                try:
                    self.connect_node(name)
                except Exception:
                    pass

    def close(self, keep_tmp=False):
        metrics.Env.close(self, keep_tmp)
        for _, (conn, _) in list(self.conns.items()):
            try:
                conn.close()
            except Exception:
                pass
        subprocess.run([e2e.BROKER, "cluster", "stop", self.c_dir], capture_output=True, timeout=300)
        if not keep_tmp:
            subprocess.run(["rm", "-rf", self.c_dir])


def case_cluster_node_killed(env, failures):
    """A job transferring while the node the worker publishes on is SIGKILLed: both links
    end on surviving nodes, the job completes and every event arrives (lost 0, no seq gap),
    a new job runs; the failover time is printed."""
    on, _ = where(env, failures, "start")
    x = node_of(env, on["publisher"])
    other = next(n for n in env.nodes if n != x)
    print(f"     publisher on node {x} ({on['publisher']}), consumer on node "
          f"{node_of(env, on['consumer'])}; node {x} gets SIGKILL")
    run_job(env, failures, other, "cl-1", slow=1 * MiB)
    end = time.time() + 60
    while time.time() < end and not any(e["event"] == "backup.progress" for e in env.job_events("cl-1")):
        env.drain_events(0.2)
    t0 = time.time()
    env.node("kill", x)
    killed = f"127.0.0.1:{env.nodes[x]['port']}"
    moved = None
    while time.time() - t0 < MOVE_S:
        st = metrics.http(env, "/healthz")[0]
        now, _ = where(env, failures, "after the kill")
        if st == 200 and len(now) == 2 and killed not in now.values():
            moved = time.time() - t0
            break
        time.sleep(0.1)
    if moved is None:
        failures.append(f"links not on surviving nodes within {MOVE_S} s: {where(env, failures, 'end')[0]}")
        return
    print(f"     failover after SIGKILL of node {x}: {moved:.1f} s; now {now}")
    run_job(env, failures, other, "cl-2")
    lost = 0
    for jid in ("cl-1", "cl-2"):
        try:
            got = env.wait_terminal(jid, 180)
        except AssertionError as e:
            got = str(e)
        if got != "completed":
            lost += 1
            failures.append(f"{jid}: {got}")
        evs = check_events(env, jid, failures)
        print(f"     {jid}: {len(evs)} events, seq {[e['seq'] for e in evs]}")
    print(f"     jobs 2, lost {lost}, failover {moved:.1f} s")
    failures += [f"leftovers: {x}" for x in leftovers(env)]


CLUSTER_CASES = {"cluster_node_killed": case_cluster_node_killed}


def main():
    worker, ctl = sys.argv[1], sys.argv[2]
    n = int(os.environ.get("BW_E2E_CLUSTER", "0"))
    cases = CLUSTER_CASES if n else CASES
    names = sys.argv[3:] or list(cases)
    results, t0 = {}, time.time()
    env = ClusterEnv(worker, ctl, n) if n else Env(worker, ctl)
    try:
        env.start_metrics_worker(WORKER)
        env.wait_queue()
        if n:
            env.wait_whole()
        e2e.run_suite(env, cases, names, results, workers=())
        codes = env.stop_workers()
        results["shutdown"] = all(c == 0 for c in codes.values())
        print(f"{'ok  ' if results['shutdown'] else 'FAIL'} shutdown: exit codes {codes}")
    finally:
        e2e.finish(env, False in results.values(), 60)
    return e2e.summary(results, t0)


if __name__ == "__main__":
    sys.exit(main())
