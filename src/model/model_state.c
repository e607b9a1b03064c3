// model_state.c: the model's state, below the blocks: create/destroy, the activation arena
// (one allocation from the backend, laid out by `layout` so that the forward and backward never
// allocate), the rope tables, the precision switch, the accessors and the activation estimates.
// The blocks (mla.c, mlp.c, moe.c, head.c, mtp.c) read and write this state; the composition
// that runs them is model.c. Activations are fp32 (bf16 runs keep the GEMM-only saved ones in bf16,
// bf16_twin.c); the model reads only small host-side integer
// metadata (token ids, expert offsets) directly, every float buffer through the ops table.
#include "model/model_state.h"

#include <math.h>
#include <string.h>

// --- arena layout -----------------------------------------------------------------------------

// Two passes over the same layout code: the first (arena == NULL) only counts, the second
// hands out aligned slices. Keeps every size in one place.
static float *take(nm_model *m, size_t n) {
    size_t aligned = (n + 15) & ~(size_t)15;  // 64-byte alignment for every buffer
    float *p = m->arena ? m->arena + m->arena_used : NULL;
    m->arena_used += aligned;
    return p;
}

// A tensor that only bf16 GEMMs read (rounded by nm_round_act and its kin): under bf16 with a
// GEMM that reads bf16 storage it has a bf16 twin (bf16_twin.c), whose place is fixed here.
static float *take_operand(nm_model *m, size_t n) {
    float *p = take(m, n);
    m->bf16.twin_elems += nm_bf16_twins_pool_elems((int64_t)n);
    if (p && m->bf16.twins) nm_bf16_twins_register(m->bf16.twins, p, (int64_t)n);
    return p;
}

// A saved activation of block b that only bf16 GEMMs read (nm_saved_operand): per block, or
// saved in bf16, the kind's one fp32 buffer shared by every block and the block's own bf16
// copy.
static float *take_saved(nm_model *m, block_acts *b, nm_saved_operand kind, size_t n) {
    if (!m->bf16.saved_bf16) return take_operand(m, n);
    if (!m->bf16.saved_taken[kind]) {
        m->bf16.saved_taken[kind] = 1;
        m->bf16.saved_fp32[kind] = take(m, n);
        if (m->bf16.saved_fp32[kind] && m->bf16.twins)
            nm_bf16_twins_register_saved(m->bf16.twins, m->bf16.saved_fp32[kind], (int64_t)n, kind);
    }
    b->saved[kind] = (nm_bf16_copy){.bits = (uint16_t *)take(m, (n + 1) / 2)};
    return m->bf16.saved_fp32[kind];
}

// The routed experts' input rows of block b (rows x D): per block, or saved in fp8, one fp32
// buffer shared by every block and the block's own e4m3 codes and tile scales.
static float *take_expert_rows(nm_model *m, block_acts *b, nm_saved_operand kind, size_t rows) {
    const size_t D = (size_t)m->cfg.D;
    if (!m->bf16.saved_fp8) return take_saved(m, b, kind, rows * D);
    if (!m->bf16.saved_taken[kind]) {
        m->bf16.saved_taken[kind] = 1;
        m->bf16.saved_fp32[kind] = take(m, rows * D);
    }
    b->x_codes = (uint8_t *)take(m, (rows * D + 3) / 4);
    b->x_scales = take(m, rows * (size_t)((D + 127) / 128));
    return m->bf16.saved_fp32[kind];
}

static int32_t *take_i32(nm_model *m, size_t n) { return (int32_t *)take(m, n); }

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

// Every buffer of a block between its input and its output.
static void take_block_intermediates(nm_model *m, block_acts *b, int dense, int moe) {
    const nm_model_config *c = &m->cfg;
    size_t N = (size_t)(m->B_max * m->T_max);
    size_t D = c->D, NK = N * (size_t)c->K, H = (size_t)m->tp.H_loc;
    // selective recomputation of the norms: a and f share one buffer each (layout), rebuilt at
    // the start of each block's backward (model.c, mla.c)
    const int share_norms = m->recompute.layernorm && !m->recompute.full;  // (NULL in the counting pass)
    b->a = share_norms ? m->recompute.ln_a : take_saved(m, b, NM_SAVED_A, N * D);
    b->a_rstd = take(m, N);
    if (c->Rq > 0) {
        b->cq = take(m, N * c->Rq);
        b->cq_n = take_saved(m, b, NM_SAVED_CQ_N, N * c->Rq);
        b->cq_rstd = take(m, N);
    }
    // selective recomputation: the up-projections' outputs share one pair (layout), rebuilt in
    // each block's backward (mla.c)
    const int share_up = m->recompute.mla_up_proj && !m->recompute.full;  // (up_q is NULL in the counting pass)
    b->q = share_up ? m->recompute.up_q : take(m, N * H * c->Dqk);
    b->ckv = take(m, N * c->Rkv);
    b->ckv_n = take_saved(m, b, NM_SAVED_CKV_N, N * c->Rkv);
    b->ckv_rstd = take(m, N);
    b->k_pe = take(m, N * c->Dr);
    b->kv = share_up ? m->recompute.up_kv : take(m, N * H * (c->Dn + c->Dv));
    b->att = take(m, N * H * c->Dv);
    b->lse = take(m, N * H);
    b->x_mid = take(m, N * D);
    b->f = share_norms ? m->recompute.ln_f : take(m, N * D);
    b->f_rstd = take(m, N);
    if (dense) {
        b->gate_up = take(m, N * 2 * m->tp.F_loc);
        b->act = take_saved(m, b, NM_SAVED_ACT, N * m->tp.F_loc);
    }
    if (moe && c->E > 0) {
        b->router_logits = take(m, N * c->E);
        b->scores = take(m, N * c->E);
        b->topk_idx = take_i32(m, NK);
        b->topk_w = take(m, NK);
        b->perm = take_i32(m, NK);
        b->offsets = take_i32(m, c->E + 1);
        size_t R = m->ep.comm ? (size_t)m->ep.cap : NK;
        // under expert parallelism the experts' input is x_loc; x_perm only crosses
        b->x_perm =
            m->ep.comm ? take_saved(m, b, NM_SAVED_X_PERM, NK * D) : take_expert_rows(m, b, NM_SAVED_X_PERM, NK);
        // saved in fp8: gate_up kept as e4m3 codes and tile scales, act made again from them
        // (DeepSeek-V3 caches the SwiGLU inputs so); both fp32 buffers shared by every block
        const int fp8_gate_up = m->bf16.saved_fp8;
        if (fp8_gate_up) {
            b->e_gate_up = m->recompute.gate_up_buf;
            b->g_codes = (uint8_t *)take(m, (R * 2 * c->Fe + 3) / 4);
            b->g_scales = take(m, R * (size_t)((2 * c->Fe + 127) / 128));
        } else {
            b->e_gate_up = take(m, R * 2 * c->Fe);
        }
        b->e_act = (m->recompute.moe_act || fp8_gate_up) && !m->recompute.full
                       ? m->recompute.moe_act_buf
                       : take_saved(m, b, NM_SAVED_E_ACT, R * c->Fe);
        b->e_out = take(m, NK * D);
        if (m->ep.comm) {
            b->x_loc = take_expert_rows(m, b, NM_SAVED_X_LOC, R);
            size_t EP = (size_t)m->ep.comm->size;
            b->ep_counts = (int64_t *)take(m, 2 * EP * (size_t)m->ep.E_loc);
            b->ep_pairs = (int64_t *)take(m, 2 * EP * EP);
        }

        if (c->Fs > 0) {
            b->s_gate_up = take(m, N * 2 * m->tp.Fs_loc);
            b->s_act = take_saved(m, b, NM_SAVED_S_ACT, N * m->tp.Fs_loc);
        }
        b->bal_f = take(m, m->B_max * c->E);
    }
}


// The current activation set into slot s, and back; stage_out follows the slot's chunk.
static void slot_save(nm_model *m, nm_model_acts *s) { *s = m->act; }

static void slot_load(nm_model *m, const nm_model_acts *s) {
    m->act = *s;
    const nm_model_stage *st = &m->pipe.stage;  // the slot's chunk, set by the caller
    m->act.stage_out = st->layer_end > st->layer_begin ? m->act.blocks[st->layer_end - 1].x_out : m->act.stage_in;
}

// What one micro-batch's forward leaves for its backward (into m's current-slot fields).
static void take_slot(nm_model *m, const block_acts *shared) {
    const nm_model_config *c = &m->cfg;
    size_t N = (size_t)(m->B_max * m->T_max);
    size_t D = c->D;
    const nm_model_stage *st = &m->pipe.stage;
    FOR_STAGE_LAYERS(m, l) {
        block_acts *b = &m->act.blocks[l];
        int moe = nm_layer_is_moe(c, l);
        if (m->recompute.full) *b = *shared;
        else take_block_intermediates(m, b, !moe, moe);
        b->x_in = (l == st->layer_begin || nm_layer_is_mtp(c, l)) ? take(m, N * D) : NULL;  // else aliases
        b->x_out = take(m, N * D);
    }
    for (int64_t l = st->layer_begin + 1; l < st->layer_end; l++) m->act.blocks[l].x_in = m->act.blocks[l - 1].x_out;
    m->act.stage_in = st->layer_end > st->layer_begin ? m->act.blocks[st->layer_begin].x_in : take(m, N * D);
    m->act.emb_out = m->act.stage_in;
    if (st->last) {
        for (int64_t k = 0; k < c->M; k++) {
            mtp_acts *t = &m->act.mtp[k];
            t->tokens_in = take_i32(m, N);
            t->targets = take_i32(m, N);
            t->h_prev = take(m, N * D);
            t->emb = take(m, N * D);
            t->emb_n = take_operand(m, N * D);
            t->emb_rstd = take(m, N);
            t->h_n = take_operand(m, N * D);
            t->h_rstd = take(m, N);
            t->g = take_operand(m, N * D);
            t->g_rstd = take(m, N);
            t->logits = take_operand(m, N * (size_t)m->vt);
            t->losses = take(m, N);
            t->lse = take(m, N);
            t->dh = take(m, N * D);
        }
    }
    m->act.targets = take_i32(m, N);
    m->act.tokens = take_i32(m, N);
    if (st->last) {
        m->act.h0 = take(m, N * D);
        m->act.h0_rstd = take(m, N);
        m->act.logits = take_operand(m, N * (size_t)m->vt);
        m->act.losses = take(m, N);
        m->act.lse = take(m, N);
        m->act.head_stats = (double *)take(m, 6 * N);  // 3 doubles per row (the arena is 64-byte aligned)
    }
}

static void layout(nm_model *m) {
    const nm_model_config *c = &m->cfg;
    size_t N = (size_t)(m->B_max * m->T_max);
    size_t D = c->D, NK = N * (size_t)c->K;
    m->arena_used = 0;
    m->bf16.twin_elems = 0;
    for (int k = 0; k < NM_SAVED_N; k++) m->bf16.saved_taken[k] = 0, m->bf16.saved_fp32[k] = NULL;
    m->rope_cos = take(m, (size_t)m->T_max * c->Dr / 2);
    m->rope_sin = take(m, (size_t)m->T_max * c->Dr / 2);
    // With recomputation only each block's input and output are kept; everything in between
    // lives in one shared set (dense and MoE buffers both), rebuilt by re-running a block's
    // forward right before its backward. Pipeline stages keep one set of saved activations
    // per micro-batch in flight (slots); the backward scratch below is shared by all.
    // A stage without MoE blocks (or without dense ones) needs none of their buffers.
    int stage_moe = 0, stage_dense = 0;
    for (int k = 0; k < m->pipe.n_chunks; k++) {
        m->pipe.stage = m->pipe.chunks[k];
        FOR_STAGE_LAYERS(m, l) {
            if (nm_layer_is_moe(c, l)) stage_moe = 1;
            else stage_dense = 1;
        }
    }
    block_acts shared = {0};
    if (m->recompute.full) take_block_intermediates(m, &shared, stage_dense, stage_moe);
    m->recompute.up_q = m->recompute.up_kv = m->recompute.moe_act_buf = m->recompute.ln_a = m->recompute.ln_f = NULL;
    m->recompute.gate_up_buf = NULL;
    const size_t R_rows = m->ep.comm ? (size_t)m->ep.cap : N * (size_t)c->K;  // the experts' rows
    if ((m->recompute.moe_act || m->bf16.saved_fp8) && !m->recompute.full && stage_moe && c->E > 0)
        m->recompute.moe_act_buf = take_operand(m, R_rows * (size_t)c->Fe);
    if (m->bf16.saved_fp8 && stage_moe && c->E > 0) m->recompute.gate_up_buf = take(m, R_rows * 2 * (size_t)c->Fe);
    if (m->recompute.layernorm && !m->recompute.full && (stage_dense || stage_moe)) {
        m->recompute.ln_a = take_operand(m, N * D);
        m->recompute.ln_f = take(m, N * D);
    }
    if (m->recompute.mla_up_proj && !m->recompute.full && (stage_dense || stage_moe)) {
        size_t H = (size_t)m->tp.H_loc;
        m->recompute.up_q = take(m, N * H * c->Dqk);
        m->recompute.up_kv = take(m, N * H * (c->Dn + c->Dv));
    }
    // A chunk's slots hold its own layers only.
    for (int s = 0; s < m->pipe.n_slots; s++) {
        m->pipe.stage = m->pipe.chunks[s / m->pipe.slots_per_chunk];
        m->act.blocks = m->pipe.block_sets + (size_t)s * (size_t)c->n_layers;
        m->act.mtp = m->pipe.mtp_sets + (size_t)s * (size_t)(c->M > 0 ? c->M : 1);
        take_slot(m, &shared);
        slot_save(m, &m->pipe.slots[s]);
    }
    m->pipe.stage = m->pipe.chunks[0];
    m->pipe.chunk = 0;
    slot_load(m, &m->pipe.slots[0]);
    m->pipe.slot = 0;

    size_t Fmax = max_sz((size_t)m->tp.F_loc, (size_t)m->tp.Fs_loc), H = (size_t)m->tp.H_loc;
    m->scratch.d_res = take(m, N * D);
    m->scratch.d_h0 = take(m, N * D);
    m->scratch.d_a = take(m, N * D);
    m->scratch.d_f = take(m, N * D);
    if (c->Rq > 0) {
        m->scratch.d_cq_n = take(m, N * c->Rq);
        m->scratch.d_cq = take_operand(m, N * c->Rq);
    }
    m->scratch.d_q = take_operand(m, N * H * c->Dqk);
    m->scratch.d_ckv_n = take(m, N * c->Rkv);
    m->scratch.d_ckv = take_operand(m, N * c->Rkv);
    m->scratch.d_k_pe = take_operand(m, N * c->Dr);
    m->scratch.d_kv = take_operand(m, N * H * (c->Dn + c->Dv));
    m->scratch.d_att = take(m, N * H * c->Dv);
    m->scratch.att_scratch = take(m, N * H * c->Dr);
    m->scratch.d_gate_up = take_operand(m, N * 2 * Fmax);
    m->scratch.d_act = take(m, N * Fmax);
    if (c->E > 0 && stage_moe) {
        m->scratch.d_router = take(m, N * c->E);
        m->scratch.d_topk_w = take(m, NK);
        size_t R = m->ep.comm ? (size_t)m->ep.cap : NK;
        m->scratch.d_e_out = take_operand(m, NK * D);
        m->scratch.d_e_act = take(m, R * c->Fe);
        m->scratch.d_e_gate_up = take_operand(m, R * 2 * c->Fe);
        m->scratch.d_x_perm = take(m, NK * D);
        if (m->ep.comm) {
            m->ep.d_e_out_loc = take_operand(m, R * D);
            m->ep.d_x_loc = take(m, R * D);
            m->ep.buf = take(m, R * D);
            if (m->ep.split > 1) m->ep.buf2 = take(m, R * D);  // the split exchange's combine rows
            // the bf16 dispatch's send buffer, only where the run is bf16 (moe.c)
            if (m->opt_precision == NM_PRECISION_BF16 || m->opt_precision == NM_PRECISION_FP8)
                m->ep.send16 = (uint16_t *)take(m, (NK * D + 1) / 2);
            if (m->opt_precision == NM_PRECISION_FP8) {  // the fp8 dispatch's codes and scales
                size_t tiles = (size_t)((D + 127) / 128);
                m->ep.send8 = (uint8_t *)take(m, (NK * D + 3) / 4);
                m->ep.send_scales = take(m, NK * tiles);
                m->ep.recv8 = (uint8_t *)take(m, (R * D + 3) / 4);
                m->ep.recv_scales = take(m, R * tiles);
                m->ep.half = (uint16_t *)take(m, (R * D + 1) / 2);
            }
        }
    }
    m->scratch.d_emb = take(m, N * D);
    m->scratch.d_tmp = take(m, N * D);
    if (m->tp.comm) {
        m->tp.ids = take_i32(m, N);
        m->tp.partial = take(m, N * D);
        m->tp.red = (double *)take(m, 6 * N);
    }
}

// Local sizes of a tensor-parallel rank of tp_size (the full sizes at 1); the vocabulary
// shard is the embedding row's (table row 0) when there is a table.
static void set_local_sizes(nm_model *m, int64_t tp_size, const nm_tensor_spec *embed) {
    const nm_model_config *c = &m->cfg;
    m->tp.H_loc = c->H / tp_size;
    m->tp.F_loc = c->F / tp_size;
    m->tp.Fs_loc = c->Fs / tp_size;
    m->tp.V_loc = embed ? embed->shape[0] : c->V;
    m->tp.v_start = embed && embed->tp_dim == 0 ? embed->tp_start : 0;
    m->tp.V_valid = embed && embed->tp_dim == 0 ? embed->tp_extent : m->tp.V_loc;
}

// --- create / destroy ---------------------------------------------------------------------

static void rope_tables(nm_model *m) {
    const nm_model_config *c = &m->cfg;
    int64_t half = c->Dr / 2;
    double *inv_freq = nm_malloc((size_t)half * sizeof(double));  // (Dr/2): sized by the config
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
    nm_free(inv_freq);
}

// The ops keep per-row vectors of these sizes in fixed scratch (ops.h max_row_dim).
static int check_row_dims(const nm_model_config *c, const nm_ops *ops, nm_error *err) {
    struct { const char *what; int64_t v; } dims[] = {
        {"n_routed_experts", c->E}, {"qk_nope_head_dim + qk_rope_head_dim", c->Dn + c->Dr}, {"v_head_dim", c->Dv},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
        if (ops->max_row_dim > 0 && dims[i].v > ops->max_row_dim)
            return nm_error_set(err,
                                "%s: %s = %lld: this backend's ops handle at most %lld (DeepSeek-V3: 256 experts, "
                                "head dims 192 and 128)",
                                c->source_path ? c->source_path : "model config", dims[i].what, (long long)dims[i].v,
                                (long long)ops->max_row_dim);
    }
    return 0;
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

// The stages this rank holds (one, or the interleaved schedule's chunks) and the activation
// slots: act_slots per chunk.
static int set_chunks(nm_model *m, const nm_model_options *opts, nm_error *err) {
    const nm_model_config *c = &m->cfg;
    int64_t n = opts->n_chunks > 1 ? opts->n_chunks : 1;
    if (n > NM_MAX_MODEL_CHUNKS || (n > 1 && !opts->stage))
        return nm_error_set(err, "model: %lld model chunks (virtual pipeline stages): at most %d, given as stages",
                            (long long)n, NM_MAX_MODEL_CHUNKS);
    for (int64_t k = 0; k < n; k++) m->pipe.chunks[k] = opts->stage ? opts->stage[k] : (nm_model_stage){0, c->L, 1, 1};
    for (int64_t k = 1; k < n; k++) {
        if (m->pipe.chunks[k].first || m->pipe.chunks[k - 1].last ||
            m->pipe.chunks[k].layer_begin < m->pipe.chunks[k - 1].layer_end)
            return nm_error_set(
                err, "model: chunk %lld (layers [%lld, %lld)) does not follow chunk %lld in layer order", (long long)k,
                (long long)m->pipe.chunks[k].layer_begin, (long long)m->pipe.chunks[k].layer_end, (long long)(k - 1));
    }
    m->pipe.n_chunks = (int)n;
    m->pipe.slots_per_chunk = opts->act_slots > 1 ? (int)opts->act_slots : 1;
    if ((int64_t)m->pipe.slots_per_chunk * n > INT32_MAX / 2)
        return nm_error_set(err, "model: %lld activation slots per chunk", (long long)opts->act_slots);
    m->pipe.n_slots = m->pipe.slots_per_chunk * (int)n;
    m->pipe.stage = m->pipe.chunks[0];
    m->pipe.chunk = 0;
    return 0;
}

// Everything the arena layout reads, from the options (create and the estimate share it):
// the groups, this rank's parameter table, the local head / FFN / vocabulary sizes, the head
// tile, the experts held here and the bound on the rows they receive.
static int configure(nm_model *m, const nm_model_options *opts, nm_error *err) {
    const nm_model_config *c = &m->cfg;
    if (opts->vocab_tile < 0) return nm_error_set(err, "model: vocab_tile %lld < 0", (long long)opts->vocab_tile);
    m->ep.comm = opts->ep && opts->ep->size > 1 ? opts->ep : NULL;
    m->tp.comm = opts->tp && opts->tp->size > 1 ? opts->tp : NULL;
    m->tp.sp = m->tp.comm && opts->sequence_parallel;
    // created for bf16 or fp8: the GEMM-only saved activations are kept in bf16 (bf16_twin.c);
    // with whole blocks recomputed nothing between a block's input and output is kept anyway
    m->bf16.saved_bf16 =
        (opts->precision == NM_PRECISION_BF16 || opts->precision == NM_PRECISION_FP8) && !opts->recompute;
    m->bf16.saved_fp8 = opts->precision == NM_PRECISION_FP8 && !opts->recompute;
    int64_t ep_size = m->ep.comm ? m->ep.comm->size : 1, ep_rank = m->ep.comm ? m->ep.comm->rank : 0;
    int64_t tp_size = m->tp.comm ? m->tp.comm->size : 1, tp_rank = m->tp.comm ? m->tp.comm->rank : 0;
    int64_t vocab_multiple = opts->vocab_multiple > 0 ? opts->vocab_multiple : 1;
    if (nm_param_table_build_tp(&m->table, c, ep_rank, ep_size, tp_rank, tp_size, vocab_multiple, err) != 0) return -1;
    if (m->pipe.n_chunks > 1 || m->pipe.stage.layer_end - m->pipe.stage.layer_begin != c->L || !m->pipe.stage.first ||
        !m->pipe.stage.last) {
        if (nm_param_table_restrict_chunks(&m->table, c, m->pipe.chunks, m->pipe.n_chunks, err) != 0) {
            nm_param_table_free(&m->table);
            return -1;
        }
    }
    // The vocabulary shard: the embedding's rows, or the head's on a last stage without it.
    int vocab_row = nm_param_table_find(&m->table, "model.embed_tokens.weight");
    if (vocab_row < 0) vocab_row = nm_param_table_find(&m->table, "lm_head.weight");
    set_local_sizes(m, tp_size, vocab_row >= 0 ? &m->table.rows[vocab_row] : NULL);
    m->vt = pick_vocab_tile(c, m->B_max * m->T_max, opts->vocab_tile);
    if (m->vt > m->tp.V_loc) m->vt = m->tp.V_loc;
    m->ep.E_loc = m->table.expert_count;
    if (m->ep.comm) {
        // The receive capacity per round: moe_receive_capacity x the mean rows a rank receives
        // (each rank sends its routed rows x K), never above what the group could send it.
        double capacity = opts->moe_receive_capacity;
        if (!(capacity >= 0) || !isfinite(capacity))
            return nm_error_set(err, "model: moe_receive_capacity %g: must be a finite number > 0 (0: the default %g)",
                                capacity, NM_MOE_RECEIVE_CAPACITY);
        int64_t rows = m->B_max * m->T_max;
        if (m->tp.sp) rows = (rows + tp_size - 1) / tp_size;  // each tp rank routes its own rows
        m->ep.cap = nm_moe_receive_rows(c, rows, ep_size, capacity);
    }
    return 0;
}

int64_t nm_moe_receive_rows(const nm_model_config *cfg, int64_t rows_routed, int64_t ep_size, double capacity) {
    if (capacity <= 0) capacity = NM_MOE_RECEIVE_CAPACITY;
    int64_t E_loc = cfg->E / (ep_size > 0 ? ep_size : 1);
    int64_t per = cfg->K < E_loc ? cfg->K : E_loc;  // a token reaches one rank at most this often
    int64_t most = ep_size * rows_routed * per;     // every token of the group routed here
    double c = ceil(capacity * (double)(rows_routed * cfg->K));
    return c >= (double)most ? most : c < 1 ? 1 : (int64_t)c;
}

int nm_model_create(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max,
                    int64_t T_max, nm_error *err) {
    nm_model_options o = {0};
    return nm_model_create_ex(out, cfg, ops, B_max, T_max, &o, err);
}

static int model_create(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max, int64_t T_max,
                        const nm_model_options *opts, nm_model *owner, nm_error *err);

int nm_model_create_ex(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max,
                       int64_t T_max, const nm_model_options *opts, nm_error *err) {
    return model_create(out, cfg, ops, B_max, T_max, opts, NULL, err);
}

int nm_model_create_pair(nm_model **out, nm_model *owner, const nm_model_options *opts, nm_error *err) {
    *out = NULL;
    if (owner->owner) return nm_error_set(err, "model: a pair's second model cannot be paired again");
    if (model_create(out, &owner->cfg, owner->ops, owner->B_max, owner->T_max, opts, owner, err) != 0) return -1;
    size_t n_floats = (*out)->table.n_floats;
    if (n_floats != owner->table.n_floats) {
        nm_model_destroy(*out);
        *out = NULL;
        return nm_error_set(err, "model: the pair's options give another parameter table (%zu floats, not %zu): "
                                 "create it with the options of the first",
                            n_floats, owner->table.n_floats);
    }
    if (nm_model_set_precision(*out, owner->precision, err) != 0) {
        nm_model_destroy(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

// owner: NULL, or the model whose parameters, gradients and bf16 weight copy this one uses
// (nm_model_create_pair).
static int model_create(nm_model **out, const nm_model_config *cfg, const nm_ops *ops, int64_t B_max, int64_t T_max,
                        const nm_model_options *opts, nm_model *owner, nm_error *err) {
    *out = NULL;
    if (B_max < 1 || T_max < 2)
        return nm_error_set(err, "model: batch %lld x seq %lld: need batch >= 1 and seq >= 2", (long long)B_max,
                            (long long)T_max);
    if (T_max < cfg->M + 2)
        return nm_error_set(err, "model: sequence length %lld too short for %lld MTP depths (needs >= %lld)",
                            (long long)T_max, (long long)cfg->M, (long long)(cfg->M + 2));
    if ((int64_t)B_max * T_max * (cfg->K > 0 ? cfg->K : 1) >= INT32_MAX)
        return nm_error_set(err, "model: batch*seq*top_k = %lld exceeds int32 routing indices",
                            (long long)(B_max * T_max * cfg->K));
    if (ops->setup && ops->setup(ops, err) != 0) return -1;
    if (check_row_dims(cfg, ops, err) != 0) return -1;
    nm_model *m = nm_calloc(1, sizeof(nm_model));
    m->cfg = *cfg;
    m->ops = ops;
    m->B_max = B_max;
    m->T_max = T_max;
    m->recompute.full = opts->recompute;
    m->recompute.mla_up_proj = opts->recompute_mla_up_proj;
    m->recompute.moe_act = opts->recompute_moe_act;
    m->ep.shared_expert_overlap = opts->shared_expert_overlap;
    m->ep.split = opts->ep_split > 1 ? opts->ep_split : 1;
    m->recompute.layernorm = opts->recompute_layernorm;
    m->opt_precision = opts->precision;
    if (set_chunks(m, opts, err) != 0 || configure(m, opts, err) != 0) {
        nm_free(m);
        return -1;
    }
    int64_t ep_size = m->ep.comm ? m->ep.comm->size : 1;
    if (m->tp.comm) m->tp.sp_counts = nm_calloc((size_t)m->tp.comm->size, sizeof(int64_t));
    if (m->ep.comm) {
        m->ep.send = nm_calloc((size_t)ep_size, sizeof(int64_t));
        m->ep.recv = nm_calloc((size_t)ep_size, sizeof(int64_t));
        m->ep.send_at = nm_calloc((size_t)ep_size, sizeof(int64_t));
        m->ep.recv_at = nm_calloc((size_t)ep_size, sizeof(int64_t));
        m->ep.cnt_send = nm_calloc((size_t)(ep_size * m->ep.E_loc), sizeof(int64_t));
        m->ep.round_counts = nm_calloc((size_t)(ep_size * m->ep.E_loc), sizeof(int64_t));
        m->ep.round_offsets = nm_calloc((size_t)m->ep.E_loc + 1, sizeof(int32_t));
        m->ep.scale_counts = nm_calloc((size_t)(4 * ep_size), sizeof(int64_t));
        if (m->ep.split > 1) nm_ep_plans_create(m);
    }
    m->owner = owner;
    m->params = owner ? owner->params : m->ops->alloc(m->ops, m->table.n_floats * sizeof(float));
    m->grads = owner ? owner->grads : m->ops->alloc(m->ops, m->table.n_floats * sizeof(float));
    m->pipe.block_sets = nm_calloc((size_t)m->pipe.n_slots * (size_t)cfg->n_layers, sizeof(block_acts));
    m->pipe.mtp_sets = nm_calloc((size_t)m->pipe.n_slots * (cfg->M > 0 ? (size_t)cfg->M : 1), sizeof(mtp_acts));
    m->pipe.slots = nm_calloc((size_t)m->pipe.n_slots, sizeof(nm_model_acts));
    layout(m);  // counting pass
    m->arena_floats = m->arena_used;
    m->arena = m->ops->alloc(m->ops, m->arena_floats * sizeof(float));
    m->bf16.twins = nm_bf16_twins_create(m->ops);
    layout(m);  // assigning pass (registers the bf16 GEMMs' operands with the twins)
    NM_CHECK(m->arena_used == m->arena_floats, "arena layout mismatch");
    NM_CHECK(nm_bf16_twins_elems(m->bf16.twins) == m->bf16.twin_elems, "bf16 twin layout mismatch");
    rope_tables(m);

    // The MoE layers held here in layer order (chunk after chunk, the MTP layers last): the
    // rows of expert_counts, each chunk's from chunk_moe_row on.
    m->routing.layer_ids = nm_calloc((size_t)cfg->n_layers + 1, sizeof(int));
    for (int k = 0; k < m->pipe.n_chunks; k++) {
        m->pipe.stage = m->pipe.chunks[k];
        m->pipe.chunk_moe_row[k] = m->routing.n_moe;
        FOR_STAGE_LAYERS(m, l) {
            if (nm_layer_is_moe(cfg, l)) m->routing.layer_ids[m->routing.n_moe++] = (int)l;
        }
    }
    m->pipe.chunk_moe_row[m->pipe.n_chunks] = m->routing.n_moe;
    m->pipe.stage = m->pipe.chunks[0];
    m->scratch.groups = nm_calloc((size_t)(cfg->E > 0 ? cfg->E : 1), sizeof(nm_gemm_group));
    m->routing.expert_counts = nm_calloc(
        (size_t)(m->routing.n_moe > 0 ? m->routing.n_moe : 1) * (size_t)(cfg->E > 0 ? cfg->E : 1), sizeof(int64_t));
    *out = m;
    return 0;
}

void nm_model_destroy(nm_model *m) {
    if (!m) return;
    nm_param_table_free(&m->table);
    if (!m->owner) {  // a pair's second model borrows them
        m->ops->free(m->ops, m->params);
        m->ops->free(m->ops, m->grads);
        m->ops->free(m->ops, m->bf16.weights);
    }
    nm_bf16_twins_destroy(m->bf16.twins);
    m->ops->free(m->ops, m->arena);
    nm_free(m->pipe.block_sets);
    nm_free(m->pipe.mtp_sets);
    nm_free(m->pipe.slots);
    nm_free(m->routing.layer_ids);
    nm_free(m->scratch.groups);
    nm_free(m->ep.send);
    nm_free(m->ep.recv);
    nm_free(m->ep.cnt_send);
    nm_free(m->ep.send_at);
    nm_free(m->ep.recv_at);
    nm_free(m->ep.round_counts);
    nm_free(m->ep.round_offsets);
    nm_free(m->ep.scale_counts);
    if (m->ep.comm) nm_ep_plans_destroy(m);
    nm_free(m->tp.sp_counts);
    nm_free(m->routing.expert_counts);
    nm_free(m);
}

float *nm_model_params(nm_model *m) {
    m->bf16.stale = 1;
    if (m->owner) m->owner->bf16.stale = 1;
    return m->params;
}

int nm_model_set_precision(nm_model *m, nm_precision p, nm_error *err) {
    if (p != NM_PRECISION_FP32 && (!m->ops->gemm_bf16 || !m->ops->cast_bf16 || !m->ops->round_bf16 ||
                                   !m->ops->round_cast_bf16 || !m->ops->gemm_bf16_weight_type ||
                                   !m->ops->swiglu_forward_bf16 || !m->ops->swiglu_backward_bf16 ||
                                   (p == NM_PRECISION_FP8 && !m->ops->gemm_fp8))) {
        return nm_error_set(err, "precision %s: this backend has no %s GEMM", p == NM_PRECISION_FP8 ? "fp8" : "bf16",
                            p == NM_PRECISION_FP8 ? "fp8" : "bf16");
    }
    if (p != NM_PRECISION_FP32 && m->ep.comm && m->opt_precision != p)
        return nm_error_set(err, "precision %s under expert parallelism: create the model with nm_model_options."
                                 "precision = %s (its dispatch buffers are sized at creation)",
                            p == NM_PRECISION_FP8 ? "fp8" : "bf16", p == NM_PRECISION_FP8 ? "fp8" : "bf16");
    if (p != NM_PRECISION_FP8 && m->bf16.saved_fp8)
        return nm_error_set(err, "precision %s: this model was created for fp8 (nm_model_options.precision; its "
                            "experts' saved inputs are kept in fp8): create it with precision = %s",
                            p == NM_PRECISION_BF16 ? "bf16" : "fp32", p == NM_PRECISION_BF16 ? "bf16" : "fp32");
    if (p != NM_PRECISION_BF16 && m->bf16.saved_bf16 && !m->bf16.saved_fp8)
        return nm_error_set(err, "precision %s: this model was created for bf16 (nm_model_options.precision; its "
                            "saved activations are kept in bf16): create it with precision = %s",
                            p == NM_PRECISION_FP8 ? "fp8" : "fp32", p == NM_PRECISION_FP8 ? "fp8" : "fp32");
    m->precision = p;
    m->bf16.stale = 1;  // the weight copy is made (and allocated) by the next forward
    return 0;
}
float *nm_model_grads(nm_model *m) { return m->grads; }
const float *nm_model_params_view(const nm_model *m) { return m->params; }
int nm_model_weights_sharded(const nm_model *m) { return m->bf16.partial; }
int nm_model_supports_expert_parallel(void) { return 1; }
int nm_model_supports_tensor_parallel(void) { return 1; }

const nm_param_table *nm_model_table(const nm_model *m) { return &m->table; }
const nm_ops *nm_model_ops(const nm_model *m) { return m->ops; }
const nm_model_config *nm_model_cfg(const nm_model *m) { return &m->cfg; }
size_t nm_model_activation_bytes(const nm_model *m) { return m->arena_floats * sizeof(float); }
int64_t nm_model_bf16_twin_bytes(const nm_model *m) {
    if (m->precision != NM_PRECISION_BF16 || !m->ops->gemm_bf16_weight_type ||
        m->ops->gemm_bf16_weight_type(m->ops) != NM_BF16)
        return 0;
    return m->bf16.twin_elems * (int64_t)sizeof(uint16_t);
}
int64_t nm_model_bf16_twin_misses(const nm_model *m) { return nm_bf16_twins_misses(m->bf16.twins); }

size_t nm_model_estimate_activation_bytes(const nm_model_config *cfg, int64_t B_max, int64_t T_max, int recompute) {
    nm_model_options o = {.recompute = recompute};
    size_t bytes = 0;
    nm_error err;
    NM_CHECK(nm_model_estimate_activation_bytes_ex(cfg, B_max, T_max, &o, &bytes, &err) == 0, "%s", err.msg);
    return bytes;
}

int nm_model_estimate_activation_bytes_ex(const nm_model_config *cfg, int64_t B_max, int64_t T_max,
                                          const nm_model_options *opts, size_t *bytes, nm_error *err) {
    return nm_model_estimate_bytes(cfg, B_max, T_max, opts, bytes, NULL, err);
}

int nm_model_estimate_bytes(const nm_model_config *cfg, int64_t B_max, int64_t T_max, const nm_model_options *opts,
                            size_t *activation_bytes, size_t *bf16_twin_bytes, nm_error *err) {
    nm_model m = {.cfg = *cfg, .B_max = B_max, .T_max = T_max,
                  .recompute = {.full = opts->recompute, .mla_up_proj = opts->recompute_mla_up_proj,
                                .moe_act = opts->recompute_moe_act, .layernorm = opts->recompute_layernorm},
                  .opt_precision = opts->precision};
    m.ep.split = opts->ep_split > 1 ? opts->ep_split : 1;  // the split exchange's second send buffer
    if (set_chunks(&m, opts, err) != 0 || configure(&m, opts, err) != 0) return -1;
    int n_slots = m.pipe.n_slots;
    m.pipe.slots = nm_calloc((size_t)n_slots, sizeof(nm_model_acts));
    m.pipe.block_sets = nm_calloc((size_t)n_slots * (size_t)cfg->n_layers, sizeof(block_acts));
    m.pipe.mtp_sets = nm_calloc((size_t)n_slots * (cfg->M > 0 ? (size_t)cfg->M : 1), sizeof(mtp_acts));
    layout(&m);  // counting pass only (no arena)
    nm_free(m.pipe.slots);
    nm_free(m.pipe.block_sets);
    nm_free(m.pipe.mtp_sets);
    nm_param_table_free(&m.table);
    if (activation_bytes) *activation_bytes = m.arena_used * sizeof(float);
    if (bf16_twin_bytes) *bf16_twin_bytes = (size_t)m.bf16.twin_elems * sizeof(uint16_t);
    return 0;
}
void nm_model_zero_grads(nm_model *m) { m->ops->zero(m->ops, m->grads, (int64_t)m->table.n_floats); }

void nm_model_set_coop(nm_model *m, nm_coop *c, nm_model *partner) {
    m->ep.coop = c;
    m->ep.partner = c ? partner : NULL;
}

void nm_model_ep_stats(nm_model *m, int64_t *rounds, double *recv_max_over_mean, double *overlap_s) {
    *rounds = m->ep.stats_rounds;
    *recv_max_over_mean = m->ep.stats_over_mean;
    *overlap_s = m->ep.overlap_s;
    m->ep.stats_rounds = 0;
    m->ep.stats_over_mean = 0.0;
    m->ep.overlap_s = 0.0;
}

const int64_t *nm_model_expert_counts(const nm_model *m, int *n_moe_layers, const int **layer_ids) {
    if (n_moe_layers) *n_moe_layers = m->routing.n_moe;
    if (layer_ids) *layer_ids = m->routing.layer_ids;
    return m->routing.expert_counts;
}

// --- pipeline stages ------------------------------------------------------------------------

const float *nm_model_stage_output(const nm_model *m) { return m->act.stage_out; }
const float *nm_model_input_grad(const nm_model *m) { return m->scratch.d_res; }
const nm_model_stage *nm_model_get_stage(const nm_model *m) { return &m->pipe.stage; }

int64_t nm_model_slots_per_chunk(const nm_model *m) { return m->pipe.slots_per_chunk; }

int nm_model_set_slot(nm_model *m, int64_t s, nm_error *err) {
    if (s < 0 || s >= m->pipe.n_slots)
        return nm_error_set(err, "model: activation slot %lld outside the %d allocated", (long long)s, m->pipe.n_slots);
    if (s == m->pipe.slot) return 0;
    slot_save(m, &m->pipe.slots[m->pipe.slot]);
    m->pipe.chunk = (int)s / m->pipe.slots_per_chunk;
    m->pipe.stage = m->pipe.chunks[m->pipe.chunk];
    slot_load(m, &m->pipe.slots[s]);
    m->pipe.slot = (int)s;
    return 0;
}
