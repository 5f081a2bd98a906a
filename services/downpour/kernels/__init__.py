"""downpour.kernels: the GPU path of ``downpour.nn``'s layers, as CuPy raw kernels.

``downpour.nn`` uses these when its backend is CuPy; with NumPy it runs its
own code, which is each kernel's reference (the parity tests compare them).

* ``LocalFilterKernels``: im2col / col2im raw kernels around cuBLAS batched
  GEMMs (``cupy.matmul``), in row blocks of bounded memory.
* ``L2PoolKernels``: L2 pooling forward and backward, one kernel each.
* ``LCNKernels``: LCN's separable Gaussian blurs, one kernel per axis.

All kernels live in one CUDA source (``source.SOURCE``), compiled per
element type. No gRPC, no files, no threads; CuPy is imported by the caller.
"""

from .filtering import LocalFilterKernels
from .launch import CupyLauncher, Launcher, launcher_for
from .lcn import LCNKernels
from .pooling import L2PoolKernels
from .source import KERNELS, SOURCE, signatures

__all__ = [
    "LocalFilterKernels",
    "L2PoolKernels",
    "LCNKernels",
    "Launcher",
    "CupyLauncher",
    "launcher_for",
    "SOURCE",
    "KERNELS",
    "signatures",
]
