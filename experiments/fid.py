"""FID's one-off steps: convert the Inception weights, and compute reference statistics.

    python -m experiments.fid convert --in=pt_inception-2015-12-05-6726825d.pth --out=inception.npz
    python -m experiments.fid download [--cache_dir=DIR]
    python -m experiments.fid stats --dataset=cifar10 [--split=train] [--weights=inception.npz] \\
        --out=cifar10_train.npz [--data_dir=DIR] [--batch_size=256] [--protocol=legacy-tensorflow] \\
        [--flips]

``convert`` turns pytorch-fid's ``.pth`` weights into the pickle-free ``.npz`` that
:func:`fmjax.metrics.fid.load_inception` reads (needs PyTorch, for this step only);
``download`` fetches them, checks their sha256 prefix and converts them into the cache
(``$FMJAX_CACHE``, default ``~/.cache/fmjax``); ``stats`` writes the Inception statistics of
every image of a tfds split (``mu``, ``sigma``: pytorch-fid's keys), what
``--config.fid.stats`` of ``experiments.cifar10`` scores against. Bad input (a missing or wrong
file, a bad name) exits with status 2 and one ``error: ...`` line.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

import jax

from fmjax.metrics import fid, inception

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.fid convert|download|stats ...``; ``--help`` for the flags.

    Bad input (a ``ValueError`` or ``OSError``) exits with status 2 and ``error: <message>``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m experiments.fid", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="pytorch-fid .pth weights to a pickle-free .npz")
    convert.add_argument(
        "--in", dest="pth", required=True, help="pt_inception-2015-12-05-6726825d.pth"
    )
    convert.add_argument("--out", required=True, help="the .npz to write")
    download = commands.add_parser("download", help="download and convert into the cache")
    download.add_argument(
        "--cache_dir", default=None, help=f"default: {inception.default_weights_path().parent}"
    )
    stats = commands.add_parser("stats", help="reference statistics of a tfds split")
    stats.add_argument("--dataset", required=True, help="a tfds name, e.g. cifar10")
    stats.add_argument("--split", default="train")
    stats.add_argument("--data_dir", default=None, help="tfds data directory")
    stats.add_argument("--weights", default=None, help="converted .npz (default: the cache)")
    stats.add_argument("--out", required=True, help="the .npz statistics to write")
    stats.add_argument("--batch_size", type=int, default=fid.DEFAULT_BATCH_SIZE)
    stats.add_argument(
        "--protocol",
        choices=fid.FID_PROTOCOLS,
        default=fid.DEFAULT_PROTOCOL,
        help="how images reach Inception (recorded in the file; default: %(default)s)",
    )
    stats.add_argument(
        "--flips",
        action="store_true",
        help="fit every image and its mirror image (Meta's example scores against flipped data)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        _run_command(args)
    except (ValueError, OSError) as error:
        # Bad input (a missing or wrong file, a bad name): its message, not a traceback.
        parser.exit(2, f"error: {error}\n")


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "convert":
        inception.convert_file(args.pth, args.out)
        log.info("wrote %s", args.out)
    elif args.command == "download":
        log.info("weights at %s", inception.download_weights(args.cache_dir))
    else:
        features = fid.load_inception(
            args.weights, batch_size=args.batch_size, protocol=args.protocol
        )
        result = fid.dataset_statistics(
            args.dataset, args.split, features, data_dir=args.data_dir, flips=args.flips
        )
        if jax.process_index() == 0:
            fid.save_statistics(
                args.out, result, dataset=args.dataset, split=args.split, flips=str(args.flips)
            )
        log.info("wrote %s (%d images, %s protocol)", args.out, result.num_examples, args.protocol)


if __name__ == "__main__":
    main(sys.argv[1:])
