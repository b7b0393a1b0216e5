"""Weight initialisation of the peers' PyTorch networks, which fmjax's networks start from."""

import flax.linen as nn

__all__ = ["torch_kernel_init"]

torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
r"""PyTorch's default initialisation of convolution and linear weights,
:math:`U(-1/\sqrt{\mathrm{fan\_in}}, 1/\sqrt{\mathrm{fan\_in}})`, i.e. variance
:math:`1 / (3\, \mathrm{fan\_in})`: how the U-Nets of Meta's ``flow_matching`` and of torchcfm
start."""
