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
from typing import Any

import orbax.checkpoint as ocp

__all__ = ["CheckpointWriteError", "Checkpoints"]

log = logging.getLogger(__name__)


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
        if len(cause) > 500:  # storage errors can carry whole traces
            cause = cause[:500] + " ..."
        full = "No space left" in cause or "ENOSPC" in cause or "RESOURCE_EXHAUSTED" in cause
        return CheckpointWriteError(
            f"The checkpoint at step {step} could not be written to {self.directory} ({cause}); "
            + ("the disk is full. " if full else "is the disk full or not writable? ")
            + f"The complete checkpoints before it are intact: steps {self.steps()}."
        )
