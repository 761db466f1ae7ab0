#!/usr/bin/python3
"""fleet.py: several simulated bw hosts on one machine, a broker (one node or a cluster), and
the outside view a checker needs (tests/fleet/checker.py). A library for fleet_test.py.

A Host is what a real hub would be: its own worker.host, state directory and ledger,
repositories, credentials, NBD port range (24000 + 100 * index, disjoint per host) and
loopback address (127.0.0.2, 127.0.0.3, ...: nbd.bind_address and nbd.advertise_host), and
N bw-worker processes, each its own worker.id, started, stopped and killed by PID. Its
workers reach every broker node through a Proxy of its own (a TCP relay on its loopback
address that the test can cut and heal), so amqp.url names the proxies, never the nodes.
One SNA simulator serves every host (it writes to whatever nbd URL a start request names);
each host reaches it through a Proxy of its own too (sna.url), so that a cut can take the SNA
away from a host (Host.cut(sna=True)) while the simulator's NBD writes go on. Every worker has
a metrics.listen (Host.health_url), which a Prober polls during a fault: /healthz is answered
by the worker's one loop, so a probe's latency is how long that loop was busy elsewhere.

The test's own clients (the Publisher of backup.start and the Collector of every event)
connect to the nodes directly: a cut partitions a host, not the observer. Nothing listens
or connects outside 127.0.0.0/8.
"""
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pika

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import checker  # noqa: E402

MiB = 1 << 20
# host i serves NBD on base + 100 i ... (others use 22300-23999); BW_FLEET_NBD_BASE moves it,
# so that two fleet runs can share the machine
NBD_PORT_BASE = int(os.environ.get("BW_FLEET_NBD_BASE", "24000"))
NBD_PORTS_PER_HOST = 48    # 2 workers x 4 jobs x 3 disks = 24 at most at once, twice that
# worker w (0-based) of host i listens for /metrics and /healthz on the host's address, port
# base + 10 i + w; BW_FLEET_METRICS_BASE moves it (two fleet runs at once need two bases)
METRICS_PORT_BASE = int(os.environ.get("BW_FLEET_METRICS_BASE", "24800"))
EVENTS_QUEUE_PREFIX = "fleet.events."
JOB_PREFIX = "fleet-"      # every job_id of a fleet run starts with it (then the run's tag)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- partitions: a TCP proxy the test controls --------------------------------------------

class ProxyHub:
    """One asyncio loop in a daemon thread, serving every Proxy of a run."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy-hub", daemon=True)
        self.thread.start()

    def call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _Pair:
    """One relayed connection: the client's and the upstream's writers; drop: bytes are
    read and thrown away both ways (a silent partition)."""

    def __init__(self, client, upstream):
        self.writers = (client, upstream)
        self.drop = False

    def abort(self):
        for w in self.writers:
            w.transport.abort()


class Proxy:
    """Relays listen_host:port (a free port) to upstream host:port. cut() closes every relayed
    connection with a reset and then blackholes new ones (accepted, read, never answered, so
    a client waits as it would for a partitioned peer); cut(drop=True) instead keeps the
    existing connections open and silently drops their bytes both ways (a peer that went
    quiet: only heartbeats find it); cut(refuse=True) resets new connections at once. heal() ends the blackholed connections and relays again.
    connects: the times (time.time()) of every relayed connection established upstream."""

    def __init__(self, hub, listen_host, upstream_host, upstream_port, name=""):
        self.hub, self.upstream = hub, (upstream_host, upstream_port)
        self.name = name or f"{listen_host}->{upstream_port}"
        self.state = "open"
        self.refuse = False      # while cut: new connections reset at once instead of blackholed
        self.pairs = set()       # _Pair
        self.holes = set()       # blackholed client writers
        self.connects = []
        self.blackholed = 0      # connections accepted while cut (blackholed or reset)
        self.server = hub.call(asyncio.start_server(self._serve, listen_host, 0))
        self.host, self.port = self.server.sockets[0].getsockname()[:2]

    @property
    def active(self):
        return len(self.pairs)

    async def _serve(self, reader, writer):
        if self.state == "cut" and self.refuse:
            self.blackholed += 1
            writer.transport.abort()
            return
        if self.state == "cut":
            self.blackholed += 1
            self.holes.add(writer)
            try:
                while await reader.read(65536):
                    pass
            except (ConnectionError, OSError):
                pass
            finally:
                self.holes.discard(writer)
                writer.transport.abort()
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        if self.state == "cut":  # cut while this one connected upstream: it never relays
            uw.transport.abort()
            writer.transport.abort()
            return
        self.connects.append(time.time())
        pair = _Pair(writer, uw)
        self.pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, uw, pair), self._pump(ur, writer, pair))
        finally:
            self.pairs.discard(pair)
            pair.abort()

    async def _pump(self, reader, writer, pair):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if pair.drop:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            pair.abort()

    async def _cut(self, drop, refuse=False):
        self.state, self.refuse = "cut", refuse
        for pair in list(self.pairs):
            if drop:
                pair.drop = True
            else:
                pair.abort()

    async def _heal(self):
        self.state = "open"
        for pair in list(self.pairs):
            if pair.drop:  # a connection that went quiet does not come back to life
                pair.abort()
        for w in list(self.holes):
            w.transport.abort()

    async def _close(self):
        self.server.close()
        await self._cut(False)
        for w in list(self.holes):
            w.transport.abort()

    def cut(self, drop=False, refuse=False):
        self.hub.call(self._cut(drop, refuse))

    def heal(self):
        self.hub.call(self._heal())

    def close(self):
        self.hub.call(self._close())


# ---- the workers' loops: /healthz latency -----------------------------------------------

class Prober:
    """Polls each url (a worker's /healthz) every `every` s, each request bounded by `timeout` s,
    one thread per url (a stuck worker does not delay the probes of another), until stop().
    Any answer counts, 503 included (a cut worker is unhealthy, and says so); the latency is
    from the request to its answer, or `timeout` when none came (a probe that could not even
    connect counts as an error, not a latency). worst(): {url: (seconds, probes, errors)}."""

    def __init__(self, urls, every=0.2, timeout=3.0):
        self.every, self.timeout = every, timeout
        self.stats = {u: [0.0, 0, 0] for u in urls}
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(u,), name="prober", daemon=True)
                        for u in urls]
        for t in self.threads:
            t.start()

    def _run(self, url):
        st = self.stats[url]
        while not self.stop_flag.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as r:
                    r.read()
                took = time.monotonic() - t0
            except urllib.error.HTTPError as e:   # 503: an answer
                e.read()
                took = time.monotonic() - t0
            except (socket.timeout, TimeoutError):
                took = max(self.timeout, time.monotonic() - t0)
            except (urllib.error.URLError, OSError) as e:
                if isinstance(getattr(e, "reason", None), (socket.timeout, TimeoutError)):
                    took = max(self.timeout, time.monotonic() - t0)
                else:
                    st[2] += 1
                    took = None
            if took is not None:
                st[0] = max(st[0], took)
                st[1] += 1
            self.stop_flag.wait(max(0.0, self.every - (time.monotonic() - t0)))

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.timeout + 2)
        return self.worst()

    def worst(self):
        return {u: tuple(v) for u, v in self.stats.items()}


# ---- the SNA simulator ------------------------------------------------------------------

class Sim:
    """One tests/sna/sna_sim.py for every host, on a free port; its state in DIR."""

    def __init__(self, state_dir, log_path):
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(ROOT, "tests", "sna", "sna_sim.py"), "--port", "0",
             "--state", state_dir, "--connections", "2"],
            stdout=subprocess.PIPE, stderr=open(log_path, "a"))
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"sna_sim did not start: {line!r}")
        self.port = int(line.split("127.0.0.1:")[1].split()[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"{}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


# ---- hosts ------------------------------------------------------------------------------

class Host:
    """A simulated hub: see the module's comment. index 0 is host-a on 127.0.0.2, and so on."""

    def __init__(self, fleet, index, repos=("repo-001",), workers=2, max_jobs=4, conf=None):
        self.fleet, self.index = fleet, index
        self.name = "host-" + "abcdefghij"[index]
        self.addr = f"127.0.0.{2 + index}"
        self.dir = os.path.join(fleet.tmp, self.name)
        self.state = os.path.join(self.dir, "state")
        self.creds = os.path.join(self.dir, "creds")
        self.repos = {r: os.path.join(self.dir, r) for r in repos}
        for d in (self.state, self.creds, *self.repos.values()):
            os.makedirs(d)
        cred = os.path.join(self.creds, "vcenter-main.json")
        with open(cred, "w") as f:
            json.dump({"vcenter_host": "vcenter.example", "username": "backup@vsphere.local",
                       "password": "fleet-secret"}, f)
        os.chmod(cred, 0o600)
        self.port_min = NBD_PORT_BASE + 100 * index
        self.port_max = self.port_min + NBD_PORTS_PER_HOST - 1
        self.n_workers, self.max_jobs = workers, max_jobs
        self.conf = conf or {}   # {"section.key": value} over the defaults below
        self.proxies = [Proxy(fleet.hub, self.addr, u.hostname, u.port, f"{self.name}->node{i + 1}")
                        for i, u in enumerate(fleet.broker_nodes())]
        self.sna_proxy = Proxy(fleet.hub, self.addr, "127.0.0.1", fleet.sim.port, f"{self.name}->sna")
        self.workers = {}        # worker id -> Popen

    def worker_ids(self):
        return [f"{self.name}-{i + 1}" for i in range(self.n_workers)]

    def metrics_port(self, wid):
        return METRICS_PORT_BASE + 10 * self.index + int(wid.rsplit("-", 1)[1]) - 1

    def health_url(self, wid):
        return f"http://{self.addr}:{self.metrics_port(wid)}/healthz"

    def amqp_url(self):
        """Every node's proxy; with BW_FLEET_AMQP_NODES=one only node (index mod N) + 1's (a dry
        run of the cluster cases for a worker that does not read an amqp.url list yet)."""
        proxies = self.proxies
        if os.environ.get("BW_FLEET_AMQP_NODES") == "one":
            proxies = [proxies[self.index % len(proxies)]]
        return ",".join(f"amqp://guest:guest@{p.host}:{p.port}" for p in proxies)

    def config(self, wid):
        keys = {
            "amqp.url": self.amqp_url(), "amqp.heartbeat_s": 5,
            "worker.id": wid, "worker.host": self.name, "worker.max_jobs": self.max_jobs,
            "worker.state_dir": self.state, "worker.recovery_interval_s": 5,
            "nbd.port_min": self.port_min, "nbd.port_max": self.port_max,
            "nbd.bind_address": self.addr, "nbd.advertise_host": self.addr,
            "sna.url": f"http://{self.sna_proxy.host}:{self.sna_proxy.port}", "sna.poll_interval_s": 1, "sna.max_attempts": 5,
            "sna.backoff_base_ms": 200, "sna.backoff_cap_s": 2, "sna.connect_timeout_s": 2,
            "sna.timeout_s": 5, "sna.lost_after": 3,
            "credentials.dir": self.creds, "log.level": "info",
        }
        if wid in self.worker_ids():   # not bw-ctl's config (leftovers())
            keys["metrics.listen"] = f"{self.addr}:{self.metrics_port(wid)}"
        keys.update(self.conf)
        sections = {}
        for k, v in keys.items():
            s, key = k.split(".", 1)
            sections.setdefault(s, []).append(f"{key} = {v}")
        sections["repositories"] = [f"{r} = {p}" for r, p in self.repos.items()]
        path = os.path.join(self.dir, f"{wid}.conf")
        with open(path, "w") as f:
            for s, lines in sections.items():
                f.write(f"[{s}]\n" + "\n".join(lines) + "\n")
        return path

    def start(self, wid=None):
        for w in [wid] if wid else self.worker_ids():
            if w in self.workers and self.workers[w].poll() is None:
                continue
            logf = open(os.path.join(self.dir, f"{w}.log"), "a")
            self.workers[w] = subprocess.Popen([self.fleet.worker, "--config", self.config(w)],
                                               stdout=logf, stderr=logf)

    def wait_healthy(self, timeout=60):
        """Waits until every worker's /healthz answers 200 (both broker links up, the ledger
        writable); returns the workers that did not within timeout."""
        end, left = time.time() + timeout, set(self.worker_ids())
        while left and time.time() < end:
            for w in sorted(left):
                try:
                    with urllib.request.urlopen(self.health_url(w), timeout=2) as r:
                        if r.status == 200:
                            left.discard(w)
                except OSError:  # 503 (HTTPError), not listening yet, a timeout
                    pass
            if left:
                time.sleep(0.2)
        return sorted(left)

    def signal(self, wid, sig):
        p = self.workers.get(wid)
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def kill(self, wid):
        self.signal(wid, signal.SIGKILL)
        self.workers[wid].wait()

    def stop(self, timeout=90):
        """SIGTERM every worker, SIGKILL what is left after timeout; returns {wid: exit code}."""
        for wid in self.workers:
            self.signal(wid, signal.SIGTERM)
        codes = {}
        for wid, p in self.workers.items():
            try:
                codes[wid] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[wid] = "killed"
        return codes

    def cut(self, drop=False, refuse=False, sna=False):
        """Partitions this host from every broker node (Proxy.cut; refuse: new connections are
        reset at once, as by a host whose broker is down, instead of blackholed); sna: from the
        SNA as well (its requests go unanswered; the simulator's NBD writes are not cut)."""
        # every proxy in one turn of the hub's loop: the partition falls at one instant, as a
        # real one does. Cut one by one, a worker whose link the first cut reset was already
        # reconnecting through the next proxy when that one was cut: its probe answered, and
        # its login met the cut (a 5.00 s /healthz in CI, cluster_cut_long)
        self._all(self.proxies + ([self.sna_proxy] if sna else []), lambda p: p._cut(drop, refuse))

    def heal(self):
        self._all(self.proxies + [self.sna_proxy], lambda p: p._heal())

    def _all(self, proxies, step):
        async def each():
            for p in proxies:
                await step(p)  # no await inside _cut/_heal yields: nothing runs in between
        proxies[0].hub.call(each())

    def links(self):
        """Relayed connections per node (1-based), e.g. {1: 2, 2: 0, 3: 2}."""
        return {i + 1: p.active for i, p in enumerate(self.proxies)}

    def leftovers(self):
        out = []
        ps = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
        mine = [l for l in ps.splitlines() if self.dir in l]
        if mine:
            out.append(f"{self.name}: qemu-nbd left: {mine}")
        r = subprocess.run([self.fleet.ctl, "--config", self.config(self.name + "-ctl"), "ports", "--json"],
                           capture_output=True, text=True)
        held = [p for p in json.loads(r.stdout or "[]") if p["state"] == "reserved"]
        if held:
            out.append(f"{self.name}: ports held: {held}")
        return out

    def tail(self, lines=15):
        for wid in self.workers:
            path = os.path.join(self.dir, f"{wid}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    print(f"--- {wid}.log (tail)\n" + "".join(f.readlines()[-lines:]), end="")


# ---- the observer: publisher and collector ----------------------------------------------

def _params(url, heartbeat=5):
    p = pika.URLParameters(url)
    p.heartbeat = heartbeat
    p.blocked_connection_timeout = 30
    p.socket_timeout = 5
    p.connection_attempts = 1
    return p


class Collector:
    """Reads every event from a durable quorum queue bound to backup.events with "#", declared
    before the first publish, on its own thread and connection (direct to a node; on a loss,
    the next node). Events are acked once recorded; a redelivery is a duplicate the checker
    removes by event_id. arrivals: [(time.time(), event)]."""

    def __init__(self, urls, queue):
        self.urls, self.queue = list(urls), queue
        self.arrivals = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.node = None          # index into urls of the current connection
        self.avoid = set()        # nodes not to connect to (the test is about to fault them)
        self.reconnects = 0
        self.errors = []
        conn = self._connect()
        ch = conn.channel()
        ch.exchange_declare("backup.events", "topic", durable=True)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(queue, "backup.events", "#")
        conn.close()
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self.thread.start()

    def _connect(self):
        order = [i for i in range(len(self.urls)) if i not in self.avoid] or list(range(len(self.urls)))
        last = None
        for _ in range(3):
            for i in order:
                try:
                    conn = pika.BlockingConnection(_params(self.urls[i]))
                    self.node = i
                    return conn
                except Exception as e:  # noqa: BLE001 - any failure: the next node
                    last = e
            time.sleep(0.5)
        raise RuntimeError(f"collector: no broker node answers: {last}")

    def _on(self, ch, method, props, body):
        try:
            e = json.loads(body)
        except ValueError:
            e = {"event": "?", "event_id": None, "job_id": None, "raw": body[:200].decode("latin-1")}
        with self.lock:
            self.arrivals.append((time.time(), e))
        ch.basic_ack(method.delivery_tag)

    def _run(self):
        while not self.stop_flag.is_set():
            conn = None
            try:
                conn = self._connect()
                ch = conn.channel()
                ch.basic_qos(prefetch_count=200)
                ch.basic_consume(self.queue, self._on)
                node = self.node
                while not self.stop_flag.is_set() and self.node == node and node not in self.avoid:
                    conn.process_data_events(time_limit=0.2)
            except Exception as e:  # noqa: BLE001 - a lost node: reconnect elsewhere
                self.errors.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
                self.reconnects += 1
                time.sleep(0.2)
            finally:
                try:
                    if conn is not None and conn.is_open:
                        conn.close()
                except Exception:  # noqa: BLE001
                    pass

    def move_off(self, node):
        """Stops using node (0-based) from now on; returns once connected elsewhere."""
        self.avoid.add(node)
        end = time.time() + 30
        while self.node in self.avoid and time.time() < end:
            time.sleep(0.1)

    def events(self):
        with self.lock:
            return [e for _, e in self.arrivals]

    def since(self, t):
        with self.lock:
            return [(at, e) for at, e in self.arrivals if at >= t]

    def drain(self, quiet=3.0, timeout=60):
        """Returns when no event arrived for `quiet` seconds (or after timeout)."""
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                last = self.arrivals[-1][0] if self.arrivals else 0
            if time.time() - last >= quiet:
                return
            time.sleep(0.2)

    def close(self, delete=True):
        self.stop_flag.set()
        self.thread.join(10)
        if delete:
            try:
                conn = self._connect()
                conn.channel().queue_delete(self.queue)
                conn.close()
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"queue_delete: {e}")


class Publisher:
    """Publishes backup.start persistent, mandatory, with publisher confirms, to a node
    directly. publish() returns "ok" (confirmed: the job is published), "info" (no answer:
    the connection went before the confirm; the job may or may not be in the queue) or raises
    when nothing could be sent. A job is never published twice: an unanswered one keeps its
    "info" and the stream goes on with new job_ids."""

    def __init__(self, urls):
        self.urls = list(urls)
        self.conn = self.ch = None
        self.avoid = set()
        self.node = None

    def _open(self):
        order = [i for i in range(len(self.urls)) if i not in self.avoid] or list(range(len(self.urls)))
        last = None
        for _ in range(10):
            for i in order:
                try:
                    self.conn = pika.BlockingConnection(_params(self.urls[i]))
                    self.ch = self.conn.channel()
                    self.ch.confirm_delivery()
                    self.node = i
                    return
                except Exception as e:  # noqa: BLE001
                    last = e
            time.sleep(0.5)
        raise RuntimeError(f"publisher: no broker node answers: {last}")

    def move_off(self, node):
        """Stops using node (0-based): the next publish reconnects elsewhere (any thread may
        call this; only the publishing thread touches the connection)."""
        self.avoid.add(node)

    def publish(self, msg, routing_key="backup.start", timeout=30):
        body = json.dumps(msg).encode()
        end = time.time() + timeout
        if self.conn is not None and self.node in self.avoid:
            self.close()
        while True:
            if self.conn is not None:
                # a connection idle past its heartbeats may be gone already (nobody serviced
                # it while the test waited): find out before sending, not by a publish that
                # would then count as "info" and leave the job unjudged for loss
                try:
                    self.conn.process_data_events(time_limit=0)
                except Exception:  # noqa: BLE001 - nothing was sent on it
                    self.close()
            if self.conn is None or not self.conn.is_open:
                self._open()
            try:
                self.ch.basic_publish("backup.jobs", routing_key, body,
                                      pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                                      mandatory=True)
                return "ok"
            except pika.exceptions.UnroutableError:
                # definite: not enqueued (no queue bound yet)
                if time.time() > end:
                    raise
                time.sleep(0.2)
            except pika.exceptions.NackError:
                # a quorum queue that lost its leader nacks, yet the message may still be
                # committed: no answer, like a lost connection (publishing the same job_id
                # again could reach two hosts, whose ledgers do not know each other); pika's
                # channel keeps failing after a nack, so the next publish opens another
                self.close()
                return "info"
            except pika.exceptions.ChannelClosedByBroker:
                if time.time() > end:
                    raise
                self.ch = self.conn.channel()
                self.ch.confirm_delivery()
                time.sleep(0.2)
            except Exception:  # noqa: BLE001 - the connection went: no answer
                self.close()
                return "info"

    def close(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        self.conn = self.ch = None


# ---- brokers ----------------------------------------------------------------------------

class SingleBroker:
    """The private broker of tests/with-broker (BW_TEST_AMQP_URL)."""

    def __init__(self, url):
        self.urls = [url]

    def close(self):
        pass


def broker_script():
    return os.environ.get("BW_FLEET_BROKER_SCRIPT") or os.path.join(ROOT, "scripts", "broker")


def cluster_available():
    """(True, "") when scripts/broker knows "cluster", else (False, why)."""
    probe = tempfile.mkdtemp(prefix="bw-fleet-probe-")
    try:
        r = subprocess.run([broker_script(), "cluster", "status", os.path.join(probe, "none")],
                           capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if "unknown command" in (r.stdout + r.stderr) or r.returncode == 2:
        first = ((r.stderr or r.stdout).strip().splitlines() or [""])[0]
        return False, f"{broker_script()} has no 'cluster' command yet ({first[:100]})"
    return True, ""


def _free_cluster_port(n):
    """An AMQP port P in 11700-11990 with P..P+n-1, their distribution ports (+20000) and the
    epmd port (+21000) free (below the ephemeral range, apart from with-broker's 11000-11699)."""
    def busy(p):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return False
            except OSError:
                return True
    for _ in range(50):
        p = 11700 + random.randrange(0, 290 - n)
        ports = [p + i for i in range(n)] + [p + i + 20000 for i in range(n)] + [p + 21000]
        if not any(busy(q) for q in ports):
            return p
    raise RuntimeError("no free ports for a cluster")


class Cluster:
    """N nodes through `scripts/broker cluster start|stop DIR N PORT` and `cluster node
    stop|start|kill|freeze|thaw DIR I` (I 1-based); URLS= of DIR/cluster lists the nodes."""

    def __init__(self, n=3):
        self.dir = tempfile.mkdtemp(prefix="bw-fleet-cluster-")
        self.n = n
        port = _free_cluster_port(n)
        r = subprocess.run([broker_script(), "cluster", "start", self.dir, str(n), str(port)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            self.close()
            raise RuntimeError(f"cluster start failed: {r.stderr.strip()[-800:]}")
        log(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "cluster started")
        with open(os.path.join(self.dir, "cluster")) as f:
            kv = dict(l.strip().split("=", 1) for l in f if "=" in l)
        self.urls = kv["URLS"].split(",")
        self.nodes = kv.get("NODES", "").split(",")

    def node(self, op, i):
        """Runs `cluster node OP DIR I`; returns (seconds it took, its output)."""
        t0 = time.time()
        r = subprocess.run([broker_script(), "cluster", "node", op, self.dir, str(i)],
                           capture_output=True, text=True, timeout=300)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0:
            raise RuntimeError(f"cluster node {op} {i}: {out[-400:]}")
        return time.time() - t0, out

    def leader(self, queue="backup.start"):
        """The 1-based node that leads queue (asked of any node that answers), or None."""
        for i in range(1, self.n + 1):
            r = subprocess.run([broker_script(), "ctl", os.path.join(self.dir, f"node{i}"), "-q",
                                "list_queues", "name", "leader", "--formatter", "json"],
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                continue
            try:
                rows = json.loads(r.stdout)
            except ValueError:
                continue
            for q in rows:
                if q.get("name") == queue and q.get("leader") in self.nodes:
                    return self.nodes.index(q["leader"]) + 1
        return None

    def _quorum_queues(self, i):
        """[(name, members, online)] of node i's quorum queues, or None when it does not answer."""
        r = subprocess.run([broker_script(), "ctl", os.path.join(self.dir, f"node{i}"), "-q",
                            "list_queues", "name", "type", "members", "online", "--formatter", "json"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return None
        try:
            rows = json.loads(r.stdout)
        except ValueError:
            return None
        return [(q["name"], q.get("members") or [], q.get("online") or []) for q in rows
                if q.get("type") == "quorum"]

    def health(self):
        """"" when the cluster is whole: every node answers, and every quorum queue has all N
        nodes as members and all of them online; else what is not."""
        why = []
        queues = None
        for i in range(1, self.n + 1):
            q = self._quorum_queues(i)
            if q is None:
                why.append(f"node {i} does not answer")
            elif queues is None:
                queues = q
        for name, members, online in queues or []:
            if len(members) != self.n or sorted(online) != sorted(members):
                why.append(f"{name}: members {len(members)}, online {len(online)} of {self.n}")
        return "; ".join(why)

    def wait_healthy(self, timeout=120):
        """Waits until health() is ""; starts a node that does not answer after 20 s (a case
        that failed half-way). Returns (seconds it took, "" or what is still wrong)."""
        t0 = time.time()
        started = set()
        why = self.health()
        while why and time.time() - t0 < timeout:
            if time.time() - t0 > 20:
                for i in range(1, self.n + 1):
                    if i not in started and f"node {i} does not answer" in why:
                        started.add(i)
                        try:
                            self.node("start", i)
                        except Exception as e:  # noqa: BLE001 - reported by health() below
                            log(f"cluster: node {i} start: {e}")
            time.sleep(1)
            why = self.health()
        return time.time() - t0, why

    def close(self):
        subprocess.run([broker_script(), "cluster", "stop", self.dir], capture_output=True, text=True,
                       timeout=600)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- a fleet: hosts, simulator, observer ------------------------------------------------

class Fleet:
    """One run: a tmp dir, the simulator, the proxies' loop, hosts, the collector's queue and
    the publisher, on broker (a SingleBroker or a Cluster, which the caller closes)."""

    def __init__(self, worker, ctl, broker, tag):
        self.worker, self.ctl, self.broker = worker, ctl, broker
        self.tag = tag
        self.tmp = tempfile.mkdtemp(prefix=f"bw-fleet-{tag}-")
        self.hub = ProxyHub()
        self.sim = Sim(os.path.join(self.tmp, "sim"), os.path.join(self.tmp, "sim.log"))
        self.hosts = []
        self.collector = Collector(broker.urls, EVENTS_QUEUE_PREFIX + tag)
        self.publisher = Publisher(broker.urls)
        self.published, self.indeterminate = [], []
        self.publish_times = {}
        self.vms = []

    def broker_nodes(self):
        return [urllib.parse.urlparse(u) for u in self.broker.urls]

    def add_host(self, **kw):
        h = Host(self, len(self.hosts), **kw)
        self.hosts.append(h)
        return h

    def host(self, name):
        return next(h for h in self.hosts if h.name == name)

    def make_vms(self, n, seed=1, min_disks=1, max_disks=3, min_mib=2, max_mib=4):
        """n VMs in the simulator, each of 1-3 disks of a few MiB; returns their [(path, disks)]."""
        rnd = random.Random(seed)
        for i in range(n):
            path = f"/DC/vm/{self.tag}-{i}"
            keys = [2000 + k for k in range(rnd.randint(min_disks, max_disks))]
            disks = [{"key": k, "size_bytes": rnd.randint(min_mib, max_mib) * MiB} for k in keys]
            self.sim.post("/_sim/vm", {"vm_path": path, "seed": seed + i,
                                       "disks": {str(d["key"]): {"size": d["size_bytes"]} for d in disks}})
            self.vms.append((path, disks))
        return self.vms

    def message(self, i, repository="repo-001"):
        path, disks = self.vms[i % len(self.vms)]
        jid = f"{JOB_PREFIX}{self.tag}-{i:04d}"
        return {"schema_version": 1, "job_id": jid, "vm": {"name": f"vm {i}", "path": path},
                "backup_type": "full", "repository_id": repository, "credential_id": "vcenter-main",
                "disks": disks}

    def publish(self, msg, job_faults=None, routing_key="backup.start"):
        if job_faults:
            self.sim.post(f"/_sim/faults?job={msg['job_id']}", job_faults)
        outcome = self.publisher.publish(msg, routing_key)
        (self.published if outcome == "ok" else self.indeterminate).append(msg["job_id"])
        self.publish_times[msg["job_id"]] = time.time()
        return outcome

    def stream(self, count, rate, job_faults=None, during=None):
        """Publishes count jobs (one per VM, round robin) at rate jobs/s; during(i) is called
        before job i (a case's fault schedule)."""
        t0 = time.time()
        for i in range(count):
            if during:
                during(i)
            delay = t0 + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            self.publish(self.message(i), job_faults)
        self.publisher.close()

    def terminal(self, job_ids=None):
        """{job_id: "completed"|"failed"} of the jobs with a terminal event so far."""
        out = {}
        for e in self.collector.events():
            if e.get("event") in checker.TERMINALS and (job_ids is None or e.get("job_id") in job_ids):
                out[e["job_id"]] = "completed" if e["event"] == "backup.completed" else "failed"
        return out

    def wait_terminal(self, timeout, job_ids=None):
        """Waits until every published job (or job_ids) has a terminal event; returns the ones
        without one at the end."""
        want = set(job_ids if job_ids is not None else self.published)
        end = time.time() + timeout
        while time.time() < end:
            left = want - set(self.terminal(want))
            if not left:
                return set()
            time.sleep(0.5)
        return want - set(self.terminal(want))

    def events_by_host(self, host):
        return [e for e in self.collector.events() if e.get("host") == host]

    def history(self):
        """The run's History (events of other fleet runs left on a shared broker are not ours:
        dropped here; every other event is judged)."""
        mine = JOB_PREFIX + self.tag + "-"
        evs = [e for e in self.collector.events()
               if not (isinstance(e.get("job_id"), str) and e["job_id"].startswith(JOB_PREFIX)
                       and not e["job_id"].startswith(mine))]
        return checker.History(self.published, self.indeterminate, evs,
                               self.sim.get("/_sim/requests")["requests"],
                               self.sim.get("/_sim/snapshots")["snapshots"])

    def close(self, keep=False):
        """Stops every worker (SIGTERM, then SIGKILL), the simulator, the proxies and the
        collector (deleting its queue); returns (exit codes, leftovers)."""
        codes, left = {}, []
        for h in self.hosts:
            codes.update(h.stop())
        for h in self.hosts:
            left += h.leftovers()
            for p in h.proxies + [h.sna_proxy]:
                try:
                    p.close()
                except Exception:  # noqa: BLE001
                    pass
        self.publisher.close()
        self.collector.close()
        self.sim.stop()
        self.hub.close()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return codes, left
