"""fmjax.meanflow: the exact average velocity of a Gaussian flow, its loss and its sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.meanflow import (
    logit_normal_intervals,
    meanflow_loss,
    sample,
    uniform_intervals,
)

MU = jnp.array([[2.0, -1.0]])  # [1, 2]: broadcasts over the batch
S = 0.5  # data ~ N(MU, S^2 I); noise N(0, I); CondOT path x_t = t x1 + (1 - t) x0


def _sigma(t):
    return jnp.sqrt(t**2 * S**2 + (1 - t) ** 2)


def exact_u(x, t, t_end):
    """The exact average velocity of the marginal flow of the Gaussian above.

    The flow map is affine, x -> m_e + (sigma_e / sigma_t)(x - m_t) with m_t = t MU, so the
    average velocity is MU + (sigma_e - sigma_t) / ((t_end - t) sigma_t) (x - t MU); the
    divided difference is written without the division by t_end - t, so t_end = t gives the
    instantaneous velocity.
    """
    t, t_end = t[:, None], t_end[:, None]
    divided = (S**2 * (t_end + t) - (2 - t_end - t)) / (_sigma(t_end) + _sigma(t))
    return MU + divided / _sigma(t) * (x - t * MU)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sample_with_the_exact_average_velocity_lands_on_the_flow(x64, steps):
    x0 = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
    result = sample(exact_u, x0, steps=steps)
    np.testing.assert_allclose(result.x, MU + S * x0, rtol=1e-12, atol=1e-12)
    assert int(result.nfe) == steps and bool(result.success)


def test_the_exact_field_satisfies_the_mean_flow_identity(x64):
    x = jax.random.normal(jax.random.key(1), (16, 2), jnp.float64)
    t = jnp.linspace(0.1, 0.6, 16)
    t_end = t + 0.3
    v = exact_u(x, t, t)
    u, du = jax.jvp(exact_u, (x, t, t_end), (v, jnp.ones_like(t), jnp.zeros_like(t)))
    np.testing.assert_allclose(u, v + (t_end - t)[:, None] * du, rtol=1e-10, atol=1e-12)


def _grad(offset, key, adaptive_power=0.0):
    def apply_fn(theta, x_t, t, t_end):
        return exact_u(x_t, t, t_end) + theta[None]

    x1 = MU + S * jax.random.normal(jax.random.fold_in(key, 1), (40_000, 2), jnp.float64)
    loss = lambda theta: meanflow_loss(  # noqa: E731
        apply_fn,
        theta,
        key,
        x1,
        interval_sampler=uniform_intervals(equal_fraction=0.25),
        adaptive_power=adaptive_power,
    )[0]
    return jax.grad(loss)(jnp.full((2,), offset, jnp.float64))


def test_the_loss_gradient_vanishes_at_the_exact_solution_only(x64):
    key = jax.random.key(2)
    at_solution = _grad(0.0, key)
    perturbed = _grad(0.5, key)
    # The regression target is unbiased at the solution: its gradient is sampling noise.
    assert float(jnp.max(jnp.abs(at_solution))) < 0.03
    # d/dtheta of the mean over the 2 coordinates of Delta^2 is E[Delta] = theta, plus noise.
    np.testing.assert_allclose(perturbed, [0.5, 0.5], atol=0.03)


def test_adaptive_weight_is_a_stopped_inverse_power(x64):
    def apply_fn(theta, x_t, t, t_end):
        return exact_u(x_t, t, t_end) + theta[None]

    x1 = MU + S * jax.random.normal(jax.random.key(3), (256, 2), jnp.float64)
    theta = jnp.full((2,), 0.3, jnp.float64)
    loss, aux = meanflow_loss(apply_fn, theta, jax.random.key(4), x1, adaptive_power=0.75)
    np.testing.assert_allclose(aux.weight, (aux.per_example + 1e-3) ** -0.75, rtol=1e-12)
    np.testing.assert_allclose(loss, np.mean(aux.weight * aux.per_example), rtol=1e-12)
    plain, aux0 = meanflow_loss(apply_fn, theta, jax.random.key(4), x1, adaptive_power=0)
    np.testing.assert_array_equal(aux0.weight, 1.0)
    np.testing.assert_allclose(plain, np.mean(aux0.per_example), rtol=1e-12)


def test_loss_draws_per_example_so_splitting_the_batch_changes_nothing():
    def apply_fn(w, x_t, t, t_end):
        return w * x_t + (t_end - t)[:, None]

    x1 = jax.random.normal(jax.random.key(5), (8, 3))
    keys = jax.random.split(jax.random.key(6), 8)
    whole = meanflow_loss(apply_fn, 0.3, keys, x1)[1].per_example
    halves = [meanflow_loss(apply_fn, 0.3, keys[i : i + 4], x1[i : i + 4])[1] for i in (0, 4)]
    np.testing.assert_allclose(whole, np.concatenate([h.per_example for h in halves]), rtol=1e-6)


@pytest.mark.parametrize(
    "sampler",
    [uniform_intervals(equal_fraction=0.3), logit_normal_intervals(2.0, 2.0, equal_fraction=0.3)],
)
def test_interval_samplers_order_the_times_and_keep_the_equal_fraction(sampler):
    times = sampler(jax.random.key(7), (20_000,))
    t, t_end = times[:, 0], times[:, 1]
    assert bool(jnp.all((0 <= t) & (t <= t_end) & (t_end <= 1)))
    assert abs(float(jnp.mean(t == t_end)) - 0.3) < 0.02


def test_the_papers_cifar10_recipe_leans_to_the_data_end():
    # py-meanflow's CIFAR-10: logit-normal mean -2 with noise at 1, i.e. +2 here.
    times = logit_normal_intervals(2.0, 2.0, equal_fraction=0.0)(jax.random.key(8), (20_000,))
    assert float(jnp.median(times[:, 1])) > 0.9


def test_bad_input_messages():
    def apply_fn(w, x_t, t, t_end):
        return x_t

    x1 = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"adaptive_power=-1.*>= 0"):
        meanflow_loss(apply_fn, None, jax.random.key(0), x1, adaptive_power=-1)
    with pytest.raises(ValueError, match=r"adaptive_eps=0.*> 0"):
        meanflow_loss(apply_fn, None, jax.random.key(0), x1, adaptive_eps=0)
    with pytest.raises(ValueError, match=r"shape=\(\) it returned shape \(\)"):
        meanflow_loss(
            apply_fn, None, jax.random.key(0), x1, interval_sampler=lambda k, s: jnp.zeros(s)
        )
    with pytest.raises(ValueError, match=r"shaped like x1 \(4, 2\); got \(4,\)"):
        meanflow_loss(lambda w, x, t, e: t, None, jax.random.key(0), x1)
    with pytest.raises(ValueError, match=r"equal_fraction=1\.5"):
        uniform_intervals(equal_fraction=1.5)
    with pytest.raises(ValueError, match=r"t_end < t.*\[0\.0, 0\.75, 0\.5, 1\.0\]"):
        sample(lambda x, t, e: x, x1, time_grid=jnp.array([0.0, 0.75, 0.5, 1.0]))
    with pytest.raises(ValueError, match="steps=0"):
        sample(lambda x, t, e: x, x1, steps=0)


def test_sample_jits_and_takes_a_grid():
    # The exact average velocity to a point mass at MU: (MU - x_t) / (1 - t), whatever t_end.
    u = jax.jit(lambda x, t, e: (MU - x) / (1 - t[:, None]))
    grid = jnp.array([0.0, 0.5, 1.0])
    result = jax.jit(lambda x0: sample(u, x0, time_grid=grid))(jnp.zeros((3, 2)))
    np.testing.assert_allclose(result.x, jnp.broadcast_to(MU, (3, 2)), rtol=1e-6)
    assert int(result.nfe) == 2


def test_sample_passes_model_kwargs_as_traced_arguments():
    traces = [0]

    def u(x, t, t_end, target):  # the exact average velocity to a point mass at `target`
        traces[0] += 1
        return (target - x) / (1 - t[:, None])

    for seed in (0, 1):
        target = jax.random.normal(jax.random.key(seed), (3, 2))
        result = sample(u, jnp.zeros((3, 2)), steps=2, model_kwargs={"target": target})
        np.testing.assert_allclose(result.x, target, rtol=1e-6)
        if seed == 0:
            after_first = traces[0]
    assert traces[0] == after_first == 1  # new targets reuse the compiled jumps


# Training-time guidance. A network constant in x and t, one vector a_y per label (row
# NULL is the unconditional one): its Jacobian-vector product is zero, so the target is the
# guided field itself, omega * dx_t + kappa * a_y + (1 - omega - kappa) * a_null.
NULL = 3


def _per_label(table, x_t, t, t_end, y):
    return jnp.broadcast_to(table[y], x_t.shape)


def _guided_case(guidance, labels, x64):
    from fmjax.loss import draw_pairs
    from fmjax.paths import AffinePath, CondOT

    table = jax.random.normal(jax.random.key(5), (NULL + 1, 2), jnp.float64)
    x1 = jax.random.normal(jax.random.key(6), (labels.shape[0], 2), jnp.float64)
    sampler = uniform_intervals(equal_fraction=0.5)
    key = jax.random.key(7)
    loss, aux = meanflow_loss(
        _per_label, table, key, x1, interval_sampler=sampler, adaptive_power=0.0,
        example_kwargs={"y": labels}, guidance=guidance,
    )  # fmt: skip
    pairs = draw_pairs(key, x1, time_sampler=sampler)
    dx = AffinePath(CondOT()).sample(pairs.x0, pairs.x1, pairs.t[:, 0]).dx_t
    return table, loss, aux, dx, key, x1, sampler


def test_guided_target_is_the_papers_combination(x64):
    from fmjax.meanflow import MeanFlowGuidance

    labels = jnp.array([0, 1, 2, NULL, 0, 1, 2, NULL])
    guidance = MeanFlowGuidance(null_label=NULL, omega=1.5, kappa=0.25, interval=(0.2, 0.9))
    table, _, aux, dx, *_ = _guided_case(guidance, labels, x64)
    guided = 1.5 * dx + 0.25 * table[labels] + (1 - 1.5 - 0.25) * table[NULL][None]
    on = (labels != NULL) & (aux.t >= 0.2) & (aux.t <= 0.9)
    assert 0 < int(on.sum()) < labels.shape[0]  # both branches are exercised
    target = jnp.where(on[:, None], guided, dx)
    expected = jnp.mean(jnp.square(table[labels] - target), axis=1)
    np.testing.assert_allclose(aux.per_example, expected, rtol=1e-6)  # the loss is float32


def test_guidance_with_omega_one_kappa_zero_is_no_guidance(x64):
    from fmjax.meanflow import MeanFlowGuidance

    labels = jnp.array([0, 1, 2, NULL])
    off = MeanFlowGuidance(null_label=NULL, omega=1.0, kappa=0.0)
    _, guided_loss, *_ = _guided_case(off, labels, x64)
    _, plain_loss, *_ = _guided_case(None, labels, x64)
    np.testing.assert_allclose(guided_loss, plain_loss, rtol=1e-14)


def test_guidance_terms_carry_no_gradient(x64):
    from fmjax.meanflow import MeanFlowGuidance

    # No example has the null label, so row NULL enters only the (stopped) target.
    labels = jnp.array([0, 1, 2, 0])
    guidance = MeanFlowGuidance(null_label=NULL, omega=2.0, kappa=0.5)
    table, _, _, _, key, x1, sampler = _guided_case(guidance, labels, x64)

    def loss_of(table):
        return meanflow_loss(
            _per_label, table, key, x1, interval_sampler=sampler, adaptive_power=0.0,
            example_kwargs={"y": labels}, guidance=guidance,
        )[0]  # fmt: skip

    grad = jax.grad(loss_of)(table)
    np.testing.assert_array_equal(grad[NULL], 0.0)
    assert float(jnp.abs(grad[:NULL]).sum()) > 0


def test_guidance_bad_options():
    from fmjax.meanflow import MeanFlowGuidance

    x1 = jnp.zeros((4, 2))
    labels = jnp.zeros((4,), jnp.int32)
    cases = [
        (MeanFlowGuidance(null_label=NULL, kappa=-0.1), {"y": labels}, "kappa"),
        (MeanFlowGuidance(null_label=NULL, interval=(0.8, 0.2)), {"y": labels}, "interval"),
        (MeanFlowGuidance(null_label=NULL, omega=float("nan")), {"y": labels}, "omega"),
        (MeanFlowGuidance(null_label=NULL), {}, "labels"),
    ]
    for guidance, example_kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            meanflow_loss(
                _per_label, jnp.zeros((NULL + 1, 2)), jax.random.key(0), x1,
                example_kwargs=example_kwargs, guidance=guidance,
            )  # fmt: skip


def test_the_clip_order_keeps_the_start_times_law_and_the_end_its_own():
    # py-meanflow's v1 sampler: t ~ logit-normal(0.6, 1.6) whatever the pairing; t_end is
    # t (25%) or max(t, b) with b ~ logit-normal(4.0, 1.6).
    sampler = logit_normal_intervals(
        0.6, 1.6, equal_fraction=0.25, end_mean=4.0, end_std=1.6, order="clip"
    )
    times = np.asarray(sampler(jax.random.key(3), (40_000,)))
    t, t_end = times[:, 0], times[:, 1]
    assert np.all(t <= t_end)
    np.testing.assert_allclose(np.median(t), 1 / (1 + np.exp(-0.6)), atol=0.01)
    # P(b <= t) = Phi(-3.4 / (1.6 sqrt 2)) = 0.0665 more pairs end where they start.
    np.testing.assert_allclose(np.mean(t == t_end), 0.25 + 0.75 * 0.0665, atol=0.01)
    logit_end = np.log(t_end / (1 - t_end))[t != t_end]
    rng = np.random.default_rng(0)  # b's law given b > t, by direct simulation of logits
    a, b = rng.normal(0.6, 1.6, 10**6), rng.normal(4.0, 1.6, 10**6)
    assert abs(np.median(logit_end) - np.median(b[b > a])) < 0.05
    # The paper's "sort" order takes t as the smaller draw: with b's law low, t follows b.
    sort, clip = (
        logit_normal_intervals(0.6, 1.6, end_mean=-4.0, end_std=1.6, order=order)(
            jax.random.key(3), (40_000,)
        )[:, 0]
        for order in ("sort", "clip")
    )
    assert float(jnp.median(sort)) < 0.05 < 0.6 < float(jnp.median(clip))
    with pytest.raises(ValueError, match="order='shuffle'"):
        logit_normal_intervals(order="shuffle")
