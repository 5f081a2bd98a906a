"""The memory plan: each process's expected peak resident memory for a job, before anything starts.

``downpour model --preset P --plan`` prints it; ``downpour up`` compares its
total with the memory this machine has and refuses to start a job that does
not fit, naming the numbers and the smallest layout that would.

Per process (bytes; n = the parameters it holds, B = the batch size):

* paramserver shard: weights 4n and Adagrad accumulators 4n; the checkpoint
  snapshot 8n (a shard copies its blocks under the lock, then writes them);
  its largest block twice while it creates it (values and the store's copy);
  transport buffers 12n per worker that maps its blocks (the co-located
  shared-memory plane: a weight and a gradient region, paramserver/shared.py,
  whose pages the shard touches count in its resident set; and the shard's
  private copy of the gradient region, validated before it is applied).
* worker (one partition of one replica): its blocks only: gradients 4n,
  transport buffers 8n (its shared-memory files: it computes on views of
  their weight region; without shared memory, weights 4n of its own), and
  activations at the batch size (every layer of its tile with contexts and
  gradients).
  A stage whose weights are constrained (``nn.constraint``) computes with a
  normalised (or transposed) copy of the block: 8 bytes per value of such a
  block (the copy, and the gradient pullback's product).
* neurons: one stage's encoder at a time (4S, S the largest stage's encoder
  or the head: a query fetches a stage's blocks, runs it and lets them go
  before the next), its pieces once more while a partitioned job's blocks
  are joined into the whole layer, and the activations in flight of a
  query of ``memshapes.NEURONS_QUERY_IMAGES`` images (one slice of them
  inside a stage: its input and outputs, the filter's patch rows, the pool's
  argmax, LCN's temporaries; every image's stage output between stages) and
  the query's own buffers. ``--hold-encoder`` (opt-in) keeps the whole encoder instead: 4E.
* feeder: its data in memory (the bundled images at the model's input size).
* coordinator: its interpreter, libraries and buffers only: it never holds a
  parameter.

Every process also pays a fixed base (the interpreter, NumPy, gRPC, its
threads), measured per role with ``benchmarks/memory.py`` on the ``tiny``
preset; the coefficients below were fitted to the peaks that benchmark
measured for tiny, small and medium runs (see docs/benchmarks.md). The
counts the bytes are made of (blocks, activation values, the feeder's data)
come from the model's shapes in ``downpour.memshapes``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from downpour import hostmem, memshapes
from downpour.paramserver.client import balanced_placement

MiB = 1 << 20
GiB = 1 << 30

# Resident memory of an idle process of each role (interpreter, NumPy, gRPC, threads), measured.
BASE = {"paramserver": 62 * MiB, "worker": 64 * MiB, "feeder": 168 * MiB, "coordinator": 60 * MiB, "neurons": 62 * MiB}
# A model-parallel worker's halo exchange: its own server, peer channels, mailboxes (measured).
EXCHANGE = 10 * MiB
# Bytes of live activations (their gradients, the layers' contexts and scratch) per activation
# value of a layer, fitted to the measured workers: one whole replica, and a partition's tile
# (which also keeps each layer's halo-grown input, the exchanged halos and their gradients).
ACTIVATION_BYTES = 42.0
ACTIVATION_BYTES_PARTITION = 100.0


@dataclass
class Process:
    name: str
    role: str
    parts: dict[str, int] = field(default_factory=dict)
    parameters: int = 0  # parameters this process holds

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


@dataclass
class Plan:
    preset: str
    replicas: int
    grid: tuple[int, int]
    shards: int
    batch_size: int
    parameters: int
    processes: list[Process]
    shared_memory: bool = True

    @property
    def total(self) -> int:
        return sum(p.total for p in self.processes)

    @property
    def largest(self) -> Process:
        return max(self.processes, key=lambda p: p.total)

    def layout(self) -> str:
        r, c = self.grid
        return f"{self.replicas} replica(s) x {r}x{c} partitions, {self.shards} shard(s), batch {self.batch_size}" + (
            "" if self.shared_memory else ", shared_memory: false (gRPC transport)"
        )

    def format(self) -> str:
        keys = ["base", "weights", "optimizer", "checkpoint", "gradients", "activations", "transport", "copies"]
        lines = [
            f"memory plan: {self.preset} ({self.parameters / 1e6:,.1f} M parameters), {self.layout()}",
            f"{'process':<16}{'params M':>9}" + "".join(f"{k:>12}" for k in keys) + f"{'total':>12}",
        ]
        for p in self.processes:
            lines.append(
                f"{p.name:<16}{p.parameters / 1e6:>9.1f}"
                + "".join(f"{_fmt(p.parts.get(k, 0)):>12}" for k in keys)
                + f"{_fmt(p.total):>12}"
            )
        lines.append(f"{'all processes':<16}{'':>9}" + "".join(f"{'':>12}" for _ in keys) + f"{_fmt(self.total):>12}")
        lines.append(f"largest process: {self.largest.name}, {_fmt(self.largest.total)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "replicas": self.replicas,
            "grid": list(self.grid),
            "shards": self.shards,
            "batch_size": self.batch_size,
            "parameters": self.parameters,
            "total_bytes": self.total,
            "processes": [
                {"name": p.name, "role": p.role, "parameters": p.parameters, "parts": p.parts, "total_bytes": p.total}
                for p in self.processes
            ],
        }


def _fmt(n: float) -> str:
    if n == 0:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# A block the stage computes with in a normalised (or transposed) form (nn.constraint): the
# effective copy, alive through the step, and the pullback's product, alive while it is applied.
CONSTRAINT_BYTES = 8


def _normalised(spec, block: str) -> bool:
    """Whether ``block`` (e.g. ``stage2.W1[p=3]``) has an effective copy under its stage's constraint."""
    name, _, rest = block.partition(".")
    if not name.startswith("stage") or not name[5:].isdigit():
        return False
    kind = spec.stages[int(name[5:]) - 1].constraint
    which = rest.split("[")[0]
    return (kind == "unit_decoder" and which == "W2") or (kind in ("unit_encoder", "tied_decoder") and which == "W1")


def plan(cfg, neurons: bool = True, preset: str = "") -> Plan:
    """The memory plan of job ``cfg`` (a ``downpour.config.JobConfig``) run by ``downpour up``."""
    spec = cfg.network_spec()
    rows, cols = cfg.grid()
    parts_n = rows * cols
    full, sizes, pulled, _, _ = memshapes.shapes(spec, rows, cols)
    N = sum(full.values())
    place = balanced_placement(sizes, cfg.shards)
    procs: list[Process] = []
    shared = bool(cfg.shared_memory)
    for i in range(cfg.shards):
        mine = [k for k, s in place.items() if s == i]
        n = sum(sizes[k] for k in mine)
        # Every replica's partition that pulls a block of this shard maps it (one region each).
        mapped = cfg.replicas * sum(sizes[k] for p in pulled for k in p if place[k] == i) if shared else 0
        largest = max((sizes[k] for k in mine), default=0)
        procs.append(
            Process(
                f"paramserver-{i}",
                "paramserver",
                {
                    "base": BASE["paramserver"],
                    "weights": 4 * n,
                    "optimizer": 4 * n,
                    "checkpoint": 8 * n,
                    "transport": 12 * mapped,
                    "copies": 8 * largest,
                },
                n,
            )
        )
    c, h, w = spec.input
    procs.append(
        Process("feeder", "feeder", {"base": BASE["feeder"], "activations": memshapes.feeder_data(cfg, c * h * w)})
    )
    procs.append(Process("coordinator", "coordinator", {"base": BASE["coordinator"]}))
    k = 0
    for _ in range(cfg.replicas):
        for p in range(parts_n):
            n = sum(sizes[b] for b in pulled[p])
            n_eff = sum(sizes[b] for b in pulled[p] if _normalised(spec, b))
            per_value = ACTIVATION_BYTES_PARTITION if parts_n > 1 else ACTIVATION_BYTES
            act = int(per_value * cfg.batch_size * memshapes.layer_values(spec, rows, cols, p))
            # Over shared memory the loop computes on views of the weight region (no copy of its own).
            procs.append(
                Process(
                    f"worker-{k}",
                    "worker",
                    {
                        "base": BASE["worker"] + (EXCHANGE if parts_n > 1 else 0),
                        "weights": 0 if shared else 4 * n,
                        "gradients": 4 * n,
                        "activations": act,
                        "transport": 8 * n if shared else 0,
                        "copies": CONSTRAINT_BYTES * n_eff,
                    },
                    n,
                )
            )
            k += 1
    if neurons:
        S, act = memshapes.neurons_query(spec)  # one stage's blocks at a time, never a decoder
        procs.append(
            Process(
                "neurons",
                "neurons",
                {"base": BASE["neurons"], "weights": 4 * S, "activations": act, "copies": 4 * S if parts_n > 1 else 0},
                S,
            )
        )
    return Plan(
        preset or (cfg.preset if cfg.model is None else "custom"),
        cfg.replicas,
        (rows, cols),
        cfg.shards,
        cfg.batch_size,
        N,
        procs,
        shared,
    )


def machine_memory(override: str = "") -> tuple[int, str]:
    """(bytes this machine can give a job now, where that number comes from).

    The smaller of the memory available (/proc/meminfo MemAvailable) and what a
    cgroup memory limit leaves (memory.max - memory.current), when there is one;
    ``override`` (``--memory 24G``: to plan for another machine) replaces both.
    """
    if override:
        return parse_bytes(override), "--memory"
    best, where = hostmem.meminfo("MemAvailable"), "available memory (/proc/meminfo)"
    cg = hostmem.cgroup_memory()
    if cg is not None and (best is None or cg[0] - cg[1] < best):
        best, where = max(0, cg[0] - cg[1]), f"the cgroup memory limit ({_fmt(cg[0])})"
    if best is None:
        raise OSError("cannot tell how much memory this machine has (no /proc/meminfo); give --memory")
    return best, where


def parse_bytes(text: str) -> int:
    """'24G', '512M', '8GiB' or a number of bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise ValueError(f"memory size {text!r}: expected a number of bytes or e.g. 24G, 512M") from None
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value * mult)


GRIDS = [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8)]
SHARDS = [1, 2, 4, 8, 16, 32, 64]


def smallest_layout(cfg, machine_bytes: int, neurons: bool = True):
    """The layout of ``cfg``'s model (same replicas and batch) that needs the fewest machines of
    ``machine_bytes`` each, every process fitting one machine: (plan, machines) or None.

    Processes are packed onto machines first-fit by decreasing size. Ties go to fewer processes.
    A layout on more than one machine is planned without the shared-memory plane (gRPC between
    hosts: no shared regions, each worker its own copy of its weights).
    """
    best = None
    for grid in GRIDS:
        for shards in SHARDS:
            c = dataclasses.replace(cfg, partitions=f"{grid[0]}x{grid[1]}", shards=shards)
            try:
                p = plan(c, neurons=neurons)
            except ValueError:  # a grid finer than the network's smallest layer
                break
            if p.total > machine_bytes:
                # Across machines workers reach the shards through gRPC: no shared-memory regions,
                # a copy of their weights of their own instead.
                p = plan(dataclasses.replace(c, shared_memory=False), neurons=neurons)
            if p.largest.total > machine_bytes:
                continue
            machines = pack([q.total for q in p.processes], machine_bytes)
            key = (machines, len(p.processes))
            if best is None or key < best[0]:
                best = (key, p, machines)
    return None if best is None else (best[1], best[2])


def pack(sizes: list[int], capacity: int) -> int:
    """Machines needed to hold ``sizes`` (first-fit decreasing)."""
    bins: list[int] = []
    for s in sorted(sizes, reverse=True):
        for i, used in enumerate(bins):
            if used + s <= capacity:
                bins[i] += s
                break
        else:
            bins.append(s)
    return len(bins)


def check_fits(cfg, neurons: bool = True, memory: str = "") -> Plan:
    """Raise MemoryError, with the plan's numbers and the smallest layout that would fit, when the
    job does not fit this machine's memory; else return the plan."""
    p = plan(cfg, neurons=neurons)
    have, where = machine_memory(memory)
    if p.total <= have:
        return p
    msg = [
        f"this job needs about {_fmt(p.total)} of memory but this machine has {_fmt(have)} ({where}): not started.",
        p.format(),
    ]
    fit = smallest_layout(cfg, have, neurons)
    if fit is None and neurons:
        fit = smallest_layout(cfg, have, False)
        if fit is not None:
            msg.append("the neurons service holds one stage and a query's activations: without it (--no-neurons)")
    if fit is None:
        msg.append(f"no layout of this model puts every process in {_fmt(have)}: it needs bigger machines")
    else:
        fp, machines = fit
        where_to = "on this machine" if machines == 1 else f"on {machines} machines of {_fmt(have)}"
        msg.append(
            f"smallest layout that fits {where_to}: {fp.layout()} "
            f"(largest process {_fmt(fp.largest.total)}, all together {_fmt(fp.total)})"
        )
    raise MemoryError("\n".join(msg))
