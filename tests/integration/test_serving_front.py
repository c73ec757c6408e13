"""The serving front as an operator runs it: API keys, the admin API and its token,
bounds on what clients send, the waiting-queue limit, afdctl's commands and exit codes,
and a drain: SIGTERM during generation finishes the request in flight, refuses new ones
and exits 0 within the drain timeout.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, TMP, Checks, free_port, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
port, ctrl, admin_port = free_port(), free_port(), free_port()
url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
TOKEN, ADMIN = "front-cluster-token", "front-admin-token"
keys = os.path.join(TMP, "keys.txt")
open(keys, "w").write("# API keys\nkey-one\n  key-two  \n")
procs = {}
KEY = {"Authorization": "Bearer key-one"}


def start(name, argv):
    log = open(os.path.join(TMP, name + ".log"), "w")
    procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def call(method, base, path, body=None, headers=None, timeout=30):
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None
                                                 else None)
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def afdctl(*args, token=ADMIN):
    env = dict(os.environ, AFD_ADMIN_URL=admin, AFD_ADMIN_TOKEN=token or "")
    return subprocess.run([os.path.join(BIN, "afdctl")] + list(args), capture_output=True,
                          text=True, env=env, timeout=30)


start("coordinator", [os.path.join(BIN, "afd_coordinator"), "--model", model, "--cluster-token",
                      TOKEN, "--port", str(port), "--ctrl-port", str(ctrl), "--admin-port",
                      str(admin_port), "--admin-token", ADMIN, "--api-keys-file", keys,
                      "--max-running", "1", "--max-waiting", "1", "--max-body-kb", "1",
                      "--max-prompt", "64", "--drain-timeout-s", "20"])
time.sleep(0.3)
for name, kind in (("ffn-0", "ffn_node"), ("attn-0", "attn_node")):
    start(name, [os.path.join(BIN, kind), "--model", model, "--coordinator", f"127.0.0.1:{ctrl}",
                 "--cluster-token", TOKEN, "--name", name, "--busy-poll-us", "0"])
try:
    t0 = time.time()
    while time.time() - t0 < 30 and call("GET", url, "/ready")[0] != 200:
        time.sleep(0.1)
    req = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
    # API keys
    st, body, _ = call("POST", url, "/v1/completions", req)
    ck.check("no API key: 401 in OpenAI's error format",
             st == 401 and json.loads(body)["error"]["type"] == "authentication_error", body)
    st, body, _ = call("POST", url, "/v1/completions", req, {"Authorization": "Bearer nope"})
    ck.check("a wrong API key: 401", st == 401, body)
    st, _, _ = call("POST", url, "/v1/completions", req, KEY)
    st2, _, _ = call("POST", url, "/v1/completions", req, {"Authorization": "Bearer key-two"})
    st3, _, _ = call("POST", url, "/v1/messages",
                     {"max_tokens": 4, "messages": [{"role": "user", "content": [5, 6, 7]}]},
                     {"x-api-key": "key-one", "anthropic-version": "2023-06-01"})
    ck.check("keys from the file work as Bearer, and as x-api-key for Anthropic clients",
             st == 200 and st2 == 200 and st3 == 200, f"{st} {st2} {st3}")
    ck.check("/health and /ready need no key", call("GET", url, "/health")[0] == 200 and
             call("GET", url, "/ready")[0] == 200)
    # bounds and malformed input
    st, body, _ = call("POST", url, "/v1/completions", b"x" * 4096,
                       {**KEY, "Content-Type": "application/json"})
    ck.check("a body over --max-body-kb: 413", st == 413, body[:120])
    st, body, _ = call("POST", url, "/v1/completions", b"{not json", KEY)
    ck.check("bad JSON: 400", st == 400 and "JSON" in body, body[:120])
    st, body, _ = call("POST", url, "/v1/completions", {"prompt": [1], "max_tokens": "5"}, KEY)
    ck.check("a field of the wrong type: 400 naming it", st == 400 and "max_tokens" in body,
             body[:160])
    st, body, _ = call("POST", url, "/v1/completions", {"prompt": list(range(100))}, KEY)
    ck.check("a prompt over --max-prompt: 400", st == 400 and "prompt" in body, body[:160])
    st, body, _ = call("POST", url, "/v1/completions",
                       {"prompt": [1], "max_tokens": 10**7}, KEY)
    ck.check("max_tokens beyond the context: 400", st == 400, body[:160])
    # queue limit: one running (--max-running 1), one waiting (--max-waiting 1), then 429
    long_req = {"prompt": [1, 2], "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    results = {}

    def bg(name):
        results[name] = call("POST", url, "/v1/completions", long_req, KEY, timeout=120)

    a = threading.Thread(target=bg, args=("a",))
    a.start()
    time.sleep(0.5)
    b = threading.Thread(target=bg, args=("b",))
    b.start()
    time.sleep(0.5)
    st, body, hdr = call("POST", url, "/v1/completions", req, KEY)
    ck.check("a full waiting queue: 429 with Retry-After",
             st == 429 and "Retry-After" in hdr, f"{st} {body[:120]}")
    # the admin API and afdctl
    st, _, _ = call("GET", admin, "/admin/status")
    st2, _, _ = call("GET", admin, "/admin/status", headers={"Authorization": "Bearer wrong"})
    st3, _, _ = call("GET", url, "/admin/status", headers=KEY)
    ck.check("the admin API wants its own token; the API port has no admin routes",
             st == 401 and st2 == 401 and st3 == 404, f"{st} {st2} {st3}")
    r = afdctl("requests", "-o", "json")
    reqs = json.loads(r.stdout)["requests"] if r.returncode == 0 else []
    ck.check("afdctl requests shows one running and one waiting sequence",
             sorted(x["state"] for x in reqs) == ["running", "waiting"], r.stdout[:200])
    outs = {c: afdctl(c) for c in ("status", "nodes", "placement", "requests", "config",
                                   "metrics")}
    ck.check("afdctl status/nodes/placement/requests/config/metrics print tables and text",
             all(o.returncode == 0 and o.stdout for o in outs.values()) and
             "serving" in outs["nodes"].stdout and "afd_num_requests_running" in
             outs["metrics"].stdout and "drain-timeout-s = 20" in outs["config"].stdout,
             {k: v.returncode for k, v in outs.items()})
    ck.check("afdctl config hides the secrets",
             "front-admin-token" not in outs["config"].stdout and
             "front-cluster-token" not in outs["config"].stdout)
    r1 = afdctl("status", token="wrong")
    r2 = subprocess.run([os.path.join(BIN, "afdctl"), "status", "--url",
                         f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True)
    r3 = afdctl("drain")
    r4 = afdctl("frobnicate")
    r5 = afdctl("drain", "--help")
    ck.check("afdctl exit codes: 4 refused token, 3 unreachable, 2 usage, 0 for --help",
             (r1.returncode, r2.returncode, r3.returncode, r4.returncode, r5.returncode) ==
             (4, 3, 2, 2, 0), f"{r1.returncode} {r2.returncode} {r3.returncode} "
                              f"{r4.returncode} {r5.returncode}")
    # drain through the admin API: new requests get 503, then undrain admits again
    r = afdctl("drain", "--all")
    st, body, _ = call("POST", url, "/v1/completions", req, KEY)
    ready = call("GET", url, "/ready")[0]
    afdctl("drain", "--undrain")
    ck.check("afdctl drain --all: new requests get 503 and /ready is false; --undrain undoes it",
             r.returncode == 0 and st == 503 and "draining" in body and ready == 503 and
             call("GET", url, "/ready")[0] == 200, f"{st} {ready} {body[:100]}")
    # SIGTERM while a request is in flight: it finishes, new ones are refused, exit 0
    a.join(120)
    b.join(120)
    ck.check("the long requests finished whole", results.get("a", (0,))[0] == 200 and
             results.get("b", (0,))[0] == 200)
    done = {}

    def inflight():
        done["r"] = call("POST", url, "/v1/completions",
                         {"prompt": [3, 4], "max_tokens": 600, "temperature": 0,
                          "ignore_eos": True}, KEY, timeout=60)

    t = threading.Thread(target=inflight)
    t.start()
    time.sleep(0.5)
    t_sig = time.time()
    procs["coordinator"].send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        st, body, _ = call("POST", url, "/v1/completions", req, KEY, timeout=5)
    except OSError as e:
        st, body = None, str(e)
    t.join(60)
    rc = procs["coordinator"].wait(30)
    took = time.time() - t_sig
    st_in, body_in, _ = done.get("r", (None, "", {}))
    ck.check("SIGTERM: the request in flight finishes whole",
             st_in == 200 and len(json.loads(body_in)["choices"][0]["token_ids"]) == 600,
             f"{st_in} {body_in[:120]}")
    ck.check("SIGTERM: a new request meanwhile gets 503", st == 503, f"{st} {body[:120]}")
    ck.check(f"SIGTERM: the coordinator exits 0 within the drain timeout ({took:.1f} s)",
             rc == 0 and took < 20, f"rc {rc}")
finally:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
    print("--- coordinator log tail\n" + open(os.path.join(TMP, "coordinator.log")).read()[-800:])
sys.exit(ck.done())
