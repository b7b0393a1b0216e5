"""Latent data (fmjax.latents, fmjax.data.LatentSource, experiments.imagenet --mode=encode):
ADM's crop, sharded encoding, resumable shards, draws keyed by (seed, step, index), and
encode -> train -> sample -> decode offline."""

import json
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fmjax import configs, data, latents, rundir, sampling, train
from fmjax.mesh import make_mesh
from fmjax.models import VAETiny

SIDE = 16  # crops; VAETiny's latents are 8x8x4
NUM_IMAGES = 10  # mock cifar10 images


@pytest.fixture(scope="module")
def vae():
    model = VAETiny()
    params = model.init(jax.random.key(0), np.zeros((1, SIDE, SIDE, 3), np.float32))["params"]
    return model, params


@pytest.fixture(scope="module")
def cifar():
    with tfds.testing.mock_data(num_examples=NUM_IMAGES):
        return data.TfdsSource("cifar10", "train", image_size=SIDE)


def _encode(directory, cifar, vae, **kwargs):
    model, params = vae
    info = latents.vae_record(model, latents.params_fingerprint(params), "random, seed 0")
    return latents.encode_dataset(
        directory,
        cifar.example,
        NUM_IMAGES,
        vae=model,
        params=params,
        vae_info=info,
        image_size=SIDE,
        num_classes=cifar.num_classes,
        shard_size=4,
        batch_size=8,
        **kwargs,
    )


def _files(directory):
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _reference_crop(image, size):
    """ADM's center_crop_arr step by step: box halvings, a bicubic resize, the central square."""
    pil = Image.fromarray(image)
    width, height = pil.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        pil = pil.resize((width, height), Image.Resampling.BOX)
    scale = size / min(width, height)
    pil = pil.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    array = np.array(pil)
    y, x = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[y : y + size, x : x + size]


def test_center_crop_follows_adm():
    rng = np.random.default_rng(0)
    for height, width in ((70, 45), (16, 16), (33, 100), (130, 64), (20, 17)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        out = latents.center_crop_arr(image, SIDE)
        assert out.shape == (SIDE, SIDE, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, _reference_crop(image, SIDE))
    # 64 -> 32 -> 16 by box halvings, then no resize: 4x4 block means, but for PIL's rounding
    # of each halving's 8-bit result (at most one level each).
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    halved = image.reshape(16, 4, 16, 4, 3).astype(float).mean(axis=(1, 3))
    np.testing.assert_allclose(latents.center_crop_arr(image, SIDE), halved, atol=2.0)
    grey = rng.integers(0, 256, (40, 24, 1), dtype=np.uint8)
    assert latents.center_crop_arr(grey, SIDE).shape == (SIDE, SIDE, 1)
    with pytest.raises(ValueError, match="uint8"):
        latents.center_crop_arr(image.astype(np.float32), SIDE)


def test_sharded_encode_equals_one_device(vae):
    model, params = vae
    assert jax.device_count() >= 4
    images = np.random.default_rng(1).integers(0, 256, (6, SIDE, SIDE, 3), dtype=np.uint8)
    mean1, std1 = latents.encode_images(model, params, images, make_mesh(jax.devices()[:1]))
    mean, std = latents.encode_images(model, params, images)  # every device, padded to 8
    assert mean.shape == (6, 8, 8, 4)
    np.testing.assert_allclose(mean, mean1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, std1, rtol=1e-5, atol=1e-6)
    direct_mean, logvar = model.apply({"params": params}, images / 127.5 - 1.0, method="encode")
    np.testing.assert_allclose(mean, direct_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, np.exp(0.5 * np.asarray(logvar)), rtol=1e-5, atol=1e-6)
    floats, _ = latents.encode_images(model, params, images / 127.5 - 1.0)
    np.testing.assert_allclose(floats, mean, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, cifar, vae):
    directory = tmp_path_factory.mktemp("whole") / "latents"
    info = _encode(directory, cifar, vae)
    return directory, info


def test_shards_hold_the_crops_flips_and_labels(encoded, cifar, vae):
    directory, info = encoded
    assert (info.num_shards, info.encoded) == (3, 3)  # 4 + 4 + 2 images
    saved = json.loads((directory / data.LATENTS_FILE).read_text())
    assert saved["latent_shape"] == [8, 8, 4] and saved["flip"] is True
    assert saved["vae"]["fingerprint"] == latents.params_fingerprint(vae[1])
    shard = directory / data.latent_shard_name(2)
    mean, labels = np.load(shard / "mean.npy"), np.load(shard / "label.npy")
    crops = np.stack([latents.center_crop_arr(cifar.example(i)[0], SIDE) for i in (8, 9)])
    expected, _ = latents.encode_images(*vae, np.concatenate([crops, crops[:, :, ::-1]]))
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [cifar.example(i)[1] for i in (8, 9, 8, 9)]


def test_an_interrupted_encoding_resumes_to_the_same_files(encoded, cifar, vae, tmp_path):
    whole, _ = encoded
    directory = tmp_path / "latents"
    first = _encode(directory, cifar, vae, max_shards=1)
    assert first.encoded == 1 and len(list(directory.glob("shard_*"))) == 1
    # A shard being written when the job was killed is left under its temporary name.
    (directory / (data.latent_shard_name(1) + ".tmp")).mkdir()
    with pytest.raises(ValueError, match="unfinished"):
        data.LatentSource(directory)
    second = _encode(directory, cifar, vae)
    assert second.encoded == 2
    assert _files(directory) == _files(whole)
    assert _encode(directory, cifar, vae).encoded == 0
    with pytest.raises(ValueError, match="holds other latents"):
        _encode(directory, cifar, vae, flip=False)


def test_processes_split_the_shards(encoded, cifar, vae, tmp_path, monkeypatch):
    """Two processes (simulated) encode the even and the odd shards into one directory."""
    whole, _ = encoded
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    directory = tmp_path / "latents"
    counts = []
    for process in (1, 0):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        counts.append(_encode(directory, cifar, vae).encoded)
    assert counts == [1, 2]  # shard 1; shards 0 and 2
    assert _files(directory) == _files(whole)


def test_draws_are_a_function_of_seed_step_and_index(encoded):
    directory, _ = encoded
    source = data.LatentSource(directory, seed=3)
    assert source.num_examples == 2 * NUM_IMAGES and source.image_shape == (8, 8, 4)
    batch = source.batch(step=5, batch_size=8)
    indices, _ = data.global_batch_indices(5, 8, source.num_examples, 3)
    mean, std, labels = source.read_posterior(indices)
    eps = data.latent_noise(3, 5, indices, (8, 8, 4))
    np.testing.assert_allclose(
        batch["image"], source.scaling_factor * (mean + std * eps), rtol=1e-6
    )
    np.testing.assert_array_equal(batch["label"], labels)
    # Each host's rows are the same draws as the global batch's (any device or host count).
    halves = [source.batch(5, 8, process_index=p, process_count=2)["image"] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), batch["image"])
    # Another step draws again; another seed too.
    np.testing.assert_array_equal(data.latent_noise(3, 5, indices[:1], (8, 8, 4))[0], eps[0])
    assert not np.allclose(data.latent_noise(3, 6, indices, (8, 8, 4)), eps)
    assert not np.allclose(data.latent_noise(4, 5, indices, (8, 8, 4)), eps)
    assert float(np.std(eps)) == pytest.approx(1.0, abs=0.1)


def test_latents_config_is_checked():
    config = configs.base_config()
    config.data.name = "latents"
    with pytest.raises(ValueError, match="latents_dir"):
        configs.validate(config, 1)
    config.data.latents_dir, config.data.random_flip = "somewhere", True
    with pytest.raises(ValueError, match="random_flip"):
        configs.validate(config, 1)
    other = configs.base_config()
    other.data.latents_dir = "somewhere"
    with pytest.raises(ValueError, match="read only with"):
        configs.validate(other, 1)


def test_encode_train_sample_decode_offline(encoded, vae, tmp_path):
    directory, _ = encoded
    config = configs.base_config()
    config.model.update(name="dit_tiny", num_classes=10)
    config.data.update(name="latents", latents_dir=str(directory), label_drop_prob=0.1)
    config.train.update(num_steps=3, batch_size=8, log_every=1, checkpoint_every=3, sample_every=0)
    train.train_and_evaluate(config, tmp_path / "run")
    losses = [m["loss"] for m in helpers.metrics_lines(tmp_path / "run")]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    run = rundir.load_run(tmp_path / "run")
    labels = np.array([1, 7])

    def field(x, t):
        return run.model.apply({"params": run.ema_params}, x, t, y=labels)

    x0 = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    z = sampling.sample(field, x0, solver="euler", steps=2).x
    model, params = vae
    images = model.apply({"params": params}, z / model.scaling_factor, method="decode")
    assert images.shape == (2, SIDE, SIDE, 3) and bool(np.isfinite(images).all())


@pytest.mark.slow  # two fresh processes
def test_the_encode_command_resumes(encoded, tmp_path):
    """`python -m experiments.imagenet --mode=encode` on mock cifar10, stopped after one shard
    and run again: the files of the uninterrupted library run (same random VAETiny)."""
    whole, _ = encoded
    script = (
        "import runpy, sys, tensorflow_datasets as tfds\n"
        f"sys.argv = ['imagenet', '--mode=encode', '--workdir={tmp_path}', '--dataset=cifar10',"
        f" '--image_size={SIDE}', '--shard_size=4', '--batch_size=8'] + sys.argv[1:]\n"
        f"with tfds.testing.mock_data(num_examples={NUM_IMAGES}):\n"
        "    runpy.run_module('experiments.imagenet', run_name='__main__')\n"
    )
    for extra in (["--max_shards=1"], []):
        result = subprocess.run(
            [sys.executable, "-c", script, *extra],
            cwd=helpers.ROOT,
            env=helpers.one_device_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "2 encoded now" in result.stdout
    saved = json.loads((tmp_path / "latents" / data.LATENTS_FILE).read_text())
    assert saved["vae"]["weights"] == "random VAETiny, seed 0"
    assert saved["dataset"] == {"name": "cifar10", "split": "train"}
    assert _files(tmp_path / "latents").keys() == _files(whole).keys()
    for name in ("mean.npy", "std.npy", "label.npy"):
        for k in range(3):
            shard = data.latent_shard_name(k)
            np.testing.assert_allclose(
                np.load(tmp_path / "latents" / shard / name),
                np.load(whole / shard / name),
                rtol=1e-5,
                atol=1e-6,
            )


_TWO_PROCESS_ENCODE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np
import tensorflow_datasets as tfds
from fmjax import data, latents
from fmjax.models import VAETiny
model = VAETiny()
params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
record = latents.vae_record(model, latents.params_fingerprint(params), "random, seed 0")
with tfds.testing.mock_data(num_examples=10):
    cifar = data.TfdsSource("cifar10", "train", image_size=16)
    info = latents.encode_dataset(
        directory, cifar.example, 10, vae=model, params=params, vae_info=record,
        image_size=16, num_classes=cifar.num_classes, shard_size=4, batch_size=8,
    )
print("encoded", info.encoded, "of", info.num_shards)
"""


def test_two_processes_encode_the_shards_of_one_process(encoded, tmp_path):
    """Two real processes (jax.distributed on localhost, 2 CPU devices each) share the shards
    and the description file, and write what one process with 8 devices writes."""
    whole, _ = encoded
    directory = tmp_path / "latents"
    outputs = helpers.two_processes(_TWO_PROCESS_ENCODE, str(directory))
    # Process 0 takes shards 0 and 2, process 1 shard 1.
    assert "encoded 2 of 3" in outputs[0] and "encoded 1 of 3" in outputs[1], outputs
    ours, reference = _files(directory), _files(whole)
    assert sorted(ours) == sorted(reference)
    assert ours[data.LATENTS_FILE] == reference[data.LATENTS_FILE]
    for name in sorted(ours):
        if name.endswith(".npy"):
            a, b = (np.load(d / name) for d in (directory, whole))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
