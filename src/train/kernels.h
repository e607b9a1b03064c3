// kernels.h: the CPU GEMM kernels chosen by measurement on the model's own shapes, cached
// in the run directory (kernels.c).
#ifndef NM_TRAIN_KERNELS_H
#define NM_TRAIN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"
#include "model/config.h"

// Sets the fp32 (onednn|openblas) and bf16 (onednn|widen) GEMM kernels for this run.
// run_dir/kernels.json, when present and made for the same CPU model, libraries, threads
// and shape set, is reused as is (a resume picks what the run it continues picked); a file
// that does not parse is an error naming it. Otherwise, when `measure` is set, each
// candidate is timed on the distinct GEMMs of one step (rows = tokens per micro-batch) and
// the faster over the whole set wins; the file is then written atomically. NM_CPU_GEMM /
// NM_CPU_BF16_GEMM (not "auto") force a kernel and skip its measurement; NM_CPU_KERNELS=default
// never measures (static defaults). `desc` gets one
// line for the banner.
int nm_kernels_choose(const nm_model_config *m, int64_t rows, const char *run_dir, int measure, char *desc,
                      size_t desc_size, nm_error *err);

// Room for a kernel name ("onednn", "openblas", "widen") with its NUL.
#define NM_KERNEL_NAME_SIZE 16

// Parses the text of a kernels.json (size bytes, NUL not needed) written for `key`: 1 when it
// is a pick for that key (fp32 and bf16, NM_KERNEL_NAME_SIZE bytes each, get the kernel
// names), 0 when it is one for another key (fp32 and bf16 untouched), -1 with err naming path
// when it is not a JSON object with string fields key, fp32 onednn|openblas and bf16
// onednn|widen (kernels_parse.c, so it links without the GEMM libraries).
int nm_kernels_parse(const char *text, size_t size, const char *path, const char *key, char *fp32, char *bf16,
                     nm_error *err);

#endif
