r"""Side by side with torchcfm: the same 2-D OT-CFM recipe trained by each, time and NLL.

    python -m experiments.bench.peers [--steps N] [--seeds K] [--quick] [--skip-torch]
                                      [--couple-ahead N]
    python -m experiments.bench --only peers [--quick]

The task: noise :math:`x_0 \sim \mathcal N(0, I)` to the 8-Gaussians mixture of
:func:`fmjax.toy2d.eight_gaussians` (torchcfm's own ``sample_8gaussians``: radius 5, variance
:math:`\sqrt{0.1}`), whose exact density gives the true held-out NLL. The recipe, identical on
both sides:

- the model of torchcfm's 2-D examples: an MLP ``[x, t] -> velocity`` (3 inputs, 3 hidden
  layers of 64 units with SELU, 2 outputs; ``t`` enters raw), initialised with PyTorch's
  default ``Linear`` distribution (weights and biases :math:`U(\pm 1/\sqrt{\text{fan-in}})`);
- the CondOT path :math:`x_t = (1 - t) x_0 + t x_1` (torchcfm's ``sigma=0``), target
  :math:`x_1 - x_0`, :math:`t \sim U(0, 1)` per example, plain MSE;
- exact minibatch OT at batch 256: torchcfm's ``ExactOptimalTransportConditionalFlowMatcher``
  (POT's ``ot.emd`` network simplex, then pairs drawn *with replacement* from the plan, its
  default) against :func:`fmjax.couplings.exact_ot` (an assignment: the same optimal plan, used
  as a permutation, so no pair is duplicated or dropped);
- Adam at a constant learning rate of 1e-3 (PyTorch's and optax's defaults otherwise agree:
  betas (0.9, 0.999), eps 1e-8), the same number of steps.

torchcfm runs the loop of its README on PyTorch (CPU here), one step per Python iteration;
fmjax runs ``log_every`` steps per jitted ``lax.scan`` and draws and pairs the batches of
``couple_ahead`` steps at once (the pairing does not depend on the parameters, so this changes
which random numbers are drawn, not the recipe; one host call then solves 50 assignments on
every core). The wall time is the whole training run; fmjax's includes compiling its chunk,
which is also reported apart.

The NLL is measured the same way for both models: the PyTorch model's weights are copied into
the JAX function of the same MLP (checked to give the same outputs in ``tests/test_peers.py``)
and both are evaluated by :func:`fmjax.likelihood.log_likelihood` (exact divergence, dopri5,
rtol = atol = 1e-5) on the same held-out draws. One solver for both removes any difference of
integrators or tolerances from the comparison.

PyTorch, torchcfm and POT come from the optional ``bench`` extra (``pip install -e .[bench]``;
torchcfm's own dependency list is large, ``--no-deps`` on it works: it imports only torch,
numpy and POT for this); without them only the fmjax half runs, with a message saying so.
"""

import argparse
import functools
import importlib.util
import itertools
import math
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from experiments.bench import markdown_table
from fmjax.couplings import exact_ot
from fmjax.likelihood import log_likelihood
from fmjax.loss import Pairs, cfm_loss_on_pairs, draw_pairs
from fmjax.toy2d import eight_gaussians

WIDTH = 64
"""Hidden units per layer (torchcfm's 2-D examples: ``MLP(dim=2, w=64, time_varying=True)``)."""

DEPTH = 3
"""Hidden layers."""

NLL_TOLERANCE = 1e-5
"""rtol and atol of the dopri5 likelihood solve that scores both models."""

Params = list[tuple[Float[Array, "fan_in fan_out"], Float[Array, " fan_out"]]]
"""The MLP's parameters: one ``(w, b)`` per layer, ``h @ w + b``."""


class Recipe(NamedTuple):
    """The training run both libraries perform, and the evaluation.

    Attributes:
        steps: Adam steps.
        batch_size: data points (and noise draws) per step; exact OT solves an assignment of
            this size every step.
        learning_rate: Adam's constant learning rate.
        log_every: fmjax steps per jitted ``lax.scan`` chunk (``steps`` must be a multiple).
        num_heldout: held-out data points scored by the NLL.
        couple_ahead: fmjax draws and pairs this many steps' batches at once (a divisor of
            ``log_every``; see :func:`block_pairs`): the pairing does not depend on the
            parameters, and one vmapped :func:`fmjax.couplings.exact_ot` solves the
            assignments on every core. ``1`` couples step by step.
    """

    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    log_every: int = 500
    num_heldout: int = 2000
    couple_ahead: int = 50


QUICK = Recipe(steps=200, log_every=100, num_heldout=500)
"""The shortened recipe of ``--quick``."""


def peers_available() -> bool:
    """Whether PyTorch, torchcfm and POT are importable (the ``bench`` extra)."""
    return all(importlib.util.find_spec(name) for name in ("torch", "torchcfm", "ot"))


# --- the model, as a JAX function ------------------------------------------------------------


def init_mlp(seed: int, width: int = WIDTH, depth: int = DEPTH) -> Params:
    r"""Parameters drawn like PyTorch's default ``nn.Linear``: :math:`U(\pm 1/\sqrt{m})` for
    the weights and biases of a layer with ``m`` inputs.

    Drawn by NumPy on the host (``default_rng(seed)``), like PyTorch's own initialisation:
    eager ``jax.random`` calls would compile one small program per shape (2.3 s here, inside
    the timed run) for a one-off draw.

    Example:
        >>> [w.shape for w, _ in init_mlp(0)]
        [(3, 64), (64, 64), (64, 64), (64, 2)]
    """
    rng = np.random.default_rng(seed)
    sizes = (3, *(width,) * depth, 2)
    params = []
    for m, n in itertools.pairwise(sizes):
        bound = 1 / math.sqrt(m)
        w, b = rng.uniform(-bound, bound, (m, n)), rng.uniform(-bound, bound, n)
        params.append((jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
    return params


def mlp(
    params: Params, x_t: Float[Array, "batch 2"], t: Float[Array, " batch"]
) -> Float[Array, "batch 2"]:
    """The velocity at points ``x_t`` and times ``t``: ``[x_t, t]`` through SELU layers.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> mlp(init_mlp(0), jnp.zeros((5, 2)), jnp.zeros(5)).shape
        (5, 2)
    """
    h = jnp.concatenate([x_t, t[:, None]], axis=1)
    for w, b in params[:-1]:
        h = jax.nn.selu(h @ w + b[None, :])
    w, b = params[-1]
    return h @ w + b[None, :]


def heldout_nll(params: Params, heldout: Float[Array, "n 2"]) -> tuple[float, bool]:
    """Mean negative log-likelihood (nats) of ``heldout`` under the flow of ``params``, and
    whether the solve succeeded: :func:`fmjax.likelihood.log_likelihood`, exact divergence,
    dopri5 at :data:`NLL_TOLERANCE`.

    ``params`` travel in a ``jax.tree_util.Partial``, so every model shares one compiled solve.
    """
    velocity = jax.tree_util.Partial(mlp, params)
    result = log_likelihood(velocity, heldout, rtol=NLL_TOLERANCE, atol=NLL_TOLERANCE)
    return float(-jnp.mean(result.log_prob)), bool(result.success)


# --- fmjax ----------------------------------------------------------------------------------


class FmjaxRun(NamedTuple):
    """One fmjax training run.

    Attributes:
        params: the trained parameters.
        losses: ``[steps]`` the per-step losses.
        compile_seconds: lowering and compiling the chunk (already inside ``total_seconds``).
        total_seconds: the whole run: initialisation, compilation, every step.
        cpu_seconds: the process's CPU time over the same span (all threads).
    """

    params: Params
    losses: np.ndarray
    compile_seconds: float
    total_seconds: float
    cpu_seconds: float


def block_pairs(recipe: Recipe, key: PRNGKeyArray, block: Int[Array, ""]) -> Pairs:
    """The training pairs of ``recipe.couple_ahead`` consecutive steps, drawn at once.

    Block ``b`` draws ``couple_ahead * batch_size`` data points and as many per-example keys
    from ``fold_in(key, b)``, one batch per step, and pairs every step's batch by
    :func:`fmjax.loss.draw_pairs` with :func:`fmjax.couplings.exact_ot`, vmapped over the
    steps: one host call solves the block's assignments on parallel threads. (One draw per
    block also compiles in half the time of a vmapped draw per step.)

    Returns:
        :class:`fmjax.loss.Pairs` with a leading ``[couple_ahead]`` step axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> recipe = Recipe(batch_size=8, couple_ahead=5)
        >>> block_pairs(recipe, jax.random.key(0), jnp.int32(0)).x0.shape
        (5, 8, 2)
    """
    shape = (recipe.couple_ahead, recipe.batch_size)
    data_key, noise_key = jax.random.split(jax.random.fold_in(key, block))
    x1 = eight_gaussians().sample(data_key, math.prod(shape)).reshape(*shape, 2)
    keys = jax.random.split(noise_key, shape)
    return jax.vmap(functools.partial(draw_pairs, coupling=exact_ot))(keys, x1)


def train_fmjax(recipe: Recipe, seed: int) -> FmjaxRun:
    """Trains the MLP with :func:`fmjax.loss.draw_pairs` (:func:`fmjax.couplings.exact_ot`)
    and :func:`fmjax.loss.cfm_loss_on_pairs`, together :func:`fmjax.loss.cfm_loss`.

    Steps run ``recipe.log_every`` at a time in one jitted ``lax.scan`` over blocks of
    ``recipe.couple_ahead`` steps: each block draws its pairs (:func:`block_pairs`), then
    takes its steps.

    Example:
        >>> run = train_fmjax(Recipe(steps=2, batch_size=8, log_every=1, couple_ahead=1), seed=0)
        >>> run.losses.shape
        (2,)
    """
    if recipe.steps < 1 or recipe.steps % recipe.log_every:
        raise ValueError(
            f"steps must be a positive multiple of log_every={recipe.log_every}; "
            f"got steps={recipe.steps}."
        )
    if recipe.couple_ahead < 1 or recipe.log_every % recipe.couple_ahead:
        raise ValueError(
            f"couple_ahead must be a positive divisor of log_every={recipe.log_every}; "
            f"got couple_ahead={recipe.couple_ahead}."
        )
    optimizer = optax.adam(recipe.learning_rate)
    loss_and_grad = jax.value_and_grad(cfm_loss_on_pairs, argnums=1, has_aux=True)

    def one_step(carry, pairs):
        params, opt_state = carry
        (loss, _), grads = loss_and_grad(mlp, params, pairs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def chunk(params, opt_state, key, first_block):
        def one_block(carry, block):
            return jax.lax.scan(one_step, carry, block_pairs(recipe, key, block))

        blocks = first_block + jnp.arange(recipe.log_every // recipe.couple_ahead)
        (params, opt_state), losses = jax.lax.scan(one_block, (params, opt_state), blocks)
        return params, opt_state, losses.reshape(-1)

    start, cpu_start = time.perf_counter(), time.process_time()
    params = init_mlp(seed)
    train_key = jax.random.key(seed)
    opt_state = optimizer.init(params)
    compiled = jax.jit(chunk).lower(params, opt_state, train_key, jnp.int32(0)).compile()
    compile_seconds = time.perf_counter() - start
    losses = []
    for first_step in range(0, recipe.steps, recipe.log_every):
        first_block = jnp.int32(first_step // recipe.couple_ahead)
        params, opt_state, chunk_losses = compiled(params, opt_state, train_key, first_block)
        losses.append(chunk_losses)
    losses = np.concatenate(jax.device_get(losses))
    return FmjaxRun(
        params,
        losses,
        compile_seconds,
        time.perf_counter() - start,
        time.process_time() - cpu_start,
    )


# --- torchcfm -------------------------------------------------------------------------------


class TorchcfmRun(NamedTuple):
    """One torchcfm training run.

    Attributes:
        params: the trained weights as NumPy ``(w, b)`` pairs in :func:`mlp`'s layout
            (``w`` is PyTorch's ``weight`` transposed).
        losses: ``[steps]`` the per-step losses.
        total_seconds: the whole run: model and optimiser creation, every step.
        cpu_seconds: the process's CPU time over the same span (all threads).
    """

    params: list[tuple[np.ndarray, np.ndarray]]
    losses: np.ndarray
    total_seconds: float
    cpu_seconds: float


def torch_mlp(width: int = WIDTH, depth: int = DEPTH):
    """The same MLP in PyTorch (torchcfm's ``MLP(dim=2, w=64, time_varying=True)``)."""
    import torch

    layers, fan_in = [], 3
    for _ in range(depth):
        layers += [torch.nn.Linear(fan_in, width), torch.nn.SELU()]
        fan_in = width
    layers.append(torch.nn.Linear(fan_in, 2))
    return torch.nn.Sequential(*layers)


def torch_to_params(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """A PyTorch ``Sequential`` of ``Linear`` layers as :func:`mlp`'s ``(w, b)`` list."""
    import torch

    return [
        (layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy())
        for layer in model
        if isinstance(layer, torch.nn.Linear)
    ]


def train_torchcfm(recipe: Recipe, seed: int) -> TorchcfmRun:
    """Trains the PyTorch MLP the way torchcfm's README does, with its exact-OT matcher.

    The data are drawn in PyTorch from the same mixture as :func:`fmjax.toy2d.eight_gaussians`.
    Seeds PyTorch and NumPy (torchcfm draws the pairs from the plan with ``np.random``).
    """
    import torch
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - torchcfm draws pairs from the global generator
    angles = torch.arange(8) * math.pi / 4
    centers = 5.0 * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    std = 0.1**0.25

    start, cpu_start = time.perf_counter(), time.process_time()
    model = torch_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    losses = torch.empty(recipe.steps)
    for step in range(recipe.steps):
        optimizer.zero_grad()
        x0 = torch.randn(recipe.batch_size, 2)
        component = torch.randint(0, 8, (recipe.batch_size,))
        x1 = centers[component] + std * torch.randn(recipe.batch_size, 2)
        t, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1)
        v_t = model(torch.cat([x_t, t[:, None]], dim=-1))
        loss = torch.mean((v_t - u_t) ** 2)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return TorchcfmRun(torch_to_params(model), losses.numpy(), seconds, cpu_seconds)


# --- the comparison -------------------------------------------------------------------------


def _final_loss(losses: np.ndarray) -> float:
    # The mean over the last tenth of training: single-batch losses are noisy.
    return float(np.mean(losses[-max(1, len(losses) // 10) :]))


def compare(recipe: Recipe, seeds: int = 1, torch_side: bool = True) -> list[dict[str, Any]]:
    """Trains with each library for every seed and scores each model; returns table rows.

    Rows: one per library and seed (wall and CPU time, fmjax's compile time, final loss,
    held-out NLL and NLL minus the true NLL of the same points), then, with both libraries, a
    summary row of the median ratios fmjax / torchcfm of wall and CPU time and median NLLs.
    CPU time (all threads of the process) is the steadier figure on a shared machine.
    """
    toy = eight_gaussians()
    heldout = toy.sample(jax.random.key(10_000), recipe.num_heldout)
    true_nll = float(-jnp.mean(toy.log_prob(heldout)))
    rows = []
    for seed in range(seeds):
        runs: dict[str, tuple[Params, np.ndarray, float, float, float | None]] = {}
        fm = train_fmjax(recipe, seed)
        runs["fmjax"] = (
            fm.params,
            fm.losses,
            fm.total_seconds,
            fm.cpu_seconds,
            fm.compile_seconds,
        )
        if torch_side:
            tc = train_torchcfm(recipe, seed)
            params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in tc.params]
            runs["torchcfm"] = (params, tc.losses, tc.total_seconds, tc.cpu_seconds, None)
        for library, (params, losses, seconds, cpu_seconds, compile_seconds) in runs.items():
            nll, success = heldout_nll(params, heldout)
            print(
                f"{library}, seed {seed}: trained in {seconds:.1f} s ({cpu_seconds:.1f} s CPU), "
                f"held-out NLL {nll:.3f} (true {true_nll:.3f})",
                flush=True,
            )
            rows.append(
                {
                    "benchmark": "2-D OT-CFM",
                    "library": library,
                    "seed": seed,
                    "steps": recipe.steps,
                    "batch": recipe.batch_size,
                    "train_s": seconds,
                    "train_cpu_s": cpu_seconds,
                    "compile_s": compile_seconds,
                    "ms_per_step": 1e3 * (seconds - (compile_seconds or 0.0)) / recipe.steps,
                    "final_loss": _final_loss(losses),
                    "heldout_nll": nll,
                    "nll_minus_true": nll - true_nll,
                    "nll_solve_ok": success,
                }
            )
    if torch_side:
        by = {lib: [r for r in rows if r["library"] == lib] for lib in ("fmjax", "torchcfm")}
        ratios = [
            f["train_s"] / t["train_s"] for f, t in zip(by["fmjax"], by["torchcfm"], strict=True)
        ]
        cpu_ratios = [
            f["train_cpu_s"] / t["train_cpu_s"]
            for f, t in zip(by["fmjax"], by["torchcfm"], strict=True)
        ]
        rows.append(
            {
                "benchmark": "2-D OT-CFM",
                "library": "fmjax / torchcfm",
                "seed": f"median of {seeds}",
                "time_ratio": statistics.median(ratios),
                "cpu_time_ratio": statistics.median(cpu_ratios),
                "fmjax_nll": statistics.median(r["heldout_nll"] for r in by["fmjax"]),
                "torchcfm_nll": statistics.median(r["heldout_nll"] for r in by["torchcfm"]),
                "true_nll": true_nll,
            }
        )
    else:
        rows.append(
            {"benchmark": "2-D OT-CFM", "library": "(true density)", "heldout_nll": true_nll}
        )
    return rows


_MISSING = (
    "torchcfm, POT or PyTorch is not installed: timing fmjax alone. For the side by side, "
    "`pip install -e .[bench]` (or `pip install --no-deps torchcfm pot` next to an existing torch)."
)


def run(quick: bool) -> list[dict[str, Any]]:
    """The benchmark area: the comparison at :data:`QUICK` or the full :class:`Recipe`."""
    available = peers_available()
    if not available:
        print(_MISSING, flush=True)
    return compare(QUICK if quick else Recipe(), torch_side=available)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help=f"Adam steps (default {Recipe().steps})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..K-1, each trained by both")
    parser.add_argument("--quick", action="store_true", help="the short recipe")
    parser.add_argument("--skip-torch", action="store_true", help="fmjax alone")
    parser.add_argument(
        "--couple-ahead",
        type=int,
        help=f"fmjax steps coupled at once (default {Recipe().couple_ahead}; 1: step by step)",
    )
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else Recipe()
    if args.steps is not None:
        recipe = recipe._replace(steps=args.steps)
    if args.couple_ahead is not None:
        recipe = recipe._replace(couple_ahead=args.couple_ahead)
    torch_side = not args.skip_torch and peers_available()
    if not args.skip_torch and not torch_side:
        print(_MISSING, flush=True)

    print(f"jax {jax.__version__} on {jax.default_backend()}; {recipe}", flush=True)
    print(markdown_table(compare(recipe, args.seeds, torch_side)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
