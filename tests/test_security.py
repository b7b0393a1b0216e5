"""Security (issue 10): no code-executing deserialisation, and no config name that escapes the
directories the user named.

1. Nothing in ``fmjax/``, ``experiments/`` or the Colab notebook unpickles or evaluates
   strings: a static scan (the AST, not a grep, so aliases and keyword values count) rejects
   ``pickle``-family imports, ``eval``/``exec``, ``yaml.load``, ``np.load`` without
   ``allow_pickle=False`` and ``torch.load`` without ``weights_only=True``. The one
   ``torch.load`` is the documented converter of pytorch-fid's weights
   (``fmjax.metrics.inception``), with the restricted ``weights_only=True`` unpickler. Weights and
   statistics are ``.npz`` read with ``allow_pickle=False``; checkpoints are Orbax's (array
   files and JSON/msgpack metadata; its reader never unpickles, checked below too). Config
   *files* (``--config=...py``) are Python by design: the user chooses to run them.
2. A run writes only inside its workdir; names that come from configs or flags and become
   path components (a tfds dataset name, which tfds joins to the data directory) are refused
   when they contain ``..``, a leading ``/`` or extra separators. Every other file name a run
   writes is built from fixed words, integers and validated choices (the solver, the time
   grid), so no config string reaches a path.

Tests, which deliberately ``exec`` the README's snippets, are not scanned.
"""

import ast
import json
import os
import pathlib
import tempfile

import ml_collections
import numpy as np
import pytest
from helpers import TinyVelocity, tiny_config

from fmjax import configs, data, train
from fmjax.metrics import fid, inception

ROOT = pathlib.Path(__file__).resolve().parent.parent

_UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
_UNPICKLING_MODULES |= {"marshal"}  # code objects, as dangerous as pickle
_FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "pd.read_pickle",
    "pandas.read_pickle",
}
# Calls that are safe only with one keyword set to one value.
_REQUIRED_KEYWORD = {
    "np.load": ("allow_pickle", False),
    "numpy.load": ("allow_pickle", False),
    "torch.load": ("weights_only", True),
}


def unsafe_deserialisation(source: str, filename: str = "<source>") -> list[str]:
    """Each forbidden import or call in Python ``source``, as ``"file:line: what"``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                if name and name.split(".")[0] in _UNPICKLING_MODULES:
                    found.append(f"{filename}:{node.lineno}: imports {name}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in _FORBIDDEN_CALLS:
                found.append(f"{filename}:{node.lineno}: calls {name}")
            elif name in _REQUIRED_KEYWORD:
                keyword, value = _REQUIRED_KEYWORD[name]
                given = [k.value for k in node.keywords if k.arg == keyword]
                if not (given and isinstance(given[0], ast.Constant) and given[0].value is value):
                    found.append(f"{filename}:{node.lineno}: {name} without {keyword}={value}")
    return found


def _notebook_source(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            # Shell and magic lines (!pip, %cd) are not Python.
            cell_lines = "".join(cell["source"]).splitlines()
            lines += [line for line in cell_lines if not line.lstrip().startswith(("!", "%"))]
    return "\n".join(lines)


def _project_sources() -> dict[str, str]:
    files = sorted((ROOT / "fmjax").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py"))
    sources = {str(f.relative_to(ROOT)): f.read_text() for f in files}
    for notebook in sorted((ROOT / "experiments").glob("*.ipynb")):
        sources[str(notebook.relative_to(ROOT))] = _notebook_source(notebook)
    return sources


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(f)",
        "from pickle import loads",
        "import cloudpickle",
        "import joblib",
        "eval(config_string)",
        "exec(code)",
        "yaml.load(f)",
        "np.load(path)",
        "np.load(path, allow_pickle=True)",
        "numpy.load(path, allow_pickle=flag)",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
    ],
)
def test_the_scan_catches_unsafe_deserialisation(snippet):
    assert unsafe_deserialisation(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "np.load(path, allow_pickle=False)",
        "torch.load(path, map_location='cpu', weights_only=True)",
        "yaml.safe_load(f)",
        "json.loads(text)",
        "model.eval()",  # a method called eval is not the builtin
    ],
)
def test_the_scan_allows_safe_loading(snippet):
    assert not unsafe_deserialisation(snippet)


def test_no_code_executing_deserialisation_in_the_project():
    sources = _project_sources()
    assert "fmjax/metrics/inception.py" in sources and "experiments/colab.ipynb" in sources
    found = [v for name, source in sources.items() for v in unsafe_deserialisation(source, name)]
    assert not found, "\n".join(found)


def test_torch_load_appears_only_in_the_restricted_weight_converters():
    calls = [
        (name, node.lineno)
        for name, source in _project_sources().items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
    ]
    # weights_only: above
    assert sorted(name for name, _ in calls) == [
        "fmjax/metrics/inception.py",
        "fmjax/models/param_files.py",
    ]


def test_orbax_checkpoint_reading_never_unpickles():
    import orbax.checkpoint

    package = pathlib.Path(orbax.checkpoint.__file__).parent
    files = [f for f in package.rglob("*.py") if not f.name.endswith("_test.py")]
    found = []
    for f in files:
        source = f.read_text()
        if "pickle" in source or "eval(" in source or "exec(" in source:
            found += unsafe_deserialisation(source, str(f.relative_to(package)))
    assert len(files) > 50 and not found, found


def test_weights_and_statistics_with_pickled_objects_are_refused(tmp_path):
    # An object array is stored as a pickle inside the .npz; loading it would run its code.
    pickled = np.array([{"a": 1}, None], dtype=object)
    np.savez(tmp_path / "weights.npz", **{"params/Conv2d_1a_3x3/conv/kernel": pickled})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        inception.load_variables(tmp_path / "weights.npz")
    np.savez(tmp_path / "stats.npz", mu=pickled, sigma=np.eye(2))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        fid.load_statistics(tmp_path / "stats.npz")


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["tfds:../../x", "tfds:/etc/passwd", "tfds:cifar10/../../tmp", "tfds:cifar10/..", "tfds:a/b/c"],
)
def test_a_dataset_name_cannot_be_a_path(name):
    config = configs.base_config().data
    config.name = name
    with pytest.raises(ValueError, match=r"tfds dataset name .* is not valid; .*never a path"):
        data.build_source(config, seed=0)


def test_dataset_names_that_are_not_paths_pass_the_check():
    for name in ("cifar10", "imagenette/160px", "mnist:3.*.*", "huggingface:mnist"):
        data._check_tfds_name(name)


def test_a_run_writes_only_inside_its_workdir(tmp_path, monkeypatch):
    # Everything a run could write to by default is moved under tmp_path: the working
    # directory, the home directory (caches), the temporary directory.
    for name in ("cwd", "home", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    # An MLP: the file layout of a run, not the network, is under test. No sample grid:
    # compiling the sampler would triple the test's time, and grids are named
    # samples/step_<int>.png inside the workdir, from no config string.
    config = tiny_config(num_steps=2, batch_size=8, checkpoint_every=2)
    hook = train.EvalHook(every=2, fn=lambda step, state: {"score": -step}, keep_best="score")
    source = data.ArraySource(np.zeros((16, 4, 4, 1), np.float32))
    workdir = tmp_path / "run"
    train.train_and_evaluate(
        ml_collections.ConfigDict(config),
        workdir,
        model=TinyVelocity(),
        source=source,
        hooks=[hook],
    )
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    outside = sorted(str(p) for p in written if p.parts[0] != "run")
    assert not outside, outside
    inside = {p.parts[1] for p in written}
    assert {
        "config.json",
        "metrics.jsonl",
        "checkpoints",
        "checkpoints_best",
        "best.json",
    } <= inside
    assert os.listdir(tmp_path / "cwd") == [] and os.listdir(tmp_path / "home") == []
