#!/usr/bin/python3
"""Tiny standalone writer of a seeded-random Step3 checkpoint (numpy only).

Exists so the Python reference (step3_ref.py) can be self-tested without the
project's own C writer.  Layout follows DESIGN.md section 1:

  OUT/config.json                        step3_vl wrapper with text_config
  OUT/model-00001-of-00002.safetensors   shard 1
  OUT/model-00002-of-00002.safetensors   shard 2
  OUT/model.safetensors.index.json       {"metadata": {...}, "weight_map": {...}}

Default: every tensor BF16.  With --fp8 every linear weight inside a layer
(self_attn.{q_proj,k_proj,v_proj,wq,o_proj}, mlp.*, moe.{gate,up,down}_proj,
share_expert.*) is stored F8_E4M3 with a float32 `<name>_scale_inv` holding one
scale per 128x128 block ([E, ceil(out/128), ceil(in/128)] for the fused
experts), and config.json carries a quantization_config.  embed_tokens, norms,
the router (moe.gate) and lm_head stay BF16.  The float32 master weights depend
only on --seed and the shapes, so bf16 and fp8 checkpoints of the same seed
hold the same model up to rounding.

Usage: mk_ref_ckpt.py OUTDIR [--fp8] [--seed N] [--set key=value ...]
                      [--vision-stub]
Default shapes (small, with partial 128-blocks): hidden 320, 4 layers with
moe_layers_enum "1,2", 4 heads x head_dim 64, one KV group, share_q_dim 160,
8 experts top-3, moe_intermediate_size 192, share_expert_dim 192,
intermediate_size 384, vocab 512.
"""

import argparse
import json
import os
import struct

import numpy as np

DEFAULT_TEXT = {
    "architectures": ["Step3TextForCausalLM"],
    "model_type": "step3_text",
    "hidden_size": 320,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_attention_groups": 1,
    "head_dim": 64,
    "share_q_dim": 160,
    "rope_theta": 500000.0,
    "vocab_size": 512,
    "moe_num_experts": 8,
    "moe_top_k": 3,
    "moe_intermediate_size": 192,
    "share_expert_dim": 192,
    "intermediate_size": 384,
    "moe_layers_enum": "1,2",
    "norm_expert_weight": False,
    "rms_norm_eps": 1e-5,
    "max_position_embedding": 65536,
    "torch_dtype": "bfloat16",
}

BLOCK = 128

# ---------------------------------------------------------------- encoders


def to_bf16_bits(a):
    """float32 -> bf16 bit pattern (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def _e4m3_positive_values():
    """Values of codes 0x00..0x7E (all finite non-negative e4m3fn codes)."""
    v = np.empty(127, dtype=np.float64)
    for b in range(127):
        e, m = b >> 3, b & 7
        v[b] = m * 2.0 ** -9 if e == 0 else (1 + m / 8.0) * 2.0 ** (e - 7)
    return v


_E4M3_POS = _e4m3_positive_values()      # strictly increasing, max 448


def to_e4m3_bits(a):
    """float -> e4m3fn code (uint8), round to nearest even, saturate to 448."""
    a = np.asarray(a, dtype=np.float64)
    mag = np.minimum(np.abs(a), 448.0)
    hi = np.clip(np.searchsorted(_E4M3_POS, mag), 1, 126)   # vals[hi] >= mag
    lo = hi - 1
    dlo = mag - _E4M3_POS[lo]
    dhi = _E4M3_POS[hi] - mag
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = np.where(mag == 0, 0, code).astype(np.uint8)
    return code | np.where(np.signbit(a) & (code != 0), 0x80, 0).astype(np.uint8)


def quant_fp8_block(w):
    """w [..., out, in] float32 -> (e4m3 codes, float32 scale_inv blocks)."""
    out, inn = w.shape[-2], w.shape[-1]
    nbo, nbi = -(-out // BLOCK), -(-inn // BLOCK)
    lead = w.shape[:-2]
    scale = np.empty(lead + (nbo, nbi), dtype=np.float32)
    codes = np.empty(w.shape, dtype=np.uint8)
    for bo in range(nbo):
        for bi in range(nbi):
            sl = (Ellipsis, slice(bo * BLOCK, (bo + 1) * BLOCK),
                  slice(bi * BLOCK, (bi + 1) * BLOCK))
            blk = w[sl].astype(np.float64)
            amax = np.max(np.abs(blk), axis=(-2, -1))
            s = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
            scale[..., bo, bi] = s
            codes[sl] = to_e4m3_bits(blk / s.astype(np.float64)[..., None, None])
    return codes, scale

# ---------------------------------------------------------------- weights


def make_weights(tc, seed, vision_stub=False):
    """Ordered list of (name, float32 array, quantisable?) from the seed."""
    rng = np.random.default_rng(seed)
    H, V = tc["hidden_size"], tc["vocab_size"]
    nh, ng, hd = tc["num_attention_heads"], tc["num_attention_groups"], tc["head_dim"]
    qd, I = tc["share_q_dim"], tc["intermediate_size"]
    E, MI, SD = tc["moe_num_experts"], tc["moe_intermediate_size"], tc["share_expert_dim"]
    moe = {int(x) for x in str(tc["moe_layers_enum"]).split(",") if x.strip()}

    def lin(out, inn, lead=()):
        return (rng.standard_normal(lead + (out, inn)) / np.sqrt(inn)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    ws = [("model.embed_tokens.weight",
           rng.standard_normal((V, H)).astype(np.float32), False)]
    for L in range(tc["num_hidden_layers"]):
        p = "model.layers.%d." % L
        ws += [
            (p + "input_layernorm.weight", norm(H), False),
            (p + "self_attn.q_proj.weight", lin(qd, H), True),
            (p + "self_attn.inter_norm.weight", norm(qd), False),
            (p + "self_attn.wq.weight", lin(nh * hd, qd), True),
            (p + "self_attn.k_proj.weight", lin(ng * hd, H), True),
            (p + "self_attn.v_proj.weight", lin(ng * hd, H), True),
            (p + "self_attn.o_proj.weight", lin(H, nh * hd), True),
            (p + "post_attention_layernorm.weight", norm(H), False),
        ]
        if L in moe:
            ws += [
                (p + "moe.gate.weight",
                 (3.0 * rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32),
                 False),
                (p + "moe.gate_proj.weight", lin(MI, H, (E,)), True),
                (p + "moe.up_proj.weight", lin(MI, H, (E,)), True),
                (p + "moe.down_proj.weight", lin(H, MI, (E,)), True),
                (p + "share_expert.gate_proj.weight", lin(SD, H), True),
                (p + "share_expert.up_proj.weight", lin(SD, H), True),
                (p + "share_expert.down_proj.weight", lin(H, SD), True),
            ]
        else:
            ws += [
                (p + "mlp.gate_proj.weight", lin(I, H), True),
                (p + "mlp.up_proj.weight", lin(I, H), True),
                (p + "mlp.down_proj.weight", lin(H, I), True),
            ]
    ws += [
        ("model.norm.weight", norm(H), False),
        ("lm_head.weight",
         (2.0 * rng.standard_normal((V, H)) / np.sqrt(H)).astype(np.float32), False),
    ]
    if vision_stub:   # a tensor a text-only loader must skip
        ws.append(("vision_model.embeddings.patch_embedding.weight",
                   rng.standard_normal((8, 3, 4, 4)).astype(np.float32), False))
    return ws

# ---------------------------------------------------------------- writing


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype string, shape, raw bytes)."""
    header, off = {}, 0
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": list(shape),
                        "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((-len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, _, _, raw in tensors:
            f.write(raw)


def main():
    ap = argparse.ArgumentParser(description="write a tiny seeded Step3 checkpoint")
    ap.add_argument("out")
    ap.add_argument("--fp8", action="store_true", help="block-fp8 linear weights")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a text_config field (JSON value or string)")
    ap.add_argument("--vision-stub", action="store_true",
                    help="also write a vision_model.* tensor (to be skipped)")
    a = ap.parse_args()

    tc = dict(DEFAULT_TEXT)
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            tc[k] = json.loads(v)
        except ValueError:
            tc[k] = v

    tensors = []
    for name, w, quant in make_weights(tc, a.seed, a.vision_stub):
        if a.fp8 and quant:
            codes, scale = quant_fp8_block(w)
            tensors.append((name, "F8_E4M3", w.shape, codes.tobytes()))
            tensors.append((name + "_scale_inv", "F32", scale.shape,
                            scale.astype("<f4").tobytes()))
        else:
            tensors.append((name, "BF16", w.shape,
                            to_bf16_bits(w).astype("<u2").tobytes()))

    # Two shards: tensors in order, cut where the running size passes half.
    total = sum(len(t[3]) for t in tensors)
    acc, cut = 0, len(tensors) - 1
    for i, t in enumerate(tensors):
        acc += len(t[3])
        if acc >= total // 2:
            cut = min(max(i + 1, 1), len(tensors) - 1)
            break
    shards = [tensors[:cut], tensors[cut:]]

    os.makedirs(a.out, exist_ok=True)
    weight_map = {}
    for i, sh in enumerate(shards):
        fn = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
        write_safetensors(os.path.join(a.out, fn), sh)
        for t in sh:
            weight_map[t[0]] = fn
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  f, indent=2)

    cfg = {
        "architectures": ["Step3VLForConditionalGeneration"],
        "model_type": "step3_vl",
        "torch_dtype": "bfloat16",
        "text_config": tc,
        "vision_config": {"model_type": "step3_vision_encoder", "hidden_size": 8},
    }
    if a.fp8:
        cfg["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3",
            "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print("wrote %s (%d tensors, %d bytes, %s)"
          % (a.out, len(tensors), total, "fp8" if a.fp8 else "bf16"))


if __name__ == "__main__":
    main()
