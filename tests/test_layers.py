"""The layering of the design: the core imports only jax, optax, diffrax, numpy and jaxtyping
(and SciPy, which JAX itself requires), the standard library and other core modules, so that
a JAX project can use the loss or the sampler without Flax, Orbax or TensorFlow."""

import ast
import pathlib
import sys

import pytest

FMJAX = pathlib.Path(__file__).resolve().parent.parent / "fmjax"
CORE = (
    "paths",
    "couplings",
    "timesteps",
    "loss",
    "sampling",
    "likelihood",
    "keys",
    "mesh",
    "_checks",
    "_integrate",
    "_xla",
)
# What the models and the metrics may import from fmjax: the layers below them.
BELOW = {"models": set(CORE), "metrics": {*CORE, "models", "data", "images"}}
THIRD_PARTY = {"jax", "optax", "diffrax", "numpy", "jaxtyping", "scipy"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module)
            if node.module == "fmjax":
                names.update(f"fmjax.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_imports_only_the_core_dependencies(module):
    for name in imported_modules(FMJAX / f"{module}.py"):
        top = name.split(".")[0]
        if top == "fmjax":
            assert name == "fmjax" or name.split(".")[1] in CORE, f"{module} imports {name}"
        else:
            assert top in THIRD_PARTY or top in sys.stdlib_module_names, f"{module} imports {name}"


def test_the_check_sees_nested_imports(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("import jax\n\ndef f():\n    from flax import linen\n")
    assert imported_modules(path) == {"jax", "flax"}


def top_level_fmjax_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """The fmjax modules a file imports at its top level, and those imported anywhere else."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    names: tuple[set[str], set[str]] = (set(), set())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        else:
            continue
        fmjax = {n for n in found if n.split(".")[0] == "fmjax" and n != "fmjax"}
        names[id(node) not in top].update(fmjax)
    return names


@pytest.mark.parametrize("package", sorted(BELOW))
def test_models_and_metrics_import_only_lower_layers_and_only_at_the_top(package):
    for path in sorted((FMJAX / package).glob("*.py")):
        top, nested = top_level_fmjax_imports(path)
        assert not nested, f"{package}/{path.name} imports {sorted(nested)} inside a function"
        for name in top:
            part = name.split(".")[1]
            assert (
                part in BELOW[package] or part == package or name.startswith(f"fmjax.{package}")
            ), f"{package}/{path.name} imports {name}"
