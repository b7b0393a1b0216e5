r"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is fast on XLA:CPU.

XLA:CPU computes the kernel gradient of a convolution, :math:`\partial L / \partial W`, with a
"backward filter" convolution that is far slower on CIFAR-sized layers (32x32, 32-384
channels) than its own forward pass (``experiments/bench/conv.py``; figures:
docs/benchmarks.md). Per kernel tap :math:`(i, j)` it is one matrix product,

.. math::

    \frac{\partial L}{\partial W_{ij}} = X_{ij}^\top G, \qquad
    (X_{ij})_{(n,h,w),\,c} = x^{\mathrm{pad}}_{n,\,s h + i,\,s w + j,\,c}
    \quad ([N H' W', C_{\mathrm{in}}]),

with :math:`G` the output cotangent as ``[N H' W', C_out]``: GEMMs, which XLA:CPU runs near its
matrix-product peak when the loop takes a few images at a time. So :func:`conv_general_dilated`
is ``lax.conv_general_dilated`` (the same forward pass and input gradient) with a custom JVP
whose kernel term, on CPU only, is :math:`\sum_{ij} X_{ij} \dot W_{ij}`, so that its transpose
(the kernel gradient of reverse mode) is those products. Elsewhere (GPU, TPU) the kernel term
is the convolution itself and gradients are XLA's own. Forward mode (``jax.jvp``,
``jax.linearize``, e.g. the exact divergence of :mod:`fmjax.likelihood`) works as for ``lax``.

The tap form applies to NHWC inputs with HWIO kernels (Flax's layout), explicit padding or
``"VALID"``, any strides, no dilation or grouping, from :data:`MIN_PIXELS` output pixels per
image on; anything else goes to ``lax.conv_general_dilated`` unchanged. Below that size (8x8
and 4x4 maps) XLA's own kernel gradient is as fast. Reverse mode stores the padded
input, as lax's stores the input: the shifted copies are rebuilt in the backward pass.

A 1x1 kernel of unit stride without padding (the U-Nets' skip projections) is a matrix
product over channels, and is computed as one on every platform: its forward pass and input
gradient are dots (which XLA:CPU runs faster than a convolution), its kernel gradient the tap
form (one tap) on CPU from :data:`MIN_PIXELS` on and a dot below.

:func:`upsampled_conv_general_dilated` is the U-Nets' "nearest 2x upsampling, then a 3x3
convolution" without the upsampled image: each of the four output phases is a 2x2 convolution
of the input, 16 taps per input pixel instead of 36.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

__all__ = [
    "BATCH_CHUNK",
    "MIN_PIXELS",
    "TAPS_SCOPE",
    "conv_general_dilated",
    "map_in_chunks",
    "upsample_nearest",
    "upsampled_conv_general_dilated",
]

MIN_PIXELS = 16 * 16
"""Output pixels per image from which the kernel gradient is the tap form on CPU."""

BATCH_CHUNK = 2
"""Images per step of the kernel-gradient loop on CPU: few enough that each tap's shifted copy
stays in cache."""

TAPS_SCOPE = "tap_kernel_gradient"
"""The name scope of the tap form's ops: their HLO ``op_name`` contains it."""

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
    """``lax.conv_general_dilated`` with a fast kernel gradient on CPU (see the module).

    Same signature and forward result as ``jax.lax.conv_general_dilated``; pass it to Flax as
    ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.ones((2, 16, 16, 4)); w = jnp.ones((3, 3, 4, 8))
        >>> dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        >>> conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims).shape
        (2, 16, 16, 8)
    """
    options = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if not (
        _plain_nhwc(lhs, rhs, options)
        and preferred_element_type is None
        and (padding == "VALID" or (not isinstance(padding, str) and len(padding) == 2))
    ):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    pads = ((0, 0), (0, 0)) if padding == "VALID" else tuple(tuple(p) for p in padding)
    out_pixels = 1
    for size, (lo, hi), k, stride in zip(
        lhs.shape[1:3], pads, rhs.shape[:2], window_strides, strict=True
    ):
        out_pixels *= (size + lo + hi - k) // stride + 1
    if out_pixels >= MIN_PIXELS:
        return _conv(tuple(window_strides), pads, precision, lhs, rhs)
    if _pointwise(window_strides, pads, rhs.shape):
        return _lax_nhwc(window_strides, pads, precision)(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)


def _plain_nhwc(lhs, rhs, options: dict[str, Any]) -> bool:
    """Whether a convolution with ``options`` (``lax.conv_general_dilated``'s keyword
    arguments) is 2-D NHWC/HWIO without dilation or grouping."""
    if options["dimension_numbers"] is None or jnp.ndim(lhs) != 4 or jnp.ndim(rhs) != 4:
        return False
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, options["dimension_numbers"])
    dilations = (*(options["lhs_dilation"] or ()), *(options["rhs_dilation"] or ()))
    return (
        numbers == _NHWC
        and all(d == 1 for d in dilations)
        and options["feature_group_count"] == 1
        and options["batch_group_count"] == 1
    )


def _pointwise(strides, pads, kernel_shape) -> bool:
    return (
        tuple(kernel_shape[:2]) == (1, 1)
        and all(s == 1 for s in strides)
        and all(p == 0 for pair in pads for p in pair)
    )


def _lax_nhwc(strides, pads, precision):
    """The NHWC convolution ``(lhs, rhs) -> out``: lax's, or a dot for 1x1 kernels.

    A 1x1 convolution of unit stride is a matrix product over channels, with equal results:
    XLA:CPU runs the dot faster than the convolution, forward and input gradient alike, and
    the one-tap form (16x16 and larger) or the dot (smaller maps) faster than lax's kernel
    gradient.
    """

    def conv(lhs, rhs):
        if _pointwise(strides, pads, rhs.shape):
            return jnp.einsum("nhwc,cd->nhwd", lhs, rhs[0, 0], precision=precision)
        return lax.conv_general_dilated(
            lhs, rhs, strides, pads, dimension_numbers=_NHWC, precision=precision
        )

    return conv


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
        taps = functools.partial(_taps, strides, pads, precision, lhs)
        terms.append(
            jax.lax.platform_dependent(rhs_dot, cpu=taps, default=functools.partial(conv, lhs))
        )
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _taps(strides, pads, precision, lhs, rhs_dot):
    """``conv(lhs, rhs_dot)`` as ``sum_(i,j) X_ij @ rhs_dot[i, j]``, over :data:`BATCH_CHUNK`
    images per loop step.

    Linear in ``rhs_dot``: its transpose, the kernel gradient, is ``G^T X_ij`` per tap, summed
    over the loop. Three choices make that loop run near XLA's matmul peak:

    - chunks of a few images keep each tap's shifted copy ``X_ij`` in cache (the whole batch
      at once spends as long copying as multiplying);
    - ``jax.checkpoint`` makes reverse mode rebuild those copies from ``lhs`` instead of
      storing them (nine times the input); each chunk is padded inside the loop too, so the
      forward pass stores ``lhs`` itself rather than writing a padded copy of it;
    - the loop sees the kernel as ``[kh, kw, out, in]``, so the gradient it accumulates is
      ``G^T X_ij`` (``[out, in]``, both operands in the row-major form XLA:CPU multiplies
      fastest), transposed once after the loop; accumulating ``X_ij^T G`` would be slower.
    """
    chunk = min(BATCH_CHUNK, lhs.shape[0])
    kh, kw = rhs_dot.shape[:2]
    (top, bottom), (left, right) = pads
    out_h = (lhs.shape[1] + top + bottom - kh) // strides[0] + 1
    out_w = (lhs.shape[2] + left + right - kw) // strides[1] + 1

    @jax.checkpoint
    def chunk_out(x, kernel_t):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        out = None
        for i in range(kh):
            for j in range(kw):
                window = lax.slice(
                    x,
                    (0, i, j, 0),
                    (
                        chunk,
                        i + strides[0] * (out_h - 1) + 1,
                        j + strides[1] * (out_w - 1) + 1,
                        x.shape[3],
                    ),
                    (1, strides[0], strides[1], 1),
                )
                term = jnp.einsum("nhwc,dc->nhwd", window, kernel_t[i, j], precision=precision)
                out = term if out is None else out + term
        return out

    kernel_t = rhs_dot.transpose(0, 1, 3, 2)
    # The scope names these ops in profiles (experiments/bench/profile.py). The zero images
    # that fill the last chunk add nothing to the kernel gradient.
    with jax.named_scope(TAPS_SCOPE):
        return map_in_chunks(lambda x: chunk_out(x, kernel_t), lhs, chunk=chunk)


def map_in_chunks(fn, *arrays: Array, chunk: int) -> Array:
    """``fn(*arrays)`` computed ``chunk`` examples (leading index) at a time by ``lax.map``.

    For a ``fn`` that treats each example on its own and returns a batch-first array: the
    result is ``fn(*arrays)``, with the intermediates of only ``chunk`` examples alive at once
    (on CPU, that keeps them in cache). A batch that does not fill its last chunk is padded
    with zeros, whose outputs are dropped; PRNG key arrays cannot be padded, so pass them with
    ``chunk=1`` or a batch that ``chunk`` divides.

    Raises:
        ValueError: for no arrays, a ``chunk`` below 1, or arrays of different batch sizes.

    Example:
        >>> import jax.numpy as jnp
        >>> map_in_chunks(lambda x: 2 * x, jnp.arange(5.0), chunk=2)
        Array([0., 2., 4., 6., 8.], dtype=float32)
    """
    batches = {a.shape[0] if a.ndim else None for a in arrays}
    if not arrays or chunk < 1 or len(batches) != 1 or None in batches:
        raise ValueError(
            f"map_in_chunks needs batch-first arrays of one batch size and chunk >= 1; got "
            f"shapes {[a.shape for a in arrays]} and chunk={chunk}."
        )
    batch = arrays[0].shape[0]
    fill = -batch % chunk
    if fill:
        arrays = [jnp.pad(a, ((0, fill),) + ((0, 0),) * (a.ndim - 1)) for a in arrays]
    out = lax.map(lambda xs: fn(*xs), [a.reshape(-1, chunk, *a.shape[1:]) for a in arrays])
    return out.reshape(-1, *out.shape[2:])[:batch]


def upsample_nearest(x: Float[Array, "batch height width channels"]) -> Array:
    """Nearest-neighbour 2x upsampling of NHWC images: ``[n, h, w, c] -> [n, 2h, 2w, c]``.

    Example:
        >>> import jax.numpy as jnp
        >>> upsample_nearest(jnp.arange(2.0).reshape(1, 1, 2, 1))[0, :, :, 0]
        Array([[0., 0., 1., 1.],
               [0., 0., 1., 1.]], dtype=float32)

    Raises:
        ValueError: for an array that is not 4-D.
    """
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"upsample_nearest needs NHWC images [n, h, w, c]; got shape {jnp.shape(x)}."
        )
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsampled_conv_general_dilated(
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
    r""":func:`conv_general_dilated` of ``upsample_nearest(lhs)``, without the upsampled image.

    For a 3x3 kernel :math:`w` of unit stride and padding 1 (NHWC/HWIO), output pixel
    :math:`(2a + p, 2b + q)` reads input rows :math:`a - 1, a` (phase :math:`p = 0`) or
    :math:`a, a + 1` (:math:`p = 1`), and likewise for columns: each phase is a 2x2 convolution
    of the input padded by one, with the kernel rows summed as

    .. math::

        k^{(0)} = (w_0,\; w_1 + w_2), \qquad k^{(1)} = (w_0 + w_1,\; w_2),

    and the columns the same way. That is 16 multiply-adds per input pixel and channel pair
    instead of the 36 of the convolution of the upsampled image, and no upsampled image to
    store or to differentiate through. The result equals that convolution up to summation
    order. Any other kernel, stride, padding or layout computes the convolution of the upsampled
    image by :func:`conv_general_dilated`. Same signature as ``jax.lax.conv_general_dilated``:
    pass it to Flax as ``nn.Conv(..., conv_general_dilated=upsampled_conv_general_dilated)``
    to upsample and convolve with an unchanged parameter tree.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.ones((2, 8, 8, 4)); w = jnp.ones((3, 3, 4, 8))
        >>> dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        >>> y = upsampled_conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        >>> y.shape, float(y[0, 0, 0, 0]), float(y[0, 5, 5, 0])  # a corner sees 4 of 9 pixels
        ((2, 16, 16, 8), 16.0, 36.0)
    """
    options = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    phased = (
        _plain_nhwc(lhs, rhs, options)
        and tuple(rhs.shape[:2]) == (3, 3)
        and tuple(window_strides) == (1, 1)
        and not isinstance(padding, str)
        and tuple(tuple(p) for p in padding) == ((1, 1), (1, 1))
    )
    if not phased:
        return conv_general_dilated(upsample_nearest(lhs), rhs, window_strides, padding, **options)
    n, h, w, _ = lhs.shape
    padded = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def fold(k, axis):  # the two 2-tap kernels of one axis, phase 0 and phase 1
        k0, k1, k2 = (lax.index_in_dim(k, i, axis) for i in range(3))
        return (jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis))

    rows = []
    for p, kp in enumerate(fold(rhs, 0)):
        phases = [
            conv_general_dilated(
                padded[:, p : p + h + 1, q : q + w + 1], kpq, (1, 1), "VALID", **options
            )
            for q, kpq in enumerate(fold(kp, 1))
        ]
        rows.append(jnp.stack(phases, axis=3))  # [n, h, w, 2 (q), out]
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, -1)  # [n, h, 2 (p), w, 2 (q), out]
