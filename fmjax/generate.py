"""Generating from a model: the velocity of a trained network, sample grids, and sample files.

:func:`make_velocity` turns a network (whatever it predicts) into the ``velocity_fn(x, t)`` of
:func:`fmjax.sampling.sample`; :func:`generate` samples from a state's EMA parameters with the
config's grid solver (what training's grids and in-training scores use); :func:`sample_run`
samples a saved run into a PNG grid and an ``.npz`` (``experiments.cifar10 --mode=sample``),
with the solver, guidance and noise of :class:`SamplingOptions`.
"""

import dataclasses
import functools
import logging
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jaxtyping import Array, Float

from fmjax import images, meanflow, sampling, sde
from fmjax.configs import build_path
from fmjax.keys import Stream, stream_key
from fmjax.paths import AffinePath
from fmjax.rundir import RunArtifacts, load_config, load_run
from fmjax.step import TrainState

__all__ = [
    "MEAN_FLOW_SAMPLER",
    "SAMPLERS",
    "SDE_SAMPLER",
    "SampleOutput",
    "SamplingOptions",
    "check_sampler",
    "class_labels",
    "generate",
    "initial_noise",
    "make_velocity",
    "sample_record",
    "sample_run",
    "sde_keys",
    "solve",
    "solve_options",
    "velocity_binder",
    "write_grid",
    "write_npz",
]

log = logging.getLogger(__name__)


def make_velocity(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
    """``f(params, labels, x, t) -> velocity`` for sampling, whatever the prediction type.

    ``x`` is ``[batch, *dims]`` and ``t`` is ``[batch]``, as everywhere in fmjax. Bind the
    arrays with ``jax.tree_util.Partial(f, params, labels)`` to get the ``velocity_fn(x, t)``
    of :func:`fmjax.sampling.sample`; reusing one ``f`` means new parameters or labels do not
    recompile the sampler. ``labels`` is None for an unconditional model.

    A mean-flow run's (``config.objective == "mean_flow"``) ``f`` also takes ``t_end``
    (``[batch]``): ``f(params, labels, x, t, t_end)`` is the average velocity over
    ``[t, t_end]`` that :func:`fmjax.meanflow.sample` jumps with, and without ``t_end`` the
    instantaneous velocity ``u(x, t, t)`` that the ODE solvers and the likelihood integrate.
    """
    path, _, _ = build_path(config.path)
    prediction = config.path.prediction
    mean_flow = config.objective == "mean_flow"

    def velocity(params, labels, x, t, t_end=None):
        kwargs = {} if labels is None else {"y": labels}
        if mean_flow:
            end = t if t_end is None else t_end
            return model.apply({"params": params}, x, t, t_end=end, **kwargs)
        out = model.apply({"params": params}, x, t, **kwargs)
        return path.to_velocity(prediction, out, x, t)

    return velocity


def generate(
    config: ml_collections.ConfigDict,
    velocity: Callable,
    state: TrainState,
    num_samples: int,
    key: jax.Array,
    *,
    labels: jax.Array | None = None,
    mean_flow_steps: int | None = None,
) -> sampling.SampleResult:
    """Samples from the EMA parameters with the config's grid solver (``train.sample_solver``,
    ``train.sample_steps``); ``velocity`` comes from :func:`make_velocity`. A mean-flow run
    jumps ``mean_flow_steps`` times (default ``config.meanflow.sample_steps``) with
    :func:`fmjax.meanflow.sample` instead.

    A conditional model gets ``labels`` (default: cycling through the classes).
    """
    t = config.train
    x0 = jax.random.normal(key, (num_samples, *config.data.image_shape))
    if config.model.num_classes is not None and labels is None:
        labels = jnp.arange(num_samples, dtype=jnp.int32) % config.model.num_classes
    params = jax.device_get(state.ema_params)  # replicated: the host copy is complete
    fn = jax.tree_util.Partial(velocity, params, labels)
    if config.objective == "mean_flow":
        steps = config.meanflow.sample_steps if mean_flow_steps is None else mean_flow_steps
        return meanflow.sample(fn, x0, steps=steps)
    return sampling.sample(fn, x0, solver=t.sample_solver, steps=t.sample_steps)


def write_grid(
    config: ml_collections.ConfigDict, velocity: Callable, state: TrainState, path: pathlib.Path
) -> None:
    """A grid of samples from the EMA parameters (same noise every time, so grids compare)."""
    key = stream_key(config.seed, Stream.GRID)
    result = generate(config, velocity, state, config.train.num_grid_samples, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    images.save_grid(np.asarray(result.x), path, scale=max(1, 64 // config.data.image_shape[0]))


MEAN_FLOW_SAMPLER = "meanflow"
"""The ``SamplingOptions.solver`` of a mean-flow run's few-step jumps."""

SDE_SAMPLER = "sde"
"""The ``SamplingOptions.solver`` of the stochastic sampler (:func:`fmjax.sde.sample_sde`)."""

SAMPLERS = (*sampling.SOLVERS, SDE_SAMPLER, MEAN_FLOW_SAMPLER)
"""What ``SamplingOptions.solver`` may name: an ODE solver of :data:`fmjax.sampling.SOLVERS`,
:data:`SDE_SAMPLER` or :data:`MEAN_FLOW_SAMPLER`."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How ``--mode=sample`` generates.

    Attributes:
        num_samples: how many samples.
        solver: one of ``fmjax.sampling.SOLVERS``; ``"sde"``: ``steps`` steps of the SDE with
            the flow's marginals (:func:`fmjax.sde.sample_sde`, as SiT samples; the ``sde_*``
            options); or ``"meanflow"`` for a mean-flow run (``config.objective ==
            "mean_flow"``): ``steps`` jumps of its average velocity
            (:func:`fmjax.meanflow.sample`) on the uniform grid.
        steps: steps of a fixed-step solver (``euler``, ``midpoint``, ``heun``, ``rk4``) or of
            ``sde``, or jumps of ``meanflow``.
        time_grid: ``"edm"`` (:func:`fmjax.sampling.edm_time_grid`, Meta's choice: starts at
            t = 0.0123) or ``"uniform"`` (from t = 0), for a fixed-step solver.
        rtol, atol: tolerances of an adaptive solver (``tsit5``, ``dopri5``, ``dopri8``).
        labels: classes of a conditional run, cycled over the samples; None: 0, 1, ..., 9, 0...
        guidance_scale: classifier-free guidance weight :math:`w` (1: the conditional field,
            0: the unconditional one, > 1: guided). Conditional runs only.
        guidance_interval: ``(t_min, t_max)``, ``0 <= t_min <= t_max <= 1``: guide only at
            times in this interval (fmjax's time: noise at 0), the conditional field elsewhere
            (``interval`` of :func:`fmjax.sampling.classifier_free_guidance`, which converts
            REPA's ``guidance_high``); None: at every time. Needs a guidance scale other
            than 1.
        guidance_channels: guide only the first this many channels (the last axis), the
            conditional field in the others (``channels`` of
            :func:`fmjax.sampling.classifier_free_guidance`; SiT's released sampler: 3 of its 4
            latent channels); None: all. Needs a guidance scale other than 1.
        sde_solver: ``"sde"``'s stepper, ``"euler"`` (Euler–Maruyama) or ``"heun"``
            (:data:`fmjax.sde.SDE_SOLVERS`).
        sde_diffusion: ``"sde"``'s diffusion :math:`w_t`, a name of
            :data:`fmjax.sde.DIFFUSIONS` (SiT's default: ``"sigma"``).
        sde_diffusion_norm: its scale (0: the ODE, by Euler steps).
        sde_last_step: ``"sde"``'s noiseless last step, one of :data:`fmjax.sde.LAST_STEPS`.
        sde_last_step_size: its size (SiT: 0.04); None: that of the other steps.
        seed: the noise of sample ``i`` is drawn from ``fold_in(key(seed), i)`` (and its
            Brownian motion, for ``"sde"``, from :func:`sde_keys`), so samples do not depend on
            ``batch_size``.
        batch_size: samples per solve (bounds memory; each solve reports its own NFE).
    """

    num_samples: int = 64
    solver: str = "heun"
    steps: int = 50
    time_grid: str = "edm"
    rtol: float = 1e-5
    atol: float = 1e-5
    labels: Sequence[int] | None = None
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    guidance_channels: int | None = None
    sde_solver: str = "euler"
    sde_diffusion: str = "sigma"
    sde_diffusion_norm: float = 1.0
    sde_last_step: str = "mean"
    sde_last_step_size: float | None = None
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self):
        for name in ("num_samples", "steps", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"--{name}={value!r} must be a positive integer.")
        if self.solver not in SAMPLERS:
            raise ValueError(f"--solver={self.solver!r}; expected one of {list(SAMPLERS)}.")
        if self.time_grid not in ("edm", "uniform"):
            raise ValueError(f"--time_grid={self.time_grid!r}; expected 'edm' or 'uniform'.")
        for name, choices in (
            ("sde_solver", sde.SDE_SOLVERS),
            ("sde_diffusion", sde.DIFFUSIONS),
            ("sde_last_step", sde.LAST_STEPS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"--{name}={getattr(self, name)!r}; expected one of {list(choices)}."
                )
        norm = self.sde_diffusion_norm
        if not (isinstance(norm, int | float) and 0 <= norm < float("inf")):
            raise ValueError(f"--sde_diffusion_norm={norm!r}; expected a finite number >= 0.")
        size = self.sde_last_step_size
        if size is not None and not (isinstance(size, int | float) and 0 < size < 1):
            raise ValueError(f"--sde_last_step_size={size!r}; expected a number in (0, 1).")
        if self.solver == SDE_SAMPLER and self.steps < 2:
            raise ValueError(
                "--solver=sde takes --steps >= 2 (steps - 1 noisy steps, then the noiseless last "
                f"one); got --steps={self.steps}."
            )
        if not (np.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(
                f"--guidance_scale={self.guidance_scale!r}; expected a finite number >= 0 "
                "(0: unconditional, 1: conditional, > 1: guided)."
            )
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            text = ",".join(map(str, interval)) if isinstance(interval, tuple | list) else interval
            if not (
                isinstance(interval, tuple | list)
                and len(interval) == 2
                and all(isinstance(end, int | float) for end in interval)
                and 0.0 <= interval[0] <= interval[1] <= 1.0
            ):
                raise ValueError(
                    f"--guidance_interval={text!r}; expected t_min,t_max with "
                    "0 <= t_min <= t_max <= 1 (noise at t = 0, e.g. 0.3,1.0)."
                )
            if self.guidance_scale == 1.0:
                raise ValueError(
                    f"--guidance_interval={text!r} limits guidance, but --guidance_scale=1 "
                    "is the conditional field at every time; set --guidance_scale too."
                )
            object.__setattr__(self, "guidance_interval", tuple(map(float, interval)))
        channels = self.guidance_channels
        if channels is not None:
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
                raise ValueError(f"--guidance_channels={channels!r}; expected a positive integer.")
            if self.guidance_scale == 1.0:
                raise ValueError(
                    f"--guidance_channels={channels} limits guidance, but --guidance_scale=1 "
                    "is the conditional field everywhere; set --guidance_scale too."
                )

    @property
    def method(self) -> str:
        """A short name of the solver and its settings, for file names: ``heun-edm50``,
        ``meanflow1``, ``sde-euler-sigma-mean0.04-250``."""
        if self.solver == MEAN_FLOW_SAMPLER:
            return f"{self.solver}{self.steps}"
        if self.solver == SDE_SAMPLER:
            norm = "" if self.sde_diffusion_norm == 1.0 else f"x{self.sde_diffusion_norm:g}"
            last = "" if self.sde_last_step_size is None else f"{self.sde_last_step_size:g}"
            return (
                f"sde-{self.sde_solver}-{self.sde_diffusion}{norm}-{self.sde_last_step}{last}"
                f"-{self.steps}"
            )
        if self.solver in sampling.FIXED_STEP_SOLVERS:
            return f"{self.solver}-{self.time_grid}{self.steps}"
        return f"{self.solver}-rtol{self.rtol:g}-atol{self.atol:g}"


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """What :func:`sample` wrote.

    Attributes:
        png: the grid of samples.
        npz: the arrays (see :func:`sample`).
        nfe: velocity evaluations of each ODE solve (one per batch of samples).
    """

    png: pathlib.Path
    npz: pathlib.Path
    nfe: list[int]


def class_labels(
    options: SamplingOptions, num_classes: int | None, num_samples: int
) -> np.ndarray | None:
    """``[num_samples]`` int32 labels cycling through ``options.labels``; None if unconditional.

    Raises:
        ValueError: labels or a guidance scale for an unconditional run, or labels outside
            ``[0, num_classes - 1]``.
    """
    if num_classes is None:
        if options.labels is not None or options.guidance_scale != 1.0:
            raise ValueError(
                "This run is unconditional (config.model.num_classes is None); --labels and "
                "--guidance_scale are for class-conditional runs (the 'conditional' variant)."
            )
        return None
    classes = np.arange(num_classes) if options.labels is None else np.asarray(options.labels)
    if classes.size == 0 or np.any(classes < 0) or np.any(classes >= num_classes):
        raise ValueError(
            f"--labels={classes.tolist()} must name classes in [0, {num_classes - 1}] "
            f"(the null label {num_classes} is --guidance_scale=0)."
        )
    return np.resize(classes, num_samples).astype(np.int32)


def velocity_binder(
    model,
    config: ml_collections.ConfigDict,
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None = None,
    guidance_channels: int | None = None,
) -> Callable[..., Callable]:
    """``bind(params, labels) -> velocity_fn(x, t)`` (``t``: ``[batch]``) for
    :func:`fmjax.sampling.sample`; a conditional model with ``guidance_scale`` other than 1
    is guided (:func:`fmjax.sampling.classifier_free_guidance`), only at times in
    ``guidance_interval`` and in the first ``guidance_channels`` channels when they are
    given.

    The function inside every bound ``Partial`` is the same object, so each batch of samples
    reuses one compiled solver; only the arrays (parameters, labels) change.
    """
    velocity = make_velocity(model, config)
    num_classes = config.model.num_classes
    if num_classes is None or guidance_scale == 1.0:
        # w = 1 is the conditional field exactly; skip the doubled batch of guidance.
        return lambda params, labels: jax.tree_util.Partial(velocity, params, labels)

    def guided(params, labels, x, t):
        field = sampling.classifier_free_guidance(
            lambda p, x, t, y: velocity(p, y, x, t),
            params,
            labels,
            null_label=num_classes,
            scale=guidance_scale,
            interval=guidance_interval,
            channels=guidance_channels,
        )
        return field(x, t)

    return lambda params, labels: jax.tree_util.Partial(guided, params, labels)


def initial_noise(
    key: jax.Array, start: int, stop: int, image_shape: tuple[int, ...]
) -> Float[Array, "n h w c"]:
    """The noise ``x0`` of samples ``start, ..., stop - 1``, shape ``[stop - start, *image_shape]``.

    Sample ``i`` is drawn from ``fold_in(key, i)`` alone, so sample ``i`` is the same however
    the samples are split into batches.
    """
    return _per_sample(key, start, stop - start, tuple(image_shape), "noise")


def sde_keys(key: jax.Array, start: int, stop: int) -> jax.Array:
    """The keys of the Brownian motions of samples ``start, ..., stop - 1`` (``solver="sde"``):
    ``fold_in(fold_in(key, i), 1)``, independent of their noise :func:`initial_noise` and of
    the batches, shape ``[stop - start]``."""
    return _per_sample(key, start, stop - start, (), "keys")


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _per_sample(key: jax.Array, start: int, count: int, shape: tuple[int, ...], what: str):
    # The first index is traced, so the batches of a long run share one program.
    def one(i):
        sample_key = jax.random.fold_in(key, i)
        if what == "keys":
            return jax.random.fold_in(sample_key, 1)
        return jax.random.normal(sample_key, shape)

    return jax.vmap(one)(start + jnp.arange(count))


def sample_record(
    options: SamplingOptions,
    step: int,
    labels: np.ndarray | None,
    nfe: Sequence[int],
    success: Sequence[bool],
) -> tuple[str, dict[str, np.ndarray]]:
    """The file stem of a sample file and the arrays that say how its samples were drawn.

    The stem is ``sample_step{step}_{method}_n{N}_seed{S}``, then for a conditional run
    ``_w{scale}``, ``_t{t_min}-{t_max}`` with a guidance interval and ``_c{k}`` with guided
    channels; the arrays are ``nfe`` and ``success`` (one per solve), ``step``, ``method``,
    ``seed``, and ``labels``, ``guidance_scale``, ``guidance_interval``, ``guidance_channels``
    where they apply.
    """
    stem = f"sample_step{step:08d}_{options.method}_n{options.num_samples}_seed{options.seed}"
    arrays = {
        "nfe": np.asarray(nfe, np.int32),
        "success": np.asarray(success),
        "step": np.asarray(step),
        "method": np.asarray(options.method),
        "seed": np.asarray(options.seed),
    }
    if labels is not None:
        stem += f"_w{options.guidance_scale:g}"
        arrays["labels"] = labels
        arrays["guidance_scale"] = np.asarray(options.guidance_scale, np.float32)
        if options.guidance_interval is not None:
            stem += "_t{:g}-{:g}".format(*options.guidance_interval)
            arrays["guidance_interval"] = np.asarray(options.guidance_interval, np.float32)
        if options.guidance_channels is not None:
            stem += f"_c{options.guidance_channels}"
            arrays["guidance_channels"] = np.asarray(options.guidance_channels)
    return stem, arrays


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to ``path`` through a temporary name, so a crash never leaves half a
    file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def sample_run(
    workdir: str | os.PathLike,
    options: SamplingOptions = SamplingOptions(),
    *,
    model: nn.Module | None = None,
    run: RunArtifacts | None = None,
) -> SampleOutput:
    """Samples from the EMA parameters of the run in ``workdir`` (its newest checkpoint), or
    from the already loaded ``run`` (e.g. a network imported from PyTorch, whose ``config``
    needs ``data.image_shape``), writing into ``workdir`` either way.

    Writes ``workdir/samples/sample_step{STEP}_{METHOD}_n{N}_seed{SEED}[_w{SCALE}][_t{A}-{B}]``
    ``.png`` (a grid; one column per class for a conditional run with the default labels;
    ``_t{A}-{B}``: the guidance interval) and ``.npz`` with ``images`` (float32
    ``[N, 32, 32, 3]``, clipped to [-1, 1]), ``images_uint8``, ``labels`` (int32 ``[N]``,
    conditional runs), ``nfe`` (int32, one entry per solve of ``options.batch_size``
    samples), ``success`` (per solve), ``step`` (of the checkpoint), ``method``,
    ``guidance_scale``, ``guidance_interval`` (when given) and ``seed``. With guidance, one
    velocity evaluation runs the network on twice the batch (the conditional and the
    unconditional half; outside the guidance interval once on the batch).

    The run's saved config decides the model (unless ``model`` is given, as for
    :func:`fmjax.rundir.load_run`) and the data shape; run it on one process.

    Example (an imported network, ``experiments.cifar10 --mode=sample --params=...``)::

        model = UNetCIFAR10TorchCFM()
        params = load_params("otcfm.npz", model)
        config.data.image_shape = (32, 32, 3)
        sample_run("out", options, run=RunArtifacts(config, model, params, step=0))

    Raises:
        ValueError: in a multi-process launch, for a workdir without a checkpoint, or for
            ``labels`` / ``guidance_scale`` that the run cannot use.
    """
    if jax.process_count() > 1:
        raise ValueError("--mode=sample runs on one process; launch it without --distributed.")
    # The options are checked against the saved config before the parameters are loaded.
    num_classes = (load_config(workdir) if run is None else run.config).model.num_classes
    labels = class_labels(options, num_classes, options.num_samples)
    if run is None:
        run = load_run(workdir, model=model)
    config = run.config
    check_sampler(options, config)
    image_shape = tuple(config.data.image_shape)
    bind = velocity_binder(
        run.model,
        config,
        options.guidance_scale,
        options.guidance_interval,
        options.guidance_channels,
    )
    path = build_path(config.path)[0]

    key = jax.random.key(options.seed)
    parts, nfe, success = [], [], []
    for start in range(0, options.num_samples, options.batch_size):
        stop = min(start + options.batch_size, options.num_samples)
        batch_labels = None if labels is None else jnp.asarray(labels[start:stop])
        result = solve(
            bind(run.ema_params, batch_labels),
            initial_noise(key, start, stop, image_shape),
            options,
            path=path,
            start=start,
        )
        parts.append(np.asarray(result.x))
        nfe.append(int(result.nfe))
        success.append(bool(result.success))
    if not all(success):
        log.warning("%d of %d solves did not succeed.", success.count(False), len(success))
    x = np.clip(np.concatenate(parts), -1.0, 1.0)

    stem, record = sample_record(options, run.step, labels, nfe, success)
    arrays = {"images": x.astype(np.float32), "images_uint8": images.to_uint8(x), **record}
    ncols = None
    if labels is not None:
        ncols = config.model.num_classes if options.labels is None else None
    out_dir = pathlib.Path(workdir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz = out_dir / f"{stem}.png", out_dir / f"{stem}.npz"
    images.save_grid(x, png, ncols=ncols, scale=max(1, 64 // image_shape[0]))
    write_npz(npz, arrays)
    guidance = "" if labels is None else f", guidance scale {options.guidance_scale:g}"
    if options.guidance_interval is not None:
        guidance += " for t in [{:g}, {:g}]".format(*options.guidance_interval)
    if options.guidance_channels is not None:
        guidance += f" in the first {options.guidance_channels} channels"
    print(
        f"{options.num_samples} samples from step {run.step} ({options.method}{guidance}): "
        f"NFE {nfe[0] if len(set(nfe)) == 1 else nfe} per solve of up to {options.batch_size}; "
        f"wrote {png} and {npz}"
    )
    return SampleOutput(png=png, npz=npz, nfe=nfe)


def check_sampler(options: SamplingOptions, config: ml_collections.ConfigDict) -> None:
    """Refuses ``solver="meanflow"`` for a run that is not a mean flow, and sampling-time
    guidance with it (a mean flow's guidance is trained in: ``config.meanflow.guidance_*``);
    and ``solver="sde"`` for a run trained with bridge noise (whose score the SDE lacks).
    """
    if options.solver == SDE_SAMPLER and config.path.get("bridge_noise", "none") != "none":
        raise ValueError(
            f"--solver=sde needs the score of the path, which a run trained with bridge noise "
            f"(config.path.bridge_noise={config.path.bridge_noise!r}) does not give; pick an "
            f"ODE solver of {list(sampling.SOLVERS)}."
        )
    if options.solver != MEAN_FLOW_SAMPLER:
        return
    if config.objective != "mean_flow":
        raise ValueError(
            f"--solver={MEAN_FLOW_SAMPLER} jumps with an average velocity; this run's "
            f"config.objective is {config.objective!r}. Pick an ODE solver of "
            f"{list(sampling.SOLVERS)}."
        )
    if options.guidance_scale != 1.0:
        raise ValueError(
            f"--solver={MEAN_FLOW_SAMPLER} takes no --guidance_scale: a mean flow's guidance is "
            "trained in (config.meanflow.guidance_omega, guidance_kappa)."
        )


def solve(
    velocity_fn: Callable,
    x0: jax.Array,
    options: SamplingOptions,
    *,
    path: AffinePath | None = None,
    start: int = 0,
) -> sampling.SampleResult | sde.SDEResult:
    """Samples from ``x0`` as ``options`` say: an ODE solve of ``velocity_fn(x, t)``; for
    ``solver="sde"`` :func:`fmjax.sde.sample_sde` on ``path`` (the run's, from
    :func:`fmjax.configs.build_path`), ``x0`` being samples ``start, start + 1, ...`` (their
    Brownian motions: :func:`sde_keys` of ``key(options.seed)``); for ``solver="meanflow"``
    ``steps`` jumps of ``velocity_fn(x, t, t_end)``. Every result has ``x``, ``nfe`` and
    ``success``."""
    if options.solver == MEAN_FLOW_SAMPLER:
        return meanflow.sample(velocity_fn, x0, steps=options.steps)
    if options.solver == SDE_SAMPLER:
        if path is None:
            raise ValueError("solve(..., solver='sde') needs the run's path (path=...).")
        return sde.sample_sde(
            velocity_fn,
            x0,
            sde_keys(jax.random.key(options.seed), start, start + x0.shape[0]),
            steps=options.steps,
            path=path,
            diffusion=options.sde_diffusion,
            diffusion_norm=float(options.sde_diffusion_norm),
            solver=options.sde_solver,
            last_step=options.sde_last_step,
            last_step_size=options.sde_last_step_size,
        )
    return sampling.sample(velocity_fn, x0, solver=options.solver, **solve_options(options))


def solve_options(options: SamplingOptions) -> dict:
    """The time grid of a fixed-step solver or the tolerances of an adaptive one."""
    if options.solver in sampling.FIXED_STEP_SOLVERS:
        grid = {"edm": sampling.edm_time_grid, "uniform": sampling.uniform_time_grid}
        return {"time_grid": grid[options.time_grid](options.steps)}
    return {"rtol": options.rtol, "atol": options.atol}
