"""Training-step benchmarks: throughput, compile time, FLOPs, fraction of a matmul peak, memory.

For each preset, the engine's own jitted step (`fmjax.train.make_train_step`) over every
device present, at a fixed per-device batch: compile time, images/s per device, the step's
FLOPs from XLA's cost analysis, the achieved FLOP/s as a fraction of a large matmul measured
in the same run on the same device (a practical peak), and peak memory (the device's
allocator statistics where it keeps them, else XLA's memory analysis of the step).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.bench import median_seconds
from fmjax import configs, train

# (preset, image shape, per-device batch) on CPU / on accelerators.
QUICK = [("unet_tiny", (8, 8, 1), 32), ("unet_digits", (8, 8, 1), 64)]
FULL_CPU = [*QUICK, ("unet_cifar10_torchcfm", (32, 32, 3), 4)]
FULL_ACCELERATOR = [
    ("unet_digits", (8, 8, 1), 512),
    ("unet_cifar10_torchcfm", (32, 32, 3), 128),
    ("unet_cifar10_meta", (32, 32, 3), 128),
]


def matmul_flops_per_second(dtype, repeats: int) -> float:
    """FLOP/s of a large square matmul on the default device: the practical peak."""
    n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    return 2 * n**3 / median_seconds(lambda: matmul(a), repeats)


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returns one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _peak_memory_bytes(compiled) -> int | None:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def step_row(preset: str, image_shape, per_device_batch: int, repeats: int, peak: float) -> dict:
    """Benchmarks one preset's train step; returns one table row."""
    mesh = train.make_mesh()
    config = configs.base_config()
    config.model.name = preset
    config.model.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    config.data.image_shape = image_shape
    config.train.batch_size = per_device_batch * mesh.size
    model = train.build_model(config.model)
    tx, schedule = train.make_optimizer(config.optim, config.train.num_steps)
    state = jax.jit(
        lambda: train.init_state(config, model, tx), out_shardings=NamedSharding(mesh, P())
    )()
    rng = np.random.default_rng(0)
    batch = {
        "image": np.tanh(rng.normal(size=(config.train.batch_size, *image_shape))).astype(
            np.float32
        ),
        "label": np.zeros(config.train.batch_size, np.int32),
    }
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    step = train.make_train_step(config, model, tx, schedule, mesh)

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start

    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    seconds = median_seconds(run_step, repeats)
    flops = _flops(compiled)
    row = {
        "benchmark": "train step",
        "preset": preset,
        "devices": mesh.size,
        "batch_per_device": per_device_batch,
        "dtype": config.model.dtype,
        "compile_s": compile_seconds,
        "step_ms": 1e3 * seconds,
        "images_per_s_per_device": per_device_batch / seconds,
        "gflop_per_step_per_device": flops / 1e9 if flops else None,
        "fraction_of_matmul_peak": flops / seconds / peak if flops else None,
        "peak_memory_mb": (_peak_memory_bytes(compiled) or 0) / 2**20,
    }
    return row


def run(quick: bool) -> list[dict]:
    """Rows for every preset of this backend (`quick`: the two small presets, 3 repeats)."""
    accelerator = jax.default_backend() != "cpu"
    presets = QUICK if quick else (FULL_ACCELERATOR if accelerator else FULL_CPU)
    repeats = 3 if quick else 10
    peak = matmul_flops_per_second(jnp.bfloat16 if accelerator else jnp.float32, repeats)
    rows = [{"benchmark": "matmul peak", "gflop_per_s": peak / 1e9}]
    for preset, image_shape, per_device_batch in presets:
        rows.append(step_row(preset, image_shape, per_device_batch, repeats, peak))
    return rows
