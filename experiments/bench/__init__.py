"""Benchmark areas for `python -m experiments.bench`; shared timing helpers."""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def write_json(report, path: str) -> None:
    """Writes ``report`` (rows, or a dict of them) to ``path`` as indented JSON, creating its
    folder; NumPy and JAX scalars are written as floats."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table; columns in first-seen order, missing cells empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [_format(row.get(column, "")) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_header() -> None:
    """Prints a benchmark's first line: the JAX version, its devices and :func:`machine`."""
    print(f"jax {jax.__version__} on {jax.devices()}; {machine()}", flush=True)


def print_report(rows: list[dict], json_path: str | None) -> None:
    """Prints ``rows`` as a Markdown table and, with ``json_path``, writes them there too
    (:func:`write_json`): the end of a benchmark's command line."""
    print(markdown_table(rows), flush=True)
    if json_path:
        write_json(rows, json_path)


CONTROL = "default, compiled again"
"""The label of a compile-option comparison's control: the defaults, compiled a second time
(two compilations of one program have differed by up to 13% on the development machine)."""


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model (Linux's ``/proc/cpuinfo``, or the file `cpuinfo`: name, family and
    model numbers, and whether it has AVX-512 and AMX; else what `platform` knows). CPU
    figures are comparable on one model only: the development machine has changed model
    between sessions, and with it the CPU gap to PyTorch."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine() or "unknown"
    flags = set(fields.get("flags", "").split())
    # AVX-512 sets XLA's and oneDNN's vector width; AMX runs bf16 matrix products in tiles.
    extensions = [
        name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags
    ]
    return (
        f"{fields['model name']} (family {fields.get('cpu family')}, model {fields.get('model')}"
        + "".join(f", {name}" for name in extensions)
        + ")"
    )


def threads() -> int:
    """The CPUs this process may run on: the size of XLA:CPU's thread pool."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> str:
    """One line for a benchmark's header: CPU model, the CPUs this process may use, and
    ``GLIBC_TUNABLES`` when set (it changes XLA:CPU's step times, see the README)."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"{cpu_model()}, {threads()} CPUs" + (f", GLIBC_TUNABLES={tunables}" if tunables else "")


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
    fns: dict[str, Callable[[], object]], repeats: int, settle: bool = False
) -> dict:
    """``{name: [wall seconds of each repeat]}``, after a warm-up, the functions run in turn
    so that drifting machine load (other processes, thermal state) affects them alike.

    ``settle``: each timed call follows an untimed call of the same function, so that it
    starts in the state a training loop's next step starts in: the previous function's pool
    threads idle, and this one's memory just freed and still resident. (Sleeping instead,
    as this did before, costs XLA:CPU's steps a page fault per page of their temporaries on
    a VM that hands idle memory back to its host: see the README's Performance section.)"""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                jax.block_until_ready(fn())
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Median wall times of :func:`interleaved_seconds`."""
    return {name: statistics.median(v) for name, v in interleaved_seconds(fns, repeats).items()}
