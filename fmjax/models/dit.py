r"""Diffusion transformers in Flax linen: SiT's and DiT's network, with their presets.

The architecture is that of Peebles & Xie's DiT, which Ma et al.'s SiT trains as a velocity
field (the same network, other names for nothing: SiT's ``models.py`` is DiT's):

- the image is cut into ``p x p`` patches, each projected to ``hidden_size`` features by a
  ``p x p`` convolution of stride ``p``, and a fixed 2-D sine-cosine positional embedding of
  the token grid is added (computed from the grid, not a parameter);
- the conditioning vector :math:`c` is the sum of a time embedding (:func:`sinusoidal_embedding`
  of ``time_scale * t``, 256 frequencies, cosines first, then ``Dense -> SiLU -> Dense``) and a
  learned label embedding with a null label for classifier-free guidance;
- ``depth`` blocks with adaLN-Zero conditioning: from :math:`\mathrm{SiLU}(c)` one dense layer
  gives shift, scale and gate for the attention and for the MLP, and

  .. math::

      x \leftarrow x + g_1 \odot \mathrm{Attn}(\mathrm{LN}(x)(1 + s_1) + b_1), \qquad
      x \leftarrow x + g_2 \odot \mathrm{MLP}(\mathrm{LN}(x)(1 + s_2) + b_2),

  with LayerNorm without affine parameters (eps 1e-6), multi-head self-attention through
  ``jax.nn.dot_product_attention`` and a GELU (tanh) MLP of width ``mlp_ratio * hidden_size``;
- a final adaLN layer (shift and scale), a dense layer to ``p * p * channels`` values per
  token, and un-patchifying back to an image.

The adaLN layers and the output layer start at zero (adaLN-Zero): a fresh network is the
identity on every residual path and outputs exactly zero. Other layers start as SiT's do
(Xavier-uniform kernels, zero biases, normal(0.02) label table and time MLP).

Images are NHWC: ``x_t`` is ``[batch, height, width, channels]``, ``t`` is ``[batch]`` (or a
scalar) with noise at ``t = 0`` and data at ``t = 1``: the direction of SiT's own code (its
linear path is ``x_t = t x_1 + (1 - t) x_0`` with ``x_0`` the noise, integrated from 0 to 1),
so a SiT checkpoint is called with ``t`` as it is and its output is the velocity. SiT feeds
``t`` in ``[0, 1]`` unscaled (``time_scale=1``); DiT's networks take DDPM's timesteps in
``[0, 1000)`` (``time_scale=1000`` maps ``t`` in ``[0, 1]`` there), and predict noise (and a
variance), not a velocity.

Parameters are always float32; ``dtype=jnp.bfloat16`` runs the convolution, dense layers and
attention products in bfloat16, while LayerNorm statistics, softmaxes, the time embedding's
sinusoids and the residual stream stay in float32 (float64 for a float64 model).
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from fmjax.models.attention import attend_fused, check_attention
from fmjax.models.embeddings import class_labels, network_inputs, sinusoidal_embedding

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTDigits",
    "DiTTiny",
    "SiTB2",
    "SiTL2",
    "SiTS2",
    "SiTXL2",
    "sincos_position_embedding",
]

FREQUENCY_EMBEDDING_SIZE = 256
"""The width of the sinusoidal time embedding before the time MLP (SiT's and DiT's)."""


def sincos_position_embedding(
    hidden_size: int, grid_height: int, grid_width: int
) -> Float[np.ndarray, "tokens hidden"]:
    r"""The fixed 2-D sine-cosine positional embedding of a ``grid_height x grid_width`` token
    grid (MAE's, which DiT and SiT use), tokens in row-major order.

    With :math:`D` = ``hidden_size`` and :math:`\omega_k = 10000^{-k / (D/4)}`,
    :math:`k = 0, \dots, D/4 - 1`, the token in row :math:`i`, column :math:`j` gets

    .. math::

        [\sin(j \omega), \cos(j \omega), \sin(i \omega), \cos(i \omega)]

    (the column's half first, as MAE's ``meshgrid(grid_w, grid_h)`` orders it). Computed in
    float64 and returned as float32, a NumPy constant (not a parameter).

    Raises:
        ValueError: unless ``hidden_size`` is divisible by 4.

    Example:
        >>> from fmjax.models import sincos_position_embedding
        >>> emb = sincos_position_embedding(8, 2, 3)
        >>> emb.shape
        (6, 8)
        >>> emb[0].tolist()  # row 0, column 0: every sine 0, every cosine 1
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    """
    if hidden_size % 4:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by 4 for the 2-D sine-cosine "
            "positional embedding (a sine and a cosine per axis)."
        )
    omega = 1.0 / 10000.0 ** (np.arange(hidden_size // 4, dtype=np.float64) / (hidden_size / 4))
    rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")

    def axis(pos: np.ndarray) -> np.ndarray:
        args = pos.reshape(-1, 1).astype(np.float64) * omega
        return np.concatenate([np.sin(args), np.cos(args)], axis=1)

    return np.concatenate([axis(cols), axis(rows)], axis=1).astype(np.float32)


def _xavier_flat(key, shape, dtype=jnp.float32):
    """Xavier-uniform of the kernel seen as ``[prod(shape[:-1]), shape[-1]]``: SiT initialises
    the patch embedding's convolution like a linear layer of ``p * p * channels`` inputs."""
    flat = (math.prod(shape[:-1]), shape[-1])
    return nn.initializers.xavier_uniform()(key, flat, dtype).reshape(shape)


def _dense(features: int, dtype: Any, name: str, *, zero: bool = False, std: float | None = None):
    if zero:
        kernel_init = nn.initializers.zeros
    elif std is not None:
        kernel_init = nn.initializers.normal(std)
    else:
        kernel_init = nn.initializers.xavier_uniform()
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def _wide(dtype: Any) -> Any:
    """The dtype of statistics and the residual stream: float32, or float64 for a float64
    model."""
    return jnp.promote_types(dtype, jnp.float32)


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm over the features without affine parameters (eps 1e-6), in ``x``'s dtype
    (the residual stream's, float32 or wider)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _Block(nn.Module):
    """A DiT block: adaLN-Zero-conditioned attention then MLP, each with a gated residual."""

    num_heads: int
    mlp_ratio: float
    dtype: Any
    attention: str

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        b, n, d = x.shape
        wide = _wide(self.dtype)
        modulation = _dense(6 * d, self.dtype, "adaLN_modulation", zero=True)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            modulation.astype(wide), 6, axis=-1
        )

        h = _modulate(_layer_norm(x), shift_msa, scale_msa).astype(self.dtype)
        # SiT's qkv layout: outputs [q | k | v], each split into heads of d / heads channels.
        qkv = _dense(3 * d, self.dtype, "qkv")(h).reshape(b, n, 3, self.num_heads, -1)
        out = attend_fused(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention)
        out = _dense(d, self.dtype, "proj")(out.reshape(b, n, d))
        x = x + gate_msa[:, None, :] * out.astype(wide)

        h = _modulate(_layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
        h = _dense(int(d * self.mlp_ratio), self.dtype, "fc1")(h)
        h = _dense(d, self.dtype, "fc2")(nn.gelu(h, approximate=True))
        return x + gate_mlp[:, None, :] * h.astype(wide)


class DiT(nn.Module):
    r"""A diffusion transformer (DiT/SiT): ``(x_t, t, y) -> velocity`` shaped like ``x_t``.

    Called like :class:`fmjax.models.UNet`: ``model.apply({"params": params}, x_t, t, y=labels,
    train=...)``, directly an ``apply_fn`` of :func:`fmjax.loss.cfm_loss`, so the engine,
    :mod:`fmjax.generate` and :mod:`fmjax.meanflow` use it unchanged. The network is described
    in the module docstring; its parameters are:

    - ``patch_embed`` (``p x p`` convolution), ``time_mlp_0`` and ``time_mlp_1`` (the time
      MLP), ``label_embedding`` (``[num_classes + 1, hidden_size]``, the last row the null
      label), and with ``mean_flow`` ``interval_mlp_0``/``interval_mlp_1``;
    - per block ``block{i}``: ``adaLN_modulation`` (``6 * hidden_size`` outputs: shift, scale
      and gate of the attention, then of the MLP), ``qkv``, ``proj``, ``fc1``, ``fc2``;
    - ``final_adaLN_modulation`` (shift, scale) and ``final_linear``
      (``p * p * channels`` outputs per token, the channels fastest).

    :func:`fmjax.models.params_from_torch` maps SiT's and DiT's checkpoints onto them.

    Labels are checked when concrete: a label outside ``[0, num_classes]`` raises. Under
    ``jit`` they cannot be; there an out-of-range label makes that example's output NaN.

    Attributes:
        patch_size: the side ``p`` of the square patches; height and width must be
            divisible by it. The token count is ``height * width / p**2``.
        hidden_size: the token width :math:`D`; divisible by 4 and by ``num_heads``.
        depth: the number of blocks.
        num_heads: attention heads, each ``hidden_size / num_heads`` wide.
        mlp_ratio: the MLP's hidden width, as a multiple of ``hidden_size``.
        num_classes: the number of classes of a class-conditional model (label
            ``num_classes`` is the null label of classifier-free guidance; ``y=None`` means it
            for every example), or None for an unconditional model.
        out_channels: output channels; None means those of the input.
        time_scale: multiplies ``t`` before the sinusoidal embedding: 1 for SiT (``t`` in
            ``[0, 1]``), 1000 for DiT's timesteps.
        dtype: the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and the
            output has the dtype of ``x_t``.
        attention: how ``jax.nn.dot_product_attention`` computes, one of
            :data:`fmjax.models.ATTENTION_IMPLEMENTATIONS` (same parameters, same function):
            ``"xla"``, JAX's XLA formula (every backend, float32 logits and softmax,
            differentiable in both modes); ``"cudnn"``, cuDNN's fused flash-attention kernel
            (NVIDIA GPUs, ``dtype`` bfloat16 or float16, reverse mode only: forward mode, as
            in :func:`fmjax.likelihood.log_likelihood`, needs ``"xla"``).
        mean_flow: a mean-flow network (:mod:`fmjax.meanflow`): ``__call__`` takes the end
            ``t_end`` of the interval, and the length ``t_end - t`` is embedded like ``t``
            (a second time MLP, ``interval_mlp_*``) and added to the conditioning, as
            MeanFlow's DiT does with its second time. Off, the parameters are SiT's.
        remat: recompute each block's activations in the backward pass instead of storing
            them (``nn.remat``): less memory for large models and batches, the same values.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.models import DiTTiny
        >>> model = DiTTiny(num_classes=10)
        >>> x_t, t, y = jnp.ones((2, 8, 8, 1)), jnp.array([0.1, 0.9]), jnp.array([3, 10])
        >>> params = model.init(jax.random.key(0), x_t, t, y)
        >>> model.apply(params, x_t, t, y).shape
        (2, 8, 8, 1)
        >>> float(jnp.abs(model.apply(params, x_t, t, y)).max())  # adaLN-Zero: zero at init
        0.0
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    out_channels: int | None = None
    time_scale: float = 1.0
    dtype: Any = jnp.float32
    attention: str = "xla"
    mean_flow: bool = False
    remat: bool = False

    def check_image_shape(self, image_shape: Sequence[int]) -> None:
        """Raises ``ValueError`` unless this network takes images of shape ``(height, width,
        channels)``: the sides must be multiples of ``patch_size``, and ``hidden_size`` a
        multiple of 4 and of ``num_heads``. Checked before anything is traced.

        Example:
            >>> from fmjax.models import DiTTiny
            >>> DiTTiny().check_image_shape((8, 8, 1))
            >>> DiTTiny().check_image_shape((9, 8, 1))
            Traceback (most recent call last):
            ...
            ValueError: Image size 9x8 cannot be cut into 2x2 patches: ...
        """
        height, width = image_shape[0], image_shape[1]
        p = self.patch_size
        if not (isinstance(p, int) and p >= 1):
            raise ValueError(f"patch_size={p!r} is not valid; expected a positive integer.")
        if height % p or width % p or height < p or width < p:
            raise ValueError(
                f"Image size {height}x{width} cannot be cut into {p}x{p} patches: height and "
                f"width must be positive multiples of patch_size={p}."
            )
        if self.hidden_size % 4 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by 4 (the positional "
                f"embedding) and by num_heads={self.num_heads}."
            )

    def _time_embedding(self, t: jax.Array, name: str) -> jax.Array:
        emb = sinusoidal_embedding(t, FREQUENCY_EMBEDDING_SIZE, scale=self.time_scale)
        d = self.hidden_size
        emb = _dense(d, self.dtype, f"{name}_0", std=0.02)(emb.astype(self.dtype))
        return _dense(d, self.dtype, f"{name}_1", std=0.02)(nn.silu(emb))

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
        """The network's output for images ``x_t`` at times ``t``, shaped like ``x_t``
        (``out_channels`` channels if set).

        Args:
            x_t: images, ``[batch, height, width, channels]``, float; height and width
                multiples of ``patch_size``.
            t: times in ``[0, 1]`` (noise at 0), shape ``[batch]`` or a scalar.
            y: class labels ``[batch]`` in ``[0, num_classes]`` (``num_classes`` is the null
                label), or None (every example unconditional). Only for a conditional model.
            t_end: the end of the interval of a mean-flow network (``mean_flow=True``), shape
                ``[batch]`` or a scalar; None means ``t`` (the instantaneous velocity).
            train: accepted for the U-Net's signature; the network has no dropout (label
                dropout is the caller's, :func:`fmjax.models.drop_labels`).

        Raises:
            ValueError: at trace time, for an input that is not a batch of float images, ``t``
                or ``t_end`` of the wrong shape, ``t_end`` given to a plain network, an image
                size the patches do not tile, widths the heads or the positional embedding
                cannot split, an unknown ``attention``, labels given to an unconditional
                model, labels of the wrong shape or dtype, or concrete labels out of range.
        """
        del train
        x_t, t, t_end = network_inputs(x_t, t, t_end, mean_flow=self.mean_flow, model="DiT")
        batch, height, width, channels = x_t.shape
        self.check_image_shape(x_t.shape[1:])
        check_attention(self.attention, self.dtype)
        labels = class_labels(y, self.num_classes, batch, "DiT")
        p, d, dtype = self.patch_size, self.hidden_size, self.dtype
        grid_h, grid_w = height // p, width // p

        h = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_xavier_flat,
            bias_init=nn.initializers.zeros,
            name="patch_embed",
        )(x_t.astype(dtype))
        wide = _wide(dtype)
        x = h.reshape(batch, grid_h * grid_w, d).astype(wide)
        x = x + sincos_position_embedding(d, grid_h, grid_w)[None]

        c = self._time_embedding(jnp.broadcast_to(t, (batch,)), "time_mlp")
        if self.mean_flow:
            c = c + self._time_embedding(jnp.broadcast_to(t_end - t, (batch,)), "interval_mlp")
        if labels is not None:
            table = nn.Embed(
                self.num_classes + 1,
                d,
                dtype=dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(0.02),
                name="label_embedding",
            )
            valid = (labels >= 0) & (labels <= self.num_classes)
            label_emb = table(jnp.clip(labels, 0, self.num_classes))
            c = c + jnp.where(valid[:, None], label_emb, jnp.nan).astype(dtype)

        block = nn.remat(_Block) if self.remat else _Block
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, dtype, self.attention, name=f"block{i}")(x, c)

        modulation = _dense(2 * d, dtype, "final_adaLN_modulation", zero=True)(nn.silu(c))
        shift, scale = jnp.split(modulation.astype(wide), 2, axis=-1)
        h = _modulate(_layer_norm(x), shift, scale).astype(dtype)
        out_channels = channels if self.out_channels is None else self.out_channels
        h = _dense(p * p * out_channels, dtype, "final_linear", zero=True)(h)
        h = h.reshape(batch, grid_h, grid_w, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(batch, height, width, out_channels).astype(x_t.dtype)


_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}


def _sit(size: str, patch: int):
    depth, width, heads = _SIZES[size]
    return functools.partial(
        DiT, patch_size=patch, hidden_size=width, depth=depth, num_heads=heads, num_classes=1000
    )


SiTS2 = _sit("s", 2)
"""SiT-S/2 (DiT-S/2's network): 12 blocks of width 384, 6 heads, 2x2 patches, 1,000 classes;
about 33M parameters."""

SiTB2 = _sit("b", 2)
"""SiT-B/2: 12 blocks of width 768, 12 heads, 2x2 patches, 1,000 classes; about 130M
parameters."""

SiTL2 = _sit("l", 2)
"""SiT-L/2: 24 blocks of width 1024, 16 heads, 2x2 patches, 1,000 classes; about 458M
parameters."""

SiTXL2 = _sit("xl", 2)
"""SiT-XL/2: 28 blocks of width 1152, 16 heads, 2x2 patches, 1,000 classes; about 675M
parameters (the network of the released ImageNet 256x256 checkpoint)."""

DiTTiny = functools.partial(DiT, patch_size=2, hidden_size=32, depth=2, num_heads=2)
"""A DiT of about 50k parameters for tests and examples (8x8 or 16x16 images)."""

DiTDigits = functools.partial(DiT, patch_size=2, hidden_size=96, depth=6, num_heads=4)
"""For scikit-learn's 8x8x1 digits on a laptop CPU: 2x2 patches (16 tokens), 6 blocks of
width 96, 4 heads. Pass ``num_classes=10`` for a class-conditional model."""

DIT_PRESETS = {
    **{f"sit_{size}_{patch}": _sit(size, patch) for size in _SIZES for patch in (2, 4, 8)},
    "dit_digits": DiTDigits,
    "dit_tiny": DiTTiny,
}
"""The transformers of :data:`fmjax.models.PRESETS`: SiT's twelve configurations
``sit_{s,b,l,xl}_{2,4,8}`` with the papers' depth, width and heads (S: 12 blocks of 384
with 6 heads; B: 12 of 768 with 12; L: 24 of 1024 with 16; XL: 28 of 1152 with 16), patches
of 2, 4 or 8, 1,000 classes and ``time_scale=1``; ``dit_digits`` and ``dit_tiny``."""
