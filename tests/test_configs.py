"""fmjax.configs: one mapping per named choice, the same for validation and for building."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax import configs, couplings, paths, sampling, timesteps


def _config(**path):
    c = configs.base_config()
    c.path.update(path)
    return c


@pytest.mark.parametrize(
    ("key", "mapping"),
    [
        ("scheduler", paths.SCHEDULERS),
        ("coupling", couplings.COUPLINGS),
        ("time_sampler", timesteps.TIME_SAMPLERS),
    ],
)
def test_every_named_path_choice_validates_and_builds(key, mapping):
    for name in mapping:
        config = _config(**{key: name})
        configs.validate(config, num_devices=1)
        path, coupling, time_sampler = configs.build_path(config.path)
        assert isinstance(path, paths.AffinePath)
        x = jnp.ones((4, 2))
        assert coupling(jax.random.key(0), -x, x).x0.shape == (4, 2)
        t = time_sampler(jax.random.key(0), (100,))
        assert t.shape == (100,) and bool(jnp.all((t >= 0) & (t <= 1)))
    with pytest.raises(ValueError, match=rf"config\.path\.{key}='nope'.*{next(iter(mapping))!r}"):
        configs.validate(_config(**{key: "nope"}), num_devices=1)


def test_build_path_passes_each_choice_its_options():
    config = _config(scheduler="polynomial", polynomial_n=3.0, time_sampler="uniform", t_min=0.2)
    path, _, time_sampler = configs.build_path(config.path)
    assert path.scheduler == paths.Polynomial(3.0)
    t = time_sampler(jax.random.key(0), (1000,))
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.8
    path, _, _ = configs.build_path(_config(scheduler="condot", sigma_min=0.1).path)
    assert path.scheduler == paths.CondOT(sigma_min=0.1)
    # logit_normal keeps at least 1e-4 from the ends even with t_min = 0.
    _, _, time_sampler = configs.build_path(
        _config(time_sampler="logit_normal", logit_mean=30.0, t_min=0.0).path
    )
    assert float(time_sampler(jax.random.key(0), (10,)).max()) == pytest.approx(1 - 1e-4)


def test_bridge_noise_validates_and_builds():
    assert configs.build_path(_config().path)[0].bridge is None
    for name, bridge in paths.BRIDGE_NOISES.items():
        config = _config(bridge_noise=name, bridge_sigma=0.5)
        configs.validate(config, num_devices=1)
        assert configs.build_path(config.path)[0].bridge == bridge(sigma=0.5)
    bad = [
        (dict(bridge_noise="sb"), r"config\.path\.bridge_noise='sb'.*'none', 'constant'"),
        (dict(bridge_noise="brownian", bridge_sigma=0.0), r"bridge_sigma=0\.0 must be a positive"),
        (dict(bridge_noise="constant", prediction="target"), r"needs config\.path\.prediction"),
    ]
    for path, message in bad:
        with pytest.raises(ValueError, match=message):
            configs.validate(_config(**path), num_devices=1)


@pytest.mark.parametrize("optimizer", list(configs.OPTIMIZERS))
@pytest.mark.parametrize("schedule", list(configs.LR_SCHEDULES))
def test_every_optimizer_and_schedule_builds_and_steps(optimizer, schedule):
    config = configs.base_config()
    o = config.optim
    o.optimizer, o.schedule, o.learning_rate = optimizer, schedule, 0.1
    o.warmup_steps, o.final_lr_fraction, o.grad_clip = 10, 0.5, 1.0
    configs.validate(config, num_devices=1)
    tx, lr = configs.make_optimizer(o, num_steps=100)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 100.0)}, tx.init(params), params)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))
    expected = {
        "constant": (0.1, 0.1, 0.1),
        "warmup_constant": (0.0, 0.1, 0.1),
        "warmup_cosine": (0.0, 0.1, 0.05),
    }[schedule]
    np.testing.assert_allclose([lr(0), lr(10), lr(100)], expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"config\.optim\.schedule='cyclic'"):
        o.schedule = "cyclic"
        configs.validate(config, num_devices=1)


def test_adamw_decays_weights_and_adam_does_not():
    o = configs.base_config().optim
    o.weight_decay, o.learning_rate = 0.5, 0.1
    params = {"w": jnp.ones(2)}
    zero = {"w": jnp.zeros(2)}
    for name, moved in (("adam", False), ("adamw", True)):
        o.optimizer = name
        tx, _ = configs.make_optimizer(o, num_steps=10)
        updates, _ = tx.update(zero, tx.init(params), params)
        assert bool(jnp.any(optax.apply_updates(params, updates)["w"] != 1.0)) == moved, name


def test_solver_choice_is_the_samplers_mapping():
    config = configs.base_config()
    for name in sampling.SOLVERS:
        config.train.sample_solver = name
        configs.validate(config, num_devices=1)
    config.train.sample_solver = "leapfrog"
    with pytest.raises(ValueError, match=r"config\.train\.sample_solver='leapfrog'"):
        configs.validate(config, num_devices=1)


def test_build_model_names_the_presets_and_the_way_out():
    config = configs.base_config()
    config.model.name = "my_net"
    with pytest.raises(ValueError, match=r"'my_net' is not a known model.*model=\.\.\."):
        configs.build_model(config.model)
