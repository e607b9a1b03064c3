// fp8_decode.c: E4M3 (float8_e4m3fn) code -> float, exact. Its own file because checkpoint
// loading (src/io/hf_dir.c, DeepSeek's FP8 release) needs it without the emulated FP8 GEMM.
#include <math.h>
#include <stdint.h>

#include "ops/fp8.h"

float nm_fp8_e4m3_decode(uint8_t code) {
    int e = (code >> 3) & 15, m = code & 7;
    float v;
    if (e == 15 && m == 7) {
        v = NAN;                               // E4M3FN: the only NaN pattern, no infinities
    } else if (e == 0) {
        v = ldexpf((float)m, -9);              // subnormal m * 2^-9 (m = 0: zero)
    } else {
        v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
    }
    return (code & 0x80) ? -v : v;
}
