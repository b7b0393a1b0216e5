"""The offline main job: train a flow-matching U-Net on scikit-learn's 8x8 digits and score it.

    python -m experiments.digits [--workdir=runs/digits] [--config=...digits.py[:quick]]
                                 [--config.train.num_steps=...]

Writes ``metrics.jsonl`` (with the digits score every ``train.eval_every`` steps), TensorBoard
events, sample grids (``samples/``), checkpoints (the latest and the best-scoring) and the final
evaluation ``eval/digits.json`` to the workdir; running it again resumes.

The digits score is the Fréchet distance between generated digits and the 300 held-out test
digits in the feature space of a small classifier (`fmjax.metrics.digits`), shown beside the
score of the training digits (the floor) and of uniform noise (the baseline).
"""

import json
import logging
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import common
from fmjax import data, train
from fmjax.metrics.digits import digits_score

_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags; defined only when run as a program, so that importing this
    module beside another entry point does not define ``--workdir`` twice."""
    config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
    flags.DEFINE_string("workdir", "runs/digits", "Run directory: checkpoints, metrics, samples.")


FINAL_SAMPLES = 1000
_EVAL_STREAM = 7  # a key stream of its own, apart from the engine's


def score_hook(config, model) -> train.EvalHook:
    """The digits score of ``train.eval_samples`` EMA samples; the best state is kept."""
    velocity = train.make_velocity(model, config)
    key = jax.random.fold_in(jax.random.key(config.seed), _EVAL_STREAM)

    def score(step, state):
        result = train.generate(config, velocity, state, config.train.eval_samples, key)
        return {"digits_fd": digits_score(np.asarray(result.x)).fd}

    return train.EvalHook(every=config.train.eval_every, fn=score, keep_best="digits_fd")


def final_evaluation(config, model, state, workdir: str) -> dict:
    """Scores ``FINAL_SAMPLES`` EMA samples; writes and returns ``eval/digits.json``."""
    velocity = train.make_velocity(model, config)
    key = jax.random.fold_in(jax.random.key(config.seed), _EVAL_STREAM + 1)
    result = train.generate(config, velocity, state, FINAL_SAMPLES, key)
    score = digits_score(np.asarray(result.x))
    report = {
        "step": int(state.step),
        "digits_fd": score.fd,
        "floor_train_vs_test": score.floor,
        "baseline_uniform_noise": score.noise,
        "num_samples": FINAL_SAMPLES,
        "solver": config.train.sample_solver,
        "steps": config.train.sample_steps,
        "nfe": int(result.nfe),
    }
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "digits.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv):
    del argv
    common.setup()
    config, workdir = FLAGS.config, FLAGS.workdir
    logging.info("Training on digits into %s", workdir)
    source = data.build_source(config.data, seed=config.seed)
    config.data.image_shape = source.image_shape  # the hooks sample images of this shape
    model = train.build_model(config.model)
    hooks = [score_hook(config, model)] if config.train.eval_every else []
    state = train.train_and_evaluate(config, workdir, source=source, hooks=hooks)
    samples = os.path.join(workdir, "samples")  # none when stopped before the first grid
    grids = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    print(
        f"Done at step {int(state.step)}" + (f"; samples: {samples}/{grids[-1]}" if grids else "")
    )
    if int(state.step) == config.train.num_steps:
        report = final_evaluation(config, model, state, workdir)
        print(
            f"Digits score (Frechet distance to the test digits, lower is better) of "
            f"{FINAL_SAMPLES} samples, {report['nfe']} NFE: {report['digits_fd']:.3f}; "
            f"floor (train digits) {report['floor_train_vs_test']:.3f}; "
            f"uniform noise {report['baseline_uniform_noise']:.1f}."
        )


if __name__ == "__main__":
    define_flags()
    app.run(common.user_errors_exit(main))
