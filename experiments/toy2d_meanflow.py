"""Mean flow against flow matching on a 2-D toy: samples in 1, 2 and adaptive-ODE steps.

    python -m experiments.toy2d_meanflow [--workdir=runs/toy2d_meanflow]
        [--dataset=8gaussians|moons|checkerboard] [--steps=...] [--quick]

Trains the MLP of :mod:`experiments.toy2d` twice on the same data, noise and initial draws:
once as a velocity field with :func:`fmjax.cfm_loss`, once as an average velocity
``u(x, t, t_end)`` with :func:`fmjax.meanflow.meanflow_loss` (MeanFlow: the network also sees
``t_end - t``). Each model then samples the same noise in one and two steps (Euler steps of the
velocity field; jumps of the average velocity, :func:`fmjax.meanflow.sample`) and with an
adaptive ODE solve (dopri5 on ``u(x, t, t)``, the instantaneous velocity), and its exact
log-likelihood of held-out data is computed from that instantaneous field. Writes to the
workdir:

- ``toy2d_meanflow.png``: a row per objective, a column per number of steps;
- ``metrics.json``: per objective and number of steps the 2-Wasserstein distance of the
  samples to fresh data (and the distance between two draws of the data, its floor), the
  held-out NLL of the instantaneous field, the final loss and the training time.
"""

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jaxtyping import Array, Float, PRNGKeyArray
from matplotlib.figure import Figure

from experiments import common
from experiments.toy2d import QUICK, Settings, empirical_w2, init_mlp, plot_extent, velocity_mlp
from fmjax import cfm_loss, log_likelihood, meanflow, sample
from fmjax.keys import Stream, stream_key
from fmjax.rundir import prepare_workdir
from fmjax.toy2d import TOY_2D, Toy2D

FLAGS = flags.FLAGS

OBJECTIVES = ("flow_matching", "mean_flow")
"""The two objectives compared, in the order of the figure's rows."""

STEPS = (1, 2)
"""The few-step samplers compared, beside the adaptive ODE solve."""

INTERVALS = meanflow.uniform_intervals(equal_fraction=0.5)
"""The mean flow's intervals: uniform, half of them instantaneous (on this toy it beats the
papers' logit-normal laws; docs/one-step.md has the comparison)."""

ADAPTIVE_POWER = 0.5
"""The mean flow's adaptive weight ``1 / (|delta|^2 + c)^p`` (0.5 beats the papers' 0.75 and 1
on this toy)."""

_FREQUENCIES = (1.0, 2.0, 4.0, 8.0)


def define_flags() -> None:
    """The command-line flags, defined only when run as a program."""
    flags.DEFINE_string("workdir", "runs/toy2d_meanflow", "Output: the figure, metrics.json.")
    flags.DEFINE_enum("dataset", "8gaussians", sorted(TOY_2D), "The 2-D distribution.")
    flags.DEFINE_integer("steps", None, "Training steps per objective (default 2000, --quick 300).")
    flags.DEFINE_bool("quick", False, "A shortened run (fewer steps, smaller evaluation), for CI.")
    flags.DEFINE_integer("seed", 0, "Seed of every random draw.")


def _features(s: Float[Array, " batch"]) -> Float[Array, "batch 8"]:
    angles = s[:, None] * (jnp.pi * jnp.asarray(_FREQUENCIES))[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def init_mean_mlp(key: PRNGKeyArray, width: int = 256, depth: int = 3) -> list[tuple[Array, Array]]:
    """The MLP of :func:`experiments.toy2d.init_mlp` with the interval length's features as a
    second input: ``[x, features(t), features(t_end - t)] -> u``."""
    params = init_mlp(key, width, depth)
    w, b = params[0]
    extra = jax.random.normal(jax.random.fold_in(key, 1), (2 * len(_FREQUENCIES), w.shape[1]))
    return [(jnp.concatenate([w, extra / math.sqrt(w.shape[0])]), b), *params[1:]]


def average_velocity_mlp(
    params: list[tuple[Array, Array]],
    x_t: Float[Array, "batch 2"],
    t: Float[Array, " batch"],
    t_end: Float[Array, " batch"],
) -> Float[Array, "batch 2"]:
    """The average velocity over ``[t, t_end]`` at points ``x_t`` (``t``, ``t_end``:
    ``[batch]``)."""
    h = jnp.concatenate([x_t, _features(t), _features(t_end - t)], axis=1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b[None])
    w, b = params[-1]
    return h @ w + b[None]


def _instantaneous(params, x, t):
    t = jnp.broadcast_to(t, x.shape[:1])
    return average_velocity_mlp(params, x, t, t)


def _velocity(params, x, t):
    return velocity_mlp(params, x, jnp.broadcast_to(t, x.shape[:1]))


def train(
    objective: str,
    toy: Toy2D,
    key: PRNGKeyArray,
    settings: Settings,
    intervals: meanflow.IntervalSampler = INTERVALS,
    adaptive_power: float = ADAPTIVE_POWER,
) -> tuple[list[tuple[Array, Array]], np.ndarray]:
    """Trains one objective with Adam on a cosine schedule; returns parameters and losses."""
    init_key, data_key = jax.random.split(key)
    if objective == "flow_matching":
        params = init_mlp(init_key)

        def loss_fn(params, key, x1):
            return cfm_loss(velocity_mlp, params, key, x1)[0]
    else:
        params = init_mean_mlp(init_key)

        def loss_fn(params, key, x1):
            return meanflow.meanflow_loss(
                average_velocity_mlp, params, key, x1, interval_sampler=intervals,
                adaptive_power=adaptive_power,
            )[0]  # fmt: skip

    optimizer = optax.adam(optax.cosine_decay_schedule(2e-3, settings.steps, alpha=0.05))

    def one_step(carry, step):
        params, opt_state = carry
        batch_key, loss_key = jax.random.split(jax.random.fold_in(data_key, step))
        x1 = toy.sample(batch_key, settings.batch_size)
        loss, grads = jax.value_and_grad(loss_fn)(params, loss_key, x1)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def chunk(params, opt_state, first_step):
        steps = first_step + jnp.arange(settings.log_every)
        (params, opt_state), losses = jax.lax.scan(one_step, (params, opt_state), steps)
        return params, opt_state, losses

    opt_state = optimizer.init(params)
    losses = []
    for first_step in range(0, settings.steps, settings.log_every):
        params, opt_state, chunk_losses = chunk(params, opt_state, first_step)
        losses.append(np.asarray(chunk_losses))
    return params, np.concatenate(losses)[: settings.steps]


def samplers(
    objective: str, params
) -> tuple[dict[str, Callable[[Array], tuple[np.ndarray, int]]], Callable]:
    """``(name -> (x0 -> (samples, nfe)), field)``: 1 and 2 steps and the adaptive ODE solve,
    and the instantaneous velocity field whose likelihood is the model's."""
    if objective == "flow_matching":
        field = jax.tree_util.Partial(_velocity, params)
        few = {
            f"{n} step{'s' * (n > 1)}": (lambda x0, n=n: sample(field, x0, solver="euler", steps=n))
            for n in STEPS
        }
    else:
        field = jax.tree_util.Partial(_instantaneous, params)
        jump = jax.tree_util.Partial(average_velocity_mlp, params)
        few = {
            f"{n} step{'s' * (n > 1)}": (lambda x0, n=n: meanflow.sample(jump, x0, steps=n))
            for n in STEPS
        }
    few["ODE"] = lambda x0: sample(field, x0, solver="dopri5", rtol=1e-5, atol=1e-5)
    return {name: (lambda x0, f=f: _unpack(f(x0))) for name, f in few.items()}, field


def _unpack(result) -> tuple[np.ndarray, int]:
    return np.asarray(result.x), int(result.nfe)


def run(
    workdir: str,
    dataset: str,
    settings: Settings,
    seed: int = 0,
    *,
    intervals: meanflow.IntervalSampler = INTERVALS,
    adaptive_power: float = ADAPTIVE_POWER,
) -> dict[str, Any]:
    """Trains both objectives, writes the figure and ``metrics.json``; returns the metrics.

    ``intervals`` and ``adaptive_power`` set the mean flow's loss (the defaults are this toy's
    best of those compared in docs/one-step.md)."""
    if settings.steps < 1 or settings.steps % settings.log_every:
        raise ValueError(
            f"steps must be a positive multiple of log_every={settings.log_every}; "
            f"got steps={settings.steps}."
        )
    prepare_workdir(workdir)
    toy = TOY_2D[dataset]
    train_key, noise_key, heldout_key = jax.random.split(jax.random.key(seed), 3)
    heldout = toy.sample(heldout_key, settings.num_samples)
    x0 = jax.random.normal(noise_key, (settings.num_samples, 2))
    fresh_key, floor_key = jax.random.split(stream_key(seed, Stream.TOY2D_REFERENCE))
    w2_points = min(512, settings.num_samples)
    fresh = toy.sample(fresh_key, w2_points)
    metrics: dict[str, Any] = {
        "dataset": dataset,
        "settings": settings._asdict(),
        "w2_floor": empirical_w2(toy.sample(floor_key, w2_points), fresh),
        "true_heldout_nll": None
        if toy.log_prob is None
        else float(-jnp.mean(toy.log_prob(heldout))),
        "objectives": {},
    }
    shown = {}
    for objective in OBJECTIVES:
        start = time.perf_counter()
        params, losses = train(objective, toy, train_key, settings, intervals, adaptive_power)
        trained = time.perf_counter()
        runs, field = samplers(objective, params)
        by_steps = {}
        for name, draw in runs.items():
            samples, nfe = draw(x0)
            shown[objective, name] = samples
            by_steps[name] = {"w2": empirical_w2(samples[:w2_points], fresh), "nfe": nfe}
        density = log_likelihood(field, heldout, rtol=1e-4, atol=1e-4)
        final_loss = float(np.mean(losses[-max(1, settings.steps // 10) :]))
        metrics["objectives"][objective] = {
            "samples": by_steps,
            "heldout_nll": float(-jnp.mean(density.log_prob)),
            "final_loss": final_loss,
            "train_seconds": trained - start,
        }
        print(
            f"{objective}: W2 "
            + ", ".join(f"{k} {v['w2']:.3f}" for k, v in by_steps.items())
            + f" (floor {metrics['w2_floor']:.3f}); held-out NLL "
            f"{metrics['objectives'][objective]['heldout_nll']:.3f}; train {trained - start:.1f} s",
            flush=True,
        )
    _plot(os.path.join(workdir, "toy2d_meanflow.png"), dataset, np.asarray(heldout), shown, metrics)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def _plot(path: str, dataset: str, data: np.ndarray, shown: dict, metrics: dict) -> None:
    names = [*(f"{n} step{'s' * (n > 1)}" for n in STEPS), "ODE"]
    fig = Figure(figsize=(4 * len(names), 4 * len(OBJECTIVES)))
    axes = fig.subplots(len(OBJECTIVES), len(names), squeeze=False)
    extent = plot_extent(data)
    for row, objective in zip(axes, OBJECTIVES, strict=True):
        for ax, name in zip(row, names, strict=True):
            samples = shown[objective, name]
            result = metrics["objectives"][objective]["samples"][name]
            ax.scatter(data[:, 0], data[:, 1], s=2, c="0.75")
            ax.scatter(samples[:, 0], samples[:, 1], s=2, c="C0")
            ax.set_title(f"{objective}, {name}: W2 {result['w2']:.3f} (NFE {result['nfe']})")
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_aspect("equal")
    fig.suptitle(f"{dataset}: flow matching vs mean flow, by number of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    common.setup()
    settings = QUICK if FLAGS.quick else Settings()
    if FLAGS.steps is not None:
        settings = settings._replace(steps=FLAGS.steps)
    run(FLAGS.workdir, FLAGS.dataset, settings, FLAGS.seed)
    print(f"Done: {os.path.join(FLAGS.workdir, 'toy2d_meanflow.png')}")


if __name__ == "__main__":
    common.run(main, define_flags)
