#!/usr/bin/python3
"""io_proxy.py: an HTTP-aware TCP proxy between the workers and the SNA simulator that can
black-hole or reset chosen requests: the start, progress or cleanup call of chosen jobs.

Each client connection carries one request here: the proxy reads the request head and body,
decides by its kind (start, progress, cleanup, other) and job_id (the progress path, or the
body's "job_id") and then
  pass       relays it on a fresh upstream connection, the reply back with
             "Connection: close" added, then closes (the client opens a new one next time);
  blackhole  never answers and keeps reading until the client gives up (accepted, then
             silent: a peer that died behind a NAT);
  reset      closes the connection with a TCP reset (SO_LINGER 0) before any reply.
A rule is (kind, job_id or "*") -> (action, count): count requests get the action, then it
is spent (None: forever). Threads, one per connection; loopback only.
Not a script: imported by scn_sna.py."""
import json
import socket
import struct
import threading
import time

KINDS = ("start", "progress", "cleanup")


def kind_of(method, path):
    if method == "POST" and path.endswith("/backup/start"):
        return "start"
    if method == "GET" and "/api/v1/progress/" in path:
        return "progress"
    if method == "POST" and path.endswith("/api/v1/cleanup"):
        return "cleanup"
    return "other"


class SnaProxy:
    def __init__(self, upstream_port, host="127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.lock = threading.Lock()
        self.rules = {}          # (kind, job_id or "*") -> [action, count or None]
        self.hits = []           # (time, kind, job_id, action)
        self.conns = set()
        self.stopping = False
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((host, 0))
        self.srv.listen(128)
        self.port = self.srv.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self._accept, name="sna-proxy", daemon=True)
        self.thread.start()

    def set_upstream(self, port):
        with self.lock:
            self.upstream = (self.upstream[0], port)

    def rule(self, kind, job_id, action, count=None):
        """From now on: requests of kind for job_id ("*": any) get action for count of them
        (None: until cleared); action None clears the rule."""
        with self.lock:
            if action is None:
                self.rules.pop((kind, job_id), None)
            else:
                self.rules[(kind, job_id)] = [action, count]

    def count(self, kind=None, job_id=None, action=None):
        with self.lock:
            return len([h for h in self.hits if (kind is None or h[1] == kind) and
                        (job_id is None or h[2] == job_id) and (action is None or h[3] == action)])

    def _decide(self, kind, jid):
        with self.lock:
            for key in ((kind, jid), (kind, "*")):
                r = self.rules.get(key)
                if r is None:
                    continue
                action, count = r
                if count is not None:
                    r[1] -= 1
                    if r[1] <= 0:
                        del self.rules[key]
                self.hits.append((time.time(), kind, jid, action))
                return action
            self.hits.append((time.time(), kind, jid, "pass"))
            return "pass"

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _read_request(c):
        """(head bytes, body bytes) of one request, or None when the client went first."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                return None
            buf += d
        head, body = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(body) < length:
            d = c.recv(65536)
            if not d:
                return None
            body += d
        return head, body

    def _serve(self, c):
        up = None
        try:
            c.settimeout(120)
            req = self._read_request(c)
            if req is None:
                return
            head, body = req
            method, path = (head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""])[:2]
            kind = kind_of(method, path)
            jid = None
            if kind == "progress":
                jid = path.rsplit("/", 1)[-1]
            elif kind in ("start", "cleanup"):
                try:
                    jid = json.loads(body).get("job_id")
                except (ValueError, AttributeError):
                    jid = None
            action = self._decide(kind, jid)
            if action == "blackhole":
                while not self.stopping and c.recv(65536):
                    pass
                return
            if action == "reset":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:")]
            with self.lock:
                upstream = self.upstream
            up = socket.create_connection(upstream, timeout=120)
            up.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
            first = True
            while True:
                d = up.recv(65536)
                if not d:
                    break
                if first and b"\r\n" in d:
                    status, rest = d.split(b"\r\n", 1)
                    d = status + b"\r\nConnection: close\r\n" + rest
                    first = False
                c.sendall(d)
        except OSError:
            pass
        finally:
            if up is not None:
                up.close()
            with self.lock:
                self.conns.discard(c)
            c.close()

    def close(self):
        self.stopping = True
        self.srv.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)
