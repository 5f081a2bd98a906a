"""Array backends for ``downpour.nn``: NumPy on CPU, CuPy on GPU.

Layer code is written once against an ``xp`` module (the NumPy API) and never
imports numpy or cupy for computation itself; ``get(name)`` returns the module.
CuPy is imported lazily so that the CPU path never needs it installed.
"""

from __future__ import annotations

from types import ModuleType

import numpy

BACKENDS = ("numpy", "cupy")


def get(name: str = "numpy") -> ModuleType:
    """Return the array module called ``name`` ("numpy" or "cupy")."""
    if name == "numpy":
        return numpy
    if name == "cupy":
        try:
            import cupy  # noqa: PLC0415 - CuPy is optional (the gpu extra), imported only when asked for
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ValueError("backend 'cupy' needs CuPy: pip install 'downpour[gpu]'") from e
        return cupy
    raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")


def of(x) -> ModuleType:
    """The array module an array belongs to (numpy for anything that is not CuPy)."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return get("cupy")
    return numpy


def to_numpy(x):
    """Copy a backend array to host memory (no-op for NumPy)."""
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    return numpy.asarray(x)


def sliding_view(xp: ModuleType, x, axes: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]):
    """A read-only view of ``x`` with every (window) patch along two axes.

    For ``x`` of shape (..., H, W, ...) with the spatial axes at ``axes``, returns
    shape (Ho, Wo, *x.shape with H->kh and W->kw): patch (i, j) covers rows
    i*sh .. i*sh+kh-1 and columns j*sw .. j*sw+kw-1. No copy is made.
    """
    ah, aw = axes
    kh, kw = window
    sh, sw = stride
    H, W = x.shape[ah], x.shape[aw]
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    shape = list(x.shape)
    shape[ah], shape[aw] = kh, kw
    strides = list(x.strides)
    out_shape = (Ho, Wo, *shape)
    out_strides = (x.strides[ah] * sh, x.strides[aw] * sw, *strides)
    return (
        xp.lib.stride_tricks.as_strided(x, shape=out_shape, strides=out_strides, writeable=False)
        if xp is numpy
        else xp.lib.stride_tricks.as_strided(x, shape=out_shape, strides=out_strides)
    )
