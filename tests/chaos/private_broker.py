"""private_broker.py: one private RabbitMQ node for a chaos scenario, through scripts/broker
start|stop|ctl DIR [PORT]; the one copy chaos.py and io_env.py share. Not a script: imported.

The AMQP port is picked at random in with-broker's range (11000-11699) so that the node's
distribution (+20000) and epmd (+21000) ports, and the management port (+19000), stay below
the ephemeral range; a port whose companions are busy is skipped. Nothing outside 127.0.0.1;
the node is stopped by PID (scripts/broker stop), its directory left to the caller."""
import os
import random
import shutil
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "broker")
PORTS = (11000, 11699)
START_TRIES = 5


def _busy(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


def _free_port():
    for _ in range(50):
        p = random.randint(*PORTS)
        if not any(_busy(q) for q in (p, p + 19000, p + 20000, p + 21000)):
            return p
    raise RuntimeError("no free broker port")


class Broker:
    """One node with its state in directory; url/urls name it; close() stops exactly it."""

    def __init__(self, directory):
        self.dir = directory
        last = ""
        for _ in range(START_TRIES):
            port = _free_port()
            r = self._run("start", self.dir, str(port), timeout=180)
            if r.returncode == 0:
                self.port = port
                self.url = f"amqp://guest:guest@127.0.0.1:{port}"
                self.urls = [self.url]
                return
            last = (r.stdout + r.stderr).strip()[-600:]
            self._run("stop", self.dir, timeout=120)
            shutil.rmtree(self.dir, ignore_errors=True)
        raise RuntimeError(f"no private broker: {last}")

    @staticmethod
    def _run(*args, timeout):
        return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)

    def ctl(self, *args, timeout=60):
        """rabbitmqctl ARGS against this node; returns (exit code, output)."""
        r = self._run("ctl", self.dir, *args, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()

    def stop(self):
        """Stops the node (its state stays); returns scripts/broker's exit code."""
        return self._run("stop", self.dir, timeout=180).returncode

    def start(self):
        """Starts it again after stop(), on the same port (scripts/broker keeps it in DIR)."""
        return self._run("start", self.dir, timeout=180).returncode

    def restart(self, down_s):
        """stop, down_s seconds down, start again; returns the seconds it took."""
        t0 = time.time()
        if self.stop() != 0:
            raise RuntimeError("broker stop failed")
        time.sleep(down_s)
        r = self._run("start", self.dir, str(self.port), timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"broker restart failed: {(r.stdout + r.stderr).strip()[-400:]}")
        return time.time() - t0

    def beam_pid(self):
        with open(os.path.join(self.dir, "run", "beam.pid")) as f:
            return int(f.read().split()[0])

    def close(self):
        self.stop()
