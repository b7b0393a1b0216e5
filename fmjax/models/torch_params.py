r"""The peers' PyTorch U-Nets and fmjax's, parameter for parameter: import, export, files.

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
row). :func:`load_torch_checkpoint` reads torchcfm's and Meta's training checkpoints with
PyTorch's restricted ``weights_only`` unpickler (nothing else of a pickle runs);
:func:`save_params` and :func:`load_params` keep converted parameters in an ``.npz`` with the
preset and configuration recorded, read back without pickle.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from fmjax.models.unet import UNet

__all__ = [
    "PEERS",
    "TORCH_SOURCES",
    "TORCH_WEIGHTS",
    "load_params",
    "load_torch_checkpoint",
    "params_from_torch",
    "params_to_torch",
    "save_params",
]

PEERS = ("torchcfm", "meta")
"""The peers whose guided-diffusion U-Nets :func:`params_from_torch` maps: ``"torchcfm"``
(``QKVAttentionLegacy``, ``num_classes`` label rows) and ``"meta"`` (the new attention order,
``num_classes + 1`` label rows)."""

TORCH_SOURCES = PEERS
"""The checkpoint layouts :func:`load_torch_checkpoint` reads: ``"torchcfm"`` (``{"net_model",
"ema_model", ...}``) and ``"meta"`` (``{"model": EMA-wrapper state dict, "optimizer", "args",
...}``)."""

TORCH_WEIGHTS = ("ema", "raw")
"""Which weights of a training checkpoint: the EMA (what the peers sample and score) or the raw
trained ones."""

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
_FORMAT = "fmjax-params-v1"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {list(choices)}.")


def _check_model(model: Any) -> UNet:
    if not isinstance(model, UNet):
        raise ValueError(
            f"model must be an fmjax.models.UNet (a preset such as UNetCIFAR10TorchCFM()); got "
            f"{type(model).__name__}: no other network has a PyTorch mapping yet."
        )
    return model


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


def _leaves(model: UNet, input_shape: tuple[int, ...], peer: str) -> list[_Leaf]:
    if len(input_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in input_shape):
        raise ValueError(
            f"input_shape={tuple(input_shape)!r} is not valid; expected (height, width, "
            "channels), positive integers."
        )
    # Only the channels decide the parameters: trace the smallest image the levels can halve.
    side = 2 ** (len(model.channel_mult) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, input_shape[2]), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    shapes = {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    legacy = peer == "torchcfm"
    out = []
    for layer in _layers(model, shapes):
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


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


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
    model: UNet,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    *,
    peer: str = "torchcfm",
) -> dict:
    """The Flax parameters of ``model`` from a peer's PyTorch state dict.

    Args:
        state_dict: PyTorch parameter names to arrays, e.g. ``{k: v.numpy() for k, v in
            module.state_dict().items()}`` of torchcfm's ``UNetModelWrapper`` or Meta's
            ``UNetModel`` (guided-diffusion's names; DDP's ``module.`` prefix is stripped).
        model: the fmjax network of the same configuration (``UNetCIFAR10TorchCFM()``,
            ``UNetCIFAR10Meta(num_classes=10)``, ...).
        input_shape: ``(height, width, channels)`` of its images; only the channels decide
            the parameters.
        peer: one of :data:`PEERS`: the attention layout and label rows of the state dict
            (see the module docstring).

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
    _check_choice("peer", peer, PEERS)
    leaves = _leaves(_check_model(model), tuple(input_shape), peer)
    given = _strip_prefix(list(state_dict))
    missing, misshaped, flat = [], [], {}
    for leaf in leaves:
        if leaf.torch not in given:
            missing.append(f"{leaf.torch} {leaf.torch_shape}")
            continue
        value = np.asarray(state_dict[given[leaf.torch]], np.float32)
        if value.shape != leaf.torch_shape:
            misshaped.append(f"{leaf.torch}: got {value.shape}, expected {leaf.torch_shape}")
            continue
        flat[leaf.flax] = np.ascontiguousarray(leaf.to_flax(value))
    known = {leaf.torch for leaf in leaves}
    unexpected = sorted(given[name] for name in given if name not in known)
    if missing or misshaped or unexpected:
        raise ValueError(
            f"The state dict is not the {peer} PyTorch network of this {type(model).__name__} "
            f"configuration ({_describe(model)}): {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(misshaped)} mis-shaped. Is the preset (and the peer, --source) "
            "the one the checkpoint was trained with?\n"
            + "".join(
                f"{title}:\n  " + "\n  ".join(names) + "\n"
                for title, names in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("mis-shaped", misshaped),
                )
                if names
            ).rstrip()
        )
    return _unflatten(flat)


def params_to_torch(
    params: Mapping[str, Any],
    model: UNet,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    *,
    peer: str = "torchcfm",
) -> dict[str, np.ndarray]:
    """The peer's PyTorch state dict (NumPy float32 arrays under guided-diffusion's names) of
    the Flax parameters ``params`` of ``model``: the inverse of :func:`params_from_torch`.

    Load it into the peer's network with ``net.load_state_dict({k: torch.from_numpy(v) for
    k, v in state_dict.items()})``. For ``peer="torchcfm"`` a conditional model's null-label
    row is dropped (torchcfm's embedding has none), so only that row does not round-trip.

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
    _check_choice("peer", peer, PEERS)
    leaves = _leaves(_check_model(model), tuple(input_shape), peer)
    flat = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing = [
        f"{'/'.join(leaf.flax)} {leaf.flax_shape}" for leaf in leaves if leaf.flax not in flat
    ]
    misshaped = [
        f"{'/'.join(leaf.flax)}: got {np.shape(flat[leaf.flax])}, expected {leaf.flax_shape}"
        for leaf in leaves
        if leaf.flax in flat and np.shape(flat[leaf.flax]) != leaf.flax_shape
    ]
    known = {leaf.flax for leaf in leaves}
    unexpected = sorted("/".join(path) for path in flat if path not in known)
    if missing or misshaped or unexpected:
        raise ValueError(
            f"params are not those of this {type(model).__name__} ({_describe(model)}): "
            f"missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}."
        )
    return {
        leaf.torch: np.ascontiguousarray(leaf.to_torch(np.asarray(flat[leaf.flax], np.float32)))
        for leaf in leaves
    }


def _architecture(model: UNet) -> dict[str, Any]:
    out = {}
    for name in _ARCHITECTURE:
        value = getattr(model, name)
        out[name] = list(value) if isinstance(value, tuple | list) else value
    return out


def _describe(model: UNet) -> str:
    return ", ".join(f"{k}={v}" for k, v in _architecture(model).items())


# --- checkpoint files ----------------------------------------------------------------------


def _torch_load(path: pathlib.Path) -> Any:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"Reading the PyTorch checkpoint {path} needs PyTorch (`pip install torch`, the CPU "
            "build is enough); or convert it elsewhere with `python -m experiments.convert` and "
            "pass the .npz."
        ) from None
    if not path.is_file():
        raise ValueError(f"No checkpoint at {path}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a complete PyTorch checkpoint: it has no zip directory (a truncated "
            "download, or a file not written by torch.save)."
        )
    # weights_only=True: PyTorch's restricted unpickler, which builds tensors and plain
    # containers and refuses every other object; Meta's checkpoints also hold their
    # argparse.Namespace of arguments, the one class allowed besides.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's refusal is pickle.UnpicklingError
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            first = str(error).strip().splitlines()[0]
            raise ValueError(
                f"{path} holds objects other than tensors and plain containers ({first}); "
                "fmjax reads weights only and never runs a pickle's code."
            ) from None
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}): truncated or "
            "corrupt."
        ) from None


def _numpy_state_dict(state_dict: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{what} is a {type(state_dict).__name__}, not a state dict.")
    out = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] is a {type(value).__name__}, not a tensor.")
        out[name] = value.detach().to(torch.float32).numpy()
    return out


def load_torch_checkpoint(
    path: str | os.PathLike, *, source: str = "torchcfm", weights: str = "ema"
) -> dict[str, np.ndarray]:
    """The U-Net state dict (names to float32 NumPy arrays) in a peer's training checkpoint,
    read by ``torch.load(weights_only=True)`` (needs PyTorch; no other pickle code runs).

    - ``source="torchcfm"``: torchcfm's ``train_cifar10.py`` checkpoints (``{"net_model",
      "ema_model", "sched", "optim", "step"}``) and its released
      ``*_cifar10_weights_step_400000.pt``; ``weights`` picks ``ema_model`` or ``net_model``.
    - ``source="meta"``: Meta's ``flow_matching`` example checkpoints (``{"model",
      "optimizer", "args", ...}``, ``model`` the EMA wrapper's state dict: the trained
      network under ``model.<name>``, ``num_updates``, and the EMA weights as
      ``shadow_params.<i>`` in the order of the network's parameters).
    - A file holding a bare state dict (names to tensors) is returned as it is.

    Pass the result to :func:`params_from_torch` with ``peer=source``.

    Raises:
        ValueError: for a missing, truncated or corrupt file, a pickle holding anything but
            tensors and plain containers, or a checkpoint without the expected entries.

    Example::

        sd = load_torch_checkpoint("otcfm_cifar10_weights_step_400000.pt")
        params = params_from_torch(sd, UNetCIFAR10TorchCFM())
    """
    _check_choice("source", source, TORCH_SOURCES)
    _check_choice("weights", weights, TORCH_WEIGHTS)
    path = pathlib.Path(path)
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    if checkpoint and all(hasattr(v, "shape") for v in checkpoint.values()):
        return _numpy_state_dict(checkpoint, str(path))
    if source == "torchcfm":
        key = {"ema": "ema_model", "raw": "net_model"}[weights]
        if key not in checkpoint:
            raise ValueError(
                f"{path} has no {key!r} entry, so it is not a torchcfm training checkpoint "
                f"(entries: {sorted(map(str, checkpoint))}); --source=meta for Meta's."
            )
        return _numpy_state_dict(checkpoint[key], f"{path}[{key!r}]")
    if "model" not in checkpoint:
        raise ValueError(
            f"{path} has no 'model' entry, so it is not a Meta flow_matching checkpoint "
            f"(entries: {sorted(map(str, checkpoint))}); --source=torchcfm for torchcfm's."
        )
    wrapper = _numpy_state_dict(checkpoint["model"], f"{path}['model']")
    names = [k[len("model.") :] for k in wrapper if k.startswith("model.")]
    if weights == "raw":
        return {name: wrapper[f"model.{name}"] for name in names}
    shadow = [k for k in wrapper if k.startswith("shadow_params.")]
    if len(shadow) != len(names) or any(
        f"shadow_params.{i}" not in wrapper for i in range(len(names))
    ):
        raise ValueError(
            f"{path}['model'] is not Meta's EMA wrapper: {len(names)} model.* parameters but "
            f"{len(shadow)} shadow_params.* (expected shadow_params.0 ... "
            f"shadow_params.{len(names) - 1}, one per parameter in order); --weights=raw reads "
            "the model.* weights alone."
        )
    out = {}
    for i, name in enumerate(names):
        value = wrapper[f"shadow_params.{i}"]
        if value.shape != wrapper[f"model.{name}"].shape:
            raise ValueError(
                f"{path}['model']: shadow_params.{i} has shape {value.shape} but parameter {i}, "
                f"{name}, has {wrapper[f'model.{name}'].shape}: not Meta's EMA wrapper layout."
            )
        out[name] = value
    return out


def save_params(
    path: str | os.PathLike, params: Mapping[str, Any], model: UNet, *, preset: str
) -> None:
    """Writes ``params`` of ``model`` to an ``.npz`` (keys ``params/<flax path>``) with the
    preset name and the model's configuration recorded (``meta/preset``,
    ``meta/architecture`` as JSON); plain arrays only, written beside ``path`` then renamed, so
    a crash never leaves half a file.

    Example:
        >>> import jax, numpy as np, tempfile, os
        >>> from fmjax.models import UNetTiny, load_params, save_params
        >>> params = UNetTiny().init(jax.random.key(0), np.zeros((1, 8, 8, 1)), np.zeros(1))
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.npz")
        >>> save_params(path, params["params"], UNetTiny(), preset="unet_tiny")
        >>> loaded = load_params(path, UNetTiny(), preset="unet_tiny")
        >>> bool((loaded["conv_in"]["kernel"] == params["params"]["conv_in"]["kernel"]).all())
        True
    """
    _check_model(model)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {"params/" + "/".join(k.key for k in p): np.asarray(v, np.float32) for p, v in flat}
    arrays["meta/format"] = np.asarray(_FORMAT)
    arrays["meta/preset"] = np.asarray(preset)
    arrays["meta/architecture"] = np.asarray(json.dumps(_architecture(model)))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path)


def load_params(path: str | os.PathLike, model: UNet, *, preset: str | None = None) -> dict:
    """The parameters :func:`save_params` wrote to ``path`` (read without pickle), checked
    against ``model``: the recorded configuration, then every name and shape.

    Args:
        path: the ``.npz``.
        model: the network they are for.
        preset: if given, the preset name the file must record.

    Raises:
        ValueError: for a missing or unreadable file, a file of another preset or
            configuration, or missing, unexpected or mis-shaped parameters.

    Example: see :func:`save_params`.
    """
    _check_model(model)
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"No parameters at {path}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"{path} cannot be read as an .npz of plain arrays ({error}): truncated, or not "
            "written by save_params (fmjax never unpickles a file)."
        ) from None
    if str(stored.get("meta/format", "")) != _FORMAT:
        raise ValueError(
            f"{path} is not an fmjax parameter file (no meta/format = {_FORMAT!r}); convert a "
            "PyTorch checkpoint with `python -m experiments.convert`."
        )
    recorded_preset = str(stored["meta/preset"])
    if preset is not None and recorded_preset != preset:
        raise ValueError(
            f"{path} holds parameters of preset {recorded_preset!r}, not {preset!r}: set "
            f"--config.model.name={recorded_preset} (or the recipe that uses it)."
        )
    recorded = json.loads(str(stored["meta/architecture"]))
    expected = _architecture(model)
    diff = {k: (recorded.get(k), v) for k, v in expected.items() if recorded.get(k) != v}
    if diff:
        raise ValueError(
            f"{path} holds parameters of preset {recorded_preset!r} with another configuration: "
            + ", ".join(f"{k}={a!r} in the file, {b!r} in the model" for k, (a, b) in diff.items())
            + "."
        )
    flat = {tuple(k.split("/")[1:]): v for k, v in stored.items() if k.startswith("params/")}
    params = _unflatten(flat)
    in_channels = flat.get(("conv_in", "kernel"), np.zeros((1, 1, 1, 1))).shape[2]
    # Names and shapes: exactly the export's check.
    params_to_torch(params, model, (1, 1, in_channels))
    return params
