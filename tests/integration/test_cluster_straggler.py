"""Slow and stuck peers.

- a straggler: one FFN node stopped for 30 ms every 150 ms (SIGSTOP/SIGCONT) while a
  request streams: the request completes, and the attention node's per-peer answer time
  shows that node (admin status, `afdctl nodes`, /metrics);
- a stuck peer: the FFN node stopped for good while a request streams: the attention
  node's step deadline turns it into an explicit error event for the client (no hang),
  the coordinator drops the silent node after its timeout; once the node runs again it
  finds the coordinator gone, joins again, and the cluster serves the same greedy output.
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
from cluster import BIN, Checks, Daemons, get, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
TOKEN = "straggler-test-token"
d = Daemons(model, TOKEN, 1, 2, coord_args=["--node-timeout-ms", "4000",
                                             "--recovery-timeout-s", "2"],
            node_args=["--heartbeat-ms", "200"], attn_args=["--step-deadline-ms", "2000"])
url, admin, procs = d.url, d.admin, d.procs
node, wait_ready = d.node, d.wait_ready


def stream(body, out):
    body = dict(body, stream=True, temperature=0, ignore_eos=True)
    r = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    out["events"] = []
    with urllib.request.urlopen(r, timeout=60) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                p = line[6:]
                out["events"].append(p if p == "[DONE]" else json.loads(p))


def node_id(name):
    st, s = get(admin, "/admin/status")
    return next(n["id"] for n in s["nodes"] if n.get("name") == name)


d.coordinator()
time.sleep(0.3)
for n in ("ffn-0", "ffn-1"):
    node(n, "ffn_node")
node("attn-0", "attn_node")
try:
    ck.check("a 1A2F cluster becomes ready", wait_ready())
    req = {"prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    st, before = post(url, "/v1/completions", req)
    ck.check("it serves a completion", st == 200, str(before)[:200])
    slow = node_id("ffn-1")

    # ---- a straggler
    out = {}
    t = threading.Thread(target=stream, args=({"prompt": [1, 2, 3], "max_tokens": 1500}, out))
    t.start()
    t0 = time.time()
    while len(out.get("events", [])) < 3 and time.time() - t0 < 30:
        time.sleep(0.01)
    p = procs["ffn-1"]
    for _ in range(20):  # stopped 30 ms of every 150 ms: slow, never past a deadline
        p.send_signal(signal.SIGSTOP)
        time.sleep(0.03)
        p.send_signal(signal.SIGCONT)
        time.sleep(0.12)
    t.join(60)
    ev = out.get("events", [])
    ck.check("with a straggler the streamed request still completes",
             not t.is_alive() and ev and ev[-1] == "[DONE]" and
             not any(isinstance(e, dict) and "error" in e for e in ev), f"{len(ev)} events")
    time.sleep(0.5)  # a heartbeat carries the attention node's figures
    st, s = get(admin, "/admin/status")
    attn = next(n for n in s["nodes"] if n["role"] == "attention")
    lat = {x["peer"]: x for x in attn.get("peer_latency", [])}
    ans = lat.get(slow, {}).get("answer_max_us", 0)
    ck.check("the attention node's answer time from the straggler shows its stops (>= 20 ms)",
             ans >= 20000, f"answer max per peer: "
             f"{ {k: v.get('answer_max_us') for k, v in lat.items()} } us (straggler {slow})")
    r = subprocess.run([os.path.join(BIN, "afdctl"), "nodes", "--url", admin],
                       capture_output=True, text=True)
    ck.check("afdctl nodes shows the per-peer answer times",
             r.returncode == 0 and f"{slow}:" in r.stdout and "ANSWER" in r.stdout, r.stdout[-400:])
    with urllib.request.urlopen(url + "/metrics", timeout=10) as m:
        metrics = m.read().decode()
    ck.check("/metrics has afd_peer_answer_seconds for the straggler",
             f'afd_peer_answer_seconds_count{{node="{attn["id"]}",peer="{slow}"}}' in metrics)

    # ---- a stuck peer
    out = {}
    t = threading.Thread(target=stream, args=({"prompt": [1, 2, 3], "max_tokens": 3000}, out))
    t.start()
    t0 = time.time()
    while len(out.get("events", [])) < 3 and time.time() - t0 < 30:
        time.sleep(0.01)
    p.send_signal(signal.SIGSTOP)
    t1 = time.time()
    t.join(30)
    took = time.time() - t1
    ev = out.get("events", [])
    errs = [e for e in ev if isinstance(e, dict) and "error" in e]
    ck.check("a stuck peer: the client gets an explicit error event and [DONE], no hang",
             not t.is_alive() and errs and ev[-1] == "[DONE]",
             f"after {took:.1f} s: {str(errs)[:200]}")
    ck.check("the error names the step deadline", errs and "deadline" in json.dumps(errs[0]),
             str(errs)[:200])
    ck.check("the coordinator drops the silent node: not ready", wait_ready(False, 15))
    ck.check("every other daemon stays up",
             all(procs[n].poll() is None for n in ("coordinator", "ffn-0", "attn-0")))
    p.send_signal(signal.SIGCONT)
    ck.check("running again, the node joins again and the cluster is ready", wait_ready(True, 30))
    st, after = post(url, "/v1/completions", req)
    ck.check("and it serves the same greedy output as before",
             st == 200 and after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"],
             str(after)[:200])
finally:
    d.stop()
sys.exit(ck.done())
