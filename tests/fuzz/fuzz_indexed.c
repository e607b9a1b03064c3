// fuzz_indexed.c: libFuzzer target for the Megatron .idx parser (src/data/indexed.c).
//
// Input: 2 bytes (LE) giving the .bin size, then the .idx bytes. The .bin is a buffer of
// that size, so the fuzzer can make an index consistent with it. Whatever the bytes, opening
// must not crash or read out of bounds (AddressSanitizer + UBSan), and an accepted index
// must read every sequence and document index in bounds.
//
// Built and run by tests/fuzz/tests.cmake with clang -fsanitize=fuzzer,address,undefined.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "data/indexed.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    size_t bin_size = (size_t)data[0] | ((size_t)data[1] << 8);
    // Exact-size heap copies, so ASan catches a read one byte past either buffer.
    uint8_t *idx = malloc(size - 2 ? size - 2 : 1);
    memcpy(idx, data + 2, size - 2);
    uint8_t *bin = malloc(bin_size ? bin_size : 1);
    for (size_t i = 0; i < bin_size; i++) bin[i] = (uint8_t)(i * 131u + 7u);
    nm_indexed *ds;
    nm_error err;
    if (nm_indexed_open_memory(&ds, "fuzz", idx, size - 2, bin, bin_size, 0, &err) == 0) {
        int32_t *buf = malloc(sizeof(int32_t) * (size_t)(ds->max_len > 0 ? ds->max_len : 1));
        for (int64_t i = 0; i < ds->n_seqs; i++) {
            int32_t n = nm_indexed_seq_len(ds, i);
            if (nm_indexed_read(ds, i, 0, n, buf, &err) != 0) break;   // int64 token out of int32 range
        }
        for (int64_t d = 0; d <= ds->n_docs; d++) (void)nm_indexed_doc_index(ds, d);
        free(buf);
        nm_indexed_close(ds);
    }
    free(idx);
    free(bin);
    return 0;
}
