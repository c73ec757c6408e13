#!/usr/bin/env python3
"""cluster_check: a whole cluster on the cuda backend against afd_run on the cpu.

afdctl local-up starts a coordinator, an attention node and an FFN node on loopback, the
nodes on --backend cuda (the attention node's KV cache, a stream per micro-batch, A2F
packed and F2A added on the device; the FFN node unpacking and packing on the device,
pinned data-plane buffers), and serves greedy completions over HTTP. Cases: one rank per
FFN node with float32 and with the production wire (fp8 A2F, bf16 F2A; afd_run rounds at
the same points); two tensor-parallel ranks on one device (the
partial sums added on the device after a cross-stream wait); two ranks on devices 0 and 1
(NCCL) when the machine has two GPUs; and the attention node replaying its decode layers
as CUDA graphs (AFD_CUDA_GRAPHS=1, production wire); and the nodes sending and receiving
device memory (--data-plane device) when the UCX moves CUDA memory, or on the CPU
emulator (CLUSTER_CHECK_DEVICE_HOST=1: its device memory is host memory). Each answer is held to afd_run --backend cpu like
model_check, whose notes say why the reference rounds its GEMM inputs as the device
does (AFD_CPU_GEMM_ROUND=device; on these tiny models every weight is bf16 on the
device) and why the bound is TOL: every token equal except at a near tie (the cpu's
top two within TOL), and log-probabilities within TOL nats. On the cpu backends the
reference does not round and the bound is TOL_CPU.
Prints "ok - NAME ..." / "not ok - NAME ..." lines.
usage: cluster_check.py BIN_DIR MODEL_DIR [PART]   (PART: only the cases whose name has it;
CLUSTER_CHECK_GPUS: the device count, instead of nvidia-smi's)
(CLUSTER_CHECK_BACKEND=cpu runs the same cases on the cpu backend: the script's own check.)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

TOL = 0.25
TOL_CPU = 0.05
PROMPTS = [[1, 2, 3], [7, 8], [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 11, 12]]
MAX_TOKENS = 16
F32 = ("--a2f-dtype", "f32", "--f2a-dtype", "f32")


def cpu_reference(bin_dir, model, wire, gemm_round):
    cmd = [f"{bin_dir}/afd_run", "--model", model, "--backend", "cpu", "--max-tokens",
           str(MAX_TOKENS), "--logprobs", "2", "--json", "--ignore-eos", *wire]
    for p in PROMPTS:
        cmd += ["--prompt", ",".join(map(str, p))]
    env = dict(os.environ)
    env.pop("AFD_CPU_GEMM_ROUND", None)
    if gemm_round:
        env["AFD_CPU_GEMM_ROUND"] = gemm_round
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, env=env)
    return json.loads(out.stdout)["outputs"]


def compare(ref, answers, tol):
    worst, notes = 0.0, []
    for i, (a, (status, body)) in enumerate(zip(ref, answers)):
        if status != 200:
            return False, worst, f"prompt {i}: HTTP {status} {str(body)[:200]}"
        ch = body["choices"][0]
        ids, lps = ch["token_ids"], ch["logprobs"]["token_logprobs"]
        if len(ids) != len(a["token_ids"]):
            return False, worst, f"prompt {i}: {len(ids)} tokens, want {len(a['token_ids'])}"
        for t, (ta, tb) in enumerate(zip(a["token_ids"], ids)):
            if ta != tb:
                top = a["top_logprobs"][t]
                margin = top[0][1] - top[1][1] if len(top) > 1 else 1e9
                if margin > tol:
                    return False, worst, f"prompt {i} token {t}: cpu {ta}, cuda {tb}"
                notes.append(f"prompt {i} near tie at token {t}")
                break
            worst = max(worst, abs(a["logprobs"][t] - lps[t]))
    return worst <= tol, worst, "; ".join(notes) or "all tokens equal"


def ucx_moves_cuda():
    """A CUDA memory domain in `ucx_info -d` (a UCX built with cuda_copy or gdr_copy)."""
    try:
        out = subprocess.run(["ucx_info", "-d"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any("Memory domain:" in x and ("cuda" in x or "gdr" in x)
               for x in out.stdout.splitlines())


def gpu_count():
    if os.environ.get("CLUSTER_CHECK_GPUS"):  # a count given (the CPU emulator's devices)
        return int(os.environ["CLUSTER_CHECK_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        return 1


def main():
    bin_dir, models = sys.argv[1], sys.argv[2]
    only = sys.argv[3] if len(sys.argv) > 3 else None  # cases whose name has this in it
    os.environ["BIN"] = bin_dir
    tmp = tempfile.mkdtemp(prefix="cluster_check.")
    os.environ["TEST_TMP"] = tmp
    from cluster import LocalUp, post  # noqa: E402 (reads BIN and TEST_TMP)

    backend = os.environ.get("CLUSTER_CHECK_BACKEND", "cuda")
    gemm_round, tol = ("device", TOL) if backend == "cuda" else (None, TOL_CPU)
    dev = os.environ.get("AFD_CUDA_DEVICE", "0")
    # (name, node options, wire precisions): float32 on the wire isolates the nodes' math;
    # the production wire (fp8 A2F, bf16 F2A) is packed and unpacked on the devices
    cases = [("cluster_cuda_1a1f", (), F32),
             ("cluster_cuda_1a1f_fp8_wire", (), ()),
             ("cluster_cuda_ffn_tp2_one_device", ("--ffn-tp", "2", "--ffn-devices", f"{dev},{dev}"),
              F32)]
    cases = [c + ({},) for c in cases]
    if backend == "cuda":  # the attention node's decode layers replayed as CUDA graphs
        cases.append(("cluster_cuda_1a1f_graphs", (), (), {"AFD_CUDA_GRAPHS": "1"}))
    # --data-plane device: A2F sent from device memory, F2A pulled into it
    if backend == "cuda" and os.environ.get("CLUSTER_CHECK_DEVICE_HOST") == "1":
        # the CPU emulator: its device memory is host memory, open to UCX
        cases.append(("cluster_cuda_1a1f_device_plane", (), (),
                      {"AFD_DATA_PLANE": "device", "AFD_UCX_DEVICE_HOST": "1",
                       "KN_EMU_PROTECT": "0"}))
    elif backend == "cuda" and ucx_moves_cuda():
        cases.append(("cluster_cuda_1a1f_device_plane", (), (), {"AFD_DATA_PLANE": "device"}))
    elif backend == "cuda":
        print("# this UCX does not move CUDA memory: the device data plane not checked")
    if backend == "cuda" and gpu_count() >= 2:
        cases.append(("cluster_cuda_ffn_tp2_two_devices", ("--ffn-tp", "2", "--ffn-devices", "0,1"),
                      F32, {}))
    elif backend == "cuda":
        print("# one GPU: tensor-parallel ranks on two devices (NCCL) not checked")
    if only:
        cases = [c for c in cases if only in c[0]]
    failed = 0
    for dt in ("bf16", "fp8"):
        model = f"{models}/tiny-{dt}"
        refs = {}
        for name, extra, wire, env in cases:
            if wire not in refs:
                refs[wire] = cpu_reference(bin_dir, model, wire, gemm_round)
            ref = refs[wire]
            label = f"{name}_{dt}".replace("cuda", backend)
            logdir = None
            before = set(os.listdir(tmp))
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                with LocalUp(model, 1, 1, 2, extra=("--backend", backend, "--ready-timeout-s",
                                                    "90") + wire + extra, timeout=120) as c:
                    logdir = c.logdir
                    answers = [post(c.url, "/v1/completions",
                                    {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                                     "logprobs": 1, "ignore_eos": True}, timeout=60)
                               for p in PROMPTS]
                    ok, worst, detail = compare(ref, answers, tol)
                    if ok and "tp2" in name:
                        log = open(os.path.join(c.logdir, "ffn-0.log")).read()
                        if "on 2 tensor-parallel ranks" not in log:
                            ok, detail = False, "the FFN node does not report two ranks"
                        else:
                            line = [x for x in log.splitlines() if "tensor-parallel ranks" in x]
                            detail += "; " + line[0].split("info: ")[-1][:140]
                if ok and env.get("AFD_DATA_PLANE") == "device":
                    log = open(os.path.join(logdir, "attn-0.log")).read()
                    m = re.search(r"data plane: (\d+) F2A answers pulled into device memory, "
                                  r"(\d+) staged", log)
                    if not m or int(m.group(1)) == 0:
                        ok, detail = False, "no F2A answer was pulled into device memory"
                    else:
                        detail += "; " + m.group(0)
                if ok and env.get("AFD_CUDA_GRAPHS"):
                    log = open(os.path.join(logdir, "attn-0.log")).read()
                    line = [x for x in log.splitlines() if "graphs: " in x]
                    if "decode layers replay as CUDA graphs" not in log or not line:
                        ok, detail = False, "the attention node replayed no graph"
                    else:
                        detail += "; " + line[-1].split("info: ")[-1][:140]
            except Exception as e:  # a cluster that does not start fails this case only
                ok, worst, detail = False, float("nan"), str(e)[:400]
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            print(f"{'ok' if ok else 'not ok'} - {label} max_err={worst:.3g} tol={tol} ({detail})",
                  flush=True)
            failed += not ok
            if not ok:  # the daemons' last words, also when the cluster never started
                dirs = [logdir] if logdir else [os.path.join(tmp, d) for d in
                                                sorted(set(os.listdir(tmp)) - before)]
                for d in dirs:
                    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                        lines = open(os.path.join(d, f), errors="replace").read().splitlines()
                        print(f"    {f}:\n" + "\n".join("      " + x for x in lines[-12:]))
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
