r"""Exact log-likelihoods of a flow by the instantaneous change of variables, and bits/dim.

For the flow :math:`dx_t/dt = u(x_t, t)` from the source :math:`p_0` at :math:`t = 0`
(:math:`N(0, I)` unless ``log_p0`` says otherwise) to the data at :math:`t = 1`, the density
along a trajectory obeys :math:`\frac{d}{dt} \log p_t(x_t) = -\nabla\!\cdot u(x_t, t)`
(Chen et al. 2018). So for data :math:`x_1`, solving backwards from :math:`t = 1` to :math:`0`
the joint system

.. math::

    \frac{d x_t}{dt} = u(x_t, t), \qquad \frac{d \ell_t}{dt} = \nabla\!\cdot u(x_t, t),
    \qquad \ell_1 = 0,

gives the noise :math:`x_0` that :math:`x_1` flows from and

.. math::

    \log p_1(x_1) = \log p_0(x_0) + \ell_0 = \log p_0(x_0) - \int_0^1 \nabla\!\cdot u(x_t, t)\,dt.

The divergence is exact (the Jacobian trace, :math:`D` forward-mode products) for small
dimensions, or Hutchinson's estimate :math:`\varepsilon^\top J \varepsilon` (one reverse-mode
product per probe) for images; probes are drawn once and held fixed over the solve, so the
estimate of :math:`\log p` is unbiased.

The network is called as ``velocity_fn(x, t, **model_kwargs)`` with ``t`` of shape ``[batch]``,
one time per example, as in training (see [the network's time](../concepts.md#the-networks-time)).
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from fmjax._checks import (
    check_batched,
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
    check_solver_args,
    check_velocity_output,
    integrate,
    merge_arrays,
    split_arrays,
    time_dtype,
)
from fmjax._xla import solve_jit

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "BitsPerDim",
    "LikelihoodResult",
    "bits_per_dim",
    "dequantize",
    "dequantized_bits_per_dim",
    "log_likelihood",
    "standard_normal_log_prob",
]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


class LikelihoodResult(NamedTuple):
    r"""The outcome of :func:`log_likelihood`.

    Attributes:
        log_prob: :math:`\log p_1(x_1)` in nats, shape ``[batch]`` (float32 or wider).
        nfe: evaluations of the joint dynamics; each is one call of ``velocity_fn`` plus
            :math:`D` forward-mode products (exact) or ``num_probes`` reverse-mode products
            (Hutchinson).
        x0: the source sample that ``x1`` flows from, shaped like ``x1``.
        success: whether the solve reached :math:`t = 0` with finite values.
    """

    log_prob: Float[Array, " batch"]
    nfe: Int[Array, ""]
    x0: Float[Array, " batch *dims"]
    success: Bool[Array, ""]


def log_likelihood(
    velocity_fn: VelocityFn,
    x1: Float[Array, " batch *dims"],
    *,
    key: PRNGKeyArray | None = None,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    model_kwargs: Mapping[str, Any] | None = None,
    log_p0: Callable[[Float[Array, " batch *dims"]], Float[Array, " batch"]] | None = None,
) -> LikelihoodResult:
    r"""The log-density :math:`\log p_1(x_1)` of data under the flow of ``velocity_fn``.

    Solves the joint system of the module docstring from :math:`t = 1` back to :math:`t = 0`
    with :func:`fmjax.sampling.sample`'s machinery (the same solvers, tolerances and batch
    semantics; the step size control sees both :math:`x_t` and :math:`\ell_t`). Every matrix
    product and convolution in the solve runs at full float32 precision, even on accelerators
    whose default is bfloat16 passes (TPU) or TF32 (GPU), unless the model fixes its own.

    ``velocity_fn`` is called as ``velocity_fn(x, t, **model_kwargs)`` with ``t`` of shape
    ``[batch]`` (see [the network's time](../concepts.md#the-networks-time)). It must treat
    the examples of a batch independently (no batch statistics): both divergences read each
    example's own block of the batch Jacobian.

    The source :math:`p_0` is :math:`N(0, I)` by default; ``log_p0`` gives another (the
    distribution the training loss drew :math:`x_0` from). Arrays inside ``velocity_fn``, in
    ``model_kwargs`` and inside ``log_p0`` (a ``jax.tree_util.Partial`` or an Equinox module)
    are traced, so new values of the same shapes reuse the compiled solve.

    Args:
        velocity_fn: ``velocity_fn(x, t, **model_kwargs)``, as for
            :func:`fmjax.sampling.sample`.
        x1: the data, float, shape ``[batch, *dims]``.
        key: draws the Hutchinson probes (needed only for ``divergence="hutchinson"``).
        divergence: ``"exact"`` (:math:`\operatorname{tr} J` by :math:`D` Jacobian-vector
            products, cost and memory :math:`\propto D`: small data) or ``"hutchinson"``
            (:math:`\frac1P\sum_p \varepsilon_p^\top J \varepsilon_p`: images).
        num_probes: the number :math:`P` of Hutchinson probes per example.
        probe: ``"rademacher"`` (±1 entries, the lower-variance choice) or ``"gaussian"``.
        solver: one of :data:`fmjax.sampling.SOLVERS`.
        steps: the number of steps of a fixed-step solver (adaptive solvers take none).
        rtol: relative tolerance of an adaptive solver.
        atol: absolute tolerance of an adaptive solver.
        max_steps: the most steps an adaptive solver may take.
        model_kwargs: keyword arguments of every call of ``velocity_fn`` (class labels,
            conditioning), as for :func:`fmjax.sampling.sample`; they do not depend on ``x``,
            so the divergence does not see them.
        log_p0: ``log_p0(x0) -> [batch]``, the source's log-density of each example in nats;
            ``None`` for the standard normal :math:`N(0, I)`.

    Returns:
        A :class:`LikelihoodResult`.

    Raises:
        ValueError: at trace time, for an empty ``x1``, an unknown ``divergence``, ``probe``
            or ``solver``, Hutchinson without a ``key``, ``num_probes < 1``, the solver errors of
            :func:`fmjax.sampling.sample`, a ``velocity_fn`` that fails when called with ``t``
            of shape ``[batch]`` or returns the wrong shape or dtype, ``model_kwargs`` that
            is not a mapping with str keys, or a ``log_p0`` that is not callable, fails, or
            does not return one value per example.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.likelihood import log_likelihood
        >>> # u = 0 is the identity flow: the density is the prior N(0, I).
        >>> out = log_likelihood(lambda x, t: jnp.zeros_like(x), jnp.zeros((3, 2)))
        >>> out.log_prob  # -log(2 pi)
        Array([-1.837877, -1.837877, -1.837877], dtype=float32)
        >>> # The source N(0, 4 I): log N(0; 0, 4 I) = -log(2 pi) - 2 log 2.
        >>> def log_p0(x0):
        ...     return jnp.sum(-0.5 * (x0 / 2) ** 2 - jnp.log(2 * jnp.sqrt(2 * jnp.pi)), axis=1)
        >>> zero_field = lambda x, t: jnp.zeros_like(x)
        >>> log_likelihood(zero_field, jnp.zeros((1, 2)), log_p0=log_p0).log_prob
        Array([-3.2241714], dtype=float32)
    """
    check_examples("x1", x1)
    check_nonempty("x1", x1)
    check_float("x1", x1)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe", probe, PROBES)
    check_positive_int("num_probes", num_probes)
    if divergence == "hutchinson" and key is None:
        raise ValueError(
            'divergence="hutchinson" draws random probes: pass key=jax.random.key(...).'
        )
    check_solver_args(solver, steps, None, 1.0, 0.0, max_steps)
    model_kwargs = check_model_kwargs(model_kwargs)
    if log_p0 is None:
        log_p0 = standard_normal_log_prob
    elif not callable(log_p0):
        raise ValueError(
            "log_p0 must be a function log_p0(x0) -> [batch] giving the source's log-density "
            f"(or None for N(0, I)); got {type(log_p0).__name__}."
        )
    arrays, rest = split_arrays((velocity_fn, model_kwargs, log_p0))
    if divergence == "exact":
        key = None
    static = (rest, divergence, num_probes, probe, solver, steps, max_steps)
    return _log_likelihood_jit(arrays, x1, key, rtol, atol, static=static)


@functools.partial(solve_jit, static_argnames=("static",))
def _log_likelihood_jit(arrays, x1, key, rtol, atol, *, static):
    rest, divergence, num_probes, probe, solver, steps, max_steps = static
    velocity_fn, model_kwargs, log_p0 = merge_arrays(arrays, rest)
    check_velocity_output(velocity_fn, x1, time_dtype(x1), model_kwargs)
    _check_log_p0(log_p0, x1)
    if divergence == "exact":
        field, probes = _exact_field, None
    else:
        field = _hutchinson_field
        draw = jax.random.rademacher if probe == "rademacher" else jax.random.normal
        probes = draw(key, (num_probes, *x1.shape), x1.dtype)
    log_det = jnp.zeros(x1.shape[:1], jnp.promote_types(x1.dtype, jnp.float32))
    # The precision is part of the trace, so it holds inside Diffrax's own jit too.
    with jax.default_matmul_precision("highest"):
        solved = integrate(
            field,
            (velocity_fn, model_kwargs, probes),
            (x1, log_det),
            solver=solver,
            steps=steps,
            time_grid=None,
            t0=1.0,
            t1=0.0,
            rtol=rtol,
            atol=atol,
            save_at=None,
            max_steps=max_steps,
        )
    x0, log_det = solved.y1
    return LikelihoodResult(
        log_prob=log_p0(x0).astype(log_det.dtype) + log_det,
        nfe=solved.nfe,
        x0=x0,
        success=solved.success,
    )


def standard_normal_log_prob(x: Float[Array, " batch *dims"]) -> Float[Array, " batch"]:
    r"""The log-density of each example under :math:`N(0, I)`:
    :math:`-\tfrac12 \lVert x \rVert^2 - \tfrac D2 \log 2\pi` (the default ``log_p0`` of
    :func:`log_likelihood`), in float32 or wider.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.likelihood import standard_normal_log_prob
        >>> standard_normal_log_prob(jnp.zeros((2, 1)))  # -log(2 pi) / 2
        Array([-0.9189385, -0.9189385], dtype=float32)
    """
    check_batched("x", x)
    x = x.reshape(x.shape[0], -1).astype(jnp.promote_types(x.dtype, jnp.float32))
    return -0.5 * jnp.sum(jnp.square(x), axis=1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def _check_log_p0(log_p0: Callable, x: Array) -> None:
    x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    expected = f"log_p0(x0) -> log-density of shape [batch]=({x.shape[0]},)"
    try:
        out = jax.eval_shape(log_p0, x_spec)
    except Exception as err:
        raise ValueError(
            f"log_p0 failed when called with x0: {x.dtype}{list(x.shape)} "
            f"({type(err).__name__}: {err}); fmjax expects {expected}."
        ) from err
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == x.shape[:1]
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        got = f"{out.dtype}{list(out.shape)}" if isinstance(out, jax.ShapeDtypeStruct) else out
        raise ValueError(
            f"log_p0 must return one float log-density per example; expected {expected}, "
            f"got {got} for x0: {x.dtype}{list(x.shape)}."
        )


def _exact_field(t, state, args):
    velocity_fn, model_kwargs, _ = args
    x, log_det = state
    t = batch_times(t, x)
    v, jvp = jax.linearize(lambda y: velocity_fn(y, t, **model_kwargs), x)
    batch, dims = x.shape[0], math.prod(x.shape[1:])
    # Basis vector i in every example at once: column i of each example's Jacobian block.
    basis = jnp.eye(dims, dtype=x.dtype).reshape(dims, 1, *x.shape[1:])
    columns = jax.vmap(jvp)(jnp.broadcast_to(basis, (dims, *x.shape)))
    trace = jnp.einsum("ibi->b", columns.reshape(dims, batch, dims))
    return v, trace.astype(log_det.dtype)


def _hutchinson_field(t, state, args):
    velocity_fn, model_kwargs, probes = args
    x, log_det = state
    t = batch_times(t, x)
    v, vjp = jax.vjp(lambda y: velocity_fn(y, t, **model_kwargs), x)
    probe_jacobian = jax.vmap(lambda probe: vjp(probe)[0])(probes)
    estimates = jnp.sum((probe_jacobian * probes).reshape(*probes.shape[:2], -1), axis=2)
    return v, jnp.mean(estimates, axis=0).astype(log_det.dtype)


def bits_per_dim(
    log_prob: Float[Array, " *batch"], num_dims: int, num_bins: int = 256
) -> Float[Array, " *batch"]:
    r"""Bits per dimension of discrete data from the log-density of its scaled dequantisation.

    For integers :math:`k \in \{0, \dots, B - 1\}^D` (``B = num_bins``, 256 for 8-bit
    images), dequantised as :math:`y = k + u`, :math:`u \sim U[0, 1)^D`, and scaled to
    :math:`x = 2y/B - 1 \in [-1, 1]` (see :func:`dequantize`), the density of :math:`y` is
    :math:`p(x)\,(2/B)^D`, hence

    .. math::

        \text{bpd} = -\frac{\log p(x)}{D \ln 2} + \log_2 \frac{B}{2}
        \quad (+7 \text{ bits for 8-bit data}).

    Averaged over :math:`u`, this bounds the bits/dim of the discrete data from above.

    Args:
        log_prob: :math:`\log p(x)` in nats (e.g. :attr:`LikelihoodResult.log_prob`).
        num_dims: :math:`D`, the number of dimensions of one example (e.g. 32·32·3).
        num_bins: :math:`B`, the number of discrete levels.

    Example:
        >>> import math
        >>> from fmjax.likelihood import bits_per_dim
        >>> # The uniform density on [-1, 1]^D, 2^-D, costs exactly 8 bits per 8-bit pixel.
        >>> float(bits_per_dim(-3 * math.log(2.0), num_dims=3))
        8.0
    """
    check_positive_int("num_dims", num_dims, " (the size of one example, e.g. x[0].size)")
    check_positive_int("num_bins", num_bins)
    return -jnp.asarray(log_prob) / (num_dims * math.log(2.0)) + math.log2(num_bins / 2)


def dequantize(
    key: PRNGKeyArray, images: Int[Array, " batch *dims"], num_bins: int = 256
) -> Float[Array, " batch *dims"]:
    r"""Uniform dequantisation of integer images to :math:`[-1, 1]`: :math:`x = 2(k + u)/B - 1`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.likelihood import dequantize
        >>> x = dequantize(jax.random.key(0), jnp.array([[0, 255]], jnp.uint8))
        >>> bool(x[0, 0] >= -1.0), bool(x[0, 1] < 1.0), x.dtype
        (True, True, dtype('float32'))
    """
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(
            f"dequantize expects integer images (e.g. uint8 in [0, {num_bins})); "
            f"got dtype {images.dtype}."
        )
    noise = jax.random.uniform(key, images.shape, jnp.float32)
    return 2.0 * (images.astype(jnp.float32) + noise) / num_bins - 1.0


class BitsPerDim(NamedTuple):
    """The outcome of :func:`dequantized_bits_per_dim`.

    Attributes:
        bpd: bits per dimension of each example, averaged over the draws, shape ``[batch]``.
        nfe: evaluations of the joint dynamics summed over the draws.
        success: whether every solve succeeded.
    """

    bpd: Float[Array, " batch"]
    nfe: Int[Array, ""]
    success: Bool[Array, ""]


def dequantized_bits_per_dim(
    velocity_fn: VelocityFn,
    key: PRNGKeyArray,
    images: Int[Array, " batch *dims"],
    *,
    num_draws: int = 1,
    num_bins: int = 256,
    **likelihood_kwargs: Any,
) -> BitsPerDim:
    r"""Bits/dim of integer images, averaged over ``num_draws`` uniform dequantisations.

    For each of :math:`K` = ``num_draws`` draws :math:`u_k`, computes
    :func:`bits_per_dim` of :func:`log_likelihood` at :func:`dequantize`\ d images, and
    averages: :math:`\frac1K \sum_k \text{bpd}(k + u_k)`, the Monte Carlo estimate of the
    dequantisation bound that the Flow Matching paper reports with :math:`K = 50`. The draws
    run one after another (``lax.map``), so memory is that of one solve.

    Args:
        velocity_fn: ``velocity_fn(x, t, **model_kwargs)`` on images scaled to
            :math:`[-1, 1]`, ``t`` of shape ``[batch]``.
        key: draws the dequantisation noise and, for Hutchinson, the probes of each draw.
        images: integers in :math:`[0, B)`, shape ``[batch, *dims]``.
        num_draws: :math:`K`.
        num_bins: :math:`B`.
        **likelihood_kwargs: passed to :func:`log_likelihood` (``divergence``, ``solver``,
            ``rtol``, ``model_kwargs``, ``log_p0``...).

    Returns:
        A :class:`BitsPerDim`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.likelihood import dequantized_bits_per_dim
        >>> images = jnp.full((2, 4), 128, jnp.uint8)
        >>> out = dequantized_bits_per_dim(
        ...     lambda x, t: jnp.zeros_like(x), jax.random.key(0), images, num_draws=3)
        >>> out.bpd.shape, bool(out.success)
        ((2,), True)
    """
    check_positive_int("num_draws", num_draws)
    if "key" in likelihood_kwargs:
        raise ValueError("Pass one key as dequantized_bits_per_dim(..., key, ...); it is split.")
    num_dims = math.prod(jnp.shape(images)[1:])

    def one_draw(draw_key):
        dequantize_key, probe_key = jax.random.split(draw_key)
        x = dequantize(dequantize_key, images, num_bins)
        result = log_likelihood(velocity_fn, x, key=probe_key, **likelihood_kwargs)
        return bits_per_dim(result.log_prob, num_dims, num_bins), result.nfe, result.success

    bpd, nfe, success = jax.lax.map(one_draw, jax.random.split(key, num_draws))
    return BitsPerDim(bpd=jnp.mean(bpd, axis=0), nfe=jnp.sum(nfe), success=jnp.all(success))
