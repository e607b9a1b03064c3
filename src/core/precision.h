// precision.h: the compute precision of a run (design.md 5). Master weights, optimizer
// state, norms, router, softmax and losses are fp32 in every mode; the mode decides only
// what the linear layers' GEMMs consume.
#pragma once

typedef enum nm_precision {
    NM_PRECISION_FP32 = 0,      // reference
    NM_PRECISION_BF16 = 1,      // GEMM operands rounded to bf16, fp32 accumulation (AMX via oneDNN)
    NM_PRECISION_FP8 = 2,       // DeepSeek-V3 FP8 recipe, emulated (E4M3, 1x128 tiles, 128x128 blocks)
} nm_precision;
