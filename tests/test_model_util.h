// test_model_util.h: the small model the whole-model C tests share (test_recompute,
// test_vocab_tile): 3 layers (1 dense, 2 MoE with 8 experts, groups), 2 MTP depths, V = 300,
// so every code path of the model runs in milliseconds. Parsed and laid out by
// test_model_open; test_model_close frees both.
#pragma once

#include <stdio.h>

#include "model/model.h"

static const char *test_model_json =
    "{\"vocab_size\": 300, \"hidden_size\": 64, \"intermediate_size\": 128, \"moe_intermediate_size\": 32,"
    " \"num_hidden_layers\": 3, \"num_nextn_predict_layers\": 2, \"num_attention_heads\": 2,"
    " \"num_key_value_heads\": 2, \"q_lora_rank\": 32, \"kv_lora_rank\": 16, \"qk_nope_head_dim\": 16,"
    " \"qk_rope_head_dim\": 8, \"v_head_dim\": 16, \"n_routed_experts\": 8, \"n_shared_experts\": 1,"
    " \"num_experts_per_tok\": 2, \"n_group\": 4, \"topk_group\": 2, \"first_k_dense_replace\": 1,"
    " \"initializer_range\": 0.05}";

// cfg and its parameter table t; 0, or -1 after printing why.
static inline int test_model_open(nm_model_config *cfg, nm_param_table *t, const char *test_name) {
    nm_error err;
    if (nm_model_config_parse(cfg, test_model_json, test_name, &err) != 0 || nm_param_table_build(t, cfg, &err) != 0) {
        fprintf(stderr, "%s: %s\n", test_name, err.msg);
        return -1;
    }
    return 0;
}

static inline void test_model_close(nm_model_config *cfg, nm_param_table *t) {
    nm_param_table_free(t);
    nm_model_config_free(cfg);
}
