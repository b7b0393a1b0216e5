r"""The conditional flow-matching loss, for any JAX model.

For data :math:`x_1`, noise :math:`x_0 \sim N(0, I)` paired by a coupling, and :math:`t` from a
time sampler, the model :math:`u_\theta(x_t, t)` regresses the quantity its parameterisation
predicts:

.. math::

    \mathcal L(\theta) = \mathbb E_{t, (x_0, x_1)}\,
        \tfrac{1}{D}\lVert u_\theta(x_t, t) - y \rVert^2,
    \qquad y = \begin{cases}
        \dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0 & \text{velocity} \\
        x_1 & \text{target} \\
        x_0 & \text{epsilon}
    \end{cases}

with :math:`D` the number of features per example. With ``loss_space="velocity"`` a target or
epsilon prediction is first converted to a velocity and compared with :math:`\dot x_t`.
"""

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from fmjax._checks import check_batched, check_choice, check_float
from fmjax.couplings import Coupling, independent
from fmjax.paths import AffinePath, CondOT
from fmjax.timesteps import TimeSampler, uniform

__all__ = ["PREDICTIONS", "LossAux", "cfm_loss", "example_keys"]

PREDICTIONS = ("velocity", "target", "epsilon")
"""The model parameterisations :func:`cfm_loss` accepts."""

_LOSS_SPACES = ("prediction", "velocity")


class LossAux(NamedTuple):
    """Per-example details of a :func:`cfm_loss` evaluation.

    Attributes:
        per_example: ``[batch]`` float32, each example's mean squared error over its features;
            the loss is their mean.
        t: ``[batch]``, the time of each (coupled) pair.
    """

    per_example: Float[Array, " batch"]
    t: Float[Array, " batch"]


def example_keys(key: PRNGKeyArray, batch_size: int) -> PRNGKeyArray:
    """One typed PRNG key per example, from one key or from ``batch_size`` keys.

    Accepts typed keys (``jax.random.key``) and raw ``uint32`` keys (``jax.random.PRNGKey``).
    One key is split into ``batch_size``; a batch of keys is checked and returned (typed).

    Raises:
        ValueError: if a batch of keys does not have ``batch_size`` entries.
    """
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.ndim not in (1, 2):
            raise ValueError(
                "key must be a PRNG key (jax.random.key or jax.random.PRNGKey) or a batch of them; "
                f"got dtype {key.dtype} and shape {key.shape}."
            )
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch_size)
    if key.shape != (batch_size,):
        raise ValueError(
            f"Per-example keys must have shape [batch]=({batch_size},) to match x1; "
            f"got {key.shape[0] if key.ndim else '?'} keys (shape {key.shape})."
        )
    return key


def cfm_loss(
    apply_fn: Callable[..., Float[Array, " batch *dims"]],
    params: Any,
    key: PRNGKeyArray,
    x1: Float[Array, " batch *dims"],
    *,
    path: AffinePath = AffinePath(CondOT()),  # noqa: B008 - frozen, immutable default
    coupling: Coupling = independent,
    time_sampler: TimeSampler = uniform,
    prediction: Literal["velocity", "target", "epsilon"] = "velocity",
    loss_space: Literal["prediction", "velocity"] = "prediction",
    model_kwargs: Mapping[str, Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Float[Array, ""], LossAux]:
    r"""The conditional flow-matching loss of a model on a batch of data.

    Pure, jittable, differentiable in ``params``, usable under ``vmap`` and inside a mapped
    device step. Returns ``(loss, aux)``, ready for ``jax.value_and_grad(..., has_aux=True)``.

    Randomness: ``key`` is one key or one key per example (shape ``[batch]``). Example ``i``'s
    noise and time are drawn from its own key only, so with the independent coupling a batch
    gives the same per-example losses whole or split into parts. A minibatch coupling sees the
    whole batch; its own key comes from example 0's key.

    Args:
        apply_fn: the model, called as ``apply_fn(params, x_t, t, **model_kwargs,
            **example_kwargs)`` with ``x_t`` shaped like ``x1`` and ``t`` shaped ``[batch]``;
            returns an array shaped like ``x1``. Any JAX function: a Flax ``apply``, an Equinox
            module's call, a plain function. Dropout keys travel in ``model_kwargs``.
        params: the model parameters (any pytree).
        key: a PRNG key, or ``[batch]`` keys.
        x1: the data, float, shape ``[batch, *dims]``.
        path: the probability path.
        coupling: pairs noise and data, ``(key, x0, x1) -> Coupled`` (see
            :mod:`fmjax.couplings`).
        time_sampler: ``(key, shape) -> t``; called once per example with ``shape=()``.
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
        ValueError: at trace time, for non-float or unbatched ``x1``, keys of the wrong batch
            size, an unknown ``prediction`` or ``loss_space``, a model output of the wrong
            shape, or (from the coupling) an OT coupling on a batch of one.

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
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("loss_space", loss_space, _LOSS_SPACES)
    check_batched("x1", x1)
    check_float("x1", x1)
    batch = x1.shape[0]
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key, batch))

    x0 = jax.vmap(lambda k: jax.random.normal(k, x1.shape[1:], x1.dtype))(keys[:, 0])
    coupled = coupling(keys[0, 2], x0, x1)
    t_dtype = jnp.promote_types(x1.dtype, jnp.float32)
    t = jax.vmap(lambda k: jnp.asarray(time_sampler(k, ()), t_dtype))(keys[:, 1])
    sample = path.sample(coupled.x0, coupled.x1, t)

    gathered = jax.tree.map(lambda a: jnp.asarray(a)[coupled.i1], dict(example_kwargs or {}))
    output = apply_fn(params, sample.x_t, t, **dict(model_kwargs or {}), **gathered)
    if jnp.shape(output) != x1.shape:
        raise ValueError(
            f"apply_fn must return an array shaped like x1 {x1.shape}; got {jnp.shape(output)}."
        )

    if loss_space == "velocity" or prediction == "velocity":
        to_velocity = {
            "velocity": lambda u: u,
            "target": lambda u: path.target_to_velocity(u, sample.x_t, t),
            "epsilon": lambda u: path.epsilon_to_velocity(u, sample.x_t, t),
        }[prediction]
        output, regression_target = to_velocity(output), sample.dx_t
    else:
        regression_target = {"target": coupled.x1, "epsilon": coupled.x0}[prediction]

    error = jnp.square(output.astype(jnp.float32) - regression_target.astype(jnp.float32))
    per_example = jnp.mean(error.reshape(batch, -1), axis=1)
    return jnp.mean(per_example), LossAux(per_example=per_example, t=t)
