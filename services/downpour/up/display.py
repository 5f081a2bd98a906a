"""What ``downpour up`` shows: a line per event on stderr and a progress bar per replica
(``--quiet`` keeps only restarts and failures); library warnings go to logs/up.log instead."""

from __future__ import annotations

import logging
import os
from typing import Any


class WarningsToLog:
    """Library warnings (matplotlib, ...) go to <out>/logs/up.log, not to the terminal."""

    def __init__(self, logs: str) -> None:
        self.handler = logging.FileHandler(os.path.join(logs, "up.log"), encoding="utf-8", delay=True)
        self.logger = logging.getLogger("py.warnings")

    def __enter__(self) -> WarningsToLog:
        logging.captureWarnings(True)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        logging.captureWarnings(False)
        self.logger.removeHandler(self.handler)
        self.handler.close()


class Display:
    """The terminal of one run: ``say`` (dropped by --quiet), ``tell`` (always) and the progress bars."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console  # noqa: PLC0415 - ~0.3 s to import: only the interactive display needs it

        self.quiet = quiet
        self.console = Console(stderr=True)

    def say(self, *a: Any, **kw: Any) -> None:
        if not self.quiet:
            self.console.print(*a, **kw)

    def tell(self, *a: Any, **kw: Any) -> None:
        self.console.print(*a, **kw)

    def progress(self, replicas: int, steps: int, max_seconds: float = 0.0) -> Bars:
        return Bars(self.console, replicas, steps, disable=self.quiet, max_seconds=max_seconds)


class Bars:
    """One progress bar per replica (a context manager: the bars are drawn while inside it)."""

    def __init__(self, console: Any, replicas: int, steps: int, disable: bool, max_seconds: float = 0.0) -> None:
        # rich.progress: see Display for why it is imported here
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415 - as Console

        self.steps = steps
        self.max_seconds = max_seconds  # a time budget: the bars also show how much of it is used
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=disable,
        )
        self._bars = [self._progress.add_task(f"replica {r}", total=steps, info="") for r in range(replicas)]

    def __enter__(self) -> Bars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def update(self, snap: dict[str, Any]) -> None:
        """Each replica's step, loss (and stage 1's sparsity/reconstruction ratio, when reported),
        the job's examples/s and, with a time budget, the seconds of it used, from one status snapshot."""
        budget = f"  {snap.get('training_seconds', 0.0):.0f}/{self.max_seconds:g} s" if self.max_seconds else ""
        for bar, rep in zip(self._bars, snap["replicas"]):
            ratio = (rep.get("scalars") or {}).get("stage1.ratio")
            self._progress.update(
                bar,
                completed=min(rep["step"], self.steps),
                info=f"loss {rep['loss']:.4g}"
                + (f"  s1 sp/rec {ratio:.3g}" if ratio is not None else "")
                + f"  {snap['examples_per_second']:.0f} ex/s"
                + budget,
            )
