// indexed.h: Megatron-LM IndexedDataset (PREFIX.bin + PREFIX.idx, the "MMIDIDX" format),
// read through mmap with full validation, and a streaming writer.
//
// Layout (formats.md 1.2-1.5): a 34-byte header (magic "MMIDIDX\0\0", u64 version 1, u8 dtype
// code, u64 S sequences, u64 Dc document-index entries), then int32 lengths[S], int64
// pointers[S] (byte offsets into .bin), int64 document_indices[Dc]; .bin is the raw tokens.
// The arrays are unaligned in the file (the int32 array starts at offset 34), so every read
// goes through memcpy, never a cast pointer.
//
// What open() checks, each failure naming the file, the field and the numbers: magic,
// version, dtype code (1,2,3,4,5,8; the float codes 6/7 are refused as tokens), .idx size
// == 34 + 12 S + 8 Dc (+ S for a multimodal modes array, which is accepted and ignored),
// lengths >= 0, pointers equal to the running sum of lengths * itemsize (that is Megatron's
// writer, including its add_index merge) and every sequence inside .bin, .bin size ==
// total tokens * itemsize, document indices starting at 0, non-decreasing, last == S.
// After a successful open every read is in bounds: the fuzzer (tests/fuzz) holds us to that.
//
// Not provided: the old TNTIDX format, sequence modes, writing codes other than 4 and 8.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

// dtype codes of Megatron's DType enum (formats.md 1.2).
enum {
    NM_IDX_UINT8 = 1,
    NM_IDX_INT8 = 2,
    NM_IDX_INT16 = 3,
    NM_IDX_INT32 = 4,
    NM_IDX_INT64 = 5,
    NM_IDX_FLOAT64 = 6,         // refused: not a token type (and its meaning changed in 2023)
    NM_IDX_FLOAT32 = 7,         // refused, same reason
    NM_IDX_UINT16 = 8,
};

#define NM_IDX_HEADER_SIZE 34

// An open dataset. Fields are read-only for users; the arrays live in the mapped .idx.
typedef struct nm_indexed {
    char *name;                 // prefix (or a label for in-memory data), for messages
    int dtype;                  // NM_IDX_* code of .bin
    int itemsize;               // bytes per token
    int64_t n_seqs;             // S
    int64_t n_docs;             // Dc - 1
    int64_t n_tokens;           // sum of lengths
    int32_t max_len;            // longest sequence
    const uint8_t *idx;         // the .idx bytes (mapped or owned)
    size_t idx_size;
    const uint8_t *bin;         // the .bin bytes (mapped or owned)
    size_t bin_size;
    int idx_owned, bin_owned;   // 1: nm_free on close, 0: munmap, -1: borrowed (left alone)
} nm_indexed;

// Token item size for a code, 0 if the code is unknown or not a token type.
int nm_indexed_itemsize(int dtype);
const char *nm_indexed_dtype_name(int dtype);
// Megatron's optimal_dtype: uint16 (8) when vocab < 65500, else int32 (4).
int nm_indexed_dtype_for_vocab(int64_t vocab_size);

// Opens PREFIX.idx / PREFIX.bin (mmap) and validates them. *out is set only on success.
int nm_indexed_open(nm_indexed **out, const char *prefix, nm_error *err);
// The same on bytes in memory. If own is set, the buffers pass to the dataset (nm_free on
// close, also when the open fails); otherwise they must outlive it.
int nm_indexed_open_memory(nm_indexed **out, const char *name, const void *idx, size_t idx_size, const void *bin,
                           size_t bin_size, int own, nm_error *err);
void nm_indexed_close(nm_indexed *ds);

// Index arrays (i in [0, S), d in [0, Dc)); programmer errors on bad indices panic.
int32_t nm_indexed_seq_len(const nm_indexed *ds, int64_t i);
int64_t nm_indexed_seq_ptr(const nm_indexed *ds, int64_t i);
int64_t nm_indexed_doc_index(const nm_indexed *ds, int64_t d);

// Tokens [offset, offset+n) of sequence i as int32 (Megatron's get(idx, offset, length)).
// The range must lie inside the sequence (panics otherwise). Fails only for int64 data
// holding a value outside int32.
int nm_indexed_read(const nm_indexed *ds, int64_t i, int64_t offset, int64_t n, int32_t *out, nm_error *err);

// --- writer ------------------------------------------------------------------------------------
//
// Streams tokens into PREFIX.bin.tmp.<pid> and keeps lengths and document indices in memory
// (12 bytes per sequence, 8 per document); finalize writes PREFIX.idx the same way and
// renames both (.bin first, so a reader never pairs a new .idx with an old .bin of the same
// size). Mirrors Megatron's IndexedDatasetBuilder: add_document = add_item per sentence +
// end_document.

typedef struct nm_indexed_writer nm_indexed_writer;

// dtype: NM_IDX_UINT16 or NM_IDX_INT32 (or any readable token code).
int nm_indexed_writer_create(nm_indexed_writer **out, const char *prefix, int dtype, nm_error *err);
// One document of one sequence. Tokens must fit the dtype.
int nm_indexed_writer_add_document(nm_indexed_writer *w, const int32_t *tokens, int64_t n, nm_error *err);
// One sequence (sentence) of the current document; end_document closes the document.
int nm_indexed_writer_add_item(nm_indexed_writer *w, const int32_t *tokens, int64_t n, nm_error *err);
int nm_indexed_writer_end_document(nm_indexed_writer *w, nm_error *err);
int64_t nm_indexed_writer_tokens(const nm_indexed_writer *w);
int64_t nm_indexed_writer_docs(const nm_indexed_writer *w);
int64_t nm_indexed_writer_seqs(const nm_indexed_writer *w);
// Writes .idx and renames both files into place. The writer must still be destroyed.
int nm_indexed_writer_finalize(nm_indexed_writer *w, nm_error *err);
// Frees the writer; deletes the temporary files if finalize did not succeed. NULL-safe.
void nm_indexed_writer_destroy(nm_indexed_writer *w);

// Concatenates datasets into out_prefix, as Megatron's tools/merge_datasets.py: every
// dataset's sequences and documents in the order given, document boundaries kept. The token
// dtypes must agree (the error names the first that differs). Both files appear atomically.
int nm_indexed_merge(const char *const *prefixes, int n, const char *out_prefix, int64_t *docs, int64_t *tokens,
                     nm_error *err);

// Serialises an .idx into memory (for in-memory datasets): lengths[S], doc_index[Dc].
// Returns the malloc'd bytes (34 + 12 S + 8 Dc of them) in *idx.
void nm_indexed_build_idx(int dtype, const int32_t *lengths, int64_t S, const int64_t *doc_index, int64_t Dc,
                          uint8_t **idx, size_t *idx_size);
