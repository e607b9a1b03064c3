// prepare.h: text / JSONL -> Megatron .bin/.idx (what `nanomegatron prepare` runs), the
// equivalent of Megatron's tools/preprocess_data.py (formats.md 1.4).
//
// Inputs:
//  - plain text: one document per block of non-blank lines (blank = empty or only spaces,
//    tabs, CR); the document is the block's bytes without the newline after its last line.
//    With doc_per_file, each file is one document, every byte of it.
//  - JSONL (".jsonl"/".json" extension, or jsonl = 1): one JSON object per line (blank lines
//    skipped); the json_key field is the document: a string, or a list of strings that are
//    already-split sentences (one sequence each, as Megatron). A line that does not parse,
//    is not an object or lacks the string field is an error naming file:line.
// Output follows Megatron exactly: empty sentences are dropped, a document that tokenizes to
// nothing still adds a (repeated) document index, and with append_eod the EOD id is appended
// to the last sentence of every non-empty document (not a sequence of its own). Token dtype:
// uint16 when vocab < 65500, else int32 (optimal_dtype). Both files appear atomically.
//
// Documents are tokenized in batches by `workers` OpenMP threads and written in input order,
// so the output does not depend on the worker count.
#pragma once

#include <stdint.h>

#include "core/check.h"

typedef struct nm_prepare_opts {
    const char *const *inputs;  // input files
    int n_inputs;
    const char *tokenizer;      // tokenizer.json path, or "bytes"
    const char *out_prefix;     // writes out_prefix.bin / out_prefix.idx
    const char *json_key;       // JSONL field, NULL = "text"
    int jsonl;                  // 1: every input is JSONL; 0: decide by extension
    int doc_per_file;           // plain text: one document per file
    int append_eod;             // append the tokenizer's EOD to each non-empty document
    int workers;                // tokenizer threads; 0 = OpenMP default
    int progress;               // -1: when stderr is a terminal or input > 64 MB; 0 off; 1 on
} nm_prepare_opts;

typedef struct nm_prepare_stats {
    int64_t bytes;              // input bytes
    int64_t docs, seqs, tokens; // written
    int dtype;                  // NM_IDX_* code written
    double seconds;             // wall time, tokenizer load included
} nm_prepare_stats;

int nm_prepare_run(const nm_prepare_opts *opts, nm_prepare_stats *stats, nm_error *err);
