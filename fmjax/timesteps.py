r"""Samplers of the training time ``t``.

A time sampler is any function ``(key, shape) -> t`` returning floats in ``[0, 1]`` (``t = 0``
noise, ``t = 1`` data). :func:`fmjax.loss.cfm_loss` calls it with ``shape=()`` once per
example, so that each example's time depends only on its own key.

Where a parameterisation conversion divides by :math:`\sigma_t` or :math:`\alpha_t` (see
:class:`fmjax.paths.AffinePath`), keep ``t`` inside ``[t_min, 1 - t_min]``: :func:`uniform` and
:func:`logit_normal` take ``t_min``. :func:`uniform` defaults to ``0`` (the velocity parameterisation divides by
nothing); :func:`logit_normal` defaults to ``1e-4``, the clip of Meta's recipes, because a
float32 sigmoid rounds to exactly ``0`` or ``1`` in its tails.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = [
    "TIME_SAMPLERS",
    "TimeSampler",
    "constant",
    "logit_normal",
    "uniform",
    "uniform_sampler",
]

TimeSampler = Callable[[PRNGKeyArray, Sequence[int]], Float[Array, "..."]]
"""The type of a time sampler: ``(key, shape) -> t`` with ``t`` of that shape in ``[0, 1]``."""


def _check_t_min(t_min: float) -> None:
    if not 0.0 <= t_min < 0.5:
        raise ValueError(
            f"t_min must be in [0, 0.5) so that [t_min, 1 - t_min] is not empty; got {t_min}."
        )


def uniform(
    key: PRNGKeyArray, shape: Sequence[int] = (), *, t_min: float = 0.0, dtype=jnp.float32
) -> Float[Array, "..."]:
    r"""Draws :math:`t \sim U[t_{\min}, 1 - t_{\min}]`, the standard flow-matching choice.

    Args:
        key: a PRNG key.
        shape: the shape of ``t``.
        t_min: the distance kept from both ends (``functools.partial(uniform, t_min=1e-4)``
            makes a sampler with another value).
        dtype: a float dtype.

    Example:
        >>> import jax
        >>> from fmjax.timesteps import uniform
        >>> t = uniform(jax.random.key(0), (1000,))
        >>> bool((t >= 0).all() and (t < 1).all()), t.shape
        (True, (1000,))
    """
    _check_t_min(t_min)
    return jax.random.uniform(key, shape, dtype, minval=t_min, maxval=1.0 - t_min)


def logit_normal(mean: float = 0.0, std: float = 1.0, *, t_min: float = 1e-4) -> TimeSampler:
    r"""A sampler with :math:`\operatorname{logit}(t) \sim N(\text{mean}, \text{std}^2)`.

    :math:`t = 1 / (1 + e^{-(\text{mean} + \text{std}\, z)})`, :math:`z \sim N(0, 1)`, clipped to
    ``[t_min, 1 - t_min]``. A positive ``mean`` leans towards the data end ``t = 1``. SD3 uses
    ``(0, 1)``; Meta's CIFAR-10 recipe draws :math:`t = 1/(1 + e^{s})`, :math:`s \sim N(-1.2,
    1.2^2)`, which is ``logit_normal(1.2, 1.2)`` in this (t = 1 is data) convention.

    Example:
        >>> import jax
        >>> from fmjax.timesteps import logit_normal
        >>> t = logit_normal(1.2, 1.2)(jax.random.key(0), (10000,))
        >>> bool(t.mean() > 0.6)  # leans to the data end
        True
    """
    if std <= 0:
        raise ValueError(f"logit_normal std must be positive; got std={std}.")
    _check_t_min(t_min)

    def sample(
        key: PRNGKeyArray, shape: Sequence[int] = (), dtype=jnp.float32
    ) -> Float[Array, "..."]:
        z = jax.random.normal(key, shape, dtype)
        return jnp.clip(jax.nn.sigmoid(mean + std * z), t_min, 1.0 - t_min)

    return sample


def uniform_sampler(*, t_min: float = 0.0) -> TimeSampler:
    """:func:`uniform` with its ``t_min`` bound, as a time sampler (the constructor that
    :data:`TIME_SAMPLERS` names ``"uniform"``).

    Example:
        >>> import jax
        >>> from fmjax.timesteps import uniform_sampler
        >>> t = uniform_sampler(t_min=0.25)(jax.random.key(0), (1000,))
        >>> bool((t >= 0.25).all() and (t <= 0.75).all())
        True
    """
    _check_t_min(t_min)
    return functools.partial(uniform, t_min=t_min)


def constant(value: float = 0.0) -> TimeSampler:
    r"""A sampler that always returns ``value``: training at one time only.

    With ``value=0`` and fixed pairs ``(x0, x1)`` (:class:`fmjax.data.PairSource`) the
    flow-matching regression is one-step distillation: the network learns
    :math:`v(x_0, 0) \approx x_1 - x_0`, so one Euler step :math:`x_0 + v(x_0, 0)` maps noise
    to the teacher's sample (docs/one-step.md).

    Example:
        >>> import jax
        >>> from fmjax.timesteps import constant
        >>> constant(0.25)(jax.random.key(0), (3,)).tolist()
        [0.25, 0.25, 0.25]
    """
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"constant time value must be in [0, 1]; got value={value}.")

    def sample(
        key: PRNGKeyArray, shape: Sequence[int] = (), dtype=jnp.float32
    ) -> Float[Array, "..."]:
        del key  # the same time for every example
        return jnp.full(shape, value, dtype)

    return sample


TIME_SAMPLERS: dict[str, Callable[..., TimeSampler]] = {
    "uniform": uniform_sampler,
    "logit_normal": logit_normal,
    "constant": constant,
}
"""The named time samplers, name -> constructor (called with its keyword options, e.g.
``TIME_SAMPLERS["logit_normal"](mean=1.2, std=1.2)``); what ``config.path.time_sampler`` may
name."""
