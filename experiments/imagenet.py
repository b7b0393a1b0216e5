"""ImageNet 256 in latent space: encode a tfds image dataset with the Stable Diffusion VAE.

    python -m experiments.imagenet --mode=encode --workdir=DIR [--dataset=imagenet2012]
        [--split=train] [--data_dir=TFDS_DIR] [--vae=diffusion_pytorch_model.safetensors]
        [--image_size=256] [--shard_size=4096] [--batch_size=64] [--noflip] [--seed=0]
        [--max_shards=N] [--distributed]

reads the tfds dataset (prepared as ArrayRecord, as :class:`fmjax.data.TfdsSource` reads it),
crops every image as ADM does (:func:`fmjax.latents.center_crop_arr`), encodes it and its
horizontal flip over every local device and writes the posteriors' mean and std with the
labels as shards into ``DIR/latents`` (:func:`fmjax.latents.encode_dataset`). Running the same
command again resumes an interrupted encoding. With ``--distributed`` (the same command on
every host of a pod slice, the workdir on storage they share), process ``p`` of ``P`` encodes
the shards ``k`` with ``k mod P = p`` on its local devices. ``--vae`` is the SD VAE's diffusers
safetensors file (``stabilityai/sd-vae-ft-ema``), fingerprinted by its sha256; without it a
``VAETiny`` with random weights from ``--seed`` encodes (for tests), fingerprinted by its
parameters. Train on the result with ``config.data.name = "latents"`` and
``config.data.latents_dir = DIR/latents`` (docs/latents.md).
"""

import logging
import pathlib

import jax
import numpy as np
from absl import flags

from experiments import common
from fmjax import latents
from fmjax.data import TfdsSource
from fmjax.models import SDVAE, VAETiny, load_vae_safetensors

FLAGS = flags.FLAGS
MODES = ("encode",)


def define_flags() -> None:
    """The command-line flags; defined only when run as a program."""
    flags.DEFINE_enum("mode", None, list(MODES), "What to do.")
    flags.DEFINE_string("workdir", None, "The job's directory; the latents go to WORKDIR/latents.")
    flags.DEFINE_string("dataset", "imagenet2012", "encode: a tfds image dataset name.")
    flags.DEFINE_string("split", "train", "encode: the tfds split.")
    flags.DEFINE_string("data_dir", None, "encode: where the tfds dataset is prepared.")
    flags.DEFINE_string(
        "vae", None, "encode: the SD VAE's diffusers .safetensors (none: a random VAETiny)."
    )
    flags.DEFINE_integer("image_size", 256, "encode: the side of ADM's centre crops.")
    flags.DEFINE_integer("shard_size", 4096, "encode: images per shard (flips not counted).")
    flags.DEFINE_integer("batch_size", 64, "encode: images per encoder call.")
    flags.DEFINE_bool("flip", True, "encode: also store every image's horizontal flip.")
    flags.DEFINE_integer("seed", 0, "encode without --vae: the seed of the random VAETiny.")
    flags.DEFINE_integer("max_shards", None, "encode: stop after encoding this many shards.")
    flags.DEFINE_bool(
        "distributed", False, "Multi-process launch: call jax.distributed.initialize() first."
    )
    flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0.")
    flags.DEFINE_integer("num_processes", None, "--distributed: the number of processes.")
    flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")


def build_vae(path: str | None, image_size: int, seed: int):
    """The VAE, its parameters and their record: the SD VAE from ``path``, or a VAETiny with
    random weights from ``seed``."""
    if path is not None:
        vae = SDVAE()
        params = load_vae_safetensors(path, vae)
        info = latents.vae_record(vae, latents.file_fingerprint(path), pathlib.Path(path).name)
        return vae, params, info
    vae = VAETiny()
    shape = (1, image_size, image_size, 3)
    params = vae.init(jax.random.key(seed), np.zeros(shape, np.float32))["params"]
    weights = f"random VAETiny, seed {seed}"
    return vae, params, latents.vae_record(vae, latents.params_fingerprint(params), weights)


def encode() -> latents.EncodeInfo:
    source = TfdsSource(
        FLAGS.dataset, FLAGS.split, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size
    )
    vae, params, info = build_vae(FLAGS.vae, FLAGS.image_size, FLAGS.seed)
    logging.info(
        "Encoding %d images of %s[%s] with %s", source.num_examples, FLAGS.dataset, FLAGS.split,
        info["weights"],
    )  # fmt: skip
    return latents.encode_dataset(
        pathlib.Path(FLAGS.workdir) / "latents",
        source.example,
        source.num_examples,
        vae=vae,
        params=params,
        vae_info=info,
        image_size=FLAGS.image_size,
        num_classes=source.num_classes,
        flip=FLAGS.flip,
        shard_size=FLAGS.shard_size,
        batch_size=FLAGS.batch_size,
        dataset={"name": FLAGS.dataset, "split": FLAGS.split},
        max_shards=FLAGS.max_shards,
    )


def main(argv):
    del argv
    if FLAGS.distributed:
        # Every process must join before JAX picks its backend, i.e. before any device use.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    common.setup()
    for name in ("mode", "workdir"):
        if FLAGS[name].value is None:
            raise ValueError(f"--{name} is required (python -m experiments.imagenet --help).")
    info = encode()
    print(
        f"{info.num_images} images in {info.directory} ({info.num_shards} shards, "
        f"{info.encoded} encoded now, {info.images_per_sec:.1f} images/s); train on them with "
        f"--config.data.name=latents --config.data.latents_dir={info.directory}",
        flush=True,
    )


if __name__ == "__main__":
    common.run(main, define_flags)
