"""AFD pipeline benchmark on the CPU: steady-state decode throughput of a 1A1F cluster
(each node pinned to its own core) against afd_run on one core, same model, batch and
prompts, measured in one run; and the pipeline efficiency from the nodes' stage times
(the slowest stage's busy time per step against the achieved step time).

The default model (written once to $BUILD/models/afd-pipe) is the mini preset reshaped
so that the attention side and the FFN side cost about the same per token, as Step3's
do at 4K context: 4 MoE layers of hidden 1024, 32 heads of 128, 16 experts (top-3) of
768, and a 2048-token vocabulary, so that lm_head is about 5% of the attention side's
work, as Step3's lm_head (hidden 7168, vocab 128815) is of its 61 attention layers. The batch is large enough that each expert still sees tens
of tokens per micro-batch: below that, expert GEMMs are bound by reading the weights,
and splitting the batch into micro-batches multiplies that traffic.

Next to the ratio it prints the two ceilings that bound it on this machine, measured in the
same run: two monolithic runners side by side (what two cores give when they share one memory
system), and the monolithic rate at the micro-batch size (a pipeline of m micro-batches runs
every GEMM on batch/m rows; with weights that stream from DRAM, fewer rows per weight costs
more per token).

usage: pipeline_cpu.py [--batch B] [--tokens N] [--prompt-len P] [--micro-batches m ...]
                       [--no-ceilings]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from cluster import BIN, LocalUp, get  # noqa: E402

BUILD = os.environ.get("BUILD", "build")
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(ROOT, BUILD, "models", "afd-pipe"))
ap.add_argument("--batch", type=int, default=512)
ap.add_argument("--tokens", type=int, default=10)
ap.add_argument("--prompt-len", type=int, default=8)
ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 3])
ap.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=True,
                help="also run afd_run twice side by side and at the micro-batch size")
a = ap.parse_args()

if not os.path.exists(os.path.join(a.model, "config.json")):
    subprocess.run([os.path.join(BIN, "afd_mkmodel"), "--out", a.model, "--preset", "mini",
                    "--layers", "4", "--moe-layers", "0,1,2,3", "--heads", "32", "--share-q",
                    "1024", "--moe-inter", "768", "--share-expert", "768", "--vocab", "2048"],
                   check=True)
cfg = json.load(open(os.path.join(a.model, "config.json")))
vocab = cfg.get("text_config", cfg)["vocab_size"]
prompts = [[(7 * i + 13 * j) % (vocab - 10) + 10 for j in range(a.prompt_len)]
           for i in range(a.batch)]



def mono(batch, core=0):
    """afd_run over the first `batch` prompts on one core: prefill in one step, then pure
    decode; returns decode tokens/s and ms per decode step"""
    cmd = ["taskset", "-c", str(core), os.path.join(BIN, "afd_run"), "--model", a.model,
           "--max-tokens", str(a.tokens), "--ignore-eos", "--threads", "1", "--json",
           "--progress=false", "--prefill-chunk", str(batch * a.prompt_len)]
    for p in prompts[:batch]:
        cmd += ["--prompt", ",".join(map(str, p))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def rate(proc):
    out, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"afd_run failed (exit {proc.returncode})")
    t = json.loads(out)["timing"]
    return t["decode_tokens"] / t["decode_s"], 1000 * t["decode_s"] / max(1, t["decode_steps"])


base_tps, base_ms = rate(mono(a.batch))
print(f"model {os.path.basename(a.model)}, batch {a.batch}, prompt {a.prompt_len}, "
      f"{a.tokens} tokens each; {os.cpu_count()} cores")
print(f"afd_run, 1 core:        {base_tps:7.1f} decode tokens/s ({base_ms:.0f} ms/step)",
      flush=True)
if a.ceilings and (os.cpu_count() or 1) >= 2:
    # what two cores give without disaggregation: two monolithic runners side by side, each
    # with the whole batch (the memory bus and L3 are shared as the cluster's are)
    pa, pb = mono(a.batch, 0), mono(a.batch, 1)
    pair = rate(pa)[0] + rate(pb)[0]
    print(f"afd_run x2 side by side: {pair:7.1f} decode tokens/s = {pair / base_tps:.2f}x "
          f"(the 2-core ceiling: what sharing the memory system costs)", flush=True)
    for m in a.micro_batches:
        # a pipeline of m micro-batches runs every GEMM at batch/m rows: the monolithic rate
        # at that size, doubled, is what perfect overlap on two cores could reach
        mt, _ = rate(mono(a.batch // m))
        print(f"afd_run at batch {a.batch // m} (= {a.batch}/m, m={m}): {mt:7.1f} decode "
              f"tokens/s; perfect 2-stage overlap of it: {2 * mt / base_tps:.2f}x", flush=True)


def poll(admin_url):
    st = get(admin_url, "/admin/status")[1]
    busy = {}
    for n in st["nodes"]:
        b = n.get("busy", {})
        busy[n["role"]] = (n.get("steps", 0), b.get("attn_us", 0), b.get("ffn_us", 0),
                           b.get("step_us", 0), b.get("wait_us", 0), b.get("xfer_us", 0),
                           b.get("idle_us", 0))
    return time.time(), st["cluster"]["tokens_generated"], busy


# the whole batch runs at once: the attention node's and the coordinator's limits on
# running sequences (1024 by default) are raised through their environment options
os.environ["AFD_MAX_SEQS"] = os.environ["AFD_MAX_RUNNING"] = str(max(1024, a.batch))
for m in a.micro_batches:
    extra = ["--pin", "--kv-budget-mb", "1024", "--max-batch-tokens",
             str(a.batch * a.prompt_len)]
    with LocalUp(a.model, 1, 1, m, extra=extra, timeout=300) as c:
        # whole-answer requests: the client sleeps while the cluster decodes, and the
        # coordinator's token counter, polled, gives the steady decode rate
        failed = []

        def one(i):
            body = {"prompt": prompts[i], "max_tokens": a.tokens, "temperature": 0,
                    "ignore_eos": True}
            r = urllib.request.Request(c.url + "/v1/completions", data=json.dumps(body).encode())
            try:
                urllib.request.urlopen(r, timeout=900).read()
            except urllib.error.HTTPError as e:  # counted and reported with its message
                failed.append(f"{e}: {e.read()[:300]!r}")
            except Exception as e:  # counted and reported, not a traceback per request
                failed.append(str(e))

        th = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in th:
            t.start()
        samples = []
        while any(t.is_alive() for t in th):
            samples.append(poll(c.admin))
            time.sleep(0.2)
        for t in th:
            t.join()
        if failed:
            print(f"AFD 1A1F pinned, m={m}: {len(failed)} requests failed ({failed[0]}); "
                  f"logs in {c.logdir}")
            continue
        # steady decode: every sequence past its first two tokens, none finished
        lo, hi = 2 * a.batch, (a.tokens - 1) * a.batch
        win = [s for s in samples if lo <= s[1] <= hi]
        if len(win) < 2 or win[-1][1] == win[0][1]:
            print(f"AFD 1A1F pinned, m={m}: window too short; raise --tokens")
            continue
        (t0, k0, b0), (t1, k1, b1) = win[0], win[-1]
        tps = (k1 - k0) / (t1 - t0)
        steps = b1["attention"][0] - b0["attention"][0]
        if steps > 0:
            # busy time per step of each stage, against the achieved time per step (steps
            # overlap in the pipeline: the batch over the decode rate)
            attn = (b1["attention"][1] - b0["attention"][1]) / steps
            ffn = (b1["ffn"][2] - b0["ffn"][2]) / steps
            step = 1e6 * a.batch / tps
            eff = f"{max(attn, ffn) / step:.0%}"
            aw = (b1["attention"][4] - b0["attention"][4]) / steps
            ax = (b1["attention"][5] - b0["attention"][5]) / steps
            fw = (b1["ffn"][4] - b0["ffn"][4]) / steps
            ai = (b1["attention"][6] - b0["attention"][6]) / steps
            fi = (b1["ffn"][6] - b0["ffn"][6]) / steps
            detail = (f"per step: attention {attn / 1000:.0f} ms, FFN {ffn / 1000:.0f} ms busy, "
                      f"{step / 1000:.0f} ms achieved ({steps} steps); waiting: attention "
                      f"{aw / 1000:.0f} ms (+{ax / 1000:.0f} ms sending), FFN {fw / 1000:.0f} ms; idle: "
                      f"attention {ai / 1000:.0f} ms, FFN {fi / 1000:.0f} ms")
        else:
            eff, detail = "n/a", "(heartbeats did not cover the window; raise --tokens)"
        print(f"AFD 1A1F pinned, m={m}: {tps:7.1f} decode tokens/s = {tps / base_tps:.2f}x "
              f"afd_run; pipeline efficiency {eff}; {detail}", flush=True)
