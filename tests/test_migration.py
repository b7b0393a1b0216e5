"""docs/migration.md: every example of the torchcfm / Meta migration guide runs as written and
its own assertions (the correspondences it shows) hold."""

import pathlib
import re

import jax
import pytest

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "migration.md"
SECTIONS = re.findall(r"^## (.+)$", PAGE.read_text(), re.M)


def blocks(section: str) -> list[str]:
    body = PAGE.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_every_section_but_the_sde_pointer_has_an_example():
    assert [s for s in SECTIONS if not blocks(s)] == ["Stochastic sampling"]


@pytest.mark.parametrize("section", [s for s in SECTIONS if blocks(s)])
def test_example_runs_and_its_checks_hold(section):
    for code in blocks(section):
        # Users' code is not held to the test suite's strict rank promotion.
        with jax.numpy_rank_promotion("allow"):
            exec(compile(code, f"{PAGE}:{section}", "exec"), {"__name__": "migration_example"})
