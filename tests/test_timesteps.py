"""fmjax.timesteps: distributions, ranges, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.timesteps import logit_normal, uniform

N = 200_000


def test_uniform_moments_and_range():
    t = uniform(jax.random.key(0), (N,))
    assert t.shape == (N,) and t.dtype == jnp.float32
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
    assert abs(float(t.mean()) - 0.5) < 5 * np.sqrt(1 / 12 / N)
    assert abs(float(t.var()) - 1 / 12) < 0.002


def test_uniform_t_min():
    t = functools.partial(uniform, t_min=0.1)(jax.random.key(1), (N,))
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
    assert abs(float(t.mean()) - 0.5) < 0.005


def test_logit_normal_parameters_and_sign_convention():
    t = logit_normal(1.2, 1.2)(jax.random.key(2), (N,))
    logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    assert abs(logit.mean() - 1.2) < 5 * 1.2 / np.sqrt(N)
    assert abs(logit.std() - 1.2) < 0.01
    assert float(jnp.median(t)) == pytest.approx(1 / (1 + np.exp(-1.2)), abs=0.005)


def test_logit_normal_clips_the_tails():
    t = logit_normal(0.0, 30.0, t_min=1e-3)(jax.random.key(3), (N,))
    assert float(t.min()) == pytest.approx(1e-3) and float(t.max()) == pytest.approx(1 - 1e-3)


def test_bad_parameters():
    with pytest.raises(ValueError, match="std must be positive; got std=0"):
        logit_normal(0.0, 0.0)
    with pytest.raises(ValueError, match=r"t_min must be in \[0, 0.5\).*got 0.5"):
        logit_normal(t_min=0.5)
    with pytest.raises(ValueError, match=r"t_min must be in \[0, 0.5\).*got -0.1"):
        uniform(jax.random.key(0), (2,), t_min=-0.1)
