// flops.c: implementation of flops.h. Counts come from the config's shapes (dsv3-spec 2), the
// same shapes params.c lays out; test_params checks the two agree.
#include "model/flops.h"

// Attention weights of one decoder block (MLA), norms excluded.
static int64_t attn_matmul(const nm_model_config *c) {
    int64_t q = c->Rq > 0 ? c->Rq * c->D + c->H * c->Dqk * c->Rq : c->H * c->Dqk * c->D;
    return q + (c->Rkv + c->Dr) * c->D + c->H * (c->Dn + c->Dv) * c->Rkv + c->D * c->H * c->Dv;
}

// Norm weights of one decoder block: input, post-attention and the latent norms.
static int64_t block_norms(const nm_model_config *c) { return 2 * c->D + c->Rkv + (c->Rq > 0 ? c->Rq : 0); }

// FFN weights a token passes through in layer l (router matrix included, bias not).
static int64_t ffn_matmul_active(const nm_model_config *c, int64_t l) {
    if (!nm_layer_is_moe(c, l)) return 3 * c->F * c->D;
    return c->E * c->D + 3 * c->Fs * c->D + c->K * 3 * c->Fe * c->D;
}

int64_t nm_model_params_active(const nm_model_config *c) {
    int64_t n = c->V * c->D + c->D;                 // lm_head (the embedding is a lookup) + final norm
    for (int64_t l = 0; l < c->L; l++) {
        n += attn_matmul(c) + block_norms(c) + ffn_matmul_active(c, l);
        if (nm_layer_is_moe(c, l)) n += c->E;       // router bias
    }
    return n;
}

int64_t nm_model_matmul_params_active(const nm_model_config *c) {
    int64_t n = c->V * c->D * (1 + c->M);            // head: main + one use per MTP depth
    for (int64_t l = 0; l < c->n_layers; l++) {
        n += attn_matmul(c) + ffn_matmul_active(c, l);
        if (nm_layer_is_mtp(c, l)) n += c->D * 2 * c->D;  // eh_proj
    }
    return n;
}

double nm_model_flops_per_token(const nm_model_config *c, int64_t T) {
    double dense = 6.0 * (double)nm_model_matmul_params_active(c);
    double attn = 6.0 * (double)c->H * (double)(c->Dqk + c->Dv) * ((double)T / 2.0) * (double)c->n_layers;
    return dense + attn;
}

double nm_model_layer_flops_per_token(const nm_model_config *c, int64_t l, int64_t T) {
    int64_t w = attn_matmul(c) + ffn_matmul_active(c, l) + (nm_layer_is_mtp(c, l) ? c->D * 2 * c->D : 0);
    return 6.0 * (double)w + 6.0 * (double)c->H * (double)(c->Dqk + c->Dv) * ((double)T / 2.0);
}

double nm_model_head_flops_per_token(const nm_model_config *c) { return 6.0 * (double)c->V * (double)c->D; }
