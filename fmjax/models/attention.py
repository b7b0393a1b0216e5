r"""Multi-head self-attention over a feature map: the U-Net's attention block and its kernels.

:class:`Attention` is guided-diffusion's block, ``x + proj_out(attend(qkv(GroupNorm(x))))``
over all positions of an NHWC map. Its parameters are those of ``nn.Dense`` layers named
``qkv`` and ``proj_out``, so checkpoints do not depend on how the block computes:

- :func:`attend`, fmjax's own formula, normalised after the product, on every backend and
  differentiable in both modes (``attention="xla"``);
- :func:`attend_fused`, cuDNN's fused flash-attention kernel through
  ``jax.nn.dot_product_attention`` (``attention="cudnn"``, NVIDIA GPUs, reverse mode only);
- :class:`HeadsProjection` and :class:`OutProjection`, the projections written so that their
  gradients take forms XLA:CPU computes without large transposing copies.

(figures: docs/benchmarks.md)
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from fmjax.models.group_norm import group_norm
from fmjax.models.initializers import bias_init, torch_kernel_init

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "Attention",
    "HeadsProjection",
    "OutProjection",
    "attend",
    "attend_fused",
    "check_attention",
]

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
"""The values of :attr:`fmjax.models.UNet.attention`."""


def attend(q: jax.Array, k: jax.Array, v: jax.Array, dtype: Any) -> jax.Array:
    r"""Softmax attention of ``[batch, heads, positions, head_dim]`` queries, keys and values:
    :math:`\mathrm{softmax}(q k^\top / \sqrt{d})\, v`, normalised after the product.

    The weights are left unnormalised, :math:`e = \exp((s - \max s) / \sqrt{d})`, and the
    output :math:`e v` is divided by the row sums of :math:`e`: the division touches
    ``positions x head_dim`` values instead of ``positions x positions``, and the backward pass
    has no softmax of its own to differentiate. With the heads-major layout every product is a
    plain batched matrix product over (image, head). Logits, weights, their sums and the
    products' accumulators are float32 (float64 for a float64 ``dtype``); the products'
    operands are ``dtype``. The max is a constant shift (the softmax does not depend on it),
    hence ``stop_gradient``: gradients and forward-mode tangents are exact.

    Example:
        >>> import jax.numpy as jnp
        >>> q = k = v = jnp.ones((1, 2, 3, 4))
        >>> attend(q, k, v, jnp.float32).shape
        (1, 2, 3, 4)
    """
    wide = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 for a float64 model
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=wide)
    shift = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.exp((logits - shift) / math.sqrt(q.shape[-1]))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(dtype), v, preferred_element_type=wide)
    return (out / weights.sum(axis=-1, keepdims=True)).astype(dtype)


def attend_fused(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "cudnn"
) -> jax.Array:
    """Softmax attention of position-major ``[batch, positions, heads, head_dim]`` queries,
    keys and values by ``jax.nn.dot_product_attention`` (scale ``1/sqrt(head_dim)``), the
    output position-major too: with ``"cudnn"``, cuDNN's fused flash-attention kernel, which
    never writes the ``positions x positions`` weights to memory.

    cuDNN's own errors (no cuDNN in this JAX, a GPU or shape it does not support) become a
    ``ValueError`` that names the setting to change."""
    try:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(
            f"attention={implementation!r} cannot run here ({err}); it needs an NVIDIA GPU "
            f"with cuDNN and a CUDA build of JAX. Use attention='xla' (every backend)."
        ) from err


def check_attention(attention: str, dtype: Any) -> None:
    """Raises ``ValueError`` unless ``attention`` (see :attr:`fmjax.models.UNet.attention`)
    can run in the compute ``dtype``: cuDNN's fused kernel takes bfloat16 and float16 only.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.models import check_attention
        >>> check_attention("cudnn", jnp.bfloat16)
        >>> check_attention("cudnn", jnp.float32)
        Traceback (most recent call last):
        ...
        ValueError: attention='cudnn' computes in bfloat16 or float16; got dtype float32. ...
    """
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention={attention!r} is not valid; expected one of "
            f"{list(ATTENTION_IMPLEMENTATIONS)}."
        )
    if attention == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' computes in bfloat16 or float16; got dtype "
            f"{jnp.dtype(dtype)}. Set dtype to bfloat16, or attention='xla'."
        )


class HeadsProjection(nn.Module):
    """The attention block's query, key and value projection, straight into heads-major
    ``[batch, heads, positions, head_dim]`` arrays (position-major ``[batch, positions,
    heads, head_dim]`` with ``heads_major=False``, the layout of ``jax.nn.dot_product_attention``).

    Its parameters are those of ``nn.Dense(3 * channels)`` named ``qkv`` (same names, shapes,
    initialisation and meaning: outputs ``[queries | keys | values]``, each split into heads
    of ``head_dim`` consecutive channels), so checkpoints are unchanged. It computes them as
    three products with slices of the kernel instead of one product and a split of its
    output: the split's gradient is a sum of three zero-padded ``[3, batch, heads, positions,
    head_dim]`` arrays, which XLA:CPU rebuilds for each of the gradient's three consumers,
    while the slices' gradients are three plain products.
    """

    num_heads: int
    dtype: Any
    heads_major: bool = True
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = h.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (c, 3 * c), jnp.float32)
        bias = self.param("bias", self.bias_init, (3 * c,), jnp.float32)
        h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias, dtype=self.dtype)
        kernel = kernel.reshape(c, 3, self.num_heads, c // self.num_heads)
        bias = bias.reshape(3, 1, 1, self.num_heads, c // self.num_heads)
        # Each product's output is position-major, as a plain GEMM writes it; moved to heads-
        # major by one copy (with the bias). Asked for heads-major outputs directly, XLA:CPU
        # transposes the (larger) input instead.
        q, k, v = (jnp.einsum("bpc,chd->bphd", h, kernel[:, i]) + bias[i] for i in range(3))
        if self.heads_major:
            q, k, v = (jnp.moveaxis(a, 2, 1) for a in (q, k, v))
        return q, k, v


@jax.custom_jvp
def _positions_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis of ``x``: ``[..., c] x [c, d] -> [..., d]``."""
    return jnp.einsum("...c,cd->...d", x, kernel)


def _positions_product_jvp(primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    out = _positions_product(x, kernel)
    terms = []
    if not isinstance(x_dot, SymbolicZero):
        terms.append(jnp.einsum("...c,cd->...d", x_dot, kernel))
    if not isinstance(kernel_dot, SymbolicZero):

        def transposed(kernel_dot):
            # x^T, written out on its own: the transpose of this term, the kernel gradient, is
            # then (x^T) G, both operands row-major. The barrier keeps XLA from folding the
            # transpose back into the product's dimension numbers.
            x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
            return jnp.einsum("cp,cd->pd", x_t, kernel_dot).reshape(out.shape)

        terms.append(
            jax.lax.platform_dependent(
                kernel_dot,
                cpu=transposed,
                default=lambda kernel_dot: jnp.einsum("...c,cd->...d", x, kernel_dot),
            )
        )
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_positions_product.defjvp(_positions_product_jvp, symbolic_zeros=True)


class OutProjection(nn.Module):
    """The attention block's output projection: ``nn.Dense(features)`` with a zero kernel
    (same parameter names, shapes, initialisation and map, so checkpoints are unchanged),
    whose kernel gradient on CPU is computed as ``(x^T) G`` from a transposed copy of its input.

    Autodiff of ``nn.Dense`` leaves the kernel gradient ``x^T G`` to XLA, which on CPU
    transposes ``G``, the cotangent, and fuses that transpose into the loop that produces
    ``G`` (the GroupNorm backward passes, the skip connections' sums and the up path's split,
    chained), and that heavy loop then writes its output transposed, slowly. Transposing the input
    instead (the attention output, a light fusion) is cheap. Other backends keep the plain
    form: their matrix products take transposed operands as they are.
    """

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.zeros, (h.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias, dtype=self.dtype)
        return _positions_product(h, kernel) + bias.reshape((1,) * (h.ndim - 1) + (-1,))


class Attention(nn.Module):
    """Multi-head self-attention over all positions of an NHWC feature map, with a residual:
    ``x + proj_out(attention(qkv(GroupNorm(x))))``.

    Attributes:
        num_heads: attention heads; must divide the channel count.
        num_groups: groups of the GroupNorm.
        dtype: the compute dtype.
        implementation: one of :data:`ATTENTION_IMPLEMENTATIONS` (see
            :attr:`fmjax.models.UNet.attention`).
        group_norm: one of :data:`fmjax.models.group_norm.GROUP_NORM_IMPLEMENTATIONS`.
        initialization: how the ``qkv`` bias starts, one of
            :data:`fmjax.models.initializers.INITIALIZATIONS`.
    """

    num_heads: int
    num_groups: int
    dtype: Any
    implementation: str = "xla"
    group_norm: str = "fmjax"
    initialization: str = "fmjax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = group_norm(x, self.num_groups, self.dtype, "norm", self.group_norm)
        # Heads-major [batch, heads, positions, head_dim] for our own formula: every product
        # is then a plain batched matrix product over (image, head), at the cost of one copy
        # back after it. The fused kernel takes position-major arrays as they are.
        fused = self.implementation != "xla"
        q, k, v = HeadsProjection(
            self.num_heads, self.dtype, not fused, bias_init(self.initialization, c), name="qkv"
        )(h.reshape(b, height * width, c))
        if fused:
            out = attend_fused(q, k, v, self.implementation)
        else:
            out = jnp.moveaxis(attend(q, k, v, self.dtype), 1, 2)
        out = OutProjection(c, self.dtype, name="proj_out")(out.reshape(b, height, width, c))
        return x + out
