// fuzz_hf.h: fixtures shared by the targets that fuzz how a Hugging Face model directory is
// read (src/io/hf_dir.c): fuzz_hf_index, fuzz_quant_config and fuzz_fp8_block. Each target
// includes it once (static inline functions: not every target uses every one).
//
// The model is FUZZ_HF_CONFIG, one dense decoder layer without MTP: 15 tensors of at most
// 32 x 32, so a whole load is microseconds and the fuzzer spends its time in the reader.
// seeds.py (TINY_SHAPES) lists the same names and shapes for the seeds it writes: change both.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/hf_dir.h"
#include "model/config.h"
#include "model/params.h"
#include "ops/fp8.h"

static const char FUZZ_HF_CONFIG[] =
    "{\"vocab_size\": 32, \"hidden_size\": 16, \"intermediate_size\": 32, \"moe_intermediate_size\": 8,"
    " \"num_hidden_layers\": 1, \"num_nextn_predict_layers\": 0, \"num_attention_heads\": 2,"
    " \"num_key_value_heads\": 2, \"q_lora_rank\": 8, \"kv_lora_rank\": 8, \"qk_nope_head_dim\": 4,"
    " \"qk_rope_head_dim\": 4, \"v_head_dim\": 4, \"n_routed_experts\": 4, \"n_shared_experts\": 1,"
    " \"num_experts_per_tok\": 2, \"n_group\": 1, \"topk_group\": 1, \"first_k_dense_replace\": 1,"
    " \"moe_layer_freq\": 1, \"rope_scaling\": null, \"max_position_embeddings\": 64,"
    " \"tie_word_embeddings\": false, \"initializer_range\": 0.02}";

// The model of FUZZ_HF_CONFIG and its parameter table; aborts if they do not build (a broken
// fixture, not a finding about the input).
static inline void fuzz_hf_model(nm_model_config *cfg, nm_param_table *t) {
    nm_error err;
    if (nm_model_config_parse(cfg, FUZZ_HF_CONFIG, "fuzz_hf.h", &err) || nm_param_table_build(t, cfg, &err)) {
        fprintf(stderr, "fuzz_hf.h: fixture model: %s\n", err.msg);
        abort();
    }
}

static inline void fuzz_hf_write(const char *dir, const char *name, const void *data, size_t size) {
    char p[512];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *fp = fopen(p, "wb");
    if (!fp || fwrite(data, 1, size, fp) != size || fclose(fp) != 0) {
        fprintf(stderr, "fuzz_hf.h: cannot write %s\n", p);
        abort();
    }
}

// A temporary directory under TMPDIR (run_fuzz_target.sh points it into its own scratch
// directory, which it removes with everything in it).
static inline void fuzz_hf_mkdtemp(char *dir, size_t n, const char *tag) {
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(dir, n, "%s/%s.XXXXXX", tmp, tag);
    if (!mkdtemp(dir)) abort();
}

// Removes the named files of dir, then dir (at exit).
static inline void fuzz_hf_rmdir(const char *dir, const char *const *names, int n) {
    char p[512];
    for (int i = 0; i < n; i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

// --- a safetensors writer for any dtype (the library's writes only F32 / BF16 / F16) ---------

typedef struct fuzz_st {
    char hdr[16384];
    size_t hlen;
    uint8_t data[65536];
    size_t dlen;
} fuzz_st;

static inline void fuzz_st_add(fuzz_st *s, const char *name, const char *dtype, int ndim, const int64_t *shape,
                        const void *bytes, size_t nbytes) {
    if (s->dlen + nbytes > sizeof(s->data) || s->hlen + 300 > sizeof(s->hdr)) abort();
    s->hlen += (size_t)snprintf(s->hdr + s->hlen, sizeof(s->hdr) - s->hlen, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[",
                                s->hlen ? "," : "", name, dtype);
    for (int d = 0; d < ndim; d++) {
        s->hlen += (size_t)snprintf(s->hdr + s->hlen, sizeof(s->hdr) - s->hlen, "%s%lld", d ? "," : "",
                                    (long long)shape[d]);
    }
    s->hlen += (size_t)snprintf(s->hdr + s->hlen, sizeof(s->hdr) - s->hlen, "],\"data_offsets\":[%zu,%zu]}", s->dlen,
                                s->dlen + nbytes);
    memcpy(s->data + s->dlen, bytes, nbytes);
    s->dlen += nbytes;
}

static inline void fuzz_st_write(const fuzz_st *s, const char *dir, const char *name) {
    char hdr[16400];
    int n = snprintf(hdr, sizeof(hdr), "{%.*s}", (int)s->hlen, s->hdr);
    while (n % 8) hdr[n++] = ' ';
    size_t total = 8 + (size_t)n + s->dlen;
    uint8_t *buf = malloc(total);
    uint64_t len = (uint64_t)n;
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(len >> (8 * i));   // little-endian header length
    memcpy(buf + 8, hdr, (size_t)n);
    memcpy(buf + 8 + n, s->data, s->dlen);
    fuzz_hf_write(dir, name, buf, total);
    free(buf);
}

// Row r of t as a tensor of s: F32 values, or (fp8) F8_E4M3 codes with its '<name>_scale_inv'
// of (ceil(O/bo), ceil(I/bi)) F32 scales, into `scales` (s itself when NULL: a scale may live
// in another shard, as nothing in the format forbids).
static inline void fuzz_st_add_row(fuzz_st *s, fuzz_st *scales, const nm_param_table *t, int r, int fp8, int64_t bo,
                            int64_t bi) {
    const nm_tensor_spec *row = &t->rows[r];
    static uint8_t buf[32768];
    if (row->numel * 4 > (int64_t)sizeof(buf)) abort();
    if (fp8 && row->ndim == 2) {
        for (int64_t i = 0; i < row->numel; i++) buf[i] = (uint8_t)((i * 37 + r) % 0x7e);   // never NaN (0x7f)
        fuzz_st_add(s, row->name, "F8_E4M3", 2, row->shape, buf, (size_t)row->numel);
        int64_t sh[2] = {(row->shape[0] + bo - 1) / bo, (row->shape[1] + bi - 1) / bi};
        float *f = (float *)(void *)buf;
        for (int64_t i = 0; i < sh[0] * sh[1]; i++) f[i] = 0.25f + 0.125f * (float)(i % 5);
        char sname[160];
        snprintf(sname, sizeof(sname), "%s_scale_inv", row->name);
        fuzz_st_add(scales ? scales : s, sname, "F32", 2, sh, buf, (size_t)(sh[0] * sh[1]) * 4);
        return;
    }
    float *f = (float *)(void *)buf;
    for (int64_t i = 0; i < row->numel; i++) f[i] = (float)((i + r) % 13 - 6) / 8.0f;
    fuzz_st_add(s, row->name, "F32", row->ndim, row->shape, buf, (size_t)row->numel * 4);
}
