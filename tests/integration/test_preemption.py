"""KV pressure: with --kv-overcommit the coordinator admits more than the KV cache can
hold at max_tokens; when an attention node runs out of blocks, its latest sequences are
preempted (blocks freed) and re-admitted with their tokens so far as the prompt
(recomputed). Every request still gets its whole answer, equal to running it alone in
afd_run (ids equal, log-probs within TOL with float32 wire precisions), and the
preemptions are counted in /metrics."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, TMP, Checks, afd_run, free_port, get, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
TOL = 2e-3
ck = Checks()
port, ctrl, admin_port = free_port(), free_port(), free_port()
url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
procs = {}


def start(name, argv):
    procs[name] = subprocess.Popen(argv, stdout=open(os.path.join(TMP, name + ".log"), "w"),
                                   stderr=subprocess.STDOUT)


start("coordinator", [os.path.join(BIN, "afd_coordinator"), "--model", model, "--cluster-token",
                      "t", "--port", str(port), "--ctrl-port", str(ctrl), "--admin-port",
                      str(admin_port), "--kv-overcommit", "3", "--micro-batches", "2"])
time.sleep(0.3)
common = ["--model", model, "--coordinator", f"127.0.0.1:{ctrl}", "--cluster-token", "t",
          "--busy-poll-us", "0"]
start("ffn", [os.path.join(BIN, "ffn_node")] + common)  # it answers in the dtype asked
# 1 MiB of KV: 64 blocks of 16 tokens, 1024 positions for 4 x 304 wanted
start("attn", [os.path.join(BIN, "attn_node"), "--kv-budget-mb", "1", "--a2f-dtype", "f32",
               "--f2a-dtype", "f32"] + common)
prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
N = 300
try:
    t0 = time.time()
    while time.time() - t0 < 30 and get(url, "/ready")[0] != 200:
        time.sleep(0.1)
    out = {}

    def one(i):
        out[i] = post(url, "/v1/completions", {"prompt": prompts[i], "max_tokens": N,
                                               "temperature": 0, "ignore_eos": True,
                                               "logprobs": 1}, timeout=180)

    th = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    ok = all(out[i][0] == 200 and len(out[i][1]["choices"][0]["token_ids"]) == N
             for i in range(len(prompts)))
    ck.check("every request under KV pressure gets its whole answer", ok,
             str({i: out[i][0] for i in out}))
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:
        text = r.read().decode()
    pre = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
           if l.startswith("afd_num_preemptions_total{")]
    ck.check("preemptions happened and are counted", pre and pre[0] > 0, str(pre))
    worst, bad = 0.0, []
    for i, p in enumerate(prompts):
        ref = afd_run(model, [p], N, "--a2f-dtype", "f32", "--f2a-dtype", "f32")["outputs"][0]
        ch = out[i][1]["choices"][0]
        if ch["token_ids"] != ref["token_ids"]:
            bad.append(i)
            continue
        worst = max([worst] + [abs(a - b) for a, b in
                               zip(ch["logprobs"]["token_logprobs"], ref["logprobs"])])
    ck.check(f"preempted and recomputed answers equal afd_run run alone (max |dlogprob| "
             f"{worst:.1e} <= {TOL})", not bad and worst <= TOL, f"differ: {bad}")
    st = get(admin, "/admin/status")[1]
    att = [n for n in st["nodes"] if n["role"] == "attention"][0]
    ck.check("afterwards no KV block is held",
             st["requests"]["running"] == 0 and att["kv_blocks_reserved"] == 0)
finally:
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
sys.exit(ck.done())
