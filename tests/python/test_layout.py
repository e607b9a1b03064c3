"""The ctypes mirrors of include/nanomegatron.h's structs against the C compiler: every
struct's size and every field's offset, compiled from the real header. A field added to a C
struct without the mirror following fails here instead of corrupting memory."""
import ctypes
import os
import subprocess

import pytest

from nanomegatron import _lib

from conftest import ROOT


def test_struct_layouts_match_the_header(tmp_path):
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "nanomegatron.h"', 'int main(void) {']
    expect = []
    for st in _lib.STRUCTS:
        name = st.__name__
        lines.append(f'    printf("{name} %zu\\n", sizeof({name}));')
        expect.append(f"{name} {ctypes.sizeof(st)}")
        for fname, _ in st._fields_:
            lines.append(f'    printf("{name}.{fname} %zu\\n", offsetof({name}, {fname}));')
            expect.append(f"{name}.{fname} {getattr(st, fname).offset}")
    lines.append('    printf("nm_train_config %zu\\n", sizeof(nm_train_config));')
    lines.append("    return 0;\n}")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-I", os.path.join(ROOT, "include"), "-I",
                    os.path.join(ROOT, "src"), str(src), "-o", str(exe)], check=True)
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    train_config_size = int(got[-2].split()[1])
    got = got[:-2]
    assert len(got) == len(expect)
    mismatches = [f"C: {g} | ctypes: {e}" for g, e in zip(got, expect) if g != e]
    assert not mismatches, "\n".join(mismatches)
    # nm_train_config is an opaque block on the Python side: it must fit.
    assert train_config_size <= _lib.TRAIN_CONFIG_BYTES
    # The zeroed blocks _new() hands to C must hold every mirrored struct.
    assert all(ctypes.sizeof(st) <= 4096 for st in _lib.STRUCTS)


def test_the_installed_library_is_the_package_own():
    """Without NM_LIBRARY, the package loads the shared object pip installed next to it."""
    if os.environ.get("NM_LIBRARY"):
        pytest.skip("NM_LIBRARY overrides the installed library")
    import nanomegatron
    assert _lib.library_path() == os.path.join(os.path.dirname(nanomegatron.__file__), "libnanomegatron.so")
    assert os.path.exists(_lib.library_path())
