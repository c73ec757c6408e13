"""Nodes and the coordinator dying and coming back: no client hangs, nothing else restarts.

- an attention node killed (SIGKILL) while four requests stream: the coordinator, the
  FFN nodes and the other attention node stay up; the sequences are recomputed on the
  survivor from their prompts and the tokens they had, and every stream completes; the
  cluster serves on (same greedy output), and a restarted attention node joins again;
- the coordinator killed (SIGKILL) mid-stream: the streaming client's connection ends
  (no hang), every node stays up and keeps its weights; a coordinator started again on
  the same ports gets every node back (the FFN nodes with their own expert shares) and
  the cluster serves the same greedy output as before.
"""
import json
import os
import signal
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, Daemons, get, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
TOKEN = "restart-test-token"
d = Daemons(model, TOKEN, 2, 2, coord_args=["--node-timeout-ms", "5000"],
            node_args=["--coordinator-wait-s", "60"], attn_args=["--step-deadline-ms", "3000"])
url, admin, procs = d.url, d.admin, d.procs
node, wait_ready, alive, log = d.node, d.wait_ready, d.alive, d.log


def stream(body, out):
    """Streams one completion; out gets its events and how it ended."""
    body = dict(body, stream=True)
    r = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    out["events"] = []
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    p = line[6:]
                    out["events"].append(p if p == "[DONE]" else json.loads(p))
        ev = out["events"]
        if ev and ev[-1] == "[DONE]" and any(isinstance(e, dict) and "error" in e for e in ev):
            out["end"] = "error event"
        elif ev and ev[-1] == "[DONE]":
            out["end"] = "complete"
        else:
            out["end"] = "closed without [DONE]"
    except (OSError, ValueError) as e:  # the connection went away: explicit, not a hang
        out["end"] = f"connection error ({type(e).__name__})"


def tokens(out):
    return sum(len(e["choices"][0].get("token_ids", [])) for e in out["events"]
               if isinstance(e, dict) and e.get("choices"))


d.coordinator()
time.sleep(0.3)
for n in ("ffn-0", "ffn-1"):
    node(n, "ffn_node")
for n in ("attn-0", "attn-1"):
    node(n, "attn_node")
try:
    ck.check("a 2A2F cluster of separately started daemons becomes ready", wait_ready())
    req = {"prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    st, before = post(url, "/v1/completions", req)
    ck.check("it serves a completion", st == 200, str(before)[:200])
    want = before["choices"][0]["token_ids"] if st == 200 else None

    # ---- an attention node dies while four requests stream
    outs = [{} for _ in range(4)]
    th = [threading.Thread(target=stream, args=({"prompt": [3 + i, 4, 5], "max_tokens": 300,
                                                 "temperature": 0, "ignore_eos": True}, o))
          for i, o in enumerate(outs)]
    for t in th:
        t.start()
    t0 = time.time()
    while min(tokens(o) if "events" in o else 0 for o in outs) < 3 and time.time() - t0 < 30:
        time.sleep(0.02)
    procs["attn-1"].send_signal(signal.SIGKILL)
    procs["attn-1"].wait()
    for t in th:
        t.join(60)
    ends = [o.get("end") for o in outs]
    ck.check("attention node killed: every streaming client ends, none hangs",
             not any(t.is_alive() for t in th) and all(ends), str(ends))
    ck.check("each is recomputed on the surviving attention node and completes: 300 tokens",
             ends == ["complete"] * 4 and [tokens(o) for o in outs] == [300] * 4,
             f"{ends} {[tokens(o) for o in outs]}")
    ck.check("coordinator, FFN nodes and the other attention node stay up",
             alive("coordinator", "ffn-0", "ffn-1", "attn-0"))
    ok = wait_ready(True, 30)
    st, after = post(url, "/v1/completions", req) if ok else (None, None)
    ck.check("the cluster serves on with one attention node, same greedy output",
             st == 200 and after["choices"][0]["token_ids"] == want, str(after)[:200])
    node("attn-1b", "attn_node")
    t0 = time.time()
    n_attn = 0
    while time.time() - t0 < 30 and n_attn < 2:
        st, s = get(admin, "/admin/status")
        n_attn = sum(1 for n in s.get("nodes", []) if n.get("role") == "attention"
                     and n.get("member")) if st == 200 else 0
        time.sleep(0.2)
    ck.check("a restarted attention node joins again", n_attn == 2, f"{n_attn} attention members")

    # ---- the coordinator dies mid-stream and comes back
    out = {}
    t = threading.Thread(target=stream, args=({"prompt": [9, 9, 9], "max_tokens": 3000,
                                               "temperature": 0, "ignore_eos": True}, out))
    t.start()
    t0 = time.time()
    while ("events" not in out or tokens(out) < 3) and time.time() - t0 < 30:
        time.sleep(0.02)
    procs["coordinator"].send_signal(signal.SIGKILL)
    procs["coordinator"].wait()
    t.join(30)
    ck.check("coordinator killed: the streaming client's connection ends, no hang",
             not t.is_alive() and out.get("end") not in (None, "complete"), str(out.get("end")))
    time.sleep(1.0)
    ck.check("every node stays up without the coordinator",
             alive("ffn-0", "ffn-1", "attn-0", "attn-1b"))
    d.coordinator("coordinator-2")
    ok = wait_ready(True, 40)
    ck.check("a coordinator started again gets every node back", ok)
    st, again = post(url, "/v1/completions", req) if ok else (None, None)
    ck.check("it serves the same greedy output as before",
             st == 200 and again["choices"][0]["token_ids"] == want, str(again)[:200])
    ffn_logs = log("ffn-0") + log("ffn-1")
    ck.check("the FFN nodes kept their weights and their expert shares",
             ffn_logs.count("rejoining") == 2 and "loading the experts" not in ffn_logs,
             ffn_logs[-400:])
    ck.check("the attention nodes rejoined without restarting",
             "rejoining" in log("attn-0") and "rejoining" in log("attn-1b"))
finally:
    d.stop()
sys.exit(ck.done())
