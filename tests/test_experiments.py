"""The entry points users run, end to end in shortened settings (fresh processes)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str) -> str:
    env = dict(os.environ)
    env["FMJAX_JAX_CACHE"] = str(ROOT / ".jax_cache")
    for name in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS"):  # one CPU device, like a user's laptop
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def steps_logged(workdir: pathlib.Path) -> list[int]:
    """The steps of the training-metric lines (evaluation scores have lines of their own)."""
    return [m["step"] for m in metrics(workdir) if "loss" in m]


@pytest.fixture(scope="module")
def digits_quick(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    output = run_module(
        "experiments.digits", f"--workdir={workdir}", "--config=experiments/configs/digits.py:quick"
    )
    return workdir, output


def test_digits_quick_writes_every_artefact(digits_quick):
    workdir, output = digits_quick
    assert steps_logged(workdir) == [2, 3, 4, 6]  # every 2 steps and at each checkpoint
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    grid = Image.open(workdir / "samples" / "step_00000006.png")
    assert grid.size == (4 * 8 * 8 + 5 * 8,) * 2  # 16 samples of 8x8, 4 per row, enlarged 8x
    assert "Done at step 6" in output and "CheckpointManager" not in output
    scored = [(m["step"], m["digits_fd"]) for m in metrics(workdir) if "digits_fd" in m]
    assert [step for step, _ in scored] == [3, 6]
    best = json.loads((workdir / "best.json").read_text())
    assert best["value"] == min(fd for _, fd in scored) and best["metric"] == "digits_fd"
    report = json.loads((workdir / "eval" / "digits.json").read_text())
    assert report["num_samples"] == 1000 and report["nfe"] == 4  # heun, 2 steps
    # Six steps of a tiny model: far from the floor, but the score is well defined.
    assert report["floor_train_vs_test"] < report["digits_fd"]
    assert "Digits score" in output and "Bits/dim of 16 test digits" in output
    assert report["bpd_examples"] == 16 and report["bpd_nfe_per_draw"] > 0
    assert report["bpd_baseline_uniform"] == pytest.approx(4.0875, abs=1e-4)  # log2(17)
    assert report["bpd_baseline_pixel_histogram"] == pytest.approx(2.4223, abs=1e-4)
    assert 0 < report["bits_per_dim"] < 20  # six steps: a loose bound, but a finite one


def test_digits_resumes_where_it_stopped(digits_quick):
    workdir, _ = digits_quick
    output = run_module(
        "experiments.digits", f"--workdir={workdir}", "--config=experiments/configs/digits.py:quick",
        "--config.train.num_steps=8",
    )  # fmt: skip
    assert "Resuming" in output and "from step 6" in output
    assert steps_logged(workdir) == [2, 3, 4, 6, 8]


def test_readme_sampling_snippet_runs_on_a_trained_run(digits_quick, tmp_path, monkeypatch):
    workdir, _ = digits_quick
    text = (ROOT / "README.md").read_text().split("## Sample from a trained run\n", 1)[1]
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"runs/digits"' in snippet
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(
        compile(snippet.replace('"runs/digits"', repr(str(workdir))), "README.md", "exec"),
        namespace,
    )
    result = namespace["result"]
    assert bool(result.success) and result.x.shape == (16, 8, 8, 1) and int(result.nfe) > 0
    assert (tmp_path / "digits.png").exists()


def test_digits_score_separates_a_trained_model_from_an_untrained_one(tmp_path):
    import jax
    import numpy as np

    from fmjax import checkpoint, train
    from fmjax.metrics.digits import digits_score

    workdir = tmp_path / "digits300"
    run_module(
        "experiments.digits", f"--workdir={workdir}", "--config=experiments/configs/digits.py:quick",
        "--config.train.num_steps=300", "--config.train.log_every=100",
        "--config.train.checkpoint_every=300", "--config.train.sample_every=300",
        "--config.train.eval_every=300", "--config.train.sample_steps=10",
    )  # fmt: skip
    trained = json.loads((workdir / "eval" / "digits.json").read_text())
    run = checkpoint.load_run(workdir)
    tx, _ = train.make_optimizer(run.config.optim, run.config.train.num_steps)
    untrained_state = train.init_state(run.config, run.model, tx)
    velocity = train.make_velocity(run.model, run.config)
    result = train.generate(run.config, velocity, untrained_state, 1000, jax.random.key(0))
    untrained = digits_score(np.asarray(result.x))
    # Measured: 300 steps of the tiny U-Net 3.07, untrained 97.3, floor 1.29.
    assert trained["floor_train_vs_test"] < trained["digits_fd"] < untrained.fd / 5
