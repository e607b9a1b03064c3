// export_vocab.h: a run's tokenizer in the forms the export formats need: the tokenizer.json
// (and tokenizer_config.json) text for a Hugging Face directory, and the token list, token
// types, merges and pre-tokenizer name llama.cpp reads from GGUF (formats.md 3.5, 3.7, 4).
//
// The tokenizer is a HF byte-level BPE tokenizer.json or the built-in byte tokenizer "bytes".
// "bytes" is written as an equivalent HF tokenizer: the 256 ByteLevel characters as ids 0-255
// in byte order, no merges, "<|endoftext|>" as special added token 256. It encodes every text
// as our byte tokenizer does, except that HF (and llama.cpp with special-token parsing on)
// also matches the literal text "<|endoftext|>" as token 256, which ours never does.
//
// Pre-tokenizers with a llama.cpp equivalent: ByteLevel(use_regex) -> "gpt-2", DeepSeek-V3's
// Split sequence -> "deepseek-v3". Anything else is refused with the pattern named, because
// llama.cpp would silently split text differently.
#pragma once

#include <stdint.h>

#include "core/check.h"

enum {  // llama.cpp token types (gguf-py TokenType)
    NM_TOKEN_NORMAL = 1,
    NM_TOKEN_CONTROL = 3,       // special added tokens
    NM_TOKEN_USER_DEFINED = 4,  // non-special added tokens
    NM_TOKEN_UNUSED = 5,        // ids no token has (padding up to vocab_size)
};

typedef struct nm_export_vocab {
    int64_t n;                  // max id + 1 over vocab and added tokens
    char **tokens;              // (n) HF token strings (ByteLevel form; added tokens as their content); NULL: unused id
    int32_t *types;             // (n) NM_TOKEN_*
    char **merges;              // (n_merges) "left right", in rank order
    int64_t n_merges;
    const char *pre;            // llama.cpp tokenizer.ggml.pre name
    int32_t eod;                // end-of-document id (nm_tokenizer_eod's rule), -1 when none
    char *tokenizer_json;       // tokenizer.json to ship: the file verbatim, or the generated one for "bytes"
    char *tokenizer_config_json; // the tokenizer_config.json next to the file, verbatim; NULL when there is none
} nm_export_vocab;

// Filled by nm_export_vocab_load (data/vocab_export.h, which reads the tokenizer).
void nm_export_vocab_free(nm_export_vocab *v);
