"""``neurons.cancel``: the long loops of a query stop as soon as their caller is gone, and run to the
end where nobody is waiting on a deadline (outside a handler)."""

from __future__ import annotations

import threading

import pytest

from downpour.neurons import cancel
from downpour.neurons.api import StimulusSettings
from downpour.neurons.model import NeuronModel
from downpour.nn import Network, presets

SPEC = presets.get("tiny")


@pytest.fixture(scope="module")
def model():
    return NeuronModel(SPEC, Network(SPEC).init_params(3))


def test_outside_a_handler_a_search_runs_to_its_end(model):
    """No caller to lose (the library, the explorer over a local checkpoint): nothing stops the loop."""
    r = model.optimal_stimulus(model.unit("stage3.pool", 0), StimulusSettings(steps=3, restarts=2))
    assert r["stimulus"].shape == tuple(SPEC.input) and r["activation"] >= r["random_max"] - 1e-6


def test_a_search_stops_at_the_first_step_after_its_caller_is_gone(model):
    u = model.unit("stage3.pool", 0)
    steps = []

    def is_active():
        steps.append(1)
        return len(steps) <= 3  # the caller leaves after three steps

    with cancel.active_while(is_active), pytest.raises(cancel.Cancelled, match="caller is gone"):
        model.optimal_stimulus(u, StimulusSettings(steps=5000, restarts=2))
    assert len(steps) == 4  # checked before every step, stopped at the first check that failed


def test_the_check_belongs_to_its_own_thread():
    seen = []
    with cancel.active_while(lambda: False):
        t = threading.Thread(target=lambda: seen.append(cancel.check()))  # another thread: no caller of its own
        t.start()
        t.join()
        with pytest.raises(cancel.Cancelled):
            cancel.check()
    assert seen == [None]
    cancel.check()  # the block restored "no caller"
