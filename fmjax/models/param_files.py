r"""Parameter files of the peers' networks: PyTorch checkpoints read without running a pickle,
and fmjax's ``.npz`` of converted parameters.

:func:`load_torch_checkpoint` reads torchcfm's and Meta's training checkpoints with PyTorch's
restricted ``weights_only`` unpickler (nothing else of a pickle runs); :func:`save_params` and
:func:`load_params` keep converted parameters (:func:`fmjax.models.params_from_torch`) in an
``.npz`` with the preset and configuration recorded, read back without pickle and checked.
"""

import argparse
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from fmjax.models.dit import DiT
from fmjax.models.torch_params import (
    PEERS,
    _architecture,
    _check_choice,
    _check_model,
    params_to_torch,
)
from fmjax.models.unet import UNet

__all__ = [
    "TORCH_SOURCES",
    "TORCH_WEIGHTS",
    "load_params",
    "load_torch_checkpoint",
    "save_params",
]

TORCH_SOURCES = (*PEERS, "sit")
"""The checkpoint layouts :func:`load_torch_checkpoint` reads: ``"torchcfm"`` (``{"net_model",
"ema_model", ...}``), ``"meta"`` (``{"model": EMA-wrapper state dict, "optimizer", "args",
...}``) and ``"sit"`` (SiT's and DiT's ``train.py``: ``{"model", "ema", "opt", "args"}``)."""

TORCH_WEIGHTS = ("ema", "raw")
"""Which weights of a training checkpoint: the EMA (what the peers sample and score) or the raw
trained ones."""

_FORMAT = "fmjax-params-v1"


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
    - ``source="sit"``: SiT's (and DiT's) ``train.py`` checkpoints (``{"model", "ema",
      "opt", "args"}``); ``weights`` picks ``ema`` or ``model``.
    - A file holding a bare state dict (names to tensors) is returned as it is: the released
      ``SiT-XL-2-256x256.pt`` and ``DiT-XL-2-256x256.pt`` are such files.

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

    def entry(key: str, kind: str, hint: str = "") -> dict[str, np.ndarray]:
        # The state dict under `key` of a checkpoint of `kind`; `hint` names another source.
        if key not in checkpoint:
            raise ValueError(
                f"{path} has no {key!r} entry, so it is not {kind} "
                f"(entries: {sorted(map(str, checkpoint))}){hint}."
            )
        return _numpy_state_dict(checkpoint[key], f"{path}[{key!r}]")

    if source == "torchcfm":
        key = {"ema": "ema_model", "raw": "net_model"}[weights]
        return entry(key, "a torchcfm training checkpoint", "; --source=meta for Meta's")
    if source == "sit":
        key = {"ema": "ema", "raw": "model"}[weights]
        return entry(key, "a SiT or DiT training checkpoint")
    wrapper = entry(
        "model", "a Meta flow_matching checkpoint", "; --source=torchcfm for torchcfm's"
    )
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
    path: str | os.PathLike, params: Mapping[str, Any], model: UNet | DiT, *, preset: str
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


def load_params(path: str | os.PathLike, model: UNet | DiT, *, preset: str | None = None) -> dict:
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
    params = traverse_util.unflatten_dict(flat)
    first = ("patch_embed", "kernel") if isinstance(model, DiT) else ("conv_in", "kernel")
    in_channels = flat.get(first, np.zeros((1, 1, 1, 1))).shape[2]
    side = model.patch_size if isinstance(model, DiT) else 1
    # Names and shapes: exactly the export's check.
    params_to_torch(params, model, (side, side, in_channels))
    return params
