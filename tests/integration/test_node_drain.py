"""Scaling attention nodes down and up without stopping the cluster: `afdctl drain NODE`
sends the node no new sequences; the ones it runs finish whole; then it leaves the data
plane under a new epoch while the other node's requests go on untouched; stopping it
afterwards fails nothing; a new attention node joins a serving cluster under another
epoch and takes requests.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, TMP, Checks, free_port, get, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
port, ctrl, admin_port = free_port(), free_port(), free_port()
url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
TOKEN = "drain-test-token"
procs = {}


def start(name, argv):
    log = open(os.path.join(TMP, name + ".log"), "w")
    procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def node(name, kind):
    start(name, [os.path.join(BIN, kind), "--model", model, "--coordinator", f"127.0.0.1:{ctrl}",
                 "--cluster-token", TOKEN, "--name", name, "--busy-poll-us", "0"])


def status():
    return get(admin, "/admin/status")[1]


def wait(pred, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def afdctl(*args):
    return subprocess.run([os.path.join(BIN, "afdctl")] + list(args) + ["--url", admin],
                          capture_output=True, text=True, timeout=30)


start("coordinator", [os.path.join(BIN, "afd_coordinator"), "--model", model, "--cluster-token",
                      TOKEN, "--port", str(port), "--ctrl-port", str(ctrl), "--admin-port",
                      str(admin_port), "--attn", "2", "--ffn", "1", "--micro-batches", "2"])
time.sleep(0.3)
node("ffn-0", "ffn_node")
node("attn-a", "attn_node")
node("attn-b", "attn_node")
results = {}


def long_req(name, prompt, n):
    results[name] = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": n,
                                                  "temperature": 0, "ignore_eos": True},
                         timeout=120)


try:
    ck.check("a 2A1F cluster is ready", wait(lambda: get(url, "/ready")[0] == 200))
    epoch0 = status()["cluster"]["epoch"]
    t1 = threading.Thread(target=long_req, args=("r1", [1, 2, 3], 600))
    t1.start()
    time.sleep(0.4)
    t2 = threading.Thread(target=long_req, args=("r2", [4, 5, 6], 1200))
    t2.start()
    time.sleep(0.4)
    reqs = get(admin, "/admin/requests")[1]["requests"]
    nodes_of = {r["prompt_tokens"]: r.get("node") for r in reqs}
    ck.check("the two long requests run on different attention nodes",
             len(reqs) == 2 and len(set(r.get("node") for r in reqs)) == 2, str(reqs)[:200])
    victim = reqs[0]["node"]
    other = [r["node"] for r in reqs if r["node"] != victim][0]
    r = afdctl("drain", str(victim))
    ck.check("afdctl drain NODE answers that the node is draining",
             r.returncode == 0 and "draining" in r.stdout, r.stdout + r.stderr)
    st, short = post(url, "/v1/completions", {"prompt": [9, 9], "max_tokens": 3,
                                              "temperature": 0})
    ck.check("a request meanwhile is served (by the other node)", st == 200, str(short)[:120])
    t1.join(120)
    st1, b1 = results.get("r1", (None, None))
    ck.check("the drained node's request finishes whole",
             st1 == 200 and len(b1["choices"][0]["token_ids"]) == 600, str(b1)[:120])
    left = wait(lambda: any(n["id"] == victim and n["state"] == "drained" and not n["member"]
                            for n in status()["nodes"]) and
                status()["cluster"]["epoch"] > epoch0 and status()["cluster"]["ready"], 20)
    ck.check("then the drained node leaves the data plane under a new epoch, and the cluster "
             "stays ready", left, json.dumps(status()["nodes"])[:300])
    name = "attn-a" if any(n["id"] == victim and n["name"] == "attn-a"
                           for n in status()["nodes"]) else "attn-b"
    procs[name].send_signal(signal.SIGTERM)
    procs[name].wait(10)
    time.sleep(0.5)
    ck.check("stopping the drained node fails nothing: /ready stays 200",
             get(url, "/ready")[0] == 200)
    t2.join(120)
    st2, b2 = results.get("r2", (None, None))
    ck.check("the other node's long request went on through the epoch change, whole",
             st2 == 200 and len(b2["choices"][0]["token_ids"]) == 1200, str(b2)[:120])
    epoch1 = status()["cluster"]["epoch"]
    node("attn-c", "attn_node")
    joined = wait(lambda: status()["cluster"]["epoch"] > epoch1 and status()["cluster"]["ready"]
                  and sum(1 for n in status()["nodes"] if n["role"] == "attention" and
                          n["member"] and n["state"] == "serving") == 2, 30)
    ck.check("a new attention node joins the serving cluster under a new epoch", joined,
             json.dumps(status()["nodes"])[:300])
    outs = []
    ths = [threading.Thread(target=lambda i=i: outs.append(post(
        url, "/v1/completions", {"prompt": [i + 1, i + 2], "max_tokens": 20, "temperature": 0},
        timeout=60)[0])) for i in range(6)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    ck.check("and requests are served on the new membership", outs == [200] * 6, str(outs))
    st, again = post(url, "/v1/completions", {"prompt": [4, 5, 6], "max_tokens": 1200,
                                              "temperature": 0, "ignore_eos": True}, timeout=120)
    ck.check("the request that lived through the epoch change equals the same request now",
             st == 200 and st2 == 200 and
             again["choices"][0]["token_ids"] == b2["choices"][0]["token_ids"])
    alive = all(procs[n].poll() is None for n in ("coordinator", "ffn-0", "attn-c", other and
                                                  ("attn-b" if name == "attn-a" else "attn-a")))
    ck.check("every daemon still up", alive)
finally:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    print("--- coordinator log tail\n" + open(os.path.join(TMP, "coordinator.log")).read()[-1500:])
sys.exit(ck.done())
