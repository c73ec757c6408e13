"""AFD pipeline benchmark on the CPU: decode throughput of a 1A1F cluster (each node
pinned to its own core) against afd_run on one core, same mini model and batch, in one
run; and the pipeline efficiency from the nodes' stage times (achieved step time
against the bound set by the slowest stage).

usage: pipeline_cpu.py [--batch B] [--tokens N] [--prompt-len P] [--micro-batches m ...]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from cluster import BIN, LocalUp, get  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(ROOT, os.environ.get("BUILD", "build"),
                                                "models", "mini-bf16"))
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--tokens", type=int, default=48)
ap.add_argument("--prompt-len", type=int, default=16)
ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 3])
a = ap.parse_args()

if not os.path.exists(os.path.join(a.model, "config.json")):
    subprocess.run([os.path.join(BIN, "afd_mkmodel"), "--out", a.model, "--preset", "mini"],
                   check=True)
prompts = [[(7 * i + 3 * j) % 8000 + 10 for j in range(a.prompt_len)] for i in range(a.batch)]

# the monolithic baseline: one process on one core
cmd = ["taskset", "-c", "0", os.path.join(BIN, "afd_run"), "--model", a.model, "--max-tokens",
       str(a.tokens), "--ignore-eos", "--threads", "1", "--json", "--prefill-chunk",
       str(a.batch * a.prompt_len)]
for p in prompts:
    cmd += ["--prompt", ",".join(map(str, p))]
base = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
bt = base["timing"]
base_tps = bt["decode_tokens"] / bt["decode_s"]
print(f"mini model, batch {a.batch}, prompt {a.prompt_len}, {a.tokens} tokens each; "
      f"{os.cpu_count()} cores")
print(f"afd_run, 1 core:         {base_tps:8.1f} decode tokens/s "
      f"({1000 * bt['decode_s'] / max(1, bt['decode_steps']):.1f} ms/step)")


def node_stats(url):
    st = get(url, "/admin/status")[1]
    out = {}
    for n in st["nodes"]:
        b = n.get("busy", {})
        out[n["role"]] = dict(steps=n.get("steps", 0), attn=b.get("attn_us", 0),
                              ffn=b.get("ffn_us", 0), wait=b.get("wait_us", 0),
                              step=b.get("step_us", 0), tokens=n.get("tokens", 0))
    return out


for m in a.micro_batches:
    with LocalUp(a.model, 1, 1, m, extra=["--pin", "--kv-budget-mb", "512"], timeout=120) as c:
        # warm-up: one request end to end
        body = {"prompt": prompts[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        urllib.request.urlopen(urllib.request.Request(
            c.url + "/v1/completions", data=json.dumps(body).encode()), timeout=120).read()
        time.sleep(1.2)  # a heartbeat with the warm-up included
        s0 = node_stats(c.url)
        firsts, lasts = [], []

        def one(p):
            body = {"prompt": p, "max_tokens": a.tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            r = urllib.request.Request(c.url + "/v1/completions", data=json.dumps(body).encode())
            n = 0
            with urllib.request.urlopen(r, timeout=600) as resp:
                for raw in resp:
                    if raw.startswith(b"data: {"):
                        n += 1
                        if n == 2:
                            firsts.append(time.time())  # the first decode token
            lasts.append(time.time())

        th = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in th:
            t.start()
        for t in th:
            t.join()
        time.sleep(1.2)
        s1 = node_stats(c.url)
        dt = max(lasts) - max(firsts)
        tps = a.batch * (a.tokens - 2) / dt
        at, ff = s1["attention"], s1["ffn"]
        steps = at["steps"] - s0["attention"]["steps"]
        step_us = (at["step"] - s0["attention"]["step"]) / max(1, steps)
        attn_us = (at["attn"] - s0["attention"]["attn"]) / max(1, steps)
        ffn_us = (ff["ffn"] - s0["ffn"]["ffn"]) / max(1, steps)
        bound = max(attn_us, ffn_us)
        print(f"AFD 1A1F pinned, m={m}:   {tps:8.1f} decode tokens/s  ratio {tps / base_tps:.2f}x; "
              f"per step: attention {attn_us / 1000:.1f} ms, FFN {ffn_us / 1000:.1f} ms, "
              f"step {step_us / 1000:.1f} ms; pipeline efficiency {bound / step_us:.0%}")
