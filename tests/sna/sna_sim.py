#!/usr/bin/python3
"""SNA simulator: the node appliance of CONTRACT.md §3, on the wire.

    sna_sim.py --port PORT --state DIR [--token TOKEN] [--connections N] [--block-size BYTES]
               [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--test-reveal-secrets]

Serves HTTP (HTTPS with --tls-cert) on 127.0.0.1:PORT. The contract endpoints (CONTRACT.md §3) behave like the
deployed SNA: POST /api/v1/backup/start takes ONE snapshot of all of a VM's disks at one
instant and writes every disk into its NBD target (nbdcopy for full copies, libnbd writes
of the changed blocks for incrementals); GET /api/v1/progress/<job_id> reports it;
POST /api/v1/cleanup stops it and removes the snapshot. A control API under /_sim/ (no
auth) creates the simulated VMs, writes to their disks (change tracking), injects faults
and shows what was received. See tests/sna/README.md for the full interface.

Prints "sna_sim: listening on 127.0.0.1:PORT pid=N" on stdout once ready; exits 0 on
SIGTERM/SIGINT after killing its nbdcopy children. All state lives under DIR:
  DIR/vms/<vm dir>/<key>.raw   source disks (unless created from existing files)
  DIR/vms/<vm dir>/vm.json     the VM: disks, sizes, change-tracking log (survives restarts)
  DIR/jobs/<job_id>/<key>.snap the snapshot of a job (kept until cleanup or reset)
  DIR/jobs/<job_id>/tls.psk    "<identity>:<psk>" of a job with nbd_tls (0600; until cleanup)
Jobs, requests, snapshots records and faults live in memory only: a restarted simulator
has lost its jobs (progress answers 404), like an appliance that rebooted.

Needs Debian's /usr/bin/python3 with python3-libnbd (module nbd); nbdcopy and cp.
"""

import argparse
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse

import nbd

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

MIB = 1 << 20
MAX_BODY = 1 << 20
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NBD_URL_RE = re.compile(r"^(?P<scheme>nbds?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:,\s\[\]@]+):(?P<port>[0-9]{1,5})"
                        r"/(?P<export>[^,\s?#]+)$")
# CONTRACT.md §3.1: "nbd_tls": {"mode": "psk", "identity": ..., "psk": <64 hex digits>}.
TLS_IDENTITY_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TLS_PSK_RE = re.compile(r"^[0-9A-Fa-f]{64}$")
PSK_FILE = "tls.psk"          # jobs/<job_id>/tls.psk: "<identity>:<psk>", 0600, removed at cleanup
REQUIRED = ("job_id", "vm_name", "vm_path", "vcenter_host", "vcenter_user", "vcenter_password",
            "backup_type", "nbd_host", "nbd_targets", "disks")
# A hostile SNA (tests/e2e/hostile.py): what progress_garbage / start_garbage put in place of
# a reply's body, and how lie_complete lies (see hostile_progress, hostile_start below).
GARBAGE_CLASSES = ("wrong_types", "nulls", "deep", "not_json", "huge", "huge_padding", "oversize",
                   "control", "unknown_status", "foreign_key")
LIE_CLASSES = ("no_bytes", "short_total", "empty_change_id", "null_change_id", "object_change_id")
FAULT_TYPES = {
    "start_5xx": int, "start_4xx": bool, "hang_start_s": float, "die_mid_transfer": bool,
    "fail_disk": int, "forget_job": bool, "slow_bytes_per_s": int, "complete_early": bool,
    "start_garbage": GARBAGE_CLASSES, "progress_garbage": GARBAGE_CLASSES,
    "progress_garbage_n": int, "lie_complete": LIE_CLASSES,
}
# Knobs that /_sim/faults?job=ID may set for one job_id alone (all taken when its start is
# accepted, slow_bytes_per_s also read live).
JOB_KNOBS = ("fail_disk", "slow_bytes_per_s", "complete_early", "start_garbage", "progress_garbage",
             "progress_garbage_n", "lie_complete")
HUGE_BYTES = 900 * 1024      # under the contract's 1 MiB limit of a progress reply: must be read
OVERSIZE_BYTES = 1536 * 1024  # over it: an unanswered poll whatever it says
DEEP_LEVELS = 100000
HUGE_UNIT = "HUGE\u2603"      # 7 bytes of UTF-8; the tests count it to measure what got through
TLS_HANDSHAKE_S = 10          # a TLS client gets this long to finish its handshake
FORGED_LOG = "\n2026-12-01T00:00:00.000Z bw-worker: job=%s completed"

# Optional: record, for each start/cleanup body received, what the project's JSON Schemas
# (schemas/sna/) think of it. The deployed SNA does not check these; tests can.
_contract_check = None
_contract_lock = threading.Lock()
try:
    sys.path.insert(0, os.path.join(REPO, "tests", "schema"))
    import test_event_schemas as _tes  # noqa: E402
    _contract_check = _tes.check
except Exception:  # jsonschema or the schema tests absent: no contract_errors
    _contract_check = None
finally:
    if sys.path and sys.path[0] == os.path.join(REPO, "tests", "schema"):
        sys.path.pop(0)


def contract_errors(name, doc):
    if _contract_check is None:
        return None
    try:
        with _contract_lock:
            return _contract_check(name, doc)
    except Exception as e:  # a broken schema must not break the simulator
        return [f"$: schema check failed: {e}"]


def now_rfc3339():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def mask(secret):
    return "<masked sha256:%s>" % hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def mask_body(doc):
    """A copy of a start/cleanup body fit to show: vcenter_password and nbd_tls.psk masked."""
    shown = json.loads(json.dumps(doc))
    if isinstance(shown, dict):
        if isinstance(shown.get("vcenter_password"), str):
            shown["vcenter_password"] = mask(shown["vcenter_password"])
        tls = shown.get("nbd_tls")
        if isinstance(tls, dict) and isinstance(tls.get("psk"), str):
            tls["psk"] = mask(tls["psk"])
    return shown


def body_secrets(doc):
    """The secret strings of a body (to scrub them from any text derived from it)."""
    out = []
    if isinstance(doc, dict):
        if isinstance(doc.get("vcenter_password"), str) and doc["vcenter_password"]:
            out.append(doc["vcenter_password"])
        tls = doc.get("nbd_tls")
        if isinstance(tls, dict) and isinstance(tls.get("psk"), str) and tls["psk"]:
            out.append(tls["psk"])
    return out


# Text that may hold a secret we could not parse out (a broken body): 32+ hex digits in a
# row (a key), and the value of a "psk" or "vcenter_password" member.
SECRETISH_RE = re.compile(r'[0-9A-Fa-f]{32,}|("(?:psk|vcenter_password)"\s*:\s*)"(?:[^"\\]|\\.)*"?')


def scrub(text, secrets=(), guess=False):
    """text with every secret in `secrets` (any case) masked; with guess, also every run that
    looks like one (SECRETISH_RE)."""
    for sec in sorted(set(secrets), key=len, reverse=True):
        text = re.sub(re.escape(sec), mask(sec), text, flags=re.IGNORECASE)
    if guess:
        text = SECRETISH_RE.sub(lambda m: (m.group(1) + '"<masked>"') if m.group(1) else "<masked>", text)
    return text


def mask_authorization(value):
    if value is None:
        return None
    if value.startswith("Bearer "):
        return "Bearer " + mask(value[7:])
    return mask(value)


def vm_dir_name(vm_path):
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", vm_path).strip("._-")[:64] or "vm"
    return safe + "-" + hashlib.sha256(vm_path.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Cancelled(Exception):
    pass


# ------------------------------------------------------------------------------ VMs

class Disk:
    def __init__(self, key, path, size, uuid, gen=1, blocks=None, owned=True):
        self.key = key
        self.path = path
        self.size = size
        self.uuid = uuid          # "52 3c 5f 1a 9e 0b 44 d2-8a 61 7f 03 c9 e5 2b 10"
        self.gen = gen            # generation of the current contents
        self.blocks = blocks or {}  # block index -> generation of its last write
        self.owned = owned

    def change_id(self, gen=None):
        return "%s/%d" % (self.uuid, self.gen if gen is None else gen)

    def parse_change_id(self, cid, snap_gen):
        """Generation named by `cid`, or raises ValueError (VMware: invalid changeId)."""
        if not isinstance(cid, str) or "/" not in cid:
            raise ValueError("malformed")
        uuid, _, n = cid.rpartition("/")
        if uuid != self.uuid:
            raise ValueError("not a change id of this disk")
        if not re.fullmatch(r"[0-9]{1,18}", n):
            raise ValueError("malformed sequence number")
        g = int(n)
        if g < 1:
            raise ValueError("no such change id")
        if g > snap_gen:
            raise ValueError("change id from the future")
        return g

    def to_json(self):
        return {"key": self.key, "path": self.path, "size": self.size,
                "change_id": self.change_id()}

    def to_state(self):
        return {"key": self.key, "path": self.path, "size": self.size, "uuid": self.uuid,
                "gen": self.gen, "owned": self.owned,
                "blocks": {str(b): g for b, g in self.blocks.items()}}

    @classmethod
    def from_state(cls, d):
        return cls(d["key"], d["path"], d["size"], d["uuid"], d["gen"],
                   {int(b): g for b, g in d.get("blocks", {}).items()}, d.get("owned", True))


class VM:
    def __init__(self, vm_path, directory, block_size):
        self.vm_path = vm_path
        self.dir = directory
        self.block_size = block_size
        self.disks = {}           # key -> Disk, in creation order
        self.lock = threading.Lock()  # source writes and snapshots

    def save(self):
        tmp = os.path.join(self.dir, "vm.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"vm_path": self.vm_path, "block_size": self.block_size,
                       "disks": [d.to_state() for d in self.disks.values()]}, f)
        os.replace(tmp, os.path.join(self.dir, "vm.json"))

    def to_json(self):
        return {"vm_path": self.vm_path, "block_size": self.block_size,
                "disks": [d.to_json() for d in self.disks.values()]}


def new_disk_uuid():
    b = os.urandom(16)
    h = ["%02x" % x for x in b]
    return " ".join(h[:8]) + "-" + " ".join(h[8:])


def fill_disk(path, size, seed, key):
    """Deterministic mix of random and zero 1 MiB chunks (the zero ones left sparse)."""
    rng = random.Random("sna-sim-disk:%s:%s" % (seed, key))
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        while off < size:
            n = min(MIB, size - off)
            if rng.random() >= 0.3:
                f.seek(off)
                f.write(rng.randbytes(n))
            off += n


def write_pattern(fd, offset, length, seed, zero):
    rng = random.Random("sna-sim-write:%s" % (seed,))
    pos = offset
    while pos < offset + length:
        n = min(4 * MIB, offset + length - pos)
        os.pwrite(fd, bytes(n) if zero else rng.randbytes(n), pos)
        pos += n


# ------------------------------------------------------------------------------ jobs

class DiskJob:
    def __init__(self, key, url, prev):
        self.key = key
        self.url = url
        self.prev = prev          # per-disk previous_change_id ("" = full copy)
        self.mode = "incremental" if prev else "full"
        self.status = "pending"
        self.bytes = 0
        self.total = 0
        self.change_id = ""
        self.error = ""
        self.snap = None          # snapshot file
        self.size = 0
        self.extents = None       # [(offset, length)] for an incremental, None = everything
        self.lie = False          # complete_early: report completed whatever happens
        self.method = ""          # nbdcopy | libnbd
        self.connect_url = url    # what libnbd/nbdcopy are given (nbds: + identity, psk file)

    def reported(self):
        if self.lie:
            return {"key": self.key, "status": "completed", "bytes_transferred": self.bytes,
                    "total_bytes": self.total, "change_id": self.change_id}
        return {"key": self.key, "status": self.status, "bytes_transferred": self.bytes,
                "total_bytes": self.total,
                "change_id": self.change_id if self.status == "completed" else ""}


class Job:
    def __init__(self, job_id, vm, backup_type, disks, faults, body):
        self.job_id = job_id
        self.vm = vm
        self.backup_type = backup_type
        self.disks = disks        # [DiskJob] in message order
        self.faults = faults      # copy of the fault knobs at acceptance
        self.body = body
        self.status = "pending"   # pending until the snapshot is taken
        self.error = ""
        self.created_at = now_rfc3339()
        self.cancel = threading.Event()
        self.procs = set()
        self.threads = []
        self.cleaned = False
        self.thread = None
        self.garbage_sent = 0     # progress_garbage replies sent so far

    def reported_status(self):
        if self.status == "pending":
            return "pending"
        rep = [d.reported()["status"] for d in self.disks]
        if self.status == "failed" and not self.disks:
            return "failed"
        if all(s == "completed" for s in rep):
            return "completed"
        if all(s in ("completed", "failed") for s in rep):
            return "failed"
        return "running"

    def progress(self):
        errs = [f"disk {d.key}: {d.error}" for d in self.disks if d.error]
        if self.error:
            errs.insert(0, self.error)
        status = self.reported_status()
        return {"job_id": self.job_id, "status": status,
                "disks": [d.reported() for d in self.disks],
                "error": "; ".join(errs) if status == "failed" else ""}


class Raw:
    """A reply body sent as it is (a fault): bytes, its Content-Type and the knob that made it."""

    def __init__(self, data, ctype="application/json", label=""):
        self.data = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
        self.ctype = ctype
        self.label = label


def deep_json(levels, inner="0"):
    """levels nested arrays around inner, as text (json.dumps would recurse too deep)."""
    return "[" * levels + inner + "]" * levels


def huge_text(nbytes):
    return HUGE_UNIT * (nbytes // len(HUGE_UNIT.encode()))


def claimed_change_id(job, d):
    """The change id a lying SNA reports: the snapshot's, or (still pending) the next one."""
    if d.change_id:
        return d.change_id
    disk = job.vm.disks.get(d.key)
    return disk.change_id(disk.gen + 1) if disk else "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1"


def perfect_lie(job):
    """Every disk completed with all its bytes and a change id, whatever the copy did."""
    out = []
    for d in job.disks:
        full = d.size if d.mode == "full" else d.total
        out.append({"key": d.key, "status": "completed", "bytes_transferred": full,
                    "total_bytes": full, "change_id": claimed_change_id(job, d)})
    return out


def hostile_progress(cls, job, truth, i):
    """The body of the i-th (from 1) garbage progress reply of class cls (GARBAGE_CLASSES).
    Most classes wrap a perfect lie (every disk completed, all bytes, a change id), so that a
    reader that takes any of it shows at once. Classes with several variants rotate."""
    jid = job.job_id
    lie = perfect_lie(job)
    label = f"progress_garbage:{cls}"
    if cls == "wrong_types":
        variants = [
            {"job_id": jid, "status": 7,
             "disks": [dict(x, key=str(x["key"]), bytes_transferred=str(x["bytes_transferred"]),
                            total_bytes=str(x["total_bytes"])) for x in lie], "error": ""},
            {"job_id": jid, "status": "completed",  # 2^63: out of range, clamps to equal
             "disks": [dict(x, bytes_transferred=1 << 63, total_bytes=1 << 63) for x in lie], "error": ""},
            {"job_id": jid, "status": "completed", "disks": {str(x["key"]): x for x in lie}, "error": 0},
            {"job_id": jid, "status": "completed",
             "disks": [dict(x, key=True, bytes_transferred=-1, total_bytes=-1) for x in lie], "error": False},
        ]
        return Raw(json.dumps(variants[(i - 1) % len(variants)]), label=label)
    if cls == "nulls":
        variants = [
            {"job_id": jid, "status": None, "disks": [], "error": None},
            {"job_id": jid, "status": "completed", "disks": None, "error": ""},
            {"job_id": jid, "status": "running",
             "disks": [{"key": d.key, "status": None, "bytes_transferred": None, "total_bytes": None,
                        "change_id": None} for d in job.disks], "error": None},
            None,
            {"job_id": None, "status": "completed", "disks": [dict(x, key=None) for x in lie], "error": ""},
        ]
        return Raw(json.dumps(variants[(i - 1) % len(variants)]), label=label)
    if cls == "deep":
        head = '{"job_id": %s, "status": "completed", ' % json.dumps(jid)
        variants = [
            head + '"disks": ' + deep_json(DEEP_LEVELS) + ', "error": ""}',
            head + '"disks": [' + ", ".join(  # each change_id 100000 arrays deep
                json.dumps({k: v for k, v in x.items() if k != "change_id"})[:-1] + ', "change_id": '
                + deep_json(DEEP_LEVELS, json.dumps(x["change_id"])) + "}" for x in lie) + '], "error": ""}',
        ]
        return Raw(variants[(i - 1) % len(variants)], label=label)
    if cls == "not_json":
        full = json.dumps({"job_id": jid, "status": "completed", "disks": lie, "error": ""})
        variants = [
            Raw("<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body><h1>Bad Gateway"
                "</h1><p>The proxy server received an invalid response from an upstream server.</p>"
                "<hr><address>nginx</address></body></html>\n", "text/html", label),
            Raw(full[:len(full) // 2], label=label),                     # truncated
            Raw(full + "\n}garbage after the document", label=label),   # trailing bytes
            Raw(b"", label=label),                                      # empty
            Raw(b"\xff\xfe{\"job_id\": \"\xc3\x28\"}", label=label),    # not UTF-8
        ]
        return variants[(i - 1) % len(variants)]
    if cls == "huge":
        # Right types: a counted reply saying the job failed, with a 900 KiB error string.
        body = dict(truth, status="failed", error="")
        body["error"] = huge_text(HUGE_BYTES)
        return Raw(json.dumps(body, ensure_ascii=False), label=label)
    if cls == "huge_padding":
        # The truth plus 900 KiB in an unknown field: a counted reply (fields may be added).
        return Raw(json.dumps(dict(truth, padding=huge_text(HUGE_BYTES)), ensure_ascii=False), label=label)
    if cls == "oversize":
        # A perfect lie over the 1 MiB limit: an unanswered poll, never a completion.
        body = {"job_id": jid, "status": "completed", "disks": lie, "error": "",
                "padding": "p" * OVERSIZE_BYTES}
        return Raw(json.dumps(body), label=label)
    if cls == "control":
        forged = FORGED_LOG % jid
        body = dict(truth, job_id=jid + forged, status="failed",
                    error="disk 2000: \x1b[31mfailed\x1b[0m\r\x00\x07\x7f\u0085\u2028" + forged
                          + "\n" + forged.lstrip("\n") + "\ttab")
        return Raw(json.dumps(body), label=label)
    if cls == "unknown_status":
        return Raw(json.dumps({"job_id": jid, "status": "done",
                               "disks": [dict(x, status="done") for x in lie], "error": ""}), label=label)
    if cls == "foreign_key":
        keys = {d.key for d in job.disks}
        foreign = next(k for k in range(31999, 1, -1) if k not in keys)
        disks = [dict(x, key=foreign) if n == 0 else x for n, x in enumerate(lie)]
        return Raw(json.dumps({"job_id": jid, "status": "completed", "disks": disks, "error": ""}), label=label)
    raise ValueError(cls)


def lie_progress(cls, job):
    """lie_complete: every disk completed from the first reply on, without the evidence."""
    disks = []
    for d in job.disks:
        full = d.size if d.mode == "full" else d.total
        cid = claimed_change_id(job, d)
        x = {"key": d.key, "status": "completed"}
        if cls == "no_bytes":
            x.update(bytes_transferred=0, total_bytes=full, change_id=cid)
        elif cls == "short_total":
            x.update(bytes_transferred=1, total_bytes=1, change_id=cid)
        elif cls == "empty_change_id":
            x.update(bytes_transferred=full, total_bytes=full, change_id="")
        elif cls == "null_change_id":
            x.update(change_id=None)
        elif cls == "object_change_id":
            x.update(bytes_transferred=1, total_bytes=1, change_id={"a": 1})
        else:
            raise ValueError(cls)
        disks.append(x)
    return Raw(json.dumps({"job_id": job.job_id, "status": "completed", "disks": disks, "error": ""}),
               label=f"lie_complete:{cls}")


def hostile_start(cls, job_id, reply):
    """The body of an accepted (200) start reply of class cls: the status still says accepted."""
    label = f"start_garbage:{cls}"
    if cls == "wrong_types":
        return Raw(json.dumps({"job_id": 7, "status": 200, "message": ["started"], "started_at": 0,
                               "pid": "x"}), label=label)
    if cls == "nulls":
        return Raw(json.dumps({"job_id": None, "status": None, "message": None, "started_at": None}),
                   label=label)
    if cls == "deep":
        return Raw('{"job_id": ' + deep_json(DEEP_LEVELS, json.dumps(job_id)) + ', "status": "started"}',
                   label=label)
    if cls == "not_json":
        return Raw("<html><body><h1>200 OK</h1><p>Backup queued.</p></body></html>\n", "text/html", label)
    if cls == "huge":
        return Raw(json.dumps(dict(reply, job_id=job_id + huge_text(HUGE_BYTES)), ensure_ascii=False),
                   label=label)
    if cls == "huge_padding":
        return Raw(json.dumps(dict(reply, padding=huge_text(HUGE_BYTES)), ensure_ascii=False), label=label)
    if cls == "oversize":
        return Raw(json.dumps(dict(reply, padding="p" * OVERSIZE_BYTES)), label=label)
    if cls == "control":
        forged = FORGED_LOG % job_id
        return Raw(json.dumps(dict(reply, job_id=job_id + forged + "\r\x1b[2K\x00",
                                   message="started" + forged)), label=label)
    if cls == "unknown_status":
        return Raw(json.dumps(dict(reply, status="done")), label=label)
    if cls == "foreign_key":
        return Raw(json.dumps(dict(reply, job_id="someone-elses-job-1", disks=[{"key": 31999}])), label=label)
    raise ValueError(cls)


class Sim:
    def __init__(self, state, token, connections, block_size, reveal_secrets=False):
        self.state = os.path.abspath(state)
        self.reveal_secrets = reveal_secrets  # --test-reveal-secrets: /_sim/requests?reveal=1
        self.token = token
        self.connections = connections
        self.block_size = block_size
        self.lock = threading.RLock()
        self.vms = {}
        self.jobs = {}
        self.orphans = set()      # job dirs left by an earlier run of the simulator
        self.requests = []
        self.revealed = {}        # id(request record) -> its unmasked body and Authorization
        self.snapshots = []
        self.faults = {}
        self.job_faults = {}      # job_id -> knobs for that job alone (JOB_KNOBS)
        self.procs = set()        # every live nbdcopy/cp child
        self.dying = False
        os.makedirs(os.path.join(self.state, "vms"), exist_ok=True)
        os.makedirs(os.path.join(self.state, "jobs"), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(self.state, "vms"))):
            p = os.path.join(self.state, "vms", name, "vm.json")
            try:
                with open(p) as f:
                    st = json.load(f)
                vm = VM(st["vm_path"], os.path.dirname(p), st.get("block_size", block_size))
                for d in st["disks"]:
                    disk = Disk.from_state(d)
                    vm.disks[disk.key] = disk
                self.vms[vm.vm_path] = vm
            except Exception as e:
                log(f"ignoring {p}: {e}")
        self.orphans = set(os.listdir(os.path.join(self.state, "jobs")))
        for name in self.orphans:  # a key outlives neither its job nor the appliance's run
            self.remove_psk(name)

    def psk_path(self, job_id):
        return os.path.join(self.state, "jobs", job_id, PSK_FILE)

    def remove_psk(self, job_id):
        try:
            os.unlink(self.psk_path(job_id))
        except FileNotFoundError:
            pass
        except OSError as e:
            log(f"job {job_id}: cannot remove its TLS key file: {e.strerror}")

    def write_psk(self, job_id, identity, psk):
        """jobs/<job_id>/tls.psk = "<identity>:<psk>" (dir 0700, file 0600, never replaced)."""
        jdir = os.path.join(self.state, "jobs", job_id)
        os.makedirs(jdir, mode=0o700, exist_ok=True)
        os.chmod(jdir, 0o700)
        path = self.psk_path(job_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, f"{identity}:{psk}\n".encode())
        finally:
            os.close(fd)
        return path

    # -------------------------------------------------------------- child processes

    def spawn(self, job, cmd, **kw):
        if shutil.which("setpriv"):  # the child dies with the thread that started it
            cmd = ["setpriv", "--pdeathsig", "KILL", "--"] + cmd
        with self.lock:
            if self.dying or (job is not None and job.cancel.is_set()):
                raise Cancelled()
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)
            self.procs.add(p)
            if job is not None:
                job.procs.add(p)
        return p

    def reap(self, job, p):
        with self.lock:
            self.procs.discard(p)
            if job is not None:
                job.procs.discard(p)

    def kill_procs(self, procs):
        for p in list(procs):
            try:
                p.kill()
            except OSError:
                pass
        for p in list(procs):
            try:
                p.wait(timeout=5)
            except Exception:
                pass

    def die(self, why):
        """die_mid_transfer: kill the copies, then exit 3 at once (no cleanup)."""
        with self.lock:
            self.dying = True
            procs = list(self.procs)
        log(f"die_mid_transfer: {why}; killing {len(procs)} children and exiting 3")
        self.kill_procs(procs)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)

    # -------------------------------------------------------------- control API

    def create_vm(self, body):
        vm_path = body.get("vm_path")
        if not isinstance(vm_path, str) or not vm_path:
            raise HttpError(400, "vm_path: a non-empty string is required")
        disks = body.get("disks")
        if not isinstance(disks, dict) or not disks:
            raise HttpError(400, "disks: a non-empty object {key: {size}|{path}} is required")
        seed = body.get("seed", 0)
        specs = []
        for k, spec in disks.items():
            if not re.fullmatch(r"[1-9][0-9]{0,9}", str(k)) or int(k) > 2147483647:
                raise HttpError(400, f"disks: key {k!r} is not a disk key (1-2147483647)")
            if not isinstance(spec, dict) or (("size" in spec) == ("path" in spec)):
                raise HttpError(400, f"disks.{k}: give exactly one of size or path")
            if "size" in spec and (not is_int(spec["size"]) or spec["size"] < 1):
                raise HttpError(400, f"disks.{k}.size: a positive integer is required")
            if "path" in spec:
                p = spec["path"]
                if not isinstance(p, str) or not os.path.isabs(p) or not os.path.isfile(p):
                    raise HttpError(400, f"disks.{k}.path: an absolute path of an existing file is required")
            specs.append((int(k), spec))
        with self.lock:
            if vm_path in self.vms and not body.get("replace"):
                raise HttpError(409, f"VM {vm_path!r} exists (send \"replace\": true to recreate it)")
            directory = os.path.join(self.state, "vms", vm_dir_name(vm_path))
            vm = VM(vm_path, directory, self.block_size)
            old = self.vms.get(vm_path)
            self.vms[vm_path] = vm
        if old is not None:
            with old.lock:  # let a snapshot of the old VM finish before its files change
                pass
        with vm.lock:
            os.makedirs(directory, exist_ok=True)
            for key, spec in specs:
                if "path" in spec:
                    disk = Disk(key, spec["path"], os.path.getsize(spec["path"]), new_disk_uuid(), owned=False)
                else:
                    path = os.path.join(directory, f"{key}.raw")
                    fill_disk(path, spec["size"], seed, key)
                    disk = Disk(key, path, spec["size"], new_disk_uuid())
                vm.disks[key] = disk
            vm.save()
        return vm.to_json()

    def get_vm(self, vm_path):
        with self.lock:
            if vm_path is None:
                return {"vms": [vm.to_json() for vm in self.vms.values()]}
            vm = self.vms.get(vm_path)
        if vm is None:
            raise HttpError(404, f"VM not found: {vm_path}")
        return vm.to_json()

    def write(self, body):
        vm_path = body.get("vm_path")
        with self.lock:
            vm = self.vms.get(vm_path)
        if vm is None:
            raise HttpError(404, f"VM not found: {vm_path}")
        key = body.get("key")
        try:
            key = int(key)
        except (TypeError, ValueError):
            raise HttpError(400, "key: a disk key is required")
        disk = vm.disks.get(key)
        if disk is None:
            raise HttpError(404, f"disk {key} is not a disk of VM {vm_path}")
        off, length = body.get("offset", 0), body.get("length")
        if not is_int(off) or not is_int(length) or off < 0 or length < 1 or off + length > disk.size:
            raise HttpError(400, f"offset/length: a range inside the disk (size {disk.size}) is required")
        with vm.lock:
            fd = os.open(disk.path, os.O_WRONLY)
            try:
                write_pattern(fd, off, length, body.get("seed", 0), bool(body.get("zero")))
            finally:
                os.close(fd)
            disk.gen += 1
            bs = vm.block_size
            first, last = off // bs, (off + length - 1) // bs
            for b in range(first, last + 1):
                disk.blocks[b] = disk.gen
            vm.save()
            return {"vm_path": vm_path, "key": key, "change_id": disk.change_id(),
                    "blocks": last - first + 1, "block_size": bs}

    def set_faults(self, body, job_id=None):
        """Merges body into the knobs (of job_id alone when given); returns them."""
        if job_id is not None and not JOB_ID_RE.match(job_id):
            raise HttpError(400, "job: 1-128 characters of [A-Za-z0-9._-], first alphanumeric")
        with self.lock:
            cur = self.faults if job_id is None else self.job_faults.get(job_id, {})
            new = self.checked_faults(cur, body, job_id) if body else {}
            if job_id is None:
                self.faults = new
            elif new:
                self.job_faults[job_id] = new
            else:
                self.job_faults.pop(job_id, None)
            return dict(new)

    def job_knobs(self, job_id):
        """The knobs a new job of job_id runs with: the global ones, then its own."""
        with self.lock:
            f = dict(self.faults)
            f.update(self.job_faults.get(job_id, {}))
            return f

    @staticmethod
    def checked_faults(cur, body, job_id):
        new = dict(cur)
        for k, v in body.items():
            if k not in FAULT_TYPES:
                raise HttpError(400, f"unknown fault knob {k!r} (known: {', '.join(FAULT_TYPES)})")
            if job_id is not None and k not in JOB_KNOBS:
                raise HttpError(400, f"{k} cannot be set for one job (those can: {', '.join(JOB_KNOBS)})")
            t = FAULT_TYPES[k]
            if v is None or v is False or (not isinstance(v, bool) and v == 0):
                new.pop(k, None)
                continue
            if isinstance(t, tuple):
                if v not in t:
                    raise HttpError(400, f"{k}: one of {', '.join(t)} expected")
            elif t is bool:
                if v is not True:
                    raise HttpError(400, f"{k}: true, false or null expected")
            elif t is int:
                if k == "fail_disk" and isinstance(v, str) and re.fullmatch(r"[0-9]+", v):
                    v = int(v)
                if not is_int(v) or v < 0:
                    raise HttpError(400, f"{k}: a non-negative integer expected")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise HttpError(400, f"{k}: a non-negative number expected")
            new[k] = v
        return new

    def reset(self):
        with self.lock:
            jobs = list(self.jobs.values())
            orphans = list(self.orphans)
            self.jobs = {}
            self.orphans = set()
            self.requests = []
            self.revealed = {}
            self.snapshots = []
            self.faults = {}
            self.job_faults = {}
        for job in jobs:
            self.stop_job(job)
        for name in orphans:
            shutil.rmtree(os.path.join(self.state, "jobs", name), ignore_errors=True)
        return {"reset": True, "jobs_stopped": len(jobs)}

    def jobs_json(self):
        with self.lock:
            out = []
            for job in self.jobs.values():
                out.append({
                    "job_id": job.job_id, "vm_path": job.vm.vm_path, "backup_type": job.backup_type,
                    "status": job.status, "reported_status": job.reported_status(), "error": job.error,
                    "cleaned": job.cleaned, "created_at": job.created_at, "faults": job.faults,
                    "pids": sorted(p.pid for p in job.procs),
                    "disks": [{"key": d.key, "url": d.url, "mode": d.mode, "method": d.method,
                               "status": d.status, "bytes": d.bytes, "total": d.total,
                               "change_id": d.change_id, "error": d.error, "snapshot": d.snap,
                               "extents": None if d.extents is None else len(d.extents)}
                              for d in job.disks]})
            return {"jobs": out, "orphans": sorted(self.orphans)}

    # -------------------------------------------------------------- contract API

    def check_auth(self, headers):
        if self.token is None:
            return
        if headers.get("Authorization") != "Bearer " + self.token:
            raise HttpError(401, "missing or invalid bearer token")

    def start(self, headers, raw):
        self.check_auth(headers)
        with self.lock:
            f = dict(self.faults)
        if f.get("hang_start_s"):
            time.sleep(f["hang_start_s"])
            raise HttpError(503, "simulated hang: the request was not accepted")
        with self.lock:
            if self.faults.get("start_5xx", 0) > 0:
                self.faults["start_5xx"] -= 1
                if not self.faults["start_5xx"]:
                    del self.faults["start_5xx"]
                raise HttpError(503, "simulated unavailability")
        if f.get("start_4xx"):
            raise HttpError(400, "simulated rejection")
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "Content-Type must be application/json")
        body = parse_json(raw)
        for k in REQUIRED:
            if k not in body or body[k] is None:
                raise HttpError(400, f"missing required field: {k}")
        for k in REQUIRED:
            if k == "disks":
                continue
            if not isinstance(body[k], str):
                raise HttpError(400, f"invalid field {k}: must be a string")
            if k != "vcenter_password" and not body[k]:
                raise HttpError(400, f"invalid field {k}: must not be empty")
        job_id = body["job_id"]
        if not JOB_ID_RE.match(job_id):
            raise HttpError(400, "invalid field job_id: 1-128 characters of [A-Za-z0-9._-], first alphanumeric")
        btype = body["backup_type"]
        if btype not in ("full", "incremental"):
            raise HttpError(400, "invalid field backup_type: must be full or incremental")
        prev = body.get("previous_change_id")
        if prev is not None and not isinstance(prev, str):
            raise HttpError(400, "invalid field previous_change_id: must be a string")
        if btype == "incremental" and not prev:
            raise HttpError(400, "previous_change_id is required for incremental backups")
        if headers.get("Idempotency-Key") != job_id:
            raise HttpError(400, "Idempotency-Key header must equal job_id")
        targets = parse_targets(body["nbd_targets"])
        disks = body["disks"]
        if not isinstance(disks, list) or not disks:
            raise HttpError(400, "invalid field disks: must be a non-empty array")
        listed, seen = [], set()
        for i, d in enumerate(disks):
            if not isinstance(d, dict):
                raise HttpError(400, f"invalid field disks[{i}]: must be an object")
            if not is_int(d.get("key")) or not 1 <= d["key"] <= 2147483647:
                raise HttpError(400, f"invalid field disks[{i}].key: must be an integer disk key")
            if d["key"] in seen:
                raise HttpError(400, f"invalid field disks[{i}].key: duplicate disk key {d['key']}")
            seen.add(d["key"])
            if not isinstance(d.get("nbd_url"), str) or not NBD_URL_RE.match(d["nbd_url"]):
                raise HttpError(400, f"invalid field disks[{i}].nbd_url: must be nbd[s]://host:port/export")
            if "size_bytes" in d and (not is_int(d["size_bytes"]) or d["size_bytes"] < 0):
                raise HttpError(400, f"invalid field disks[{i}].size_bytes: must be a non-negative integer")
            if "previous_change_id" in d and not isinstance(d["previous_change_id"], str):
                raise HttpError(400, f"invalid field disks[{i}].previous_change_id: must be a string")
            listed.append((d["key"], d["nbd_url"]))
        if listed != targets:
            raise HttpError(400, "nbd_targets and disks[] disagree: nbd_targets lists %s, disks[] %s" % (
                ",".join(f"{k}:{u}" for k, u in targets), ",".join(f"{k}:{u}" for k, u in listed)))
        tls = self.checked_tls(body.get("nbd_tls"), [u for _, u in targets])
        with self.lock:
            if job_id in self.jobs or job_id in self.orphans:
                raise HttpError(409, f"job {job_id} already exists")
            vm = self.vms.get(body["vm_path"])
            if vm is None:
                raise HttpError(404, f"VM not found: {body['vm_path']}")
            for k, _ in targets:
                if k not in vm.disks:
                    raise HttpError(400, f"invalid field nbd_targets: disk {k} is not a disk of VM {vm.vm_path} "
                                         f"(its disks: {', '.join(map(str, vm.disks))})")
            psk_file = None
            if tls is not None:
                try:
                    psk_file = self.write_psk(job_id, tls["identity"], tls["psk"])
                except OSError as e:
                    raise HttpError(500, f"cannot store the job's TLS key: {e.strerror}")
            djs = []
            for d in disks:
                p = d.get("previous_change_id", "") if btype == "incremental" else ""
                dj = DiskJob(d["key"], d["nbd_url"], p)
                if psk_file is not None:
                    dj.connect_url = tls_url(d["nbd_url"], tls["identity"], psk_file)
                dj.size = vm.disks[d["key"]].size
                dj.total = dj.size if dj.mode == "full" else 0
                djs.append(dj)
            job = Job(job_id, vm, btype, djs, self.job_knobs(job_id), body)
            self.jobs[job_id] = job
            job.thread = threading.Thread(target=self.run_job, args=(job,), name=f"job-{job_id}", daemon=True)
            job.thread.start()
        reply = {"job_id": job_id, "status": "started",
                 "message": f"backup of {body['vm_name']} started: {len(djs)} disk(s), {btype}",
                 "started_at": job.created_at, "pid": os.getpid()}
        if job.faults.get("start_garbage"):
            return hostile_start(job.faults["start_garbage"], job_id, reply)
        return reply

    @staticmethod
    def checked_tls(tls, urls):
        """The nbd_tls object when the URLs are nbds://, None when they are nbd://; else 400.
        Never puts the key in a message."""
        schemes = {NBD_URL_RE.match(u).group("scheme") for u in urls}
        if tls is None:
            if "nbds" in schemes:
                raise HttpError(400, "nbds:// URLs require nbd_tls")
            return None
        if not isinstance(tls, dict):
            raise HttpError(400, "invalid field nbd_tls: must be an object")
        if tls.get("mode") != "psk":
            raise HttpError(400, "invalid field nbd_tls.mode: must be psk")
        if not isinstance(tls.get("identity"), str) or not TLS_IDENTITY_RE.match(tls["identity"]):
            raise HttpError(400, "invalid field nbd_tls.identity: 1-64 characters of [A-Za-z0-9._-]")
        if not isinstance(tls.get("psk"), str) or not TLS_PSK_RE.match(tls["psk"]):
            raise HttpError(400, "invalid field nbd_tls.psk: must be 64 hex digits")
        if schemes != {"nbds"}:
            raise HttpError(400, "nbd_tls requires every URL to be nbds://")
        return tls

    def progress(self, headers, job_id):
        self.check_auth(headers)
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.cleaned:
                raise HttpError(404, f"job {job_id} not found")
            if self.faults.get("forget_job") and job.status != "pending":
                raise HttpError(404, f"job {job_id} not found")
            truth = job.progress()
            f = job.faults
            cls, n = f.get("progress_garbage"), f.get("progress_garbage_n", 0)
            if cls and (not n or job.garbage_sent < n):
                job.garbage_sent += 1
                return hostile_progress(cls, job, truth, job.garbage_sent)
            if f.get("lie_complete"):
                return lie_progress(f["lie_complete"], job)
            return truth

    def cleanup(self, headers, raw):
        self.check_auth(headers)
        body = parse_json(raw)
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise HttpError(400, "missing required field: job_id")
        if body.get("action") != "cleanup_all":
            raise HttpError(400, "invalid field action: must be cleanup_all")
        with self.lock:
            job = self.jobs.get(job_id)
            orphan = job is None and job_id in self.orphans and JOB_ID_RE.match(job_id)
            if job is None and not orphan or job is not None and job.cleaned:
                raise HttpError(404, f"job {job_id} not found")
            if orphan:
                self.orphans.discard(job_id)
            else:
                job.cleaned = True
        if orphan:
            shutil.rmtree(os.path.join(self.state, "jobs", job_id), ignore_errors=True)
            return {"job_id": job_id, "status": "cleaned",
                    "message": "removed the snapshot left by an earlier run"}
        self.stop_job(job)
        return {"job_id": job_id, "status": "cleaned", "message": "copies stopped, snapshot removed"}

    def stop_job(self, job):
        job.cancel.set()
        with self.lock:
            procs = list(job.procs)
        self.kill_procs(procs)
        deadline = time.monotonic() + 10
        for t in [job.thread] + list(job.threads):
            if t is not None and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self.remove_psk(job.job_id)
        shutil.rmtree(os.path.join(self.state, "jobs", job.job_id), ignore_errors=True)
        with self.lock:
            for s in self.snapshots:
                if s["job_id"] == job.job_id:
                    s["removed"] = True

    # -------------------------------------------------------------- the transfer

    def run_job(self, job):
        try:
            self.take_snapshot(job)
        except Cancelled:
            return
        except Exception as e:
            log(f"job {job.job_id}: snapshot failed: {e}")
            with self.lock:
                job.error = f"snapshot failed: {e}"
                for d in job.disks:
                    d.status, d.error = "failed", "snapshot failed"
                job.status = "failed"
            return
        for d in job.disks:
            if d.status == "pending":
                t = threading.Thread(target=self.run_disk, args=(job, d),
                                     name=f"disk-{job.job_id}-{d.key}", daemon=True)
                job.threads.append(t)
                t.start()
        for t in job.threads:
            t.join()
        with self.lock:
            job.status = "completed" if all(d.status == "completed" for d in job.disks) else "failed"
        log(f"job {job.job_id}: {job.status}")

    def take_snapshot(self, job):
        vm = job.vm
        jdir = os.path.join(self.state, "jobs", job.job_id)
        os.makedirs(jdir, mode=0o700, exist_ok=True)
        record = {}
        with vm.lock:
            if job.cancel.is_set():
                raise Cancelled()
            taken_at = now_rfc3339()
            # Like VMware, a snapshot gives every disk a new change id (even an unchanged disk).
            for disk in vm.disks.values():
                disk.gen += 1
            vm.save()
            for key, disk in vm.disks.items():
                snap = os.path.join(jdir, f"{key}.snap")
                p = self.spawn(job, ["cp", "--reflink=auto", "--sparse=auto", "--", disk.path, snap],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _, err = p.communicate()
                self.reap(job, p)
                if job.cancel.is_set():
                    raise Cancelled()
                if p.returncode != 0:
                    raise RuntimeError(f"cp {disk.path}: {err.decode(errors='replace').strip()}")
                record[key] = {"path": snap, "change_id": disk.change_id(), "size": disk.size,
                               "gen": disk.gen}
            # The changed areas are queried against the snapshot, under the same lock.
            areas = {}
            for d in job.disks:
                if d.mode != "incremental":
                    continue
                disk = vm.disks[d.key]
                try:
                    g = disk.parse_change_id(d.prev, disk.gen)
                except ValueError as e:
                    areas[d.key] = ValueError(
                        f"invalid change id {d.prev!r} ({e}): A specified parameter was not correct: changeId")
                    continue
                bs = vm.block_size
                blocks = sorted(b for b, bg in disk.blocks.items() if bg > g)
                ext = []
                for b in blocks:
                    off = b * bs
                    n = min(bs, disk.size - off)
                    if n <= 0:
                        continue
                    if ext and ext[-1][0] + ext[-1][1] == off:
                        ext[-1][1] += n
                    else:
                        ext.append([off, n])
                areas[d.key] = [tuple(e) for e in ext]
        with self.lock:
            self.snapshots.append({"job_id": job.job_id, "vm_path": vm.vm_path, "taken_at": taken_at,
                                   "disks": {str(k): {"path": v["path"], "change_id": v["change_id"],
                                                      "size": v["size"]} for k, v in record.items()},
                                   "removed": False})
            for d in job.disks:
                d.snap = record[d.key]["path"]
                d.change_id = record[d.key]["change_id"]
                a = areas.get(d.key)
                if isinstance(a, Exception):
                    d.status, d.error = "failed", str(a)
                elif a is not None:
                    d.extents = a
                    d.total = sum(n for _, n in a)
                if job.faults.get("complete_early") and d.status == "pending":
                    d.lie = True
            job.status = "running"
        log(f"job {job.job_id}: snapshot of {vm.vm_path} taken: "
            + ", ".join(f"{k}={v['change_id']}" for k, v in record.items()))

    def run_disk(self, job, d):
        with self.lock:
            d.status = "running"
        try:
            f = job.faults
            special = f.get("slow_bytes_per_s") or f.get("die_mid_transfer") or f.get("fail_disk") == d.key
            if d.extents is None and not special:
                d.method = "nbdcopy"
                self.copy_nbdcopy(job, d)
            else:
                d.method = "libnbd"
                self.copy_libnbd(job, d)
            with self.lock:
                d.status = "completed"
        except Cancelled:
            with self.lock:
                d.status, d.error = "failed", "cancelled"
        except Exception as e:
            if not isinstance(e, (RuntimeError, nbd.Error, OSError)):
                traceback.print_exc()
            with self.lock:
                d.status, d.error = "failed", str(e) or e.__class__.__name__
            log(f"job {job.job_id} disk {d.key}: failed: {d.error}")

    def maybe_die(self, job, d, written):
        if written * 2 >= d.total:
            with self.lock:
                die = bool(self.faults.get("die_mid_transfer"))
            if die:
                self.die(f"job {job.job_id} disk {d.key} wrote {written} of {d.total} bytes")

    def copy_nbdcopy(self, job, d):
        log_path = os.path.join(self.state, "jobs", job.job_id, f"{d.key}.nbdcopy.log")
        r, w = os.pipe()
        try:
            with open(log_path, "wb") as logf:
                p = self.spawn(job, ["nbdcopy", f"--connections={self.connections}", "--flush",
                                     f"--progress={w}", d.snap, d.connect_url],
                               pass_fds=(w,), stdout=logf, stderr=subprocess.STDOUT)
        finally:
            os.close(w)
        try:
            with os.fdopen(r, "rb") as prog:
                for line in prog:
                    m = re.match(rb"\s*([0-9]+)/100", line)
                    if m:
                        pct = min(100, int(m.group(1)))
                        with self.lock:
                            d.bytes = d.total * pct // 100
                        if pct >= 50:
                            self.maybe_die(job, d, d.bytes)
            rc = p.wait()
        finally:
            self.reap(job, p)
        if job.cancel.is_set():
            raise Cancelled()
        if rc != 0:
            try:
                with open(log_path, "rb") as lf:
                    lines = [x for x in lf.read().decode(errors="replace").splitlines() if x.strip()]
            except OSError:
                lines = []
            raise RuntimeError(f"nbdcopy exited with status {rc}: " + (lines[-1] if lines else "no output"))
        with self.lock:
            d.bytes = d.total
        self.maybe_die(job, d, d.total)

    def copy_libnbd(self, job, d):
        f = job.faults
        fail = f.get("fail_disk") == d.key
        extents = d.extents if d.extents is not None else [(0, d.size)]
        chunk = MIB if not (f.get("slow_bytes_per_s") or fail or f.get("die_mid_transfer")) else 256 * 1024
        h = nbd.NBD()
        h.set_handle_name(f"sna-sim-{job.job_id}-{d.key}")
        h.set_uri_allow_local_file(True)  # the ?tls-psk-file= of an nbds:// target
        h.connect_uri(d.connect_url)
        try:
            tsize = h.get_size()
            if tsize < d.size:
                raise RuntimeError(f"destination size ({tsize}) is smaller than source size ({d.size})")
            can_zero = h.can_zero()
            written = 0
            t0 = time.monotonic()
            fd = os.open(d.snap, os.O_RDONLY)
            try:
                for off, length in extents:
                    pos = off
                    while pos < off + length:
                        if job.cancel.is_set():
                            raise Cancelled()
                        with self.lock:
                            rate = self.job_faults.get(job.job_id, self.faults).get(
                                "slow_bytes_per_s", self.faults.get("slow_bytes_per_s", 0))
                        n = min(chunk if not rate else max(4096, min(chunk, rate // 4)), off + length - pos)
                        data = os.pread(fd, n, pos)
                        if len(data) != n:
                            raise RuntimeError(f"short read from the snapshot at {pos}")
                        if can_zero and data == bytes(n):
                            h.zero(n, pos)
                        else:
                            h.pwrite(data, pos)
                        pos += n
                        written += n
                        with self.lock:
                            d.bytes = written
                        if fail and written * 4 >= d.total:
                            raise RuntimeError("simulated disk failure")
                        self.maybe_die(job, d, written)
                        if rate:
                            ahead = written / rate - (time.monotonic() - t0)
                            if ahead > 0 and job.cancel.wait(ahead):
                                raise Cancelled()
            finally:
                os.close(fd)
            if fail:
                raise RuntimeError("simulated disk failure")
            self.maybe_die(job, d, written)
            h.flush()
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass
            del h

    def shutdown(self):
        with self.lock:
            self.dying = True
            jobs = list(self.jobs.values())
            procs = list(self.procs)
        for job in jobs:
            job.cancel.set()
        self.kill_procs(procs)
        deadline = time.monotonic() + 5
        for job in jobs:
            for t in [job.thread] + list(job.threads):
                if t is not None:
                    t.join(max(0.0, deadline - time.monotonic()))
        for job in jobs:
            self.remove_psk(job.job_id)


# ------------------------------------------------------------------------------ HTTP

def parse_json(raw):
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HttpError(400, f"invalid JSON body: {e}")
    if not isinstance(body, dict):
        raise HttpError(400, "invalid JSON body: an object is required")
    return body


def parse_targets(s):
    out, seen = [], set()
    for i, entry in enumerate(s.split(",")):
        key, sep, url = entry.partition(":")
        if not sep or not re.fullmatch(r"[1-9][0-9]{0,9}", key) or int(key) > 2147483647:
            raise HttpError(400, f"invalid field nbd_targets: entry {i + 1} {entry!r} is not <disk key>:<nbd url>")
        m = NBD_URL_RE.match(url)
        if not m or not 1 <= int(m.group("port")) <= 65535:
            raise HttpError(400, f"invalid field nbd_targets: entry {i + 1}: {url!r} is not nbd[s]://host:port/export")
        if int(key) in seen:
            raise HttpError(400, f"invalid field nbd_targets: disk {key} is listed twice")
        seen.add(int(key))
        out.append((int(key), url))
    return out


def tls_url(url, identity, psk_file):
    """nbds://<identity>@host:port/export?tls-psk-file=<file> for libnbd and nbdcopy (the key
    itself stays in the file: never on a command line)."""
    m = NBD_URL_RE.match(url)
    return "nbds://%s@%s:%s/%s?tls-psk-file=%s" % (
        identity, m.group("host"), m.group("port"), m.group("export"),
        urllib.parse.quote(psk_file, safe="/"))


def log(msg):
    sys.stderr.write(f"sna_sim: {now_rfc3339()} {msg}\n")
    sys.stderr.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sna_sim/1"
    sim = None

    def log_message(self, fmt, *args):
        if self.server.verbose:
            log("%s %s" % (self.address_string(), fmt % args))

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > MAX_BODY:
                    raise HttpError(413, "body too large")
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            self.close_connection = True
            raise HttpError(413, "body too large")
        return self.rfile.read(n) if n > 0 else b""

    def reply(self, status, obj):
        if isinstance(obj, Raw):
            data, ctype = obj.data, obj.ctype
        else:
            data, ctype = (json.dumps(obj) + "\n").encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_PUT(self):
        self.handle_any("PUT")

    def do_DELETE(self):
        self.handle_any("DELETE")

    def handle_any(self, method):
        sim = self.sim
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        contract = path.startswith("/api/")
        raw, body, rec = b"", None, None
        if contract:
            rec = {"method": method, "path": path,
                   "headers": {"Idempotency-Key": self.headers.get("Idempotency-Key"),
                               "Authorization": mask_authorization(self.headers.get("Authorization")),
                               "Content-Type": self.headers.get("Content-Type")},
                   "body": None, "status": None, "at": now_rfc3339()}
            with sim.lock:
                sim.requests.append(rec)
        try:
            raw = self.read_body()
            if rec is not None and raw:
                try:
                    body = json.loads(raw.decode("utf-8"))
                    rec["body"] = mask_body(body)
                    if sim.reveal_secrets:  # test-only: kept apart, shown only on ?reveal=1
                        sim.revealed[id(rec)] = {"body": body, "Authorization": self.headers.get("Authorization")}
                except (UnicodeDecodeError, ValueError):
                    rec["body_raw"] = scrub(raw.decode("utf-8", "replace")[:4096], guess=True)
            status, obj = self.route(method, path, url.query, raw)
        except HttpError as e:
            status, obj = e.status, {"error": e.message, "status": e.status}
        except Exception as e:
            traceback.print_exc()
            status, obj = 500, {"error": f"internal error: {e}", "status": 500}
        if rec is not None:
            if path == "/api/v1/backup/start" and isinstance(body, dict):
                # jsonschema quotes the values it rejects: never a secret
                errs = contract_errors("backup-start-request", body)
                rec["contract_errors"] = None if errs is None else [scrub(e, body_secrets(body)) for e in errs]
            elif path == "/api/v1/cleanup" and isinstance(body, dict):
                rec["contract_errors"] = contract_errors("cleanup-request", body)
            rec["status"] = status
            if isinstance(obj, Raw):
                rec["fault"] = obj.label
                rec["reply_bytes"] = len(obj.data)
            if status >= 400:
                err = obj.get("error")
                rec["error"] = scrub(err, body_secrets(body)) if isinstance(err, str) else err
        self.reply(status, obj)

    def route(self, method, path, query, raw):
        sim = self.sim
        h = self.headers
        if method == "POST" and path == "/api/v1/backup/start":
            return 200, sim.start(h, raw)
        if method == "GET" and path.startswith("/api/v1/progress/"):
            return 200, sim.progress(h, urllib.parse.unquote(path[len("/api/v1/progress/"):]))
        if method == "POST" and path == "/api/v1/cleanup":
            return 200, sim.cleanup(h, raw)
        q = urllib.parse.parse_qs(query)
        if path == "/_sim/vm" and method == "POST":
            return 200, sim.create_vm(parse_json(raw))
        if path == "/_sim/vm" and method == "GET":
            return 200, sim.get_vm(q["vm_path"][0] if "vm_path" in q else None)
        if path == "/_sim/write" and method == "POST":
            return 200, sim.write(parse_json(raw))
        if path == "/_sim/requests" and method == "GET":
            reveal = q.get("reveal", ["0"])[0] not in ("", "0")
            if reveal and not sim.reveal_secrets:
                raise HttpError(403, "reveal=1 needs the simulator started with --test-reveal-secrets")
            with sim.lock:
                out = json.loads(json.dumps(sim.requests))
                if reveal:
                    for rec, o in zip(sim.requests, out):
                        r = sim.revealed.get(id(rec))
                        if r is not None:
                            o["body"] = json.loads(json.dumps(r["body"]))
                            o["headers"]["Authorization"] = r["Authorization"]
                return 200, {"requests": out}
        if path == "/_sim/snapshots" and method == "GET":
            with sim.lock:
                return 200, {"snapshots": json.loads(json.dumps(sim.snapshots))}
        if path == "/_sim/faults" and method == "POST":
            job = q["job"][0] if "job" in q else None
            return 200, {"faults": sim.set_faults(parse_json(raw) if raw.strip() else {}, job)}
        if path == "/_sim/faults" and method == "GET":
            with sim.lock:
                if "job" in q:
                    return 200, {"faults": dict(sim.job_faults.get(q["job"][0], {}))}
                return 200, {"faults": dict(sim.faults), "jobs": json.loads(json.dumps(sim.job_faults))}
        if path == "/_sim/reset" and method == "POST":
            return 200, sim.reset()
        if path == "/_sim/jobs" and method == "GET":
            return 200, sim.jobs_json()
        if path == "/_sim/health" and method == "GET":
            return 200, {"ok": True, "pid": os.getpid(), "state": sim.state}
        raise HttpError(404, f"no such endpoint: {method} {path}")


class Server(http.server.ThreadingHTTPServer):
    """HTTP, or HTTPS when ssl_context is set. The TLS handshake runs in the connection's own
    thread (not in accept): a client that connects and says nothing cannot stall the others."""
    daemon_threads = True
    allow_reuse_address = True
    verbose = False
    ssl_context = None

    def finish_request(self, request, client_address):
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(TLS_HANDSHAKE_S)
        try:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log(f"TLS handshake with {client_address[0]}:{client_address[1]} failed: {e}")
            return
        try:
            conn.settimeout(None)
            super().finish_request(conn, client_address)
        finally:
            try:
                conn.close()
            except OSError:
                pass


def ssl_context(cert, key, client_ca):
    """The server's TLS context: its certificate chain, and with client_ca a client
    certificate signed by that CA is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state", required=True, help="directory for all state")
    ap.add_argument("--token", help="require Authorization: Bearer TOKEN on /api/")
    ap.add_argument("--connections", type=int, default=4, help="nbdcopy connections per disk [4]")
    ap.add_argument("--block-size", type=int, default=65536, help="change tracking granularity [65536]")
    ap.add_argument("--verbose", action="store_true", help="log every HTTP request on stderr")
    ap.add_argument("--tls-cert", metavar="FILE", help="serve https with this certificate (PEM chain)")
    ap.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    ap.add_argument("--tls-client-ca", metavar="FILE",
                    help="require a client certificate signed by this CA (needs --tls-cert)")
    ap.add_argument("--test-reveal-secrets", action="store_true",
                    help="TESTS ONLY: /_sim/requests?reveal=1 shows the secrets it otherwise masks")
    a = ap.parse_args(argv)
    if bool(a.tls_cert) != bool(a.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        ap.error("--tls-client-ca needs --tls-cert and --tls-key")
    if a.block_size < 512 or a.block_size & (a.block_size - 1):
        ap.error("--block-size must be a power of two >= 512")
    if a.connections < 1:
        ap.error("--connections must be >= 1")
    ctx = None
    if a.tls_cert:
        try:
            ctx = ssl_context(a.tls_cert, a.tls_key, a.tls_client_ca)
        except (OSError, ssl.SSLError) as e:
            ap.error(f"TLS: {e}")
    sim = Sim(a.state, a.token, a.connections, a.block_size, a.test_reveal_secrets)
    Handler.sim = sim
    server = Server(("127.0.0.1", a.port), Handler)
    server.verbose = a.verbose
    server.ssl_context = ctx

    def on_signal(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    scheme = "https://" if ctx else ""  # plain: the line tests have always matched
    print(f"sna_sim: listening on {scheme}127.0.0.1:{server.server_address[1]} pid={os.getpid()}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        sim.shutdown()
        server.server_close()
        log("stopped")
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
