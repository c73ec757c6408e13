"""The nodes' pipeline timelines (--trace-file; afdctl local-up --trace-dir) and
afdctl trace-merge, on a 1A2F tiny cluster with 2 micro-batches serving concurrent
greedy requests.

What the timelines must show, checked span by span:
  - each node's spans never overlap (one pipeline thread per node);
  - the attention node runs every layer of every (step, micro-batch) it starts, in layer
    order, and samples it once after the last layer;
  - every FFN node runs each of those (step, layer, micro-batch) once, with as many
    tokens as the attention node sent, after the attention node's span for it ended and
    before the attention node's next layer of that micro-batch began (the data
    dependency, seen through one host's monotonic clock);
  - afdctl trace-merge keeps every event and prints each node's time by span; a file
    that is not a trace fails it with a message.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, Checks, LocalUp, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
layers = json.load(open(os.path.join(model, "config.json")))
layers = layers.get("text_config", layers)["num_hidden_layers"]
ck = Checks()
tmp = tempfile.mkdtemp(prefix="afd-trace-", dir=os.environ.get("TEST_TMP", "/tmp"))
tdir = os.path.join(tmp, "traces")  # local-up creates it

REQS = [([5, 6, 7, 8], 12), ([9, 10], 6), (list(range(30, 60)), 10), ([300], 3)]
with LocalUp(model, 1, 2, 2, extra=["--trace-dir", tdir]) as c:
    out = [None] * len(REQS)

    def one(i, prompt, n):
        out[i] = post(c.url, "/v1/completions", {"prompt": prompt, "max_tokens": n,
                                                 "temperature": 0, "ignore_eos": True})

    th = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(REQS)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    ck.check("the requests complete", all(o and o[0] == 200 for o in out), str(out)[:300])
# the nodes write their timelines when they stop
files = {n: os.path.join(tdir, f"{n}.trace.json") for n in ("attn-0", "ffn-0", "ffn-1")}
ck.check("each node wrote its timeline", all(os.path.exists(f) for f in files.values()),
         str(os.listdir(tdir) if os.path.isdir(tdir) else "no directory"))
ev = {}
for n, f in files.items():
    try:
        doc = json.load(open(f))
        ev[n] = [e for e in doc["traceEvents"] if e["ph"] == "X"]
        meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
        ck.check(f"{n}: a Chrome trace naming its node, {len(ev[n])} spans",
                 meta and meta[0]["args"]["name"] == n and ev[n])
    except (OSError, ValueError, KeyError) as e:
        ck.check(f"{n}: a Chrome trace", False, str(e))
if len(ev) != 3:
    sys.exit(ck.done())

for n, spans in ev.items():
    s = sorted(spans, key=lambda e: e["ts"])
    over = [(a["name"], b["name"]) for a, b in zip(s, s[1:]) if a["ts"] + a["dur"] > b["ts"]]
    ck.check(f"{n}: no two spans overlap", not over, str(over[:3]))

# the attention node: per (step, mb), layers 0..L-1 in order, then one sample
attn = {}
for e in ev["attn-0"]:
    g = e["args"]
    if e["name"] == "attention":
        attn.setdefault((g["step"], g["mb"]), []).append((e["ts"], g["layer"], g["tokens"], e))
samples = {}
for e in ev["attn-0"]:
    if e["name"] == "lm_head+sample":
        k = (e["args"]["step"], e["args"]["mb"])
        samples[k] = samples.get(k, 0) + 1
full = {k: sorted(v, key=lambda x: x[0]) for k, v in attn.items() if v and v[0][2] > 0}
ck.check(f"the attention node ran {len(full)} (step, micro-batch) with tokens",
         len(full) >= 4, str(sorted(full))[:200])
bad = [k for k, v in full.items()
       if [x[1] for x in v] != list(range(layers)) or samples.get(k) != 1]
ck.check("each ran layers 0..L-1 in order and was sampled once", not bad, str(bad[:3]))

# each FFN node: each (step, layer, mb) once, same tokens, between the attention spans
for n in ("ffn-0", "ffn-1"):
    ffn = {}
    for e in ev[n]:
        if e["name"] == "ffn":
            g = e["args"]
            ffn.setdefault((g["step"], g["layer"], g["mb"]), []).append(e)
    missing, dup, order, toks = [], [], [], []
    for (step, mb), v in full.items():
        for i, (ts, layer, ntok, a) in enumerate(v):
            got = ffn.get((step, layer, mb), [])
            if not got:
                missing.append((step, layer, mb))
                continue
            if len(got) > 1:
                dup.append((step, layer, mb))
            f = got[0]
            if f["args"]["tokens"] != ntok:
                toks.append((step, layer, mb, f["args"]["tokens"], ntok))
            nxt = v[i + 1][3]["ts"] if i + 1 < len(v) else None
            if f["ts"] < a["ts"] + a["dur"] or (nxt is not None and f["ts"] + f["dur"] > nxt):
                order.append((step, layer, mb))
    ck.check(f"{n}: every (step, layer, micro-batch) once, with the attention node's tokens",
             not missing and not dup and not toks, f"{missing[:3]} {dup[:3]} {toks[:3]}")
    ck.check(f"{n}: each after its attention span, before that micro-batch's next layer",
             not order, str(order[:3]))

# afdctl trace-merge
merged = os.path.join(tmp, "all.json")
r = subprocess.run([os.path.join(BIN, "afdctl"), "trace-merge", "-o", merged,
                    *files.values()], capture_output=True, text=True)
total = sum(len(v) + 1 for v in ev.values())
try:
    got = len(json.load(open(merged))["traceEvents"])
except (OSError, ValueError, KeyError):
    got = -1
ck.check(f"trace-merge keeps all {total} events", r.returncode == 0 and got == total,
         f"rc {r.returncode}, {got} events, {r.stderr[-300:]}")
ck.check("trace-merge prints each node's time by span",
         all(f"{n} (" in r.stdout for n in files) and "attention" in r.stdout and
         " ffn " in r.stdout, r.stdout[-500:])
junk = os.path.join(tmp, "junk.json")
with open(junk, "w") as f:
    f.write('{"not": "a trace"}')
r = subprocess.run([os.path.join(BIN, "afdctl"), "trace-merge", "-o", merged, junk],
                   capture_output=True, text=True)
ck.check("trace-merge refuses a file that is not a trace",
         r.returncode == 1 and "not a trace file" in r.stderr, r.stderr[-300:])
# a node asked to write its timeline where it cannot fails at start, saying so
r = subprocess.run([os.path.join(BIN, "ffn_node"), "--model", model, "--cluster-token", "t",
                    "--coordinator", "127.0.0.1:1", "--coordinator-wait-s", "0",
                    "--trace-file", os.path.join(tmp, "no", "such", "x.json")],
                   capture_output=True, text=True, timeout=30)
ck.check("a node with an unwritable --trace-file exits at once with the path",
         r.returncode == 1 and "x.json" in r.stderr, r.stderr[-300:])
subprocess.run(["rm", "-rf", tmp])
sys.exit(ck.done())
