r"""The Stable Diffusion VAE in Flax linen: diffusers' ``AutoencoderKL``, layer for layer.

Latent flow models (SiT, REPA, LightningDiT, MeanFlow on ImageNet 256) learn in the latent space
of the KL-regularised autoencoder of Rombach et al., released as ``stabilityai/sd-vae-ft-ema``
and ``-mse``. :class:`AutoencoderKL` computes what diffusers' ``AutoencoderKL`` computes:

- the encoder: a 3x3 convolution to ``block_out_channels[0]``, then per level
  ``layers_per_block`` residual blocks and (but for the last level) a downsampling, a
  stride-2 3x3 convolution of the image padded by one row below and one column to the right
  (diffusers' ``Downsample2D`` with ``padding=0``); a middle block (residual block,
  attention, residual block); GroupNorm, SiLU and a 3x3 convolution to ``2 * latent_channels``
  moments, and the 1x1 ``quant_conv``;
- the decoder, the mirror image: the 1x1 ``post_quant_conv``, a 3x3 convolution to
  ``block_out_channels[-1]``, the middle block, per level (widest first) ``layers_per_block
  + 1`` residual blocks and (but for the last) a nearest 2x upsampling followed by a 3x3
  convolution; GroupNorm, SiLU and a 3x3 convolution to ``out_channels``;
- a residual block is :math:`x + \mathrm{conv}_2(\mathrm{SiLU}(\mathrm{GN}_2(
  \mathrm{conv}_1(\mathrm{SiLU}(\mathrm{GN}_1(x))))))`, its skip a 1x1 convolution where
  the width changes (``conv_shortcut``);
- the middle attention is one head over all positions,
  :math:`x + W_o\,\mathrm{softmax}(q k^\top / \sqrt{C})\, v` with :math:`q, k, v` dense
  projections of :math:`\mathrm{GN}(x)` (diffusers' ``Attention`` with
  ``_from_deprecated_attn_block``);
- every GroupNorm has ``norm_num_groups`` groups and epsilon :data:`VAE_GROUP_NORM_EPSILON`.

:meth:`AutoencoderKL.encode` returns the posterior's mean and log-variance (clamped to
:data:`LOGVAR_RANGE`, as diffusers' ``DiagonalGaussianDistribution``);
:meth:`AutoencoderKL.decode` maps latents back to images. A diffusion model sees the latents
times :attr:`AutoencoderKL.scaling_factor`, ``z = scaling_factor * (mean + exp(logvar / 2)
* noise)``, and its samples are divided by it before decoding.

Images are NHWC in ``[-1, 1]``; latents NHWC, ``latent_channels`` wide and ``2 **
(len(block_out_channels) - 1)`` times smaller per side (8 for the SD VAE). Parameters are
always float32; ``dtype=jnp.bfloat16`` runs the convolutions, dense layers and attention
products in bfloat16, while GroupNorm statistics and softmaxes stay in float32 and the
outputs are float32.

:mod:`fmjax.models.vae_params` maps diffusers' state dicts and ``.safetensors`` files to
these parameters and back.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax.models.attention import attend
from fmjax.models.conv import conv_general_dilated, upsampled_conv_general_dilated
from fmjax.models.group_norm import GroupNorm
from fmjax.models.initializers import bias_init, torch_kernel_init

__all__ = [
    "LOGVAR_RANGE",
    "SDVAE",
    "SD_VAE_SCALING_FACTOR",
    "VAE_GROUP_NORM_EPSILON",
    "VAE_PRESETS",
    "AutoencoderKL",
    "VAETiny",
]

SD_VAE_SCALING_FACTOR = 0.18215
"""The SD VAE's latent scaling factor (diffusers' ``config.scaling_factor``): scaled latents
have about unit variance on the images it was trained on."""

LOGVAR_RANGE = (-30.0, 20.0)
"""The range :meth:`AutoencoderKL.encode` clamps the log-variance to (diffusers')."""

VAE_GROUP_NORM_EPSILON = 1e-6
"""The epsilon of every GroupNorm of the VAE."""


def _conv(
    x: jax.Array,
    features: int,
    kernel: int,
    dtype: Any,
    name: str,
    *,
    stride: int = 1,
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
    upsample: bool = False,
) -> jax.Array:
    """A convolution of ``x`` (inside a compact module), "same" padding unless ``padding``
    is given; with ``upsample``, of the 2x nearest-upsampled ``x`` (the same parameters,
    computed without the upsampled image). Starts as PyTorch's ``nn.Conv2d`` does."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init,
        bias_init=bias_init("torch", x.shape[-1] * kernel**2),
        conv_general_dilated=upsampled_conv_general_dilated if upsample else conv_general_dilated,
        name=name,
    )(x)


def _dense(x: jax.Array, features: int, dtype: Any, name: str) -> jax.Array:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init,
        bias_init=bias_init("torch", x.shape[-1]),
        name=name,
    )(x)


def _norm(x: jax.Array, groups: int, dtype: Any, name: str) -> jax.Array:
    """GroupNorm (epsilon :data:`VAE_GROUP_NORM_EPSILON`) in float32 (float64 for a float64
    ``dtype``), cast to ``dtype``."""
    wide = jnp.promote_types(dtype, jnp.float32)
    norm = GroupNorm(num_groups=groups, epsilon=VAE_GROUP_NORM_EPSILON, dtype=wide, name=name)
    return norm(x.astype(wide)).astype(dtype)


class _ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding: ``norm1, conv1, norm2, conv2``
    and a 1x1 ``conv_shortcut`` where the width changes."""

    features: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_norm(x, self.groups, self.dtype, "norm1"))
        h = _conv(h, self.features, 3, self.dtype, "conv1")
        h = nn.silu(_norm(h, self.groups, self.dtype, "norm2"))
        h = _conv(h, self.features, 3, self.dtype, "conv2")
        if x.shape[-1] != self.features:
            x = _conv(x, self.features, 1, self.dtype, "conv_shortcut")
        return x + h


class _Attention(nn.Module):
    """The middle block's attention: one head as wide as the feature map, over all its
    positions, with a residual connection."""

    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, height, width, c = x.shape
        h = _norm(x, self.groups, self.dtype, "group_norm").reshape(n, 1, height * width, c)
        q, k, v = (_dense(h, c, self.dtype, name) for name in ("to_q", "to_k", "to_v"))
        out = attend(q, k, v, self.dtype).reshape(n, height, width, c)
        return x + _dense(out, c, self.dtype, "to_out")


def _middle(h: jax.Array, groups: int, dtype: Any) -> jax.Array:
    """diffusers' ``UNetMidBlock2D`` of the VAE (inside a compact module)."""
    features = h.shape[-1]
    h = _ResnetBlock(features, groups, dtype, name="mid_res0")(h)
    h = _Attention(groups, dtype, name="mid_attn")(h)
    return _ResnetBlock(features, groups, dtype, name="mid_res1")(h)


class _Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    moments: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(x, self.block_out_channels[0], 3, self.dtype, "conv_in")
        last = len(self.block_out_channels) - 1
        for level, features in enumerate(self.block_out_channels):
            for i in range(self.layers_per_block):
                h = _ResnetBlock(features, self.groups, self.dtype, name=f"down{level}_res{i}")(h)
            if level < last:
                # diffusers pads by (0, 1) on each axis, then convolves with stride 2: the
                # output grid starts at the first pixel.
                h = _conv(
                    h,
                    features,
                    3,
                    self.dtype,
                    f"down{level}_downsample",
                    stride=2,
                    padding=((0, 1), (0, 1)),
                )
        h = _middle(h, self.groups, self.dtype)
        h = nn.silu(_norm(h, self.groups, self.dtype, "norm_out"))
        return _conv(h, self.moments, 3, self.dtype, "conv_out")


class _Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        widths = tuple(reversed(self.block_out_channels))
        h = _conv(z, widths[0], 3, self.dtype, "conv_in")
        h = _middle(h, self.groups, self.dtype)
        for level, features in enumerate(widths):
            for i in range(self.layers_per_block + 1):
                h = _ResnetBlock(features, self.groups, self.dtype, name=f"up{level}_res{i}")(h)
            if level < len(widths) - 1:
                h = _conv(h, features, 3, self.dtype, f"up{level}_upsample", upsample=True)
        h = nn.silu(_norm(h, self.groups, self.dtype, "norm_out"))
        return _conv(h, self.out_channels, 3, self.dtype, "conv_out")


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (see the module docstring); the defaults are the SD VAE's
    configuration (:data:`SDVAE`).

    ``model.init(key, images)`` creates every parameter (``__call__`` decodes the posterior
    mean); ``model.apply(variables, images, method="encode")`` and ``model.apply(variables,
    latents, method="decode")`` run one half.

    Attributes:
        block_out_channels: the width of each level, finest first; the latents are ``2 **
            (len(block_out_channels) - 1)`` times smaller per side than the images.
        layers_per_block: residual blocks per encoder level (the decoder has one more).
        latent_channels: the channels of the latents.
        out_channels: the channels of the decoded images.
        norm_num_groups: the groups of every GroupNorm; must divide every width.
        scaling_factor: what a diffusion model multiplies the latents by
            (:data:`SD_VAE_SCALING_FACTOR`); not used by the network itself.
        dtype: the dtype of the computation (parameters are float32).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.models import VAETiny
        >>> vae = VAETiny()
        >>> images = jnp.zeros((2, 16, 16, 3))
        >>> variables = vae.init(jax.random.key(0), images)
        >>> mean, logvar = vae.apply(variables, images, method="encode")
        >>> mean.shape, logvar.shape
        ((2, 8, 8, 4), (2, 8, 8, 4))
        >>> vae.apply(variables, mean, method="decode").shape
        (2, 16, 16, 3)
    """

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = SD_VAE_SCALING_FACTOR
    dtype: Any = jnp.float32

    @property
    def downsampling(self) -> int:
        """How many times smaller the latents are per side than the images."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        widths = tuple(self.block_out_channels)
        if (
            not widths
            or self.layers_per_block < 1
            or self.norm_num_groups < 1
            or any(w % self.norm_num_groups for w in widths)
        ):
            raise ValueError(
                f"AutoencoderKL needs at least one level, layers_per_block >= 1 and "
                f"norm_num_groups dividing every width; got block_out_channels={widths}, "
                f"layers_per_block={self.layers_per_block}, "
                f"norm_num_groups={self.norm_num_groups}."
            )
        groups, dtype = self.norm_num_groups, self.dtype
        self.encoder = _Encoder(
            widths, self.layers_per_block, 2 * self.latent_channels, groups, dtype
        )
        self.decoder = _Decoder(widths, self.layers_per_block, self.out_channels, groups, dtype)
        self.quant_conv = nn.Conv(
            2 * self.latent_channels,
            (1, 1),
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_kernel_init,
            bias_init=bias_init("torch", 2 * self.latent_channels),
            conv_general_dilated=conv_general_dilated,
        )
        self.post_quant_conv = nn.Conv(
            self.latent_channels,
            (1, 1),
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_kernel_init,
            bias_init=bias_init("torch", self.latent_channels),
            conv_general_dilated=conv_general_dilated,
        )

    def encode(
        self, images: Float[ArrayLike, "batch height width channels"]
    ) -> tuple[Float[Array, "batch h w latent"], Float[Array, "batch h w latent"]]:
        """The posterior of ``images`` (NHWC in ``[-1, 1]``): its mean and log-variance
        (clamped to :data:`LOGVAR_RANGE`), float32, ``downsampling`` times smaller per side.

        Raises:
            ValueError: for images that are not 4-D or whose height and width
                ``downsampling`` does not divide.
        """
        images = jnp.asarray(images)
        f = self.downsampling
        if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"AutoencoderKL.encode needs NHWC images [batch, height, width, channels] whose "
                f"height and width {f} divides; got shape {images.shape}."
            )
        moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
        moments = moments.astype(jnp.promote_types(self.dtype, jnp.float32))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(
        self, latents: Float[ArrayLike, "batch h w latent"]
    ) -> Float[Array, "batch height width channels"]:
        """The images (NHWC, float32, about ``[-1, 1]``) of unscaled ``latents`` (divide a
        diffusion model's samples by :attr:`scaling_factor` first).

        Raises:
            ValueError: for latents that are not 4-D with ``latent_channels`` channels.
        """
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode needs NHWC latents [batch, h, w, "
                f"{self.latent_channels}]; got shape {latents.shape}."
            )
        images = self.decoder(self.post_quant_conv(latents.astype(self.dtype)))
        return images.astype(jnp.promote_types(self.dtype, jnp.float32))

    def __call__(
        self, images: Float[ArrayLike, "batch height width channels"]
    ) -> Float[Array, "batch height width channels"]:
        """The reconstruction of ``images`` from the posterior mean (``decode(encode(x)[0])``)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


SDVAE = functools.partial(AutoencoderKL)
"""The SD VAE (``stabilityai/sd-vae-ft-ema`` and ``-mse``, trained on 256x256 images):
widths (128, 256, 512, 512), two residual blocks per level, 32 norm groups, 4 latent channels,
8x downsampling, scaling factor 0.18215; 83,653,863 parameters."""

VAETiny = functools.partial(
    AutoencoderKL, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8
)
"""A two-level VAE (widths 16 and 32, 2x downsampling, 8 norm groups) for tests and examples,
with 8x8 or 16x16 images."""

VAE_PRESETS = {"sd_vae": SDVAE, "vae_tiny": VAETiny}
"""The VAE presets by name; each takes its fields as keyword overrides (e.g.
``dtype=jnp.bfloat16``)."""
