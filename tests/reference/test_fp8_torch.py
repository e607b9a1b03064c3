"""Independent check of the E4M3 quantiser (src/ops/fp8.c).

The reference here is written from the OCP 8-bit Floating Point Specification (E4M3FN: bias 7,
3 mantissa bits, no infinities, S.1111.111 = NaN, max 448, subnormals m * 2^-9) with exact
rational arithmetic (fractions), not ported from the C: every finite E4M3 value is enumerated,
an input goes to the nearest one, ties to the even code, |x| >= 448 saturates (the recipe clamps
before the cast). The tile/block rule is the DeepSeek-V3 one (dsv3-spec 6.5): s = max(amax, 1e-4)
/ 448, q = e4m3(x / s), value q * s, each step rounded to float32 as the C does (a float64
result of one +,-,*,/ on float32 inputs rounds to the correctly rounded float32: 53 >= 2*24 + 2).

If torch has float8_e4m3fn (torch >= 2.1; Debian's 1.13 has not), the rounding is also compared
with torch.clamp(x, -448, 448).to(torch.float8_e4m3fn).

Values: every E4M3 value and its negation, every midpoint between neighbours and the float32s
either side of it, the float32 neighbours of every value, saturation and special values, and
20000 random float32s spread log-uniformly over 2^-16 .. 2^12. Everything must match bit for bit
(NaN: both NaN). The C side runs through nm_fp8_oracle (tests/fp8/fp8_oracle.c, in $NM_BUILD).

Run: NM_BUILD=<build dir> python3 tests/reference/test_fp8_torch.py
Exit 0 pass, 1 fail.
"""
import bisect
import math
import atexit
import os
import random
import struct
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip_part  # noqa: E402

# --- the OCP E4M3FN reference ------------------------------------------------------------------

def code_value(code):
    """Exact value of a non-NaN code (0..0x7E positive, 0x80..0xFE negative)."""
    s, e, m = code >> 7, (code >> 3) & 15, code & 7
    v = Fraction(m, 8) * Fraction(2) ** -6 if e == 0 else (1 + Fraction(m, 8)) * Fraction(2) ** (e - 7)
    return -v if s else v


POS = [code_value(c) for c in range(0x7F)]   # index == code; 0x7F is NaN
assert POS[-1] == 448 and POS[1] == Fraction(1, 512) and all(a < b for a, b in zip(POS, POS[1:]))


def e4m3_ref(x):
    """x (a Python float holding a float32) -> nearest E4M3FN value as a float."""
    if math.isnan(x):
        return x
    a = Fraction(abs(x)) if math.isfinite(x) else Fraction(10 ** 9)
    if a >= 448:
        r = Fraction(448)
    else:
        i = bisect.bisect_left(POS, a)        # POS[i-1] < a <= POS[i]
        if POS[i] == a:
            r = a
        else:
            lo, hi = POS[i - 1], POS[i]
            dlo, dhi = a - lo, hi - a
            # Ties go to the even code; the code of POS[k] is k.
            r = lo if dlo < dhi or (dlo == dhi and (i - 1) % 2 == 0) else hi
    return math.copysign(float(r), x)


def f32(x):
    """Round a float64 to float32 (nearest even) and back."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def from_bits(b):
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def next_up(x):
    b = f32_bits(x)
    if x == 0:
        return from_bits(1)                   # smallest positive subnormal, from either zero
    return from_bits(b + 1) if x > 0 else from_bits(b - 1)


def next_down(x):
    return -next_up(-x)


def block_ref(x, rows, cols, br, bc, mode):
    """DeepSeek-V3 block quantisation of x (row-major list) -> (deq, scales)."""
    nbr, nbc = -(-rows // br), -(-cols // bc)
    deq, scales = [0.0] * (rows * cols), []
    floor = f32(1e-4)
    for rb in range(nbr):
        for cb in range(nbc):
            idx = [r * cols + c for r in range(rb * br, min(rows, rb * br + br))
                   for c in range(cb * bc, min(cols, cb * bc + bc))]
            vals = [abs(x[i]) for i in idx]
            amax = math.nan if any(math.isnan(v) for v in vals) else max(vals)
            s = f32(max(amax, floor) / 448.0) if not math.isnan(amax) else math.nan
            if mode == 1 and math.isfinite(s):
                m, e = math.frexp(s)
                s = s if m == 0.5 else math.ldexp(1.0, e)
            scales.append(s)
            for i in idx:
                deq[i] = f32(e4m3_ref(f32(x[i] / s)) * s)
    return deq, scales


# --- the C side -------------------------------------------------------------------------------

def find_oracle():
    build = os.environ.get("NM_BUILD")
    if not build:
        root = os.environ.get("NM_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
        build = os.path.join(root, "build")
    exe = os.path.join(build, "nm_fp8_oracle")
    if not os.path.exists(exe):
        print(f"FAIL: oracle driver {exe} not built (cmake --build the build directory first)")
        sys.exit(1)
    return exe


ORACLE = find_oracle()
TMP = tempfile.mkdtemp(prefix="nm_fp8_")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)  # nothing left in /tmp, pass or fail


def write_f32(path, xs):
    with open(path, "wb") as f:
        f.write(struct.pack(f"<{len(xs)}f", *xs))


def read_f32(path):
    buf = open(path, "rb").read()
    return list(struct.unpack(f"<{len(buf) // 4}f", buf))


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or f32_bits(a) == f32_bits(b)


failures = []


def compare(name, got, want, inputs=None):
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if not same(g, w)]
    if len(got) != len(want):
        failures.append(f"{name}: {len(got)} values, want {len(want)}")
    elif bad:
        i = bad[0]
        at = f" at input {inputs[i]!r}" if inputs else f" at {i}"
        failures.append(f"{name}: {len(bad)} mismatches, first{at}: {got[i]!r} vs {want[i]!r}")
    print(f"{name}: {len(want)} values, {len(bad)} mismatches")


def main():
    rng = random.Random(int(os.environ.get("NM_FP8_SEED", "11")))
    # Edge values.
    xs = []
    for v in POS:
        fv = float(v)
        xs += [fv, -fv, next_up(fv), next_down(fv)]
    for a, b in zip(POS, POS[1:]):
        mid = float((a + b) / 2)               # <= 5 significant bits: exact in float32
        xs += [mid, -mid, next_up(mid), next_down(mid)]
    xs += [449.0, 463.99, 464.0, 480.0, 1e30, 3.4028234663852886e38, math.inf, -math.inf, math.nan,
           -0.0, 1e-40, -1e-40, 2.0 ** -10, 3 * 2.0 ** -10]
    # Random float32s, log-uniform magnitudes.
    for _ in range(20000):
        xs.append(f32(math.copysign(math.ldexp(1.0 + rng.random(), rng.randrange(-16, 12)),
                                    rng.random() - 0.5)))
    xs = [f32(x) for x in xs]
    want = [e4m3_ref(x) for x in xs]

    inp, out = os.path.join(TMP, "in.f32"), os.path.join(TMP, "out.f32")
    write_f32(inp, xs)
    subprocess.run([ORACLE, "round", inp, out], check=True)
    compare("round vs OCP reference", read_f32(out), want, xs)

    try:
        import torch
        have_fp8 = hasattr(torch, "float8_e4m3fn")
    except ImportError:
        have_fp8 = False
    if have_fp8:
        t = torch.tensor(xs, dtype=torch.float32)
        tw = torch.clamp(t, -448.0, 448.0).to(torch.float8_e4m3fn).float().tolist()
        compare("OCP reference vs torch float8_e4m3fn", want, tw, xs)
    else:
        skip_part("torch.float8_e4m3fn not available (torch >= 2.1; scripts/deps.sh --with-venv): torch "
                  "cross-check skipped, OCP reference only")

    # Tile/block rules: activations 1x128, column tiles 128x1, weights 128x128; edge shapes,
    # a zero tile, a tile below the amax floor, a NaN; fp32 and ue8m0 scales.
    rows, cols = 133, 260
    x = [f32(rng.gauss(0.0, 2.0)) for _ in range(rows * cols)]
    for c in range(128, 256):
        x[3 * cols + c] = 0.0
        x[4 * cols + c] = f32(x[4 * cols + c] * 1e-6)
    x[5 * cols + 7] = math.nan
    dq, sc = os.path.join(TMP, "deq.f32"), os.path.join(TMP, "scales.f32")
    write_f32(inp, x)
    for br, bc in ((1, 128), (128, 1), (128, 128)):
        for mode in (0, 1):
            subprocess.run([ORACLE, "blocks", str(rows), str(cols), str(br), str(bc), str(mode), inp, dq, sc],
                           check=True)
            deq_w, sc_w = block_ref(x, rows, cols, br, bc, mode)
            compare(f"blocks {br}x{bc} mode {mode} scales", read_f32(sc), sc_w)
            compare(f"blocks {br}x{bc} mode {mode} values", read_f32(dq), deq_w)

    if failures:
        for f in failures:
            print("FAIL:", f)
        return 1
    print("test_fp8_torch: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
