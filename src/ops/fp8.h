// fp8.h: the E4M3 quantiser behind every backend's emulated fp8 GEMM (fp8.c; the CPU backend's
// src/ops/cpu/fp8.c, the reference backend's src/ops/ref/fp8.c), exposed so that tests can
// check its rounding and scale rules directly. The model reaches the GEMM through the ops
// table's gemm_fp8 (ops.h) and does not include this header.
//
// Format: OCP FP8 E4M3FN (OCP 8-bit Floating Point Specification v1.0, 2023): 1 sign bit,
// 4 exponent bits with bias 7, 3 mantissa bits; no infinities; S.1111.111 is the only NaN
// (per sign), so the largest finite value is 1.75 * 2^8 = 448; subnormals are m * 2^-9 for
// m = 1..7 (exponent field 0), below the smallest normal 2^-6.
//
// Scaling (DeepSeek-V3 recipe, dsv3-spec 6.5): every tile/block gets its own fp32 scale
// s = max(amax, 1e-4) / 448 from its current max |x| (online, no delayed scaling), the stored
// value is q = e4m3(x / s) and the value the GEMM sees is q * s (all three steps in fp32,
// as DeepSeek-V3's act_quant kernel and DeepGEMM's per_token_cast_to_fp8 do them).
#pragma once

#include <stdint.h>

#define NM_FP8_E4M3_MAX 448.0f   // largest finite E4M3FN value, 1.75 * 2^8
#define NM_FP8_AMAX_FLOOR 1e-4f  // DeepGEMM's clamp(1e-4): an all-zero tile gets a finite scale
#define NM_FP8_TILE 128          // tile/block edge of the recipe (the N_C = 128 promotion interval)

// How a tile's scale is formed.
typedef enum nm_fp8_scale_mode {
    NM_FP8_SCALE_FP32 = 0,  // s = max(amax, 1e-4) / 448 in fp32 (the default, DeepSeek-V3)
    NM_FP8_SCALE_UE8M0 = 1, // that s rounded UP to a power of two (DeepGEMM's ue8m0 scales):
                            // never overflows 448, costs up to one binade of resolution
} nm_fp8_scale_mode;

// x rounded to the nearest E4M3FN value, ties to the even code (even mantissa), saturating:
// |x| >= 448 (including +-inf) gives +-448, i.e. the value is clamped to [-448, 448] before
// rounding, as DeepSeek's kernels clamp before their cast (torch's float8_e4m3fn cast itself
// turns |x| >= 464 into NaN). NaN stays NaN; the sign of zero is kept.
float nm_fp8_e4m3_round(float x);

// The value of E4M3FN code `code` (0x7F and 0xFF are NaN, 0x80 is -0.0).
float nm_fp8_e4m3_decode(uint8_t code);

// The E4M3FN code of nm_fp8_e4m3_round(x) (NaN gives 0x7F with x's sign bit).
uint8_t nm_fp8_e4m3_encode(float x);

// The fp32 scale of a tile with max |x| = amax under `mode`. NaN amax gives NaN, +inf gives inf.
float nm_fp8_scale(float amax, nm_fp8_scale_mode mode);

// Quantise x(rows, cols) (row-major, leading dimension ldx) in blocks of br x bc elements
// (the last block row/column may be smaller): scales(ceil(rows/br), ceil(cols/bc)) (=) each
// block's scale, row-major; deq(rows, cols) (=) the dequantised values q * s, leading
// dimension ld_deq. deq may alias x when ld_deq == ldx. A block that holds a NaN or an inf
// gets a NaN or inf scale and comes out all NaN (0 * inf, inf / inf): a diverged value is
// never hidden, as with DeepSeek's amax-based kernels.
// (1, 128): activations per token per 128 channels; (128, 1): the same activation tiled along
// the other dimension (Wgrad); (128, 128): weights.
void nm_fp8_quantize_blocks(float *deq, int64_t ld_deq, float *scales, const float *x, int64_t ldx,
                            int64_t rows, int64_t cols, int64_t br, int64_t bc, nm_fp8_scale_mode mode);

// The activation case: 1 x 128 tiles along each row of x(rows, cols), scales(rows, ceil(cols/128)).
void nm_fp8_quantize_tiles(float *deq, int64_t ld_deq, float *scales, const float *x, int64_t ldx,
                           int64_t rows, int64_t cols, nm_fp8_scale_mode mode);
