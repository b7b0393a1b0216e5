r"""Generating samples by solving the flow ODE with Diffrax.

A velocity field :math:`u(x, t)` carries noise :math:`x_0 \sim N(0, I)` at :math:`t = 0` to data
at :math:`t = 1` along

.. math::

    \frac{d x_t}{dt} = u(x_t, t), \qquad x_{t_0} = x_0 .

:func:`sample` integrates this ODE for a whole batch with one of the :data:`SOLVERS` and
reports the number of velocity evaluations (``nfe``) it actually spent. Helpers build time
grids (:func:`uniform_time_grid`, :func:`edm_time_grid`) and a classifier-free guided velocity
field (:func:`classifier_free_guidance`).

The network is called as ``velocity_fn(x, t, **model_kwargs)`` with ``t`` of shape ``[batch]``,
one time per example, as in training (see [the network's time](../concepts.md#the-networks-time)).

Nothing here is device-parallel: a caller that shards the batch calls :func:`sample` on its
shard (under ``jit`` or inside ``shard_map``); each shard then chooses its own adaptive steps.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from fmjax._checks import (
    check_batched,
    check_examples,
    check_float,
    check_nonempty,
    check_positive_int,
    concrete,
)
from fmjax._integrate import (
    ADAPTIVE_SOLVERS,
    FIXED_STEP_SOLVERS,
    SOLVERS,
    VelocityFn,
    batch_times,
    check_distinct_ends,
    check_model_kwargs,
    check_save_at,
    check_solver_args,
    check_times,
    check_velocity_output,
    integrate,
    merge_arrays,
    split_arrays,
    time_dtype,
)
from fmjax._xla import solve_jit

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_STEP_SOLVERS",
    "SOLVERS",
    "SampleResult",
    "classifier_free_guidance",
    "edm_time_grid",
    "sample",
    "uniform_time_grid",
]


class SampleResult(NamedTuple):
    r"""The outcome of :func:`sample`.

    Attributes:
        x: the state at the end of the solve, shaped like ``x0``.
        nfe: the number of velocity-function evaluations spent (int32 scalar).
        success: whether the solve reached its end with finite values (bool scalar). False
            after ``max_steps`` steps, a step size that collapsed, a NaN/inf in the state,
            or a ``time_grid`` known only inside a jit that is not strictly monotone.
        trajectory: the states at ``save_at``, shape ``[len(save_at), batch, *dims]``;
            ``None`` without ``save_at``.
        ts: the times of ``trajectory`` (``save_at`` itself); ``None`` without ``save_at``.
    """

    x: Float[Array, " batch *dims"]
    nfe: Int[Array, ""]
    success: Bool[Array, ""]
    trajectory: Float[Array, " times batch *dims"] | None = None
    ts: Float[Array, " times"] | None = None


def uniform_time_grid(
    steps: int, t0: float = 0.0, t1: float = 1.0
) -> Float[Array, " steps_plus_one"]:
    r"""``steps + 1`` equally spaced times from ``t0`` to ``t1`` (both included).

    Example:
        >>> from fmjax.sampling import uniform_time_grid
        >>> uniform_time_grid(4)
        Array([0.  , 0.25, 0.5 , 0.75, 1.  ], dtype=float32)
    """
    check_positive_int("steps", steps)
    check_distinct_ends(t0, t1)
    return jnp.asarray(np.linspace(t0, t1, steps + 1), dtype=jnp.result_type(float))


def edm_time_grid(
    steps: int, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> Float[Array, " steps_plus_one"]:
    r"""The EDM (Karras et al. 2022) noise-level grid, mapped to flow-matching time.

    This is the grid of Meta's ``flow_matching`` CIFAR-10 recipe (Heun on this grid). Noise
    levels

    .. math::

        \sigma_i = \Big(\sigma_{\max}^{1/\rho} + \tfrac{i}{n-1}\big(\sigma_{\min}^{1/\rho}
            - \sigma_{\max}^{1/\rho}\big)\Big)^{\rho}, \quad i = 0, \dots, n - 1,
        \qquad \sigma_n = 0,

    become times :math:`t_i = 1 - \sigma_i / (1 + \sigma_i)` (the CondOT path with
    :math:`x_t / \alpha_t = x_1 + \sigma x_0`, :math:`\sigma = \sigma_t / \alpha_t`). Steps are
    small at both ends of the path and largest near the middle. The grid starts at :math:`t_0 = 1/(1+\sigma_{\max}) \approx 0.0123`,
    not at 0, and ends at exactly 1.

    Passed as ``sample(..., time_grid=edm_time_grid(n))``, the grid wins over ``t0``/``t1``:
    the noise ``x0`` is used as the state at :math:`t \approx 0.0123` (the first 1.2% of the path
    is skipped, as in Meta's recipe).

    Args:
        steps: the number of solver steps :math:`n \ge 1` (the grid has ``steps + 1`` times).
        rho: the EDM exponent; larger concentrates more steps near the data.
        sigma_min: the smallest non-zero noise level.
        sigma_max: the largest noise level.

    Returns:
        Increasing times, shape ``[steps + 1]``, in the default float dtype.

    Example:
        >>> from fmjax.sampling import edm_time_grid
        >>> grid = edm_time_grid(50)
        >>> grid.shape, float(grid[0]), float(grid[-1])
        ((51,), 0.0123..., 1.0)
    """
    check_positive_int("steps", steps)
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(
            "edm_time_grid needs 0 < sigma_min < sigma_max; "
            f"got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )
    if not rho > 0:
        raise ValueError(f"edm_time_grid needs rho > 0; got rho={rho}.")
    fraction = np.linspace(0.0, 1.0, steps)
    sigma = (
        sigma_max ** (1 / rho) + fraction * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    sigma = np.append(sigma, 0.0)
    return jnp.asarray(1.0 - sigma / (1.0 + sigma), dtype=jnp.result_type(float))


def classifier_free_guidance(
    apply_fn: Callable[..., Float[Array, " batch2 *dims"]],
    params: PyTree,
    labels: Int[ArrayLike, " batch *label_dims"],
    *,
    null_label: int,
    scale: float | Float[ArrayLike, ""],
    interval: tuple[float, float] | None = None,
    channels: int | None = None,
    label_name: str = "y",
    model_kwargs: Mapping[str, Any] | None = None,
) -> VelocityFn:
    r"""A classifier-free guided velocity field for :func:`sample`.

    With the conditional field :math:`u(x, t \mid y)` and the unconditional one
    :math:`u(x, t \mid \varnothing)` (the model given ``null_label``), the guided field is

    .. math::

        \tilde u(x, t) = u(x, t \mid \varnothing) + w\,\big(u(x, t \mid y) - u(x, t \mid \varnothing)\big),

    so ``scale`` :math:`w = 0` gives the unconditional field, :math:`w = 1` the conditional one
    and :math:`w > 1` extrapolates past it. (Meta's ``flow_matching`` examples write
    :math:`(1 + s)\,u(\cdot \mid y) - s\,u(\cdot \mid \varnothing)`, i.e. :math:`w = 1 + s`.)
    Both branches run in one call on a doubled batch.

    **Guidance interval.** With ``interval`` :math:`(t_{\min}, t_{\max})` an example is
    guided only while its time is inside the closed interval, and follows the conditional
    field elsewhere:

    .. math::

        \hat u(x, t) = \begin{cases} \tilde u(x, t) & t_{\min} \le t \le t_{\max} \\
            u(x, t \mid y) & \text{otherwise,} \end{cases}

    compared per example (``t`` is ``[batch]``) in the dtype of ``t``. Guidance limited to
    part of the path (Kynkäänniemi et al., 2024) is what REPA's SiT samplers use. Their time
    runs the other way (noise at 1, data at 0: ``samplers.py`` of REPA guides a step when
    ``guidance_low <= t <= guidance_high``), so their interval is ``(1 - guidance_high,
    1 - guidance_low)`` here: REPA's SiT-XL/2 setting ``cfg_scale=1.8, guidance_high=0.7``
    (``guidance_low=0``) is ``scale=1.8, interval=(0.3, 1.0)``: no guidance over the first
    30% of the path, from the noise. (REPA's Heun step decides both of its evaluations by the
    step's start time; here each evaluation decides by its own time.)

    **Guided channels.** With ``channels`` :math:`k`, only the first :math:`k` entries of the
    last axis are guided and the others follow :math:`u(x, t \mid y)`. SiT's released sampler
    (``forward_with_cfg``, "for exact reproducibility reasons") guides the first 3 of its 4
    latent channels, so its published FIDs are ``channels=3``; None guides all of them.

    Cost: an evaluation at which no example is inside the interval runs the model once on the
    batch (a ``jax.lax.cond``), so with :func:`sample`'s shared time the steps outside the
    interval cost half; when some are, the doubled batch runs for all and the conditional
    half is kept outside. Under ``jax.vmap`` a ``cond`` becomes a select and both branches
    run at every evaluation.

    The field is a ``jax.tree_util.Partial`` holding ``params``, ``labels`` and the arrays of
    ``model_kwargs``: :func:`sample` traces them, so guiding new labels (same shape) or new
    parameters reuses the compiled solve.

    Args:
        apply_fn: the model, called as ``apply_fn(params, x, t, **{label_name: labels},
            **model_kwargs)`` with ``x`` of shape ``[2 * batch, *dims]`` and ``t`` of shape
            ``[2 * batch]`` (as in :func:`fmjax.loss.cfm_loss`).
        params: the model parameters.
        labels: the class labels, leading axis ``[batch]``.
        null_label: the label the model was trained to read as "no label" (an integer
            >= 0; fmjax's U-Net uses its ``num_classes``).
        scale: the guidance weight :math:`w \ge 0` (a number or a traced scalar).
        interval: ``(t_min, t_max)`` with :math:`0 \le t_{\min} \le t_{\max} \le 1`
            (Python numbers, fmjax's time: noise at 0, data at 1): guide only there; None
            guides at every time.
        channels: guide only the first ``channels`` entries of the last axis (a positive
            integer); None: all.
        label_name: the keyword under which ``apply_fn`` takes labels.
        model_kwargs: extra keyword arguments for ``apply_fn``, the same for both halves of the
            doubled batch (so not per-example arrays). The keyword arguments that
            :func:`sample` passes to the field (its ``model_kwargs``) join them.

    Returns:
        ``velocity_fn(x, t, **kwargs)`` taking ``x`` of shape ``[batch, *dims]`` and ``t`` of
        shape ``[batch]`` (see [the network's time](../concepts.md#the-networks-time)).

    Raises:
        ValueError: for labels that are not integers with a leading batch axis, a negative
            ``null_label``, ``model_kwargs`` that is not a mapping with str keys, and, when
            they are concrete (not traced), a negative label or a ``scale`` that is negative
            or not finite; an ``interval`` that is not two numbers with
            ``0 <= t_min <= t_max <= 1``; ``channels`` that is not a positive integer. When
            called: for ``x`` and ``labels`` of different batch sizes, ``t`` not of shape
            ``[batch]``, or ``channels`` more than the last axis holds.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.sampling import classifier_free_guidance
        >>> def apply_fn(params, x, t, y):  # the "model" moves x towards its label
        ...     return (y[:, None] - x) * params
        >>> v = classifier_free_guidance(apply_fn, 1.0, jnp.array([3, 3]), null_label=0, scale=2.0)
        >>> v(jnp.zeros((2, 1)), jnp.full((2,), 0.5))
        Array([[6.],
               [6.]], dtype=float32)
        >>> # Guided from t = 0.3 on; the first example (t = 0.1) gets the conditional field.
        >>> v = classifier_free_guidance(
        ...     apply_fn, 1.0, jnp.array([3, 3]), null_label=0, scale=2.0, interval=(0.3, 1.0)
        ... )
        >>> v(jnp.zeros((2, 1)), jnp.array([0.1, 0.5]))
        Array([[3.],
               [6.]], dtype=float32)
    """
    _check_guidance_args(labels, null_label, scale)
    interval = _check_interval(interval)
    if channels is not None and (
        isinstance(channels, bool) or not isinstance(channels, int | np.integer) or channels < 1
    ):
        raise ValueError(f"channels must be a positive integer or None; got channels={channels!r}.")
    labels = jnp.asarray(labels)
    check_batched("labels", labels)
    model_kwargs = check_model_kwargs(model_kwargs)
    # A Partial of a module-level function: the same static part on every call, arrays traced.
    return jax.tree_util.Partial(
        _guided_velocity,
        apply_fn,
        label_name,
        null_label,
        interval,
        None if channels is None else int(channels),
        params,
        labels,
        scale,
        model_kwargs,
    )


def _check_interval(interval: Any) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        t_min, t_max = (float(end) for end in interval)
        valid = 0.0 <= t_min <= t_max <= 1.0  # False for a NaN
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"The guidance interval must be (t_min, t_max) with 0 <= t_min <= t_max <= 1 "
            f"(fmjax's time: noise at 0, data at 1); got interval={interval!r}."
        )
    return t_min, t_max


def _guided_velocity(
    apply_fn,
    label_name,
    null_label,
    interval,
    channels,
    params,
    labels,
    scale,
    model_kwargs,
    x,
    t,
    **kwargs,
):
    batch = jnp.shape(x)[0]
    if channels is not None and channels > jnp.shape(x)[-1]:
        raise ValueError(
            f"channels={channels} guides more entries than the last axis of x {jnp.shape(x)} holds."
        )
    if batch != labels.shape[0]:
        raise ValueError(
            f"labels must have one entry per example: x has batch {batch}, "
            f"labels has shape {labels.shape}."
        )
    if jnp.shape(t) != (batch,):
        raise ValueError(
            f"The guided velocity_fn(x, t) takes t of shape [batch]=({batch},), one time per "
            f"example; got t of shape {jnp.shape(t)}."
        )
    dtype = jnp.result_type(x)
    inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])

    def model(x, t, labels):
        out = apply_fn(params, x, t, **{label_name: labels}, **model_kwargs, **kwargs)
        if jnp.shape(out) != jnp.shape(x):
            raise ValueError(
                f"apply_fn must return an array shaped like its input {jnp.shape(x)}; "
                f"got {jnp.shape(out)}."
            )
        return out

    def guided():
        both = model(
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
        )
        conditional, unconditional = both[:batch], both[batch:]
        out = unconditional + scale * (conditional - unconditional)
        if channels is not None:
            out = jnp.concatenate([out[..., :channels], conditional[..., channels:]], axis=-1)
        if inside is not None:
            out = jnp.where(inside.reshape(batch, *[1] * (x.ndim - 1)), out, conditional)
        return out.astype(dtype)

    if inside is None:
        return guided()
    # Only the branch taken runs: no doubled batch where no example is inside the interval.
    return jax.lax.cond(jnp.any(inside), guided, lambda: model(x, t, labels).astype(dtype))


def _check_guidance_args(labels: Any, null_label: Any, scale: Any) -> None:
    # Before any jnp call: that would turn concrete values into tracers under a caller's jit.
    if isinstance(null_label, bool) or not isinstance(null_label, int | np.integer):
        raise ValueError(f"null_label must be an integer >= 0; got null_label={null_label!r}.")
    if null_label < 0:
        raise ValueError(f"null_label must be an integer >= 0; got null_label={null_label}.")
    label_values = concrete(labels)  # None when traced
    dtype = labels.dtype if label_values is None else label_values.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"labels must be integer class labels; got dtype {dtype}.")
    if label_values is not None and np.any(label_values < 0):
        raise ValueError(
            f"labels must be class indices >= 0; got {np.unique(label_values[label_values < 0])}."
        )
    scale_value = concrete(scale)
    if scale_value is not None and not (
        np.all(np.isfinite(scale_value)) and np.all(scale_value >= 0)
    ):
        raise ValueError(
            f"The guidance scale must be finite and >= 0 (0: unconditional, 1: conditional, "
            f"> 1: guided); got scale={scale_value}."
        )


def sample(
    velocity_fn: VelocityFn,
    x0: Float[Array, " batch *dims"],
    *,
    solver: str = "dopri5",
    steps: int | None = None,
    time_grid: Float[ArrayLike, " times"] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    save_at: Float[ArrayLike, " saves"] | None = None,
    max_steps: int = 4096,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SampleResult:
    r"""Integrates :math:`dx/dt = u(x, t)` from ``x0`` at ``t0`` to ``t1``.

    **The network's time.** ``velocity_fn`` is called as ``velocity_fn(x, t, **model_kwargs)``
    with ``x`` of shape ``[batch, *dims]`` and ``t`` of shape ``[batch]`` (the solver's time,
    the same for every example), as :func:`fmjax.loss.cfm_loss` calls a model in training
    (see [the network's time](../concepts.md#the-networks-time)). A function of another
    signature, argument order or shape fails at trace time with a ``ValueError`` that says so.

    **Solvers.** Fixed-step ``euler`` (order 1), ``midpoint``, ``heun`` (order 2) and ``rk4``
    (order 4) take ``steps`` equal steps from ``t0`` to ``t1``, or step exactly through the
    times of ``time_grid`` (e.g. :func:`edm_time_grid`). When ``time_grid`` is given it wins:
    the solve runs from ``time_grid[0]`` to ``time_grid[-1]`` and ``t0``, ``t1`` are not used.
    Adaptive ``tsit5``, ``dopri5`` (order 5) and ``dopri8`` (order 8) choose their steps with
    Diffrax's ``PIDController`` (default coefficients: integral control, as in torchdiffeq and
    scipy) so that the RMS of ``error / (atol + rtol * |x|)`` stays below one.

    **Batch semantics.** The batch is one ODE state, so every example takes the same steps:
    the adaptive step size is shared by the batch and its error norm is the RMS over all
    examples (as in torchdiffeq). This is the fast choice on accelerators. The tolerance then
    bounds the batch's RMS error, so a single hard example may be less accurate than
    ``rtol`` alone suggests; for per-example steps, ``jax.vmap`` this function over
    single-example batches (each runs until its own end, at the cost of masked work).

    **Cost.** ``nfe`` counts calls of ``velocity_fn`` that were executed: ``k`` per step with
    ``k`` = 1 (euler), 2 (midpoint, heun), 4 (rk4), 6 (tsit5, dopri5: seven stages, the last
    reused by the next step), 13 (dopri8: fourteen stages, likewise); adaptive solves add 2
    evaluations for choosing the first step (one of which is reused as the first stage) and
    count rejected steps too.

    **Compilation.** Everything runs in one ``jax.jit``; arrays inside ``velocity_fn`` (e.g.
    the parameters of an Equinox module or of a ``jax.tree_util.Partial``) and the arrays of
    ``model_kwargs`` are traced, so a second call with a new ``x0``, new parameters or new
    labels (same shapes) does not recompile. A new Python closure is a new function and
    compiles again: pass what changes from call to call (labels, conditioning) in
    ``model_kwargs`` rather than closing over it. JAX's persistent compilation cache
    keeps the compiled solve across processes, except with ``save_at``: Diffrax checks the
    save times with a host callback, and JAX stores no program that has one, so a solve with
    ``save_at`` compiles again in each new process. Inside a caller's ``jit`` the whole
    solve is traced into the caller's program; a batch sharded over devices is solved as one
    state (one step size for the global batch). Inside ``jax.shard_map`` each shard solves its
    own part; pass ``check_vma=False`` there, as Diffrax's loops do not yet carry
    varying-manual-axes types (diffrax issue #735). On CPU a top-level solve is compiled with
    XLA's YNNPACK fusions restricted to matrix products
    (``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``, for this
    program only; ``fmjax._xla`` says why). Set that option in ``XLA_FLAGS`` to choose
    otherwise; under a caller's ``jit``, ``grad`` or ``vmap`` the caller's program keeps its
    own options.

    Args:
        velocity_fn: ``velocity_fn(x, t, **model_kwargs)`` with ``x`` shaped like ``x0`` and
            ``t`` of shape ``[batch]``; returns an array of the shape and dtype of ``x``. It
            must treat examples independently only for :mod:`fmjax.likelihood`; here any
            batch function works.
        x0: the initial state (usually noise), float, shape ``[batch, *dims]``.
        solver: one of :data:`SOLVERS`.
        steps: the number of equal steps of a fixed-step solver.
        time_grid: strictly monotone times for a fixed-step solver (instead of ``steps``);
            checked when given concretely, reported through ``success`` when traced.
        rtol: relative tolerance of an adaptive solver.
        atol: absolute tolerance of an adaptive solver.
        t0: the time of ``x0``.
        t1: the end time (``t1 < t0`` integrates backwards).
        save_at: times, between the ends of the solve, at which to record the state
            (interpolated by the solver's dense output).
        max_steps: the most steps (accepted plus rejected) an adaptive solver may take before
            giving up with ``success=False``.
        model_kwargs: keyword arguments of every call of ``velocity_fn`` (class labels,
            conditioning). Arrays are traced arguments of the compiled solve; other values
            (Python numbers, strings, flags) are static, and a new value compiles again.

    Returns:
        A :class:`SampleResult`.

    Raises:
        ValueError: at trace time, for an unknown solver; a fixed-step solver without
            ``steps`` or ``time_grid``, or with both; ``steps`` or ``time_grid`` given to an
            adaptive solver; ``t0 == t1``; a time grid that is not strictly monotone;
            ``save_at`` outside the solve; a ``velocity_fn`` that fails when called as
            ``velocity_fn(x, t, **model_kwargs)`` with ``t`` of shape ``[batch]``, or returns
            the wrong shape or dtype; ``model_kwargs`` that is not a mapping with str keys; a
            non-float, unbatched or empty ``x0``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.sampling import sample
        >>> x0 = jax.random.normal(jax.random.key(0), (4, 2))
        >>> out = sample(lambda x, t: jnp.ones_like(x), x0, solver="euler", steps=10)
        >>> bool(jnp.allclose(out.x, x0 + 1.0)), int(out.nfe), bool(out.success)
        (True, 10, True)
        >>> # Model inputs beside x and t (t has shape [batch]: one time per example).
        >>> def velocity(x, t, shift):
        ...     return shift - x * t[:, None]
        >>> shift = jnp.ones((4, 2))
        >>> out = sample(velocity, x0, solver="heun", steps=4, model_kwargs={"shift": shift})
        >>> out.x.shape
        (4, 2)
    """
    check_examples("x0", x0)
    check_nonempty("x0", x0)
    check_float("x0", x0)
    check_solver_args(solver, steps, time_grid, t0, t1, max_steps)
    model_kwargs = check_model_kwargs(model_kwargs)
    if time_grid is not None:
        time_grid = jnp.asarray(time_grid)
    if save_at is not None:
        save_at = check_times("save_at", save_at, min_length=1)
        check_save_at(save_at, time_grid, t0, t1)
    arrays, rest = split_arrays((velocity_fn, model_kwargs))
    return _sample_jit(
        arrays,
        x0,
        time_grid,
        save_at,
        t0,
        t1,
        rtol,
        atol,
        static=(rest, solver, steps, max_steps),
    )


@functools.partial(solve_jit, static_argnames=("static",))
def _sample_jit(arrays, x0, time_grid, save_at, t0, t1, rtol, atol, *, static):
    rest, solver, steps, max_steps = static
    velocity_fn, model_kwargs = merge_arrays(arrays, rest)
    t_dtype = time_dtype(x0)
    check_velocity_output(velocity_fn, x0, t_dtype, model_kwargs)
    solved = integrate(
        _velocity_vector_field,
        (velocity_fn, model_kwargs),
        x0,
        solver=solver,
        steps=steps,
        time_grid=time_grid,
        t0=t0,
        t1=t1,
        rtol=rtol,
        atol=atol,
        save_at=save_at,
        max_steps=max_steps,
    )
    return SampleResult(
        x=solved.y1,
        nfe=solved.nfe,
        success=solved.success,
        trajectory=solved.trajectory,
        ts=None if save_at is None else jnp.asarray(save_at, t_dtype),
    )


def _velocity_vector_field(t, x, args):
    # Module-level (not a closure) so that Diffrax's ODETerm is the same object on every call.
    velocity_fn, model_kwargs = args
    return velocity_fn(x, batch_times(t, x), **model_kwargs)
