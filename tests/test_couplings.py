"""fmjax.couplings: exact OT against brute force, the Sinkhorn plan, the common contract."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.couplings import exact_ot, independent, sinkhorn_log_plan, sinkhorn_ot, squared_distances

exact_ot_jit = jax.jit(exact_ot)


def _pairing_cost(x0, x1):
    return float(jnp.sum((x0 - x1) ** 2))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
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


@pytest.mark.parametrize("coupling", [independent, exact_ot, sinkhorn_ot(0.1)], ids=str)
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
