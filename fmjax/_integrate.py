"""Solving an ODE with Diffrax, for sampling and likelihoods: solvers, exact nfe, checks. Private.

:func:`fmjax.sampling.sample` and :func:`fmjax.likelihood.log_likelihood` both solve
``dy/dt = f(t, y)`` through :func:`integrate`, which

- steps through a time grid with a fixed-step solver, or lets a PID controller choose the
  steps of an adaptive one, from :data:`SOLVERS`;
- counts the evaluations of ``f`` it spends exactly (``nfe``), rejected steps included;
- reports failure in ``success`` instead of raising, and adds no host callback of its own
  (XLA keeps no program with one in JAX's persistent compilation cache).

Diffrax's time is a scalar; a user's ``velocity_fn`` gets it as one time per example
(:func:`batch_times`), the convention of training. The argument checks run at trace time,
before the solve, and :func:`check_velocity_output` probes the user's function once,
abstractly, so that a function written for another convention fails with a message that
states this one. :func:`split_arrays` lets a top-level ``jit`` trace the arrays that a
callable (or ``model_kwargs``) holds rather than hash them.
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

from fmjax._checks import check_choice, check_float, check_positive_int, concrete

VelocityFn = Callable[..., Float[Array, " batch *dims"]]
"""``velocity_fn(x, t, **model_kwargs) -> velocity``: ``x`` of shape ``[batch, *dims]`` and ``t``
of shape ``[batch]`` (one time per example) to an array shaped and typed like ``x``."""

CONVENTION = (
    "velocity_fn(x, t) -> velocity, with x of shape [batch, *dims], t of shape [batch] (one "
    'time per example, as in training) and a result shaped and typed like x; see "The '
    "network's time\" in docs/concepts.md"
)
"""The calling convention that error messages name."""


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


SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "rk4": RK4,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}
"""The ODE solvers by name, name -> Diffrax solver class: fixed-step ``euler`` (order 1),
``midpoint``, ``heun`` (order 2), ``rk4`` (order 4), and adaptive ``tsit5``, ``dopri5``
(order 5), ``dopri8`` (order 8). What ``solver=`` and ``config.train.sample_solver`` may name."""

ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "dopri8")
"""The solvers of :data:`SOLVERS` that choose their own steps (to ``rtol`` and ``atol``)."""

FIXED_STEP_SOLVERS = tuple(name for name in SOLVERS if name not in ADAPTIVE_SOLVERS)
"""The other solvers of :data:`SOLVERS`: they take ``steps`` equal steps or a ``time_grid``."""


def _evals_per_step(solver: diffrax.AbstractSolver) -> int:
    # An explicit RK step evaluates every stage, except that a first-same-as-last tableau
    # reuses its last stage as the next step's first. Euler is not written as a tableau.
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        return 1
    return tableau.num_stages - int(tableau.fsal)


class Solved(NamedTuple):
    """What :func:`integrate` returns."""

    y1: PyTree[Array]
    trajectory: PyTree[Array] | None
    nfe: Int[Array, ""]
    success: Bool[Array, ""]


def time_dtype(x: jax.Array) -> jnp.dtype:
    """Times are at least float32, and float64 with float64 states."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def batch_times(t: ArrayLike, x: jax.Array) -> Float[Array, " batch"]:
    """The solver's scalar time ``t`` as one time per example of ``x``, shape ``[batch]``."""
    return jnp.broadcast_to(jnp.asarray(t), jnp.shape(x)[:1])


def check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model_kwargs`` as a dict; raises `ValueError` unless it is a mapping with str keys."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(
        isinstance(name, str) for name in model_kwargs
    ):
        raise ValueError(
            "model_kwargs must be a mapping from keyword names (str) to values, passed as "
            f"velocity_fn(x, t, **model_kwargs); got {type(model_kwargs).__name__} "
            f"{_short(model_kwargs)}."
        )
    return dict(model_kwargs)


def check_velocity_output(
    velocity_fn: VelocityFn,
    x: jax.Array,
    t_dtype: jnp.dtype,
    model_kwargs: Mapping[str, Any],
) -> None:
    """Raises `ValueError` at trace time unless ``velocity_fn(x, t, **model_kwargs)``, called
    as fmjax calls it (``t`` of shape ``[batch]``), runs and is shaped and typed like ``x``.

    The probe is abstract (``jax.eval_shape``): nothing runs. An error that the call raises
    (a function written for another signature or argument order, or for a scalar ``t``)
    becomes a `ValueError` that states the convention, chained to the original.
    """
    x_spec = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    t_spec = jax.ShapeDtypeStruct(x_spec.shape[:1], t_dtype)
    called = f"x: {x_spec.dtype}{list(x_spec.shape)} and t: {t_dtype}{list(t_spec.shape)}"
    if model_kwargs:
        called += f" and model_kwargs {sorted(model_kwargs)}"
    try:
        out = jax.eval_shape(lambda x, t: velocity_fn(x, t, **model_kwargs), x_spec, t_spec)
    except Exception as err:
        raise ValueError(
            f"velocity_fn failed when called with {called} ({type(err).__name__}: {err}). "
            f"fmjax expects {CONVENTION}."
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != (
        x_spec.shape,
        x_spec.dtype,
    ):
        got = (
            f"shape {out.shape} and dtype {out.dtype}"
            if isinstance(out, jax.ShapeDtypeStruct)
            else f"{type(out).__name__} {_short(out)}"
        )
        raise ValueError(
            f"velocity_fn(x, t) must return an array of the shape {x_spec.shape} and dtype "
            f"{x_spec.dtype} of x; got {got} when called with {called}. fmjax expects "
            f"{CONVENTION}."
        )


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
    """Solves ``dy/dt = vector_field(t, y, args)`` from ``t0`` to ``t1``.

    A fixed-step solver steps through ``time_grid`` (or ``steps`` equal steps from ``t0`` to
    ``t1``); an adaptive one keeps the RMS of ``error / (atol + rtol * |y|)`` below one. The
    arguments are those :func:`check_solver_args` (and :func:`check_save_at`) accepted.
    """
    diffrax_solver = SOLVERS[solver]()
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
    for why those must go). The grid's ends are ``t0`` and ``t1`` by construction;
    :func:`check_solver_args` checks a concrete grid before the solve, and :func:`integrate`
    reports a traced grid that is not strictly monotonic as ``success=False``. Being a ``StepTo``, it keeps
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


def check_distinct_ends(t0: ArrayLike, t1: ArrayLike) -> None:
    """Raises `ValueError` when ``t0 == t1`` (checked only when both are concrete)."""
    t0_value, t1_value = concrete(t0), concrete(t1)
    if t0_value is not None and t1_value is not None and t0_value == t1_value:
        raise ValueError(f"The solve needs t0 != t1; got t0 = t1 = {t0_value}.")


def check_times(name: str, times: ArrayLike, min_length: int) -> Array:
    """``times`` as an array, checked to be 1-D, float and at least ``min_length`` long."""
    times = jnp.asarray(times)
    check_float(name, times)
    if times.ndim != 1 or times.shape[0] < min_length:
        raise ValueError(
            f"{name} must be a 1-D array of at least {min_length} times; got shape {times.shape}."
        )
    return times


def check_solver_args(solver, steps, time_grid, t0, t1, max_steps) -> None:
    """Raises `ValueError` at trace time for solver arguments :func:`integrate` cannot take.

    A concrete ``time_grid`` must be strictly monotone; a traced one is checked in the solve
    and reported through ``success``.
    """
    check_choice("solver", solver, SOLVERS)
    check_positive_int("max_steps", max_steps)
    if solver in ADAPTIVE_SOLVERS:
        if steps is not None or time_grid is not None:
            raise ValueError(
                f"solver {solver!r} chooses its own steps; steps and time_grid are for the "
                f"fixed-step solvers {FIXED_STEP_SOLVERS} (got steps={steps!r}, time_grid "
                f"{'given' if time_grid is not None else 'None'}). Use save_at to record states."
            )
        check_distinct_ends(t0, t1)
        return
    if (steps is None) == (time_grid is None):
        raise ValueError(
            f"Fixed-step solver {solver!r} needs exactly one of steps (an int) or time_grid "
            f"(an array of times); got steps={steps!r} and time_grid "
            f"{'given' if time_grid is not None else 'None'}."
        )
    if steps is not None:
        check_positive_int("steps", steps)
        check_distinct_ends(t0, t1)
        return
    grid = concrete(check_times("time_grid", time_grid, min_length=2))
    if grid is not None:
        increments = np.diff(grid)
        if not (np.all(increments > 0) or np.all(increments < 0)):
            raise ValueError(f"time_grid must be strictly increasing or decreasing; got {grid}.")


def check_save_at(save_at, time_grid, t0, t1) -> None:
    """Raises `ValueError` when concrete ``save_at`` times fall outside the solve."""
    ends = (t0, t1) if time_grid is None else (time_grid[0], time_grid[-1])
    values, start, end = concrete(save_at), concrete(ends[0]), concrete(ends[1])
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


def split_arrays(fn: Any) -> tuple[list[Array], _Rest]:
    """The arrays of the pytree ``fn`` (for ``jit`` to trace) and the rest (static, hashed).

    A plain function is one static leaf; an Equinox module or a ``jax.tree_util.Partial``
    holds arrays that ``jit`` must trace rather than hash.
    """
    leaves, treedef = jax.tree.flatten(fn)
    is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
    arrays = [leaf for leaf, array in zip(leaves, is_array, strict=True) if array]
    rest = tuple(None if array else leaf for leaf, array in zip(leaves, is_array, strict=True))
    return arrays, _Rest(treedef, rest)


def merge_arrays(arrays: list[Array], rest: _Rest) -> Any:
    """The callable that :func:`split_arrays` took apart."""
    arrays = iter(arrays)
    leaves = [next(arrays) if leaf is None else leaf for leaf in rest.leaves]
    return jax.tree.unflatten(rest.treedef, leaves)
