"""Reflow and one-step distillation: generate a trained run's ODE pairs, then train on them.

    python -m experiments.reflow pairs --from=RUN --out=PAIRS_DIR --num_pairs=N
        [--solver=dopri5] [--rtol=1e-5] [--atol=1e-5] [--steps=50] [--time_grid=uniform]
        [--seed=0] [--chunk_size=1000] [--guidance_scale=1.0] [--verbose]

solves the ODE of the run in ``RUN`` (the EMA parameters of its newest checkpoint) from ``N``
noises and writes the pairs ``(x0, x1)`` into ``PAIRS_DIR`` (``pairs.json`` and chunks of
``--chunk_size`` pairs, :func:`fmjax.reflow.generate_pairs`); running it again resumes an
interrupted generation. The training is the digits job's (or any job's) with
``config.data.name = "pairs"``:

    python -m experiments.digits --config=experiments/configs/digits.py:reflow \\
        --config.data.pairs_dir=PAIRS_DIR --init_from=RUN --workdir=runs/digits_reflow
    python -m experiments.digits --config=experiments/configs/digits.py:distill \\
        --config.data.pairs_dir=PAIRS_DIR --init_from=RUN --workdir=runs/digits_distill

(docs/one-step.md, "Reflow and distillation").
"""

import logging

from absl import flags

from experiments import common
from fmjax import reflow, sampling
from fmjax.generate import SAMPLERS, SDE_SAMPLER

FLAGS = flags.FLAGS
COMMANDS = ("pairs",)


def define_flags() -> None:
    """The command-line flags; defined only when run as a program."""
    flags.DEFINE_string("from", None, "pairs: the trained run (teacher) whose ODE is solved.")
    flags.DEFINE_string("out", None, "pairs: the directory the pairs are written to.")
    flags.DEFINE_integer("num_pairs", None, "pairs: how many pairs.")
    flags.DEFINE_enum(
        "solver", "dopri5", [s for s in SAMPLERS if s != SDE_SAMPLER], "pairs: the ODE solver."
    )
    flags.DEFINE_float("rtol", 1e-5, "pairs: relative tolerance of an adaptive solver.")
    flags.DEFINE_float("atol", 1e-5, "pairs: absolute tolerance of an adaptive solver.")
    flags.DEFINE_integer("steps", 50, "pairs: steps of a fixed-step solver.")
    flags.DEFINE_enum("time_grid", "uniform", ["uniform", "edm"], "pairs: a fixed-step grid.")
    flags.DEFINE_integer("seed", 0, "pairs: the seed of the noises (pair i: fold_in(seed, i)).")
    flags.DEFINE_integer(
        "chunk_size", 1000, "pairs: pairs per chunk file and per solve (a multiple of devices)."
    )
    flags.DEFINE_float("guidance_scale", 1.0, "pairs, conditional runs: guidance weight w.")


def main(argv):
    common.setup()
    command = argv[1:]
    if command != ["pairs"]:
        raise ValueError(
            f"expected one command of {list(COMMANDS)} (python -m experiments.reflow pairs "
            f"--from=RUN --out=DIR --num_pairs=N); got {command}."
        )
    for name in ("from", "out", "num_pairs"):
        if FLAGS[name].value is None:
            raise ValueError(f"`pairs` needs --{name}.")
    if FLAGS.solver in sampling.FIXED_STEP_SOLVERS:
        solver = f"{FLAGS.solver}, {FLAGS.steps} steps on the {FLAGS.time_grid} grid"
    else:
        solver = f"{FLAGS.solver}, rtol {FLAGS.rtol:g}, atol {FLAGS.atol:g}"
    logging.info("Pairs of %s (%s) into %s", FLAGS["from"].value, solver, FLAGS.out)
    info = reflow.generate_pairs(
        FLAGS["from"].value,
        FLAGS.out,
        FLAGS.num_pairs,
        solver=FLAGS.solver,
        rtol=FLAGS.rtol,
        atol=FLAGS.atol,
        steps=FLAGS.steps,
        time_grid=FLAGS.time_grid,
        seed=FLAGS.seed,
        chunk_size=FLAGS.chunk_size,
        guidance_scale=FLAGS.guidance_scale,
    )
    print(
        f"{info.num_pairs} pairs of step {info.step} in {info.directory} ({info.num_chunks} "
        f"chunks, {info.generated} generated now); train on them with "
        f"--config.data.pairs_dir={info.directory}",
        flush=True,
    )


if __name__ == "__main__":
    common.run(main, define_flags)
