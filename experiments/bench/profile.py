"""Where a train step's time goes on CPU: its wall time split by kind of XLA operation.

    python -m experiments.bench --only profile [--quick]
    python -m experiments.bench.profile [--preset NAME] [--batch N] [--steps N] [--top N]
        [--torch] [--json PATH]

It traces a few calls of the engine's compiled step (`jax.profiler`, Perfetto format), reads
the duration of every XLA operation from the trace and its kind from the compiled HLO, and
shares out the step's wall time: while k operations run at once (XLA:CPU runs independent
ones on separate threads), each is charged 1/k of that interval, so the kinds add up to the
wall time. Kinds: convolutions (forward, input gradient, kernel gradient), the tap-form
kernel gradient's matrix products (`fmjax.models.conv`, found by its name scope), other
matrix products (forward / backward), reductions, data movement (copies, slices, pads,
concatenations, transposes), other element-wise work, collectives, and idle time between
operations. The convolution and matmul rows give their FLOPs and the FLOP/s of their share.

The default (`--quick` off) is the torchcfm CIFAR-10 U-Net at batch 16 (about 3 min here,
two traced steps after the compile); `--quick` profiles `unet_digits` at batch 64. XLA:GPU
and TPU operations appear in traces under other names: this profile is for CPU, where it
sees the operations of XLA's thunk runtime. Work outside them shows as idle: with the
default XLA flags that is 2-3% of the CIFAR step, but with
`--xla_cpu_experimental_ynn_fusion_type=reduce` (convolutions by Eigen instead of YNNPACK)
the convolutions themselves leave no trace events.

With ``--torch`` (PyTorch installed: the ``bench`` extra) it then profiles the PyTorch port of
the same U-Net's step (``experiments/bench/conv.py``: same layers, loss, AdamW and EMA) with
``torch.profiler`` at the thread count XLA uses, and sets the two side by side in the parts
both profiles tell apart (:data:`PARTS`): forward convolutions, convolution gradients (input
and kernel together: PyTorch computes both in one operator), matrix products, and everything
else. PyTorch's parts are its operators' self CPU times; "other" is the rest of its step's
wall time (element-wise operators, the optimizer, Python).
"""

import argparse
import collections
import gzip
import json
import math
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import NamedTuple

import jax

from experiments.bench import machine, markdown_table, threads
from experiments.bench.train import build_step, seed_images
from fmjax.models.conv import TAPS_SCOPE

KINDS = (
    "convolution: forward",
    "convolution: input gradient",
    "convolution: kernel gradient",
    "matmul: kernel gradient taps",
    "matmul: forward",
    "matmul: backward",
    "reduction",
    "data movement",
    "element-wise",
    "collective",
    "idle",
)
"""The rows of a profile, in order."""

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>.*?) (?P<op>[a-z][\w\-]*)\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"^\w+\[(?P<dims>[\d,]*)\]")
_CONTAINERS = {"while", "conditional", "call"}
_MOVEMENT = {
    "bitcast",
    "broadcast",
    "concatenate",
    "constant",
    "copy",
    "dynamic-slice",
    "dynamic-update-slice",
    "get-tuple-element",
    "iota",
    "pad",
    "parameter",
    "reshape",
    "reverse",
    "slice",
    "transpose",
    "tuple",
}
PARTS = ("convolution: forward", "convolution: gradients", "matmul", "other")
"""The rows of the side by side with PyTorch: what both profiles tell apart."""

_PART_OF_KIND = {
    "convolution: forward": "convolution: forward",
    "convolution: input gradient": "convolution: gradients",
    "convolution: kernel gradient": "convolution: gradients",
    "matmul: kernel gradient taps": "convolution: gradients",
    "matmul: forward": "matmul",
    "matmul: backward": "matmul",
}
_TORCH_MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
_COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"}


class Op(NamedTuple):
    """One instruction of a compiled HLO module that the trace may time.

    Attributes:
        kind: one of :data:`KINDS`.
        flops: per execution, for convolutions and matrix products (2 per multiply-add).
        shape: its result's HLO shape.
        source: the JAX ``op_name`` of its first instruction that has one (the source).
    """

    kind: str
    flops: float = 0.0
    shape: str = ""
    source: str = ""


def _dims(shape: str) -> tuple[int, ...] | None:
    match = _ARRAY.match(shape)
    if match is None:
        return None
    return tuple(int(d) for d in match["dims"].split(",") if d)


def parse_hlo(text: str) -> dict[str, Op]:
    """``{instruction name: Op}`` for every instruction of the compiled HLO module ``text``
    (``compiled.as_text()``) that runs as one operation: its kind (one of :data:`KINDS`) and,
    for convolutions and matrix products, its FLOPs (2 per multiply-add)."""
    bodies: dict[str, list[dict]] = collections.defaultdict(list)
    shapes: dict[str, str] = {}
    current = entry = None
    for line in text.splitlines():
        if not line.startswith(" "):
            match = _COMPUTATION.match(line)
            current = match["name"] if match else current
            entry = current if line.startswith("ENTRY") else entry
            continue
        match = _INSTRUCTION.match(line)
        if match and current:
            bodies[current].append(match.groupdict())
            shapes[match["name"]] = match["shape"]
    # Kernels are the entry's rank-4 parameters named so (all of them if none is): a backward
    # convolution that yields one of their shapes, in any order of dimensions, is a kernel
    # gradient.
    arguments = [
        (inst["name"], _dims(inst["shape"]))
        for inst in bodies.get(entry, [])
        if inst["op"] == "parameter"
    ]
    arguments = [(name, dims) for name, dims in arguments if dims and len(dims) == 4]
    named = [(name, dims) for name, dims in arguments if "kernel" in name]
    kernels = {tuple(sorted(dims)) for _, dims in named or arguments}
    ops = {}
    for body in bodies.values():
        for inst in body:
            if inst["op"] in _CONTAINERS or inst["op"] == "parameter":
                continue
            inner = [inst]
            for called in re.findall(r"calls=%?([\w.\-]+)", inst["rest"]):
                inner += bodies.get(called, [])
            source = re.search(r'op_name="([^"]*)"', " ".join(i["rest"] for i in inner))
            ops[inst["name"]] = _classify(inst, inner, shapes, kernels)._replace(
                shape=inst["shape"], source=source[1] if source else ""
            )
    return ops


def _classify(inst: dict, inner: list[dict], shapes: dict, kernels: set) -> Op:
    inner_ops = {i["op"] for i in (inner[1:] if inst["op"] == "fusion" else inner)}
    names = " ".join(re.findall(r'op_name="([^"]*)"', " ".join(i["rest"] for i in inner)))
    backward = "transpose(" in names
    for i in inner:
        if i["op"] in ("convolution", "dot"):
            flops = _flops(i, shapes)
            if i["op"] == "dot":
                if TAPS_SCOPE in names:
                    return Op("matmul: kernel gradient taps", flops)
                return Op("matmul: backward" if backward else "matmul: forward", flops)
            # XLA's rewrites of a kernel gradient may carry no op_name: its shape tells.
            if tuple(sorted(_dims(i["shape"]) or ())) in kernels:
                return Op("convolution: kernel gradient", flops)
            return Op("convolution: input gradient" if backward else "convolution: forward", flops)
    if inner_ops & _COLLECTIVES:
        return Op("collective", 0.0)
    if inner_ops & {"reduce", "reduce-window"}:
        return Op("reduction", 0.0)
    if inner_ops <= _MOVEMENT:
        return Op("data movement", 0.0)
    return Op("element-wise", 0.0)


def _flops(inst: dict, shapes: dict) -> float:
    operands = re.match(r"%?([\w.\-]+), %?([\w.\-]+)\)", inst["rest"])
    out = _dims(inst["shape"])
    if operands is None or out is None:
        return 0.0
    lhs = _dims(shapes.get(operands[1], "")) or ()
    if inst["op"] == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst["rest"])
        depth = math.prod(lhs[int(d)] for d in contracting[1].split(",") if d) if contracting else 1
        return 2.0 * math.prod(out) * depth
    labels = re.search(r"dim_labels=([^_,\s]+)_", inst["rest"])
    window = re.search(r"window=\{size=([\dx]+)", inst["rest"])
    features = lhs[labels[1].index("f")] if labels and lhs else 1
    taps = math.prod(int(k) for k in window[1].split("x")) if window else 1
    return 2.0 * math.prod(out) * features * taps


def attribute(events: Iterable[tuple[float, float, str]], ops: dict[str, Op]) -> dict:
    """``{kind: seconds}`` from ``(start, end, name)`` intervals in microseconds: each
    interval of the sweep is shared equally among the operations running in it; time with
    none running is ``"idle"``. Names not in ``ops`` (runtime bookkeeping) are ignored."""
    return _by_kind(attribute_ops(events, ops), ops)


def _by_kind(seconds_by_op: dict, ops: dict[str, Op]) -> dict:
    seconds = dict.fromkeys(KINDS, 0.0)
    for name, t in seconds_by_op.items():
        seconds[ops[name].kind if name in ops else "idle"] += t
    return seconds


def attribute_ops(events: Iterable[tuple[float, float, str]], ops: dict[str, Op]) -> dict:
    """:func:`attribute` by operation: ``{name: seconds}``, with ``"idle"`` for the time
    that no operation ran."""
    points = []
    for start, end, name in events:
        if name in ops:
            points += [(start, 1, name), (end, -1, name)]
    points.sort(key=lambda p: (p[0], p[1]))
    seconds = collections.defaultdict(float)
    running: collections.Counter = collections.Counter()
    last = None
    for at, change, name in points:
        if last is not None and at > last:
            count = sum(running.values())
            if count == 0:
                seconds["idle"] += (at - last) / 1e6
            for other, n in running.items():
                seconds[other] += (at - last) / 1e6 * n / count
        running[name] += change
        if running[name] == 0:
            del running[name]
        last = at
    return dict(seconds)


def trace_file(directory: pathlib.Path) -> pathlib.Path:
    """The Perfetto trace that ``jax.profiler.trace(directory, create_perfetto_trace=True)``
    wrote (gzipped JSON)."""
    (path,) = directory.glob("plugins/profile/*/perfetto_trace.json.gz")
    return path


def read_trace(directory: pathlib.Path) -> dict:
    """:func:`trace_file`'s contents: ``{"traceEvents": [...], ...}``."""
    with gzip.open(trace_file(directory)) as f:
        return json.load(f)


def _trace_events(directory: pathlib.Path) -> list[tuple[float, float, str]]:
    trace = read_trace(directory)
    return [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and "dur" in e
    ]


def profile(compiled, *args, steps: int = 2, donated: bool = False):
    """Traces ``steps`` calls of ``compiled`` (a compiled jitted function) after a warm-up
    call: ``({kind: seconds per call}, {kind: FLOPs per call}, {operation: (Op, seconds per
    call)})``. With ``donated`` the function takes and returns its first argument (a train
    step's state)."""
    ops = parse_hlo(compiled.as_text())

    def call(args):
        out = compiled(*args)
        jax.block_until_ready(out)
        return (out[0], *args[1:]) if donated else args

    args = call(args)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                args = call(args)
        events = _trace_events(pathlib.Path(directory))
    by_op = {name: t / steps for name, t in attribute_ops(events, ops).items()}
    seconds = _by_kind(by_op, ops)
    flops = dict.fromkeys(KINDS, 0.0)
    for _, _, name in events:
        if name in ops:
            flops[ops[name].kind] += ops[name].flops / steps
    return seconds, flops, {name: (ops[name], t) for name, t in by_op.items() if name in ops}


def profile_rows(preset: str, image_shape, batch: int, steps: int = 2, top: int = 0) -> list[dict]:
    """One row per kind of :data:`KINDS` for ``steps`` traced calls of ``preset``'s train step
    on one device: ms per step, share of the wall time, and for convolutions and matmuls
    GFLOP per step and GFLOP/s of their share; then a row for each of the ``top`` operations
    that took longest (all their executions in a step), with their shape and source."""
    if steps < 1 or batch < 1 or top < 0:
        raise ValueError(
            f"steps and batch must be positive and top non-negative; got steps={steps}, "
            f"batch={batch}, top={top}."
        )
    step, state, data, _ = build_step(preset, image_shape, batch, "float32", [jax.devices()[0]])
    compiled = step.lower(state, data).compile()
    seconds, flops, by_op = profile(compiled, state, data, steps=steps, donated=True)
    wall = sum(seconds.values())
    rows = []
    for kind in KINDS:
        row = {
            "benchmark": f"{preset} step profile",
            "batch": batch,
            "kind": kind,
            "ms_per_step": 1e3 * seconds[kind],
            "share": seconds[kind] / wall if wall else 0.0,
        }
        if flops[kind]:
            row["gflop_per_step"] = flops[kind] / 1e9
            row["gflop_per_s"] = flops[kind] / seconds[kind] / 1e9 if seconds[kind] else None
        rows.append(row)
    longest = sorted(by_op.items(), key=lambda item: -item[1][1])[:top]
    for name, (op, t) in longest:
        rows.append(
            {
                "benchmark": f"{preset} step profile",
                "batch": batch,
                "kind": op.kind,
                "ms_per_step": 1e3 * t,
                "share": t / wall if wall else 0.0,
                "op": name,
                "shape": op.shape.split("{")[0],
                "source": op.source[-90:],
            }
        )
    return rows


def torch_part(name: str) -> str:
    """The part (of :data:`PARTS`) of a PyTorch operator, by its profiler name: any ATen
    convolution operator (oneDNN's, the slow fallbacks, the wrappers, whose self time is
    small), its backward, or a matrix product."""
    if name.startswith("aten::") and "conv" in name:
        return "convolution: gradients" if "backward" in name else "convolution: forward"
    return "matmul" if name in _TORCH_MATMULS else "other"


def torch_profile(step, steps: int = 2) -> dict[str, float]:
    """``{part: seconds per call}`` (:data:`PARTS`) of ``steps`` profiled calls of ``step``, a
    no-argument function of PyTorch operators, after a warm-up call: the self CPU time of the
    operators of each part, and as ``"other"`` the rest of the calls' wall time.

    Raises:
        ValueError: for ``steps`` below 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive; got steps={steps}.")
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_trace

    step()
    with torch_trace(activities=[ProfilerActivity.CPU]) as trace:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in trace.key_averages():
        part = torch_part(event.key)
        if part != "other":
            seconds[part] += event.self_cpu_time_total / 1e6 / steps
    seconds["other"] = max(wall - sum(seconds.values()), 0.0)
    return seconds


def compare_rows(preset: str, batch: int, ours: dict[str, float], theirs: dict[str, float]):
    """The side by side: one row per part of :data:`PARTS` and one for the whole step, with
    ms per step of fmjax (``ours``: seconds by kind of :data:`KINDS`, from :func:`profile`)
    and of PyTorch (``theirs``: seconds by part, from :func:`torch_profile`) and their ratio."""
    mine = dict.fromkeys(PARTS, 0.0)
    for kind, t in ours.items():
        mine[_PART_OF_KIND.get(kind, "other")] += t
    rows = []
    for part in (*PARTS, "step"):
        a = sum(mine.values()) if part == "step" else mine[part]
        b = sum(theirs.values()) if part == "step" else theirs[part]
        rows.append(
            {
                "benchmark": f"{preset} step profile vs PyTorch",
                "batch": batch,
                "part": part,
                "fmjax_ms": 1e3 * a,
                "pytorch_ms": 1e3 * b,
                "ratio": a / b if b else None,
            }
        )
    return rows


def torch_compare_rows(preset: str, image_shape, batch: int, ours_rows: list[dict], steps: int = 2):
    """:func:`compare_rows` of ``ours_rows`` (the :data:`KINDS` rows of :func:`profile_rows`
    for the same ``preset`` and ``batch``) and of a :func:`torch_profile` of the PyTorch port
    of ``preset`` (``experiments/bench/conv.py``), on the same images.

    Raises:
        ValueError: without PyTorch (the ``bench`` extra).
    """
    from experiments.bench.conv import _torch_step

    _require_torch()

    step = _torch_step(preset, seed_images(image_shape, batch), threads())
    ours = {row["kind"]: row["ms_per_step"] / 1e3 for row in ours_rows[: len(KINDS)]}
    return compare_rows(preset, batch, ours, torch_profile(step, steps))


def _require_torch() -> None:
    from experiments.bench.conv import has_torch

    if not has_torch():
        raise ValueError(
            "the side by side with PyTorch needs torch: pip install -e '.[bench]' (or the CPU "
            "build of torch alone)."
        )


def run(quick: bool) -> list[dict]:
    """The profile of ``unet_digits`` at batch 64 (``quick``) or of the torchcfm CIFAR-10
    U-Net at batch 16."""
    if quick:
        return profile_rows("unet_digits", (8, 8, 1), 64)
    return profile_rows("unet_cifar10_torchcfm", (32, 32, 3), 16)


def main(argv: list[str] | None = None) -> int:
    from experiments.bench.train import _NATIVE_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(_NATIVE_SHAPES), default="unet_cifar10_torchcfm")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=2, help="traced steps")
    parser.add_argument("--top", type=int, default=0, help="also list the N longest operations")
    parser.add_argument(
        "--torch", action="store_true", help="also profile the PyTorch port, side by side"
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.torch:
        _require_torch()  # before minutes of profiling, not after
    shape = _NATIVE_SHAPES[args.preset]
    print(machine(), flush=True)
    rows = profile_rows(args.preset, shape, args.batch, args.steps, args.top)
    print(markdown_table(rows[: len(KINDS)]))
    if args.top > 0:
        print()
        print(markdown_table(rows[len(KINDS) :]))
    if args.torch:
        side_by_side = torch_compare_rows(args.preset, shape, args.batch, rows, args.steps)
        print()
        print(markdown_table(side_by_side))
        rows += side_by_side
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
