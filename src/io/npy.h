// npy.h: numpy's .npy files (format version 1.0), as Megatron caches its dataset indices
// (docs/formats.md 1.7 j): the 6-byte magic "\x93NUMPY", version 1.0, a little-endian uint16
// header length, then a Python dict literal {'descr': '<i4', 'fortran_order': False,
// 'shape': (n,), } padded with spaces to a 64-byte boundary and ended by '\n', then the C-order
// data. numpy.load reads what nm_npy_write writes; nm_npy_map reads what numpy.save writes
// for these dtypes (int32 '<i4', int64 '<i8', uint32 '<u4', int16 '<i2').
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

// Writes data (C order, shape[0..ndim), ndim 1 or 2) with dtype descr atomically (temporary
// file, fsync, rename: core/fileio.h).
int nm_npy_write(const char *path, const char *descr, const int64_t *shape, int ndim, const void *data,
                 nm_error *err);

// A read-only memory map of a .npy file; data points at its first element.
typedef struct nm_npy {
    void *map;
    size_t map_size;
    const void *data;
    char descr[8];
    int ndim;
    int64_t shape[2];
} nm_npy;

// Maps path after checking it as a whole: the magic, a version 1.0 or 2.0 header that parses,
// C order, 1 or 2 dimensions, one of the dtypes above, and a file size equal to the header
// plus the data. -1 with err naming the file and what is wrong (missing, malformed,
// truncated); nothing mapped then.
int nm_npy_map(nm_npy *out, const char *path, nm_error *err);
void nm_npy_unmap(nm_npy *m);

// Bytes of one element of a supported descr, or 0.
size_t nm_npy_elem_size(const char *descr);
