r"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is fast on XLA:CPU.

XLA:CPU computes the kernel gradient of a convolution, :math:`\partial L / \partial W`, with a
"backward filter" convolution that falls to 3-5 GFLOP/s on CIFAR-sized layers (32x32, 64-128
channels), a fifteenth of its own forward pass (``experiments/bench/conv.py``). Over the
im2col patches it is one matrix product,

.. math::

    \frac{\partial L}{\partial W} = P^\top G, \qquad
    P_{(n,h,w),\,(i,j,c)} = x^{\mathrm{pad}}_{n,\,sh + i,\,sw + j,\,c}
    \quad ([N H' W', k_h k_w C_{\mathrm{in}}]),

with :math:`G` the output cotangent as ``[N H' W', C_out]``, a GEMM that XLA:CPU runs at
16-36 GFLOP/s there (and the whole CIFAR-10 U-Net train step 2.3x faster). So
:func:`conv_general_dilated` is ``lax.conv_general_dilated`` (the same forward pass and input
gradient) with a custom JVP whose kernel term, on CPU only, is :math:`P\,\dot W`, so that its
transpose (the kernel gradient of reverse mode) is that product. Elsewhere (GPU, TPU) the
kernel term is the convolution itself and gradients are XLA's own. Forward mode
(``jax.jvp``, ``jax.linearize``, e.g. the exact divergence of :mod:`fmjax.likelihood`) works
as for ``lax``.

The patch form applies to NHWC inputs with HWIO kernels (Flax's layout), explicit padding or
``"VALID"``, any strides, no dilation or grouping, from :data:`IM2COL_MIN_FEATURES` output
channels and :data:`IM2COL_MIN_PIXELS` output pixels per image on; anything else goes to
``lax.conv_general_dilated`` unchanged. Below those sizes XLA's own kernel gradient was as fast
or faster (at 8x8 and 16x16, and with 3-32 output channels at 32x32), and the patch matrix
costs memory: nine times the layer's input, +58% temporary memory in the CIFAR-10 step.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

__all__ = ["IM2COL_MIN_FEATURES", "IM2COL_MIN_PIXELS", "conv_general_dilated"]

IM2COL_MIN_FEATURES = 64
"""Output channels from which the kernel gradient is an im2col product on CPU."""

IM2COL_MIN_PIXELS = 32 * 32
"""Output pixels per image from which the kernel gradient is an im2col product on CPU."""

# Flax's dimension numbers for 2-D convolutions: NHWC inputs and outputs, HWIO kernels.
_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def conv_general_dilated(
    lhs: Float[Array, "batch height width in_features"],
    rhs: Float[Array, "kh kw in_features out_features"],
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``lax.conv_general_dilated`` with an im2col kernel gradient on CPU (see the module).

    Same signature and forward result as ``jax.lax.conv_general_dilated``; pass it to Flax as
    ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.ones((2, 16, 16, 4)); w = jnp.ones((3, 3, 4, 8))
        >>> dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        >>> conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims).shape
        (2, 16, 16, 8)
    """
    plain = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if not (
        jnp.ndim(lhs) == 4
        and jnp.ndim(rhs) == 4
        and _is_nhwc(lhs.shape, rhs.shape, dimension_numbers)
        and undilated
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and rhs.shape[3] >= IM2COL_MIN_FEATURES
        and (padding == "VALID" or (not isinstance(padding, str) and len(padding) == 2))
    ):
        return plain(lhs, rhs)
    pads = ((0, 0), (0, 0)) if padding == "VALID" else tuple(tuple(p) for p in padding)
    out_pixels = 1
    for size, (lo, hi), k, stride in zip(
        lhs.shape[1:3], pads, rhs.shape[:2], window_strides, strict=True
    ):
        out_pixels *= (size + lo + hi - k) // stride + 1
    if out_pixels < IM2COL_MIN_PIXELS:
        return plain(lhs, rhs)
    return _conv(tuple(window_strides), pads, precision, lhs, rhs)


def _is_nhwc(lhs_shape, rhs_shape, dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    numbers = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return numbers == _NHWC


def _lax_nhwc(strides, pads, precision):
    return functools.partial(
        lax.conv_general_dilated,
        window_strides=strides,
        padding=pads,
        dimension_numbers=_NHWC,
        precision=precision,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _conv(strides, pads, precision, lhs, rhs):
    return _lax_nhwc(strides, pads, precision)(lhs, rhs)


def _conv_jvp(strides, pads, precision, primals, tangents):
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    out = _conv(strides, pads, precision, lhs, rhs)
    conv = _lax_nhwc(strides, pads, precision)
    terms = []
    if not isinstance(lhs_dot, SymbolicZero):
        terms.append(conv(lhs_dot, rhs))
    if not isinstance(rhs_dot, SymbolicZero):
        im2col = functools.partial(_im2col, strides, pads, precision, lhs)
        terms.append(
            jax.lax.platform_dependent(rhs_dot, cpu=im2col, default=functools.partial(conv, lhs))
        )
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _im2col(strides, pads, precision, lhs, rhs_dot):
    """``conv(lhs, rhs_dot)`` as the im2col product ``P @ rhs_dot.reshape(kh kw C_in, C_out)``.

    Linear in ``rhs_dot``: its transpose, the kernel gradient, is the GEMM ``P^T G``.
    """
    padded = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    kh, kw = rhs_dot.shape[:2]
    out_h = (padded.shape[1] - kh) // strides[0] + 1
    out_w = (padded.shape[2] - kw) // strides[1] + 1
    windows = [
        lax.slice(
            padded,
            (0, i, j, 0),
            (
                padded.shape[0],
                i + strides[0] * (out_h - 1) + 1,
                j + strides[1] * (out_w - 1) + 1,
                padded.shape[3],
            ),
            (1, strides[0], strides[1], 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(windows, axis=-1)
    kernel = rhs_dot.reshape(kh * kw * rhs_dot.shape[2], rhs_dot.shape[3])
    return jnp.einsum("nhwk,kd->nhwd", patches, kernel, precision=precision)
