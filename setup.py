"""Builds threelc's optional native codec (threelc._native); metadata is in pyproject.toml.

The extension is plain C++ against the CPython API: it needs no torch headers, so an
isolated build environment never pulls torch. Without a working compiler the build
warns and threelc runs its pure-PyTorch codec. THREELC_REQUIRE_NATIVE=1 turns that
warning into an error (CI); THREELC_NATIVE_ARCH picks -march (default: native, since
`pip install` builds on the machine that runs it).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["threelc/native/encode.cpp", "threelc/native/lanes.cpp", "threelc/native/decode.cpp",
           "threelc/native/module.cpp"]
# No -ffast-math and no FMA contraction: the kernels must round exactly as PyTorch does.
FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden",
         f"-march={os.environ.get('THREELC_NATIVE_ARCH', 'native')}"]


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: pure path
            if os.environ.get("THREELC_REQUIRE_NATIVE") == "1":
                raise
            print(f"threelc: the native codec did not build ({error}); the pure-PyTorch codec will be used")


setup(
    ext_modules=[Extension("threelc._native", SOURCES, depends=["threelc/native/codec.h", "threelc/native/quantize.h"],
                           extra_compile_args=FLAGS, extra_link_args=["-pthread"], language="c++")],
    cmdclass={"build_ext": OptionalBuildExt},
)
