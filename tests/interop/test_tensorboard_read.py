"""test_tensorboard_read.py: parse our TensorBoard event file with an independent reader.

`$NM_BUILD/test_tensorboard --write DIR` writes the file (contents listed in
tests/test_tensorboard.c). The reader below is written from the format description
(formats.md 5: TFRecord framing with masked CRC32C; Event / Summary / Summary.Value
protobufs), not from our C: a bitwise CRC32C, a generic protobuf wire-format decoder, and
the field numbers of event.proto / summary.proto. If the `tensorboard` or `tensorflow`
package is importable, the file is also read with theirs.
"""
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nm_skip import skip  # noqa: E402


# --- CRC32C (Castagnoli, reflected 0x82F63B78), bit by bit ---------------------------------------
def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format ------------------------------------------------------------------------
def read_varint(buf: bytes, pos: int):
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 63:
            raise ValueError("varint too long")


def decode_fields(buf: bytes):
    """List of (field_number, wire_type, value) with value int / bytes."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((field, wire, value))
    if pos != len(buf):
        raise ValueError("message overruns its length")
    return out


def decode_event(payload: bytes) -> dict:
    ev = {"step": 0, "values": []}
    for field, wire, value in decode_fields(payload):
        if field == 1 and wire == 1:
            ev["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2 and wire == 0:
            ev["step"] = value - (1 << 64) if value >= 1 << 63 else value  # int64
        elif field == 3 and wire == 2:
            ev["file_version"] = value.decode("utf-8")
        elif field == 5 and wire == 2:
            for f2, w2, v2 in decode_fields(value):
                assert (f2, w2) == (1, 2), "Summary holds only repeated Value"
                tag, simple = None, None
                for f3, w3, v3 in decode_fields(v2):
                    if (f3, w3) == (1, 2):
                        tag = v3.decode("utf-8")
                    elif (f3, w3) == (2, 5):
                        simple = struct.unpack("<f", v3)[0]
                    else:
                        raise ValueError(f"unexpected Value field {f3}")
                ev["values"].append((tag, simple))
        else:
            raise ValueError(f"unexpected Event field {field} wire {wire}")
    return ev


def read_records(data: bytes):
    pos, events = 0, []
    while pos < len(data):
        assert pos + 12 <= len(data), "truncated header"
        (length,) = struct.unpack_from("<Q", data, pos)
        (len_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert len_crc == masked_crc(data[pos:pos + 8]), f"bad length crc at {pos}"
        payload = data[pos + 12:pos + 12 + length]
        assert len(payload) == length, "truncated payload"
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert data_crc == masked_crc(payload), f"bad payload crc at {pos}"
        events.append(decode_event(payload))
        pos += 12 + length + 4
    return events


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def expected_scalars():
    """(tag, step) -> value, as tests/test_tensorboard.c writes them."""
    want = {}
    for s in range(1, 51):
        want[("train/loss", s)] = f32(f32(10.0) / f32(float(s)))
        want[("train/lr", s)] = f32(f32(float(s)) * f32(1e-4))
    want[("a", 1000)] = 1.0
    want[("b", 1000)] = -2.5
    want[("c/\u00fc", 1000)] = f32(3e38)
    want[("neg", -1)] = 0.0
    return want


def check_ours(path: str) -> None:
    # Self-check of the reader on formats.md 5.5's checked bytes, so a broken reader cannot
    # pass (or fail) our file by accident.
    ref = bytes.fromhex(
        "1800000000000000 a37f4b22 0900000040fc54d941 1a0d627261696e2e4576656e743a32 eced8f9d"
        "1a00000000000000 129bd82d 0900002040fc54d941 1064 2a0d0a0b0a046c6f737315 00002040 bde111cb"
        .replace(" ", ""))
    assert crc32c(b"123456789") == 0xE3069283
    e1, e2 = read_records(ref)
    assert e1 == {"step": 0, "values": [], "wall_time": 1700000000.0, "file_version": "brain.Event:2"}, e1
    assert e2 == {"step": 100, "values": [("loss", 2.5)], "wall_time": 1700000000.5}, e2

    events = read_records(open(path, "rb").read())
    first = events[0]
    assert first.get("file_version") == "brain.Event:2", first
    assert abs(first["wall_time"] - time.time()) < 3600, first
    got = {}
    for ev in events[1:]:
        assert "file_version" not in ev
        assert ev["wall_time"] >= first["wall_time"] - 1
        for tag, value in ev["values"]:
            assert (tag, ev["step"]) not in got, f"duplicate {tag}@{ev['step']}"
            got[(tag, ev["step"])] = value
    want = expected_scalars()
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k, v in want.items():
        assert got[k] == v, (k, got[k], v)  # f32 on both sides: exact
    # The three tags at step 1000 were one Event (one summary with three values).
    multi = [ev for ev in events if ev["step"] == 1000]
    assert len(multi) == 1 and len(multi[0]["values"]) == 3, multi
    print(f"independent reader: {len(events)} records, {len(got)} scalars ok")


def check_theirs(path: str) -> bool:
    """Reads with TensorBoard's or TensorFlow's own reader when installed."""
    want = expected_scalars()
    got = {}
    try:
        from tensorboard.backend.event_processing import event_file_loader

        for ev in event_file_loader.LegacyEventFileLoader(path).Load():
            for v in ev.summary.value:
                got[(v.tag, ev.step)] = v.simple_value
        who = "tensorboard"
    except ImportError:
        try:
            import tensorflow as tf

            for ev in tf.compat.v1.train.summary_iterator(path):
                for v in ev.summary.value:
                    got[(v.tag, ev.step)] = v.simple_value
            who = "tensorflow"
        except ImportError:
            print("tensorboard / tensorflow not installed: independent reader only")
            return True
    for k, v in want.items():
        assert k in got and (got[k] == v or (math.isnan(v) and math.isnan(got[k]))), (k, got.get(k), v)
    print(f"{who} reader: {len(got)} scalars ok")
    return True


def main() -> int:
    exe = os.path.join(os.environ.get("NM_BUILD", "."), "test_tensorboard")
    if not os.path.exists(exe):
        skip(f"{exe} not built (cmake --build)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([exe, "--write", tmp], check=True, capture_output=True, text=True).stdout.strip()
        files = [f for f in os.listdir(tmp) if "tfevents" in f]
        assert len(files) == 1 and os.path.join(tmp, files[0]) == out, (files, out)
        check_ours(out)
        check_theirs(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
