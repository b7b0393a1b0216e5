"""Evaluating a run: FID and bits/dim of its EMA parameters, after training and during it.

:func:`evaluate` scores a saved run (``experiments.cifar10 --mode=eval``): FID of samples
drawn as :func:`fmjax.generate.sample_run` draws them, sharded over every device, and the
bits/dim of test images. :func:`fid_hook` makes the in-training FID an
:class:`fmjax.train.EvalHook`.
"""

import dataclasses
import json
import logging
import os
import pathlib

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fmjax import data, images, likelihood, sampling
from fmjax.configs import build_path
from fmjax.generate import (
    SamplingOptions,
    check_sampler,
    class_labels,
    initial_noise,
    make_velocity,
    solve,
    velocity_binder,
)
from fmjax.keys import Stream, stream_key
from fmjax.mesh import make_mesh
from fmjax.metrics import fid
from fmjax.rundir import RunArtifacts, load_run
from fmjax.step import TrainState
from fmjax.train import EvalHook

__all__ = ["EvalOptions", "evaluate", "fid_hook"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What ``--mode=eval`` measures (its sampler is that of :class:`SamplingOptions`).

    Attributes:
        num_samples: samples scored by FID against ``fid_stats`` (0: no FID).
        fid_stats: reference statistics, from ``python -m experiments.fid stats``.
        inception: converted Inception weights (None: the cache path of
            :mod:`fmjax.metrics.inception`).
        fid_protocol: how images reach the Inception network, one of
            :data:`fmjax.metrics.fid.FID_PROTOCOLS` (None: the one ``fid_stats`` records,
            else :data:`~fmjax.metrics.fid.DEFAULT_PROTOCOL`).
        fid_quantize: how samples become grey levels, ``"round"`` (torchcfm, a saved PNG) or
            ``"floor"`` (Meta's example): :func:`fmjax.metrics.fid.to_uint8`.
        bpd_examples: test-split images whose bits/dim is measured (0: none), by
            Hutchinson's estimator with dopri5 at the sampler's ``rtol``/``atol``.
        bpd_draws: uniform dequantisation draws per image (the Flow Matching paper: 50).
    """

    num_samples: int = 50_000
    fid_stats: str | None = None
    inception: str | None = None
    fid_protocol: str | None = None
    fid_quantize: str = "round"
    bpd_examples: int = 10_000
    bpd_draws: int = 1

    def __post_init__(self):
        for name in ("num_samples", "bpd_examples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(
                    f"--{name.replace('num_samples', 'eval_samples')}={value!r} must be >= 0."
                )
        if self.fid_protocol is not None and self.fid_protocol not in fid.FID_PROTOCOLS:
            raise ValueError(
                f"--fid_protocol={self.fid_protocol!r} is not valid; expected one of "
                f"{list(fid.FID_PROTOCOLS)}."
            )
        if self.fid_quantize not in fid.QUANTIZATIONS:
            raise ValueError(
                f"--fid_quantize={self.fid_quantize!r} is not valid; expected one of "
                f"{list(fid.QUANTIZATIONS)}."
            )
        if not (isinstance(self.bpd_draws, int) and self.bpd_draws > 0):
            raise ValueError(f"--bpd_draws={self.bpd_draws!r} must be a positive integer.")
        if self.num_samples and self.fid_stats is None:
            raise ValueError(
                "--mode=eval with --eval_samples > 0 needs --fid_stats: reference statistics from "
                "`python -m experiments.fid stats --dataset=cifar10 --split=train --out=...`."
            )


def evaluate(
    workdir: str | os.PathLike,
    options: SamplingOptions = SamplingOptions(),
    eval_options: EvalOptions = EvalOptions(fid_stats=None, num_samples=0),
    *,
    model: nn.Module | None = None,
    run: RunArtifacts | None = None,
) -> dict:
    """FID and bits/dim of the EMA parameters of the run in ``workdir``, or of the already
    loaded ``run`` (a network imported from PyTorch: see :func:`fmjax.generate.sample_run`),
    writing into ``workdir`` either way.

    FID: ``eval_options.num_samples`` samples drawn as ``--mode=sample`` draws them (sample
    ``i`` from ``fold_in(key(seed), i)``, the solver of ``options``), batches sharded over
    every device, against ``eval_options.fid_stats``. Bits/dim: the first
    ``eval_options.bpd_examples`` test images, each averaged over ``bpd_draws`` uniform
    dequantisations (Hutchinson divergence, dopri5 at ``options.rtol``/``atol``). Writes
    ``workdir/eval/<name>.json`` (``name`` from the step, the solver and the counts) with the
    numbers, the NFE of each and the settings, and returns that dict. ``model``: as for
    :func:`fmjax.rundir.load_run`.
    """
    if options.guidance_scale != 1.0 or options.labels is not None:
        raise ValueError("--mode=eval scores the model as trained; drop --labels/--guidance_scale.")
    if run is None:
        run = load_run(workdir, model=model)
    config, mesh = run.config, make_mesh()
    check_sampler(options, config)
    params = jax.device_put(run.ema_params, NamedSharding(mesh, P()))
    labels = class_labels(options, config.model.num_classes, options.batch_size)
    bind = velocity_binder(run.model, config, options.guidance_scale)
    report: dict = {"step": run.step, "method": options.method, "seed": options.seed}

    if eval_options.num_samples:
        if options.batch_size % mesh.size:
            raise ValueError(
                f"--sample_batch_size={options.batch_size} must be divisible by the "
                f"{mesh.size} devices for --mode=eval."
            )
        reference, inception = fid.load_reference(
            eval_options.fid_stats,
            eval_options.inception,
            protocol=eval_options.fid_protocol,
            mesh=mesh,
        )
        key = jax.random.key(options.seed)
        batch_sharding = NamedSharding(mesh, P("data"))
        image_shape = tuple(config.data.image_shape)
        path = build_path(config.path)[0]
        nfe = []

        def sample_fn(index, batch_size):
            start = index * batch_size
            x0 = jax.device_put(
                initial_noise(key, start, start + batch_size, image_shape), batch_sharding
            )
            batch_labels = None if labels is None else jax.device_put(labels, batch_sharding)
            result = solve(bind(params, batch_labels), x0, options, path=path, start=start)
            nfe.append(int(result.nfe))
            return result.x

        scored = fid.fid_of_samples(
            sample_fn,
            eval_options.num_samples,
            reference,
            inception,
            batch_size=options.batch_size,
            quantize=eval_options.fid_quantize,
        )
        report.update(
            fid=scored.fid,
            fid_samples=eval_options.num_samples,
            fid_nfe=float(np.mean(nfe)),
            fid_protocol=inception.protocol,
            fid_quantize=eval_options.fid_quantize,
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
        pixels = images.to_uint8(test.read(np.arange(count))[0])
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


def fid_hook(
    config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh
) -> EvalHook:
    """In-training FID: every ``train.eval_every`` steps, ``train.eval_samples`` EMA samples.

    Pass it to :func:`fmjax.train.train_and_evaluate` as a hook factory (``hooks=[fid_hook]``):
    it is called with the completed config (``config.data.image_shape`` set from the
    source), the model and the mesh.

    Samples are drawn with the training grid's solver (``train.sample_solver``,
    ``train.sample_steps``), from the same noise each time (sample ``i`` from
    ``fold_in(key, i)``, so scores of different steps compare), in batches of
    ``fid.batch_size`` sharded over ``mesh``, and scored against ``fid.stats`` with the
    Inception weights ``fid.inception`` (None: the cache) and the protocol ``fid.protocol``
    (None: the one the statistics record, else the default). A conditional model gets labels
    cycling through the classes (guidance weight 1). The best-scoring state is kept in
    ``workdir/checkpoints_best``; ``best.json`` records ``num_samples`` (FID is biased upwards
    by few samples, so it reads higher than a final FID of 50,000). The weights and statistics are loaded here, so a bad path
    fails before anything is compiled.

    Raises:
        ValueError: when ``fid.stats`` is unset or ``fid.batch_size`` is not a multiple of
            the device count.
    """
    if config.fid.stats is None:
        raise ValueError(
            f"config.train.eval_every={config.train.eval_every} turns on the in-training FID, "
            "which needs reference statistics: set --config.fid.stats=PATH (made by "
            "`python -m experiments.fid stats`), or --config.train.eval_every=0."
        )
    batch_size = config.fid.batch_size
    if not (isinstance(batch_size, int) and batch_size > 0 and batch_size % mesh.size == 0):
        raise ValueError(
            f"config.fid.batch_size={batch_size!r} must be a positive multiple of the "
            f"{mesh.size} devices."
        )
    reference, inception = fid.load_reference(
        config.fid.stats, config.fid.inception, protocol=config.fid.get("protocol"), mesh=mesh
    )
    velocity = make_velocity(model, config)
    key = stream_key(config.seed, Stream.FID)
    sharding = NamedSharding(mesh, P("data"))
    image_shape = tuple(config.data.image_shape)
    labels = None
    if config.model.num_classes is not None:
        classes = np.arange(batch_size, dtype=np.int32) % config.model.num_classes
        labels = jax.device_put(classes, sharding)

    def score(step: int, state: TrainState) -> dict[str, float]:
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

    return EvalHook(
        every=config.train.eval_every,
        fn=score,
        keep_best="fid",
        details={"num_samples": config.train.eval_samples},
    )
