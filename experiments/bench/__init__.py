"""Benchmark areas for `python -m experiments.benchmark`; shared timing helpers."""

import statistics
import time
from collections.abc import Callable

import jax

CONTROL = "default, compiled again"
"""The label of a compile-option comparison's control: the defaults, compiled a second time
(two compilations of one program have differed by up to 13% on the development machine)."""


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up (compile) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, pause: float = 0.0
) -> dict:
    """``{name: [wall seconds of each repeat]}``, after a warm-up, the functions run in turn
    so that drifting machine load (other processes, thermal state) affects them alike;
    ``pause`` seconds of sleep before each timed call let the previous one's threads go idle."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Median wall times of :func:`interleaved_seconds`."""
    return {name: statistics.median(v) for name, v in interleaved_seconds(fns, repeats).items()}
