"""fmjax.paths: schedulers against closed forms, derivatives, conversions, marginals, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.paths import (
    BRIDGE_NOISES,
    VP,
    AffinePath,
    BrownianBridge,
    CondOT,
    ConstantBridge,
    Cosine,
    FunctionScheduler,
    LinearVP,
    Polynomial,
)


def _vp_closed_form(t, b=0.1, B=20.0):
    T = 0.5 * (1 - t) ** 2 * (B - b) + (1 - t) * b
    dT = -(1 - t) * (B - b) - b
    return (
        np.exp(-0.5 * T),
        np.sqrt(1 - np.exp(-T)),
        -0.5 * dT * np.exp(-0.5 * T),
        0.5 * dT * np.exp(-T) / np.sqrt(1 - np.exp(-T)),
    )


# (scheduler, numpy closed form of (alpha, sigma, d_alpha, d_sigma)), written out independently.
CLOSED_FORMS = [
    (CondOT(), lambda t: (t, 1 - t, np.ones_like(t), -np.ones_like(t))),
    (CondOT(sigma_min=0.01), lambda t: (t, 1 - 0.99 * t, np.ones_like(t), -0.99 * np.ones_like(t))),
    (Polynomial(2), lambda t: (t**2, 1 - t**2, 2 * t, -2 * t)),
    (Polynomial(0.5), lambda t: (t**0.5, 1 - t**0.5, 0.5 * t**-0.5, -0.5 * t**-0.5)),
    (
        Cosine(),
        lambda t: (
            np.sin(np.pi * t / 2),
            np.cos(np.pi * t / 2),
            np.pi / 2 * np.cos(np.pi * t / 2),
            -np.pi / 2 * np.sin(np.pi * t / 2),
        ),
    ),
    (VP(), _vp_closed_form),
    (VP(beta_min=0.5, beta_max=10.0), lambda t: _vp_closed_form(t, 0.5, 10.0)),
    (LinearVP(), lambda t: (t, np.sqrt(1 - t**2), np.ones_like(t), -t / np.sqrt(1 - t**2))),
]
IDS = ["condot", "condot_smin", "poly2", "poly0.5", "cosine", "vp", "vp_custom", "linear_vp"]
SCHEDULERS = [s for s, _ in CLOSED_FORMS]

T_INTERIOR = np.linspace(0.05, 0.95, 19)


@pytest.mark.parametrize(("scheduler", "closed_form"), CLOSED_FORMS, ids=IDS)
def test_scheduler_matches_closed_form(x64, scheduler, closed_form):
    out = scheduler(jnp.asarray(T_INTERIOR))
    for got, want in zip(out, closed_form(T_INTERIOR), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=IDS)
def test_derivatives_match_jvp_and_finite_differences(x64, scheduler):
    t = jnp.asarray(T_INTERIOR)
    out = scheduler(t)
    # The generic path (a user scheduler defined by alpha and sigma only) uses jax.jvp.
    generic = FunctionScheduler(scheduler.alpha, scheduler.sigma)(t)
    np.testing.assert_allclose(generic.d_alpha_t, out.d_alpha_t, rtol=1e-12)
    np.testing.assert_allclose(generic.d_sigma_t, out.d_sigma_t, rtol=1e-12)
    h = 1e-6
    fd_alpha = (scheduler.alpha(t + h) - scheduler.alpha(t - h)) / (2 * h)
    fd_sigma = (scheduler.sigma(t + h) - scheduler.sigma(t - h)) / (2 * h)
    np.testing.assert_allclose(out.d_alpha_t, fd_alpha, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out.d_sigma_t, fd_sigma, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("scheduler", [CondOT(), Polynomial(3), Cosine(), LinearVP()])
def test_boundary_values(scheduler):
    out0, out1 = scheduler(0.0), scheduler(1.0)
    assert float(out0.alpha_t) == 0.0 and float(out0.sigma_t) == 1.0
    assert float(out1.alpha_t) == pytest.approx(1.0) and float(out1.sigma_t) == pytest.approx(0.0)


def test_condot_sigma_min_keeps_noise_at_data_end():
    assert float(CondOT(sigma_min=0.01)(1.0).sigma_t) == pytest.approx(0.01)


def test_custom_scheduler_derivatives_come_from_jvp(x64):
    custom = FunctionScheduler(lambda t: jnp.sin(t) ** 2, lambda t: jnp.cos(t) ** 2)
    t = jnp.asarray(T_INTERIOR)
    out = custom(t)
    np.testing.assert_allclose(out.d_alpha_t, 2 * np.sin(t) * np.cos(t), rtol=1e-12)
    np.testing.assert_allclose(out.d_sigma_t, -2 * np.sin(t) * np.cos(t), rtol=1e-12)


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 3), (5, 4, 4, 2)], ids=["rank2", "rank4"])
def test_conversions_recover_the_true_quantities(x64, scheduler, shape):
    path = AffinePath(scheduler)
    k0, k1, kt = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k0, shape, jnp.float64)
    x1 = jax.random.normal(k1, shape, jnp.float64)
    t = jax.random.uniform(kt, (shape[0],), jnp.float64, 0.1, 0.9)
    s = path.sample(x0, x1, t)
    x_t, v = s.x_t, s.dx_t
    tol = {"rtol": 1e-9, "atol": 1e-9}
    np.testing.assert_allclose(path.velocity_to_target(v, x_t, t), x1, **tol)
    np.testing.assert_allclose(path.velocity_to_epsilon(v, x_t, t), x0, **tol)
    np.testing.assert_allclose(path.target_to_velocity(x1, x_t, t), v, **tol)
    np.testing.assert_allclose(path.epsilon_to_velocity(x0, x_t, t), v, **tol)
    np.testing.assert_allclose(path.epsilon_to_target(x0, x_t, t), x1, **tol)
    np.testing.assert_allclose(path.target_to_epsilon(x1, x_t, t), x0, **tol)
    # Round trips through a different parameterisation.
    np.testing.assert_allclose(
        path.target_to_velocity(path.velocity_to_target(v, x_t, t), x_t, t), v, **tol
    )
    np.testing.assert_allclose(
        path.epsilon_to_velocity(path.velocity_to_epsilon(v, x_t, t), x_t, t), v, **tol
    )


def test_sample_closed_form_and_broadcasting():
    path = AffinePath(CondOT())
    x0 = jnp.full((2, 3, 3, 1), -1.0)
    x1 = jnp.full((2, 3, 3, 1), 2.0)
    s = path.sample(x0, x1, jnp.array([0.25, 0.75]))
    np.testing.assert_allclose(s.x_t[0], jnp.full((3, 3, 1), 0.25 * 2 - 0.75))
    np.testing.assert_allclose(s.x_t[1], jnp.full((3, 3, 1), 0.75 * 2 - 0.25))
    np.testing.assert_allclose(s.dx_t, jnp.full((2, 3, 3, 1), 3.0))
    scalar = path.sample(x0, x1, 0.25)
    np.testing.assert_allclose(scalar.x_t, jnp.full((2, 3, 3, 1), -0.25))
    assert s.x_t.dtype == jnp.float32 and s.x_t.shape == x0.shape


@pytest.mark.parametrize("scheduler", [CondOT(), Cosine(), VP(), Polynomial(2)], ids=str)
def test_path_marginal_mean_and_variance(scheduler):
    # x1 ~ N(mu, s^2), x0 ~ N(0, 1) independent: x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2).
    mu, s, n = 1.5, 0.5, 400_000
    k0, k1 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(k0, (n, 1))
    x1 = mu + s * jax.random.normal(k1, (n, 1))
    for t in (0.2, 0.5, 0.8):
        c = scheduler(t)
        x_t = AffinePath(scheduler).sample(x0, x1, t).x_t
        var = float(c.alpha_t**2 * s**2 + c.sigma_t**2)
        mean_se = math.sqrt(var / n)
        assert abs(float(x_t.mean()) - float(c.alpha_t) * mu) < 5 * mean_se
        # Std. error of a Gaussian sample variance: var * sqrt(2 / n).
        assert abs(float(x_t.var()) - var) < 5 * var * math.sqrt(2 / n)


def test_jit_and_vmap():
    path = AffinePath(Cosine())
    x = jnp.ones((4, 2))
    eager = path.sample(x, 2 * x, jnp.linspace(0.1, 0.9, 4)).x_t
    jitted = jax.jit(path.sample)(x, 2 * x, jnp.linspace(0.1, 0.9, 4)).x_t
    mapped = jax.vmap(lambda a, b, t: path.sample(a[None], b[None], t).x_t[0])(
        x, 2 * x, jnp.linspace(0.1, 0.9, 4)
    )
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    np.testing.assert_allclose(eager, mapped, rtol=1e-6)


def test_bad_input_messages():
    path = AffinePath()
    with pytest.raises(ValueError, match=r"x0 and x1 must have the same shape.*\(2, 3\).*\(2, 4\)"):
        path.sample(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0.5)
    with pytest.raises(
        ValueError, match=r"t must be a scalar or have shape \[batch\]=\(2,\).*\(3,\)"
    ):
        path.sample(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"x1 must be a floating-point array.*int32"):
        path.sample(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), 0.5)
    with pytest.raises(ValueError, match=r"prediction and x_t must have the same shape"):
        path.target_to_velocity(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0.5)
    with pytest.raises(ValueError, match="sigma_min must be in"):
        CondOT(sigma_min=1.0)
    with pytest.raises(ValueError, match="positive number; got n=0"):
        Polynomial(0)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VP(beta_min=2.0, beta_max=1.0)


@pytest.mark.parametrize("scheduler", [s for s, _ in CLOSED_FORMS])
def test_to_velocity_recovers_dx_t_from_each_prediction(x64, scheduler):
    path = AffinePath(scheduler)
    k0, k1 = jax.random.split(jax.random.key(3))
    x0 = jax.random.normal(k0, (4, 3), jnp.float64)
    x1 = jax.random.normal(k1, (4, 3), jnp.float64)
    s = path.sample(x0, x1, jnp.array([0.2, 0.4, 0.6, 0.8]))
    for prediction, output in (("velocity", s.dx_t), ("target", x1), ("epsilon", x0)):
        velocity = path.to_velocity(prediction, output, s.x_t, s.t)
        np.testing.assert_allclose(velocity, s.dx_t, rtol=1e-9, atol=1e-9, err_msg=prediction)
    with pytest.raises(ValueError, match=r"Unknown prediction 'score'.*'velocity'"):
        path.to_velocity("score", x1, s.x_t, s.t)


def test_schedulers_mapping_builds_each_named_scheduler():
    from fmjax.paths import PREDICTIONS, SCHEDULERS

    assert PREDICTIONS == ("velocity", "target", "epsilon")
    options = {"condot": {"sigma_min": 0.1}, "polynomial": {"n": 3.0}}
    for name, build in SCHEDULERS.items():
        scheduler = build(**options.get(name, {}))
        out = scheduler(jnp.array([0.0, 1.0]))
        # Every named scheduler runs from (nearly) pure noise at t = 0 to data at t = 1 (VP's
        # alpha_0 is exp(-5), not 0).
        assert float(out.alpha_t[0]) < 0.01 and abs(float(out.alpha_t[1]) - 1.0) < 1e-6, name
    assert SCHEDULERS["polynomial"](n=3.0) == Polynomial(3.0)


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=IDS)
def test_velocity_to_score_is_the_gaussian_marginals_score(x64, scheduler):
    # x1 ~ N(mu, s^2), x0 ~ N(0, 1): x_t ~ N(alpha mu, V), V = alpha^2 s^2 + sigma^2, whose
    # score is -(x - alpha mu) / V, and the exact velocity is alpha' E[x1 | x] + sigma' E[x0 | x]
    # with E[x1 | x] = mu + alpha s^2 (x - alpha mu) / V and E[x0 | x] = sigma (x - alpha mu) / V.
    mu, s = 1.5, 0.5
    t = jnp.asarray(T_INTERIOR)
    x = jax.random.normal(jax.random.key(4), (t.shape[0], 3), jnp.float64) * 2.0
    c = jax.tree.map(lambda a: a[:, None], scheduler(t))
    var = c.alpha_t**2 * s**2 + c.sigma_t**2
    centred = x - c.alpha_t * mu
    velocity = c.d_alpha_t * (mu + c.alpha_t * s**2 * centred / var) + c.d_sigma_t * (
        c.sigma_t * centred / var
    )
    score = AffinePath(scheduler).velocity_to_score(velocity, x, t)
    np.testing.assert_allclose(score, -centred / var, rtol=1e-9, atol=1e-9)


def test_bridge_noises_match_closed_forms(x64):
    t = jnp.asarray(T_INTERIOR)
    brownian = BrownianBridge(0.7)
    np.testing.assert_allclose(brownian.gamma(t), 0.7 * np.sqrt(t * (1 - t)), rtol=1e-12)
    exact = 0.7 * (1 - 2 * t) / (2 * np.sqrt(t * (1 - t)))
    np.testing.assert_allclose(brownian.d_gamma(t), exact, rtol=1e-6, atol=1e-12)  # 1e-8 term
    np.testing.assert_allclose(
        jax.jvp(brownian.gamma, (t,), (jnp.ones_like(t),))[1], exact, rtol=1e-12, atol=1e-12
    )
    # At the ends gamma = 0 and the derivative is taken as 0 (torchcfm's value), not NaN.
    np.testing.assert_array_equal(brownian.d_gamma(jnp.array([0.0, 1.0])), [0.0, 0.0])
    constant = ConstantBridge(0.3)
    np.testing.assert_array_equal(constant.gamma(t), np.full(t.shape, 0.3))
    np.testing.assert_array_equal(constant.d_gamma(t), np.zeros(t.shape))


@pytest.mark.parametrize("bridge", [ConstantBridge(0.3), BrownianBridge(0.7)], ids=str)
@pytest.mark.parametrize("scheduler", [CondOT(), Cosine()], ids=str)
def test_bridge_dx_t_is_the_time_derivative_of_x_t(x64, scheduler, bridge):
    # For fixed (x0, x1, z), dx_t is d/dt of x_t = alpha x1 + sigma x0 + gamma z.
    path = AffinePath(scheduler, bridge=bridge)
    k0, k1, kz = jax.random.split(jax.random.key(5), 3)
    x0, x1, z = (jax.random.normal(k, (19, 2, 3), jnp.float64) for k in (k0, k1, kz))
    t = jnp.asarray(T_INTERIOR)
    s = path.sample(x0, x1, t, z)
    x_t, derivative = jax.jvp(lambda t: path.sample(x0, x1, t, z).x_t, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(x_t, s.x_t, rtol=1e-12)
    np.testing.assert_allclose(s.dx_t, derivative, rtol=1e-6, atol=1e-6)  # the 1e-8 term
    c = scheduler(t[:, None, None])
    np.testing.assert_allclose(
        s.x_t, c.alpha_t * x1 + c.sigma_t * x0 + bridge.gamma(t)[:, None, None] * z, rtol=1e-12
    )
    assert s.z is z


def test_bridge_noise_errors_and_mapping():
    x = jnp.zeros((2, 3))
    with pytest.raises(
        ValueError, match=r"z, the bridge noise, is needed exactly when.*bridge=None"
    ):
        AffinePath(CondOT()).sample(x, x, 0.5, x)
    with pytest.raises(ValueError, match=r"needed exactly when.*BrownianBridge.*z None"):
        AffinePath(CondOT(), bridge=BrownianBridge(1.0)).sample(x, x, 0.5)
    with pytest.raises(ValueError, match=r"z and x1 must have the same shape"):
        AffinePath(CondOT(), bridge=ConstantBridge(1.0)).sample(x, x, 0.5, jnp.zeros((2, 4)))
    for bad in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match=r"sigma must be a positive finite number"):
            BrownianBridge(bad)
    assert BRIDGE_NOISES["constant"](sigma=0.2) == ConstantBridge(0.2)
    assert BRIDGE_NOISES["brownian"](sigma=0.2) == BrownianBridge(0.2)
