"""Training-step benchmarks: throughput, compile time, FLOPs, fraction of a matmul peak, memory.

    python -m experiments.bench --only train [--quick]
    python -m experiments.bench.train [--preset NAME] [--batch-per-device N]
        [--dtype float32|bfloat16] [--image-shape H,W,C] [--num-classes N] [--remat]
        [--flops-only] [--repeats N] [--json PATH]
        [--xla-option NAME=VALUE ... | --model-option 'NAME=VALUE [NAME=VALUE ...]' ...]
    python -m experiments.bench.train --transformers [--dtype ...] [--repeats N]

For each preset, the engine's own jitted step (`fmjax.step.make_train_step`) over every
device present, at a fixed per-device batch and compute dtype (`config.model.dtype`;
parameters and optimiser state stay float32): compile time, the step's time as training runs
it (steps dispatched back to back, `pipelined_step_seconds`) and each step timed alone,
images/s per device, the step's
FLOPs from XLA's cost analysis of the step lowered for CUDA, before XLA's rewrites (see
`step_flops`: the compiled step's count misses loop trips on CPU and cuDNN calls on GPUs),
the achieved FLOP/s as a fraction of a large matmul in the step's compute dtype measured in
the same run on the same device (a practical peak), and peak memory (the device's allocator
statistics where it keeps them, else XLA's memory analysis of the step).

The transformers (``sit_*``, ``dit_*``: :class:`fmjax.models.DiT`) are built for 32x32x4
latents (ImageNet 256x256 through SD's VAE) with 1,000 classes unless ``--image-shape`` and
``--num-classes`` say otherwise; ``--remat`` recomputes each block in the backward pass
(``config.model.remat``). ``--transformers`` times :data:`TRANSFORMERS_CPU` or
:data:`TRANSFORMERS_ACCELERATOR`: SiT-S/2 on CIFAR-10 pixels (32x32x3), SiT-B/2 and SiT-XL/2
(with remat) on latents. ``--flops-only`` compiles the step and reports its FLOPs and memory
without running it (for a step too slow to time, e.g. SiT-XL/2 on a small CPU).

For the Meta CIFAR-10 preset a row also projects the device-hours of the Meta recipe
(`META_RECIPE_STEPS` steps at global batch `META_RECIPE_BATCH`, see
/work/shared/REFERENCES.md) from the measured images/s per device: the recipe's images
divided by that rate, i.e. perfect data-parallel scaling (the gradient all-reduce and the
input pipeline are not in the measurement).

With ``--xla-option`` (one preset) it instead compares XLA compiler options in one process:
the same lowered step compiled with XLA's defaults and once per option, each checked to give
the default's loss from the same state, then timed in turn (:func:`compare_compiler_options`). One process
sees one machine: a flag set through ``XLA_FLAGS`` needs a process of its own, and this
machine's speed drifts by more than most flags change. A second compilation of the defaults
runs among the variants as a control (:data:`CONTROL`): identical programs have differed by
up to 13% in this protocol, so a variant's ratio means something only where it is well outside
the control's. Each row also says whether the variant's optimized HLO is the default's
(``same_hlo``): then the option changed nothing above code generation, and unless it acts
there (as fast math does) its timing is the control's noise.

With ``--model-option`` (one preset) it compares ways of computing the same model, in the
same protocol: fields of the preset set to other values, e.g. ``attention=cudnn`` (cuDNN's
fused attention on an NVIDIA GPU, see ``fmjax.models.UNet``) or, as one variant,
``'attention=cudnn group_norm=flax'``, each variant's first
step checked against the default's from the same perturbed parameters
(:func:`compare_model_options`).
"""

import argparse
import sys
import time
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.bench import (
    CONTROL,
    interleaved_seconds,
    median_seconds,
    print_header,
    print_report,
)
from fmjax import configs, models
from fmjax.mesh import make_mesh
from fmjax.step import init_state, make_train_step

META_RECIPE_STEPS = 175_000
"""Training steps of Meta's CIFAR-10 flow-matching example."""

META_RECIPE_BATCH = 512
"""Its global batch."""


class Case(NamedTuple):
    """One train-step benchmark: a preset at an image shape and per-device batch, with
    ``model`` overriding fields of ``config.model`` (e.g. ``{"remat": True}``,
    ``{"num_classes": None}``: unconditional); without ``timed`` only compiled and counted
    (see :func:`step_row`)."""

    preset: str
    image_shape: tuple[int, int, int]
    batch_per_device: int
    model: Mapping[str, object] | None = None
    timed: bool = True


# On CPU / on accelerators.
QUICK = [Case("unet_tiny", (8, 8, 1), 32), Case("unet_digits", (8, 8, 1), 64)]
FULL_CPU = [*QUICK, Case("unet_cifar10_torchcfm", (32, 32, 3), 4)]
FULL_ACCELERATOR = [
    Case("unet_digits", (8, 8, 1), 512),
    Case("unet_cifar10_torchcfm", (32, 32, 3), 128),
    Case("unet_cifar10_meta", (32, 32, 3), 128),
]

TRANSFORMERS_CPU = [
    Case("sit_s_2", (32, 32, 3), 4, {"num_classes": None}),
    Case("sit_b_2", (32, 32, 4), 2),
    Case("sit_xl_2", (32, 32, 4), 2, {"remat": True}, timed=False),
]
"""The transformer rows on CPU: SiT-S/2 on CIFAR-10 pixels, unconditional (the ``sit``
recipe of ``experiments/configs/cifar10.py``); SiT-B/2 and SiT-XL/2 (with remat) on
32x32x4 latents with 1,000 classes; small batches. SiT-XL/2 is counted, not timed: a
2-core CPU takes minutes to compile it and tens of seconds a step."""

TRANSFORMERS_ACCELERATOR = [
    Case("sit_s_2", (32, 32, 3), 128, {"num_classes": None}),
    Case("sit_b_2", (32, 32, 4), 256),
    Case("sit_xl_2", (32, 32, 4), 256, {"remat": True}),
]
"""The same on an accelerator, the latent models at SiT's batch of 256 on each device, SiT-XL/2
with remat (a second forward pass of each block instead of its stored activations)."""


PEAK_CHAIN = 10
"""Products per timed sample of :func:`matmul_flops_per_second` on accelerators."""


def matmul_flops_per_second(dtype, repeats: int, n: int | None = None) -> float:
    """FLOP/s of an ``n x n`` matmul in ``dtype`` on the default device: the practical peak.

    ``n`` defaults to 1024 on CPU and 8192 on accelerators (large enough to saturate an
    H100-class GPU's tensor cores). The operands are random: some GPUs draw less power, and
    so clock higher, on constant data. On accelerators the products first run for half a
    second (an idle GPU's clocks take that long to rise), and each timed sample is
    :data:`PEAK_CHAIN` products dispatched back to back, so that neither a low clock nor the
    host's wait between calls is charged to the chip: one call at a time, the 8192-cube
    product measured 571 and 651 TFLOP/s on an H200 in two processes of one run, where
    PyTorch's reached 769-798 on the same kind of machine.
    """
    accelerator = jax.default_backend() != "cpu"
    if n is None:
        n = 8192 if accelerator else 1024
    chain = PEAK_CHAIN if accelerator else 1
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)

    def products():
        return [matmul(a) for _ in range(chain)]

    if accelerator:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.5:
            jax.block_until_ready(products())
    return 2 * n**3 * chain / median_seconds(products, repeats)


def default_dtype() -> str:
    """The compute dtype of a step by default: bfloat16 on accelerators, float32 on CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def meta_recipe_device_hours(images_per_second_per_device: float) -> float:
    r"""Device-hours of the Meta CIFAR-10 recipe at a measured per-device throughput.

    :math:`\text{steps} \times \text{batch} / (\text{images/s per device}) / 3600`: perfect
    data-parallel scaling (e.g. 4 devices at per-device batch 128 take a quarter of the
    wall-clock time each).

    Example:
        >>> round(meta_recipe_device_hours(1000.0), 1)
        24.9
    """
    return META_RECIPE_STEPS * META_RECIPE_BATCH / images_per_second_per_device / 3600


def _flops_of(analysis) -> float | None:
    if isinstance(analysis, list):  # older JAX returns one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def step_flops(step, compiled, *args) -> tuple[float | None, str]:
    """The FLOPs of one call of the jitted ``step`` and how they were counted.

    Counted on the step lowered for CUDA and not compiled (nothing is compiled for it), on
    every backend, because the compiled step's cost analysis undercounts on both CPU and GPU:

    - XLA counts a while loop's body once, whatever its trip count, and on CPU the U-Nets loop
      over chunks of images (the kernel gradient, attention, dropout: :mod:`fmjax.models.conv`,
      :mod:`fmjax.models.attention`, :mod:`fmjax.models.dropout`), so there the compiled
      count misses most of the kernel gradient (416 instead of 563 GFLOP for the torchcfm CIFAR-10 step at batch 16); the
      CUDA lowering takes the ``platform_dependent`` branches without loops.
    - XLA:GPU rewrites convolutions into cuDNN custom calls, which its cost analysis does not
      count: on an H200 the compiled Meta CIFAR-10 step at batch 128 counted 710 GFLOP, against
      14,831 in the lowering (14,128 of them in the 179 cuDNN calls, recounted from their
      shapes in the compiled HLO).

    Where that lowering fails (older JAX), the compiled step's count.
    """
    try:
        lowered = step.trace(*args).lower(lowering_platforms=("cuda",))
        return _flops_of(lowered.cost_analysis()), "loop-free (CUDA) lowering"
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return _flops_of(compiled.cost_analysis()), "compiled step"


def _peak_memory_bytes(compiled) -> int | None:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return _analysed_memory_bytes(compiled)


def _analysed_memory_bytes(compiled) -> int | None:
    """XLA's memory analysis of the compiled step: arguments, outputs and temporaries, less
    the donated arguments the outputs reuse."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def build_step(
    preset: str,
    image_shape,
    per_device_batch: int,
    dtype: str | None = None,
    devices=None,
    *,
    module: nn.Module | None = None,
    objective: str = "flow_matching",
    model_fields: Mapping[str, object] | None = None,
    abstract: bool = False,
):
    """The engine's jitted train step of ``preset`` over ``devices`` (default: all), a fresh
    state and a fixed batch of ``per_device_batch`` images per device (random, in [-1, 1],
    labels 0): ``(step, state, batch, config)``. ``step`` donates its state. With
    ``abstract`` the state and batch are only their shapes (``jax.ShapeDtypeStruct``): enough
    to lower, count and compile the step, with nothing allocated.

    The preset keeps its own class count (1,000 for SiT's, none for the U-Nets) unless
    ``model_fields`` (overrides of ``config.model``, e.g. ``{"remat": True}``) sets
    ``num_classes``. With ``module``, a Flax module that no preset names, the step trains it
    and ``preset`` only labels it (``config.model.name``). ``objective`` is
    ``config.objective``; for ``"mean_flow"`` the preset is built with its second time input
    (``mean_flow=True``)."""
    mesh = make_mesh(devices)
    config = configs.base_config()
    config.model.name = preset
    config.objective = objective
    if module is None:
        config.model.num_classes = models.PRESETS[preset]().num_classes
    if objective == "mean_flow" and module is None:
        config.model.mean_flow = True
    config.model.update(model_fields or {})
    config.model.dtype = dtype or default_dtype()
    config.data.image_shape = image_shape
    config.train.batch_size = per_device_batch * mesh.size
    step, model, tx = engine_step(config, mesh, module)
    make_state = jax.jit(
        lambda: init_state(config, model, tx), out_shardings=NamedSharding(mesh, P())
    )
    if abstract:
        data = NamedSharding(mesh, P("data"))
        batch = {
            "image": jax.ShapeDtypeStruct((config.train.batch_size, *image_shape), np.float32),
            "label": jax.ShapeDtypeStruct((config.train.batch_size,), np.int32),
        }
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data), batch)
        return step, jax.eval_shape(make_state), batch, config
    batch = {
        "image": seed_images(image_shape, config.train.batch_size),
        "label": np.zeros(config.train.batch_size, np.int32),
    }
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    return step, make_state(), batch, config


def engine_step(config, mesh, module: nn.Module | None = None):
    """``(step, model, tx)``: the engine's jitted train step of ``config`` over ``mesh``, with
    the model (``module``, or else the preset ``config.model`` names) and optimizer it was
    built from."""
    model = configs.build_model(config.model) if module is None else module
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    return make_train_step(config, model, tx, schedule, mesh), model, tx


def seed_images(image_shape, batch: int) -> np.ndarray:
    """The benchmarks' fixed batch: ``batch`` images of ``image_shape``, ``tanh`` of seed-0
    normal draws (in [-1, 1]), float32."""
    rng = np.random.default_rng(0)
    return np.tanh(rng.normal(size=(batch, *image_shape))).astype(np.float32)


def _stepping(step, holder: dict, batch):
    """A no-argument call of the state-donating ``step`` on ``holder["state"]``, which it
    replaces by the new state; returns the step's loss (for timing)."""

    def run_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return run_step


def pipelined_step_seconds(step, holder: dict, batch, steps: int, blocks: int = 3) -> float:
    """Wall seconds per step of the state-donating ``step`` run as the training loop runs it:
    ``steps`` calls on ``holder["state"]`` dispatched back to back, waiting only for the last
    state (median over ``blocks`` blocks of ``steps``).

    ``fmjax.train`` fetches metrics every ``log_every`` steps, so the host dispatches a step
    while the device still runs the previous one. Timed one step at a time
    (:func:`experiments.bench.median_seconds`), each step also pays its launch and the host's
    wait for the result, with the device idle meanwhile: on a GPU, where a step takes tens of
    milliseconds, that is a visible share of it."""
    if steps < 1 or blocks < 1:
        raise ValueError(f"steps and blocks must be positive; got {steps} and {blocks}.")
    run_step = _stepping(step, holder, batch)
    jax.block_until_ready(holder["state"])
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        jax.block_until_ready(holder["state"])
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times))


def step_row(
    preset: str,
    image_shape,
    per_device_batch: int,
    repeats: int,
    peak: float,
    dtype: str | None = None,
    model_fields: Mapping[str, object] | None = None,
    *,
    timed: bool = True,
) -> dict:
    """Benchmarks one preset's train step in compute ``dtype`` (default: :func:`default_dtype`);
    ``peak`` is the matmul FLOP/s of that dtype; ``model_fields`` override ``config.model``
    (see :func:`build_step`). Returns one table row, which names the image shape, the class
    count, the fields set and the parameter count.

    ``step_ms``, and the throughput, FLOP/s and device-hours derived from it, are per step of
    ``repeats`` steps dispatched back to back, as training runs them
    (:func:`pipelined_step_seconds`, in ``min(3, repeats)`` blocks); ``step_ms_one_at_a_time``
    is the median of ``repeats`` steps each timed alone, launch and wait included (what
    ``step_ms`` measured until 2026-12-04, the README's H200 figures among them). Without
    ``timed`` the step is compiled and counted on the shapes of its state and batch
    (nothing allocated, so a model larger than the host's memory can be counted), not run:
    the row has no times, and its memory is XLA's analysis of the step."""
    step, state, batch, config = build_step(
        preset, image_shape, per_device_batch, dtype, model_fields=model_fields, abstract=not timed
    )

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    flops, counted = step_flops(step, compiled, state, batch)  # before `state` is donated
    num_params = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(state.params))
    row = {
        "benchmark": "train step",
        "preset": preset,
        "image_shape": "x".join(map(str, image_shape)),
        "classes": config.model.num_classes,
        "model_fields": " ".join(f"{k}={v}" for k, v in (model_fields or {}).items()) or None,
        "params_m": num_params / 1e6,
        "device": jax.devices()[0].device_kind,
        "devices": config.train.batch_size // per_device_batch,
        "batch_per_device": per_device_batch,
        "dtype": config.model.dtype,
        "compile_s": compile_seconds,
        "gflop_per_step_per_device": flops / 1e9 if flops else None,
        "flops_from": counted,
    }
    if not timed:
        row["peak_memory_mb"] = (_analysed_memory_bytes(compiled) or 0) / 2**20
        return row
    holder = {"state": state}
    one_at_a_time = median_seconds(_stepping(compiled, holder, batch), repeats)
    seconds = pipelined_step_seconds(compiled, holder, batch, repeats, blocks=min(3, repeats))
    images_per_second = per_device_batch / seconds
    row |= {
        "step_ms": 1e3 * seconds,
        "step_ms_one_at_a_time": 1e3 * one_at_a_time,
        "images_per_s_per_device": images_per_second,
        "fraction_of_matmul_peak": flops / seconds / peak if flops else None,
        "peak_memory_mb": (_peak_memory_bytes(compiled) or 0) / 2**20,  # after the steps ran
    }
    if preset == "unet_cifar10_meta":
        row["meta_recipe_device_hours"] = meta_recipe_device_hours(images_per_second)
    return row


def objective_rows(
    preset: str,
    image_shape,
    per_device_batch: int,
    repeats: int,
    dtype: str | None = None,
    model_fields: Mapping[str, object] | None = None,
) -> list[dict]:
    """The train step of each of :data:`fmjax.configs.OBJECTIVES` on one preset, timed as
    training runs it (:func:`pipelined_step_seconds`), with each step's time relative to
    flow matching's: the cost of the mean-flow objective's Jacobian-vector product."""
    rows = []
    for objective in configs.OBJECTIVES:
        step, state, batch, config = build_step(
            preset,
            image_shape,
            per_device_batch,
            dtype,
            objective=objective,
            model_fields=model_fields,
        )
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - start
        seconds = pipelined_step_seconds(compiled, {"state": state}, batch, repeats)
        rows.append(
            {
                "benchmark": f"train step, {objective}",
                "preset": preset,
                "device": jax.devices()[0].device_kind,
                "batch_per_device": per_device_batch,
                "dtype": config.model.dtype,
                "compile_s": compile_seconds,
                "step_ms": 1e3 * seconds,
            }
        )
    for row in rows:
        row["relative_to_flow_matching"] = row["step_ms"] / rows[0]["step_ms"]
    return rows


def peak_row(dtype: str, repeats: int) -> tuple[dict, float]:
    """The matmul-peak row of ``dtype`` and the peak in FLOP/s."""
    peak = matmul_flops_per_second(jnp.dtype(dtype), repeats)
    row = {
        "benchmark": "matmul peak",
        "device": jax.devices()[0].device_kind,
        "dtype": dtype,
        "gflop_per_s": peak / 1e9,
    }
    return row, peak


def run(quick: bool) -> list[dict]:
    """Rows for every preset of this backend (`quick`: the two small presets, 3 repeats)."""
    accelerator = jax.default_backend() != "cpu"
    presets = QUICK if quick else (FULL_ACCELERATOR if accelerator else FULL_CPU)
    return run_presets(presets, 3 if quick else 10, default_dtype())


def run_presets(presets, repeats: int, dtype: str, *, timed: bool = True) -> list[dict]:
    """The matmul peak of ``dtype``, then a row per :class:`Case` (or ``(preset, image shape,
    batch)``) of ``presets`` (:func:`step_row`; ``timed``: run the steps of the cases that
    are timed)."""
    row, peak = peak_row(dtype, repeats)
    rows = [row]
    for case in presets:
        case = Case(*case)
        timed_case = timed and case.timed
        rows.append(
            step_row(*case[:3], repeats, peak, dtype, model_fields=case.model, timed=timed_case)
        )
    return rows


def parse_model_variant(text: str) -> dict[str, object]:
    """``"NAME=VALUE [NAME=VALUE ...]"`` (fields of one model variant, separated by spaces)
    as ``{NAME: VALUE}``, each read by :func:`parse_xla_option`.

    Example:
        >>> parse_model_variant("attention=cudnn group_norm=flax")
        {'attention': 'cudnn', 'group_norm': 'flax'}
    """
    pairs = [parse_xla_option(part, "a model option") for part in text.split()]
    names = [name for name, _ in pairs]
    if not pairs or len(set(names)) < len(names):
        raise ValueError(
            f"a model option must read NAME=VALUE [NAME=VALUE ...] with each NAME once; "
            f"got {text!r}."
        )
    return dict(pairs)


def parse_xla_option(text: str, what: str = "an XLA option") -> tuple[str, object]:
    """``"NAME=VALUE"`` as ``(NAME, VALUE)``: ``true``/``false`` become booleans, integers
    integers, anything else stays a string (e.g. an enum's name). An empty value (``NAME=``)
    is the empty string: for a list option it means none, so
    ``xla_cpu_experimental_ynn_fusion_type=`` compiles the step without YNNPACK fusions.

    Example:
        >>> parse_xla_option("xla_cpu_enable_concurrency_optimized_scheduler=false")
        ('xla_cpu_enable_concurrency_optimized_scheduler', False)
        >>> parse_xla_option("xla_cpu_experimental_ynn_fusion_type=")
        ('xla_cpu_experimental_ynn_fusion_type', '')
    """
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name.isidentifier():
        raise ValueError(f"{what} must read NAME=VALUE; got {text!r}.")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    try:
        return name, int(value)
    except ValueError:
        return name, value


class OptionTiming(NamedTuple):
    """One variant of :func:`compare_compiler_options`.

    Attributes:
        loss: ``metrics["loss"]`` of its first step.
        seconds: the time of each timed step.
        same_hlo: whether its optimized HLO is the default's (see the module).
    """

    loss: float
    seconds: list[float]
    same_hlo: bool


def compare_compiler_options(
    step, state, batch, options: list[tuple[str, object]], repeats: int
) -> dict[str, OptionTiming]:
    """``{label: OptionTiming}`` of the jitted, state-donating ``step(state, batch) -> (state,
    metrics)`` compiled with its own options (label ``"default"``: XLA's defaults, or those the
    step was jitted with, as fmjax's train step is on CPU, see ``fmjax._xla``), again with them
    (the control, :data:`CONTROL`) and once per ``(name, value)`` option on top of them (label
    ``"name=value"``).

    The step is lowered once and compiled once per variant (``compiler_options``, so an
    option applies to this program only). Each variant's first step runs from a copy of
    ``state``, and its ``metrics["loss"]`` must match the default's to ``1e-4`` relative: an
    option that changes the result is an error, not a speed-up. Then the variants run in
    turn, ``repeats`` times each, every timed step right after an untimed one of its own.

    Raises:
        ValueError: for an option XLA does not accept (its name or its value), or one
            whose step computes a different loss.
    """
    lowered = step.lower(state, batch)
    variants = {"default": {}, CONTROL: {}}
    variants |= {f"{name}={value}": {name: value} for name, value in options}
    compiled = {}
    for label, compiler_options in variants.items():
        try:
            compiled[label] = lowered.compile(compiler_options=compiler_options)
        except jax.errors.JaxRuntimeError as err:
            raise ValueError(f"XLA refused the option {label!r}: {err}") from None
    default_hlo = compiled["default"].as_text()
    same_hlo = {label: fn.as_text() == default_hlo for label, fn in compiled.items()}
    losses = _first_metrics(compiled, state, batch, ("loss",), 1e-4, "XLA's defaults", "option")
    times = _interleaved_steps(compiled, state, batch, repeats)
    return {
        label: OptionTiming(*losses[label], times[label], same_hlo[label]) for label in compiled
    }


def _first_metrics(
    compiled: dict, state, batch, names: tuple[str, ...], rtol: float, default: str, what: str
) -> dict[str, tuple[float, ...]]:
    """``{label: (metrics[name] for name in names)}`` of each compiled step's first step from a
    copy of ``state`` (the steps donate their state). Raises ``ValueError`` where a variant's
    value is not the ``"default"`` one's to ``rtol``."""
    values = {}
    for label, fn in compiled.items():
        _, metrics = fn(jax.tree.map(jnp.copy, state), batch)
        values[label] = tuple(float(metrics[name]) for name in names)
    for label, got in values.items():
        for name, value, reference in zip(names, got, values["default"], strict=True):
            if not abs(value - reference) <= rtol * abs(reference):  # a NaN fails too
                raise ValueError(
                    f"with {label!r} the step's {name} is {value!r}, against {reference!r} "
                    f"with {default}: the {what} changes the computation."
                )
    return values


def _interleaved_steps(compiled: dict, state, batch, repeats: int) -> dict[str, list[float]]:
    """The seconds of each step of each compiled variant, the variants stepping one state in
    turn (:func:`experiments.bench.interleaved_seconds`, settled)."""
    holder = {"state": state}
    return interleaved_seconds(
        {label: _stepping(fn, holder, batch) for label, fn in compiled.items()},
        repeats,
        settle=True,
    )


def perturbed(params, seed: int = 0):
    """``params`` plus Gaussian noise, each leaf's at a tenth of its RMS (0.02 for an
    all-zero leaf), so that zero-initialised layers (the attention blocks' output
    projections, the residual blocks' last convolutions) take part in the output: a fresh
    U-Net's attention does not change its output, and so could not be compared."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def noisy(leaf, key):
        rms = jnp.sqrt(jnp.mean(jnp.square(leaf)))
        scale = jnp.where(rms > 0, 0.1 * rms, 0.02)
        return leaf + scale * jax.random.normal(key, leaf.shape, leaf.dtype)

    return jax.tree.unflatten(
        tree, [noisy(leaf, key) for leaf, key in zip(leaves, keys, strict=True)]
    )


class ModelTiming(NamedTuple):
    """One variant of :func:`compare_model_options`.

    Attributes:
        loss: ``metrics["loss"]`` of its first step from the perturbed state.
        grad_norm: ``metrics["grad_norm"]`` of that step.
        seconds: the time of each timed step.
    """

    loss: float
    grad_norm: float
    seconds: list[float]


MODEL_OPTION_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
"""How far a model variant's first loss and gradient norm may be from the default's, by
compute dtype: a variant computes the same function, summed in another order."""


def compare_model_options(
    step,
    state,
    batch,
    config,
    variants: list[dict[str, object]],
    repeats: int,
    *,
    module: nn.Module | None = None,
) -> dict[str, ModelTiming]:
    """``{label: ModelTiming}`` of the engine's train step with the model of ``config`` (label
    ``"default"``), that step compiled again (the control, :data:`CONTROL`) and once per
    variant, ``{field: value}`` of model fields set to other values (label ``"name=value"``,
    several joined by spaces; e.g. ``{"attention": "cudnn"}``: see
    :attr:`fmjax.models.UNet.attention`; :func:`parse_model_variant` reads them).

    Model options change how the network is computed, not what: the parameters are the
    same, so every variant steps from the same state. First each variant takes one step from
    a copy of the state with :func:`perturbed` parameters, and its loss and gradient norm must
    match the default's to :data:`MODEL_OPTION_RTOL` of the compute dtype. Then the variants
    run in turn from ``state``, ``repeats`` times each, every timed step right after an
    untimed one of its own.

    ``module`` is the model the step trains when no preset names it (see :func:`build_step`);
    its variants are its clones with the fields set.

    Raises:
        ValueError: for a field the model does not have, or a value it refuses (the model's
            own message), or a variant whose step computes another loss or gradient.
    """
    lowered = step.lower(state, batch)
    compiled = {"default": lowered.compile(), CONTROL: lowered.compile()}
    mesh = batch["image"].sharding.mesh
    for fields in variants:
        label = " ".join(f"{name}={value}" for name, value in fields.items())
        variant = config.copy_and_resolve_references()
        try:
            if module is None:
                variant.model.update(fields)
                variant_step, _, _ = engine_step(variant, mesh)
            else:
                variant_step, _, _ = engine_step(variant, mesh, module.clone(**fields))
        except TypeError as err:  # the preset has no such field
            raise ValueError(
                f"the model option {label!r} is not a field of the model: {err}"
            ) from None
        compiled[label] = variant_step.lower(state, batch).compile()
    rtol = MODEL_OPTION_RTOL[config.model.dtype]
    start = state._replace(params=perturbed(state.params))
    checked = _first_metrics(
        compiled, start, batch, ("loss", "grad_norm"), rtol, "the default model", "model option"
    )
    times = _interleaved_steps(compiled, state, batch, repeats)
    return {label: ModelTiming(*checked[label], times[label]) for label in compiled}


def option_rows(
    preset: str,
    image_shape,
    per_device_batch: int,
    repeats: int,
    options: list,
    dtype: str | None = None,
    *,
    model: bool = False,
    module: nn.Module | None = None,
    model_fields: Mapping[str, object] | None = None,
) -> list[dict]:
    """:func:`compare_compiler_options` of ``options``, ``(name, value)`` pairs (or with
    ``model``, :func:`compare_model_options` of ``options``, ``{field: value}`` variants) on
    ``preset``'s train step: one row for the default, one for the control and one per option,
    with the variant's checked values, the best and median step times and the median's ratio
    to the default's. ``module``: a model that no preset names, labelled ``preset``;
    ``model_fields``: overrides of the preset's fields, the default's and every variant's
    (see :func:`build_step`)."""
    step, state, batch, config = build_step(
        preset, image_shape, per_device_batch, dtype, module=module, model_fields=model_fields
    )
    if model:
        results = compare_model_options(step, state, batch, config, options, repeats, module=module)
    else:
        results = compare_compiler_options(step, state, batch, options, repeats)
    benchmark = f"train step, {'model' if model else 'XLA'} option"
    default_median = float(np.median(results["default"].seconds))
    rows = []
    for label, result in results.items():
        median = float(np.median(result.seconds))
        row = {
            "benchmark": benchmark,
            "preset": preset,
            "device": jax.devices()[0].device_kind,
            "batch_per_device": per_device_batch,
            "dtype": config.model.dtype,
            "option": label,
        }
        row |= {name: value for name, value in result._asdict().items() if name != "seconds"}
        row |= {
            "best_ms": 1e3 * min(result.seconds),
            "median_ms": 1e3 * median,
            "median_vs_default": median / default_median,
        }
        rows.append(row)
    return rows


# The image shape each preset is built for (--image-shape overrides it, e.g. for a small
# dry run of a large preset).
_NATIVE_SHAPES = {
    "unet_tiny": (8, 8, 1),
    "unet_digits": (8, 8, 1),
    "unet_cifar10_torchcfm": (32, 32, 3),
    "unet_cifar10_meta": (32, 32, 3),
}


# The transformers' own: SiT's are ImageNet 256x256 latents (8x downsampled, 4 channels).
_TRANSFORMER_SHAPES = {
    name: (8, 8, 1) if name.startswith("dit_") else (32, 32, 4) for name in models.DIT_PRESETS
}

STEP_PRESETS = {**_NATIVE_SHAPES, **_TRANSFORMER_SHAPES}
"""The presets whose train step this module times, with the image shape each is built for."""


def preset_shape(preset: str, image_shape: str | None) -> tuple[int, int, int]:
    """The image shape a benchmark builds ``preset`` for: ``image_shape`` ("H,W,C", from a
    command line) when given, else the preset's own (:data:`STEP_PRESETS`).

    Example:
        >>> preset_shape("unet_cifar10_meta", None), preset_shape("unet_cifar10_meta", "8,8,3")
        ((32, 32, 3), (8, 8, 3))
        >>> preset_shape("sit_xl_2", None)  # ImageNet 256x256 latents
        (32, 32, 4)
    """
    if not image_shape:
        return STEP_PRESETS[preset]
    parts = image_shape.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"--image-shape must be three positive integers H,W,C; got {image_shape!r}."
        )
    return tuple(int(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(STEP_PRESETS), help="one preset")
    parser.add_argument(
        "--batch-per-device", type=int, help="default: 128; with --transformers, each row's own"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="compute dtype (default by backend)"
    )
    parser.add_argument("--image-shape", help="H,W,C (default: the preset's own)")
    parser.add_argument(
        "--num-classes",
        type=int,
        help="class count of a conditional model, 0: unconditional (default: the preset's own)",
    )
    parser.add_argument(
        "--remat", action="store_true", help="recompute each transformer block in the backward pass"
    )
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="compile the step and report FLOPs and memory without running it",
    )
    parser.add_argument(
        "--transformers",
        action="store_true",
        help="the transformer rows of this backend (SiT-S/2 on pixels, SiT-B/2 and XL/2 on "
        "latents); --image-shape and --batch-per-device, when given, replace each row's",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="compare the step compiled with this XLA option against XLA's defaults, in one "
        "process (repeatable: one variant each; needs --preset)",
    )
    parser.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="'NAME=VALUE ...'",
        help="compare the step of the model with this field set (e.g. attention=cudnn; "
        "several fields of one variant separated by spaces) against the preset's, in one "
        "process (repeatable: one variant each; needs --preset)",
    )
    parser.add_argument(
        "--compare-objectives",
        action="store_true",
        help="time the step of each objective (flow matching, mean flow) on --preset",
    )
    args = parser.parse_args(argv)
    given_batch = args.batch_per_device is not None
    args.batch_per_device = args.batch_per_device if given_batch else 128
    if args.batch_per_device < 1 or args.repeats < 1:
        raise ValueError(
            f"--batch-per-device and --repeats must be positive; got "
            f"{args.batch_per_device} and {args.repeats}."
        )
    if args.num_classes is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes={args.num_classes} must be >= 0 (0: unconditional).")
    if args.transformers and args.preset is not None:
        raise ValueError("--transformers times its own rows; drop --preset (or --transformers).")
    fields = {}
    if args.num_classes is not None:
        fields["num_classes"] = args.num_classes or None
    if args.remat:
        fields["remat"] = True
    if fields and args.preset is None:
        raise ValueError(
            "--num-classes and --remat set one preset's fields; name it with --preset."
        )
    options = [parse_xla_option(text) for text in args.xla_option]
    model_options = [parse_model_variant(text) for text in args.model_option]
    if options and model_options:
        raise ValueError("--xla-option and --model-option are two comparisons; run them apart.")
    if (options or model_options) and args.preset is None:
        raise ValueError(
            "--xla-option and --model-option compare one preset's step; name it with --preset."
        )
    dtype = args.dtype or default_dtype()
    accelerator = jax.default_backend() != "cpu"
    if args.transformers:
        presets = [
            case._replace(
                image_shape=preset_shape(case.preset, args.image_shape)
                if args.image_shape
                else case.image_shape,
                batch_per_device=args.batch_per_device if given_batch else case.batch_per_device,
            )
            for case in (TRANSFORMERS_ACCELERATOR if accelerator else TRANSFORMERS_CPU)
        ]
    elif args.preset is None:
        presets = FULL_ACCELERATOR if accelerator else FULL_CPU
    else:
        shape = preset_shape(args.preset, args.image_shape)
        presets = [Case(args.preset, shape, args.batch_per_device, fields)]
    print_header()
    if args.compare_objectives:
        if args.preset is None:
            raise ValueError("--compare-objectives times one preset's step; name it with --preset.")
        rows = objective_rows(*presets[0][:3], args.repeats, dtype, presets[0].model)
    elif options or model_options:
        compared = options or model_options
        rows = option_rows(
            *presets[0][:3],
            args.repeats,
            compared,
            dtype,
            model=bool(model_options),
            model_fields=presets[0].model,
        )
    else:
        rows = run_presets(presets, args.repeats, dtype, timed=not args.flops_only)
    print_report(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
