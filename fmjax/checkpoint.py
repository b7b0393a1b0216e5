"""Orbax checkpoints of a training run: async, atomic, keep the last K, restore on any mesh.

A checkpoint holds the whole :class:`fmjax.train.TrainState` (step, params, EMA params,
optimizer state). Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoints usable; on restore, a newest
checkpoint that cannot be read is skipped with a warning naming its step. The data order is
stateless, so the step is all a resumed run needs besides the state.
"""

import json
import logging
import os
import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

__all__ = ["Checkpoints", "RunArtifacts", "load_config", "load_run"]

log = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoints under ``workdir/checkpoints`` (or another ``subdir``).

    Args:
        workdir: the run's directory.
        keep: how many of the newest checkpoints to keep.
        async_save: write in a background thread while training continues.
        subdir: the directory inside ``workdir`` (``checkpoints_best`` for the best state).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        subdir: str = "checkpoints",
    ):
        self.directory = pathlib.Path(workdir).absolute() / subdir
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts saving ``state`` as step ``step`` (waits for the previous save first)."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """The newest readable checkpoint, placed as ``abstract_state`` says, or None.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (e.g. on a
        mesh of a different size than the one that saved it). Checkpoints that fail to load
        are skipped, newest first, with a warning naming the step.
        """
        for step in reversed(self.steps()):
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
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
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved as ``workdir/config.json``."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: {workdir} is not an fmjax run directory.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


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


def load_run(workdir: str | os.PathLike, *, best: bool = False) -> RunArtifacts:
    """The config, the model and the EMA parameters of a run's newest checkpoint (or, with
    ``best=True``, of its best-scoring one: see :class:`fmjax.train.EvalHook`).

    The optimizer state is not kept. Parameters land on the default device, whatever mesh
    saved them, ready for :func:`fmjax.sampling.sample` from Python.

    Example::

        run = load_run("runs/digits")
        f = fmjax.train.make_velocity(run.model, run.config)
        velocity = jax.tree_util.Partial(f, run.ema_params, None)  # None: no class labels
        x1 = fmjax.sampling.sample(velocity, x0, solver="heun", steps=25).x
    """
    from fmjax import train

    config = load_config(workdir)
    model = train.build_model(config.model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = train.abstract_state(config, model, sharding=device)
    subdir = "checkpoints_best" if best else "checkpoints"
    restored = Checkpoints(workdir, async_save=False, subdir=subdir).restore_latest(abstract)
    if restored is None:
        raise ValueError(f"{workdir} has no readable checkpoint under {workdir}/{subdir}.")
    state, step = restored
    return RunArtifacts(config=config, model=model, ema_params=state.ema_params, step=step)
