"""The AFD cluster against the single-process runner.

For tiny bf16 and fp8 checkpoints, topologies 1A1F, 2A2F and 1A3F, and 1, 2 and
3 micro-batches, real daemons (afdctl local-up on loopback) serve concurrent
greedy requests of different prompt and output lengths, some joining while
others run; each answer (ids and logprobs through the HTTP API) must equal the
same prompt run alone through afd_run. With float32 wire precisions the two
differ only by float32 summation order (several FFN partials, other GEMM batch
shapes): TOL bounds the log-prob difference and the greedy ids must be equal.
With the production precisions (fp8 A2F, bf16 F2A) on one FFN node the rounding
points are the same in both, so the same bound holds there too. FFN nodes with
tensor-parallel ranks (--ffn-tp) only add partial sums, so they are held to the
same bound.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, LocalUp, afd_run, post, stream  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
TOL = 2e-3
F32 = ("--a2f-dtype", "f32", "--f2a-dtype", "f32")

# (prompt, max_tokens, start delay in s): different lengths, some join later
REQS = [([5, 6, 7, 8], 12, 0.0), ([9, 10], 6, 0.0), (list(range(30, 60)), 10, 0.05),
        ([300], 3, 0.1), ([7] * 20, 8, 0.15)]

ck = Checks()
solo_cache = {}


def solo(model, prompt, n, wire):
    key = (model, tuple(prompt), n, wire)
    if key not in solo_cache:
        extra = F32 if wire == "f32" else ()
        solo_cache[key] = afd_run(model, [prompt], n, *extra)["outputs"][0]
    return solo_cache[key]


def run_concurrent(url):
    out = [None] * len(REQS)

    def one(i, prompt, n, delay):
        time.sleep(delay)
        out[i] = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": n,
                                               "temperature": 0, "logprobs": 1,
                                               "ignore_eos": True})

    th = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(REQS)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    return out


def compare(model, url, wire, label):
    answers = run_concurrent(url)
    worst, bad = 0.0, []
    for (prompt, n, _), (status, body) in zip(REQS, answers):
        if status != 200:
            bad.append(f"HTTP {status}: {body}")
            continue
        ch = body["choices"][0]
        ref = solo(model, prompt, n, wire)
        if ch["token_ids"] != ref["token_ids"]:
            bad.append(f"ids {ch['token_ids']} != {ref['token_ids']}")
            continue
        lps = ch["logprobs"]["token_logprobs"]
        worst = max([worst] + [abs(a - b) for a, b in zip(lps, ref["logprobs"])])
    ck.check(f"{label}: {len(REQS)} concurrent requests equal their solo afd_run "
             f"(max |dlogprob| {worst:.1e} <= {TOL})", not bad and worst <= TOL,
             "; ".join(bad[:2]))


for dt in ("bf16", "fp8"):
    model = os.path.join(MODELS, f"tiny-{dt}")
    for attn, ffn in ((1, 1), (2, 2), (1, 3)):
        for mb in (1, 2, 3):
            label = f"{dt} {attn}A{ffn}F m={mb} f32 wire"
            try:
                with LocalUp(model, attn, ffn, mb, extra=F32) as c:
                    compare(model, c.url, "f32", label)
            except Exception as e:  # a cluster that does not start fails this check only
                ck.check(label, False, str(e)[:300])
    label = f"{dt} 1A1F m=3 production wire (fp8 A2F, bf16 F2A)"
    with LocalUp(model, 1, 1, 3) as c:
        compare(model, c.url, "prod", label)
        # streaming gives the same tokens as the whole answer
        ev = stream(c.url, "/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 6,
                                                "temperature": 0, "stream": True,
                                                "ignore_eos": True})
        ids = [t for e in ev[:-1] for t in e["choices"][0]["token_ids"]]
        ref = solo(model, [5, 6, 7, 8], 6, "prod")
        ck.check(f"{dt}: a streamed completion carries the same ids, then [DONE]",
                 ids == ref["token_ids"] and ev[-1] == "[DONE]" and
                 ev[-2]["choices"][0]["finish_reason"] == "length", f"{ids}")

    # tensor-parallel FFN ranks inside each node: their outputs sum to the node's share
    for attn, ffn, tp in ((1, 1, 2), (1, 2, 3)):
        label = f"{dt} {attn}A{ffn}F m=2 f32 wire, {tp} tensor-parallel ranks per FFN node"
        try:
            with LocalUp(model, attn, ffn, 2, extra=F32 + ("--ffn-tp", str(tp))) as c:
                compare(model, c.url, "f32", label)
                logs = "".join(open(os.path.join(c.logdir, f"ffn-{i}.log")).read()
                               for i in range(ffn))
                ck.check(f"{dt}: each FFN node says it runs {tp} ranks",
                         logs.count(f"on {tp} tensor-parallel ranks") == ffn, logs[-300:])
                from cluster import get  # noqa: E402
                nodes = get(c.admin, "/admin/status")[1]["nodes"]
                ck.check(f"{dt}: the admin status shows each node's backend and ranks",
                         all(n["backend"] == "cpu" and
                             n["ranks"] == (tp if n["role"] == "ffn" else 1) for n in nodes),
                         str([(n["role"], n.get("backend"), n.get("ranks")) for n in nodes]))
        except Exception as e:
            ck.check(label, False, str(e)[:300])

# a device list that does not match the ranks, or is not a list, stops the node at once
import subprocess  # noqa: E402
for args, why in ((["--tp", "2", "--devices", "0"], "names 1 devices for --tp 2"),
                  (["--tp", "2", "--devices", "0,x"], "not a list of device indices"),
                  (["--tp", "2", "--devices", "0,"], "ends with a comma"),
                  (["--tp", "17"], "tp")):
    r = subprocess.run([os.path.join(os.environ.get("BIN", "build/bin"), "ffn_node"), "--model",
                        os.path.join(MODELS, "tiny-bf16"), "--cluster-token", "t",
                        "--coordinator-wait-s", "0"] + args, capture_output=True, text=True,
                       timeout=30)
    ck.check(f"ffn_node {' '.join(args)}: refused ({why})", r.returncode == 2 and why in r.stderr,
             r.stderr[-200:])

# --micro-batches auto: the coordinator picks m in [2, 4] from measured stage times; the
# output does not depend on m
model = os.path.join(MODELS, "tiny-bf16")
with LocalUp(model, 1, 2, "auto", extra=F32) as c:
    compare(model, c.url, "f32", "bf16 1A2F m=auto f32 wire")
    compare(model, c.url, "f32", "bf16 1A2F m=auto f32 wire, second round")
    from cluster import get  # noqa: E402
    st = get(c.admin, "/admin/status")[1]
    ck.check("auto keeps the micro-batch count in [2, 4]",
             2 <= st["cluster"]["micro_batches"] <= 4, str(st["cluster"]))

sys.exit(ck.done())
