"""The offline main job: train a flow-matching U-Net on scikit-learn's 8x8 digits and score it.

    python -m experiments.digits [--workdir=runs/digits]
                                 [--config=...digits.py[:quick|:meanflow|:reflow|:distill]]
                                 [--config.train.num_steps=...] [--init_from=RUN] [--reevaluate]
                                 [--verbose]

Writes ``metrics.jsonl`` (with the digits score every ``train.eval_every`` steps), TensorBoard
events, sample grids (``samples/``), checkpoints (the latest and the best-scoring) and the final
evaluation ``eval/digits.json`` to the workdir; running it again resumes. A finished run is not
evaluated again: its ``eval/digits.json`` is read back when it matches the checkpoint and the
evaluation's settings (``--reevaluate`` redoes it).

The digits score is the Fréchet distance between generated digits and the 300 held-out test
digits in the feature space of a small classifier (`fmjax.metrics.digits`), shown beside the
score of the training digits (the floor) and of uniform noise (the baseline). The bits/dim of
the first ``eval.bpd_examples`` test digits (all 300 by default; the uniform-dequantisation bound)
is shown beside two baselines: a
per-pixel histogram fitted on the training digits and a uniform distribution over the 17 levels.
The final solves run in chunks, each reported by a line as it ends.
"""

import json
import logging
import math
import os
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import common
from fmjax import configs, data, likelihood, meanflow, rundir, sampling, train
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
    flags.DEFINE_bool(
        "reevaluate",
        False,
        "Redo the final evaluation of a finished run even when eval/digits.json holds it.",
    )


FINAL_SAMPLES = 1000
MEAN_FLOW_STEPS = (1, 2, 4)  # the jumps a mean-flow run is scored at
BPD_DRAWS = 1  # dequantisation draws per test digit (the Flow Matching paper uses 50)
SAMPLE_CHUNK = 250  # final samples per solve: a progress line each
BPD_CHUNK = 25  # test digits per likelihood solve: a progress line each


def validate(config) -> None:
    """Checks every choice of a digits config before anything is built; raises ``ValueError``
    naming the key, the value and what is expected."""
    configs.validate(config, num_devices=jax.device_count())
    if config.data.name not in ("digits", "pairs"):
        raise ValueError(
            f"config.data.name={config.data.name!r} is not valid for the digits job, whose score "
            "and bits/dim are the digits'; expected 'digits', or 'pairs' of a digits run "
            "(experiments.reflow; other data: experiments.cifar10)."
        )
    if config.data.name == "pairs":
        teacher = data.read_pairs_info(config.data.pairs_dir)["config"]["data"]
        if teacher["name"] not in ("digits", "pairs"):
            raise ValueError(
                f"config.data.pairs_dir={config.data.pairs_dir!r} holds pairs of a run on "
                f"{teacher['name']!r}; the digits job trains on pairs of a digits run."
            )
    if config.train.eval_samples < 2:
        raise ValueError(
            f"config.train.eval_samples={config.train.eval_samples!r} must be at least 2: the "
            "digits score fits a Gaussian to the samples."
        )
    tests = data.digits("test").num_examples
    examples = config.eval.bpd_examples
    if not (isinstance(examples, int) and 0 < examples <= tests):
        raise ValueError(
            f"config.eval.bpd_examples={examples!r} must be an integer in [1, {tests}] (the "
            "test digits whose bits/dim is measured)."
        )


def score_hook(config, model, mesh) -> train.EvalHook:
    """The digits score of ``train.eval_samples`` EMA samples; the best state is kept, and
    ``best.json`` records the number of samples (fewer than the final evaluation's, so its
    score reads higher: the Fréchet distance of few samples is biased upwards).

    A hook factory of :func:`fmjax.train.train_and_evaluate` (``mesh`` is unused: the score's
    few samples run on one device)."""
    del mesh
    velocity = make_velocity(model, config)
    key = stream_key(config.seed, Stream.DIGITS_SCORE)

    def score(step, state):
        result = generate(config, velocity, state, config.train.eval_samples, key)
        return {"digits_fd": digits_score(np.asarray(result.x)).fd}

    return train.EvalHook(
        every=config.train.eval_every,
        fn=score,
        keep_best="digits_fd",
        details={"num_samples": config.train.eval_samples},
    )


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


def sample_final(config, velocity, state, key, mean_flow_steps: int | None = None):
    """``FINAL_SAMPLES`` EMA samples in solves of ``SAMPLE_CHUNK``, a line after each, from the
    noise that :func:`fmjax.generate.generate` draws with ``key`` (each sample's solve is its
    own, so the chunks change nothing); ``(samples, NFE per sample)``.

    A mean-flow run jumps ``mean_flow_steps`` times (default ``config.meanflow.sample_steps``).
    """
    x0 = jax.random.normal(key, (FINAL_SAMPLES, *config.data.image_shape))
    params = jax.device_get(state.ema_params)
    classes = config.model.num_classes
    what = "samples" if mean_flow_steps is None else f"samples ({mean_flow_steps} step(s))"
    began, parts, nfe = time.perf_counter(), [], 0
    for part in _chunks(FINAL_SAMPLES, SAMPLE_CHUNK):
        labels = (
            None if classes is None else np.arange(part.start, part.stop, dtype=np.int32) % classes
        )
        fn = jax.tree_util.Partial(velocity, params, labels)
        with common.heartbeat(f"Final {what} {part.start + 1}-{part.stop}"):
            if config.objective == "mean_flow":
                steps = config.meanflow.sample_steps if mean_flow_steps is None else mean_flow_steps
                result = meanflow.sample(fn, x0[part], steps=steps)
            else:
                t = config.train
                result = sampling.sample(fn, x0[part], solver=t.sample_solver, steps=t.sample_steps)
            parts.append(np.asarray(result.x))
        nfe = max(nfe, int(result.nfe))
        logging.info(
            "Final %s: %d/%d (%.1f s)",
            what, part.stop, FINAL_SAMPLES, time.perf_counter() - began,
        )  # fmt: skip
    return np.concatenate(parts), nfe


def held_out_bits_per_dim(config, model, state) -> tuple[float, float]:
    """Bits/dim of the EMA model on the first ``eval.bpd_examples`` test digits (the
    uniform-dequantisation bound) and the mean NFE of a solve, in solves of ``BPD_CHUNK``
    digits (chunk ``i`` draws from ``fold_in(key, i)``), a line after each.

    The digits' 17 levels sit at the centres of 17 bins of [-1, 1] (``fmjax.data.digits``),
    so this is ``dequantized_bits_per_dim`` with ``num_bins=17``: ``BPD_DRAWS`` draws of
    uniform noise within each pixel's bin, Hutchinson divergence, dopri5 at 1e-5.
    """
    levels = data.digits_levels(data.digits("test").images[: config.eval.bpd_examples])
    velocity = jax.tree_util.Partial(
        make_velocity(model, config), jax.device_get(state.ema_params), None
    )
    key = stream_key(config.seed, Stream.DIGITS_BPD)
    began, bpds, nfes = time.perf_counter(), [], []
    for i, part in enumerate(_chunks(len(levels), BPD_CHUNK)):
        with common.heartbeat(f"Bits/dim of test digits {part.start + 1}-{part.stop}"):
            result = likelihood.dequantized_bits_per_dim(
                velocity,
                jax.random.fold_in(key, i),
                levels[part],
                num_draws=BPD_DRAWS,
                num_bins=data.DIGITS_LEVELS,
                divergence="hutchinson",
                solver="dopri5",
                rtol=1e-5,
                atol=1e-5,
            )
            bpds.append(np.asarray(result.bpd))
        nfes.append(int(result.nfe) / BPD_DRAWS)
        logging.info(
            "Bits/dim: %d/%d test digits, %.3f so far (%.0f NFE, %.1f s)",
            part.stop, len(levels), np.mean(np.concatenate(bpds)), nfes[-1],
            time.perf_counter() - began,
        )  # fmt: skip
    return float(np.mean(np.concatenate(bpds))), float(np.mean(nfes))


def evaluation_settings(config, step: int) -> dict:
    """What the final evaluation of ``config``'s run at ``step`` depends on: a saved
    ``eval/digits.json`` with the same values is that evaluation."""
    mean_flow = config.objective == "mean_flow"
    return {
        "step": step,
        "num_samples": FINAL_SAMPLES,
        "objective": config.objective,
        "solver": "meanflow" if mean_flow else config.train.sample_solver,
        "steps": config.meanflow.sample_steps if mean_flow else config.train.sample_steps,
        "bpd_examples": config.eval.bpd_examples,
        "bpd_draws": BPD_DRAWS,
        "bpd_chunk": BPD_CHUNK,
    }


def saved_evaluation(config, step: int, workdir: str) -> dict | None:
    """``workdir/eval/digits.json`` if it holds the final evaluation of ``step`` with the
    settings of ``config``; else None."""
    try:
        with open(os.path.join(workdir, "eval", "digits.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    settings = evaluation_settings(config, step)
    if not isinstance(report, dict) or any(report.get(k) != v for k, v in settings.items()):
        return None
    return report


def score_lines(report: dict) -> list[str]:
    """The printed lines of the final digits score (and, for a mean flow, its scores by the
    number of jumps)."""
    lines = [
        f"Digits score (Frechet distance to the test digits, lower is better) of "
        f"{report['num_samples']} samples, {report['nfe']} NFE: {report['digits_fd']:.3f}; "
        f"floor (train digits) {report['floor_train_vs_test']:.3f}; "
        f"uniform noise {report['baseline_uniform_noise']:.1f}."
    ]
    if "digits_fd_by_steps" in report:
        lines.append(
            "Mean flow, digits score by number of steps: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in report["digits_fd_by_steps"].items())
            + " (bits/dim below: the instantaneous field u(x, t, t))."
        )
    return lines


def bpd_line(report: dict) -> str:
    """The printed line of the final bits/dim."""
    return (
        f"Bits/dim of {report['bpd_examples']} test digits (dequantisation bound, "
        f"{report['bpd_nfe_per_draw']:.0f} NFE): {report['bits_per_dim']:.3f}; per-pixel "
        f"histogram {report['bpd_baseline_pixel_histogram']:.3f}; uniform levels "
        f"{report['bpd_baseline_uniform']:.3f}."
    )


def final_evaluation(config, model, state, workdir: str) -> dict:
    """Scores ``FINAL_SAMPLES`` EMA samples and measures the bits/dim, printing each result
    as soon as it is known; writes and returns ``eval/digits.json``."""
    velocity = make_velocity(model, config)
    key = stream_key(config.seed, Stream.DIGITS_FINAL)
    report = evaluation_settings(config, int(state.step))
    by_steps = {}
    if config.objective == "mean_flow":
        # The same noise at each number of jumps; the configured one is the headline score.
        for steps in MEAN_FLOW_STEPS:
            x, nfe = sample_final(config, velocity, state, key, mean_flow_steps=steps)
            by_steps[steps] = (digits_score(x), nfe)
    headline = config.meanflow.sample_steps if by_steps else None
    if headline in by_steps:
        score, nfe = by_steps[headline]
    else:
        x, nfe = sample_final(config, velocity, state, key)
        score = digits_score(x)
    report.update(
        digits_fd=score.fd,
        floor_train_vs_test=score.floor,
        baseline_uniform_noise=score.noise,
        nfe=nfe,
    )
    if by_steps:
        report["digits_fd_by_steps"] = {str(k): v.fd for k, (v, _) in by_steps.items()}
    for line in score_lines(report):
        print(line, flush=True)
    logging.info(
        "Bits/dim of %d test digits: %d adaptive solve(s) of up to %d digits (the first one "
        "compiles)",
        config.eval.bpd_examples, math.ceil(config.eval.bpd_examples / BPD_CHUNK), BPD_CHUNK,
    )  # fmt: skip
    bpd, nfe_per_draw = held_out_bits_per_dim(config, model, state)
    report.update(
        bits_per_dim=bpd,
        bpd_nfe_per_draw=nfe_per_draw,
        bpd_baseline_pixel_histogram=histogram_bits_per_dim(),
        bpd_baseline_uniform=math.log2(data.DIGITS_LEVELS),
    )
    print(bpd_line(report), flush=True)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "digits.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv):
    del argv
    common.setup()
    config, workdir = FLAGS.config, FLAGS.workdir
    validate(config)
    logging.info("Training on digits into %s", workdir)
    hooks = [score_hook] if config.train.eval_every else []
    state = train.train_and_evaluate(config, workdir, hooks=hooks, init_from=FLAGS.init_from)
    run = rundir.load_config(workdir)  # the run's config, with the data's image shape
    model = configs.build_model(run.model)
    samples = os.path.join(workdir, "samples")  # none when stopped before the first grid
    grids = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    print(
        f"Done at step {int(state.step)}" + (f"; samples: {samples}/{grids[-1]}" if grids else ""),
        flush=True,
    )
    if int(state.step) != config.train.num_steps:
        return
    report = None if FLAGS.reevaluate else saved_evaluation(run, int(state.step), workdir)
    if report is None:
        final_evaluation(run, model, state, workdir)
        return
    logging.info(
        "The final evaluation of step %d is in %s; --reevaluate redoes it.",
        int(state.step), os.path.join(workdir, "eval", "digits.json"),
    )  # fmt: skip
    for line in [*score_lines(report), bpd_line(report)]:
        print(line)


if __name__ == "__main__":
    common.run(main, define_flags)
