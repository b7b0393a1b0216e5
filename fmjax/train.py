r"""The training loop: ``train_and_evaluate`` trains or resumes a run in its directory.

It validates the config before anything is compiled, restores the newest checkpoint, runs the
data-parallel step of :mod:`fmjax.step` over the batches of :mod:`fmjax.data`, and writes
metrics, sample grids, evaluations and checkpoints to the run directory (:mod:`fmjax.rundir`).
SIGTERM saves a checkpoint and returns; a resumed run ends with the parameters and the metric
lines of an uninterrupted one.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import platform
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmjax import checkpoint, configs, data
from fmjax.generate import make_velocity, write_grid
from fmjax.mesh import make_mesh
from fmjax.rundir import (
    BestCheckpoint,
    MetricWriter,
    WorkdirBusyError,
    WorkdirLease,
    check_resumable,
    load_config,
    prepare_workdir,
    write_config,
)
from fmjax.step import (
    CPU_OPTIONS_MAX_PIXELS,
    TrainState,
    abstract_state,
    init_state,
    make_train_step,
)

__all__ = ["EvalHook", "HookFactory", "train_and_evaluate"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalHook:
    """A callable run every ``every`` steps (and at the end) as ``fn(step, state) -> metrics``.

    It runs on every process (it may use collectives); the returned ``{name: float}`` is
    written to ``metrics.jsonl`` and TensorBoard by process 0. With ``keep_best`` naming one
    of those metrics, the state with its best value so far (the lowest, or the highest with
    ``mode="max"``) is kept in ``workdir/checkpoints_best`` and described in
    ``workdir/best.json``, beside the latest checkpoints.

    ``details`` says what the metrics are measured on, e.g. ``{"num_samples": 500}`` (a score
    of a few samples differs from one of many): it is shown on the evaluation's log line and
    recorded in ``best.json``. Each evaluation logs one line with its metrics, the details
    and the seconds it took; the training rate and the ETA of the progress lines leave that
    time out.
    """

    every: int
    fn: Callable[[int, TrainState], dict[str, float]]
    keep_best: str | None = None
    mode: str = "min"
    details: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not (isinstance(self.every, int) and self.every > 0):
            raise ValueError(f"EvalHook every={self.every!r} must be a positive int.")
        if self.mode not in ("min", "max"):
            raise ValueError(f"EvalHook mode={self.mode!r} must be 'min' or 'max'.")

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` (None: nothing yet) in this hook's direction."""
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best


HookFactory = Callable[[ml_collections.ConfigDict, nn.Module, Mesh], EvalHook]
"""A function ``(config, model, mesh) -> EvalHook`` that :func:`train_and_evaluate` calls once
the config is complete (``config.data.image_shape`` filled in from the source), before
anything is compiled; e.g. :func:`fmjax.evaluate.fid_hook`."""


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (a collective when multi-process)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else _format_duration(seconds)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    source: data.Source | None = None,
    hooks: Sequence[EvalHook | HookFactory] = (),
    mesh: Mesh | None = None,
    init_from: str | os.PathLike | None = None,
) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state.

    Writes ``config.json``, ``metrics.jsonl`` (one object per logged step: ``step``,
    ``loss`` and ``grad_norm`` averaged since the previous log line, ``lr``,
    ``steps_per_sec``, ``images_per_sec``, plus hook metrics; a line every ``log_every``
    steps and at every checkpoint), TensorBoard events under ``tensorboard/``, sample grids
    under ``samples/`` and Orbax checkpoints under ``checkpoints/``. Resumes from the newest
    readable checkpoint, dropping the ``metrics.jsonl`` lines and TensorBoard events logged
    after it, so that a run killed and resumed any number of times ends with the parameters and
    the records of an uninterrupted one. SIGTERM saves a checkpoint and returns.

    One run per workdir: the run takes the workdir's lease (:class:`fmjax.rundir.WorkdirLease`,
    process 0 for all processes) before it writes anything, and a second run into the same
    workdir is refused at once. A resume must be the same run: the whole config is compared
    with the saved ``config.json`` and only :data:`fmjax.configs.RESUMABLE_KEYS` may differ
    (:func:`fmjax.rundir.check_resumable`); ``config.json`` is rewritten only after that check.

    Args:
        config: see :func:`fmjax.configs.base_config`. Not modified: the run uses a copy
            with ``data.image_shape`` filled in from the source.
        workdir: the run directory (created if missing).
        model: the Flax module to train, any module called as ``model(x_t, t, y=None, *,
            train=False)`` (``y`` only for class-conditional configs); default
            :func:`fmjax.configs.build_model` of ``config.model``. Pass the same module to
            :func:`fmjax.rundir.load_run` to read the run back.
        source: the training data; default ``fmjax.data.build_source(config.data)``.
        hooks: evaluations run every ``hook.every`` steps and at the end: each an
            :class:`EvalHook`, or a :data:`HookFactory` called with the completed config.
        mesh: default: :func:`fmjax.mesh.make_mesh` over every device.
        init_from: another run's directory: a fresh run starts from the parameters and EMA
            parameters of its newest checkpoint (fine-tuning; the optimizer state and the step
            start anew, and ``workdir/init_from.json`` records where they came from). The
            model must have the same parameter shapes. Ignored when ``workdir`` already has a
            checkpoint (the run resumes from it).

    Example::

        class Velocity(nn.Module):  # no registry needs to know it
            @nn.compact
            def __call__(self, x, t, *, train=False):
                ...

        state = train_and_evaluate(config, "runs/mine", model=Velocity())
        # A longer run from its parameters, with another learning rate, in a new directory:
        config.optim.learning_rate = 1e-5
        train_and_evaluate(config, "runs/mine-ft", model=Velocity(), init_from="runs/mine")

    Raises:
        ValueError: for an invalid config (before any compilation), a workdir holding another
            run (each differing key named, saved and new value), or a bad ``init_from``.
        fmjax.rundir.WorkdirBusyError: another run holds the workdir; nothing was written.
        FloatingPointError: when the loss or the parameters become non-finite, naming the
            step; the checkpoints written before it are untouched.
        fmjax.checkpoint.CheckpointWriteError: a checkpoint could not be written (e.g. a
            full disk), naming the step and the directory; the earlier ones are intact.
        OSError: a line could not be appended to ``metrics.jsonl``; the earlier lines are
            intact.
    """
    config = ml_collections.ConfigDict(config.to_dict())  # our own copy: image_shape is filled in
    mesh = mesh or make_mesh()
    configs.validate(config, num_devices=mesh.size)
    source = source or data.build_source(config.data, seed=config.seed)
    config.data.image_shape = tuple(source.image_shape)
    model = configs.build_model(config.model) if model is None else model
    configs.validate_image_shape(model, config.data.image_shape)
    hooks = [h if isinstance(h, EvalHook) else h(config, model, mesh) for h in hooks]
    workdir = prepare_workdir(workdir)
    init_from = _check_init_from(init_from, workdir)
    with contextlib.ExitStack() as stack:
        lease = _take_lease(workdir)
        if lease is not None:
            stack.callback(lease.release)
        check_resumable(workdir, config)
        if jax.process_index() == 0:
            write_config(workdir, config)
        # SIGTERM from here on checkpoints and returns (during restore and compilation too).
        with _Preemption() as preemption:
            return _train(config, model, workdir, source, hooks, mesh, preemption, lease, init_from)


def _take_lease(workdir) -> WorkdirLease | None:
    """Process 0 takes the workdir's lease; every process learns whether it did (a collective)
    before anything is written, and all refuse together if not. The lease, on process 0."""
    lease, error = None, None
    if jax.process_index() == 0:
        try:
            lease = WorkdirLease(workdir).acquire()
        except (WorkdirBusyError, OSError) as e:
            error = e
    if jax.process_count() > 1:
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(taken) and error is None:
            error = WorkdirBusyError(
                f"{workdir}: process 0 could not take the workdir's lease (see its error); "
                "nothing was written."
            )
    if error is not None:
        raise error
    return lease


def _check_init_from(init_from, workdir) -> pathlib.Path | None:
    """``init_from`` as a path, checked: another run's directory with a config and a
    checkpoint."""
    if init_from is None:
        return None
    source = pathlib.Path(init_from)
    if source.resolve() == pathlib.Path(workdir).resolve():
        raise ValueError(
            f"init_from={str(init_from)!r} is the workdir itself; to continue a run, resume it "
            "(run again without init_from), or pass another run's directory."
        )
    load_config(source)  # raises naming the path if it holds no run
    if not checkpoint.complete_steps(source / "checkpoints"):
        raise ValueError(
            f"init_from={str(init_from)!r} has no checkpoint under {source / 'checkpoints'}."
        )
    return source


def _initial_state(config, model, tx, replicated, init_from, workdir) -> TrainState:
    """A fresh state; with ``init_from``, its parameters and EMA parameters from that run's
    newest checkpoint."""
    state = jax.jit(lambda: init_state(config, model, tx), out_shardings=replicated)()
    if init_from is None:
        return state
    source_config = load_config(init_from)
    source = checkpoint.Checkpoints(init_from, async_save=False)
    try:
        restored = source.restore_latest(abstract_state(source_config, model, replicated))
    except Exception as error:  # another model: Orbax names the mismatched shapes
        raise ValueError(
            f"init_from={str(init_from)!r}: its checkpoint does not fit this model ({error})."
        ) from error
    finally:
        source.close()
    if restored is None:
        raise ValueError(f"init_from={str(init_from)!r} has no readable checkpoint.")
    other, step = restored
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state.params)
    if jax.tree.map(lambda a: (a.shape, a.dtype), other.params) != shapes:
        raise ValueError(
            f"init_from={str(init_from)!r} holds parameters of another model (model "
            f"{source_config.model.to_dict()}); expected the shapes of this one."
        )
    log.info("Starting from the parameters of %s at step %d.", init_from, step)
    if jax.process_index() == 0:
        record = {"workdir": str(pathlib.Path(init_from).absolute()), "step": step}
        (workdir / "init_from.json").write_text(json.dumps(record))
    return state._replace(params=other.params, ema_params=other.ema_params)


def _huge_pages_hint(
    image_shape: Sequence[int], backend: str, tunables: str | None, libc: tuple[str, str]
) -> str | None:
    """A log line that suggests ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, or None.

    XLA:CPU allocates a step's temporaries as one block, which glibc maps and unmaps on every
    step, so each step page-faults it in again; with the tunable (glibc >= 2.35) glibc maps it
    with transparent huge pages. That helps large images' steps on some CPUs and slows small
    images' ones (figures: docs/benchmarks.md), hence the same pixel threshold as the CPU
    options of :func:`fmjax.step.make_train_step`. glibc reads the tunable when the process
    starts, so only the user can set it.
    """
    name, version = libc
    if backend != "cpu" or math.prod(image_shape[:2]) < CPU_OPTIONS_MAX_PIXELS:
        return None
    if name != "glibc" or tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < (2, 35):
        return None
    if tunables and "glibc.malloc.hugetlb" in tunables:
        return None
    return (
        "CPU training of images of 32x32 pixels or more can be faster with glibc's allocator "
        "on transparent huge pages (on some CPUs): try starting Python with "
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see docs/benchmarks.md)."
    )


def _train(config, model, workdir, source, hooks, mesh, preemption, lease, init_from) -> TrainState:
    """The loop of :func:`train_and_evaluate`, after validation."""
    is_main = jax.process_index() == 0
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    ckpt = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints, clean_up=True)
    restored = ckpt.restore_latest(abstract_state(config, model, replicated))
    if restored is None:
        state = _initial_state(config, model, tx, replicated, init_from, workdir)
        start = 0
    else:
        state, start = restored
        log.info("Resuming %s from step %d.", workdir, start)
    train_step = make_train_step(config, model, tx, schedule, mesh)
    hint = _huge_pages_hint(
        config.data.image_shape,
        mesh.devices.flat[0].platform,
        os.environ.get("GLIBC_TUNABLES"),
        platform.libc_ver(),
    )
    if hint and is_main:
        log.info(hint)
    writer = MetricWriter(workdir, is_main, start)
    best = BestCheckpoint(workdir, is_main)
    t = config.train

    def place(batch):
        return {
            k: jax.make_array_from_process_local_data(
                batch_sharding, v, (t.batch_size, *v.shape[1:])
            )
            for k, v in batch.items()
        }

    batches = data.prefetch_batches(
        source, start, t.num_steps, t.batch_size, jax.process_index(), jax.process_count()
    )
    velocity = make_velocity(model, config)
    pending: list[tuple[int, dict]] = []  # per-step metrics not yet fetched from the device
    last_log_time, last_log_step = time.perf_counter(), start
    # Seconds since the last log line spent compiling, evaluating and drawing grids: the rate
    # (and so the ETA) counts training steps only.
    paused = 0.0

    def flush_metrics() -> list[tuple[int, dict]]:
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            if not (np.isfinite(m["loss"]) and m["finite"]):
                raise FloatingPointError(
                    f"Non-finite {'loss' if not np.isfinite(m['loss']) else 'parameters'} at step "
                    f"{s} (loss={m['loss']}); stopping. Checkpoints before it are untouched."
                )
        return fetched

    def log_line(step: int) -> None:
        nonlocal last_log_time, last_log_step, paused
        fetched = flush_metrics()
        now = time.perf_counter()
        rate = (step - last_log_step) / max(now - last_log_time - paused, 1e-9)
        values = {
            "loss": float(np.mean([m["loss"] for _, m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
            "lr": float(fetched[-1][1]["lr"]),
            "steps_per_sec": rate,
            "images_per_sec": rate * t.batch_size,
        }
        writer.write(step, values)
        if lease is not None:
            lease.renew()
        log.info(
            "step %d/%d | loss %.4f | %.2f steps/s | %.0f img/s | ETA %s",
            step, t.num_steps, values["loss"], rate, values["images_per_sec"],
            _format_duration((t.num_steps - step) / max(rate, 1e-9)),
        )  # fmt: skip
        last_log_time, last_log_step, paused = now, step, 0.0

    def evaluate(hook: EvalHook, step: int, state: TrainState) -> float:
        """Runs ``hook`` at ``step``, records its metrics (and the best state) and logs a line;
        the seconds it took."""
        flush_metrics()  # a hook never sees a non-finite state; the steps so far are done
        began = time.perf_counter()
        scores = hook.fn(step, state)
        writer.write(step, scores)
        kept = False
        if hook.keep_best is not None:
            if hook.keep_best not in scores:
                raise ValueError(
                    f"EvalHook keep_best={hook.keep_best!r} is not among the metrics "
                    f"its fn returned: {sorted(scores)}."
                )
            kept = best.offer(
                step,
                state,
                hook.keep_best,
                scores[hook.keep_best],
                hook.improves,
                hook.mode,
                flush_metrics,
                record=hook.details,
            )
        seconds = time.perf_counter() - began
        notes = [f"{k}={v}" for k, v in (hook.details or {}).items()]
        notes += ["best so far"] if kept else []
        log.info(
            "step %d/%d | %s%s | evaluated in %s",
            step,
            t.num_steps,
            ", ".join(f"{name} {float(value):.4g}" for name, value in scores.items()),
            f" ({'; '.join(notes)})" if notes else "",
            _format_seconds(seconds),
        )
        return seconds

    try:
        for step in range(start + 1, t.num_steps + 1):
            if step == start + 1:
                log.info("Compiling the train step (or loading it from the compilation cache).")
            began = time.perf_counter()
            state, metrics = train_step(state, place(next(batches)))
            if step == start + 1:  # the call compiles (or loads from the cache), then dispatches
                paused += time.perf_counter() - began
                log.info("Compiled the train step in %s.", _format_seconds(paused))
            pending.append((step, metrics))
            last = step == t.num_steps
            # A line at every checkpoint too: a run resumed from one then logs exactly the
            # lines (the same averaging windows) an uninterrupted run does.
            logged = step % t.log_every == 0 or step % t.checkpoint_every == 0 or last
            if logged:
                log_line(step)
            for hook in hooks:
                if step % hook.every == 0 or last:
                    paused += evaluate(hook, step, state)
            if t.sample_every and (step % t.sample_every == 0 or last) and is_main:
                began = time.perf_counter()
                write_grid(config, velocity, state, workdir / "samples" / f"step_{step:08d}.png")
                paused += time.perf_counter() - began
            # Multi-process, asking is a collective: only on log steps.
            stop = (
                preemption.agreed()
                if (jax.process_count() == 1 or step % t.log_every == 0)
                else False
            )
            if stop and not logged:
                log_line(step)  # the checkpoint below gets its line
            if step % t.checkpoint_every == 0 or last or stop:
                ckpt.save(step, state)  # finite: flushed by log_line
            if stop:
                log.warning("Stopped at step %d on request; resume by running again.", step)
                break
    except BaseException:
        _close_all((ckpt.close, best.close, writer.close), raise_first=False)
        raise
    _close_all((ckpt.close, best.close, writer.close), raise_first=True)
    return state


def _close_all(closers: Sequence[Callable[[], None]], raise_first: bool) -> None:
    """Calls every closer; raises the first error if ``raise_first``, else logs them (an
    error already on its way out is the one to report)."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as error:
            if raise_first and first is None:
                first = error
            else:
                log.exception("While closing the run:")
    if first is not None:
        raise first
