"""downpour.nn: the model math, pure and backend-agnostic (NumPy or CuPy).

No gRPC, no files, no threads here: services call this package, never the
reverse. Layers: ``LocalFilter`` (locally connected or convolution), ``Pool``
(L2, max, average), ``LCN``; ``Stage`` and ``Network`` combine them; the
objectives (reconstruction TICA, softmax) live on ``Network``.
"""

from .filtering import LocalFilter, col2im, im2col
from .lcn import LCN
from .network import Network, Stage, to_external, to_internal
from .pooling import Pool
from .spec import FilterSpec, LCNSpec, NetworkSpec, PoolSpec, StageSpec, from_dict, to_dict

L2Pool = Pool  # the paper's name for the default kind

__all__ = [
    "LocalFilter",
    "Pool",
    "L2Pool",
    "LCN",
    "Stage",
    "Network",
    "im2col",
    "col2im",
    "to_internal",
    "to_external",
    "NetworkSpec",
    "StageSpec",
    "FilterSpec",
    "PoolSpec",
    "LCNSpec",
    "from_dict",
    "to_dict",
]
