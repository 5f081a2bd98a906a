"""Runs downpour.kernels' CUDA source on the host, for tests without a GPU.

The source is compiled as C++ with a small prelude (``__global__`` and the
other qualifiers empty, ``blockIdx``/``threadIdx``/``blockDim``/``gridDim``
plain globals) and a wrapper per kernel that plays every thread of a small
grid one after the other. Each kernel is a grid-stride loop over independent
elements with no shared memory or synchronisation, so this runs exactly the
arithmetic a GPU runs; the deliberately odd grid (3 blocks of 5 threads)
makes every thread stride many times. ``HostLauncher`` has the interface of
``downpour.kernels.launch.CupyLauncher`` on NumPy arrays, so the layers'
GPU code (blocking, GEMMs, kernel arguments) runs here too.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from downpour.kernels.launch import Launcher, ctype_of
from downpour.kernels.source import SOURCE, signatures

GRID, BLOCK = 3, 5

PRELUDE = """
#include <cmath>
using std::sqrt;
struct dim3_ { unsigned x, y, z; };
static dim3_ blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
"""

_CTYPE = {"array": "real*", "int32": "int", "int64": "long long"}


def host_source() -> str:
    parts = [PRELUDE, SOURCE]
    for name, sig in signatures().items():
        params = ", ".join(f"{_CTYPE.get(kind, 'real')} {p}" for kind, p in sig)
        call = ", ".join(p for _, p in sig)
        parts.append(f"""
extern "C" void host_{name}(unsigned grid, unsigned block, {params}) {{
    gridDim.x = grid; blockDim.x = block; gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {{
            blockIdx.x = b; threadIdx.x = t; blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
            {name}({call});
        }}
}}""")
    return "\n".join(parts)


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def build(directory: Path, dtype) -> ctypes.CDLL:
    real = ctype_of(dtype)
    src = directory / f"kernels_{real}.cpp"
    lib = directory / f"kernels_{real}.so"
    src.write_text(host_source())
    subprocess.run(
        [
            compiler(),
            "-O2",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            "-Wno-unused-function",
            f"-Dreal={real}",
            "-o",
            str(lib),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return ctypes.CDLL(str(lib))


class HostLauncher(Launcher):
    def __init__(self, lib: ctypes.CDLL, dtype):
        super().__init__(np, dtype)
        self.lib = lib
        real = ctypes.c_float if self.dtype == np.float32 else ctypes.c_double
        ctype = {"array": ctypes.c_void_p, "int32": ctypes.c_int, "int64": ctypes.c_longlong, "real": real}
        self.fns = {}
        for name, sig in self.signatures.items():
            fn = getattr(lib, f"host_{name}")
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [ctype[kind] for kind, _ in sig]
            fn.restype = None
            self.fns[name] = fn
        self.calls: list[str] = []

    def run(self, name: str, count: int, args: list) -> None:
        self.calls.append(name)
        conv = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
        self.fns[name](GRID, BLOCK, *conv)
