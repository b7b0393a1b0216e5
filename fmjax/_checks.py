"""Input checks shared by the core modules. Private: every message names the offending value."""

from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
    """The value of `x` when it is known at trace time, else None (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_float(name: str, x: jax.Array) -> None:
    """Raises `ValueError` unless `x` has a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point array (e.g. images scaled to [-1, 1]); "
            f"got dtype {jnp.result_type(x)}. Convert it first, e.g. x.astype(jnp.float32)."
        )


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    """Raises `ValueError` unless `a` and `b` have the same shape."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; "
            f"got {name_a}.shape={jnp.shape(a)} and {name_b}.shape={jnp.shape(b)}."
        )


def check_batched(name: str, x: jax.Array) -> None:
    """Raises `ValueError` unless `x` has a leading batch axis."""
    if jnp.ndim(x) < 1:
        raise ValueError(
            f"{name} must have a leading batch axis; got a scalar of shape {jnp.shape(x)}."
        )


def check_examples(name: str, x: jax.Array) -> None:
    """Raises `ValueError` unless `x` is ``[batch, *dims]`` with at least one data axis, so a
    single example (``(2,)``: one 2-D point, or two scalars?) is not silently read as a batch.
    """
    if jnp.ndim(x) < 2:
        raise ValueError(
            f"{name} must have shape [batch, *dims] with at least one data axis; got shape "
            f"{jnp.shape(x)}. For one example add the batch axis ({name}[None]); for a batch of "
            f"scalars add a data axis ({name}[:, None])."
        )


def check_nonempty(name: str, x: jax.Array) -> None:
    """Raises `ValueError` unless `x` (batched) holds at least one sample."""
    if jnp.shape(x)[0] < 1:
        raise ValueError(f"{name} must hold at least one sample; got {name}.shape={jnp.shape(x)}.")


def check_choice(name: str, value: str, choices: Collection[str]) -> None:
    """Raises `ValueError` unless `value` is one of `choices` (names, or a mapping's keys)."""
    if value not in choices:
        raise ValueError(
            f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}."
        )


def broadcast_time(t: jax.Array, x: jax.Array, name: str = "t") -> jax.Array:
    """Reshapes a scalar or `[batch]` time so that it broadcasts over the trailing axes of `x`.

    Returns `t` with shape `()` or `[batch, 1, ..., 1]` (as many ones as `x` has trailing axes).
    """
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or jnp.ndim(x) < 1 or t.shape[0] != jnp.shape(x)[0]:
        raise ValueError(
            f"{name} must be a scalar or have shape [batch]=({jnp.shape(x)[0] if jnp.ndim(x) else '?'},) "
            f"matching the leading axis of x with shape {jnp.shape(x)}; got {name}.shape={t.shape}."
        )
    return t.reshape(t.shape + (1,) * (jnp.ndim(x) - 1))


def describe(value: object) -> str:
    """`value` for an error message: arrays by shape and dtype, never by their contents."""
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) != ():
        return f"an array of shape {tuple(shape)} and dtype {getattr(value, 'dtype', '?')}"
    return repr(value)


def check_positive_int(name: str, value: object, hint: str = "") -> None:
    """Raises `ValueError` unless `value` is a Python (or NumPy) integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer{hint}; got {name}={describe(value)}.")
