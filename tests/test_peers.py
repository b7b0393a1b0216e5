"""The side-by-side benchmark with torchcfm (experiments/bench/peers.py).

The fmjax half runs everywhere; the torchcfm half only where the ``bench`` extra is installed
(CI does not install it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import peers
from fmjax.toy2d import eight_gaussians

SHORT = peers.Recipe(steps=150, batch_size=64, log_every=150, num_heldout=128)


def test_fmjax_half_learns_and_is_scored():
    run = peers.train_fmjax(SHORT, seed=0)
    assert run.losses.shape == (SHORT.steps,)
    assert 0 < run.compile_seconds < run.total_seconds
    # The first steps regress onto OT pairs from a random field; training lowers the loss.
    assert np.mean(run.losses[-20:]) < 0.7 * np.mean(run.losses[:20])

    toy = eight_gaussians()
    heldout = toy.sample(jax.random.key(1), SHORT.num_heldout)
    trained_nll, ok = peers.heldout_nll(run.params, heldout)
    untrained_nll, _ = peers.heldout_nll(peers.init_mlp(0), heldout)
    true_nll = float(-jnp.mean(toy.log_prob(heldout)))
    assert ok
    assert true_nll < trained_nll < untrained_nll - 1.0


def test_a_block_of_steps_gets_its_own_optimal_pairs():
    from scipy.optimize import linear_sum_assignment

    recipe = SHORT._replace(batch_size=16, couple_ahead=5)
    key = jax.random.key(3)
    pairs = peers.block_pairs(recipe, key, jnp.int32(0))
    assert pairs.x0.shape == pairs.x1.shape == (5, 16, 2) and pairs.t.shape == (5, 16)
    for x0, x1 in zip(np.asarray(pairs.x0), np.asarray(pairs.x1), strict=True):
        # Each step's pairs are an optimal assignment between its own noise and data.
        cost = ((x1[:, None, :] - x0[None, :, :]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost)
        np.testing.assert_allclose(np.trace(cost), cost[rows, cols].sum(), rtol=1e-5)
    # Steps and blocks draw new data and noise.
    flat = np.asarray(pairs.x1).reshape(5, -1)
    assert len({row.tobytes() for row in flat}) == 5
    later = peers.block_pairs(recipe, key, jnp.int32(1))
    assert not np.allclose(later.x1, pairs.x1) and not np.allclose(later.x0, pairs.x0)


def test_bad_recipe_is_rejected():
    with pytest.raises(ValueError, match="multiple of log_every=150"):
        peers.train_fmjax(SHORT._replace(steps=100), seed=0)
    with pytest.raises(ValueError, match="divisor of log_every=150; got couple_ahead=40"):
        peers.train_fmjax(SHORT._replace(couple_ahead=40), seed=0)


def test_without_the_peers_it_says_so_and_times_fmjax_alone(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(peers, "peers_available", lambda: False)
    monkeypatch.setattr(peers, "compare", lambda recipe, torch_side: calls.append(torch_side))
    peers.run(quick=True)
    assert calls == [False]
    assert "pip install -e .[bench]" in capsys.readouterr().out


def test_torch_weights_give_the_same_velocity_in_jax():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchcfm")
    torch.manual_seed(0)
    model = peers.torch_mlp()
    x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    t = np.linspace(0, 1, 16, dtype=np.float32)
    expected = model(torch.cat([torch.from_numpy(x), torch.from_numpy(t)[:, None]], -1))
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in peers.torch_to_params(model)]
    np.testing.assert_allclose(
        peers.mlp(params, jnp.asarray(x), jnp.asarray(t)),
        expected.detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_torchcfm_half_runs():
    pytest.importorskip("torchcfm")
    run = peers.train_torchcfm(peers.Recipe(steps=5, batch_size=32), seed=0)
    assert run.losses.shape == (5,)
    assert np.all(np.isfinite(run.losses))
    assert [w.shape for w, _ in run.params] == [(3, 64), (64, 64), (64, 64), (64, 2)]
