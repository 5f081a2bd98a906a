"""Work that stops when its caller is gone: a per-thread check that the long loops call.

The neurons service runs each handler ``with active_while(context.is_active)``; the loops of an
optimal-stimulus search and of a dataset scan call ``check()`` on every iteration and stop with
``Cancelled`` once the caller's deadline has passed or it hung up, so an abandoned query does not
hold a worker thread (and a ``--max-concurrent-rpcs`` slot) until it finishes. Outside a handler
(the library, the explorer over a local checkpoint) ``check`` does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Cancelled(Exception):
    """The caller is gone: the work was stopped part-way."""


_local = threading.local()


@contextmanager
def active_while(is_active: Callable[[], bool]) -> Iterator[None]:
    """Within the block, ``check`` raises ``Cancelled`` as soon as ``is_active()`` is False."""
    prev = getattr(_local, "is_active", None)
    _local.is_active = is_active
    try:
        yield
    finally:
        _local.is_active = prev


def check() -> None:
    """Raise ``Cancelled`` if this thread's caller is gone."""
    is_active = getattr(_local, "is_active", None)
    if is_active is not None and not is_active():
        raise Cancelled("the caller is gone (its deadline passed or it cancelled): stopped")
