"""AFD pipeline benchmark on the CPU: steady-state decode throughput of a 1A1F cluster
(each node pinned to its own core) against afd_run on one core, same model, batch and
prompts; and the pipeline efficiency, the busier stage's busy fraction of the steady
decode window, read from the nodes' timelines (--trace-dir).

The default model (written once to $BUILD/models/afd-pipe) is the mini preset reshaped
so that the attention side and the FFN side cost about the same per token, as Step3's
do at 4K context: 4 MoE layers of hidden 1024, 32 heads of 128, 16 experts (top-3) of
768, and a 2048-token vocabulary, so that lm_head is about 5% of the attention side's
work, as Step3's lm_head (hidden 7168, vocab 128815) is of its 61 attention layers. The
batch (3072: 1024 tokens per micro-batch at m=3, about 192 per expert) is large enough
that the expert GEMMs are not bound by reading the weights: every micro-batch reads them
again (OpenBLAS packs the weight operand on every call), so at smaller batches the
pipeline pays that traffic m times per step where afd_run pays it once.

The machine is shared: a single core's rate moves by 10-20% from one minute to the next,
and the two cores are not equally loaded. So the script runs `--rounds` rounds, each
afd_run on core 0, the cluster (one run per micro-batch count), then afd_run on core 1;
each round's ratio is against the mean of its two afd_run rates, and it prints every
round's ratio and their median.

Before the rounds it prints the two ceilings that bound the ratio on this machine,
measured in the same run: two monolithic runners side by side (what two cores give when
they share one memory system), and the monolithic rate at the micro-batch size (a
pipeline of m micro-batches runs every GEMM on batch/m rows; with weights that stream
from DRAM, fewer rows per weight costs more per token).

usage: pipeline_cpu.py [--batch B] [--tokens N] [--prompt-len P] [--micro-batches m ...]
                       [--rounds R] [--no-ceilings] [--keep-traces DIR]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from cluster import BIN, LocalUp  # noqa: E402

BUILD = os.environ.get("BUILD", "build")
PROMPTS_PER_REQUEST = 64  # the coordinator's limit per request
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(ROOT, BUILD, "models", "afd-pipe"))
ap.add_argument("--batch", type=int, default=3072)
ap.add_argument("--tokens", type=int, default=8)
ap.add_argument("--prompt-len", type=int, default=4)
ap.add_argument("--micro-batches", type=int, nargs="+", default=[3, 2])
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=True,
                help="also run afd_run twice side by side and at the micro-batch size")
ap.add_argument("--keep-traces", help="copy the nodes' timelines of each run here")
a = ap.parse_args()
if a.tokens < 6:
    sys.exit("--tokens: at least 6 (the steady window leaves out the first and last steps)")

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
    decode"""
    cmd = ["taskset", "-c", str(core), os.path.join(BIN, "afd_run"), "--model", a.model,
           "--max-tokens", str(a.tokens), "--ignore-eos", "--threads", "1", "--json",
           "--progress=false", "--prefill-chunk", str(batch * a.prompt_len)]
    for p in prompts[:batch]:
        cmd += ["--prompt", ",".join(map(str, p))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def rate(proc):
    """decode tokens/s and ms per decode step of a finished afd_run"""
    out, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"afd_run failed (exit {proc.returncode})")
    t = json.loads(out)["timing"]
    return t["decode_tokens"] / t["decode_s"], 1000 * t["decode_s"] / max(1, t["decode_steps"])


def steady(trace_files):
    """The steady decode window of a run from the nodes' timelines: the steps in which the
    attention node ran the whole batch as one token per sequence, less the first and the
    last of them (the pipeline filling and draining). Returns (tokens/s, ms per step,
    {node: (busy fraction, {span name: ms per step})}) or None."""
    nodes = {}
    for path in trace_files:
        ev = json.load(open(path))["traceEvents"]
        name = next(e["args"]["name"] for e in ev if e.get("ph") == "M")
        nodes[name] = [e for e in ev if e.get("ph") == "X"]
    attn = next(v for k, v in nodes.items() if k.startswith("attn"))
    start, layer0 = {}, {}
    for e in attn:
        g = e["args"]
        if e["name"] == "schedule+embed":
            start[g["step"]] = min(start.get(g["step"], e["ts"]), e["ts"])
        if e["name"] == "attention" and g["layer"] == 0:
            layer0[g["step"]] = layer0.get(g["step"], 0) + g["tokens"]
    decode = sorted(s for s, n in layer0.items() if n == a.batch and s in start)
    # the longest run of consecutive decode steps, less its ends
    runs, cur = [], []
    for s in decode:
        if cur and s != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(s)
    runs.append(cur)
    run = max(runs, key=len)[1:-1]
    if len(run) < 3 or run[-1] + 1 not in start:
        return None
    lo, hi = start[run[0]], start[run[-1] + 1]
    n = len(run)  # consecutive steps
    stages = {}
    for name, ev in nodes.items():
        tot = {}
        for e in ev:
            x0, x1 = max(lo, e["ts"]), min(hi, e["ts"] + e["dur"])
            if x1 > x0:
                tot[e["name"]] = tot.get(e["name"], 0) + x1 - x0
        busy = sum(v for k, v in tot.items() if k != "wait") / (hi - lo)
        stages[name] = (busy, {k: v / 1000 / n for k, v in tot.items()})
    return a.batch * n / ((hi - lo) / 1e6), (hi - lo) / 1000 / n, stages


def cluster(m, tracedir):
    """one 1A1F run with m micro-batches; returns steady() or an error string"""
    extra = ["--pin", "--kv-budget-mb", "1024", "--max-batch-tokens",
             str(a.batch * a.prompt_len), "--trace-dir", tracedir]
    with LocalUp(a.model, 1, 1, m, extra=extra, timeout=300) as c:
        # whole-answer requests of up to 64 prompts each: the client sleeps while the
        # cluster decodes
        failed = []

        def one(lo):
            body = {"prompt": prompts[lo:lo + PROMPTS_PER_REQUEST], "max_tokens": a.tokens,
                    "temperature": 0, "ignore_eos": True}
            r = urllib.request.Request(c.url + "/v1/completions", data=json.dumps(body).encode())
            try:
                urllib.request.urlopen(r, timeout=1800).read()
            except urllib.error.HTTPError as e:  # counted and reported with its message
                failed.append(f"{e}: {e.read()[:300]!r}")
            except Exception as e:  # counted and reported, not a traceback per request
                failed.append(str(e))

        th = [threading.Thread(target=one, args=(i,))
              for i in range(0, a.batch, PROMPTS_PER_REQUEST)]
        for t in th:
            t.start()
        for t in th:
            t.join()
        logdir = c.logdir
    if failed:
        return f"{len(failed)} requests failed ({failed[0]}); logs in {logdir}"
    files = [os.path.join(tracedir, f) for f in ("attn-0.trace.json", "ffn-0.trace.json")]
    if not all(os.path.exists(f) for f in files):
        return f"no timelines in {tracedir}; logs in {logdir}"
    got = steady(files)
    return got if got else "window too short; raise --tokens"


print(f"model {os.path.basename(a.model)}, batch {a.batch}, prompt {a.prompt_len}, "
      f"{a.tokens} tokens each; {os.cpu_count()} cores", flush=True)
# the whole batch runs at once: the attention node's and the coordinator's limits on
# running sequences (1024 by default) are raised through their environment options
os.environ["AFD_MAX_SEQS"] = os.environ["AFD_MAX_RUNNING"] = str(max(1024, a.batch))
if a.ceilings and (os.cpu_count() or 1) >= 2:
    solo = rate(mono(a.batch))[0]
    # what two cores give without disaggregation: two monolithic runners side by side, each
    # with the whole batch (the memory bus and L3 are shared as the cluster's are)
    pa, pb = mono(a.batch, 0), mono(a.batch, 1)
    pair = rate(pa)[0] + rate(pb)[0]
    print(f"ceiling: afd_run x2 side by side {pair:.1f} decode tokens/s = {pair / solo:.2f}x "
          f"afd_run alone ({solo:.1f}): what sharing the memory system costs", flush=True)
    for m in a.micro_batches:
        # a pipeline of m micro-batches runs every GEMM at batch/m rows: the monolithic rate
        # at that size, doubled, is what perfect overlap on two cores could reach
        mt = rate(mono(a.batch // m))[0]
        print(f"ceiling: afd_run at batch {a.batch // m} (= batch/{m}) {mt:.1f} decode "
              f"tokens/s; perfect 2-stage overlap of it: {2 * mt / solo:.2f}x", flush=True)

ratios = {m: [] for m in a.micro_batches}
effs = {m: [] for m in a.micro_batches}
for r in range(a.rounds):
    # the baseline brackets the cluster runs: afd_run on core 0 before them and on core 1
    # after, averaged (the cores of a shared machine are not equally loaded, and the load
    # moves from one minute to the next)
    before = rate(mono(a.batch, 0))[0]
    print(f"round {r + 1}: afd_run, core 0: {before:7.1f} decode tokens/s", flush=True)
    got_m = {}
    for m in a.micro_batches:
        tracedir = tempfile.mkdtemp(prefix="afd-pipe-")
        got = cluster(m, tracedir)
        if a.keep_traces:
            dst = os.path.join(a.keep_traces, f"round{r + 1}-m{m}")
            shutil.copytree(tracedir, dst, dirs_exist_ok=True)
        shutil.rmtree(tracedir, ignore_errors=True)
        if isinstance(got, str):
            print(f"round {r + 1}: AFD 1A1F pinned, m={m}: {got}", flush=True)
            continue
        got_m[m] = got
        tps, step_ms, stages = got
        detail = "; ".join(
            f"{n} busy {b:.0%} (" + ", ".join(f"{k} {v:.0f}" for k, v in sp.items()) + " ms)"
            for n, (b, sp) in sorted(stages.items()))
        print(f"round {r + 1}: AFD 1A1F pinned, m={m}: {tps:7.1f} decode tokens/s; "
              f"{step_ms:.0f} ms per step: {detail}", flush=True)
    after = rate(mono(a.batch, 1))[0]
    base = (before + after) / 2
    print(f"round {r + 1}: afd_run, core 1: {after:7.1f} decode tokens/s; baseline (mean) "
          f"{base:.1f}", flush=True)
    for m, (tps, _, stages) in sorted(got_m.items()):
        eff = max(b for b, _ in stages.values())
        ratios[m].append(tps / base)
        effs[m].append(eff)
        print(f"round {r + 1}: AFD 1A1F pinned, m={m}: {tps / base:.2f}x afd_run; pipeline "
              f"efficiency {eff:.0%}", flush=True)
for m in a.micro_batches:
    if ratios[m]:
        print(f"AFD 1A1F pinned, m={m}: median {statistics.median(ratios[m]):.2f}x afd_run "
              f"(rounds: {', '.join(f'{x:.2f}x' for x in ratios[m])}); pipeline efficiency "
              f"median {statistics.median(effs[m]):.0%}")
