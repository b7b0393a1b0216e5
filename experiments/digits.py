"""The offline main job: train a flow-matching U-Net on scikit-learn's 8x8 digits.

    python -m experiments.digits [--workdir=runs/digits] [--config=...digits.py[:quick]]
                                 [--config.train.num_steps=...]

Writes ``metrics.jsonl``, TensorBoard events, sample grids (``samples/``) and checkpoints to
the workdir; running it again resumes.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from fmjax import train

_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
flags.DEFINE_string("workdir", "runs/digits", "Run directory: checkpoints, metrics, samples.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    common.setup()
    logging.info("Training on digits into %s", FLAGS.workdir)
    state = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    grids = sorted(os.listdir(os.path.join(FLAGS.workdir, "samples")))
    print(
        f"Done at step {int(state.step)}; samples: {os.path.join(FLAGS.workdir, 'samples', grids[-1])}"
    )


if __name__ == "__main__":
    app.run(main)
