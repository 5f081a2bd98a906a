"""Seeded random SIGKILLs against a ``downpour up`` cluster, and the figures of the run.

    python tests/chaos/chaos.py --kills 20 --steps 600     # prints the figures as JSON

``run_job(out, steps, kills=N, seed=S)`` starts ``downpour up`` (tiny preset,
2 replicas, 2 shards), and once training has begun kills a random live child
(worker, shard, feeder or coordinator, from a seeded generator) every
``interval`` seconds until N kills are done, then lets the job finish.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the harness, when run as a script
import harness
from downpour import checkpoint as cks
from downpour.evals.common import preprocess_for
from downpour.feeder import bundled
from downpour.nn import Network

ROLES = ("worker", "paramserver", "feeder", "coordinator")
ENV = {"DOWNPOUR_LEASE_SECONDS": "2", "DOWNPOUR_CHECKPOINT_EVERY": "10", "DOWNPOUR_KEEP_CHECKPOINTS": "3"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by the launcher) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _step(out: Path) -> int:
    """The job's step as the coordinator reports it (-1 when it does not answer)."""
    st = harness.job_status(out)
    return -1 if st is None else int(st.step)


def final_losses(out: Path, tail: int = 8) -> list[float]:
    """The last ``tail`` losses each replica reported (from metrics.json)."""
    hist = json.loads((out / "metrics.json").read_text())["history"]
    vals = []
    for r in range(2):
        seen = []
        for h in hist:
            reps = h["replicas"]
            if len(reps) > r and reps[r]["step"] > 0 and reps[r]["loss"] is not None:
                if not seen or seen[-1] != (reps[r]["step"], reps[r]["loss"]):
                    seen.append((reps[r]["step"], reps[r]["loss"]))
        vals += [loss for _, loss in seen[-tail:]]
    return vals


def heldout_loss(out: Path) -> float:
    """The TICA loss of the run's final committed (and verified) parameters on the bundled held-out split."""
    m = cks.newest_valid(out / "checkpoints")
    cfg, blocks = cks.load_checkpoint(out / "checkpoints", m)
    spec = cfg.network_spec()
    x = bundled.build(preprocess_for(spec, cfg.normalize)).heldout
    xs, _ = x.get(np.arange(len(x)))
    net = Network(spec)
    losses = [net.tica(blocks, xs[i : i + 50])[0] for i in range(0, len(xs) - 49, 50)]
    return float(np.mean(losses))


def run_job(
    out: Path,
    steps: int,
    kills: int = 0,
    seed: int = 0,
    interval: float = 1.0,
    roles: tuple[str, ...] = ROLES,
    timeout: float = 400.0,
    quiet_tail: float = 0.3,
) -> dict:
    """Run a job, killing ``kills`` children at random (none in the last ``quiet_tail`` of the steps)."""
    out = Path(out)
    t0 = time.monotonic()
    proc = harness.up(
        out,
        "--quiet",
        *harness.TINY_CLUSTER,
        "--steps",
        str(steps),
        env={
            **{k: None for k in os.environ if k.startswith("DOWNPOUR_CHAOS_")},  # the test's own
            **ENV,
        },
    )  # knobs are not job settings
    rng = random.Random(seed)
    done: list[dict] = []
    try:
        # Kill only once training is under way, and stop before the last stretch.
        if kills:
            harness.wait_job(out, lambda s: s.step >= 5, 90, "the job to start training", [proc])
        while len(done) < kills and proc.alive():
            time.sleep(interval * (0.5 + rng.random()))  # the kills' pace is the behaviour under test
            if _step(out) >= steps * (1 - quiet_tail):
                break  # the rest of the job runs undisturbed
            role = rng.choice(roles)
            live = [r for r in harness.cluster(out).values() if r["role"] == role and r["pid"] and _alive(r["pid"])]
            if not live:
                continue
            victim = rng.choice(live)
            os.kill(victim["pid"], signal.SIGKILL)
            done.append({"t": round(time.monotonic() - t0, 2), "name": victim["name"], "step": _step(out)})
        proc.wait(max(10.0, timeout - (time.monotonic() - t0)))
    finally:
        proc.stop(20)
    manifests = cks.list_manifests(out / "checkpoints")
    corrupt = []
    for m in manifests:
        try:
            cks.verify(out / "checkpoints", m)
        except Exception as e:  # noqa: BLE001 - report every kind of damage
            corrupt.append(f"{m['checkpoint_id']}: {e}")
    # Refills and re-adoptions are told only in the coordinator's log (figures, not assertions).
    logs = out / "logs"
    coord_log = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("coordinator.log")))
    losses = final_losses(out) if (out / "metrics.json").exists() else []
    try:
        held = heldout_loss(out)
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        held = float("nan")
        corrupt.append(f"final checkpoint unusable: {e}")
    return {
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "kills": done,
        "kills_by_role": {r: sum(k["name"].startswith(r) for k in done) for r in ROLES},
        "restarts": sum(r["restarts"] for r in harness.cluster(out).values()),
        "final_loss": sum(losses) / len(losses) if losses else float("nan"),
        "heldout_loss": held,
        "final_losses": losses,
        "manifests": len(manifests),
        "corrupt": corrupt,
        "shard_refills": coord_log.count("restored from checkpoint") + coord_log.count("refilled with initial"),
        "readoptions": coord_log.count("re-adopted job"),
        "stderr_tail": proc.text()[-2000:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--out", default="runs/chaos")
    a = ap.parse_args()
    base = run_job(Path(a.out) / "baseline", a.steps)
    chaos = run_job(Path(a.out) / "chaos", a.steps, kills=a.kills, seed=a.seed, interval=a.interval)
    for r in (base, chaos):
        r.pop("stderr_tail")
    print(json.dumps({"baseline": base, "chaos": chaos}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
