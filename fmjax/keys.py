"""Random keys: one per example, and the named streams every run derives its draws from.

Every random draw of a run is a function of ``(seed, stream, step, global example index)``
through ``fold_in``, never of a device or host id, so a run gives the same numbers on one
device or many and resumes exactly. :class:`Stream` names each use of the seed once, for the
engine and the experiments alike, so no two draws share a stream by accident.
"""

import enum

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

__all__ = ["Stream", "example_keys", "stream_key"]


class Stream(enum.IntEnum):
    """The key streams of a run: ``fold_in(key(seed), stream)`` starts each.

    The numbers are part of every run's results (changing one changes the samples and the
    scores), so they never move; a new use takes a new number.
    """

    NOISE = 0
    """The per-example keys of the loss: noise, time and label dropout (then by step, index)."""
    DROPOUT = 1
    """Network dropout (then by step, device, micro-batch)."""
    GRID = 2
    """The sample grids written during training (the same noise every time)."""
    INIT = 3
    """The initial parameters."""
    DIGITS_SCORE = 7
    """The digits job's in-training score samples."""
    DIGITS_FINAL = 8
    """The digits job's final score samples."""
    DIGITS_BPD = 9
    """The digits job's dequantisation and Hutchinson draws for bits/dim."""
    FID = 11
    """The in-training FID samples."""
    LATENTS = 12
    """The draws from stored VAE posteriors (:class:`fmjax.data.LatentSource`; then by step,
    example index)."""
    TOY2D_REFERENCE = 100
    """The 2-D toy job's fresh true samples for its sample distance and their floor."""


def stream_key(seed: int, stream: Stream) -> PRNGKeyArray:
    """The key that starts ``stream`` of the run seeded with ``seed``.

    Example:
        >>> import jax
        >>> from fmjax.keys import Stream, stream_key
        >>> key = stream_key(0, Stream.GRID)
        >>> bool((jax.random.key_data(key) ==
        ...       jax.random.key_data(jax.random.fold_in(jax.random.key(0), 2))).all())
        True
    """
    return jax.random.fold_in(jax.random.key(seed), int(stream))


def example_keys(key: PRNGKeyArray, batch_size: int) -> PRNGKeyArray:
    """One typed PRNG key per example, from one key or from ``batch_size`` keys.

    Accepts typed keys (``jax.random.key``) and raw ``uint32`` keys (``jax.random.PRNGKey``).
    One key is split into ``batch_size``; a batch of keys is checked and returned (typed).

    Raises:
        ValueError: if a batch of keys does not have ``batch_size`` entries.

    Example:
        >>> import jax
        >>> from fmjax.keys import example_keys
        >>> example_keys(jax.random.key(0), 4).shape
        (4,)
    """
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.ndim not in (1, 2):
            raise ValueError(
                "key must be a PRNG key (jax.random.key or jax.random.PRNGKey) or a batch of them; "
                f"got dtype {key.dtype} and shape {key.shape}."
            )
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch_size)
    if key.shape != (batch_size,):
        raise ValueError(
            f"Per-example keys must have shape [batch]=({batch_size},) to match x1; "
            f"got {key.shape[0] if key.ndim else '?'} keys (shape {key.shape})."
        )
    return key
