// model_dir.h: what --model names, resolved the same way by every command that takes it
// (forward, eval, sample, export, inspect): a Hugging Face model directory, or a run
// directory (its newest valid checkpoint, or step_N), with the tokenizer to use.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

// model: the --model argument; step: a run's checkpoint step, or -1 for the newest. Fills dir
// with the model directory to read and, when tok is not NULL, tok with the tokenizer (the one
// the run trained with per trainer.json, else the directory's tokenizer.json, else "bytes").
// -1 with err naming the path and what it is instead (a file, no config.json, no checkpoint).
int nm_resolve_model_dir(const char *model, int64_t step, char *dir, size_t cap, char *tok, size_t tok_cap,
                         nm_error *err);
