"""Exact-OT benchmarks: ms per `exact_ot` coupling against optax's Hungarian, and per train step.

1. `fmjax.couplings.exact_ot` with each exact solver: "host" (SciPy's C++ solver through a
   callback, the default on CPU), "jax" (the in-graph Jonker-Volgenant solver, the default on
   TPU) and `optax.assignment.hungarian_algorithm` (what `exact_ot` used first), all jitted
   end to end from (x0, x1), at batch 128, 256, 512 on N(0, I) noise against shifted Gaussian
   data in 2 and 3072 (a 32x32x3 image) dimensions. Each row checks that the total costs agree,
   and times a vmapped stack of 16 "host" couplings (per coupling: the stack's solves run on
   parallel threads).
2. A 2-D MLP flow-matching train step (`cfm_loss`, Adam) at the same batches with the
   independent coupling and with `exact_ot` by each solver: how much of a step the coupling
   costs.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from experiments.bench import interleaved_median_seconds
from fmjax.couplings import Coupled, exact_ot, independent, squared_distances
from fmjax.loss import cfm_loss

BATCHES = (128, 256, 512)


def exact_ot_hungarian(key, x0, x1) -> Coupled:
    """The previous `exact_ot`: the same pairing, solved by optax's Hungarian algorithm."""
    del key
    n = x0.shape[0]
    rows, cols = optax.assignment.hungarian_algorithm(squared_distances(x1, x0))
    i0 = jnp.zeros(n, jnp.int32).at[rows].set(cols.astype(jnp.int32))
    return Coupled(x0[i0], x1, i0, jnp.arange(n, dtype=jnp.int32))


def _pairing_cost(out: Coupled) -> float:
    return float(jnp.sum((out.x0 - out.x1) ** 2))


def _exact_ot_by(solver):
    return functools.partial(exact_ot, solver=solver)


SOLVERS = {"host": _exact_ot_by("host"), "jax": _exact_ot_by("jax"), "optax": exact_ot_hungarian}


def _bound(coupling, x0, x1):
    coupling = jax.jit(coupling)
    return lambda: coupling(None, x0, x1)


STACK = 16
"""Couplings solved at once by the vmapped row (``host_stack_ms`` is per coupling)."""


def coupling_rows(quick: bool) -> list[dict]:
    repeats = 3 if quick else 7
    rows = []
    for dims in (2, 3072):
        for n in BATCHES:
            k0, k1 = jax.random.split(jax.random.key(n + dims))
            x0 = jax.random.normal(k0, (STACK, n, dims))
            x1 = jax.random.normal(k1, (STACK, n, dims)) + 0.5
            fns = {name: _bound(coupling, x0[0], x1[0]) for name, coupling in SOLVERS.items()}
            stacked = jax.jit(jax.vmap(functools.partial(exact_ot, None, solver="host")))
            fns["host_stack"] = lambda stacked=stacked, x0=x0, x1=x1: stacked(x0, x1)
            costs = {name: _pairing_cost(fn()) for name, fn in fns.items() if name in SOLVERS}
            costs["host_stack"] = _pairing_cost(jax.tree.map(lambda a: a[0], stacked(x0, x1)))
            spread = max(costs.values()) - min(costs.values())
            assert spread <= 1e-5 * costs["optax"], (n, dims, costs)
            seconds = interleaved_median_seconds(fns, repeats)
            rows.append(
                {
                    "benchmark": "exact_ot coupling",
                    "batch": n,
                    "dims": dims,
                    **{f"{name}_ms": 1e3 * seconds[name] for name in SOLVERS},
                    "host_stack_ms": 1e3 * seconds["host_stack"] / STACK,
                    "speedup_host_vs_optax": seconds["optax"] / seconds["host"],
                    "speedup_jax_vs_optax": seconds["optax"] / seconds["jax"],
                }
            )
    return rows


def _mlp(key, width=256, depth=3):
    sizes = [3] + [width] * depth + [2]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / a**0.5, "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _apply_mlp(params, x_t, t):
    h = jnp.concatenate([x_t, t[:, None]], axis=1)
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _train_step(optimizer, coupling, x1):
    """One jitted Adam step of the CFM loss, bound to fixed parameters, state and key."""
    params = _mlp(jax.random.key(0))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, key):
        loss = lambda p: cfm_loss(_apply_mlp, p, key, x1, coupling=coupling)  # noqa: E731
        grads, _ = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    return lambda: step(params, opt_state, jax.random.key(2))


def train_step_rows(quick: bool) -> list[dict]:
    repeats = 5 if quick else 15
    optimizer = optax.adam(1e-3)
    rows = []
    for n in BATCHES:
        x1 = 0.5 * jax.random.normal(jax.random.key(1), (n, 2)) + jnp.array([2.0, -1.0])
        couplings = {"independent": independent} | {f"ot_{k}": v for k, v in SOLVERS.items()}
        fns = {name: _train_step(optimizer, c, x1) for name, c in couplings.items()}
        seconds = interleaved_median_seconds(fns, repeats)
        rows.append(
            {
                "benchmark": "2-D MLP train step (3x256, Adam)",
                "batch": n,
                "dims": 2,
                **{f"{name}_step_ms": 1e3 * seconds[name] for name in couplings},
            }
        )
    return rows


def run(quick: bool) -> list[dict]:
    return coupling_rows(quick) + train_step_rows(quick)
