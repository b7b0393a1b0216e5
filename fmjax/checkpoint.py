"""Orbax checkpoints of a training run: async, atomic, keep the last K, restore on any mesh.

A checkpoint holds the whole :class:`fmjax.step.TrainState` (step, params, EMA params,
optimizer state). Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoints usable (the run's writer removes
such leftovers when it starts); on restore, a newest checkpoint that cannot be read is skipped
with a warning naming its step, and replaced when the resumed run saves that step again. A save
that fails (a full disk, a lost mount) raises :class:`CheckpointWriteError` naming the step and
the directory. The data order is stateless, so the step is all a resumed run needs besides the
state.
"""

import contextlib
import logging
import os
import pathlib
import shutil
from typing import Any

import orbax.checkpoint as ocp

__all__ = ["CheckpointWriteError", "Checkpoints", "complete_steps", "free_space"]

log = logging.getLogger(__name__)


def free_space(path: str | os.PathLike) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing parent),
    for a message: e.g. ``"0 B"``, ``"12.5 MB"``; ``"unknown"`` if it cannot be read.

    Example:
        >>> from fmjax.checkpoint import free_space
        >>> free_space("/").split()[-1] in ("B", "kB", "MB", "GB", "TB")
        True
    """
    path = pathlib.Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if free < 1000:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    return f"{free:.1f} TB"


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (e.g. ``workdir/checkpoints``),
    read from the folder names without opening them: Orbax renames a save's temporary folder
    to its step only once it is complete.

    Example:
        >>> import tempfile, pathlib
        >>> from fmjax.checkpoint import complete_steps
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("10", "20", "30.orbax-checkpoint-tmp"):
        ...     (root / name).mkdir()
        >>> complete_steps(root)
        [10, 20]
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount, no permission); the
    message names the step and the directory, and the complete checkpoints before it."""


class Checkpoints:
    """The checkpoints under ``workdir/checkpoints`` (or another ``subdir``).

    Args:
        workdir: the run's directory.
        keep: how many of the newest checkpoints to keep.
        async_save: write in a background thread while training continues.
        subdir: the directory inside ``workdir`` (``checkpoints_best`` for the best state).
        clean_up: remove the temporary directories of saves a crash interrupted. Only the
            run's own writer may: another process's save in flight looks the same.

    Example::

        checkpoints = Checkpoints("runs/digits", async_save=False)
        checkpoints.steps()  # e.g. [1000, 2000, 3000]
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        subdir: str = "checkpoints",
        clean_up: bool = False,
    ):
        self.directory = pathlib.Path(workdir).absolute() / subdir
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=clean_up,
            ),
        )
        self._async = async_save
        self._pending: int | None = None  # the step of the save in flight, if any

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts saving ``state`` as step ``step`` (waits for the previous save first).

        A checkpoint already at ``step`` can only be one that a restore skipped as unreadable
        (a resumed run starts after the newest readable one); it is replaced.

        Raises:
            CheckpointWriteError: this save, or the previous one, could not be written.
        """
        self.wait()
        if step in self._manager.all_steps():
            log.warning("Replacing the unreadable checkpoint at step %d.", step)
            self._manager.delete(step)
        self._pending = step
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as error:  # whatever the storage layer raises, say what was lost
            self._pending = None
            raise self._write_error(step, error) from error
        if not self._async:
            self.wait()  # check a synchronous save now

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The checkpoint at ``step``, placed as ``abstract_state`` says (see
        :meth:`restore_latest`); raises if it is missing or unreadable."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """The newest readable checkpoint, placed as ``abstract_state`` says, or None.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (e.g. on a
        mesh of a different size than the one that saved it). Checkpoints that fail to load
        are skipped, newest first, with a warning naming the step.
        """
        for step in reversed(self.steps()):
            try:
                state = self.restore(step, abstract_state)
            except Exception as error:  # any unreadable checkpoint is skipped
                log.warning(
                    "Checkpoint at step %d cannot be restored (%s); trying an older one.",
                    step,
                    error,
                )
                continue
            return state, step
        return None

    def wait(self) -> None:
        """Blocks until the pending save is on disk.

        Raises:
            CheckpointWriteError: it could not be written.
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # the background writer's error, re-raised here
            raise self._write_error(step, error) from error
        if step is not None and step not in self._manager.all_steps():
            raise self._write_error(step, RuntimeError("the save did not complete"))

    def close(self) -> None:
        """Finishes the pending save and releases the manager.

        Raises:
            CheckpointWriteError: the pending save could not be written.
        """
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # the write error is the one to report
                self._manager.close()
            raise
        self._manager.close()

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        cause = f"{type(error).__name__}: {error}"
        full = any(m in cause for m in ("No space left", "ENOSPC", "RESOURCE_EXHAUSTED", "quota"))
        race = not full and any(
            m in cause for m in ("No such file or directory", "NOT_FOUND", "already exists")
        )
        resumable = self.directory.parent / "checkpoints"
        if full:
            why = f"the disk is full ({free_space(self.directory)} free)"
        elif race:
            why = (
                "its files changed under it: another process wrote to the same folder at the "
                "same time (a write race; two runs in one workdir?)"
            )
        else:
            short = cause if len(cause) <= 300 else cause[:300] + " ..."
            why = f"{short}; is it writable?"
        return CheckpointWriteError(
            f"The checkpoint at step {step} could not be written to {self.directory}: {why}. "
            f"The complete checkpoints to resume from are intact: steps "
            f"{complete_steps(resumable)} in {resumable}."
        )
