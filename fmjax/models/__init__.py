"""Networks for fmjax (need Flax: ``pip install fmjax[train]``); the core never imports this.

:class:`UNet` is a guided-diffusion U-Net whose ``apply`` is directly an ``apply_fn`` of
:func:`fmjax.loss.cfm_loss`; the presets reproduce the CIFAR-10 networks of Meta's
``flow_matching`` example and of torchcfm, plus small models for digits and tests.

Modules: ``unet`` (the architecture and its presets), and the layers it is built from:
``conv`` (convolutions), ``group_norm``, ``attention``, ``dropout`` (feature and label
dropout) and ``initializers``.
"""

from fmjax.models.attention import ATTENTION_IMPLEMENTATIONS, check_attention
from fmjax.models.conv import (
    conv_general_dilated,
    upsample_nearest,
    upsampled_conv_general_dilated,
)
from fmjax.models.dropout import drop_labels
from fmjax.models.group_norm import GROUP_NORM_IMPLEMENTATIONS
from fmjax.models.unet import (
    UNet,
    UNetCIFAR10Meta,
    UNetCIFAR10TorchCFM,
    UNetDigits,
    UNetTiny,
    UNetTinyConditional,
    param_count,
    sinusoidal_embedding,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "GROUP_NORM_IMPLEMENTATIONS",
    "UNet",
    "UNetCIFAR10Meta",
    "UNetCIFAR10TorchCFM",
    "UNetDigits",
    "UNetTiny",
    "UNetTinyConditional",
    "check_attention",
    "conv_general_dilated",
    "drop_labels",
    "param_count",
    "sinusoidal_embedding",
    "upsample_nearest",
    "upsampled_conv_general_dilated",
]

PRESETS = {
    "unet_cifar10_meta": UNetCIFAR10Meta,
    "unet_cifar10_torchcfm": UNetCIFAR10TorchCFM,
    "unet_digits": UNetDigits,
    "unet_tiny": UNetTiny,
}
"""Model constructors by the name ``config.model.name`` uses; each takes the preset's fields as
keyword overrides (e.g. ``num_classes=10``, ``dtype=jnp.bfloat16``)."""
