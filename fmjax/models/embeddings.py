r"""Embeddings of a network's conditioning: sinusoidal features of a time, and a table of
class labels with a null label for classifier-free guidance; and the checks of the U-Net's and
DiT's inputs (:func:`network_inputs`, :func:`class_labels`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

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


def network_inputs(
    x_t: Float[ArrayLike, " batch height width channels"],
    t: Float[ArrayLike, " *batch"],
    t_end: Float[ArrayLike, " *batch"] | None,
    *,
    mean_flow: bool,
    model: str,
) -> tuple[
    Float[Array, " batch height width channels"], Float[Array, " *batch"], Float[Array, " *batch"]
]:
    """A network's images ``x_t`` and times ``t``, ``t_end`` checked, as arrays: float images
    ``[batch, height, width, channels]``, times that are scalars or of shape ``[batch]``, and
    ``t_end`` (``t`` when None) given only to a mean-flow network (``mean_flow=True``).

    Raises:
        ValueError: for other images or times, or ``t_end`` given to a plain ``model`` (its
            name, for the message).

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.models.embeddings import network_inputs
        >>> x_t, t, t_end = network_inputs(jnp.zeros((2, 8, 8, 3)), 0.5, None, mean_flow=False,
        ...                                model="UNet")
        >>> t.shape, float(t_end)
        ((), 0.5)
    """
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 4 or not jnp.issubdtype(x_t.dtype, jnp.floating):
        raise ValueError(
            "x_t must be float images [batch, height, width, channels]; got dtype "
            f"{x_t.dtype} and shape {x_t.shape}."
        )
    batch = x_t.shape[0]
    t = jnp.asarray(t)
    if t.shape not in ((), (batch,)):
        raise ValueError(
            f"t must be a scalar or have shape [batch]=({batch},); got shape {t.shape}."
        )
    if t_end is not None and not mean_flow:
        raise ValueError(
            f"t_end is the second time of a mean-flow network; this {model} has "
            "mean_flow=False (build it with mean_flow=True to train it with "
            "fmjax.meanflow)."
        )
    t_end = t if t_end is None else jnp.asarray(t_end)
    if t_end.shape not in ((), (batch,)):
        raise ValueError(
            f"t_end must be a scalar or have shape [batch]=({batch},); got shape {t_end.shape}."
        )
    return x_t, t, t_end


def class_labels(
    y: Int[ArrayLike, " batch"] | None, num_classes: int | None, batch: int, model: str
) -> Int[Array, " batch"] | None:
    """A network's class labels ``y`` checked: None for an unconditional network
    (``num_classes=None``), the null label ``num_classes`` for every example when ``y`` is
    None, else ``y``, integers of shape ``[batch]`` in ``[0, num_classes]`` (values checked
    when known at trace time).

    Raises:
        ValueError: for labels given to an unconditional ``model`` (its name, for the
            message), or labels of another dtype, shape or range.

    Example:
        >>> import numpy as np
        >>> from fmjax.models.embeddings import class_labels
        >>> class_labels(None, 10, 2, "DiT")  # every example unconditional
        Array([10, 10], dtype=int32)
        >>> class_labels(np.array([3, 11]), 10, 2, "DiT")
        Traceback (most recent call last):
        ...
        ValueError: Class labels must be in [0, num_classes=10] ...; got [11].
    """
    if num_classes is None:
        if y is not None:
            raise ValueError(
                f"This {model} is unconditional (num_classes=None) but got labels y; set "
                "num_classes to condition on classes."
            )
        return None
    if y is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    # Checked before any jnp call: inside a trace that would turn concrete labels into
    # tracers, and their values could no longer be read.
    concrete = not isinstance(y, jax.core.Tracer)
    dtype, shape = jnp.result_type(y), jnp.shape(y)
    if not jnp.issubdtype(dtype, jnp.integer) or shape != (batch,):
        raise ValueError(
            f"Labels y must be integers of shape [batch]=({batch},); got dtype {dtype} "
            f"and shape {shape}."
        )
    if concrete:
        values = np.asarray(y)
        bad = values[(values < 0) | (values > num_classes)]
        if bad.size:
            raise ValueError(
                f"Class labels must be in [0, num_classes={num_classes}] (the last being the "
                f"null label); got {bad.tolist()}."
            )
    return jnp.asarray(y)
