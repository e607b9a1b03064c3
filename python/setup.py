"""Builds the package's C library with the project's own CMake (the nanomegatron_shared target
of the repository's CMakeLists.txt, one directory up) and puts libnanomegatron.so inside the
package, next to the ctypes binding that loads it.

The CMake build directory is build/python of the repository (NM_CMAKE_BUILD_DIR overrides),
kept between installs, so reinstalling after a change recompiles only what changed.
"""
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "nanomegatron"))
from _source_hash import source_hash  # noqa: E402


class BinaryDistribution(Distribution):
    """The wheel holds a shared object: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


class BuildWithCMake(build_py):
    def run(self):
        super().run()
        if not os.path.exists(os.path.join(ROOT, "CMakeLists.txt")):
            sys.exit(f"setup.py: {ROOT} is not the nano-megatron repository (no CMakeLists.txt): install the "
                     f"package from a checkout, pip install ./python")
        build_dir = os.environ.get("NM_CMAKE_BUILD_DIR") or os.path.join(ROOT, "build", "python")
        jobs = os.environ.get("NM_JOBS") or str(os.cpu_count() or 1)
        digest = source_hash(ROOT)
        subprocess.check_call(["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release"],
                              stdout=subprocess.DEVNULL)
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "nanomegatron_shared", "-j", jobs])
        dest = os.path.join(self.build_lib, "nanomegatron")
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(os.path.join(build_dir, "libnanomegatron.so"), os.path.join(dest, "libnanomegatron.so"))
        with open(os.path.join(dest, "_build_info.json"), "w") as f:
            json.dump({"source_hash": digest, "cmake_build_type": "Release"}, f)


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildWithCMake})
