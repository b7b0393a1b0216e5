r"""Convolution benchmarks on the CPU gap: 3x3 conv passes, and the U-Net train step vs PyTorch.

    python -m experiments.bench --only conv [--quick]
    python -m experiments.bench.conv [--quick] [--steps-only] [--shape SIZE,C_IN,C_OUT ...]
        [--preset NAME] [--batch N] [--repeats N]

1. A 3x3, stride-1, padding-1 convolution at batch 64 on shapes of the small U-Nets
   (``UNetDigits``: 8x8 with 16-32 channels) and of CIFAR-10 (16x16 and 32x32, 32-128
   channels; ``--shape`` for others): GFLOP/s (:math:`2 B H W C_{in} C_{out} 9` per pass) of the forward, the
   input-gradient and the kernel-gradient passes for

   - ``lax NHWC``: ``lax.conv_general_dilated`` in the layout of ``fmjax.models`` (what
     ``jax.grad`` differentiates into two more convolutions);
   - ``lax NCHW``: the same in PyTorch's layout;
   - ``tap grad``: lax's forward and input gradient, and the kernel gradient as one GEMM per
     kernel tap, :math:`\partial W_{ij} = G^\top X_{ij}` with :math:`X_{ij}` the input
     shifted by the tap, two images a step (the form of :mod:`fmjax.models.conv` without its
     size threshold, at every shape);
   - ``fmjax.models.conv``: :func:`fmjax.models.conv.conv_general_dilated`, what the U-Nets
     use: the tap form on CPU from 16x16 output pixels on, lax's own below;
   - ``torch``: ``torch.nn.functional.conv2d`` and ``aten.convolution_backward`` (NCHW,
     oneDNN), when PyTorch is importable (the ``bench`` extra).

2. A U-Net train step (by default ``unet_digits`` at batch 64 on 8x8x1 images; ``--preset``
   picks a CIFAR-10 one, on 32x32x3): ours (:func:`fmjax.step.make_train_step`: CondOT
   loss, AdamW, EMA, grad norm) against a port of the same U-Net to PyTorch (same
   architecture and parameter count, checked) with the same loss, dropout,
   ``torch.optim.AdamW`` and an EMA, one Python step per iteration.

Timing: the machine this was written on has 2 cores shared with other jobs, so every variant
is run in turn and the best of the repeats is reported, with the median beside it for the
step. The conv rows run PyTorch's passes after XLA's, since XLA's spinning pool threads starve
OpenMP's; the train steps alternate, ours and PyTorch's, each timed step right after an
untimed one of the same library, so that the machine's drifting speed affects both alike and
each timed step starts as a training loop's next step does. PyTorch runs at the
thread count XLA uses (the CPUs this process may run on) and, for the step, also at 1 thread,
because OpenMP's spinning barriers degrade far more than XLA's thread pool when the cores are
oversubscribed.
"""

import argparse
import importlib.util
import math
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.bench import interleaved_seconds, machine, markdown_table, threads
from experiments.bench.train import build_step, seed_images
from fmjax import models
from fmjax.models import conv as conv_module
from fmjax.models.conv import conv_general_dilated

BATCH = 64
# (height = width, in channels, out channels).
QUICK_SHAPES = [(8, 16, 16), (8, 32, 32), (32, 32, 32)]
FULL_SHAPES = [(8, 16, 16), (8, 32, 32), (16, 64, 64), (32, 32, 32), (32, 128, 128)]
_NHWC = ("NHWC", "HWIO", "NHWC")
_NCHW = ("NCHW", "OIHW", "NCHW")


def has_torch() -> bool:
    """Whether PyTorch is importable (the ``bench`` extra)."""
    return importlib.util.find_spec("torch") is not None


def best_and_median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, settle: bool = False
) -> dict:
    """``{name: (best, median)}`` wall seconds of each function, run in turn after a warm-up
    (``settle``: each timed call right after an untimed one, see `interleaved_seconds`)."""
    times = interleaved_seconds(fns, repeats, settle)
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


# --- convolution formulations ----------------------------------------------------------------


def _lax_nhwc(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _tap_grad(x, w):
    # The tap form of fmjax.models.conv at every shape, past its size threshold.
    return conv_module._conv((1, 1), ((1, 1), (1, 1)), None, x, w)


def _jax_passes(conv, x, w, g):
    """Jitted forward, input-gradient and kernel-gradient functions of ``conv`` at (x, w, g)."""
    forward = jax.jit(conv)
    grad_x = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    grad_w = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {
        "forward": lambda: forward(x, w),
        "grad input": lambda: grad_x(x, w, g),
        "grad kernel": lambda: grad_w(x, w, g),
    }


def conv_rows(quick: bool, shapes: list[tuple[int, int, int]] | None = None) -> list[dict]:
    """GFLOP/s of each pass of a 3x3 convolution for each formulation and shape
    (``(size, c_in, c_out)``; by default :data:`QUICK_SHAPES` or :data:`FULL_SHAPES`)."""
    repeats = 5 if quick else 15
    rows = []
    for size, c_in, c_out in shapes or (QUICK_SHAPES if quick else FULL_SHAPES):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (BATCH, size, size, c_in))
        w = jax.random.normal(keys[1], (3, 3, c_in, c_out)) / math.sqrt(9 * c_in)
        g = jax.random.normal(keys[2], (BATCH, size, size, c_out))
        x_nchw, g_nchw, w_oihw = (
            x.transpose(0, 3, 1, 2),
            g.transpose(0, 3, 1, 2),
            w.transpose(3, 2, 0, 1),
        )

        def lax_nchw(x, w):
            return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NCHW)

        def fmjax_conv(x, w):
            dims = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
            return conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)

        variants = {
            "lax NHWC": _jax_passes(_lax_nhwc, x, w, g),
            "lax NCHW": _jax_passes(lax_nchw, x_nchw, w_oihw, g_nchw),
            "tap grad": _jax_passes(_tap_grad, x, w, g),
            "fmjax.models.conv": _jax_passes(fmjax_conv, x, w, g),
        }
        reference = variants["lax NHWC"]["grad kernel"]()
        for name in ("tap grad", "fmjax.models.conv"):
            error = float(jnp.max(jnp.abs(variants[name]["grad kernel"]() - reference)))
            if error > 1e-3 * float(jnp.max(jnp.abs(reference))):
                raise AssertionError(f"{name} kernel gradient differs from lax's by {error}")
        fns = {(name, p): fn for name, passes in variants.items() for p, fn in passes.items()}
        timed = best_and_median_seconds(fns, repeats)
        if has_torch():
            # Timed after XLA's, not interleaved: XLA's pool threads spin for a while after
            # each call, and their spinning starves PyTorch's OpenMP threads.
            variants["torch"] = _torch_passes(x, w, g)
            torch_fns = {("torch", p): fn for p, fn in variants["torch"].items()}
            timed |= best_and_median_seconds(torch_fns, repeats)
        flops = 2 * BATCH * size * size * c_in * c_out * 9
        for name in variants:
            row = {"benchmark": "conv 3x3", "shape": f"{BATCH}x{size}x{size}x{c_in}->{c_out}"}
            row["impl"] = name
            for p in ("forward", "grad input", "grad kernel"):
                row[f"{p} GFLOP/s"] = flops / timed[name, p][0] / 1e9
            rows.append(row)
    return rows


def _torch_passes(x, w, g):
    import torch

    torch.set_num_threads(threads())
    x_t = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))
    w_t = torch.from_numpy(np.array(w.transpose(3, 2, 0, 1)))
    g_t = torch.from_numpy(np.array(g.transpose(0, 3, 1, 2)))
    c_out = w_t.shape[0]

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            g_t, x_t, w_t, [c_out], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    return {
        "forward": lambda: torch.nn.functional.conv2d(x_t, w_t, padding=1),
        "grad input": lambda: backward([True, False, False]),
        "grad kernel": lambda: backward([False, True, False]),
    }


# --- the U-Net train step --------------------------------------------------------------------


def torch_unet(model: models.UNet, in_channels: int):
    """A Flax ``UNet`` (``model``, e.g. ``models.UNetCIFAR10TorchCFM()``) in PyTorch, NCHW: the
    same layers, widths and parameter count. Unconditional models with ``resblock_updown=False``
    (every preset): scale-shift or additive time conditioning, convolutional or parameter-free
    resampling, heads by count or width, dropout."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if model.resblock_updown or model.num_classes is not None:
        raise ValueError(
            "torch_unet ports unconditional U-Nets with resblock_updown=False; got "
            f"resblock_updown={model.resblock_updown}, num_classes={model.num_classes}."
        )
    groups, mult = model.num_groups, model.channel_mult

    class ResBlock(nn.Module):
        def __init__(self, c_in, c_out, emb_dim):
            super().__init__()
            self.norm_in = nn.GroupNorm(groups, c_in, eps=1e-5)
            self.conv_in = nn.Conv2d(c_in, c_out, 3, padding=1)
            width = 2 * c_out if model.scale_shift_norm else c_out
            self.emb_proj = nn.Linear(emb_dim, width)
            self.norm_out = nn.GroupNorm(groups, c_out, eps=1e-5)
            self.dropout = nn.Dropout(model.dropout)
            self.conv_out = nn.Conv2d(c_out, c_out, 3, padding=1)
            self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

        def forward(self, x, emb):
            h = self.conv_in(F.silu(self.norm_in(x)))
            e = self.emb_proj(F.silu(emb))[:, :, None, None]
            if model.scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm_out(h) * (1 + scale) + shift
            else:
                h = self.norm_out(h + e)
            h = self.conv_out(self.dropout(F.silu(h)))
            return self.skip(x) + h

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.heads = model._heads(c)
            self.norm = nn.GroupNorm(groups, c, eps=1e-5)
            self.qkv = nn.Linear(c, 3 * c)
            self.proj_out = nn.Linear(c, c)

        def forward(self, x, emb):
            b, c, height, width = x.shape
            heads = self.heads
            d = c // heads
            h = self.norm(x).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(h).reshape(b, height * width, 3 * heads, d).chunk(3, dim=2)
            weights = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)).softmax(-1)
            out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, height * width, c)
            return x + self.proj_out(out).transpose(1, 2).reshape(b, c, height, width)

    class Resample(nn.Module):
        def __init__(self, c, up):
            super().__init__()
            self.up = up
            if model.conv_resample:
                self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1)

        def forward(self, x, emb):
            if self.up:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                return self.conv(x) if model.conv_resample else x
            return self.conv(x) if model.conv_resample else F.avg_pool2d(x, 2)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            m = model.model_channels
            emb_dim = 4 * m
            self.time_mlp_0 = nn.Linear(m, emb_dim)
            self.time_mlp_1 = nn.Linear(emb_dim, emb_dim)
            self.conv_in = nn.Conv2d(in_channels, m * mult[0], 3, padding=1)
            ch, ds, skips = m * mult[0], 1, [m * mult[0]]
            self.down = nn.ModuleList()
            for level, k in enumerate(mult):
                for _ in range(model.num_res_blocks):
                    stage = [ResBlock(ch, m * k, emb_dim)]
                    ch = m * k
                    stage += [Attention(ch)] if ds in model.attention_ds else []
                    self.down.append(nn.ModuleList(stage))
                    skips.append(ch)
                if level < len(mult) - 1:
                    self.down.append(nn.ModuleList([Resample(ch, up=False)]))
                    skips.append(ch)
                    ds *= 2
            self.mid = nn.ModuleList(
                [ResBlock(ch, ch, emb_dim), Attention(ch), ResBlock(ch, ch, emb_dim)]
            )
            self.up = nn.ModuleList()
            for level, k in reversed(list(enumerate(mult))):
                for _ in range(model.num_res_blocks + 1):
                    stage = [ResBlock(ch + skips.pop(), m * k, emb_dim)]
                    ch = m * k
                    stage += [Attention(ch)] if ds in model.attention_ds else []
                    self.up.append(nn.ModuleList(stage))
                if level > 0:
                    self.up.append(nn.ModuleList([Resample(ch, up=True)]))
                    ds //= 2
            self.norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
            self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

        def forward(self, x, t):
            half = model.model_channels // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = (model.time_scale * t)[:, None] * freqs[None]
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
            emb = self.time_mlp_1(F.silu(self.time_mlp_0(emb)))
            h = self.conv_in(x)
            skips = [h]
            for stage in self.down:
                for layer in stage:
                    h = layer(h, emb)
                skips.append(h)
            for layer in self.mid:
                h = layer(h, emb)
            for stage in self.up:
                if isinstance(stage[0], ResBlock):
                    h = torch.cat([h, skips.pop()], dim=1)
                for layer in stage:
                    h = layer(h, emb)
            return self.conv_out(F.silu(self.norm_out(h)))

    return UNet()


def _torch_step(preset: str, images: np.ndarray, num_threads: int) -> Callable[[], float]:
    """One CondOT flow-matching step of the PyTorch port of ``preset``: loss, backward, AdamW,
    EMA (dropout active, as in ours)."""
    import torch

    torch.manual_seed(0)
    flax_model = models.PRESETS[preset]()
    model = torch_unet(flax_model, images.shape[-1])
    ours = models.param_count(flax_model, images.shape[1:])
    theirs = sum(p.numel() for p in model.parameters())
    if theirs != ours:
        raise AssertionError(f"PyTorch port has {theirs} parameters, ours {ours}")
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    x1 = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    def step():
        torch.set_num_threads(num_threads)
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0])
        t4 = t[:, None, None, None]
        loss = ((model((1 - t4) * x0 + t4 * x1, t) - (x1 - x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.get_total_norm([p.grad for p in params])  # ours logs the grad norm
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1e-4)
        return loss.item()

    return step


def _jax_step(preset: str, images: np.ndarray) -> Callable[[], object]:
    step, state, batch, _ = build_step(
        preset, images.shape[1:], images.shape[0], "float32", [jax.devices()[0]]
    )
    np.testing.assert_array_equal(batch["image"], images)  # the same seed-0 draws as PyTorch's
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return run_step


def step_rows(
    quick: bool, preset: str = "unet_digits", batch: int = BATCH, repeats: int | None = None
) -> list[dict]:
    """ms per train step of ``preset`` (by default ``unet_digits`` at batch 64 on 8x8x1
    images; the CIFAR-10 presets on 32x32x3): ours vs the PyTorch port, ``repeats`` timed
    steps each (default 5 with ``quick``, else 20)."""
    repeats = repeats or (5 if quick else 20)
    side, channels = (32, 3) if preset.startswith("unet_cifar10") else (8, 1)
    images = seed_images((side, side, channels), batch)
    steps = {"fmjax (XLA)": _jax_step(preset, images)}
    if has_torch():
        for count in sorted({threads(), 1}, reverse=True):
            steps[f"torch, {count} thread{'s' if count > 1 else ''}"] = _torch_step(
                preset, images, count
            )
    # In turn, so that this machine's drifting speed (up to 40% within the hour) affects all
    # alike; the untimed step before each timed one lets the other library's pool threads go
    # idle, and gives this one's step the memory state of a training loop's.
    timed = best_and_median_seconds(steps, repeats, settle=True)
    return [
        {
            "benchmark": f"{preset} train step",
            "impl": name,
            "batch": batch,
            "best_ms": 1e3 * best,
            "median_ms": 1e3 * median,
            "threads": threads(),
        }
        for name, (best, median) in timed.items()
    ]


def run(quick: bool) -> list[dict]:
    """Conv pass rows for every shape and formulation, then the train-step rows."""
    return conv_rows(quick) + step_rows(quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--steps-only", action="store_true", help="only the train-step rows")
    parser.add_argument(
        "--preset",
        default="unet_digits",
        choices=sorted(models.PRESETS),
        help="the U-Net of the train-step rows (default unet_digits)",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="batch of the train-step rows")
    parser.add_argument(
        "--repeats", type=int, help="timed steps per implementation (default 5 quick, 20 full)"
    )
    parser.add_argument(
        "--shape",
        action="append",
        help="SIZE,C_IN,C_OUT: only the conv rows of these shapes (repeatable)",
    )
    args = parser.parse_args()
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in shape.split(",")) for shape in args.shape]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
            raise ValueError(
                f"--shape must be SIZE,C_IN,C_OUT positive integers; got {args.shape}."
            )
        rows = conv_rows(args.quick, shapes)
    else:
        if args.batch < 1 or (args.repeats is not None and args.repeats < 1):
            raise ValueError(
                f"--batch={args.batch} and --repeats={args.repeats} must be positive integers."
            )
        steps = step_rows(args.quick, args.preset, args.batch, args.repeats)
        rows = steps if args.steps_only else conv_rows(args.quick) + steps
    print(f"{machine()}\n\n{markdown_table(rows)}")
    sys.exit(0)
