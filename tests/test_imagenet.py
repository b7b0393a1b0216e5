"""`python -m experiments.imagenet --mode=train|sample`: the configs of SiT's recipe, and the
smoke variant end to end on latents of mock images (encode -> train -> sample -> decode),
in-process through ``experiments.imagenet.run``."""

import dataclasses
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments import imagenet
from experiments.configs.imagenet import get_config
from fmjax import data, latents, models
from fmjax.configs import build_model, validate
from fmjax.evaluate import EvalOptions
from fmjax.generate import SamplingOptions
from fmjax.metrics import fid, inception
from fmjax.models import param_count

SIDE = 16  # mock images; VAETiny's latents are 8x8x4
NUM_IMAGES = 8

# SiT's Table 1 sizes in millions (on 32x32x4 latents with 1,000 classes).
PUBLISHED = {"sit_xl_2": 675, "sit_b_2": 130}


@pytest.mark.parametrize("variant", [None, "sit_b_2"])
def test_full_variants_validate_with_sits_recipe_and_size(variant):
    config = get_config(variant)
    config.data.latents_dir = "latents"
    validate(config, num_devices=1)
    name = variant or "sit_xl_2"
    assert config.model.name == name and config.model.num_classes == 1000
    assert (config.data.name, config.data.label_drop_prob) == ("latents", 0.1)
    assert (config.path.scheduler, config.path.prediction, config.path.time_sampler) == (
        "condot", "velocity", "uniform",
    )  # fmt: skip
    o = config.optim
    assert (o.optimizer, o.learning_rate, o.weight_decay, o.ema_decay) == ("adamw", 1e-4, 0, 0.9999)
    assert config.train.batch_size == 256
    count = param_count(build_model(config.model), imagenet.LATENT_SHAPE)
    assert abs(count / 1e6 - PUBLISHED[name]) < 0.5, count


def test_bad_variant_and_mode_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="expected one of") as error:
        get_config("sit_h_2")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--mode='bogus' is not valid") as error:
        imagenet.run(None, tmp_path, "bogus")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Latents of mock cifar10 by the random VAETiny of seed 0 (what --mode=encode writes)."""
    with tfds.testing.mock_data(num_examples=NUM_IMAGES):
        source = data.TfdsSource("cifar10", "train", image_size=SIDE)
    vae, params, info = imagenet.build_vae(None, SIDE, seed=0)
    directory = tmp_path_factory.mktemp("encoded") / "latents"
    latents.encode_dataset(
        directory, source.example, NUM_IMAGES, vae=vae, params=params, vae_info=info,
        image_size=SIDE, num_classes=source.num_classes, shard_size=8, batch_size=8,
    )  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def smoke_run(encoded, tmp_path_factory):
    config = get_config("smoke")
    config.data.latents_dir = str(encoded)
    workdir = tmp_path_factory.mktemp("imagenet_smoke")
    imagenet.run(config, workdir, "train")
    return workdir


def test_smoke_trains_with_decoded_grids(smoke_run):
    assert sorted(p.name for p in (smoke_run / "checkpoints").iterdir()) == ["2"]
    grid = Image.open(smoke_run / "samples" / "step_00000002.png")
    # 4 decoded 16x16 images, 2 per row, 1 px apart, enlarged 16x.
    assert grid.mode == "RGB" and grid.size == ((2 * SIDE + 3) * 16,) * 2


def test_smoke_samples_with_guidance_and_decodes(smoke_run):
    options = SamplingOptions(
        num_samples=6, solver="euler", steps=2, guidance_scale=1.5,
        guidance_interval=(0.0, 0.7), labels=[3, 5], batch_size=4,
    )  # fmt: skip
    out = imagenet.run(None, smoke_run, "sample", options)
    assert out.nfe == [2, 2]  # two solves of 4 and 2 samples, 2 Euler steps each
    with np.load(out.npz, allow_pickle=False) as npz:
        assert npz["images_uint8"].shape == (6, SIDE, SIDE, 3)
        assert npz["images_uint8"].dtype == np.uint8
        np.testing.assert_array_equal(npz["labels"], [3, 5, 3, 5, 3, 5])
        assert float(npz["guidance_scale"]) == 1.5
    assert Image.open(out.png).mode == "RGB"
    # SiT's released sampler: the SDE (Euler-Maruyama, sigma diffusion, the mean last step),
    # guided in the first 3 of the 4 latent channels.
    sde = dataclasses.replace(
        options, solver="sde", steps=3, sde_last_step_size=0.04, guidance_channels=3
    )
    out = imagenet.run(None, smoke_run, "sample", sde)
    assert out.nfe == [3, 3]
    assert out.npz.name.endswith("_sde-euler-sigma-mean0.04-3_n6_seed0_w1.5_t0-0.7_c3.npz")
    with np.load(out.npz, allow_pickle=False) as npz:
        assert npz["images_uint8"].shape == (6, SIDE, SIDE, 3)
        assert int(npz["guidance_channels"]) == 3 and str(npz["method"]).startswith("sde")


def test_decoder_refuses_another_vae(smoke_run, encoded):
    config = get_config("smoke")
    config.data.latents_dir = str(encoded)
    config.vae.seed = 1
    with pytest.raises(ValueError, match="is not the one that encoded"):
        imagenet.build_decoder(config)
    config.vae.seed = 0
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    x = imagenet.build_decoder(config)(z)
    assert x.shape == (2, SIDE, SIDE, 3) and np.abs(x).max() <= 1.0


def test_eval_scores_fid_of_decoded_samples_against_adm_format_stats(smoke_run, tmp_path):
    """The FID of --mode=eval's decoded samples against statistics (an ADM-format npz: only
    ``mu`` and ``sigma``) of --mode=sample's decoded samples of the same seed is ~0."""
    weights = tmp_path / "inception.npz"
    inception.save_variables(weights, inception.inception_variables(seed=0))
    features = fid.load_inception(weights)
    options = SamplingOptions(num_samples=8, solver="euler", steps=2, batch_size=4)
    written = imagenet.run(None, smoke_run, "sample", options)
    reference = fid.GaussianStats.of(features(np.load(written.npz)["images_uint8"]))
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=reference.mu, sigma=reference.sigma)
    eval_options = EvalOptions(
        num_samples=8, fid_stats=str(tmp_path / "VIRTUAL_ref.npz"), inception=str(weights),
        bpd_examples=0,
    )  # fmt: skip
    report = imagenet.run(None, smoke_run, "eval", options, eval_options)
    assert report["num_samples"] == 8
    assert abs(report["fid"]) < 1e-3 * np.trace(reference.sigma)


@pytest.mark.slow  # fresh processes, each importing JAX and Flax
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode=bogus"], "error: flag --mode=bogus: value should be one of"),
        (["--mode=sample", "--guidance_interval=0.3"], "error: --guidance_interval=[0.3] must be"),
    ],
    ids=["mode", "interval"],
)
def test_the_command_prints_one_error_line_and_exits_2(tmp_path, args, message):
    result = helpers.run_module("experiments.imagenet", f"--workdir={tmp_path}", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_a_released_checkpoint_samples_on_32x32x4_latents(tmp_path, monkeypatch):
    """--torch_checkpoint: a SiT state dict (here dit_tiny's, written by params_to_torch, as
    the file's reader would return it) becomes the network that --mode=sample uses."""
    config = get_config("smoke")
    model = build_model(config.model)
    params = model.init(
        jax.random.key(3), np.zeros((1, *imagenet.LATENT_SHAPE)), np.zeros(1), y=np.zeros(1, int)
    )["params"]
    state_dict = models.params_to_torch(params, model, imagenet.LATENT_SHAPE, peer="sit")
    read = []
    monkeypatch.setattr(
        models, "load_torch_checkpoint", lambda path, **kw: read.append((path, kw)) or state_dict
    )
    network = imagenet.imported_network(config, "SiT-XL-2-256x256.pt")
    assert read == [("SiT-XL-2-256x256.pt", {"source": "sit", "weights": "ema"})]
    for a, b in zip(jax.tree.leaves(network.ema_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    options = SamplingOptions(num_samples=2, solver="euler", steps=1, labels=[4], batch_size=2)
    out = imagenet.run(config, tmp_path, "sample", options, network=network)
    with np.load(out.npz) as npz:
        assert npz["images_uint8"].shape == (2, 64, 64, 3)  # VAETiny: 2x upsampling


@pytest.mark.slow  # a fresh process with 3 CPU devices
def test_decoding_is_sharded_and_padded_over_the_devices():
    script = (
        "import jax, numpy as np\n"
        "from experiments import imagenet\n"
        "from experiments.configs.imagenet import get_config\n"
        "assert jax.local_device_count() == 3\n"
        "vae, params, _ = imagenet.build_vae(None, 16, 0)\n"
        "z = np.asarray(jax.random.normal(jax.random.key(1), (4, 8, 8, 4)))\n"
        "x = imagenet.build_decoder(get_config('smoke'))(z)\n"
        "ref = vae.apply({'params': params}, z / vae.scaling_factor, method='decode')\n"
        "np.testing.assert_allclose(x, np.clip(ref, -1, 1), rtol=1e-5, atol=1e-5)\n"
        "print('ok', x.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=helpers.ROOT, capture_output=True, text=True,
        env={**helpers.one_device_env(), "JAX_NUM_CPU_DEVICES": "3", "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (4, 16, 16, 3)" in result.stdout
