"""A long run stays flat: ``downpour up`` for N minutes with a kill every minute.

    python benchmarks/soak.py [--minutes 10] [--kill-every 60] [--preset tiny] [--out DIR]

Runs ``downpour up`` (2 replicas, 2 shards, a checkpoint every
``--checkpoint-every`` steps per replica, ``keep_checkpoints`` 3) with more
steps than it can take, SIGKILLs one process every ``--kill-every`` seconds
(every role in turn, in a seeded random order: a worker, a shard, the feeder,
the coordinator, the neurons service; which worker or shard is seeded too),
and samples every process every ``--sample-every``
seconds: resident memory (VmRSS), open file descriptors and threads, from
/proc; the launcher too. It also counts the folders under ``checkpoints/``.

Growth is per process (a restarted one is a new process): the median of its
last three samples against the median of its three samples after its first
minute; only processes that lived at least two minutes are judged. Targets:
RSS and threads grow by at most 10%, open file descriptors by at most 10% (and
at most 2 more), checkpoint folders never exceed ``keep_checkpoints`` + 1 (one
in progress). Prints a table, writes ``soak.json`` in the run directory and
exits 1 when a target is missed. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

KILL_ROLES = ("worker", "paramserver", "feeder", "coordinator", "neurons")


def sample(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    if fields.get("State", "").strip().startswith("Z"):
        return None
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]), "fds": fds}


def cluster(out: str) -> list[dict]:
    try:
        with open(os.path.join(out, "cluster.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def checkpoint_folders(out: str) -> tuple[int, int]:
    """(committed, all) checkpoint folders."""
    d = os.path.join(out, "checkpoints")
    try:
        names = [n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
    except OSError:
        return 0, 0
    return sum(os.path.exists(os.path.join(d, n, "MANIFEST.json")) for n in names), len(names)


def growth(series: list[tuple[float, dict]], key: str, settle: float) -> tuple[float, float] | None:
    """(value after the first minute, value at the end), medians of three samples; None if too short."""
    t0 = series[0][0]
    after = [s[key] for t, s in series if t - t0 >= settle][:3]
    if len(series) < 6 or series[-1][0] - t0 < 2 * settle or len(after) < 3:
        return None
    return statistics.median(after), statistics.median([s[key] for _, s in series[-3:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills (0: none)")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--keep-checkpoints", type=int, default=3)
    ap.add_argument("--settle", type=float, default=60.0, help="a process's first seconds, not judged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="run directory (default runs/soak-<time>)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join("runs", time.strftime("soak-%Y%m%d-%H%M%S")))
    rng = random.Random(args.seed)
    env = dict(
        os.environ,
        DOWNPOUR_CHECKPOINT_EVERY=str(args.checkpoint_every),
        DOWNPOUR_KEEP_CHECKPOINTS=str(args.keep_checkpoints),
    )
    cmd = [
        sys.executable,
        "-m",
        "downpour.cli",
        "up",
        "--quiet",
        "--out",
        out,
        "--preset",
        args.preset,
        "--replicas",
        "2",
        "--shards",
        "2",
        "--steps",
        "100000000",
    ]
    launcher = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    series: dict[tuple[str, int], list[tuple[float, dict]]] = {}
    kills: list[dict] = []
    folders_max = committed_max = 0
    order: list[str] = []
    t_start = time.monotonic()
    next_kill = t_start + args.kill_every if args.kill_every > 0 else float("inf")
    end = t_start + args.minutes * 60
    try:
        while time.monotonic() < end:
            if launcher.poll() is not None:
                raise SystemExit(f"downpour up exited early ({launcher.returncode}): {launcher.stderr.read()[-2000:]}")
            now = time.monotonic()
            rows = cluster(out)
            for name, pid in [("launcher", launcher.pid)] + [(r["name"], r["pid"]) for r in rows if r["pid"]]:
                s = sample(pid)
                if s is not None:
                    series.setdefault((name, pid), []).append((now, s))
            committed, allf = checkpoint_folders(out)
            committed_max, folders_max = max(committed_max, committed), max(folders_max, allf)
            if now >= next_kill and rows:
                if not order:
                    order = rng.sample(KILL_ROLES, len(KILL_ROLES))
                role = order.pop(0)
                victims = [r for r in rows if r["role"] == role and r["pid"]]
                if victims:
                    v = rng.choice(victims)
                    try:
                        os.kill(v["pid"], signal.SIGKILL)
                        kills.append({"at_s": round(now - t_start, 1), "name": v["name"], "pid": v["pid"]})
                        print(f"{now - t_start:6.0f} s  killed {v['name']} (pid {v['pid']})", flush=True)
                    except ProcessLookupError:
                        pass
                next_kill += args.kill_every
            time.sleep(max(0.0, args.sample_every - (time.monotonic() - now)))
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
        try:
            launcher.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
    rows, ok = [], True
    for (name, pid), ser in sorted(series.items()):
        row = {
            "name": name,
            "pid": pid,
            "lived_s": round(ser[-1][0] - ser[0][0], 1),
            "judged": False,
            "series": [[round(t - t_start, 1), s["rss_kb"], s["fds"], s["threads"]] for t, s in ser],
        }
        for key in ("rss_kb", "fds", "threads"):
            g = growth(ser, key, args.settle)
            if g is None:
                continue
            row["judged"] = True
            row[key] = {"after_settle": g[0], "end": g[1], "growth": (g[1] - g[0]) / g[0] if g[0] else 0.0}
            bad = row[key]["growth"] > 0.10 and not (key == "fds" and g[1] - g[0] <= 2)
            row[key]["ok"] = not bad
            ok &= not bad
        rows.append(row)
    folders_ok = folders_max <= args.keep_checkpoints + 1
    ok &= folders_ok
    report = {
        "minutes": args.minutes,
        "kill_every_s": args.kill_every,
        "kills": kills,
        "processes": rows,
        "checkpoint_folders_max": folders_max,
        "committed_checkpoints_max": committed_max,
        "keep_checkpoints": args.keep_checkpoints,
        "ok": ok,
    }
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'process':<16}{'pid':>8}{'lived s':>9}  {'RSS MB (settled -> end)':<28}{'fds':<14}{'threads':<12}")
    for r in rows:
        if not r["judged"]:
            continue

        def cell(k, scale=1.0, fmt="{:.0f}", r=r):  # r bound now: the row being printed
            c = r[k]
            return (
                f"{fmt.format(c['after_settle'] * scale)}->{fmt.format(c['end'] * scale)} "
                f"({c['growth']:+.0%}){'' if c['ok'] else ' !'}"
            )

        print(
            f"{r['name']:<16}{r['pid']:>8}{r['lived_s']:>9.0f}  {cell('rss_kb', 1 / 1024, '{:.1f}'):<28}"
            f"{cell('fds'):<14}{cell('threads'):<12}"
        )
    short = sum(not r["judged"] for r in rows)
    print(
        f"{len(kills)} kills; {short} process(es) lived under {2 * args.settle:.0f} s and are not judged; "
        f"checkpoint folders at most {folders_max} (committed at most {committed_max}, keep "
        f"{args.keep_checkpoints}){'' if folders_ok else ' !'}"
    )
    print("targets met" if ok else "TARGET MISSED (marked !)")
    print(json.dumps({"ok": ok, "report": os.path.join(out, "soak.json")}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
