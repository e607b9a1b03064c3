// export_vocab.c: the export vocabulary's memory (export_vocab.h). Filling one from a tokenizer
// is the data layer's (data/vocab_export.c): the writers here only read it.
#include "io/export_vocab.h"

#include <string.h>

void nm_export_vocab_free(nm_export_vocab *v) {
    for (int64_t i = 0; v->tokens && i < v->n; i++) nm_free(v->tokens[i]);
    for (int64_t i = 0; v->merges && i < v->n_merges; i++) nm_free(v->merges[i]);
    nm_free(v->tokens);
    nm_free(v->types);
    nm_free(v->merges);
    nm_free(v->tokenizer_json);
    nm_free(v->tokenizer_config_json);
    memset(v, 0, sizeof(*v));
    v->eod = -1;
}
