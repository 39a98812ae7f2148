"""Shared by the speed benchmarks: callables timed side by side in interleaved turns, and the CPU
use that tells whether another process slowed a run down."""

from __future__ import annotations

import time
from collections.abc import Callable

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
