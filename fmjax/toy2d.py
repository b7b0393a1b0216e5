"""The 2-D toy distributions: jittable samplers on the plane, and exact log-densities if any.

:data:`TOY_2D` names the three of :mod:`experiments.toy2d` and of torchcfm's examples
(8 Gaussians, moons, checkerboard). Each is a :class:`Toy2D`: a sampler ``sample(key, num)``
and, where one exists in closed form, its exact ``log_prob``, so a trained flow's likelihood
(:func:`fmjax.likelihood.log_likelihood`) can be compared with the truth.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["TOY_2D", "Toy2D", "checkerboard", "eight_gaussians", "moons"]


@dataclasses.dataclass(frozen=True)
class Toy2D:
    """A distribution on the plane: a jittable sampler and its log-density if it has one.

    Attributes:
        sample: ``sample(key, num) -> [num, 2]`` float32 (``num`` static under ``jit``).
        log_prob: ``log_prob(x [n, 2]) -> [n]``, the exact log-density; None when it has
            no closed form.
    """

    sample: Callable[[PRNGKeyArray, int], Float[Array, " num 2"]]
    log_prob: Callable[[Float[Array, " n 2"]], Float[Array, " n"]] | None


def eight_gaussians(radius: float = 5.0, std: float = 0.1**0.25) -> Toy2D:
    r"""Eight equal Gaussians :math:`\mathcal{N}(c_k, \text{std}^2 I)` with centres ``c_k`` at
    angles :math:`k\pi/4` on a circle of ``radius``.

    The defaults are torchcfm's ``sample_8gaussians`` (scale 5 and covariance
    :math:`\sqrt{0.1}\,I`, i.e. ``std`` :math:`= 0.1^{1/4}`), so results compare with it.
    ``log_prob`` is the exact mixture density.

    Example:
        >>> import jax
        >>> from fmjax.toy2d import eight_gaussians
        >>> toy = eight_gaussians()
        >>> x = toy.sample(jax.random.key(0), 5)
        >>> x.shape, toy.log_prob(x).shape
        ((5, 2), (5,))
    """
    angles = np.arange(8) * np.pi / 4
    # NumPy, not JAX: building TOY_2D at import must not start the JAX backend.
    centers = (radius * np.stack([np.cos(angles), np.sin(angles)], -1)).astype(np.float32)

    def sample(key: PRNGKeyArray, num: int) -> Float[Array, " num 2"]:
        component_key, noise_key = jax.random.split(key)
        component = jax.random.randint(component_key, (num,), 0, 8)
        return jnp.asarray(centers)[component] + std * jax.random.normal(noise_key, (num, 2))

    def log_prob(x: Float[Array, " n 2"]) -> Float[Array, " n"]:
        squared = jnp.sum((x[:, None, :] - centers[None, :, :]) ** 2, axis=-1)
        log_normal = -squared / (2 * std**2) - jnp.log(2 * jnp.pi * std**2)
        return jax.nn.logsumexp(log_normal, axis=-1) - jnp.log(8.0)

    return Toy2D(sample, log_prob)


def moons(noise: float = 0.2) -> Toy2D:
    r"""Two interleaved half circles, mapped by :math:`x \mapsto 3x - 1` as torchcfm does.

    A point is, with probability 1/2 each, :math:`(\cos\theta, \sin\theta)` or
    :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)` with :math:`\theta \sim U(0, \pi)`, plus
    Gaussian noise of standard deviation ``noise`` (before the map; scikit-learn's
    ``make_moons`` spaces the angles evenly instead). No closed-form density:
    ``log_prob`` is None.

    Example:
        >>> import jax
        >>> from fmjax.toy2d import moons
        >>> moons().sample(jax.random.key(0), 3).shape
        (3, 2)
    """

    def sample(key: PRNGKeyArray, num: int) -> Float[Array, " num 2"]:
        moon_key, angle_key, noise_key = jax.random.split(key, 3)
        lower = jax.random.bernoulli(moon_key, 0.5, (num,))
        theta = jax.random.uniform(angle_key, (num,), maxval=jnp.pi)
        upper_moon = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
        lower_moon = jnp.stack([1.0 - jnp.cos(theta), 0.5 - jnp.sin(theta)], -1)
        x = jnp.where(lower[:, None], lower_moon, upper_moon)
        return 3.0 * (x + noise * jax.random.normal(noise_key, (num, 2))) - 1.0

    return Toy2D(sample, None)


def checkerboard() -> Toy2D:
    r"""Uniform on the 8 dark squares of a 4x4 board of 2x2 squares covering :math:`[-4, 4)^2`.

    A square :math:`[2i, 2i + 2) \times [2j, 2j + 2)` is dark when :math:`i + j` is even (the
    FFJORD checkerboard). The density is :math:`1/32` on the dark squares and 0 elsewhere, so
    ``log_prob`` is :math:`-\log 32` or :math:`-\infty`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.toy2d import checkerboard
        >>> checkerboard().log_prob(jnp.array([[0.5, 0.5], [0.5, -0.5]])).tolist()
        [-3.465735912322998, -inf]
    """

    def sample(key: PRNGKeyArray, num: int) -> Float[Array, " num 2"]:
        column_key, row_key, offset_key = jax.random.split(key, 3)
        column = jax.random.randint(column_key, (num,), 0, 4)
        # Of the 4 rows, the dark ones in column i are those j with i + j even.
        row = 2 * jax.random.randint(row_key, (num,), 0, 2) + column % 2
        corner = 2.0 * jnp.stack([column, row], -1).astype(jnp.float32) - 4.0
        return corner + 2.0 * jax.random.uniform(offset_key, (num, 2))

    def log_prob(x: Float[Array, " n 2"]) -> Float[Array, " n"]:
        cell = jnp.floor(x / 2.0)
        inside = jnp.all((x >= -4.0) & (x < 4.0), axis=-1)
        dark = jnp.sum(cell, axis=-1) % 2 == 0
        return jnp.where(inside & dark, -math.log(32.0), -jnp.inf)

    return Toy2D(sample, log_prob)


TOY_2D: dict[str, Toy2D] = {
    "8gaussians": eight_gaussians(),
    "moons": moons(),
    "checkerboard": checkerboard(),
}
"""The 2-D toy distributions by name, with their default parameters."""
