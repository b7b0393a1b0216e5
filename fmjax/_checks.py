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


def check_positive_int(name: str, value: object) -> None:
    """Raises `ValueError` unless `value` is a Python (or NumPy) integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {name}={value!r}.")
