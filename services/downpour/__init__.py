"""downpour: DistBelief-style distributed training of deep locally connected networks.

The package is laid out as the system is: ``nn`` (pure math), ``kernels`` (GPU),
one sub-package per service, ``rpc`` for the plumbing they share, ``cli`` for the
``downpour`` command.

``downpour.load(path)`` (``downpour.trained.load``) opens a trained network in this process.
"""

from __future__ import annotations

import importlib

# ``typing`` costs ~9 ms to import; ``import downpour.v1`` must not pay it. Type checkers take
# any name TYPE_CHECKING as the flag.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]

# Attributes served by a submodule on first use (PEP 562). Every service process imports this
# package (for ``downpour.v1``); importing ``trained`` here would load NumPy, Pillow, the feeder
# and the checkpoint readers into each of them, and make ``trained`` (which imports ``downpour.v1``
# through the services it reads from) a module this package needs before it exists. Type
# checkers see ``downpour.load`` as Any; ``downpour.trained.load`` carries the signature.
_LAZY = {"load": "downpour.trained"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'downpour' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
