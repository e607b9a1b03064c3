#!/usr/bin/env python3
"""test_checkpoint_formats.py: checkpoints as people publish them load to the same model.

One small DeepSeek-V3 model (configs/tiny.json, MTP on) with random weights, written here in
Python (st_io, numpy), independently of the C writer, in five layouts:
  fp32         the reference: model.safetensors, F32
  fp8          DeepSeek's release layout: every projection matrix of the blocks F8_E4M3 with a
               '<name>_scale_inv' F32 of shape (ceil(out/128), ceil(in/128)) (scale = block
               amax / 448, as DeepSeek-V3 inference/kernel.py weight_quant; dequantised value =
               e4m3 * scale_inv, as its weight_dequant), quantization_config in config.json.
               Left unquantised as in DeepSeek-V3's inference/model.py, where only the blocks'
               Linear layers are FP8: embedding, lm_head, norms, the router (mlp.gate.weight,
               e_score_correction_bias) and the MTP eh_proj (not a Linear of a block);
  bf16         every tensor BF16 except the router bias (F32, as HF keeps it);
  sharded      the fp32 tensors over three shards with model.safetensors.index.json;
  no_mtp       fp32 without the MTP layer's tensors (a release without MTP).
fp8 and bf16 are compared with an fp32 directory holding exactly their dequantised values,
sharded and no_mtp with the fp32 one (forward's logits are the main head's; the MTP layer,
freshly initialised when absent, changes only the MTP loss). The same fp32 parameter values
must give the same logits: the tolerance is exact equality (the forward is deterministic).
The e4m3 encoder below is our own numpy code (round to nearest, ties to even), not the C one.

ctest runs it with NM_BIN and NM_ROOT; exit 0 pass, 1 fail, 77 skip (no binary).
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsv3_ref as R  # noqa: E402
import st_io  # noqa: E402

ROOT = os.environ.get("NM_ROOT", os.path.normpath(os.path.join(HERE, "..", "..")))
CFG = os.path.join(ROOT, "configs", "tiny.json")
BLOCK = 128
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}


# --- FP8 E4M3 (fn: no infinities, 0x7f/0xff NaN, max 448), written from the format's definition

def e4m3_values():
    v = np.zeros(127)
    for c in range(127):
        e, m = c >> 3, c & 7
        v[c] = (m / 8.0) * 2.0 ** -6 if e == 0 else (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return v  # codes 0..126, ascending


E4M3 = e4m3_values()


def e4m3_encode(x):
    a = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    hi = np.clip(np.searchsorted(E4M3, a), 1, 126)
    lo = hi - 1
    dlo, dhi = a - E4M3[lo], E4M3[hi] - a
    code = np.where(dhi < dlo, hi, lo)
    tie = dhi == dlo
    code = np.where(tie, np.where(lo % 2 == 0, lo, hi), code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def e4m3_decode(codes):
    v = E4M3[np.minimum(codes & 0x7F, 126)]
    return np.where(codes & 0x80, -v, v)


def quantize_block(w, bo_n=BLOCK, bi_n=BLOCK):
    """w (O, I) fp32 -> codes uint8 (O, I), scale_inv fp32 (ceil(O/bo_n), ceil(I/bi_n)), dequantised fp32."""
    O, I = w.shape
    bo, bi = -(-O // bo_n), -(-I // bi_n)
    s = np.zeros((bo, bi), np.float32)
    codes = np.zeros((O, I), np.uint8)
    deq = np.zeros((O, I), np.float32)
    for i in range(bo):
        for j in range(bi):
            sl = (slice(i * bo_n, (i + 1) * bo_n), slice(j * bi_n, (j + 1) * bi_n))
            blk = w[sl]
            s[i, j] = np.float32(max(float(np.abs(blk).max()), 1e-12) / 448.0)
            c = e4m3_encode(blk / s[i, j])
            codes[sl] = c
            deq[sl] = e4m3_decode(c).astype(np.float32) * s[i, j]
    return codes, s, deq


def is_quantised(name, cfg):
    if not name.endswith(".weight") or not name.startswith("model.layers."):
        return False
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return False
    if name.endswith("mlp.gate.weight") or name.endswith("eh_proj.weight") or "shared_head" in name:
        return False
    return "embed_tokens" not in name


# --- writing directories ---------------------------------------------------------------------

def write_raw_st(path, entries):
    """entries: name -> (dtype string, shape, raw bytes); sorted, 8-byte aligned header."""
    header, blobs, off = {}, [], 0
    for name in sorted(entries):
        dt, shape, raw = entries[name]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_dir(d, cfg_text, tensors, extra_cfg=None, raw=None):
    os.makedirs(d, exist_ok=True)
    cfg = json.loads(cfg_text)
    if extra_cfg:
        cfg.update(extra_cfg)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if raw is not None:
        write_raw_st(os.path.join(d, "model.safetensors"), raw)
    else:
        st_io.save(os.path.join(d, "model.safetensors"), tensors, metadata={"format": "pt"})


def f32_raw(a):
    return ("F32", a.shape, np.ascontiguousarray(a, dtype="<f4").tobytes())


def main():
    nm_bin = os.environ.get("NM_BIN")
    if not nm_bin or not os.path.exists(nm_bin):
        skip(f"NM_BIN ({nm_bin}) not set or missing: build it (make)")
    cfg_text = open(CFG).read()
    cfg = R.load_config(CFG)
    fails = []
    tmp = tempfile.mkdtemp(prefix="nm_ckpt_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~370 MB of directories: never left behind

    # Random weights with every tensor the model has (copies of the tied MTP rows included).
    t = R.random_tensors(cfg, 21)
    for n in R.mtp_copy_names(cfg):
        t[n] = t["model.embed_tokens.weight"] if "embed_tokens" in n else t["lm_head.weight"]
    B, T = 2, 16
    tokens = np.random.default_rng(22).integers(0, cfg["vocab_size"], size=(B, T)).astype("<i4")
    tok = os.path.join(tmp, "tokens.bin")
    tokens.tofile(tok)

    def forward(d):
        lp = os.path.join(d, "logits.bin")
        p = subprocess.run([nm_bin, "forward", "--model", d, "--tokens", tok, "--batch", str(B), "--logits", lp],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            fails.append("%s: forward failed (rc %d): %s" % (os.path.basename(d), p.returncode, p.stderr.strip()))
            return None, p.stderr
        return np.fromfile(lp, dtype="<f4"), p.stderr

    def same(name, a, b):
        if a is None or b is None:
            return
        d = float(np.abs(a.astype(np.float64) - b).max())
        print("%-8s max|logits - fp32 logits| = %.3g (max|logits| %.3g)" % (name, d, float(np.abs(b).max())))
        if d != 0.0:
            fails.append("%s: logits differ from the fp32 directory's by up to %.3g" % (name, d))

    # fp32 reference and sharded / no-MTP layouts of it.
    d32 = os.path.join(tmp, "fp32")
    write_dir(d32, cfg_text, t)
    l32, _ = forward(d32)
    dsh = os.path.join(tmp, "sharded")
    os.makedirs(dsh)
    with open(os.path.join(dsh, "config.json"), "w") as f:
        f.write(cfg_text)
    names = sorted(t)
    wm = {}
    for s in range(3):
        part = {n: t[n] for n in names[s::3]}
        fn = "model-%05d-of-00003.safetensors" % (s + 1)
        st_io.save(os.path.join(dsh, fn), part, metadata={"format": "pt"})
        wm.update({n: fn for n in part})
    with open(os.path.join(dsh, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    same("sharded", forward(dsh)[0], l32)

    mtp_pre = "model.layers.%d." % cfg["num_hidden_layers"]
    dnm = os.path.join(tmp, "no_mtp")
    write_dir(dnm, cfg_text, {n: a for n, a in t.items() if not n.startswith(mtp_pre)})
    lnm, err = forward(dnm)
    same("no_mtp", lnm, l32)
    if lnm is not None and "MTP" not in err:
        fails.append("no_mtp: no notice about the absent MTP tensors on stderr: %r" % err.strip())

    # fp8: DeepSeek's release layout, against fp32 holding its dequantised values.
    raw, deq, n_q = {}, {}, 0
    for n, a in t.items():
        if a.ndim == 2 and is_quantised(n, cfg):
            codes, s, dq = quantize_block(a)
            raw[n] = ("F8_E4M3", a.shape, codes.tobytes())
            raw[n + "_scale_inv"] = f32_raw(s)
            deq[n] = dq
            n_q += 1
        else:
            raw[n] = f32_raw(a) if a.dtype == np.float32 else f32_raw(a.astype(np.float32))
            deq[n] = a
    assert n_q > 10, n_q
    d8 = os.path.join(tmp, "fp8")
    write_dir(d8, cfg_text, None, extra_cfg={"quantization_config": QUANT}, raw=raw)
    d8r = os.path.join(tmp, "fp8_dequant_fp32")
    write_dir(d8r, cfg_text, deq)
    l8r, _ = forward(d8r)
    same("fp8", forward(d8)[0], l8r)
    if l8r is not None and l32 is not None:
        rel = float(np.abs(l8r - l32).max() / np.abs(l32).max())
        print("fp8 quantisation moves the logits by %.3g of max|logits| (must be > 0: the test sees FP8)" % rel)
        if not rel > 0:
            fails.append("fp8: dequantised weights gave the fp32 logits exactly; the quantisation did nothing")

    # bf16 (router bias F32), against fp32 holding the bf16-rounded values.
    rawb, rb = {}, {}
    for n, a in t.items():
        if n.endswith("e_score_correction_bias"):
            rawb[n] = f32_raw(a)
            rb[n] = a
        else:
            u = st_io.f32_to_bf16(a)
            rawb[n] = ("BF16", a.shape, np.ascontiguousarray(u, dtype="<u2").tobytes())
            rb[n] = st_io.bf16_to_f32(u).reshape(a.shape)
    db = os.path.join(tmp, "bf16")
    write_dir(db, cfg_text, None, raw=rawb)
    dbr = os.path.join(tmp, "bf16_fp32")
    write_dir(dbr, cfg_text, rb)
    same("bf16", forward(db)[0], forward(dbr)[0])

    # A missing scale is refused naming the tensor.
    victim = next(n for n in sorted(raw) if n.endswith("_scale_inv"))
    raw2 = dict(raw)
    del raw2[victim]
    d8m = os.path.join(tmp, "fp8_noscale")
    write_dir(d8m, cfg_text, None, extra_cfg={"quantization_config": QUANT}, raw=raw2)
    p = subprocess.run([nm_bin, "forward", "--model", d8m, "--tokens", tok, "--batch", str(B)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode == 0 or victim not in p.stderr:
        fails.append("fp8 without %s: rc %d, stderr %r" % (victim, p.returncode, p.stderr.strip()[-300:]))

    # weight_block_size is used as given: 16 x 32 blocks (several per matrix of this small model).
    raw16, deq16 = {}, {}
    for n, a in t.items():
        if a.ndim == 2 and is_quantised(n, cfg):
            codes, sc, dq = quantize_block(a, 16, 32)
            raw16[n] = ("F8_E4M3", a.shape, codes.tobytes())
            raw16[n + "_scale_inv"] = f32_raw(sc)
            deq16[n] = dq
        else:
            raw16[n] = raw[n]
            deq16[n] = deq[n]
    d16 = os.path.join(tmp, "fp8_b16x32")
    write_dir(d16, cfg_text, None, extra_cfg={"quantization_config": dict(QUANT, weight_block_size=[16, 32])}, raw=raw16)
    d16r = os.path.join(tmp, "fp8_b16x32_fp32")
    write_dir(d16r, cfg_text, deq16)
    same("fp8 16x32 blocks", forward(d16)[0], forward(d16r)[0])

    # quantization_config values we do not implement are refused naming the file, field and value,
    # and so are scales whose shape does not fit the stated block.
    def refused_q(name, quant, needles, tensors_raw=raw):
        d = os.path.join(tmp, name)
        write_dir(d, cfg_text, None, extra_cfg={"quantization_config": quant}, raw=tensors_raw)
        p = subprocess.run([nm_bin, "forward", "--model", d, "--tokens", tok, "--batch", str(B)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode == 0 or not all(x in p.stderr for x in needles):
            fails.append("%s: rc %d, stderr %r (expected a refusal naming %s)"
                         % (name, p.returncode, p.stderr.strip()[-300:], needles))
    refused_q("q_method", dict(QUANT, quant_method="gptq"), ["config.json", "quant_method", '"gptq"'])
    refused_q("q_no_method", {k: v for k, v in QUANT.items() if k != "quant_method"},
              ["config.json", "quant_method", "(missing)"])
    refused_q("q_fmt", dict(QUANT, fmt="e5m2"), ["config.json", "fmt", '"e5m2"'])
    refused_q("q_block", dict(QUANT, weight_block_size=[128]), ["config.json", "weight_block_size", "[128]"])
    refused_q("q_block_zero", dict(QUANT, weight_block_size=[0, 128]), ["config.json", "weight_block_size", "[0,128]"])
    refused_q("q_block_mismatch", dict(QUANT, weight_block_size=[64, 64]), ["_scale_inv", "64 x 64 blocks"])
    # FP8 codes whose scales are all gone (e.g. a tool stripped them) are never read as plain weights.
    refused_q("q_no_scales", QUANT, ["F8_E4M3", "_scale_inv", "missing"],
              {n: v for n, v in raw.items() if not n.endswith("_scale_inv")})

    # Still refused: noaux_tc without its router bias (it routes with it), and MTP half present.
    def refused(name, tensors, needle):
        d = os.path.join(tmp, name)
        write_dir(d, cfg_text, tensors)
        p = subprocess.run([nm_bin, "forward", "--model", d, "--tokens", tok, "--batch", str(B)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode == 0 or needle not in p.stderr:
            fails.append("%s: rc %d, stderr %r (expected a refusal naming %s)"
                         % (name, p.returncode, p.stderr.strip()[-300:], needle))
    refused("noaux_tc_no_bias", {n: a for n, a in t.items() if not n.endswith("e_score_correction_bias")},
            "e_score_correction_bias")
    half = sorted(n for n in t if n.startswith(mtp_pre) and "eh_proj" in n)[0]
    refused("mtp_partial", {n: a for n, a in t.items() if n != half}, half)

    for f in fails:
        print("FAIL", f)
    if not fails:
        print("OK: fp8 (128 x 128 and 16 x 32 blocks; unimplemented quantization_config refused), bf16, sharded and MTP-less checkpoints load to the fp32 model")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
