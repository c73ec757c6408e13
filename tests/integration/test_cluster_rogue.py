"""A peer that joins with the cluster token and then sends malformed data-plane
messages (bad magic, a payload that does not match its header, expert ids out of
range) to the FFN node: the FFN node logs and drops each one and stays up; the step
that needed the rogue's slice fails at the attention node's deadline, so the client
gets an explicit error instead of a hang; every daemon stays up; once the rogue is gone
the cluster goes on with the real attention node, and another one can join it.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, Daemons, post  # noqa: E402

BUILD = os.environ.get("BUILD", "build")
ROGUE = os.path.join(os.environ.get("ROOT", os.getcwd()), BUILD, "tests", "rogue_node")
MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
TOKEN = "rogue-test-token"
d = Daemons(model, TOKEN, 2, 1, coord_args=["--micro-batches", "1"],
            attn_args=["--step-deadline-ms", "2000"])
url, ctrl, procs = d.url, d.ctrl, d.procs
node, wait_ready, log = d.node, d.wait_ready, d.log
d.coordinator()
time.sleep(0.3)
node("ffn-0", "ffn_node")
node("attn-0", "attn_node")
d.start("rogue", [ROGUE, "--coordinator", f"127.0.0.1:{ctrl}", "--cluster-token", TOKEN,
                  "--layers", "4", "--hidden", "320", "--topk", "3", "--moe-layer", "1"])
try:
    ck.check("the cluster with the rogue as its second attention node becomes ready",
             wait_ready())
    t0 = time.time()
    st, body = post(url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4,
                                             "temperature": 0}, timeout=30)
    took = time.time() - t0
    ck.check("the request that needed the rogue's slices ends with an explicit error",
             st == 500 and "step failed" in body["error"]["message"] and took < 20,
             f"HTTP {st} after {took:.1f} s: {str(body)[:160]}")
    time.sleep(0.5)
    flog = log("ffn-0")
    ck.check("the FFN node logged and dropped the bad magic and the lying header",
             "bad magic" in flog and "payload size does not match" in flog, flog[-300:])
    ck.check("the FFN node refused to compute a slice with out-of-range expert ids",
             "expert id or weight out of range" in flog, flog[-300:])
    ck.check("every real daemon is still up",
             all(procs[n].poll() is None for n in ("coordinator", "ffn-0", "attn-0")))
    procs["rogue"].send_signal(signal.SIGTERM)
    procs["rogue"].wait(10)
    ck.check("without the rogue the cluster goes on with the real attention node",
             wait_ready(True, 10))
    st, body = post(url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4,
                                             "temperature": 0}, timeout=30)
    ck.check("and serves", st == 200 and len(body["choices"][0]["token_ids"]) == 4,
             str(body)[:160])
    node("attn-1", "attn_node")
    ck.check("another real attention node joins and the cluster is ready", wait_ready())
    st, body = post(url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4,
                                             "temperature": 0}, timeout=30)
    ck.check("and it serves again", st == 200 and len(body["choices"][0]["token_ids"]) == 4,
             str(body)[:160])
finally:
    d.stop()
sys.exit(ck.done())
