"""Callables timed side by side in interleaved turns, and the CPU use that tells whether another
process slowed a run down: `hat benchmark` and the speed benchmarks under bench/ time this way, so
that a busy machine slows every side alike and is flagged."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

BUSY_CPU_USE = 0.85
"""Below this CPU use (process CPU time over the timed wall time and the threads) a run is
flagged `machine_busy`."""


def time_in_turns(sides: dict[str, Callable[[], object]], rounds: int, runs: int, warmup: int, threads: int,
                  turn_warmup: int = 0) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time every side `rounds` times in turn, `runs` calls per turn, after `warmup` untimed calls
    of each and `turn_warmup` untimed calls at the start of every turn (so a side runs warm after
    another one's turn). Returns each side's call times in seconds, turn after turn, and its CPU
    use over the timed calls (about 1 on an otherwise idle machine)."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu = dict.fromkeys(sides, 0.0)
    for run in sides.values():
        for _ in range(warmup):
            run()
    for _ in range(rounds):
        for name, run in sides.items():
            for _ in range(turn_warmup):
                run()
            cpu_tic = time.process_time()
            for _ in range(runs):
                tic = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - tic)
            cpu[name] += time.process_time() - cpu_tic
    return times, {name: cpu[name] / (sum(times[name]) * threads) for name in times}


OTHER_BUSY_SHARE = 0.1
"""Above this share of the machine's CPU time used by other processes during a timing, the
timing is flagged `machine_busy`."""


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of all CPUs, this process's ticks) from /proc, or None where it is not there."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # all but idle and iowait
    return busy, int(mine[11]) + int(mine[12])  # utime + stime


class OtherLoad:
    """A context that measures the share of the machine's CPU time other processes used while it
    ran: `share` (0..1, None where /proc is not there) and `busy` (share above OTHER_BUSY_SHARE).
    Unlike a process's own CPU use, it does not depend on how well the timed work fills its threads."""

    share: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start, self._tic = _cpu_ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end, wall = _cpu_ticks(), time.perf_counter() - self._tic
        if self._start is None or end is None or wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        self.share = max(0.0, others / hz / (wall * (os.cpu_count() or 1)))

    @property
    def busy(self) -> bool:
        """Whether other processes used more than OTHER_BUSY_SHARE of the CPU."""
        return self.share is not None and self.share > OTHER_BUSY_SHARE
