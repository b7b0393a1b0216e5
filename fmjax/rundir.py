"""The run directory: what a training run keeps in its ``workdir`` and how it is read back.

``lock`` (the lease of the one run that may write there, :class:`WorkdirLease`),
``config.json`` (the run's config, written whole or not at all), ``metrics.jsonl`` and
TensorBoard events (:class:`MetricWriter`), Orbax checkpoints under ``checkpoints/`` and the
best-scoring state under ``checkpoints_best/`` with ``best.json`` (:class:`BestCheckpoint`),
and :func:`load_run`, which reads a finished or running run back for sampling.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from tensorboardX import SummaryWriter

from fmjax import checkpoint
from fmjax.checkpoint import free_space
from fmjax.configs import RESUMABLE_KEYS, base_config, build_model, resume_differences
from fmjax.step import TrainState, abstract_state

__all__ = [
    "LOCK_FILE",
    "BestCheckpoint",
    "MetricWriter",
    "RunArtifacts",
    "WorkdirBusyError",
    "WorkdirLease",
    "check_resumable",
    "load_config",
    "load_run",
    "prepare_workdir",
    "write_config",
]

log = logging.getLogger(__name__)


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
    """The config a run saved as ``workdir/config.json``.

    A key that the run's config lacks (a run saved before the key existed, e.g. ``objective``
    or ``path.bridge_noise``) reads as :func:`fmjax.configs.base_config`'s default, at the top
    level and in its sections except ``model`` (whose fields are the model's own), so the code
    that reads a run never needs a fallback of its own.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: {workdir} is not an fmjax run directory.")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable run config (JSON): {error}.") from None
    for key, value in json.loads(base_config().to_json()).items():
        if key != "model" and isinstance(value, dict) and isinstance(saved.get(key), dict):
            for inner_key, inner_value in value.items():
                saved[key].setdefault(inner_key, inner_value)
        else:
            saved.setdefault(key, value)
    return ml_collections.ConfigDict(saved)


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Writes ``workdir/config.json`` whole or not at all (through a temporary file): a
    half-written one would block every resume. An unchanged file is not rewritten (a resume
    on a full disk then fails at its first checkpoint, with the free space named, not here).

    Raises:
        OSError: naming the file and the free space; the previous ``config.json`` is intact
            and no temporary file is left.

    Example:
        >>> import pathlib, tempfile
        >>> from fmjax.configs import base_config
        >>> from fmjax.rundir import load_config, write_config
        >>> workdir = pathlib.Path(tempfile.mkdtemp())
        >>> write_config(workdir, base_config())
        >>> load_config(workdir).train.batch_size
        128
    """
    text = config.to_json(indent=2)
    path = workdir / "config.json"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text() == text:
            return
    tmp = workdir / "config.json.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(
            error.errno,
            f"Could not write {path} ({error.strerror}; {free_space(workdir)} free on its disk); "
            "the previous config.json, if any, is intact.",
        ) from error


def check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume ``workdir`` with ``config`` when they define different runs, or when
    nothing says what made its checkpoints (checkpoints without ``config.json``).

    The whole config is compared with the saved one (:func:`fmjax.configs.resume_differences`);
    only the keys of :data:`fmjax.configs.RESUMABLE_KEYS` may differ. The ``ValueError`` lists
    each other differing key with its saved and new value, on one line. Nothing is written.

    Example:
        >>> import pathlib, tempfile
        >>> from fmjax.configs import base_config
        >>> from fmjax.rundir import check_resumable, write_config
        >>> workdir = pathlib.Path(tempfile.mkdtemp())
        >>> write_config(workdir, base_config())
        >>> config = base_config()
        >>> config.train.num_steps = 5000  # may change on resume
        >>> check_resumable(workdir, config)
        >>> config.path.prediction = "epsilon"
        >>> check_resumable(workdir, config)
        Traceback (most recent call last):
        ...
        ValueError: ... holds a run with a different config (path.prediction: saved 'velocity', now 'epsilon'); ...
    """
    if not (workdir / "config.json").exists():
        if any((workdir / "checkpoints").glob("[0-9]*")):
            raise ValueError(
                f"{workdir} holds checkpoints but no config.json, so nothing tells whether they "
                "match this config; put the run's config.json back or use a new --workdir."
            )
        return
    differences = resume_differences(load_config(workdir), config)
    if differences:
        details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())
        raise ValueError(
            f"{workdir} holds a run with a different config ({details}); only "
            f"{', '.join(RESUMABLE_KEYS)} may change on resume. Resume it with its own config "
            f"({workdir / 'config.json'}), use a new --workdir, or start a new run from its "
            "parameters (train_and_evaluate(..., init_from=...), --init_from)."
        )


LOCK_FILE = "lock"
"""The lease's file in the run directory (:class:`WorkdirLease`)."""


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lease; the message names its host, pid and start."""


def _describe(record: dict) -> str:
    return (
        f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started "
        f"{record.get('started', '?')}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLease:
    """The exclusive right of one run to write into a run directory.

    Taken before anything is written, held until the run ends: a second run into the same
    directory (a double launch, a job retried while the first still runs) is refused at once
    with :class:`WorkdirBusyError` naming the holder, and never waits. ``workdir/lock`` records
    the holder's host, pid, start and last renewal (JSON).

    The lock is the kernel's (``flock`` on ``workdir/lock``, network file systems included), so
    it goes away with its process, ``kill -9`` too: the next run takes it and logs that it
    recovered it. On a file system without locks, the record decides: a holder is gone when its
    pid is dead on this host, or, on another host, when it has not renewed the lease for
    ``stale_after`` seconds (the loop renews it at each log step, at most every
    ``renew_every`` seconds).

    One lease per run: in a multi-process run, process 0 takes it
    (:func:`fmjax.train.train_and_evaluate` makes the others agree before anyone writes).

    Example:
        >>> import tempfile
        >>> from fmjax.rundir import WorkdirBusyError, WorkdirLease
        >>> workdir = tempfile.mkdtemp()
        >>> with WorkdirLease(workdir):
        ...     try:
        ...         WorkdirLease(workdir).acquire()
        ...     except WorkdirBusyError as error:
        ...         print("refused")
        refused
    """

    def __init__(
        self, workdir: str | os.PathLike, *, stale_after: float = 600.0, renew_every: float = 30.0
    ):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.stale_after, self.renew_every = stale_after, renew_every
        self._fd: int | None = None
        self._record: dict = {}
        self._renewed = 0.0
        self._kernel_lock = False

    def __enter__(self) -> "WorkdirLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self, fd: int) -> dict:
        try:
            record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _holder_alive(self, record: dict) -> bool:
        if not record or record.get("released"):
            return False
        if record.get("host") == socket.gethostname():
            return record.get("pid") != os.getpid() and _pid_alive(int(record.get("pid", 0)))
        return time.time() - float(record.get("renewed", 0)) < self.stale_after

    def acquire(self) -> "WorkdirLease":
        """Takes the lease, or raises :class:`WorkdirBusyError` at once; returns ``self``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._kernel_lock = True
            except BlockingIOError:
                record = self._read(fd)
                for _ in range(20):  # the holder may be writing its record: wait a second at most
                    if record:
                        break
                    time.sleep(0.05)
                    record = self._read(fd)
                raise self._busy(record) from None
            except OSError as error:  # a file system without locks: the record decides
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._kernel_lock = False
            previous = self._read(fd)
            if not self._kernel_lock and self._holder_alive(previous):
                raise self._busy(previous)
            if previous and not previous.get("released"):
                log.warning(
                    "Recovered the lock of %s left by a run that is gone (%s).",
                    self.path.parent,
                    _describe(previous),
                )
            now = time.time()
            self._record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
                "renewed": now,
            }
            self._fd = fd
            self._write()
        except BaseException:
            if self._fd is None:
                os.close(fd)
            raise
        return self

    def _busy(self, record: dict) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.path.parent} is in use by another run ({_describe(record)}); nothing was "
            "written. Wait for it to end or stop it, or use another --workdir."
        )

    def _write(self) -> None:
        data = json.dumps(self._record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        self._renewed = time.monotonic()

    def renew(self) -> None:
        """Records that the holder is alive (at most every ``renew_every`` seconds).

        Raises:
            WorkdirBusyError: on a file system without locks, another run has taken over.
        """
        if self._fd is None or time.monotonic() - self._renewed < self.renew_every:
            return
        if not self._kernel_lock:
            current = self._read(self._fd)
            if current and (current.get("pid"), current.get("host")) != (
                self._record["pid"],
                self._record["host"],
            ):
                raise WorkdirBusyError(
                    f"{self.path.parent} was taken over by another run ({_describe(current)}) "
                    f"after this one stopped renewing its lease for over {self.stale_after:.0f} s."
                )
        self._record["renewed"] = time.time()
        with contextlib.suppress(OSError):  # a full disk: the kernel lock still holds
            self._write()

    def release(self) -> None:
        """Marks the record released and drops the lock (the file stays: removing it would let
        a run that opened it before take a lock nobody else sees)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self._record["released"] = True
            data = json.dumps(self._record).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock


class MetricWriter:
    """``metrics.jsonl`` and TensorBoard events; a no-op on processes other than 0.

    A line is appended with one ``os.write`` and cut off again if that fails (a full disk),
    so the file only ever holds whole lines. A run resumed from step ``start`` first drops
    the lines after ``start`` (logged after its checkpoint by the run that crashed), and its
    TensorBoard writer purges the events after ``start`` (``purge_step``), so both end up
    with the records of an uninterrupted run, without duplicates or gaps. Only the holder of
    the workdir's lease (:class:`WorkdirLease`) creates one.

    Example::

        writer = MetricWriter(workdir, active=True, start=0)
        writer.write(1, {"loss": 0.5})
        writer.close()
    """

    def __init__(self, workdir: pathlib.Path, active: bool, start: int):
        self.active = active
        if active:
            self._path = workdir / "metrics.jsonl"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.ftruncate(self._fd, lines_up_to(self._path, start))
            self._tb = SummaryWriter(
                str(workdir / "tensorboard"), purge_step=start + 1 if start else None
            )

    def _disk_error(self, error: OSError, what: str, path: pathlib.Path) -> OSError:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        return OSError(
            error.errno,
            f"Could not {what} {path} ({error.strerror}); "
            + (f"the disk is full ({free_space(path.parent)} free)." if full else "is it writable?")
            + " The lines before it are intact.",
        )

    def write(self, step: int, values: dict[str, float]) -> None:
        """Appends ``{"step": step, **values}`` to ``metrics.jsonl`` and TensorBoard.

        Raises:
            OSError: the line (or the events) could not be written, naming the file and the
                free space; the lines before it are intact.
        """
        if not (self.active and values):
            return
        line = (json.dumps({"step": step, **values}) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            os.ftruncate(self._fd, size)  # no partial line
            raise self._disk_error(error, f"append step {step} to", self._path) from error
        try:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        except OSError as error:
            raise self._disk_error(
                error,
                f"write the TensorBoard events of step {step} to",
                self._path.parent / "tensorboard",
            ) from error

    def close(self) -> None:
        """Closes the file and the TensorBoard writer."""
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
    """The best-scoring state so far under ``checkpoints_best/``, described by ``best.json``:
    ``step``, ``metric``, ``mode``, ``value``, and the fields of the hook's ``record`` (such as
    ``num_samples``, the samples behind the value)."""

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
        record: Mapping[str, Any] | None = None,
    ) -> bool:
        """Keeps ``state`` if ``value`` of ``metric`` is finite and ``improves(value, best)``;
        ``flush()`` first checks that the state is finite (it raises if not). ``record``: more
        fields for ``best.json``. Whether the state was kept."""
        value = float(value)
        if not (np.isfinite(value) and improves(value, self.value)):
            return False
        flush()  # never keep a non-finite state
        if self._checkpoints is None:
            self._checkpoints = checkpoint.Checkpoints(
                self._workdir, keep=1, subdir="checkpoints_best", clean_up=True
            )
        self._checkpoints.save(step, state)
        self._checkpoints.wait()  # best.json must never name a checkpoint still being written
        self.value = value
        if self._is_main:
            fields = {"step": step, "metric": metric, "mode": mode, "value": value}
            tmp = self._record.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({**fields, **(record or {})}))
            os.replace(tmp, self._record)
        return True

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
