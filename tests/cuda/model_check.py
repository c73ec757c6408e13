#!/usr/bin/env python3
"""model_check: a tiny checkpoint through afd_run --backend cuda against --backend cpu.

Greedy decoding of several prompts (prefill and decode, KV in bf16 and fp8) on the tiny
bf16 and fp8 checkpoints (their shapes cut 128x128 blocks, so fp8 weights go to bf16 on
the device) and on blk128-fp8, a tiny model whose every GEMM shape is whole blocks (the
block-scaled fp8 GEMM at model level).

The reference is the cpu backend rounding its GEMM inputs as the device does
(AFD_CPU_GEMM_ROUND: bf16 activations and weights, and e4m3 activations with a bf16
product for the weights the device keeps in fp8, when its log says it does): what is
left between the two is the order of float32 sums, which a later bf16 or e4m3 rounding
can turn into one unit of that format, and on these tiny random models such units add
up: across the cases the CPU emulator of the cuda backend (tests/cuda/emu) differs from
this reference by up to 0.16 nats with bf16 GEMM inputs and 0.32 with e4m3 ones, and the
cpu reference with one GEMM thread differs from itself with two by up to 0.13 (both
printed as "spread"). A wiring fault (a wrong weight, layout or scale) moves
log-probabilities by nats. The bound is TOL_BF16, or TOL_FP8 where the device runs
block-scaled fp8 GEMMs. The backends agree when every generated token is the same and
the log-probability of each token differs by at most the bound; a different token is
accepted only where the cpu run's top two candidates are within the bound of each other
(a near tie that rounding may flip), and the comparison of that sequence stops there.
Prints "ok - NAME ..." / "not ok - NAME ..." lines.
usage: model_check.py BIN_DIR MODEL_DIR [NAME]
"""
import json
import os
import subprocess
import sys

TOL_BF16 = 0.25
TOL_FP8 = 0.5
PROMPTS = ["1,2,3", "7,8", "100,200,300,400,500,600,700,800,900,1000,11,12,13,14,15,16,17"]


def run(bin_dir, model, backend, kv, gemm_round=None, threads=0):
    """(outputs, stderr) of one afd_run"""
    cmd = [f"{bin_dir}/afd_run", "--model", model, "--backend", backend, "--kv-dtype", kv,
           "--max-tokens", "24", "--logprobs", "5", "--json", "--ignore-eos",
           "--threads", str(threads)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    env = dict(os.environ)
    env.pop("AFD_CPU_GEMM_ROUND", None)
    if gemm_round:
        env["AFD_CPU_GEMM_ROUND"] = gemm_round
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{backend}: exit {out.returncode}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)["outputs"], out.stderr


def device_rounding(log):
    """the cpu reference mode that matches what the cuda backend's log says it does"""
    return "device" if "fp8 weights: block-scaled" in log else "bf16"


def compare(ref, got, tol):
    """returns (ok, max_dlogprob, detail). At every position compared, the log-probabilities
    of the candidates both runs list (their top five) are compared, so that a near tie
    also checks the two distributions before the sequences part."""
    worst, notes = 0.0, []
    for i, (a, b) in enumerate(zip(ref, got)):
        for t, (ta, tb) in enumerate(zip(a["token_ids"], b["token_ids"])):
            ra = {tok: lp for tok, lp in a["top_logprobs"][t]}
            rb = {tok: lp for tok, lp in b["top_logprobs"][t]}
            for tok in set(ra) & set(rb):
                worst = max(worst, abs(ra[tok] - rb[tok]))
            if ta == tb:
                worst = max(worst, abs(a["logprobs"][t] - b["logprobs"][t]))
                continue
            top = a["top_logprobs"][t]
            margin = top[0][1] - top[1][1] if len(top) > 1 else 1e9
            if margin > tol or ta not in rb or tb not in ra:
                return False, worst, f"prompt {i} token {t}: cpu {ta}, cuda {tb} (margin {margin:.3g})"
            notes.append(f"prompt {i} near tie at token {t}")
            break
    return worst <= tol, worst, "; ".join(notes) or "all tokens equal"


def main():
    bin_dir, models = sys.argv[1], sys.argv[2]
    only = sys.argv[3] if len(sys.argv) > 3 else None
    failed = 0
    cases = [(m, kv) for m in ("tiny-bf16", "tiny-fp8") for kv in ("bf16", "fp8")]
    cases.append(("blk128-fp8", "fp8"))
    for model, kv in cases:
        name = f"model_{model.replace('-', '_')}_kv_{kv}"
        if only and only != name:
            continue
        try:
            got, log = run(bin_dir, f"{models}/{model}", "cuda", kv)
            mode = device_rounding(log)
            ref, _ = run(bin_dir, f"{models}/{model}", "cpu", kv, mode, threads=1)
            ref2, _ = run(bin_dir, f"{models}/{model}", "cpu", kv, mode, threads=2)
            _, spread, _ = compare(ref, ref2, float("inf"))
            tol = TOL_FP8 if mode == "device" and model.startswith("blk128") else TOL_BF16
            ok, worst, detail = compare(ref, got, tol)
            detail += f"; reference AFD_CPU_GEMM_ROUND={mode}, spread 1 vs 2 threads {spread:.3g}"
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, OSError) as e:
            ok, worst, detail, tol = False, float("nan"), str(e), TOL_BF16
        print(f"{'ok' if ok else 'not ok'} - {name} max_err={worst:.3g} tol={tol} ({detail})",
              flush=True)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
