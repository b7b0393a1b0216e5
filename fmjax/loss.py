r"""The conditional flow-matching loss, for any JAX model.

For data :math:`x_1`, noise :math:`x_0` from a source (by default :math:`N(0, I)`) paired by a
coupling, and :math:`t` from a time sampler, the model :math:`u_\theta(x_t, t)` regresses the
quantity its parameterisation predicts:

.. math::

    \mathcal L(\theta) = \mathbb E_{t, (x_0, x_1)}\,
        \tfrac{1}{D}\lVert u_\theta(x_t, t) - y \rVert^2,
    \qquad y = \begin{cases}
        \dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0 & \text{velocity} \\
        x_1 & \text{target} \\
        x_0 & \text{epsilon}
    \end{cases}

with :math:`D` the number of features per example. With ``loss_space="velocity"`` a target or
epsilon prediction is first converted to a velocity and compared with :math:`\dot x_t`. A path
with bridge noise (:class:`fmjax.paths.BridgeNoise`) adds :math:`\gamma_t z` to :math:`x_t` and
:math:`\dot\gamma_t z` to :math:`\dot x_t`, with :math:`z \sim N(0, I)` drawn per example.

:func:`cfm_loss` is the composition of its two halves, public for loops that want them apart:
:func:`draw_pairs` (noise, coupling and times: no parameters involved) and
:func:`cfm_loss_on_pairs` (the model and the regression). The pairing of a minibatch coupling
does not depend on the parameters, so a loop can draw many steps' pairs at once, e.g. one
vmapped :func:`fmjax.couplings.exact_ot` whose assignments run on every core.
"""

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from fmjax._checks import (
    check_choice,
    check_examples,
    check_float,
    check_nonempty,
    check_same_shape,
)
from fmjax.couplings import Coupling, independent
from fmjax.keys import example_keys
from fmjax.paths import PREDICTIONS, AffinePath, CondOT
from fmjax.timesteps import TimeSampler, uniform

__all__ = [
    "PREDICTIONS",
    "LossAux",
    "Pairs",
    "Source",
    "cfm_loss",
    "cfm_loss_on_pairs",
    "draw_pairs",
    "example_keys",
]

_LOSS_SPACES = ("prediction", "velocity")

Source = Callable[[PRNGKeyArray, tuple[int, ...], Any], Float[Array, " *dims"]]
"""A source distribution's sampler, ``source(key, shape, dtype) -> x0``: one draw of the given
shape and dtype, the signature of ``jax.random.normal`` (the standard normal, the default)."""


class Pairs(NamedTuple):
    r"""Noise and data paired by a coupling, each pair with its time: what the loss regresses.

    Attributes:
        x0: ``[batch, *dims]`` noise, in the coupling's order.
        x1: ``[batch, *dims]`` data, in the coupling's order.
        t: ``[batch]`` the time of each pair (float32, or float64 for float64 data).
        i1: ``[batch]`` int32 indices into the data as given: per-example inputs (labels)
            follow the pairs with ``labels[i1]``.
        z: ``[batch, *dims]`` the bridge noise :math:`z \sim N(0, I)` of each pair, drawn
            with ``bridge_noise=True`` (for a path with :class:`fmjax.paths.BridgeNoise`);
            else ``None``.
    """

    x0: Float[Array, " batch *dims"]
    x1: Float[Array, " batch *dims"]
    t: Float[Array, " batch"]
    i1: Int[Array, " batch"]
    z: Float[Array, " batch *dims"] | None = None


class LossAux(NamedTuple):
    """Per-example details of a :func:`cfm_loss` evaluation.

    Attributes:
        per_example: ``[batch]`` float32, each example's mean squared error over its features;
            the loss is their mean.
        t: ``[batch]``, the time of each (coupled) pair.
    """

    per_example: Float[Array, " batch"]
    t: Float[Array, " batch"]


def draw_pairs(
    key: PRNGKeyArray,
    x1: Float[Array, " batch *dims"],
    *,
    coupling: Coupling = independent,
    time_sampler: TimeSampler = uniform,
    source: Source = jax.random.normal,
    bridge_noise: bool = False,
) -> Pairs:
    r"""The random half of :func:`cfm_loss`: noise drawn for ``x1``, paired, and timed.

    Example ``i``'s key (``key`` split in ``batch``, or the ``[batch]`` keys given) splits in
    three (four with ``bridge_noise``): its noise :math:`x_0^{(i)}` from the first
    (``source(key, x1.shape[1:], x1.dtype)``, by default :math:`N(0, I)`), its time from the
    second (``time_sampler(key, ())``), its bridge noise :math:`z^{(i)} \sim N(0, I)` from the
    fourth; the coupling then pairs the whole batch with the third key of example 0. Times and
    bridge noise belong to positions in the coupled batch. So with the independent coupling an
    example's draws do not depend on the rest of the batch, nor on how it is split over
    devices. Jittable and vmappable: ``jax.vmap(draw_pairs)`` over a stack of keys and batches
    draws many steps' pairs at once (one host call solves a stack of
    :func:`fmjax.couplings.exact_ot` assignments on parallel threads).

    Args:
        key: a PRNG key, or ``[batch]`` keys.
        x1: the data, float, shape ``[batch, *dims]``.
        coupling: pairs noise and data, ``(key, x0, x1) -> Coupled``.
        time_sampler: ``(key, shape) -> t``; called once per example with ``shape=()``.
        source: the source distribution's sampler ``(key, shape, dtype) -> x0`` (a
            :data:`Source`, e.g. ``jax.random.uniform`` or a scaled and shifted
            ``jax.random.normal``); called once per example with the shape of one example.
        bridge_noise: also draw :math:`z` (``Pairs.z``), as a path with
            :class:`fmjax.paths.BridgeNoise` needs.

    Returns:
        :class:`Pairs`, with ``x0`` in ``x1``'s dtype.

    Raises:
        ValueError: for non-float, unbatched or empty ``x1``, keys of the wrong batch size, a
            ``source`` that does not return an array of the shape asked for, or (from the
            coupling) an OT coupling on a batch of one.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.couplings import exact_ot
        >>> from fmjax.loss import draw_pairs
        >>> x1 = jnp.array([[3.0], [-3.0]])
        >>> pairs = draw_pairs(jax.random.key(0), x1, coupling=exact_ot)
        >>> pairs.x0.shape, pairs.t.shape, pairs.i1
        ((2, 1), (2,), Array([0, 1], dtype=int32))
        >>> def source(key, shape, dtype):  # N(5, 0.1^2 I) instead of N(0, I)
        ...     return 5.0 + 0.1 * jax.random.normal(key, shape, dtype)
        >>> bool(jnp.all(draw_pairs(jax.random.key(0), x1, source=source).x0 > 4.0))
        True
    """
    check_examples("x1", x1)
    check_nonempty("x1", x1)
    check_float("x1", x1)
    splits = 4 if bridge_noise else 3
    keys = jax.vmap(lambda k: jax.random.split(k, splits))(example_keys(key, x1.shape[0]))
    x0 = jax.vmap(lambda k: _draw_source(source, k, x1.shape[1:], x1.dtype))(keys[:, 0])
    coupled = coupling(keys[0, 2], x0, x1)
    t_dtype = jnp.promote_types(x1.dtype, jnp.float32)
    t = jax.vmap(lambda k: jnp.asarray(time_sampler(k, ()), t_dtype))(keys[:, 1])
    z = None
    if bridge_noise:
        z = jax.vmap(lambda k: jax.random.normal(k, x1.shape[1:], x1.dtype))(keys[:, 3])
    return Pairs(coupled.x0, coupled.x1, t, coupled.i1, z)


def _draw_source(source: Source, key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Array:
    x0 = source(key, shape, dtype)
    if jnp.shape(x0) != shape or not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
        raise ValueError(
            f"source(key, shape, dtype) must return a float array of the shape asked for, "
            f"{shape} (one example of x1); got {type(x0).__name__} of shape {jnp.shape(x0)} and "
            f"dtype {jnp.result_type(x0)}."
        )
    return jnp.asarray(x0, dtype)


def cfm_loss(
    apply_fn: Callable[..., Float[Array, " batch *dims"]],
    params: Any,
    key: PRNGKeyArray,
    x1: Float[Array, " batch *dims"],
    *,
    path: AffinePath = AffinePath(CondOT()),  # noqa: B008 - frozen, immutable default
    coupling: Coupling = independent,
    time_sampler: TimeSampler = uniform,
    source: Source = jax.random.normal,
    prediction: Literal["velocity", "target", "epsilon"] = "velocity",
    loss_space: Literal["prediction", "velocity"] = "prediction",
    model_kwargs: Mapping[str, Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Float[Array, ""], LossAux]:
    r"""The conditional flow-matching loss of a model on a batch of data.

    Pure, jittable, differentiable in ``params``, usable under ``vmap`` and inside a mapped
    device step. Returns ``(loss, aux)``, ready for ``jax.value_and_grad(..., has_aux=True)``.
    Equal to ``cfm_loss_on_pairs(apply_fn, params, draw_pairs(key, x1, coupling=...,
    time_sampler=..., source=..., bridge_noise=path.bridge is not None), ...)``.

    Randomness: ``key`` is one key or one key per example (shape ``[batch]``). Example ``i``'s
    noise, time and bridge noise are drawn from its own key only, so with the independent
    coupling a batch gives the same per-example losses whole or split into parts. A minibatch
    coupling sees the whole batch; its own key comes from example 0's key (see
    :func:`draw_pairs`).

    Args:
        apply_fn: the model, called as ``apply_fn(params, x_t, t, **model_kwargs,
            **example_kwargs)`` with ``x_t`` shaped like ``x1`` and ``t`` shaped ``[batch]``;
            returns an array shaped like ``x1``. Any JAX function: a Flax ``apply``, an Equinox
            module's call, a plain function. Dropout keys travel in ``model_kwargs``.
            :func:`fmjax.sampling.sample` calls the same network with the same shapes (see
            [the network's time](../concepts.md#the-networks-time)).
        params: the model parameters (any pytree).
        key: a PRNG key, or ``[batch]`` keys.
        x1: the data, float, shape ``[batch, *dims]``.
        path: the probability path; with bridge noise (``path.bridge``), ``prediction`` must
            be ``"velocity"``.
        coupling: pairs noise and data, ``(key, x0, x1) -> Coupled`` (see
            :mod:`fmjax.couplings`).
        time_sampler: ``(key, shape) -> t``; called once per example with ``shape=()``.
        source: the source distribution's sampler ``(key, shape, dtype) -> x0``, called once
            per example (see :func:`draw_pairs`); the standard normal by default. Sampling
            then starts from the same source, and a likelihood needs its log-density.
        prediction: what the model outputs: ``"velocity"`` (:math:`\dot x_t`), ``"target"``
            (the data sample :math:`x_1`) or ``"epsilon"`` (the noise :math:`x_0`).
        loss_space: ``"prediction"`` measures the error in the prediction's own space;
            ``"velocity"`` converts the prediction to a velocity first (which divides by
            :math:`\sigma_t` or :math:`\alpha_t`: keep ``t`` away from that end).
        model_kwargs: extra keyword arguments passed unchanged to ``apply_fn``.
        example_kwargs: per-example keyword arguments (leading axis ``batch``, e.g. class
            labels) that follow ``x1`` through the coupling before reaching ``apply_fn``.

    Returns:
        ``(loss, aux)``: the scalar mean over examples (float32) and a :class:`LossAux`.

    Raises:
        ValueError: at trace time, for non-float, unbatched or empty ``x1``, keys of the wrong
            batch size, an unknown ``prediction`` or ``loss_space``, a prediction other than
            the velocity on a path with bridge noise, a ``source`` of the wrong output, a model
            output of the wrong shape, or (from the coupling) an OT coupling on a batch of one.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.loss import cfm_loss
        >>> def apply_fn(w, x_t, t):  # a linear "model"
        ...     return x_t @ w
        >>> x1 = jax.random.normal(jax.random.key(0), (64, 2)) + 3.0
        >>> loss, aux = cfm_loss(apply_fn, jnp.eye(2), jax.random.key(1), x1)
        >>> loss.shape, aux.per_example.shape
        ((), (64,))
    """
    _check_loss_options(prediction, loss_space, path)  # before tracing the coupling, not after
    pairs = draw_pairs(
        key,
        x1,
        coupling=coupling,
        time_sampler=time_sampler,
        source=source,
        bridge_noise=path.bridge is not None,
    )
    return cfm_loss_on_pairs(
        apply_fn,
        params,
        pairs,
        path=path,
        prediction=prediction,
        loss_space=loss_space,
        model_kwargs=model_kwargs,
        example_kwargs=example_kwargs,
    )


def cfm_loss_on_pairs(
    apply_fn: Callable[..., Float[Array, " batch *dims"]],
    params: Any,
    pairs: Pairs,
    *,
    path: AffinePath = AffinePath(CondOT()),  # noqa: B008 - frozen, immutable default
    prediction: Literal["velocity", "target", "epsilon"] = "velocity",
    loss_space: Literal["prediction", "velocity"] = "prediction",
    model_kwargs: Mapping[str, Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Float[Array, ""], LossAux]:
    r"""The deterministic half of :func:`cfm_loss`: the model's regression error on given pairs.

    Samples :math:`x_t` on ``path`` from each pair of ``pairs`` (from :func:`draw_pairs`) at
    its time (with its bridge noise ``pairs.z`` on a path with bridge noise), calls the model
    and returns ``(loss, aux)`` as :func:`cfm_loss` does, with the same arguments
    (``example_kwargs`` in the data's original order: they are gathered with ``pairs.i1``).
    Differentiable in ``params``; ``pairs`` carry no gradient to the parameters, so they may be
    drawn ahead, outside the differentiated function.

    Raises:
        ValueError: for pairs of mismatched shapes or an empty batch, an unknown ``prediction`` or
            ``loss_space``, pairs without bridge noise for a path with it (or the reverse), a
            prediction other than the velocity on a path with bridge noise, or a model output
            not shaped like ``pairs.x1``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.loss import cfm_loss, cfm_loss_on_pairs, draw_pairs
        >>> apply_fn = lambda w, x_t, t: x_t @ w
        >>> x1 = jax.random.normal(jax.random.key(0), (64, 2)) + 3.0
        >>> key, w = jax.random.key(1), jnp.eye(2)
        >>> loss, _ = cfm_loss_on_pairs(apply_fn, w, draw_pairs(key, x1))
        >>> bool(loss == cfm_loss(apply_fn, w, key, x1)[0])
        True
    """
    _check_loss_options(prediction, loss_space, path)
    x0, x1, t, i1, z = pairs
    check_examples("pairs.x1", x1)
    check_nonempty("pairs.x1", x1)
    check_float("pairs.x1", x1)
    check_same_shape("pairs.x0", x0, "pairs.x1", x1)
    batch = x1.shape[0]
    for name, value in (("pairs.t", t), ("pairs.i1", i1)):
        if jnp.shape(value) != (batch,):
            raise ValueError(
                f"{name} must have shape [batch]=({batch},) like pairs.x1 {x1.shape}; "
                f"got {jnp.shape(value)}."
            )
    sample = path.sample(x0, x1, t, z)

    gathered = jax.tree.map(lambda a: jnp.asarray(a)[i1], dict(example_kwargs or {}))
    output = apply_fn(params, sample.x_t, t, **dict(model_kwargs or {}), **gathered)
    if jnp.shape(output) != x1.shape:
        raise ValueError(
            f"apply_fn must return an array shaped like x1 {x1.shape}; got {jnp.shape(output)}."
        )

    if loss_space == "velocity" or prediction == "velocity":
        output = path.to_velocity(prediction, output, sample.x_t, t)
        regression_target = sample.dx_t
    else:
        regression_target = {"target": x1, "epsilon": x0}[prediction]

    error = jnp.square(output.astype(jnp.float32) - regression_target.astype(jnp.float32))
    per_example = jnp.mean(error.reshape(batch, -1), axis=1)
    return jnp.mean(per_example), LossAux(per_example=per_example, t=t)


def _check_loss_options(prediction: str, loss_space: str, path: AffinePath) -> None:
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("loss_space", loss_space, _LOSS_SPACES)
    if path.bridge is not None and prediction != "velocity":
        raise ValueError(
            f"prediction={prediction!r} is not available on a path with bridge noise "
            f"({path.bridge!r}): its points are not affine in (x0, x1), so only the velocity "
            "is learned; expected prediction='velocity'."
        )
