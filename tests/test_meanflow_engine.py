"""The engine's mean-flow objective (config.objective="mean_flow"): it trains a network of
(x, t, t_end), its loss curve does not depend on the device count, and bad settings are refused
before anything is compiled."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import metrics_lines, module_output, tiny_config, tiny_source

from fmjax import configs, generate, rundir, train
from fmjax.mesh import make_mesh
from fmjax.models import UNetTiny


class AverageVelocity(nn.Module):
    """A two-layer MLP of the image and both times: the smallest mean-flow network."""

    @nn.compact
    def __call__(self, x, t, t_end=None, *, train=False):
        b = x.shape[0]
        t_end = t if t_end is None else t_end
        times = jnp.stack([jnp.broadcast_to(t, (b,)), jnp.broadcast_to(t_end, (b,))], axis=1)
        h = jnp.concatenate([x.reshape(b, -1), times], axis=1)
        h = nn.silu(nn.Dense(32)(h))
        return nn.Dense(x[0].size)(h).reshape(x.shape)


def _config(**meanflow):
    config = tiny_config()
    config.objective = "mean_flow"
    config.meanflow.update(meanflow)
    return config


def test_mean_flow_loss_curve_is_the_same_on_1_and_4_devices(tmp_path):
    config = _config(interval_sampler="uniform", equal_fraction=0.25, adaptive_power=0.75)
    losses = {}
    for n in (1, 4):
        workdir = tmp_path / f"devices{n}"
        train.train_and_evaluate(
            config,
            workdir,
            model=AverageVelocity(),
            source=tiny_source(),
            mesh=make_mesh(jax.devices()[:n]),
        )
        losses[n] = [m["loss"] for m in metrics_lines(workdir)]
    assert len(losses[1]) == 12 and np.all(np.isfinite(losses[1]))
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
    # The objective is not flow matching's: the same run with the velocity loss differs.
    fm = tiny_config()
    train.train_and_evaluate(
        fm, tmp_path / "fm", model=AverageVelocity(), source=tiny_source(), mesh=make_mesh()
    )
    assert not np.allclose([m["loss"] for m in metrics_lines(tmp_path / "fm")], losses[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"objective": "shortcut"}, r"config\.objective='shortcut'"),
        ({"meanflow.interval_sampler": "beta"}, r"config\.meanflow\.interval_sampler='beta'"),
        ({"meanflow.equal_fraction": 1.5}, r"config\.meanflow\.equal_fraction=1\.5"),
        ({"meanflow.adaptive_power": -0.5}, r"config\.meanflow\.adaptive_power=-0\.5"),
        ({"path.prediction": "target"}, r"prediction='target'.*mean_flow"),
        ({"meanflow.order": "shuffle"}, r"config\.meanflow\.order='shuffle'"),
        ({"meanflow.guidance_kappa": 0.5}, r"guidance_omega/guidance_kappa.*num_classes"),
        ({"meanflow.guidance_kappa": -0.5}, r"config\.meanflow\.guidance_kappa=-0\.5"),
        ({"meanflow.guidance_t_min": 0.7, "meanflow.guidance_t_max": 0.2}, r"guidance_t_min=0\.7"),
    ],
)
def test_bad_mean_flow_settings_are_refused(change, message):
    config = _config()
    for key, value in change.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        configs.validate(config, num_devices=1)


def test_build_intervals_takes_the_sections_options():
    times = configs.build_intervals(
        _config(interval_sampler="logit_normal", logit_mean=3.0, equal_fraction=1.0).meanflow
    )(jax.random.key(0), (2000,))
    np.testing.assert_array_equal(times[:, 0], times[:, 1])
    assert float(jnp.median(times[:, 0])) > 0.9


def test_a_mean_flow_run_writes_one_step_grids_and_generates_in_any_steps(tmp_path):
    config = _config()
    config.train.update(num_steps=4, sample_every=4)
    state = train.train_and_evaluate(
        config, tmp_path, model=AverageVelocity(), source=tiny_source(), mesh=make_mesh()
    )
    assert (tmp_path / "samples" / "step_00000004.png").exists()
    run = rundir.load_run(tmp_path, model=AverageVelocity())
    velocity = generate.make_velocity(run.model, run.config)
    for steps in (1, 2, 4):
        result = generate.generate(
            run.config, velocity, state, 8, jax.random.key(0), mean_flow_steps=steps
        )
        assert result.x.shape == (8, 4, 4, 1) and int(result.nfe) == steps
    # Without t_end the same function is the instantaneous velocity u(x, t, t).
    x = jnp.zeros((2, 4, 4, 1))
    t = jnp.full((2,), 0.3)
    np.testing.assert_array_equal(
        velocity(run.ema_params, None, x, t), velocity(run.ema_params, None, x, t, t)
    )


def test_the_mean_flow_unet_is_the_plain_one_when_its_interval_embedding_is_zero():
    plain, mean_flow = UNetTiny(), UNetTiny(mean_flow=True)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t, t_end = jnp.array([0.2, 0.7]), jnp.array([0.9, 0.7])
    params = mean_flow.init(jax.random.key(1), x, t, t_end=t_end)["params"]
    # Perturbed, so that the layers guided-diffusion starts at zero (the output) are not zero.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    extra = {"interval_mlp_0", "interval_mlp_1"}
    assert extra <= set(params)
    base = {k: v for k, v in params.items() if k not in extra}
    assert jax.tree.structure(base) == jax.tree.structure(
        plain.init(jax.random.key(1), x, t)["params"]
    )
    zeroed = {**params, "interval_mlp_1": jax.tree.map(jnp.zeros_like, params["interval_mlp_1"])}
    np.testing.assert_allclose(
        mean_flow.apply({"params": zeroed}, x, t, t_end=t_end),
        plain.apply({"params": base}, x, t),
        rtol=1e-5,
        atol=1e-6,
    )
    # The interval's length is an input: another t_end, another output.
    moved = mean_flow.apply({"params": params}, x, t, t_end=jnp.array([0.5, 1.0]))
    assert not np.allclose(moved, mean_flow.apply({"params": params}, x, t, t_end=t_end))
    with pytest.raises(ValueError, match="t_end is the second time of a mean-flow network"):
        plain.apply({"params": base}, x, t, t_end=t_end)
    with pytest.raises(ValueError, match=r"t_end must be a scalar or have shape \[batch\]"):
        mean_flow.apply({"params": params}, x, t, t_end=jnp.zeros(3))


def test_the_digits_mean_flow_variant_runs_end_to_end_and_scores_by_steps(tmp_path):
    module_output(
        "experiments.digits",
        "--config=experiments/configs/digits.py:meanflow,quick",
        f"--workdir={tmp_path}",
    )
    report = json.loads((tmp_path / "eval" / "digits.json").read_text())
    assert report["objective"] == "mean_flow" and report["nfe"] == 1
    assert sorted(report["digits_fd_by_steps"]) == ["1", "2", "4"]
    assert report["digits_fd"] == report["digits_fd_by_steps"]["1"]
    assert np.isfinite(report["bits_per_dim"])


def test_a_run_saved_before_the_objective_key_reads_as_flow_matching(tmp_path):
    saved = json.loads(tiny_config().to_json())
    del saved["objective"], saved["meanflow"]
    del saved["path"]["bridge_noise"], saved["path"]["bridge_sigma"]  # nor the bridge noise's
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = rundir.load_config(tmp_path)
    assert config.objective == "flow_matching"
    assert config.meanflow.sample_steps == 1
    assert config.path.bridge_noise == "none"
    assert config.train.num_steps == saved["train"]["num_steps"]


class ConditionalAverageVelocity(nn.Module):
    """AverageVelocity with a label embedding (row 3 is the null label)."""

    @nn.compact
    def __call__(self, x, t, t_end=None, *, y, train=False):
        b = x.shape[0]
        t_end = t if t_end is None else t_end
        times = jnp.stack([jnp.broadcast_to(t, (b,)), jnp.broadcast_to(t_end, (b,))], axis=1)
        h = jnp.concatenate([x.reshape(b, -1), times, nn.Embed(4, 8)(y)], axis=1)
        h = nn.silu(nn.Dense(32)(h))
        return nn.Dense(x[0].size)(h).reshape(x.shape)


def test_training_time_guidance_changes_the_objective_and_trains(tmp_path):
    losses = {}
    for name, kappa in (("plain", 0.0), ("guided", 0.5)):
        config = _config(interval_sampler="uniform", equal_fraction=0.5, guidance_kappa=kappa)
        config.model.num_classes = 3
        config.data.label_drop_prob = 0.2
        assert (configs.meanflow_guidance(config) is None) == (kappa == 0.0)
        train.train_and_evaluate(
            config, tmp_path / name, model=ConditionalAverageVelocity(), source=tiny_source(),
            mesh=make_mesh(),
        )  # fmt: skip
        losses[name] = [m["loss"] for m in metrics_lines(tmp_path / name)]
    assert np.all(np.isfinite(losses["guided"]))
    # The first step's parameters are the same; only the target differs.
    assert losses["guided"][0] != losses["plain"][0]
