r"""Embeddings of a network's conditioning: sinusoidal features of a time, and a table of
class labels with a null label for classifier-free guidance.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax.models.initializers import embedding_init

__all__ = ["LabelEmbedding", "sinusoidal_embedding"]


def sinusoidal_embedding(
    t: Float[ArrayLike, " batch"],
    dim: int,
    *,
    scale: float = 1000.0,
    max_period: float = 10000.0,
) -> Float[Array, " batch dim"]:
    r"""The sinusoidal embedding of (scaled) times, as in guided-diffusion.

    With :math:`h = \lfloor \mathrm{dim} / 2 \rfloor` and frequencies
    :math:`\omega_k = \mathrm{max\_period}^{-k/h}`, :math:`k = 0, \dots, h-1`:

    .. math::

        \mathrm{emb}(t) = [\cos(s t \omega_0), \dots, \cos(s t \omega_{h-1}),
                           \sin(s t \omega_0), \dots, \sin(s t \omega_{h-1})]

    with :math:`s` = ``scale`` (a zero is appended when ``dim`` is odd). Computed in float32.

    Args:
        t: times, shape ``[batch]``.
        dim: the embedding width.
        scale: multiplies ``t`` first. ``1000`` spreads ``t`` in ``[0, 1]`` over the range of
            DDPM's integer timesteps, so that the high frequencies vary over ``[0, 1]``; ``1``
            feeds ``t`` unscaled, as Meta's ``flow_matching`` and torchcfm U-Nets do.
        max_period: sets the lowest frequency, :math:`\omega_{h-1} = \mathrm{max\_period}^{-(h-1)/h}`.

    Returns:
        The embedding, shape ``[batch, dim]``, float32.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.models import sinusoidal_embedding
        >>> emb = sinusoidal_embedding(jnp.array([0.0, 0.5]), 4, scale=1.0)
        >>> emb.shape, emb[0]  # t = 0: every cosine 1, every sine 0
        ((2, 4), Array([1., 1., 0., 0.], dtype=float32))
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * jnp.asarray(t, jnp.float32))[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class LabelEmbedding(nn.Module):
    """``nn.Embed``'s parameter (``embedding``, ``[num_classes + 1, features]``) and lookup,
    with the null label's row (the last) optionally zero and frozen, as PyTorch's
    ``nn.Embedding(num_classes + 1, features, padding_idx=num_classes)`` keeps it: it starts at
    zero and its gradient is zero.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.models.embeddings import LabelEmbedding
        >>> table = LabelEmbedding(3, 4, jnp.float32, "fmjax", frozen_null_label=True)
        >>> params = table.init(jax.random.key(0), jnp.array([0, 3]))
        >>> table.apply(params, jnp.array([3]))  # the null label's row
        Array([[0., 0., 0., 0.]], dtype=float32)
    """

    num_classes: int
    features: int
    dtype: Any
    initialization: str
    frozen_null_label: bool

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        start = embedding_init(self.initialization)
        rows = self.num_classes + 1

        def init_fn(key, shape, dtype=jnp.float32):
            table = start(key, shape, dtype)
            return table.at[-1].set(0.0) if self.frozen_null_label else table

        table = self.param("embedding", init_fn, (rows, self.features), jnp.float32)
        if self.frozen_null_label:
            null = (jnp.arange(rows) == self.num_classes)[:, None]
            table = jnp.where(null, jax.lax.stop_gradient(table), table)
        return jnp.take(table.astype(self.dtype), labels, axis=0)
