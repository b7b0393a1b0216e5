"""CIFAR-10: train a flow-matching U-Net with a peer's recipe, resume it, and sample from it.

    python -m experiments.cifar10 --workdir=DIR [--config=experiments/configs/cifar10.py[:VARIANT]]
                                  [--config.KEY=VALUE ...] [--mode=train|sample] [--distributed]

``--mode=train`` (the default) trains the run in ``DIR`` with ``fmjax.train.train_and_evaluate``,
or resumes it from its newest checkpoint. ``--mode=sample`` loads the run's EMA parameters and
writes ``--num_samples`` samples to ``DIR/samples/`` as a PNG grid and an ``.npz`` (``images``
in [-1, 1], ``images_uint8``, ``labels`` of a conditional run, ``nfe``); see
:class:`SamplingOptions` for the solver flags. The variants of the config are described in
``experiments/configs/cifar10.py``. CIFAR-10 must be prepared for tfds once, on a machine with
network access::

    pip install tensorflow  # only for this step
    tfds build cifar10 --file_format=array_record [--data_dir=DATA]

Launch commands (also in README.md, "CIFAR-10"). The global batch (512 for the default
Meta recipe) is split over every device of every process; ``accumulation_steps`` splits each
device's share further into micro-batches, so the update is the same on any hardware.

One GPU (4 micro-batches of 128 make one update of 512)::

    python -m experiments.cifar10 --workdir=runs/cifar10 --config.train.accumulation_steps=4

Several GPUs of one machine (8 GPUs: 64 images per GPU; every visible GPU is used)::

    python -m experiments.cifar10 --workdir=runs/cifar10

Several machines with GPUs: one process per machine, all with the same arguments, the same
``--workdir`` on a shared filesystem and the data readable by each::

    python -m experiments.cifar10 --workdir=/shared/runs/cifar10 --distributed \\
        --coordinator_address=HOST0:1234 --num_processes=N --process_id=I

(under Slurm or Open MPI, ``--distributed`` alone finds the others). A multi-host TPU slice: the
same command on every host at once, which JAX configures by itself::

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd fmjax && \\
        .venv/bin/python -m experiments.cifar10 --workdir=/mnt/shared/runs/cifar10 \\
        --config.data.data_dir=/mnt/shared/tensorflow_datasets --distributed"

Sampling (one process; heun on the EDM grid, 50 steps: 100 NFE)::

    python -m experiments.cifar10 --workdir=runs/cifar10 --mode=sample --num_samples=64
    python -m experiments.cifar10 --workdir=runs/cifar10 --mode=sample --solver=dopri5 --rtol=1e-5 --atol=1e-5
    python -m experiments.cifar10 --workdir=runs/cifar10_cond --mode=sample --guidance_scale=2 --labels=3,5
"""

import dataclasses
import functools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jaxtyping import Array, Float
from ml_collections import config_flags

from experiments import common
from fmjax import checkpoint, images, sampling, train

__all__ = [
    "MODES",
    "SampleOutput",
    "SamplingOptions",
    "fid_hook",
    "initial_noise",
    "run",
    "sample",
    "train_mode",
]

log = logging.getLogger(__name__)

_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "cifar10.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Config file (optionally :variant).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to do with the run.")
flags.DEFINE_bool(
    "distributed", False, "Multi-process launch: call jax.distributed.initialize() first."
)
flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.DEFINE_integer("num_samples", 64, "--mode=sample: how many samples.")
flags.DEFINE_enum("solver", "heun", list(sampling.SOLVERS), "--mode=sample: the ODE solver.")
flags.DEFINE_integer("steps", 50, "--mode=sample: steps of a fixed-step solver.")
flags.DEFINE_enum(
    "time_grid", "edm", ["edm", "uniform"], "--mode=sample: the grid of a fixed-step solver."
)
flags.DEFINE_float("rtol", 1e-5, "--mode=sample: relative tolerance of an adaptive solver.")
flags.DEFINE_float("atol", 1e-5, "--mode=sample: absolute tolerance of an adaptive solver.")
flags.DEFINE_list("labels", None, "--mode=sample, conditional runs: classes to cycle through.")
flags.DEFINE_float("guidance_scale", 1.0, "--mode=sample: classifier-free guidance weight w.")
flags.DEFINE_integer("sample_seed", 0, "--mode=sample: the seed of the initial noise.")
flags.DEFINE_integer("sample_batch_size", 500, "--mode=sample: samples per ODE solve.")
flags.DEFINE_integer("eval_samples", 50_000, "--mode=eval: samples scored by FID (0: no FID).")
flags.DEFINE_string("fid_stats", None, "--mode=eval: reference statistics (fid stats CLI).")
flags.DEFINE_string("inception", None, "--mode=eval: converted Inception weights (default: cache).")
flags.DEFINE_integer("bpd_examples", 10_000, "--mode=eval: test images for bits/dim (0: none).")
flags.DEFINE_integer("bpd_draws", 1, "--mode=eval: dequantisation draws K (the paper: 50).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How ``--mode=sample`` generates.

    Attributes:
        num_samples: how many samples.
        solver: one of ``fmjax.sampling.SOLVERS``.
        steps: steps of a fixed-step solver (``euler``, ``midpoint``, ``heun``, ``rk4``).
        time_grid: ``"edm"`` (:func:`fmjax.sampling.edm_time_grid`, Meta's choice: starts at
            t = 0.0123) or ``"uniform"`` (from t = 0), for a fixed-step solver.
        rtol, atol: tolerances of an adaptive solver (``tsit5``, ``dopri5``, ``dopri8``).
        labels: classes of a conditional run, cycled over the samples; None: 0, 1, ..., 9, 0...
        guidance_scale: classifier-free guidance weight :math:`w` (1: the conditional field,
            0: the unconditional one, > 1: guided). Conditional runs only.
        seed: the noise of sample ``i`` is drawn from ``fold_in(key(seed), i)``, so samples do
            not depend on ``batch_size``.
        batch_size: samples per ODE solve (bounds memory; each solve reports its own NFE).
    """

    num_samples: int = 64
    solver: str = "heun"
    steps: int = 50
    time_grid: str = "edm"
    rtol: float = 1e-5
    atol: float = 1e-5
    labels: Sequence[int] | None = None
    guidance_scale: float = 1.0
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self):
        for name in ("num_samples", "steps", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"--{name}={value!r} must be a positive integer.")
        if self.solver not in sampling.SOLVERS:
            raise ValueError(f"--solver={self.solver!r}; expected one of {list(sampling.SOLVERS)}.")
        if self.time_grid not in ("edm", "uniform"):
            raise ValueError(f"--time_grid={self.time_grid!r}; expected 'edm' or 'uniform'.")
        if not (np.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(
                f"--guidance_scale={self.guidance_scale!r}; expected a finite number >= 0 "
                "(0: unconditional, 1: conditional, > 1: guided)."
            )

    @property
    def method(self) -> str:
        """A short name of the solver and its settings, for file names: ``heun-edm50``."""
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


def _class_labels(
    options: SamplingOptions, num_classes: int | None, num_samples: int
) -> np.ndarray | None:
    """``[num_samples]`` int32 labels cycling through ``options.labels``; None if unconditional."""
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


def _velocity_binder(
    model, config: ml_collections.ConfigDict, guidance_scale: float
) -> Callable[..., Callable]:
    """``bind(params, labels) -> velocity_fn(x, t)`` for :func:`fmjax.sampling.sample`.

    The function inside every bound ``Partial`` is the same object, so each batch of samples
    reuses one compiled solver; only the arrays (parameters, labels) change.
    """
    velocity = train.make_velocity(model, config)
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
        )
        return field(x, t)

    return lambda params, labels: jax.tree_util.Partial(guided, params, labels)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def initial_noise(
    key: jax.Array, start: int, stop: int, image_shape: tuple[int, ...]
) -> Float[Array, "n h w c"]:
    """The noise ``x0`` of samples ``start, ..., stop - 1``, shape ``[stop - start, *image_shape]``.

    Sample ``i`` is drawn from ``fold_in(key, i)`` alone, so sample ``i`` is the same however
    the samples are split into batches.
    """
    indices = np.arange(start, stop)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(indices)


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    # Through a temporary name, as the grids are, so a crash never leaves half a file.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def sample(
    workdir: str | os.PathLike, options: SamplingOptions = SamplingOptions()
) -> SampleOutput:
    """Samples from the EMA parameters of the run in ``workdir`` (its newest checkpoint).

    Writes ``workdir/samples/sample_step{STEP}_{METHOD}_n{N}_seed{SEED}[_w{SCALE}].png`` (a
    grid; one column per class for a conditional run with the default labels) and ``.npz``
    with ``images`` (float32 ``[N, 32, 32, 3]``, clipped to [-1, 1]), ``images_uint8``,
    ``labels`` (int32 ``[N]``, conditional runs), ``nfe`` (int32, one entry per ODE solve of
    ``options.batch_size`` samples), ``success`` (per solve), ``step`` (of the checkpoint),
    ``method``, ``guidance_scale`` and ``seed``. With guidance, one velocity evaluation runs
    the network on twice the batch (the conditional and the unconditional half).

    The run's saved config decides the model and the data shape; run it on one process.

    Raises:
        ValueError: in a multi-process launch, for a workdir without a checkpoint, or for
            ``labels`` / ``guidance_scale`` that the run cannot use.
    """
    if jax.process_count() > 1:
        raise ValueError("--mode=sample runs on one process; launch it without --distributed.")
    # The options are checked against the saved config before the parameters are loaded.
    num_classes = checkpoint.load_config(workdir).model.num_classes
    labels = _class_labels(options, num_classes, options.num_samples)
    run = checkpoint.load_run(workdir)
    config = run.config
    image_shape = tuple(config.data.image_shape)
    bind = _velocity_binder(run.model, config, options.guidance_scale)
    solve_options = _solve_options(options)

    key = jax.random.key(options.seed)
    parts, nfe, success = [], [], []
    for start in range(0, options.num_samples, options.batch_size):
        stop = min(start + options.batch_size, options.num_samples)
        batch_labels = None if labels is None else jnp.asarray(labels[start:stop])
        result = sampling.sample(
            bind(run.ema_params, batch_labels),
            initial_noise(key, start, stop, image_shape),
            solver=options.solver,
            **solve_options,
        )
        parts.append(np.asarray(result.x))
        nfe.append(int(result.nfe))
        success.append(bool(result.success))
    if not all(success):
        log.warning("%d of %d ODE solves did not succeed.", success.count(False), len(success))
    x = np.clip(np.concatenate(parts), -1.0, 1.0)

    stem = f"sample_step{run.step:08d}_{options.method}_n{options.num_samples}_seed{options.seed}"
    arrays = {
        "images": x.astype(np.float32),
        "images_uint8": images.to_uint8(x),
        "nfe": np.asarray(nfe, np.int32),
        "success": np.asarray(success),
        "step": np.asarray(run.step),
        "method": np.asarray(options.method),
        "seed": np.asarray(options.seed),
    }
    ncols = None
    if labels is not None:
        stem += f"_w{options.guidance_scale:g}"
        arrays["labels"] = labels
        arrays["guidance_scale"] = np.asarray(options.guidance_scale, np.float32)
        ncols = config.model.num_classes if options.labels is None else None
    out_dir = pathlib.Path(workdir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz = out_dir / f"{stem}.png", out_dir / f"{stem}.npz"
    images.save_grid(x, png, ncols=ncols, scale=max(1, 64 // image_shape[0]))
    _write_npz(npz, arrays)
    guidance = "" if labels is None else f", guidance scale {options.guidance_scale:g}"
    print(
        f"{options.num_samples} samples from step {run.step} ({options.method}{guidance}): "
        f"NFE {nfe[0] if len(set(nfe)) == 1 else nfe} per solve of up to {options.batch_size}; "
        f"wrote {png} and {npz}"
    )
    return SampleOutput(png=png, npz=npz, nfe=nfe)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What ``--mode=eval`` measures (its sampler is that of :class:`SamplingOptions`).

    Attributes:
        num_samples: samples scored by FID against ``fid_stats`` (0: no FID).
        fid_stats: reference statistics, from ``python -m fmjax.metrics.fid stats``.
        inception: converted Inception weights (None: ``fmjax.metrics.fid`` 's cache path).
        bpd_examples: test-split images whose bits/dim is measured (0: none), by
            Hutchinson's estimator with dopri5 at the sampler's ``rtol``/``atol``.
        bpd_draws: uniform dequantisation draws per image (the Flow Matching paper: 50).
    """

    num_samples: int = 50_000
    fid_stats: str | None = None
    inception: str | None = None
    bpd_examples: int = 10_000
    bpd_draws: int = 1

    def __post_init__(self):
        for name in ("num_samples", "bpd_examples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(
                    f"--{name.replace('num_samples', 'eval_samples')}={value!r} must be >= 0."
                )
        if not (isinstance(self.bpd_draws, int) and self.bpd_draws > 0):
            raise ValueError(f"--bpd_draws={self.bpd_draws!r} must be a positive integer.")
        if self.num_samples and self.fid_stats is None:
            raise ValueError(
                "--mode=eval with --eval_samples > 0 needs --fid_stats: reference statistics from "
                "`python -m fmjax.metrics.fid stats --dataset=cifar10 --split=train --out=...`."
            )


def evaluate(
    workdir: str | os.PathLike,
    options: SamplingOptions = SamplingOptions(),
    eval_options: EvalOptions = EvalOptions(fid_stats=None, num_samples=0),
) -> dict:
    """FID and bits/dim of the EMA parameters of the run in ``workdir``.

    FID: ``eval_options.num_samples`` samples drawn as ``--mode=sample`` draws them (sample
    ``i`` from ``fold_in(key(seed), i)``, the solver of ``options``), batches sharded over
    every device, against ``eval_options.fid_stats``. Bits/dim: the first
    ``eval_options.bpd_examples`` test images, each averaged over ``bpd_draws`` uniform
    dequantisations (Hutchinson divergence, dopri5 at ``options.rtol``/``atol``). Writes
    ``workdir/eval/<name>.json`` (``name`` from the step, the solver and the counts) with the
    numbers, the NFE of each and the settings, and returns that dict.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fmjax import data, likelihood
    from fmjax.metrics import fid

    if options.guidance_scale != 1.0 or options.labels is not None:
        raise ValueError("--mode=eval scores the model as trained; drop --labels/--guidance_scale.")
    run = checkpoint.load_run(workdir)
    config, mesh = run.config, train.make_mesh()
    params = jax.device_put(run.ema_params, NamedSharding(mesh, P()))
    labels = _class_labels(options, config.model.num_classes, options.batch_size)
    bind = _velocity_binder(run.model, config, options.guidance_scale)
    report: dict = {"step": run.step, "method": options.method, "seed": options.seed}

    if eval_options.num_samples:
        if options.batch_size % mesh.size:
            raise ValueError(
                f"--sample_batch_size={options.batch_size} must be divisible by the "
                f"{mesh.size} devices for --mode=eval."
            )
        inception = fid.load_inception(eval_options.inception, mesh=mesh)
        reference = fid.load_statistics(eval_options.fid_stats)
        key = jax.random.key(options.seed)
        batch_sharding = NamedSharding(mesh, P("data"))
        image_shape = tuple(config.data.image_shape)
        nfe = []

        def sample_fn(index, batch_size):
            x0 = initial_noise(key, index * batch_size, (index + 1) * batch_size, image_shape)
            batch_labels = None if labels is None else jax.device_put(labels, batch_sharding)
            result = sampling.sample(
                bind(params, batch_labels),
                jax.device_put(x0, batch_sharding),
                solver=options.solver,
                **_solve_options(options),
            )
            nfe.append(int(result.nfe))
            return result.x

        scored = fid.fid_of_samples(
            sample_fn, eval_options.num_samples, reference, inception, batch_size=options.batch_size
        )
        report.update(
            fid=scored.fid, fid_samples=eval_options.num_samples, fid_nfe=float(np.mean(nfe))
        )
        log.info(
            "FID %.3f of %d samples, %.1f NFE per solve",
            scored.fid,
            eval_options.num_samples,
            np.mean(nfe),
        )

    if eval_options.bpd_examples:
        test = data.build_source(config.data, seed=config.seed, split="test")
        count = min(eval_options.bpd_examples, test.num_examples)
        pixels = fid.to_uint8(test.read(np.arange(count))[0])
        velocity = bind(run.ema_params, None)
        bpd = likelihood.dequantized_bits_per_dim(
            velocity,
            jax.random.key(options.seed),
            pixels,
            num_draws=eval_options.bpd_draws,
            divergence="hutchinson",
            solver="dopri5",
            rtol=options.rtol,
            atol=options.atol,
        )
        report.update(
            bits_per_dim=float(np.mean(bpd.bpd)),
            bpd_examples=count,
            bpd_draws=eval_options.bpd_draws,
            bpd_nfe_per_draw=float(bpd.nfe) / eval_options.bpd_draws,
        )
        log.info("bits/dim %.4f on %d test images", report["bits_per_dim"], count)

    name = f"step{run.step:08d}_{options.method}_fid{eval_options.num_samples}_bpd{eval_options.bpd_examples}"
    path = pathlib.Path(workdir) / "eval" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}: {json.dumps(report)}")
    return report


def _solve_options(options: SamplingOptions) -> dict:
    """The time grid of a fixed-step solver or the tolerances of an adaptive one."""
    if options.solver in sampling.FIXED_STEP_SOLVERS:
        grid = {"edm": sampling.edm_time_grid, "uniform": sampling.uniform_time_grid}
        return {"time_grid": grid[options.time_grid](options.steps)}
    return {"rtol": options.rtol, "atol": options.atol}


_FID_STREAM = 11  # the key stream of the in-training FID samples, apart from the engine's


def fid_hook(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> train.EvalHook:
    """In-training FID: every ``train.eval_every`` steps, ``train.eval_samples`` EMA samples.

    Samples are drawn with the training grid's solver (``train.sample_solver``,
    ``train.sample_steps``), from the same noise each time (sample ``i`` from
    ``fold_in(key, i)``, so scores of different steps compare), in batches of
    ``fid.batch_size`` sharded over ``mesh``, and scored against ``fid.stats`` with the
    Inception weights ``fid.inception`` (None: the cache). A conditional model gets labels
    cycling through the classes (guidance weight 1). The best-scoring state is kept in
    ``workdir/checkpoints_best``. The weights and statistics are loaded here, so a bad path
    fails before anything is compiled. ``config.data.image_shape`` must be set.

    Raises:
        ValueError: when ``fid.stats`` is unset or ``fid.batch_size`` is not a multiple of
            the device count.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fmjax.metrics import fid

    if config.fid.stats is None:
        raise ValueError(
            f"config.train.eval_every={config.train.eval_every} turns on the in-training FID, "
            "which needs reference statistics: set --config.fid.stats=PATH (made by "
            "`python -m fmjax.metrics.fid stats`), or --config.train.eval_every=0."
        )
    batch_size = config.fid.batch_size
    if not (isinstance(batch_size, int) and batch_size > 0 and batch_size % mesh.size == 0):
        raise ValueError(
            f"config.fid.batch_size={batch_size!r} must be a positive multiple of the "
            f"{mesh.size} devices."
        )
    inception = fid.load_inception(config.fid.inception, mesh=mesh)
    reference = fid.load_statistics(config.fid.stats)
    velocity = train.make_velocity(train.build_model(config.model), config)
    key = jax.random.fold_in(jax.random.key(config.seed), _FID_STREAM)
    sharding = NamedSharding(mesh, P("data"))
    image_shape = tuple(config.data.image_shape)
    labels = None
    if config.model.num_classes is not None:
        classes = np.arange(batch_size, dtype=np.int32) % config.model.num_classes
        labels = jax.device_put(classes, sharding)

    def score(step: int, state: train.TrainState) -> dict[str, float]:
        field = jax.tree_util.Partial(velocity, state.ema_params, labels)

        def sample_fn(index: int, size: int) -> jax.Array:
            x0 = initial_noise(key, index * size, (index + 1) * size, image_shape)
            solve = sampling.sample(
                field,
                jax.device_put(x0, sharding),
                solver=config.train.sample_solver,
                steps=config.train.sample_steps,
            )
            return solve.x

        result = fid.fid_of_samples(
            sample_fn,
            config.train.eval_samples,
            reference,
            inception,
            batch_size=batch_size,
            progress=False,
        )
        return {"fid": result.fid}

    return train.EvalHook(every=config.train.eval_every, fn=score, keep_best="fid")


def train_mode(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    options: SamplingOptions,
    eval_options: EvalOptions,
) -> train.TrainState:
    """``--mode=train``: trains or resumes the run (the other options are unused), with the
    in-training FID of :func:`fid_hook` when ``train.eval_every`` > 0."""
    from fmjax import data

    del options, eval_options
    hooks, source, mesh = [], None, train.make_mesh()
    if config.train.eval_every:
        source = data.build_source(config.data, seed=config.seed)
        config.data.image_shape = source.image_shape  # the hook samples images of this shape
        hooks.append(fid_hook(config, mesh))
    state = train.train_and_evaluate(config, workdir, source=source, hooks=hooks, mesh=mesh)
    if jax.process_index() == 0:
        print(f"Done at step {int(state.step)}; grids in {pathlib.Path(workdir) / 'samples'}")
    return state


def _sample_mode(config, workdir, options: SamplingOptions, eval_options) -> SampleOutput:
    del config, eval_options  # the run's saved config is the one that matches its checkpoint
    return sample(workdir, options)


def _eval_mode(config, workdir, options: SamplingOptions, eval_options: EvalOptions) -> dict:
    del config
    return evaluate(workdir, options, eval_options)


MODES: dict[str, Callable] = {"train": train_mode, "sample": _sample_mode, "eval": _eval_mode}
"""``--mode`` -> ``fn(config, workdir, options, eval_options)``."""


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    mode: str = "train",
    options: SamplingOptions = SamplingOptions(),
    eval_options: EvalOptions | None = None,
):
    """What ``main`` does after parsing flags: ``MODES[mode](config, workdir, options, ...)``.

    Example (tests call it in-process, e.g. under ``tfds.testing.mock_data``)::

        run(get_config("smoke"), "/tmp/cifar10_smoke")  # trains 4 steps
        run(None, "/tmp/cifar10_smoke", "sample", SamplingOptions(num_samples=16, steps=2))
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not valid; expected one of {sorted(MODES)}.")
    return MODES[mode](config, workdir, options, eval_options)


def _options_from_flags() -> SamplingOptions:
    try:
        labels = None if FLAGS.labels is None else [int(label) for label in FLAGS.labels]
    except ValueError:
        raise ValueError(f"--labels={','.join(FLAGS.labels)} must be integers.") from None
    return SamplingOptions(
        num_samples=FLAGS.num_samples,
        solver=FLAGS.solver,
        steps=FLAGS.steps,
        time_grid=FLAGS.time_grid,
        rtol=FLAGS.rtol,
        atol=FLAGS.atol,
        labels=labels,
        guidance_scale=FLAGS.guidance_scale,
        seed=FLAGS.sample_seed,
        batch_size=FLAGS.sample_batch_size,
    )


def main(argv):
    """Parses nothing itself: absl has parsed the flags; runs :func:`run`."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        # Every process must join before JAX picks its backend, i.e. before any device use.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    common.setup()
    eval_options = None
    if FLAGS.mode == "eval":
        eval_options = EvalOptions(
            num_samples=FLAGS.eval_samples,
            fid_stats=FLAGS.fid_stats,
            inception=FLAGS.inception,
            bpd_examples=FLAGS.bpd_examples,
            bpd_draws=FLAGS.bpd_draws,
        )
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, _options_from_flags(), eval_options)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(common.user_errors_exit(main))
