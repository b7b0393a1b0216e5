"""fmjax.loss.cfm_loss: hand computation, per-example keys, jit/vmap/grad, training, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax.couplings import Coupled, exact_ot, independent
from fmjax.loss import cfm_loss, cfm_loss_on_pairs, draw_pairs
from fmjax.paths import AffinePath, BrownianBridge, CondOT, ConstantBridge, Cosine
from fmjax.timesteps import uniform

B, D = 6, 3


def linear_model(w, x_t, t):
    return x_t @ w + t[:, None]


@pytest.fixture
def data():
    # float64 under the x64 fixture, float32 otherwise.
    rng = np.random.default_rng(5)
    return jnp.asarray(2.0 * rng.normal(size=(B, D)) + 1.0), jnp.asarray(rng.normal(size=(D, D)))


def _hand_draws(key, x1, t_min=0.0):
    """The documented randomness contract: split into per-example keys, each into 3."""
    x0, t = [], []
    for k in jax.random.split(key, x1.shape[0]):
        k_noise, k_time, _ = jax.random.split(k, 3)
        x0.append(jax.random.normal(k_noise, x1.shape[1:], x1.dtype))
        t.append(uniform(k_time, (), t_min=t_min))
    return jnp.stack(x0), jnp.stack(t).astype(x1.dtype)


@pytest.mark.parametrize(
    ("prediction", "loss_space"),
    [
        ("velocity", "prediction"),
        ("target", "prediction"),
        ("epsilon", "prediction"),
        ("target", "velocity"),
        ("epsilon", "velocity"),
    ],
)
def test_equals_hand_computation(x64, data, prediction, loss_space):
    x1, w = data
    key = jax.random.key(11)
    sampler = functools.partial(uniform, t_min=0.05)
    loss, aux = cfm_loss(
        linear_model,
        w,
        key,
        x1,
        time_sampler=sampler,
        prediction=prediction,
        loss_space=loss_space,
    )
    x0, t = _hand_draws(key, x1, t_min=0.05)
    tt = t[:, None]
    x_t = tt * x1 + (1 - tt) * x0  # CondOT
    out = x_t @ w + tt
    if loss_space == "velocity":
        # CondOT conversions written out: v = (x1_hat - x_t) / (1 - t) = (x_t - eps_hat) / t.
        out = (out - x_t) / (1 - tt) if prediction == "target" else (x_t - out) / tt
        target = x1 - x0
    else:
        target = {"velocity": x1 - x0, "target": x1, "epsilon": x0}[prediction]
    per_example = ((out - target) ** 2).mean(axis=1)
    np.testing.assert_allclose(aux.t, t, rtol=1e-6)
    np.testing.assert_allclose(aux.per_example, per_example, rtol=1e-5)
    np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-5)


def test_per_example_keys_whole_or_in_halves(data):
    x1, w = data
    keys = jax.random.split(jax.random.key(0), B)
    path = AffinePath(Cosine())
    loss_fn = functools.partial(cfm_loss, linear_model, w, path=path)
    _, whole = loss_fn(keys, x1)
    _, first = loss_fn(keys[:2], x1[:2])
    _, rest = loss_fn(keys[2:], x1[2:])
    np.testing.assert_array_equal(
        whole.per_example, jnp.concatenate([first.per_example, rest.per_example])
    )
    # One key is the same as the per-example keys it splits into.
    _, single = loss_fn(jax.random.key(0), x1)
    np.testing.assert_array_equal(single.per_example, whole.per_example)
    # Raw uint32 keys (jax.random.PRNGKey) are accepted and equal to typed ones.
    _, legacy = loss_fn(jax.random.PRNGKey(0), x1)
    _, typed = loss_fn(jax.random.wrap_key_data(jax.random.PRNGKey(0)), x1)
    np.testing.assert_array_equal(legacy.per_example, typed.per_example)


def test_gradient_is_finite_and_nonzero(data):
    x1, w = data
    grad = jax.grad(lambda w: cfm_loss(linear_model, w, jax.random.key(0), x1)[0])(w)
    assert grad.shape == w.shape
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


def test_no_recompilation_on_new_data():
    traces = []

    def model(w, x_t, t):
        traces.append(1)  # runs once per trace, not per call
        return x_t @ w

    loss_fn = jax.jit(lambda w, k, x: cfm_loss(model, w, k, x, coupling=exact_ot)[0])
    w = jnp.eye(D)
    for seed in range(3):
        x1 = jax.random.normal(jax.random.key(seed), (B, D))
        loss_fn(w, jax.random.key(seed), x1).block_until_ready()
    assert len(traces) == 1


def test_safe_under_vmap(data):
    x1, w = data
    groups = jnp.stack([x1, x1[::-1]])
    keys = jax.random.split(jax.random.key(1), 2)
    mapped = jax.vmap(lambda k, x: cfm_loss(linear_model, w, k, x, coupling=exact_ot)[0])(
        keys, groups
    )
    for i in range(2):
        np.testing.assert_allclose(
            mapped[i],
            cfm_loss(linear_model, w, keys[i], groups[i], coupling=exact_ot)[0],
            rtol=1e-6,
        )


def test_example_kwargs_follow_x1_through_the_coupling():
    labels = jnp.arange(4.0)
    x1 = jnp.tile(labels[:, None], (1, 2))  # example i is labels[i] everywhere

    def reverse(key, x0, x1):
        order = jnp.arange(x1.shape[0])[::-1]
        return Coupled(x0, x1[order], jnp.arange(x1.shape[0]), order)

    def model(params, x_t, t, y):
        return jnp.tile(y[:, None], (1, 2))  # predicts its label: exact when labels follow x1

    loss, _ = cfm_loss(
        model,
        None,
        jax.random.key(0),
        x1,
        coupling=reverse,
        prediction="target",
        example_kwargs={"y": labels},
    )
    assert float(loss) == 0.0
    loss_ignored, _ = cfm_loss(
        model, None, jax.random.key(0), x1, coupling=reverse, prediction="target",
        model_kwargs={"y": labels},
    )  # fmt: skip
    assert float(loss_ignored) > 1.0


@pytest.mark.parametrize("coupling", ["exact_ot", "reverse"])
def test_cfm_loss_is_draw_pairs_then_the_loss_on_pairs(coupling):
    # The halves compose to the whole, values and gradients, with couplings that reorder and
    # labels that must follow the data: drawing pairs ahead changes nothing.
    x1 = jax.random.normal(jax.random.key(3), (8, 2)) + 2.0
    labels = jnp.arange(8.0)
    w = jax.random.normal(jax.random.key(4), (2, 2))

    def model(w, x_t, t, y):
        return x_t @ w + (t * y)[:, None]

    def reverse(key, x0, x1):
        order = jnp.arange(x1.shape[0])[::-1]
        return Coupled(x0[order], x1[order], order, order)

    coupling = {"exact_ot": exact_ot, "reverse": reverse}[coupling]
    key = jax.random.key(5)
    sampler = functools.partial(uniform, t_min=0.1)
    options = {"example_kwargs": {"y": labels}, "prediction": "target", "loss_space": "velocity"}

    def whole(w):
        return cfm_loss(model, w, key, x1, coupling=coupling, time_sampler=sampler, **options)

    def halves(w, pairs):
        return cfm_loss_on_pairs(model, w, pairs, **options)

    pairs = draw_pairs(key, x1, coupling=coupling, time_sampler=sampler)
    expected = jax.jit(jax.value_and_grad(whole, has_aux=True))(w)
    got = jax.jit(jax.value_and_grad(halves, has_aux=True))(w, pairs)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    if coupling is reverse:  # the pairs carry the data reversed, and the indices to follow it
        np.testing.assert_array_equal(pairs.x1, x1[::-1])
        np.testing.assert_array_equal(pairs.i1, jnp.arange(8)[::-1])


def test_draw_pairs_ahead_for_many_steps_under_vmap():
    # A stack of steps drawn at once (one host call, threads) gives each step's own pairs.
    x1 = jax.random.normal(jax.random.key(6), (5, 16, 3))
    keys = jax.random.split(jax.random.key(7), 5)
    stacked = jax.jit(jax.vmap(functools.partial(draw_pairs, coupling=exact_ot)))(keys, x1)
    for i in range(5):
        single = draw_pairs(keys[i], x1[i], coupling=exact_ot)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), stacked, single)
    # The coupling did reorder the noise: OT pairs cost less than the pairs as drawn.
    x0_drawn = jax.vmap(lambda k, x: draw_pairs(k, x).x0)(keys, x1)
    ot_cost = jnp.sum((stacked.x0 - stacked.x1) ** 2)
    assert float(ot_cost) < float(jnp.sum((x0_drawn - x1) ** 2))


def test_bad_pairs_messages(data):
    x1, w = data
    pairs = draw_pairs(jax.random.key(0), x1)
    with pytest.raises(ValueError, match=r"pairs.t must have shape \[batch\]=\(6,\).*got \(5,\)"):
        cfm_loss_on_pairs(linear_model, w, pairs._replace(t=pairs.t[:5]))
    with pytest.raises(ValueError, match=r"pairs.i1 must have shape .*got \(\)"):
        cfm_loss_on_pairs(linear_model, w, pairs._replace(i1=jnp.int32(0)))
    with pytest.raises(ValueError, match=r"pairs.x0 and pairs.x1 must have the same shape"):
        cfm_loss_on_pairs(linear_model, w, pairs._replace(x0=pairs.x0[:, :2]))
    with pytest.raises(ValueError, match=r"pairs.x1 must be a floating-point array"):
        cfm_loss_on_pairs(linear_model, w, pairs._replace(x1=pairs.x1.astype(jnp.int32)))
    with pytest.raises(ValueError, match="Unknown prediction 'score'"):
        cfm_loss_on_pairs(linear_model, w, pairs, prediction="score")
    with pytest.raises(ValueError, match="x1 must be a floating-point array"):
        draw_pairs(jax.random.key(0), x1.astype(jnp.int32))


def test_bad_input_messages(data):
    x1, w = data
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"x1 must be a floating-point array.*int32"):
        cfm_loss(linear_model, w, key, x1.astype(jnp.int32))
    with pytest.raises(ValueError, match="Unknown prediction 'score'; expected one of 'velocity'"):
        cfm_loss(linear_model, w, key, x1, prediction="score")
    with pytest.raises(ValueError, match="Unknown loss_space 'x'"):
        cfm_loss(linear_model, w, key, x1, loss_space="x")
    with pytest.raises(ValueError, match=r"keys must have shape \[batch\]=\(6,\).*got 4 keys"):
        cfm_loss(linear_model, w, jax.random.split(key, 4), x1)
    with pytest.raises(ValueError, match=r"shaped like x1 \(6, 3\); got \(6, 2\)"):
        cfm_loss(lambda w, x, t: x[:, :2], w, key, x1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        cfm_loss(linear_model, w, key, x1[:1], coupling=exact_ot)
    for one_example in (x1[0, 0], x1[0]):  # a scalar; one example read as a batch of scalars
        with pytest.raises(ValueError, match=r"x1 must have shape \[batch, \*dims\]"):
            cfm_loss(linear_model, w, key, one_example)


# --- sources other than N(0, I), and bridge noise ---------------------------------------------


def test_a_gaussian_source_gives_the_conditional_expectation_as_minimiser():
    # Source N(m0, s0^2), data N(m1, s1^2), t fixed: the loss over velocities w x_t + b is
    # least at the regression of x1 - x0 on x_t = t x1 + (1 - t) x0, which for Gaussians is
    # E[x1 - x0 | x_t]: slope (t s1^2 - (1 - t) s0^2) / (t^2 s1^2 + (1 - t)^2 s0^2) and
    # intercept (m1 - m0) - slope (t m1 + (1 - t) m0). The standard normal source gives
    # (-1.22, 2.73) here instead of (-1.37, 2.86).
    m0, s0, m1, s1, t = -1.0, 2.0, 2.0, 0.5, 0.3
    x1 = m1 + s1 * jax.random.normal(jax.random.key(0), (32768, 1))

    def source(key, shape, dtype):
        return m0 + s0 * jax.random.normal(key, shape, dtype)

    def loss(theta):
        return cfm_loss(
            lambda theta, x_t, t: theta[0] * x_t + theta[1],
            theta,
            jax.random.key(1),
            x1,
            source=source,
            time_sampler=lambda key, shape: jnp.full(shape, t),
        )[0]

    # The loss is quadratic in theta: one Newton step from 0 lands on its minimum.
    zero = jnp.zeros(2)
    theta = -jnp.linalg.solve(jax.hessian(loss)(zero), jax.grad(loss)(zero))
    slope = (t * s1**2 - (1 - t) * s0**2) / (t**2 * s1**2 + (1 - t) ** 2 * s0**2)
    intercept = (m1 - m0) - slope * (t * m1 + (1 - t) * m0)
    # Standard errors: 0.003 for the slope, 0.004 for the intercept.
    np.testing.assert_allclose(theta, [slope, intercept], atol=0.02)


def test_source_and_bridge_noise_are_drawn_per_example():
    x1 = jax.random.normal(jax.random.key(0), (B, D))
    keys = jax.random.split(jax.random.key(1), B)

    def source(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -1.0, 1.0)

    draw = functools.partial(draw_pairs, source=source, bridge_noise=True)
    whole = draw(keys, x1)
    halves = [draw(keys[i : i + 3], x1[i : i + 3]) for i in (0, 3)]
    for name in ("x0", "x1", "t", "z"):
        parts = [getattr(half, name) for half in halves]
        np.testing.assert_array_equal(getattr(whole, name), np.concatenate(parts), err_msg=name)
    # The documented contract: example i's key splits in 4, x0 from the first, z from the fourth.
    split = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    np.testing.assert_array_equal(
        whole.x0, jax.vmap(lambda k: source(k, (D,), x1.dtype))(split[:, 0])
    )
    np.testing.assert_array_equal(
        whole.z, jax.vmap(lambda k: jax.random.normal(k, (D,)))(split[:, 3])
    )
    # Without bridge noise nothing more is drawn, and the other draws do not move.
    plain = draw_pairs(keys, x1, source=source)
    assert plain.z is None
    np.testing.assert_array_equal(plain.x0, whole.x0)
    np.testing.assert_array_equal(plain.t, whole.t)


@pytest.mark.parametrize("bridge", [ConstantBridge(0.4), BrownianBridge(0.4)], ids=str)
def test_bridge_noise_loss_equals_hand_computation(x64, data, bridge):
    # torchcfm's points t x1 + (1 - t) x0 + gamma_t z and targets x1 - x0 + gamma'_t z.
    x1, w = data
    key = jax.random.key(2)
    path = AffinePath(CondOT(), bridge=bridge)
    loss, aux = cfm_loss(linear_model, w, key, x1, path=path)
    pairs = draw_pairs(key, x1, bridge_noise=True)
    t = pairs.t[:, None]
    gamma = {"ConstantBridge": 0.4, "BrownianBridge": 0.4 * jnp.sqrt(t * (1 - t))}
    d_gamma = {
        "ConstantBridge": 0.0,
        "BrownianBridge": (1 - 2 * t) / (2 * t * (1 - t)) * 0.4 * jnp.sqrt(t * (1 - t)),
    }
    name = type(bridge).__name__
    x_t = t * pairs.x1 + (1 - t) * pairs.x0 + gamma[name] * pairs.z
    target = pairs.x1 - pairs.x0 + d_gamma[name] * pairs.z
    per_example = jnp.mean((linear_model(w, x_t, pairs.t) - target) ** 2, axis=1)
    np.testing.assert_allclose(aux.per_example, per_example, rtol=1e-6)
    np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-6)


def test_source_and_bridge_noise_errors(data):
    x1, w = data
    key = jax.random.key(0)
    with pytest.raises(
        ValueError,
        match=r"source\(key, shape, dtype\) must return a float array of the shape asked for, \(3,\).*shape \(2,\)",
    ):
        cfm_loss(linear_model, w, key, x1, source=lambda k, shape, dtype: jnp.zeros(2))
    bridged = AffinePath(CondOT(), bridge=BrownianBridge(1.0))
    with pytest.raises(
        ValueError, match=r"prediction='target' is not available on a path with bridge noise"
    ):
        cfm_loss(linear_model, w, key, x1, path=bridged, prediction="target")
    with pytest.raises(ValueError, match=r"z, the bridge noise, is needed exactly when"):
        cfm_loss_on_pairs(linear_model, w, draw_pairs(key, x1), path=bridged)


# --- a tiny 2-D training run, plain JAX: the loss falls, and OT pairs make it lower ----------


def _mlp_init(key, sizes=(3, 64, 64, 2)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / jnp.sqrt(m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _mlp_apply(params, x_t, t):
    h = jnp.concatenate([x_t, t[:, None]], axis=1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b[None])
    w, b = params[-1]
    return h @ w + b[None]


def _eight_gaussians(key, n):
    k_mode, k_noise = jax.random.split(key)
    angle = jax.random.randint(k_mode, (n,), 0, 8) * (2 * jnp.pi / 8)
    centers = 4.0 * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    return centers + 0.3 * jax.random.normal(k_noise, (n, 2))


@functools.partial(jax.jit, static_argnames=("coupling", "steps", "batch"))
def _train(coupling, steps=300, batch=64):
    opt = optax.adam(3e-3)
    params = _mlp_init(jax.random.key(0))

    def loss_fn(params, key):
        k_data, k_loss = jax.random.split(key)
        x1 = _eight_gaussians(k_data, batch)
        return cfm_loss(_mlp_apply, params, k_loss, x1, coupling=coupling)[0]

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    eval_keys = jax.random.split(jax.random.key(99), 8)
    start = jax.vmap(lambda k: loss_fn(params, k))(eval_keys).mean()
    (params, _), _ = jax.lax.scan(
        step, (params, opt.init(params)), jax.random.split(jax.random.key(1), steps)
    )
    end = jax.vmap(lambda k: loss_fn(params, k))(eval_keys).mean()
    return start, end


def test_training_a_2d_mlp_reduces_the_loss_and_ot_beats_independent():
    start, end_independent = _train(independent)
    _, end_ot = _train(exact_ot)
    # Measured here: independent 9.0 -> 4.7 (its floor is the conditional variance of the
    # target); OT pairs reach 0.29.
    assert float(end_independent) < 0.6 * float(start)
    assert float(end_ot) < 0.25 * float(end_independent)
