r"""The training engine: a data-parallel step over every device of every host, and the loop.

The step ``(state, batch) -> (state, metrics)`` is one ``jax.jit`` over a 1-D ``("data",)``
mesh of all devices; per-device work is mapped with ``jax.shard_map`` (what ``jax.pmap``
compiles to), gradients are averaged with ``lax.pmean`` and the state is donated. The same
code runs on one CPU, simulated CPU devices, a GPU box or a multi-host TPU slice (each host
feeds its slice of the global batch; see :mod:`fmjax.data`).

Randomness: example ``i`` of the global batch at step ``s`` draws its noise, time and label
dropout from ``fold_in(fold_in(fold_in(key(seed), 0), s), i)`` through the per-example keys of
:func:`fmjax.loss.cfm_loss`, so with the independent coupling and no dropout the loss curve
does not depend on the number of devices or hosts (up to float reduction order). Two things
do depend on the split: a minibatch OT coupling pairs within each per-device micro-batch, and
network dropout draws one key per device and micro-batch.
"""

import dataclasses
import errno
import functools
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
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from fmjax import checkpoint, configs, couplings, data, images, models, paths, sampling, timesteps
from fmjax._xla import compiler_options
from fmjax.loss import cfm_loss

# On CPU, train steps on images of fewer pixels than this are compiled with fmjax's CPU
# options (fmjax._xla), larger ones with XLA's defaults: see make_train_step.
_CPU_OPTIONS_MAX_PIXELS = 32 * 32

__all__ = [
    "EvalHook",
    "TrainState",
    "abstract_state",
    "build_model",
    "build_path",
    "ema_decay",
    "ema_update",
    "generate",
    "init_state",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "make_velocity",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)

_NOISE_STREAM, _DROPOUT_STREAM, _GRID_STREAM, _INIT_STREAM = range(4)


class TrainState(NamedTuple):
    """Everything a step updates; a pytree (so it jits, donates and checkpoints as one).

    Attributes:
        step: int32 scalar, the number of optimizer updates done.
        params: the model parameters.
        ema_params: their exponential moving average (what samples and evaluations use).
        opt_state: the Optax state.
    """

    step: Int[Array, ""]
    params: PyTree[Float[Array, "..."]]
    ema_params: PyTree[Float[Array, "..."]]
    opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class EvalHook:
    """A callable run every ``every`` steps (and at the end) as ``fn(step, state) -> metrics``.

    It runs on every process (it may use collectives); the returned ``{name: float}`` is
    written to ``metrics.jsonl`` and TensorBoard by process 0. With ``keep_best`` naming one
    of those metrics, the state with its best value so far (the lowest, or the highest with
    ``mode="max"``) is kept in ``workdir/checkpoints_best`` and described in
    ``workdir/best.json``, beside the latest checkpoints.
    """

    every: int
    fn: Callable[[int, TrainState], dict[str, float]]
    keep_best: str | None = None
    mode: str = "min"

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


# --- building blocks from the config -----------------------------------------------------


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The Flax module named by ``model_config.name`` (see ``fmjax.models.PRESETS``).

    Every other key overrides a field of the preset; ``dtype`` is a name ("bfloat16").
    """
    fields = dict(model_config)
    name = fields.pop("name")
    if name not in models.PRESETS:
        raise ValueError(
            f"config.model.name={name!r} is not a known model; expected one of {sorted(models.PRESETS)}."
        )
    fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
    return models.PRESETS[name](**fields)


def build_path(path_config: ml_collections.ConfigDict):
    """``(path, coupling, time_sampler)`` from the ``config.path`` section."""
    p = path_config
    scheduler = {
        "condot": lambda: paths.CondOT(sigma_min=p.sigma_min),
        "cosine": paths.Cosine,
        "linear_vp": paths.LinearVP,
        "vp": paths.VP,
        "polynomial": lambda: paths.Polynomial(p.polynomial_n),
    }[p.scheduler]()
    coupling = {
        "independent": lambda: couplings.independent,
        "exact_ot": lambda: couplings.exact_ot,
        "sinkhorn_ot": lambda: couplings.sinkhorn_ot(p.sinkhorn_epsilon),
    }[p.coupling]()
    if p.time_sampler == "logit_normal":
        time_sampler = timesteps.logit_normal(p.logit_mean, p.logit_std, t_min=max(p.t_min, 1e-4))
    else:
        time_sampler = functools.partial(timesteps.uniform, t_min=p.t_min)
    return paths.AffinePath(scheduler), coupling, time_sampler


def make_optimizer(
    optim_config: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The Optax optimizer and its learning-rate schedule from ``config.optim``.

    Schedules: ``constant``; ``warmup_constant`` (linear from 0 over ``warmup_steps``, then
    constant); ``warmup_cosine`` (the same warmup, then cosine decay to
    ``final_lr_fraction * learning_rate`` at ``num_steps``). Gradient clipping by global norm
    comes first when ``grad_clip > 0``.
    """
    o = optim_config
    lr = o.learning_rate
    if o.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif o.schedule == "warmup_constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(o.warmup_steps, 1)), optax.constant_schedule(lr)],
            [max(o.warmup_steps, 1)],
        )
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0,
            lr,
            max(o.warmup_steps, 1),
            max(num_steps, o.warmup_steps + 1),
            lr * o.final_lr_fraction,
        )
    if o.optimizer == "adam":
        opt = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)
    else:
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt, schedule


def ema_decay(num_updates: Int[Array, ""], decay: float, warmup: bool) -> Float[Array, ""]:
    r"""The EMA decay after ``num_updates`` updates: ``decay``, or with warmup
    :math:`\min(\text{decay}, (1 + n) / (10 + n))`.

    Example:
        >>> from fmjax.train import ema_decay
        >>> float(ema_decay(1, 0.999, warmup=True))  # 2 / 11
        0.181818...
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params: PyTree, params: PyTree, decay: Float[Array, ""]) -> PyTree:
    r""":math:`\text{ema} \leftarrow d\,\text{ema} + (1 - d)\,\theta`, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def init_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation
) -> TrainState:
    """A fresh state: parameters from ``config.seed``, EMA equal to them, step 0."""
    h, w, c = config.data.image_shape
    kwargs = {"y": jnp.zeros((1,), jnp.int32)} if config.model.num_classes is not None else {}

    # Jitted as one program: run eagerly, every layer's initialiser and forward op is a
    # dispatch and compilation of its own (UNetDigits: 18 s eagerly; jitted, 4.5 s cold and
    # 1.3 s from the persistent cache).
    # Inside a caller's jit this is inlined.
    @jax.jit
    def fresh() -> TrainState:
        x = jnp.zeros((1, h, w, c), jnp.float32)
        key = jax.random.fold_in(jax.random.key(config.seed), _INIT_STREAM)
        params = model.init({"params": key}, x, jnp.zeros((1,)), **kwargs)["params"]
        # A copy, not the same buffers: the step donates its input, and donating one buffer
        # through two leaves crashes the runtime.
        ema_params = jax.tree.map(jnp.copy, params)
        return TrainState(jnp.zeros((), jnp.int32), params, ema_params, tx.init(params))

    # The non-partitionable threefry lowering compiles ~5x faster on CPU (UNetDigits' init:
    # 4 s instead of 24 s); init runs once per run, so its partitioning does not matter.
    with jax.threefry_partitionable(False):
        return fresh()


def abstract_state(
    config: ml_collections.ConfigDict, model: nn.Module, sharding: jax.sharding.Sharding
) -> TrainState:
    """The shapes and dtypes of the state, each placed by ``sharding`` (for restoring)."""
    tx, _ = make_optimizer(config.optim, config.train.num_steps)
    shapes = jax.eval_shape(lambda: init_state(config, model, tx))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over ``devices`` (default: every device of every host).

    Devices are ordered by process, then id, so each host's devices hold a contiguous slice of
    the batch (the layout :func:`jax.make_array_from_process_local_data` expects).
    """
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
) -> Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """The jitted step ``(state, batch) -> (state, metrics)`` over ``mesh``; donates ``state``.

    ``batch`` is ``{"image": [B, h, w, c] float32, "label": [B] int32}``, global arrays
    sharded over ``"data"`` (``B = config.train.batch_size``). Each device splits its rows
    into ``accumulation_steps`` micro-batches, sums their gradients, and the mean over all
    devices is one optimizer update. ``metrics`` (replicated scalars): ``loss``,
    ``grad_norm`` (of the averaged gradient), ``lr`` (used by this update) and ``finite``
    (whether every new parameter is finite).
    """
    path, coupling, time_sampler = build_path(config.path)
    accumulation = config.train.accumulation_steps
    num_classes = config.model.num_classes
    label_drop = config.data.label_drop_prob
    base_key = jax.random.key(config.seed)
    o = config.optim

    def apply_fn(params, x_t, t, **kwargs):
        return model.apply({"params": params}, x_t, t, **kwargs)

    def micro_loss(params, x1, labels, keys, dropout_key):
        example_kwargs = {}
        if num_classes is not None:
            if label_drop > 0:
                label_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(
                    jax.random.wrap_key_data(keys)
                )
                labels = models.drop_labels(label_keys, labels, label_drop, num_classes)
            example_kwargs = {"y": labels}
        loss, _ = cfm_loss(
            apply_fn,
            params,
            keys,
            x1,
            path=path,
            coupling=coupling,
            time_sampler=time_sampler,
            prediction=config.path.prediction,
            loss_space=config.path.loss_space,
            model_kwargs={"train": True, "rngs": {"dropout": dropout_key}},
            example_kwargs=example_kwargs,
        )
        return loss

    def mean_over_devices(tree):
        # On one device the mean is the identity; XLA:CPU still copies an all-reduce's
        # operands (the CIFAR-10 U-Net's gradients: ~30 ms a step), so none is emitted.
        return tree if mesh.size == 1 else jax.lax.pmean(tree, "data")

    def device_step(state, x1, labels, keys):
        dropout_key = jax.random.fold_in(
            jax.random.fold_in(jax.random.fold_in(base_key, _DROPOUT_STREAM), state.step),
            jax.lax.axis_index("data"),
        )

        def split(a):
            return a.reshape(accumulation, a.shape[0] // accumulation, *a.shape[1:])

        def accumulate(carry, inputs):
            grad_sum, loss_sum = carry
            index, x1_m, labels_m, keys_m = inputs
            loss, grads = jax.value_and_grad(micro_loss)(
                state.params, x1_m, labels_m, keys_m, jax.random.fold_in(dropout_key, index)
            )
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
        if accumulation == 1:
            # No scan for one micro-batch: on XLA:CPU a conv net's backward pass inside a
            # while loop ran 11x slower than the same code outside it (UNetDigits: 0.97 s vs
            # 0.088 s per step). The scan stays for accumulation, whose point is memory.
            (grad_sum, loss_sum), _ = accumulate(zeros, (0, x1, labels, keys))
        else:
            (grad_sum, loss_sum), _ = jax.lax.scan(
                accumulate,
                zeros,
                (jnp.arange(accumulation), split(x1), split(labels), split(keys)),
            )
        grads = mean_over_devices(jax.tree.map(lambda g: g / accumulation, grad_sum))
        loss = mean_over_devices(loss_sum / accumulation)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = ema_update(state.ema_params, params, ema_decay(step, o.ema_decay, o.ema_warmup))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree_utils.tree_norm(grads),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "finite": finite,
        }
        return TrainState(step, params, ema, opt_state), metrics

    mapped = jax.shard_map(
        device_step,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data"), P("data")),
        out_specs=(P(), P()),
        # Replication of the outputs is by construction (everything is pmean'd first).
        check_vma=False,
    )

    def step_fn(state, batch):
        step_key = jax.random.fold_in(jax.random.fold_in(base_key, _NOISE_STREAM), state.step)
        batch_size = batch["image"].shape[0]
        keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(step_key, i)))(
            jnp.arange(batch_size)
        )
        keys = jax.lax.with_sharding_constraint(keys, NamedSharding(mesh, P("data")))
        return mapped(state, batch["image"], batch["label"], keys)

    # On CPU, XLA's YNNPACK fusions of matrix products only (fmjax._xla). They send reductions
    # back to XLA's own kernels, 5-7x slower on large maps: the bias gradients and GroupNorm
    # sums of 32x32 images. Measured (two compilations each, interleaved): on the digits U-Net's step they
    # win (0.75-0.9x the defaults' time), on the CIFAR-10 U-Net's they lose (1.2x).
    small_images = math.prod(config.data.image_shape[:2]) < _CPU_OPTIONS_MAX_PIXELS
    options = compiler_options(mesh.devices.flat[0].platform) if small_images else None
    return jax.jit(step_fn, donate_argnums=0, compiler_options=options)


def make_velocity(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
    """``f(params, labels, x, t) -> velocity`` for sampling, whatever the prediction type.

    Bind the arrays with ``jax.tree_util.Partial(f, params, labels)`` to get the
    ``velocity_fn(x, t)`` of :func:`fmjax.sampling.sample`; reusing one ``f`` means new
    parameters do not recompile the sampler. ``labels`` is None for an unconditional model.
    """
    path, _, _ = build_path(config.path)
    prediction = config.path.prediction

    def velocity(params, labels, x, t):
        t_batch = jnp.broadcast_to(t, (x.shape[0],))
        kwargs = {} if labels is None else {"y": labels}
        out = model.apply({"params": params}, x, t_batch, **kwargs)
        if prediction == "target":
            return path.target_to_velocity(out, x, t_batch)
        if prediction == "epsilon":
            return path.epsilon_to_velocity(out, x, t_batch)
        return out

    return velocity


# --- the loop -------------------------------------------------------------------------------


class _MetricWriter:
    """``metrics.jsonl`` and TensorBoard events; a no-op on processes other than 0.

    A line is appended with one ``os.write`` and cut off again if that fails (a full disk),
    so the file only ever holds whole lines. A run resumed from step ``start`` first drops
    the lines after ``start`` (logged after its checkpoint by the run that crashed), so the
    file ends up with the lines of an uninterrupted run, without duplicates or gaps.
    """

    def __init__(self, workdir: pathlib.Path, active: bool, start: int):
        self.active = active
        if active:
            from tensorboardX import SummaryWriter

            self._path = workdir / "metrics.jsonl"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.ftruncate(self._fd, _lines_up_to(self._path, start))
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


def _lines_up_to(path: pathlib.Path, step: int) -> int:
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


def _check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    if not (workdir / "config.json").exists():
        if any((workdir / "checkpoints").glob("[0-9]*")):
            raise ValueError(
                f"{workdir} holds checkpoints but no config.json, so nothing tells whether they "
                "match this config; put the run's config.json back or use a new --workdir."
            )
        return
    saved = checkpoint.load_config(workdir).to_dict()
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
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    source: data.Source | None = None,
    hooks: Sequence[EvalHook] = (),
    mesh: Mesh | None = None,
) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final state.

    Writes ``config.json``, ``metrics.jsonl`` (one object per logged step: ``step``,
    ``loss`` and ``grad_norm`` averaged since the previous log line, ``lr``,
    ``steps_per_sec``, ``images_per_sec``, plus hook metrics; a line every ``log_every``
    steps and at every checkpoint), TensorBoard events under ``tensorboard/``, sample grids
    under ``samples/`` and Orbax checkpoints under ``checkpoints/``. Resumes from the newest
    readable checkpoint, dropping the ``metrics.jsonl`` lines logged after it, so that a run
    killed and resumed any number of times ends with the parameters and the lines of an
    uninterrupted one; refuses a workdir whose saved model config differs. SIGTERM saves a
    checkpoint and returns.

    Args:
        config: see :func:`fmjax.configs.base_config`.
        workdir: the run directory (created if missing).
        source: the training data; default ``fmjax.data.build_source(config.data)``.
        hooks: evaluations run every ``hook.every`` steps and at the end.
        mesh: default: :func:`make_mesh` over every device.

    Raises:
        ValueError: for an invalid config (before any compilation) or a mismatched workdir.
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
    model = build_model(config.model)
    configs.validate_image_shape(model, config.data.image_shape)
    workdir = configs.prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    _check_resumable(workdir, config)
    if is_main:  # written whole or not at all: a half-written one would block every resume
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config.to_json(indent=2))
        os.replace(tmp, workdir / "config.json")

    # SIGTERM from here on checkpoints and returns (during restore and compilation too).
    with _Preemption() as preemption:
        return _train(config, model, workdir, source, hooks, mesh, preemption)


def _huge_pages_hint(
    image_shape: Sequence[int], backend: str, tunables: str | None, libc: tuple[str, str]
) -> str | None:
    """A log line that suggests ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, or None.

    XLA:CPU allocates a step's temporaries as one block, which glibc maps and unmaps on every
    step, so each step page-faults it in again; with the tunable (glibc >= 2.35) glibc maps it
    with transparent huge pages. Measured on the CIFAR-10 U-Net's step: 16-20% faster on an AMD
    Zen 5 VM, within noise (0-3%) on an Intel Xeon VM; steps on small images go the other way
    (the digits U-Net's: 13-26% slower on the Zen 5), hence the same pixel threshold as the CPU
    options of :func:`make_train_step`. glibc reads the tunable when the process starts, so
    only the user can set it.
    """
    name, version = libc
    if backend != "cpu" or math.prod(image_shape[:2]) < _CPU_OPTIONS_MAX_PIXELS:
        return None
    if name != "glibc" or tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < (2, 35):
        return None
    if tunables and "glibc.malloc.hugetlb" in tunables:
        return None
    return (
        "CPU training of images of 32x32 pixels or more can be faster with glibc's allocator "
        "on transparent huge pages (16-20% on one CPU measured, none on another): try starting "
        "Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see the README's Benchmarks section)."
    )


def _train(config, model, workdir, source, hooks, mesh, preemption) -> TrainState:
    """The loop of :func:`train_and_evaluate`, after validation."""
    is_main = jax.process_index() == 0
    tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    ckpt = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints, clean_up=True)
    restored = ckpt.restore_latest(abstract_state(config, model, replicated))
    if restored is None:
        state = jax.jit(lambda: init_state(config, model, tx), out_shardings=replicated)()
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
    writer = _MetricWriter(workdir, is_main, start)
    best = _BestCheckpoint(workdir, is_main)
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
        nonlocal last_log_time, last_log_step
        fetched = flush_metrics()
        now = time.perf_counter()
        rate = (step - last_log_step) / (now - last_log_time)
        values = {
            "loss": float(np.mean([m["loss"] for _, m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for _, m in fetched])),
            "lr": float(fetched[-1][1]["lr"]),
            "steps_per_sec": rate,
            "images_per_sec": rate * t.batch_size,
        }
        writer.write(step, values)
        log.info(
            "step %d/%d | loss %.4f | %.2f steps/s | %.0f img/s | ETA %s",
            step, t.num_steps, values["loss"], rate, values["images_per_sec"],
            _format_duration((t.num_steps - step) / max(rate, 1e-9)),
        )  # fmt: skip
        last_log_time, last_log_step = now, step

    try:
        for step in range(start + 1, t.num_steps + 1):
            state, metrics = train_step(state, place(next(batches)))
            pending.append((step, metrics))
            last = step == t.num_steps
            # A line at every checkpoint too: a run resumed from one then logs exactly the
            # lines (the same averaging windows) an uninterrupted run does.
            logged = step % t.log_every == 0 or step % t.checkpoint_every == 0 or last
            if logged:
                log_line(step)
            for hook in hooks:
                if step % hook.every == 0 or last:
                    flush_metrics()  # a hook never sees a non-finite state
                    scores = hook.fn(step, state)
                    writer.write(step, scores)
                    if hook.keep_best is not None:
                        best.offer(hook, step, state, scores, flush_metrics)
            if t.sample_every and (step % t.sample_every == 0 or last) and is_main:
                _write_grid(config, velocity, state, workdir / "samples" / f"step_{step:08d}.png")
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


class _BestCheckpoint:
    """The best-scoring state so far under ``checkpoints_best/``, described by ``best.json``."""

    def __init__(self, workdir: pathlib.Path, is_main: bool):
        self._workdir, self._is_main = workdir, is_main
        self._record = workdir / "best.json"
        self.value = (
            json.loads(self._record.read_text())["value"] if self._record.exists() else None
        )
        self._checkpoints: checkpoint.Checkpoints | None = None

    def offer(self, hook: EvalHook, step: int, state: TrainState, scores: dict, flush) -> None:
        if hook.keep_best not in scores:
            raise ValueError(
                f"EvalHook keep_best={hook.keep_best!r} is not among the metrics its fn returned: "
                f"{sorted(scores)}."
            )
        value = float(scores[hook.keep_best])
        if not (np.isfinite(value) and hook.improves(value, self.value)):
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
            record = {"step": step, "metric": hook.keep_best, "mode": hook.mode, "value": value}
            tmp = self._record.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._record)

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()


def generate(
    config: ml_collections.ConfigDict,
    velocity: Callable,
    state: TrainState,
    num_samples: int,
    key: jax.Array,
    *,
    labels: jax.Array | None = None,
) -> sampling.SampleResult:
    """Samples from the EMA parameters with the config's grid solver (``train.sample_solver``,
    ``train.sample_steps``); ``velocity`` comes from :func:`make_velocity`.

    A conditional model gets ``labels`` (default: cycling through the classes).
    """
    t = config.train
    x0 = jax.random.normal(key, (num_samples, *config.data.image_shape))
    if config.model.num_classes is not None and labels is None:
        labels = jnp.arange(num_samples, dtype=jnp.int32) % config.model.num_classes
    params = jax.device_get(state.ema_params)  # replicated: the host copy is complete
    fn = jax.tree_util.Partial(velocity, params, labels)
    return sampling.sample(fn, x0, solver=t.sample_solver, steps=t.sample_steps)


def _write_grid(config, velocity, state: TrainState, path: pathlib.Path) -> None:
    """A grid of samples from the EMA parameters (same noise every time, so grids compare)."""
    key = jax.random.fold_in(jax.random.key(config.seed), _GRID_STREAM)
    result = generate(config, velocity, state, config.train.num_grid_samples, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    images.save_grid(np.asarray(result.x), path, scale=max(1, 64 // config.data.image_shape[0]))
