"""The per-connection stream cap: its default and the values refused."""

from __future__ import annotations

import pytest

from downpour.rpc.server import streams_per_connection


@pytest.mark.parametrize(("slots", "cap"), [(64, 32), (8, 4), (4, 2), (3, 1), (1, 1)])
def test_the_default_stays_below_the_slots(slots, cap):
    assert streams_per_connection(0, slots) == cap


def test_a_given_cap_is_kept_when_below_the_slots():
    assert streams_per_connection(5, 64) == 5


@pytest.mark.parametrize("given", [-1, 64, 100])
def test_a_cap_that_lets_one_connection_take_every_slot_is_refused(given):
    with pytest.raises(SystemExit, match="--max-streams-per-connection .*must be between 1 and 63"):
        streams_per_connection(given, 64)
