r"""A guided-diffusion-style U-Net velocity field in Flax linen, with peer-matching presets.

The architecture is that of Dhariwal & Nichol's guided-diffusion ``UNetModel`` (itself grown
from the DDPM U-Net), which is also the network behind the CIFAR-10 results of Meta's
``flow_matching`` example and of torchcfm:

- a sinusoidal embedding of :math:`t` followed by a two-layer MLP gives the conditioning vector
  :math:`e` (plus a learned class embedding when class-conditional);
- residual blocks ``GroupNorm -> SiLU -> conv -> (+ e) -> GroupNorm -> SiLU -> dropout -> conv``,
  where with scale-shift norm :math:`e` acts as :math:`\mathrm{GN}(h)(1 + s) + b` with
  :math:`(s, b)` a linear function of :math:`e`;
- multi-head self-attention at chosen downsampling factors and in the middle of the network;
- ``num_res_blocks`` blocks per level going down, ``num_res_blocks + 1`` going up, each fed the
  matching skip activation; resampling by strided convolution / nearest upsampling (+ conv), by
  average pooling / nearest upsampling, or inside residual blocks.

The last convolution of every residual branch, of every attention block and of the output is
initialised to zero, so a freshly initialised network is the identity on its residual paths and
outputs exactly zero.

Images are NHWC: ``x_t`` is ``[batch, height, width, channels]`` and ``t`` is ``[batch]`` (or a
scalar) in ``[0, 1]`` with noise at ``t = 0`` and data at ``t = 1``. Parameters are always
float32; ``dtype=jnp.bfloat16`` runs convolutions, dense layers and attention products in
bfloat16 while group norms, softmaxes and the time embedding stay in float32.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from fmjax.models.attention import Attention, check_attention
from fmjax.models.conv import (
    conv_general_dilated,
    upsample_nearest,
    upsampled_conv_general_dilated,
)
from fmjax.models.dropout import dropout
from fmjax.models.embeddings import (
    LabelEmbedding,
    class_labels,
    network_inputs,
    sinusoidal_embedding,
)
from fmjax.models.group_norm import GROUP_NORM_IMPLEMENTATIONS, group_norm
from fmjax.models.initializers import bias_init, torch_kernel_init

__all__ = [
    "UNet",
    "UNetCIFAR10Meta",
    "UNetCIFAR10TorchCFM",
    "UNetDigits",
    "UNetTiny",
    "UNetTinyConditional",
    "param_count",
]


def _conv(
    features: int,
    kernel: int,
    dtype: Any,
    name: str,
    *,
    zero: bool = False,
    stride: int = 1,
    upsample: bool = False,
    init: str = "fmjax",
    in_channels: int = 1,
):
    """A convolution of "same" padding; with ``upsample``, of the 2x nearest-upsampled input
    (the same parameters, computed without the upsampled image). ``init`` and
    ``in_channels`` set the bias's initialisation (a zero layer's bias is zero either way, as
    guided-diffusion's ``zero_module`` makes it)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        # Explicit symmetric padding: "SAME" pads a stride-2 conv only on the far side, which
        # would shift the sampling grid by half a pixel relative to the peers' models.
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros if zero else torch_kernel_init,
        bias_init=nn.initializers.zeros if zero else bias_init(init, in_channels * kernel**2),
        # lax's forward pass and input gradient; on CPU a kernel gradient by per-tap GEMMs.
        conv_general_dilated=upsampled_conv_general_dilated if upsample else conv_general_dilated,
        name=name,
    )


def _dense(features: int, dtype: Any, name: str, init: str, in_features: int) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init,
        bias_init=bias_init(init, in_features),
        name=name,
    )


def _avg_pool(h: jax.Array) -> jax.Array:
    return nn.avg_pool(h, (2, 2), strides=(2, 2))


class _ResBlock(nn.Module):
    """A residual block conditioned on the embedding, optionally resampling (up or down)."""

    out_channels: int
    dropout: float
    scale_shift_norm: bool
    num_groups: int
    dtype: Any
    resample: str | None = None  # None, "up" or "down"
    group_norm: str = "fmjax"
    initialization: str = "fmjax"

    def _norm(self, h: jax.Array, name: str) -> jax.Array:
        return group_norm(h, self.num_groups, self.dtype, name, self.group_norm)

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(self._norm(x, "norm_in"))
        up = self.resample == "up"
        if up:  # conv_in upsamples h itself
            x = upsample_nearest(x)
        elif self.resample == "down":
            h, x = _avg_pool(h), _avg_pool(x)
        init, c_in = self.initialization, x.shape[-1]
        h = _conv(
            self.out_channels, 3, self.dtype, "conv_in", upsample=up, init=init, in_channels=c_in
        )(h)

        width = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
        e = _dense(width, self.dtype, "emb_proj", init, emb.shape[-1])(nn.silu(emb))
        e = e[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self._norm(h, "norm_out") * (1 + scale) + shift
        else:
            h = self._norm(h + e, "norm_out")
        h = dropout(self, nn.silu(h), self.dropout, train)
        h = _conv(self.out_channels, 3, self.dtype, "conv_out", zero=True)(h)

        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "skip", init=init, in_channels=c_in)(x)
        return x + h


class UNet(nn.Module):
    r"""A guided-diffusion U-Net: ``(x_t, t, y) -> velocity`` (or any prediction) shaped like ``x_t``.

    Call it as ``model.apply(params, x_t, t, y=labels, train=..., rngs={"dropout": key})``,
    which is directly an ``apply_fn`` of :func:`fmjax.loss.cfm_loss` (pass ``train`` and
    ``rngs`` in ``model_kwargs``, labels as ``example_kwargs={"y": labels}``).

    The time embedding is :func:`sinusoidal_embedding` of ``t`` with ``scale=time_scale``
    (width ``model_channels``), then ``Dense(4 m) -> SiLU -> Dense(4 m)`` with
    ``m = model_channels``. A class-conditional model (``num_classes`` set) adds a learned
    embedding of the label, with one extra row for the null label ``num_classes`` that stands
    for "no class" in classifier-free guidance (see :func:`drop_labels`); ``y=None`` means the
    null label for every example.

    Labels are checked when concrete: a label outside ``[0, num_classes]`` raises. Under
    ``jit`` labels are traced and cannot be checked; there an out-of-range label makes that
    example's output NaN instead (never a silently wrong class).

    Attributes:
        model_channels: the base width :math:`m`; level ``i`` has ``channel_mult[i] * m``
            channels.
        channel_mult: per-level multipliers; the image is downsampled by 2 between levels, so
            height and width must be divisible by ``2 ** (len(channel_mult) - 1)``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_ds: downsampling factors at which self-attention follows each residual block:
            ``2`` is the 16x16 level of a 32x32 image (guided-diffusion's
            ``attention_resolutions``). The middle of the network always has attention.
        num_heads: attention heads, used when ``head_channels`` is None.
        head_channels: if set, the width of every head (the head count is then
            ``channels // head_channels`` at each level).
        dropout: dropout rate inside residual blocks, active when ``train=True``.
        scale_shift_norm: condition by scale and shift of the normalised features (FiLM)
            instead of adding the embedding before the norm.
        resblock_updown: resample inside residual blocks instead of ``conv_resample`` layers.
        conv_resample: with ``resblock_updown=False``, resample by a 3x3 stride-2 convolution /
            nearest upsampling then a 3x3 convolution (True) or by 2x2 average pooling /
            nearest upsampling alone (False).
        num_classes: the number of classes of a class-conditional model, or None.
        out_channels: output channels; None means those of the input.
        time_scale: the ``scale`` of :func:`sinusoidal_embedding`.
        num_groups: GroupNorm groups; must divide every channel count.
        dtype: the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and the
            output has the dtype of ``x_t``.
        attention: how attention is computed, one of :data:`ATTENTION_IMPLEMENTATIONS`
            (the parameters and the function are the same): ``"xla"``, fmjax's own
            formula, compiled by XLA on every backend and differentiable in both modes;
            ``"cudnn"``, cuDNN's fused flash-attention kernel through
            ``jax.nn.dot_product_attention``, which never stores the ``positions x
            positions`` weights (NVIDIA GPUs from Ampere on, ``dtype`` bfloat16 or float16,
            heads up to 128 channels wide, 256 on Hopper: the Meta preset's single head is
            256 wide). cuDNN's kernel has a reverse-mode rule only: forward mode
            (``jax.jvp``, ``jax.linearize``, the exact divergence of
            :func:`fmjax.likelihood.log_likelihood`) needs ``"xla"``. A model trained with
            either can be applied with the other.
        group_norm: how GroupNorm is computed, one of :data:`GROUP_NORM_IMPLEMENTATIONS`
            (the parameters and the function are the same, in float32 either way):
            ``"fmjax"``, :class:`fmjax.models.group_norm.GroupNorm`: statistics from
            per-channel sums and a custom JVP whose gradient reduces the cotangent twice per
            norm (written for XLA:CPU, the faster form there); ``"flax"``,
            ``flax.linen.GroupNorm`` differentiated by JAX, which XLA:GPU and TPU may fuse
            better with its neighbours.
        initialization: how biases and the label embedding start (``config.model.init``), one of
            :data:`fmjax.models.initializers.INITIALIZATIONS` (the parameter tree is the
            same): ``"fmjax"``, biases at zero and the label embedding at Flax's default;
            ``"torch"``, as the peers' PyTorch networks start (biases
            :math:`U(\pm 1/\sqrt{\mathrm{fan\_in}})`, embeddings :math:`N(0, 1)`), so that a run
            starts from the same distribution of networks as the peer's script. Kernels start
            as PyTorch's either way; the layers guided-diffusion zeroes start at zero either way.
        frozen_null_label: keep the null label's embedding row at zero with a zero gradient, as
            Meta's ``nn.Embedding(num_classes + 1, ..., padding_idx=num_classes)`` does (the
            Meta preset sets it); False trains that row like the others.
        mean_flow: a mean-flow network (:mod:`fmjax.meanflow`): ``__call__`` takes the end
            ``t_end`` of the interval, and the length ``t_end - t`` is embedded like ``t`` (a
            second two-layer MLP, ``interval_mlp_*``) and added to the time embedding, as
            MeanFlow does. Off, the parameters are those of the plain network.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.models import UNetTiny
        >>> model = UNetTiny(num_classes=10)
        >>> x_t, t, y = jnp.ones((2, 8, 8, 1)), jnp.array([0.1, 0.9]), jnp.array([3, 10])
        >>> # Shapes only, to keep this example instant on a CPU: use model.init for values.
        >>> params = jax.eval_shape(model.init, jax.random.key(0), x_t, t)
        >>> jax.eval_shape(model.apply, params, x_t, t, y).shape
        (2, 8, 8, 1)
    """

    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_ds: Sequence[int] = (2,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.0
    scale_shift_norm: bool = True
    resblock_updown: bool = False
    conv_resample: bool = True
    num_classes: int | None = None
    out_channels: int | None = None
    time_scale: float = 1000.0
    num_groups: int = 32
    dtype: Any = jnp.float32
    attention: str = "xla"
    group_norm: str = "fmjax"
    initialization: str = "fmjax"
    frozen_null_label: bool = False
    mean_flow: bool = False

    def _heads(self, channels: int) -> int:
        if self.head_channels is None:
            heads = self.num_heads
        else:
            heads = channels // self.head_channels
        if heads < 1 or channels % heads:
            raise ValueError(
                f"Attention at {channels} channels cannot be split into heads: num_heads="
                f"{self.num_heads}, head_channels={self.head_channels}."
            )
        return heads

    def check_image_shape(self, image_shape: Sequence[int]) -> None:
        """Raises ``ValueError`` unless this network takes images of shape ``(height, width,
        channels)``: what :meth:`__call__` checks at trace time, without tracing anything.

        Training calls it (through :func:`fmjax.configs.validate_image_shape`) before it
        compiles, so a config whose image size the levels cannot halve fails in milliseconds.

        Example:
            >>> from fmjax.models import UNetTiny
            >>> UNetTiny().check_image_shape((8, 8, 1))  # two levels: sides divisible by 2
            >>> UNetTiny().check_image_shape((9, 8, 1))
            Traceback (most recent call last):
            ...
            ValueError: Image size 9x8 cannot be downsampled by channel_mult=(1, 2): ...
        """
        factor = 2 ** (len(self.channel_mult) - 1)
        height, width = image_shape[0], image_shape[1]
        if height % factor or width % factor:
            raise ValueError(
                f"Image size {height}x{width} cannot be downsampled by channel_mult="
                f"{tuple(self.channel_mult)}: height and width must be divisible by "
                f"2**(len(channel_mult) - 1) = {factor}."
            )
        for c in {self.model_channels * m for m in self.channel_mult}:
            if c % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every channel count; "
                    f"got {c} channels (model_channels={self.model_channels}, "
                    f"channel_mult={tuple(self.channel_mult)})."
                )
        for ds in self.attention_ds:
            if ds not in {2**level for level in range(len(self.channel_mult))}:
                raise ValueError(
                    f"attention_ds={tuple(self.attention_ds)} contains {ds}, which is not a "
                    f"downsampling factor of channel_mult={tuple(self.channel_mult)} "
                    f"(1, 2, ..., {factor})."
                )

    @nn.compact
    def __call__(
        self,
        x_t: Float[Array, " batch height width channels"],
        t: Float[ArrayLike, " *batch"],
        y: Int[ArrayLike, " batch"] | None = None,
        *,
        t_end: Float[ArrayLike, " *batch"] | None = None,
        train: bool = False,
    ) -> Float[Array, " batch height width channels"]:
        """The network's output for images ``x_t`` at times ``t``, shaped like ``x_t``.

        Args:
            x_t: images, ``[batch, height, width, channels]``, float.
            t: times in ``[0, 1]``, shape ``[batch]`` or a scalar for the whole batch.
            y: class labels ``[batch]`` in ``[0, num_classes]`` (``num_classes`` is the null
                label), or None (every example unconditional). Only for a conditional model.
            t_end: the end of the interval of a mean-flow network (``mean_flow=True``), shape
                ``[batch]`` or a scalar; None means ``t`` (the instantaneous velocity).
            train: enables dropout; then pass ``rngs={"dropout": key}`` to ``apply``.

        Raises:
            ValueError: at trace time, for an input that is not a batch of float images, ``t``
                or ``t_end`` of the wrong shape, ``t_end`` given to a plain network, an image
                size that ``channel_mult`` cannot downsample, channel counts not divisible by
                ``num_groups`` or the heads, attention at a factor the network does not have, a
                dropout rate outside ``[0, 1)``, labels given to an unconditional model, labels
                of the wrong shape or dtype, or concrete labels out of range.
        """
        x_t, t, t_end = network_inputs(x_t, t, t_end, mean_flow=self.mean_flow, model="UNet")
        batch = x_t.shape[0]
        self.check_image_shape(x_t.shape[1:])
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is not valid; expected a rate in [0, 1).")
        check_attention(self.attention, self.dtype)
        if self.group_norm not in GROUP_NORM_IMPLEMENTATIONS:
            raise ValueError(
                f"group_norm={self.group_norm!r} is not valid; expected one of "
                f"{list(GROUP_NORM_IMPLEMENTATIONS)}."
            )
        labels = class_labels(y, self.num_classes, batch, "UNet")
        dtype, groups = self.dtype, self.num_groups
        block = functools.partial(
            _ResBlock,
            dropout=self.dropout,
            scale_shift_norm=self.scale_shift_norm,
            num_groups=groups,
            dtype=dtype,
            group_norm=self.group_norm,
            initialization=self.initialization,
        )
        attention = functools.partial(
            Attention,
            num_groups=groups,
            dtype=dtype,
            implementation=self.attention,
            group_norm=self.group_norm,
            initialization=self.initialization,
        )

        init, m = self.initialization, self.model_channels
        emb_dim = 4 * m
        emb = sinusoidal_embedding(jnp.broadcast_to(t, (batch,)), m, scale=self.time_scale)
        emb = _dense(emb_dim, dtype, "time_mlp_0", init, m)(emb.astype(dtype))
        emb = _dense(emb_dim, dtype, "time_mlp_1", init, emb_dim)(nn.silu(emb))
        if self.mean_flow:
            # MeanFlow's second time: the interval's length, embedded like t and added.
            span = jnp.broadcast_to(t_end - t, (batch,))
            extra = sinusoidal_embedding(span, m, scale=self.time_scale)
            extra = _dense(emb_dim, dtype, "interval_mlp_0", init, m)(extra.astype(dtype))
            emb = emb + _dense(emb_dim, dtype, "interval_mlp_1", init, emb_dim)(nn.silu(extra))
        if labels is not None:
            table = LabelEmbedding(
                self.num_classes,
                emb_dim,
                dtype,
                init,
                self.frozen_null_label,
                name="label_embedding",
            )
            valid = (labels >= 0) & (labels <= self.num_classes)
            label_emb = table(jnp.clip(labels, 0, self.num_classes))
            emb = emb + jnp.where(valid[:, None], label_emb, jnp.nan).astype(dtype)

        levels = len(self.channel_mult)
        h = _conv(
            m * self.channel_mult[0], 3, dtype, "conv_in", init=init, in_channels=x_t.shape[-1]
        )(x_t.astype(dtype))
        skips = [h]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            for i in range(self.num_res_blocks):
                h = block(channels, name=f"down{level}_res{i}")(h, emb, train)
                if ds in self.attention_ds:
                    h = attention(self._heads(channels), name=f"down{level}_attn{i}")(h)
                skips.append(h)
            if level < levels - 1:
                name = f"down{level}_resample"
                if self.resblock_updown:
                    h = block(channels, resample="down", name=name)(h, emb, train)
                elif self.conv_resample:
                    h = _conv(channels, 3, dtype, name, stride=2, init=init, in_channels=channels)(
                        h
                    )
                else:
                    h = _avg_pool(h)
                skips.append(h)
                ds *= 2

        h = block(h.shape[-1], name="mid_res0")(h, emb, train)
        h = attention(self._heads(h.shape[-1]), name="mid_attn")(h)
        h = block(h.shape[-1], name="mid_res1")(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            channels = self.model_channels * mult
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(channels, name=f"up{level}_res{i}")(h, emb, train)
                if ds in self.attention_ds:
                    h = attention(self._heads(channels), name=f"up{level}_attn{i}")(h)
            if level > 0:
                name = f"up{level}_resample"
                if self.resblock_updown:
                    h = block(channels, resample="up", name=name)(h, emb, train)
                elif self.conv_resample:
                    h = _conv(
                        channels, 3, dtype, name, upsample=True, init=init, in_channels=channels
                    )(h)
                else:
                    h = upsample_nearest(h)
                ds //= 2

        h = nn.silu(group_norm(h, groups, dtype, "norm_out", self.group_norm))
        out_channels = x_t.shape[-1] if self.out_channels is None else self.out_channels
        h = _conv(out_channels, 3, dtype, "conv_out", zero=True)(h)
        return h.astype(x_t.dtype)


def param_count(model: nn.Module, image_shape: tuple[int, int, int], *, batch_size: int = 1) -> int:
    """The number of parameters of ``model`` on images of shape ``(height, width, channels)``.

    Uses ``jax.eval_shape``, so nothing is allocated or computed: cheap even for large models.

    Example:
        >>> from fmjax.models import UNetTiny
        >>> param_count(UNetTiny(), (8, 8, 1))
        48401
    """
    x = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


UNetCIFAR10Meta = functools.partial(
    UNet,
    model_channels=128,
    channel_mult=(2, 2, 2),
    num_res_blocks=4,
    attention_ds=(2,),
    num_heads=1,
    dropout=0.3,
    scale_shift_norm=True,
    resblock_updown=False,
    conv_resample=False,
    time_scale=1.0,
    frozen_null_label=True,
)
"""Meta ``flow_matching``'s CIFAR-10 U-Net (FID 2.07): 128 channels, multipliers (2, 2, 2), 4
residual blocks per level, attention at 16x16 with 1 head, scale-shift norm, dropout 0.3,
average-pool / nearest resampling, unscaled ``t``; a class-conditional one keeps its null-label
embedding row at zero, frozen (Meta's ``padding_idx``). About 55.7M parameters on 32x32x3."""

UNetCIFAR10TorchCFM = functools.partial(
    UNet,
    model_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_ds=(2,),
    head_channels=64,
    dropout=0.1,
    scale_shift_norm=False,
    resblock_updown=False,
    conv_resample=True,
    time_scale=1.0,
)
"""torchcfm's CIFAR-10 U-Net (FID ~3.5): 128 channels, multipliers (1, 2, 2, 2), 2 residual
blocks, attention at 16x16 with heads of width 64 (4 heads), additive time conditioning,
dropout 0.1, convolutional resampling, unscaled ``t``. About 35.7M parameters on 32x32x3."""

UNetDigits = functools.partial(
    UNet,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_ds=(2,),
    num_heads=2,
    num_groups=8,
)
"""For scikit-learn's 8x8x1 digits on a laptop CPU (about 270k parameters): 16 channels,
multipliers (1, 2) (8x8 and 4x4 levels), 2 residual blocks, attention at 4x4 with 2 heads, no
dropout. Pass ``num_classes=10`` for a class-conditional model."""

UNetTiny = functools.partial(
    UNet,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_ds=(2,),
    num_heads=2,
    num_groups=4,
)
"""A U-Net of about 50k parameters for tests and examples (8x8 or 16x16 images)."""

UNetTinyConditional = functools.partial(UNetTiny, num_classes=10)
""":data:`UNetTiny` conditioned on 10 classes (null label 10)."""
