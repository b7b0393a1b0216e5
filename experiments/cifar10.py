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
"""

import os
import pathlib
from collections.abc import Callable

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import common
from fmjax import sampling, train
from fmjax.evaluate import EvalOptions, evaluate, fid_hook
from fmjax.generate import SampleOutput, SamplingOptions, sample_run

__all__ = ["MODES", "run", "train_mode"]

_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "cifar10.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to do with the run.")
flags.DEFINE_bool(
    "distributed", False, "Multi-process launch: call jax.distributed.initialize() first."
)
flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.DEFINE_integer("num_samples", 64, "--mode=sample: how many samples.")
flags.DEFINE_enum("solver", "heun", list(sampling.SOLVERS), "--mode=sample: the ODE solver.")
flags.DEFINE_integer("steps", 50, "--mode=sample: steps of a fixed-step solver.")
flags.DEFINE_enum(
    "time_grid", "edm", ["edm", "uniform"], "--mode=sample: the grid of a fixed-step solver."
)
flags.DEFINE_float("rtol", 1e-5, "--mode=sample: relative tolerance of an adaptive solver.")
flags.DEFINE_float("atol", 1e-5, "--mode=sample: absolute tolerance of an adaptive solver.")
flags.DEFINE_list("labels", None, "--mode=sample, conditional runs: classes to cycle through.")
flags.DEFINE_float("guidance_scale", 1.0, "--mode=sample: classifier-free guidance weight w.")
flags.DEFINE_integer("sample_seed", 0, "--mode=sample: the seed of the initial noise.")
flags.DEFINE_integer("sample_batch_size", 500, "--mode=sample: samples per ODE solve.")
flags.DEFINE_integer("eval_samples", 50_000, "--mode=eval: samples scored by FID (0: no FID).")
flags.DEFINE_string(
    "fid_stats", None, "--mode=eval: reference statistics (python -m experiments.fid stats)."
)
flags.DEFINE_string("inception", None, "--mode=eval: converted Inception weights (default: cache).")
flags.DEFINE_integer("bpd_examples", 10_000, "--mode=eval: test images for bits/dim (0: none).")
flags.DEFINE_integer("bpd_draws", 1, "--mode=eval: dequantisation draws K (the paper: 50).")
FLAGS = flags.FLAGS


def train_mode(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    options: SamplingOptions,
    eval_options: EvalOptions,
) -> train.TrainState:
    """``--mode=train``: trains or resumes the run (the other options are unused), with the
    in-training FID of :func:`fmjax.evaluate.fid_hook` when ``train.eval_every`` > 0."""
    del options, eval_options
    hooks = [fid_hook] if config.train.eval_every else []
    state = train.train_and_evaluate(config, workdir, hooks=hooks)
    if jax.process_index() == 0:
        print(f"Done at step {int(state.step)}; grids in {pathlib.Path(workdir) / 'samples'}")
    return state


def _sample_mode(config, workdir, options: SamplingOptions, eval_options) -> SampleOutput:
    del config, eval_options  # the run's saved config is the one that matches its checkpoint
    return sample_run(workdir, options)


def _eval_mode(config, workdir, options: SamplingOptions, eval_options: EvalOptions) -> dict:
    del config
    return evaluate(workdir, options, eval_options)


MODES: dict[str, Callable] = {"train": train_mode, "sample": _sample_mode, "eval": _eval_mode}
"""``--mode`` -> ``fn(config, workdir, options, eval_options)``."""


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    mode: str = "train",
    options: SamplingOptions = SamplingOptions(),
    eval_options: EvalOptions | None = None,
):
    """What ``main`` does after parsing flags: ``MODES[mode](config, workdir, options, ...)``.

    Example (tests call it in-process, e.g. under ``tfds.testing.mock_data``)::

        run(get_config("smoke"), "/tmp/cifar10_smoke")  # trains 4 steps
        run(None, "/tmp/cifar10_smoke", "sample", SamplingOptions(num_samples=16, steps=2))
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not valid; expected one of {sorted(MODES)}.")
    return MODES[mode](config, workdir, options, eval_options)


def _options_from_flags() -> SamplingOptions:
    try:
        labels = None if FLAGS.labels is None else [int(label) for label in FLAGS.labels]
    except ValueError:
        raise ValueError(f"--labels={','.join(FLAGS.labels)} must be integers.") from None
    return SamplingOptions(
        num_samples=FLAGS.num_samples,
        solver=FLAGS.solver,
        steps=FLAGS.steps,
        time_grid=FLAGS.time_grid,
        rtol=FLAGS.rtol,
        atol=FLAGS.atol,
        labels=labels,
        guidance_scale=FLAGS.guidance_scale,
        seed=FLAGS.sample_seed,
        batch_size=FLAGS.sample_batch_size,
    )


def main(argv):
    """Parses nothing itself: absl has parsed the flags; runs :func:`run`."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        # Every process must join before JAX picks its backend, i.e. before any device use.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    common.setup()
    eval_options = None
    if FLAGS.mode == "eval":
        eval_options = EvalOptions(
            num_samples=FLAGS.eval_samples,
            fid_stats=FLAGS.fid_stats,
            inception=FLAGS.inception,
            bpd_examples=FLAGS.bpd_examples,
            bpd_draws=FLAGS.bpd_draws,
        )
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, _options_from_flags(), eval_options)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(common.user_errors_exit(main))
