"""`python -m experiments.cifar10`: the smoke variants end to end on tfds mock data (in-process,
since the mock lives in this process), and the full recipes' configs without training them."""

import json
import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import metrics_lines, training_steps
from PIL import Image

from experiments import cifar10
from experiments.configs.cifar10 import get_config
from fmjax.configs import build_model, validate
from fmjax.evaluate import EvalOptions
from fmjax.generate import SamplingOptions, check_sampler, initial_noise, sample_run, sde_keys
from fmjax.metrics import fid, inception
from fmjax.models import param_count

NUM_MOCK = 32  # mock CIFAR-10 examples; 8x8 crops of them train the smoke model


def train(variant: str, workdir, **train_options) -> None:
    config = get_config(variant)
    config.train.update(train_options)
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        cifar10.run(config, workdir, "train")


def run_main(monkeypatch, *argv: str) -> None:
    """``main`` as ``python -m experiments.cifar10 ARGV`` would run it, in this process.

    ``common.setup`` points JAX at the entry points' compilation cache; keep the test suite's.
    """
    monkeypatch.setenv("FMJAX_JAX_CACHE", jax.config.jax_compilation_cache_dir)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    cifar10.define_flags()
    cifar10.FLAGS(["cifar10", *argv])
    try:
        cifar10.main(["cifar10"])
    finally:
        cifar10.FLAGS.unparse_flags()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cifar10_smoke")
    train("smoke", workdir)
    return workdir


def test_smoke_trains_checkpoints_resumes_and_samples(smoke_run, monkeypatch, caplog, capsys):
    workdir = smoke_run
    assert training_steps(workdir) == [2, 4]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    grid = Image.open(workdir / "samples" / "step_00000004.png")
    assert grid.size == (4 * 8 * 8 + 5 * 8,) * 2  # 16 samples of 8x8, 4 per row, enlarged 8x

    with caplog.at_level(logging.INFO, logger="fmjax.train"):
        train("smoke", workdir, num_steps=6)
    assert "Resuming" in caplog.text and "from step 4" in caplog.text
    assert training_steps(workdir) == [2, 4, 6]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]

    run_main(
        monkeypatch, f"--workdir={workdir}", "--mode=sample", "--num_samples=10", "--steps=2",
        "--sample_batch_size=6",
    )  # fmt: skip
    stem = workdir / "samples" / "sample_step00000006_heun-edm2_n10_seed0"
    assert "NFE 4 per solve" in capsys.readouterr().out  # heun: 2 evaluations a step
    with np.load(stem.with_suffix(".npz")) as npz:
        assert npz["images"].shape == (10, 8, 8, 3) and npz["images"].dtype == np.float32
        assert npz["images"].min() >= -1.0 and npz["images"].max() <= 1.0
        assert npz["images_uint8"].shape == (10, 8, 8, 3) and npz["images_uint8"].dtype == np.uint8
        assert npz["nfe"].tolist() == [4, 4] and npz["success"].all()  # two solves: 6 + 4
        assert int(npz["step"]) == 6 and str(npz["method"]) == "heun-edm2"
        assert "labels" not in npz
    assert Image.open(stem.with_suffix(".png")).size == (4 * 8 * 8 + 5 * 8, 3 * 8 * 8 + 4 * 8)
    # --distributed joins the cluster (here a stand-in) before anything touches a device.
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: joined.append(args))
    run_main(
        monkeypatch, f"--workdir={workdir}", "--mode=sample", "--num_samples=10", "--steps=2",
        "--sample_batch_size=6", "--distributed", "--coordinator_address=host0:1234",
        "--num_processes=1", "--process_id=0",
    )  # fmt: skip
    assert joined == [("host0:1234", 1, 0)]

    # SiT's SDE sampler: a sample's noise and Brownian motion do not depend on the batches.
    sde = {"num_samples": 10, "solver": "sde", "steps": 3, "sde_last_step_size": 0.1}

    def sde_samples(**options):
        out = sample_run(workdir, SamplingOptions(**sde, **options))
        with np.load(out.npz) as npz:
            return out, npz["images"]

    whole, in_one = sde_samples(batch_size=10)
    assert whole.nfe == [3]  # euler: 2 noisy steps + 1 mean step
    assert whole.npz.name == "sample_step00000006_sde-euler-sigma-mean0.1-3_n10_seed0.npz"
    run_main(
        monkeypatch, f"--workdir={workdir}", "--mode=sample", "--num_samples=10", "--steps=3",
        "--solver=sde", "--sde_last_step_size=0.1", "--sample_batch_size=5",
    )  # fmt: skip
    assert "(sde-euler-sigma-mean0.1-3): NFE 3 per solve of up to 5" in capsys.readouterr().out
    with np.load(whole.npz) as npz:  # the same file, written again from two solves of 5
        in_halves = npz["images"]
    np.testing.assert_allclose(in_halves, in_one, atol=1e-6)
    with np.load(stem.with_suffix(".npz")) as ode:
        assert np.abs(in_one - ode["images"]).mean() > 1e-3  # not the ODE's samples
    assert not np.allclose(sde_samples(batch_size=5, seed=1)[1], in_halves)

    with pytest.raises(ValueError, match="unconditional"):
        sample_run(workdir, SamplingOptions(guidance_scale=2.0))
    with pytest.raises(ValueError, match=r"--solver=meanflow.*'flow_matching'"):
        sample_run(workdir, SamplingOptions(solver="meanflow", steps=1))


def test_meanflow_smoke_jumps_by_default_and_takes_ode_solvers(tmp_path, monkeypatch, capsys):
    train("meanflow,smoke", tmp_path, num_steps=2)
    run_main(monkeypatch, f"--workdir={tmp_path}", "--mode=sample", "--num_samples=4")
    assert "(meanflow1): NFE 1 per solve" in capsys.readouterr().out
    with np.load(tmp_path / "samples" / "sample_step00000002_meanflow1_n4_seed0.npz") as npz:
        assert npz["images"].shape == (4, 8, 8, 3) and npz["nfe"].tolist() == [1]
    # Two jumps, or an ODE solve of the instantaneous field u(x, t, t).
    assert sample_run(tmp_path, SamplingOptions(num_samples=4, solver="meanflow", steps=2)).nfe == [
        2
    ]
    assert sample_run(tmp_path, SamplingOptions(num_samples=4, steps=3)).nfe == [6]


def test_conditional_smoke_samples_with_guidance(tmp_path, monkeypatch, capsys):
    train("conditional,smoke", tmp_path, num_steps=2)
    out = sample_run(tmp_path, SamplingOptions(num_samples=12, steps=2, guidance_scale=2.0))
    assert out.npz.name == "sample_step00000002_heun-edm2_n12_seed0_w2.npz"
    with np.load(out.npz) as npz:
        assert npz["labels"].tolist() == [*range(10), 0, 1]  # cycles through the classes
        assert float(npz["guidance_scale"]) == 2.0 and npz["nfe"].tolist() == [4]
        assert npz["images"].shape == (12, 8, 8, 3) and np.isfinite(npz["images"]).all()
    assert Image.open(out.png).size == (10 * 8 * 8 + 11 * 8, 2 * 8 * 8 + 3 * 8)  # a column a class

    chosen = sample_run(
        tmp_path,
        SamplingOptions(num_samples=12, steps=2, guidance_scale=2.0, labels=(3, 5)),
    )
    with np.load(chosen.npz) as npz:
        assert npz["labels"].tolist() == [3, 5] * 6
    with pytest.raises(ValueError, match=r"classes in \[0, 9\]"):
        sample_run(tmp_path, SamplingOptions(labels=(10,)))

    # A guidance interval, from the command line: recorded in the file's name and arrays.
    run_main(
        monkeypatch, f"--workdir={tmp_path}", "--mode=sample", "--num_samples=4", "--steps=2",
        "--guidance_scale=2", "--guidance_interval=0.5,1",
    )  # fmt: skip
    assert "guidance scale 2 for t in [0.5, 1]" in capsys.readouterr().out
    stem = "sample_step00000002_heun-edm2_n4_seed0_w2_t0.5-1"
    with np.load(tmp_path / "samples" / f"{stem}.npz") as npz:
        assert npz["guidance_interval"].tolist() == [0.5, 1.0] and npz["nfe"].tolist() == [4]
        assert np.isfinite(npz["images"]).all()
    with pytest.raises(ValueError, match=r"--guidance_interval=0.5,x must be two numbers"):
        run_main(monkeypatch, f"--workdir={tmp_path}", "--mode=sample", "--guidance_interval=0.5,x")


@pytest.mark.parametrize(
    ("variant", "params", "batch_size"),
    [
        (None, 55_676_419, 512),  # Meta's 55.7M U-Net
        ("torchcfm", 35_746_307, 128),  # torchcfm's 35.7M U-Net
        ("conditional", 55_676_419 + 11 * 512, 512),  # + a 512-wide embedding of 10 + null
        ("torchcfm,conditional", 35_746_307 + 11 * 512, 128),
        # Meta's U-Net with MeanFlow's second time MLP (128 -> 512 -> 512).
        ("meanflow", 55_676_419 + 128 * 512 + 512 + 512 * 512 + 512, 1024),
    ],
)
def test_full_variants_are_valid_with_the_peers_model_sizes(variant, params, batch_size):
    config = get_config(variant)
    validate(config, num_devices=8)
    assert config.train.batch_size == batch_size and config.data.name == "cifar10"
    assert config.data.image_size is None and config.data.random_flip
    assert param_count(build_model(config.model), (32, 32, 3)) == params
    # The one-GPU launch: four micro-batches make the update.
    config.train.accumulation_steps = 4
    validate(config, num_devices=1)


def test_recipes_match_the_references():
    meta, torchcfm = get_config(), get_config("torchcfm")
    assert (meta.path.time_sampler, meta.path.logit_mean, meta.path.logit_std) == (
        "logit_normal", 1.2, 1.2,
    )  # fmt: skip
    assert (meta.optim.optimizer, meta.optim.learning_rate, meta.optim.b2) == ("adamw", 1e-4, 0.95)
    assert meta.optim.weight_decay == 0.01  # PyTorch AdamW's default, which Meta's script keeps
    assert (meta.optim.schedule, meta.optim.grad_clip, meta.optim.ema_decay) == (
        "constant",
        0,
        0.999,
    )
    assert meta.optim.ema_warmup and meta.train.num_steps == 175_000
    assert (torchcfm.optim.optimizer, torchcfm.optim.learning_rate) == ("adam", 2e-4)
    assert (torchcfm.optim.schedule, torchcfm.optim.warmup_steps) == ("warmup_constant", 5000)
    assert (torchcfm.optim.grad_clip, torchcfm.optim.ema_decay) == (1.0, 0.9999)
    assert torchcfm.path.time_sampler == "uniform" and torchcfm.train.num_steps == 400_000
    conditional = get_config("smoke,conditional")
    assert conditional.model.num_classes == 10 and conditional.data.label_drop_prob == 0.2
    assert conditional.to_dict() == get_config("conditional,smoke").to_dict()


@pytest.mark.parametrize("variant", ["bogus", "smoke,smoke", "conditional,torchcfm"])
def test_unknown_variants_raise(variant):
    with pytest.raises(ValueError, match="Unknown CIFAR-10 config variant"):
        get_config(variant)


def test_initial_noise_of_a_sample_does_not_depend_on_the_batches():
    key = jax.random.key(3)
    whole = initial_noise(key, 0, 10, (8, 8, 3))
    parts = [
        initial_noise(key, 0, 6, (8, 8, 3)),
        initial_noise(key, 6, 10, (8, 8, 3)),
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert whole.shape == (10, 8, 8, 3) and 0.9 < float(whole.std()) < 1.1
    keys = jax.random.key_data(sde_keys(key, 0, 10))
    parts = [jax.random.key_data(sde_keys(key, a, b)) for a, b in ((0, 6), (6, 10))]
    np.testing.assert_array_equal(np.concatenate(parts), keys)
    assert len({bytes(np.asarray(k)) for k in keys}) == 10  # one Brownian motion a sample


def test_sde_sampler_options_and_paths_it_refuses():
    with pytest.raises(ValueError, match=r"--sde_diffusion='ito'.*'sigma'"):
        SamplingOptions(solver="sde", sde_diffusion="ito")
    with pytest.raises(ValueError, match=r"--sde_last_step='last'"):
        SamplingOptions(sde_last_step="last")
    with pytest.raises(ValueError, match=r"--sde_last_step_size=1.5"):
        SamplingOptions(sde_last_step_size=1.5)
    with pytest.raises(ValueError, match=r"--guidance_channels=0; expected a positive"):
        SamplingOptions(guidance_scale=2.0, guidance_channels=0)
    with pytest.raises(ValueError, match=r"--guidance_channels=3 limits guidance.*scale"):
        SamplingOptions(guidance_channels=3)
    for last in (None, 0.04):
        with pytest.raises(ValueError, match=r"--solver=sde takes --steps >= 2"):
            SamplingOptions(solver="sde", steps=1, sde_last_step_size=last)
    config = get_config("smoke")
    config.path.bridge_noise = "constant"
    with pytest.raises(ValueError, match=r"--solver=sde.*bridge_noise='constant'"):
        check_sampler(SamplingOptions(solver="sde"), config)
    check_sampler(SamplingOptions(), config)  # the ODE solvers take it


def test_bad_sampling_options_raise():
    with pytest.raises(ValueError, match="--solver='rk45'"):
        SamplingOptions(solver="rk45")
    with pytest.raises(ValueError, match="--num_samples=0"):
        SamplingOptions(num_samples=0)
    for interval in ((0.7, 0.3), (0.0, 1.5), (0.3,)):
        with pytest.raises(ValueError, match=r"--guidance_interval=.*0 <= t_min <= t_max <= 1"):
            SamplingOptions(guidance_scale=2.0, guidance_interval=interval)
    with pytest.raises(ValueError, match=r"--guidance_interval='0.3,1'.*--guidance_scale=1"):
        SamplingOptions(guidance_interval=(0.3, 1))
    with pytest.raises(ValueError, match="--mode='bogus'"):
        cifar10.run(None, "unused", "bogus")


def test_eval_scores_fid_against_its_own_samples_and_bits_per_dim(smoke_run, tmp_path):
    """FID of the eval samples against the statistics of the very same samples (drawn by
    --mode=sample with the same seed and solver) is ~0: the two modes draw identical samples
    and the FID path is wired end to end. Bits/dim on mock test images is finite."""
    weights = tmp_path / "inception.npz"
    inception.save_variables(weights, inception.inception_variables(seed=0))
    features = fid.load_inception(weights)
    options = SamplingOptions(
        num_samples=16, solver="heun", steps=2, batch_size=8, rtol=1e-3, atol=1e-3
    )
    written = sample_run(smoke_run, options)
    samples = np.load(written.npz)["images"]
    reference = fid.GaussianStats.of(features(fid.to_uint8(samples)), features.fingerprint)
    fid.save_statistics(tmp_path / "stats.npz", reference)
    eval_options = EvalOptions(
        num_samples=16, fid_stats=str(tmp_path / "stats.npz"), inception=str(weights),
        bpd_examples=4, bpd_draws=2,
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        report = cifar10.run(None, smoke_run, "eval", options, eval_options)
    assert abs(report["fid"]) < 1e-3 * np.trace(reference.sigma)
    assert report["fid_nfe"] == 4 and report["fid_samples"] == 16  # heun, 2 steps
    assert report["fid_protocol"] == "legacy-tensorflow"
    assert np.isfinite(report["bits_per_dim"]) and report["bits_per_dim"] > 0
    assert report["bpd_examples"] == 4 and report["bpd_nfe_per_draw"] > 0
    saved = list((smoke_run / "eval").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == report


# ~55 s; marked to keep CI under 25 minutes. The FID itself is scored by default in the eval
# test above, and the best-state bookkeeping in tests/test_train.py.
@pytest.mark.slow
def test_in_training_fid_is_logged_and_keeps_the_best_state(tmp_path):
    """With train.eval_every, the FID of the EMA samples is logged at every evaluation, and
    the best-scoring state is the one kept in checkpoints_best (named by best.json)."""
    weights = tmp_path / "inception.npz"
    inception.save_variables(weights, inception.inception_variables(seed=0))
    features = fid.load_inception(weights)
    noise = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    reference = fid.GaussianStats.of(features(noise), features.fingerprint)
    fid.save_statistics(tmp_path / "stats.npz", reference)
    config = get_config("smoke")
    config.train.update(eval_every=2, eval_samples=16)
    config.fid.update(stats=str(tmp_path / "stats.npz"), inception=str(weights))
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        cifar10.run(config, workdir, "train")
    scores = {line["step"]: line["fid"] for line in metrics_lines(workdir) if "fid" in line}
    assert sorted(scores) == [2, 4] and all(np.isfinite(v) and v > 0 for v in scores.values())
    best = min(scores, key=scores.get)
    assert json.loads((workdir / "best.json").read_text())["step"] == best
    assert [p.name for p in (workdir / "checkpoints_best").iterdir()] == [str(best)]


def test_in_training_fid_needs_reference_statistics(tmp_path):
    config = get_config("smoke")
    config.train.eval_every = 2
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        with pytest.raises(ValueError, match="needs reference statistics"):
            cifar10.run(config, tmp_path, "train")
    assert not (tmp_path / "checkpoints").exists()  # raised before training


def test_eval_needs_reference_statistics():
    with pytest.raises(ValueError, match="needs --fid_stats"):
        EvalOptions(num_samples=10)
    with pytest.raises(ValueError, match=r"--fid_protocol='clean'.*pytorch-fid"):
        EvalOptions(fid_stats="s.npz", fid_protocol="clean")
    with pytest.raises(ValueError, match=r"--fid_quantize='trunc'.*floor"):
        EvalOptions(fid_stats="s.npz", fid_quantize="trunc")
