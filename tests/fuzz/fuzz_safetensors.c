// fuzz_safetensors.c: libFuzzer target for the safetensors reader (src/io/safetensors.c).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: a whole .safetensors file. The reader takes a path (it mmaps), so each input is
// written to one temporary file per process. Whatever the bytes, opening must not crash, leak
// or read out of bounds; an accepted file must find every tensor by name and convert every
// fp32-convertible tensor.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char tmp_path[256];
static volatile uint8_t sink;

static void cleanup(void) { unlink(tmp_path); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tmp_path[0]) {
        const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        snprintf(tmp_path, sizeof(tmp_path), "%s/fuzz_st.XXXXXX", dir);
        int fd = mkstemp(tmp_path);
        if (fd < 0) abort();
        close(fd);
        atexit(cleanup);
    }
    FILE *fp = fopen(tmp_path, "wb");
    if (!fp || fwrite(data, 1, size, fp) != size || fclose(fp) != 0) abort();
    nm_safetensors *st;
    nm_error err;
    if (nm_safetensors_open(&st, tmp_path, &err) == 0) {
        for (int i = 0; i < nm_safetensors_count(st); i++) {
            if (nm_safetensors_find(st, nm_safetensors_name(st, i)) != i) abort();
            int64_t shape[NM_ST_MAX_DIMS];
            char sb[256];
            int nd = nm_safetensors_shape(st, i, shape);
            (void)nm_shape_str(sb, sizeof(sb), nd, shape);
            size_t nbytes;
            const uint8_t *p = nm_safetensors_data(st, i, &nbytes);
            if (nbytes) sink ^= p[0] ^ p[nbytes - 1];   // the range must lie inside the mapping
            int64_t numel = nm_safetensors_numel(st, i);
            if (nm_safetensors_dtype(st, i) != NM_ST_OTHER && numel <= (1 << 20)) {
                float *dst = malloc(sizeof(float) * (size_t)(numel ? numel : 1));
                (void)nm_safetensors_read_f32(st, i, dst, numel, &err);
                free(dst);
            }
        }
        nm_safetensors_close(st);
    } else if (getenv("NM_FUZZ_VERBOSE")) {
        fprintf(stderr, "rejected: %s\n", err.msg);
    }
    return 0;
}
