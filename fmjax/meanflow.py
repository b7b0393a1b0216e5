r"""Mean flows: one network for the average velocity over an interval, for one-step generation.

A mean-flow network predicts the average velocity of the flow over ``[t, t_end]``,

.. math::

    u(x_t, t, t_\text{end}) = \frac{1}{t_\text{end} - t}\int_t^{t_\text{end}} v(x_s, s)\,ds,
    \qquad x_{t_\text{end}} = x_t + (t_\text{end} - t)\,u(x_t, t, t_\text{end}),

so that one evaluation jumps from noise at ``t = 0`` to data at ``t = 1``, and
``u(x, t, t)`` is the instantaneous velocity. Differentiating
:math:`(t_\text{end} - t)\,u = \int_t^{t_\text{end}} v\,ds` in :math:`t` along the flow gives
the identity

.. math::

    u = v + (t_\text{end} - t)\,\bigl(\partial_t u + \nabla_x u \cdot v\bigr),

and :func:`meanflow_loss` regresses :math:`u_\theta` on its right-hand side with the path's
conditional velocity :math:`\dot x_t` in place of :math:`v` and the bracket, a
Jacobian-vector product of the network along :math:`(\dot x_t, 1, 0)`, under a stop-gradient
(forward-mode ``jax.jvp``, one extra forward pass; no second-order autodiff).

Time direction. The MeanFlow papers (Geng et al., 2025) put noise at time 1 and write
:math:`u(z_t, r, t)` with :math:`r \le t`. fmjax keeps noise at 0: their :math:`(r, t)` is
our :math:`(1 - t_\text{end}, 1 - t)`, their logit-normal time with mean :math:`m` is ours with
mean :math:`-m`, and their pairs with :math:`r = t` are ours with :math:`t_\text{end} = t`.
:func:`logit_normal_intervals` takes its arguments in fmjax's direction; its docstring gives
the papers' recipes converted.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from fmjax._checks import check_examples, check_float, check_positive_int, concrete
from fmjax._integrate import check_model_kwargs, merge_arrays, split_arrays
from fmjax.couplings import Coupling, independent
from fmjax.loss import draw_pairs
from fmjax.paths import AffinePath, CondOT
from fmjax.sampling import SampleResult, uniform_time_grid

__all__ = [
    "INTERVAL_ORDERS",
    "INTERVAL_SAMPLERS",
    "IntervalSampler",
    "MeanFlowAux",
    "MeanFlowGuidance",
    "logit_normal_intervals",
    "meanflow_loss",
    "sample",
    "uniform_intervals",
]

IntervalSampler = Callable[[PRNGKeyArray, Sequence[int]], Float[Array, "... 2"]]
"""The type of an interval sampler: ``(key, shape) -> times`` with ``times[..., 0] = t`` and
``times[..., 1] = t_end``, ``0 <= t <= t_end <= 1``, of shape ``(*shape, 2)``."""


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r} is not valid; expected a number in [0, 1].")


def _ordered(key: PRNGKeyArray, a: jax.Array, b: jax.Array, equal_fraction: float) -> jax.Array:
    """``(min, max)`` of two draws stacked on a last axis; with probability ``equal_fraction``
    the end is set to the start (an instantaneous-velocity pair)."""
    t, t_end = jnp.minimum(a, b), jnp.maximum(a, b)
    equal = jax.random.bernoulli(key, equal_fraction, jnp.shape(t))
    return jnp.stack([t, jnp.where(equal, t, t_end)], axis=-1)


def uniform_intervals(*, equal_fraction: float = 0.0) -> IntervalSampler:
    """Intervals from two uniform times: ``t`` the smaller, ``t_end`` the larger; with
    probability ``equal_fraction``, ``t_end = t``.

    Example:
        >>> import jax
        >>> from fmjax.meanflow import uniform_intervals
        >>> times = uniform_intervals(equal_fraction=0.5)(jax.random.key(0), (1000,))
        >>> times.shape, bool((times[:, 0] <= times[:, 1]).all())
        ((1000, 2), True)
    """
    _check_fraction("equal_fraction", equal_fraction)

    def sampler(key: PRNGKeyArray, shape: Sequence[int] = ()) -> Float[Array, "... 2"]:
        k_a, k_b, k_equal = jax.random.split(key, 3)
        a, b = jax.random.uniform(k_a, shape), jax.random.uniform(k_b, shape)
        return _ordered(k_equal, a, b, equal_fraction)

    return sampler


def logit_normal_intervals(
    mean: float = 0.4,
    std: float = 1.0,
    *,
    equal_fraction: float = 0.75,
    end_mean: float | None = None,
    end_std: float | None = None,
    order: str = "sort",
) -> IntervalSampler:
    r"""Intervals from two logit-normal times, :math:`\operatorname{logit}(a) \sim N(\text{mean},
    \text{std}^2)` and :math:`\operatorname{logit}(b) \sim N(\text{end\_mean},
    \text{end\_std}^2)` (the same law when those are ``None``).

    ``order="sort"`` (MeanFlow's paper): ``t = min(a, b)``, ``t_end = max(a, b)``, then with
    probability ``equal_fraction`` ``t_end = t``. ``order="clip"`` (py-meanflow's improved
    "v1" sampler): ``t = a``; with probability ``equal_fraction`` ``t_end = a``, otherwise
    ``t_end = max(a, b)``, so ``t`` keeps its own law.

    The recipes, converted to fmjax's direction (noise at 0; their time :math:`s` is our
    :math:`1 - s`, so a logit-normal mean :math:`m` becomes :math:`-m`, their ``t`` (the
    noisier end) our ``t`` and their ``r`` our ``t_end``, their ``ratio`` of pairs with
    :math:`r \ne t` our ``1 - equal_fraction``):

    - MeanFlow ImageNet 256: ``logit_normal_intervals(0.4, 1.0, equal_fraction=0.75)``;
    - py-meanflow CIFAR-10, the paper's ``v0``: ``logit_normal_intervals(2.0, 2.0,
      equal_fraction=0.25)``;
    - py-meanflow CIFAR-10 ``v1`` (its 2.8-FID checkpoint): ``logit_normal_intervals(0.6, 1.6,
      equal_fraction=0.25, end_mean=4.0, end_std=1.6, order="clip")`` (their
      ``P_mean_t=-0.6``, ``P_mean_r=-4.0``, both std 1.6, ``ratio=0.75``).

    Example:
        >>> import jax
        >>> from fmjax.meanflow import logit_normal_intervals
        >>> times = logit_normal_intervals(2.0, 2.0, equal_fraction=0.25)(jax.random.key(0), (4000,))
        >>> bool(times.mean() > 0.6)  # leans to the data end
        True
    """
    end_mean = mean if end_mean is None else end_mean
    end_std = std if end_std is None else end_std
    for name, value in (("std", std), ("end_std", end_std)):
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"logit_normal_intervals {name}={value!r} is not valid; expected > 0.")
    if order not in INTERVAL_ORDERS:
        raise ValueError(
            f"logit_normal_intervals order={order!r} is not valid; expected one of "
            f"{list(INTERVAL_ORDERS)}."
        )
    _check_fraction("equal_fraction", equal_fraction)

    def sampler(key: PRNGKeyArray, shape: Sequence[int] = ()) -> Float[Array, "... 2"]:
        k_a, k_b, k_equal = jax.random.split(key, 3)
        a = jax.nn.sigmoid(mean + std * jax.random.normal(k_a, shape))
        b = jax.nn.sigmoid(end_mean + end_std * jax.random.normal(k_b, shape))
        if order == "sort":
            return _ordered(k_equal, a, b, equal_fraction)
        equal = jax.random.bernoulli(k_equal, equal_fraction, jnp.shape(a))
        return jnp.stack([a, jnp.where(equal, a, jnp.maximum(a, b))], axis=-1)

    return sampler


INTERVAL_ORDERS = ("sort", "clip")
"""How :func:`logit_normal_intervals` makes ``t <= t_end`` from its two draws."""


INTERVAL_SAMPLERS: dict[str, Callable[..., IntervalSampler]] = {
    "logit_normal": logit_normal_intervals,
    "uniform": uniform_intervals,
}
"""The named interval samplers, name -> constructor (called with its keyword options, e.g.
``INTERVAL_SAMPLERS["uniform"](equal_fraction=0.5)``); what ``config.meanflow.interval_sampler``
may name."""


class MeanFlowGuidance(NamedTuple):
    r"""MeanFlow's training-time classifier-free guidance, an option of :func:`meanflow_loss`.

    The network learns the average velocity of a guided field instead of the conditional one,
    so one-step samples are guided without the doubled batch of sampling-time guidance. For an
    example with label :math:`y` (not the null label) and :math:`t` inside ``interval``, the
    conditional velocity :math:`\dot x_t` is replaced in the target and in the Jacobian-vector
    product's tangent by

    .. math::

        \tilde v = \omega\,\dot x_t + \kappa\,u_\theta(x_t, t, t \mid y)
            + (1 - \omega - \kappa)\,u_\theta(x_t, t, t \mid \varnothing),

    both network terms instantaneous (``t_end = t``) and under a stop-gradient. Examples whose
    label is ``null_label`` (dropped labels: the unconditional model) and times outside
    ``interval`` keep :math:`\tilde v = \dot x_t`. :math:`\omega = 1, \kappa = 0` is no
    guidance; the field learnt corresponds to sampling-time guidance of scale
    :math:`\omega / (1 - \kappa)`. MeanFlow's ImageNet recipe is ``omega=1.0, kappa=0.5`` on
    the whole time range with 10% of labels dropped; its interval ``[t_start, t_end]`` (noise at
    1) is ``interval=(1 - t_end, 1 - t_start)`` here.

    Attributes:
        null_label: the label the network reads as "no label" (fmjax's networks: their
            ``num_classes``).
        omega: :math:`\omega`, the weight of the conditional velocity :math:`\dot x_t`.
        kappa: :math:`\kappa \ge 0`, the weight of the network's own conditional velocity.
        interval: ``(t_min, t_max)``, the times (fmjax's direction) at which guidance applies.
        label_name: the keyword of ``example_kwargs`` (and of ``apply_fn``) holding the labels.
        model_kwargs: keyword arguments of the two guidance evaluations instead of the loss's
            ``model_kwargs`` (e.g. ``{"train": False}``: MeanFlow evaluates them without
            dropout); ``None`` uses the loss's.

    Example:
        >>> from fmjax.meanflow import MeanFlowGuidance
        >>> MeanFlowGuidance(null_label=1000, omega=1.0, kappa=0.5).interval
        (0.0, 1.0)
    """

    null_label: int
    omega: float = 1.0
    kappa: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    label_name: str = "y"
    model_kwargs: Mapping[str, Any] | None = None


def _check_guidance(guidance: MeanFlowGuidance, example_kwargs: Mapping[str, Any]) -> None:
    g = guidance
    if isinstance(g.null_label, bool) or not isinstance(g.null_label, int | np.integer):
        raise ValueError(f"guidance.null_label={g.null_label!r} is not valid; expected an int.")
    for name in ("omega", "kappa"):
        value = getattr(g, name)
        if not (isinstance(value, int | float) and np.isfinite(value)):
            raise ValueError(f"guidance.{name}={value!r} is not valid; expected a finite number.")
    if g.kappa < 0:
        raise ValueError(f"guidance.kappa={g.kappa!r} is not valid; expected a number >= 0.")
    lo, hi = g.interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"guidance.interval={tuple(g.interval)!r} is not valid; expected (t_min, t_max) with "
            "0 <= t_min <= t_max <= 1."
        )
    if g.label_name not in example_kwargs:
        raise ValueError(
            f"guidance needs the labels in example_kwargs[{g.label_name!r}]; got keys "
            f"{sorted(example_kwargs)}."
        )


def _guided_velocity(apply_fn, params, guidance, x_t, t, dx_t, model_kwargs, gathered):
    """MeanFlowGuidance's field, computed without gradient."""
    g = guidance
    labels = gathered[g.label_name]
    batch = x_t.shape[0]
    call_kwargs = dict(model_kwargs if g.model_kwargs is None else g.model_kwargs)
    call_kwargs.update({k: v for k, v in gathered.items() if k != g.label_name})
    null = jnp.full_like(labels, g.null_label)
    if g.kappa == 0:  # the conditional term has weight zero: one evaluation
        both_x, both_t, both_labels = x_t, t, null
    else:
        both_x = jnp.concatenate([x_t, x_t])
        both_t = jnp.concatenate([t, t])
        both_labels = jnp.concatenate([null, labels])
    both = apply_fn(params, both_x, both_t, both_t, **{g.label_name: both_labels}, **call_kwargs)
    both = jax.lax.stop_gradient(both.astype(jnp.float32))
    unconditional = both[:batch]
    conditional = both[batch:] if g.kappa != 0 else 0.0
    dx = dx_t.astype(jnp.float32)
    guided = g.omega * dx + g.kappa * conditional + (1.0 - g.omega - g.kappa) * unconditional
    lo, hi = g.interval
    on = (labels != g.null_label) & (t >= lo) & (t <= hi)
    on = on.reshape(batch, *([1] * (x_t.ndim - 1)))
    return jnp.where(on, guided, dx).astype(dx_t.dtype)


class MeanFlowAux(NamedTuple):
    """Per-example details of a :func:`meanflow_loss` evaluation.

    Attributes:
        per_example: ``[batch]`` float32, each example's mean squared error
            :math:`\\lVert u_\\theta - u_\\text{tgt} \\rVert^2 / D` before weighting.
        weight: ``[batch]`` the adaptive weight of each example (ones when
            ``adaptive_power=0``).
        t: ``[batch]`` the start of each interval.
        t_end: ``[batch]`` its end.
    """

    per_example: Float[Array, " batch"]
    weight: Float[Array, " batch"]
    t: Float[Array, " batch"]
    t_end: Float[Array, " batch"]


def meanflow_loss(
    apply_fn: Callable[..., Float[Array, " batch *dims"]],
    params: Any,
    key: PRNGKeyArray,
    x1: Float[Array, " batch *dims"],
    *,
    path: AffinePath = AffinePath(CondOT()),  # noqa: B008 - frozen, immutable default
    coupling: Coupling = independent,
    interval_sampler: IntervalSampler | None = None,
    adaptive_power: float = 1.0,
    adaptive_eps: float = 1e-3,
    model_kwargs: Mapping[str, Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    guidance: MeanFlowGuidance | None = None,
) -> tuple[Float[Array, ""], MeanFlowAux]:
    r"""The mean-flow loss of an average-velocity network ``apply_fn(params, x_t, t, t_end)``.

    Noise, pairing and times are drawn as :func:`fmjax.loss.draw_pairs` draws them (example
    ``i``'s key gives its noise and its interval, so the loss does not depend on how the batch
    is split over devices), then

    .. math::

        u_\text{tgt} = \dot x_t + (t_\text{end} - t)\,
            \operatorname{sg}\bigl(\partial_t u_\theta + \nabla_x u_\theta\cdot\dot x_t\bigr),
        \qquad \Delta = u_\theta(x_t, t, t_\text{end}) - \operatorname{sg}(u_\text{tgt}),

    and the loss is the batch mean of :math:`w\,\lVert\Delta\rVert^2/D` with the adaptive
    weight :math:`w = \operatorname{sg}\bigl(1/(\lVert\Delta\rVert^2/D + c)^p\bigr)`
    (``adaptive_power`` :math:`p`, ``adaptive_eps`` :math:`c`; :math:`p = 0` is the plain
    squared error, the papers use 1 on ImageNet and 0.75 on CIFAR-10). The papers weight the error
    summed over the :math:`D` dimensions, :math:`1/(\lVert\Delta\rVert^2 + c')^p`: the same
    weighting as this one with :math:`c = c'/D`, up to the constant factor :math:`D^{1-p}`
    (which Adam ignores). MeanFlow's ImageNet :math:`c' = 0.01` on 32x32x4 latents is
    :math:`c \approx 2.4 \times 10^{-6}`, py-meanflow's CIFAR-10 :math:`c' = 10^{-3}` is
    :math:`c \approx 3.3 \times 10^{-7}`. Pairs with
    ``t_end = t`` regress the instantaneous velocity, as flow matching does.

    Args:
        apply_fn: the network, called as ``apply_fn(params, x_t, t, t_end, **model_kwargs,
            **example_kwargs)`` with ``t`` and ``t_end`` of shape ``[batch]``; returns an array
            shaped like ``x1``. It must be differentiable in ``x_t`` and both times.
        params: its parameters (any pytree).
        key: a PRNG key, or ``[batch]`` per-example keys.
        x1: data, float, ``[batch, *dims]``.
        path: the affine path; :math:`\dot x_t` is its conditional velocity.
        coupling: pairs noise and data.
        interval_sampler: ``(key, shape) -> (..., 2)`` times; default
            :func:`logit_normal_intervals` with its defaults.
        adaptive_power: :math:`p \ge 0`.
        adaptive_eps: :math:`c > 0`.
        model_kwargs: keyword arguments passed to ``apply_fn`` unchanged (dropout keys).
        example_kwargs: per-example keyword arguments (leading axis ``batch``, e.g. labels),
            gathered to follow the coupling's pairing.
        guidance: MeanFlow's training-time classifier-free guidance
            (:class:`MeanFlowGuidance`; the labels in ``example_kwargs``); ``None``: none.
            It replaces :math:`\dot x_t` above by the guided field, at the cost of one
            more forward pass (two when ``kappa > 0``, as one call on a doubled batch).

    Returns:
        ``(loss, aux)``: a float32 scalar and a :class:`MeanFlowAux`.

    Raises:
        ValueError: for non-float or unbatched ``x1``, a negative ``adaptive_power``, a
            non-positive ``adaptive_eps``, an output not shaped like ``x1``, or guidance
            options out of range or without labels.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.meanflow import meanflow_loss
        >>> def apply_fn(w, x_t, t, t_end):  # a toy average velocity
        ...     return w * x_t + (t_end - t)[:, None]
        >>> x1 = jax.random.normal(jax.random.key(1), (8, 2))
        >>> loss, aux = meanflow_loss(apply_fn, 0.5, jax.random.key(0), x1)
        >>> loss.shape, aux.t.shape, bool((aux.t <= aux.t_end).all())
        ((), (8,), True)
    """
    check_examples("x1", x1)
    check_float("x1", x1)
    if not (isinstance(adaptive_power, int | float) and adaptive_power >= 0):
        raise ValueError(f"adaptive_power={adaptive_power!r} is not valid; expected a number >= 0.")
    if not (isinstance(adaptive_eps, int | float) and adaptive_eps > 0):
        raise ValueError(f"adaptive_eps={adaptive_eps!r} is not valid; expected a number > 0.")
    if guidance is not None:
        _check_guidance(guidance, dict(example_kwargs or {}))
    sampler = logit_normal_intervals() if interval_sampler is None else interval_sampler
    pairs = draw_pairs(key, x1, coupling=coupling, time_sampler=sampler)
    if pairs.t.shape != (x1.shape[0], 2):
        raise ValueError(
            f"interval_sampler must return times of shape (*shape, 2) (t and t_end); called with "
            f"shape=() it returned shape {pairs.t.shape[1:]}."
        )
    t, t_end = pairs.t[:, 0], pairs.t[:, 1]
    sample = path.sample(pairs.x0, pairs.x1, t)
    gathered = jax.tree.map(lambda a: jnp.asarray(a)[pairs.i1], dict(example_kwargs or {}))
    kwargs = {**dict(model_kwargs or {}), **gathered}

    velocity = sample.dx_t
    if guidance is not None:
        velocity = _guided_velocity(
            apply_fn,
            params,
            guidance,
            sample.x_t,
            t,
            sample.dx_t,
            dict(model_kwargs or {}),
            gathered,
        )

    def u_fn(x_t, t, t_end):
        return apply_fn(params, x_t, t, t_end, **kwargs)

    u, du = jax.jvp(
        u_fn, (sample.x_t, t, t_end), (velocity, jnp.ones_like(t), jnp.zeros_like(t_end))
    )
    if jnp.shape(u) != x1.shape:
        raise ValueError(
            f"apply_fn must return an array shaped like x1 {x1.shape}; got {jnp.shape(u)}."
        )
    batch = x1.shape[0]
    span = (t_end - t).reshape(batch, *([1] * (x1.ndim - 1)))
    target = jax.lax.stop_gradient(velocity.astype(jnp.float32) + span * du.astype(jnp.float32))
    per_example = jnp.mean(jnp.square(u.astype(jnp.float32) - target).reshape(batch, -1), axis=1)
    weight = jax.lax.stop_gradient(1.0 / (per_example + adaptive_eps) ** adaptive_power)
    loss = jnp.mean(weight * per_example)
    return loss, MeanFlowAux(per_example=per_example, weight=weight, t=t, t_end=t_end)


def sample(
    u_fn: Callable[
        [Float[Array, " batch *dims"], Float[Array, " batch"], Float[Array, " batch"]],
        Float[Array, " batch *dims"],
    ],
    x0: Float[Array, " batch *dims"],
    *,
    steps: int = 1,
    time_grid: Float[Array, " n"] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SampleResult:
    r"""Few-step generation with an average-velocity field:
    :math:`x_{t_{k+1}} = x_{t_k} + (t_{k+1} - t_k)\,u(x_{t_k}, t_k, t_{k+1})`.

    The jumps run in one ``jax.jit``; arrays inside ``u_fn`` (a ``jax.tree_util.Partial``, an
    Equinox module) and in ``model_kwargs`` are traced, so new parameters or labels of the
    same shapes reuse the compiled program.

    Args:
        u_fn: ``u(x, t, t_end, **model_kwargs)`` with ``t`` and ``t_end`` of shape ``[batch]``
            (see [the network's time](../concepts.md#the-networks-time)).
        x0: noise, ``[batch, *dims]``.
        steps: the number of jumps on the uniform grid from 0 to 1 (ignored with
            ``time_grid``).
        time_grid: increasing times from the start to the end, ``steps + 1`` of them.
        model_kwargs: keyword arguments of every call of ``u_fn`` (class labels,
            conditioning), as for :func:`fmjax.sampling.sample`.

    Returns:
        a :class:`fmjax.sampling.SampleResult` with ``nfe`` the number of jumps and
        ``success`` whether the result is finite.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.meanflow import sample
        >>> mean = jnp.array([[3.0, -1.0]])
        >>> u = lambda x, t, t_end: mean - x  # the exact average velocity to a point mass
        >>> result = sample(u, jnp.zeros((4, 2)), steps=1)
        >>> result.x[0], int(result.nfe)
        (Array([ 3., -1.], dtype=float32), 1)
    """
    check_examples("x0", x0)
    check_float("x0", x0)
    if time_grid is None:
        check_positive_int("steps", steps)
        time_grid = uniform_time_grid(steps)
    grid = jnp.asarray(time_grid)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"time_grid must be 1-D with at least 2 times; got shape {grid.shape}.")
    values = concrete(grid)
    if values is not None and not np.all(np.diff(values) > 0):
        raise ValueError(
            "time_grid must increase strictly (a jump with t_end < t, or of zero length); got "
            f"{values.tolist()}."
        )
    grid = grid.astype(jnp.promote_types(x0.dtype, jnp.float32))
    arrays, rest = split_arrays((u_fn, check_model_kwargs(model_kwargs)))
    return _jumps(arrays, x0, grid, rest=rest)


@functools.partial(jax.jit, static_argnames=("rest",))
def _jumps(arrays, x0, grid, *, rest):
    u_fn, model_kwargs = merge_arrays(arrays, rest)
    batch = x0.shape[0]

    def jump(x, times):
        t, t_end = times
        u = u_fn(x, jnp.full((batch,), t), jnp.full((batch,), t_end), **model_kwargs)
        if jnp.shape(u) != x.shape:
            raise ValueError(
                f"u_fn must return an array shaped like x0 {x.shape}; got {jnp.shape(u)}."
            )
        return (x + (t_end - t).astype(x.dtype) * u.astype(x.dtype)), None

    x, _ = jax.lax.scan(jump, x0, (grid[:-1], grid[1:]))
    nfe = jnp.asarray(grid.shape[0] - 1, jnp.int32)
    return SampleResult(x=x, nfe=nfe, success=jnp.all(jnp.isfinite(x)))
