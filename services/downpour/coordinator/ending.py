"""When a job's training ends: every replica at the step count, or its wall-clock budget spent.

The budget (``max_seconds``) counts training, not the cluster's start-up: its clock starts when
the job's first step is reported. Times are wall-clock (``time.time``) so that the record, saved
with the job state, means the same to a restarted coordinator that adopts it: the budget goes
on counting across the restart. Once ended, a job stays ended (``Ending.reason`` is set once and
never cleared), whatever the clock or the progress do afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STEPS = "steps"  # every replica reached the job's steps
TIME_BUDGET = "time_budget"  # max_seconds of training ran out
REASONS = (STEPS, TIME_BUDGET)


@dataclass
class Ending:
    """A job's training clock and, once it has ended, why, at which step and when."""

    started: float = 0.0  # wall time of the first reported step; 0: none yet
    reason: str = ""  # "" while training, else one of REASONS
    step: int = 0  # the job's step (its slowest replica's) when it ended
    at: float = 0.0  # wall time of the end

    def start(self, now: float) -> bool:
        """Start the training clock at ``now`` unless it runs already; True if it started now."""
        if self.started:
            return False
        self.started = now
        return True

    def check(self, step: int, steps: int, max_seconds: float, now: float) -> bool:
        """End the job if ``step`` reached ``steps`` or ``max_seconds`` (0: no budget) of training
        have passed at ``now``; True if it ended now (never again once ended)."""
        if self.reason:
            return False
        if step >= steps:
            reason = STEPS
        elif max_seconds > 0 and self.started and now - self.started >= max_seconds:
            reason = TIME_BUDGET
        else:
            return False
        self.reason, self.step, self.at = reason, step, now
        return True

    def seconds(self, now: float) -> float:
        """Seconds of training: from the first reported step to ``now``, or to the end."""
        if not self.started:
            return 0.0
        return max(0.0, (self.at if self.reason else now) - self.started)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Ending:
        """The record a saved state holds (an older state has none: no clock started, not ended)."""
        names = {f.name for f in fields(cls)}
        e = cls(**{k: v for k, v in (d or {}).items() if k in names})
        if e.reason and e.reason not in REASONS:
            raise ValueError(f"a saved job state ended for an unknown reason {e.reason!r}; known: {', '.join(REASONS)}")
        return e
