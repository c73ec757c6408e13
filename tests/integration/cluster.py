"""Helpers for integration tests that start real daemons on loopback."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

BIN = os.environ.get("BIN", os.path.join(os.getcwd(), "build", "bin"))
TMP = os.environ.get("TEST_TMP", "/tmp")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class LocalUp:
    """afdctl local-up as a child; stops it (SIGINT) on exit."""

    def __init__(self, model, attn=1, ffn=1, mb=3, extra=(), timeout=60):
        # a port free_port found may be taken before the coordinator binds it: then the
        # coordinator says so in its log and the cluster starts again on other ports
        for attempt in range(3):
            self.port = free_port()
            self.admin_port = free_port()
            self.logdir = os.path.join(TMP, f"logs-{self.port}")
            os.makedirs(self.logdir, exist_ok=True)
            cmd = [os.path.join(BIN, "afdctl"), "local-up", "--model", model, "--attn",
                   str(attn), "--ffn", str(ffn), "--port", str(self.port), "--admin-port",
                   str(self.admin_port), "--micro-batches", str(mb),
                   "--log-dir", self.logdir] + list(extra)
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
            line = self.proc.stdout.readline()
            if line.startswith("ready: "):
                break
            self.stop()
            err = self.proc.stderr.read()
            try:
                coord = open(os.path.join(self.logdir, "coordinator.log")).read()
            except OSError:
                coord = ""
            if "address already in use" not in coord or attempt == 2:
                raise RuntimeError(f"cluster did not start: {line!r} {err}")
        self.url = line.split()[1]
        line = self.proc.stdout.readline()
        self.admin = line.split()[1] if line.startswith("admin: ") else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()


class Daemons:
    """A cluster of daemons started one by one (each logs to TMP/NAME.log), for tests that
    kill, stop and restart them singly. stop() ends them all and prints their log tails."""

    def __init__(self, model, token, attn, ffn, coord_args=(), node_args=(), attn_args=()):
        self.model, self.token, self.attn, self.ffn = model, token, attn, ffn
        self.port, self.ctrl, self.admin_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.coord_args, self.node_args = list(coord_args), list(node_args)
        self.attn_args = list(attn_args)
        self.procs = {}

    def start(self, name, argv):
        """argv[0] is a binary in BIN, or a path"""
        exe = argv[0] if os.sep in argv[0] else os.path.join(BIN, argv[0])
        with open(os.path.join(TMP, name + ".log"), "a") as log:
            self.procs[name] = subprocess.Popen([exe] + list(argv[1:]), stdout=log,
                                                stderr=subprocess.STDOUT)

    def coordinator(self, name="coordinator"):
        self.start(name, ["afd_coordinator", "--model", self.model, "--cluster-token", self.token,
                          "--port", str(self.port), "--ctrl-port", str(self.ctrl),
                          "--admin-port", str(self.admin_port), "--attn", str(self.attn),
                          "--ffn", str(self.ffn)] + self.coord_args)

    def node(self, name, kind):
        self.start(name, [kind, "--model", self.model, "--coordinator", f"127.0.0.1:{self.ctrl}",
                          "--cluster-token", self.token, "--name", name, "--busy-poll-us", "0"] +
                   self.node_args + (self.attn_args if kind == "attn_node" else []))

    def wait_ready(self, want=True, timeout=30):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if (get(self.url, "/ready")[0] == 200) == want:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def alive(self, *names):
        return all(self.procs[n].poll() is None for n in names)

    def log(self, name):
        with open(os.path.join(TMP, name + ".log")) as f:
            return f.read()

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a test may have stopped it
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for name in self.procs:
            print(f"--- {name} log tail\n{self.log(name)[-600:]}")


def post(url, path, body, timeout=60, headers=None):
    data = json.dumps(body).encode() if not isinstance(body, (bytes, str)) else (
        body.encode() if isinstance(body, str) else body)
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get(url, path, timeout=10):
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def scrape(url):
    """The Prometheus text at url + /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text, name, **labels):
    """The value of the first sample of metric `name` carrying every label given, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def stream(url, path, body, timeout=60):
    """POST with stream=true; returns the list of decoded data events (the last is '[DONE]')."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def afd_run(model, prompts, max_tokens, *extra):
    cmd = [os.path.join(BIN, "afd_run"), "--model", model, "--max-tokens", str(max_tokens),
           "--json", "--ignore-eos", "--threads", "1", "--logprobs", "1"] + list(extra)
    for p in prompts:
        cmd += ["--prompt", ",".join(map(str, p))]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


class Checks:
    def __init__(self):
        self.results = []

    def check(self, name, cond, detail=""):
        self.results.append(bool(cond))
        print(("ok - " if cond else "not ok - ") + name + (f"  [{detail}]" if detail else ""),
              flush=True)

    def done(self):
        print(f"{sum(self.results)} of {len(self.results)} checks passed")
        return 0 if all(self.results) else 1
