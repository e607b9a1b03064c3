// nanomegatron.h: the public C API (design.md 9).
//
//   nm_train_config cfg;
//   nm_train_config_load(&cfg, "configs/tiny-train.json", overrides, n_overrides, &err);
//   nm_trainer *t;
//   nm_trainer_create(&t, &cfg, &opts, &err);        // owns model, optimizer, data, logs
//   nm_step_metrics m;
//   while (nm_trainer_step(t, &m, &err) > 0) {
//       if (m.step % 100 == 0) printf("step=%ld loss=%.3f\n", (long)m.step, m.loss);
//   }
//   nm_trainer_save(t, &err);
//   nm_trainer_destroy(t);
//
// The low-level layer for writing one's own loop is re-exported below: the model
// (nm_model_create, nm_model_forward, nm_model_backward), the optimizer
// (nm_optimizer_create, nm_optimizer_step), the data loader, the checkpoint functions and
// Hugging Face model directories (nm_hf_dir_load_config / load_params / save).
// Every function returns 0 (or a documented positive value) on success and -1 with an
// nm_error message on failure; library code never exits.
#pragma once

#include <stdint.h>

#include "core/check.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "io/hf_dir.h"
#include "model/config.h"
#include "model/model.h"
#include "ops/ops.h"
#include "train/checkpoint.h"
#include "train/optim.h"
#include "train/train_config.h"
#include "train/trainer.h"
