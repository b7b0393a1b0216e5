r"""The peers' PyTorch U-Nets and fmjax's, parameter for parameter: import and export.

torchcfm's ``UNetModel``/``UNetModelWrapper`` and the U-Net of Meta's ``flow_matching``
examples are both guided-diffusion's ``UNetModel``; a :class:`fmjax.models.UNet` of the same
configuration computes the same function once its state dict is renamed and re-laid out:

- guided-diffusion's names (``input_blocks.4.0.in_layers.2.weight``) become the Flax tree
  (``down1_res0/conv_in/kernel``), walking both networks in the same order;
- convolution kernels ``[out, in, kh, kw]`` become ``[kh, kw, in, out]``; linear weights
  ``[out, in]`` become ``[in, out]``; the attention's 1x1 ``Conv1d`` weights ``[out, in, 1]``
  become ``[in, out]``; GroupNorm's ``weight`` is ``scale``;
- the attention's ``qkv`` outputs: torchcfm's default ``QKVAttentionLegacy`` lays them out as
  ``(head, {q, k, v}, channel)``, guided-diffusion's ``QKVAttention`` (Meta's "new order") and
  fmjax as ``({q, k, v}, head, channel)``; with one head the two coincide;
- the label embedding: Meta's has ``num_classes + 1`` rows (the last, the null label, is its
  ``padding_idx``), as fmjax's; torchcfm's has ``num_classes`` rows and no null label, so a
  zero null row is added on import and dropped on export.

:func:`params_from_torch` and :func:`params_to_torch` are exact inverses (up to that dropped
row). :mod:`fmjax.models.param_files` reads and writes the files they come from and go to.

A :class:`fmjax.models.DiT` maps to SiT's and DiT's layout (``peer="sit"``), described in
:mod:`fmjax.models.dit_params`; an :class:`fmjax.models.AutoencoderKL` to diffusers' layout
(``peer="diffusers"``), described in :mod:`fmjax.models.vae_params`.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jaxtyping import ArrayLike

from fmjax.models._state_dicts import check_names
from fmjax.models.dit import DiT
from fmjax.models.dit_params import (
    DIT_ARCHITECTURE,
    dit_layers,
    dit_state_dict,
    position_embedding,
)
from fmjax.models.unet import UNet
from fmjax.models.vae import AutoencoderKL
from fmjax.models.vae_params import vae_params_from_torch, vae_params_to_torch

__all__ = [
    "PEERS",
    "params_from_torch",
    "params_to_torch",
]

PEERS = ("torchcfm", "meta")
"""The peers whose guided-diffusion U-Nets :func:`params_from_torch` maps: ``"torchcfm"``
(``QKVAttentionLegacy``, ``num_classes`` label rows) and ``"meta"`` (the new attention order,
``num_classes + 1`` label rows). A :class:`~fmjax.models.DiT` has one layout, ``"sit"``
(SiT's and DiT's)."""

# The configuration fields of a UNet that decide its function and parameters (its dtype and
# kernels do not; dropout and initialisation matter only in training).
_ARCHITECTURE = (
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_ds",
    "num_heads",
    "head_channels",
    "scale_shift_norm",
    "resblock_updown",
    "conv_resample",
    "num_classes",
    "out_channels",
    "time_scale",
    "num_groups",
)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {list(choices)}.")


def _check_model(model: Any) -> UNet | DiT:
    if not isinstance(model, UNet | DiT):
        raise ValueError(
            f"model must be an fmjax.models.UNet or DiT (a preset such as "
            f"UNetCIFAR10TorchCFM() or SiTXL2()); got {type(model).__name__}: no other network "
            "has a PyTorch mapping yet."
        )
    return model


def _peer(model: UNet | DiT, peer: str | None) -> str:
    """The state dict's layout: ``peer``, checked against the model's; None is the model's
    default (``"torchcfm"`` for a U-Net, ``"sit"`` for a DiT)."""
    if isinstance(model, DiT):
        _check_choice("peer", "sit" if peer is None else peer, ("sit",))
        return "sit"
    peer = "torchcfm" if peer is None else peer
    _check_choice("peer", peer, PEERS)
    return peer


# --- the name mapping ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer in both networks: its Flax path, its PyTorch prefix and its kind."""

    flax: tuple[str, ...]
    torch: str
    kind: str  # conv | dense | norm | embed | qkv | proj
    heads: int = 1


def _layers(model: UNet, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> Iterator[_Layer]:
    """The layers of ``model`` in guided-diffusion's construction order."""

    def res(flax: str, torch: str) -> Iterator[_Layer]:
        yield _Layer((flax, "norm_in"), f"{torch}.in_layers.0", "norm")
        yield _Layer((flax, "conv_in"), f"{torch}.in_layers.2", "conv")
        yield _Layer((flax, "emb_proj"), f"{torch}.emb_layers.1", "dense")
        yield _Layer((flax, "norm_out"), f"{torch}.out_layers.0", "norm")
        yield _Layer((flax, "conv_out"), f"{torch}.out_layers.3", "conv")
        if (flax, "skip", "kernel") in shapes:
            yield _Layer((flax, "skip"), f"{torch}.skip_connection", "conv")

    def attn(flax: str, torch: str) -> Iterator[_Layer]:
        channels = shapes[(flax, "qkv", "kernel")][0]
        if model.head_channels is None:
            heads = model.num_heads
        else:
            heads = channels // model.head_channels
        yield _Layer((flax, "norm"), f"{torch}.norm", "norm")
        yield _Layer((flax, "qkv"), f"{torch}.qkv", "qkv", heads)
        yield _Layer((flax, "proj_out"), f"{torch}.proj_out", "proj")

    yield _Layer(("time_mlp_0",), "time_embed.0", "dense")
    yield _Layer(("time_mlp_1",), "time_embed.2", "dense")
    if model.num_classes is not None:
        yield _Layer(("label_embedding",), "label_emb", "embed")
    yield _Layer(("conv_in",), "input_blocks.0.0", "conv")
    levels, k, ds = len(model.channel_mult), 1, 1
    for level in range(levels):
        for i in range(model.num_res_blocks):
            yield from res(f"down{level}_res{i}", f"input_blocks.{k}.0")
            if ds in model.attention_ds:
                yield from attn(f"down{level}_attn{i}", f"input_blocks.{k}.1")
            k += 1
        if level < levels - 1:
            if model.resblock_updown:
                yield from res(f"down{level}_resample", f"input_blocks.{k}.0")
            elif model.conv_resample:
                yield _Layer((f"down{level}_resample",), f"input_blocks.{k}.0.op", "conv")
            k, ds = k + 1, ds * 2
    yield from res("mid_res0", "middle_block.0")
    yield from attn("mid_attn", "middle_block.1")
    yield from res("mid_res1", "middle_block.2")
    k = 0
    for level in reversed(range(levels)):
        for i in range(model.num_res_blocks + 1):
            yield from res(f"up{level}_res{i}", f"output_blocks.{k}.0")
            j = 1
            if ds in model.attention_ds:
                yield from attn(f"up{level}_attn{i}", f"output_blocks.{k}.1")
                j = 2
            if level and i == model.num_res_blocks:
                if model.resblock_updown:
                    yield from res(f"up{level}_resample", f"output_blocks.{k}.{j}")
                elif model.conv_resample:
                    yield _Layer((f"up{level}_resample",), f"output_blocks.{k}.{j}.conv", "conv")
                ds //= 2
            k += 1
    yield _Layer(("norm_out",), "out.0", "norm")
    yield _Layer(("conv_out",), "out.2", "conv")


# Per kind: (Flax leaf, PyTorch leaf) pairs.
_LEAVES = {
    "conv": (("kernel", "weight"), ("bias", "bias")),
    "dense": (("kernel", "weight"), ("bias", "bias")),
    "qkv": (("kernel", "weight"), ("bias", "bias")),
    "proj": (("kernel", "weight"), ("bias", "bias")),
    "norm": (("scale", "weight"), ("bias", "bias")),
    "embed": (("embedding", "weight"),),
}


def _qkv_order(heads: int, channels: int, legacy: bool) -> np.ndarray:
    """``order[j]``: the PyTorch row of fmjax's ``qkv`` output ``j`` (``({q,k,v}, head,
    channel)``); PyTorch's rows are ``(head, {q,k,v}, channel)`` when ``legacy``."""
    d = channels // heads
    which, head, ch = np.meshgrid(np.arange(3), np.arange(heads), np.arange(d), indexing="ij")
    rows = head * 3 * d + which * d + ch if legacy else which * channels + head * d + ch
    return rows.reshape(-1)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One parameter: its names and shapes on both sides, and the two conversions."""

    flax: tuple[str, ...]
    torch: str
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _leaves(model: UNet | DiT, input_shape: tuple[int, ...], peer: str) -> list[_Leaf]:
    if len(input_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in input_shape):
        raise ValueError(
            f"input_shape={tuple(input_shape)!r} is not valid; expected (height, width, "
            "channels), positive integers."
        )
    # Only the channels decide the parameters: trace the smallest image the levels can halve
    # (one patch for a DiT).
    if isinstance(model, DiT):
        model.check_image_shape(input_shape)
        side = model.patch_size
    else:
        side = 2 ** (len(model.channel_mult) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, input_shape[2]), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    shapes = {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    legacy = peer == "torchcfm"
    if isinstance(model, DiT):
        layers = [_Layer(*layer) for layer in dit_layers(model)]
    else:
        layers = list(_layers(model, shapes))
    out = []
    for layer in layers:
        for flax_leaf, torch_leaf in _LEAVES[layer.kind]:
            path = (*layer.flax, flax_leaf)
            shape = shapes[path]
            name = f"{layer.torch}.{torch_leaf}"
            kind = layer.kind if flax_leaf != "bias" else "bias"
            if layer.kind == "qkv":
                # fmjax's output j is PyTorch's row order[j].
                order = _qkv_order(layer.heads, shape[-1] // 3, legacy)
                inverse = np.argsort(order)
                if kind == "qkv":  # [3c, c, 1] <-> [c, 3c], rows reordered
                    leaf = _Leaf(
                        path,
                        name,
                        shape,
                        (shape[1], shape[0], 1),
                        lambda w, o=order: w[o, :, 0].T,
                        lambda k, i=inverse: k.T[i, :, None],
                    )
                else:
                    leaf = _Leaf(
                        path, name, shape, shape, lambda b, o=order: b[o], lambda b, i=inverse: b[i]
                    )
            elif kind == "conv":  # [o, i, kh, kw] <-> [kh, kw, i, o]
                leaf = _Leaf(
                    path,
                    name,
                    shape,
                    (shape[3], shape[2], shape[0], shape[1]),
                    lambda w: w.transpose(2, 3, 1, 0),
                    lambda k: k.transpose(3, 2, 0, 1),
                )
            elif kind == "dense":  # [o, i] <-> [i, o]
                leaf = _Leaf(path, name, shape, shape[::-1], lambda w: w.T, lambda k: k.T)
            elif kind == "proj":  # [o, i, 1] <-> [i, o]
                leaf = _Leaf(
                    path,
                    name,
                    shape,
                    (shape[1], shape[0], 1),
                    lambda w: w[:, :, 0].T,
                    lambda k: k.T[:, :, None],
                )
            elif kind == "embed" and peer == "torchcfm":  # no null row in torchcfm
                leaf = _Leaf(
                    path,
                    name,
                    shape,
                    (shape[0] - 1, shape[1]),
                    lambda w: np.concatenate([w, np.zeros_like(w[:1])]),
                    lambda e: e[:-1],
                )
            else:  # norms, biases, Meta's embedding: as they are
                leaf = _Leaf(path, name, shape, shape, lambda v: v, lambda v: v)
            out.append(leaf)
    flax_paths = {leaf.flax for leaf in out}
    if flax_paths != set(shapes):  # the walk and the network disagree: a bug, not bad input
        raise AssertionError(f"unmapped parameters {sorted(set(shapes) - flax_paths)}")
    return out


def _strip_prefix(names: list[str]) -> dict[str, str]:
    """Stripped name -> given name: DDP's ``module.`` (and ``torch.compile``'s ``_orig_mod.``)."""
    out = {}
    for name in names:
        stripped = name
        for prefix in ("module.", "_orig_mod."):
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix) :]
        out[stripped] = name
    return out


def params_from_torch(
    state_dict: Mapping[str, ArrayLike],
    model: UNet | DiT | AutoencoderKL,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    *,
    peer: str | None = None,
) -> dict:
    """The Flax parameters of ``model`` from a peer's PyTorch state dict.

    Args:
        state_dict: PyTorch parameter names to arrays, e.g. ``{k: v.numpy() for k, v in
            module.state_dict().items()}`` of torchcfm's ``UNetModelWrapper`` or Meta's
            ``UNetModel`` (guided-diffusion's names), or of SiT's or DiT's network (DDP's
            ``module.`` prefix is stripped), or of diffusers' ``AutoencoderKL``.
        model: the fmjax network of the same configuration (``UNetCIFAR10TorchCFM()``,
            ``UNetCIFAR10Meta(num_classes=10)``, ``SiTXL2()``, ``SDVAE()``, ...).
        input_shape: ``(height, width, channels)`` of its images; for a U-Net only the
            channels decide the parameters; a DiT's ``pos_embed`` is checked against the token
            grid of ``height x width`` (``(32, 32, 4)`` for ImageNet 256x256 latents); for an
            AutoencoderKL only the channels count (its images').
        peer: the layout of the state dict: for a U-Net one of :data:`PEERS` (the attention
            layout and label rows, see the module docstring; None: ``"torchcfm"``), for a DiT
            ``"sit"``, for an AutoencoderKL ``"diffusers"`` (or None).

    Returns:
        The ``params`` collection: ``model.apply({"params": params}, x_t, t)``.

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped entry (with both
            shapes), or a model or peer this function does not map.

    Example:
        >>> import jax, numpy as np
        >>> from fmjax.models import UNetTiny, params_from_torch, params_to_torch
        >>> params = UNetTiny().init(jax.random.key(0), np.zeros((1, 8, 8, 1)), np.zeros(1))
        >>> sd = params_to_torch(params["params"], UNetTiny(), (8, 8, 1))
        >>> sd["input_blocks.0.0.weight"].shape  # OIHW
        (8, 1, 3, 3)
        >>> back = params_from_torch(sd, UNetTiny(), (8, 8, 1))
        >>> back["conv_in"]["kernel"].shape  # HWIO
        (3, 3, 1, 8)
        >>> params_from_torch({"time_embed.0.weight": np.zeros((3, 3))}, UNetTiny(), (8, 8, 1))
        Traceback (most recent call last):
        ...
        ValueError: The state dict is not the torchcfm PyTorch network of this UNet ...
    """
    if isinstance(model, AutoencoderKL):
        _check_choice("peer", "diffusers" if peer is None else peer, ("diffusers",))
        return vae_params_from_torch(state_dict, model, input_shape[2])
    peer = _peer(_check_model(model), peer)
    leaves = _leaves(model, tuple(input_shape), peer)
    given = _strip_prefix(list(state_dict))
    if isinstance(model, DiT):
        stripped = {name: state_dict[key] for name, key in given.items()}
        state_dict = dit_state_dict(stripped, model, tuple(input_shape))
        given = {name: name for name in state_dict}
    check_names(
        {leaf.torch: leaf.torch_shape for leaf in leaves},
        {name: np.shape(state_dict[key]) for name, key in given.items()},
        f"The state dict is not the {peer} PyTorch network of this {type(model).__name__} "
        f"configuration ({_describe(model)})",
        hint="Is the preset (and the peer, --source) the one the checkpoint was trained with?",
        as_given=given,
    )
    flat = {
        leaf.flax: np.ascontiguousarray(
            leaf.to_flax(np.asarray(state_dict[given[leaf.torch]], np.float32))
        )
        for leaf in leaves
    }
    return traverse_util.unflatten_dict(flat)


def params_to_torch(
    params: Mapping[str, Any],
    model: UNet | DiT | AutoencoderKL,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    *,
    peer: str | None = None,
) -> dict[str, np.ndarray]:
    """The peer's PyTorch state dict (NumPy float32 arrays under guided-diffusion's names) of
    the Flax parameters ``params`` of ``model``: the inverse of :func:`params_from_torch`.

    Load it into the peer's network with ``net.load_state_dict({k: torch.from_numpy(v) for
    k, v in state_dict.items()})``. For ``peer="torchcfm"`` a conditional model's null-label
    row is dropped (torchcfm's embedding has none), so only that row does not round-trip.
    A DiT's state dict also holds SiT's ``pos_embed`` buffer for images of ``input_shape``, and
    its output layer has the model's channels (SiT's ``learn_sigma=False``).

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped parameter.

    Example:
        >>> import jax, numpy as np
        >>> from fmjax.models import UNetTiny, params_to_torch
        >>> params = UNetTiny().init(jax.random.key(0), np.zeros((1, 8, 8, 1)), np.zeros(1))
        >>> sd = params_to_torch(params["params"], UNetTiny(), (8, 8, 1))
        >>> sd["time_embed.0.weight"].shape  # Linear(8, 32): [out, in]
        (32, 8)
    """
    if isinstance(model, AutoencoderKL):
        _check_choice("peer", "diffusers" if peer is None else peer, ("diffusers",))
        return vae_params_to_torch(params, model, input_shape[2])
    peer = _peer(_check_model(model), peer)
    leaves = _leaves(model, tuple(input_shape), peer)
    flat = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    check_names(
        {"/".join(leaf.flax): leaf.flax_shape for leaf in leaves},
        {"/".join(path): np.shape(value) for path, value in flat.items()},
        f"params are not those of this {type(model).__name__} ({_describe(model)})",
    )
    out = {
        leaf.torch: np.ascontiguousarray(leaf.to_torch(np.asarray(flat[leaf.flax], np.float32)))
        for leaf in leaves
    }
    if isinstance(model, DiT):
        out["pos_embed"] = position_embedding(model, tuple(input_shape))
    return out


def _architecture(model: UNet | DiT) -> dict[str, Any]:
    out = {}
    for name in DIT_ARCHITECTURE if isinstance(model, DiT) else _ARCHITECTURE:
        value = getattr(model, name)
        out[name] = list(value) if isinstance(value, tuple | list) else value
    return out


def _describe(model: UNet | DiT) -> str:
    return ", ".join(f"{k}={v}" for k, v in _architecture(model).items())
