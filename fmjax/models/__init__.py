"""Networks for fmjax (need Flax: ``pip install fmjax[train]``); the core never imports this.

:class:`UNet` is a guided-diffusion U-Net whose ``apply`` is directly an ``apply_fn`` of
:func:`fmjax.loss.cfm_loss`; the presets reproduce the CIFAR-10 networks of Meta's
``flow_matching`` example and of torchcfm, plus small models for digits and tests.
:class:`DiT` is the diffusion transformer of DiT and SiT, called the same way, with SiT's
presets (``sit_s_2`` ... ``sit_xl_8``) and small ones. :class:`AutoencoderKL` is the Stable
Diffusion VAE, whose latent space latent flow models learn in (:data:`VAE_PRESETS`).

Modules: ``unet`` (the architecture and its presets), ``dit`` (the transformer and its
presets), ``vae`` (the autoencoder and its presets), and the layers they are built from:
``conv`` (convolutions), ``group_norm``, ``attention``, ``dropout`` (feature and label
dropout), ``embeddings`` (time and label) and ``initializers``; ``torch_params`` maps the
peers' PyTorch state dicts to these networks' parameters and back (``dit_params``, SiT's and
DiT's layout; ``vae_params``, diffusers' VAE layout and its safetensors files), and
``param_files`` reads their checkpoints and keeps converted parameters.
"""

import functools
from collections.abc import Callable

import flax.linen as nn

from fmjax.models.attention import ATTENTION_IMPLEMENTATIONS, check_attention
from fmjax.models.conv import (
    conv_general_dilated,
    upsample_nearest,
    upsampled_conv_general_dilated,
)
from fmjax.models.dit import (
    DIT_PRESETS,
    DiT,
    DiTDigits,
    DiTTiny,
    SiTB2,
    SiTL2,
    SiTS2,
    SiTXL2,
    sincos_position_embedding,
)
from fmjax.models.dropout import drop_labels
from fmjax.models.embeddings import LabelEmbedding, sinusoidal_embedding
from fmjax.models.group_norm import GROUP_NORM_IMPLEMENTATIONS
from fmjax.models.initializers import INITIALIZATIONS, bias_init, embedding_init
from fmjax.models.param_files import (
    TORCH_SOURCES,
    TORCH_WEIGHTS,
    load_params,
    load_torch_checkpoint,
    save_params,
)
from fmjax.models.torch_params import PEERS, params_from_torch, params_to_torch
from fmjax.models.unet import (
    UNet,
    UNetCIFAR10Meta,
    UNetCIFAR10TorchCFM,
    UNetDigits,
    UNetTiny,
    UNetTinyConditional,
    param_count,
)
from fmjax.models.vae import (
    SD_VAE_SCALING_FACTOR,
    SDVAE,
    VAE_PRESETS,
    AutoencoderKL,
    VAETiny,
)
from fmjax.models.vae_params import load_vae_safetensors

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DIT_PRESETS",
    "GROUP_NORM_IMPLEMENTATIONS",
    "INITIALIZATIONS",
    "PEERS",
    "PRESETS",
    "SDVAE",
    "SD_VAE_SCALING_FACTOR",
    "TORCH_SOURCES",
    "TORCH_WEIGHTS",
    "VAE_PRESETS",
    "AutoencoderKL",
    "DiT",
    "DiTDigits",
    "DiTTiny",
    "LabelEmbedding",
    "SiTB2",
    "SiTL2",
    "SiTS2",
    "SiTXL2",
    "UNet",
    "UNetCIFAR10Meta",
    "UNetCIFAR10TorchCFM",
    "UNetDigits",
    "UNetTiny",
    "UNetTinyConditional",
    "VAETiny",
    "bias_init",
    "check_attention",
    "conv_general_dilated",
    "drop_labels",
    "embedding_init",
    "load_params",
    "load_torch_checkpoint",
    "load_vae_safetensors",
    "param_count",
    "params_from_torch",
    "params_to_torch",
    "save_params",
    "sincos_position_embedding",
    "sinusoidal_embedding",
    "upsample_nearest",
    "upsampled_conv_general_dilated",
]


def _preset(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``constructor`` that also takes ``init`` (``config.model.init``) for the U-Net's
    ``initialization``: a field named ``init`` would hide Flax's ``Module.init``."""

    @functools.wraps(constructor)
    def build(*, init: str | None = None, **fields) -> nn.Module:
        if init is not None:
            fields["initialization"] = init
        return constructor(**fields)

    return build


PRESETS = {
    "unet_cifar10_meta": _preset(UNetCIFAR10Meta),
    "unet_cifar10_torchcfm": _preset(UNetCIFAR10TorchCFM),
    "unet_digits": _preset(UNetDigits),
    "unet_tiny": _preset(UNetTiny),
    **DIT_PRESETS,
}
"""Model constructors by the name ``config.model.name`` uses; each takes the preset's fields as
keyword overrides (e.g. ``num_classes=10``, ``dtype=jnp.bfloat16``), and a U-Net's ``init``
(``config.model.init``, one of :data:`INITIALIZATIONS`) for its ``initialization``. The
transformers (:data:`DIT_PRESETS`: ``sit_{s,b,l,xl}_{2,4,8}``, ``dit_digits``, ``dit_tiny``)
start as SiT's networks do and take no ``init``. The autoencoders, which are not flow models,
are :data:`VAE_PRESETS`.

Example:
    >>> from fmjax.models import PRESETS
    >>> PRESETS["unet_tiny"](init="torch").initialization
    'torch'
"""
