"""fmjax.sampling: closed-form Gaussian flows, convergence orders, exact nfe, guidance, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax.likelihood import log_likelihood
from fmjax.sampling import (
    ADAPTIVE_SOLVERS,
    FIXED_STEP_SOLVERS,
    SOLVERS,
    classifier_free_guidance,
    edm_time_grid,
    sample,
    uniform_time_grid,
)

MU = (1.0, -2.0, 0.5)
S = (0.5, 2.0, 1.5)


def gaussian_flow(dtype=jnp.float32):
    """Data N(mu, diag(s^2)) on the CondOT path x_t = t x1 + (1 - t) x0.

    The marginal velocity is u(x, t) = mu + (t s^2 - (1 - t)) / sigma_t^2 (x - t mu) with
    sigma_t^2 = t^2 s^2 + (1 - t)^2, and its flow is x_t = t mu + sigma_t x0: at t = 1,
    x0 -> mu + s x0. `velocity` takes t of shape [batch], `flow` a scalar t.
    """
    mu, s = jnp.asarray([MU], dtype), jnp.asarray([S], dtype)  # shape [1, dims]

    def velocity(x, t):
        t = t[:, None]
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)

    def flow(x0, t):
        return t * mu + jnp.sqrt(t**2 * s**2 + (1 - t) ** 2) * x0

    return velocity, flow


def noise(batch=8, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, len(MU)), dtype)


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_adaptive_solvers_reach_the_exact_flow_to_tolerance(x64, solver):
    velocity, flow = gaussian_flow(jnp.float64)
    x0 = noise(dtype=jnp.float64)
    exact = flow(x0, 1.0)
    errors = []
    for tol in (1e-5, 1e-8):
        out = sample(velocity, x0, solver=solver, rtol=tol, atol=tol)
        assert bool(out.success)
        errors.append(float(jnp.max(jnp.abs(out.x - exact))))
        # Global error within a small multiple of the per-step tolerance.
        assert errors[-1] < 20 * tol, (solver, tol, errors[-1])
    assert errors[1] < errors[0]


@pytest.mark.parametrize(
    ("solver", "order", "steps"),
    [
        ("euler", 1, (16, 64)),
        ("midpoint", 2, (8, 32)),
        ("heun", 2, (8, 32)),
        ("rk4", 4, (4, 16)),
    ],
)
def test_fixed_step_solvers_converge_at_their_order(x64, solver, order, steps):
    velocity, flow = gaussian_flow(jnp.float64)
    x0 = noise(dtype=jnp.float64)
    exact = flow(x0, 1.0)
    errors = [
        float(jnp.max(jnp.abs(sample(velocity, x0, solver=solver, steps=n).x - exact)))
        for n in steps
    ]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope > order - 0.2, (solver, slope, errors)


def counting(fn):
    """Wraps fn so that every executed call (not every trace) adds one to `calls[0]`."""
    calls = [0]

    def increment():
        calls[0] += 1

    def wrapped(x, t):
        jax.debug.callback(increment)
        return fn(x, t)

    return wrapped, calls


PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@pytest.mark.parametrize(
    ("solver", "t0", "t1"),
    [(solver, 0.0, 1.0) for solver in SOLVERS] + [("heun", 1.0, 0.0), ("dopri5", 1.0, 0.0)],
)
def test_nfe_equals_the_number_of_calls(solver, t0, t1):
    velocity, _ = gaussian_flow()
    fn, calls = counting(velocity)
    x0 = noise()
    steps = 7 if solver in FIXED_STEP_SOLVERS else None
    out = sample(fn, x0, solver=solver, steps=steps, t0=t0, t1=t1, rtol=1e-6, atol=1e-6)
    out.x.block_until_ready()
    jax.effects_barrier()
    assert bool(out.success)
    assert int(out.nfe) == calls[0]
    if solver in FIXED_STEP_SOLVERS:
        assert int(out.nfe) == PER_STEP[solver] * steps
    assert out.trajectory is None and out.ts is None


def test_nfe_counts_rejected_steps():
    # A sharp pulse in time makes the controller reject steps, the first one included.
    fn, calls = counting(
        lambda x, t: 50.0 * jnp.exp(-((t[:, None] - 0.01) ** 2) / 1e-5) * jnp.cos(x)
    )
    out = sample(fn, noise(), solver="dopri5", rtol=1e-7, atol=1e-7)
    out.x.block_until_ready()
    jax.effects_barrier()
    assert bool(out.success)
    assert int(out.nfe) == calls[0]


def test_save_at_records_the_trajectory(x64):
    velocity, flow = gaussian_flow(jnp.float64)
    x0 = noise(dtype=jnp.float64)
    times = jnp.array([0.0, 0.25, 0.5, 0.9, 1.0])
    out = sample(velocity, x0, save_at=times, rtol=1e-9, atol=1e-9)
    assert out.trajectory.shape == (5, *x0.shape)
    np.testing.assert_array_equal(out.ts, times)
    expected = jax.vmap(lambda t: flow(x0, t))(times)
    np.testing.assert_allclose(out.trajectory, expected, atol=1e-6)
    np.testing.assert_allclose(out.trajectory[-1], out.x, atol=1e-12)


def test_time_grids():
    np.testing.assert_allclose(uniform_time_grid(4), [0.0, 0.25, 0.5, 0.75, 1.0])
    grid = edm_time_grid(50)
    assert grid.shape == (51,)
    np.testing.assert_allclose(grid[0], 1.0 / 81.0, rtol=1e-6)  # 1 - 80 / (1 + 80)
    assert float(grid[-1]) == 1.0
    assert bool(jnp.all(jnp.diff(grid) > 0))
    # Steps are small at both ends of the path and largest in the middle.
    steps = jnp.diff(grid)
    assert float(jnp.max(steps)) > 20 * float(jnp.maximum(steps[0], steps[-1]))
    assert edm_time_grid(1).shape == (2,)


def test_time_grid_wins_over_t0():
    # A constant field moves x by c * (time covered): the EDM grid starts at 1/81, not at t0.
    x0 = noise()
    grid = edm_time_grid(10)
    out = sample(lambda x, t: jnp.ones_like(x), x0, solver="heun", time_grid=grid, t0=0.0)
    np.testing.assert_allclose(out.x, x0 + (1.0 - 1.0 / 81.0), rtol=1e-5)
    assert int(out.nfe) == 20


def test_guidance_scales_zero_and_one_give_the_unconditional_and_conditional_fields():
    calls = []

    def apply_fn(w, x, t, y):
        calls.append(x.shape[0])
        return x @ w + (t[:, None] + y[:, None].astype(x.dtype))

    w = jnp.eye(3) * 0.5
    x = noise(4)
    labels = jnp.array([1, 2, 3, 4])
    t = jnp.full((4,), 0.3)
    conditional = apply_fn(w, x, t, labels)
    unconditional = apply_fn(w, x, t, jnp.zeros_like(labels))
    calls.clear()
    for scale, expected in [(0.0, unconditional), (1.0, conditional)]:
        v = classifier_free_guidance(apply_fn, w, labels, null_label=0, scale=scale)
        np.testing.assert_allclose(v(x, t), expected, rtol=1e-6)
    v = classifier_free_guidance(apply_fn, w, labels, null_label=0, scale=3.0)
    np.testing.assert_allclose(
        v(x, t), unconditional + 3.0 * (conditional - unconditional), rtol=1e-5
    )
    assert calls == [8, 8, 8]  # both branches in one call on a doubled batch
    out = sample(v, x, solver="euler", steps=2)
    assert bool(out.success)


def test_no_recompilation_on_a_second_call():
    traces = [0]

    def velocity(x, t):
        traces[0] += 1
        return -x

    sample(velocity, noise(seed=0)).x.block_until_ready()
    first = traces[0]
    assert first > 0
    sample(velocity, noise(seed=1)).x.block_until_ready()
    sample(velocity, noise(seed=2), solver="heun", steps=4).x.block_until_ready()
    middle = traces[0]
    sample(velocity, noise(seed=3), solver="heun", steps=4).x.block_until_ready()
    assert traces[0] == middle
    assert middle > first  # the heun solve did compile once


def test_arrays_inside_velocity_fn_are_traced_not_baked_in():
    traces = [0]

    def model(params, x, t):
        traces[0] += 1
        return params * x

    for params in (1.0, -1.0):
        out = sample(jax.tree_util.Partial(model, jnp.asarray(params)), noise(), solver="dopri5")
        np.testing.assert_allclose(out.x, noise() * np.exp(params), rtol=1e-4)
    after_first = traces[0]
    sample(jax.tree_util.Partial(model, jnp.asarray(2.0)), noise())
    assert traces[0] == after_first


def test_works_under_jit_sharded_jit_and_shard_map():
    velocity, flow = gaussian_flow()
    x0 = noise(batch=8)
    expected = flow(x0, 1.0)
    solve = jax.jit(lambda x: sample(velocity, x, solver="tsit5").x)
    np.testing.assert_allclose(solve(x0), expected, atol=5e-4)

    # The caller shards the batch; the solve (one step size for the whole batch) follows.
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded_x0 = jax.device_put(x0, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_allclose(solve(sharded_x0), expected, atol=5e-4)

    # Inside a mapped device step each shard takes its own steps. Diffrax's loops are not
    # typed for varying manual axes yet (diffrax issue #735), hence check_vma=False.
    per_shard = jax.jit(
        jax.shard_map(
            lambda x: sample(velocity, x, solver="tsit5").x,
            mesh=mesh,
            in_specs=PartitionSpec("data"),
            out_specs=PartitionSpec("data"),
            check_vma=False,
        )
    )
    np.testing.assert_allclose(per_shard(x0), expected, atol=5e-4)


def test_nan_is_reported_as_failure():
    x0 = noise()

    def blows_up(x, t):
        return jnp.where(t[:, None] > 0.5, jnp.nan, 1.0) * x

    for solver, kwargs in [("euler", {"steps": 10}), ("dopri5", {"max_steps": 64})]:
        out = sample(blows_up, x0, solver=solver, **kwargs)
        assert not bool(out.success), solver


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "rk45"}, r"Unknown solver 'rk45'; expected one of 'euler', .*'dopri8'"),
        ({"solver": "euler"}, r"needs exactly one of steps .* or time_grid"),
        ({"solver": "heun", "steps": 4, "time_grid": [0.0, 1.0]}, r"exactly one of steps"),
        ({"solver": "dopri5", "steps": 10}, r"'dopri5' chooses its own steps"),
        ({"solver": "euler", "steps": 0}, r"steps must be a positive integer; got steps=0"),
        ({"solver": "euler", "steps": 2.5}, r"steps must be a positive integer"),
        ({"t0": 0.5, "t1": 0.5}, r"t0 != t1; got t0 = t1 = 0.5"),
        ({"solver": "euler", "steps": 4, "t1": 0.0}, r"t0 != t1"),
        ({"solver": "euler", "time_grid": [0.0, 0.5, 0.4]}, r"strictly increasing or decreasing"),
        ({"solver": "euler", "time_grid": [0.0]}, r"time_grid must be a 1-D array of at least 2"),
        ({"save_at": [0.5, 1.5]}, r"save_at must lie within the solve, between 0.0 and 1.0"),
        ({"max_steps": 0}, r"max_steps must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(lambda x, t: -x, noise(), **kwargs)


def test_bad_velocity_or_state_raise():
    x0 = noise()
    with pytest.raises(
        ValueError, match=r"must return an array of the shape \(8, 3\) and dtype float32"
    ):
        sample(lambda x, t: x[:, :2], x0)
    with pytest.raises(ValueError, match=r"got shape \(8, 3\) and dtype float16"):
        sample(lambda x, t: x.astype(jnp.float16), x0)
    with pytest.raises(ValueError, match=r"x0 must be a floating-point array"):
        sample(lambda x, t: x, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"x0 must have shape \[batch, \*dims\]"):
        sample(lambda x, t: x, jnp.float32(1.0))
    # One 2-D point is not two scalar examples: the message says how to write either.
    with pytest.raises(ValueError, match=r"got shape \(2,\).*x0\[None\].*x0\[:, None\]"):
        sample(lambda x, t: x, jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"labels must have one entry per example"):
        v = classifier_free_guidance(
            lambda p, x, t, y: x, None, jnp.arange(3), null_label=0, scale=1.0
        )
        v(x0, jnp.full((8,), 0.5))


def test_solves_compile_without_host_callbacks():
    # XLA keeps no program with a host callback in JAX's persistent compilation cache, so a
    # callback (Diffrax checks a traced dt0 and a traced StepTo grid with them) would make
    # every process compile each sampler and likelihood solve afresh: 28 s for the digits
    # U-Net's bits/dim solve. (save_at times still carry Diffrax's checks of their values.)
    from fmjax.likelihood import log_likelihood

    def velocity(x, t):
        return -x * (1 + t[:, None])

    x = jnp.ones((2, 3))
    for program in (
        lambda x: sample(velocity, x, solver="dopri5").x,
        lambda x: sample(velocity, x, solver="tsit5", rtol=1e-3, atol=1e-3).x,
        lambda x: sample(velocity, x, solver="euler", steps=4).x,
        lambda x: sample(velocity, x, solver="heun", time_grid=edm_time_grid(5)).x,
        lambda x: log_likelihood(velocity, x).log_prob,
    ):
        assert "callback" not in jax.jit(program).lower(x).as_text()


def test_a_traced_time_grid_that_turns_back_fails_through_success():
    # Known only inside a jit, a grid cannot be checked when `sample` is called; the solve
    # reports it instead of raising from a host callback.
    solve = jax.jit(
        lambda grid: sample(lambda x, t: -x, jnp.ones((2, 3)), solver="heun", time_grid=grid)
    )
    assert bool(solve(jnp.array([0.0, 0.5, 1.0])).success)
    assert bool(solve(jnp.array([1.0, 0.5, 0.0])).success)
    assert not bool(solve(jnp.array([0.0, 0.6, 0.3, 1.0])).success)


@pytest.fixture
def fresh_solve_options():
    """`solve_compiler_options` decided afresh in the test, and again after it."""
    from fmjax import _xla

    _xla.compiler_options.cache_clear()
    yield _xla
    _xla.compiler_options.cache_clear()


def _conv_velocity(x, t):
    # Convolution, matrix product and element-wise work: what the CPU options reroute.
    kernel = jnp.cos(jnp.arange(3 * 3 * 4 * 4, dtype=x.dtype)).reshape(3, 3, 4, 4) / 6
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims)
    return jnp.tanh(h @ kernel[1, 1]) * (1 - t)[:, None, None, None]


def test_top_level_solves_compile_with_the_solve_options_and_nested_ones_without(
    fresh_solve_options, monkeypatch
):
    from fmjax.likelihood import log_likelihood

    x0 = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    velocity, _ = gaussian_flow()
    gauss_x0 = noise(batch=4)

    # XLA's options, as fmjax picks them (on CPU with YNNPACK, the matrix-product-only
    # fusions), change the results by summation order only, also differentiated through a
    # velocity that closes over the differentiated value (JAX then compiles the solve's known
    # part on its own).
    def closure_grad():
        return jax.grad(
            lambda s: sample(
                lambda x, t: s * velocity(x, t), gauss_x0, solver="euler", steps=3
            ).x.sum()
        )(jnp.asarray(0.5))

    picked = sample(_conv_velocity, x0, solver="heun", steps=4).x, closure_grad()
    monkeypatch.setattr(fresh_solve_options, "solve_compiler_options", lambda: None)
    defaults = sample(_conv_velocity, x0, solver="heun", steps=4).x, closure_grad()
    for got, want in zip(picked, defaults, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # An option XLA refuses shows where the options go: into a top-level solve's compile...
    monkeypatch.setattr(
        fresh_solve_options, "solve_compiler_options", lambda: {"xla_no_such_option": 1}
    )
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option"):
        sample(velocity, gauss_x0, solver="euler", steps=3)
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option"):
        log_likelihood(velocity, gauss_x0, solver="euler", steps=3)
    # ...and not into solves under a caller's jit, grad or vmap.
    under_jit = jax.jit(lambda x: sample(velocity, x, solver="euler", steps=3).x)(gauss_x0)
    under_vmap = jax.vmap(lambda x: sample(velocity, x[None], solver="euler", steps=3).x[0])(
        gauss_x0
    )
    np.testing.assert_allclose(under_vmap, under_jit, rtol=1e-6)
    grad = jax.grad(lambda x: sample(velocity, x, solver="euler", steps=3).x.sum())(gauss_x0)
    assert np.all(np.isfinite(grad))


def test_solve_options_leave_a_users_xla_flags_and_an_xla_without_them_alone(
    fresh_solve_options, monkeypatch
):
    xla = fresh_solve_options
    if xla.solve_compiler_options() is not None:  # XLA with YNNPACK (JAX 0.8 on), on CPU
        assert xla.solve_compiler_options() == xla.CPU_OPTIONS
    xla.compiler_options.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", f"--{xla.YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_REDUCE")
    assert xla.solve_compiler_options() is None
    xla.compiler_options.cache_clear()
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(xla, "CPU_OPTIONS", {"xla_no_such_option": 1})
    assert xla.solve_compiler_options() is None


# --- the network's time: t of shape [batch], and errors that state it ----------------------


def test_the_network_gets_one_time_per_example():
    seen = []

    def velocity(x, t):
        seen.append(jnp.shape(t))
        return jnp.broadcast_to(t[:, None], x.shape)  # dx/dt = t: x1 = x0 + 1/2

    x0 = noise()
    for solver, steps in [("heun", 4), ("dopri5", None)]:
        out = sample(velocity, x0, solver=solver, steps=steps)
        np.testing.assert_allclose(out.x, x0 + 0.5, atol=1e-5)
    assert seen and set(seen) == {(8,)}


@pytest.mark.parametrize(
    ("velocity_fn", "match"),
    [
        # Diffrax's order and signature: vector_field(t, y, args).
        (lambda t, y, args: -y, r"failed when called with x: float32\[8, 3\] and t: float32\[8\]"),
        # (t, x) order: returns the shape of t.
        (lambda t, x: -x, r"must return an array of the shape \(8, 3\).*got shape \(8,\)"),
        # Written for a scalar t: [8, 3] * [8] does not broadcast.
        (lambda x, t: x * jnp.sin(t), r"float32\[8\].*ValueError: .*broadcast"),
        # Python control flow on t.
        (lambda x, t: x if t < 0.5 else -x, r"truth value of an array"),
    ],
)
def test_a_function_of_another_convention_gets_a_valueerror_that_states_fmjaxs(velocity_fn, match):
    for solve in (
        lambda: sample(velocity_fn, noise(), solver="euler", steps=2),
        lambda: log_likelihood(velocity_fn, noise(), solver="euler", steps=2),
    ):
        with pytest.raises(ValueError, match=match) as info:
            solve()
        assert r"velocity_fn(x, t) -> velocity" in str(info.value)
        assert "t of shape [batch]" in str(info.value)
        assert "The network's time" in str(info.value)


def test_the_original_error_is_chained():
    def indexes_a_missing_axis(x, t):
        return x * t[:, None, None]

    with pytest.raises(ValueError, match=r"velocity_fn failed") as info:
        sample(indexes_a_missing_axis, noise(), solver="euler", steps=2)
    assert isinstance(info.value.__cause__, IndexError | ValueError)


# --- model_kwargs ------------------------------------------------------------------------


def test_model_kwargs_reach_the_function_and_new_values_do_not_retrace():
    traces = [0]

    def velocity(x, t, *, shift, rate):
        traces[0] += 1
        return rate * (shift - x)  # x_t = shift + (x0 - shift) exp(-rate t)

    def solve(shift):
        kwargs = {"shift": shift, "rate": jnp.asarray(2.0)}
        return sample(velocity, x0, solver="dopri5", model_kwargs=kwargs).x

    x0 = noise()
    shifts = (jnp.arange(24.0).reshape(8, 3), -jnp.ones((8, 3)))
    np.testing.assert_allclose(
        solve(shifts[0]), shifts[0] + (x0 - shifts[0]) * np.exp(-2.0), rtol=1e-4
    )
    after_first = traces[0]
    assert after_first > 0
    np.testing.assert_allclose(
        solve(shifts[1]), shifts[1] + (x0 - shifts[1]) * np.exp(-2.0), rtol=1e-4
    )
    assert traces[0] == after_first  # the second labels were an argument of the compiled solve


def test_model_kwargs_under_jit_and_with_python_values():
    def velocity(x, t, shift, sign=1):
        return sign * (shift - x)

    x0 = noise()
    shift = jnp.ones((8, 3))
    solve = jax.jit(
        lambda x, s: sample(velocity, x, solver="rk4", steps=8, model_kwargs={"shift": s}).x
    )
    np.testing.assert_allclose(solve(x0, shift), 1 + (x0 - 1) * np.exp(-1.0), rtol=1e-4)
    # A Python value is static: it reaches the function as itself.
    out = sample(velocity, x0, solver="rk4", steps=8, model_kwargs={"shift": shift, "sign": -1})
    np.testing.assert_allclose(out.x, 1 + (x0 - 1) * np.exp(1.0), rtol=1e-4)


@pytest.mark.parametrize("model_kwargs", [[("y", 1)], {1: jnp.ones(3)}, "y"])
def test_bad_model_kwargs_raise(model_kwargs):
    with pytest.raises(ValueError, match=r"model_kwargs must be a mapping from keyword names"):
        sample(lambda x, t, **kw: -x, noise(), solver="euler", steps=2, model_kwargs=model_kwargs)


def test_guided_field_reuses_the_compiled_solve_for_new_labels():
    traces = [0]

    def apply_fn(w, x, t, y, offset):
        traces[0] += 1
        return (y[:, None].astype(x.dtype) + offset - x) * w

    x0 = noise(4)
    results = []
    for labels in (jnp.array([1, 2, 3, 4]), jnp.array([4, 3, 2, 1])):
        v = classifier_free_guidance(
            apply_fn,
            jnp.asarray(1.0),
            labels,
            null_label=0,
            scale=2.0,
            model_kwargs={"offset": jnp.asarray(0.5)},
        )
        results.append(sample(v, x0, solver="euler", steps=4).x)
        if len(results) == 1:
            first = traces[0]
    assert traces[0] == first
    # The guided target is 2 * (y + 0.5) - 0.5 (unconditional: 0 + 0.5): x moves towards it.
    target = 2 * (jnp.array([4, 3, 2, 1], jnp.float32)[:, None] + 0.5) - 0.5
    euler = target + (x0 - target) * (1 - 0.25) ** 4
    np.testing.assert_allclose(results[1], euler, rtol=1e-5)


def test_guided_field_takes_t_of_shape_batch():
    v = classifier_free_guidance(lambda p, x, t, y: x, None, jnp.arange(4), null_label=0, scale=1.0)
    with pytest.raises(ValueError, match=r"takes t of shape \[batch\]=\(4,\)"):
        v(noise(4), 0.5)


def _toward_label(calls):
    """A toy model ``u(x, t | y) = y - x`` (the null label 0: ``-x``) that records the batch
    of every evaluation that runs (a debug callback runs only in the branch taken)."""

    def apply_fn(params, x, t, y):
        jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
        return y[:, None].astype(x.dtype) - x

    return apply_fn


def test_guidance_interval_euler_closed_form_and_skipped_doubling():
    # Guided u = -x + w y inside [0.25, 0.75], conditional u = y - x outside. Euler on the
    # grid k / 10 is x <- (1 - h) x + h s_k y with s_k = w for k = 3..7 and 1 otherwise:
    # x_10 = (1 - h)^10 x0 + h y sum_k s_k (1 - h)^(9 - k).
    calls, w, h = [], 3.0, 0.1
    x0, labels = noise(4), jnp.array([1, 2, 3, 4])
    v = classifier_free_guidance(
        _toward_label(calls), None, labels, null_label=0, scale=w, interval=(0.25, 0.75)
    )
    out = sample(v, x0, solver="euler", steps=10)
    s = np.where((np.arange(10) >= 3) & (np.arange(10) <= 7), w, 1.0)
    weight = h * np.sum(s * (1 - h) ** (9 - np.arange(10)))
    expected = (1 - h) ** 10 * np.asarray(x0) + weight * np.asarray(labels, np.float32)[:, None]
    np.testing.assert_allclose(out.x, expected, rtol=1e-5)
    assert int(out.nfe) == 10
    # Outside the interval one evaluation on the batch, inside one on the doubled batch.
    assert sorted(calls) == [4] * 5 + [8] * 5


def test_guidance_interval_is_per_example_and_closed():
    calls = []
    labels = jnp.array([2, 2, 2, 2])
    v = classifier_free_guidance(
        _toward_label(calls), None, labels, null_label=0, scale=3.0, interval=(0.25, 0.75)
    )
    x = jnp.ones((4, 1))
    t = jnp.array([0.1, 0.25, 0.75, 0.9])  # the ends belong to the interval
    np.testing.assert_allclose(v(x, t), [[1.0], [5.0], [5.0], [1.0]])  # y - x; -x + 3 y
    assert calls == [8]
    calls.clear()
    np.testing.assert_allclose(v(x, jnp.full((4,), 0.8)), jnp.ones((4, 1)))
    assert calls == [4]
    # The whole range is plain guidance.
    full = classifier_free_guidance(
        _toward_label([]), None, labels, null_label=0, scale=3.0, interval=(0.0, 1.0)
    )
    plain = classifier_free_guidance(_toward_label([]), None, labels, null_label=0, scale=3.0)
    np.testing.assert_array_equal(full(x, t), plain(x, t))


@pytest.mark.parametrize(
    "interval", [(0.5, 0.2), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0), (0.3,), "ab", 0.3]
)
def test_bad_guidance_intervals_raise(interval):
    with pytest.raises(ValueError, match=r"0 <= t_min <= t_max <= 1.*got interval="):
        classifier_free_guidance(
            lambda p, x, t, y: x, None, jnp.arange(4), null_label=0, scale=2.0, interval=interval
        )


def test_guided_channels_are_sits_partial_guidance():
    # Conditional u = y - x, unconditional u = -x (null label 0), guided u = -x + w y. With
    # channels=3 of 4 (SiT's forward_with_cfg), the last channel stays conditional.
    def toward_label(params, x, t, y):
        return y[:, None, None, None].astype(x.dtype) - x

    labels, w = jnp.array([2, 5]), 3.0
    x = jnp.ones((2, 2, 2, 4))
    v = classifier_free_guidance(toward_label, None, labels, null_label=0, scale=w, channels=3)
    out = np.asarray(v(x, jnp.full((2,), 0.5)))
    y = np.asarray(labels, np.float32)[:, None, None]
    np.testing.assert_allclose(out[..., :3], np.broadcast_to(-1 + w * y[..., None], (2, 2, 2, 3)))
    np.testing.assert_allclose(out[..., 3], np.broadcast_to(y - 1, (2, 2, 2)))
    everything = classifier_free_guidance(
        toward_label, None, labels, null_label=0, scale=w, channels=4
    )
    plain = classifier_free_guidance(toward_label, None, labels, null_label=0, scale=w)
    np.testing.assert_array_equal(everything(x, jnp.full((2,), 0.5)), plain(x, jnp.full((2,), 0.5)))
    for channels in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"channels must be a positive integer"):
            classifier_free_guidance(
                toward_label, None, labels, null_label=0, scale=w, channels=channels
            )
    with pytest.raises(ValueError, match=r"channels=5 guides more entries"):
        classifier_free_guidance(toward_label, None, labels, null_label=0, scale=w, channels=5)(
            x, jnp.full((2,), 0.5)
        )
