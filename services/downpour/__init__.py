"""downpour: DistBelief-style distributed training of deep locally connected networks.

The package is laid out as the system is: ``nn`` (pure math), ``kernels`` (GPU),
one sub-package per service, ``rpc`` for the plumbing they share, ``cli`` for the
``downpour`` command.
"""

__version__ = "0.1.0"


def load(path, *, backend: str = "numpy"):
    """A trained network in this process (see ``downpour.trained``): a run folder, a checkpoint
    directory or folder, or a file written by ``downpour export`` (.safetensors, .npz)."""
    from downpour.trained import load as _load

    return _load(path, backend=backend)
