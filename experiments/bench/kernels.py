"""Where a train step's device time goes on a GPU, by kernel; and the U-Net's sampling cost.

    python -m experiments.bench --only kernels [--quick]
    python -m experiments.bench.kernels [--preset NAME] [--batch N] [--dtype D] [--steps N]
        [--image-shape H,W,C] [--sample-batch N] [--sample-steps N] [--top N] [--save DIR]
        [--json PATH]

The CPU profile (:mod:`experiments.bench.profile`) reads XLA:CPU's operations from a trace;
on a GPU the work runs as kernels (cuDNN convolutions, cuBLAS or Triton GEMMs, XLA's fused
loops) on device streams, which this module reads instead. It traces ``steps`` calls of the
engine's compiled train step on one device (``jax.profiler``, Perfetto format) and reports:

- the step's wall time outside the trace, each step timed alone (launch and wait included)
  and as training runs them (back to back, :func:`experiments.bench.train.pipelined_step_seconds`),
  and the device's busy time per step (the union of kernel intervals): the difference is
  idle device time (launch gaps, host work), and its part left in the pipelined wall time is
  what training's overlap of host and device does not hide;
- kernel time per kind, named from the kernel's name (:func:`kernel_kind`: attention,
  convolution, matmul, reduction, data movement, element-wise), with the share of busy time;
- the ``top`` kernels by total time, with their number of launches per step.

With ``--save DIR`` the raw trace and the compiled step's HLO are written there too (for a
finer attribution offline: a lent GPU's time is short, the analysis need not run on it).

Then it times Euler sampling of the same U-Net (``fmjax.sampling.sample``, ``sample-steps``
steps of ``sample-batch`` images in the step's compute dtype): milliseconds per velocity
evaluation and the projected time of 50,000 samples at 100 evaluations each (an FID-50k run
with Euler 100 or an adaptive solve of about that many evaluations).

On CPU the same runs (XLA:CPU's operations stand in for kernels), but the CPU profile's
finer kinds (convolution direction, tap-form products) are the better tool there.
"""

import argparse
import collections
import gzip
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments.bench import markdown_table, median_seconds, print_header, profile, write_json
from experiments.bench.train import (
    _NATIVE_SHAPES,
    _stepping,
    build_step,
    default_dtype,
    perturbed,
    pipelined_step_seconds,
    preset_shape,
)
from fmjax import configs, sampling

KERNEL_KINDS = (
    "attention",
    "convolution",
    "matmul",
    "reduction",
    "data movement",
    "element-wise",
    "other",
)
"""The kinds of :func:`kernel_kind`, in the order they are reported."""

# Checked in this order: a name can match several (cuDNN's convolutions are implicit GEMMs).
_KIND_PATTERNS = (
    ("attention", re.compile(r"fmha|sdpa|flash|attention", re.I)),
    ("convolution", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|gemv|nvjet|cutlass|wgmma|xmma|cublas|\bdot|_dot", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    (
        "data movement",
        re.compile(r"copy|transpose|memcpy|memset|concatenate|slice|pad|bitcast|broadcast", re.I),
    ),
    ("element-wise", re.compile(r"fusion|loop_|elementwise|triton|convert|wrapped_", re.I)),
)


def kernel_kind(name: str) -> str:
    """The kind (one of :data:`KERNEL_KINDS`) of a GPU kernel or XLA operation, by its name.

    Example:
        >>> kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc")
        'convolution'
        >>> kernel_kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNT")
        'matmul'
        >>> kernel_kind("input_reduce_fusion_3")
        'reduction'
        >>> kernel_kind("loop_multiply_fusion_12")
        'element-wise'
        >>> kernel_kind("copy_transpose_fusion")
        'data movement'
        >>> kernel_kind("wrapped_convert.271")  # a convert, not a convolution
        'element-wise'
    """
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def device_events(trace: dict, op_names: set[str]) -> list[tuple[float, float, str]]:
    """``(start, end, name)`` in microseconds of every kernel the trace saw run on a device.

    A GPU's kernels are the complete events of the ``/device:...`` processes' stream threads
    (their other threads, such as "XLA Ops" and "XLA Modules", are summaries of the same
    time). Where there is no device process (XLA:CPU), the events named like an instruction
    of the compiled program (``op_names``) stand in.
    """
    names = {}  # (pid, tid or None) -> name
    for e in trace["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            key = (e["pid"], e.get("tid") if e["name"] == "thread_name" else None)
            names[key] = e.get("args", {}).get("name", "")
    complete = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    on_device = [e for e in complete if names.get((e["pid"], None), "").startswith("/device:")]
    if on_device:
        streams = [
            e for e in on_device if "stream" in names.get((e["pid"], e.get("tid")), "").lower()
        ]
        chosen = streams or on_device
    else:
        chosen = [e for e in complete if e["name"] in op_names]
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in chosen]


def busy_microseconds(events: list[tuple[float, float, str]]) -> float:
    """The length of the union of the events' intervals: time with at least one running.

    Example:
        >>> busy_microseconds([(0, 10, "a"), (5, 15, "b"), (20, 25, "c")])
        20
    """
    busy, end = 0, None
    for start, stop, _ in sorted(events):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy


def summarize(events: list[tuple[float, float, str]], steps: int, top: int):
    """``({kind: ms per step}, busy ms per step, [(name, ms per step, launches per step)])``
    for ``events`` spanning ``steps`` calls; the list holds the ``top`` kernels by time."""
    by_kind = dict.fromkeys(KERNEL_KINDS, 0.0)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for start, stop, name in events:
        by_kind[kernel_kind(name)] += (stop - start) / 1e3 / steps
        by_name[name][0] += (stop - start) / 1e3 / steps
        by_name[name][1] += 1
    longest = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    kernels = [(name, ms, count / steps) for name, (ms, count) in longest]
    return by_kind, busy_microseconds(events) / 1e3 / steps, kernels


def kernel_rows(
    preset: str,
    image_shape,
    batch: int,
    dtype: str,
    steps: int = 3,
    top: int = 15,
    save: str | None = None,
) -> list[dict]:
    """The train step's rows: one for the step (wall and busy ms), one per kernel kind, one
    per ``top`` kernel. ``save``: a folder to write ``trace.json.gz`` and ``step.hlo.txt.gz``
    to."""
    if steps < 1 or batch < 1 or top < 0:
        raise ValueError(
            f"steps and batch must be positive and top non-negative; got steps={steps}, "
            f"batch={batch}, top={top}."
        )
    step, state, data, config = build_step(preset, image_shape, batch, dtype, [jax.devices()[0]])
    compiled = step.lower(state, data).compile()
    hlo = compiled.as_text()
    holder = {"state": state}
    stepping = _stepping(compiled, holder, data)
    wall_ms = 1e3 * median_seconds(stepping, 5)  # also the trace's warm-up
    pipelined_ms = 1e3 * pipelined_step_seconds(compiled, holder, data, 5)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(stepping())
        trace = profile.read_trace(pathlib.Path(directory))
        if save:
            os.makedirs(save, exist_ok=True)
            shutil.copy(
                profile.trace_file(pathlib.Path(directory)), os.path.join(save, "trace.json.gz")
            )
            with gzip.open(os.path.join(save, "step.hlo.txt.gz"), "wt") as f:
                f.write(hlo)
    # On CPU, XLA's operations stand in for kernels; parse_hlo leaves out the loops and calls
    # that contain others (which the trace times too, so they would count twice).
    ops = set(profile.parse_hlo(hlo))
    by_kind, busy_ms, kernels = summarize(device_events(trace, ops), steps, top)
    common = {
        "benchmark": f"{preset} kernels",
        "batch": batch,
        "dtype": config.model.dtype,
    }
    rows = [
        {**common, "kind": "step (wall, untraced)", "ms_per_step": wall_ms},
        {**common, "kind": "step (wall, pipelined)", "ms_per_step": pipelined_ms},
    ]
    rows.append(
        {**common, "kind": "device busy", "ms_per_step": busy_ms, "share": busy_ms / wall_ms}
    )
    for kind, ms in by_kind.items():
        rows.append(
            {**common, "kind": kind, "ms_per_step": ms, "share": ms / busy_ms if busy_ms else 0.0}
        )
    for name, ms, launches in kernels:
        rows.append(
            {
                **common,
                "kind": kernel_kind(name),
                "ms_per_step": ms,
                "share": ms / busy_ms if busy_ms else 0.0,
                "launches": launches,
                "kernel": name[:100],
            }
        )
    return rows


def sampling_row(preset: str, image_shape, batch: int, dtype: str, steps: int) -> dict:
    """Euler sampling of ``preset`` (fresh weights, perturbed so no layer is a no-op) with
    ``steps`` steps of ``batch`` images: ms per velocity evaluation and the projected seconds
    of 50,000 samples at 100 evaluations."""
    if batch < 1 or steps < 1:
        raise ValueError(f"sample batch and steps must be positive; got {batch} and {steps}.")
    config_model = {"name": preset, "dtype": dtype}
    model = configs.build_model(config_model)
    x0 = jax.random.normal(jax.random.key(0), (batch, *image_shape))
    params = perturbed(jax.jit(model.init)(jax.random.key(1), x0[:1], jnp.zeros(1)))

    def solve(params, x0):
        return sampling.sample(
            lambda x, t: model.apply(params, x, t), x0, solver="euler", steps=steps
        ).x

    start = time.perf_counter()
    compiled = jax.jit(solve).lower(params, x0).compile()
    compile_s = time.perf_counter() - start
    seconds = median_seconds(lambda: compiled(params, x0), 5)
    per_evaluation = seconds / steps
    return {
        "benchmark": f"{preset} euler sampling",
        "batch": batch,
        "dtype": dtype,
        "steps": steps,
        "compile_s": compile_s,
        "ms_per_solve": 1e3 * seconds,
        "ms_per_evaluation": 1e3 * per_evaluation,
        "images_x_nfe_per_s": batch / per_evaluation,
        "fid50k_at_100_nfe_s": 50_000 / batch * 100 * per_evaluation,
    }


def run(quick: bool) -> list[dict]:
    """Quick: ``unet_tiny`` at batch 8; else the Meta CIFAR-10 preset at batch 128 on an
    accelerator, ``unet_digits`` at batch 64 on CPU."""
    dtype = default_dtype()
    if quick:
        preset, batch, sample_batch = "unet_tiny", 8, 8
    elif jax.default_backend() == "cpu":
        preset, batch, sample_batch = "unet_digits", 64, 64
    else:
        preset, batch, sample_batch = "unet_cifar10_meta", 128, 500
    shape = _NATIVE_SHAPES[preset]
    rows = kernel_rows(preset, shape, batch, dtype, steps=2 if quick else 3, top=5 if quick else 15)
    rows.append(sampling_row(preset, shape, sample_batch, dtype, 4 if quick else 20))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(_NATIVE_SHAPES), default="unet_cifar10_meta")
    parser.add_argument("--batch", type=int, default=128, help="train batch (one device)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default by backend")
    parser.add_argument("--image-shape", help="H,W,C (default: the preset's own)")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--top", type=int, default=15, help="longest kernels to list")
    parser.add_argument("--sample-batch", type=int, default=500, help="0: no sampling row")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--save", help="folder for the raw trace and the step's HLO")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    shape = preset_shape(args.preset, args.image_shape)
    dtype = args.dtype or default_dtype()
    print_header()
    rows = kernel_rows(args.preset, shape, args.batch, dtype, args.steps, args.top, args.save)
    print(markdown_table(rows), flush=True)
    if args.sample_batch:
        rows.append(sampling_row(args.preset, shape, args.sample_batch, dtype, args.sample_steps))
        print(markdown_table(rows[-1:]), flush=True)
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
