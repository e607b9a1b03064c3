// fuzz_tokenizer.c: libFuzzer target for the tokenizer.json loader (src/data/tokenizer.c).
//
// NM_FUZZ_VERBOSE=1 prints why an input was rejected (to check that seeds are accepted).
// Input: the tokenizer.json text, optionally followed by a NUL and a tokenizer_config.json
// (written next to it, so the eos_token rule is exercised too). The loader takes a path, so
// both go into one temporary directory per process. Whatever the bytes, loading must not
// crash, leak or hit UB; an accepted tokenizer must encode a fixed text and decode it back
// to the same bytes (tokenizer.h's promise for tokenizers without a prefix space is not
// assumed: only that decode accepts what encode gives).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/tokenizer.h"
#include "core/fileio.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256], tok_path[300], cfg_path[300];

static void cleanup(void) {
    unlink(tok_path);
    unlink(cfg_path);
    rmdir(dir);
}

static void put(const char *path, const uint8_t *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite(p, 1, n, fp) != n || fclose(fp) != 0) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        snprintf(dir, sizeof(dir), "%s/fuzz_tok.XXXXXX", tmp);
        if (!mkdtemp(dir)) abort();
        snprintf(tok_path, sizeof(tok_path), "%s/tokenizer.json", dir);
        snprintf(cfg_path, sizeof(cfg_path), "%s/tokenizer_config.json", dir);
        atexit(cleanup);
    }
    const uint8_t *nul = memchr(data, 0, size);
    size_t n_tok = nul ? (size_t)(nul - data) : size;
    put(tok_path, data, n_tok);
    if (nul) put(cfg_path, nul + 1, size - n_tok - 1);
    else unlink(cfg_path);
    nm_tokenizer *t;
    nm_error err;
    if (nm_tokenizer_load(&t, tok_path, &err) == 0) {
        static const char text[] = "Hello, world! <|endoftext|> caf\xc3\xa9 \xff\xfe 123  \n\tx";
        int32_t *ids;
        int64_t n_ids;
        if (nm_tokenizer_encode(t, text, sizeof(text) - 1, &ids, &n_ids, &err) == 0) {
            char *back;
            size_t len;
            if (nm_tokenizer_decode(t, ids, n_ids, &back, &len, &err) != 0) abort();   // encode's ids must decode
            nm_free(back);
            nm_free(ids);
        }
        (void)nm_tokenizer_vocab_size(t);
        (void)nm_tokenizer_eod(t);
        nm_tokenizer_free(t);
    } else if (getenv("NM_FUZZ_VERBOSE")) {
        fprintf(stderr, "rejected: %s\n", err.msg);
    }
    return 0;
}
