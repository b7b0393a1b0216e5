"""The offline main job: train a flow-matching U-Net on scikit-learn's 8x8 digits and score it.

    python -m experiments.digits [--workdir=runs/digits] [--config=...digits.py[:quick|:meanflow]]
                                 [--config.train.num_steps=...] [--init_from=RUN] [--verbose]

Writes ``metrics.jsonl`` (with the digits score every ``train.eval_every`` steps), TensorBoard
events, sample grids (``samples/``), checkpoints (the latest and the best-scoring) and the final
evaluation ``eval/digits.json`` to the workdir; running it again resumes.

The digits score is the Fréchet distance between generated digits and the 300 held-out test
digits in the feature space of a small classifier (`fmjax.metrics.digits`), shown beside the
score of the training digits (the floor) and of uniform noise (the baseline). The bits/dim of
the first ``eval.bpd_examples`` test digits (all 300 by default; the uniform-dequantisation bound)
is shown beside two baselines: a
per-pixel histogram fitted on the training digits and a uniform distribution over the 17 levels.
"""

import json
import logging
import math
import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import common
from fmjax import configs, data, likelihood, rundir, train
from fmjax.generate import generate, make_velocity
from fmjax.keys import Stream, stream_key
from fmjax.metrics.digits import digits_score, histogram_bits_per_dim

_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags; defined only when run as a program, so that importing this
    module beside another entry point does not define ``--workdir`` twice."""
    config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
    flags.DEFINE_string("workdir", "runs/digits", "Run directory: checkpoints, metrics, samples.")
    flags.DEFINE_string(
        "init_from",
        None,
        "Another run's directory: start this new run from its parameters (fine-tuning).",
    )


FINAL_SAMPLES = 1000
MEAN_FLOW_STEPS = (1, 2, 4)  # the jumps a mean-flow run is scored at
BPD_DRAWS = 1  # dequantisation draws per test digit (the Flow Matching paper uses 50)


def score_hook(config, model, mesh) -> train.EvalHook:
    """The digits score of ``train.eval_samples`` EMA samples; the best state is kept.

    A hook factory of :func:`fmjax.train.train_and_evaluate` (``mesh`` is unused: the score's
    few samples run on one device)."""
    del mesh
    velocity = make_velocity(model, config)
    key = stream_key(config.seed, Stream.DIGITS_SCORE)

    def score(step, state):
        result = generate(config, velocity, state, config.train.eval_samples, key)
        return {"digits_fd": digits_score(np.asarray(result.x)).fd}

    return train.EvalHook(every=config.train.eval_every, fn=score, keep_best="digits_fd")


def held_out_bits_per_dim(config, model, state) -> likelihood.BitsPerDim:
    """Bits/dim of the EMA model on the first ``eval.bpd_examples`` test digits: the
    uniform-dequantisation bound.

    The digits' 17 levels sit at the centres of 17 bins of [-1, 1] (``fmjax.data.digits``),
    so this is ``dequantized_bits_per_dim`` with ``num_bins=17``: ``BPD_DRAWS`` draws of
    uniform noise within each pixel's bin, Hutchinson divergence, dopri5 at 1e-5.
    """
    levels = data.digits_levels(data.digits("test").images[: config.eval.bpd_examples])
    velocity = jax.tree_util.Partial(
        make_velocity(model, config), jax.device_get(state.ema_params), None
    )
    key = stream_key(config.seed, Stream.DIGITS_BPD)
    return likelihood.dequantized_bits_per_dim(
        velocity,
        key,
        levels,
        num_draws=BPD_DRAWS,
        num_bins=data.DIGITS_LEVELS,
        divergence="hutchinson",
        solver="dopri5",
        rtol=1e-5,
        atol=1e-5,
    )


def final_evaluation(config, model, state, workdir: str) -> dict:
    """Scores ``FINAL_SAMPLES`` EMA samples; writes and returns ``eval/digits.json``."""
    velocity = make_velocity(model, config)
    key = stream_key(config.seed, Stream.DIGITS_FINAL)
    by_steps = {}
    if config.objective == "mean_flow":
        # The same noise at each number of jumps; the first is the headline score.
        for steps in MEAN_FLOW_STEPS:
            jumps = generate(config, velocity, state, FINAL_SAMPLES, key, mean_flow_steps=steps)
            by_steps[steps] = digits_score(np.asarray(jumps.x)).fd
            logging.info("Digits score with %d step(s): %.3f", steps, by_steps[steps])
    result = generate(config, velocity, state, FINAL_SAMPLES, key)
    score = digits_score(np.asarray(result.x))
    logging.info(
        "Bits/dim of %d test digits (an adaptive solve; minutes on a CPU)", config.eval.bpd_examples
    )
    bpd = held_out_bits_per_dim(config, model, state)
    report = {
        "step": int(state.step),
        "digits_fd": score.fd,
        "floor_train_vs_test": score.floor,
        "baseline_uniform_noise": score.noise,
        "num_samples": FINAL_SAMPLES,
        "objective": config.objective,
        "solver": "meanflow" if by_steps else config.train.sample_solver,
        "steps": config.meanflow.sample_steps if by_steps else config.train.sample_steps,
        "nfe": int(result.nfe),
        "bits_per_dim": float(np.mean(bpd.bpd)),
        "bpd_examples": int(bpd.bpd.shape[0]),
        "bpd_draws": BPD_DRAWS,
        "bpd_nfe_per_draw": int(bpd.nfe) / BPD_DRAWS,
        "bpd_baseline_pixel_histogram": histogram_bits_per_dim(),
        "bpd_baseline_uniform": math.log2(data.DIGITS_LEVELS),
    }
    if by_steps:
        report["digits_fd_by_steps"] = {str(k): v for k, v in by_steps.items()}
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "digits.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv):
    del argv
    common.setup()
    config, workdir = FLAGS.config, FLAGS.workdir
    logging.info("Training on digits into %s", workdir)
    hooks = [score_hook] if config.train.eval_every else []
    state = train.train_and_evaluate(config, workdir, hooks=hooks, init_from=FLAGS.init_from)
    run = rundir.load_config(workdir)  # the run's config, with the data's image shape
    model = configs.build_model(run.model)
    samples = os.path.join(workdir, "samples")  # none when stopped before the first grid
    grids = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    print(
        f"Done at step {int(state.step)}" + (f"; samples: {samples}/{grids[-1]}" if grids else "")
    )
    if int(state.step) == config.train.num_steps:
        report = final_evaluation(run, model, state, workdir)
        print(
            f"Digits score (Frechet distance to the test digits, lower is better) of "
            f"{FINAL_SAMPLES} samples, {report['nfe']} NFE: {report['digits_fd']:.3f}; "
            f"floor (train digits) {report['floor_train_vs_test']:.3f}; "
            f"uniform noise {report['baseline_uniform_noise']:.1f}."
        )
        if "digits_fd_by_steps" in report:
            print(
                "Mean flow, digits score by number of steps: "
                + ", ".join(f"{k}: {v:.3f}" for k, v in report["digits_fd_by_steps"].items())
                + " (bits/dim below: the instantaneous field u(x, t, t))."
            )
        print(
            f"Bits/dim of {report['bpd_examples']} test digits (dequantisation bound, "
            f"{report['bpd_nfe_per_draw']:.0f} "
            f"NFE): {report['bits_per_dim']:.3f}; per-pixel histogram "
            f"{report['bpd_baseline_pixel_histogram']:.3f}; uniform levels "
            f"{report['bpd_baseline_uniform']:.3f}."
        )


if __name__ == "__main__":
    common.run(main, define_flags)
