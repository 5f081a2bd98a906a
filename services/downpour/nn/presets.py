"""Named network specs (the stages' objective is the default: tied decoders, layer by layer;
parameter counts below are with tied decoders, twice that with untied ones).

* ``tiny``: 1x16x16 input, three small stages; for tests (a step takes milliseconds).
* ``small``: 1x32x32 input, three stages of 8 maps, about 1.35 million
  parameters; the default demo, trains in minutes on two cores.
* ``medium``: 3x112x112 input, three stages of 8 maps over 12x12 fields with
  the paper's 5x5 pooling and LCN: about 150 million parameters, between the
  demo and the paper. It trains (a few steps) through ``downpour up`` on a
  24 GB machine with a 2x2 partition grid and 2 shards (see ``downpour model
  --preset medium --plan``), at learning rate 0.001: at the default 0.01, tuned
  on ``small``, its loss spikes fiftyfold in its first Adagrad steps (docs/benchmarks.md).
* ``le2012``: the network of Le et al. (2012): 200x200x3 input, 18x18 fields,
  8 maps per location, 5x5 L2 pooling and 5x5 LCN, three stages, all strides
  1, which gives about 1.2 billion encoder connections (the paper's "one
  billion"), as many parameters. For clusters: only
  its shapes are computed here, nothing is allocated.
"""

from __future__ import annotations

from .spec import FilterSpec, LCNSpec, NetworkSpec, PoolSpec, StageSpec


def _stage(maps, field, stride=1, pool=3, pool_stride=1, lcn=5, lam=0.1) -> StageSpec:
    return StageSpec(
        filter=FilterSpec(maps=maps, field=field, stride=stride),
        pool=PoolSpec(size=pool, stride=pool_stride) if pool else None,
        lcn=LCNSpec(size=lcn) if lcn else None,
        lam=lam,
    )


PRESETS: dict[str, NetworkSpec] = {
    "tiny": NetworkSpec(
        input=(1, 16, 16),
        stages=(_stage(4, 5, pool=3, lcn=3), _stage(4, 3, pool=3, lcn=3), _stage(4, 3, pool=2, lcn=3)),
    ),
    "small": NetworkSpec(
        input=(1, 32, 32),
        stages=(_stage(8, 8, pool=3), _stage(8, 6, pool=3), _stage(8, 6, pool=3)),
    ),
    "medium": NetworkSpec(
        input=(3, 112, 112),
        stages=(_stage(8, 12, pool=5), _stage(8, 12, pool=5), _stage(8, 12, pool=5)),
    ),
    "le2012": NetworkSpec(
        input=(3, 200, 200),
        stages=(_stage(8, 18, pool=5), _stage(8, 18, pool=5), _stage(8, 18, pool=5)),
    ),
}


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> NetworkSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}") from None
