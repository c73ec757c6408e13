"""afd_run on corrupted checkpoints: a clean, one-line error naming the culprit.

Each case copies the tiny bf16 (or, for fp8-only cases, fp8) fixture into TEST_TMP,
corrupts it in one way and runs afd_run on it. The run must fail cleanly:
  - exit status > 0 and < 128 (not killed by a signal, not an abort),
  - no sanitizer report on stderr (ASan/UBSan/LSan builds: BUILD=build/san),
  - exactly one stderr line starting with "afd_run: error:",
  - that line names the file at fault (the shard's file name, config.json, the
    index, or for a tensor missing everywhere the checkpoint directory) and, where
    the corruption concerns a tensor, the tensor's name.
Two valid copies (bf16 and fp8) must still run with exit status 0, which proves the
harness (copying and header rewriting round-trip) itself.

Safetensors headers are rewritten properly: 8-byte little-endian length, the JSON
header (space-padded to a multiple of 8 unless a case wants otherwise), then the
data bytes unchanged.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

ROOT = os.environ.get("ROOT", os.getcwd())
BIN = os.environ.get("BIN", os.path.join(ROOT, "build", "bin"))
MODELS = os.environ.get("MODELS", os.path.join(ROOT, "build", "models"))
TMP = os.environ.get("TEST_TMP") or __import__("tempfile").mkdtemp()
INDEX = "model.safetensors.index.json"
PROMPT = "1,2,3"
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer",
                   "runtime error:", "Assertion", "assertion failed")

results = []
made = []  # copies made by the current case, removed after it


def check(name, cond, detail=""):
    results.append(bool(cond))
    print(("ok - " if cond else "not ok - ") + name + (f"  [{detail}]" if detail else ""))
    sys.stdout.flush()


# ---- checkpoint helpers ----

def fresh_copy(case, dt="bf16"):
    src = os.path.join(MODELS, f"tiny-{dt}")
    dst = os.path.join(TMP, f"{case}-{dt}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    made.append(dst)
    return dst


def read_index(d):
    with open(os.path.join(d, INDEX)) as f:
        return json.load(f)


def write_index(d, idx):
    with open(os.path.join(d, INDEX), "w") as f:
        json.dump(idx, f, indent=2)


def shard_of(d, tensor):
    return read_index(d)["weight_map"][tensor]


def read_st(path):
    """-> (header dict in file order, data bytes)"""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    return header, raw[8 + n:]


def write_st(path, header, data, header_bytes=None, length=None, align=8):
    """Writes a safetensors file: u64le length + header JSON (padded) + data."""
    hb = header_bytes if header_bytes is not None else json.dumps(
        header, separators=(",", ":")).encode("utf-8")
    if align > 1:
        hb += b" " * ((-len(hb)) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if length is None else length))
        f.write(hb)
        f.write(data)


def edit_header(d, shard, fn):
    """Applies fn(header, data) -> (header, data) to a shard and rewrites it."""
    p = os.path.join(d, shard)
    h, data = read_st(p)
    h, data = fn(h, data)
    write_st(p, h, data)


def edit_config(d, fn):
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    fn(cfg["text_config"] if "text_config" in cfg else cfg)
    with open(p, "w") as f:
        json.dump(cfg, f, indent=1)


# ---- running ----

def afd_run(d, timeout=120):
    cmd = [os.path.join(BIN, "afd_run"), "--model", d, "--prompt", PROMPT, "--max-tokens", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def expect_ok(name, d):
    p = afd_run(d)
    errs = [l for l in p.stderr.splitlines() if l.startswith("afd_run: error:")]
    check(name, p.returncode == 0 and not errs and p.stdout.startswith("[0]"),
          f"rc {p.returncode}, stderr {p.stderr.strip()[:300]!r}")


def expect_error(name, d, must_name):
    """must_name: strings that must all appear in the error line; an entry that is a
    tuple is satisfied by any one of its members."""
    try:
        p = afd_run(d)
    except subprocess.TimeoutExpired:
        check(name, False, "afd_run hung (timeout)")
        return
    rc = p.returncode
    errs = [l for l in p.stderr.splitlines() if l.startswith("afd_run: error:")]
    problems = []
    if rc <= 0 or rc >= 128:
        problems.append(f"exit status {rc} (want 1..127; negative = signal)")
    marks = [m for m in SANITIZER_MARKS if m in p.stderr]
    if marks:
        problems.append(f"sanitizer/assert output {marks}")
    if len(errs) != 1:
        problems.append(f"{len(errs)} 'afd_run: error:' lines")
    line = errs[0] if errs else ""
    for want in must_name:
        alts = want if isinstance(want, tuple) else (want,)
        if not any(a in line for a in alts):
            problems.append("error line does not name " + " or ".join(repr(a) for a in alts))
    detail = "; ".join(problems) if problems else line
    if problems:
        detail += f"; stderr: {p.stderr.strip()[-600:]!r}"
    check(name, not problems, detail)


# ---- the cases ----

def case_truncated_shard():
    d = fresh_copy("truncated")
    shard = sorted(read_index(d)["weight_map"].values())[-1]
    p = os.path.join(d, shard)
    h, data = read_st(p)
    cut = 1000  # more than the last tensor (the vision stub), into the one before it
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - cut)
    left = len(data) - cut
    first_bad = next(k for k, v in h.items()
                     if k != "__metadata__" and v["data_offsets"][1] > left)
    expect_error("truncated shard (last 1000 bytes cut)", d, [shard, first_bad])


def case_truncated_into_header():
    d = fresh_copy("trunc-header")
    shard = sorted(read_index(d)["weight_map"].values())[0]
    p = os.path.join(d, shard)
    with open(p, "r+b") as f:
        f.truncate(100)
    expect_error("shard truncated inside its header", d, [shard])


def case_truncated_to_nothing():
    d = fresh_copy("trunc-empty")
    shard = sorted(read_index(d)["weight_map"].values())[0]
    with open(os.path.join(d, shard), "r+b") as f:
        f.truncate(5)
    expect_error("shard shorter than the 8-byte length field", d, [shard])


def _set_offsets(d, tensor, fn):
    shard = shard_of(d, tensor)

    def edit(h, data):
        b, e = h[tensor]["data_offsets"]
        h[tensor]["data_offsets"] = fn(b, e, len(data))
        return h, data
    edit_header(d, shard, edit)
    return shard


def case_offsets_out_of_bounds():
    d = fresh_copy("oob")
    t = "model.layers.1.self_attn.k_proj.weight"
    # same length, shifted to end 2 bytes past the data
    shard = _set_offsets(d, t, lambda b, e, n: [n - (e - b) + 2, n + 2])
    expect_error("data_offsets out of bounds", d, [shard, t])


def case_offsets_huge():
    d = fresh_copy("oob-huge")
    t = "model.layers.0.self_attn.v_proj.weight"
    shard = _set_offsets(d, t, lambda b, e, n: [2 ** 52, 2 ** 52 + (e - b)])
    expect_error("data_offsets far beyond the file (2^52)", d, [shard, t])


def case_begin_gt_end():
    d = fresh_copy("begin-end")
    t = "model.layers.0.self_attn.wq.weight"
    shard = _set_offsets(d, t, lambda b, e, n: [e, b])
    expect_error("data_offsets begin > end", d, [shard, t])


def case_length_mismatch():
    d = fresh_copy("length")
    t = "model.layers.0.self_attn.q_proj.weight"
    shard = shard_of(d, t)

    def edit(h, data):
        r, c = h[t]["shape"]
        h[t]["shape"] = [r, c + 1]
        return h, data
    edit_header(d, shard, edit)
    expect_error("byte length does not match shape x dtype", d, [shard, t])


def case_overlap():
    d = fresh_copy("overlap")
    a = "model.layers.0.self_attn.q_proj.weight"  # 102400 bytes
    b = "model.layers.0.self_attn.k_proj.weight"  # 40960 bytes, starts inside a now
    shard = shard_of(d, a)
    assert shard_of(d, b) == shard

    def edit(h, data):
        ab = h[a]["data_offsets"][0]
        bb, be = h[b]["data_offsets"]
        h[b]["data_offsets"] = [ab + 2, ab + 2 + (be - bb)]
        return h, data
    edit_header(d, shard, edit)
    expect_error("overlapping tensors", d, [shard, a, b])


def case_unknown_dtype(dtype):
    d = fresh_copy("dtype-" + dtype)
    t = "model.layers.2.self_attn.k_proj.weight"
    shard = shard_of(d, t)

    def edit(h, data):
        h[t]["dtype"] = dtype
        return h, data
    edit_header(d, shard, edit)
    expect_error(f"unknown dtype {dtype}", d, [shard, t])


def case_header_len_too_large():
    d = fresh_copy("hlen")
    shard = sorted(read_index(d)["weight_map"].values())[0]
    p = os.path.join(d, shard)
    h, data = read_st(p)
    write_st(p, h, data, length=os.path.getsize(p))  # longer than the file minus 8
    expect_error("header length field larger than the file", d, [shard])


def case_header_len_zero():
    d = fresh_copy("hlen0")
    shard = sorted(read_index(d)["weight_map"].values())[0]
    p = os.path.join(d, shard)
    h, data = read_st(p)
    write_st(p, h, data, length=0)
    expect_error("header length field 0", d, [shard])


def case_header_not_json():
    d = fresh_copy("notjson")
    shard = sorted(read_index(d)["weight_map"].values())[-1]
    p = os.path.join(d, shard)
    h, data = read_st(p)
    good = json.dumps(h).encode()
    bad = good[: len(good) // 2]  # cut in the middle of the object
    write_st(p, None, data, header_bytes=bad)
    expect_error("header is not JSON", d, [shard])


def case_header_not_object():
    d = fresh_copy("notobj")
    shard = sorted(read_index(d)["weight_map"].values())[-1]
    p = os.path.join(d, shard)
    _, data = read_st(p)
    write_st(p, None, data, header_bytes=b"[1, 2, 3]")
    expect_error("header is a JSON list, not an object", d, [shard])


def case_missing_offsets():
    d = fresh_copy("nooffsets")
    t = "model.layers.3.self_attn.o_proj.weight"
    shard = shard_of(d, t)

    def edit(h, data):
        del h[t]["data_offsets"]
        return h, data
    edit_header(d, shard, edit)
    expect_error("tensor entry without data_offsets", d, [shard, t])


def _remove_tensor(d, t):
    shard = shard_of(d, t)

    def edit(h, data):
        del h[t]  # its bytes stay as an unindexed hole
        return h, data
    edit_header(d, shard, edit)
    idx = read_index(d)
    del idx["weight_map"][t]
    write_index(d, idx)
    return shard


def case_missing_tensor():
    d = fresh_copy("missing")
    t = "model.layers.2.self_attn.k_proj.weight"
    _remove_tensor(d, t)
    # the tensor is in no file: the checkpoint directory (or the index) is the file at fault
    expect_error("missing tensor (removed from header and index)", d, [(d, INDEX), t])


def case_missing_expert_tensor():
    d = fresh_copy("missing-moe")
    t = "model.layers.1.moe.down_proj.weight"
    _remove_tensor(d, t)
    expect_error("missing fused expert tensor", d, [(d, INDEX), t])


def case_wrong_shape():
    d = fresh_copy("transposed")
    t = "model.layers.1.self_attn.q_proj.weight"
    shard = shard_of(d, t)

    def edit(h, data):
        h[t]["shape"] = h[t]["shape"][::-1]  # [H, share_q] instead of [share_q, H]
        return h, data
    edit_header(d, shard, edit)
    expect_error("wrong shape (q_proj transposed)", d, [shard, t])


def case_wrong_expert_count():
    d = fresh_copy("experts")
    t = "model.layers.2.moe.up_proj.weight"
    shard = shard_of(d, t)

    def edit(h, data):
        e, r, c = h[t]["shape"]
        h[t]["shape"] = [e // 2, r * 2, c]  # same bytes, wrong expert count
        return h, data
    edit_header(d, shard, edit)
    expect_error("fused expert tensor with the wrong expert count", d, [shard, t])


def case_norm_fp8():
    d = fresh_copy("normfp8")
    t = "model.norm.weight"
    shard = shard_of(d, t)

    def edit(h, data):
        b, e = h[t]["data_offsets"]
        h[t]["dtype"] = "F8_E4M3"
        h[t]["data_offsets"] = [b, b + (e - b) // 2]
        return h, data
    edit_header(d, shard, edit)
    expect_error("norm weight stored as fp8", d, [shard, t])


def case_fp8_missing_scale():
    d = fresh_copy("noscale", "fp8")
    t = "model.layers.1.moe.up_proj.weight_scale_inv"
    _remove_tensor(d, t)
    expect_error("fp8: missing _scale_inv of a fused expert weight", d, [(d, INDEX), t])


def case_fp8_missing_scale_dense():
    d = fresh_copy("noscale2", "fp8")
    t = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _remove_tensor(d, t)
    expect_error("fp8: missing _scale_inv of o_proj", d, [(d, INDEX), t])


def case_fp8_scale_wrong_shape():
    d = fresh_copy("scaleshape", "fp8")
    t = "model.layers.2.moe.gate_proj.weight_scale_inv"
    shard = shard_of(d, t)

    def edit(h, data):
        e, r, c = h[t]["shape"]
        assert r != c
        h[t]["shape"] = [e, c, r]  # same bytes, blocks transposed
        return h, data
    edit_header(d, shard, edit)
    expect_error("fp8: scale tensor with the wrong shape", d, [shard, t])


def case_fp8_scale_wrong_dtype():
    d = fresh_copy("scaledtype", "fp8")
    t = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    shard = shard_of(d, t)

    def edit(h, data):
        b, e = h[t]["data_offsets"]
        h[t]["dtype"] = "BF16"  # same shape, half the bytes (the rest is a hole)
        h[t]["data_offsets"] = [b, b + (e - b) // 2]
        return h, data
    edit_header(d, shard, edit)
    expect_error("fp8: scale tensor that is not F32", d, [shard, t])


def case_index_missing_shard():
    d = fresh_copy("noshard")
    idx = read_index(d)
    t = "model.layers.3.mlp.up_proj.weight"
    ghost = "model-00003-of-00002.safetensors"
    idx["weight_map"][t] = ghost
    write_index(d, idx)
    expect_error("index names a shard that does not exist", d, [ghost])


def case_shard_deleted():
    d = fresh_copy("shardgone")
    shard = sorted(read_index(d)["weight_map"].values())[-1]
    os.remove(os.path.join(d, shard))
    expect_error("a shard the index names is deleted", d, [shard])


def case_index_tensor_not_in_shard():
    d = fresh_copy("wrongshard")
    idx = read_index(d)
    shards = sorted(set(idx["weight_map"].values()))
    t = "lm_head.weight"
    real = idx["weight_map"][t]
    other = next(s for s in shards if s != real)
    idx["weight_map"][t] = other
    write_index(d, idx)
    expect_error("index names a tensor under a shard that does not hold it", d, [t, other])


def case_index_ghost_tensor():
    d = fresh_copy("ghost")
    idx = read_index(d)
    t = "model.layers.0.self_attn.ghost.weight"
    shard = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"][t] = shard
    write_index(d, idx)
    expect_error("index names a tensor that is in no shard", d, [t, shard])


def case_index_not_json():
    d = fresh_copy("indexjson")
    with open(os.path.join(d, INDEX), "w") as f:
        f.write('{"weight_map": {"model.embed_tokens.weight": ')
    expect_error("index is not JSON", d, [INDEX])


def case_index_shard_path():
    d = fresh_copy("indexpath")
    idx = read_index(d)
    t = "model.norm.weight"
    idx["weight_map"][t] = "../" + idx["weight_map"][t]
    write_index(d, idx)
    expect_error("index names a shard outside the directory", d, ["../model-"])


def case_misaligned_data():
    """An odd header length puts every tensor at an odd address. Safetensors does not
    require alignment, so this must load correctly or be refused cleanly, never be read
    through misaligned pointers (UB; aborts under UBSan)."""
    d = fresh_copy("misaligned", "fp8")
    ref = afd_run(os.path.join(TMP, "valid-fp8"))
    for shard in sorted(set(read_index(d)["weight_map"].values())):
        p = os.path.join(d, shard)
        h, data = read_st(p)
        hb = json.dumps(h, separators=(",", ":")).encode()
        if len(hb) % 2 == 0:
            hb += b" "
        write_st(p, None, data, header_bytes=hb, align=1)
    p = afd_run(d)
    errs = [l for l in p.stderr.splitlines() if l.startswith("afd_run: error:")]
    marks = [m for m in SANITIZER_MARKS if m in p.stderr]
    if p.returncode == 0:
        check("odd header length (misaligned tensors) loads and matches the aligned copy",
              not marks and p.stdout.split("\n")[0] == ref.stdout.split("\n")[0],
              f"got {p.stdout.splitlines()[:1]}, want {ref.stdout.splitlines()[:1]}, {marks}")
    else:
        check("odd header length (misaligned tensors) is refused cleanly",
              0 < p.returncode < 128 and not marks and len(errs) == 1,
              f"rc {p.returncode}; stderr {p.stderr.strip()[-600:]!r}")


def case_config_invalid_json():
    d = fresh_copy("cfgjson")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"text_config": {"hidden_size": 320,, }')
    expect_error("config.json is invalid JSON", d, ["config.json"])


def case_config_missing_field():
    d = fresh_copy("cfgmissing")
    edit_config(d, lambda c: c.pop("hidden_size"))
    expect_error("config.json without hidden_size", d, ["config.json", "hidden_size"])


def case_config_moe_layer_past_end():
    d = fresh_copy("cfgmoe")
    edit_config(d, lambda c: c.update(moe_layers_enum="1,2,%d" % c["num_hidden_layers"]))
    expect_error("config.json moe_layers_enum names a layer past num_hidden_layers", d,
                 ["config.json", "moe_layers_enum"])


def case_config_groups_2():
    d = fresh_copy("cfggroups")
    edit_config(d, lambda c: c.update(num_attention_groups=2))
    expect_error("config.json num_attention_groups 2", d,
                 ["config.json", "num_attention_groups"])


def case_config_wrong_type():
    d = fresh_copy("cfgtype")
    edit_config(d, lambda c: c.update(num_hidden_layers="4"))
    expect_error("config.json num_hidden_layers as a string", d,
                 ["config.json", "num_hidden_layers"])


def case_config_layers_mismatch():
    # config says 5 layers but the checkpoint holds 4: the loader must name the first
    # missing tensor, not crash
    d = fresh_copy("cfglayers")
    edit_config(d, lambda c: c.update(num_hidden_layers=5))
    expect_error("config.json with more layers than the checkpoint", d,
                 [(d, INDEX), "model.layers.4."])


def case_config_missing():
    d = fresh_copy("cfgnone")
    os.remove(os.path.join(d, "config.json"))
    expect_error("config.json missing", d, ["config.json"])


def main():
    for dt in ("bf16", "fp8"):
        if not os.path.isfile(os.path.join(MODELS, f"tiny-{dt}", "config.json")):
            print(f"not ok - fixture {MODELS}/tiny-{dt} missing")
            return 1
    # the harness itself: a plain copy, and a copy whose headers went through
    # read_st/write_st unchanged, both run
    for dt in ("bf16", "fp8"):
        d = fresh_copy("valid", dt)
        expect_ok(f"valid {dt} copy runs", d)
        d2 = fresh_copy("rewritten", dt)
        for shard in set(read_index(d2)["weight_map"].values()):
            edit_header(d2, shard, lambda h, data: (h, data))
        expect_ok(f"valid {dt} copy with rewritten headers runs", d2)

    cases = [
        case_truncated_shard, case_truncated_into_header, case_truncated_to_nothing,
        case_offsets_out_of_bounds, case_offsets_huge, case_begin_gt_end,
        case_length_mismatch, case_overlap,
        lambda: case_unknown_dtype("F8_E5M2"), lambda: case_unknown_dtype("Q4_NOPE"),
        case_header_len_too_large, case_header_len_zero, case_header_not_json,
        case_header_not_object, case_missing_offsets,
        case_missing_tensor, case_missing_expert_tensor, case_wrong_shape,
        case_wrong_expert_count, case_norm_fp8,
        case_fp8_missing_scale, case_fp8_missing_scale_dense, case_fp8_scale_wrong_shape,
        case_fp8_scale_wrong_dtype,
        case_index_missing_shard, case_shard_deleted, case_index_tensor_not_in_shard,
        case_index_ghost_tensor, case_index_not_json, case_index_shard_path,
        case_misaligned_data,
        case_config_invalid_json, case_config_missing_field, case_config_moe_layer_past_end,
        case_config_groups_2, case_config_wrong_type, case_config_layers_mismatch,
        case_config_missing,
    ]
    made.clear()  # the valid copies stay until the end (the misaligned case compares)
    for c in cases:
        try:
            c()
        except Exception as e:  # a broken case is a failure, not a crash of the suite
            check(getattr(c, "__name__", "case"), False, f"harness error: {e!r}")
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        made.clear()
    for dt in ("bf16", "fp8"):
        for kind in ("valid", "rewritten"):
            shutil.rmtree(os.path.join(TMP, f"{kind}-{dt}"), ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
