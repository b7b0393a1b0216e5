"""fmjax.train, fmjax.step, fmjax.rundir and fmjax.checkpoint: the mesh step, device-count
invariance, exact resume, restore on other meshes, EMA, accumulation, preemption, non-finite
losses, bad configs, and a model that no registry knows.

A two-layer MLP (``helpers.TinyVelocity``, passed to the engine as an object) stands in for
the U-Net so that each compile takes a second, not fifteen; the U-Nets are trained end to end
by the entry points' tests.
"""

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import BATCH as B
from helpers import TinyVelocity, metrics_lines, tiny_config, tiny_source, two_processes
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.bench.faults import PoisonedSource
from fmjax import checkpoint, configs, couplings, models, rundir, train
from fmjax.loss import cfm_loss
from fmjax.mesh import make_mesh
from fmjax.step import abstract_state, ema_decay, init_state, make_train_step


def mesh_of(n):
    return make_mesh(jax.devices()[:n])


def train_tiny(config, workdir, **kwargs):
    """``train_and_evaluate`` of a fresh :class:`helpers.TinyVelocity`."""
    return train.train_and_evaluate(config, workdir, model=TinyVelocity(), **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 12-step run on 1, 2, 4 and 8 devices (shared by several tests)."""
    out = {}
    for n in (1, 2, 4, 8):
        workdir = tmp_path_factory.mktemp(f"devices{n}")
        state = train_tiny(tiny_config(), workdir, source=tiny_source(), mesh=mesh_of(n))
        out[n] = (workdir, jax.device_get(state))
    return out


def test_losses_do_not_depend_on_the_device_count(runs):
    losses = {n: [m["loss"] for m in metrics_lines(w)] for n, (w, _) in runs.items()}
    assert len(losses[1]) == 12
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


def test_metrics_and_files(runs):
    workdir, state = runs[1]
    first = metrics_lines(workdir)[0]
    assert set(first) == {"step", "loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec"}
    assert first["step"] == 1 and first["lr"] == pytest.approx(1e-2)
    assert any(p.name.startswith("events") for p in (workdir / "tensorboard").iterdir())
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["image_shape"] == [4, 4, 1] and saved["model"]["name"] == "tiny_velocity"
    assert checkpoint.Checkpoints(workdir).steps() == [4, 8, 12]
    assert int(state.step) == 12


def test_checkpoint_from_4_devices_restores_on_1_and_2(runs):
    workdir, state = runs[4]
    config = rundir.load_config(workdir)
    for n in (1, 2):
        mesh = mesh_of(n)
        abstract = abstract_state(config, TinyVelocity(), NamedSharding(mesh, P()))
        restored, step = checkpoint.Checkpoints(workdir).restore_latest(abstract)
        assert step == 12 and restored.params["Dense_0"]["kernel"].sharding.mesh.size == n
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)


def test_load_run_gives_the_ema_params(runs):
    workdir, state = runs[2]
    run = rundir.load_run(workdir, model=TinyVelocity())
    assert run.step == 12 and run.config.model.name == "tiny_velocity"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.ema_params), state.ema_params)


class _Unregistered(nn.Module):
    """A velocity network that no registry knows: two convolutions, the time entering as a
    learned per-channel scale; no class labels (no ``y`` argument)."""

    features: int = 8

    @nn.compact
    def __call__(self, x, t, *, train=False):
        t = jnp.broadcast_to(t, x.shape[:1])
        scale = nn.Dense(self.features)(t[:, None])[:, None, None, :]
        h = nn.silu(nn.Conv(self.features, (3, 3))(x) * (1 + scale))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def test_a_model_that_no_registry_knows_trains_and_is_restored(tmp_path):
    config = tiny_config(num_steps=4)
    config.model.name = "my_velocity"  # only a label
    assert config.model.name not in models.PRESETS
    state = train.train_and_evaluate(
        config, tmp_path, model=_Unregistered(), source=tiny_source(), mesh=mesh_of(1)
    )
    losses = [m["loss"] for m in metrics_lines(tmp_path)]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert config.model.name not in models.PRESETS  # nothing was registered on the way
    run = rundir.load_run(tmp_path, model=_Unregistered())
    assert run.step == 4 and run.config.model.name == "my_velocity"
    assert set(run.ema_params) == {"Conv_0", "Conv_1", "Dense_0"}
    jax.tree.map(np.testing.assert_array_equal, run.ema_params, jax.device_get(state.ema_params))
    with pytest.raises(ValueError, match=r"model\.name='my_velocity' is not a known model"):
        rundir.load_run(tmp_path)  # without the model object, nothing can rebuild it


def _example_keys(config, step):
    """The ``[B]`` per-example keys of a step, by the documented derivation."""
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0), step)
    return jnp.stack([jax.random.fold_in(step_key, i) for i in range(B)])


def _hand_step(config, model, tx, params, opt_state, batch, step):
    """One update computed by hand on one device, from the documented key derivation."""
    keys = _example_keys(config, step)

    def loss_fn(p):
        apply = lambda p, x, t: model.apply({"params": p}, x, t)  # noqa: E731
        return cfm_loss(apply, p, keys, jnp.asarray(batch["image"]))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def test_mesh_step_equals_hand_computation_and_ema():
    config = tiny_config()
    config.data.image_shape = (4, 4, 1)
    model = TinyVelocity()
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    state0 = init_state(config, model, tx)
    mesh = mesh_of(4)
    step_fn = make_train_step(config, model, tx, schedule, mesh)
    source = tiny_source()
    # Host copies for the hand computation: the step donates (deletes) its input buffers.
    params, opt_state = jax.device_get((state0.params, state0.opt_state))
    ema = params
    state = jax.device_put(state0, NamedSharding(mesh, P()))
    for step in range(3):
        batch = source.batch(step, B)
        state, metrics = step_fn(state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
        params, opt_state, loss = _hand_step(config, model, tx, params, opt_state, batch, step)
        d = min(0.9, (1 + step + 1) / (10 + step + 1))  # EMA warmup after step + 1 updates
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, params)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            state.params,
            params,
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            state.ema_params,
            ema,
        )
    assert int(state.step) == 3
    assert step_fn._cache_size() == 1  # no recompilation after the first call


def test_exact_ot_pairs_within_each_device_micro_batch():
    config = tiny_config()
    config.data.image_shape = (4, 4, 1)
    config.path.coupling = "exact_ot"
    model = TinyVelocity()
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    state = init_state(config, model, tx)
    params = jax.device_get(state.params)
    mesh = mesh_of(4)
    step_fn = make_train_step(config, model, tx, schedule, mesh)
    batch = tiny_source().batch(0, B)
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    _, metrics = step_fn(jax.device_put(state, NamedSharding(mesh, P())), sharded)

    keys = _example_keys(config, 0)
    images = jnp.asarray(batch["image"])

    def loss(coupling, groups):
        """The mean over ``groups`` equal parts of the batch, each paired on its own."""
        apply = lambda p, x, t: model.apply({"params": p}, x, t)  # noqa: E731
        per_group = jax.jit(
            jax.vmap(lambda k, x: cfm_loss(apply, params, k, x, coupling=coupling)[0])
        )(keys.reshape(groups, -1), images.reshape(groups, -1, *images.shape[1:]))
        return float(jnp.mean(per_group))

    np.testing.assert_allclose(metrics["loss"], loss(couplings.exact_ot, 4), rtol=1e-5)
    # A check with teeth: pairing across the whole batch, or not at all, gives other losses.
    assert abs(float(metrics["loss"]) - loss(couplings.exact_ot, 1)) > 1e-3
    assert abs(float(metrics["loss"]) - loss(couplings.independent, 4)) > 1e-3


def test_ema_decay_warmup():
    assert float(ema_decay(0, 0.999, warmup=True)) == pytest.approx(0.1)
    assert float(ema_decay(10**6, 0.999, warmup=True)) == pytest.approx(0.999)
    assert float(ema_decay(5, 0.999, warmup=False)) == pytest.approx(0.999)


def test_gradient_accumulation_equals_the_full_batch():
    config = tiny_config()
    config.data.image_shape = (4, 4, 1)
    model = TinyVelocity()
    tx, schedule = configs.make_optimizer(config.optim, 12)
    mesh = mesh_of(2)
    batch = jax.device_put(tiny_source().batch(0, B), NamedSharding(mesh, P("data")))
    results = []
    for accumulation in (1, 2):
        config.train.accumulation_steps = accumulation
        step_fn = make_train_step(config, model, tx, schedule, mesh)
        state = jax.device_put(init_state(config, model, tx), NamedSharding(mesh, P()))
        results.append(step_fn(state, batch))
    (s1, m1), (s2, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params, s2.params
    )


class _Crash(Exception):
    pass


def test_exact_resume_after_a_crash(runs, tmp_path):
    _, uninterrupted = runs[1]

    def crash(step, state):
        raise _Crash(f"simulated crash at step {step}")

    with pytest.raises(_Crash):
        train_tiny(
            tiny_config(),
            tmp_path,
            source=tiny_source(),
            mesh=mesh_of(1),
            hooks=[train.EvalHook(every=6, fn=crash)],
        )
    assert checkpoint.Checkpoints(tmp_path).steps() == [4]
    resumed = train_tiny(tiny_config(), tmp_path, source=tiny_source(), mesh=mesh_of(1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), uninterrupted)


def test_sigterm_checkpoints_and_returns(tmp_path):
    def preempt(step, state):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    state = train_tiny(
        tiny_config(), tmp_path, source=tiny_source(), mesh=mesh_of(1),
        hooks=[train.EvalHook(every=5, fn=preempt)],
    )  # fmt: skip
    assert int(state.step) == 5
    assert checkpoint.Checkpoints(tmp_path).steps() == [4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_non_finite_loss_stops_and_keeps_good_checkpoints(tmp_path):
    source = PoisonedSource(6, tiny_source())  # NaN images in the batch of update 6
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 6"):
        train_tiny(tiny_config(log_every=3), tmp_path, source=source, mesh=mesh_of(1))
    assert checkpoint.Checkpoints(tmp_path).steps() == [4]


def test_refuses_a_workdir_with_another_model(runs):
    workdir, _ = runs[1]
    config = tiny_config()
    config.model.num_classes = 3
    with pytest.raises(
        ValueError, match=r"different config \(model.num_classes: saved None, now 3\)"
    ):
        train_tiny(config, workdir, source=tiny_source(), mesh=mesh_of(1))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "train.batch_size",
            12,
            r"batch_size=12 must be divisible by devices x accumulation_steps = 8 x 1",
        ),
        ("train.num_steps", 0, r"train.num_steps=0 is not valid; expected a positive integer"),
        ("path.coupling", "ot", r"path.coupling='ot' is not valid; expected one of"),
        ("optim.schedule", "linear", r"optim.schedule='linear' is not valid"),
        ("data.label_drop_prob", 0.1, r"needs a class-conditional model"),
        ("model.name", "resnet", r"model.name='resnet' is not a known model"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, key, value, message):
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    # Without a model object the engine builds the one config.model names.
    model = None if key == "model.name" else TinyVelocity()
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path, model=model, source=tiny_source())


_TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    import helpers
    from fmjax import train
    train.train_and_evaluate(
        helpers.tiny_config(), workdir, model=helpers.TinyVelocity(), source=helpers.tiny_source()
    )
    """
)


def test_two_processes_match_one_process_with_four_devices(runs, tmp_path):
    two_processes(_TWO_PROCESS_SCRIPT, str(tmp_path))
    two_hosts = [m["loss"] for m in metrics_lines(tmp_path)]
    one_host = [m["loss"] for m in metrics_lines(runs[4][0])]
    np.testing.assert_allclose(two_hosts, one_host, rtol=1e-5)


def test_sample_grids_are_written_every_sample_every_steps(tmp_path):
    config = tiny_config(num_steps=6, sample_every=3, num_grid_samples=9, checkpoint_every=6)
    train_tiny(config, tmp_path, source=tiny_source(), mesh=mesh_of(1))
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_00000003.png", "step_00000006.png"]
    from PIL import Image

    # 9 samples of 4x4, 3 per row, 1-pixel borders, enlarged 16x.
    assert Image.open(tmp_path / "samples" / grids[-1]).size == ((3 * 4 + 4) * 16,) * 2


def test_the_best_checkpoint_follows_the_best_logged_score(tmp_path, caplog):
    scores = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.0, 10: 6.0}  # goes down, up, down, up
    ema_at = {}

    def score(step, state):
        ema_at[step] = jax.device_get(state.ema_params)
        return {"score": scores[step]}

    hook = train.EvalHook(every=2, fn=score, keep_best="score", details={"num_samples": 7})
    with caplog.at_level("INFO", logger="fmjax.train"):
        train_tiny(
            tiny_config(num_steps=10), tmp_path, source=tiny_source(), mesh=mesh_of(1),
            hooks=[hook],
        )  # fmt: skip
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "step": 8, "metric": "score", "mode": "min", "value": 2.0, "num_samples": 7
    }  # fmt: skip
    logged = [m["score"] for m in metrics_lines(tmp_path) if "score" in m]
    assert logged == [5.0, 3.0, 4.0, 2.0, 6.0]
    # One line per evaluation: its value, its details, whether the state was kept, its time.
    lines = [r.getMessage() for r in caplog.records if "evaluated in" in r.getMessage()]
    for line, (step, value) in zip(lines, scores.items(), strict=True):
        kept = "; best so far" if step in (2, 4, 8) else ""
        assert line.startswith(f"step {step}/10 | score {value:g} (num_samples=7{kept}) | "), line
    best = rundir.load_run(tmp_path, best=True, model=TinyVelocity())
    assert best.step == 8
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(best.ema_params), ema_at[8])
    assert rundir.load_run(tmp_path, model=TinyVelocity()).step == 10


def test_the_training_rate_leaves_out_evaluations_and_compilation(tmp_path):
    def slow_score(step, state):
        time.sleep(2.0)
        return {"score": 1.0}

    config = tiny_config(num_steps=8, log_every=4, checkpoint_every=8)
    hooks = [train.EvalHook(every=4, fn=slow_score)]
    train_tiny(config, tmp_path, source=tiny_source(), mesh=mesh_of(1), hooks=hooks)
    rates = [m["steps_per_sec"] for m in metrics_lines(tmp_path) if "loss" in m]
    # Counting the 2 s evaluation at step 4 would put the second window under 2 steps/s; a
    # step of the tiny model takes milliseconds.
    assert len(rates) == 2 and min(rates) > 10, rates


def test_eval_hook_validates():
    with pytest.raises(ValueError, match="mode='median' must be 'min' or 'max'"):
        train.EvalHook(every=2, fn=lambda s, st: {}, keep_best="x", mode="median")
    with pytest.raises(ValueError, match="every=0 must be a positive int"):
        train.EvalHook(every=0, fn=lambda s, st: {})


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, caplog):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(runs[1][0], workdir)
    for blob in (workdir / "checkpoints" / "12").rglob("*"):
        if blob.is_file() and blob.parent.name == "d":  # the array data files
            blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    config = rundir.load_config(workdir)
    abstract = abstract_state(config, TinyVelocity(), NamedSharding(mesh_of(1), P()))
    checkpoints = checkpoint.Checkpoints(workdir, async_save=False)
    with caplog.at_level("WARNING", logger="fmjax.checkpoint"):
        restored, step = checkpoints.restore_latest(abstract)
    checkpoints.close()
    assert step == 8 and int(restored.step) == 8
    assert "Checkpoint at step 12 cannot be restored" in caplog.text


def test_cpu_train_steps_take_fmjax_options_only_for_small_images(monkeypatch):
    # Measured: the matrix-product-only fusions speed up the digits U-Net's step and slow
    # down the CIFAR-10 U-Net's (fmjax.step.make_train_step). Only the jit call is checked.
    config = tiny_config()
    model = TinyVelocity()
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    seen = []  # jax.jit is patched last, and only for make_train_step's calls below
    monkeypatch.setattr("fmjax.step.jax.jit", lambda fn, **kwargs: seen.append(kwargs) or fn)
    monkeypatch.setattr("fmjax.step.compiler_options", lambda platform: {"option": platform})
    for shape in [(8, 8, 1), (31, 33, 3), (32, 32, 3), (64, 64, 3)]:
        config.data.image_shape = shape
        make_train_step(config, model, tx, schedule, mesh_of(1))
    assert [kwargs["compiler_options"] for kwargs in seen] == [
        {"option": "cpu"},
        {"option": "cpu"},
        None,
        None,
    ]


def test_the_huge_pages_hint_is_given_for_large_cpu_images_on_glibc_without_the_tunable():
    glibc = ("glibc", "2.36")
    hint = train._huge_pages_hint((32, 32, 3), "cpu", None, glibc)
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint
    assert train._huge_pages_hint((64, 64, 3), "cpu", "glibc.malloc.arena_max=1", glibc) == hint
    for args in [
        ((8, 8, 1), "cpu", None, glibc),  # small images: the tunable slows them down
        ((31, 33, 3), "cpu", None, glibc),
        ((32, 32, 3), "gpu", None, glibc),
        ((32, 32, 3), "cpu", "glibc.malloc.hugetlb=1", glibc),  # already set
        ((32, 32, 3), "cpu", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", glibc),
        ((32, 32, 3), "cpu", None, ("glibc", "2.34")),  # the tunable came in glibc 2.35
        ((32, 32, 3), "cpu", None, ("", "")),  # musl, macOS: no glibc tunables
    ]:
        assert train._huge_pages_hint(*args) is None, args
    assert train._huge_pages_hint((32, 32, 3), "cpu", None, ("glibc", "2.40")) == hint


# --- one run per workdir, resume only into the same run (issue 41) ----------------------------


def _files(workdir):
    """Every file under ``workdir`` with its bytes (what a refused run must leave untouched)."""
    return {
        p.relative_to(workdir): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()
    }


def test_a_second_run_into_a_held_workdir_is_refused_before_writing(runs):
    workdir, _ = runs[1]
    before = _files(workdir)
    with rundir.WorkdirLease(workdir):  # as if another run were training there
        before = _files(workdir)
        with pytest.raises(rundir.WorkdirBusyError, match=r"is in use by another run \(host "):
            train_tiny(tiny_config(num_steps=16), workdir, source=tiny_source(), mesh=mesh_of(1))
        assert _files(workdir) == before


def test_a_resume_with_other_run_defining_keys_is_refused_and_config_json_untouched(runs):
    workdir, _ = runs[1]
    saved = (workdir / "config.json").read_bytes()
    config = tiny_config(num_steps=20, log_every=2)  # these two may change on resume
    config.seed, config.path.prediction, config.optim.learning_rate = 1, "epsilon", 1e-3
    message = (
        r"different config \(optim.learning_rate: saved 0.01, now 0.001; path.prediction: saved "
        r"'velocity', now 'epsilon'; seed: saved 0, now 1\); only train.num_steps, "
    )
    with pytest.raises(ValueError, match=message):
        train_tiny(config, workdir, source=tiny_source(), mesh=mesh_of(1))
    assert (workdir / "config.json").read_bytes() == saved


def test_resumable_keys_may_change_on_resume(runs, tmp_path):
    import shutil

    shutil.copytree(runs[1][0], tmp_path / "run")
    config = tiny_config(num_steps=14, log_every=7, checkpoint_every=7, keep_checkpoints=5)
    state = train_tiny(config, tmp_path / "run", source=tiny_source(), mesh=mesh_of(1))
    assert int(state.step) == 14
    assert rundir.load_config(tmp_path / "run").train.num_steps == 14


def test_a_lease_left_by_a_dead_process_is_recovered(tmp_path, monkeypatch, caplog):
    # Without kernel locks (some network file systems) the record decides.
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    lock = tmp_path / rundir.LOCK_FILE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    records = {
        "dead pid, this host": ({"host": host, "pid": int(dead.stdout)}, True),
        "live pid, this host": ({"host": host, "pid": os.getppid()}, False),
        "renewed now, another host": ({"host": "elsewhere", "pid": 1, "renewed": time.time()}, False),
        "renewed an hour ago": ({"host": "elsewhere", "pid": 1, "renewed": time.time() - 3600}, True),
    }  # fmt: skip
    for name, (record, recovered) in records.items():
        lock.write_text(json.dumps({"started": "2026-01-01T00:00:00", **record}))
        if recovered:
            with caplog.at_level("WARNING"), rundir.WorkdirLease(tmp_path):
                assert json.loads(lock.read_text())["pid"] == os.getpid(), name
            assert "Recovered the lock" in caplog.text, name
        else:
            with pytest.raises(rundir.WorkdirBusyError, match=f"pid {record['pid']}"):
                rundir.WorkdirLease(tmp_path).acquire()
        caplog.clear()


def test_init_from_starts_a_new_run_from_the_saved_parameters(runs, tmp_path):
    source, finished = runs[1]
    config = tiny_config(num_steps=1, checkpoint_every=1)
    config.optim.learning_rate = 1e-12  # one update that barely moves the parameters
    state = train_tiny(
        config, tmp_path / "ft", source=tiny_source(), mesh=mesh_of(1), init_from=source
    )
    np.testing.assert_allclose(
        jax.tree.leaves(state.params)[0], jax.tree.leaves(finished.params)[0], atol=1e-6
    )
    assert int(state.step) == 1
    assert json.loads((tmp_path / "ft" / "init_from.json").read_text())["step"] == 12
    with pytest.raises(ValueError, match=r"init_from=.* is the workdir itself"):
        train_tiny(config, source, source=tiny_source(), mesh=mesh_of(1), init_from=source)


def _tensorboard_losses(workdir):
    """The loss records TensorBoard shows per step: events files in order, each purge (a
    SessionLog START at step s) dropping the records at steps >= s read before it."""
    from tensorboardX.proto import event_pb2

    records: list[tuple[int, float]] = []
    for path in sorted((workdir / "tensorboard").iterdir()):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                records = [(s, v) for s, v in records if s < event.step]
            for value in event.summary.value:
                if value.tag == "loss":
                    records.append((event.step, value.simple_value))
    return records


def test_tensorboard_drops_the_events_after_the_restored_step(tmp_path):
    def crash(step, state):
        raise _Crash(f"simulated crash at step {step}")

    with pytest.raises(_Crash):
        train_tiny(tiny_config(), tmp_path, source=tiny_source(), mesh=mesh_of(1),
                   hooks=[train.EvalHook(every=6, fn=crash)])  # fmt: skip
    time.sleep(1.1)  # a new events file name (they are named by the second)
    train_tiny(tiny_config(), tmp_path, source=tiny_source(), mesh=mesh_of(1))
    steps = [s for s, _ in _tensorboard_losses(tmp_path)]
    assert steps == list(range(1, 13))  # steps 5 and 6 of the crashed run purged
