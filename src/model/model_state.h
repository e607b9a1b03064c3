// model_state.h: the model's private state and what the blocks build on. Not a public header:
// nothing outside src/model/ includes it.
//
// The layers of src/model/ (design.md section 2), one way from bottom to top; each file calls
// only what the layers below it (and the ops and comm tables) offer:
//   model_state.h  model_state.c  the state: struct, create/destroy, arena, accessors
//   linear.c bf16_twin.c parallel.c  the precision-dispatching linear layer, the bf16 copies,
//                                  tensor and sequence parallelism
//   blocks.h: mla.c mlp.c moe.c head.c mtp.c  the blocks (moe.c runs its shared experts
//                                  through mlp.c, mtp.c its head through head.c)
//   model.c                        the composition: the decoder block (MLA + FFN) and the
//                                  whole-model forward and backward
#pragma once

#include "model/model.h"

// --- activations ----------------------------------------------------------------------------

// The saved activations that only bf16 GEMMs read (the backward reads them as GEMM operands
// and nothing else). A model created for bf16 keeps them in bf16 only: each block has its own
// bf16 copy (block_acts.saved), and the fp32 pointers of all blocks share one buffer per kind,
// where the forward writes before rounding (bf16_twin.c, "saved in bf16").
typedef enum nm_saved_operand {
    NM_SAVED_A,                 // input_layernorm output
    NM_SAVED_CQ_N,              // q_a_layernorm output
    NM_SAVED_CKV_N,             // kv_a_layernorm output
    NM_SAVED_ACT,               // the dense MLP's SwiGLU output
    NM_SAVED_X_PERM,            // the routed experts' input rows
    NM_SAVED_E_ACT,             // the routed experts' SwiGLU output
    NM_SAVED_X_LOC,             // the rows received by this rank's experts (expert parallelism)
    NM_SAVED_S_ACT,             // the shared experts' SwiGLU output
    NM_SAVED_N
} nm_saved_operand;

// A bf16 copy of an fp32 tensor's rounded values and the range [at, at + n) of it they hold.
typedef struct nm_bf16_copy {
    uint16_t *bits;             // (the tensor's elements)
    int64_t at, n;              // n = 0: none
} nm_bf16_copy;

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
    float *e_out;               // (N*K, D) expert outputs back in x_perm's order
    // expert parallelism: the rows this rank's experts run on in one round of the exchange
    // (moe.c; without it the experts run on x_perm / offsets / e_out directly); e_gate_up and
    // e_act are sized for the expert side (R rows: N*K, or the EP receive capacity ep.cap)
    float *x_loc;               // (R, D) received rows of the round, expert-major
    int64_t *ep_counts;         // (EP*E_loc) rows from source rank s for local expert j at s*E_loc+j
    int64_t *ep_pairs;          // (EP*EP) rows source rank s sends receiver r, at s*EP+r
    int64_t ep_rounds;          // rounds of the exchange (receivers hold at most ep.cap rows each)
    int64_t ep_cap;             // rows a receiver takes per round: ep.cap
    int ep_split;               // 1: the rounds are the split exchange's parts of one exchange that
                                // fits the receive side (each a group of the local experts), each at
                                // its own rows, pipelined and kept (moe.c)
    float *s_gate_up;           // (N, 2Fs) shared experts
    float *s_act;               // (N, Fs)
    float *bal_f;               // (B, E) balance-loss f_i per sequence
    nm_bf16_copy saved[NM_SAVED_N];  // saved in bf16: this block's copies (bits NULL otherwise)
    // saved in fp8 (a model created for fp8, without whole-block recomputation): the routed
    // experts' input rows (x_perm, or x_loc under expert parallelism) as the expert GEMM
    // quantises them, e4m3 codes and one scale per 1 x 128 tile (DeepSeek-V3 caches them so);
    // the fp32 pointer shares one buffer with every block's, refilled in the backward
    uint8_t *x_codes;           // (R, D), NULL otherwise
    float *x_scales;            // (R, ceil(D/128))
    // and the routed experts' SwiGLU inputs the same way, their output made again in the
    // backward (DeepSeek-V3's recipe); e_gate_up and e_act share one buffer each with every block's
    uint8_t *g_codes;           // (R, 2Fe), NULL otherwise
    float *g_scales;            // (R, ceil(2Fe/128))
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

// --- struct nm_model, by group ----------------------------------------------------------------
//
// The model itself (config, backend, parameter table, weights and gradients) sits at the top;
// the rest is grouped by who uses it: the current micro-batch's activations (act), the
// backward's scratch (scratch), what the selective recompute shares (recompute), the bf16
// copies (bf16), the parallel state (tp, ep, pipe), the router statistics (routing) and the
// failure latch (latch).

// One micro-batch's saved activations: pointers into the arena and the shape of the forward
// that filled them. The current one is struct nm_model's `act`; pipeline parallelism keeps
// several in flight (pipe.slots) and nm_model_set_slot swaps them.
typedef struct nm_model_acts {
    block_acts *blocks;         // (n_layers) per decoder block
    mtp_acts *mtp;              // (M) per MTP depth
    int32_t *targets;           // (B, T) main targets, -1 at the last position
    int32_t *tokens;            // (B_max, T_max) copy of the input tokens
    float *stage_in;            // (N, D) the stage's input: the embedding output, or the previous stage's output
    float *stage_out;           // (N, D) its output: the last main block's x_out (stage_in without blocks)
    float *emb_out;             // (N, D) main embedding output = blocks[0].x_in
    float *h0;                  // (N, D) model.norm output
    float *h0_rstd;             // (N)
    float *logits;              // (N, vt) main head tile (all of V when vt == V), then dlogits
    float *losses;              // (N)
    float *lse;                 // (N) logsumexp of each logits row, saved for xent_backward
    double *head_stats;         // (N, 3) running max / exp-sum / target logit across tiles
    int64_t B, T;               // shape of the last forward
    nm_loss_options opt;
    int have_forward;
} nm_model_acts;

// Backward scratch, shared by all blocks (sized for N_max).
typedef struct nm_model_scratch {
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
    nm_gemm_group *groups;      // (E) the experts' grouped GEMMs
} nm_model_scratch;

// Recomputation: whole blocks (full), or Megatron's selective modules, each of which keeps
// one shared buffer instead of one per block and rebuilds it in the backward.
typedef struct nm_model_recompute {
    int full;                   // keep only block inputs/outputs; re-run each block's forward in backward
    int mla_up_proj;            // q and kv not kept per block: one shared pair, recomputed (mla.c)
    float *up_q, *up_kv;        // (N, H_loc, Dqk), (N, H_loc, Dn + Dv): that pair
    int moe_act;                // the routed experts' act not kept per block: one shared buffer (moe.c)
    float *moe_act_buf;         // (R, Fe): that buffer (also for a model saved in fp8)
    float *gate_up_buf;         // (R, 2Fe): saved in fp8, the routed experts' gate_up of every block
    int layernorm;              // the blocks' norm outputs a and f not kept per block (model.c, mla.c)
    float *ln_a, *ln_f;         // (N, D) each: the shared pair
} nm_model_recompute;

typedef struct nm_bf16_twins nm_bf16_twins;

// The bf16 copies the bf16 GEMMs read (bf16 and fp8 modes).
typedef struct nm_model_bf16 {
    // (table.n_floats) the weights rounded to bf16, else NULL; stored as
    // ops->gemm_bf16_weight_type says (bf16, or fp32 holding bf16 values)
    void *weights;
    nm_dtype weights_type;
    int stale;                  // params may differ from weights (the optimizer wrote them)
    int partial;                // the fp32 weights of the copy-only rows are sharded (nm_model_weight_copy_written)
    nm_bf16_twins *twins;       // bf16 copies of rounded activations (bf16_twin.c)
    int64_t twin_elems;         // what the layout registered: the pool's elements
    // Saved in bf16 (a model created for bf16 or fp8 without whole-block recomputation): the
    // GEMM-only saved activations' fp32 storage is one buffer per kind, shared by every block
    int saved_bf16;
    float *saved_fp32[NM_SAVED_N];  // those buffers (NULL: the kind is kept per block; saved in fp8
                                    // too, for the experts' input rows)
    int saved_taken[NM_SAVED_N];    // layout: taken in this pass
    int saved_fp8;              // a model created for fp8 without whole-block recomputation: the
                                // experts' input rows saved as fp8 (block_acts.x_codes), their fp32
                                // buffer shared (saved_fp32[NM_SAVED_X_PERM or NM_SAVED_X_LOC])
} nm_model_bf16;

// Tensor parallelism (docs/parallelism.md): local sizes (the full ones without it).
typedef struct nm_model_tp {
    nm_comm *comm;              // NULL without it
    int sp;                     // sequence parallelism: the residual stream in 1/TP row chunks
    int64_t *sp_counts;         // (TP) per-rank element counts of an all-gather / reduce-scatter
    int64_t H_loc;              // attention heads held here
    int64_t F_loc, Fs_loc;      // dense / shared-expert FFN width held here
    int64_t V_loc, v_start;     // vocabulary rows [v_start, v_start + V_loc) of embedding and head
    int64_t V_valid;            // of them, rows of the real vocabulary (the rest: padding)
    int32_t *ids;               // (N) token ids relative to v_start, -1 where another rank holds the row
    float *partial;             // (N, D) partial sums on their way through an all-reduce
    double *red;                // (3N) cross-entropy statistics reduced over tp
} nm_model_tp;

// Expert parallelism (docs/parallelism.md): dropless all-to-all dispatch and combine, in
// rounds of at most `cap` received rows (moe.c).
typedef struct nm_model_ep {
    nm_comm *comm;              // NULL without it
    int64_t E_loc;              // routed experts held here (E without EP)
    int64_t cap;                // C: rows a rank's experts receive per round (moe_receive_capacity
                                // x the mean N_route*K, at most EP * N_route * min(K, E_loc))
    float *buf;                 // (C, D) rows in source-major order, on their way in or out
    uint16_t *send16;           // (N*K, D) bf16 and fp8 runs: the rows to the experts as sent (fp8:
                                // the gradients), and under fp8 the combine's rows as received
    // fp8 runs (DeepSeek-V3's FP8 dispatch, bf16 combine)
    uint8_t *send8;             // (N*K, D) the rows to the experts as e4m3 codes
    float *send_scales;         // (N*K, ceil(D/128)) their tile scales
    uint8_t *recv8;             // (C, D) codes as received, source-major
    float *recv_scales;         // (C, ceil(D/128)) their scales
    uint16_t *half;             // (C, D) the experts' outputs (forward) or d_x (backward) in bf16
    int64_t *scale_counts;      // (4*EP) the scales' send/recv counts and displacements
    float *d_e_out_loc;         // (C, D) expert side of d_e_out
    float *d_x_loc;             // (C, D) expert side of d_x_perm (in the forward: the experts' outputs)
    int64_t *send, *recv;       // (EP) element counts of this rank's pieces as a source / receiver
    int64_t *send_at, *recv_at; // (EP) their displacements (in x_perm's order / in buf)
    int64_t *cnt_send;          // (EP*E_loc) per (destination, its local expert)
    int64_t *round_counts;      // (EP*E_loc) this round's rows per (source, local expert)
    int32_t *round_offsets;     // (E_loc+1) this round's first row of each local expert in x_loc
    int shared_expert_overlap;  // moe_shared_expert_overlap: the shared experts inside the exchange
    // The split exchange (overlap_moe_expert_parallel_comm, moe.c): each MoE block's exchange in
    // `split` parts whose all-to-alls run while the other parts' experts compute
    int split;                  // parts (1: off)
    struct nm_ep_plan *plans;   // (split) each part's counts, kept while its all-to-alls are in flight
    float *buf2;                // (C, D) the combine's send rows (buf holds the dispatch's meanwhile)
    nm_comm_request *pending[4]; // the all-to-alls in flight while experts compute (nm_ep_progress)
    const struct ep_overlap *overlap;  // work for the next all-to-all of the exchange (moe.c)
    nm_comm_request *in_flight;        // that all-to-all while the work runs (nm_ep_progress)
    struct nm_coop *coop;       // paired micro-batches (nm_model_set_coop): the other job runs
                                // while an all-to-all of this model's is in flight
    struct nm_model *partner;   // ... on this model: its all-to-all tested between our GEMMs
    double overlap_s;           // seconds of that work run with an all-to-all in flight, since the
                                // last nm_model_ep_stats
    int64_t stats_rounds;       // most rounds of any exchange since the last nm_model_ep_stats
    double stats_over_mean;     // most rows any receiver got / the group's mean, since then
} nm_model_ep;

// Pipeline stage (params.h nm_model_stage): main layers [layer_begin, layer_end) here. Under
// the interleaved schedule the rank holds n_chunks stages (model chunks, in layer order) and
// `stage` is the one the current slot belongs to: slot s is chunk s / slots_per_chunk's.
typedef struct nm_model_pipe {
    nm_model_stage stage;
    nm_model_stage chunks[NM_MAX_MODEL_CHUNKS];
    int n_chunks, slots_per_chunk, chunk;
    int chunk_moe_row[NM_MAX_MODEL_CHUNKS + 1];  // the chunk's first row of expert_counts (and n_moe)
    int n_slots, slot;          // activation sets (micro-batches in flight) and the one in use
    nm_model_acts *slots;       // (n_slots); slots[slot] is stale while it is struct nm_model's act
    block_acts *block_sets;     // (n_slots * n_layers)
    mtp_acts *mtp_sets;         // (n_slots * max(M, 1))
} nm_model_pipe;

// What failed inside a pass (struct nm_model's latch).
typedef enum nm_model_fault {
    NM_FAULT_NONE = 0,
    NM_FAULT_TP,                // a tensor-parallel collective
    NM_FAULT_EP,                // the expert-parallel exchange
    NM_FAULT_HOOK,              // the backward hook (the trainer's gradient reduction)
} nm_model_fault;

struct nm_model {
    nm_model_config cfg;        // copy (json_text/source_path borrowed from the caller's config)
    const nm_ops *ops;
    nm_param_table table;
    float *params;              // (table.n_floats)
    float *grads;               // (table.n_floats)
    nm_model *owner;            // a pair's second model (nm_model_create_pair): the first, whose
                                // params, grads and bf16 weight copy these are; else NULL
    nm_precision precision;     // of the linear layers' GEMMs
    nm_precision opt_precision; // nm_model_options.precision: which buffers the arena holds
    int64_t B_max, T_max;
    int64_t vt;                 // output-head vocabulary tile (V: logits stored whole)
    float *rope_cos, *rope_sin; // (T_max, Dr/2)

    // every activation and scratch buffer points into one arena
    float *arena;
    size_t arena_floats;
    size_t arena_used;          // bump pointer while laying out

    nm_model_acts act;          // the current micro-batch's
    nm_model_scratch scratch;
    nm_model_recompute recompute;
    nm_model_bf16 bf16;
    nm_model_tp tp;
    nm_model_ep ep;
    nm_model_pipe pipe;

    // router statistics
    struct {
        int n_moe;
        int *layer_ids;         // (n_moe)
        int64_t *expert_counts; // (n_moe, E)
    } routing;

    nm_backward_hook hook;      // called as each layer's gradients become final (may be NULL)
    void *hook_ctx;

    // The first failure inside a forward or backward, where an op sequence cannot return an
    // error (a tp or ep collective, the backward hook): latched here and reported when the pass
    // returns (nm_model_report_fault); the pass's later collectives are skipped meanwhile.
    struct {
        nm_model_fault kind;
        nm_error err;
    } latch;
};

// The bf16 weight copy of the parameter at float offset off, as m->bf16.weights_type says.
static inline const void *nm_weight_bf16(const nm_model *m, size_t off) {
    size_t elem = m->bf16.weights_type == NM_BF16 ? sizeof(uint16_t) : sizeof(float);
    return (const char *)m->bf16.weights + off * elem;
}


// --- linear layer (linear.c): y = x W^T with PyTorch [out, in] weights ------------------------

// One call of the linear layer y = x W^T (PyTorch [out, in] weights), by named fields; what a
// call leaves out is 0: a row stride of 0 is the matrix's width, a type of 0 is NM_F32, beta 0
// overwrites. W points into m->params; its offset picks the GEMM precision (weight_precision in
// linear.c) and, for the weight gradient, the gradient it adds to (m->grads at the same offset).
// An activation's type is NM_F32, or nm_act_type(m) for one rounded in place by nm_round_act
// (read by a bf16 GEMM as it is); fp32 and fp8 GEMMs read either as floats.
typedef struct nm_linear_args {
    const float *W;             // (OC, IC) weight, in m->params
    int64_t ldw;                // its row stride (a slice of a wider weight, a vocabulary tile)
    int64_t N, IC, OC;          // rows; input and output features
    const float *x;             // (N, IC) input: forward, weight gradient
    nm_dtype x_type;
    int64_t ld_x;
    float *y;                   // (N, OC) output: forward
    int64_t ld_y;
    const float *dy;            // (N, OC) gradient of the output: backward
    nm_dtype dy_type;
    int64_t ld_dy;
    float *dx;                  // (N, IC) gradient of the input: input gradient
    int64_t ld_dx;
    float beta;                 // y, dx: 0 (=), 1 (+=)
} nm_linear_args;

// y (= or += by beta) x . W^T
void nm_linear_forward(const nm_model *m, nm_linear_args a);
// dx (= or += by beta) dy . W      (Dgrad)
void nm_linear_backward_input(const nm_model *m, nm_linear_args a);
// dW += dy^T . x, dW the gradient at W's offset      (Wgrad: both operands are activations)
void nm_linear_backward_weight(const nm_model *m, nm_linear_args a);

// bf16 activations rounded once where they are produced (as Megatron stores them in bf16),
// not by every GEMM that reads them: in bf16 precision x(n) (=) bf16(x) in place, then read
// as nm_act_type(m) == NM_F32_BF16. Only for tensors that nothing but bf16 GEMMs reads (an
// fp32 consumer, e.g. the router on the FFN norm output, would see rounded values), so the
// GEMMs see the same operands as when they rounded per call. No-op in fp32 and fp8 (the fp8
// GEMMs quantise their own fp32 inputs).
// With a bf16 GEMM that reads bf16 storage (oneDNN's), the rounding also writes a bf16 copy
// (bf16_twin.c) that nm_bf16_operand hands the GEMM instead of the fp32 storage.
void nm_round_act(const nm_model *m, float *x, int64_t n);
// The saved GEMM-only activations (nm_saved_operand's kinds) hold bf16 values under bf16 and
// fp8 (DeepSeek-V3's fp8 recipe keeps activations in bf16 and quantises them per GEMM): 1 then.
int nm_saved_in_bf16(const nm_model *m);
// x(n) (=) bf16(x), as nm_round_act, also under fp8: for the saved kinds' tensors (the norms'
// outputs that feed the attention projections). Saved in bf16, the bound block's copy gets them.
void nm_round_saved(const nm_model *m, float *x, int64_t n);
// act(N,F) (=) swiglu(gate_up(N,2F)) and d_gate_up(N,2F) (=) its gradient from d_act(N,F);
// under bf16 the output comes out as nm_round_act would leave it (rounded, with its twin),
// in the same pass (swiglu_forward_bf16, swiglu_backward_bf16); act also under fp8, as
// nm_round_saved would leave it (act is a saved kind).
void nm_swiglu_forward(const nm_model *m, float *act, const float *gate_up, int64_t N, int64_t F);
void nm_swiglu_backward(const nm_model *m, float *d_gate_up, const float *d_act, const float *gate_up, int64_t N,
                        int64_t F);
// dst(N*K, D) (=) the rows of src(N, D) in expert order (ops moe_gather); under bf16 and fp8
// rounded, with their copy, as nm_round_saved would leave them, in the same pass (moe_gather_bf16).
void nm_moe_gather(const nm_model *m, float *dst, const float *src, const int32_t *perm, int64_t N, int64_t K,
                   int64_t D);
// The storage a bf16 GEMM reads for operand x (rows, cols; leading dimension ld) of type
// *type: its bf16 twin (and *type = NM_BF16) when it is NM_F32_BF16 and covered by one, else x.
const void *nm_bf16_operand(const nm_model *m, const float *x, nm_dtype *type, int64_t rows, int64_t cols,
                            int64_t ld);
// The same for the groups of a grouped bf16 GEMM, in place: all of one operand, or none.
void nm_bf16_operand_groups(const nm_model *m, nm_gemm_group *groups, int64_t n, nm_transpose ta, nm_transpose tb,
                            nm_dtype *a_type, nm_dtype *b_type);
nm_bf16_twins *nm_bf16_twins_create(const nm_ops *ops);
void nm_bf16_twins_destroy(nm_bf16_twins *t);
// A tensor of n elements at base (in the arena) that only bf16 GEMMs read, registered in
// address order when the arena is laid out; its twin's place in the pool is fixed then.
void nm_bf16_twins_register(nm_bf16_twins *t, const float *base, int64_t n);
// The shared fp32 buffer of a kind saved in bf16: its copy is the current block's
// (nm_bf16_bind), never the pool's.
void nm_bf16_twins_register_saved(nm_bf16_twins *t, const float *base, int64_t n, nm_saved_operand kind);
// Block b's saved copies become those its kinds' shared buffers stand for: each block's forward
// and backward starts with it (saved in bf16).
void nm_bf16_bind(const nm_model *m, block_acts *b);
// The shared buffer of a kind saved in bf16 at x (=) the bound block's copy, widened over the
// range it holds: for an fp32 reader of a saved operand in the backward (the expert
// exchange's repeated dispatch). No-op for any other tensor.
void nm_bf16_restore(const nm_model *m, float *x);
// Under fp8, saved in bf16: every kind's shared buffer (=) the bound block's copy, widened over
// the range it holds, for the backward's fp8 GEMMs (they read fp32 storage). Each block's
// backward starts with it, after nm_bf16_bind. No-op otherwise (bf16 GEMMs read the copies).
void nm_bf16_restore_block(const nm_model *m);
int64_t nm_bf16_twins_pool_elems(int64_t n);  // pool elements one such tensor takes
// Allocates the pool (once; the first bf16 forward with a GEMM that reads bf16 storage).
void nm_bf16_twins_reserve(nm_bf16_twins *t);
int64_t nm_bf16_twins_misses(const nm_bf16_twins *t);  // roundings of unregistered tensors
int64_t nm_bf16_twins_elems(const nm_bf16_twins *t);   // the pool's elements, as registered
static inline nm_dtype nm_act_type(const nm_model *m) {
    return m->precision == NM_PRECISION_BF16 ? NM_F32_BF16 : NM_F32;
}

// --- the failure latch (parallel.c) ------------------------------------------------------------

// 1 once a failure is latched: the pass skips its remaining collectives (the rank reports it
// when the pass returns and the job stops).
static inline int nm_model_faulted(const nm_model *m) { return m->latch.kind != NM_FAULT_NONE; }
// Latches e as the pass's failure of this kind, unless one is latched already.
void nm_model_latch(nm_model *m, nm_model_fault kind, const nm_error *e);
// The latched failure into err, prefixed with the pass ("forward", "backward") and what failed,
// and the latch cleared: -1; 0 when nothing failed.
int nm_model_report_fault(nm_model *m, const char *pass, nm_error *err);

// --- tensor parallelism (parallel.c) -------------------------------------------------------------

// buf (n floats) summed over the tp group in place; a failure is latched and reported when the
// forward or backward returns. No-op without tensor parallelism.
void nm_tp_all_reduce(nm_model *m, float *buf, int64_t n);
// 1 where this rank contributes what every tp rank computes alike (the residual stream, the
// routed experts): tp rank 0, or always without tensor parallelism.
static inline int nm_tp_lead(const nm_model *m) { return !m->tp.comm || m->tp.comm->rank == 0; }
// out(N, D) (=) the embedding rows of tokens(N), vocabulary-parallel: each rank looks up the
// ids it holds (zeros elsewhere) and the rows are all-reduced over tp.
void nm_tp_embedding_forward(nm_model *m, float *out, const int32_t *tokens, int64_t N);
// d embedding (+=) for the rows this rank holds.
void nm_tp_embedding_backward(nm_model *m, const float *dout, const int32_t *tokens, int64_t N);

// Sequence parallelism: the rows [*start, *start + *n) of N that this tp rank holds (rank q of
// TP: [q N / TP, (q+1) N / TP)); all of [0, N) without it. A row-chunked buffer keeps its rows
// at their place in the full (N, width) buffer, so the collectives below work in place.
void nm_sp_rows(const nm_model *m, int64_t N, int64_t *start, int64_t *n);
// Every rank's chunk of buf (N, width) to every rank (no-op without sequence parallelism).
void nm_sp_all_gather(nm_model *m, void *buf, int64_t N, int64_t width, nm_comm_dtype dt);
// buf (N, width) summed over tp, each rank left with its chunk (no-op without it).
void nm_sp_reduce_scatter(nm_model *m, float *buf, int64_t N, int64_t width);

// The parallel linear layers' collectives (Megatron's mappings), the same calls under every
// tp / sp setting. A column-parallel layer (q/kv up-projections, gate/up) reads every token's
// rows of its input (nm_sp_all_gather first) and writes its own output columns. A
// row-parallel layer (o_proj, down_proj) adds this rank's part of every token's output:
// nm_tp_row_output_begin readies out(N, D) for it (without sequence parallelism tp rank 0
// starts from the residual and the others from 0, so the all-reduce adds the residual once;
// with it 0), and nm_tp_row_output_end sums the parts over tp (all-reduced; reduce-scattered
// to this rank's rows under sequence parallelism, the residual then added to them).
void nm_tp_row_output_begin(nm_model *m, float *out, const float *residual, int64_t N, int64_t D);
void nm_tp_row_output_end(nm_model *m, float *out, const float *residual, int64_t N, int64_t D);
// buf(N, D) holds this rank's part of every token's rows (a column-parallel layer's input
// gradient, a vocabulary shard's embedding rows): their sum over tp, whole, or this rank's
// rows under sequence parallelism (the backward of the input's all-gather). No-op without tp.
void nm_tp_sum_parts(nm_model *m, float *buf, int64_t N, int64_t D);
// The split exchange's per-part counts (moe.c), for a model with ep.split > 1.
typedef struct nm_ep_plan nm_ep_plan;
void nm_ep_plans_create(nm_model *m);
void nm_ep_plans_destroy(nm_model *m);

// Lets the expert all-to-all in flight (moe_shared_expert_overlap) move: MPI progresses a
// non-blocking collective only inside MPI calls, so the work that overlaps it calls this
// between its GEMMs. A no-op when none is in flight.
void nm_ep_progress(nm_model *m);
// Paired micro-batches: the same for the partner's all-to-all, in flight while m computes
// (every linear layer's GEMM calls it). A no-op unpaired.
void nm_ep_progress_partner(const nm_model *m);

// The stage's layers in forward order: main layers [layer_begin, layer_end), then the MTP
// blocks L .. L+M-1 on the last stage.
static inline int64_t stage_next_layer(const nm_model *m, int64_t l) {
    l = l < 0 ? m->pipe.stage.layer_begin : l + 1;
    if (l >= m->pipe.stage.layer_end && l < m->cfg.L) l = m->cfg.L;  // past the stage's main layers
    if (l >= m->cfg.L && !m->pipe.stage.last) return -1;
    return l < m->cfg.n_layers ? l : -1;
}
#define FOR_STAGE_LAYERS(m, l) for (int64_t l = stage_next_layer(m, -1); l >= 0; l = stage_next_layer(m, l))
