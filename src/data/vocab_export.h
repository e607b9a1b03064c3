// vocab_export.h: a run's tokenizer as the export formats need it (the struct and what it
// holds: io/export_vocab.h). Here, above the io writers, because it reads the tokenizer.
#pragma once

#include "core/check.h"
#include "io/export_vocab.h"

// tokenizer: a tokenizer.json path or "bytes". Returns 0 or -1 naming the file and field.
int nm_export_vocab_load(nm_export_vocab *v, const char *tokenizer, nm_error *err);
