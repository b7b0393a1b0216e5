r"""GroupNorm with statistics from per-channel sums and a gradient of two reductions.

:class:`GroupNorm` has the parameters and the map of ``flax.linen.GroupNorm`` (equal up to
rounding); it differs in how the work is laid out. The statistics are reduced over each image's
positions into per-channel sums first, then summed over each group's few channels, rather than
over a group's positions and channels at once; and a custom JVP makes reverse mode reduce the
cotangent twice per norm (the sums of :math:`g` and :math:`g \hat x` over positions) where
autodiff of Flax's norm reduces it four or five times. Both choices are made for XLA:CPU, whose
reductions are fastest over positions; XLA:GPU and TPU may fuse Flax's form better with its
neighbours, hence the choice that :func:`group_norm` offers (:attr:`fmjax.models.UNet.group_norm`).
(figures: docs/benchmarks.md)
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GROUP_NORM_EPSILON", "GROUP_NORM_IMPLEMENTATIONS", "GroupNorm", "group_norm"]

GROUP_NORM_EPSILON = 1e-5
"""PyTorch's GroupNorm default, which the peers' models use."""

GROUP_NORM_IMPLEMENTATIONS = ("fmjax", "flax")
"""The values of :attr:`fmjax.models.UNet.group_norm`: :class:`GroupNorm` or
``flax.linen.GroupNorm``."""


def _group_mean(sums: jax.Array, groups: int, count: int) -> jax.Array:
    """Per-channel sums ``[n, c]`` -> each channel's group mean (sum over the group's channels
    divided by ``count``), ``[n, c]``."""
    n, c = sums.shape
    grouped = sums.reshape(n, groups, c // groups).sum(axis=-1, keepdims=True) / count
    return jnp.broadcast_to(grouped, (n, groups, c // groups)).reshape(n, c)


def _positions(x: jax.Array, groups: int) -> tuple[tuple[int, ...], int]:
    """The position axes of a channels-last ``x`` ``[n, ..., c]``, and how many values each
    image's group holds (positions times the group's channels)."""
    return tuple(range(1, x.ndim - 1)), math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)


def _normalized(x: jax.Array, groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """``(xhat, r)``: ``x`` normalised per image and group, and ``r = 1 / sqrt(var + eps)``
    per image and channel ``[n, c]`` (Flax's statistics: the mean and the mean of squares)."""
    axes, count = _positions(x, groups)
    mean = _group_mean(x.sum(axes), groups, count)
    var = jnp.maximum(_group_mean(jnp.square(x).sum(axes), groups, count) - mean**2, 0)
    r = jax.lax.rsqrt(var + epsilon)
    expand = functools.partial(jnp.expand_dims, axis=axes)
    return (x - expand(mean)) * expand(r), r


def _scale_shift(xhat: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``xhat * scale + bias`` with per-channel ``scale`` and ``bias`` ``[c]`` broadcast over
    a channels-last ``xhat`` ``[n, ..., c]`` (reshaped explicitly: no rank promotion)."""
    channels = (1,) * (xhat.ndim - 1) + scale.shape
    return xhat * scale.reshape(channels) + bias.reshape(channels)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _group_norm_apply(x, scale, bias, groups: int, epsilon: float):
    r"""``nn.GroupNorm``'s map, :math:`\hat x \cdot \mathrm{scale} + \mathrm{bias}`, for
    channels-last ``x`` of shape ``[n, ..., c]``, with its statistics from per-channel sums.

    The JVP is written so that its transpose (the gradient) reduces over the image only twice:
    with :math:`m_1, m_2` the group means of :math:`\dot x` and :math:`\dot x \hat x`,

    .. math::

        \dot y = s r\, \dot x + (\dot b - s r m_1) + \hat x\, (\dot s - s r m_2),

    where the bracketed terms are ``[n, c]``, so the cotangent's sums over positions of
    :math:`g` and :math:`g \hat x` give every reduction of the gradient. Forward mode is the
    rule itself.
    """
    xhat, _ = _normalized(x, groups, epsilon)
    return _scale_shift(xhat, scale, bias)


@_group_norm_apply.defjvp
def _group_norm_jvp(groups, epsilon, primals, tangents):
    x, scale, bias = primals
    x_dot, scale_dot, bias_dot = tangents
    axes, count = _positions(x, groups)
    xhat, r = _normalized(x, groups, epsilon)
    sr = scale[None] * r  # [n, c]
    m1 = _group_mean(x_dot.sum(axes), groups, count)
    m2 = _group_mean((x_dot * xhat).sum(axes), groups, count)
    expand = functools.partial(jnp.expand_dims, axis=axes)
    out_dot = (
        expand(sr) * x_dot
        + expand(bias_dot[None] - sr * m1)
        + xhat * expand(scale_dot[None] - sr * m2)
    )
    return _scale_shift(xhat, scale, bias), out_dot


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` (same parameters ``scale`` and ``bias``, same result up to rounding)
    for channels-last inputs ``[n, ..., c]``, computed in ``dtype`` with the statistics and
    the two-reduction gradient described in the module docstring.

    Attributes:
        num_groups: must divide the channel count.
        epsilon: added to the variance.
        dtype: the dtype of the computation.
    """

    num_groups: int
    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if x.ndim < 2 or c % self.num_groups:
            raise ValueError(
                f"GroupNorm needs channels-last inputs [n, ..., c] whose channels "
                f"num_groups={self.num_groups} divides; got shape {x.shape}."
            )
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        return _group_norm_apply(x, scale, bias, self.num_groups, self.epsilon)


def group_norm(
    h: jax.Array, num_groups: int, dtype: Any, name: str, implementation: str = "fmjax"
) -> jax.Array:
    """GroupNorm (epsilon :data:`GROUP_NORM_EPSILON`) computed in float32 (float64 for a
    float64 ``dtype``), then cast to ``dtype``, by ``implementation``: ``"fmjax"``
    (:class:`GroupNorm`) or ``"flax"`` (``flax.linen.GroupNorm``). The parameters, named
    ``name``, are the same either way.

    Call it inside a compact Flax module.
    """
    wide = jnp.promote_types(dtype, jnp.float32)
    norm = {"fmjax": GroupNorm, "flax": nn.GroupNorm}[implementation]
    return norm(num_groups=num_groups, epsilon=GROUP_NORM_EPSILON, dtype=wide, name=name)(
        h.astype(wide)
    ).astype(dtype)
