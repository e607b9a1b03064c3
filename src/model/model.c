// model.c: the DeepSeek-V3 model, forward and backward, written once against nm_ops.
//
// Implements dsv3-spec §3 (model, MLA, MLP), §5 (MoE routing), §6.2 (balance loss), §6.3 and
// §11 (multi-token prediction and the exact loss definitions), and the backward of §7.
// Everything is fp32; buffers come from one arena allocated by nm_model_create, so the
// forward and backward passes never allocate.
//
// Not here: the optimizer and the bias update (src/train/), file I/O (src/io/), kernels
// (src/ops/). The model reads only small host-side integer metadata (token ids, expert
// offsets) directly; every float buffer is touched through the ops table.
#include "model/model.h"

#include <math.h>
#include <string.h>

// --- activations ----------------------------------------------------------------------------

// One decoder block's saved activations. N = B*T tokens of this block (MTP block k runs on
// T-k positions). All sized for N_max = B_max * T_max.
typedef struct block_acts {
    float *x_in;                // (N, D) block input (the embedding, the previous block's x_out, or eh_proj output)
    float *a;                   // (N, D) input_layernorm output
    float *a_rstd;              // (N)
    float *cq;                  // (N, Rq) q_a_proj output            (q-LoRA only)
    float *cq_n;                // (N, Rq) q_a_layernorm output        (q-LoRA only)
    float *cq_rstd;             // (N)                                 (q-LoRA only)
    float *q;                   // (N, H, Dqk) queries, rope part rotated in place
    float *ckv;                 // (N, Rkv) compressed kv latent
    float *ckv_n;               // (N, Rkv) kv_a_layernorm output
    float *ckv_rstd;            // (N)
    float *k_pe;                // (N, Dr) shared rope key, rotated in place
    float *kv;                  // (N, H, Dn+Dv) per head [k_nope | v]
    float *att;                 // (N, H*Dv) attention output, heads concatenated
    float *lse;                 // (B, H, T) log-sum-exp per query
    float *x_mid;               // (N, D) residual after attention
    float *f;                   // (N, D) post_attention_layernorm output
    float *f_rstd;              // (N)
    float *x_out;               // (N, D) block output
    // dense MLP
    float *gate_up;             // (N, 2F)
    float *act;                 // (N, F)
    // MoE
    float *router_logits;       // (N, E)
    float *scores;              // (N, E) sigmoid/softmax affinities
    int32_t *topk_idx;          // (N, K)
    float *topk_w;              // (N, K) gate weights (normalised, scaled)
    int32_t *perm;              // (N*K) flat assignment index of each expert-sorted row
    int32_t *offsets;           // (E+1) first row of each expert
    float *x_perm;              // (N*K, D) f gathered into expert order
    float *e_gate_up;           // (N*K, 2Fe)
    float *e_act;               // (N*K, Fe)
    float *e_out;               // (N*K, D)
    float *s_gate_up;           // (N, 2Fs) shared experts
    float *s_act;               // (N, Fs)
    float *bal_f;               // (B, E) balance-loss f_i per sequence
    int64_t B, T;               // shape of the last forward through this block
} block_acts;

// MTP depth k's extra activations (block L+k-1 holds the decoder-layer part).
typedef struct mtp_acts {
    int32_t *tokens_in;         // (B, T-k) tokens[:, i+k]
    int32_t *targets;           // (B, T-k) tokens[:, i+k+1], -1 where absent
    float *h_prev;              // (N, D) previous depth's hidden, first T-k positions
    float *emb;                 // (N, D)
    float *emb_n;               // (N, D) enorm output
    float *emb_rstd;            // (N)
    float *h_n;                 // (N, D) hnorm output
    float *h_rstd;              // (N)
    float *g;                   // (N, D) shared_head.norm output
    float *g_rstd;              // (N)
    float *logits;              // (N, vt) head tile (all of V when vt == V), then dlogits
    float *losses;              // (N)
    float *lse;                 // (N) logsumexp of each logits row, saved for xent_backward
    float *dh;                  // (N, D) gradient into this depth's block output h^k
} mtp_acts;

struct nm_model {
    nm_model_config cfg;        // copy (json_text/source_path borrowed from the caller's config)
    const nm_ops *ops;
    nm_param_table table;
    float *params;              // (table.n_floats)
    float *grads;               // (table.n_floats)
    nm_precision precision;     // of the linear layers' GEMMs
    uint16_t *params_bf16;      // (table.n_floats) bf16 copy of params (bf16 / fp8 modes), else NULL
    int params_changed;         // params may differ from params_bf16
    int64_t B_max, T_max;
    int recompute;              // keep only block inputs/outputs; re-run each block's forward in backward

    float *arena;               // every activation buffer below points into it
    size_t arena_floats;
    size_t arena_used;          // bump pointer while laying out

    float *rope_cos, *rope_sin; // (T_max, Dr/2)
    block_acts *blocks;         // (n_layers)
    mtp_acts *mtp;              // (M)
    int32_t *targets;           // (B, T) main targets, -1 at the last position
    float *emb_out;             // (N, D) main embedding output = blocks[0].x_in
    float *h0;                  // (N, D) model.norm output
    float *h0_rstd;             // (N)
    float *logits;              // (N, vt) main head tile (all of V when vt == V), then dlogits
    float *losses;              // (N)
    float *lse;                 // (N) logsumexp of each logits row, saved for xent_backward
    int64_t vt;                 // output-head vocabulary tile (V: logits stored whole)
    double *head_stats;         // (N, 3) running max / exp-sum / target logit across tiles

    // backward scratch, shared by all blocks (sized for N_max)
    float *d_res;               // (N, D) gradient of the residual stream
    float *d_h0;                // (N, D)
    float *d_a, *d_f;           // (N, D)
    float *d_cq_n, *d_cq;       // (N, Rq)
    float *d_q;                 // (N, H*Dqk)
    float *d_ckv_n, *d_ckv;     // (N, Rkv)
    float *d_k_pe;              // (N, Dr)
    float *d_kv;                // (N, H*(Dn+Dv))
    float *d_att;               // (N, H*Dv)
    float *att_scratch;         // (B, H, T, Dr)
    float *d_gate_up;           // (N, 2*max(F, Fs))
    float *d_act;               // (N, max(F, Fs))
    float *d_router;            // (N, E)
    float *d_topk_w;            // (N, K)
    float *d_e_out;             // (N*K, D)
    float *d_e_act;             // (N*K, Fe)
    float *d_e_gate_up;         // (N*K, 2Fe)
    float *d_x_perm;            // (N*K, D)
    float *d_emb;               // (N, D) MTP embedding-path scratch
    float *d_tmp;               // (N, D)

    // last forward
    int64_t B, T;
    int32_t *tokens;            // (B_max, T_max) copy of the input tokens
    nm_loss_options opt;
    int have_forward;

    nm_gemm_group *groups;      // (E) scratch for the experts' grouped GEMMs

    // router statistics
    int n_moe;
    int *moe_layer_ids;         // (n_moe)
    int64_t *expert_counts;     // (n_moe, E)
};

// --- arena layout -----------------------------------------------------------------------------

// Two passes over the same layout code: the first (arena == NULL) only counts, the second
// hands out aligned slices. Keeps every size in one place.
static float *take(nm_model *m, size_t n) {
    size_t aligned = (n + 15) & ~(size_t)15;  // 64-byte alignment for every buffer
    float *p = m->arena ? m->arena + m->arena_used : NULL;
    m->arena_used += aligned;
    return p;
}

static int32_t *take_i32(nm_model *m, size_t n) { return (int32_t *)take(m, n); }

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

// Every buffer of a block between its input and its output.
static void take_block_intermediates(nm_model *m, block_acts *b, int dense, int moe) {
    const nm_model_config *c = &m->cfg;
    size_t N = (size_t)(m->B_max * m->T_max);
    size_t D = c->D, NK = N * (size_t)c->K;
    b->a = take(m, N * D);
    b->a_rstd = take(m, N);
    if (c->Rq > 0) {
        b->cq = take(m, N * c->Rq);
        b->cq_n = take(m, N * c->Rq);
        b->cq_rstd = take(m, N);
    }
    b->q = take(m, N * c->H * c->Dqk);
    b->ckv = take(m, N * c->Rkv);
    b->ckv_n = take(m, N * c->Rkv);
    b->ckv_rstd = take(m, N);
    b->k_pe = take(m, N * c->Dr);
    b->kv = take(m, N * c->H * (c->Dn + c->Dv));
    b->att = take(m, N * c->H * c->Dv);
    b->lse = take(m, N * c->H);
    b->x_mid = take(m, N * D);
    b->f = take(m, N * D);
    b->f_rstd = take(m, N);
    if (dense) {
        b->gate_up = take(m, N * 2 * c->F);
        b->act = take(m, N * c->F);
    }
    if (moe && c->E > 0) {
        b->router_logits = take(m, N * c->E);
        b->scores = take(m, N * c->E);
        b->topk_idx = take_i32(m, NK);
        b->topk_w = take(m, NK);
        b->perm = take_i32(m, NK);
        b->offsets = take_i32(m, c->E + 1);
        b->x_perm = take(m, NK * D);
        b->e_gate_up = take(m, NK * 2 * c->Fe);
        b->e_act = take(m, NK * c->Fe);
        b->e_out = take(m, NK * D);
        if (c->Fs > 0) {
            b->s_gate_up = take(m, N * 2 * c->Fs);
            b->s_act = take(m, N * c->Fs);
        }
        b->bal_f = take(m, m->B_max * c->E);
    }
}

static void layout(nm_model *m) {
    const nm_model_config *c = &m->cfg;
    size_t N = (size_t)(m->B_max * m->T_max);
    size_t D = c->D, NK = N * (size_t)c->K;
    m->arena_used = 0;
    m->rope_cos = take(m, (size_t)m->T_max * c->Dr / 2);
    m->rope_sin = take(m, (size_t)m->T_max * c->Dr / 2);
    // With recomputation only each block's input and output are kept; everything in between
    // lives in one shared set (dense and MoE buffers both), rebuilt by re-running a block's
    // forward right before its backward.
    block_acts shared = {0};
    if (m->recompute) take_block_intermediates(m, &shared, 1, 1);
    for (int64_t l = 0; l < c->n_layers; l++) {
        block_acts *b = &m->blocks[l];
        int moe = nm_layer_is_moe(c, l);
        if (m->recompute) *b = shared;
        else take_block_intermediates(m, b, !moe, moe);
        b->x_in = (l == 0 || nm_layer_is_mtp(c, l)) ? take(m, N * D) : NULL;  // else aliases
        b->x_out = take(m, N * D);
    }
    for (int64_t l = 1; l < c->L; l++) m->blocks[l].x_in = m->blocks[l - 1].x_out;
    m->emb_out = m->blocks[0].x_in;
    for (int64_t k = 0; k < c->M; k++) {
        mtp_acts *t = &m->mtp[k];
        t->tokens_in = take_i32(m, N);
        t->targets = take_i32(m, N);
        t->h_prev = take(m, N * D);
        t->emb = take(m, N * D);
        t->emb_n = take(m, N * D);
        t->emb_rstd = take(m, N);
        t->h_n = take(m, N * D);
        t->h_rstd = take(m, N);
        t->g = take(m, N * D);
        t->g_rstd = take(m, N);
        t->logits = take(m, N * (size_t)m->vt);
        t->losses = take(m, N);
        t->lse = take(m, N);
        t->dh = take(m, N * D);
    }
    m->targets = take_i32(m, N);
    m->tokens = take_i32(m, N);
    m->h0 = take(m, N * D);
    m->h0_rstd = take(m, N);
    m->logits = take(m, N * (size_t)m->vt);
    m->losses = take(m, N);
    m->lse = take(m, N);
    m->head_stats = (double *)take(m, 6 * N);  // 3 doubles per row (the arena is 64-byte aligned)

    size_t Fmax = max_sz((size_t)c->F, (size_t)c->Fs);
    m->d_res = take(m, N * D);
    m->d_h0 = take(m, N * D);
    m->d_a = take(m, N * D);
    m->d_f = take(m, N * D);
    if (c->Rq > 0) {
        m->d_cq_n = take(m, N * c->Rq);
        m->d_cq = take(m, N * c->Rq);
    }
    m->d_q = take(m, N * c->H * c->Dqk);
    m->d_ckv_n = take(m, N * c->Rkv);
    m->d_ckv = take(m, N * c->Rkv);
    m->d_k_pe = take(m, N * c->Dr);
    m->d_kv = take(m, N * c->H * (c->Dn + c->Dv));
    m->d_att = take(m, N * c->H * c->Dv);
    m->att_scratch = take(m, N * c->H * c->Dr);
    m->d_gate_up = take(m, N * 2 * Fmax);
    m->d_act = take(m, N * Fmax);
    if (c->E > 0) {
        m->d_router = take(m, N * c->E);
        m->d_topk_w = take(m, NK);
        m->d_e_out = take(m, NK * D);
        m->d_e_act = take(m, NK * c->Fe);
        m->d_e_gate_up = take(m, NK * 2 * c->Fe);
        m->d_x_perm = take(m, NK * D);
    }
    m->d_emb = take(m, N * D);
    m->d_tmp = take(m, N * D);
}

// --- create / destroy ---------------------------------------------------------------------

static void rope_tables(nm_model *m) {
    const nm_model_config *c = &m->cfg;
    int64_t half = c->Dr / 2;
    double inv_freq[512];
    NM_CHECK(half <= 512, "qk_rope_head_dim %lld too large", (long long)c->Dr);
    nm_rope_inv_freq(c, inv_freq);
    for (int64_t t = 0; t < m->T_max; t++) {
        for (int64_t i = 0; i < half; i++) {
            // Angles in double: HF forms them in fp32, which at position 4096 is already off by
            // ~4e-4 rad; the tables are built once, so accuracy costs nothing. The YaRN
            // attention factor multiplies both (dsv3-spec 4.3).
            double angle = (double)t * inv_freq[i];
            m->rope_cos[t * half + i] = (float)(cos(angle) * c->rope_attn_factor);
            m->rope_sin[t * half + i] = (float)(sin(angle) * c->rope_attn_factor);
        }
    }
}

// Output-head vocabulary tile: the whole vocabulary while the (N, V) logits fit in 64 MiB
// (every config here up to V = 4096 at N = 2056), else the widest multiple of 128 columns
// that fits (fp8 weight blocks are 128 rows; at V = 129280, N = 8 x 4097: 384 columns).
static int64_t pick_vocab_tile(const nm_model_config *c, int64_t N, int64_t requested) {
    if (requested > 0) return requested < c->V ? requested : c->V;
    const int64_t budget = (int64_t)16 << 20;  // floats
    if (N * c->V <= budget) return c->V;
    int64_t vt = budget / N / 128 * 128;
    return vt < 128 ? 128 : vt;
}

int nm_model_create(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max,
                    int64_t T_max, nm_error *err) {
    nm_model_options o = {0};
    return nm_model_create_ex(out, cfg, ops, B_max, T_max, &o, err);
}

int nm_model_create_ex(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max,
                       int64_t T_max, const nm_model_options *opts, nm_error *err) {
    *out = NULL;
    if (B_max < 1 || T_max < 2) return nm_error_set(err, "model: batch %lld x seq %lld: need batch >= 1 and seq >= 2", (long long)B_max, (long long)T_max);
    if (T_max < cfg->M + 2) return nm_error_set(err, "model: sequence length %lld too short for %lld MTP depths (needs >= %lld)", (long long)T_max, (long long)cfg->M, (long long)(cfg->M + 2));
    if ((int64_t)B_max * T_max * (cfg->K > 0 ? cfg->K : 1) >= INT32_MAX) return nm_error_set(err, "model: batch*seq*top_k = %lld exceeds int32 routing indices", (long long)(B_max * T_max * cfg->K));
    nm_model *m = nm_calloc(1, sizeof(nm_model));
    m->cfg = *cfg;
    m->ops = ops;
    m->B_max = B_max;
    m->T_max = T_max;
    m->recompute = opts->recompute;
    if (opts->vocab_tile < 0) return nm_error_set(err, "model: vocab_tile %lld < 0", (long long)opts->vocab_tile);
    m->vt = pick_vocab_tile(cfg, B_max * T_max, opts->vocab_tile);
    if (nm_param_table_build(&m->table, cfg, err) != 0) {
        nm_free(m);
        return -1;
    }
    m->params = nm_aligned_alloc(m->table.n_floats * sizeof(float));
    m->grads = nm_aligned_alloc(m->table.n_floats * sizeof(float));
    m->blocks = nm_calloc((size_t)cfg->n_layers, sizeof(block_acts));
    m->mtp = nm_calloc(cfg->M > 0 ? (size_t)cfg->M : 1, sizeof(mtp_acts));
    layout(m);  // counting pass
    m->arena_floats = m->arena_used;
    m->arena = nm_aligned_alloc(m->arena_floats * sizeof(float));
    layout(m);  // assigning pass
    NM_CHECK(m->arena_used == m->arena_floats, "arena layout mismatch");
    rope_tables(m);

    m->moe_layer_ids = nm_calloc((size_t)cfg->n_layers + 1, sizeof(int));
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        if (nm_layer_is_moe(cfg, l)) m->moe_layer_ids[m->n_moe++] = (int)l;
    }
    m->groups = nm_calloc((size_t)(cfg->E > 0 ? cfg->E : 1), sizeof(nm_gemm_group));
    m->expert_counts = nm_calloc((size_t)(m->n_moe > 0 ? m->n_moe : 1) * (size_t)(cfg->E > 0 ? cfg->E : 1), sizeof(int64_t));
    *out = m;
    return 0;
}

void nm_model_destroy(nm_model *m) {
    if (!m) return;
    nm_param_table_free(&m->table);
    nm_free(m->params);
    nm_free(m->grads);
    nm_free(m->params_bf16);
    nm_free(m->arena);
    nm_free(m->blocks);
    nm_free(m->mtp);
    nm_free(m->moe_layer_ids);
    nm_free(m->groups);
    nm_free(m->expert_counts);
    nm_free(m);
}

float *nm_model_params(nm_model *m) {
    m->params_changed = 1;
    return m->params;
}

int nm_model_set_precision(nm_model *m, nm_precision p, nm_error *err) {
    if (p != NM_PRECISION_FP32 && (!m->ops->gemm_bf16 || !m->ops->cast_bf16 || (p == NM_PRECISION_FP8 && !m->ops->gemm_fp8))) {
        return nm_error_set(err, "precision %s: this backend has no %s GEMM", p == NM_PRECISION_FP8 ? "fp8" : "bf16",
                            p == NM_PRECISION_FP8 ? "fp8" : "bf16");
    }
    m->precision = p;
    if (p != NM_PRECISION_FP32 && !m->params_bf16) {
        m->params_bf16 = nm_aligned_alloc(m->table.n_floats * sizeof(uint16_t));
    }
    m->params_changed = 1;
    return 0;
}
float *nm_model_grads(nm_model *m) { return m->grads; }
int nm_model_supports_expert_parallel(void) { return 0; }
const nm_param_table *nm_model_table(const nm_model *m) { return &m->table; }
const nm_model_config *nm_model_cfg(const nm_model *m) { return &m->cfg; }
size_t nm_model_activation_bytes(const nm_model *m) { return m->arena_floats * sizeof(float); }

size_t nm_model_estimate_activation_bytes(const nm_model_config *cfg, int64_t B_max, int64_t T_max, int recompute) {
    nm_model m = {.cfg = *cfg, .B_max = B_max, .T_max = T_max, .recompute = recompute,
                  .vt = pick_vocab_tile(cfg, B_max * T_max, 0)};
    m.blocks = nm_calloc((size_t)cfg->n_layers, sizeof(block_acts));
    m.mtp = nm_calloc(cfg->M > 0 ? (size_t)cfg->M : 1, sizeof(mtp_acts));
    layout(&m);  // counting pass only (no arena)
    nm_free(m.blocks);
    nm_free(m.mtp);
    return m.arena_used * sizeof(float);
}
void nm_model_zero_grads(nm_model *m) { m->ops->zero(m->grads, (int64_t)m->table.n_floats); }

const int64_t *nm_model_expert_counts(const nm_model *m, int *n_moe_layers, const int **layer_ids) {
    if (n_moe_layers) *n_moe_layers = m->n_moe;
    if (layer_ids) *layer_ids = m->moe_layer_ids;
    return m->expert_counts;
}

// --- linear helpers (y = x W^T with PyTorch [out, in] weights) --------------------------------

// The precision a weight's GEMMs run in. The router always stays fp32 (dsv3-spec 9.10); in
// the fp8 recipe the output head stays bf16 (dsv3-spec 6.5: embedding, head, gating, norms
// and attention are kept out of FP8).
static nm_precision weight_precision(const nm_model *m, size_t off) {
    if (m->precision == NM_PRECISION_FP32) return NM_PRECISION_FP32;
    for (int i = 0; i < m->n_moe; i++) {
        if (off == m->table.layers[m->moe_layer_ids[i]].router) return NM_PRECISION_FP32;
    }
    // the head's rows [lm_head, lm_head + V*D): vocabulary tiles pass slices of it
    if (m->precision == NM_PRECISION_FP8 && off >= m->table.lm_head &&
        off < m->table.lm_head + (size_t)m->cfg.V * (size_t)m->cfg.D)
        return NM_PRECISION_BF16;
    return m->precision;
}

// out(N, OC) (= or += by beta) inp(N, IC) . W(OC, IC)^T, with leading dimensions.
static void linear_fwd(const nm_model *m, float *out, int64_t ld_out, const float *inp, int64_t ld_inp,
                       const float *W, int64_t ldw, int64_t N, int64_t IC, int64_t OC, float beta) {
    size_t off = (size_t)(W - m->params);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16:
        m->ops->gemm_bf16(NM_NO_TRANS, NM_TRANS, N, OC, IC, 1.0f, inp, NM_F32, ld_inp, m->params_bf16 + off, NM_BF16,
                          ldw, beta, out, ld_out);
        break;
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(NM_NO_TRANS, NM_TRANS, N, OC, IC, 1.0f, inp, ld_inp, W, ldw, NM_FP8_WEIGHT, beta, out, ld_out);
        break;
    default:
        m->ops->gemm(NM_NO_TRANS, NM_TRANS, N, OC, IC, 1.0f, inp, ld_inp, W, ldw, beta, out, ld_out);
    }
}

// dinp(N, IC) (= or += by beta) dout(N, OC) . W(OC, IC)      (Dgrad)
static void linear_bwd_inp(const nm_model *m, float *dinp, int64_t ld_dinp, const float *dout, int64_t ld_dout,
                           const float *W, int64_t ldw, int64_t N, int64_t IC, int64_t OC, float beta) {
    size_t off = (size_t)(W - m->params);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16:
        m->ops->gemm_bf16(NM_NO_TRANS, NM_NO_TRANS, N, IC, OC, 1.0f, dout, NM_F32, ld_dout, m->params_bf16 + off,
                          NM_BF16, ldw, beta, dinp, ld_dinp);
        break;
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(NM_NO_TRANS, NM_NO_TRANS, N, IC, OC, 1.0f, dout, ld_dout, W, ldw, NM_FP8_WEIGHT, beta, dinp, ld_dinp);
        break;
    default:
        m->ops->gemm(NM_NO_TRANS, NM_NO_TRANS, N, IC, OC, 1.0f, dout, ld_dout, W, ldw, beta, dinp, ld_dinp);
    }
}

// dW(OC, IC) += dout(N, OC)^T . inp(N, IC)      (Wgrad: both operands are activations)
static void linear_bwd_w(const nm_model *m, float *dW, int64_t ldw, const float *dout, int64_t ld_dout,
                         const float *inp, int64_t ld_inp, int64_t N, int64_t IC, int64_t OC) {
    size_t off = (size_t)(dW - m->grads);
    switch (weight_precision(m, off)) {
    case NM_PRECISION_BF16:
        m->ops->gemm_bf16(NM_TRANS, NM_NO_TRANS, OC, IC, N, 1.0f, dout, NM_F32, ld_dout, inp, NM_F32, ld_inp, 1.0f, dW, ldw);
        break;
    case NM_PRECISION_FP8:
        m->ops->gemm_fp8(NM_TRANS, NM_NO_TRANS, OC, IC, N, 1.0f, dout, ld_dout, inp, ld_inp, NM_FP8_ACTIVATION, 1.0f, dW, ldw);
        break;
    default:
        m->ops->gemm(NM_TRANS, NM_NO_TRANS, OC, IC, N, 1.0f, dout, ld_dout, inp, ld_inp, 1.0f, dW, ldw);
    }
}

// --- output head + cross-entropy, over vocabulary tiles ---------------------------------------

// losses(N), lse(N) (=) of logits = h(N, D) . lm_head^T against targets(N). logits is the
// head's (N, vt) buffer; with vt == V it keeps the whole logits for head_backward, else each
// tile is computed, folded into the running max / exp-sum (xent_tile_forward) and dropped.
// logits_out (N, V) receives every tile when not NULL.
static void head_forward(nm_model *m, float *losses, float *lse, float *logits, const float *h,
                         const int32_t *targets, int64_t N, float *logits_out) {
    const nm_ops *ops = m->ops;
    int64_t V = m->cfg.V, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    if (vt == V) {
        linear_fwd(m, logits, V, h, D, W, D, N, D, V, 0.0f);
        if (logits_out) memcpy(logits_out, logits, (size_t)N * V * sizeof(float));
        ops->xent_forward(losses, lse, logits, targets, N, V);
        return;
    }
    for (int64_t v0 = 0; v0 < V; v0 += vt) {
        int64_t n_cols = v0 + vt < V ? vt : V - v0;
        linear_fwd(m, logits, n_cols, h, D, W + v0 * D, D, N, D, n_cols, 0.0f);
        if (logits_out) ops->copy_2d(logits_out + v0, V, logits, n_cols, N, n_cols);
        ops->xent_tile_forward(losses, lse, m->head_stats, logits, n_cols, targets, N, V, v0, n_cols);
    }
}

// dh(N, D) (= or += by beta) and d lm_head (+=) for the loss scale * sum of losses; h and lse as
// in head_forward. With vt < V each tile's logits are recomputed (one more head GEMM: the
// price of never storing (N, V)).
static void head_backward(nm_model *m, float *dh, float beta, float *logits, const float *lse, const float *h,
                          const int32_t *targets, float scale, int64_t N) {
    const nm_ops *ops = m->ops;
    int64_t V = m->cfg.V, D = m->cfg.D, vt = m->vt;
    const float *W = m->params + m->table.lm_head;
    float *dW = m->grads + m->table.lm_head;
    if (vt == V) {
        ops->xent_backward(logits, logits, lse, targets, scale, N, V);
        linear_bwd_w(m, dW, D, logits, V, h, D, N, D, V);
        linear_bwd_inp(m, dh, D, logits, V, W, D, N, D, V, beta);
        return;
    }
    for (int64_t v0 = 0; v0 < V; v0 += vt) {
        int64_t n_cols = v0 + vt < V ? vt : V - v0;
        linear_fwd(m, logits, n_cols, h, D, W + v0 * D, D, N, D, n_cols, 0.0f);
        ops->xent_tile_backward(logits, n_cols, logits, n_cols, lse, targets, scale, N, V, v0, n_cols);
        linear_bwd_w(m, dW + v0 * D, D, logits, n_cols, h, D, N, D, n_cols);
        linear_bwd_inp(m, dh, D, logits, n_cols, W + v0 * D, D, N, D, n_cols, v0 == 0 ? beta : 1.0f);
    }
}

static nm_router_params router_params(const nm_model_config *c, int64_t N) {
    nm_router_params p = {
        .N = N, .E = c->E, .K = c->K, .G = c->G, .Gk = c->Gk, .scoring = c->scoring,
        .method = c->topk_method, .norm_topk_prob = c->norm_topk_prob,
        .routed_scaling = (float)c->routed_scaling,
    };
    return p;
}

// --- routed experts ---------------------------------------------------------------------------

// Grouped-GEMM descriptors, one per expert e over its rows [offsets[e], offsets[e+1]).
// Forward / Dgrad shape: C_e(rows, N) = op(A_e(rows, K)) op(W_e), W_e = W + e * w_stride.
static void groups_rows(nm_model *m, const block_acts *b, int64_t N, int64_t K, const float *A, int64_t lda,
                        const float *W, size_t w_stride, int64_t ldw, float *C, int64_t ldc) {
    for (int64_t e = 0; e < m->cfg.E; e++) {
        int64_t r0 = b->offsets[e];
        m->groups[e] = (nm_gemm_group){.M = b->offsets[e + 1] - r0, .N = N, .K = K, .A = A + r0 * lda, .lda = lda,
                                       .B = W + (size_t)e * w_stride, .ldb = ldw, .C = C + r0 * ldc, .ldc = ldc};
    }
}

// Wgrad shape: dW_e(M, N) += A_e(rows, M)^T B_e(rows, N), a reduction over the expert's rows.
static void groups_wgrad(nm_model *m, const block_acts *b, int64_t M, int64_t N, const float *A, int64_t lda,
                         const float *B, int64_t ldb, float *dW, size_t w_stride, int64_t ldw) {
    for (int64_t e = 0; e < m->cfg.E; e++) {
        int64_t r0 = b->offsets[e];
        m->groups[e] = (nm_gemm_group){.M = M, .N = N, .K = b->offsets[e + 1] - r0, .A = A + r0 * lda, .lda = lda,
                                       .B = B + r0 * ldb, .ldb = ldb, .C = dW + (size_t)e * w_stride, .ldc = ldw};
    }
}

// e_gate_up = x_perm . W_gate_up^T ; e_act = swiglu(e_gate_up) ; e_out = e_act . W_down^T,
// per expert over its rows. fp32 runs the experts as grouped GEMMs (concurrently); bf16 and
// fp8 go expert by expert through the precision-aware linear helpers.
static void experts_forward(nm_model *m, block_acts *b, const nm_layer_offsets *w) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    int64_t E = c->E, D = c->D, Fe = c->Fe, rows = b->offsets[E];
    size_t stride = w->expert_stride, down = (size_t)2 * Fe * D;
    const float *W0 = m->params + w->experts;
    if (m->precision == NM_PRECISION_FP32) {
        groups_rows(m, b, 2 * Fe, D, b->x_perm, D, W0, stride, D, b->e_gate_up, 2 * Fe);
        ops->gemm_grouped(NM_NO_TRANS, NM_TRANS, 1.0f, 0.0f, m->groups, E);
        ops->swiglu_forward(b->e_act, b->e_gate_up, rows, Fe);
        groups_rows(m, b, D, Fe, b->e_act, Fe, W0 + down, stride, Fe, b->e_out, D);
        ops->gemm_grouped(NM_NO_TRANS, NM_TRANS, 1.0f, 0.0f, m->groups, E);
        return;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = b->offsets[e], n = b->offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;  // [gate; up] (2Fe, D), then down (D, Fe)
        linear_fwd(m, b->e_gate_up + r0 * 2 * Fe, 2 * Fe, b->x_perm + r0 * D, D, We, D, n, D, 2 * Fe, 0.0f);
    }
    ops->swiglu_forward(b->e_act, b->e_gate_up, rows, Fe);
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = b->offsets[e], n = b->offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;
        linear_fwd(m, b->e_out + r0 * D, D, b->e_act + r0 * Fe, Fe, We + down, Fe, n, Fe, D, 0.0f);
    }
}

// Backward of experts_forward: from d_e_out to d_x_perm (=) and the experts' weight grads (+=).
static void experts_backward(nm_model *m, block_acts *b, const nm_layer_offsets *w) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    int64_t E = c->E, D = c->D, Fe = c->Fe, rows = b->offsets[E];
    size_t stride = w->expert_stride, down = (size_t)2 * Fe * D;
    const float *W0 = m->params + w->experts;
    float *dW0 = m->grads + w->experts;
    if (m->precision == NM_PRECISION_FP32) {
        // e_out = e_act . W_down^T: d_e_act = d_e_out . W_down ; dW_down += d_e_out^T e_act
        groups_rows(m, b, Fe, D, m->d_e_out, D, W0 + down, stride, Fe, m->d_e_act, Fe);
        ops->gemm_grouped(NM_NO_TRANS, NM_NO_TRANS, 1.0f, 0.0f, m->groups, E);
        groups_wgrad(m, b, D, Fe, m->d_e_out, D, b->e_act, Fe, dW0 + down, stride, Fe);
        ops->gemm_grouped(NM_TRANS, NM_NO_TRANS, 1.0f, 1.0f, m->groups, E);
        ops->swiglu_backward(m->d_e_gate_up, m->d_e_act, b->e_gate_up, rows, Fe);
        // e_gate_up = x_perm . W_gate_up^T: dW_gate_up += d_e_gate_up^T x_perm ; d_x_perm = d_e_gate_up . W_gate_up
        groups_wgrad(m, b, 2 * Fe, D, m->d_e_gate_up, 2 * Fe, b->x_perm, D, dW0, stride, D);
        ops->gemm_grouped(NM_TRANS, NM_NO_TRANS, 1.0f, 1.0f, m->groups, E);
        groups_rows(m, b, D, 2 * Fe, m->d_e_gate_up, 2 * Fe, W0, stride, D, m->d_x_perm, D);
        ops->gemm_grouped(NM_NO_TRANS, NM_NO_TRANS, 1.0f, 0.0f, m->groups, E);
        return;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = b->offsets[e], n = b->offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;
        float *dWe = dW0 + (size_t)e * stride;
        linear_bwd_inp(m, m->d_e_act + r0 * Fe, Fe, m->d_e_out + r0 * D, D, We + down, Fe, n, Fe, D, 0.0f);
        linear_bwd_w(m, dWe + down, Fe, m->d_e_out + r0 * D, D, b->e_act + r0 * Fe, Fe, n, Fe, D);
    }
    ops->swiglu_backward(m->d_e_gate_up, m->d_e_act, b->e_gate_up, rows, Fe);
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = b->offsets[e], n = b->offsets[e + 1] - r0;
        if (n == 0) continue;
        const float *We = W0 + (size_t)e * stride;
        float *dWe = dW0 + (size_t)e * stride;
        linear_bwd_w(m, dWe, D, m->d_e_gate_up + r0 * 2 * Fe, 2 * Fe, b->x_perm + r0 * D, D, n, D, 2 * Fe);
        linear_bwd_inp(m, m->d_x_perm + r0 * D, D, m->d_e_gate_up + r0 * 2 * Fe, 2 * Fe, We, D, n, D, 2 * Fe, 0.0f);
    }
}

// --- one decoder block: forward ---------------------------------------------------------------

// Runs block l on b->x_in (B, T); writes b->x_out. Returns the block's balance loss (0 for
// dense blocks) and adds its expert counts to counts (E, may be NULL) when it is a MoE block.
static double block_forward(nm_model *m, int64_t l, int64_t B, int64_t T, int64_t *counts) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *P = m->params;
    block_acts *b = &m->blocks[l];
    int64_t N = B * T, D = c->D, H = c->H;
    int64_t Dkv = c->Dn + c->Dv;
    float eps = (float)c->rms_eps;
    b->B = B;
    b->T = T;

    // MLA (dsv3-spec 3.2)
    ops->rmsnorm_forward(b->a, b->a_rstd, b->x_in, P + w->input_norm, N, D, eps);
    if (c->Rq > 0) {
        linear_fwd(m, b->cq, c->Rq, b->a, D, P + w->q_a, D, N, D, c->Rq, 0.0f);
        ops->rmsnorm_forward(b->cq_n, b->cq_rstd, b->cq, P + w->q_a_norm, N, c->Rq, eps);
        linear_fwd(m, b->q, H * c->Dqk, b->cq_n, c->Rq, P + w->q_b, c->Rq, N, c->Rq, H * c->Dqk, 0.0f);
    } else {
        linear_fwd(m, b->q, H * c->Dqk, b->a, D, P + w->q, D, N, D, H * c->Dqk, 0.0f);
    }
    // kv_a_proj_with_mqa rows [0, Rkv) give the latent, rows [Rkv, Rkv+Dr) the shared rope key.
    linear_fwd(m, b->ckv, c->Rkv, b->a, D, P + w->kv_a, D, N, D, c->Rkv, 0.0f);
    linear_fwd(m, b->k_pe, c->Dr, b->a, D, P + w->kv_a + (size_t)c->Rkv * D, D, N, D, c->Dr, 0.0f);
    ops->rmsnorm_forward(b->ckv_n, b->ckv_rstd, b->ckv, P + w->kv_a_norm, N, c->Rkv, eps);
    linear_fwd(m, b->kv, H * Dkv, b->ckv_n, c->Rkv, P + w->kv_b, c->Rkv, N, c->Rkv, H * Dkv, 0.0f);
    ops->rope_forward(b->q, m->rope_cos, m->rope_sin, B, T, H, c->Dqk, c->Dn, c->Dr);
    ops->rope_forward(b->k_pe, m->rope_cos, m->rope_sin, B, T, 1, c->Dr, 0, c->Dr);
    ops->attention_forward(b->att, b->lse, b->q, b->kv, b->k_pe, B, T, H, c->Dn, c->Dr, c->Dv,
                           (float)c->softmax_scale);
    ops->copy_2d(b->x_mid, N * D, b->x_in, N * D, 1, N * D);
    linear_fwd(m, b->x_mid, D, b->att, H * c->Dv, P + w->o, H * c->Dv, N, H * c->Dv, D, 1.0f);

    // FFN
    ops->rmsnorm_forward(b->f, b->f_rstd, b->x_mid, P + w->post_norm, N, D, eps);
    ops->copy_2d(b->x_out, N * D, b->x_mid, N * D, 1, N * D);
    if (!nm_layer_is_moe(c, l)) {
        linear_fwd(m, b->gate_up, 2 * c->F, b->f, D, P + w->mlp_gate_up, D, N, D, 2 * c->F, 0.0f);
        ops->swiglu_forward(b->act, b->gate_up, N, c->F);
        linear_fwd(m, b->x_out, D, b->act, c->F, P + w->mlp_down, c->F, N, c->F, D, 1.0f);
        return 0.0;
    }

    // MoE (dsv3-spec 5): route, run each expert on its rows, combine with the gate weights.
    int64_t E = c->E, K = c->K;
    nm_router_params rp = router_params(c, N);
    linear_fwd(m, b->router_logits, E, b->f, D, P + w->router, D, N, D, E, 0.0f);
    ops->router_forward(b->topk_idx, b->topk_w, b->scores, b->router_logits, P + w->router_bias, &rp);
    double bal = ops->balance_loss_forward(b->bal_f, b->scores, B, T, E, K);
    ops->moe_permute(b->offsets, b->perm, b->topk_idx, N, K, E);
    if (counts) {
        for (int64_t e = 0; e < E; e++) counts[e] += b->offsets[e + 1] - b->offsets[e];
    }
    ops->moe_gather(b->x_perm, b->f, b->perm, N, K, D);
    experts_forward(m, b, w);
    ops->moe_combine_forward(b->x_out, b->e_out, b->topk_w, b->perm, N, K, D);
    if (c->Fs > 0) {
        linear_fwd(m, b->s_gate_up, 2 * c->Fs, b->f, D, P + w->shared_gate_up, D, N, D, 2 * c->Fs, 0.0f);
        ops->swiglu_forward(b->s_act, b->s_gate_up, N, c->Fs);
        linear_fwd(m, b->x_out, D, b->s_act, c->Fs, P + w->shared_down, c->Fs, N, c->Fs, D, 1.0f);
    }
    return bal;
}

// --- one decoder block: backward --------------------------------------------------------------

// On entry m->d_res (N, D) holds dLoss/d(x_out); on exit it holds dLoss/d(x_in).
// aux_seed is dLoss/d(balance loss of this block). With recomputation the block's
// intermediates are rebuilt first (same inputs, same deterministic ops: same values).
static void block_backward(nm_model *m, int64_t l, float aux_seed) {
    if (m->recompute) block_forward(m, l, m->blocks[l].B, m->blocks[l].T, NULL);
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const nm_layer_offsets *w = &m->table.layers[l];
    const float *P = m->params;
    float *G = m->grads;
    block_acts *b = &m->blocks[l];
    int64_t B = b->B, T = b->T, N = B * T, D = c->D, H = c->H;
    int64_t Dkv = c->Dn + c->Dv;
    float *d_res = m->d_res;

    // FFN.  forward: x_out = x_mid + FFN(f), f = RMSNorm(x_mid)
    if (!nm_layer_is_moe(c, l)) {
        // x_out += act . W_down^T ; act = swiglu(gate_up) ; gate_up = f . W_gate_up^T
        linear_bwd_inp(m, m->d_act, c->F, d_res, D, P + w->mlp_down, c->F, N, c->F, D, 0.0f);
        linear_bwd_w(m, G + w->mlp_down, c->F, d_res, D, b->act, c->F, N, c->F, D);
        ops->swiglu_backward(m->d_gate_up, m->d_act, b->gate_up, N, c->F);
        linear_bwd_w(m, G + w->mlp_gate_up, D, m->d_gate_up, 2 * c->F, b->f, D, N, D, 2 * c->F);
        linear_bwd_inp(m, m->d_f, D, m->d_gate_up, 2 * c->F, P + w->mlp_gate_up, D, N, D, 2 * c->F, 0.0f);
    } else {
        int64_t E = c->E, K = c->K;
        nm_router_params rp = router_params(c, N);
        ops->zero(m->d_f, N * D);
        if (c->Fs > 0) {
            linear_bwd_inp(m, m->d_act, c->Fs, d_res, D, P + w->shared_down, c->Fs, N, c->Fs, D, 0.0f);
            linear_bwd_w(m, G + w->shared_down, c->Fs, d_res, D, b->s_act, c->Fs, N, c->Fs, D);
            ops->swiglu_backward(m->d_gate_up, m->d_act, b->s_gate_up, N, c->Fs);
            linear_bwd_w(m, G + w->shared_gate_up, D, m->d_gate_up, 2 * c->Fs, b->f, D, N, D, 2 * c->Fs);
            linear_bwd_inp(m, m->d_f, D, m->d_gate_up, 2 * c->Fs, P + w->shared_gate_up, D, N, D, 2 * c->Fs, 1.0f);
        }
        // x_out += sum_k w_k * e_out[row(n,k)]
        ops->moe_combine_backward(m->d_e_out, m->d_topk_w, d_res, b->e_out, b->topk_w, b->perm, N, K, D);
        experts_backward(m, b, w);
        // x_perm = gather(f)
        ops->moe_scatter_add(m->d_f, m->d_x_perm, b->perm, N, K, D);
        // gate weights <- scores <- router logits = f . W_router^T (bias: selection only, no gradient)
        ops->router_backward(m->d_router, m->d_topk_w, b->scores, b->topk_idx, &rp);
        if (aux_seed != 0.0f) {
            ops->balance_loss_backward(m->d_router, aux_seed, b->bal_f, b->scores, B, T, E, K, c->scoring);
        }
        linear_bwd_w(m, G + w->router, D, m->d_router, E, b->f, D, N, D, E);
        linear_bwd_inp(m, m->d_f, D, m->d_router, E, P + w->router, D, N, D, E, 1.0f);
    }
    // f = RMSNorm(x_mid); the residual path already carries d_res into x_mid.
    ops->rmsnorm_backward(d_res, G + w->post_norm, m->d_f, b->x_mid, P + w->post_norm, b->f_rstd, N, D);

    // MLA.  forward: x_mid = x_in + att . W_o^T
    linear_bwd_inp(m, m->d_att, H * c->Dv, d_res, D, P + w->o, H * c->Dv, N, H * c->Dv, D, 0.0f);
    linear_bwd_w(m, G + w->o, H * c->Dv, d_res, D, b->att, H * c->Dv, N, H * c->Dv, D);
    ops->attention_backward(m->d_q, m->d_kv, m->d_k_pe, m->att_scratch, m->d_att, b->q, b->kv, b->k_pe,
                            b->att, b->lse, B, T, H, c->Dn, c->Dr, c->Dv, (float)c->softmax_scale);
    ops->rope_backward(m->d_q, m->rope_cos, m->rope_sin, B, T, H, c->Dqk, c->Dn, c->Dr);
    ops->rope_backward(m->d_k_pe, m->rope_cos, m->rope_sin, B, T, 1, c->Dr, 0, c->Dr);
    // kv = ckv_n . W_kv_b^T ; ckv_n = RMSNorm(ckv)
    linear_bwd_w(m, G + w->kv_b, c->Rkv, m->d_kv, H * Dkv, b->ckv_n, c->Rkv, N, c->Rkv, H * Dkv);
    linear_bwd_inp(m, m->d_ckv_n, c->Rkv, m->d_kv, H * Dkv, P + w->kv_b, c->Rkv, N, c->Rkv, H * Dkv, 0.0f);
    ops->zero(m->d_ckv, N * c->Rkv);
    ops->rmsnorm_backward(m->d_ckv, G + w->kv_a_norm, m->d_ckv_n, b->ckv, P + w->kv_a_norm, b->ckv_rstd, N, c->Rkv);
    // [ckv | k_pe] = a . W_kv_a^T: the rope key bypasses the latent norm
    size_t kv_a_pe = w->kv_a + (size_t)c->Rkv * D;
    linear_bwd_w(m, G + w->kv_a, D, m->d_ckv, c->Rkv, b->a, D, N, D, c->Rkv);
    linear_bwd_w(m, G + kv_a_pe, D, m->d_k_pe, c->Dr, b->a, D, N, D, c->Dr);
    linear_bwd_inp(m, m->d_a, D, m->d_ckv, c->Rkv, P + w->kv_a, D, N, D, c->Rkv, 0.0f);
    linear_bwd_inp(m, m->d_a, D, m->d_k_pe, c->Dr, P + kv_a_pe, D, N, D, c->Dr, 1.0f);
    if (c->Rq > 0) {
        // q = cq_n . W_q_b^T ; cq_n = RMSNorm(cq) ; cq = a . W_q_a^T
        linear_bwd_w(m, G + w->q_b, c->Rq, m->d_q, H * c->Dqk, b->cq_n, c->Rq, N, c->Rq, H * c->Dqk);
        linear_bwd_inp(m, m->d_cq_n, c->Rq, m->d_q, H * c->Dqk, P + w->q_b, c->Rq, N, c->Rq, H * c->Dqk, 0.0f);
        ops->zero(m->d_cq, N * c->Rq);
        ops->rmsnorm_backward(m->d_cq, G + w->q_a_norm, m->d_cq_n, b->cq, P + w->q_a_norm, b->cq_rstd, N, c->Rq);
        linear_bwd_w(m, G + w->q_a, D, m->d_cq, c->Rq, b->a, D, N, D, c->Rq);
        linear_bwd_inp(m, m->d_a, D, m->d_cq, c->Rq, P + w->q_a, D, N, D, c->Rq, 1.0f);
    } else {
        linear_bwd_w(m, G + w->q, D, m->d_q, H * c->Dqk, b->a, D, N, D, H * c->Dqk);
        linear_bwd_inp(m, m->d_a, D, m->d_q, H * c->Dqk, P + w->q, D, N, D, H * c->Dqk, 1.0f);
    }
    // a = RMSNorm(x_in)
    ops->rmsnorm_backward(d_res, G + w->input_norm, m->d_a, b->x_in, P + w->input_norm, b->a_rstd, N, D);
}

// --- whole model ------------------------------------------------------------------------------

static double sum_losses(const float *losses, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += losses[i];
    return s;
}

int nm_model_forward(nm_model *m, const int32_t *tokens, int64_t B, int64_t T, const nm_loss_options *opt,
                     nm_loss_terms *loss, float *logits_out, nm_error *err) {
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    int64_t D = c->D, V = c->V, N = B * T;
    m->have_forward = 0;
    int64_t T_min = opt->inference ? 1 : 2;
    if (B < 1 || B > m->B_max || T < T_min || T > m->T_max) {
        return nm_error_set(err, "forward: batch %lld x seq %lld outside the allocated 1..%lld x %lld..%lld",
                            (long long)B, (long long)T, (long long)m->B_max, (long long)T_min, (long long)m->T_max);
    }
    if (!opt->inference && T < c->M + 2) {
        return nm_error_set(err, "forward: sequence length %lld too short for %lld MTP depths (needs >= %lld)",
                            (long long)T, (long long)c->M, (long long)(c->M + 2));
    }
    for (int64_t i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) {
            return nm_error_set(err, "forward: token id %d at row %lld position %lld is outside the vocabulary [0, %lld)",
                                tokens[i], (long long)(i / T), (long long)(i % T), (long long)V);
        }
    }
    if (m->precision != NM_PRECISION_FP32 && m->params_changed) {
        // Weights cast once per step (the optimizer wrote them through nm_model_params).
        ops->cast_bf16(m->params_bf16, m->params, (int64_t)m->table.n_floats);
        m->params_changed = 0;
    }
    m->B = B;
    m->T = T;
    m->opt = *opt;
    memcpy(m->tokens, tokens, (size_t)N * sizeof(int32_t));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T; t++) m->targets[b * T + t] = t + 1 < T ? tokens[b * T + t + 1] : -1;
    }
    memset(m->expert_counts, 0, (size_t)m->n_moe * (size_t)(c->E > 0 ? c->E : 1) * sizeof(int64_t));

    // main stack
    double aux = 0.0;
    int moe_row = 0;
    ops->embedding_forward(m->emb_out, tokens, P + m->table.embed, N, D);
    for (int64_t l = 0; l < c->L; l++) {
        int64_t *counts = nm_layer_is_moe(c, l) ? m->expert_counts + (size_t)(moe_row++) * c->E : NULL;
        aux += block_forward(m, l, B, T, counts);
    }
    const float *h_last = m->blocks[c->L - 1].x_out;
    ops->rmsnorm_forward(m->h0, m->h0_rstd, h_last, P + m->table.final_norm, N, D, (float)c->rms_eps);
    head_forward(m, m->losses, m->lse, m->logits, m->h0, m->targets, N, logits_out);
    double ce = T > 1 ? sum_losses(m->losses, N) / (double)(B * (T - 1)) : 0.0;

    // multi-token prediction (dsv3-spec 6.3, 11): depth k reads h^{k-1} and tokens shifted by k
    double mtp = 0.0;
    int64_t M = opt->inference ? 0 : c->M;
    for (int64_t k = 1; k <= M; k++) {
        int64_t l = c->L + k - 1, Tk = T - k, Nk = B * Tk;
        mtp_acts *t = &m->mtp[k - 1];
        block_acts *blk = &m->blocks[l];
        const nm_layer_offsets *w = &m->table.layers[l];
        const float *h_src = k == 1 ? m->h0 : m->blocks[l - 1].x_out;
        int64_t T_src = T - k + 1;
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < Tk; i++) {
                t->tokens_in[b * Tk + i] = tokens[b * T + i + k];
                t->targets[b * Tk + i] = i + k + 1 < T ? tokens[b * T + i + k + 1] : -1;
            }
        }
        ops->copy_2d(t->h_prev, Tk * D, h_src, T_src * D, B, Tk * D);
        ops->embedding_forward(t->emb, t->tokens_in, P + m->table.embed, Nk, D);
        ops->rmsnorm_forward(t->emb_n, t->emb_rstd, t->emb, P + w->enorm, Nk, D, (float)c->rms_eps);
        ops->rmsnorm_forward(t->h_n, t->h_rstd, t->h_prev, P + w->hnorm, Nk, D, (float)c->rms_eps);
        // eh_proj (D, 2D): columns [0, D) take enorm(emb), [D, 2D) take hnorm(h)
        linear_fwd(m, blk->x_in, D, t->emb_n, D, P + w->eh_proj, 2 * D, Nk, D, D, 0.0f);
        linear_fwd(m, blk->x_in, D, t->h_n, D, P + w->eh_proj + D, 2 * D, Nk, D, D, 1.0f);
        int64_t *counts = nm_layer_is_moe(c, l) ? m->expert_counts + (size_t)(moe_row++) * c->E : NULL;
        aux += block_forward(m, l, B, Tk, counts);
        ops->rmsnorm_forward(t->g, t->g_rstd, blk->x_out, P + w->head_norm, Nk, D, (float)c->rms_eps);
        head_forward(m, t->losses, t->lse, t->logits, t->g, t->targets, Nk, NULL);
        mtp += sum_losses(t->losses, Nk) / (double)(B * (Tk - 1));
    }
    if (M > 0) mtp /= (double)M;

    loss->ce = ce;
    loss->mtp = mtp;
    loss->aux = aux;
    loss->loss = ce + (double)opt->mtp_weight * mtp + (double)opt->aux_weight * aux;
    loss->tokens = N;
    m->have_forward = !opt->inference;
    return 0;
}

int nm_model_backward(nm_model *m, nm_error *err) {
    if (!m->have_forward) return nm_error_set(err, "backward: no forward pass to differentiate");
    m->have_forward = 0;  // activations are consumed (logits are overwritten in place)
    const nm_model_config *c = &m->cfg;
    const nm_ops *ops = m->ops;
    const float *P = m->params;
    float *G = m->grads;
    int64_t B = m->B, T = m->T, N = B * T, D = c->D;
    float gs = m->opt.grad_scale;
    float aux_seed = m->opt.aux_weight * gs;

    // MTP depths, deepest first: depth k's block output also feeds depth k+1's hnorm.
    ops->zero(m->d_h0, N * D);
    for (int64_t k = c->M; k >= 1; k--) {
        int64_t l = c->L + k - 1, Tk = T - k, Nk = B * Tk;
        mtp_acts *t = &m->mtp[k - 1];
        block_acts *blk = &m->blocks[l];
        const nm_layer_offsets *w = &m->table.layers[l];
        float scale = m->opt.mtp_weight / (float)c->M / (float)(B * (Tk - 1)) * gs;
        // logits_k = g . lm_head^T ; g = RMSNorm(h^k)
        head_backward(m, m->d_tmp, 0.0f, t->logits, t->lse, t->g, t->targets, scale, Nk);
        // d_res = dh^k (from depth k+1, zero for the deepest) + head-norm path
        if (k == c->M) ops->zero(m->d_res, Nk * D);
        else ops->copy_2d(m->d_res, Nk * D, t->dh, Nk * D, 1, Nk * D);
        ops->rmsnorm_backward(m->d_res, G + w->head_norm, m->d_tmp, blk->x_out, P + w->head_norm, t->g_rstd, Nk, D);
        block_backward(m, l, aux_seed);
        // x_in = emb_n . W_eh[:, :D]^T + h_n . W_eh[:, D:]^T
        linear_bwd_w(m, G + w->eh_proj, 2 * D, m->d_res, D, t->emb_n, D, Nk, D, D);
        linear_bwd_w(m, G + w->eh_proj + D, 2 * D, m->d_res, D, t->h_n, D, Nk, D, D);
        linear_bwd_inp(m, m->d_tmp, D, m->d_res, D, P + w->eh_proj, 2 * D, Nk, D, D, 0.0f);
        ops->zero(m->d_emb, Nk * D);
        ops->rmsnorm_backward(m->d_emb, G + w->enorm, m->d_tmp, t->emb, P + w->enorm, t->emb_rstd, Nk, D);
        ops->embedding_backward(G + m->table.embed, m->d_emb, t->tokens_in, Nk, D);
        linear_bwd_inp(m, m->d_tmp, D, m->d_res, D, P + w->eh_proj + D, 2 * D, Nk, D, D, 0.0f);
        ops->zero(m->d_emb, Nk * D);
        ops->rmsnorm_backward(m->d_emb, G + w->hnorm, m->d_tmp, t->h_prev, P + w->hnorm, t->h_rstd, Nk, D);
        // h_prev = first Tk positions of h^{k-1} (h0 for k == 1)
        if (k == 1) {
            ops->add_2d(m->d_h0, T * D, m->d_emb, Tk * D, B, Tk * D);
        } else {
            mtp_acts *prev = &m->mtp[k - 2];
            int64_t T_src = T - k + 1;
            ops->zero(prev->dh, B * T_src * D);
            ops->add_2d(prev->dh, T_src * D, m->d_emb, Tk * D, B, Tk * D);
        }
    }

    // main head: logits = h0 . lm_head^T ; h0 = RMSNorm(h_L)
    head_backward(m, m->d_h0, 1.0f, m->logits, m->lse, m->h0, m->targets, gs / (float)(B * (T - 1)), N);
    ops->zero(m->d_res, N * D);
    ops->rmsnorm_backward(m->d_res, G + m->table.final_norm, m->d_h0, m->blocks[c->L - 1].x_out,
                          P + m->table.final_norm, m->h0_rstd, N, D);
    for (int64_t l = c->L - 1; l >= 0; l--) block_backward(m, l, aux_seed);
    ops->embedding_backward(G + m->table.embed, m->d_res, m->tokens, N, D);
    return 0;
}
