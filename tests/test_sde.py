"""fmjax.sde: the SDE sampler's marginals on Gaussian data, convergence, noise, steps, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.paths import AffinePath, BrownianBridge, CondOT
from fmjax.sampling import sample
from fmjax.sde import sample_sde

# Data N(MU, S^2 I). On the CondOT path x_t = t x1 + (1 - t) x0 the marginal is
# N(t MU, VAR_t I), VAR_t = t^2 S^2 + (1 - t)^2, and the exact velocity is
# E[x1 - x0 | x_t = x] = MU + (t S^2 - (1 - t)) / VAR_t (x - t MU).
MU, S = 2.0, 0.5
BATCH, DIM = 8192, 8  # 65,536 draws: the standard error of the variance is 0.0014


def _variance(t):
    return t**2 * S**2 + (1 - t) ** 2


def exact_velocity(x, t):
    t = t[:, None]
    return MU + (t * S**2 - (1 - t)) / _variance(t) * (x - t * MU)


def _moment_errors(x):
    x = np.asarray(x, np.float64)
    return abs(x.mean() - MU), abs(x.var() - S**2)


@pytest.mark.parametrize(
    ("solver", "diffusion", "t0"),
    [("euler", "sigma", 0.0), ("heun", "linear", 0.0), ("euler", "sbdm", 1e-3)],
)
def test_samples_have_the_data_mean_and_variance(solver, diffusion, t0):
    # x0 from the path's marginal at t0 (the standard normal at t0 = 0). A score of the wrong
    # sign gives a variance off by ~5, a wrong noise scale by much more than the tolerance.
    eps = jax.random.normal(jax.random.key(0), (BATCH, DIM))
    x0 = t0 * MU + np.sqrt(_variance(t0)) * eps
    out = sample_sde(
        exact_velocity, x0, jax.random.key(1), steps=100, solver=solver, diffusion=diffusion, t0=t0
    )
    mean_error, variance_error = _moment_errors(out.x)
    assert bool(out.success)
    assert int(out.nfe) == {"euler": 100, "heun": 199}[solver]
    assert mean_error < 0.01, mean_error  # 5 standard errors
    assert variance_error < 0.01, variance_error  # 7 standard errors (with the step's bias)


def test_variance_error_shrinks_with_the_steps():
    x0 = jax.random.normal(jax.random.key(0), (BATCH, DIM))

    def error(steps, solver):
        out = sample_sde(exact_velocity, x0, jax.random.key(1), steps=steps, solver=solver)
        return _moment_errors(out.x)[1]

    euler = [error(steps, "euler") for steps in (8, 16, 32)]
    # First order: the bias halves with each doubling (0.049, 0.019, 0.008).
    assert euler[1] < 0.6 * euler[0] and euler[2] < 0.6 * euler[1], euler
    heun = [error(steps, "heun") for steps in (8, 32)]
    # Faster than first order (0.050, 0.003): a quarter of the steps' size, a tenth of the error.
    assert heun[1] < 0.15 * heun[0], heun


def test_without_diffusion_it_is_the_euler_ode_solve():
    # w = 0: the drift is the velocity and every step an Euler step, the last one included.
    x0 = jax.random.normal(jax.random.key(0), (16, 3))
    out = sample_sde(exact_velocity, x0, jax.random.key(1), steps=10, diffusion_norm=0.0)
    ode = sample(exact_velocity, x0, solver="euler", steps=10)
    np.testing.assert_allclose(out.x, ode.x, rtol=1e-5, atol=1e-5)
    # A last step of its own size: the stochastic steps end at t1 - h.
    out = sample_sde(
        exact_velocity, x0, jax.random.key(1), steps=5, diffusion_norm=0.0, last_step_size=0.04
    )
    grid = np.append(np.linspace(0.0, 0.96, 5), 1.0)
    ode = sample(exact_velocity, x0, solver="euler", time_grid=grid)
    np.testing.assert_allclose(out.x, ode.x, rtol=1e-5, atol=1e-5)


def test_tweedie_last_step_is_the_posterior_mean():
    # One step from t0 = 0.5: the denoised estimate E[x1 | x_t] = MU + t S^2 / VAR_t (x - t MU).
    t = 0.5
    x = t * MU + np.sqrt(_variance(t)) * jax.random.normal(jax.random.key(0), (4, 2))
    out = sample_sde(exact_velocity, x, jax.random.key(1), steps=1, last_step="tweedie", t0=t)
    np.testing.assert_allclose(
        out.x, MU + t * S**2 / _variance(t) * (x - t * MU), rtol=1e-5, atol=1e-5
    )
    assert int(out.nfe) == 1


def test_each_example_has_its_own_noise():
    x0 = jax.random.normal(jax.random.key(0), (8, 4))
    keys = jax.random.split(jax.random.key(1), 8)
    whole = sample_sde(exact_velocity, x0, keys, steps=6).x
    halves = [sample_sde(exact_velocity, x0[i : i + 4], keys[i : i + 4], steps=6).x for i in (0, 4)]
    np.testing.assert_allclose(whole, np.concatenate(halves), rtol=1e-6, atol=1e-6)
    # Same noise start, another key: another sample; the same key: the same sample.
    other = sample_sde(exact_velocity, x0, jax.random.key(2), steps=6).x
    assert not np.allclose(whole, other)
    np.testing.assert_array_equal(whole, sample_sde(exact_velocity, x0, keys, steps=6).x)
    # The examples' noises differ: identical starts part ways.
    same_start = sample_sde(exact_velocity, jnp.zeros((2, 4)), jax.random.key(3), steps=6).x
    assert not np.allclose(same_start[0], same_start[1])


def test_model_kwargs_are_traced_not_retraced():
    traces = []

    def velocity(x, t, shift):
        traces.append(None)
        return exact_velocity(x, t) + shift

    x0 = jax.random.normal(jax.random.key(0), (4, 2))
    first = sample_sde(velocity, x0, jax.random.key(1), steps=3, model_kwargs={"shift": 0.0 * x0})
    count = len(traces)
    second = sample_sde(velocity, x0, jax.random.key(1), steps=3, model_kwargs={"shift": x0 + 1})
    assert len(traces) == count
    assert not np.allclose(first.x, second.x)


def test_bad_input_messages():
    x0 = jnp.zeros((2, 3))
    key = jax.random.key(0)
    cases = [
        (dict(solver="rk4"), r"Unknown solver 'rk4'; expected one of 'euler', 'heun'"),
        (dict(diffusion="cosine"), r"Unknown diffusion 'cosine'; expected one of 'sigma'"),
        (dict(last_step="exact"), r"Unknown last_step 'exact'"),
        (dict(steps=0), r"steps must be a positive integer; got steps=0"),
        (dict(t0=1.0), r"0 <= t0 < t1 <= 1 \(numbers\); got t0=1.0, t1=1.0"),
        (dict(last_step_size=1.5), r"last_step_size must be a number in \(0, t1 - t0\)"),
        (dict(diffusion_norm=-1.0), r"diffusion_norm must be a finite number >= 0"),
        (dict(diffusion="sbdm"), r"diffusion 'sbdm' must be finite and >= 0 .* at t=0.0"),
        (dict(diffusion=lambda t: -t), r"must be finite and >= 0 where the SDE is solved"),
        (
            dict(path=AffinePath(CondOT(), bridge=BrownianBridge(0.5))),
            r"sample_sde needs the score of a path without bridge noise",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sample_sde(exact_velocity, x0, key, **{"steps": 4, **kwargs})
    with pytest.raises(ValueError, match=r"Per-example keys must have shape \[batch\]=\(2,\)"):
        sample_sde(exact_velocity, x0, jax.random.split(key, 3), steps=4)
    with pytest.raises(ValueError, match=r"velocity_fn failed when called with"):
        sample_sde(lambda t, x: x * t[:, None], x0, key, steps=4)
