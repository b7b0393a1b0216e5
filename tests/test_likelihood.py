"""fmjax.likelihood: analytic Gaussian densities, Hutchinson's unbiasedness, bits/dim, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.likelihood import (
    bits_per_dim,
    dequantize,
    dequantized_bits_per_dim,
    log_likelihood,
    standard_normal_log_prob,
)

S = np.array([[0.5, 2.0, 1.5]])  # shape [1, dims], like MU
MU = np.array([[1.0, -2.0, 0.5]])
# A rotation, so that the Jacobian of the velocity is not diagonal.
Q = np.linalg.qr(np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0], [0.0, 1.0, 3.0]]))[0]


def rotated_gaussian(dtype):
    """Data N(mu, Q diag(s^2) Q^T) on the CondOT path: velocity, exact log-density, exact x0.

    In the eigenbasis Q every coordinate is the 1-D Gaussian flow, whose marginal velocity is
    mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu) and which maps x0 to mu + s x0.
    """
    q, s, mu = (jnp.asarray(a, dtype) for a in (Q, S, MU))

    def velocity(x, t):  # t: [batch]
        t = t[:, None]
        gain = (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)
        return mu + ((x - t * mu) @ q * gain) @ q.T

    def log_prob(x1):
        z = (x1 - mu) @ q / s
        return (
            -0.5 * jnp.sum(z**2, axis=1)
            - jnp.sum(jnp.log(s))
            - 0.5 * s.shape[1] * math.log(2 * math.pi)
        )

    def inverse(x1):
        return (x1 - mu) @ q / s @ q.T

    return velocity, log_prob, inverse


def data(batch, dtype, seed=0):
    z = jax.random.normal(jax.random.key(seed), (batch, 3), dtype)
    return jnp.asarray(MU, dtype) + (z * jnp.asarray(S, dtype)) @ jnp.asarray(Q.T, dtype)


def test_exact_divergence_gives_the_analytic_density(x64):
    velocity, log_prob, inverse = rotated_gaussian(jnp.float64)
    x1 = data(16, jnp.float64)
    out = log_likelihood(velocity, x1, rtol=1e-10, atol=1e-10)
    assert bool(out.success)
    assert out.log_prob.shape == (16,)
    np.testing.assert_allclose(out.log_prob, log_prob(x1), rtol=0, atol=1e-7)
    np.testing.assert_allclose(out.x0, inverse(x1), rtol=0, atol=1e-7)


def test_fixed_step_solver_and_float32():
    velocity, log_prob, _ = rotated_gaussian(jnp.float32)
    x1 = data(16, jnp.float32)
    out = log_likelihood(velocity, x1, solver="rk4", steps=20)
    assert out.log_prob.dtype == jnp.float32
    assert int(out.nfe) == 80
    np.testing.assert_allclose(out.log_prob, log_prob(x1), atol=1e-3)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    velocity, log_prob, _ = rotated_gaussian(jnp.float32)
    n = 512
    # One point repeated: each copy gets its own probe, so the batch holds n estimates.
    x1 = jnp.broadcast_to(data(1, jnp.float32), (n, 3))
    out = log_likelihood(
        velocity,
        x1,
        key=jax.random.key(3),
        divergence="hutchinson",
        probe=probe,
        rtol=1e-6,
        atol=1e-6,
    )
    assert bool(out.success)
    estimates = np.asarray(out.log_prob, np.float64)
    standard_error = estimates.std() / math.sqrt(n)
    assert estimates.std() > 1e-3  # the probes really vary: this is not the exact trace
    assert abs(estimates.mean() - float(log_prob(x1[:1])[0])) < 4 * standard_error


def test_hutchinson_variance_falls_with_more_probes():
    velocity, _, _ = rotated_gaussian(jnp.float32)
    x1 = jnp.broadcast_to(data(1, jnp.float32), (256, 3))

    def spread(num_probes):
        out = log_likelihood(
            velocity, x1, key=jax.random.key(4), divergence="hutchinson", num_probes=num_probes
        )
        return float(jnp.std(out.log_prob))

    assert spread(8) < 0.6 * spread(1)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_nfe_equals_the_number_of_calls(divergence):
    velocity, _, _ = rotated_gaussian(jnp.float32)
    calls = [0]

    def increment():
        calls[0] += 1

    def counted(x, t):
        jax.debug.callback(increment)
        return velocity(x, t)

    out = log_likelihood(
        counted, data(4, jnp.float32), key=jax.random.key(0), divergence=divergence
    )
    out.log_prob.block_until_ready()
    jax.effects_barrier()
    assert int(out.nfe) == calls[0]


def test_matmuls_are_traced_at_full_precision():
    seen = []

    def velocity(x, t):
        seen.append(jax.config.jax_default_matmul_precision)
        return -x

    log_likelihood(velocity, data(2, jnp.float32), solver="euler", steps=2)
    assert seen and all(p == "highest" for p in seen[1:])


def test_bits_per_dim():
    # The uniform density on [-1, 1]^D is 2^-D: 8 bits per 8-bit dimension.
    np.testing.assert_allclose(bits_per_dim(jnp.array([-10 * math.log(2.0)]), 10), [8.0])
    # A 1-bit image has 2 levels mapped to [-1, 1] with no Jacobian term: bpd = -log2 p / D.
    np.testing.assert_allclose(bits_per_dim(-2.0 * math.log(2.0), 2, num_bins=2), 1.0)
    # The data passed by mistake for num_dims: named by shape, not printed whole.
    x = jnp.zeros((500, 2))
    with pytest.raises(ValueError, match=r"size of one example.*array of shape \(500, 2\)") as e:
        bits_per_dim(jnp.zeros(500), x)
    assert len(str(e.value)) < 200


def test_dequantize_formula_and_range():
    images = jnp.array([[0, 1, 128, 255]], jnp.uint8)
    key = jax.random.key(7)
    x = dequantize(key, images)
    u = jax.random.uniform(key, images.shape, jnp.float32)
    np.testing.assert_allclose(x, 2 * (images + u) / 256 - 1, rtol=1e-6)
    assert bool(jnp.all((x >= -1) & (x < 1)))
    with pytest.raises(ValueError, match=r"dequantize expects integer images.*got dtype float32"):
        dequantize(key, images.astype(jnp.float32))


def test_dequantized_bits_per_dim_averages_the_draws():
    # The zero field leaves the prior N(0, I): bpd of each dequantised draw is known.
    images = jax.random.randint(jax.random.key(1), (3, 2, 2, 1), 0, 256).astype(jnp.uint8)
    key = jax.random.key(2)
    out = dequantized_bits_per_dim(lambda x, t: jnp.zeros_like(x), key, images, num_draws=4)
    assert bool(out.success) and out.bpd.shape == (3,)
    expected = []
    for draw_key in jax.random.split(key, 4):
        x = dequantize(jax.random.split(draw_key)[0], images).reshape(3, -1)
        log_p = -0.5 * jnp.sum(x**2, axis=1) - 2 * math.log(2 * math.pi)
        expected.append(-log_p / (4 * math.log(2.0)) + 7.0)
    np.testing.assert_allclose(out.bpd, np.mean(expected, axis=0), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"divergence": "skilling"},
            r"Unknown divergence 'skilling'; expected one of 'exact', 'hutchinson'",
        ),
        ({"divergence": "hutchinson"}, r"pass key="),
        ({"probe": "sphere"}, r"Unknown probe 'sphere'; expected one of 'rademacher', 'gaussian'"),
        ({"num_probes": 0}, r"num_probes must be a positive integer"),
        ({"solver": "rk45"}, r"Unknown solver 'rk45'"),
        ({"solver": "heun"}, r"needs exactly one of steps"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(lambda x, t: -x, data(2, jnp.float32), **kwargs)


def test_bad_velocity_raises():
    with pytest.raises(ValueError, match=r"velocity_fn\(x, t\) must return an array of the shape"):
        log_likelihood(lambda x, t: x.sum(axis=1), data(2, jnp.float32))


# --- sources other than N(0, I), and model inputs ---------------------------------------------

SOURCE_MEAN = np.array([[0.5, -1.0, 2.0]])
SOURCE_STD = 1.7
RATE = np.array([[0.3, -0.8, 1.1]])  # u(x, t) = RATE * x + DRIFT, a diagonal linear field
DRIFT = np.array([[1.0, 0.0, -0.5]])


def gaussian_source_log_p0(x0):
    z = (x0 - SOURCE_MEAN) / SOURCE_STD
    return -0.5 * jnp.sum(z**2, axis=1) - 3 * math.log(SOURCE_STD * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_a_non_standard_gaussian_source_gives_the_analytic_density(x64, divergence):
    # dx/dt = a x + b carries x0 to x1 = e^a x0 + (b / a)(e^a - 1), so with x0 ~ N(m, s^2 I),
    # log p1(x1) = log N(x0; m, s^2 I) - sum(a). Rademacher probes of a diagonal Jacobian give
    # its trace exactly, so Hutchinson's estimate is exact here too.
    rate, drift = jnp.asarray(RATE), jnp.asarray(DRIFT)
    x1 = jax.random.normal(jax.random.key(5), (6, 3), jnp.float64) * 2.0
    x0 = (x1 - drift / rate * (jnp.exp(rate) - 1)) * jnp.exp(-rate)
    expected = gaussian_source_log_p0(x0) - jnp.sum(rate)
    out = log_likelihood(
        lambda x, t: rate * x + drift,
        x1,
        log_p0=gaussian_source_log_p0,
        key=jax.random.key(0),
        divergence=divergence,
        rtol=1e-10,
        atol=1e-10,
    )
    assert bool(out.success)
    np.testing.assert_allclose(out.x0, x0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.log_prob, expected, rtol=0, atol=1e-8)
    # The default source is the standard normal.
    default = log_likelihood(lambda x, t: rate * x + drift, x1, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        default.log_prob, standard_normal_log_prob(x0) - jnp.sum(rate), rtol=0, atol=1e-8
    )


def test_standard_normal_log_prob():
    x = jnp.array([[0.0, 0.0], [1.0, -2.0]])
    np.testing.assert_allclose(
        standard_normal_log_prob(x), [-math.log(2 * math.pi), -math.log(2 * math.pi) - 2.5]
    )


@pytest.mark.parametrize(
    ("log_p0", "match"),
    [
        (0.0, r"log_p0 must be a function log_p0\(x0\) -> \[batch\]"),
        (
            lambda x0: x0,
            r"one float log-density per example; expected .*\[batch\]=\(2,\).*float32\[2, 3\]",
        ),
        (lambda x0, scale: x0, r"log_p0 failed when called with x0: float32\[2, 3\] \(TypeError"),
    ],
)
def test_bad_log_p0_raises(log_p0, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(lambda x, t: -x, data(2, jnp.float32), log_p0=log_p0)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_model_kwargs_are_traced_and_do_not_enter_the_divergence(divergence):
    traces = [0]

    def velocity(x, t, shift):
        traces[0] += 1
        return shift - x  # x1 = shift + (x0 - shift) / e; divergence -D

    x1 = data(4, jnp.float32)
    for seed in (1, 2):
        shift = jax.random.normal(jax.random.key(seed), (4, 3))
        out = log_likelihood(
            velocity,
            x1,
            model_kwargs={"shift": shift},
            key=jax.random.key(0),
            divergence=divergence,
            rtol=1e-6,
            atol=1e-6,
        )
        x0 = shift + (x1 - shift) * math.e
        np.testing.assert_allclose(out.log_prob, standard_normal_log_prob(x0) + 3.0, rtol=1e-4)
        if seed == 1:
            after_first = traces[0]
    assert traces[0] == after_first
