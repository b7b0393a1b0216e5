"""The benchmark harness's own arithmetic (experiments/bench/)."""

import jax
import jax.numpy as jnp

from experiments.bench import train as bench_train
from fmjax.models.conv import map_in_chunks


def test_step_flops_counts_every_trip_of_a_cpu_only_loop():
    # The shape of the U-Nets' CPU paths: a loop over chunks on CPU, one op elsewhere.
    # XLA's cost analysis counts the loop body once, i.e. a quarter of the products here.
    def products(x, w):
        return jax.lax.platform_dependent(
            x,
            cpu=lambda x: map_in_chunks(lambda c: c @ w, x, chunk=2),
            default=lambda x: x @ w,
        )

    x, w = jnp.ones((8, 64, 32)), jnp.ones((32, 16))
    step = jax.jit(products)
    compiled = step.lower(x, w).compile()
    flops, counted = bench_train.step_flops(step, compiled, x, w)
    assert counted == "loop-free (CUDA) lowering"
    assert flops == 2 * 8 * 64 * 32 * 16
    assert bench_train._flops_of(compiled.cost_analysis()) < flops / 2
