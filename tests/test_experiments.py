"""The entry points users run, end to end in shortened settings (fresh processes)."""

import json
import logging
import os
import pathlib
import time
from types import SimpleNamespace
from typing import NamedTuple

import jax
import numpy as np
import pytest
from helpers import ROOT, metrics_lines, module_output, run_module, training_steps
from PIL import Image

from fmjax import configs, rundir
from fmjax.generate import generate, make_velocity
from fmjax.metrics.digits import digits_score
from fmjax.step import init_state


class QuickRun(NamedTuple):
    """What the quick digits run left, read before a later test resumes it in place."""

    workdir: pathlib.Path
    output: str
    metrics: list[dict]
    checkpoints: list[str]
    grid_size: tuple[int, int]
    best: dict
    report: dict


@pytest.fixture(scope="module")
def digits_quick(tmp_path_factory) -> QuickRun:
    workdir = tmp_path_factory.mktemp("digits")
    output = module_output(
        "experiments.digits", f"--workdir={workdir}", "--config=experiments/configs/digits.py:quick"
    )
    return QuickRun(
        workdir,
        output,
        metrics_lines(workdir),
        sorted(os.listdir(workdir / "checkpoints")),
        Image.open(workdir / "samples" / "step_00000006.png").size,
        json.loads((workdir / "best.json").read_text()),
        json.loads((workdir / "eval" / "digits.json").read_text()),
    )


def test_digits_quick_writes_every_artefact(digits_quick):
    run = digits_quick
    # Every 2 steps and at each checkpoint.
    assert [m["step"] for m in run.metrics if "loss" in m] == [2, 3, 4, 6]
    assert run.checkpoints == ["3", "6"]
    assert run.grid_size == (4 * 8 * 8 + 5 * 8,) * 2  # 16 samples of 8x8, 4 per row, enlarged 8x
    assert "Done at step 6" in run.output and "CheckpointManager" not in run.output
    scored = [(m["step"], m["digits_fd"]) for m in run.metrics if "digits_fd" in m]
    assert [step for step, _ in scored] == [3, 6]
    assert run.best["value"] == min(fd for _, fd in scored) and run.best["metric"] == "digits_fd"
    report = run.report
    assert report["num_samples"] == 1000 and report["nfe"] == 4  # heun, 2 steps
    # Six steps of a tiny model: far from the floor, but the score is well defined.
    assert report["floor_train_vs_test"] < report["digits_fd"]
    assert "Digits score" in run.output and "Bits/dim of 16 test digits" in run.output
    assert report["bpd_examples"] == 16 and report["bpd_nfe_per_draw"] > 0
    assert report["bpd_baseline_uniform"] == pytest.approx(4.0875, abs=1e-4)  # log2(17)
    assert report["bpd_baseline_pixel_histogram"] == pytest.approx(2.4223, abs=1e-4)
    assert 0 < report["bits_per_dim"] < 20  # six steps: a loose bound, but a finite one
    # It talks as it goes: a line per evaluation (with its time), per chunk of the final solves;
    # the best state's record says how many samples its score has; no line twice.
    evaluations = [line for line in run.output.splitlines() if "| digits_fd " in line]
    assert len(evaluations) == 2 and all("evaluated in" in line for line in evaluations)
    assert "step 3/6 | digits_fd" in evaluations[0] and "step 6/6 | digits_fd" in evaluations[1]
    assert all("(num_samples=64" in line for line in evaluations)
    assert run.best["num_samples"] == 64
    assert "Final samples: 1000/1000" in run.output and "Bits/dim: 16/16 test digits" in run.output
    messages = [line.split("] ", 1)[1] for line in run.output.splitlines() if "] " in line]
    assert len(messages) == len(set(messages)), messages
    assert "Unable to initialize backend" not in run.output


def test_digits_resumes_and_learns_digits_an_untrained_model_does_not(digits_quick):
    # One run for two properties (each fresh process costs a minute of CI): the quick run
    # resumes where it stopped, and 300 steps separate it from an untrained model.
    workdir = digits_quick.workdir
    # Finished: run again, it reads its final evaluation back instead of redoing it.
    quick = ("--config=experiments/configs/digits.py:quick", f"--workdir={workdir}")
    again = module_output("experiments.digits", *quick)
    assert "The final evaluation of step 6 is in" in again and "Final samples" not in again
    assert f"{digits_quick.report['digits_fd']:.3f}" in again
    output = module_output(
        "experiments.digits", f"--workdir={workdir}", "--config=experiments/configs/digits.py:quick",
        "--config.train.num_steps=300", "--config.train.log_every=100",
        "--config.train.checkpoint_every=300", "--config.train.sample_every=300",
        "--config.train.eval_every=300", "--config.train.sample_steps=10",
    )  # fmt: skip
    assert "Resuming" in output and "from step 6" in output
    assert training_steps(workdir) == [2, 3, 4, 6, 100, 200, 300]
    trained = json.loads((workdir / "eval" / "digits.json").read_text())
    run = rundir.load_run(workdir)
    tx, _ = configs.make_optimizer(run.config.optim, run.config.train.num_steps)
    untrained_state = init_state(run.config, run.model, tx)
    velocity = make_velocity(run.model, run.config)
    result = generate(run.config, velocity, untrained_state, 1000, jax.random.key(0))
    untrained = digits_score(np.asarray(result.x))
    # Measured (300 fresh steps): the tiny U-Net 3.07, untrained 97.3, floor 1.29.
    assert trained["floor_train_vs_test"] < trained["digits_fd"] < untrained.fd / 5


def run_snippet(path: str, after: str, workdir: pathlib.Path) -> dict:
    """Runs the first Python block of the file ``path`` after the text ``after``, on the run in
    ``workdir`` (the block's ``"runs/digits"``); its namespace."""
    text = (ROOT / path).read_text().split(after, 1)[1]
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"runs/digits"' in snippet
    namespace = {}
    exec(compile(snippet.replace('"runs/digits"', repr(str(workdir))), path, "exec"), namespace)
    return namespace


def test_readme_sampling_snippet_runs_on_a_trained_run(digits_quick, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_snippet("README.md", "To sample from a saved run:", digits_quick.workdir)
    images = np.asarray(namespace["images"])
    assert images.shape == (16, 8, 8, 1) and np.isfinite(images).all()


def test_getting_started_sampling_snippet_runs_on_a_trained_run(
    digits_quick, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    namespace = run_snippet(
        "docs/getting-started.md", "call the sampler directly:", digits_quick.workdir
    )
    result = namespace["result"]
    assert bool(result.success) and result.x.shape == (16, 8, 8, 1) and int(result.nfe) > 0
    assert (tmp_path / "digits.png").exists()


def test_the_final_evaluation_prints_each_result_when_known(
    digits_quick, tmp_path, monkeypatch, capsys
):
    # The score is printed before the bits/dim are computed; the samples come in chunks.
    from experiments import digits

    run = rundir.load_run(digits_quick.workdir)
    monkeypatch.setattr(digits, "FINAL_SAMPLES", 16)
    monkeypatch.setattr(digits, "SAMPLE_CHUNK", 8)
    printed_before_bpd = []

    def bpd(config, model, state):
        printed_before_bpd.append(capsys.readouterr().out)
        return 3.0, 42.0

    monkeypatch.setattr(digits, "held_out_bits_per_dim", bpd)
    state = SimpleNamespace(step=run.step, ema_params=run.ema_params)
    report = digits.final_evaluation(run.config, run.model, state, tmp_path)
    assert printed_before_bpd[0].startswith("Digits score (")
    assert "of 16 samples" in printed_before_bpd[0]
    printed_after = capsys.readouterr().out
    assert "Bits/dim of 16 test digits (dequantisation bound, 42 NFE): 3.000" in printed_after
    # What a rerun compares: the saved report is found, and not for another step or setting.
    assert digits.saved_evaluation(run.config, run.step, tmp_path) == report
    assert digits.saved_evaluation(run.config, run.step + 1, tmp_path) is None
    other = run.config.copy_and_resolve_references()
    other.eval.bpd_examples = 8
    assert digits.saved_evaluation(other, run.step, tmp_path) is None


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "experiments.digits",
            ["--config.path.coupling=exactot"],
            "error: config.path.coupling='exactot' is not valid; expected one of",
        ),
        pytest.param(
            "experiments.digits",
            ["--config=experiments/configs/digits.py:quick", "--config.eval.bpd_examples=301"],
            "error: config.eval.bpd_examples=301 must be an integer in [1, 300]",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "experiments.cifar10",
            ["--mode=sample", "--params={workdir}/missing.npz", "--config.path.scheduler=cos"],
            "error: config.path.scheduler='cos' is not valid; expected one of",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "experiments.toy2d",
            ["--dataset=spirals"],
            "error: flag --dataset=spirals: value should be one of",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["digits_coupling", "digits_bpd_examples", "cifar10_scheduler", "toy2d_dataset"],
)
def test_a_bad_choice_is_one_error_line_before_anything_is_built(tmp_path, module, args, message):
    workdir = tmp_path / "run"
    result = run_module(module, f"--workdir={workdir}", *(a.format(workdir=workdir) for a in args))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(message) and "Traceback" not in result.stderr
    assert not workdir.exists()


_HELP_SLOW = ("experiments.cifar10", "experiments.toy2d", "experiments.fid", "experiments.convert")


@pytest.mark.parametrize(
    "module",
    ["experiments.digits", *(pytest.param(m, marks=pytest.mark.slow) for m in _HELP_SLOW)],
)
def test_help_exits_0(module):
    result = run_module(module, "--help", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout or "usage:" in result.stdout


def test_the_tpu_probe_note_is_dropped_and_other_records_pass():
    from experiments import common

    common.quiet_tpu_probe()
    common.quiet_tpu_probe()  # idempotent
    logger = logging.getLogger("jax._src.xla_bridge")
    assert sum(isinstance(f, common._NoTpuProbe) for f in logger.filters) == 1

    def record(message):
        return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)

    assert not logger.filter(record("Unable to initialize backend 'tpu': INTERNAL: no libtpu"))
    assert logger.filter(record("Unable to initialize backend 'cuda': no GPU"))


def test_a_heartbeat_fills_a_long_block_and_stays_quiet_in_a_short_one(caplog):
    from experiments import common

    with caplog.at_level("INFO"):
        with common.heartbeat("Solving", every=0.05):
            time.sleep(0.3)
        long_block = [r.getMessage() for r in caplog.records]
        caplog.clear()
        with common.heartbeat("Solving", every=10.0):
            pass
    assert len(long_block) >= 3 and long_block[0].startswith("Solving: still running (")
    assert caplog.records == []
