"""The bad-input matrix (issue 10): each mistake fails fast, before JAX compiles anything,
with a ``ValueError`` that names the value and what was expected.

Rows that other test files already cover are not repeated here (README, "Reliability", lists
where each row is tested): unknown dataset names (test_data), coupling and LR-schedule names,
``num_steps=0``, a batch that does not divide over the devices, an unknown model (test_train),
a resume into a run with another model config (test_train), the sampler's solver and step
count (test_sampling), ``--solver``/``--num_samples``/``--labels`` of the CIFAR-10 sampler
(test_cifar10), and Inception weights with wrong names or shapes (test_fid).

"Before compiling" is measured, not assumed: :func:`no_compilation` listens to JAX's
lowering events and fails a row whose error comes after one.
"""

import contextlib
import hashlib
import math
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_module, tiny_config

from experiments import fid as fid_command
from fmjax import couplings, data, generate, likelihood, loss, rundir, sampling, sde, train
from fmjax.metrics import fid, inception

# Lowering a jaxpr to MLIR is the first step of every compilation, eager ops included (a
# cache hit skips the backend compile but still lowers).
_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def no_compilation():
    """Fails if JAX lowers anything inside the block."""
    lowered = []

    def listener(event, duration, **kwargs):
        if event == _LOWERING_EVENT:
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        assert not lowered, f"JAX compiled {len(lowered)} program(s) before the error."


def test_the_compilation_detector_detects_compilation():
    with pytest.raises(AssertionError, match=r"JAX compiled \d+ program"):
        with no_compilation():
            jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))  # a function never compiled before


def small_config():
    """The tests' tiny config on the tiny U-Net (the model is built from the config: some rows
    are the U-Net's own fields)."""
    c = tiny_config(num_steps=2)
    c.model.name = "unet_tiny"
    return c


def small_source(side=8):
    return data.ArraySource(np.zeros((32, side, side, 1), np.float32))


# --- the training config ----------------------------------------------------------------------


_CONFIG_ROWS = [
    (
        "path.scheduler",
        "rectified",
        r"config.path.scheduler='rectified' is not valid; expected one of \['condot', 'cosine'",
    ),
    (
        "path.time_sampler",
        "beta",
        r"config.path.time_sampler='beta' is not valid; expected one of \['uniform', 'logit",
    ),
    (
        "optim.optimizer",
        "sgd",
        r"config.optim.optimizer='sgd' is not valid; expected one of \['adam', 'adamw'\]",
    ),
    (
        "train.sample_solver",
        "rk45",
        r"config.train.sample_solver='rk45' is not valid; expected one of \['euler', ",
    ),
    ("optim.learning_rate", 0.0, r"learning_rate=0.0 is not valid; expected a positive finite"),
    ("optim.learning_rate", -1e-4, r"learning_rate=-0.0001 is not valid; expected a positive"),
    ("optim.learning_rate", math.nan, r"learning_rate=nan is not valid; expected a positive"),
    ("train.batch_size", 0, r"train.batch_size=0 is not valid; expected a positive integer"),
    ("train.batch_size", -16, r"train.batch_size=-16 is not valid; expected a positive"),
    ("train.eval_samples", 0, r"train.eval_samples=0 is not valid; expected a positive"),
    ("train.num_grid_samples", -1, r"train.num_grid_samples=-1 is not valid; expected a"),
    ("train.sample_steps", 0, r"train.sample_steps=0 is not valid; expected a positive"),
    ("data.image_size", 0, r"config.data.image_size=0 is not valid; expected a positive"),
    ("model.num_classes", 0, r"config.model.num_classes=0 is not valid; expected a positive"),
    (
        "model.attention",
        "flash",
        r"config.model.attention='flash' is not valid; expected one of \['xla', 'cudnn'\]",
    ),
    ("model.attention", "cudnn", r"attention='cudnn' computes in bfloat16 or float16; set "),
    (
        "model.group_norm",
        "torch",
        r"config.model.group_norm='torch' is not valid; expected one of \['fmjax', 'flax'\]",
    ),
]


@pytest.mark.parametrize(
    ("key", "value", "match"), _CONFIG_ROWS, ids=[f"{k}={v}" for k, v, _ in _CONFIG_ROWS]
)
def test_bad_config_value(tmp_path, key, value, match):
    config = small_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match), no_compilation():
        train.train_and_evaluate(config, tmp_path / "run", source=small_source())
    assert not (tmp_path / "run").exists()  # refused before the workdir was touched


def test_image_size_the_unet_cannot_downsample(tmp_path):
    # unet_tiny has channel_mult=(1, 2): one halving, so both sides must be even.
    with pytest.raises(ValueError, match=r"Image size 9x9 cannot be downsampled by channel_mult="):
        with no_compilation():
            train.train_and_evaluate(small_config(), tmp_path / "run", source=small_source(9))
    assert not (tmp_path / "run").exists()


# --- the workdir ------------------------------------------------------------------------------
# Tests run as root here, and permission bits do not stop root, so "cannot be written" is
# produced by what stops everyone: a regular file where the directory should be, or above it.


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("file", r"workdir '.*/file' is not valid: it exists and is not a directory"),
        ("file/run", r"workdir '.*/file/run' cannot be created: .*/file is not a directory"),
    ],
)
def test_workdir_that_cannot_be_written(tmp_path, where, match):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match=match), no_compilation():
        train.train_and_evaluate(small_config(), tmp_path / where, source=small_source())


def test_resuming_a_workdir_whose_config_json_is_corrupt(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": {"name": "unet_t')  # cut short
    with pytest.raises(ValueError, match=r"run/config.json is not a readable run config"):
        with no_compilation():
            train.train_and_evaluate(small_config(), tmp_path / "run", source=small_source())


def test_resuming_checkpoints_without_config_json(tmp_path):
    # Without config.json nothing tells whether the checkpoints hold this model; starting
    # fresh would rotate them away, so the run refuses.
    (tmp_path / "run" / "checkpoints" / "20").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds checkpoints but no config.json"):
        with no_compilation():
            train.train_and_evaluate(small_config(), tmp_path / "run", source=small_source())


def test_sampling_a_workdir_that_holds_no_run(tmp_path):
    with pytest.raises(ValueError, match=r"config.json does not exist: .* not an fmjax run"):
        with no_compilation():
            generate.sample_run(tmp_path, generate.SamplingOptions(num_samples=2, steps=2))


# --- sampling ---------------------------------------------------------------------------------


def test_sample_without_samples():
    with pytest.raises(
        ValueError, match=r"x0 must hold at least one sample; got x0.shape=\(0, 2\)"
    ):
        with no_compilation():
            sampling.sample(lambda x, t: x, np.zeros((0, 2), np.float32), solver="euler", steps=2)


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        ([1, 2], {"scale": -1.0}, r"guidance scale must be finite and >= 0 .* got scale=-1.0"),
        ([1, 2], {"scale": math.inf}, r"guidance scale must be finite and >= 0 .* got scale=inf"),
        ([1, 2], {"scale": math.nan}, r"guidance scale must be finite and >= 0 .* got scale=nan"),
        ([1, -3], {}, r"labels must be class indices >= 0; got \[-3\]"),
        ([0.5, 1.0], {}, r"labels must be integer class labels; got dtype float"),
        ([1, 2], {"null_label": -1}, r"null_label must be an integer >= 0; got null_label=-1"),
    ],
    ids=["negative_scale", "inf_scale", "nan_scale", "negative_label", "float_labels", "null"],
)
def test_guidance_out_of_range(labels, kwargs, match):
    kwargs = {"null_label": 10, "scale": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match), no_compilation():
        sampling.classifier_free_guidance(lambda p, x, t, y: x, None, np.asarray(labels), **kwargs)


def test_guidance_of_traced_values_is_not_checked_but_traces():
    # Under jit the scale and labels are unknown at trace time: no check, no error.
    @jax.jit
    def guided(scale, labels):
        v = sampling.classifier_free_guidance(
            lambda p, x, t, y: x * y[:, None], None, labels, null_label=0, scale=scale
        )
        return v(jnp.ones((2, 1)), jnp.full((2,), 0.5))

    np.testing.assert_allclose(guided(2.0, jnp.array([1, 2])), [[2.0], [4.0]])


@pytest.mark.parametrize("scale", [-0.5, math.nan])
def test_cifar10_sampler_guidance_scale(scale):
    with pytest.raises(ValueError, match=rf"--guidance_scale={scale}; expected a finite number"):
        generate.SamplingOptions(guidance_scale=scale)


# --- weights and statistics -------------------------------------------------------------------


def test_downloaded_weights_with_the_wrong_checksum(tmp_path, monkeypatch):
    def fake_download(url, path):
        with open(path, "wb") as f:
            f.write(b"an HTML error page, not the weights")

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_download)
    digest = hashlib.sha256(b"an HTML error page, not the weights").hexdigest()
    with pytest.raises(ValueError, match=rf"sha256 {digest}, expected a digest starting with"):
        inception.download_weights(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing left behind, nothing converted


@pytest.mark.parametrize(
    ("mu", "sigma", "match"),
    [
        (np.zeros(3), np.eye(4), r"mu of shape \(3,\) and sigma of shape \(4, 4\); expected \[d\]"),
        (np.zeros((3, 1)), np.eye(3), r"mu of shape \(3, 1\) and sigma of shape \(3, 3\)"),
        (np.full(2, np.nan), np.eye(2), r"non-finite statistics"),
    ],
    ids=["sizes_differ", "mu_not_a_vector", "nan"],
)
def test_reference_statistics_of_the_wrong_shape(tmp_path, mu, sigma, match):
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=match):
        fid.load_statistics(tmp_path / "stats.npz")


# --- the entry points -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "experiments.cifar10",
            ["--workdir={file}", "--mode=sample", "--guidance_scale=-1"],
            "error: --guidance_scale=-1.0; expected a finite number >= 0",
        ),
        # The same wrapper; slow only because each start imports JAX and Flax (~12 s here).
        pytest.param(
            "experiments.digits",
            ["--workdir={file}"],
            "error: workdir '{file}' is not valid",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "experiments.toy2d",
            ["--workdir={file}", "--steps=7"],
            "error: steps must be a positive",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["cifar10", "digits", "toy2d"],
)
def test_entry_points_print_one_error_line_and_exit_2(tmp_path, module, args, message):
    file = tmp_path / "file"
    file.write_text("")
    result = run_module(module, *(a.format(file=file) for a in args), timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message.format(file=file))


def test_fid_command_prints_one_error_line_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    args = ["stats", "--dataset=cifar10", f"--weights={missing}", f"--out={tmp_path / 's.npz'}"]
    with pytest.raises(SystemExit) as exit_info, no_compilation():
        fid_command.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: No Inception weights at {missing}.")


# --- issue 41: unknown keys, empty batches, a busy workdir, flag mistakes ------------------------


def test_an_unknown_config_key_names_the_closest_valid_key(tmp_path):
    config = small_config()
    config.train.num_step = 5  # a typo of num_steps
    with pytest.raises(ValueError, match=r"config.train.num_step is not a config key; did you "
                       r"mean config.train.num_steps\?"), no_compilation():  # fmt: skip
        train.train_and_evaluate(config, tmp_path / "run", source=small_source())
    assert not (tmp_path / "run").exists()


_EMPTY = np.zeros((0, 2), np.float32)
_KEY = jax.random.key(0)
_EMPTY_ROWS = {
    "cfm_loss": lambda: loss.cfm_loss(lambda p, x, t: x, None, _KEY, _EMPTY),
    "draw_pairs": lambda: loss.draw_pairs(_KEY, _EMPTY),
    "independent": lambda: couplings.independent(_KEY, _EMPTY, _EMPTY),
    "exact_ot": lambda: couplings.exact_ot(_KEY, _EMPTY, _EMPTY),
    "sinkhorn_ot": lambda: couplings.sinkhorn_ot(0.1)(_KEY, _EMPTY, _EMPTY),
    "log_likelihood": lambda: likelihood.log_likelihood(lambda x, t: x, _EMPTY),
    "sample": lambda: sampling.sample(lambda x, t: x, _EMPTY, solver="euler", steps=2),
    "sample_sde": lambda: sde.sample_sde(lambda x, t: x, _EMPTY, _KEY, steps=2),
}
_EMPTY_MESSAGES = {
    "cfm_loss": r"x1 must hold at least one sample; got x1.shape=\(0, 2\)",
    "draw_pairs": r"x1 must hold at least one sample; got x1.shape=\(0, 2\)",
    "independent": r"independent needs samples to pair; got an empty batch",
    "exact_ot": r"exact_ot needs samples to pair; got an empty batch",
    "sinkhorn_ot": r"sinkhorn_ot needs samples to pair; got an empty batch",
    "log_likelihood": r"x1 must hold at least one sample; got x1.shape=\(0, 2\)",
    "sample": r"x0 must hold at least one sample; got x0.shape=\(0, 2\)",
    "sample_sde": r"x0 must hold at least one sample; got x0.shape=\(0, 2\)",
}


@pytest.mark.parametrize("name", list(_EMPTY_ROWS))
def test_an_empty_batch_is_refused_before_tracing(name):
    with pytest.raises(ValueError, match=_EMPTY_MESSAGES[name]), no_compilation():
        _EMPTY_ROWS[name]()


def test_a_workdir_held_by_another_run(tmp_path):
    (tmp_path / "run").mkdir()
    with rundir.WorkdirLease(tmp_path / "run"):
        with pytest.raises(rundir.WorkdirBusyError, match=r"run is in use by another run \(host "):
            with no_compilation():
                train.train_and_evaluate(small_config(), tmp_path / "run", source=small_source())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lock"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config.train.num_step=5"],
            "error: --config.train.num_step: 'train.num_step' is not a key of the config; did "
            "you mean --config.train.num_steps?",
        ),
        (
            ["--config.trian.num_steps=5"],
            "error: --config.trian.num_steps: 'trian.num_steps' is not a key of the config; "
            "did you mean --config.train.num_steps?",
        ),
        (
            ["--config.train.batch_size=abc"],
            "error: flag --config.train.batch_size=abc: invalid literal for int() with base "
            "10: 'abc'",
        ),
        (
            ["--config=experiments/configs/digits.py:nosuch"],
            "error: flag --config=experiments/configs/digits.py:nosuch: Unknown digits config "
            "variant 'nosuch'; expected comma-separated modifiers of 'quick', 'dit' and at most "
            "one of 'meanflow', 'reflow', 'distill' (e.g. 'meanflow,quick', 'dit,quick', "
            "'distill,quick') or none.",
        ),
    ],
    ids=["key_typo", "section_typo", "not_an_int", "bad_variant"],
)
def test_flag_mistakes_print_one_error_line_and_exit_2(tmp_path, args, message):
    result = run_module("experiments.digits", f"--workdir={tmp_path / 'run'}", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "run").exists()


_NOISY_MAIN = """
import asyncio, gc, logging, sys
from absl import flags
from experiments import common

def define():
    flags.DEFINE_string("workdir", None, "")

def main(argv):
    try:
        raise ValueError("RESOURCE_EXHAUSTED: deep inside the storage layer")
    except ValueError:
        logging.getLogger("orbax.checkpoint").exception("background save failed")
    async def fail():
        raise ValueError("never retrieved")
    loop = asyncio.new_event_loop()
    loop.create_task(fail())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    raise OSError(28, "Could not write the checkpoint; the disk is full (0 B free).")

common.run(main, define)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_tracebacks_go_to_error_log_and_the_error_line_is_last(tmp_path, verbose):
    import subprocess
    import sys

    from helpers import ROOT, one_device_env

    args = [f"--workdir={tmp_path}"] + (["--verbose"] if verbose else [])
    result = subprocess.run([sys.executable, "-c", _NOISY_MAIN, *args], cwd=ROOT,
                            env=one_device_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: Could not write the checkpoint; the disk is full (0 B free). "
        f"(details: {tmp_path / 'error.log'})"
    )
    log = (tmp_path / "error.log").read_text()
    assert "deep inside the storage layer" in log and "the run failed" in log
    assert ("Traceback" in result.stderr) == verbose
