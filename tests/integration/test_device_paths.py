"""The nodes' device code paths, run on the CPU.

`--backend cpu-dev` is the cpu backend presenting itself as a device backend: the same
arithmetic, but the attention and FFN nodes take the paths they take on a GPU (a queue
per micro-batch, A2F packed through the backend and copied into the send buffer behind an
event, F2A rows uploaded and added through the backend, the FFN node unpacking and packing
its slices through its ranks, the tensor-parallel sum through the backend's group, and
sampling from each row's best 64 candidates with a per-row copy when a request needs the
whole distribution). Two clusters of the same shape (1A2F, 2 micro-batches, 2
tensor-parallel ranks per FFN node, production wire: fp8 A2F, bf16 F2A), one on cpu and
one on cpu-dev, answer the same requests: greedy with log-probabilities, seeded top-k
sampling (drawn from the candidates), seeded sampling over the whole vocabulary and top-p
(drawn from the copied row). The answers must be identical, token for token and
log-probability for log-probability: the two backends compute the same numbers in the
same order, so any difference is a mistake in a device path. A third cluster, cpu-dev with
--data-plane device (A2F sent from the backend's memory, F2A pulled into it), must answer
the same again, and every node's /metrics must say which data plane it took.
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, LocalUp, get, post, scrape  # noqa: E402
from cluster import metric_value as metric  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
ck = Checks()

REQS = [
    ("greedy, 5 log-probabilities", {"prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0,
                                     "logprobs": 5}),
    ("greedy, a long prompt", {"prompt": list(range(30, 90)), "max_tokens": 6, "temperature": 0,
                               "logprobs": 1}),
    ("top_k 5 at temperature 0.9", {"prompt": [9, 10], "max_tokens": 12, "temperature": 0.9,
                                    "top_k": 5, "seed": 7, "logprobs": 2}),
    ("temperature 1.0 over the whole vocabulary", {"prompt": [300], "max_tokens": 12,
                                                   "temperature": 1.0, "seed": 11,
                                                   "logprobs": 1}),
    ("top_p 0.9", {"prompt": [7] * 12, "max_tokens": 12, "temperature": 0.8, "top_p": 0.9,
                   "seed": 3, "logprobs": 1}),
]


def scrape_nodes(logdir):
    """Each node's /metrics (AFD_METRICS_PORT=0: the port each node logged), by log name."""
    out = {}
    for f in os.listdir(logdir):
        m = re.search(r"metrics on port (\d+)", open(os.path.join(logdir, f)).read())
        if m and not f.startswith("coord"):
            out[f] = scrape(f"http://127.0.0.1:{m.group(1)}")
    return out


def answers(backend, model, data_plane="auto"):
    out = {}
    os.environ["AFD_DATA_PLANE"] = data_plane  # the nodes' --data-plane
    os.environ["AFD_METRICS_PORT"] = "0"  # the nodes' --metrics-port: any free port
    with LocalUp(model, 1, 2, 2, extra=("--backend", backend, "--ffn-tp", "2")) as c:
        for name, body in REQS:
            body = dict(body, ignore_eos=True)
            st, ans = post(c.url, "/v1/completions", body)
            ch = ans["choices"][0] if st == 200 else {}
            out[name] = (st, ch.get("token_ids"), (ch.get("logprobs") or {}).get("token_logprobs"),
                         (ch.get("logprobs") or {}).get("top_logprobs"))
        if data_plane == "device":
            time.sleep(2.5)  # the nodes publish their counters with each heartbeat (1 s)
            out["metrics"] = scrape_nodes(c.logdir)
            out["status"] = get(c.admin, "/admin/status")[1]
    logs = {f: open(os.path.join(c.logdir, f)).read() for f in os.listdir(c.logdir)}
    os.environ.pop("AFD_DATA_PLANE")
    os.environ.pop("AFD_METRICS_PORT")
    return out, logs


model = os.path.join(MODELS, "tiny-fp8")
ref, _ = answers("cpu", model)
got, logs = answers("cpu-dev", model)
attn_log = "".join(v for k, v in logs.items() if k.startswith("attn"))
ffn_log = "".join(v for k, v in logs.items() if k.startswith("ffn"))
ck.check("cpu-dev: the attention node packs A2F and adds F2A through its backend",
         "A2F packed and F2A added on the device" in attn_log, attn_log[-300:])
ck.check("cpu-dev: each FFN node unpacks and packs through its 2 ranks",
         ffn_log.count("A2F unpacked and F2A packed on the device") == 2 and
         ffn_log.count("on 2 tensor-parallel ranks") == 2, ffn_log[-300:])
for name, _ in REQS:
    r, g = ref[name], got[name]
    ck.check(f"{name}: cpu-dev answers exactly as cpu ({len(r[1] or [])} tokens)",
             r[0] == 200 and g == r, f"cpu {r[:2]} cpu-dev {g[:2]}")

# --data-plane device: A2F sent from the backend's memory, F2A pulled into it (cpu-dev's
# device memory is host memory, so any UCX moves it)
got, logs = answers("cpu-dev", model, "device")
attn_log = "".join(v for k, v in logs.items() if k.startswith("attn"))
ffn_log = "".join(v for k, v in logs.items() if k.startswith("ffn"))
pulled = re.search(r"data plane: (\d+) F2A answers pulled into device memory, (\d+) staged",
                   attn_log)
ck.check("device data plane: the attention node sends A2F from device memory and every F2A "
         f"answer lands there ({pulled.group(0) if pulled else 'no count'})",
         "A2F packed on the device and sent from device memory" in attn_log and pulled and
         int(pulled.group(1)) > 0 and int(pulled.group(2)) == 0, attn_log[-400:])
ck.check("device data plane: both FFN nodes send F2A from device memory",
         ffn_log.count("F2A packed on the device and sent from device memory") == 2,
         ffn_log[-300:])
for name, _ in REQS:
    r, g = ref[name], got[name]
    ck.check(f"{name}: cpu-dev with the device data plane answers exactly as cpu",
             r[0] == 200 and g == r, f"cpu {r[:2]} cpu-dev {g[:2]}")
mt = got["metrics"]
attn_m = [t for f, t in mt.items() if f.startswith("attn")]
ffn_m = [t for f, t in mt.items() if f.startswith("ffn")]
ck.check("device data plane: every node's /metrics says so (afd_node_data_plane_device 1)",
         len(attn_m) == 1 and len(ffn_m) == 2 and
         all(metric(t, "afd_node_data_plane_device") == 1 for t in attn_m + ffn_m),
         str({f: metric(t, "afd_node_data_plane_device") for f, t in mt.items()}))
planes = [(n["role"], n.get("data_plane")) for n in got["status"].get("nodes", [])]
ck.check("device data plane: the admin status (afdctl nodes) shows each node's as device",
         len(planes) == 3 and all(p == "device" for _, p in planes), str(planes))
ck.check("device data plane: the attention node counts its F2A answers by memory",
         attn_m and (metric(attn_m[0], "afd_node_f2a_answers_total", memory="device") or 0) > 0 and
         metric(attn_m[0], "afd_node_f2a_answers_total", memory="host") == 0,
         attn_m[0][:200] if attn_m else "no attention metrics")
sys.exit(ck.done())
