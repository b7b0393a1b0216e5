r"""diffusers' ``AutoencoderKL`` state dicts and :class:`fmjax.models.AutoencoderKL`, name for
name, and the released ``diffusion_pytorch_model.safetensors`` files.

:func:`fmjax.models.params_from_torch` and :func:`fmjax.models.params_to_torch` map an
:class:`~fmjax.models.AutoencoderKL` through this layout (``peer="diffusers"``), with
``{side}`` ``encoder`` or ``decoder``:

| diffusers | fmjax |
| --- | --- |
| ``{side}.conv_in``, ``{side}.conv_out`` | ``{side}/conv_in``, ``{side}/conv_out`` |
| ``{side}.conv_norm_out`` | ``{side}/norm_out`` |
| ``encoder.down_blocks.{l}.resnets.{i}`` | ``encoder/down{l}_res{i}`` |
| ``encoder.down_blocks.{l}.downsamplers.0.conv`` | ``encoder/down{l}_downsample`` |
| ``decoder.up_blocks.{l}.resnets.{i}`` | ``decoder/up{l}_res{i}`` |
| ``decoder.up_blocks.{l}.upsamplers.0.conv`` | ``decoder/up{l}_upsample`` |
| ``{side}.mid_block.resnets.{0,1}`` | ``{side}/mid_res{0,1}`` |
| ``{side}.mid_block.attentions.0`` | ``{side}/mid_attn`` |
| ``quant_conv``, ``post_quant_conv`` | ``quant_conv``, ``post_quant_conv`` |

Inside a residual block ``norm1, conv1, norm2, conv2, conv_shortcut`` keep their names;
inside the attention ``group_norm, to_q, to_k, to_v`` do and ``to_out.0`` is ``to_out``.
Convolution kernels ``[out, in, kh, kw]`` become ``[kh, kw, in, out]``, linear weights
``[out, in]`` become ``[in, out]``, GroupNorm's ``weight`` is ``scale``.

The attention's projections were named ``query, key, value, proj_attn`` before diffusers'
attention rewrite, and checkpoints saved then (the SD VAE's releases among them) still carry
those names, which diffusers renames on load (``_fix_state_dict_keys_on_load``); so does
:func:`vae_params_from_torch`. Exports use the current names.
"""

import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jaxtyping import ArrayLike

from fmjax.models._state_dicts import check_names
from fmjax.models.vae import AutoencoderKL

__all__ = [
    "VAE_ARCHITECTURE",
    "load_vae_safetensors",
    "vae_layers",
    "vae_params_from_torch",
    "vae_params_to_torch",
]

VAE_ARCHITECTURE = (
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "out_channels",
    "norm_num_groups",
)
"""The fields of an :class:`~fmjax.models.AutoencoderKL` that decide its function and
parameters."""

# The attention projections' names before diffusers' attention rewrite -> today's.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Per kind: (Flax leaf, PyTorch leaf) pairs.
_LEAVES = {
    "conv": (("kernel", "weight"), ("bias", "bias")),
    "dense": (("kernel", "weight"), ("bias", "bias")),
    "norm": (("scale", "weight"), ("bias", "bias")),
}


def vae_layers(
    model: AutoencoderKL, in_channels: int = 3
) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """``(Flax path, diffusers prefix, kind)`` of every layer of ``model`` for images of
    ``in_channels`` channels, in diffusers' order; kinds ``conv``, ``dense`` and ``norm``.

    Example:
        >>> from fmjax.models import VAETiny
        >>> from fmjax.models.vae_params import vae_layers
        >>> next(vae_layers(VAETiny()))
        (('encoder', 'conv_in'), 'encoder.conv_in', 'conv')
    """

    def res(flax: tuple[str, ...], torch: str, width_in: int, width: int):
        for name, kind in (("norm1", "norm"), ("conv1", "conv"), ("norm2", "norm")):
            yield (*flax, name), f"{torch}.{name}", kind
        yield (*flax, "conv2"), f"{torch}.conv2", "conv"
        if width_in != width:
            yield (*flax, "conv_shortcut"), f"{torch}.conv_shortcut", "conv"

    def middle(side: str, width: int):
        yield from res((side, "mid_res0"), f"{side}.mid_block.resnets.0", width, width)
        attn = f"{side}.mid_block.attentions.0"
        yield (side, "mid_attn", "group_norm"), f"{attn}.group_norm", "norm"
        for name in ("to_q", "to_k", "to_v"):
            yield (side, "mid_attn", name), f"{attn}.{name}", "dense"
        yield (side, "mid_attn", "to_out"), f"{attn}.to_out.0", "dense"
        yield from res((side, "mid_res1"), f"{side}.mid_block.resnets.1", width, width)

    widths = tuple(model.block_out_channels)
    last = len(widths) - 1
    yield ("encoder", "conv_in"), "encoder.conv_in", "conv"
    width_in = widths[0]
    for level, width in enumerate(widths):
        for i in range(model.layers_per_block):
            yield from res(
                ("encoder", f"down{level}_res{i}"),
                f"encoder.down_blocks.{level}.resnets.{i}",
                width_in,
                width,
            )
            width_in = width
        if level < last:
            yield (
                ("encoder", f"down{level}_downsample"),
                f"encoder.down_blocks.{level}.downsamplers.0.conv",
                "conv",
            )
    yield from middle("encoder", widths[-1])
    yield ("encoder", "norm_out"), "encoder.conv_norm_out", "norm"
    yield ("encoder", "conv_out"), "encoder.conv_out", "conv"
    yield ("quant_conv",), "quant_conv", "conv"
    yield ("post_quant_conv",), "post_quant_conv", "conv"
    yield ("decoder", "conv_in"), "decoder.conv_in", "conv"
    yield from middle("decoder", widths[-1])
    width_in = widths[-1]
    for level, width in enumerate(reversed(widths)):
        for i in range(model.layers_per_block + 1):
            yield from res(
                ("decoder", f"up{level}_res{i}"),
                f"decoder.up_blocks.{level}.resnets.{i}",
                width_in,
                width,
            )
            width_in = width
        if level < last:
            yield (
                ("decoder", f"up{level}_upsample"),
                f"decoder.up_blocks.{level}.upsamplers.0.conv",
                "conv",
            )
    yield ("decoder", "norm_out"), "decoder.conv_norm_out", "norm"
    yield ("decoder", "conv_out"), "decoder.conv_out", "conv"


def _to_flax(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "conv":  # [o, i, kh, kw] -> [kh, kw, i, o]
        return value.transpose(2, 3, 1, 0)
    if kind == "dense":  # [o, i] -> [i, o]
        return value.T
    return value


def _to_torch(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if kind == "dense":
        return value.T
    return value


def _leaves(
    model: AutoencoderKL, in_channels: int
) -> list[tuple[tuple[str, ...], str, str, tuple[int, ...]]]:
    """``(Flax path, diffusers name, kind, Flax shape)`` of every parameter (kind ``bias``
    for biases)."""
    if not isinstance(model, AutoencoderKL):
        raise ValueError(
            f"model must be an fmjax.models.AutoencoderKL; got {type(model).__name__}."
        )
    if not (isinstance(in_channels, int) and in_channels > 0):
        raise ValueError(f"in_channels={in_channels!r} is not valid; expected a positive integer.")
    side = model.downsampling
    images = jax.ShapeDtypeStruct((1, side, side, in_channels), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    shapes = {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    out = []
    for flax, torch, kind in vae_layers(model, in_channels):
        for flax_leaf, torch_leaf in _LEAVES[kind]:
            path = (*flax, flax_leaf)
            leaf_kind = "bias" if flax_leaf == "bias" else kind
            out.append((path, f"{torch}.{torch_leaf}", leaf_kind, shapes[path]))
    if {leaf[0] for leaf in out} != set(shapes):  # the walk and the network disagree: a bug
        raise AssertionError(f"unmapped parameters {sorted(set(shapes) - {x[0] for x in out})}")
    return out


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "dense":
        return shape[::-1]
    return shape


def _current_name(name: str) -> str:
    """``name`` with a deprecated attention projection's name replaced by today's."""
    prefix, _, rest = name.partition(".mid_block.attentions.0.")
    if not rest:
        return name
    layer, _, leaf = rest.rpartition(".")
    return f"{prefix}.mid_block.attentions.0.{_DEPRECATED_ATTENTION.get(layer, layer)}.{leaf}"


def _describe(model: AutoencoderKL) -> str:
    return ", ".join(f"{name}={getattr(model, name)!r}" for name in VAE_ARCHITECTURE)


def vae_params_from_torch(
    state_dict: Mapping[str, ArrayLike], model: AutoencoderKL, in_channels: int = 3
) -> dict:
    """The Flax parameters of ``model`` from diffusers' ``AutoencoderKL`` state dict
    (``{k: v.numpy() for k, v in vae.state_dict().items()}``, or a ``.safetensors`` file's
    arrays), for images of ``in_channels`` channels. Both attention layouts are read (see
    the module docstring).

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped entry (with both shapes).

    Example:
        >>> import jax, numpy as np
        >>> from fmjax.models import VAETiny
        >>> from fmjax.models.vae_params import vae_params_from_torch, vae_params_to_torch
        >>> params = VAETiny().init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]
        >>> sd = vae_params_to_torch(params, VAETiny())
        >>> sd["encoder.conv_in.weight"].shape  # OIHW
        (16, 3, 3, 3)
        >>> vae_params_from_torch(sd, VAETiny())["encoder"]["conv_in"]["kernel"].shape
        (3, 3, 3, 16)
    """
    leaves = _leaves(model, in_channels)
    given: dict[str, str] = {}
    for name in state_dict:
        current = _current_name(name)
        # A deprecated name whose current twin is also there stays as given: unexpected.
        given[name if current in state_dict or current in given else current] = name
    check_names(
        {torch: _torch_shape(kind, shape) for _, torch, kind, shape in leaves},
        {name: np.shape(state_dict[key]) for name, key in given.items()},
        f"The state dict is not diffusers' AutoencoderKL of this configuration "
        f"({_describe(model)}, in_channels={in_channels})",
        hint="Is the preset the one the checkpoint was trained with (SDVAE for "
        "stabilityai/sd-vae-ft-*)?",
        as_given=given,
    )
    flat = {
        path: np.ascontiguousarray(_to_flax(kind, np.asarray(state_dict[given[torch]], np.float32)))
        for path, torch, kind, _ in leaves
    }
    return traverse_util.unflatten_dict(flat)


def vae_params_to_torch(
    params: Mapping[str, Any], model: AutoencoderKL, in_channels: int = 3
) -> dict[str, np.ndarray]:
    """diffusers' ``AutoencoderKL`` state dict (float32 NumPy arrays, today's attention
    names) of the Flax parameters ``params`` of ``model``: the inverse of
    :func:`vae_params_from_torch`. Load it with ``vae.load_state_dict({k:
    torch.from_numpy(v) for k, v in state_dict.items()})``.

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped parameter.

    Example: see :func:`vae_params_from_torch`.
    """
    leaves = _leaves(model, in_channels)
    flat = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    check_names(
        {"/".join(path): shape for path, _, _, shape in leaves},
        {"/".join(path): np.shape(value) for path, value in flat.items()},
        f"params are not those of this AutoencoderKL ({_describe(model)}, in_channels="
        f"{in_channels})",
    )
    return {
        torch: np.ascontiguousarray(_to_torch(kind, np.asarray(flat[path], np.float32)))
        for path, torch, kind, _ in leaves
    }


def load_vae_safetensors(
    path: str | os.PathLike, model: AutoencoderKL, in_channels: int = 3
) -> dict:
    """The Flax parameters of ``model`` from diffusers' ``diffusion_pytorch_model.safetensors``
    (e.g. ``stabilityai/sd-vae-ft-mse``'s, for :data:`~fmjax.models.SDVAE`), read with the
    ``safetensors`` package's NumPy API: no PyTorch, no pickle.

    Raises:
        ValueError: for a missing or unreadable file, or (one error naming them all) missing,
            unexpected or mis-shaped entries.

    Example::

        params = load_vae_safetensors("diffusion_pytorch_model.safetensors", SDVAE())
        mean, logvar = SDVAE().apply({"params": params}, images, method="encode")
    """
    try:
        import safetensors.numpy
    except ImportError:
        raise ValueError(
            f"Reading {path} needs the safetensors package (`pip install safetensors`)."
        ) from None
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"No safetensors file at {path}.")
    try:
        state_dict = safetensors.numpy.load_file(path)
    except Exception as error:  # safetensors reports a bad header as SafetensorError
        raise ValueError(
            f"{path} cannot be read as a safetensors file of NumPy-readable arrays "
            f"({type(error).__name__}: {error}): truncated, or another format."
        ) from None
    return vae_params_from_torch(state_dict, model, in_channels)
