"""What this machine's memory is, as the kernel tells it: /proc/meminfo and the cgroup limit.

Read by the memory planner (what a job can have now) and by the shards' quotas (what a shard may
hold); kept apart so that each reads the same files the same way.
"""

from __future__ import annotations

_CGROUPS = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)
_UNLIMITED = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def meminfo(field: str) -> int | None:
    """``field`` of /proc/meminfo (``MemTotal``, ``MemAvailable``) in bytes; None if unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, in use) in bytes of this process's cgroup memory limit; None where there is none."""
    for lim, cur in _CGROUPS:
        try:
            with open(lim, encoding="ascii") as f:
                text = f.read().strip()
            if text == "max":
                continue
            limit = int(text)
            with open(cur, encoding="ascii") as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit < _UNLIMITED:
            return limit, used
    return None
