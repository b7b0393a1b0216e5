"""`python -m experiments.toy2d`: both couplings trained, the figure and metrics written."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import toy2d

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick run on 8 Gaussians in a fresh process (one CPU device, as a user runs it)."""
    workdir = tmp_path_factory.mktemp("toy2d")
    env = dict(os.environ, FMJAX_JAX_CACHE=str(ROOT / ".jax_cache"))
    for name in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.toy2d", f"--workdir={workdir}", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, result.stdout


def test_quick_run_writes_the_figure_and_metrics(quick_run):
    workdir, stdout = quick_run
    assert Image.open(workdir / "toy2d.png").size == (1200, 800)  # 2 couplings x 3 panels
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["dataset"] == "8gaussians"
    assert set(metrics["couplings"]) == {"independent", "exact_ot"}
    steps, log_every = toy2d.QUICK.steps, toy2d.QUICK.log_every
    for m in metrics["couplings"].values():
        assert m["success"] and m["nfe"] > 0 and math.isfinite(m["final_loss"])
        assert m["loss_curve"]["step"] == list(range(log_every, steps + 1, log_every))
        assert m["loss_curve"]["loss"][-1] < m["loss_curve"]["loss"][0]
    assert "Done:" in stdout


def test_ot_coupling_gives_lower_loss_and_straighter_paths(quick_run):
    workdir, _ = quick_run
    runs = json.loads((workdir / "metrics.json").read_text())["couplings"]
    independent, ot = runs["independent"], runs["exact_ot"]
    # The OT pairing removes most of the conditional variance of the regression target.
    assert ot["final_loss"] < 0.5 * independent["final_loss"]
    assert 1.0 <= ot["straightness"] < independent["straightness"]
    assert ot["nfe"] <= independent["nfe"]


def test_learned_density_is_close_to_the_true_one(quick_run):
    workdir, _ = quick_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    true_nll = metrics["true_heldout_nll"]
    assert true_nll == pytest.approx(3.8, abs=0.15)  # the entropy of torchcfm's 8 Gaussians
    for m in metrics["couplings"].values():
        # A model cannot beat the true density by more than the noise of 500 held-out points.
        assert true_nll - 0.2 < m["heldout_nll"] < true_nll + 1.0
        # The exact W2 to fresh data is near that between two true sample sets (measured
        # 0.91 and 1.00 against a floor of 0.94 with 500 points).
        assert m["w2_to_fresh_data"] < 1.5 * metrics["w2_floor"]


def test_grid_points_are_in_the_order_imshow_draws_them():
    # Row-major from the bottom row up, matching imshow(origin="lower") after a reshape.
    points = toy2d.grid_points((0.0, 2.0, 0.0, 4.0), 2)
    np.testing.assert_allclose(points, [[0.5, 1.0], [1.5, 1.0], [0.5, 3.0], [1.5, 3.0]])


def test_steps_must_fill_whole_chunks(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive multiple of log_every=50"):
        toy2d.run(str(tmp_path), "moons", toy2d.QUICK._replace(steps=70))
