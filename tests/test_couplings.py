"""fmjax.couplings: exact OT against brute force and optax's Hungarian, the Sinkhorn plan, the contract."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax.couplings import (
    exact_ot,
    independent,
    min_cost_assignment,
    sinkhorn_log_plan,
    sinkhorn_ot,
    squared_distances,
)

exact_ot_jit = jax.jit(exact_ot)


def _pairing_cost(x0, x1):
    return float(jnp.sum((x0 - x1) ** 2))


@pytest.mark.parametrize("n", [3, 7])
def test_exact_ot_equals_brute_force(n):
    for seed in range(4):
        k0, k1 = jax.random.split(jax.random.key(100 * n + seed))
        x0 = jax.random.normal(k0, (n, 2, 2, 1))
        x1 = jax.random.normal(k1, (n, 2, 2, 1)) + 0.5
        out = exact_ot_jit(None, x0, x1)
        x0_np, x1_np = np.asarray(x0), np.asarray(x1)
        best = min(_pairing_cost(x0_np[list(p)], x1_np) for p in itertools.permutations(range(n)))
        got = _pairing_cost(out.x0, out.x1)
        assert got == pytest.approx(best, rel=1e-5)
        assert got <= _pairing_cost(x0, x1) * (1 + 1e-6)  # never worse than the identity
        # A permutation of x0, x1 untouched, indices consistent with the outputs.
        np.testing.assert_array_equal(np.sort(out.i0), np.arange(n))
        np.testing.assert_array_equal(out.i1, np.arange(n))
        np.testing.assert_array_equal(out.x0, x0[out.i0])
        np.testing.assert_array_equal(out.x1, x1)


def _brute_force_costs(costs):
    """Minimum total cost over all permutations, for a stack of [n, n] matrices."""
    n = costs.shape[-1]
    perms = np.array(list(itertools.permutations(range(n))))
    return costs[:, np.arange(n), perms].sum(-1).min(-1)


def _cost_stack(rng, n, draws):
    """Cost matrices with ties: Gaussian points, duplicated points, small integers, constants."""
    x0 = rng.normal(size=(draws, n, 3))
    x1 = rng.normal(size=(draws, n, 3)) + 0.5
    x0[: draws // 4, 1:] = x0[: draws // 4, :1]  # every noise sample the same point
    x1[draws // 4 : draws // 2, ::2] = x1[draws // 4 : draws // 2, :1]  # half the data duplicated
    costs = ((x1[:, :, None] - x0[:, None]) ** 2).sum(-1)
    costs[draws // 2 : 3 * draws // 4] = rng.integers(0, 3, size=(draws // 4, n, n))
    costs[-2] = 1.0
    return costs


SOLVERS = ["host", "jax"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_assignment_equals_brute_force_with_ties_under_vmap(n, solver):
    costs = _cost_stack(np.random.default_rng(n), n, draws=40)
    solve = jax.jit(jax.vmap(lambda c: min_cost_assignment(c, solver=solver)))
    cols = np.asarray(solve(jnp.asarray(costs, jnp.float32)))
    for col in cols:
        np.testing.assert_array_equal(np.sort(col), np.arange(n))
    got = np.take_along_axis(costs, cols[:, :, None], 2)[..., 0].sum(-1)
    np.testing.assert_allclose(got, _brute_force_costs(costs), rtol=1e-5, atol=1e-5)


def _hungarian_cost(cost):
    rows, cols = jax.jit(optax.assignment.hungarian_algorithm)(cost)
    return float(jnp.sum(cost[rows, cols]))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n,dims", [(64, 3072), (128, 2), (256, 2)])
def test_assignment_cost_equals_optax_hungarian(n, dims, solver):
    k0, k1 = jax.random.split(jax.random.key(n + dims))
    x0 = jax.random.normal(k0, (n, dims))
    x1 = jax.random.normal(k1, (n, dims)) + 0.5
    cost = squared_distances(x1, x0)
    out = jax.jit(functools.partial(exact_ot, solver=solver))(None, x0, x1)
    np.testing.assert_array_equal(np.sort(out.i0), np.arange(n))
    got = float(jnp.sum(cost[jnp.arange(n), out.i0]))
    assert got == pytest.approx(_hungarian_cost(cost), rel=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_assignment_in_float64_is_exact_to_float64(x64, solver):
    rng = np.random.default_rng(0)
    # Costs whose optimum beats the runner-up by ~1e-9: float32 could not see the difference.
    costs = rng.normal(size=(6, 6)) * 1e-9 + 1.0
    col = np.asarray(min_cost_assignment(jnp.asarray(costs), solver=solver))
    assert col.dtype == np.int32
    got = costs[np.arange(6), col].sum()
    assert got == pytest.approx(_brute_force_costs(costs[None])[0], rel=0, abs=1e-14)
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    x1 = jax.random.normal(jax.random.key(2), (64, 2))
    out = jax.jit(functools.partial(exact_ot, solver=solver))(None, x0, x1)
    assert out.x0.dtype == jnp.float64
    cost = squared_distances(x1, x0)
    got = float(jnp.sum(cost[jnp.arange(64), out.i0]))
    assert got == pytest.approx(_hungarian_cost(cost), rel=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_ot_under_vmap_matches_one_by_one(solver):
    x0 = jax.random.normal(jax.random.key(3), (3, 16, 2))
    x1 = jax.random.normal(jax.random.key(4), (3, 16, 2))
    one = jax.jit(functools.partial(exact_ot, solver=solver))
    batched = jax.jit(jax.vmap(lambda a, b: one(None, a, b).i0))(x0, x1)
    for k in range(3):
        np.testing.assert_array_equal(batched[k], one(None, x0[k], x1[k]).i0)


def test_ot_couplings_run_per_device_under_shard_map():
    # The training step's setting: one coupling per device's micro-batch.
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    n = 24
    x0 = jax.random.normal(jax.random.key(5), (len(devices) * n, 2))
    x1 = jax.random.normal(jax.random.key(6), (len(devices) * n, 2)) + 1.0
    spec = jax.sharding.PartitionSpec("data")

    def per_device_cost(coupling):
        def cost(a, b):
            out = coupling(jax.random.key(0), a, b)
            return jnp.sum((out.x0 - out.x1) ** 2)[None]

        mapped = jax.shard_map(cost, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
        return np.asarray(jax.jit(mapped)(x0, x1))

    host = per_device_cost(functools.partial(exact_ot, solver="host"))
    in_graph = per_device_cost(functools.partial(exact_ot, solver="jax"))
    assert host.shape == (len(devices),)
    np.testing.assert_allclose(host, in_graph, rtol=1e-5)
    identity = np.asarray(jnp.sum(((x0 - x1) ** 2).reshape(len(devices), -1), axis=1))
    assert np.all(host < 0.8 * identity)
    # The entropic plan, too, runs under shard_map's type checks (its pairs may repeat noise
    # samples, so its total is not bounded by the exact one).
    entropic = per_device_cost(sinkhorn_ot(0.05))
    assert np.all(entropic < 0.8 * identity)


def test_auto_solver_calls_the_host_on_cpu_and_stays_in_graph_elsewhere():
    cost = jnp.ones((4, 4))
    cpu_text = jax.jit(min_cost_assignment).lower(cost).as_text()
    assert "callback" in cpu_text
    tpu_text = jax.jit(min_cost_assignment).trace(cost).lower(lowering_platforms=("tpu",)).as_text()
    assert "callback" not in tpu_text


@pytest.mark.parametrize("solver", SOLVERS)
def test_assignment_of_non_finite_costs_terminates_with_a_permutation(solver):
    for bad in (jnp.nan, jnp.inf):
        cost = jnp.ones((5, 5)).at[2, 3].set(bad)
        col = min_cost_assignment(cost, solver=solver)
        np.testing.assert_array_equal(np.sort(col), np.arange(5))


def test_assignment_validates_its_cost():
    with pytest.raises(ValueError, match=r"square \[n, n\] cost; got shape \(2, 3\)"):
        min_cost_assignment(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"floating-point.*int32"):
        min_cost_assignment(jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"Unknown solver 'scipy'; expected one of 'auto'"):
        exact_ot(None, jnp.zeros((2, 1)), jnp.zeros((2, 1)), solver="scipy")


def test_exact_ot_never_worse_than_identity_on_larger_batches():
    k0, k1 = jax.random.split(jax.random.key(7))
    x0 = jax.random.normal(k0, (64, 8))
    x1 = jax.random.normal(k1, (64, 8)) * 2.0 + 1.0
    out = exact_ot_jit(None, x0, x1)
    assert _pairing_cost(out.x0, out.x1) < 0.9 * _pairing_cost(x0, x1)
    assert len(set(np.asarray(out.i0).tolist())) == 64


def test_squared_distances(x64):
    a = jax.random.normal(jax.random.key(0), (3, 2, 2))
    b = jax.random.normal(jax.random.key(1), (4, 2, 2))
    want = ((a.reshape(3, 1, -1) - b.reshape(1, 4, -1)) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(a, b), want, rtol=1e-12, atol=1e-12)


def test_sinkhorn_plan_marginals_and_limits(x64):
    x0 = jax.random.normal(jax.random.key(0), (5, 2))
    x1 = jax.random.normal(jax.random.key(1), (5, 2))
    cost = squared_distances(x0, x1)
    plan = jnp.exp(sinkhorn_log_plan(cost, epsilon=0.5, num_iters=500))
    np.testing.assert_allclose(plan.sum(0), np.full(5, 0.2), rtol=1e-10)
    np.testing.assert_allclose(plan.sum(1), np.full(5, 0.2), rtol=1e-6)
    # epsilon -> infinity: the independent (product) plan.
    flat = jnp.exp(sinkhorn_log_plan(cost, epsilon=1e6, num_iters=10))
    np.testing.assert_allclose(flat, np.full((5, 5), 0.04), rtol=1e-4)
    # epsilon -> 0: the exact OT permutation.
    sharp = jnp.exp(sinkhorn_log_plan(cost, epsilon=1e-3, num_iters=2000))
    i0 = exact_ot(None, x0, x1).i0
    np.testing.assert_array_equal(jnp.argmax(sharp, axis=0), i0)


def test_sinkhorn_samples_follow_the_plan():
    x0 = jnp.array([[0.0], [1.0], [2.0]])
    x1 = jnp.array([[0.2], [1.1], [1.9]])
    epsilon = 0.5
    coupling = jax.jit(sinkhorn_ot(epsilon, num_iters=200))
    draws = jax.vmap(lambda k: coupling(k, x0, x1).i0)(jax.random.split(jax.random.key(3), 20000))
    plan = np.exp(np.asarray(sinkhorn_log_plan(squared_distances(x0, x1), epsilon, 200)))
    for j in range(3):
        freq = np.bincount(np.asarray(draws[:, j]), minlength=3) / draws.shape[0]
        conditional = plan[:, j] / plan[:, j].sum()
        np.testing.assert_allclose(freq, conditional, atol=0.015)
    out = coupling(jax.random.key(0), x0, x1)
    np.testing.assert_array_equal(out.x0, x0[out.i0])
    np.testing.assert_array_equal(out.i1, np.arange(3))


def test_independent_is_identity():
    x0, x1 = jnp.zeros((4, 2)), jnp.ones((4, 2))
    out = independent(jax.random.key(0), x0, x1)
    np.testing.assert_array_equal(out.i0, np.arange(4))
    assert out.x0 is x0 and out.x1 is x1


@pytest.mark.parametrize(
    "coupling",
    [independent, exact_ot, sinkhorn_ot(0.1)],
    ids=["independent", "exact_ot", "sinkhorn_ot"],
)
def test_bad_input_messages(coupling):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 2\).*\(4, 3\)"):
        coupling(key, jnp.zeros((4, 2)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"floating-point.*int32"):
        coupling(key, jnp.zeros((4, 2)), jnp.zeros((4, 2), jnp.int32))


@pytest.mark.parametrize("coupling", [exact_ot, sinkhorn_ot(0.1)], ids=["exact", "sinkhorn"])
def test_ot_rejects_a_batch_of_one(coupling):
    with pytest.raises(ValueError, match=r"at least 2 samples.*batch size 1"):
        coupling(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1, 2)))


def test_sinkhorn_factory_validates():
    with pytest.raises(ValueError, match="epsilon must be positive; got epsilon=0"):
        sinkhorn_ot(0)
    with pytest.raises(ValueError, match="num_iters must be a positive int"):
        sinkhorn_ot(0.1, num_iters=0)
