"""The README's example runs as written and does what the README says it does."""

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_use_fmjax_in_your_own_project_example():
    namespace = {"__name__": "readme_example"}
    # Users' code is not held to the test suite's strict rank promotion.
    with jax.numpy_rank_promotion("allow"):
        exec(
            compile(_python_block("Use fmjax in your own JAX project"), "README.md", "exec"),
            namespace,
        )
    losses = namespace["losses"]
    assert np.mean(losses[-100:]) < 0.6 * losses[0]
    radius = np.asarray(namespace["radius"])
    # Generated points lie on the ring of radius 4, not at the noise's typical radius ~1.25.
    assert abs(np.median(radius) - 4.0) < 0.3
