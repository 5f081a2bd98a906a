"""What staleness costs Downpour, and what each remedy buys back: a deterministic simulation.

    python benchmarks/staleness.py [--steps 300] [--replicas 1 2] [--only NAME ...]

The real network, data, loss and Adagrad, in one process and one thread, with
the asynchrony of R replicas written out as a schedule so that every run is
exactly repeatable. Replica r = t mod R makes global update t; the gradient
it pushes was computed on the parameters as they were ``delay`` updates
earlier (``delay = 0`` is plain synchronous SGD). Delays per schedule:

  sync          0                 one process, one replica (the reference)
  pushpull      R - 1             each replica pulls right after its own push is applied
  overlap       R - 1 + R         Downpour's background fetch: the pull that a step uses was
                                  started a step earlier (Algorithm 7.1, overlapped)

Remedies (options of the schedule): ``own`` adds the replica's own updates
that its stale copy lacks (what a worker knows without asking the shard),
``acc0`` starts Adagrad's accumulator at a positive value, ``warm`` lets
replica 0 train alone first, ``lr`` changes the step size, ``dc`` is DC-ASGD's
delay compensation (Zheng et al. 2017) on the shard, and ``div`` divides the
step by the measured delay (Zhang et al. 2016).

Prints, per run, the held-out TICA loss (the feeder's TEST split) after the
same number of examples, the highest training loss logged in the first 100
updates over the first one, and the loss relative to ``sync``; the last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from downpour import config as jobconfig
from downpour import optim


@dataclass(frozen=True)
class Schedule:
    name: str
    replicas: int = 1
    kind: str = "sync"  # sync | pushpull | overlap
    lr: float = 0.01
    acc0: float = 0.0
    own: bool = False
    warm: int = 0
    dc: float = 0.0
    div: bool = False
    batch: int = 32

    def delay(self) -> int:
        r = self.replicas
        return {"sync": 0, "pushpull": r - 1, "overlap": 2 * r - 1}[self.kind]


def setup(cfg: jobconfig.JobConfig):
    from downpour.feeder.preprocess import PreprocessSpec
    from downpour.feeder.splits import load_splits
    from downpour.nn import Network
    from downpour.v1 import feeder_pb2

    spec = cfg.network_spec()
    c, h, w = spec.input
    splits = load_splits(cfg.data, PreprocessSpec(channels=c, size=(h, w), normalize=cfg.normalize, seed=cfg.seed))
    train, test = splits[feeder_pb2.SPLIT_TRAIN], splits[feeder_pb2.SPLIT_TEST]
    x_train, _ = train.dataset.get(train.indices)
    x_test, _ = test.dataset.get(test.indices)
    return Network(spec), x_train, x_test


def heldout_loss(net, params, x_test, batch: int = 100) -> float:
    """Mean per-example TICA loss over the held-out images."""
    total = 0.0
    for i in range(0, len(x_test), batch):
        xb = x_test[i : i + batch]
        total += net.tica(params, xb)[0] * len(xb)
    return total / len(x_test)


def simulate(s: Schedule, net, x_train, x_test, examples: int, seed: int = 0) -> dict:
    from downpour.feeder.sharding import batches, shard_indices

    w = {k: np.array(v, np.float32).reshape(-1) for k, v in net.init_params(seed).items()}
    acc = {k: np.full_like(v, s.acc0) for k, v in w.items()}
    shapes = net.param_shapes()
    srcs = [batches(shard_indices(len(x_train), r, s.replicas, seed), s.batch, seed, r) for r in range(s.replicas)]
    steps = examples // s.batch
    d = s.delay()
    hist: deque = deque(maxlen=d + 1)  # parameter snapshots of the last d updates
    own: list[deque] = [deque() for _ in range(s.replicas)]  # (update index, delta) a replica made
    scratch = optim.Scratch()
    losses = []
    for t in range(steps):
        r = 0 if t < s.warm else (t - s.warm) % s.replicas
        dd = 0 if t < s.warm else min(d, t - s.warm)
        hist.append({k: v.copy() for k, v in w.items()} if d else w)
        base = hist[-1 - dd] if d else w
        p = {k: v.copy() for k, v in base.items()} if (s.own and dd) else base
        if s.own and dd:
            for u, delta in own[r]:
                if u >= t - dd:  # an update of ours that the stale copy lacks
                    for k in p:
                        p[k] -= delta[k]
        loss, grads, _ = net.tica({k: v.reshape(shapes[k]) for k, v in p.items()}, x_train[next(srcs[r])])
        losses.append(float(loss))
        lr = s.lr / max(1, dd) if s.div else s.lr
        before = {k: v.copy() for k, v in w.items()} if s.own else None
        for k, g in grads.items():
            g = np.asarray(g, np.float32).reshape(-1)
            if s.dc and dd:
                g = g + np.float32(s.dc) * g * g * (w[k] - p[k])
            optim.adagrad_(w[k], acc[k], g, lr, 1e-6, scratch)
        if s.own:
            own[r].append((t, {k: before[k] - w[k] for k in w}))
            while own[r] and own[r][0][0] < t - d:
                own[r].popleft()
        if not np.isfinite(loss):
            break
    first = losses[0]
    early = max(losses[:100])
    held = heldout_loss(net, {k: v.reshape(shapes[k]) for k, v in w.items()}, x_test)
    return {
        "name": s.name,
        "replicas": s.replicas,
        "delay": d,
        "heldout": held,
        "train_last30": float(np.mean(losses[-30:])),
        "early_peak_over_first": early / first,
    }


def schedules(replicas: list[int]) -> list[Schedule]:
    out = [Schedule("sync")]
    for r in replicas:
        for kind in ("overlap", "pushpull"):
            if r == 1 and kind == "pushpull":
                continue  # the same as sync
            b = Schedule(f"R{r} {kind}", r, kind)
            out += [
                b,
                replace(b, name=b.name + " own", own=True),
                replace(b, name=b.name + " acc0=0.1", acc0=0.1),
                replace(b, name=b.name + " lr=0.005", lr=0.005),
                replace(b, name=b.name + " warm=30", warm=30),
                replace(b, name=b.name + " dc=2", dc=2.0),
                replace(b, name=b.name + " div", div=True),
                replace(b, name=b.name + " own acc0=0.1", own=True, acc0=0.1),
                replace(b, name=b.name + " warm=30 own", warm=30, own=True),
                replace(b, name=b.name + " warm=30 acc0=0.1", warm=30, acc0=0.1),
                replace(b, name=b.name + " warm=60", warm=60),
            ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=300, help="updates of the sync reference (batch 32)")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="run only schedules whose name contains one of these")
    args = ap.parse_args()
    cfg = jobconfig.load(env={}, overrides={"preset": args.preset})
    net, x_train, x_test = setup(cfg)
    examples = args.steps * 32
    print(f"preset {args.preset}, {examples} examples, held-out images {len(x_test)}")
    rows = []
    ref = None
    for s in schedules(args.replicas):
        if args.only and s.name != "sync" and not any(o in s.name for o in args.only):
            continue
        t = time.perf_counter()
        r = simulate(s, net, x_train, x_test, examples, cfg.seed)
        ref = ref or r["heldout"]
        r["vs_sync"] = r["heldout"] / ref
        rows.append(r)
        print(
            f"{s.name:28s} delay {r['delay']}  held-out {r['heldout']:9.1f}  {r['vs_sync']:5.2f}x sync  "
            f"early peak {r['early_peak_over_first']:6.2f}x first  ({time.perf_counter() - t:4.0f} s)",
            flush=True,
        )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "examples": examples,
                "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
