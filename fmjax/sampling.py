r"""Generating samples by solving the flow ODE with Diffrax.

A velocity field :math:`u(x, t)` carries noise :math:`x_0 \sim N(0, I)` at :math:`t = 0` to data
at :math:`t = 1` along

.. math::

    \frac{d x_t}{dt} = u(x_t, t), \qquad x_{t_0} = x_0 .

:func:`sample` integrates this ODE for a whole batch with one of the :data:`SOLVERS` and
reports the number of velocity evaluations (``nfe``) it actually spent. Helpers build time
grids (:func:`uniform_time_grid`, :func:`edm_time_grid`) and a classifier-free guided velocity
field (:func:`classifier_free_guidance`).

Nothing here is device-parallel: a caller that shards the batch calls :func:`sample` on its
shard (under ``jit`` or inside ``shard_map``); each shard then chooses its own adaptive steps.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from fmjax._checks import check_batched, check_choice, check_float, check_positive_int
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

VelocityFn = Callable[
    [Float[Array, " batch *dims"], Float[Array, ""]], Float[Array, " batch *dims"]
]


class RK4(diffrax.AbstractERK):
    """The classical fourth-order Runge–Kutta method (diffrax ships none), four stages."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        # Diffrax needs an error estimate in every tableau; fixed-step solves never read it.
        # This one is RK4 minus the embedded midpoint rule (whose stages RK4 shares).
        b_error=np.array([1 / 6, -2 / 3, 1 / 3, 1 / 6]),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    interpolation_cls: ClassVar[Callable[..., diffrax.AbstractLocalInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        return 4


_SOLVER_CLASSES = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "rk4": RK4,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun", "rk4")
ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "dopri8")
SOLVERS = FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS


def _evals_per_step(solver: diffrax.AbstractSolver) -> int:
    # An explicit RK step evaluates every stage, except that a first-same-as-last tableau
    # reuses its last stage as the next step's first. Euler is not written as a tableau.
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        return 1
    return tableau.num_stages - int(tableau.fsal)


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
    _check_distinct_ends(t0, t1)
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

    Args:
        apply_fn: the model, called as ``apply_fn(params, x, t, **{label_name: labels},
            **model_kwargs)`` with ``x`` of shape ``[2 * batch, *dims]`` and ``t`` of shape
            ``[2 * batch]`` (as in :func:`fmjax.loss.cfm_loss`).
        params: the model parameters.
        labels: the class labels, leading axis ``[batch]``.
        null_label: the label the model was trained to read as "no label" (an integer
            >= 0; fmjax's U-Net uses its ``num_classes``).
        scale: the guidance weight :math:`w \ge 0` (a number or a traced scalar).
        label_name: the keyword under which ``apply_fn`` takes labels.
        model_kwargs: extra keyword arguments for ``apply_fn``.

    Returns:
        ``velocity_fn(x, t)`` taking ``x`` of shape ``[batch, *dims]`` and a scalar ``t``.

    Raises:
        ValueError: for labels that are not integers with a leading batch axis, a negative
            ``null_label``, and, when they are concrete (not traced), a negative label or a
            ``scale`` that is negative or not finite.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.sampling import classifier_free_guidance
        >>> def apply_fn(params, x, t, y):  # the "model" moves x towards its label
        ...     return (y[:, None] - x) * params
        >>> v = classifier_free_guidance(apply_fn, 1.0, jnp.array([3, 3]), null_label=0, scale=2.0)
        >>> v(jnp.zeros((2, 1)), 0.5)
        Array([[6.],
               [6.]], dtype=float32)
    """
    _check_guidance_args(labels, null_label, scale)
    labels = jnp.asarray(labels)
    check_batched("labels", labels)
    model_kwargs = dict(model_kwargs or {})
    both_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

    def velocity_fn(x, t):
        batch = jnp.shape(x)[0]
        if batch != labels.shape[0]:
            raise ValueError(
                f"labels must have one entry per example: x has batch {batch}, "
                f"labels has shape {labels.shape}."
            )
        both_x = jnp.concatenate([x, x])
        both_t = jnp.broadcast_to(jnp.asarray(t, jnp.result_type(x)), (2 * batch,))
        both = apply_fn(params, both_x, both_t, **{label_name: both_labels}, **model_kwargs)
        if jnp.shape(both) != jnp.shape(both_x):
            raise ValueError(
                f"apply_fn must return an array shaped like its input {jnp.shape(both_x)}; "
                f"got {jnp.shape(both)}."
            )
        conditional, unconditional = both[:batch], both[batch:]
        return (unconditional + scale * (conditional - unconditional)).astype(jnp.result_type(x))

    return velocity_fn


def _check_guidance_args(labels: Any, null_label: Any, scale: Any) -> None:
    # Before any jnp call: that would turn concrete values into tracers under a caller's jit.
    if isinstance(null_label, bool) or not isinstance(null_label, int | np.integer):
        raise ValueError(f"null_label must be an integer >= 0; got null_label={null_label!r}.")
    if null_label < 0:
        raise ValueError(f"null_label must be an integer >= 0; got null_label={null_label}.")
    label_values = _concrete(labels)  # None when traced
    dtype = labels.dtype if label_values is None else label_values.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"labels must be integer class labels; got dtype {dtype}.")
    if label_values is not None and np.any(label_values < 0):
        raise ValueError(
            f"labels must be class indices >= 0; got {np.unique(label_values[label_values < 0])}."
        )
    scale_value = _concrete(scale)
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
) -> SampleResult:
    r"""Integrates :math:`dx/dt = u(x, t)` from ``x0`` at ``t0`` to ``t1``.

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
    the parameters of an Equinox module or of a ``jax.tree_util.Partial``) are traced, so a
    second call with a new ``x0`` (same shape) or new parameters does not recompile. A new
    Python closure is a new function and compiles again. JAX's persistent compilation cache
    keeps the compiled solve across processes, except with ``save_at``: Diffrax checks the
    save times with a host callback, and JAX stores no program that has one, so a solve with
    ``save_at`` compiles again in each new process. Inside a caller's ``jit`` the whole
    solve is traced into the caller's program; a batch sharded over devices is solved as one
    state (one step size for the global batch). Inside ``jax.shard_map`` each shard solves its
    own part; pass ``check_vma=False`` there, as Diffrax's loops do not yet carry
    varying-manual-axes types (diffrax issue #735). On CPU a top-level solve is compiled with
    XLA's YNNPACK fusions restricted to matrix products
    (``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``, for this
    program only): digits U-Net sampling ran 1.8x faster so, the CIFAR-10 U-Net's forward pass
    1.1-1.2x. Set that option in ``XLA_FLAGS`` to choose otherwise; under a caller's ``jit``,
    ``grad`` or ``vmap`` the caller's program keeps its own options.

    Args:
        velocity_fn: ``velocity_fn(x, t)`` with ``x`` shaped like ``x0`` and ``t`` a scalar
            array; returns an array of the shape and dtype of ``x``. It must treat examples
            independently only for :mod:`fmjax.likelihood`; here any batch function works.
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

    Returns:
        A :class:`SampleResult`.

    Raises:
        ValueError: at trace time, for an unknown solver; a fixed-step solver without
            ``steps`` or ``time_grid``, or with both; ``steps`` or ``time_grid`` given to an
            adaptive solver; ``t0 == t1``; a time grid that is not strictly monotone;
            ``save_at`` outside the solve; a ``velocity_fn`` that returns the wrong shape or
            dtype; a non-float, unbatched or empty ``x0``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.sampling import sample
        >>> x0 = jax.random.normal(jax.random.key(0), (4, 2))
        >>> out = sample(lambda x, t: jnp.ones_like(x), x0, solver="euler", steps=10)
        >>> bool(jnp.allclose(out.x, x0 + 1.0)), int(out.nfe), bool(out.success)
        (True, 10, True)
    """
    check_batched("x0", x0)
    check_float("x0", x0)
    if jnp.shape(x0)[0] < 1:
        raise ValueError(f"x0 must hold at least one sample; got x0.shape={jnp.shape(x0)}.")
    _check_solver_args(solver, steps, time_grid, t0, t1, max_steps)
    if time_grid is not None:
        time_grid = jnp.asarray(time_grid)
    if save_at is not None:
        save_at = _check_times("save_at", save_at, min_length=1)
        _check_save_at(save_at, time_grid, t0, t1)
    arrays, rest = _split_arrays(velocity_fn)
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
    velocity_fn = _merge_arrays(arrays, rest)
    t_dtype = time_dtype(x0)
    check_velocity_output(velocity_fn, x0, jnp.zeros((), t_dtype))
    solved = integrate(
        _velocity_vector_field,
        velocity_fn,
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


def _velocity_vector_field(t, x, velocity_fn):
    # Module-level (not a closure) so that Diffrax's ODETerm is the same object on every call.
    return velocity_fn(x, t)


# --- shared with fmjax.likelihood -----------------------------------------------------------


class Solved(NamedTuple):
    """What :func:`integrate` returns (private to the core)."""

    y1: PyTree[Array]
    trajectory: PyTree[Array] | None
    nfe: Int[Array, ""]
    success: Bool[Array, ""]


def time_dtype(x: jax.Array) -> jnp.dtype:
    """Times are at least float32, and float64 with float64 states."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def check_velocity_output(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array) -> None:
    """Raises `ValueError` at trace time unless ``velocity_fn(x, t)`` is shaped and typed like x."""
    out = jax.eval_shape(velocity_fn, x, t)
    if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != (x.shape, x.dtype):
        got = (
            f"shape {out.shape} and dtype {out.dtype}"
            if isinstance(out, jax.ShapeDtypeStruct)
            else f"{type(out).__name__} {out}"
        )
        raise ValueError(
            f"velocity_fn(x, t) must return an array of the shape {x.shape} and dtype {x.dtype} "
            f"of x; got {got}."
        )


def integrate(
    vector_field: Callable[[Array, PyTree[Array], Any], PyTree[Array]],
    args: Any,
    y0: PyTree[Array],
    *,
    solver: str,
    steps: int | None,
    time_grid: ArrayLike | None,
    t0: ArrayLike,
    t1: ArrayLike,
    rtol: ArrayLike,
    atol: ArrayLike,
    save_at: ArrayLike | None,
    max_steps: int,
) -> Solved:
    """Solves ``dy/dt = vector_field(t, y, args)`` with the arguments checked by `sample`."""
    diffrax_solver = _SOLVER_CLASSES[solver]()
    t_dtype = time_dtype(jax.tree.leaves(y0)[0])
    per_step = _evals_per_step(diffrax_solver)
    if solver in FIXED_STEP_SOLVERS:
        if time_grid is None:
            time_grid = jnp.linspace(t0, t1, steps + 1)
        time_grid = jnp.asarray(time_grid, t_dtype)
        t0, t1 = time_grid[0], time_grid[-1]
        controller = _GridSteps(ts=time_grid)
        increments = jnp.diff(time_grid)
        grid_ok = jnp.all(increments > 0) | jnp.all(increments < 0)
        dt0, solver_state, nfe = None, None, 0
        max_steps = time_grid.shape[0] - 1
    else:
        t0, t1 = jnp.asarray(t0, t_dtype), jnp.asarray(t1, t_dtype)
        # We evaluate the first stage ourselves and hand it to the solver as its
        # first-same-as-last value. Otherwise a rejected first step would evaluate it again,
        # by an amount Diffrax does not report, and nfe could not be exact.
        f0 = vector_field(t0, y0, args)
        first_step = _initial_step_size(
            vector_field, args, t0, t1, y0, f0, diffrax_solver.order(None) + 1, rtol, atol
        )
        controller = _FirstStepGiven(diffrax.PIDController(rtol=rtol, atol=atol), first_step)
        dt0, solver_state = None, (jnp.array(False), f0)
        grid_ok, nfe = jnp.array(True), 2
    saveat = diffrax.SaveAt(t1=True, ts=None if save_at is None else jnp.asarray(save_at, t_dtype))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax_solver,
        t0,
        t1,
        dt0,
        y0,
        args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        solver_state=solver_state,
        # Failure is reported in `success`: raising needs host callbacks, which not every
        # backend or mapped context supports.
        throw=False,
    )
    y1 = jax.tree.map(lambda ys: ys[-1], solution.ys)
    trajectory = None if save_at is None else jax.tree.map(lambda ys: ys[:-1], solution.ys)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(y1)]))
    return Solved(
        y1=y1,
        trajectory=trajectory,
        nfe=(nfe + per_step * solution.stats["num_steps"]).astype(jnp.int32),
        success=(solution.result == diffrax.RESULTS.successful) & finite & grid_ok,
    )


def _rms(tree: PyTree[Array]) -> Array:
    leaves = jax.tree.leaves(tree)
    size = sum(leaf.size for leaf in leaves)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) / size)


class _GridSteps(diffrax.StepTo):
    """Diffrax's ``StepTo`` (steps to the times of a grid) without its run-time checks of
    the grid, which are host callbacks when the grid is traced (see :class:`_FirstStepGiven`
    for why those must go). The grid's ends are ``t0`` and ``t1`` by construction; `sample`
    checks a concrete grid when it is called, and :func:`integrate` reports a traced grid
    that is not strictly monotonic as ``success=False``. Being a ``StepTo``, it keeps
    Diffrax's step-counting loop condition."""

    def wrap(self, direction):
        return _GridSteps(ts=self.ts * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        del terms, t0, t1, y0, dt0, args, func, error_order
        return self.ts[1], 2


class _FirstStepGiven(diffrax.AbstractAdaptiveStepSizeController):
    """``controller`` (a PID controller) starting with a step of ``first_step``.

    The same solve as ``diffeqsolve(..., dt0=first_step)``, without Diffrax's check of the
    sign of a given ``dt0``: that check is an ``eqx.error_if``, a host callback whenever
    ``dt0`` is traced (ours depends on the data), and XLA keeps no program with a host
    callback in JAX's persistent compilation cache, so every solve would compile afresh in
    every process. ``first_step`` has the sign of ``t1 - t0`` by construction.
    """

    controller: diffrax.PIDController
    first_step: Array

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        # Diffrax solves in the direction of increasing time, and flips a given dt0 so.
        return _FirstStepGiven(self.controller.wrap(direction), self.first_step * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        del dt0  # None: the first step is ours
        return self.controller.init(terms, t0, t1, y0, self.first_step, args, func, error_order)

    def adapt_step_size(self, *args, **kwargs):
        return self.controller.adapt_step_size(*args, **kwargs)


def _initial_step_size(vector_field, args, t0, t1, y0, f0, error_order, rtol, atol):
    # Hairer, Nørsett & Wanner (1993), II.4 — the rule Diffrax, scipy and torchdiffeq use —
    # written here so that it can reuse our f0 (one evaluation instead of two).
    direction = jnp.where(t1 > t0, 1.0, -1.0).astype(t0.dtype)
    scale = jax.tree.map(lambda y: atol + rtol * jnp.abs(y), y0)
    divide = functools.partial(jax.tree.map, lambda a, b: a / b)
    d0 = _rms(divide(y0, scale))
    d1 = _rms(divide(f0, scale))
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1.0, d1)).astype(t0.dtype)
    y_probe = jax.tree.map(lambda y, f: (y + direction * h0 * f).astype(y.dtype), y0, f0)
    f_probe = vector_field(t0 + direction * h0, y_probe, args)
    d2 = _rms(divide(jax.tree.map(jnp.subtract, f_probe, f0), scale)) / h0
    d_max = jnp.maximum(d1, d2)
    h1 = jnp.where(
        d_max <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.where(d_max <= 1e-15, 1.0, d_max)) ** (1.0 / error_order),
    )
    return direction * jnp.minimum(100 * h0, h1).astype(t0.dtype)


# --- argument checks ------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """The value of `x` when known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_distinct_ends(t0: ArrayLike, t1: ArrayLike) -> None:
    t0_value, t1_value = _concrete(t0), _concrete(t1)
    if t0_value is not None and t1_value is not None and t0_value == t1_value:
        raise ValueError(f"The solve needs t0 != t1; got t0 = t1 = {t0_value}.")


def _check_times(name: str, times: ArrayLike, min_length: int) -> Array:
    times = jnp.asarray(times)
    check_float(name, times)
    if times.ndim != 1 or times.shape[0] < min_length:
        raise ValueError(
            f"{name} must be a 1-D array of at least {min_length} times; got shape {times.shape}."
        )
    return times


def _check_solver_args(solver, steps, time_grid, t0, t1, max_steps) -> None:
    check_choice("solver", solver, SOLVERS)
    check_positive_int("max_steps", max_steps)
    if solver in ADAPTIVE_SOLVERS:
        if steps is not None or time_grid is not None:
            raise ValueError(
                f"solver {solver!r} chooses its own steps; steps and time_grid are for the "
                f"fixed-step solvers {FIXED_STEP_SOLVERS} (got steps={steps!r}, time_grid "
                f"{'given' if time_grid is not None else 'None'}). Use save_at to record states."
            )
        _check_distinct_ends(t0, t1)
        return
    if (steps is None) == (time_grid is None):
        raise ValueError(
            f"Fixed-step solver {solver!r} needs exactly one of steps (an int) or time_grid "
            f"(an array of times); got steps={steps!r} and time_grid "
            f"{'given' if time_grid is not None else 'None'}."
        )
    if steps is not None:
        check_positive_int("steps", steps)
        _check_distinct_ends(t0, t1)
        return
    grid = _concrete(_check_times("time_grid", time_grid, min_length=2))
    if grid is not None:
        increments = np.diff(grid)
        if not (np.all(increments > 0) or np.all(increments < 0)):
            raise ValueError(f"time_grid must be strictly increasing or decreasing; got {grid}.")


def _check_save_at(save_at, time_grid, t0, t1) -> None:
    ends = (t0, t1) if time_grid is None else (time_grid[0], time_grid[-1])
    values, start, end = _concrete(save_at), _concrete(ends[0]), _concrete(ends[1])
    if values is None or start is None or end is None:
        return
    low, high = min(start, end), max(start, end)
    if np.any(values < low) or np.any(values > high):
        raise ValueError(
            f"save_at must lie within the solve, between {start} and {end}; got {values}."
        )


# --- jit over callables that hold arrays ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rest:
    """The hashable, non-array part of a callable pytree: its structure and other leaves."""

    treedef: Any
    leaves: tuple


def _split_arrays(fn: Any) -> tuple[list[Array], _Rest]:
    # A plain function is one (static) leaf; an Equinox module or a jax.tree_util.Partial
    # holds arrays that jit must trace rather than hash.
    leaves, treedef = jax.tree.flatten(fn)
    is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
    arrays = [leaf for leaf, array in zip(leaves, is_array, strict=True) if array]
    rest = tuple(None if array else leaf for leaf, array in zip(leaves, is_array, strict=True))
    return arrays, _Rest(treedef, rest)


def _merge_arrays(arrays: list[Array], rest: _Rest) -> Any:
    arrays = iter(arrays)
    leaves = [next(arrays) if leaf is None else leaf for leaf in rest.leaves]
    return jax.tree.unflatten(rest.treedef, leaves)
