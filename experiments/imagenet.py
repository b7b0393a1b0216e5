"""ImageNet 256 in latent space: encode a tfds image dataset with the Stable Diffusion VAE,
train a SiT on the latents, sample and decode, and score the decoded samples by FID.

    python -m experiments.imagenet --mode=encode --workdir=DIR [--dataset=imagenet2012]
        [--split=train] [--data_dir=TFDS_DIR] [--vae=diffusion_pytorch_model.safetensors]
        [--image_size=256] [--shard_size=4096] [--batch_size=64] [--noflip] [--seed=0]
        [--max_shards=N] [--distributed]
    python -m experiments.imagenet --mode=train --workdir=RUN \
        --config=experiments/configs/imagenet.py[:sit_xl_2|sit_b_2|smoke] \
        --config.data.latents_dir=DIR/latents [--config.vae.path=VAE.safetensors] [--distributed]
    python -m experiments.imagenet --mode=sample --workdir=RUN [--vae=VAE.safetensors]
        [--num_samples=64] [--guidance_scale=1.5] [--guidance_interval=0,1] [--solver=heun]
        [--steps=50] [--torch_checkpoint=SiT-XL-2-256x256.pt] [--guidance_channels=3
        --solver=sde --steps=250 --sde_last_step_size=0.04: SiT's released sampler]
    python -m experiments.imagenet --mode=eval --workdir=RUN
        --fid_stats=VIRTUAL_imagenet256_labeled.npz [--eval_samples=50000]
        [--inception=inception.npz] [the sampling flags of --mode=sample]

``--mode=encode`` reads the tfds dataset (prepared as ArrayRecord, as
:class:`fmjax.data.TfdsSource` reads it), crops every image as ADM does
(:func:`fmjax.latents.center_crop_arr`), encodes it and its horizontal flip over every local
device and writes the posteriors' mean and std with the labels as shards into ``DIR/latents``
(:func:`fmjax.latents.encode_dataset`). Running the same command again resumes an
interrupted encoding. With ``--distributed`` (the same command on every host of a pod slice,
the workdir on storage they share), process ``p`` of ``P`` encodes the shards ``k`` with ``k
mod P = p`` on its local devices. ``--vae`` is the SD VAE's diffusers safetensors file
(``stabilityai/sd-vae-ft-ema``), fingerprinted by its sha256; without it a ``VAETiny`` with
random weights from ``--seed`` encodes (for tests), fingerprinted by its parameters.

``--mode=train`` trains (or resumes) the run in ``--workdir`` on the latents with
:func:`fmjax.train.train_and_evaluate`; its grids every ``config.train.sample_every`` steps
are decoded to images (``RUN/samples/step_*.png``) by the VAE of ``config.vae`` (the SD VAE's
``.safetensors``, or the random ``VAETiny`` of seed ``config.vae.seed`` that the latents were
encoded with). ``--mode=sample`` samples latents from the run's EMA parameters (with
classifier-free guidance, scale ``--guidance_scale``, 1.5 by default, only at the times of
``--guidance_interval`` when given), divides them by the VAE's scaling factor, decodes them
and writes ``RUN/samples/*.png`` (a grid) and ``*.npz`` (``images_uint8``, ``labels``,
``nfe``, ...). ``--mode=eval`` scores ``--eval_samples`` decoded samples by FID against
reference statistics in ADM's format (``VIRTUAL_imagenet256_labeled.npz``: ``mu`` and
``sigma``, read without pickle). ``--torch_checkpoint`` samples or scores SiT's released
checkpoint (``SiT-XL-2-256x256.pt``) instead of a run, with the config's preset.
"""

import json
import logging
import os
import pathlib
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from experiments import common
from fmjax import images, latents, models, train
from fmjax.configs import build_model, build_path, validate
from fmjax.data import LATENTS_FILE, TfdsSource, read_latents_info
from fmjax.evaluate import EvalOptions
from fmjax.generate import (
    SampleOutput,
    SamplingOptions,
    check_sampler,
    class_labels,
    generate,
    initial_noise,
    make_velocity,
    sample_record,
    solve,
    velocity_binder,
    write_npz,
)
from fmjax.keys import Stream, stream_key
from fmjax.mesh import make_mesh
from fmjax.metrics import fid
from fmjax.models import SDVAE, VAETiny, load_vae_safetensors
from fmjax.rundir import RunArtifacts, load_run

__all__ = ["MODES", "build_decoder", "build_vae", "imported_network", "run"]

FLAGS = flags.FLAGS
_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "imagenet.py")
LATENT_SHAPE = (32, 32, 4)  # the SD VAE's latents of 256x256 images


def define_flags() -> None:
    """The command-line flags; defined only when run as a program (or by a test, once)."""
    if "mode" in FLAGS:
        return
    config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
    flags.DEFINE_enum("mode", None, ["encode", *MODES], "What to do.")
    flags.DEFINE_string(
        "workdir", None, "encode: the latents go to WORKDIR/latents; else the run's directory."
    )
    flags.DEFINE_string("dataset", "imagenet2012", "encode: a tfds image dataset name.")
    flags.DEFINE_string("split", "train", "encode: the tfds split.")
    flags.DEFINE_string("data_dir", None, "encode: where the tfds dataset is prepared.")
    flags.DEFINE_string(
        "vae",
        None,
        "The SD VAE's diffusers .safetensors (encode: none is a random VAETiny; sample/eval: "
        "default config.vae.path).",
    )
    flags.DEFINE_integer("image_size", 256, "encode: the side of ADM's centre crops.")
    flags.DEFINE_integer("shard_size", 4096, "encode: images per shard (flips not counted).")
    flags.DEFINE_integer("batch_size", 64, "encode: images per encoder call.")
    flags.DEFINE_bool("flip", True, "encode: also store every image's horizontal flip.")
    flags.DEFINE_integer("seed", 0, "encode without --vae: the seed of the random VAETiny.")
    flags.DEFINE_integer("max_shards", None, "encode: stop after encoding this many shards.")
    common.define_distributed_flags()
    common.define_sampling_flags("sample/eval", guidance_scale=1.5, batch_size=250)
    flags.DEFINE_integer("eval_samples", 50_000, "eval: decoded samples scored by FID.")
    flags.DEFINE_string("fid_stats", None, "eval: reference mu/sigma .npz (ADM's format).")
    flags.DEFINE_string("inception", None, "eval: converted Inception weights (default: cache).")
    flags.DEFINE_enum(
        "fid_protocol",
        None,
        list(fid.FID_PROTOCOLS),
        "eval: how images reach Inception (default: what --fid_stats records, else "
        f"{fid.DEFAULT_PROTOCOL}, which ADM's evaluator uses).",
    )
    flags.DEFINE_string(
        "torch_checkpoint", None, "sample/eval: SiT's released checkpoint (needs PyTorch)."
    )
    flags.DEFINE_enum(
        "torch_weights", "ema", list(models.TORCH_WEIGHTS), "--torch_checkpoint: which weights."
    )


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


def build_decoder(
    config: ml_collections.ConfigDict, vae_path: str | None = None
) -> Callable[[jax.Array], np.ndarray]:
    """``decode(z) -> images``: scaled latents ``[n, h, w, 4]`` (as trained on and sampled)
    to images ``[n, f h, f w, 3]`` in [-1, 1] (NumPy float32; ``f`` = 8 for the SD VAE),
    sharded over this process's devices, by the VAE at ``vae_path`` (default
    ``config.vae.path``), or the random ``VAETiny`` of seed ``config.vae.seed``.

    When ``config.data.latents_dir`` holds latents, the VAE must be the one that encoded them.

    Raises:
        ValueError: for a VAE whose fingerprint differs from the one recorded with the latents.
    """
    path = vae_path or config.vae.path
    recorded = None
    if config.data.latents_dir and (pathlib.Path(config.data.latents_dir) / LATENTS_FILE).exists():
        recorded = read_latents_info(config.data.latents_dir)
    # Only the random VAETiny's initialisation reads the size; its parameters do not depend on it.
    image_size = recorded["image_size"] if recorded else 16
    vae, params, info = build_vae(path, image_size, config.vae.seed)
    if recorded and recorded["vae"]["fingerprint"] != info["fingerprint"]:
        raise ValueError(
            f"The VAE {info['weights']!r} (fingerprint {info['fingerprint']}) is not the one "
            f"that encoded {config.data.latents_dir} ({recorded['vae']['weights']!r}, "
            f"{recorded['vae']['fingerprint']}); pass that one with --vae or config.vae."
        )

    mesh = make_mesh(jax.local_devices())
    params = jax.device_put(params, NamedSharding(mesh, P()))

    @jax.jit
    def apply(params, z):
        x = vae.apply({"params": params}, z / vae.scaling_factor, method="decode")
        return jax.numpy.clip(x.astype(jax.numpy.float32), -1.0, 1.0)

    def decode(z):
        # Sharded over the local devices, the batch padded to a multiple of their count.
        z = np.asarray(z, np.float32)
        count = len(z)
        padded = -(-count // mesh.size) * mesh.size
        z = np.concatenate([z, np.zeros((padded - count, *z.shape[1:]), z.dtype)])
        return np.asarray(apply(params, jax.device_put(z, NamedSharding(mesh, P("data")))))[:count]

    return decode


def imported_network(
    config: ml_collections.ConfigDict, torch_checkpoint: str | os.PathLike, weights: str = "ema"
) -> RunArtifacts:
    """SiT's released PyTorch checkpoint (e.g. ``SiT-XL-2-256x256.pt``, a state dict) as a
    run of ``config``'s preset on 32x32x4 latents, converted by
    :func:`fmjax.models.params_from_torch` with ``peer="sit"``."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.data.latents_dir is None:
        # Sampling reads no latents; the path only satisfies the training data's check.
        config.data.latents_dir = "unused"
    validate(config, num_devices=jax.device_count())
    config.data.image_shape = LATENT_SHAPE
    model = build_model(config.model)
    state_dict = models.load_torch_checkpoint(torch_checkpoint, source="sit", weights=weights)
    params = models.params_from_torch(state_dict, model, LATENT_SHAPE, peer="sit")
    return RunArtifacts(config=config, model=model, ema_params=params, step=0)


def _grid_hook(workdir: pathlib.Path, every: int) -> train.HookFactory:
    """In-training grids decoded to images: ``workdir/samples/step_{STEP}.png``."""

    def factory(config, model, mesh):
        del mesh
        decode = build_decoder(config)
        velocity = make_velocity(model, config)

        def fn(step, state):
            if jax.process_index() == 0:
                key = stream_key(config.seed, Stream.GRID)
                z = generate(config, velocity, state, config.train.num_grid_samples, key).x
                x = decode(z)
                (workdir / "samples").mkdir(parents=True, exist_ok=True)
                path = workdir / "samples" / f"step_{step:08d}.png"
                images.save_grid(x, path, scale=max(1, 256 // x.shape[1]))
            return {}

        details = {"decoded_grid": config.train.num_grid_samples}
        return train.EvalHook(every=every, fn=fn, details=details)

    return factory


def _train_mode(config, workdir, options, eval_options, network, vae_path) -> train.TrainState:
    del options, eval_options
    if network is not None or vae_path is not None:
        raise ValueError("--torch_checkpoint and --vae are for --mode=sample and --mode=eval.")
    workdir = pathlib.Path(workdir)
    every = config.train.sample_every
    # The engine's own grids would be of latents; the hook decodes them instead.
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.sample_every = 0
    hooks = [_grid_hook(workdir, every)] if every else []
    state = train.train_and_evaluate(config, workdir, hooks=hooks)
    if jax.process_index() == 0:
        print(f"Done at step {int(state.step)}; grids in {workdir / 'samples'}", flush=True)
    return state


def _load(workdir, network) -> RunArtifacts:
    if jax.process_count() > 1:
        raise ValueError("--mode=sample|eval run on one process; launch without --distributed.")
    return network if network is not None else load_run(workdir)


def _latent_sampler(run: RunArtifacts, options: SamplingOptions, labels):
    """``sample(start, stop) -> (latents, nfe, success)`` of samples ``start..stop-1``."""
    check_sampler(options, run.config)
    bind = velocity_binder(
        run.model,
        run.config,
        options.guidance_scale,
        options.guidance_interval,
        options.guidance_channels,
    )
    key = jax.random.key(options.seed)
    shape = tuple(run.config.data.image_shape)
    path = build_path(run.config.path)[0]

    def sample(start, stop):
        y = None if labels is None else jax.numpy.asarray(labels[start:stop])
        x0 = initial_noise(key, start, stop, shape)
        result = solve(bind(run.ema_params, y), x0, options, path=path, start=start)
        return result.x, int(result.nfe), bool(result.success)

    return sample


def _sample_mode(config, workdir, options, eval_options, network, vae_path) -> SampleOutput:
    del eval_options
    run_ = _load(workdir, network)
    decode = build_decoder(run_.config if network is None else config, vae_path)
    n = options.num_samples
    labels = class_labels(options, run_.config.model.num_classes, n)
    sample = _latent_sampler(run_, options, labels)
    parts, nfe, success = [], [], []
    for start in range(0, n, options.batch_size):
        z, count, ok = sample(start, min(start + options.batch_size, n))
        parts.append(decode(z))
        nfe.append(count)
        success.append(ok)
    x = np.concatenate(parts)
    stem, record = sample_record(options, run_.step, labels, nfe, success)
    out = pathlib.Path(workdir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    png, npz = out / f"{stem}.png", out / f"{stem}.npz"
    images.save_grid(x, png)
    write_npz(npz, {"images_uint8": images.to_uint8(x), **record})
    print(f"{n} decoded samples (NFE {nfe[0]} per solve); wrote {png} and {npz}", flush=True)
    return SampleOutput(png=png, npz=npz, nfe=nfe)


def _eval_mode(config, workdir, options, eval_options, network, vae_path) -> dict:
    if eval_options is None or not eval_options.num_samples:
        raise ValueError("--mode=eval needs --eval_samples > 0 and --fid_stats.")
    run_ = _load(workdir, network)
    decode = build_decoder(run_.config if network is None else config, vae_path)
    reference, inception = fid.load_reference(
        eval_options.fid_stats, eval_options.inception, protocol=eval_options.fid_protocol
    )
    n, batch = eval_options.num_samples, options.batch_size
    labels = class_labels(options, run_.config.model.num_classes, -(-n // batch) * batch)
    sample = _latent_sampler(run_, options, labels)

    def sample_fn(index, size):
        return decode(sample(index * size, (index + 1) * size)[0])

    result = fid.fid_of_samples(sample_fn, n, reference, inception, batch_size=batch)
    scores = {"fid": result.fid, "num_samples": n, "fid_protocol": inception.protocol}
    path = pathlib.Path(workdir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**scores, "method": options.method}, indent=2))
    print(f"FID {result.fid:.3f} of {n} decoded samples ({options.method}); wrote {path}")
    return scores


MODES: dict[str, Callable] = {"train": _train_mode, "sample": _sample_mode, "eval": _eval_mode}
"""``--mode`` (besides ``encode``) -> ``fn(config, workdir, options, eval_options, network,
vae_path)``."""


def run(
    config: ml_collections.ConfigDict | None,
    workdir: str | os.PathLike,
    mode: str = "train",
    options: SamplingOptions = SamplingOptions(guidance_scale=1.5),
    eval_options: EvalOptions | None = None,
    *,
    network: RunArtifacts | None = None,
    vae_path: str | None = None,
):
    """What ``main`` does for ``--mode=train|sample|eval`` after parsing flags; ``network``
    (:func:`imported_network`) samples or scores SiT's released model instead of a run;
    ``vae_path`` overrides ``config.vae.path`` for decoding.

    Example (tests call it in-process)::

        config = get_config("smoke")
        config.data.latents_dir = "/tmp/enc/latents"
        run(config, "/tmp/imagenet_smoke")  # trains 2 steps
        run(None, "/tmp/imagenet_smoke", "sample", SamplingOptions(num_samples=4, steps=2))
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not valid; expected one of {sorted(MODES)}.")
    return MODES[mode](config, workdir, options, eval_options, network, vae_path)


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
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.setup(distributed=FLAGS.distributed)
    for name in ("mode", "workdir"):
        if FLAGS[name].value is None:
            raise ValueError(f"--{name} is required (python -m experiments.imagenet --help).")
    if FLAGS.mode == "encode":
        info = encode()
        print(
            f"{info.num_images} images in {info.directory} ({info.num_shards} shards, "
            f"{info.encoded} encoded now, {info.images_per_sec:.1f} images/s); train on them "
            f"with --config.data.name=latents --config.data.latents_dir={info.directory}",
            flush=True,
        )
        return
    eval_options = None
    if FLAGS.mode == "eval":
        eval_options = EvalOptions(
            num_samples=FLAGS.eval_samples, fid_stats=FLAGS.fid_stats,
            inception=FLAGS.inception, fid_protocol=FLAGS.fid_protocol, bpd_examples=0,
        )  # fmt: skip
    network = None
    if FLAGS.torch_checkpoint is not None:
        network = imported_network(FLAGS.config, FLAGS.torch_checkpoint, FLAGS.torch_weights)
    run(
        FLAGS.config,
        FLAGS.workdir,
        FLAGS.mode,
        common.sampling_options(),
        eval_options,
        network=network,
        vae_path=FLAGS.vae,
    )


if __name__ == "__main__":
    common.run(main, define_flags)
