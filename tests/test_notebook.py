"""`experiments/colab.ipynb`: executes with tiny parameters, and its install cell keeps JAX."""

import importlib.metadata
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile

import pytest
from helpers import ROOT, metrics_lines, one_device_env

nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs nbformat")
nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient")
pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 - after the skips
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = ROOT / "experiments" / "colab.ipynb"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def cell_with(notebook, text: str):
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and text in c.source]
    return cell


def with_parameters(notebook, **values):
    """Inserts a cell after the one tagged "parameters" that overrides its values (papermill's
    convention), checking that every override names an existing parameter."""
    (index,) = [
        i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
    ]
    defined = {line.split("=")[0].strip() for line in notebook.cells[index].source.splitlines()}
    assert set(values) <= defined, set(values) - defined
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


def test_notebook_is_stored_clean_with_a_placeholder_url():
    notebook = read_notebook()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)  # opens fresh
    assert 'REPO_URL = "https://github.com/YOUR-ORG/fmjax"  # PLACEHOLDER' in code[0].source
    assert "parameters" in code[0].metadata["tags"]
    assert notebook.metadata["accelerator"] == "GPU"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run in a fresh kernel of this interpreter, with tiny parameters."""
    tmp = tmp_path_factory.mktemp("notebook")
    workdir = tmp / "run"
    notebook = with_parameters(
        read_notebook(), NUM_STEPS=4, LOG_EVERY=2, MODEL="unet_tiny", NUM_SAMPLES=4,
        SAMPLE_STEPS=2, WORKDIR=str(workdir),
    )  # fmt: skip
    # This interpreter's kernel, whatever kernels the machine has registered.
    kernels = tmp / "kernels"
    (kernels / "fmjax-test").mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "fmjax test", "language": "python"}
    (kernels / "fmjax-test" / "kernel.json").write_text(json.dumps(spec))
    manager = KernelManager(
        kernel_name="fmjax-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    env = one_device_env()  # one CPU device, as on a laptop
    # JAX reads its config from JAX_* variables: the tests' persistent compilation cache.
    env["JAX_COMPILATION_CACHE_DIR"] = env["FMJAX_JAX_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    client = nbclient.NotebookClient(
        notebook, km=manager, timeout=300, resources={"metadata": {"path": str(tmp)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the traceback, if a cell fails
    return notebook, workdir


def test_notebook_trains_and_shows_the_loss_curve_and_samples(executed):
    notebook, workdir = executed
    install = cell_with(notebook, "pip_install(")
    assert "fmjax is already importable" in "".join(o.get("text", "") for o in install.outputs)
    logged = metrics_lines(workdir)
    assert [m["step"] for m in logged] == [2, 4]
    assert (workdir / "checkpoints" / "4").is_dir()
    for text in ("ax.plot(steps, losses)", "ax.imshow(grid"):  # the loss curve, the samples
        outputs = cell_with(notebook, text).outputs
        assert any("image/png" in o.get("data", {}) for o in outputs), outputs
    printed = "".join(o.get("text", "") for o in cell_with(notebook, "load_run(").outputs)
    assert "step 4: 4 velocity evaluations, success True" in printed  # Heun, 2 steps


class FakePip:
    """Stands in for ``pip install``: records each command and the constraints it was given."""

    def __init__(self):
        self.commands, self.constraints = [], None

    def __call__(self, command):
        self.commands.append(command[command.index("install") + 1 :])
        if "--constraint" in command:
            path = command[command.index("--constraint") + 1]
            self.constraints = pathlib.Path(path).read_text().split()


def run_install_cell(monkeypatch, tmp_path, versions: dict[str, str | None]) -> FakePip:
    """Runs the install cell as on a runtime without fmjax, where the distributions in
    ``versions`` have those versions (None: not installed); pip is faked."""
    pip = FakePip()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the constraints file
    monkeypatch.setattr(subprocess, "check_call", pip)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fmjax" else find_spec(name, *a),
    )
    version = importlib.metadata.version

    def fake_version(name):
        if name not in versions:
            return version(name)
        if versions[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    notebook = read_notebook()
    namespace = {"REPO_URL": "https://example.org/fmjax"}
    exec(cell_with(notebook, "pip_install(").source, namespace)
    return pip


def test_install_cell_installs_only_what_is_missing_and_never_jax(monkeypatch, tmp_path):
    pip = run_install_cell(monkeypatch, tmp_path, {"diffrax": None, "grain": "0.1.0"})
    assert pip.commands[0] == ["--quiet", "--no-deps", "fmjax @ git+https://example.org/fmjax"]
    assert pip.commands[1][-2:] == ["diffrax>=0.7.0", "grain>=0.2.10"]
    assert len(pip.commands) == 2
    for name in ("jax", "jaxlib", "numpy"):
        assert f"{name}=={importlib.metadata.version(name)}" in pip.constraints


def test_install_cell_stops_rather_than_replace_an_old_jax(monkeypatch, tmp_path):
    with pytest.raises(
        RuntimeError, match=r"fmjax needs jax>=0\.7\.2, but this runtime has 0\.4\.1"
    ):
        run_install_cell(monkeypatch, tmp_path, {"jax": "0.4.1"})


def test_install_cell_asks_for_the_repository_url():
    namespace = {"REPO_URL": "https://github.com/YOUR-ORG/fmjax"}
    source = cell_with(read_notebook(), "pip_install(").source
    source = source.replace('importlib.util.find_spec("fmjax") is not None', "False")
    with pytest.raises(ValueError, match="Set REPO_URL in the Parameters cell"):
        exec(source, namespace)
