"""The worker's halo mailbox: which generations it keeps, without any network."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.partition import Halo
from downpour.worker.exchange import Mailbox, PeerLost


def halo(generation, step=0, layer=0, sender=1):
    return Halo(generation, 0, sender, 0, step, layer, 0, 0, 0, 1, 1, np.zeros((1, 1), np.float32))


def test_a_halo_of_a_newer_generation_survives_starting_an_older_one():
    # The peer learned of generation 3 first and sent its step-0 halo before we started
    # generation 2 (our stale assignment); when we move on to 3 the halo must still be there.
    mb = Mailbox()
    assert mb.put(halo(3))
    mb.reset(2, replica=0, partition=0)
    mb.reset(3, replica=0, partition=0)
    got = mb.take(3, 0, 0, 0, [1], timeout=0.5)
    assert len(got) == 1 and got[0].generation == 3


def test_older_generations_are_dropped_on_arrival_and_on_reset():
    mb = Mailbox()
    mb.put(halo(1, layer=5))
    mb.reset(2, replica=0, partition=0)
    assert not mb.put(halo(1))
    with pytest.raises(PeerLost, match="partition"):
        mb.take(2, 0, 5, 0, [1], timeout=0.3)
    with pytest.raises(PeerLost):
        mb.take(1, 0, 5, 0, [1], timeout=0.3)
