#!/usr/bin/python3
"""Independent float64 numpy reference for the Step3 text model.

Written only from the model math in DESIGN.md section 1 (never from the C
code), so that it can serve as an oracle for the C inference engine:

  * reads a checkpoint directory (config.json + model.safetensors.index.json
    with shards, or a single model.safetensors), parsing safetensors by hand
    (BF16, F16, F32, F8_E4M3 with 128x128 block `_scale_inv` dequantisation);
  * runs the whole sequence at once with a causal mask (no KV cache), so it is
    independent of any incremental-decode logic;
  * reports teacher-forced log-probabilities, or greedy continuations.

Dependencies: Python 3 standard library + numpy only.  Run with /usr/bin/python3.

CLI:
  step3_ref.py --model DIR --tokens 1,2,3,4,5 --prompt-len 3 [--top N]
      -> JSON {"model", "tokens", "prompt_len", "logprobs": [ {pos, next,
         logprob_next, argmax, margin, top: [[id, logprob], ...]}, ... ]}
         one object per position pos = prompt_len-1 .. len(tokens)-2, each
         describing the prediction of tokens[pos+1].
  step3_ref.py --model DIR --tokens 1,2,3 --greedy N [--top N]
      -> JSON {"model", "prompt", "generated": [ids], "steps": [ {pos,
         argmax, margin, top}, ... ]}  (prompt = all of --tokens unless
         --prompt-len is given, in which case only the first prompt-len).

Python use:
  from step3_ref import teacher_force, greedy
  teacher_force(model_dir, tokens, prompt_len, top_n) -> same dict as the CLI.
Loaded checkpoints are cached per directory (load_checkpoint), so repeated
calls reuse decoded weights.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

# --------------------------------------------------------------------------
# FP8 E4M3 (OCP "e4m3fn"): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits,
# subnormals when the exponent field is 0, no infinities, 0x7F/0xFF are NaN.
# --------------------------------------------------------------------------


def _build_e4m3_table():
    t = np.empty(256, dtype=np.float64)
    for b in range(256):
        sign = -1.0 if (b >> 7) & 1 else 1.0
        e = (b >> 3) & 0xF
        m = b & 0x7
        if e == 0xF and m == 0x7:
            t[b] = float("nan")
        elif e == 0:
            t[b] = sign * (m / 8.0) * 2.0 ** (1 - 7)      # subnormal: m * 2^-9
        else:
            t[b] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t


E4M3_TABLE = _build_e4m3_table()

# --------------------------------------------------------------------------
# safetensors parsing
# --------------------------------------------------------------------------

_DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1}


def _decode(raw, dtype, shape):
    """Decode raw little-endian bytes of a safetensors tensor into float64."""
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        a = u.view(np.float32).astype(np.float64)
    elif dtype == "F16":
        a = np.frombuffer(raw, dtype="<f2").astype(np.float64)
    elif dtype == "F32":
        a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    elif dtype == "F64":
        a = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    elif dtype == "F8_E4M3":
        a = E4M3_TABLE[np.frombuffer(raw, dtype=np.uint8)]
    else:
        raise ValueError("unsupported safetensors dtype %r" % dtype)
    return a.reshape(shape)


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensors read on demand."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen).decode("utf-8"))
        self.data_start = 8 + hlen
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, e in self.entries.items():
            n = int(np.prod(e["shape"], dtype=np.int64)) if e["shape"] else 1
            b0, b1 = e["data_offsets"]
            if e["dtype"] not in _DTYPE_SIZE:
                continue  # not needed unless actually read
            if b1 - b0 != n * _DTYPE_SIZE[e["dtype"]]:
                raise ValueError("%s: %s byte size mismatch" % (path, name))

    def info(self, name):
        e = self.entries[name]
        return e["dtype"], tuple(e["shape"])

    def read(self, name):
        e = self.entries[name]
        b0, b1 = e["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b0)
            raw = f.read(b1 - b0)
        if len(raw) != b1 - b0:
            raise ValueError("%s: %s truncated" % (self.path, name))
        return _decode(raw, e["dtype"], tuple(e["shape"]))


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


def _parse_layer_list(v):
    """moe_layers_enum: list of ints, or comma string; '...' expands a range
    from the step of the two preceding entries (e.g. "4,5,...,59")."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return sorted(int(x) for x in v)
    parts = [p.strip() for p in str(v).split(",") if p.strip()]
    out = []
    for i, p in enumerate(parts):
        if p in ("...", "\u2026"):
            if len(out) < 1 or i + 1 >= len(parts):
                raise ValueError("bad moe_layers_enum %r" % v)
            step = out[-1] - out[-2] if len(out) >= 2 else 1
            end = int(parts[i + 1])
            x = out[-1] + step
            while x < end:
                out.append(x)
                x += step
        else:
            out.append(int(p))
    return sorted(set(out))


class Config:
    def __init__(self, raw):
        tc = raw.get("text_config", raw) if isinstance(raw, dict) else raw
        if tc is None:
            tc = raw
        self.raw = raw
        g = tc.get
        self.hidden_size = int(g("hidden_size"))
        self.num_layers = int(g("num_hidden_layers"))
        self.num_heads = int(g("num_attention_heads"))
        self.num_groups = int(g("num_attention_groups", 1) or 1)
        self.head_dim = int(g("head_dim", self.hidden_size // self.num_heads))
        self.share_q_dim = g("share_q_dim")
        self.rope_theta = float(g("rope_theta", 500000.0))
        self.vocab_size = int(g("vocab_size"))
        self.n_experts = int(g("moe_num_experts", 0) or 0)
        self.top_k = int(g("moe_top_k", 0) or 0)
        self.moe_inter = g("moe_intermediate_size")
        self.share_dim = g("share_expert_dim")
        self.inter = g("intermediate_size")
        self.moe_layers = _parse_layer_list(g("moe_layers_enum"))
        self.norm_expert_weight = bool(g("norm_expert_weight", False))
        self.eps = float(g("rms_norm_eps", 1e-5))
        # quantization_config may sit at top level (HF convention) or inside
        # text_config; accept either.
        q = raw.get("quantization_config") or tc.get("quantization_config")
        self.quant = q
        bs = (q or {}).get("weight_block_size") or [128, 128]
        self.block = (int(bs[0]), int(bs[1]))
        if self.num_heads % self.num_groups:
            raise ValueError("num_attention_heads not divisible by groups")


# --------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory; get(name) returns a dequantised float64 array."""

    def __init__(self, model_dir):
        self.dir = os.path.abspath(model_dir)
        with open(os.path.join(self.dir, "config.json")) as f:
            self.cfg = Config(json.load(f))
        idx = os.path.join(self.dir, "model.safetensors.index.json")
        self.files = {}
        self.where = {}
        if os.path.exists(idx):
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            for name, shard in wm.items():
                if shard not in self.files:
                    self.files[shard] = SafetensorsFile(
                        os.path.join(self.dir, shard))
                self.where[name] = self.files[shard]
        else:
            st = SafetensorsFile(os.path.join(self.dir, "model.safetensors"))
            self.files["model.safetensors"] = st
            for name in st.entries:
                self.where[name] = st
        for name, st in self.where.items():
            if name not in st.entries:
                raise ValueError("index lists %s but shard lacks it" % name)
        self.cache = {}
        if self.cfg.moe_layers is None:
            # Not in the config: infer from which layers carry a router.
            self.cfg.moe_layers = sorted(
                L for L in range(self.cfg.num_layers)
                if "model.layers.%d.moe.gate.weight" % L in self.where)
        self.moe_set = set(self.cfg.moe_layers)

    def has(self, name):
        return name in self.where

    def dtype(self, name):
        return self.where[name].info(name)[0]

    def get(self, name, shape=None):
        if name in self.cache:
            w = self.cache[name]
        else:
            st = self.where[name]
            w = st.read(name)
            dt = st.info(name)[0]
            sname = name + "_scale_inv"
            if dt == "F8_E4M3":
                if sname not in self.where:
                    raise ValueError("%s is F8_E4M3 without %s" % (name, sname))
                w = self._dequant(w, self.where[sname].read(sname), name)
            self.cache[name] = w
        if shape is not None and tuple(w.shape) != tuple(shape):
            raise ValueError("%s: shape %s, expected %s"
                             % (name, w.shape, tuple(shape)))
        return w

    def _dequant(self, q, s, name):
        bo, bi = self.cfg.block
        out, inn = q.shape[-2], q.shape[-1]
        want = q.shape[:-2] + (-(-out // bo), -(-inn // bi))
        if tuple(s.shape) != want:
            raise ValueError("%s_scale_inv: shape %s, expected %s"
                             % (name, s.shape, want))
        full = np.repeat(np.repeat(s, bo, axis=-2), bi, axis=-1)
        return q * full[..., :out, :inn]


_CKPT_CACHE = {}


def load_checkpoint(model_dir):
    key = os.path.abspath(model_dir)
    if key not in _CKPT_CACHE:
        _CKPT_CACHE[key] = Checkpoint(key)
    return _CKPT_CACHE[key]


# --------------------------------------------------------------------------
# model math (DESIGN.md section 1), all float64
# --------------------------------------------------------------------------


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x):
    m = np.max(x)
    return x - m - math.log(np.sum(np.exp(x - m)))


def rope_neox(x, pos, theta):
    """x: [T, n, d]; NeoX rotate_half over all d dims, positions pos [T]."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2.0 / d)
    ang = pos.astype(np.float64)[:, None] * inv[None, :]        # [T, d/2]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = np.concatenate([-x2, x1], axis=-1)
    return x * cos + rot * sin


def _mlp(x, wg, wu, wd):
    return (silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def _moe_topk(p, k):
    """Top-k experts per row of p by probability; ties -> lower index first."""
    order = np.argsort(-p, axis=-1, kind="stable")
    return order[:, :k]


def forward(ck, tokens):
    """Full-sequence causal forward. tokens: list[int]. Returns logits [T, V]."""
    c = ck.cfg
    H, nh, ng, hd = c.hidden_size, c.num_heads, c.num_groups, c.head_dim
    toks = np.asarray(tokens, dtype=np.int64)
    T = len(toks)
    if T == 0:
        raise ValueError("empty token sequence")
    if toks.min() < 0 or toks.max() >= c.vocab_size:
        raise ValueError("token id out of range")
    pos = np.arange(T)
    x = ck.get("model.embed_tokens.weight", (c.vocab_size, H))[toks].copy()
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)               # s > t
    hpg = nh // ng
    for L in range(c.num_layers):
        p = "model.layers.%d." % L
        # ---- attention (MFA: low-rank query, shared KV heads) ----
        h = rms_norm(x, ck.get(p + "input_layernorm.weight", (H,)), c.eps)
        qd = int(c.share_q_dim) if c.share_q_dim else None
        wqp = ck.get(p + "self_attn.q_proj.weight")
        qd = wqp.shape[0] if qd is None else qd
        if wqp.shape != (qd, H):
            raise ValueError("q_proj shape %s" % (wqp.shape,))
        ql = rms_norm(h @ wqp.T,
                      ck.get(p + "self_attn.inter_norm.weight", (qd,)), c.eps)
        q = (ql @ ck.get(p + "self_attn.wq.weight", (nh * hd, qd)).T)
        q = q.reshape(T, nh, hd)
        k = (h @ ck.get(p + "self_attn.k_proj.weight", (ng * hd, H)).T)
        v = (h @ ck.get(p + "self_attn.v_proj.weight", (ng * hd, H)).T)
        k = k.reshape(T, ng, hd)
        v = v.reshape(T, ng, hd)
        q = rope_neox(q, pos, c.rope_theta)
        k = rope_neox(k, pos, c.rope_theta)
        grp = np.arange(nh) // hpg                                  # head -> kv
        kh = k[:, grp, :]                                           # [T, nh, hd]
        vh = v[:, grp, :]
        sc = np.einsum("thd,shd->hts", q, kh) / math.sqrt(hd)
        sc[:, mask] = -np.inf
        o = np.einsum("hts,shd->thd", softmax(sc, axis=-1), vh)
        o = o.reshape(T, nh * hd)
        x = x + o @ ck.get(p + "self_attn.o_proj.weight", (H, nh * hd)).T
        # ---- FFN ----
        g = rms_norm(x, ck.get(p + "post_attention_layernorm.weight", (H,)),
                     c.eps)
        if L not in ck.moe_set:
            I = int(c.inter) if c.inter else ck.get(p + "mlp.gate_proj.weight").shape[0]
            f = _mlp(g, ck.get(p + "mlp.gate_proj.weight", (I, H)),
                     ck.get(p + "mlp.up_proj.weight", (I, H)),
                     ck.get(p + "mlp.down_proj.weight", (H, I)))
        else:
            E, K = c.n_experts, c.top_k
            MI = int(c.moe_inter)
            router = ck.get(p + "moe.gate.weight", (E, H))
            probs = softmax(g @ router.T, axis=-1)                  # [T, E]
            sel = _moe_topk(probs, K)                               # [T, K]
            wts = np.take_along_axis(probs, sel, axis=-1)           # [T, K]
            if c.norm_expert_weight:
                wts = wts / np.sum(wts, axis=-1, keepdims=True)
            Wg = ck.get(p + "moe.gate_proj.weight", (E, MI, H))
            Wu = ck.get(p + "moe.up_proj.weight", (E, MI, H))
            Wd = ck.get(p + "moe.down_proj.weight", (E, H, MI))
            f = np.zeros_like(g)
            for e in range(E):
                rows, slot = np.nonzero(sel == e)
                if rows.size == 0:
                    continue
                y = _mlp(g[rows], Wg[e], Wu[e], Wd[e])
                f[rows] += wts[rows, slot][:, None] * y
            SD = int(c.share_dim) if c.share_dim else MI
            f = f + _mlp(g, ck.get(p + "share_expert.gate_proj.weight", (SD, H)),
                         ck.get(p + "share_expert.up_proj.weight", (SD, H)),
                         ck.get(p + "share_expert.down_proj.weight", (H, SD)))
        x = x + f
    xf = rms_norm(x, ck.get("model.norm.weight", (H,)), c.eps)
    return xf @ ck.get("lm_head.weight", (c.vocab_size, H)).T


# --------------------------------------------------------------------------
# teacher forcing / greedy
# --------------------------------------------------------------------------


def _describe(logits_row, top_n):
    lp = log_softmax(logits_row)
    order = np.argsort(-lp, kind="stable")
    top1 = int(order[0])
    margin = float(lp[order[0]] - lp[order[1]]) if lp.size > 1 else float("inf")
    top = [[int(i), float(lp[i])] for i in order[:max(0, top_n)]]
    return lp, top1, margin, top


def teacher_force(model_dir, tokens, prompt_len, top_n=5):
    """Log-probs of each token after the prompt, given all previous tokens."""
    tokens = [int(t) for t in tokens]
    if not 1 <= prompt_len <= len(tokens):
        raise ValueError("prompt_len must be in [1, len(tokens)]")
    ck = load_checkpoint(model_dir)
    logits = forward(ck, tokens)
    out = []
    for i in range(prompt_len - 1, len(tokens) - 1):
        lp, top1, margin, top = _describe(logits[i], top_n)
        nxt = tokens[i + 1]
        out.append({"pos": i, "next": nxt, "logprob_next": float(lp[nxt]),
                    "argmax": top1, "margin": margin, "top": top})
    return {"model": ck.dir, "tokens": tokens, "prompt_len": prompt_len,
            "logprobs": out}


def greedy(model_dir, prompt, n, top_n=5):
    """Greedily generate n tokens, recomputing the full sequence every step."""
    ck = load_checkpoint(model_dir)
    seq = [int(t) for t in prompt]
    steps = []
    for _ in range(n):
        logits = forward(ck, seq)
        _, top1, margin, top = _describe(logits[-1], top_n)
        steps.append({"pos": len(seq) - 1, "argmax": top1, "margin": margin,
                      "top": top})
        seq.append(top1)
    return {"model": ck.dir, "prompt": [int(t) for t in prompt],
            "generated": seq[len(prompt):], "steps": steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--tokens", required=True, help="comma-separated ids")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="teacher forcing: predictions start after this many")
    ap.add_argument("--top", type=int, default=5, help="top-N to list")
    ap.add_argument("--greedy", type=int, default=None, metavar="N",
                    help="generate N tokens greedily from the prompt instead")
    a = ap.parse_args(argv)
    toks = [int(t) for t in a.tokens.replace(" ", "").split(",") if t != ""]
    if a.greedy is not None:
        prompt = toks[:a.prompt_len] if a.prompt_len else toks
        res = greedy(a.model, prompt, a.greedy, a.top)
    else:
        if a.prompt_len is None:
            ap.error("--prompt-len is required for teacher forcing")
        res = teacher_force(a.model, toks, a.prompt_len, a.top)
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
