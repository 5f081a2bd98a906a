"""downpour: DistBelief-style distributed training of deep locally connected networks.

The package is laid out as the system is: ``nn`` (pure math), ``kernels`` (GPU),
one sub-package per service, ``rpc`` for the plumbing they share, ``cli`` for the
``downpour`` command.
"""

__version__ = "0.1.0"
