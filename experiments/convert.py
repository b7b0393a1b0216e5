"""A peer's PyTorch checkpoint (a U-Net's, or a SiT/DiT transformer's) to an fmjax parameter
file, and back.

    python -m experiments.convert --in=CKPT.pt --out=PARAMS.npz --preset=NAME \\
        [--source=torchcfm|meta|sit] [--weights=ema|raw] [--num_classes=N] [--input_shape=H,W,C]
    python -m experiments.convert --in=PARAMS.npz --out=STATE_DICT.pt --preset=NAME --to_torch \\
        [--source=torchcfm|meta|sit] [--num_classes=N] [--input_shape=H,W,C]

The first form reads torchcfm's training checkpoints (``{"net_model", "ema_model", ...}``,
e.g. the released ``otcfm_cifar10_weights_step_400000.pt``), Meta ``flow_matching``'s
(``{"model": EMA wrapper, "optimizer", "args", ...}``) or SiT's and DiT's (``train.py``'s
``{"model", "ema", "opt", "args"}``, or a bare state dict such as the released
``SiT-XL-2-256x256.pt``) with ``torch.load(weights_only=True)``, maps the chosen weights onto
the preset (:func:`fmjax.models.params_from_torch`) and writes an ``.npz`` with the preset and
configuration recorded (:func:`fmjax.models.save_params`), which ``experiments.cifar10
--mode=sample|eval --params=...`` reads without PyTorch. The second form writes the peer's
state dict of an fmjax parameter file (``torch.save``), which the peer's network loads with
``load_state_dict``. Both need PyTorch (the CPU build is enough). Bad input exits with status
2 and one ``error: ...`` line.

Defaults follow the preset: ``--source`` is ``sit`` for a transformer (``sit_*``, ``dit_*``)
and ``torchcfm`` for a U-Net; ``--num_classes`` is the preset's own (1,000 for SiT's, none
for the U-Nets; 0 makes the network unconditional); ``--input_shape`` is ``32,32,4`` for a
transformer (256x256 images as SD-VAE latents: it decides the token grid whose ``pos_embed``
is checked and exported) and ``32,32,3`` for a U-Net (only its channels matter); an export
takes the channels from the file.
"""

import argparse
import os
from collections.abc import Sequence

from fmjax import models

__all__ = ["DEFAULT_INPUT_SHAPES", "convert", "export", "main"]

DEFAULT_INPUT_SHAPES = {"transformer": (32, 32, 4), "unet": (32, 32, 3)}
"""``--input_shape`` when not given: a transformer's ImageNet 256x256 latents, a U-Net's
CIFAR-10 images."""


def _model(preset: str, num_classes: int | None):
    """The preset's network; ``num_classes`` None keeps the preset's own, 0 is unconditional."""
    if preset not in models.PRESETS:
        raise ValueError(
            f"--preset={preset!r} is not a known model; expected one of {sorted(models.PRESETS)}."
        )
    if num_classes is None:
        return models.PRESETS[preset]()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(
            f"--num_classes={num_classes!r} is not valid; expected an integer >= 0 (0: an "
            "unconditional network)."
        )
    return models.PRESETS[preset](num_classes=num_classes or None)


def _input_shape(model, input_shape) -> tuple[int, int, int]:
    if input_shape is None:
        kind = "transformer" if isinstance(model, models.DiT) else "unet"
        return DEFAULT_INPUT_SHAPES[kind]
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise ValueError(
            f"--input_shape={input_shape!r} is not valid; expected three positive integers "
            "H,W,C (e.g. 32,32,4 for 256x256 images as latents)."
        )
    if isinstance(model, models.DiT):
        model.check_image_shape(shape)
    return shape


def _source(model, source: str | None) -> str:
    if source is not None:
        return source
    return "sit" if isinstance(model, models.DiT) else "torchcfm"


def convert(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    preset: str,
    *,
    source: str | None = None,
    weights: str = "ema",
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> dict:
    """Converts a peer's PyTorch checkpoint into an fmjax ``.npz`` for ``preset``; returns the
    parameters.

    Args:
        checkpoint: the ``.pt``/``.pth`` file.
        out: the ``.npz`` to write.
        preset: a name of :data:`fmjax.models.PRESETS`.
        source: the checkpoint's layout (:data:`fmjax.models.TORCH_SOURCES`); None: ``"sit"``
            for a transformer, ``"torchcfm"`` for a U-Net.
        weights: ``"ema"`` or ``"raw"`` (a training checkpoint's).
        num_classes: the class count; None keeps the preset's own, 0 is unconditional.
        input_shape: ``(height, width, channels)`` of the network's inputs; None: see
            :data:`DEFAULT_INPUT_SHAPES`.

    Raises:
        ValueError: for an unknown preset, a bad ``num_classes`` or ``input_shape``, or any
            error of :func:`fmjax.models.load_torch_checkpoint` and
            :func:`fmjax.models.params_from_torch`.

    Example::

        convert("otcfm_cifar10_weights_step_400000.pt", "otcfm.npz", "unet_cifar10_torchcfm")
        convert("SiT-XL-2-256x256.pt", "sit_xl_2.npz", "sit_xl_2")  # 32x32x4, 1,000 classes
    """
    model = _model(preset, num_classes)
    shape = _input_shape(model, input_shape)
    source = _source(model, source)
    state_dict = models.load_torch_checkpoint(checkpoint, source=source, weights=weights)
    params = models.params_from_torch(state_dict, model, shape, peer=source)
    models.save_params(out, params, model, preset=preset)
    return params


def export(
    params_file: str | os.PathLike,
    out: str | os.PathLike,
    preset: str,
    *,
    source: str | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Writes the peer's state dict (``torch.save`` of a dict of tensors) of an fmjax ``.npz``;
    the arguments are :func:`convert`'s, but ``input_shape`` None takes the channels from the
    file (the input layer's kernel: a U-Net's ``conv_in``, a transformer's ``patch_embed``)
    and the height and width of :data:`DEFAULT_INPUT_SHAPES`. A transformer's state dict holds
    SiT's ``pos_embed`` buffer for the token grid of that shape.

    Example::

        export("otcfm.npz", "otcfm_state_dict.pt", "unet_cifar10_torchcfm")
        # in PyTorch: net.load_state_dict(torch.load("otcfm_state_dict.pt", weights_only=True))
    """
    try:
        import torch
    except ImportError:
        raise ValueError(
            "Writing a PyTorch state dict needs PyTorch (`pip install torch`)."
        ) from None
    model = _model(preset, num_classes)
    shape = _input_shape(model, input_shape)
    params = models.load_params(params_file, model, preset=preset)
    if input_shape is None:
        first = params["patch_embed" if isinstance(model, models.DiT) else "conv_in"]["kernel"]
        shape = (*shape[:2], first.shape[2])  # HWIO: the input channels
    state_dict = models.params_to_torch(params, model, shape, peer=_source(model, source))
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, out)


def _shape_flag(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input_shape={text!r} must be three positive integers H,W,C."
        ) from None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.convert ...``; ``--help`` for the flags.

    Bad input (a ``ValueError`` or ``OSError``) exits with status 2 and ``error: <message>``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m experiments.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--in", dest="source_file", required=True, help="the file to read")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--preset", required=True, help=f"one of {sorted(models.PRESETS)}")
    parser.add_argument(
        "--source",
        default=None,
        choices=models.TORCH_SOURCES,
        help="the checkpoint's layout (default: sit for a transformer, torchcfm for a U-Net)",
    )
    parser.add_argument("--weights", default="ema", choices=models.TORCH_WEIGHTS)
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="classes of a conditional network, 0: unconditional (default: the preset's own)",
    )
    parser.add_argument(
        "--input_shape",
        type=_shape_flag,
        default=None,
        help="H,W,C of the network's inputs (default: 32,32,4 latents for a transformer, "
        "32,32,3 for a U-Net)",
    )
    parser.add_argument(
        "--to_torch", action="store_true", help="export an fmjax .npz as the peer's state dict"
    )
    args = parser.parse_args(argv)
    shared = {
        "source": args.source,
        "num_classes": args.num_classes,
        "input_shape": args.input_shape,
    }
    try:
        if args.to_torch:
            export(args.source_file, args.out, args.preset, **shared)
        else:
            convert(args.source_file, args.out, args.preset, weights=args.weights, **shared)
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
