"""CIFAR-10: train a flow-matching U-Net with a peer's recipe, resume it, and sample from it.

    python -m experiments.cifar10 --workdir=DIR [--config=experiments/configs/cifar10.py[:VARIANT]]
                                  [--config.KEY=VALUE ...] [--mode=train|sample] [--distributed]

``--mode=train`` (the default) trains the run in ``DIR`` with ``fmjax.train.train_and_evaluate``,
or resumes it from its newest checkpoint. ``--mode=sample`` loads the run's EMA parameters and
writes ``--num_samples`` samples to ``DIR/samples/`` as a PNG grid and an ``.npz`` (``images``
in [-1, 1], ``images_uint8``, ``labels`` of a conditional run, ``nfe``) with
:func:`fmjax.generate.sample_run`; see :class:`fmjax.generate.SamplingOptions` for the solver
flags. ``--mode=eval`` scores the run with :func:`fmjax.evaluate.evaluate` (FID, bits/dim). The variants of the config are described in
``experiments/configs/cifar10.py``. CIFAR-10 must be prepared for tfds once, on a machine with
network access::

    pip install tensorflow  # only for this step
    tfds build cifar10 --file_format=array_record [--data_dir=DATA]

Launch commands (also in README.md, "CIFAR-10"). The global batch (512 for the default
Meta recipe) is split over every device of every process; ``accumulation_steps`` splits each
device's share further into micro-batches, so the update is the same on any hardware.

One GPU (4 micro-batches of 128 make one update of 512)::

    python -m experiments.cifar10 --workdir=runs/cifar10 --config.train.accumulation_steps=4

Several GPUs of one machine (8 GPUs: 64 images per GPU; every visible GPU is used)::

    python -m experiments.cifar10 --workdir=runs/cifar10

Several machines with GPUs: one process per machine, all with the same arguments, the same
``--workdir`` on a shared filesystem and the data readable by each::

    python -m experiments.cifar10 --workdir=/shared/runs/cifar10 --distributed \\
        --coordinator_address=HOST0:1234 --num_processes=N --process_id=I

(under Slurm or Open MPI, ``--distributed`` alone finds the others). A multi-host TPU slice: the
same command on every host at once, which JAX configures by itself::

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd fmjax && \\
        .venv/bin/python -m experiments.cifar10 --workdir=/mnt/shared/runs/cifar10 \\
        --config.data.data_dir=/mnt/shared/tensorflow_datasets --distributed"

Sampling (one process; heun on the EDM grid, 50 steps: 100 NFE)::

    python -m experiments.cifar10 --workdir=runs/cifar10 --mode=sample --num_samples=64
    python -m experiments.cifar10 --workdir=runs/cifar10 --mode=sample --solver=dopri5 --rtol=1e-5 --atol=1e-5
    python -m experiments.cifar10 --workdir=runs/cifar10_cond --mode=sample --guidance_scale=2 --labels=3,5
    python -m experiments.cifar10 --workdir=runs/cifar10_cond --mode=sample --guidance_scale=2 \
        --guidance_interval=0.3,1.0  # guided only from t = 0.3 (noise at t = 0) on

A network imported from a peer (docs/pretrained.md): ``--params=PARAMS.npz`` (from ``python -m
experiments.convert``) or ``--torch_checkpoint=CKPT.pt`` (converted on the fly; needs PyTorch)
replaces the run's checkpoint for ``--mode=sample|eval``; the config names the preset
(``:torchcfm`` for torchcfm's checkpoints), and the outputs go to ``--workdir``::

    python -m experiments.cifar10 --config=experiments/configs/cifar10.py:torchcfm \
        --workdir=runs/otcfm --mode=eval --torch_checkpoint=otcfm_cifar10_weights_step_400000.pt \
        --solver=dopri5 --rtol=1e-5 --atol=1e-5 --fid_stats=cifar10_train.npz --bpd_examples=0
"""

import dataclasses
import os
import pathlib
from collections.abc import Callable

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import common
from fmjax import models, train
from fmjax.configs import build_model, validate
from fmjax.evaluate import EvalOptions, evaluate, fid_hook
from fmjax.generate import MEAN_FLOW_SAMPLER, SampleOutput, SamplingOptions, sample_run
from fmjax.metrics import fid
from fmjax.rundir import RunArtifacts, load_config

__all__ = ["MODES", "imported_network", "run", "train_mode"]

_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "cifar10.py")


def define_flags() -> None:
    """The command-line flags; defined when run as a program (or by a test, once), so that
    importing this module defines nothing and a config-file mistake is reported as one
    ``error:`` line by :func:`experiments.common.run`."""
    if "mode" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
    flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to do with the run.")
    common.define_distributed_flags()
    common.define_sampling_flags("--mode=sample|eval", guidance_scale=1.0, batch_size=500)
    flags.DEFINE_integer("eval_samples", 50_000, "--mode=eval: samples scored by FID (0: no FID).")
    flags.DEFINE_string(
        "fid_stats", None, "--mode=eval: reference statistics (python -m experiments.fid stats)."
    )
    flags.DEFINE_string(
        "inception", None, "--mode=eval: converted Inception weights (default: cache)."
    )
    flags.DEFINE_enum(
        "fid_protocol",
        None,
        list(fid.FID_PROTOCOLS),
        "--mode=eval: how images reach Inception (default: what --fid_stats records, else "
        f"{fid.DEFAULT_PROTOCOL}, the original FID code's and the peers').",
    )
    flags.DEFINE_enum(
        "fid_quantize",
        "round",
        list(fid.QUANTIZATIONS),
        "--mode=eval: samples to grey levels: round (torchcfm, PNGs) or floor (Meta's example).",
    )
    flags.DEFINE_integer("bpd_examples", 10_000, "--mode=eval: test images for bits/dim (0: none).")
    flags.DEFINE_integer("bpd_draws", 1, "--mode=eval: dequantisation draws K (the paper: 50).")
    flags.DEFINE_string(
        "params",
        None,
        "--mode=sample|eval: an imported network's .npz (python -m experiments.convert).",
    )
    flags.DEFINE_string(
        "torch_checkpoint",
        None,
        "--mode=sample|eval: a peer's PyTorch checkpoint, converted on the fly.",
    )
    flags.DEFINE_enum(
        "torch_source",
        None,
        list(models.TORCH_SOURCES),
        "--torch_checkpoint: its layout (default: meta for the Meta preset, else torchcfm).",
    )
    flags.DEFINE_enum(
        "torch_weights", "ema", list(models.TORCH_WEIGHTS), "--torch_checkpoint: which weights."
    )
    flags.mark_flag_as_required("workdir")


FLAGS = flags.FLAGS


def imported_network(
    config: ml_collections.ConfigDict,
    *,
    params: str | os.PathLike | None = None,
    torch_checkpoint: str | os.PathLike | None = None,
    torch_source: str | None = None,
    torch_weights: str = "ema",
) -> RunArtifacts:
    """The network of ``config``'s preset with imported parameters, as a run to sample or
    score: from an ``.npz`` of :func:`fmjax.models.save_params` (``params``) or a peer's
    PyTorch checkpoint (``torch_checkpoint``, read by
    :func:`fmjax.models.load_torch_checkpoint`; ``torch_source`` defaults to ``"meta"`` for
    the Meta preset, ``"sit"`` for a transformer, ``"torchcfm"`` otherwise). ``config.data.image_shape`` becomes
    ``(image_size or 32, image_size or 32, 3)``.

    Raises:
        ValueError: for neither or both sources, or parameters that do not fit the preset.

    Example::

        network = imported_network(get_config("torchcfm"), params="otcfm.npz")
        run(get_config("torchcfm"), "runs/otcfm", "sample", SamplingOptions(), network=network)
    """
    if (params is None) == (torch_checkpoint is None):
        raise ValueError(
            f"Import a network from exactly one of --params ({params}) and --torch_checkpoint "
            f"({torch_checkpoint})."
        )
    validate(config, num_devices=jax.device_count())  # every choice, before anything is built
    config = ml_collections.ConfigDict(config.to_dict())
    side = config.data.image_size or 32
    config.data.image_shape = (side, side, 3)
    model = build_model(config.model)
    if params is not None:
        loaded = models.load_params(params, model, preset=config.model.name)
    else:
        if torch_source is None:
            if isinstance(model, models.DiT):
                torch_source = "sit"
            else:
                torch_source = "meta" if config.model.name == "unet_cifar10_meta" else "torchcfm"
        state_dict = models.load_torch_checkpoint(
            torch_checkpoint, source=torch_source, weights=torch_weights
        )
        loaded = models.params_from_torch(
            state_dict, model, config.data.image_shape, peer=torch_source
        )
    return RunArtifacts(config=config, model=model, ema_params=loaded, step=0)


def train_mode(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    options: SamplingOptions,
    eval_options: EvalOptions,
    network: RunArtifacts | None = None,
) -> train.TrainState:
    """``--mode=train``: trains or resumes the run (the other options are unused), with the
    in-training FID of :func:`fmjax.evaluate.fid_hook` when ``train.eval_every`` > 0."""
    del options, eval_options
    if network is not None:
        raise ValueError("--params/--torch_checkpoint are for --mode=sample and --mode=eval.")
    hooks = [fid_hook] if config.train.eval_every else []
    state = train.train_and_evaluate(config, workdir, hooks=hooks)
    if jax.process_index() == 0:
        print(f"Done at step {int(state.step)}; grids in {pathlib.Path(workdir) / 'samples'}")
    return state


def _sample_mode(
    config, workdir, options: SamplingOptions, eval_options, network=None
) -> SampleOutput:
    del config, eval_options  # the run's saved config is the one that matches its checkpoint
    return sample_run(workdir, options, run=network)


def _eval_mode(
    config, workdir, options: SamplingOptions, eval_options: EvalOptions, network=None
) -> dict:
    del config
    return evaluate(workdir, options, eval_options, run=network)


MODES: dict[str, Callable] = {"train": train_mode, "sample": _sample_mode, "eval": _eval_mode}
"""``--mode`` -> ``fn(config, workdir, options, eval_options, network)``; ``network`` (from
:func:`imported_network`) replaces the run's checkpoint."""


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    mode: str = "train",
    options: SamplingOptions = SamplingOptions(),
    eval_options: EvalOptions | None = None,
    *,
    network: RunArtifacts | None = None,
):
    """What ``main`` does after parsing flags: ``MODES[mode](config, workdir, options, ...)``;
    ``network`` (:func:`imported_network`) samples or scores an imported network.

    Example (tests call it in-process, e.g. under ``tfds.testing.mock_data``)::

        run(get_config("smoke"), "/tmp/cifar10_smoke")  # trains 4 steps
        run(None, "/tmp/cifar10_smoke", "sample", SamplingOptions(num_samples=16, steps=2))
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not valid; expected one of {sorted(MODES)}.")
    return MODES[mode](config, workdir, options, eval_options, network)


def main(argv):
    """Parses nothing itself: absl has parsed the flags; runs :func:`run`."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common.setup(distributed=FLAGS.distributed)
    eval_options = None
    if FLAGS.mode == "eval":
        eval_options = EvalOptions(
            num_samples=FLAGS.eval_samples,
            fid_stats=FLAGS.fid_stats,
            inception=FLAGS.inception,
            fid_protocol=FLAGS.fid_protocol,
            fid_quantize=FLAGS.fid_quantize,
            bpd_examples=FLAGS.bpd_examples,
            bpd_draws=FLAGS.bpd_draws,
        )
    network = None
    if FLAGS.params is not None or FLAGS.torch_checkpoint is not None:
        network = imported_network(
            FLAGS.config,
            params=FLAGS.params,
            torch_checkpoint=FLAGS.torch_checkpoint,
            torch_source=FLAGS.torch_source,
            torch_weights=FLAGS.torch_weights,
        )
    options = common.sampling_options()
    if FLAGS.mode != "train" and not FLAGS["solver"].present:
        # A mean-flow run samples with its jumps (once, unless --steps says otherwise).
        sampled = network.config if network else load_config(FLAGS.workdir)
        if sampled.objective == "mean_flow":
            steps = FLAGS.steps if FLAGS["steps"].present else 1
            options = dataclasses.replace(options, solver=MEAN_FLOW_SAMPLER, steps=steps)
    run(
        FLAGS.config,
        FLAGS.workdir,
        FLAGS.mode,
        options,
        eval_options,
        network=network,
    )


if __name__ == "__main__":
    common.run(main, define_flags)
