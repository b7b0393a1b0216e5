r"""Affine probability paths between noise and data.

Convention (fixed across fmjax): noise :math:`x_0 \sim N(0, I)` at :math:`t = 0`, data
:math:`x_1` at :math:`t = 1`, and

.. math::

    x_t = \alpha_t x_1 + \sigma_t x_0, \qquad
    \dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0,

with :math:`\alpha_0 = 0, \sigma_0 = 1` and :math:`\alpha_1 = 1, \sigma_1 = 0` (up to a
``sigma_min``). A scheduler gives :math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`;
:class:`AffinePath` turns it into samples ``x_t``, regression targets ``dx_t`` and
conversions between the three model parameterisations:

- ``velocity``: the model predicts :math:`\dot x_t`;
- ``target``: the model predicts the data sample :math:`x_1`;
- ``epsilon``: the model predicts the noise :math:`x_0`.

The formulas of the named schedulers are those of the schedulers of the same names in Meta's
``flow_matching`` library.

**Bridge noise.** A path may add Gaussian noise :math:`\gamma_t z`, :math:`z \sim N(0, I)`,
to every point (a :class:`BridgeNoise`, e.g. ``AffinePath(CondOT(), bridge=BrownianBridge(0.5))``):

.. math::

    x_t = \alpha_t x_1 + \sigma_t x_0 + \gamma_t z, \qquad
    \dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0 + \dot\gamma_t z .

With :class:`CondOT` these are torchcfm's paths: :class:`ConstantBridge` (:math:`\gamma_t =
\sigma`) is its ``ConditionalFlowMatcher(sigma)`` (I-CFM), and :class:`BrownianBridge`
(:math:`\gamma_t = \sigma\sqrt{t(1 - t)}`) with :func:`fmjax.couplings.sinkhorn_ot` of
``epsilon`` :math:`= 2\sigma^2` its ``SchrodingerBridgeConditionalFlowMatcher(sigma,
ot_method="sinkhorn")`` (SB-CFM). The parameterisation conversions below hold for paths
without bridge noise; with it, the network predicts the velocity.
"""

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax._checks import broadcast_time, check_choice, check_float, check_same_shape

__all__ = [
    "BRIDGE_NOISES",
    "PREDICTIONS",
    "SCHEDULERS",
    "VP",
    "AffinePath",
    "BridgeNoise",
    "BrownianBridge",
    "CondOT",
    "ConstantBridge",
    "Cosine",
    "FunctionScheduler",
    "LinearVP",
    "PathSample",
    "Polynomial",
    "Scheduler",
    "SchedulerOutput",
]

PREDICTIONS = ("velocity", "target", "epsilon")
"""What a network may predict: the velocity :math:`\\dot x_t`, the data :math:`x_1` ("target") or
the noise :math:`x_0` ("epsilon"); :meth:`AffinePath.to_velocity` converts each to a velocity."""

Time = Float[ArrayLike, " *t"]
Batch = Float[Array, " batch *dims"]


class SchedulerOutput(NamedTuple):
    r"""The coefficients of an affine path at times ``t`` (each with the shape of ``t``).

    Attributes:
        alpha_t: :math:`\alpha_t`, the weight of the data sample :math:`x_1`.
        sigma_t: :math:`\sigma_t`, the weight of the noise :math:`x_0`.
        d_alpha_t: :math:`\dot\alpha_t = d\alpha_t / dt`.
        d_sigma_t: :math:`\dot\sigma_t = d\sigma_t / dt`.
    """

    alpha_t: Float[Array, " *t"]
    sigma_t: Float[Array, " *t"]
    d_alpha_t: Float[Array, " *t"]
    d_sigma_t: Float[Array, " *t"]


def _as_time(t: Time) -> Float[Array, " *t"]:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def _elementwise_derivative(fn: Callable[[jax.Array], jax.Array], t: jax.Array) -> jax.Array:
    # For an elementwise fn, the JVP with an all-ones tangent is exactly the derivative at
    # every element, for any shape of t.
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


class Scheduler(abc.ABC):
    r"""A schedule :math:`(\alpha_t, \sigma_t)` of an affine path; callable as ``scheduler(t)``.

    Subclasses define the elementwise functions :meth:`alpha` and :meth:`sigma`. Their time
    derivatives default to exact forward-mode derivatives (``jax.jvp``); the named schedulers
    override them with closed forms.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.paths import CondOT
        >>> out = CondOT()(jnp.array([0.0, 0.25, 1.0]))
        >>> out.alpha_t, out.sigma_t
        (Array([0.  , 0.25, 1.  ], dtype=float32), Array([1.  , 0.75, 0.  ], dtype=float32))
    """

    @abc.abstractmethod
    def alpha(self, t: Float[Array, " *t"]) -> Float[Array, " *t"]:
        r""":math:`\alpha_t`, elementwise in ``t``."""

    @abc.abstractmethod
    def sigma(self, t: Float[Array, " *t"]) -> Float[Array, " *t"]:
        r""":math:`\sigma_t`, elementwise in ``t``."""

    def d_alpha(self, t: Float[Array, " *t"]) -> Float[Array, " *t"]:
        r""":math:`\dot\alpha_t`; by default the exact derivative of :meth:`alpha` via ``jax.jvp``."""
        return _elementwise_derivative(self.alpha, t)

    def d_sigma(self, t: Float[Array, " *t"]) -> Float[Array, " *t"]:
        r""":math:`\dot\sigma_t`; by default the exact derivative of :meth:`sigma` via ``jax.jvp``."""
        return _elementwise_derivative(self.sigma, t)

    def __call__(self, t: Time) -> SchedulerOutput:
        """All four coefficients at times ``t`` (any shape; integers are cast to float)."""
        t = _as_time(t)
        return SchedulerOutput(self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t))


@dataclasses.dataclass(frozen=True)
class FunctionScheduler(Scheduler):
    r"""A scheduler from two user functions; derivatives come from ``jax.jvp``.

    Args:
        alpha_fn: elementwise :math:`t \mapsto \alpha_t` with :math:`\alpha_0 = 0, \alpha_1 = 1`.
        sigma_fn: elementwise :math:`t \mapsto \sigma_t` with :math:`\sigma_0 = 1, \sigma_1 = 0`.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.paths import FunctionScheduler
        >>> quadratic = FunctionScheduler(lambda t: t**2, lambda t: 1 - t**2)
        >>> quadratic(jnp.array(0.5)).d_alpha_t
        Array(1., dtype=float32, weak_type=True)
    """

    alpha_fn: Callable[[jax.Array], jax.Array]
    sigma_fn: Callable[[jax.Array], jax.Array]

    def alpha(self, t):
        return self.alpha_fn(t)

    def sigma(self, t):
        return self.sigma_fn(t)


@dataclasses.dataclass(frozen=True)
class CondOT(Scheduler):
    r"""The conditional optimal-transport (linear) schedule.

    :math:`\alpha_t = t`, :math:`\sigma_t = 1 - (1 - \sigma_{\min})\,t`. With the default
    ``sigma_min=0`` this is Meta's ``CondOTScheduler`` (rectified flow); a positive
    ``sigma_min`` gives the path of Lipman et al. (2023), whose data end keeps noise of
    standard deviation ``sigma_min``.
    """

    sigma_min: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"CondOT sigma_min must be in [0, 1); got sigma_min={self.sigma_min}.")

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1.0 - (1.0 - self.sigma_min) * t

    def d_alpha(self, t):
        return jnp.ones_like(t)

    def d_sigma(self, t):
        return jnp.full_like(t, -(1.0 - self.sigma_min))


@dataclasses.dataclass(frozen=True)
class Polynomial(Scheduler):
    r"""The polynomial convex schedule :math:`\alpha_t = t^n`, :math:`\sigma_t = 1 - t^n`."""

    n: float

    def __post_init__(self):
        if not (isinstance(self.n, int | float) and self.n > 0):
            raise ValueError(f"Polynomial exponent n must be a positive number; got n={self.n!r}.")

    def alpha(self, t):
        return t**self.n

    def sigma(self, t):
        return 1.0 - t**self.n

    def d_alpha(self, t):
        return self.n * t ** (self.n - 1)

    def d_sigma(self, t):
        return -self.n * t ** (self.n - 1)


@dataclasses.dataclass(frozen=True)
class Cosine(Scheduler):
    r"""The cosine schedule :math:`\alpha_t = \sin(\pi t / 2)`, :math:`\sigma_t = \cos(\pi t / 2)`."""

    def alpha(self, t):
        return jnp.sin(0.5 * math.pi * t)

    def sigma(self, t):
        # cos(pi t / 2) written as sin(pi (1 - t) / 2): exactly 0 at t = 1 in float32, where the
        # cosine form gives -4.4e-8 (a negative noise scale).
        return jnp.sin(0.5 * math.pi * (1.0 - t))

    def d_alpha(self, t):
        return 0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))

    def d_sigma(self, t):
        return -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)


@dataclasses.dataclass(frozen=True)
class VP(Scheduler):
    r"""The variance-preserving schedule of score-based diffusion, time-reversed to t=1 data.

    With :math:`T(t) = \tfrac12 (1-t)^2 (\beta_{\max} - \beta_{\min}) + (1-t)\beta_{\min}`:
    :math:`\alpha_t = e^{-T/2}`, :math:`\sigma_t = \sqrt{1 - e^{-T}}`. Note that
    :math:`\alpha_0 = e^{-(\beta_{\min}+\beta_{\max})/4} \approx 0.0066`, not exactly 0.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if not 0.0 <= self.beta_min < self.beta_max:
            raise ValueError(
                "VP needs 0 <= beta_min < beta_max; "
                f"got beta_min={self.beta_min}, beta_max={self.beta_max}."
            )

    def _T(self, t):
        s = 1.0 - t
        return 0.5 * s**2 * (self.beta_max - self.beta_min) + s * self.beta_min

    def _dT(self, t):
        return -(1.0 - t) * (self.beta_max - self.beta_min) - self.beta_min

    def alpha(self, t):
        return jnp.exp(-0.5 * self._T(t))

    def sigma(self, t):
        # -expm1(-T) keeps precision where T is small (near t = 1).
        return jnp.sqrt(-jnp.expm1(-self._T(t)))

    def d_alpha(self, t):
        return -0.5 * self._dT(t) * jnp.exp(-0.5 * self._T(t))

    def d_sigma(self, t):
        T = self._T(t)
        return 0.5 * self._dT(t) * jnp.exp(-T) / jnp.sqrt(-jnp.expm1(-T))


@dataclasses.dataclass(frozen=True)
class LinearVP(Scheduler):
    r"""The linear variance-preserving schedule :math:`\alpha_t = t`, :math:`\sigma_t = \sqrt{1 - t^2}`."""

    def alpha(self, t):
        return t

    def sigma(self, t):
        return jnp.sqrt(1.0 - t**2)

    def d_alpha(self, t):
        return jnp.ones_like(t)

    def d_sigma(self, t):
        return -t / jnp.sqrt(1.0 - t**2)


class BridgeNoise(abc.ABC):
    r"""Noise :math:`\gamma_t z` added to every point of a path, :math:`z \sim N(0, I)`.

    Subclasses define the elementwise scale :meth:`gamma`; its derivative :meth:`d_gamma`
    defaults to ``jax.jvp``. :class:`AffinePath` adds :math:`\gamma_t z` to ``x_t`` and
    :math:`\dot\gamma_t z` to ``dx_t``: the conditional path is
    :math:`N(\alpha_t x_1 + \sigma_t x_0, \gamma_t^2 I)` and :math:`\dot x_t` its conditional
    velocity at the point drawn.
    """

    @abc.abstractmethod
    def gamma(self, t: Float[Array, " *t"]) -> Float[Array, " *t"]:
        r""":math:`\gamma_t`, elementwise in ``t``."""

    def d_gamma(self, t: Float[Array, " *t"]) -> Float[Array, " *t"]:
        r""":math:`\dot\gamma_t`; by default the exact derivative of :meth:`gamma` via ``jax.jvp``."""
        return _elementwise_derivative(self.gamma, t)


def _check_bridge_sigma(name: str, sigma: float) -> None:
    if not (isinstance(sigma, int | float) and 0.0 < sigma < math.inf):
        raise ValueError(f"{name} sigma must be a positive finite number; got sigma={sigma!r}.")


@dataclasses.dataclass(frozen=True)
class ConstantBridge(BridgeNoise):
    r"""Noise of constant scale, :math:`\gamma_t = \sigma` (so :math:`\dot\gamma_t = 0`).

    With :class:`CondOT`: torchcfm's ``ConditionalFlowMatcher(sigma)`` (I-CFM), whose points
    are :math:`t x_1 + (1 - t) x_0 + \sigma z` and target :math:`x_1 - x_0`. Its ends are
    blurred too: the learnt flow carries :math:`x_0 + \sigma z` to :math:`x_1 + \sigma z`, and
    sampling from the source itself (as torchcfm does) is exact only as :math:`\sigma \to 0`.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.paths import ConstantBridge
        >>> ConstantBridge(0.1).gamma(jnp.array([0.0, 0.5]))
        Array([0.1, 0.1], dtype=float32)
    """

    sigma: float

    def __post_init__(self):
        _check_bridge_sigma("ConstantBridge", self.sigma)

    def gamma(self, t):
        return jnp.full_like(t, self.sigma)

    def d_gamma(self, t):
        return jnp.zeros_like(t)


@dataclasses.dataclass(frozen=True)
class BrownianBridge(BridgeNoise):
    r"""The noise of a Brownian bridge, :math:`\gamma_t = \sigma\sqrt{t(1 - t)}`.

    :math:`\dot\gamma_t = \frac{1 - 2t}{2t(1 - t)}\,\gamma_t`, computed as torchcfm's
    ``SchrodingerBridgeConditionalFlowMatcher`` does, with ``1e-8`` added to the denominator, so
    that it is 0 rather than 0/0 at the ends (where :math:`\gamma_t = 0`) and the same number
    as torchcfm's elsewhere. With :class:`CondOT` and pairs from
    :func:`fmjax.couplings.sinkhorn_ot` with ``epsilon`` :math:`= 2\sigma^2`, this is SB-CFM:
    the Schrödinger bridge between the source and the data for the reference Brownian motion
    :math:`\sigma W`.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.paths import BrownianBridge
        >>> BrownianBridge(2.0).gamma(jnp.array([0.0, 0.5, 1.0]))
        Array([0., 1., 0.], dtype=float32)
    """

    sigma: float

    def __post_init__(self):
        _check_bridge_sigma("BrownianBridge", self.sigma)

    def gamma(self, t):
        return self.sigma * jnp.sqrt(t * (1.0 - t))

    def d_gamma(self, t):
        return (1.0 - 2.0 * t) / (2.0 * t * (1.0 - t) + 1e-8) * self.gamma(t)


class PathSample(NamedTuple):
    r"""A draw from an affine path (arrays shaped like ``x1`` unless noted).

    Attributes:
        x_t: the point on the path, :math:`\alpha_t x_1 + \sigma_t x_0`.
        dx_t: its time derivative :math:`\dot\alpha_t x_1 + \dot\sigma_t x_0`, the regression
            target of the velocity parameterisation.
        t: the times, as given (scalar or ``[batch]``).
        x0: the noise end.
        x1: the data end.
        z: the bridge noise :math:`z` of a path with :class:`BridgeNoise`, else ``None``.
    """

    x_t: Float[Array, " batch *dims"]
    dx_t: Float[Array, " batch *dims"]
    t: Float[Array, " *batch"]
    x0: Float[Array, " batch *dims"]
    x1: Float[Array, " batch *dims"]
    z: Float[Array, " batch *dims"] | None = None


@dataclasses.dataclass(frozen=True)
class AffinePath:
    r"""The affine path :math:`x_t = \alpha_t x_1 + \sigma_t x_0` of a scheduler.

    With ``bridge`` (a :class:`BridgeNoise`), :meth:`sample` adds :math:`\gamma_t z` to ``x_t``
    and :math:`\dot\gamma_t z` to ``dx_t`` for the noise ``z`` it is given; the conversions
    between parameterisations and :meth:`velocity_to_score` are those of the path without it.

    Every method takes ``t`` as a scalar or with shape ``[batch]`` (the leading axis of the
    arrays), broadcast over their trailing axes, whatever their rank. Outputs have the dtype of
    the array inputs.

    The six conversions between parameterisations take ``(prediction, x_t, t)``. Each divides
    by a coefficient that vanishes at one end of the path: ``target_to_velocity`` and
    ``target_to_epsilon`` by :math:`\sigma_t` (zero at ``t = 1``), ``epsilon_to_velocity`` and
    ``epsilon_to_target`` by :math:`\alpha_t` (zero at ``t = 0``), and the ``velocity_to_*``
    pair by :math:`\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t` (never zero for the named
    schedulers on ``(0, 1)``). Keep ``t`` away from the singular end.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.paths import AffinePath, CondOT
        >>> path = AffinePath(CondOT())
        >>> x0 = jnp.zeros((2, 3)); x1 = jnp.ones((2, 3))
        >>> s = path.sample(x0, x1, jnp.array([0.25, 0.5]))
        >>> s.x_t[:, 0], s.dx_t[:, 0]
        (Array([0.25, 0.5 ], dtype=float32), Array([1., 1.], dtype=float32))
        >>> bool(jnp.allclose(path.velocity_to_target(s.dx_t, s.x_t, s.t), x1))
        True
    """

    scheduler: Scheduler = dataclasses.field(default_factory=CondOT)
    bridge: BridgeNoise | None = None

    def _coefficients(self, t: Time, x: jax.Array) -> SchedulerOutput:
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            t = t.astype(jnp.result_type(x))
        return self.scheduler(broadcast_time(t, x))

    def sample(
        self,
        x0: Float[Array, " batch *dims"],
        x1: Float[Array, " batch *dims"],
        t: Float[ArrayLike, " *batch"],
        z: Float[Array, " batch *dims"] | None = None,
    ) -> PathSample:
        r"""Draws ``x_t`` and ``dx_t`` for given noise ``x0``, data ``x1`` and times ``t``.

        Args:
            x0: noise, shape ``[batch, *dims]``.
            x1: data, the same shape.
            t: a scalar or shape ``[batch]``.
            z: the bridge noise :math:`z \sim N(0, I)`, the same shape; required by a path
                with ``bridge``, refused by one without.

        Returns:
            A :class:`PathSample`.

        Raises:
            ValueError: for non-float or mismatched arrays, or ``z`` given to a path without
                bridge noise or missing for one with it.

        Example:
            >>> import jax.numpy as jnp
            >>> from fmjax.paths import AffinePath, BrownianBridge, CondOT
            >>> path = AffinePath(CondOT(), bridge=BrownianBridge(1.0))
            >>> x0 = jnp.zeros((1, 2)); x1 = jnp.ones((1, 2)); z = jnp.ones((1, 2))
            >>> s = path.sample(x0, x1, jnp.array([0.5]), z)
            >>> s.x_t, s.dx_t  # 0.5 + sqrt(0.25) z, 1 + 0 z
            (Array([[1., 1.]], dtype=float32), Array([[1., 1.]], dtype=float32))
        """
        check_float("x0", x0)
        check_float("x1", x1)
        check_same_shape("x0", x0, "x1", x1)
        if (z is None) != (self.bridge is None):
            raise ValueError(
                f"z, the bridge noise, is needed exactly when the path has bridge noise; got "
                f"bridge={self.bridge!r} and z {'None' if z is None else 'given'}."
            )
        c = self._coefficients(t, x1)
        dtype = jnp.result_type(x0, x1)
        x_t = c.alpha_t * x1 + c.sigma_t * x0
        dx_t = c.d_alpha_t * x1 + c.d_sigma_t * x0
        if z is not None:
            check_float("z", z)
            check_same_shape("z", z, "x1", x1)
            times = broadcast_time(jnp.asarray(t, c.alpha_t.dtype), x1)
            x_t = x_t + self.bridge.gamma(times) * z
            dx_t = dx_t + self.bridge.d_gamma(times) * z
        return PathSample(
            x_t=x_t.astype(dtype), dx_t=dx_t.astype(dtype), t=jnp.asarray(t), x0=x0, x1=x1, z=z
        )

    def velocity_to_score(
        self, velocity: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""The score :math:`\nabla_x \log p_t(x_t)` of the path's marginal, from its velocity.

        For a standard normal source :math:`x_0 \sim N(0, I)` (and no bridge noise), Tweedie's
        formula gives :math:`\nabla \log p_t(x) = -\mathbb E[x_0 \mid x_t = x] / \sigma_t`,
        and the velocity is linear in that expectation (:meth:`velocity_to_epsilon`), so

        .. math::

            \nabla \log p_t(x) = \frac{\dot\alpha_t x - \alpha_t u(x, t)}
                {\sigma_t\,(\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)} .

        Divides by :math:`\sigma_t` (zero at ``t = 1`` unless ``sigma_min > 0``). For
        :class:`CondOT` this is :math:`(t\,u - x) / (1 - t)`.

        Example:
            >>> import jax.numpy as jnp
            >>> from fmjax.paths import AffinePath, CondOT
            >>> x = jnp.array([[2.0]])  # N(0, I) data: u(x, t) = (2t - 1) x / (t^2 + (1-t)^2)
            >>> t = jnp.array([0.75]); u = (2 * 0.75 - 1) * x / (0.75**2 + 0.25**2)
            >>> AffinePath(CondOT()).velocity_to_score(u, x, t)  # the score of N(0, 5/8): -x/(5/8)
            Array([[-3.2]], dtype=float32)
        """
        c = self._coefficients(t, x_t)
        det = c.sigma_t * (c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t)
        return self._linear(c.d_alpha_t / det, -c.alpha_t / det, velocity, x_t)

    def _linear(self, a, b, u, x_t):
        check_same_shape("prediction", u, "x_t", x_t)
        return (a * x_t + b * u).astype(jnp.result_type(u, x_t))

    def to_velocity(
        self, prediction: str, output: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        """The velocity a network's ``output`` stands for, whatever it predicts.

        Args:
            prediction: one of :data:`PREDICTIONS`: ``"velocity"`` (returned as is),
                ``"target"`` (a data prediction, through :meth:`target_to_velocity`) or
                ``"epsilon"`` (a noise prediction, through :meth:`epsilon_to_velocity`).
            output: the network's output, shaped like ``x_t``.
            x_t: the point on the path.
            t: a scalar or shape ``[batch]``.

        Example:
            >>> import jax.numpy as jnp
            >>> from fmjax.paths import AffinePath, CondOT
            >>> path = AffinePath(CondOT())
            >>> x_t = jnp.full((1, 2), 0.5)
            >>> path.to_velocity("target", jnp.ones((1, 2)), x_t, jnp.array([0.5]))
            Array([[1., 1.]], dtype=float32)
        """
        check_choice("prediction", prediction, PREDICTIONS)
        if prediction == "target":
            return self.target_to_velocity(output, x_t, t)
        if prediction == "epsilon":
            return self.epsilon_to_velocity(output, x_t, t)
        return output

    def target_to_velocity(
        self, x1_pred: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""Velocity from a data prediction: :math:`\frac{\dot\sigma}{\sigma} x_t + (\dot\alpha - \frac{\dot\sigma\alpha}{\sigma}) \hat x_1`."""
        c = self._coefficients(t, x_t)
        a = c.d_sigma_t / c.sigma_t
        return self._linear(a, c.d_alpha_t - a * c.alpha_t, x1_pred, x_t)

    def epsilon_to_velocity(
        self, eps_pred: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""Velocity from a noise prediction: :math:`\frac{\dot\alpha}{\alpha} x_t + (\dot\sigma - \frac{\dot\alpha\sigma}{\alpha}) \hat x_0`."""
        c = self._coefficients(t, x_t)
        a = c.d_alpha_t / c.alpha_t
        return self._linear(a, c.d_sigma_t - a * c.sigma_t, eps_pred, x_t)

    def velocity_to_target(
        self, velocity: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""Data prediction from a velocity: :math:`(\dot\sigma x_t - \sigma v) / (\alpha\dot\sigma - \sigma\dot\alpha)`."""
        c = self._coefficients(t, x_t)
        det = c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t
        return self._linear(c.d_sigma_t / det, -c.sigma_t / det, velocity, x_t)

    def velocity_to_epsilon(
        self, velocity: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""Noise prediction from a velocity: :math:`(\alpha v - \dot\alpha x_t) / (\alpha\dot\sigma - \sigma\dot\alpha)`."""
        c = self._coefficients(t, x_t)
        det = c.alpha_t * c.d_sigma_t - c.sigma_t * c.d_alpha_t
        return self._linear(-c.d_alpha_t / det, c.alpha_t / det, velocity, x_t)

    def epsilon_to_target(
        self, eps_pred: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""Data prediction from a noise prediction: :math:`(x_t - \sigma \hat x_0) / \alpha`."""
        c = self._coefficients(t, x_t)
        return self._linear(1.0 / c.alpha_t, -c.sigma_t / c.alpha_t, eps_pred, x_t)

    def target_to_epsilon(
        self, x1_pred: Batch, x_t: Batch, t: Float[ArrayLike, " *batch"]
    ) -> Batch:
        r"""Noise prediction from a data prediction: :math:`(x_t - \alpha \hat x_1) / \sigma`."""
        c = self._coefficients(t, x_t)
        return self._linear(1.0 / c.sigma_t, -c.alpha_t / c.sigma_t, x1_pred, x_t)


SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "condot": CondOT,
    "cosine": Cosine,
    "linear_vp": LinearVP,
    "vp": VP,
    "polynomial": Polynomial,
}
"""The named schedulers, name -> constructor (called with the scheduler's own keyword fields,
e.g. ``SCHEDULERS["polynomial"](n=2)``); what ``config.path.scheduler`` may name."""

BRIDGE_NOISES: dict[str, Callable[..., BridgeNoise]] = {
    "constant": ConstantBridge,
    "brownian": BrownianBridge,
}
"""The named bridge noises, name -> constructor (called with ``sigma``); what
``config.path.bridge_noise`` may name besides ``"none"``."""
