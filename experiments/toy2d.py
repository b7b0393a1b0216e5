"""Flow matching on a 2-D toy, independent vs exact-OT coupling, in about a minute on a CPU.

    python -m experiments.toy2d [--workdir=runs/toy2d] [--dataset=8gaussians|moons|checkerboard]
                                [--steps=...] [--quick]

Trains the same small MLP velocity field with each coupling (same data, noise, times and
initial parameters; only the pairing differs), then writes to the workdir:

- ``toy2d.png``: one row per coupling with samples over the data, a few trajectories from
  noise to data, and the learned density (exact log-likelihood on a grid);
- ``metrics.json``: per coupling the final training loss, the loss curve, the NFE an adaptive
  solver spends on the samples, how straight the trajectories are (path length over
  end-to-end distance, 1 is a straight line) and the held-out NLL of the learned density; at
  the top level the true held-out NLL where the toy has an exact density.
"""

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jaxtyping import Array, Float, PRNGKeyArray
from matplotlib.figure import Figure

from experiments import common
from fmjax import cfm_loss, exact_ot, log_likelihood, sample
from fmjax.couplings import COUPLINGS as ALL_COUPLINGS
from fmjax.couplings import Coupling
from fmjax.keys import Stream, stream_key
from fmjax.rundir import prepare_workdir
from fmjax.toy2d import TOY_2D, Toy2D

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags; defined only when run as a program, so that importing this
    module beside another entry point does not define ``--workdir`` twice."""
    flags.DEFINE_string("workdir", "runs/toy2d", "Output directory: toy2d.png, metrics.json.")
    flags.DEFINE_enum("dataset", "8gaussians", sorted(TOY_2D), "The 2-D distribution.")
    flags.DEFINE_integer("steps", None, "Training steps per coupling (default 2000, --quick 300).")
    flags.DEFINE_bool("quick", False, "A shortened run (fewer steps, smaller evaluation), for CI.")
    flags.DEFINE_integer("seed", 0, "Seed of every random draw.")


COUPLINGS: dict[str, Coupling] = {
    name: ALL_COUPLINGS[name]() for name in ("independent", "exact_ot")
}
"""The couplings compared (built from :data:`fmjax.couplings.COUPLINGS`), by the name used in
``metrics.json`` and the figure."""

_TITLES = {"independent": "independent (I-CFM)", "exact_ot": "exact OT (OT-CFM)"}


class Settings(NamedTuple):
    """How long to train and how much to evaluate.

    Attributes:
        steps: Adam steps per coupling.
        batch_size: data (and noise) samples per step; exact OT solves an assignment of this
            size every step, which dominates the cost on a CPU.
        log_every: steps per jitted chunk, and per point of the loss curve.
        num_samples: generated samples (and held-out data points for the NLL).
        num_trajectories: trajectories drawn in the figure.
        grid_size: the learned density is evaluated on ``grid_size**2`` points.
    """

    steps: int = 2000
    batch_size: int = 128
    log_every: int = 100
    num_samples: int = 1000
    num_trajectories: int = 24
    grid_size: int = 60


QUICK = Settings(steps=300, log_every=50, num_samples=500, grid_size=30)
"""The shortened setting of ``--quick``."""

# --- the velocity field: a plain-function MLP -----------------------------------------------

# Time enters through sin/cos features, the usual embedding of t in flow and diffusion models;
# t only spans [0, 1], so a few low frequencies are enough.
_FREQUENCIES = (1.0, 2.0, 4.0, 8.0)


def init_mlp(key: PRNGKeyArray, width: int = 256, depth: int = 3) -> list[tuple[Array, Array]]:
    """Parameters of an MLP ``[x, sin/cos features of t] -> velocity`` (a list of (w, b))."""
    sizes = (2 + 2 * len(_FREQUENCIES), *(width,) * depth, 2)
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / math.sqrt(m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def velocity_mlp(
    params: list[tuple[Array, Array]], x_t: Float[Array, "batch 2"], t: Float[Array, " batch"]
) -> Float[Array, "batch 2"]:
    """The MLP's velocity at points ``x_t`` and times ``t`` (the ``apply_fn`` of cfm_loss)."""
    angles = t[:, None] * (jnp.pi * jnp.asarray(_FREQUENCIES))[None, :]
    h = jnp.concatenate([x_t, jnp.sin(angles), jnp.cos(angles)], axis=1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b[None])
    w, b = params[-1]
    return h @ w + b[None]


def velocity_fn(params: list[tuple[Array, Array]]) -> Callable[[Array, Array], Array]:
    """``velocity(x, t)`` (``t``: ``[batch]``, as in training) for :func:`fmjax.sample` and
    log_likelihood.

    A ``jax.tree_util.Partial`` so that the parameters are traced: both couplings' models
    share one compiled sampler and one compiled likelihood solve.
    """
    return jax.tree_util.Partial(velocity_mlp, params)


# --- training -------------------------------------------------------------------------------


def make_train_chunk(
    toy: Toy2D, coupling: Coupling, optimizer: optax.GradientTransformation, settings: Settings
) -> Callable[[Any, Any, PRNGKeyArray, Array], tuple[Any, Any, Array]]:
    """A jitted ``(params, opt_state, key, first_step) -> (params, opt_state, losses)`` that
    runs ``settings.log_every`` steps in one ``lax.scan``; step ``s`` draws from
    ``fold_in(key, s)``, so both couplings see the same data, noise and times.
    """

    def one_step(carry, step):
        params, opt_state, key = carry
        data_key, loss_key = jax.random.split(jax.random.fold_in(key, step))
        x1 = toy.sample(data_key, settings.batch_size)
        loss_and_grad = jax.value_and_grad(cfm_loss, argnums=1, has_aux=True)
        (loss, _), grads = loss_and_grad(velocity_mlp, params, loss_key, x1, coupling=coupling)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    @jax.jit
    def chunk(params, opt_state, key, first_step):
        steps = first_step + jnp.arange(settings.log_every)
        (params, opt_state, _), losses = jax.lax.scan(one_step, (params, opt_state, key), steps)
        return params, opt_state, losses

    return chunk


def train(
    toy: Toy2D, coupling: Coupling, key: PRNGKeyArray, settings: Settings
) -> tuple[list[tuple[Array, Array]], np.ndarray]:
    """Trains the MLP with one coupling; returns its parameters and the per-step losses."""
    init_key, data_key = jax.random.split(key)
    params = init_mlp(init_key)
    schedule = optax.cosine_decay_schedule(2e-3, settings.steps, alpha=0.05)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    chunk = make_train_chunk(toy, coupling, optimizer, settings)
    losses = []
    for first_step in range(0, settings.steps, settings.log_every):
        params, opt_state, chunk_losses = chunk(params, opt_state, data_key, first_step)
        losses.append(np.asarray(chunk_losses))
    return params, np.concatenate(losses)[: settings.steps]


# --- evaluation -----------------------------------------------------------------------------


class Evaluation(NamedTuple):
    """What the figure and ``metrics.json`` show of one trained model.

    Attributes:
        samples: ``[num_samples, 2]`` generated points.
        trajectories: ``[times, num_samples, 2]`` the states at the saved times.
        nfe: velocity evaluations of the adaptive (dopri5) sampling solve.
        straightness: mean over samples of path length / end-to-end distance (1: straight).
        heldout_nll: mean negative log-likelihood (nats) of held-out data under the model.
        grid_log_prob: ``[grid_size, grid_size]`` learned log-density on the plot grid.
        success: whether both ODE solves succeeded.
    """

    samples: np.ndarray
    trajectories: np.ndarray
    nfe: int
    straightness: float
    heldout_nll: float
    grid_log_prob: np.ndarray
    success: bool


def evaluate(params, x0: Array, heldout: Array, grid: Array) -> Evaluation:
    """Samples from noise ``x0`` and evaluates the learned density at ``heldout`` and ``grid``.

    One likelihood solve covers held-out data and grid points together: Diffrax compiles
    once, and the exact divergence of a 2-D field costs two Jacobian-vector products.
    """
    velocity = velocity_fn(params)
    save_at = jnp.linspace(0.0, 1.0, 33)
    result = sample(velocity, x0, solver="dopri5", rtol=1e-5, atol=1e-5, save_at=save_at)
    path = np.concatenate([np.asarray(result.trajectory), np.asarray(result.x)[None]])
    length = np.sum(np.linalg.norm(np.diff(path, axis=0), axis=-1), axis=0)
    displacement = np.linalg.norm(path[-1] - path[0], axis=-1)
    points = jnp.concatenate([heldout, grid])
    density = log_likelihood(velocity, points, rtol=1e-4, atol=1e-4)
    log_prob = np.asarray(density.log_prob)
    grid_size = math.isqrt(grid.shape[0])
    return Evaluation(
        samples=np.asarray(result.x),
        trajectories=path,
        nfe=int(result.nfe),
        straightness=float(np.mean(length / np.maximum(displacement, 1e-6))),
        heldout_nll=float(-np.mean(log_prob[: heldout.shape[0]])),
        grid_log_prob=log_prob[heldout.shape[0] :].reshape(grid_size, grid_size),
        success=bool(result.success) and bool(density.success),
    )


def plot_extent(data: np.ndarray, margin: float = 1.0) -> tuple[float, float, float, float]:
    """A square ``(left, right, bottom, top)`` around the data, with ``margin`` to spare."""
    center = (data.max(0) + data.min(0)) / 2
    half = (data.max(0) - data.min(0)).max() / 2 + margin
    return (center[0] - half, center[0] + half, center[1] - half, center[1] + half)


def grid_points(extent: tuple[float, float, float, float], size: int) -> np.ndarray:
    """``[size * size, 2]`` cell centres of a ``size x size`` grid over ``extent``, row-major
    from the bottom row up (the order ``imshow(origin="lower")`` expects)."""
    left, right, bottom, top = extent
    xs = left + (np.arange(size) + 0.5) * (right - left) / size
    ys = bottom + (np.arange(size) + 0.5) * (top - bottom) / size
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], -1).astype(np.float32)


def plot(
    path: str,
    dataset: str,
    data: np.ndarray,
    extent: tuple[float, float, float, float],
    results: dict[str, tuple[Evaluation, float]],
    num_trajectories: int,
) -> None:
    """Writes the figure: a row per coupling of samples, trajectories and learned density.

    Drawn on a bare ``Figure`` (rendered by Agg): no pyplot, so no display and no global
    backend state are touched, on a server or when imported into a notebook.
    """
    fig = Figure(figsize=(12, 4 * len(results)))
    axes = fig.subplots(len(results), 3, squeeze=False)
    for row, (name, (ev, final_loss)) in zip(axes, results.items(), strict=True):
        ax = row[0]
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.7", label="data")
        ax.scatter(ev.samples[:, 0], ev.samples[:, 1], s=2, c="C0", label="samples")
        ax.set_title(f"{_TITLES[name]}: samples (NFE {ev.nfe})")
        ax.legend(loc="upper right", markerscale=4, fontsize=8)
        ax = row[1]
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.85")
        shown = ev.trajectories[:, :num_trajectories]
        ax.plot(shown[..., 0], shown[..., 1], c="C1", lw=0.8, alpha=0.8)
        ax.scatter(shown[0, :, 0], shown[0, :, 1], s=8, c="k", zorder=3, label="noise, t=0")
        ax.scatter(shown[-1, :, 0], shown[-1, :, 1], s=8, c="C3", zorder=3, label="sample, t=1")
        ax.set_title(f"trajectories (length / distance {ev.straightness:.3f})")
        ax.legend(loc="upper right", markerscale=1.5, fontsize=8)
        ax = row[2]
        ax.imshow(np.exp(ev.grid_log_prob), extent=extent, origin="lower", cmap="viridis")
        ax.set_title(f"learned density (held-out NLL {ev.heldout_nll:.3f})")
        row[0].set_ylabel(f"{_TITLES[name]}\nfinal loss {final_loss:.3f}")
        for ax in row:
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_aspect("equal")
    fig.suptitle(f"Flow matching on {dataset}: independent vs exact-OT coupling")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


W2_POINTS = 512
"""Points per set for the sample distance (exact OT costs O(n^3))."""


def empirical_w2(a: Array, b: Array) -> float:
    """The exact 2-Wasserstein distance between two equal-size point sets ``[n, 2]``: the root
    mean squared distance of the optimal pairing (found by :func:`fmjax.exact_ot`)."""
    paired = exact_ot(None, jnp.asarray(a), jnp.asarray(b))
    return float(jnp.sqrt(jnp.mean(jnp.sum((paired.x0 - paired.x1) ** 2, axis=1))))


def run(workdir: str, dataset: str, settings: Settings, seed: int = 0) -> dict[str, Any]:
    """Trains both couplings, writes ``toy2d.png`` and ``metrics.json``; returns the metrics."""
    if settings.steps < 1 or settings.steps % settings.log_every:
        raise ValueError(
            f"steps must be a positive multiple of log_every={settings.log_every}; "
            f"got steps={settings.steps}."
        )
    prepare_workdir(workdir)  # fail now, not after training
    toy = TOY_2D[dataset]
    key = jax.random.key(seed)
    train_key, noise_key, heldout_key = jax.random.split(key, 3)
    heldout = toy.sample(heldout_key, settings.num_samples)
    x0 = jax.random.normal(noise_key, (settings.num_samples, 2))
    data = np.asarray(heldout)
    extent = plot_extent(data)
    grid = jnp.asarray(grid_points(extent, settings.grid_size))
    # Fresh true samples for the sample distance, and a second set for its finite-sample
    # floor (two draws of the true distribution are not at distance 0).
    fresh_key, floor_key = jax.random.split(stream_key(seed, Stream.TOY2D_REFERENCE))
    w2_points = min(W2_POINTS, settings.num_samples)
    fresh = toy.sample(fresh_key, w2_points)

    results, metrics = {}, {"dataset": dataset, "settings": settings._asdict(), "couplings": {}}
    for name, coupling in COUPLINGS.items():
        start = time.perf_counter()
        params, losses = train(toy, coupling, train_key, settings)
        trained = time.perf_counter()
        ev = evaluate(params, x0, heldout, grid)
        # The mean over the last tenth of training: single-batch losses are noisy.
        final_loss = float(np.mean(losses[-max(1, settings.steps // 10) :]))
        curve = losses.reshape(-1, settings.log_every).mean(axis=1)
        results[name] = (ev, final_loss)
        metrics["couplings"][name] = {
            "final_loss": final_loss,
            "loss_curve": {
                "step": [settings.log_every * (i + 1) for i in range(len(curve))],
                "loss": [float(v) for v in curve],
            },
            "nfe": ev.nfe,
            "straightness": ev.straightness,
            "heldout_nll": ev.heldout_nll,
            "w2_to_fresh_data": empirical_w2(ev.samples[:w2_points], fresh),
            "success": ev.success,
            "train_seconds": trained - start,
            "eval_seconds": time.perf_counter() - trained,
        }
        print(
            f"{name}: final loss {final_loss:.4f}, NFE {ev.nfe}, straightness "
            f"{ev.straightness:.4f}, held-out NLL {ev.heldout_nll:.4f} "
            f"(train {trained - start:.1f} s, eval {time.perf_counter() - trained:.1f} s)",
            flush=True,
        )
    metrics["true_heldout_nll"] = (
        None if toy.log_prob is None else float(-jnp.mean(toy.log_prob(heldout)))
    )
    metrics["w2_floor"] = empirical_w2(toy.sample(floor_key, w2_points), fresh)
    figure = os.path.join(workdir, "toy2d.png")
    plot(figure, dataset, data, extent, results, settings.num_trajectories)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def main(argv):
    del argv
    common.setup()
    settings = QUICK if FLAGS.quick else Settings()
    if FLAGS.steps is not None:
        settings = settings._replace(steps=FLAGS.steps)
    metrics = run(FLAGS.workdir, FLAGS.dataset, settings, FLAGS.seed)
    print(
        f"Done: {os.path.join(FLAGS.workdir, 'toy2d.png')}; true held-out NLL "
        f"{metrics['true_heldout_nll']}"
    )


if __name__ == "__main__":
    common.run(main, define_flags)
