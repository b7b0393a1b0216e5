"""The entry points users run, end to end in shortened settings (fresh processes)."""

import json
import os
import pathlib
from typing import NamedTuple

import jax
import numpy as np
import pytest
from helpers import ROOT, metrics_lines, module_output, training_steps
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


def test_digits_resumes_and_learns_digits_an_untrained_model_does_not(digits_quick):
    # One run for two properties (each fresh process costs a minute of CI): the quick run
    # resumes where it stopped, and 300 steps separate it from an untrained model.
    workdir = digits_quick.workdir
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
