"""The run directory: what a training run keeps in its ``workdir`` and how it is read back.

``config.json`` (the run's config, written whole or not at all), ``metrics.jsonl`` and
TensorBoard events (:class:`MetricWriter`), Orbax checkpoints under ``checkpoints/`` and the
best-scoring state under ``checkpoints_best/`` with ``best.json`` (:class:`BestCheckpoint`),
and :func:`load_run`, which reads a finished or running run back for sampling.
"""

import errno
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from tensorboardX import SummaryWriter

from fmjax import checkpoint
from fmjax.configs import build_model
from fmjax.step import TrainState, abstract_state

__all__ = [
    "BestCheckpoint",
    "MetricWriter",
    "RunArtifacts",
    "check_resumable",
    "load_config",
    "load_run",
    "prepare_workdir",
    "write_config",
]


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates the run directory if needed and checks that it can be read and written.

    Raises ``ValueError`` naming the path and the reason (a regular file in the way, no
    permission, a read-only file system) before anything is compiled, instead of an
    ``OSError`` at the first checkpoint. Writing is probed by creating and removing a file,
    which also catches what permission bits do not show (root ignores them; a read-only mount
    does not).

    Example:
        >>> import tempfile, pathlib
        >>> from fmjax.rundir import prepare_workdir
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> prepare_workdir(root / "run").is_dir()
        True
        >>> (root / "file").write_text("")
        0
        >>> prepare_workdir(root / "file" / "run")
        Traceback (most recent call last):
        ...
        ValueError: workdir '.../file/run' cannot be created: .../file is not a directory.
    """
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"workdir {str(path)!r} is not valid: it exists and is not a directory; expected a "
            "directory (or a path where one can be created)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise ValueError(
            f"workdir {str(path)!r} cannot be created: {blocker} is not a directory."
        ) from None
    except OSError as error:
        raise ValueError(f"workdir {str(path)!r} cannot be created: {error.strerror}.") from None
    try:
        os.listdir(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(
            f"workdir {str(path)!r} is not readable and writable ({error.strerror}); expected a "
            "directory this process can read and write."
        ) from None
    return path


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved as ``workdir/config.json``."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: {workdir} is not an fmjax run directory.")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable run config (JSON): {error}.") from None


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Writes ``workdir/config.json`` whole or not at all (through a temporary file): a
    half-written one would block every resume."""
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json(indent=2))
    os.replace(tmp, workdir / "config.json")


def check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume ``workdir`` with ``config`` when its checkpoints were made by another
    model or for other images (a ``ValueError`` naming each differing key), or when nothing
    says what made them (checkpoints without ``config.json``)."""
    if not (workdir / "config.json").exists():
        if any((workdir / "checkpoints").glob("[0-9]*")):
            raise ValueError(
                f"{workdir} holds checkpoints but no config.json, so nothing tells whether they "
                "match this config; put the run's config.json back or use a new --workdir."
            )
        return
    saved = load_config(workdir).to_dict()
    current = json.loads(config.to_json())
    for section in ("model", "data"):
        keys = ("image_shape",) if section == "data" else tuple(current["model"])
        diff = {
            k: (saved.get(section, {}).get(k), current[section].get(k))
            for k in keys
            if saved.get(section, {}).get(k) != current[section].get(k)
        }
        if diff:
            details = ", ".join(
                f"{section}.{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()
            )
            raise ValueError(
                f"{workdir} holds a run with a different {section} config ({details}); "
                "resume it with the same config or use a new --workdir."
            )


class MetricWriter:
    """``metrics.jsonl`` and TensorBoard events; a no-op on processes other than 0.

    A line is appended with one ``os.write`` and cut off again if that fails (a full disk),
    so the file only ever holds whole lines. A run resumed from step ``start`` first drops
    the lines after ``start`` (logged after its checkpoint by the run that crashed), so the
    file ends up with the lines of an uninterrupted run, without duplicates or gaps.
    """

    def __init__(self, workdir: pathlib.Path, active: bool, start: int):
        self.active = active
        if active:
            self._path = workdir / "metrics.jsonl"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.ftruncate(self._fd, lines_up_to(self._path, start))
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not (self.active and values):
            return
        line = (json.dumps({"step": step, **values}) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            os.ftruncate(self._fd, size)  # no partial line
            raise OSError(
                error.errno,
                f"Could not append step {step} to {self._path} ({error.strerror}); is the "
                "disk full? The lines before it are intact.",
            ) from error
        try:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        except OSError as error:
            raise OSError(
                error.errno,
                f"Could not write the TensorBoard events of step {step} to "
                f"{self._path.parent / 'tensorboard'} ({error.strerror}); is the disk full?",
            ) from error

    def close(self) -> None:
        if self.active:
            os.close(self._fd)
            self._tb.close()


def lines_up_to(path: pathlib.Path, step: int) -> int:
    """The length in bytes of the whole lines of ``path`` for steps up to ``step`` (lines are
    in step order; a torn or unreadable line ends them)."""
    end = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                complete = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                complete = False
            if not complete:
                break
            end += len(line)
    return end


class BestCheckpoint:
    """The best-scoring state so far under ``checkpoints_best/``, described by ``best.json``."""

    def __init__(self, workdir: pathlib.Path, is_main: bool):
        self._workdir, self._is_main = workdir, is_main
        self._record = workdir / "best.json"
        self.value = (
            json.loads(self._record.read_text())["value"] if self._record.exists() else None
        )
        self._checkpoints: checkpoint.Checkpoints | None = None

    def offer(
        self,
        step: int,
        state: TrainState,
        metric: str,
        value: float,
        improves: Callable[[float, float | None], bool],
        mode: str,
        flush: Callable[[], object],
    ) -> None:
        """Keeps ``state`` if ``value`` of ``metric`` is finite and ``improves(value, best)``;
        ``flush()`` first checks that the state is finite (it raises if not)."""
        value = float(value)
        if not (np.isfinite(value) and improves(value, self.value)):
            return
        flush()  # never keep a non-finite state
        if self._checkpoints is None:
            self._checkpoints = checkpoint.Checkpoints(
                self._workdir, keep=1, subdir="checkpoints_best", clean_up=True
            )
        self._checkpoints.save(step, state)
        self._checkpoints.wait()  # best.json must never name a checkpoint still being written
        self.value = value
        if self._is_main:
            record = {"step": step, "metric": metric, "mode": mode, "value": value}
            tmp = self._record.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._record)

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()


class RunArtifacts(NamedTuple):
    """What :func:`load_run` returns.

    Attributes:
        config: the run's saved config (``config.json``).
        model: the Flax module it names.
        ema_params: the EMA parameters of the restored checkpoint.
        step: that checkpoint's step.
    """

    config: ml_collections.ConfigDict
    model: Any
    ema_params: Any
    step: int


def load_run(
    workdir: str | os.PathLike, *, best: bool = False, model: nn.Module | None = None
) -> RunArtifacts:
    """The config, the model and the EMA parameters of a run's newest checkpoint (or, with
    ``best=True``, of its best-scoring one: see :class:`fmjax.train.EvalHook`).

    The optimizer state is not kept. Parameters land on the default device, whatever mesh
    saved them, ready for :func:`fmjax.sampling.sample` from Python.

    A run of a model that no preset names is read with that model passed as ``model``.

    Example::

        run = load_run("runs/digits")
        f = fmjax.generate.make_velocity(run.model, run.config)
        velocity = jax.tree_util.Partial(f, run.ema_params, None)  # None: no class labels
        x1 = fmjax.sampling.sample(velocity, x0, solver="heun", steps=25).x
    """
    config = load_config(workdir)
    model = build_model(config.model) if model is None else model
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_state(config, model, sharding=device)
    subdir = "checkpoints_best" if best else "checkpoints"
    checkpoints = checkpoint.Checkpoints(workdir, async_save=False, subdir=subdir)
    restored = checkpoints.restore_latest(abstract)
    if restored is None:
        raise ValueError(f"{workdir} has no readable checkpoint under {workdir}/{subdir}.")
    state, step = restored
    return RunArtifacts(config=config, model=model, ema_params=state.ema_params, step=step)
