"""A peer's PyTorch U-Net checkpoint to an fmjax parameter file, and back.

    python -m experiments.convert --in=CKPT.pt --out=PARAMS.npz --preset=NAME \\
        [--source=torchcfm|meta] [--weights=ema|raw] [--num_classes=N]
    python -m experiments.convert --in=PARAMS.npz --out=STATE_DICT.pt --preset=NAME --to_torch \\
        [--source=torchcfm|meta] [--num_classes=N]

The first form reads torchcfm's training checkpoints (``{"net_model", "ema_model", ...}``,
e.g. the released ``otcfm_cifar10_weights_step_400000.pt``) or Meta ``flow_matching``'s
(``{"model": EMA wrapper, "optimizer", "args", ...}``) with ``torch.load(weights_only=True)``,
maps the chosen weights onto the preset (:func:`fmjax.models.params_from_torch`) and writes an
``.npz`` with the preset and configuration recorded (:func:`fmjax.models.save_params`), which
``experiments.cifar10 --mode=sample|eval --params=...`` reads without PyTorch. The second form
writes the peer's state dict of an fmjax parameter file (``torch.save``), which the peer's
network loads with ``load_state_dict``. Both need PyTorch (the CPU build is enough). Bad input
exits with status 2 and one ``error: ...`` line.
"""

import argparse
import os
from collections.abc import Sequence

from fmjax import models

__all__ = ["convert", "export", "main"]


def _model(preset: str, num_classes: int | None):
    if preset not in models.PRESETS:
        raise ValueError(
            f"--preset={preset!r} is not a known model; expected one of {sorted(models.PRESETS)}."
        )
    return models.PRESETS[preset](num_classes=num_classes)


def convert(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    preset: str,
    *,
    source: str = "torchcfm",
    weights: str = "ema",
    num_classes: int | None = None,
) -> dict:
    """Converts a peer's PyTorch checkpoint into an fmjax ``.npz`` for ``preset``; returns the
    parameters.

    Raises:
        ValueError: for an unknown preset, or any error of
            :func:`fmjax.models.load_torch_checkpoint` and :func:`fmjax.models.params_from_torch`.

    Example::

        convert("otcfm_cifar10_weights_step_400000.pt", "otcfm.npz", "unet_cifar10_torchcfm")
    """
    model = _model(preset, num_classes)
    state_dict = models.load_torch_checkpoint(checkpoint, source=source, weights=weights)
    params = models.params_from_torch(state_dict, model, peer=source)
    models.save_params(out, params, model, preset=preset)
    return params


def export(
    params_file: str | os.PathLike,
    out: str | os.PathLike,
    preset: str,
    *,
    source: str = "torchcfm",
    num_classes: int | None = None,
) -> None:
    """Writes the peer's state dict (``torch.save`` of a dict of tensors) of an fmjax ``.npz``.

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
    params = models.load_params(params_file, model, preset=preset)
    in_channels = params["conv_in"]["kernel"].shape[2]
    state_dict = models.params_to_torch(params, model, (1, 1, in_channels), peer=source)
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, out)


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
    parser.add_argument("--source", default="torchcfm", choices=models.TORCH_SOURCES)
    parser.add_argument("--weights", default="ema", choices=models.TORCH_WEIGHTS)
    parser.add_argument("--num_classes", type=int, default=None, help="a conditional network")
    parser.add_argument(
        "--to_torch", action="store_true", help="export an fmjax .npz as the peer's state dict"
    )
    args = parser.parse_args(argv)
    try:
        if args.to_torch:
            export(
                args.source_file,
                args.out,
                args.preset,
                source=args.source,
                num_classes=args.num_classes,
            )
        else:
            convert(
                args.source_file,
                args.out,
                args.preset,
                source=args.source,
                weights=args.weights,
                num_classes=args.num_classes,
            )
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
