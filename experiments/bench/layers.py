"""The U-Net's memory-bound layers alone, each way fmjax can compute them, on one device.

    python -m experiments.bench --only layers [--quick]
    python -m experiments.bench.layers [--preset NAME] [--batch N] [--dtype D]
        [--image-shape H,W,C] [--repeats N] [--json PATH]

The GPU kernel profile (:mod:`experiments.bench.kernels`) of the Meta CIFAR-10 step puts a
third of its device time outside the convolutions: GroupNorm and SiLU (about 8.5 of 47 ms on
an H200 at batch 128), attention (at least 4.3 ms, with no fused kernel) and dropout. This
times, at the shapes of ``preset`` at ``batch`` images, forward and forward-plus-gradient:

- GroupNorm then SiLU with each of :data:`fmjax.models.GROUP_NORM_IMPLEMENTATIONS`
  (``"fmjax"``: per-channel sums and a custom JVP whose gradient reduces twice, written for
  XLA:CPU; ``"flax"``: ``flax.linen.GroupNorm``, which XLA:GPU may fuse differently);
- the attention block (GroupNorm, projections, attention, output projection, residual) with
  each of :data:`fmjax.models.ATTENTION_IMPLEMENTATIONS` (``"cudnn"``: cuDNN's fused
  kernel, NVIDIA GPUs and 16-bit dtypes only).

Each form's output is first checked against the first form's, from the same perturbed
parameters (to :data:`RTOL` of the compute dtype); a form that cannot run here (cuDNN on a
CPU) gets a row saying why instead of timings. The forms of a layer are timed interleaved
(:func:`experiments.bench.interleaved_seconds`), medians. The whole-step comparison of the
same choices is ``python -m experiments.bench.train --preset P --model-option attention=cudnn
--model-option group_norm=flax``.
"""

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import interleaved_seconds, print_header, print_report
from experiments.bench.train import _NATIVE_SHAPES, default_dtype, perturbed, preset_shape
from fmjax import models
from fmjax.models.attention import Attention
from fmjax.models.group_norm import group_norm

RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
"""How far a form's output may be from the first form's (max abs difference over max abs
value), by compute dtype."""


class _GroupNormSiLU(nn.Module):
    """``silu(GroupNorm(x))`` as the U-Net's residual blocks compute it, the norm in float32
    by ``implementation`` (one of :data:`fmjax.models.GROUP_NORM_IMPLEMENTATIONS`)."""

    num_groups: int
    dtype: object
    implementation: str

    @nn.compact
    def __call__(self, x):
        norm = group_norm(x, self.num_groups, self.dtype, "norm", self.implementation)
        return nn.silu(norm)


def layer_shapes(preset: str, image_shape, batch: int) -> dict:
    """``{"group_norm": [shape, ...], "attention": [(shape, heads), ...]}``: the
    ``[batch, height, width, channels]`` inputs of ``preset``'s GroupNorms (one per level's
    width; the up path's wider inputs left out) and attention blocks, with their heads."""
    model = models.PRESETS[preset]()
    height, width, _ = image_shape
    norms, attention = [], []
    for level, mult in enumerate(model.channel_mult):
        ds, channels = 2**level, model.model_channels * mult
        shape = (batch, height // ds, width // ds, channels)
        norms.append(shape)
        if ds in model.attention_ds:
            attention.append((shape, model._heads(channels)))
    mid = norms[-1]  # the middle block's attention, at the last level's size and width
    attention.append((mid, model._heads(mid[-1])))
    return {"group_norm": list(dict.fromkeys(norms)), "attention": list(dict.fromkeys(attention))}


def _gradient_fn(module, params, x, cotangent):
    """Forward pass and ``(d params, d x)`` of ``<module(x), cotangent>``, one jitted call."""

    def loss(params, x):
        out = module.apply(params, x)
        return jnp.vdot(out.astype(jnp.float32), cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def compare_forms(name: str, forms: dict, x, dtype: str, repeats: int, extra: dict) -> list[dict]:
    """Rows timing ``forms`` (``{label: flax module}`` of one map and one set of
    parameters, the first the reference) on input ``x``: forward and gradient medians and
    their ratios to the first form's. A form that raises ``ValueError`` at trace time gets a
    row with the error instead."""
    modules = list(forms.values())
    params = perturbed(jax.jit(modules[0].init)(jax.random.key(0), x))
    cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    forward, gradient, rows, reference = {}, {}, [], None
    for label, module in forms.items():
        row = {"benchmark": f"layer: {name}", "shape": "x".join(map(str, x.shape)), **extra}
        row |= {"dtype": dtype, "form": label}
        try:
            apply = jax.jit(module.apply).lower(params, x).compile()
            grad = _gradient_fn(module, params, x, cotangent).lower(params, x).compile()
            out = np.asarray(apply(params, x), np.float32)
        except (ValueError, jax.errors.JaxRuntimeError) as err:  # e.g. no cuDNN here
            rows.append(row | {"error": str(err).splitlines()[0]})
            continue
        if reference is None:
            reference = out
        error = float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))
        if not error <= RTOL[dtype]:  # a NaN fails too
            raise ValueError(
                f"{name} computed by {label!r} differs from {next(iter(forms))!r} by "
                f"{error:.3g} "
                f"(max abs difference over max abs value), above {RTOL[dtype]} for {dtype}."
            )
        forward[label] = lambda apply=apply: apply(params, x)
        gradient[label] = lambda grad=grad: grad(params, x)
        rows.append(row | {"max_rel_difference": error})
    times = interleaved_seconds({**_tagged(forward, "f"), **_tagged(gradient, "g")}, repeats)
    first = None
    for row in rows:
        if "error" in row:
            continue
        f_ms = 1e3 * float(np.median(times[("f", row["form"])]))
        g_ms = 1e3 * float(np.median(times[("g", row["form"])]))
        first = first or (f_ms, g_ms)
        row |= {
            "forward_ms": f_ms,
            "gradient_ms": g_ms,
            "forward_vs_first": f_ms / first[0],
            "gradient_vs_first": g_ms / first[1],
        }
    return rows


def _tagged(fns: dict, tag: str) -> dict:
    return {(tag, label): fn for label, fn in fns.items()}


def layer_rows(preset: str, image_shape, batch: int, dtype: str, repeats: int) -> list[dict]:
    """Every layer of :func:`layer_shapes` in every form, in compute ``dtype``."""
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be positive; got {batch} and {repeats}.")
    compute = jnp.dtype(dtype)
    groups = models.PRESETS[preset]().num_groups
    shapes = layer_shapes(preset, image_shape, batch)
    rows = []
    for shape in shapes["group_norm"]:
        x = jax.random.normal(jax.random.key(2), shape, compute)
        forms = {
            implementation: _GroupNormSiLU(groups, compute, implementation)
            for implementation in models.GROUP_NORM_IMPLEMENTATIONS
        }
        rows += compare_forms("GroupNorm + SiLU", forms, x, dtype, repeats, {})
    for shape, heads in shapes["attention"]:
        x = jax.random.normal(jax.random.key(3), shape, compute)
        forms = {
            implementation: Attention(heads, groups, compute, implementation)
            for implementation in models.ATTENTION_IMPLEMENTATIONS
        }
        extra = {"heads": heads}
        rows += compare_forms("attention block", forms, x, dtype, repeats, extra)
    return rows


def run(quick: bool) -> list[dict]:
    """Quick: ``unet_tiny``'s layers at batch 8; else the Meta CIFAR-10 preset's at batch
    128 on an accelerator, ``unet_digits``'s at batch 64 on CPU."""
    if quick:
        preset, batch = "unet_tiny", 8
    elif jax.default_backend() == "cpu":
        preset, batch = "unet_digits", 64
    else:
        preset, batch = "unet_cifar10_meta", 128
    return layer_rows(preset, _NATIVE_SHAPES[preset], batch, default_dtype(), 3 if quick else 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(_NATIVE_SHAPES), default="unet_cifar10_meta")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", choices=tuple(RTOL), help="default by backend")
    parser.add_argument("--image-shape", help="H,W,C (default: the preset's own)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per form (median)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    shape = preset_shape(args.preset, args.image_shape)
    print_header()
    rows = layer_rows(args.preset, shape, args.batch, args.dtype or default_dtype(), args.repeats)
    print_report(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
