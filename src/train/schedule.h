// schedule.h: learning-rate schedules and the two step-switched training weights (MTP
// lambda and the bias-update speed gamma), as pure functions of the step.
//
// Step convention used everywhere in this file: `step` is 1-based, the number of the
// optimizer step about to be applied (the same number metrics.jsonl writes). Warm-up is
// linear from 0: step s <= W gets lr_max * s / W, so the first step already moves (unlike
// Megatron's step 0 at lr 0) and step W reaches lr_max.
//
// Shapes (lr_max = L, lr_min = l, warm-up W, S = total steps):
//   constant    warm-up, then L.
//   cosine      warm-up, then l + (L-l)/2 (1 + cos(pi p)), p = (s-W)/(S-W), l at s = S.
//   wsd         warm-up, L until the last `decay_steps` = round(decay_fraction * S) steps,
//               then linear  L - (L-l) p   or   1-sqrt  l + (L-l)(1 - sqrt(p)),
//               p = (s - (S - decay_steps)) / decay_steps; l at s = S.
//   wsd-cosine  DeepSeek-V3 [dsv3-spec 6.4]: warm-up, L through step decay_start, then the
//               cosine above over decay_steps steps (p = (s - decay_start)/decay_steps), then l.
// Steps past S stay at the last value (l, or L for constant).
#pragma once

#include <stdint.h>

typedef enum nm_lr_schedule_type {
    NM_LR_CONSTANT = 0,
    NM_LR_COSINE = 1,
    NM_LR_WSD = 2,
    NM_LR_WSD_COSINE = 3,
} nm_lr_schedule_type;

typedef enum nm_wsd_decay {
    NM_WSD_LINEAR = 0,
    NM_WSD_SQRT = 1,            // "1-sqrt" (Hagele et al. 2024)
} nm_wsd_decay;

typedef struct nm_lr_schedule {
    nm_lr_schedule_type type;
    double lr_max;              // L
    double lr_min;              // l (unused by constant)
    int64_t warmup_steps;       // W (0: no warm-up)
    int64_t total_steps;        // S
    int64_t decay_start;        // wsd-cosine: last step at lr_max
    int64_t decay_steps;        // wsd-cosine: cosine length
    double decay_fraction;      // wsd: fraction of S spent decaying, in (0, 1]
    nm_wsd_decay wsd_decay;     // wsd: shape of the decay
} nm_lr_schedule;

// Name <-> enum ("constant", "cosine", "wsd", "wsd-cosine"; "linear", "1-sqrt").
// Parsing returns -1 for an unknown name.
const char *nm_lr_schedule_name(nm_lr_schedule_type t);
int nm_lr_schedule_parse(const char *name, nm_lr_schedule_type *out);
const char *nm_wsd_decay_name(nm_wsd_decay d);
int nm_wsd_decay_parse(const char *name, nm_wsd_decay *out);

// Learning rate for 1-based step s. The schedule must be valid (train_config.c checks the
// fields a user can set; this function NM_CHECKs only what would make it divide by zero).
double nm_lr_at(const nm_lr_schedule *s, int64_t step);

// MTP loss weight lambda [dsv3-spec 6.3]: `weight` for steps 1..switch_step, `weight_after`
// afterwards; switch_step <= 0 never switches.
double nm_mtp_weight_at(double weight, double weight_after, int64_t switch_step, int64_t step);

// Bias-update speed gamma [dsv3-spec 6.1]: `gamma` for the updates after steps
// 1..stop_step, 0 afterwards; stop_step <= 0 never stops.
double nm_bias_gamma_at(double gamma, int64_t stop_step, int64_t step);
