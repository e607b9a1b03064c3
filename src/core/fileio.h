// fileio.h: the file helpers every writer uses, so that nothing is ever half-written.
//
// Atomic write protocol (design.md 8): write to "<path>.tmp.<pid>", fflush, fsync, close,
// rename over <path>, fsync the directory. A crash at any point leaves either the old file
// or the new one, never a torn one.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/check.h"

typedef struct nm_atomic_file {
    FILE *fp;                   // write here
    char *path;                 // final name
    char *tmp_path;             // temporary name, renamed on commit
} nm_atomic_file;

int nm_atomic_open(nm_atomic_file *f, const char *path, nm_error *err);
// Flush, fsync, close, rename, fsync the parent directory. Frees the struct's strings.
int nm_atomic_commit(nm_atomic_file *f, nm_error *err);
// Close and delete the temporary file (NULL-safe, idempotent).
void nm_atomic_abort(nm_atomic_file *f);

// fwrite that reports the path on failure (disk full, ...).
int nm_fwrite_all(FILE *fp, const void *data, size_t size, const char *path, nm_error *err);

// The whole file at path, written atomically (nm_atomic_open, then commit; the temporary file
// removed on a failed write): data (size bytes).
int nm_file_write_atomic(const char *path, const void *data, size_t size, nm_error *err);

// Reads a whole file into a NUL-terminated heap buffer (free with nm_free). Regular files,
// FIFOs, pipes and process substitutions (<(cmd)) alike; a directory is an error naming it.
int nm_file_read_all(const char *path, char **data, size_t *size, nm_error *err);
// The same for a file that must hold JSON: an empty (or all-blank) file is an error naming
// the file, not a parser's "malformed JSON at line 1".
int nm_file_read_json(const char *path, char **data, size_t *size, nm_error *err);

// For an output directory that must be new: 0 when path does not exist or is an empty
// directory; otherwise an error saying what is there (a file, or the first entry of a
// non-empty directory and how many more). Callers add the fix (choose a new path).
int nm_dir_check_new(const char *path, nm_error *err);

// fsync a directory (after renames inside it).
int nm_fsync_dir(const char *dir, nm_error *err);

// mkdir -p.
int nm_mkdir_p(const char *path, nm_error *err);

// CRC-32C (Castagnoli), the checksum used for checkpoint files and TensorBoard records.
uint32_t nm_crc32c(uint32_t crc, const void *data, size_t size);
