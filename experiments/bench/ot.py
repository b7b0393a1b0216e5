"""Exact-OT benchmarks: ms per `exact_ot` coupling against optax's Hungarian, and per train step.

1. `fmjax.couplings.exact_ot` (Jonker-Volgenant shortest augmenting paths) against the same
   coupling solved by `optax.assignment.hungarian_algorithm` (what `exact_ot` used before),
   both jitted end to end from (x0, x1), at batch 128, 256, 512 on N(0, I) noise against
   shifted Gaussian data in 2 and 3072 (a 32x32x3 image) dimensions. Each row checks that
   the two total costs agree.
2. A 2-D MLP flow-matching train step (`cfm_loss`, Adam) at the same batches with the
   independent coupling and with `exact_ot`: how much of a step the coupling costs.
"""

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


def _bound(coupling, x0, x1):
    coupling = jax.jit(coupling)
    return lambda: coupling(None, x0, x1)


def coupling_rows(quick: bool) -> list[dict]:
    repeats = 3 if quick else 7
    rows = []
    for dims in (2, 3072):
        for n in BATCHES:
            k0, k1 = jax.random.split(jax.random.key(n + dims))
            x0 = jax.random.normal(k0, (n, dims))
            x1 = jax.random.normal(k1, (n, dims)) + 0.5
            old, new = _bound(exact_ot_hungarian, x0, x1), _bound(exact_ot, x0, x1)
            old_cost, new_cost = _pairing_cost(old()), _pairing_cost(new())
            assert abs(new_cost - old_cost) <= 1e-5 * old_cost, (n, dims, new_cost, old_cost)
            seconds = interleaved_median_seconds({"old": old, "new": new}, repeats)
            rows.append(
                {
                    "benchmark": "exact_ot coupling",
                    "batch": n,
                    "dims": dims,
                    "optax_hungarian_ms": 1e3 * seconds["old"],
                    "exact_ot_ms": 1e3 * seconds["new"],
                    "speedup": seconds["old"] / seconds["new"],
                    "relative_cost_difference": (new_cost - old_cost) / old_cost,
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
        fns = {
            name: _train_step(optimizer, coupling, x1)
            for name, coupling in [
                ("independent", independent),
                ("exact_ot", exact_ot),
                ("optax_hungarian", exact_ot_hungarian),
            ]
        }
        seconds = interleaved_median_seconds(fns, repeats)
        rows.append(
            {
                "benchmark": "2-D MLP train step (3x256, Adam)",
                "batch": n,
                "dims": 2,
                "independent_step_ms": 1e3 * seconds["independent"],
                "exact_ot_step_ms": 1e3 * seconds["exact_ot"],
                "optax_hungarian_step_ms": 1e3 * seconds["optax_hungarian"],
            }
        )
    return rows


def run(quick: bool) -> list[dict]:
    return coupling_rows(quick) + train_step_rows(quick)
