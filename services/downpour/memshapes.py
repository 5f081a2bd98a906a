"""What each process of a job holds, counted from the model's shapes (nothing is allocated).

``downpour.memplan`` turns these counts into bytes per process: the blocks a
model-parallel partition pulls and their sizes, the activation values of each
partition's tile, the largest step of a neurons query (one stage's encoder or
the head) with the activations it has in flight, and the feeder's data.
"""

from __future__ import annotations

import functools
import math
import os

from downpour.nn import Network
from downpour.partition import block_shapes
from downpour.partition import plan as pplan

# The feeder's bundled images at the model's input size: regions, patches and batches (fitted).
FEEDER_EXAMPLES = 640
# Most images one neurons query runs (the service's --max-images), and the slice a stage runs at once.
NEURONS_QUERY_IMAGES = 256
NEURONS_SLICE = 256
# A query's own buffers: the request's images decoded, the response, gRPC's copies (fitted on the
# tiny and small runs of benchmarks/memory.py).
NEURONS_QUERY_OVERHEAD = 6 << 20


def layer_values(spec, rows: int, cols: int, partition: int) -> int:
    """Activation values per example of one partition's tile of every layer (the whole replica's
    layers when the grid is 1x1)."""
    return shapes(spec, rows, cols)[4][partition]


@functools.lru_cache(maxsize=64)
def shapes(spec, rows: int, cols: int):
    """(parameter sizes, block sizes, blocks pulled per partition, encoder block names, activation
    values per example per partition) of a model on a grid; shapes only, nothing allocated."""
    net = Network(spec)
    full = net.block_sizes()
    pl = pplan(spec, rows, cols)
    if rows * cols > 1:
        sizes = {k: math.prod(v) for k, v in block_shapes(pl).items()}
        pulled = [pl.blocks_pulled(p) for p in range(rows * cols)]
    else:
        sizes, pulled = dict(full), [list(full)]
    values = []
    for p in range(rows * cols):
        total = 0
        for lay in pl.layers:
            y0, y1, x0, x1 = lay.tiles[p]
            total += lay.shape[0] * (y1 - y0) * (x1 - x0)
        values.append(total)
    return full, sizes, pulled, net.encoder_names(), values


@functools.lru_cache(maxsize=64)
def neurons_query(spec) -> tuple[int, int]:
    """(values of the largest step's blocks: a stage's encoder or the head, bytes of what one query
    has in flight at most besides them).

    Inside a stage, for one slice of images: its input and output, the filter's output, its patch
    scratch (the patch rows of one output row at a time, or of all rows when they are small:
    ``LocalFilter._gemm_rows``), the pool's output and its argmax, and two LCN temporaries of the
    output's size. Between stages: every image's stage output. Then the query's own buffers.
    """
    net = Network(spec)
    sizes = net.block_sizes()
    steps = [[f"{st.name}.W1"] for st in net.stages if st.filter is not None]
    if spec.classes:
        steps.append(["head.W", "head.b"])
    largest = max((sum(sizes[n] for n in g) for g in steps), default=0)
    b = min(NEURONS_SLICE, NEURONS_QUERY_IMAGES)
    inside, between = 0, 0
    for st in net.stages:
        out = math.prod(st.out_shape)
        values = b * (math.prod(st.in_shape) + 3 * out)  # input, output, two LCN temporaries
        if st.filter is not None:
            f = st.filter
            rows = f.Ho if f.L * f.K * b * 4 <= f.GEMM_WHOLE_BYTES else 1
            values += b * f.L * f.M + rows * f.Wo * f.K * b
        if st.pool is not None:
            values += 2 * b * math.prod(st.pool.out_shape)  # pooled values and their argmax (int32)
        inside = max(inside, values)
        between = max(between, out)
    return largest, 4 * (inside + NEURONS_QUERY_IMAGES * between) + NEURONS_QUERY_OVERHEAD


def feeder_data(cfg, values_per_example: int) -> int:
    """The feeder's data in memory: the bundled images at the input size, or the dataset's size on disk."""
    if cfg.data == "default" or cfg.data.startswith("default:"):
        return 4 * FEEDER_EXAMPLES * values_per_example
    path = os.path.expanduser(cfg.data[len("file://") :] if cfg.data.startswith("file://") else cfg.data)
    if os.path.isdir(path):  # decoded images: at most the input size each, as float32
        n = sum(len(files) for _, _, files in os.walk(path))
        return 4 * n * values_per_example
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
