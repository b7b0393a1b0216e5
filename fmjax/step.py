r"""The training step: the state, the EMA, and one data-parallel update over a mesh.

The step ``(state, batch) -> (state, metrics)`` is one ``jax.jit`` over a 1-D ``("data",)``
mesh of all devices (:func:`fmjax.mesh.make_mesh`); per-device work is mapped with
``jax.shard_map`` (what ``jax.pmap`` compiles to), gradients are averaged with ``lax.pmean``
and the state is donated. The same code runs on one CPU, simulated CPU devices, a GPU box or
a multi-host TPU slice (each host feeds its slice of the global batch; see :mod:`fmjax.data`).

Randomness: example ``i`` of the global batch at step ``s`` draws its noise, time and label
dropout from ``fold_in(fold_in(stream_key(seed, Stream.NOISE), s), i)`` through the
per-example keys of :func:`fmjax.loss.cfm_loss`, so with the independent coupling and no
dropout the loss curve does not depend on the number of devices or hosts (up to float
reduction order). Two things do depend on the split: a minibatch OT coupling pairs within
each per-device micro-batch, and network dropout draws one key per device and micro-batch.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from fmjax import models
from fmjax._xla import compiler_options
from fmjax.configs import build_intervals, build_path, make_optimizer, meanflow_guidance
from fmjax.keys import Stream, stream_key
from fmjax.loss import Pairs, cfm_loss, cfm_loss_on_pairs
from fmjax.meanflow import meanflow_loss

__all__ = [
    "CPU_OPTIONS_MAX_PIXELS",
    "TrainState",
    "abstract_state",
    "ema_decay",
    "ema_update",
    "init_state",
    "make_train_step",
]

CPU_OPTIONS_MAX_PIXELS = 32 * 32
"""On CPU, steps on images of fewer pixels than this compile with fmjax's CPU options
(:mod:`fmjax._xla`), larger ones with XLA's defaults: see :func:`make_train_step`."""


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


def ema_decay(num_updates: Int[Array, ""], decay: float, warmup: bool) -> Float[Array, ""]:
    r"""The EMA decay after ``num_updates`` updates: ``decay``, or with warmup
    :math:`\min(\text{decay}, (1 + n) / (10 + n))`.

    Example:
        >>> from fmjax.step import ema_decay
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

    # Jitted as one program: run eagerly, every layer's initialiser and forward op would be a
    # dispatch and a compilation of its own. Inside a caller's jit this is inlined.
    @jax.jit
    def fresh() -> TrainState:
        x = jnp.zeros((1, h, w, c), jnp.float32)
        key = stream_key(config.seed, Stream.INIT)
        params = model.init({"params": key}, x, jnp.zeros((1,)), **kwargs)["params"]
        # A copy, not the same buffers: the step donates its input, and donating one buffer
        # through two leaves crashes the runtime.
        ema_params = jax.tree.map(jnp.copy, params)
        return TrainState(jnp.zeros((), jnp.int32), params, ema_params, tx.init(params))

    # The non-partitionable threefry lowering compiles much faster on CPU; init runs once per
    # run, so its partitioning does not matter.
    with jax.threefry_partitionable(False):
        return fresh()


def abstract_state(
    config: ml_collections.ConfigDict, model: nn.Module, sharding: jax.sharding.Sharding
) -> TrainState:
    """The shapes and dtypes of the state, each placed by ``sharding`` (for restoring)."""
    tx, _ = make_optimizer(config.optim, config.train.num_steps)
    shapes = jax.eval_shape(lambda: init_state(config, model, tx))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
) -> Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """The jitted step ``(state, batch) -> (state, metrics)`` over ``mesh``; donates ``state``.

    ``batch`` is ``{"image": [B, h, w, c] float32, "label": [B] int32}``, global arrays
    sharded over ``"data"`` (``B = config.train.batch_size``), and for stored pairs
    (:class:`fmjax.data.PairSource`) ``"noise"`` shaped like ``"image"``: the loss is then
    :func:`fmjax.loss.cfm_loss_on_pairs` on ``(noise, image)`` at each example's time from
    the config's time sampler (drawn from its key as :func:`fmjax.loss.draw_pairs` draws it).
    Each device splits its rows into ``accumulation_steps`` micro-batches, sums their
    gradients, and the mean over all devices is one optimizer update. The loss is ``config.objective``'s: flow matching
    (:func:`fmjax.loss.cfm_loss`) or mean flow (:func:`fmjax.meanflow.meanflow_loss`, with the
    model called as ``model(x_t, t, t_end=t_end, ...)``). ``metrics`` (replicated scalars): ``loss``,
    ``grad_norm`` (of the averaged gradient), ``lr`` (used by this update) and ``finite``
    (whether every new parameter is finite).
    """
    path, coupling, time_sampler = build_path(config.path)
    accumulation = config.train.accumulation_steps
    num_classes = config.model.num_classes
    label_drop = config.data.label_drop_prob
    o = config.optim

    def apply_fn(params, x_t, t, **kwargs):
        return model.apply({"params": params}, x_t, t, **kwargs)

    def mean_flow_apply_fn(params, x_t, t, t_end, **kwargs):
        return model.apply({"params": params}, x_t, t, t_end=t_end, **kwargs)

    def pair_times(keys):
        # The time that fmjax.loss.draw_pairs draws from each example's key (its second split).
        def one(k):
            return time_sampler(jax.random.split(k, 3)[1], ())

        return jax.vmap(one)(jax.random.wrap_key_data(keys)).astype(jnp.float32)

    def micro_loss(params, x1, labels, keys, noise, dropout_key):
        example_kwargs = {}
        if num_classes is not None:
            if label_drop > 0:
                label_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(
                    jax.random.wrap_key_data(keys)
                )
                labels = models.drop_labels(label_keys, labels, label_drop, num_classes)
            example_kwargs = {"y": labels}
        model_kwargs = {"train": True, "rngs": {"dropout": dropout_key}}
        if config.objective == "mean_flow":
            loss, _ = meanflow_loss(
                mean_flow_apply_fn,
                params,
                keys,
                x1,
                path=path,
                coupling=coupling,
                interval_sampler=build_intervals(config.meanflow),
                adaptive_power=config.meanflow.adaptive_power,
                adaptive_eps=config.meanflow.adaptive_eps,
                model_kwargs=model_kwargs,
                example_kwargs=example_kwargs,
                guidance=meanflow_guidance(config),
            )
            return loss
        if noise is not None:  # stored pairs: the batch's noise, not a fresh draw
            pairs = Pairs(noise, x1, pair_times(keys), jnp.arange(x1.shape[0]), None)
            loss, _ = cfm_loss_on_pairs(
                apply_fn,
                params,
                pairs,
                path=path,
                prediction=config.path.prediction,
                loss_space=config.path.loss_space,
                model_kwargs=model_kwargs,
                example_kwargs=example_kwargs,
            )
            return loss
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
            model_kwargs=model_kwargs,
            example_kwargs=example_kwargs,
        )
        return loss

    def mean_over_devices(tree):
        # On one device the mean is the identity; XLA:CPU would still copy an all-reduce's
        # operands, so none is emitted.
        return tree if mesh.size == 1 else jax.lax.pmean(tree, "data")

    def device_step(state, x1, labels, keys, noise):
        dropout_key = jax.random.fold_in(
            jax.random.fold_in(stream_key(config.seed, Stream.DROPOUT), state.step),
            jax.lax.axis_index("data"),
        )

        def split(a):
            return a.reshape(accumulation, a.shape[0] // accumulation, *a.shape[1:])

        def accumulate(carry, inputs):
            grad_sum, loss_sum = carry
            index, x1_m, labels_m, keys_m, noise_m = inputs
            loss, grads = jax.value_and_grad(micro_loss)(
                state.params,
                x1_m,
                labels_m,
                keys_m,
                noise_m,
                jax.random.fold_in(dropout_key, index),
            )
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
        if accumulation == 1:
            # No scan for one micro-batch: XLA:CPU runs a conv net's backward pass inside a
            # while loop far slower than outside it. The scan stays for accumulation, whose
            # point is memory.
            (grad_sum, loss_sum), _ = accumulate(zeros, (0, x1, labels, keys, noise))
        else:
            (grad_sum, loss_sum), _ = jax.lax.scan(
                accumulate,
                zeros,
                (
                    jnp.arange(accumulation),
                    split(x1),
                    split(labels),
                    split(keys),
                    jax.tree.map(split, noise),
                ),
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
        # noise: P("data") as a prefix of None too (a batch without stored pairs).
        in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
        out_specs=(P(), P()),
        # Replication of the outputs is by construction (everything is pmean'd first).
        check_vma=False,
    )

    def step_fn(state, batch):
        step_key = jax.random.fold_in(stream_key(config.seed, Stream.NOISE), state.step)
        batch_size = batch["image"].shape[0]
        keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(step_key, i)))(
            jnp.arange(batch_size)
        )
        keys = jax.lax.with_sharding_constraint(keys, NamedSharding(mesh, P("data")))
        return mapped(state, batch["image"], batch["label"], keys, batch.get("noise"))

    # On CPU, XLA's YNNPACK fusions of matrix products only (fmjax._xla). They send reductions
    # back to XLA's own kernels, which are slow on large maps (the bias gradients and GroupNorm
    # sums of 32x32 images): the options help small images' steps and hurt large ones'
    # (figures: docs/benchmarks.md).
    small_images = math.prod(config.data.image_shape[:2]) < CPU_OPTIONS_MAX_PIXELS
    options = compiler_options(mesh.devices.flat[0].platform) if small_images else None
    return jax.jit(step_fn, donate_argnums=0, compiler_options=options)
