r"""A stochastic sampler: the SDE that has the flow's marginals, solved with Diffrax.

On an affine Gaussian path (:mod:`fmjax.paths`: :math:`x_t = \alpha_t x_1 + \sigma_t x_0`,
:math:`x_0 \sim N(0, I)` at :math:`t = 0`, data at :math:`t = 1`) the velocity :math:`u` of the
flow also gives the score :math:`s = \nabla_x \log p_t` of its marginals
(:meth:`fmjax.paths.AffinePath.velocity_to_score`). For any diffusion :math:`w_t \ge 0`, the SDE

.. math::

    dx_t = \Big[u(x_t, t) + \frac{w_t}{2}\, s(x_t, t)\Big]\, dt + \sqrt{w_t}\, dW_t

has the same marginals :math:`p_t` as the ODE :math:`dx_t = u\,dt` that
:func:`fmjax.sampling.sample` solves: in the Fokker–Planck equation the extra drift's term
:math:`-\nabla\cdot(p_t \tfrac{w_t}{2}\nabla\log p_t) = -\tfrac{w_t}{2}\Delta p_t` cancels the
diffusion's :math:`\tfrac{w_t}{2}\Delta p_t`. The noise can correct errors of a learnt velocity
along the way; SiT reports its best ImageNet FID with this sampler. :func:`sample_sde` solves
it from noise to data on a uniform grid, with the diffusion of SiT's choices
(:data:`DIFFUSIONS`) and the last step taken without noise (:data:`LAST_STEPS`), as SiT does.

The score exists only for the standard normal source of :func:`fmjax.loss.cfm_loss` and a path
without bridge noise; a network trained otherwise needs the ODE sampler.
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from fmjax._checks import (
    check_choice,
    check_examples,
    check_float,
    check_nonempty,
    check_positive_int,
)
from fmjax._integrate import (
    VelocityFn,
    batch_times,
    check_model_kwargs,
    check_velocity_output,
    merge_arrays,
    split_arrays,
    time_dtype,
)
from fmjax._xla import solve_jit
from fmjax.keys import example_keys
from fmjax.paths import AffinePath, CondOT, SchedulerOutput

__all__ = ["DIFFUSIONS", "LAST_STEPS", "SDE_SOLVERS", "SDEResult", "sample_sde"]

Diffusion = Callable[[SchedulerOutput, Array, float], Array]


def _sigma(c: SchedulerOutput, t: Array, norm: float) -> Array:
    return 2.0 * norm * c.sigma_t


def _sbdm(c: SchedulerOutput, t: Array, norm: float) -> Array:
    return 2.0 * norm * c.sigma_t * (c.d_alpha_t * c.sigma_t / c.alpha_t - c.d_sigma_t)


def _constant(c: SchedulerOutput, t: Array, norm: float) -> Array:
    return jnp.full_like(t, 2.0 * norm)


def _linear(c: SchedulerOutput, t: Array, norm: float) -> Array:
    return 2.0 * norm * (1.0 - t)


def _decreasing(c: SchedulerOutput, t: Array, norm: float) -> Array:
    return 0.5 * (norm * jnp.cos(math.pi * t) + 1.0) ** 2


def _increasing_decreasing(c: SchedulerOutput, t: Array, norm: float) -> Array:
    return 2.0 * norm * jnp.sin(math.pi * t) ** 2


DIFFUSIONS: dict[str, Diffusion] = {
    "sigma": _sigma,
    "sbdm": _sbdm,
    "constant": _constant,
    "linear": _linear,
    "decreasing": _decreasing,
    "increasing_decreasing": _increasing_decreasing,
}
r"""The named diffusions :math:`w_t` of :func:`sample_sde`, name -> ``(coefficients, t, norm) ->
w_t``: SiT's ``diffusion_form`` choices, whose :math:`D_t` is :math:`w_t / 2` (SiT writes the
noise :math:`\sqrt{2 D_t}\,dW`), with ``norm`` its ``diffusion_norm`` :math:`n`:

- ``"sigma"`` (SiT's command-line default): :math:`w_t = 2n\sigma_t`;
- ``"sbdm"``: :math:`w_t = 2n\,\sigma_t(\dot\alpha_t\sigma_t / \alpha_t - \dot\sigma_t)`, the
  diffusion of the score-based diffusion model whose marginals the path has (infinite where
  :math:`\alpha_t = 0`: start after ``t = 0``);
- ``"constant"``: :math:`w_t = 2n`;
- ``"linear"``: :math:`w_t = 2n(1 - t)`;
- ``"decreasing"``: :math:`w_t = \tfrac12 (n\cos\pi t + 1)^2`;
- ``"increasing_decreasing"``: :math:`w_t = 2n\sin^2 \pi t`.
"""

LAST_STEPS = ("mean", "euler", "tweedie")
r"""How :func:`sample_sde` takes its last step, from :math:`t_{n-1}` to ``t1``, without noise
(SiT's ``last_step`` choices): ``"mean"`` an Euler step of the SDE's drift
:math:`u + \tfrac{w}{2}s` (SiT's default), ``"euler"`` an Euler step of the velocity :math:`u`,
``"tweedie"`` the denoised estimate :math:`\mathbb E[x_1 \mid x_{t_{n-1}}]`
(:meth:`fmjax.paths.AffinePath.velocity_to_target`), which is the data end whatever ``t1``."""

SDE_SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
}
"""The SDE solvers of :func:`sample_sde`, name -> Diffrax solver: ``"euler"`` (Euler–Maruyama,
one velocity evaluation per step) and ``"heun"`` (stochastic Heun, two)."""

_EVALS_PER_STEP = {"euler": 1, "heun": 2}


class SDEResult(NamedTuple):
    """The outcome of :func:`sample_sde`.

    Attributes:
        x: the state at ``t1``, shaped like ``x0``.
        nfe: the number of velocity-function evaluations spent (int32 scalar).
        success: whether the solve reached ``t1`` with finite values (bool scalar).
    """

    x: Float[Array, " batch *dims"]
    nfe: Int[Array, ""]
    success: Bool[Array, ""]


class _ExampleBrownianMotion(diffrax.AbstractBrownianPath):
    """One Brownian motion per example, each from its own key.

    An increment over ``[t0, t1]`` is Diffrax's ``UnsafeBrownianPath`` increment of each
    example's key: a fresh normal draw keyed by the interval's ends, so an example's noise
    depends on its key and the time grid only, not on the rest of the batch. Like that path,
    it is meant for fixed steps (each interval drawn once) and no gradients.
    """

    keys: PRNGKeyArray
    shape: jax.ShapeDtypeStruct

    @property
    def levy_area(self):
        return diffrax.BrownianIncrement

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if use_levy:
            raise ValueError("sample_sde's Brownian motion has no Levy area.")
        return jax.vmap(lambda key: diffrax.UnsafeBrownianPath(self.shape, key).evaluate(t0, t1))(
            self.keys
        )


class _AdditiveNoise(diffrax.AbstractTerm):
    """The noise term ``sqrt(w_t) dW_t``: a scale that depends on time only, times the
    increment, elementwise (Diffrax's ``ControlTerm`` would contract the increment with a
    matrix instead)."""

    diffusion: Callable[[Array], Array]
    brownian: _ExampleBrownianMotion

    def vf(self, t, y, args):
        del args
        return jnp.sqrt(self.diffusion(t)).astype(jnp.result_type(y))

    def contr(self, t0, t1, **kwargs):
        del kwargs
        return self.brownian.evaluate(t0, t1)

    def prod(self, vf, control):
        return vf * control


def sample_sde(
    velocity_fn: VelocityFn,
    x0: Float[Array, " batch *dims"],
    key: PRNGKeyArray,
    *,
    steps: int,
    path: AffinePath = AffinePath(CondOT()),  # noqa: B008 - frozen, immutable default
    diffusion: str | Callable[[Array], Array] = "sigma",
    diffusion_norm: float = 1.0,
    solver: str = "euler",
    last_step: str = "mean",
    last_step_size: float | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SDEResult:
    r"""Samples by solving :math:`dx = [u + \tfrac{w_t}{2} s]\,dt + \sqrt{w_t}\,dW` from ``x0``.

    The score is :math:`s = ` ``path.velocity_to_score(u, x, t)``, so the SDE has the marginals
    of the flow of ``velocity_fn`` on ``path`` (see the module's introduction). ``steps``
    steps go from ``t0`` to ``t1``: the first ``steps - 1`` are stochastic, equal steps of
    ``solver`` from ``t0`` to ``t1 - h``, and the last one, of size ``h`` (``last_step_size``, by
    default the size of the others), is ``last_step`` without noise: the score, and with it
    the noise's correction, is singular at the data end. SiT's ImageNet sampler is
    ``steps=250, diffusion="sigma", last_step="mean", last_step_size=0.04`` on the CondOT path
    (its "Linear"; SiT's time runs in fmjax's direction).

    **Noise.** Example ``i``'s Brownian motion comes from its own key (``key`` split in
    ``batch``, or the ``[batch]`` keys given; :func:`fmjax.keys.example_keys`), so its sample
    depends on its key, ``x0[i]`` and the grid only: a batch gives the same samples whole or in
    parts, on one device or many (with a per-example ``velocity_fn``).

    **Solvers.** Diffrax's ``Euler`` (Euler–Maruyama, Itô) or ``Heun`` (Stratonovich) on
    ``MultiTerm(ODETerm(drift), noise)``. The noise's scale :math:`\sqrt{w_t}` does not depend
    on :math:`x`, so the Itô and Stratonovich solutions agree and both converge to it. Each
    interval's increments are drawn once, per example, as Diffrax's ``UnsafeBrownianPath``
    draws them (a fixed grid needs no Brownian tree, whose every evaluation is a descent
    through its levels).

    **The network's time.** ``velocity_fn(x, t, **model_kwargs)`` gets ``t`` of shape
    ``[batch]``, as in training (see [the network's time](../concepts.md#the-networks-time));
    the arrays of ``velocity_fn`` (a ``jax.tree_util.Partial``, an Equinox module) and of
    ``model_kwargs`` are traced, so new parameters, labels or keys do not recompile (a
    ``diffusion`` function is part of the compiled program, like a Python closure: a new one
    compiles again).

    Args:
        velocity_fn: the flow's velocity, ``velocity_fn(x, t, **model_kwargs) -> u`` shaped
            and typed like ``x``.
        x0: the state at ``t0``, float ``[batch, *dims]``: standard normal noise for
            ``t0 = 0``.
        key: a PRNG key, or ``[batch]`` keys.
        steps: the number of steps, the last one deterministic (``nfe`` is
            ``(steps - 1)`` times 1 for ``euler``, 2 for ``heun``, plus 1).
        path: the path the velocity was trained on (its scheduler gives the score and
            ``"sbdm"``'s diffusion); without bridge noise.
        diffusion: a name of :data:`DIFFUSIONS`, or a function ``t -> w_t`` (elementwise,
            non-negative).
        diffusion_norm: the scale :math:`n \ge 0` of a named diffusion (0: the ODE).
        solver: ``"euler"`` or ``"heun"`` (:data:`SDE_SOLVERS`).
        last_step: one of :data:`LAST_STEPS`.
        last_step_size: the size ``h`` of the last step, in ``(0, t1 - t0)``; ``None``: the
            size of the others, ``(t1 - t0) / steps``.
        t0: the time of ``x0``, in ``[0, 1)``.
        t1: the end, in ``(t0, 1]``.
        model_kwargs: keyword arguments for ``velocity_fn`` (labels, conditioning).

    Returns:
        An :class:`SDEResult`.

    Raises:
        ValueError: at trace time, for a non-float, unbatched or empty ``x0``; keys of the
            wrong batch size; an unknown solver, diffusion or last step; ``steps`` that is not
            a positive integer; times outside ``0 <= t0 < t1 <= 1``; a ``last_step_size``
            outside ``(0, t1 - t0)`` or one that leaves stochastic steps without ``steps >
            1``; a path with bridge noise; a diffusion that is negative or not finite, or a
            :math:`\sigma_t = 0` (no score), where the stochastic steps evaluate them; a
            ``velocity_fn`` that fails when called as ``velocity_fn(x, t, **model_kwargs)`` or
            returns the wrong shape or dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.sde import sample_sde
        >>> def velocity(x, t):  # CondOT's exact velocity for data N(3, 0): x_t = 3t + (1-t) x0
        ...     return 3.0 + (x - 3.0 * t[:, None]) * -1.0 / (1.0 - t[:, None])
        >>> x0 = jax.random.normal(jax.random.key(0), (1000, 1))
        >>> out = sample_sde(velocity, x0, jax.random.key(1), steps=50)
        >>> round(float(out.x.mean()), 2), round(float(out.x.std()), 2), int(out.nfe)
        (3.0, 0.0, 50)
    """
    check_examples("x0", x0)
    check_nonempty("x0", x0)
    check_float("x0", x0)
    keys = example_keys(key, x0.shape[0])
    check_choice("solver", solver, SDE_SOLVERS)
    check_choice("last_step", last_step, LAST_STEPS)
    check_positive_int("steps", steps)
    if path.bridge is not None:
        raise ValueError(
            "sample_sde needs the score of a path without bridge noise; "
            f"got bridge={path.bridge!r}."
        )
    if isinstance(diffusion, str):
        check_choice("diffusion", diffusion, DIFFUSIONS)
        if not (isinstance(diffusion_norm, int | float) and 0 <= diffusion_norm < math.inf):
            raise ValueError(
                "diffusion_norm must be a finite number >= 0; "
                f"got diffusion_norm={diffusion_norm!r}."
            )
        diffusion_norm = float(diffusion_norm)
    elif not callable(diffusion):
        raise ValueError(
            f"diffusion must be one of {', '.join(map(repr, DIFFUSIONS))} or a function "
            f"t -> w_t; got {diffusion!r}."
        )
    grid = _stochastic_grid(steps, t0, t1, last_step_size)
    _check_stochastic_grid(grid, diffusion, _diffusion_fn(path, diffusion, diffusion_norm), path)
    model_kwargs = check_model_kwargs(model_kwargs)
    arrays, rest = split_arrays((velocity_fn, model_kwargs))
    return _sample_sde_jit(
        arrays,
        x0,
        keys,
        static=(
            rest,
            path,
            diffusion,
            diffusion_norm,
            solver,
            last_step,
            steps,
            float(grid[0]),
            float(grid[-1]),
            float(t1),
        ),
    )


def _diffusion_fn(
    path: AffinePath, diffusion: str | Callable[[Array], Array], norm: float
) -> Callable[[Array], Array]:
    """``t -> w_t``; a named diffusion reads the path's scheduler."""
    if callable(diffusion):
        return diffusion
    form = DIFFUSIONS[diffusion]
    return lambda t: form(path.scheduler(t), jnp.asarray(t), norm)


def _stochastic_grid(steps: int, t0: float, t1: float, last_step_size: float | None) -> np.ndarray:
    """The times of the stochastic steps, ``t0 ... t1 - h`` (``steps`` of them)."""
    if not (isinstance(t0, int | float) and isinstance(t1, int | float) and 0.0 <= t0 < t1 <= 1.0):
        raise ValueError(
            f"sample_sde runs forward on the path, from noise to data: it needs "
            f"0 <= t0 < t1 <= 1 (numbers); got t0={t0!r}, t1={t1!r}."
        )
    if last_step_size is None:
        return np.linspace(t0, t1, steps + 1)[:-1]
    if not (isinstance(last_step_size, int | float) and 0.0 < last_step_size < t1 - t0):
        raise ValueError(
            f"last_step_size must be a number in (0, t1 - t0) = (0, {t1 - t0}); "
            f"got last_step_size={last_step_size!r}."
        )
    if steps == 1 and not math.isclose(last_step_size, t1 - t0):
        raise ValueError(
            f"steps=1 is the last step alone, of size t1 - t0 = {t1 - t0}; "
            f"got last_step_size={last_step_size}. Take steps > 1."
        )
    return np.linspace(t0, t1 - last_step_size, steps)


def _check_stochastic_grid(grid, diffusion, diffusion_fn, path) -> None:
    # The drift (the score and the diffusion) is evaluated at the grid's times: by the
    # stochastic steps, and at the last of them by a "mean" last step or Heun's second stage.
    times = grid
    w = np.asarray(jnp.broadcast_to(diffusion_fn(jnp.asarray(times)), times.shape))
    bad = ~(np.isfinite(w) & (w >= 0))
    if np.any(bad):
        raise ValueError(
            f"The diffusion {diffusion!r} must be finite and >= 0 where the SDE is solved; "
            f"it is {w[bad][0]} at t={times[bad][0]}. Start later (t0 > 0 for 'sbdm', which is "
            "infinite where alpha_t = 0) or choose another diffusion."
        )
    sigma_t = np.asarray(path.scheduler(jnp.asarray(grid)).sigma_t)
    if np.any(sigma_t <= 0):
        raise ValueError(
            f"The score needs sigma_t > 0, which is 0 at t={grid[sigma_t <= 0][0]}; end the "
            "stochastic steps before the data end with last_step_size."
        )


@functools.partial(solve_jit, static_argnames=("static",))
def _sample_sde_jit(arrays, x0, keys, *, static):
    rest, path, diffusion, norm, solver, last_step, steps, t_start, t_stop, t1 = static
    velocity_fn, model_kwargs = merge_arrays(arrays, rest)
    diffusion_fn = _diffusion_fn(path, diffusion, norm)
    t_dtype = time_dtype(x0)
    check_velocity_output(velocity_fn, x0, t_dtype, model_kwargs)
    args = (velocity_fn, model_kwargs, diffusion_fn, path)
    x, nfe, ok = x0, 0, jnp.array(True)
    if steps > 1:
        noise = _AdditiveNoise(
            diffusion_fn,
            _ExampleBrownianMotion(keys, jax.ShapeDtypeStruct(x0.shape[1:], x0.dtype)),
        )
        solution = diffrax.diffeqsolve(
            diffrax.MultiTerm(diffrax.ODETerm(_drift), noise),
            SDE_SOLVERS[solver](),
            # Python floats: Diffrax checks the sign of dt0 at trace time, without a callback.
            t_start,
            t_stop,
            (t_stop - t_start) / (steps - 1),
            x0,
            args,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=steps,
            # Failure is reported in `success`: raising needs host callbacks.
            throw=False,
        )
        x = solution.ys[-1]
        nfe = _EVALS_PER_STEP[solver] * solution.stats["num_steps"]
        ok = solution.result == diffrax.RESULTS.successful
    t = jnp.asarray(t_stop, t_dtype)
    h = jnp.asarray(t1 - t_stop, t_dtype)
    if last_step == "mean":
        x = x + h * _drift(t, x, args)
    else:
        u = velocity_fn(x, batch_times(t, x), **model_kwargs)
        if last_step == "euler":
            x = x + h * u
        else:
            x = path.velocity_to_target(u, x, batch_times(t, x))
    x = x.astype(x0.dtype)
    return SDEResult(
        x=x, nfe=jnp.asarray(nfe + 1, jnp.int32), success=ok & jnp.all(jnp.isfinite(x))
    )


def _drift(t, x, args):
    # Module-level (not a closure) so that Diffrax's ODETerm is the same object on every call.
    velocity_fn, model_kwargs, diffusion_fn, path = args
    t_batch = batch_times(t, x)
    u = velocity_fn(x, t_batch, **model_kwargs)
    score = path.velocity_to_score(u, x, t_batch)
    return (u + 0.5 * diffusion_fn(t) * score).astype(jnp.result_type(x))
