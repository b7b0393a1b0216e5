"""Reflow and distillation: fmjax.reflow's pairs (the teacher's ODE, resumable), the pair source
of fmjax.data, training on fixed pairs (fmjax.step), the constant time sampler, and the
command line of experiments.reflow.

The teacher is a 4-step run of ``helpers.TinyVelocity`` on 4x4 images; the pairs are solved
over the suite's 8 simulated devices.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import BATCH as B
from helpers import TinyVelocity, module_output, run_module, tiny_config, tiny_source
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.configs import digits as digits_configs
from fmjax import configs, data, reflow, sampling, timesteps, train
from fmjax.generate import initial_noise, make_velocity
from fmjax.mesh import make_mesh
from fmjax.rundir import load_run
from fmjax.step import init_state, make_train_step

NUM_PAIRS, CHUNK = 20, 8  # chunks of 8, 8 and 4 (the last one padded to the 8 devices)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    config = tiny_config(num_steps=4, checkpoint_every=4)
    train.train_and_evaluate(config, workdir, model=TinyVelocity(), source=tiny_source())
    return workdir


@pytest.fixture(scope="module")
def pairs(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    info = reflow.generate_pairs(teacher, out, NUM_PAIRS, chunk_size=CHUNK, model=TinyVelocity())
    return out, info


def _chunk_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name != data.PAIRS_FILE)


def test_pairs_are_the_teachers_ode(teacher, pairs):
    out, info = pairs
    assert (info.num_pairs, info.num_chunks, info.generated, info.step) == (NUM_PAIRS, 3, 3, 4)
    assert _chunk_files(out) == [data.pair_chunk_name(i) for i in range(3)]
    record = json.loads((out / data.PAIRS_FILE).read_text())
    assert record["step"] == 4 and record["num_pairs"] == NUM_PAIRS and record["seed"] == 0
    assert (record["solver"], record["rtol"], record["atol"]) == ("dopri5", 1e-5, 1e-5)
    assert record["config"]["model"]["name"] == "tiny_velocity"
    source = data.PairSource(out)
    # Pair i's noise is fold_in(key(seed), i), whatever the chunks.
    noise = initial_noise(jax.random.key(0), 0, NUM_PAIRS + 4, (4, 4, 1))
    np.testing.assert_array_equal(source.noise, noise[:NUM_PAIRS])
    run = load_run(teacher, model=TinyVelocity())
    velocity = jax.tree_util.Partial(make_velocity(run.model, run.config), run.ema_params, None)
    # x1 is fmjax.sample of x0 with the same solve: chunk by chunk, the last one padded.
    for start, stop in ((0, 8), (8, 16), (16, 24)):
        x1 = sampling.sample(velocity, noise[start:stop], solver="dopri5").x
        np.testing.assert_allclose(
            source.images[start : min(stop, NUM_PAIRS)],
            x1[: min(stop, NUM_PAIRS) - start],
            rtol=1e-5,
            atol=1e-5,
        )
    # ...which is the ODE's solution: a far finer fixed-step solve agrees to the tolerance.
    fine = sampling.sample(velocity, noise[:NUM_PAIRS], solver="rk4", steps=200).x
    np.testing.assert_allclose(source.images, fine, atol=1e-4)


def test_an_interrupted_generation_resumes_to_the_same_pairs(teacher, pairs, tmp_path, monkeypatch):
    out, _ = pairs
    write = reflow.write_npz
    calls = []

    def crash_on_the_second(path, arrays):
        calls.append(path.name)
        if len(calls) == 2:  # half a temporary file, then the process dies
            path.with_name(path.name + ".tmp").write_bytes(b"PK\x03\x04 half")
            raise KeyboardInterrupt
        write(path, arrays)

    monkeypatch.setattr(reflow, "write_npz", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        reflow.generate_pairs(teacher, tmp_path, NUM_PAIRS, chunk_size=CHUNK, model=TinyVelocity())
    assert [p for p in _chunk_files(tmp_path) if p.endswith(".npz")] == [data.pair_chunk_name(0)]
    monkeypatch.setattr(reflow, "write_npz", write)
    info = reflow.generate_pairs(
        teacher, tmp_path, NUM_PAIRS, chunk_size=CHUNK, model=TinyVelocity()
    )
    assert info.generated == 2  # chunk 0 was kept
    assert _chunk_files(tmp_path) == _chunk_files(out)  # no temporary file left
    for name in _chunk_files(out):
        with np.load(out / name) as a, np.load(tmp_path / name) as b:
            assert sorted(a) == sorted(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    again = reflow.generate_pairs(
        teacher, tmp_path, NUM_PAIRS, chunk_size=CHUNK, model=TinyVelocity()
    )
    assert again.generated == 0
    with pytest.raises(ValueError, match=r"holds other pairs.*seed: 0 there, 1 now"):
        reflow.generate_pairs(
            teacher, tmp_path, NUM_PAIRS, chunk_size=CHUNK, seed=1, model=TinyVelocity()
        )


def _write_pairs(directory, x0, x1, labels=None, chunk_size=None):
    """A pairs directory written by hand, as generate_pairs lays it out."""
    n = len(x0)
    chunk_size = chunk_size or n
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "num_pairs": n,
        "chunk_size": chunk_size,
        "image_shape": list(x0.shape[1:]),
        "num_classes": None if labels is None else int(labels.max()) + 1,
        "config": json.loads(configs.base_config().to_json()),
    }
    (directory / data.PAIRS_FILE).write_text(json.dumps(record))
    for i, start in enumerate(range(0, n, chunk_size)):
        arrays = {"x0": x0[start : start + chunk_size], "x1": x1[start : start + chunk_size]}
        if labels is not None:
            arrays["labels"] = labels[start : start + chunk_size]
        np.savez(directory / data.pair_chunk_name(i), **arrays)
    return directory


def test_the_pair_source_is_stateless_and_covers_each_pair_once_per_epoch(tmp_path):
    n = 48
    x0 = np.random.default_rng(0).normal(size=(n, 2, 2, 1)).astype(np.float32)
    x1 = x0 + np.arange(n, dtype=np.float32)[:, None, None, None]  # x1 - x0 names the pair
    labels = (np.arange(n) % 3).astype(np.int32)
    directory = _write_pairs(tmp_path / "p", x0, x1, labels, chunk_size=20)
    source = data.PairSource(directory, seed=5)
    assert (source.num_examples, source.image_shape, source.num_classes) == (n, (2, 2, 1), 3)
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            batch = source.batch(step, 16)
            assert sorted(batch) == ["image", "label", "noise"]
            index = (batch["image"] - batch["noise"])[:, 0, 0, 0].round().astype(int)
            np.testing.assert_array_equal(batch["noise"], x0[index])  # noise and sample agree
            np.testing.assert_array_equal(batch["label"], labels[index])
            seen += index.tolist()
        assert sorted(seen) == list(range(n))
    # The same step gives the same batch in a new source; hosts' slices make up the batch.
    again = data.PairSource(directory, seed=5).batch(4, 16)
    np.testing.assert_array_equal(again["noise"], source.batch(4, 16)["noise"])
    halves = [source.batch(4, 16, p, 2)["noise"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), again["noise"])
    config = configs.base_config()
    config.data.name, config.data.pairs_dir = "pairs", str(directory)
    assert isinstance(data.build_source(config.data, seed=0), data.PairSource)
    assert data.build_source(config.data, seed=0, split="test").num_examples == 300  # digits


def _distill_config(directory, **train_overrides):
    config = tiny_config(**train_overrides)
    config.data.name, config.data.pairs_dir = "pairs", str(directory)
    config.path.time_sampler, config.path.t_constant = "constant", 0.0
    return config


def test_the_loss_on_pairs_at_time_zero_is_the_distillation_error(tmp_path):
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(B, 4, 4, 1)).astype(np.float32)
    x1 = np.tanh(rng.normal(size=(B, 4, 4, 1))).astype(np.float32)
    config = _distill_config(_write_pairs(tmp_path / "p", x0, x1))
    configs.validate(config, num_devices=4)
    config.data.image_shape = (4, 4, 1)
    model = TinyVelocity()
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    mesh = make_mesh(jax.devices()[:4])
    state = jax.device_put(init_state(config, model, tx), NamedSharding(mesh, P()))
    params = jax.device_get(state.params)
    batch = data.build_source(config.data, seed=0).batch(0, B)
    v = model.apply({"params": params}, jnp.asarray(batch["noise"]), jnp.zeros(B))
    closed_form = float(jnp.mean(jnp.square(v - (batch["image"] - batch["noise"]))))
    step_fn = make_train_step(config, model, tx, schedule, mesh)
    _, metrics = step_fn(state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(metrics["loss"], closed_form, rtol=1e-5)


def test_a_few_engine_steps_on_pairs_run(pairs, tmp_path):
    out, _ = pairs
    config = tiny_config(num_steps=3, checkpoint_every=3)
    config.data.name, config.data.pairs_dir = "pairs", str(out)
    state = train.train_and_evaluate(config, tmp_path / "reflow", model=TinyVelocity())
    assert int(state.step) == 3
    lines = [
        json.loads(s) for s in (tmp_path / "reflow" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(np.isfinite(line["loss"]) for line in lines)


class _Linear(nn.Module):
    """A velocity linear in x (and blind to t): distillation's exact model of a linear map."""

    @nn.compact
    def __call__(self, x, t, *, train=False):
        b = x.shape[0]
        return nn.Dense(x[0].size)(x.reshape(b, -1)).reshape(x.shape)


def test_distillation_of_a_linear_map_converges(tmp_path):
    rng = np.random.default_rng(2)
    d = 4
    a = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    shift = rng.normal(size=d)
    x0 = rng.normal(size=(64, 2, 2, 1)).astype(np.float32)
    x1 = (x0.reshape(64, d) @ a.T + shift).reshape(x0.shape).astype(np.float32)
    config = _distill_config(_write_pairs(tmp_path / "p", x0, x1), num_steps=300)
    config.optim.update(learning_rate=3e-2, ema_decay=0.0)
    config.data.image_shape = (2, 2, 1)
    model = _Linear()
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    mesh = make_mesh(jax.devices()[:1])
    state = init_state(config, model, tx)
    step_fn = make_train_step(config, model, tx, schedule, mesh)
    source = data.build_source(config.data, seed=0)
    losses = []
    for step in range(300):
        state, metrics = step_fn(state, source.batch(step, B))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 1e-4 * losses[0]
    # One Euler step of the distilled field is the map, on noise it never saw.
    z = rng.normal(size=(8, 2, 2, 1)).astype(np.float32)
    fn = jax.tree_util.Partial(make_velocity(model, config), state.params, None)
    one_step = sampling.sample(fn, jnp.asarray(z), solver="euler", steps=1).x
    np.testing.assert_allclose(
        one_step, (z.reshape(8, d) @ a.T + shift).reshape(z.shape), atol=1e-2
    )


def test_the_constant_time_sampler():
    t = timesteps.constant(0.25)(jax.random.key(0), (3,))
    assert t.tolist() == [0.25] * 3
    assert timesteps.TIME_SAMPLERS["constant"] is timesteps.constant
    with pytest.raises(ValueError, match=r"constant time value must be in \[0, 1\]; got value=2"):
        timesteps.constant(2.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c.data.update(name="pairs"),
            "config.data.name='pairs' needs config.data.pairs_dir",
        ),
        (lambda c: c.data.update(pairs_dir="/x"), r"config.data.pairs_dir='/x' is read only with"),
        (
            lambda c: c.update(
                {"data": {"name": "pairs", "pairs_dir": "/x"}, "path": {"coupling": "exact_ot"}}
            ),
            r"config.path.coupling='exact_ot' is not valid with config.data.name='pairs'",
        ),
        (
            lambda c: c.path.update(time_sampler="constant", t_constant=1.5),
            r"config.path.t_constant=1.5 must be in \[0, 1\]",
        ),
    ],
)
def test_bad_configs_are_refused(change, message):
    config = tiny_config()
    change(config)
    with pytest.raises(ValueError, match=message):
        configs.validate(config, num_devices=1)


def test_bad_pairs_and_arguments_are_refused(teacher, pairs, tmp_path):
    del pairs  # generated first, so that the teacher's solves are compiled
    with pytest.raises(ValueError, match=r"pairs\.json does not exist"):
        data.PairSource(tmp_path)
    x = np.zeros((10, 2, 2, 1), np.float32)
    directory = _write_pairs(tmp_path / "p", x, x, chunk_size=4)
    (directory / data.pair_chunk_name(1)).unlink()
    with pytest.raises(ValueError, match=r"pairs_000001.npz is missing: the pairs .* unfinished"):
        data.PairSource(directory)
    with pytest.raises(ValueError, match="chunk_size=3 must be a multiple of the 8 devices"):
        reflow.generate_pairs(teacher, tmp_path / "q", 8, chunk_size=3, model=TinyVelocity())
    with pytest.raises(ValueError, match="num_pairs=0 must be a positive integer"):
        reflow.generate_pairs(teacher, tmp_path / "q", 0, model=TinyVelocity())
    with pytest.raises(ValueError, match="--solver='bogus'"):
        reflow.generate_pairs(teacher, tmp_path / "q", 8, solver="bogus", model=TinyVelocity())
    with pytest.raises(ValueError, match=r"deterministic coupling.*solver='sde'"):
        reflow.generate_pairs(teacher, tmp_path / "q", 8, solver="sde", model=TinyVelocity())


def test_the_digits_variants():
    reflow_config = digits_configs.get_config("reflow")
    distill = digits_configs.get_config("distill,quick")
    assert reflow_config.data.name == distill.data.name == "pairs"
    assert (reflow_config.train.sample_solver, reflow_config.train.sample_steps) == ("euler", 1)
    assert (distill.path.time_sampler, distill.path.t_constant) == ("constant", 0.0)
    assert reflow_config.path.time_sampler == "uniform"
    with pytest.raises(ValueError, match="at most one of 'meanflow', 'reflow', 'distill'"):
        digits_configs.get_config("reflow,distill")


def test_the_command_line_refuses_an_unknown_command():
    result = run_module("experiments.reflow", "bogus", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: expected one command of")


def test_the_command_line_help_exits_0():
    result = run_module("experiments.reflow", "--help", timeout=120)
    assert result.returncode == 0 and "--num_pairs" in result.stdout


@pytest.mark.slow
def test_pairs_then_distillation_from_the_command_line(tmp_path):
    """The documented commands end to end, on the digits job's quick variant."""
    teacher, out = tmp_path / "teacher", tmp_path / "pairs"
    quick = "--config=experiments/configs/digits.py:quick"
    module_output("experiments.digits", f"--workdir={teacher}", quick)
    printed = module_output(
        "experiments.reflow", "pairs", f"--from={teacher}", f"--out={out}", "--num_pairs=96",
        "--chunk_size=64",
    )  # fmt: skip
    assert "96 pairs of step 6" in printed
    for variant in ("reflow", "distill"):
        workdir = tmp_path / variant
        module_output(
            "experiments.digits", f"--workdir={workdir}",
            f"--config=experiments/configs/digits.py:{variant},quick",
            f"--config.data.pairs_dir={out}", f"--init_from={teacher}",
        )  # fmt: skip
        report = json.loads((workdir / "eval" / "digits.json").read_text())
        assert (report["solver"], report["steps"], report["nfe"]) == ("euler", 1, 1)
        assert json.loads((workdir / "init_from.json").read_text())["step"] == 6
