"""Benchmarks, one module per area under `experiments/bench/`: prints Markdown, writes JSON.

    python -m experiments.bench [--only AREA] [--quick] [--json PATH]

Each area is a public module of `experiments.bench` (found by name, so a new area needs no
change here) with `run(quick: bool) -> list[dict]`; a row is one measurement (its keys
become table columns). Timings are medians over repeats after a warm-up (compile) call.
The fault-injection suite (`python -m experiments.bench.faults`) is a command of its own,
not an area.
"""

import argparse
import importlib
import os
import pkgutil
import platform
import sys
import time

import jax

import experiments.bench
from experiments.bench import machine, markdown_table, write_json

NOT_AREAS = {"faults"}  # modules of the package with a command of their own

AREAS = tuple(
    sorted(
        info.name
        for info in pkgutil.iter_modules(experiments.bench.__path__)
        if not info.name.startswith("_") and info.name not in NOT_AREAS
    )
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=AREAS, help="run one area")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", default="runs/benchmark.json", help="where to write rows")
    args = parser.parse_args(argv)

    machine_line = machine()
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": machine_line,
        "areas": {},
    }
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} devices); "
        f"{machine_line}"
    )
    for area in (args.only,) if args.only else AREAS:
        module = importlib.import_module(f"experiments.bench.{area}")
        rows = module.run(quick=args.quick)
        report["areas"][area] = rows
        print(f"\n## {area}\n\n{markdown_table(rows)}\n", flush=True)

    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
