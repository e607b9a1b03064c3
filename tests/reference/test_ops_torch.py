"""Independent PyTorch float64 check of every op of every backend (cpu, ref), forward and backward.

Each op's reference below is written from dsv3-spec (sections 3, 4, 5, 6.2, 7, 11) and ops.h
with torch autograd for the gradients, not ported from src/ops. Random fp32 inputs are
generated here, the C ops run through the nm_ops_oracle driver (tests/ops/ops_oracle.c, built
into $NM_BUILD) once per backend (NM_BACKEND), and both results are compared. The reference
backend (src/ops/ref, double sums) is the one tests/test_backend_ops.c holds the others to, so
it is checked here against an oracle that shares none of its code.

Tolerances (set on the CPU backend; ref, which sums in double, stays well inside them). The
inputs are fp32 values, exact in float64, so the whole difference is the C ops' fp32 arithmetic: ~6e-8 per rounding, a few roundings deep plus fp32 sums over short
rows (the ops accumulate long reductions in double). Errors are measured as
max|c - ref| / max|ref| per tensor. Over 100 seeds (NM_OPS_SEED=1..100) the worst forward
output is 2.8e-7 (attention.out; fp32 GEMMs 2.6e-7) and the worst gradient 4.8e-7
(xent.dlogits; attention's 4.3e-7): gradients compound more fp32 steps (attention recomputes
p from an fp32-rounded lse, softmax backwards subtract near-equal terms). Forward outputs
within 2e-6 (7x that), gradients within 5e-6 (10x; both were 1e-5 and 1e-4); any formula
error shows up as O(1e-2) or more. Routing selections,
permutations and offsets must match exactly (random inputs make near-ties ~1e-6 unlikely).
NM_OPS_SEED overrides the seed.

Run: NM_BUILD=<build dir> python3 tests/reference/test_ops_torch.py
Exit 0 pass, 1 fail, 77 skip (torch missing).
"""
import atexit
import os
import struct
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    skip("torch not available: scripts/deps.sh --with-venv installs it")

FWD_TOL = 2e-6    # worst over 100 seeds: 2.8e-7
GRAD_TOL = 5e-6   # worst over 100 seeds: 4.8e-7
BACKENDS = ("cpu", "ref")
F64 = torch.float64
failures = []
report = {}

# --- container (format in tests/ops/ops_oracle.c) --------------------------------------------

DT = {torch.float32: 0, torch.int32: 1, torch.float64: 2}
DT_INV = {0: (torch.float32, 4), 1: (torch.int32, 4), 2: (torch.float64, 8)}


def write_set(path, tensors):
    with open(path, "wb") as f:
        f.write(b"NMOT" + struct.pack("<II", 1, len(tensors)))
        for name, t in tensors.items():
            t = t.contiguous().flatten()
            data = t.numpy().tobytes()
            nb = name.encode()
            f.write(struct.pack("<I", len(nb)) + nb + struct.pack("<IQ", DT[t.dtype], t.numel()) + data)


def read_set(path):
    buf = open(path, "rb").read()
    assert buf[:4] == b"NMOT"
    version, count = struct.unpack_from("<II", buf, 4)
    assert version == 1
    pos, out = 12, {}
    for _ in range(count):
        (n,) = struct.unpack_from("<I", buf, pos)
        name = buf[pos + 4 : pos + 4 + n].decode()
        pos += 4 + n
        dt, numel = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        dtype, size = DT_INV[dt]
        out[name] = torch.frombuffer(bytearray(buf[pos : pos + numel * size]), dtype=dtype).clone()
        pos += numel * size
    return out


def find_oracle():
    build = os.environ.get("NM_BUILD")
    if not build:
        root = os.environ.get("NM_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
        build = os.path.join(root, "build")
    exe = os.path.join(build, "nm_ops_oracle")
    if not os.path.exists(exe):
        print(f"FAIL: oracle driver {exe} not built (cmake --build the build directory first)")
        sys.exit(1)
    return exe


ORACLE = find_oracle()
TMP = tempfile.mkdtemp(prefix="nm_ops_torch_")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)  # nothing left in /tmp, pass or fail
backend = BACKENDS[0]  # the one run_c runs, set by main


def run_c(op, tensors):
    inp, outp = os.path.join(TMP, "in.bin"), os.path.join(TMP, "out.bin")
    write_set(inp, tensors)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["NM_BACKEND"] = backend
    r = subprocess.run([ORACLE, op, inp, outp], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"oracle {op} ({backend}) failed ({r.returncode}): {r.stderr}")
    return read_set(outp)


def compare(case, name, c, ref, tol):
    c = c.to(F64).flatten()
    ref = ref.detach().to(F64).flatten()
    assert c.numel() == ref.numel(), (case, name, c.numel(), ref.numel())
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (c - ref).abs().max().item() if ref.numel() else 0.0
    rel = err / scale if scale > 0 else err
    key = f"{backend}:{case}.{name}"
    report[key] = rel
    ok = rel <= tol and bool(torch.isfinite(c).all())
    print(f"  {key:40s} max_err/max_ref = {rel:.2e} (tol {tol:.0e}){'' if ok else '  FAIL'}")
    if not ok:
        failures.append(key)


def exact(case, name, c, ref):
    ok = torch.equal(c.to(torch.int64).flatten(), ref.to(torch.int64).flatten())
    print(f"  {case + '.' + name:40s} {'exact' if ok else 'MISMATCH'}")
    if not ok:
        failures.append(f"{backend}:{case}.{name}")


def exact_bits(case, name, c, ref):
    """fp32 values equal bit for bit (NaN payloads included)."""
    ok = torch.equal(c.to(torch.float32).flatten().view(torch.int32), ref.to(torch.float32).flatten().view(torch.int32))
    print(f"  {case + '.' + name:40s} {'exact' if ok else 'MISMATCH'}")
    if not ok:
        failures.append(f"{backend}:{case}.{name}")


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).contiguous()


def leaf(t):
    return t.to(F64).requires_grad_(True)


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def f32(*v):
    return torch.tensor(v, dtype=torch.float32)


# --- ops -------------------------------------------------------------------------------------


def check_gemm():
    for ta in (0, 1):
        for tb in (0, 1):
            for beta in (0.0, 0.5):
                M, N, K = 13, 9, 17
                ar, ac = (M, K) if not ta else (K, M)
                br, bc = (K, N) if not tb else (N, K)
                lda, ldb, ldc = ac + 2, bc + 3, N + 1
                A, B, C = randn(ar, lda), randn(br, ldb), randn(M, ldc)
                alpha = 1.5
                out = run_c("gemm", {"dims": i32(ta, tb, M, N, K, lda, ldb, ldc), "fopts": f32(alpha, beta),
                                     "A": A, "B": B, "C": C})
                opA = A[:, :ac].to(F64)
                opA = opA.T if ta else opA
                opB = B[:, :bc].to(F64)
                opB = opB.T if tb else opB
                ref = C.to(F64).clone()
                ref[:, :N] = alpha * opA @ opB + beta * ref[:, :N]
                compare(f"gemm[ta={ta},tb={tb},beta={beta}]", "C", out["C"], ref, FWD_TOL)


def check_embedding():
    N, D, V = 20, 8, 7
    tokens = torch.randint(0, V, (N,), dtype=torch.int32)
    emb, dout = randn(V, D), randn(N, D)
    out = run_c("embedding", {"dims": i32(N, D, V), "tokens": tokens, "emb": emb, "dout": dout})
    e = leaf(emb)
    y = e[tokens.long()]
    y.backward(dout.to(F64))
    compare("embedding", "out", out["out"], y, FWD_TOL)
    compare("embedding", "demb", out["demb"], e.grad, GRAD_TOL)


def check_rmsnorm():
    # the C op sums in 16 lanes: D = 64 fills them exactly, D = 7175 is V3's 7168 plus a tail
    for N, D, case in ((8, 64, "rmsnorm"), (4, 7175, "rmsnorm D=7175")):
        eps = 1e-6
        x, w, dout = randn(N, D, scale=2.0), randn(D), randn(N, D)
        out = run_c("rmsnorm", {"dims": i32(N, D), "fopts": f32(eps), "x": x, "w": w, "dout": dout})
        xl, wl = leaf(x), leaf(w)
        # eps as the fp32 value the C op receives
        rstd = torch.rsqrt(xl.pow(2).mean(-1, keepdim=True) + float(f32(eps)[0]))
        y = wl * (xl * rstd)
        y.backward(dout.to(F64))
        compare(case, "out", out["out"], y, FWD_TOL)
        compare(case, "rstd", out["rstd"], rstd, FWD_TOL)
        compare(case, "dx", out["dx"], xl.grad, GRAD_TOL)
        compare(case, "dw", out["dw"], wl.grad, GRAD_TOL)


def check_swiglu():
    N, Fd = 6, 40
    gu, dout = randn(N, 2 * Fd, scale=3.0), randn(N, Fd)
    out = run_c("swiglu", {"dims": i32(N, Fd), "gate_up": gu, "dout": dout})
    g = leaf(gu)
    y = F.silu(g[:, :Fd]) * g[:, Fd:]
    y.backward(dout.to(F64))
    compare("swiglu", "out", out["out"], y, FWD_TOL)
    compare("swiglu", "dgate_up", out["dgate_up"], g.grad, GRAD_TOL)


def check_rope():
    B, T, H, hd, off, Dr = 2, 5, 3, 12, 4, 8
    inv = 10000.0 ** (-torch.arange(0, Dr, 2, dtype=F64) / Dr)
    ang = torch.arange(T, dtype=F64)[:, None] * inv[None, :]            # (T, Dr/2)
    cos, sin = ang.cos().float(), ang.sin().float()
    x, dout = randn(B, T, H, hd), randn(B, T, H, hd)
    out = run_c("rope", {"dims": i32(B, T, H, hd, off, Dr), "x": x, "cos": cos, "sin": sin, "dout": dout})
    xl = leaf(x)
    # adjacent pairs (2i, 2i+1) as complex numbers times e^{i phi} (dsv3-spec 4.2, [OFF])
    pe = xl[..., off:off + Dr].reshape(B, T, H, Dr // 2, 2)
    rot = torch.view_as_real(torch.view_as_complex(pe.contiguous()) *
                             torch.complex(cos.to(F64), sin.to(F64))[None, :, None, :])
    y = torch.cat([xl[..., :off], rot.reshape(B, T, H, Dr), xl[..., off + Dr:]], dim=-1)
    y.backward(dout.to(F64))
    compare("rope", "y", out["y"], y, FWD_TOL)
    compare("rope", "dx", out["dx"], xl.grad, GRAD_TOL)


def check_attention():
    B, T, H, Dn, Dr, Dv = 2, 16, 3, 8, 4, 8
    scale = (Dn + Dr) ** -0.5
    q, kv, kpe = randn(B, T, H, Dn + Dr), randn(B, T, H, Dn + Dv), randn(B, T, Dr)
    dout = randn(B, T, H, Dv)
    out = run_c("attention", {"dims": i32(B, T, H, Dn, Dr, Dv), "fopts": f32(scale), "q": q, "kv": kv,
                              "k_pe": kpe, "dout": dout})
    ql, kvl, kpl = leaf(q), leaf(kv), leaf(kpe)
    # MLA (dsv3-spec 3.2 steps 7-9): K_h = [k_nope_h ; k_pe] with k_pe broadcast over heads
    k = torch.cat([kvl[..., :Dn], kpl[:, :, None, :].expand(B, T, H, Dr)], dim=-1)
    v = kvl[..., Dn:]
    s = torch.einsum("bihd,bjhd->bhij", ql, k) * float(f32(scale)[0])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                    # (B, H, T)
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, dim=-1), v)
    o.backward(dout.to(F64))
    compare("attention", "out", out["out"], o, FWD_TOL)
    compare("attention", "lse", out["lse"], lse, FWD_TOL)
    compare("attention", "dq", out["dq"], ql.grad, GRAD_TOL)
    compare("attention", "dkv", out["dkv"], kvl.grad, GRAD_TOL)
    compare("attention", "dk_pe", out["dk_pe"], kpl.grad, GRAD_TOL)


def check_xent():
    # the C op sums in 16 lanes over blocks of 1024: V = 50 has a lane tail, V = 2100 two full
    # blocks, a partial one and a tail
    for N, V, case in ((12, 50, "xent"), (5, 2100, "xent V=2100")):
        scale = 1.0 / (N - 1)
        logits = randn(N, V, scale=3.0)
        targets = torch.randint(0, V, (N,), dtype=torch.int32)
        targets[3] = -1
        out = run_c("xent", {"dims": i32(N, V), "fopts": f32(scale), "logits": logits, "targets": targets})
        lg = leaf(logits)
        valid = targets >= 0
        losses = torch.zeros(N, dtype=F64)
        losses = losses.masked_scatter(valid, F.cross_entropy(lg[valid], targets[valid].long(), reduction="none"))
        (losses.sum() * float(f32(scale)[0])).backward()
        compare(case, "losses", out["losses"], losses, FWD_TOL)
        # lse is only defined for rows with a target
        compare(case, "lse", out["lse"][valid], torch.logsumexp(lg[valid], -1), FWD_TOL)
        compare(case, "dlogits", out["dlogits"], lg.grad, GRAD_TOL)


def stable_topk(x, k):
    """Indices of the k largest along the last dim, descending, ties to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def ref_router(logits, bias, E, K, G, Gk, scoring, method, norm, rs):
    """HF DeepseekV3 routing (dsv3-spec 5) with -inf group masking (9.2), in float64."""
    s = torch.sigmoid(logits) if scoring == 0 else torch.softmax(logits, dim=-1)
    c = s.detach() + (bias.to(F64) if bias is not None else 0.0)
    if method != 1 and G > 1:                       # noaux_tc (0) / group_limited_greedy (2)
        cg = c.view(-1, G, E // G)
        gs = cg.topk(2, dim=-1).values.sum(-1) if method == 0 else cg.max(-1).values
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(1, stable_topk(gs, Gk), True)
        c = c.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    idx = stable_topk(c, K)
    w = s.gather(1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * rs, s


def check_router():
    cases = [  # name, N, E, K, G, Gk, scoring, method, norm, bias, routed_scaling
        ("sigmoid_noaux_tc", 32, 16, 4, 4, 2, 0, 0, 1, True, 2.5),
        ("sigmoid_group_limited", 32, 16, 4, 4, 2, 0, 2, 1, False, 1.0),
        ("softmax_greedy", 32, 16, 3, 1, 1, 1, 1, 0, False, 1.0),
        ("softmax_noaux_tc_bias", 24, 8, 2, 4, 2, 1, 0, 1, True, 1.5),
        # bias < -1 makes every biased score negative: masking dropped groups with 0 instead
        # of -inf (dsv3-spec 9.2) would select them
        ("sigmoid_noaux_tc_negbias", 32, 16, 4, 8, 3, 0, 0, 1, True, 2.5),
    ]
    for name, N, E, K, G, Gk, scoring, method, norm, has_bias, rs in cases:
        logits, dw = randn(N, E, scale=1.5), randn(N, K)
        bias = randn(E, scale=0.2) - (1.5 if name.endswith("negbias") else 0.0)
        out = run_c("router", {"dims": i32(N, E, K, G, Gk, scoring, method, norm, int(has_bias)),
                               "fopts": f32(rs), "logits": logits, "bias": bias, "dtopk_weight": dw})
        lg = leaf(logits)
        idx, w, s = ref_router(lg, bias if has_bias else None, E, K, G, Gk, scoring, method, norm, rs)
        w.backward(dw.to(F64))
        case = f"router[{name}]"
        exact(case, "topk_idx", out["topk_idx"], idx)
        compare(case, "scores", out["scores"], s, FWD_TOL)
        compare(case, "topk_weight", out["topk_weight"], w, FWD_TOL)
        compare(case, "dlogits", out["dlogits"], lg.grad, GRAD_TOL)


def check_balance():
    for scoring in (0, 1):
        B, T, E, K, dloss = 3, 10, 16, 4, 0.37
        logits = randn(B * T, E, scale=1.5)
        out = run_c("balance", {"dims": i32(B, T, E, K, scoring), "fopts": f32(dloss), "logits": logits})
        lg = leaf(logits)
        s = torch.sigmoid(lg) if scoring == 0 else torch.softmax(lg, dim=-1)
        # dsv3-spec 6.2 / 11: f from the plain top-K of s (constant), P from s / sum s
        sel = torch.zeros(B * T, E, dtype=F64).scatter(1, stable_topk(s.detach(), K), 1.0)
        f = E / (K * T) * sel.view(B, T, E).sum(1)
        P = (s / s.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        loss = (f * P).sum(-1).mean()
        (loss * float(f32(dloss)[0])).backward()
        case = f"balance[{'sigmoid' if scoring == 0 else 'softmax'}]"
        compare(case, "f", out["f"], f, FWD_TOL)
        compare(case, "loss", out["loss"], loss, FWD_TOL)
        compare(case, "dlogits", out["dlogits"], lg.grad, GRAD_TOL)


def check_moe():
    N, K, E, D = 10, 3, 6, 70
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)]).to(torch.int32)
    src, eo, tw = randn(N, D), randn(N * K, D), randn(N, K)
    y0, dy, ddst = randn(N, D), randn(N, D), randn(N * K, D)
    out = run_c("moe", {"dims": i32(N, K, E, D), "topk_idx": idx, "src": src, "expert_out": eo,
                        "topk_weight": tw, "y0": y0, "dy": dy, "ddst": ddst})
    # stable counting sort of the flat assignments n*K+k by expert
    perm = torch.sort(idx.flatten().long(), stable=True).indices
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(idx.flatten().long(), minlength=E).cumsum(0)])
    exact("moe", "perm", out["perm"], perm)
    exact("moe", "offsets", out["offsets"], offsets)
    token = perm // K
    compare("moe", "gathered", out["gathered"], src.to(F64)[token], FWD_TOL)
    # the bf16 gather: torch's own rounding to bfloat16 (nearest even), in both of its outputs
    rounded = src[token].to(torch.bfloat16).to(torch.float32)
    exact_bits("moe", "gathered_bf16", out["gathered_bf16"], rounded)
    exact_bits("moe", "gathered_bf16_copy", out["gathered_bf16_copy"], rounded)
    eol, twl = leaf(eo), leaf(tw)
    y = y0.to(F64).index_add(0, token, twl.flatten()[perm][:, None] * eol)
    y.backward(dy.to(F64))
    compare("moe", "y", out["y"], y, FWD_TOL)
    compare("moe", "dexpert_out", out["dexpert_out"], eol.grad, GRAD_TOL)
    compare("moe", "dtopk_weight", out["dtopk_weight"], twl.grad, GRAD_TOL)
    compare("moe", "dsrc", out["dsrc"], torch.zeros(N, D, dtype=F64).index_add(0, token, ddst.to(F64)), GRAD_TOL)


def main():
    global backend
    for backend in BACKENDS:
        print(f"=== backend {backend}")
        # the same inputs for every backend
        torch.manual_seed(int(os.environ.get("NM_OPS_SEED", "20240607")))
        for check in (check_gemm, check_embedding, check_rmsnorm, check_swiglu, check_rope, check_attention,
                      check_xent, check_router, check_balance, check_moe):
            print(check.__name__[6:])
            check()
    for b in BACKENDS:
        mine = {k: v for k, v in report.items() if k.startswith(b + ":")}
        worst = max(mine.items(), key=lambda kv: kv[1])
        print(f"{b}: {len(mine)} comparisons, worst {worst[0]} = {worst[1]:.2e}")
    if failures:
        print("FAILED: " + ", ".join(failures))
        return 1
    print("test_ops_torch: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
