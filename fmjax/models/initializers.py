"""Weight initialisation of the peers' PyTorch networks, which fmjax's networks start from."""

import math
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "INITIALIZATIONS",
    "bias_init",
    "embedding_init",
    "torch_kernel_init",
]

INITIALIZATIONS = ("fmjax", "torch")
"""The values of :attr:`fmjax.models.UNet.init`: ``"fmjax"`` starts biases at zero and
embeddings at Flax's default (normal, std ``1/sqrt(features)``); ``"torch"`` as PyTorch's
``nn.Conv2d``/``nn.Linear``/``nn.Embedding`` do (biases :math:`U(\\pm 1/\\sqrt{\\mathrm{fan\\_in}})`,
embeddings :math:`N(0, 1)`). Kernels start as PyTorch's either way (:data:`torch_kernel_init`)."""

torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
r"""PyTorch's default initialisation of convolution and linear weights,
:math:`U(-1/\sqrt{\mathrm{fan\_in}}, 1/\sqrt{\mathrm{fan\_in}})`, i.e. variance
:math:`1 / (3\, \mathrm{fan\_in})`: how the U-Nets of Meta's ``flow_matching`` and of torchcfm
start."""


def _check(init: str) -> None:
    if init not in INITIALIZATIONS:
        raise ValueError(f"init={init!r} is not valid; expected one of {list(INITIALIZATIONS)}.")


def bias_init(init: str, fan_in: int) -> Callable:
    r"""The initialiser of the bias of a layer whose weight has ``fan_in`` inputs per output
    (``in_channels * kernel_height * kernel_width`` for a convolution): zeros for ``"fmjax"``,
    PyTorch's :math:`U(-1/\sqrt{\mathrm{fan\_in}}, 1/\sqrt{\mathrm{fan\_in}})` for ``"torch"``.

    Example:
        >>> import jax
        >>> from fmjax.models import bias_init
        >>> b = bias_init("torch", 4)(jax.random.key(0), (1000,))
        >>> bool(abs(b).max() <= 0.5), bool(abs(b).max() > 0.45)
        (True, True)
        >>> float(bias_init("fmjax", 4)(jax.random.key(0), (3,)).sum())
        0.0
    """
    _check(init)
    if init == "fmjax":
        return nn.initializers.zeros
    bound = 1.0 / math.sqrt(fan_in)

    def uniform(key, shape, dtype=jnp.float32):
        return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound

    return uniform


def embedding_init(init: str) -> Callable:
    """The initialiser of an embedding table ``[rows, features]``: Flax's default (normal,
    std ``1/sqrt(features)``) for ``"fmjax"``, PyTorch's ``nn.Embedding`` (:math:`N(0, 1)`)
    for ``"torch"``.

    Example:
        >>> import jax
        >>> from fmjax.models import embedding_init
        >>> table = embedding_init("torch")(jax.random.key(0), (100, 512))
        >>> round(float(table.std()), 1)
        1.0
    """
    _check(init)
    if init == "fmjax":
        return nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    return nn.initializers.normal(1.0)
