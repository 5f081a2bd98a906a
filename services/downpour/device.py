"""The compute device of a worker or the neurons service: ``--device cpu`` or ``gpu``.

``array_module(device)`` returns the array module the network runs on, or
raises ``DeviceError`` with what is missing: CuPy not installed, no CUDA GPU
visible (or a driver too old for CuPy's CUDA), or the GPU kernels failing to
compile (no NVRTC library in the image). Services call it before they start
serving, so a GPU deployment without a GPU stops at start with that reason
instead of failing at its first step.

Parameters arrive from the shards in host memory: ``to_device`` copies a set
of blocks to the GPU (once per pull), ``to_host`` copies gradients back
(once per push).
"""

from __future__ import annotations

from types import ModuleType

import numpy

from downpour.kernels import launcher_for

DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used here; the message says why."""


def array_module(device: str) -> ModuleType:
    if device == "cpu":
        return numpy
    if device != "gpu":
        raise DeviceError(f"--device {device!r} is unknown; allowed: {', '.join(DEVICES)}")
    try:
        import cupy  # noqa: PLC0415 - CuPy is optional (the gpu extra), and only --device gpu needs it
    except ImportError as e:
        raise DeviceError(
            "--device gpu needs CuPy, which is not installed here: pip install 'downpour[gpu]' "
            f"or use the image built from deploy/docker/Dockerfile.gpu ({e})"
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError and driver load failures alike
        raise DeviceError(
            f"--device gpu found no usable CUDA GPU: {_reason(e)}. Is the NVIDIA driver installed "
            "and the GPU visible to this process (docker --gpus / a compose device reservation, "
            "nvidia.com/gpu on Kubernetes, CUDA_VISIBLE_DEVICES)?"
        ) from None
    if n < 1:
        raise DeviceError("--device gpu found no CUDA GPU (CUDA reports 0 devices; check CUDA_VISIBLE_DEVICES)")
    try:
        launcher_for(cupy, numpy.float32).module.get_function("im2col")  # compiles the kernels now
    except Exception as e:  # noqa: BLE001 - NVRTC, driver and file errors alike: "cannot compile here"
        raise DeviceError(
            f"--device gpu: the GPU kernels do not compile or load here: {_reason(e)} "
            "(the CUDA runtime image includes NVRTC; a pip install needs nvidia-cuda-nvrtc-cu12)"
        ) from None
    return cupy


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".strip()


def describe(xp: ModuleType) -> str:
    """A name for the device: ``cpu`` or the GPU's name and memory."""
    if xp is numpy:
        return "cpu"
    dev = xp.cuda.Device()
    props = xp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"gpu {dev.id}: {name}, {props['totalGlobalMem'] / 2**30:.0f} GiB"


def to_device(xp: ModuleType, blocks: dict) -> dict:
    """The blocks as arrays of ``xp`` (copied to the GPU; the same arrays on the CPU)."""
    if xp is numpy:
        return blocks
    return {k: xp.asarray(v) for k, v in blocks.items()}


def to_host(blocks: dict) -> dict:
    """The blocks as float32 NumPy arrays (copied from the GPU where they live there)."""
    out = {}
    for k, v in blocks.items():
        if type(v).__module__.startswith("cupy"):
            v = v.get()
        out[k] = numpy.asarray(v, dtype=numpy.float32)
    return out
