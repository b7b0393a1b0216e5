"""Sampling benchmarks: solver cost and accuracy on a closed-form flow; overhead of `sample`.

1. Every solver on the CondOT flow of data N(mu, diag(s^2)) in 8 dimensions, whose exact
   solution maps x0 to mu + s * x0. Adaptive solvers run at rtol = atol = 1e-5; fixed-step
   solvers get the fewest steps (doubling from 4) whose error is at most the `target`
   error, so rows compare the cost of equal accuracy.
2. `sample(..., solver="euler", steps=100)` against a plain `jax.lax.fori_loop` Euler loop
   over the same velocity function, both jitted end to end: for a small MLP and for a
   U-Net-like conv net on 8x8x1 images (~0.9M parameters, plain JAX).
3. On CPU, the digits U-Net sampled (euler) by one program compiled three times: with XLA's
   defaults, with them again (the control: two compilations of one program differ by up to
   13% here) and with the options fmjax compiles its solves with
   (`fmjax._xla.solve_compiler_options`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import CONTROL, interleaved_median_seconds, median_seconds
from fmjax._xla import solve_compiler_options
from fmjax.models import UNetDigits
from fmjax.sampling import ADAPTIVE_SOLVERS, FIXED_STEP_SOLVERS, sample

DIMS = 8


def gaussian_flow():
    mu = jnp.linspace(-2.0, 2.0, DIMS)[None]
    s = jnp.linspace(0.3, 2.5, DIMS)[None]

    def velocity(x, t):  # t: [batch]
        t = t[:, None]
        return mu + (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * (x - t * mu)

    return velocity, lambda x0: mu + s * x0


def solver_rows(quick: bool) -> list[dict]:
    velocity, exact = gaussian_flow()
    x0 = jax.random.normal(jax.random.key(0), (256 if quick else 1024, DIMS))
    target = exact(x0)
    repeats = 3 if quick else 10
    error_target = 1e-3 if quick else 1e-4
    max_steps = 256 if quick else 4096
    rows = []

    def measure(solver, **kwargs):
        solve = jax.jit(lambda x: sample(velocity, x, solver=solver, **kwargs))
        out = solve(x0)
        error = jnp.abs(out.x - target)
        seconds = median_seconds(lambda: solve(x0), repeats)
        return out, float(jnp.max(error)), float(jnp.sqrt(jnp.mean(error**2))), seconds

    for solver in ADAPTIVE_SOLVERS:
        out, error, rms_error, seconds = measure(solver, rtol=1e-5, atol=1e-5)
        rows.append(
            {
                "benchmark": "gaussian flow",
                "solver": solver,
                "setting": "rtol=atol=1e-5",
                "nfe": int(out.nfe),
                "max_abs_error": error,
                "rms_error": rms_error,
                "wall_ms": 1e3 * seconds,
            }
        )
    for solver in FIXED_STEP_SOLVERS:
        steps = 4
        while True:
            out, error, rms_error, seconds = measure(solver, steps=steps)
            if error <= error_target or steps >= max_steps:
                break
            steps *= 2
        rows.append(
            {
                "benchmark": "gaussian flow",
                "solver": solver,
                "setting": f"{steps} steps (fewest 2^k with error <= {error_target:g})",
                "nfe": int(out.nfe),
                "max_abs_error": error,
                "rms_error": rms_error,
                "wall_ms": 1e3 * seconds,
            }
        )
    return rows


def _dense(key, fan_in, fan_out):
    return {
        "w": jax.random.normal(key, (fan_in, fan_out)) / math.sqrt(fan_in),
        "b": jnp.zeros((fan_out,)),
    }


def _conv(key, c_in, c_out):
    return {
        "w": jax.random.normal(key, (3, 3, c_in, c_out)) / math.sqrt(9 * c_in),
        "b": jnp.zeros((c_out,)),
    }


def _apply_conv(p, x, stride=1):
    y = jax.lax.conv_general_dilated(
        x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["b"]


def _time_features(t, width=32):  # t: [batch] -> [batch, width]
    frequencies = jnp.exp(jnp.linspace(0.0, math.log(1000.0), width // 2))
    angles = 1000.0 * t[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def mlp(key, dims=2, width=256, depth=3):
    keys = jax.random.split(key, depth + 1)
    params = [_dense(keys[0], dims + 32, width)]
    params += [_dense(k, width, width) for k in keys[1:-1]]
    params += [_dense(keys[-1], width, dims)]

    def velocity(params, x, t):
        h = jnp.concatenate([x, _time_features(t)], axis=1)
        for layer in params[:-1]:
            h = jax.nn.silu(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]

    return params, velocity


def conv_net(key, width=64):
    """A small U-Net-shaped conv net on [batch, 8, 8, 1]: 8x8 -> 4x4 -> 8x8 with a skip."""
    k = iter(jax.random.split(key, 16))
    params = {
        "time": _dense(next(k), 32, 2 * width),
        "stem": _conv(next(k), 1, width),
        "high": [_conv(next(k), width, width) for _ in range(2)],
        "down": _conv(next(k), width, 2 * width),
        "low": [_conv(next(k), 2 * width, 2 * width) for _ in range(4)],
        "up": _conv(next(k), 2 * width, width),
        "out_high": _conv(next(k), width, width),
        "head": _conv(next(k), width, 1),
    }

    def velocity(params, x, t):
        embedding = jax.nn.silu(_time_features(t) @ params["time"]["w"] + params["time"]["b"])
        h = _apply_conv(params["stem"], x) + embedding[:, None, None, :width]
        for p in params["high"]:
            h = h + jax.nn.silu(_apply_conv(p, h))
        skip = h
        h = jax.nn.silu(_apply_conv(params["down"], h, stride=2)) + embedding[:, None, None, :]
        for p in params["low"]:
            h = h + jax.nn.silu(_apply_conv(p, h))
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = jax.nn.silu(_apply_conv(params["up"], h)) + skip
        h = h + jax.nn.silu(_apply_conv(params["out_high"], h))
        return _apply_conv(params["head"], h)

    return params, velocity


def overhead_rows(quick: bool) -> list[dict]:
    steps = 100
    repeats = 5 if quick else 15
    rows = []
    nets = {
        "mlp 2-d": (mlp, (256, 2)),
        "conv net 8x8x1": (conv_net, (4, 8, 8, 1) if quick else (32, 8, 8, 1)),
    }
    for name, (make, shape) in nets.items():
        params, velocity = make(jax.random.key(1))
        x0 = jax.random.normal(jax.random.key(2), shape)
        num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))

        @jax.jit
        def with_sample(params, x0, velocity=velocity):
            return sample(lambda x, t: velocity(params, x, t), x0, solver="euler", steps=steps).x

        @jax.jit
        def with_fori_loop(params, x0, velocity=velocity):
            dt = 1.0 / steps
            return jax.lax.fori_loop(
                0,
                steps,
                lambda i, x: x + dt * velocity(params, x, jnp.full(x.shape[:1], i * dt)),
                x0,
            )

        # The same computation up to float rounding of the times (i * dt vs a linspace),
        # which an untrained net amplifies a little.
        a, b = with_sample(params, x0), with_fori_loop(params, x0)
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-3 * float(jnp.max(jnp.abs(b))), name
        seconds = interleaved_median_seconds(
            {
                "sample": lambda f=with_sample, p=params, x=x0: f(p, x),
                "fori_loop": lambda f=with_fori_loop, p=params, x=x0: f(p, x),
            },
            repeats,
        )
        rows.append(
            {
                "benchmark": "euler x100 overhead",
                "solver": "euler",
                "setting": f"{name}, {num_params / 1e6:.2f}M params, batch {shape[0]}",
                "nfe": steps,
                "wall_ms": 1e3 * seconds["sample"],
                "fori_loop_ms": 1e3 * seconds["fori_loop"],
                "overhead": seconds["sample"] / seconds["fori_loop"],
            }
        )
    return rows


def option_rows(quick: bool) -> list[dict]:
    """Euler sampling of the digits U-Net compiled with XLA's defaults, with them again and
    with fmjax's solve options: median ms and the ratio to the defaults' median. No rows
    where fmjax compiles solves with no options (off CPU, or an XLA without them)."""
    options = solve_compiler_options()
    if options is None:
        return []
    batch, steps, repeats = (16, 4, 3) if quick else (256, 20, 7)
    model = UNetDigits()
    x0 = jax.random.normal(jax.random.key(0), (batch, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(1), x0, jnp.zeros(batch))
    # Random weights everywhere: a fresh init's zero output layers would make it a no-op.
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params
    )

    def solve(params, x0):  # jitted by the caller, so `sample` adds no options of its own
        return sample(lambda x, t: model.apply(params, x, t), x0, solver="euler", steps=steps).x

    lowered = jax.jit(solve).lower(params, x0)
    variants = {"XLA's defaults": {}, CONTROL: {}, "fmjax's": options}
    compiled = {name: lowered.compile(compiler_options=opts) for name, opts in variants.items()}
    reference = compiled["XLA's defaults"](params, x0)
    for name, fn in compiled.items():  # an option that changes the samples is an error
        error = float(jnp.max(jnp.abs(fn(params, x0) - reference)))
        if not error <= 1e-4 * float(jnp.max(jnp.abs(reference))):  # a NaN fails too
            raise RuntimeError(f"with {name} options the samples differ by {error} (max abs).")
    seconds = interleaved_median_seconds(
        {name: lambda fn=fn: fn(params, x0) for name, fn in compiled.items()}, repeats
    )
    setting = f"unet_digits, batch {batch}, euler x{steps}"
    return [
        {
            "benchmark": "sampling compile options (CPU)",
            "options": name,
            "setting": setting,
            "wall_ms": 1e3 * seconds[name],
            "ratio": seconds[name] / seconds["XLA's defaults"],
        }
        for name in compiled
    ]


def run(quick: bool = False) -> list[dict]:
    return solver_rows(quick) + overhead_rows(quick) + option_rows(quick)
