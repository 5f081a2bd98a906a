"""Launching the raw kernels: argument checks shared by every launcher, and CuPy's.

A launcher is called as ``launcher(name, count, *args)``: run kernel ``name``
over ``count`` independent elements. Arguments are converted to the exact C
types of the kernel's signature (``source.signatures``): arrays must be
C-contiguous and of the launcher's element type (a raw kernel would read any
other layout as if it were contiguous), integers must fit their C type.
``CupyLauncher`` compiles the source through NVRTC the first time it is used
(CuPy caches the binary on disk). The tests provide another launcher that
runs the same source on the host.
"""

from __future__ import annotations

from types import ModuleType

import numpy

from .source import SOURCE, signatures

BLOCK = 256  # threads per block: every kernel is a grid-stride loop, so any size is correct
MAX_BLOCKS = 65535  # enough blocks to fill any current GPU several times over
_INT = {"int32": (numpy.int32, 2**31 - 1), "int64": (numpy.int64, 2**63 - 1)}


def ctype_of(dtype) -> str:
    dtype = numpy.dtype(dtype)
    if dtype == numpy.float32:
        return "float"
    if dtype == numpy.float64:
        return "double"
    raise TypeError(f"the kernels are built for float32 and float64, not {dtype}")


def nvrtc_options(real: str) -> tuple[str, ...]:
    """NVRTC options for the source built for element type ``real`` (besides -arch)."""
    return (f"-Dreal={real}",)


class Launcher:
    """Checks and converts kernel arguments; subclasses run the kernel."""

    def __init__(self, xp: ModuleType, dtype):
        self.xp, self.dtype = xp, numpy.dtype(dtype)
        self.real = ctype_of(self.dtype)
        self.signatures = signatures()

    def convert(self, name: str, args: tuple) -> list:
        sig = self.signatures.get(name)
        if sig is None:
            raise KeyError(f"no kernel {name!r}; kernels: {', '.join(self.signatures)}")
        if len(args) != len(sig):
            raise TypeError(
                f"kernel {name} takes {len(sig)} arguments ({', '.join(n for _, n in sig)}), got {len(args)}"
            )
        out = []
        for (kind, pname), a in zip(sig, args):
            if kind == "array":
                if a.dtype != self.dtype or not a.flags.c_contiguous:
                    raise ValueError(
                        f"kernel {name}: {pname} must be C-contiguous {self.dtype}, "
                        f"got {a.dtype}{'' if a.flags.c_contiguous else ' (not contiguous)'}"
                    )
                out.append(a)
            elif kind == "real":
                out.append(self.dtype.type(a))
            else:
                t, hi = _INT[kind]
                if not -hi - 1 <= int(a) <= hi:
                    raise OverflowError(f"kernel {name}: {pname}={a} does not fit {kind}")
                out.append(t(a))
        return out

    def __call__(self, name: str, count: int, *args) -> None:
        if count <= 0:
            return
        self.run(name, int(count), self.convert(name, args))

    def run(self, name: str, count: int, args: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class CupyLauncher(Launcher):
    """Runs the kernels on the current CUDA device through CuPy."""

    def __init__(self, cupy: ModuleType, dtype):
        super().__init__(cupy, dtype)
        self.module = cupy.RawModule(code=SOURCE, options=nvrtc_options(self.real))
        self._fns: dict = {}

    def run(self, name: str, count: int, args: list) -> None:
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = self.module.get_function(name)
        blocks = min(MAX_BLOCKS, -(-count // BLOCK))
        fn((blocks,), (BLOCK,), tuple(args))


_cache: dict[tuple[int, str], CupyLauncher] = {}


def launcher_for(xp: ModuleType, dtype) -> CupyLauncher:
    """The (shared) CuPy launcher for ``dtype``; one compiled module per element type."""
    if xp is numpy:
        raise ValueError("the raw kernels run on CuPy arrays; NumPy uses downpour.nn's own code")
    key = (id(xp), numpy.dtype(dtype).str)
    if key not in _cache:
        _cache[key] = CupyLauncher(xp, dtype)
    return _cache[key]
