"""Chaos: ``downpour up`` under seeded random SIGKILLs of workers, shards, the feeder and the coordinator.

The job must complete, its final parameters must be as good as those of a run
without kills (held-out TICA loss within the noise of the baseline's own
training loss near its end), and every committed checkpoint must verify.
``DOWNPOUR_CHAOS_KILLS`` / ``DOWNPOUR_CHAOS_STEPS`` / ``DOWNPOUR_CHAOS_SEED`` make a longer run.
"""

from __future__ import annotations

import json
import os
import statistics

import pytest

from chaos import ROLES, run_job

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("DOWNPOUR_CHAOS_KILLS", "20"))
STEPS = int(os.environ.get("DOWNPOUR_CHAOS_STEPS", "1200"))
SEED = int(os.environ.get("DOWNPOUR_CHAOS_SEED", "0"))


def test_the_job_survives_random_kills_of_every_role(tmp_path):
    base = run_job(tmp_path / "baseline", STEPS)
    assert base["returncode"] == 0, base["stderr_tail"]
    # Kills come about every `interval` s until 70% of the steps: pace them by the baseline's
    # length so that all of them fit on a fast machine too (at most one a second).
    interval = min(1.0, base["seconds"] * 0.7 / (1.5 * KILLS))
    chaos = run_job(tmp_path / "chaos", STEPS, kills=KILLS, seed=SEED, interval=interval)
    figures = {
        "kills": len(chaos["kills"]),
        "kills_by_role": chaos["kills_by_role"],
        "restarts": chaos["restarts"],
        "shard_refills": chaos["shard_refills"],
        "coordinator_readoptions": chaos["readoptions"],
        "seconds": {"baseline": base["seconds"], "chaos": chaos["seconds"]},
        "heldout_loss": {"baseline": round(base["heldout_loss"], 3), "chaos": round(chaos["heldout_loss"], 3)},
        "final_train_loss": {"baseline": round(base["final_loss"], 3), "chaos": round(chaos["final_loss"], 3)},
        "manifests_checked": chaos["manifests"],
        "corrupt": chaos["corrupt"],
    }
    noise = 2 * statistics.pstdev(base["final_losses"])
    figures["noise_band"] = round(noise, 3)
    print("\nchaos figures:", json.dumps(figures, indent=1))
    assert chaos["returncode"] == 0, chaos["stderr_tail"]
    assert len(chaos["kills"]) >= KILLS, chaos["kills"]
    assert all(chaos["kills_by_role"][r] > 0 for r in ROLES), chaos["kills_by_role"]
    assert not chaos["corrupt"] and not base["corrupt"], (chaos["corrupt"], base["corrupt"])
    assert chaos["manifests"] >= 1
    # Within the noise: the baseline's own batch-to-batch spread near its end.
    assert abs(chaos["heldout_loss"] - base["heldout_loss"]) <= max(noise, 0.05 * base["heldout_loss"]), figures
