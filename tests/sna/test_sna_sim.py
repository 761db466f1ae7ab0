#!/usr/bin/python3
"""Self-test of the SNA simulator (tests/sna/sna_sim.py) against real qemu-nbd servers.

Run:  /usr/bin/python3 tests/sna/test_sna_sim.py [-v]

Starts the simulator on a free port in 23000-23999 with a token, creates a VM of three
disks (2000: 8 MiB, 2001: 4 MiB + 512 B, 16000: 1 MiB), and checks:
  * a full backup into three qcow2 images served by qemu-nbd, posted exactly as the worker
    posts it (CONTRACT.md §3.1 body and headers), polled to completion while a writer
    keeps changing the source disks: each image equals its snapshot (qemu-img compare),
    and the three snapshots were taken at one instant of the write sequence;
  * an incremental into qcow2 overlays: each overlay equals the new snapshot through its
    backing chain, and exactly the changed blocks (fewer bytes than the disk) were sent;
  * validation (400 missing field / incremental without previous_change_id / wrong
    Idempotency-Key / foreign disk / targets vs disks, 401, 404, 409, 415);
  * the fault knobs (start_5xx, start_4xx, hang_start_s, forget_job, fail_disk,
    complete_early, slow_bytes_per_s, die_mid_transfer), invalid change ids, cleanup;
  * /_sim/requests and /_sim/snapshots: one accepted start and one snapshot per job;
  * restart on the same state (VMs and change ids survive, jobs do not) and SIGTERM -> 0;
  * a hostile SNA: per-job knobs; every progress_garbage class (each reply uncountable by
    CONTRACT §3.2 but huge and huge_padding, which a worker must read), progress_garbage_n
    (garbage, then the truth, the copy going on beneath), every start_garbage class (a 200
    that still accepts the job) and every lie_complete class (with a copy still running).
  * NBD over TLS with a PSK (nbd_tls, nbds:// URLs): validation, the 0600 key file, jobs
    copied byte-identical over TLS by nbdcopy and by libnbd into qemu-nbd with
    tls-creds-psk, a wrong key failing the job, a plain client refused, the key masked in
    /_sim/requests and absent from the log, the key file removed at cleanup and reset;
  * https (--tls-cert/--tls-key, --tls-client-ca) with openssl-made certificates: right CA,
    wrong CA, wrong name, plain client, client certificate required/absent/foreign.
Every progress answer is checked against schemas/sna/progress-response.json when the schema
tests are importable. Prints "N passed, M failed"; exits 1 on any failure. Every process
it starts is stopped by PID and its temporary directory removed, also on failure.
"""

import hashlib
import http.client
import json
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import nbd

import pki

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SIM = os.path.join(HERE, "sna_sim.py")
PY = "/usr/bin/python3"
TOKEN = "s3cret-t0ken"
VM_PATH = "/DatabanxDC/vm/pg test, \"1\" \u2603"
SIZES = {2000: 8 * 1024 * 1024, 2001: 4 * 1024 * 1024 + 512, 16000: 1024 * 1024}
BS = 65536
VERBOSE = "-v" in sys.argv

try:
    sys.path.insert(0, os.path.join(REPO, "tests", "schema"))
    import test_event_schemas as schemas  # noqa: E402
except Exception as e:  # noqa: BLE001
    schemas = None
    print(f"note: schema checks skipped ({e})")

passed = 0
failed = 0


def ok(cond, name, detail=""):
    global passed, failed
    if cond:
        passed += 1
        if VERBOSE:
            print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}" + (f": {detail}" if detail else ""))
    return cond


class Env:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="sna-sim-test-")
        self.state = os.path.join(self.tmp, "state")
        self.procs = []           # every process we started (Popen)
        self.used_ports = set()
        self.sim = None
        self.port = None
        self.ssl_ctx = None       # set: the control and contract calls go over https
        self.host = "127.0.0.1"   # the name the https client asks for (SNI, verification)

    # ------------------------------------------------------------ processes

    def free_port(self):
        for _ in range(400):
            p = random.randint(23000, 23999)
            if p in self.used_ports:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            finally:
                s.close()
            self.used_ports.add(p)
            return p
        raise RuntimeError("no free port in 23000-23999")

    def start_sim(self, extra=(), https=False):
        for _ in range(5):
            port = self.free_port()
            p = subprocess.Popen([PY, SIM, "--port", str(port), "--state", self.state, "--token", TOKEN,
                                  *extra], stdout=subprocess.PIPE, stderr=open(os.path.join(self.tmp, "sim.log"), "ab"))
            self.procs.append(p)
            line = b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and p.poll() is None:
                r, _, _ = select.select([p.stdout], [], [], 0.2)
                if r:
                    line = p.stdout.readline()
                    break
            scheme = "https://" if https else ""
            if line.startswith(f"sna_sim: listening on {scheme}127.0.0.1:{port} pid={p.pid}".encode()):
                self.sim, self.port = p, port
                return line.decode().strip()
            self.stop(p, sig=signal.SIGKILL)
        raise RuntimeError("the simulator did not start; see sim.log")

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.procs:
            self.procs.remove(p)
        if p.stdout:
            p.stdout.close()
        return p.returncode

    def serve(self, job_id, images, tls=None):
        """One qemu-nbd per disk, as the worker starts them; returns {key: (proc, url)}. With
        tls = (dir, identity, client psk file): TLS with the PSK in dir/keys.psk, nbds:// URLs."""
        servers = {}
        for key, img in images.items():
            for attempt in range(3):
                port = self.free_port()
                export = f"{job_id}-{key}"
                obj = []
                if tls:
                    obj = ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={tls[0]}", "--tls-creds=tls0"]
                p = subprocess.Popen(["qemu-nbd", *obj, "--format=qcow2", f"--export-name={export}", "--persistent",
                                      "--shared=8", "--bind=127.0.0.1", f"--port={port}", img],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.tmp, f"qemu-nbd-{export}.log"), "ab"))
                self.procs.append(p)
                url = f"nbd{'s' if tls else ''}://127.0.0.1:{port}/{export}"
                probe = f"nbds://{tls[1]}@127.0.0.1:{port}/{export}?tls-psk-file={tls[2]}" if tls else url
                if self.wait_nbd(p, probe):
                    servers[key] = (p, url)
                    break
                self.stop(p, sig=signal.SIGKILL)
            else:
                raise RuntimeError(f"qemu-nbd for {img} did not start")
        return servers

    @staticmethod
    def wait_nbd(p, url):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            h = nbd.NBD()
            h.set_uri_allow_local_file(True)
            try:
                h.connect_uri(url)  # a full handshake: the server greets and knows the export
                h.shutdown()
                return True
            except nbd.Error:
                time.sleep(0.05)
            finally:
                del h
        return False

    def stop_servers(self, servers, label):
        for key, (p, _) in servers.items():
            rc = self.stop(p)
            ok(rc == 0, f"{label}: qemu-nbd for disk {key} exits 0 on SIGTERM", f"rc={rc}")

    def close(self):
        for p in list(self.procs):
            self.stop(p, sig=signal.SIGKILL if p is not self.sim else signal.SIGTERM)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------ HTTP

    def http(self, method, path, body=None, headers=None, timeout=10, raw=None):
        c = self.connection(timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            h = dict(headers or {})
            if data is not None and "Content-Type" not in h:
                h["Content-Type"] = "application/json"
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            text = r.read()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, {"raw": text.decode(errors="replace")}
        finally:
            c.close()

    def connection(self, timeout=10):
        if self.ssl_ctx is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_ctx)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def start(self, body, idem=None, token=TOKEN, timeout=10):
        h = {"Content-Type": "application/json", "Idempotency-Key": body.get("job_id") if idem is None else idem}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return self.http("POST", "/api/v1/backup/start", body=body, headers=h, timeout=timeout)

    def progress(self, job_id):
        return self.http("GET", f"/api/v1/progress/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})

    def cleanup(self, job_id):
        return self.http("POST", "/api/v1/cleanup", body={"job_id": job_id, "action": "cleanup_all"},
                         headers={"Authorization": f"Bearer {TOKEN}"})

    def wait_job(self, job_id, label, timeout=20, until=("completed", "failed")):
        deadline = time.monotonic() + timeout
        bad = []
        last = None
        while time.monotonic() < deadline:
            st, doc = self.progress(job_id)
            if st != 200:
                return st, doc
            if schemas is not None:
                errs = schemas.check("progress-response", doc)
                if errs:
                    bad.append(errs)
            last = doc
            if doc.get("status") in until:
                break
            time.sleep(0.05)
        ok(not bad, f"{label}: every progress answer matches schemas/sna/progress-response.json", str(bad[:1]))
        return 200, last


def start_body(job_id, backup_type, targets, vm_path=VM_PATH):
    """The body the worker posts (CONTRACT.md §3.1); targets = [(key, url, size, prev)]."""
    first = next((prev for _, _, _, prev in targets if prev), "")
    return {
        "job_id": job_id,
        "vm_name": "pg test, \"1\" \u2603",
        "vm_path": vm_path,
        "vcenter_host": "vcenter.example", "vcenter_user": "backup@vsphere.local",
        "vcenter_password": "p@ss word",
        "backup_type": backup_type,
        "previous_change_id": first,
        "nbd_host": "127.0.0.1",
        "nbd_targets": ",".join(f"{k}:{u}" for k, u, _, _ in targets),
        "disks": [{"key": k, "nbd_url": u, "size_bytes": s, "previous_change_id": p} for k, u, s, p in targets],
    }


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


def gen_of(change_id):
    return int(change_id.rpartition("/")[2])


def blocks_bytes(blocks, size):
    return sum(min(BS, size - b * BS) for b in blocks)


class Writer(threading.Thread):
    """Keeps writing to the three source disks, one write at a time, logging each result."""

    def __init__(self, env):
        super().__init__(daemon=True)
        self.env = env
        self.stop_ev = threading.Event()
        self.log = []             # (key, offset, length, change_id) in order
        self.errors = []

    def run(self):
        rng = random.Random(7)
        keys = list(SIZES)
        i = 0
        while not self.stop_ev.is_set():
            key = keys[i % len(keys)]
            off = rng.randrange(0, 4 * BS - 4096)     # confined to the first 4 blocks
            length = rng.randrange(1, 4096)
            st, doc = self.env.http("POST", "/_sim/write", body={"vm_path": VM_PATH, "key": key, "offset": off,
                                                                 "length": length, "seed": 1000 + i})
            if st != 200:
                self.errors.append((st, doc))
                return
            self.log.append((key, off, length, doc["change_id"]))
            i += 1
            time.sleep(0.003)


def dead_targets(env, job_id):
    return [(k, f"nbd://127.0.0.1:{env.free_port()}/{job_id}-{k}", SIZES[k], "") for k in SIZES]


def make_images(env, job_id, backing=None):
    images = {}
    for k, size in SIZES.items():
        img = os.path.join(env.tmp, f"{job_id}-{k}.qcow2")
        if backing:
            rc, out = qemu_img("create", "-q", "-f", "qcow2", "-b", backing[k], "-F", "qcow2", img, str(size))
        else:
            rc, out = qemu_img("create", "-q", "-f", "qcow2", img, str(size))
        if rc != 0:
            raise RuntimeError(out)
        images[k] = img
    return images


def sim_requests(env):
    return env.http("GET", "/_sim/requests")[1]["requests"]


def sim_snapshots(env):
    return env.http("GET", "/_sim/snapshots")[1]["snapshots"]


def compare_snapshot(env, jid, images, label, what="the image equals the snapshot"):
    """One ok() a disk: images[key] (qcow2, its servers may still run) equals the job's snapshot
    of the disk (raw); named "<label> disk <key>: <what>"."""
    snap = [x for x in sim_snapshots(env) if x["job_id"] == jid][0]["disks"]
    for k in SIZES:
        rc, out = qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", images[k], snap[str(k)]["path"])
        ok(rc == 0, f"{label} disk {k}: {what}", out)


def run(env):
    line = env.start_sim()
    ok(True, f"simulator started: {line}")

    # ------------------------------------------------------------------ the VM
    st, vm = env.http("POST", "/_sim/vm", body={"vm_path": VM_PATH, "seed": 42,
                                                 "disks": {str(k): {"size": s} for k, s in SIZES.items()}})
    ok(st == 200 and [d["key"] for d in vm["disks"]] == list(SIZES), "create a VM of 3 disks", str(vm))
    for d in vm["disks"]:
        ok(os.path.getsize(d["path"]) == SIZES[d["key"]], f"source disk {d['key']} has its exact size")
        ok(" " in d["change_id"] and "/" in d["change_id"], f"disk {d['key']} change id looks like VMware's",
           d["change_id"])
    st, _ = env.http("POST", "/_sim/vm", body={"vm_path": VM_PATH, "disks": {"2000": {"size": 512}}})
    ok(st == 409, "creating the same VM again is 409", str(st))
    initial_gen = {d["key"]: gen_of(d["change_id"]) for d in vm["disks"]}

    # ------------------------------------------------------------------ full backup + consistency
    job1 = "bk-1"
    images1 = make_images(env, job1)
    servers = env.serve(job1, images1)
    body1 = start_body(job1, "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES])
    if schemas is not None:
        ok(schemas.check("backup-start-request", body1) == [], "the test's full start body matches the schema",
           str(schemas.check("backup-start-request", body1)))
    writer = Writer(env)
    writer.start()
    time.sleep(0.15)
    st, rep = env.start(body1)
    ok(st == 200 and rep.get("job_id") == job1 and rep.get("status") == "started"
       and isinstance(rep.get("pid"), int) and rep.get("started_at") and "message" in rep,
       "full start: 200 {job_id, status: started, message, started_at, pid}", f"{st} {rep}")
    st, prog = env.wait_job(job1, "full")
    time.sleep(0.1)
    writer.stop_ev.set()
    writer.join()
    ok(not writer.errors and len(writer.log) > 5, "the writer kept writing during the job",
       f"{len(writer.log)} writes, errors {writer.errors[:1]}")
    ok(st == 200 and prog["status"] == "completed" and prog["error"] == "", "full job completed", str(prog))
    env.stop_servers(servers, "full")
    snaps = [s for s in sim_snapshots(env) if s["job_id"] == job1]
    ok(len(snaps) == 1, "one snapshot recorded for the full job", str(snaps))
    snap1 = snaps[0]["disks"] if snaps else {}
    for d in prog["disks"]:
        k = d["key"]
        ok(d["status"] == "completed" and d["change_id"] and d["change_id"] == snap1.get(str(k), {}).get("change_id"),
           f"full disk {k}: completed with the snapshot's change id", str(d))
        ok(d["bytes_transferred"] == d["total_bytes"] == SIZES[k], f"full disk {k}: all bytes counted", str(d))
        rc, out = qemu_img("compare", "-f", "qcow2", "-F", "raw", images1[k], snap1[str(k)]["path"])
        ok(rc == 0, f"full disk {k}: the qcow2 equals the snapshot", out)
    # One instant: the snapshot's generations are the state after some prefix of the writes.
    gens = dict(initial_gen)
    states = [dict(gens)]
    for key, _, _, cid in writer.log:
        gens[key] = gen_of(cid)
        states.append(dict(gens))
    snap_gens = {int(k): gen_of(v["change_id"]) for k, v in snap1.items()}
    before = {k: g - 1 for k, g in snap_gens.items()}  # a snapshot gives each disk a new change id
    instants = [i for i, s in enumerate(states) if s == before]
    ok(len(instants) == 1, "the three disks were snapshotted at one instant of the write sequence",
       f"snapshot gens {snap_gens}, writes {len(writer.log)}")
    ok(0 < (instants[0] if instants else 0) < len(states) - 1, "the snapshot fell between writes (writer active around it)",
       f"instant {instants} of {len(states) - 1}")

    # ------------------------------------------------------------------ incremental
    inc_writes = [(2000, 5 * 1024 * 1024 + 1000, 100000), (2001, 4 * 1024 * 1024, 512), (16000, 0, 1),
                  (2000, 7 * 1024 * 1024, 65536)]
    changed = {k: set() for k in SIZES}
    for key, off, length, cid in writer.log:
        if gen_of(cid) > snap_gens[key]:
            changed[key].update(range(off // BS, (off + length - 1) // BS + 1))
    for i, (key, off, length) in enumerate(inc_writes):
        st, doc = env.http("POST", "/_sim/write", body={"vm_path": VM_PATH, "key": key, "offset": off,
                                                       "length": length, "seed": 77 + i})
        ok(st == 200 and gen_of(doc["change_id"]) > snap_gens[key], f"write {i} to disk {key} bumps its change id",
           str(doc))
        changed[key].update(range(off // BS, (off + length - 1) // BS + 1))
    job2 = "bk-2"
    images2 = make_images(env, job2, backing=images1)
    servers = env.serve(job2, images2)
    prev = {d["key"]: d["change_id"] for d in prog["disks"]}
    body2 = start_body(job2, "incremental", [(k, servers[k][1], SIZES[k], prev[k]) for k in SIZES])
    if schemas is not None:
        ok(schemas.check("backup-start-request", body2) == [], "the test's incremental start body matches the schema")
    st, rep = env.start(body2)
    ok(st == 200, "incremental start: 200", f"{st} {rep}")
    st, prog2 = env.wait_job(job2, "incremental")
    ok(st == 200 and prog2["status"] == "completed", "incremental job completed", str(prog2))
    env.stop_servers(servers, "incremental")
    snaps = [s for s in sim_snapshots(env) if s["job_id"] == job2]
    ok(len(snaps) == 1, "one snapshot recorded for the incremental job")
    snap2 = snaps[0]["disks"] if snaps else {}
    for d in prog2["disks"]:
        k = d["key"]
        ok(d["status"] == "completed" and d["change_id"] == snap2[str(k)]["change_id"] != prev[k],
           f"incremental disk {k}: completed with a new change id", str(d))
        want = blocks_bytes(changed[k], SIZES[k])
        ok(d["bytes_transferred"] == d["total_bytes"] == want < SIZES[k],
           f"incremental disk {k}: exactly the changed blocks were sent ({want} of {SIZES[k]} bytes)", str(d))
        rc, out = qemu_img("compare", "-f", "qcow2", "-F", "raw", images2[k], snap2[str(k)]["path"])
        ok(rc == 0, f"incremental disk {k}: the overlay (through its chain) equals the new snapshot", out)
        rc, out = qemu_img("compare", "-f", "qcow2", "-F", "raw", images1[k], snap1[str(k)]["path"])
        ok(rc == 0, f"incremental disk {k}: the full image under it is unchanged", out)

    # ------------------------------------------------------------------ incremental with an unchanged and a new disk
    st, doc = env.http("POST", "/_sim/write", body={"vm_path": VM_PATH, "key": 2001, "offset": 3 * BS - 10,
                                                   "length": 20, "seed": 5})
    ok(st == 200, "write across a block boundary of disk 2001")
    job3 = "bk-3"
    images3 = make_images(env, job3, backing=images2)
    fresh = make_images(env, job3 + "-new")
    images3[16000] = fresh[16000]
    servers = env.serve(job3, images3)
    prev2 = {d["key"]: d["change_id"] for d in prog2["disks"]}
    prev3 = {2000: prev2[2000], 2001: prev2[2001], 16000: ""}
    body3 = start_body(job3, "incremental", [(k, servers[k][1], SIZES[k], prev3[k]) for k in SIZES])
    ok(body3["previous_change_id"] == prev2[2000], "top-level previous_change_id is the first non-empty one")
    st, rep = env.start(body3)
    ok(st == 200, "incremental with a new disk: 200", f"{st} {rep}")
    st, prog3 = env.wait_job(job3, "incremental with a new disk")
    ok(st == 200 and prog3["status"] == "completed", "incremental with a new disk: completed", str(prog3))
    env.stop_servers(servers, "incremental with a new disk")
    snap3 = [s for s in sim_snapshots(env) if s["job_id"] == job3][0]["disks"]
    by = {d["key"]: d for d in prog3["disks"]}
    ok(by[2000]["bytes_transferred"] == by[2000]["total_bytes"] == 0 and by[2000]["change_id"]
       and by[2000]["change_id"] != prev2[2000], "an unchanged disk: 0 bytes, completed with a new change id",
       str(by[2000]))
    ok(by[2001]["bytes_transferred"] == 2 * BS, "a 20-byte write across a block boundary sends 2 blocks",
       str(by[2001]))
    ok(by[16000]["bytes_transferred"] == by[16000]["total_bytes"] == SIZES[16000],
       "a disk with previous_change_id \"\" in an incremental is copied in full", str(by[16000]))
    for k in SIZES:
        rc, out = qemu_img("compare", "-f", "qcow2", "-F", "raw", images3[k], snap3[str(k)]["path"])
        ok(rc == 0, f"incremental with a new disk, disk {k}: the image equals the snapshot", out)

    # ------------------------------------------------------------------ concurrent jobs (same VM twice, another VM)
    vm2_path = "/DatabanxDC/vm/other"
    st, _ = env.http("POST", "/_sim/vm", body={"vm_path": vm2_path, "seed": 9, "disks": {"2000": {"size": 2 * 1024 * 1024}}})
    ok(st == 200, "create a second VM")
    conc = {}
    for jid, path, sizes in (("bk-c1", VM_PATH, SIZES), ("bk-c2", VM_PATH, SIZES),
                             ("bk-c3", vm2_path, {2000: 2 * 1024 * 1024})):
        imgs = {}
        for k, size in sizes.items():
            imgs[k] = os.path.join(env.tmp, f"{jid}-{k}.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", imgs[k], str(size))
        srv = env.serve(jid, imgs)
        conc[jid] = (imgs, srv)
        st, _ = env.start(start_body(jid, "full", [(k, srv[k][1], sizes[k], "") for k in sizes], vm_path=path))
        ok(st == 200, f"concurrent start {jid}: 200")
    for jid, (imgs, srv) in conc.items():
        st, pc = env.wait_job(jid, f"concurrent {jid}")
        ok(st == 200 and pc["status"] == "completed", f"concurrent {jid}: completed", str(pc))
        env.stop_servers(srv, f"concurrent {jid}")
        snap = [s for s in sim_snapshots(env) if s["job_id"] == jid]
        for k, img in imgs.items():
            rc, out = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, snap[0]["disks"][str(k)]["path"])
            ok(len(snap) == 1 and rc == 0, f"concurrent {jid} disk {k}: the image equals its own snapshot", out)

    # ------------------------------------------------------------------ validation
    tmpl = start_body("bk-v", "full", dead_targets(env, "bk-v"))

    def variant(jid, **changes):
        b = json.loads(json.dumps(tmpl))
        b["job_id"] = jid
        for k, v in changes.items():
            if v is None:
                b.pop(k, None)
            else:
                b[k] = v
        return b

    st, rep = env.start(variant("bk-v1", vm_path=None))
    ok(st == 400 and "vm_path" in rep.get("error", ""), "missing vm_path: 400 naming the field", f"{st} {rep}")
    st, rep = env.start(variant("bk-v2", vcenter_password=None))
    ok(st == 400 and "vcenter_password" in rep.get("error", ""), "missing vcenter_password: 400 naming it", f"{st} {rep}")
    b = variant("bk-v3", backup_type="incremental")
    st, rep = env.start(b)
    ok(st == 400 and "previous_change_id" in rep.get("error", ""), "incremental without previous_change_id: 400",
       f"{st} {rep}")
    st, rep = env.start(variant("bk-v4", backup_type="differential"))
    ok(st == 400 and "backup_type" in rep.get("error", ""), "bad backup_type: 400", f"{st} {rep}")
    st, rep = env.start(variant("bk-v5"), idem="bk-other")
    ok(st == 400 and "Idempotency-Key" in rep.get("error", ""), "wrong Idempotency-Key: 400", f"{st} {rep}")
    st, rep = env.start(variant("bk-v5"), idem="")
    ok(st == 400, "empty Idempotency-Key: 400", f"{st} {rep}")
    st, rep = env.start(variant("bk-v6"), token="wrong")
    ok(st == 401, "bad token: 401", f"{st} {rep}")
    st, rep = env.start(variant("bk-v6"), token=None)
    ok(st == 401, "no token: 401", f"{st} {rep}")
    st, rep = env.start(variant("bk-v7", vm_path="/DatabanxDC/vm/nope"))
    ok(st == 404, "unknown VM: 404", f"{st} {rep}")
    b = variant("bk-v8")
    b["disks"][0]["key"] = 2999
    b["nbd_targets"] = ",".join(f"{d['key']}:{d['nbd_url']}" for d in b["disks"])
    st, rep = env.start(b)
    ok(st == 400 and "2999" in rep.get("error", ""), "a target disk that is not the VM's: 400", f"{st} {rep}")
    b = variant("bk-v9")
    b["disks"][1]["nbd_url"] = b["disks"][1]["nbd_url"].replace("bk-v-", "bk-x-")
    st, rep = env.start(b)
    ok(st == 400 and "disagree" in rep.get("error", ""), "nbd_targets and disks[] disagreeing: 400", f"{st} {rep}")
    st, rep = env.start(variant("bk-v10", nbd_targets="2000:http://x/y"))
    ok(st == 400 and "nbd_targets" in rep.get("error", ""), "unparsable nbd_targets: 400", f"{st} {rep}")
    st, rep = env.start(variant("bk-v11", job_id="bad:id"), idem="bad:id")
    ok(st == 400 and "job_id" in rep.get("error", ""), "job_id outside the alphabet: 400", f"{st} {rep}")
    st, rep = env.http("POST", "/api/v1/backup/start", raw=b"{not json",
                       headers={"Content-Type": "application/json", "Idempotency-Key": "x",
                                "Authorization": f"Bearer {TOKEN}"})
    ok(st == 400, "invalid JSON: 400", f"{st} {rep}")
    st, rep = env.http("POST", "/api/v1/backup/start", raw=json.dumps(variant("bk-v12")).encode(),
                       headers={"Content-Type": "text/plain", "Idempotency-Key": "bk-v12",
                                "Authorization": f"Bearer {TOKEN}"})
    ok(st == 415, "wrong Content-Type: 415", f"{st} {rep}")
    st, rep = env.start(body1)
    ok(st == 409, "the same job_id again: 409", f"{st} {rep}")
    st, _ = env.progress("bk-nope")
    ok(st == 404, "progress of an unknown job: 404")
    st, _ = env.cleanup("bk-nope")
    ok(st == 404, "cleanup of an unknown job: 404")
    st, _ = env.http("GET", f"/api/v1/progress/{job1}")
    ok(st == 401, "progress without the token: 401")

    # ------------------------------------------------------------------ start_5xx, cleanup
    st, f = env.http("POST", "/_sim/faults", body={"start_5xx": 2})
    ok(st == 200 and f["faults"] == {"start_5xx": 2}, "set start_5xx", str(f))
    b5 = start_body("bk-5", "full", dead_targets(env, "bk-5"))
    codes = [env.start(b5)[0] for _ in range(3)]
    ok(codes == [503, 503, 200], "start_5xx 2: 503, 503, then 200 with the same Idempotency-Key", str(codes))
    st, p5 = env.wait_job("bk-5", "unreachable targets")
    ok(p5["status"] == "failed" and all(d["status"] == "failed" and "nbdcopy" in d.get("error", p5["error"])
                                        for d in p5["disks"]) and p5["error"],
       "unreachable NBD targets: every disk failed, job failed with an error", str(p5))
    jdir = os.path.join(env.state, "jobs", "bk-5")
    ok(os.path.isdir(jdir), "the snapshot dir exists before cleanup")
    st, rep = env.cleanup("bk-5")
    ok(st == 200 and not os.path.exists(jdir), "cleanup: 200 and the snapshot dir is gone", f"{st} {rep}")
    ok(env.cleanup("bk-5")[0] == 404, "cleanup again: 404")
    ok(env.progress("bk-5")[0] == 404, "progress after cleanup: 404")
    ok(env.start(b5)[0] == 409, "start after cleanup: still 409 (the job_id stays known)")

    # ------------------------------------------------------------------ start_4xx, hang_start_s
    env.http("POST", "/_sim/faults", body={"start_4xx": True})
    st, rep = env.start(start_body("bk-4", "full", dead_targets(env, "bk-4")))
    ok(st == 400 and rep.get("error") == "simulated rejection", "start_4xx: 400 simulated rejection", f"{st} {rep}")
    env.http("POST", "/_sim/faults", body={})
    env.http("POST", "/_sim/faults", body={"hang_start_s": 1.0})
    t0 = time.monotonic()
    try:
        st, _ = env.start(start_body("bk-h", "full", dead_targets(env, "bk-h")), timeout=0.4)
    except (socket.timeout, TimeoutError):
        st = "timeout"
    ok(st == "timeout" and time.monotonic() - t0 < 1.0, "hang_start_s: the client times out", str(st))
    env.http("POST", "/_sim/faults", body={})
    time.sleep(0.8)
    ok(env.progress("bk-h")[0] == 404, "a hung start is not accepted (progress 404)")
    ok(any(r["path"] == "/api/v1/backup/start" and r["headers"]["Idempotency-Key"] == "bk-h" and r["status"] == 503
           for r in sim_requests(env)), "the hung request is recorded with 503")

    # ------------------------------------------------------------------ forget_job
    env.http("POST", "/_sim/faults", body={"forget_job": True})
    st, _ = env.start(start_body("bk-6", "full", dead_targets(env, "bk-6")))
    ok(st == 200, "forget_job: start accepted")
    codes = []
    for _ in range(40):
        c = env.progress("bk-6")[0]
        codes.append(c)
        if c == 404:
            break
        time.sleep(0.05)
    ok(codes[-1] == 404, "forget_job: progress answers 404 once the job runs", str(codes))
    env.http("POST", "/_sim/faults", body={"forget_job": None})
    st, p6 = env.wait_job("bk-6", "after forget_job")
    ok(st == 200 and p6["status"] in ("running", "failed"), "after the knob is cleared the job answers again", str(p6))

    # ------------------------------------------------------------------ invalid change ids
    bogus = {2000: "garbage", 2001: prev[2001].rpartition("/")[0] + "/999999",
             16000: prev[2000]}  # 16000 gets another disk's id
    b8 = start_body("bk-8", "incremental", [(k, f"nbd://127.0.0.1:{env.free_port()}/bk-8-{k}", SIZES[k], bogus[k])
                                            for k in SIZES])
    ok(env.start(b8)[0] == 200, "incremental with invalid change ids: accepted")
    st, p8 = env.wait_job("bk-8", "invalid change ids")
    ok(p8["status"] == "failed" and all(d["status"] == "failed" for d in p8["disks"])
       and p8["error"].count("changeId") == 3 and "future" in p8["error"],
       "invalid, foreign and future change ids: every disk failed (invalid changeId)", str(p8))

    # ------------------------------------------------------------------ fail_disk (real targets)
    env.http("POST", "/_sim/faults", body={"fail_disk": 2001})
    images7 = make_images(env, "bk-7")
    servers = env.serve("bk-7", images7)
    ok(env.start(start_body("bk-7", "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES]))[0] == 200,
       "fail_disk: start accepted")
    st, p7 = env.wait_job("bk-7", "fail_disk")
    env.http("POST", "/_sim/faults", body={})
    env.stop_servers(servers, "fail_disk")
    by = {d["key"]: d for d in p7["disks"]}
    ok(p7["status"] == "failed" and by[2001]["status"] == "failed" and "simulated disk failure" in p7["error"]
       and 0 < by[2001]["bytes_transferred"] < by[2001]["total_bytes"],
       "fail_disk 2001: that disk failed after writing some bytes, job failed", str(p7))
    ok(by[2000]["status"] == by[16000]["status"] == "completed", "fail_disk: the other disks completed", str(p7))
    ok(env.cleanup("bk-7")[0] == 200, "cleanup of the failed job: 200")

    # ------------------------------------------------------------------ complete_early + slow_bytes_per_s
    env.http("POST", "/_sim/faults", body={"complete_early": True, "slow_bytes_per_s": 2 * 1024 * 1024})
    images9 = make_images(env, "bk-9")
    servers = env.serve("bk-9", images9)
    ok(env.start(start_body("bk-9", "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES]))[0] == 200,
       "complete_early: start accepted")
    st, p9 = env.wait_job("bk-9", "complete_early", timeout=5)
    ok(p9["status"] == "completed" and all(d["status"] == "completed" and d["change_id"]
                                           and d["bytes_transferred"] < d["total_bytes"] for d in p9["disks"]),
       "complete_early: completed with change ids although bytes_transferred < total_bytes", str(p9))
    time.sleep(0.3)
    jobs = {j["job_id"]: j for j in env.http("GET", "/_sim/jobs")[1]["jobs"]}
    d2000 = [d for d in jobs["bk-9"]["disks"] if d["key"] == 2000][0]
    ok(d2000["status"] == "running" and d2000["method"] == "libnbd" and 0 < d2000["bytes"] < 2 * 1024 * 1024,
       "slow_bytes_per_s: the copy really is still running, throttled", str(d2000))
    st, rep = env.cleanup("bk-9")
    ok(st == 200 and not os.path.exists(os.path.join(env.state, "jobs", "bk-9")),
       "cleanup stops a running (throttled) copy and removes its snapshot", f"{st} {rep}")
    env.http("POST", "/_sim/faults", body={})
    env.stop_servers(servers, "complete_early")

    # ------------------------------------------------------------------ records
    reqs = sim_requests(env)
    snaps = sim_snapshots(env)
    accepted = {}
    for r in reqs:
        if r["path"] == "/api/v1/backup/start" and r["status"] == 200:
            accepted.setdefault(r["body"]["job_id"], 0)
            accepted[r["body"]["job_id"]] += 1
    ok(accepted == {j: 1 for j in ("bk-1", "bk-2", "bk-3", "bk-c1", "bk-c2", "bk-c3", "bk-5", "bk-6", "bk-8", "bk-7", "bk-9")},
       "/_sim/requests: exactly one accepted start per job", str(accepted))
    per_job = {}
    for s in snaps:
        per_job[s["job_id"]] = per_job.get(s["job_id"], 0) + 1
    ok(per_job == {j: 1 for j in accepted}, "/_sim/snapshots: exactly one snapshot per job", str(per_job))
    ok(all(len(s["disks"]) == (1 if s["job_id"] == "bk-c3" else 3) for s in snaps),
       "every snapshot covers all the VM's disks")
    r1 = [r for r in reqs if r["path"] == "/api/v1/backup/start" and (r["body"] or {}).get("job_id") == job1]
    ok([r["status"] for r in r1] == [200, 409], "bk-1: one start (200), then the duplicate (409)",
       str([r["status"] for r in r1]))
    ok(r1 and r1[0]["headers"]["Idempotency-Key"] == job1
       and r1[0]["headers"]["Authorization"].startswith("Bearer <masked")
       and r1[0]["body"]["vcenter_password"].startswith("<masked") and "p@ss" not in json.dumps(reqs),
       "requests record the headers with secrets masked", str(r1[:1]))
    if schemas is not None:
        ok(r1 and r1[0].get("contract_errors") == [], "the recorded start carries contract_errors: []",
           str(r1[0].get("contract_errors") if r1 else None))
    ok(any(r["path"].startswith("/api/v1/progress/") for r in reqs)
       and any(r["path"] == "/api/v1/cleanup" for r in reqs), "progress and cleanup requests are recorded too")
    st, rep = env.http("POST", "/_sim/faults", body={"no_such_knob": 1})
    ok(st == 400, "an unknown fault knob: 400")
    st, rep = env.http("POST", "/_sim/reset")
    ok(st == 200 and sim_requests(env) == [] and sim_snapshots(env) == [] and env.progress(job1)[0] == 404
       and not os.path.exists(os.path.join(env.state, "jobs", job1)),
       "reset forgets jobs, requests and snapshots (and removes their snapshot files)")
    st, vm_after = env.http("GET", "/_sim/vm?vm_path=" + urllib.parse.quote(VM_PATH))
    ok(st == 200 and len(vm_after["disks"]) == 3 and env.http("GET", "/_sim/vm?vm_path=/DatabanxDC/vm/other")[0] == 200,
       "reset keeps the VMs")

    # ------------------------------------------------------------------ die_mid_transfer, restart
    env.http("POST", "/_sim/faults", body={"die_mid_transfer": True})
    images10 = make_images(env, "bk-10")
    servers = env.serve("bk-10", images10)
    ok(env.start(start_body("bk-10", "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES]))[0] == 200,
       "die_mid_transfer: start accepted")
    try:
        rc = env.sim.wait(15)
    except subprocess.TimeoutExpired:
        rc = None
    ok(rc == 3, "die_mid_transfer: the simulator exits 3 mid-transfer", str(rc))
    env.stop(env.sim)
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if os.path.join(env.state, "jobs").encode() in cmd:
                left.append((pid, cmd[:80]))
    ok(not left, "die_mid_transfer: no copy process of the simulator is left", str(left))
    env.stop_servers(servers, "die_mid_transfer")
    line = env.start_sim()
    st, vm2 = env.http("GET", "/_sim/vm?vm_path=" + urllib.parse.quote(VM_PATH))
    want = [dict(d, change_id="%s/%d" % (d["change_id"].rpartition("/")[0], gen_of(d["change_id"]) + 1))
            for d in vm_after["disks"]]  # + the snapshot of bk-10
    ok(st == 200 and vm2["disks"] == want, "after a restart the VM and its change ids are kept",
       f"{vm2} vs {want}")
    ok(env.progress("bk-10")[0] == 404, "after a restart the job is lost (progress 404)")
    ok(env.start(start_body("bk-10", "full", dead_targets(env, "bk-10")))[0] == 409,
       "after a restart a job_id with a leftover snapshot is still known (409)")
    st, _ = env.cleanup("bk-10")
    ok(st == 200 and not os.path.exists(os.path.join(env.state, "jobs", "bk-10")),
       "cleanup removes the leftover snapshot of a lost job")
    ok(env.cleanup("bk-10")[0] == 404, "and then it is gone (404)")

    # ------------------------------------------------------------------ NBD over TLS with a PSK
    tls_psk(env)

    # ------------------------------------------------------------------ a hostile SNA
    hostile(env)
    rc = env.stop(env.sim)
    ok(rc == 0, "SIGTERM: the simulator exits 0", str(rc))

    # ------------------------------------------------------------------ https
    https(env)


TLS_ID = "bw-test.id_1"


def tls_body(env, job_id, servers, psk, identity=TLS_ID):
    body = start_body(job_id, "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES])
    body["nbd_tls"] = {"mode": "psk", "identity": identity, "psk": psk}
    return body


def file_has(path, needles):
    """Which of needles (str, matched in any case) occur in the file's bytes."""
    try:
        with open(path, "rb") as fh:
            data = fh.read().lower()
    except OSError:
        return []
    return [n for n in needles if n.lower().encode() in data]


def tls_psk(env):
    """nbd_tls (CONTRACT §3.1): validation, the key file, copies over TLS, a wrong key, masking."""
    psk = os.urandom(32).hex().upper()  # upper case: the key matches in any case
    keydir = os.path.join(env.tmp, "tls-keys")
    os.makedirs(keydir, mode=0o700)
    with open(os.path.join(keydir, "keys.psk"), "w") as fh:
        fh.write(f"{TLS_ID}:{psk}\n")
    client_psk = os.path.join(env.tmp, "client.psk")  # the test's own probe (wait_nbd)
    with open(client_psk, "w") as fh:
        fh.write(f"{TLS_ID}:{psk}\n")
    os.chmod(client_psk, 0o600)
    tls = (keydir, TLS_ID, client_psk)

    # validation: 400 before anything is written, never echoing the key
    jid = "bk-tls-v"
    plain = dead_targets(env, jid)
    tlsurls = [(k, u.replace("nbd://", "nbds://"), s_, p) for k, u, s_, p in plain]
    good = {"mode": "psk", "identity": TLS_ID, "psk": psk}
    bad63 = psk[:63]
    cases = [
        ("nbds:// without nbd_tls", start_body(jid, "full", tlsurls), "nbds:// URLs require nbd_tls"),
        ("nbd_tls with nbd:// URLs", dict(start_body(jid, "full", plain), nbd_tls=good), "every URL to be nbds://"),
        ("nbd_tls with one nbd:// URL", dict(start_body(jid, "full", tlsurls[:2] + plain[2:]), nbd_tls=good),
         "every URL to be nbds://"),
        ("mode x509", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, mode="x509")), "nbd_tls.mode"),
        ("psk of 63 hex digits", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, psk=bad63)), "nbd_tls.psk"),
        ("psk not hex", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, psk="g" * 64)), "nbd_tls.psk"),
        ("psk a number", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, psk=7)), "nbd_tls.psk"),
        ("identity with a colon", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, identity="bw:x")),
         "nbd_tls.identity"),
        ("identity of 65 characters", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, identity="i" * 65)),
         "nbd_tls.identity"),
        ("empty identity", dict(start_body(jid, "full", tlsurls), nbd_tls=dict(good, identity="")), "nbd_tls.identity"),
        ("nbd_tls not an object", dict(start_body(jid, "full", tlsurls), nbd_tls="psk"), "nbd_tls: must be an object"),
        ("nbd_tls without psk", dict(start_body(jid, "full", tlsurls), nbd_tls={"mode": "psk", "identity": TLS_ID}),
         "nbd_tls.psk"),
    ]
    for name, body, want in cases:
        st, rep = env.start(body)
        ok(st == 400 and want in rep.get("error", ""), f"nbd_tls validation, {name}: 400 ({want})", f"{st} {rep}")
        if schemas is not None:
            ok(schemas.check("backup-start-request", body) != [], f"nbd_tls validation, {name}: the schema refuses it too")
    ok(not os.path.exists(os.path.join(env.state, "jobs", jid)), "nbd_tls validation: nothing written for a 400")
    if schemas is not None:
        b = dict(start_body(jid, "full", tlsurls), nbd_tls=good)
        ok(schemas.check("backup-start-request", b) == [], "a TLS start body matches the schema",
           str(schemas.check("backup-start-request", b)))

    # a full job over TLS: nbdcopy with the key from the 0600 file; byte-identical images
    jid = "bk-tls-1"
    imgs = make_images(env, jid)
    servers = env.serve(jid, imgs, tls=tls)
    h = nbd.NBD()
    try:
        h.connect_uri(servers[2000][1].replace("nbds://", "nbd://"))
        plain_ok = True
    except nbd.Error as e:
        plain_ok = False
        plain_err = str(e)
    del h
    ok(not plain_ok and "TLS" in plain_err, "a plain nbd:// client (libnbd without TLS) is refused by the TLS server",
       plain_err if not plain_ok else "it connected")
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    try:
        h.connect_uri(servers[2000][1].replace("nbds://", f"nbds://{TLS_ID}@") + f"?tls-psk-file={client_psk}")
        h.shutdown()
        tls_ok = True
    except nbd.Error as e:
        tls_ok = str(e)
    del h
    ok(tls_ok is True, "and a client with the key connects (the server is really up)", str(tls_ok))
    body = tls_body(env, jid, servers, psk)
    st, rep = env.start(body)
    ok(st == 200, "TLS start: 200", f"{st} {rep}")
    kf = os.path.join(env.state, "jobs", jid, "tls.psk")
    try:
        fst, dst = os.stat(kf), os.stat(os.path.dirname(kf))
        with open(kf) as fh:
            content = fh.read()
    except OSError as e:
        fst = dst = None
        content = str(e)
    ok(fst is not None and fst.st_mode & 0o777 == 0o600 and dst.st_mode & 0o777 == 0o700
       and content.strip() == f"{TLS_ID}:{psk}",
       "the key is in jobs/<job_id>/tls.psk, 0600 in a 0700 dir, as <identity>:<psk>",
       f"{oct(fst.st_mode) if fst else None} {oct(dst.st_mode) if dst else None}")
    st, prog = env.wait_job(jid, "TLS full")
    ok(st == 200 and prog["status"] == "completed", "a full job over NBD TLS completed", str(prog))
    compare_snapshot(env, jid, imgs, "TLS full", "the image equals the snapshot (nbdcopy over TLS)")
    jobs = {j["job_id"]: j for j in env.http("GET", "/_sim/jobs")[1]["jobs"]}
    ok(all(d["method"] == "nbdcopy" for d in jobs[jid]["disks"]), "TLS full: copied by nbdcopy")

    # the same key with libnbd (a slowed copy goes through libnbd), on fresh images
    jid2 = "bk-tls-2"
    imgs2 = make_images(env, jid2)
    servers2 = env.serve(jid2, imgs2, tls=tls)
    env.http("POST", f"/_sim/faults?job={jid2}", body={"slow_bytes_per_s": 64 << 20})
    st, rep = env.start(tls_body(env, jid2, servers2, psk.lower()))
    st, prog = env.wait_job(jid2, "TLS libnbd")
    ok(st == 200 and prog["status"] == "completed", "a job over NBD TLS completed through libnbd", str(prog))
    env.stop_servers(servers2, "TLS libnbd")
    compare_snapshot(env, jid2, imgs2, "TLS libnbd")
    jobs = {j["job_id"]: j for j in env.http("GET", "/_sim/jobs")[1]["jobs"]}
    ok(all(d["method"] == "libnbd" for d in jobs[jid2]["disks"]), "TLS slowed: copied by libnbd")

    # a wrong key: the handshake fails, and so does the job (both copy methods)
    for jw, knobs in (("bk-tls-wrong", {}), ("bk-tls-wrong-l", {"slow_bytes_per_s": 64 << 20})):
        if knobs:
            env.http("POST", f"/_sim/faults?job={jw}", body=knobs)
        st, rep = env.start(tls_body(env, jw, servers, os.urandom(32).hex()))
        st, prog = env.wait_job(jw, f"TLS wrong key {jw}")
        ok(st == 200 and prog["status"] == "failed" and all(d["status"] == "failed" for d in prog["disks"]),
           f"a wrong key fails the job ({'libnbd' if knobs else 'nbdcopy'})", str(prog)[:300])
        env.cleanup(jw)
    # a plain start against the TLS server: the simulator as a plain client is refused
    jp = "bk-tls-plain"
    st, rep = env.start(start_body(jp, "full", [(k, servers[k][1].replace("nbds://", "nbd://"), SIZES[k], "")
                                                for k in SIZES]))
    st, prog = env.wait_job(jp, "plain to TLS")
    ok(st == 200 and prog["status"] == "failed", "a plain nbd:// job against the TLS exports fails", str(prog)[:300])
    env.cleanup(jp)
    env.stop_servers(servers, "TLS")

    # the key is never shown: /_sim/requests, the simulator's log; reveal needs the flag
    text = json.dumps(env.http("GET", "/_sim/requests")[1])
    ok(psk.lower() not in text.lower() and bad63.lower() not in text.lower(),
       "/_sim/requests never shows a psk (also a rejected one)")
    starts = [r for r in sim_requests(env) if r["path"] == "/api/v1/backup/start" and (r["body"] or {}).get("job_id") == jid]
    ok(starts and starts[0]["body"]["nbd_tls"] == {"mode": "psk", "identity": TLS_ID,
                                                   "psk": "<masked sha256:%s>" % hashlib.sha256(psk.encode()).hexdigest()[:12]},
       "/_sim/requests shows nbd_tls.psk masked as <masked sha256:12 hex>", str(starts[:1])[:300])
    st, rep = env.http("GET", "/_sim/requests?reveal=1")
    ok(st == 403, "reveal=1 without --test-reveal-secrets: 403", str(st))
    raw_bad = json.dumps(dict(start_body("bk-tls-raw", "full", tlsurls), nbd_tls=good))[:-1]  # cut: not JSON
    env.http("POST", "/api/v1/backup/start", raw=raw_bad.encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "bk-tls-raw"})
    rr = [r for r in sim_requests(env) if "body_raw" in r]
    ok(rr and psk.lower() not in rr[-1]["body_raw"].lower() and "p@ss word" not in rr[-1]["body_raw"],
       "an unparsable body is shown with its key and password masked", str(rr[-1:])[:300])
    ok(not file_has(os.path.join(env.tmp, "sim.log"), [psk, bad63]), "the simulator's log never holds a psk")

    # cleanup and reset remove the key file
    st, _ = env.cleanup(jid)
    ok(st == 200 and not os.path.exists(kf), "cleanup removes the job's key file")
    jr = "bk-tls-reset"
    imgs = make_images(env, jr)
    servers = env.serve(jr, imgs, tls=tls)
    env.http("POST", f"/_sim/faults?job={jr}", body={"slow_bytes_per_s": 1 << 20})
    st, _ = env.start(tls_body(env, jr, servers, psk))
    kr = os.path.join(env.state, "jobs", jr, "tls.psk")
    had = os.path.exists(kr)
    env.http("POST", "/_sim/reset")
    ok(st == 200 and had and not os.path.exists(kr), "reset removes the key file of a running job")
    env.stop_servers(servers, "TLS reset")


def make_pki(d):
    """Under d: ca.pem/ca.key, server.pem/.key (localhost), client.pem/.key (signed by the CA),
    other-ca.pem and rogue-client.pem/.key (signed by other-ca)."""
    pki.make_pki(d, [("server", "ca", pki.SERVER_EXT.format("localhost")), ("client", "ca", pki.CLIENT_EXT),
                     ("rogue-client", "other-ca", pki.CLIENT_EXT)])


def client_ctx(ca, cert=None):
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert + ".pem", cert + ".key")
    return ctx


def https(env):
    """--tls-cert/--tls-key (https) and --tls-client-ca (a client certificate required)."""
    pki = os.path.join(env.tmp, "pki")
    make_pki(pki)
    r = subprocess.run([PY, SIM, "--port", "0", "--state", env.state, "--tls-cert", f"{pki}/server.pem"],
                       capture_output=True, text=True, timeout=30)
    ok(r.returncode == 2 and "go together" in r.stderr, "--tls-cert without --tls-key: usage error", r.stderr[-200:])
    r = subprocess.run([PY, SIM, "--port", "0", "--state", env.state, "--tls-client-ca", f"{pki}/ca.pem"],
                       capture_output=True, text=True, timeout=30)
    ok(r.returncode == 2, "--tls-client-ca alone: usage error", r.stderr[-200:])

    line = env.start_sim(["--tls-cert", f"{pki}/server.pem", "--tls-key", f"{pki}/server.key"], https=True)
    ok(f"https://127.0.0.1:{env.port}" in line, "https: the ready line says https://", line)
    env.host, env.ssl_ctx = "localhost", client_ctx(f"{pki}/ca.pem")
    st, doc = env.http("GET", "/_sim/health")
    ok(st == 200 and doc.get("ok") is True, "https: the right CA and name: 200", f"{st} {doc}")
    # a silent client (TCP connect, no handshake) does not stall the others
    idle = socket.create_connection(("127.0.0.1", env.port))
    try:
        st, _ = env.http("GET", "/_sim/health", timeout=5)
        ok(st == 200, "https: a client that never starts its handshake does not block another")
    finally:
        idle.close()
    st, rep = env.start(start_body("bk-https-1", "full", dead_targets(env, "bk-https-1")))
    ok(st == 200, "https: a start with the token is accepted", f"{st} {rep}")
    env.cleanup("bk-https-1")
    for name, host, ctx, want in (("another CA", "localhost", client_ctx(f"{pki}/other-ca.pem"), "CERTIFICATE_VERIFY_FAILED"),
                                  ("a name not in the certificate", "127.0.0.1", client_ctx(f"{pki}/ca.pem"),
                                   "CERTIFICATE_VERIFY_FAILED")):
        env.host, env.ssl_ctx = host, ctx
        try:
            env.http("GET", "/_sim/health")
            err = "connected"
        except (ssl.SSLError, OSError) as e:
            err = str(e)
        ok(want in err, f"https: a client verifying with {name} refuses the simulator", err)
    env.host, env.ssl_ctx = "127.0.0.1", None
    try:
        st, _ = env.http("GET", "/_sim/health")
        err = f"status {st}"
    except (OSError, http.client.HTTPException) as e:
        err = type(e).__name__
    ok(not err.startswith("status 200"), "https: a plain http client gets no answer", err)
    ok(env.stop(env.sim) == 0, "https: SIGTERM exits 0")

    line = env.start_sim(["--tls-cert", f"{pki}/server.pem", "--tls-key", f"{pki}/server.key",
                          "--tls-client-ca", f"{pki}/ca.pem"], https=True)
    env.host, env.ssl_ctx = "localhost", client_ctx(f"{pki}/ca.pem", f"{pki}/client")
    st, doc = env.http("GET", "/_sim/health")
    ok(st == 200, "https with --tls-client-ca: a client certificate of that CA: 200", f"{st} {doc}")
    for name, ctx in (("no client certificate", client_ctx(f"{pki}/ca.pem")),
                      ("a client certificate of another CA", client_ctx(f"{pki}/ca.pem", f"{pki}/rogue-client"))):
        env.ssl_ctx = ctx
        try:
            st, _ = env.http("GET", "/_sim/health")
            err = f"status {st}"
        except (OSError, http.client.HTTPException) as e:
            err = f"{type(e).__name__}: {e}"
        ok(not err.startswith("status"), f"https with --tls-client-ca: {name} is refused", err)
    env.host, env.ssl_ctx = "127.0.0.1", None
    with open(os.path.join(env.tmp, "sim.log"), errors="replace") as fh:
        log = fh.read()
    ok("TLS handshake with 127.0.0.1" in log and "CERTIFICATE" in log.upper(),
       "https: the simulator logs the refused handshakes")
    ok(env.stop(env.sim) == 0, "https with --tls-client-ca: SIGTERM exits 0")


GARBAGE = ("wrong_types", "nulls", "deep", "not_json", "huge", "huge_padding", "oversize", "control",
           "unknown_status", "foreign_key")
COUNTED = ("huge", "huge_padding")  # right types and under 1 MiB: a worker must read these
FORGED = "\n2026-12-01T00:00:00.000Z bw-worker: job=%s completed"


def raw_get(env, path):
    """(status, Content-Type, body bytes) of a GET with the token."""
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        r = c.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        c.close()


def raw_start(env, body):
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
    try:
        c.request("POST", "/api/v1/backup/start", body=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json", "Idempotency-Key": body["job_id"],
                           "Authorization": f"Bearer {TOKEN}"})
        r = c.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        c.close()


def decoded(data):
    """The JSON document in data, or the reason it is none (like a strict parser)."""
    try:
        return json.loads(data.decode("utf-8")), None
    except RecursionError:
        return None, "too deep"
    except (UnicodeDecodeError, ValueError) as e:
        return None, str(e)[:60]


def countable(doc, data, job_keys):
    """What a strict worker makes of a progress reply (CONTRACT §3.2): None when it counts, else why."""
    if len(data) > 1 << 20:
        return "over 1 MiB"
    if not isinstance(doc, dict):
        return "not an object"
    if schemas is not None:
        errs = schemas.check("progress-response", doc)
        if errs:
            return errs[0]
    for d in doc.get("disks") or []:
        if d.get("key") not in job_keys:
            return "a foreign disk key"
        for f in ("bytes_transferred", "total_bytes"):
            if not 0 <= d[f] < 1 << 63:
                return f"{f} out of 0 - 2^63-1"
    return None


def hostile(env):
    """The hostile knobs: per-job faults, progress_garbage (+ _n), start_garbage, lie_complete."""
    # per-job knobs
    st, rep = env.http("POST", "/_sim/faults?job=bk-g0", body={"progress_garbage": "nope"})
    ok(st == 400 and "one of" in rep.get("error", ""), "progress_garbage: an unknown class is 400", f"{st} {rep}")
    st, rep = env.http("POST", "/_sim/faults?job=bk-g0", body={"start_4xx": True})
    ok(st == 400, "a knob that cannot be set for one job: 400", f"{st} {rep}")
    st, rep = env.http("POST", "/_sim/faults?job=bad:id", body={"lie_complete": "no_bytes"})
    ok(st == 400, "per-job knobs need a valid job_id", f"{st} {rep}")
    st, rep = env.http("POST", "/_sim/faults?job=bk-g0", body={"lie_complete": "no_bytes", "slow_bytes_per_s": 5})
    st2, glob = env.http("GET", "/_sim/faults")
    st3, mine = env.http("GET", "/_sim/faults?job=bk-g0")
    ok(st == 200 and glob["faults"] == {} and mine["faults"] == {"lie_complete": "no_bytes", "slow_bytes_per_s": 5},
       "per-job knobs are kept apart from the global ones", f"{rep} {glob} {mine}")
    env.http("POST", "/_sim/faults?job=bk-g0", body={})
    ok(env.http("GET", "/_sim/faults?job=bk-g0")[1]["faults"] == {}, "{} clears one job's knobs")

    # progress_garbage: every class, on jobs whose targets are dead (the bodies do not need a copy)
    keys = list(SIZES)
    for cls in GARBAGE:
        jid = f"bk-g-{cls.replace('_', '-')}"
        env.http("POST", f"/_sim/faults?job={jid}", body={"progress_garbage": cls})
        ok(env.start(start_body(jid, "full", dead_targets(env, jid)))[0] == 200, f"progress_garbage {cls}: start 200")
        why = []
        for i in range(5):
            st, ctype, data = raw_get(env, f"/api/v1/progress/{jid}")
            doc, err = decoded(data)
            why.append(err or countable(doc, data, keys))
            ok(st == 200, f"progress_garbage {cls} reply {i + 1}: status 200", str(st))
            if cls == "huge" or cls == "huge_padding":
                ok(800 * 1024 < len(data) < 1 << 20, f"progress_garbage {cls}: a body of ~900 KiB", str(len(data)))
            if cls == "oversize":
                ok(len(data) > 1 << 20, "progress_garbage oversize: over 1 MiB", str(len(data)))
            if cls == "deep":
                ok(data.count(b"[") >= 100000, "progress_garbage deep: 100000 levels", str(data.count(b"[")))
            if cls == "huge" and doc:
                ok(doc["status"] == "failed" and len(doc["error"].encode()) > 800 * 1024,
                   "progress_garbage huge: a counted failure with a 900 KiB error", doc["status"])
            if cls == "control" and doc:
                ok((FORGED % jid) in doc["error"] and (FORGED % jid) in doc["job_id"] and "\x1b" in doc["error"],
                   "progress_garbage control: a forged log line in error and job_id", repr(doc["error"][:80]))
            if cls == "not_json" and i == 0:
                ok(ctype == "text/html" and b"<html>" in data, "progress_garbage not_json: first an HTML page", ctype)
            if cls == "unknown_status" and doc:
                ok(doc["status"] == "done", "progress_garbage unknown_status: status done")
            if cls == "foreign_key" and doc:
                ok(len([d for d in doc["disks"] if d["key"] not in SIZES]) == 1,
                   "progress_garbage foreign_key: one disk key is not the job's", str([d["key"] for d in doc["disks"]]))
        if cls in COUNTED:
            ok(all(w is None for w in why), f"progress_garbage {cls}: every reply is a countable one", str(why))
        else:
            ok(all(w is not None for w in why), f"progress_garbage {cls}: no reply is countable", str(why))
        recs = [r for r in sim_requests(env) if r["path"] == f"/api/v1/progress/{jid}"]
        ok([r.get("fault") for r in recs] == [f"progress_garbage:{cls}"] * 5,
           f"progress_garbage {cls}: /_sim/requests marks the 5 replies", str([r.get("fault") for r in recs]))
        env.cleanup(jid)

    # start_garbage: a 200 whose body is garbage; the job is accepted all the same
    for cls in GARBAGE:
        jid = f"bk-s-{cls.replace('_', '-')}"
        env.http("POST", f"/_sim/faults?job={jid}", body={"start_garbage": cls})
        st, ctype, data = raw_start(env, start_body(jid, "full", dead_targets(env, jid)))
        doc, err = decoded(data)
        named = doc.get("job_id") if isinstance(doc, dict) else None
        ok(st == 200 and env.progress(jid)[0] == 200, f"start_garbage {cls}: 200 and the job is accepted", str(st))
        if cls in ("wrong_types", "nulls", "deep", "not_json"):
            ok(not isinstance(named, str), f"start_garbage {cls}: the body has no string job_id", repr(named)[:80])
        elif cls == "huge":
            ok(isinstance(named, str) and len(named.encode()) > 800 * 1024, "start_garbage huge: a 900 KiB job_id")
        elif cls == "control":
            ok(isinstance(named, str) and (FORGED % jid) in named, "start_garbage control: a forged log line in job_id")
        elif cls == "foreign_key":
            ok(named == "someone-elses-job-1", "start_garbage foreign_key: another job's id", repr(named))
        else:
            ok(named == jid, f"start_garbage {cls}: names the job", repr(named)[:80])
        env.cleanup(jid)

    # lie_complete: every class on dead targets (nothing is ever written)
    for cls in ("no_bytes", "short_total", "empty_change_id", "null_change_id", "object_change_id"):
        jid = f"bk-l-{cls.replace('_', '-')}"
        env.http("POST", f"/_sim/faults?job={jid}", body={"lie_complete": cls})
        env.start(start_body(jid, "full", dead_targets(env, jid)))
        st, doc = env.progress(jid)
        disks = doc.get("disks", [])
        ok(st == 200 and doc["status"] == "completed" and len(disks) == 3
           and all(d["status"] == "completed" for d in disks), f"lie_complete {cls}: every disk completed at once",
           str(doc))
        want = {
            "no_bytes": lambda d: d["bytes_transferred"] == 0 and d["total_bytes"] == SIZES[d["key"]] and d["change_id"],
            "short_total": lambda d: d["bytes_transferred"] == d["total_bytes"] == 1 and d["change_id"],
            "empty_change_id": lambda d: d["bytes_transferred"] == d["total_bytes"] == SIZES[d["key"]]
            and d["change_id"] == "",
            "null_change_id": lambda d: d["change_id"] is None and "bytes_transferred" not in d
            and "total_bytes" not in d,
            "object_change_id": lambda d: d["change_id"] == {"a": 1} and d["bytes_transferred"] == d["total_bytes"] == 1,
        }[cls]
        ok(all(want(d) for d in disks), f"lie_complete {cls}: the disks carry the lie", str(disks))
        env.cleanup(jid)

    # progress_garbage_n on real targets: 2 garbage replies, then the truth; the copy went on
    jid = "bk-gn"
    env.http("POST", f"/_sim/faults?job={jid}", body={"progress_garbage": "not_json", "progress_garbage_n": 2})
    imgs = make_images(env, jid)
    servers = env.serve(jid, imgs)
    ok(env.start(start_body(jid, "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES]))[0] == 200,
       "progress_garbage_n: start accepted")
    first = [raw_get(env, f"/api/v1/progress/{jid}")[2] for _ in range(2)]
    ok(all(decoded(b)[0] is None for b in first), "progress_garbage_n 2: the first two replies are not JSON")
    st, pg = env.wait_job(jid, "after progress_garbage_n")
    ok(st == 200 and pg["status"] == "completed", "progress_garbage_n: then the truth, and the job completed", str(pg))
    env.stop_servers(servers, "progress_garbage_n")
    compare_snapshot(env, jid, imgs, "progress_garbage_n",
                     "the copy went on under the garbage (image equals snapshot)")
    env.cleanup(jid)

    # lie_complete on real targets with a slow copy: the lie from the first reply, the copy still running
    jid = "bk-lie"
    env.http("POST", f"/_sim/faults?job={jid}", body={"lie_complete": "short_total", "slow_bytes_per_s": 1 << 20})
    imgs = make_images(env, jid)
    servers = env.serve(jid, imgs)
    env.start(start_body(jid, "full", [(k, servers[k][1], SIZES[k], "") for k in SIZES]))
    st, doc = env.progress(jid)
    time.sleep(0.5)
    real = {d["key"]: d for j in env.http("GET", "/_sim/jobs")[1]["jobs"] if j["job_id"] == jid for d in j["disks"]}
    ok(st == 200 and doc["status"] == "completed" and real[2000]["status"] in ("pending", "running")
       and real[2000]["bytes"] < SIZES[2000] and real[2000]["method"] == "libnbd",
       "lie_complete short_total: completed at once while the (slowed) copy still runs", f"{doc} {real.get(2000)}")
    st, rep = env.cleanup(jid)
    ok(st == 200, "cleanup stops the copy behind a lie", f"{st} {rep}")
    env.stop_servers(servers, "lie_complete")


def main():
    t0 = time.monotonic()
    env = Env()
    try:
        run(env)
    except Exception:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        ok(False, "the test ran to its end")
        if os.path.exists(os.path.join(env.tmp, "sim.log")):
            with open(os.path.join(env.tmp, "sim.log"), errors="replace") as fh:
                sys.stdout.write("--- sim.log (tail)\n" + "".join(fh.readlines()[-30:]))
    finally:
        env.close()
    print(f"{passed} passed, {failed} failed ({time.monotonic() - t0:.1f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
