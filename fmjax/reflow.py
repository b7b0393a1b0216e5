r"""Pairs of a trained run's ODE, for reflow and one-step distillation (Liu et al., 2022).

A trained flow maps noise to data through its ODE, :math:`x_1 = \mathrm{ODE}(x_0)`.
:func:`generate_pairs` solves it for ``N`` noises with a precise solver and stores the pairs
``(x0, x1)``; training on them (``config.data.name = "pairs"``,
:class:`fmjax.data.PairSource`) regresses :func:`fmjax.loss.cfm_loss_on_pairs` on the fixed
pairs instead of fresh independent noise:

- **reflow**: uniform times; the new flow's paths are straighter, so few Euler steps go far;
- **distillation**: the time fixed at 0 (``path.time_sampler = "constant"``), which trains
  :math:`v(x_0, 0) \approx x_1 - x_0`: one Euler step :math:`x_0 + v(x_0, 0)` is the one-step
  generator.

The pairs directory holds ``pairs.json`` (the generating run's config, its checkpoint step,
the solver's settings, the count, the seed, the chunk size) and chunks ``pairs_{i:06d}.npz``
of ``chunk_size`` pairs (``x0``, ``x1``, the class ``labels`` of a conditional run, the
solve's ``nfe`` and ``success``), each written through a temporary name, so that a stopped
generation resumes where it was: complete chunks are kept and the rest are generated.
"""

import dataclasses
import json
import logging
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fmjax.data import PAIRS_FILE, _claim_info, pair_chunk_name
from fmjax.generate import (
    SDE_SAMPLER,
    SamplingOptions,
    check_sampler,
    class_labels,
    initial_noise,
    solve,
    velocity_binder,
    write_npz,
)
from fmjax.mesh import make_mesh
from fmjax.rundir import load_config, load_run

__all__ = ["PairsInfo", "generate_pairs"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairsInfo:
    """What :func:`generate_pairs` made.

    Attributes:
        directory: the pairs' directory.
        num_pairs: the number of pairs.
        num_chunks: the number of chunk files.
        generated: the chunks this call generated (the others were there already).
        step: the checkpoint step of the generating run.
    """

    directory: pathlib.Path
    num_pairs: int
    num_chunks: int
    generated: int
    step: int


def _solver_record(options: SamplingOptions) -> dict:
    return {
        "solver": options.solver,
        "steps": options.steps,
        "time_grid": options.time_grid,
        "rtol": options.rtol,
        "atol": options.atol,
        "guidance_scale": options.guidance_scale,
        "labels": None if options.labels is None else list(options.labels),
    }


def generate_pairs(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_pairs: int,
    *,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 50,
    time_grid: str = "uniform",
    seed: int = 0,
    chunk_size: int = 1000,
    guidance_scale: float = 1.0,
    model: nn.Module | None = None,
) -> PairsInfo:
    r"""Solves the ODE of the run in ``workdir`` (EMA parameters of its newest checkpoint) from
    ``num_pairs`` noises and stores the pairs ``(x0, x1)`` in ``out_dir``.

    Pair ``i``'s noise is drawn from ``fold_in(key(seed), i)``
    (:func:`fmjax.generate.initial_noise`), so the noises do not depend on the chunks. Each
    chunk of ``chunk_size`` pairs is one solve of
    :func:`fmjax.sampling.sample`, sharded over every local device (a last, shorter chunk is
    padded to a multiple of the device count with the following noises, which are then
    dropped); an adaptive solver's steps are shared by a chunk, so ``x1`` is the ODE's
    solution to the solver's tolerance, the same for the same ``chunk_size``. A conditional
    run's labels cycle through its classes (or ``labels`` of
    :class:`fmjax.generate.SamplingOptions`), as :func:`fmjax.generate.sample_run` does.

    Running it again with the same arguments resumes: the chunks already written are kept
    and the missing ones generated, so an interrupted generation ends with the files of an
    uninterrupted one. Other arguments for an existing directory are refused.

    Args:
        workdir: the trained run (the teacher).
        out_dir: where the pairs go (created if missing).
        num_pairs: how many pairs.
        solver: one of :data:`fmjax.generate.SAMPLERS` but ``"sde"`` (default ``dopri5``,
            adaptive): the pairs are the flow's deterministic coupling.
        rtol: an adaptive solver's relative tolerance.
        atol: an adaptive solver's absolute tolerance.
        steps: a fixed-step solver's steps.
        time_grid: a fixed-step solver's grid, ``"uniform"`` or ``"edm"``.
        seed: the seed of the noises.
        chunk_size: pairs per chunk file and per solve; a multiple of the device count.
        guidance_scale: classifier-free guidance weight of a conditional run (1: none).
        model: the teacher's module, when no preset names it (as for
            :func:`fmjax.rundir.load_run`).

    Returns:
        A :class:`PairsInfo`.

    Raises:
        ValueError: for the ``"sde"`` solver, a count or chunk size that is not a positive
            integer, a chunk size
            that the devices do not divide, solver settings that
            :class:`fmjax.generate.SamplingOptions` refuses, a ``workdir`` without a
            checkpoint, an ``out_dir`` holding pairs made with other arguments, or a
            multi-process launch.

    Example::

        info = generate_pairs("runs/digits", "runs/digits_pairs", 20_000)
        config.data.name, config.data.pairs_dir = "pairs", str(info.directory)
    """
    if jax.process_count() > 1:
        raise ValueError("Pairs are generated on one process; launch it without --distributed.")
    for name, value in (("num_pairs", num_pairs), ("chunk_size", chunk_size)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if solver == SDE_SAMPLER:
        raise ValueError(
            "Reflow pairs are the flow's deterministic coupling (noise to its ODE solution); "
            f"solver={SDE_SAMPLER!r} draws a random one. Pick an ODE solver."
        )
    options = SamplingOptions(
        num_samples=num_pairs,
        solver=solver,
        steps=steps,
        time_grid=time_grid,
        rtol=rtol,
        atol=atol,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=chunk_size,
    )
    mesh = make_mesh()
    if chunk_size % mesh.size:
        raise ValueError(
            f"chunk_size={chunk_size} must be a multiple of the {mesh.size} devices the "
            "solves are sharded over."
        )
    config = load_config(workdir)
    check_sampler(options, config)
    num_classes = config.model.num_classes
    padded = num_pairs + mesh.size  # the labels of the padding too
    labels = class_labels(options, num_classes, padded)
    out = pathlib.Path(out_dir)
    run = load_run(workdir, model=model)
    record = {
        "source": str(pathlib.Path(workdir).absolute()),
        "step": run.step,
        "config": json.loads(config.to_json()),
        **_solver_record(options),
        "num_pairs": num_pairs,
        "seed": seed,
        "chunk_size": chunk_size,
        "image_shape": list(config.data.image_shape),
        "num_classes": num_classes,
    }
    _claim_info(
        out / PAIRS_FILE,
        record,
        what="pairs",
        advice="resume with the same arguments or choose another --out",
        ignore=("config",),
    )

    image_shape = tuple(config.data.image_shape)
    sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(run.ema_params, NamedSharding(mesh, P()))
    bind = velocity_binder(run.model, config, guidance_scale)
    key = jax.random.key(seed)
    chunks = range(0, num_pairs, chunk_size)
    generated, began = 0, time.perf_counter()
    for index, start in enumerate(chunks):
        path = out / pair_chunk_name(index)
        if path.is_file():
            continue
        stop = min(start + chunk_size, num_pairs)
        # Padded to a multiple of the devices; the padding's noises are those of the pairs
        # after the last, and are dropped.
        solve_stop = start + -(-(stop - start) // mesh.size) * mesh.size
        x0 = initial_noise(key, start, solve_stop, image_shape)
        chunk_labels = None if labels is None else jnp.asarray(labels[start:solve_stop])
        if chunk_labels is not None:
            chunk_labels = jax.device_put(chunk_labels, sharding)
        result = solve(bind(params, chunk_labels), jax.device_put(x0, sharding), options)
        arrays = {
            "x0": np.asarray(x0)[: stop - start],
            "x1": np.asarray(result.x)[: stop - start],
            "nfe": np.asarray(int(result.nfe), np.int32),
            "success": np.asarray(bool(result.success)),
        }
        if labels is not None:
            arrays["labels"] = labels[start:stop]
        if not arrays["success"]:
            log.warning("The solve of chunk %d did not succeed (max_steps reached).", index)
        write_npz(path, arrays)  # a chunk file that exists is complete
        generated += 1
        log.info(
            "Pairs %d-%d of %d: %d NFE (%.1f s)",
            start + 1, stop, num_pairs, int(result.nfe), time.perf_counter() - began,
        )  # fmt: skip
    return PairsInfo(
        directory=out,
        num_pairs=num_pairs,
        num_chunks=len(chunks),
        generated=generated,
        step=run.step,
    )
