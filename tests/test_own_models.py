"""docs/own-models.md: its Flax NNX and Equinox examples run as written and do what it says."""

import pathlib
import re

import jax
import numpy as np
import pytest

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "own-models.md"


def run_section(section: str) -> dict:
    """Runs the first Python block under the page's heading ``## {section}``; its namespace."""
    body = PAGE.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    namespace = {"__name__": "own_models_example"}
    # Users' code is not held to the test suite's strict rank promotion.
    with jax.numpy_rank_promotion("allow"):
        exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


def test_flax_nnx_example_trains_and_samples_through_fmjax():
    pytest.importorskip("flax.nnx")
    from flax import nnx

    namespace = run_section("Flax NNX")
    losses, result = namespace["losses"], namespace["result"]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.7 * losses[0]
    assert bool(result.success) and int(result.nfe) == 40  # heun: 2 evaluations x 20 steps
    x = np.asarray(result.x)
    assert x.shape == (512, 2) and np.isfinite(x).all()
    # The trained field moves noise (mean radius ~1.25) out towards the centres at +-(2, 2).
    assert np.mean(np.linalg.norm(x, axis=1)) > 1.8
    # nnx.update put the trained parameters back into the module.
    params = nnx.state(namespace["model"])
    for got, want in zip(
        jax.tree.leaves(params), jax.tree.leaves(namespace["params"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_equinox_example_trains_and_samples_through_fmjax():
    pytest.importorskip("equinox")
    namespace = run_section("Equinox")
    losses, result = namespace["losses"], namespace["result"]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.7 * losses[0]
    assert bool(result.success) and int(result.nfe) == 40
    x = np.asarray(result.x)
    assert x.shape == (512, 8) and np.isfinite(x).all()
    # Samples move from N(0, I) towards the data's mean, linspace(-2, 2, 8).
    mean = np.asarray(namespace["MEAN"])
    assert np.linalg.norm(x.mean(0) - mean) < 0.5 * np.linalg.norm(mean)


def test_the_concepts_pages_time_convention_example_runs():
    text = (PAGE.parent / "concepts.md").read_text().split("## The network's time\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/concepts.md", "exec"), namespace)
    assert namespace["x1"].shape == (16, 2)
