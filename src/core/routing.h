// routing.h: the router's choices (scoring function, top-k method), named where both the model
// config (model/config.h, which reads them from config.json) and the ops that run them
// (ops/ops.h, nm_router_params) can see them without the ops layer depending on the model.
#pragma once

typedef enum nm_scoring {
    NM_SCORING_SIGMOID = 0,
    NM_SCORING_SOFTMAX = 1,
} nm_scoring;

typedef enum nm_topk_method {
    NM_TOPK_NOAUX_TC = 0,              // biased scores, group score = sum of top-2, keep Gk groups
    NM_TOPK_GREEDY = 1,                // plain top-K of the (biased) scores, no group limit
    NM_TOPK_GROUP_LIMITED_GREEDY = 2,  // group score = max in group (DeepSeek-V2), keep Gk groups
} nm_topk_method;
