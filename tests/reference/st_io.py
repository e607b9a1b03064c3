"""st_io.py: minimal safetensors reader/writer on numpy, independent of the C code.

File layout: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
block (offsets relative to its start). Reads F32, F64, BF16, F16, I32, I64; writes F32 (default),
F64 or BF16 (round to nearest even).
"""
import json
import struct

import numpy as np

_NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32, "I64": np.int64,
       "U8": np.uint8, "I8": np.int8}


def bf16_to_f32(raw_u16):
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


def load(path):
    """Returns (dict name -> float32/int numpy array, metadata dict)."""
    header, base = read_header(path)
    meta = header.pop("__metadata__", {}) or {}
    with open(path, "rb") as f:
        blob = f.read()
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        raw = blob[base + b: base + e]
        shape = tuple(info["shape"])
        dt = info["dtype"]
        if dt == "BF16":
            arr = bf16_to_f32(np.frombuffer(raw, dtype="<u2"))
        elif dt in _NP:
            arr = np.frombuffer(raw, dtype=np.dtype(_NP[dt]).newbyteorder("<")).astype(_NP[dt])
        else:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, dt))
        out[name] = arr.reshape(shape).copy()
    return out, meta


def save(path, tensors, dtype="F32", metadata=None):
    """Writes tensors (name -> array) in sorted name order. dtype: F32, F64 or BF16."""
    header = {}
    chunks = []
    off = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if dtype == "BF16":
            raw = f32_to_bf16(a).astype("<u2").tobytes()
        elif dtype == "F64":
            raw = np.ascontiguousarray(a, dtype="<f8").tobytes()
        else:
            raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)
