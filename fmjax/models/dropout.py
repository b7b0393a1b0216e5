"""Dropout with one key per example: of a network's features, and of class labels.

Each example of a batch draws from its own key (:func:`fmjax.keys.example_keys`), so that what
is dropped for an example does not depend on the batch it is in or on how the batch is split
across devices: :func:`dropout` is the U-Net's feature dropout, :func:`drop_labels` the label
dropout of classifier-free guidance training.

The feature masks are exactly ``jax.random.bernoulli``'s (:func:`bernoulli`). On CPU they are
computed by :func:`_threefry2x32`, the same hash written out round by round: JAX's own CPU
lowering of the hash is a loop that reads and writes its whole state on every trip (XLA cannot
fuse across it), while the written-out hash of a whole array is one fused loop.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax.keys import example_keys

__all__ = ["bernoulli", "drop_labels", "dropout"]


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher, 20 rounds (Salmon et al., 2011), as ``jax.random``
    computes it, written out round by round: five groups of four rounds, each group followed
    by a key injection."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def bernoulli(keys: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.vmap(lambda k: jax.random.bernoulli(k, p, shape))(keys)``: a ``[len(keys),
    *shape]`` boolean mask, the same bits, computed on CPU by :func:`_threefry2x32`.

    It repeats ``jax.random``'s steps for threefry keys (``jax_threefry_partitionable``, JAX's
    default: the counters are the flat indices of ``shape``, the bits the xor of the hash's two
    words, the uniform draw ``(bits >> 9) / 2**23``) and a float32 ``p`` (no x64); any other
    key, setting or platform takes ``jax.random.bernoulli`` itself.

    Example:
        >>> import jax
        >>> keys = jax.random.split(jax.random.key(0), 2)
        >>> bool((bernoulli(keys, 0.5, (3, 4)) ==
        ...       jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (3, 4)))(keys)).all())
        True
    """

    def reference(keys):
        return jax.vmap(lambda key: jax.random.bernoulli(key, p, shape))(keys)

    if (
        str(jax.random.key_impl(keys)) != "threefry2x32"
        or not jax.config.jax_threefry_partitionable
        or jnp.asarray(p).dtype != jnp.float32
        or not shape
        or math.prod(shape) >= 2**32
    ):
        return reference(keys)

    def unrolled(keys):
        data = jax.random.key_data(keys)
        k1, k2 = (data[:, i].reshape(-1, *(1,) * len(shape)) for i in range(2))
        flat = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(1, *shape)
        x1, x2 = _threefry2x32(k1, k2, jnp.zeros_like(flat), flat)
        mantissa = ((x1 ^ x2) >> np.uint32(9)) | np.uint32(0x3F800000)
        uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1)
        return uniform < np.float32(p)

    return jax.lax.platform_dependent(keys, cpu=unrolled, default=reference)


def dropout(module: nn.Module, h: jax.Array, rate: float, train: bool) -> jax.Array:
    """Inverted dropout of ``h`` ``[batch, ...]`` at ``rate``, with one key per image drawn
    from ``module``'s ``"dropout"`` stream; ``h`` itself when not ``train`` or at rate 0."""
    if not train or rate == 0:
        return h
    keep = 1.0 - rate
    keys = example_keys(module.make_rng("dropout"), h.shape[0])
    return jnp.where(bernoulli(keys, keep, h.shape[1:]), h / keep, 0).astype(h.dtype)


def drop_labels(
    key: PRNGKeyArray,
    labels: Int[ArrayLike, " batch"],
    prob: float | Float[ArrayLike, ""],
    null_label: int,
) -> Int[Array, " batch"]:
    r"""Replaces each class label by ``null_label`` with probability ``prob``.

    The label dropout of classifier-free guidance training: the model learns the conditional
    field :math:`v(x_t, t \mid y)` and, on the dropped examples, the unconditional field
    :math:`v(x_t, t \mid \varnothing)`; at sampling time guidance combines the two. For a
    :class:`fmjax.models.UNet` the null label is its ``num_classes``.

    Pure and jittable. Example ``i``'s draw comes from its own key (``key`` is split into
    ``batch`` keys, or is already ``[batch]`` keys), so the result for an example does not depend
    on how the batch is split across devices.

    Args:
        key: a PRNG key or ``[batch]`` keys.
        labels: integer labels, shape ``[batch]``.
        prob: the drop probability in ``[0, 1]``.
        null_label: the label that means "no class".

    Returns:
        The labels, shape ``[batch]``, with the dtype of ``labels``.

    Raises:
        ValueError: for non-integer or non-``[batch]`` labels, or a concrete ``prob`` outside
            ``[0, 1]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.models import drop_labels
        >>> drop_labels(jax.random.key(0), jnp.arange(4), 1.0, null_label=10)
        Array([10, 10, 10, 10], dtype=int32)
        >>> drop_labels(jax.random.key(0), jnp.arange(4), 0.0, null_label=10)
        Array([0, 1, 2, 3], dtype=int32)
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.ndim != 1:
        raise ValueError(
            f"labels must be integers of shape [batch]; got dtype {labels.dtype} and shape "
            f"{labels.shape}."
        )
    if not isinstance(prob, jax.core.Tracer) and not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"Label drop probability must be in [0, 1]; got prob={prob}.")
    keys = example_keys(key, labels.shape[0])
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, prob))(keys)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)
