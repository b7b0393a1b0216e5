"""Input pipelines: the stateless order and host slices over tfds (mock data), the offline
sources, the 2-D toy densities, and the errors a user meets first."""

import functools
import importlib.machinery
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fmjax import data, toy2d
from fmjax.configs import base_config

NUM_MOCK = 48  # examples per mocked split: small, so a batch of 16 crosses epochs quickly


def data_config(name, **options):
    config = base_config().data
    config.update(name=name, **options)
    return config


@pytest.fixture(params=[("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))], ids=lambda p: p[0])
def mocked(request):
    """``(name, image_shape)`` with tfds mocked: random but index-deterministic examples."""
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        yield request.param


def test_tfds_batch_contract(mocked):
    name, shape = mocked
    source = data.build_source(data_config(name), seed=0)
    assert (source.num_examples, source.image_shape, source.num_classes) == (NUM_MOCK, shape, 10)
    batch = source.batch(step=0, batch_size=16)
    assert batch["image"].shape == (16, *shape) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.1  # real pixel values, not a constant
    assert np.all((batch["label"] >= 0) & (batch["label"] < 10))


def test_tfds_same_seed_same_batches(mocked):
    name, _ = mocked
    a, b = (data.TfdsSource(name, seed=3) for _ in range(2))
    for step in (0, 4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(a.batch(step, 16)[key], b.batch(step, 16)[key])
    other = data.TfdsSource(name, seed=4)
    assert not np.array_equal(a.batch(0, 16)["image"], other.batch(0, 16)["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_tfds_host_slices_partition_the_global_batch(mocked, process_count):
    name, _ = mocked
    source = data.TfdsSource(name, seed=1)
    step, batch_size = 1, 16
    whole = source.batch(step, batch_size)
    slices = [source.batch(step, batch_size, p, process_count) for p in range(process_count)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), whole[key])
    # Disjoint: the hosts read different examples (mock images are distinct per index).
    indices, _ = data.global_batch_indices(step, batch_size, source.num_examples, seed=1)
    parts = np.split(indices, process_count)
    assert len(np.unique(np.concatenate(parts))) == batch_size
    flat = np.concatenate([s["image"].reshape(len(s["image"]), -1) for s in slices])
    assert len(np.unique(flat, axis=0)) == batch_size


def test_tfds_resume_reads_the_same_batch(mocked):
    name, _ = mocked
    first = data.TfdsSource(name, seed=2)
    # Steps 3..5 cross an epoch boundary (48 examples, 16 per batch).
    expected = [first.batch(step, 16) for step in range(6)]
    resumed = data.TfdsSource(name, seed=2)  # a new object, as after a restart
    for key in ("image", "label"):
        np.testing.assert_array_equal(resumed.batch(5, 16)[key], expected[5][key])
    prefetched = list(data.prefetch_batches(resumed, 3, 6, 16, num_threads=2))
    for got, want in zip(prefetched, expected[3:], strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])


def test_tfds_random_flip_is_keyed_and_mirrors():
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        plain = data.TfdsSource("cifar10", seed=0).batch(0, 32)["image"]
        flipped = data.TfdsSource("cifar10", seed=0, random_flip=True).batch(0, 32)["image"]
        again = data.TfdsSource("cifar10", seed=0, random_flip=True).batch(0, 32)["image"]
    np.testing.assert_array_equal(flipped, again)
    same = np.all(flipped == plain, axis=(1, 2, 3))
    mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()


def test_tfds_resizes_to_image_size():
    with tfds.testing.mock_data(num_examples=8):
        small = data.build_source(data_config("cifar10", image_size=16), seed=0)
        assert small.image_shape == (16, 16, 3)
        assert small.batch(0, 4)["image"].shape == (4, 16, 16, 3)
        # Any tfds image dataset by name; mocked imagenette images have varying sizes.
        varied = data.build_source(data_config("tfds:imagenette/160px", image_size=24), seed=0)
        batch = varied.batch(0, 4)
        assert batch["image"].shape == (4, 24, 24, 3)
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        with pytest.raises(ValueError, match="vary in size; set an image size"):
            data.TfdsSource("imagenette/160px")


def test_missing_dataset_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="not prepared") as info:
        data.build_source(data_config("cifar10", data_dir=str(tmp_path)), seed=0)
    message = str(info.value)
    assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in message
    assert "config.data.data_dir" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="not a tensorflow-datasets dataset"):
        data.TfdsSource("no_such_dataset_xyz")
    with pytest.raises(ValueError, match=r"not a known source.*'tfds:<tfds dataset name>'"):
        data.build_source(data_config("cifar"), seed=0)
    with pytest.raises(ValueError, match="digits are 8x8"):
        data.build_source(data_config("digits", image_size=32), seed=0)


def test_tensorflow_never_sees_accelerators(monkeypatch):
    hidden = []
    fake_tf = types.ModuleType("tensorflow")
    fake_tf.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
    fake_tf.config = types.SimpleNamespace(
        list_physical_devices=lambda kind: ["device"] if kind == "GPU" else [],
        set_visible_devices=lambda devices, kind: hidden.append((devices, kind)),
    )
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    data._import_tfds()
    assert hidden == [([], "GPU")]


def test_digits_fixed_split():
    train, test = data.digits("train"), data.digits("test")
    assert (train.num_examples, test.num_examples) == (1497, 300)
    assert train.image_shape == test.image_shape == (8, 8, 1) and train.num_classes == 10
    # 17 levels at the centres of 17 equal bins of [-1, 1], as likelihood.dequantize has them
    levels = data.digits_levels(train.images)
    np.testing.assert_allclose(train.images, (2 * levels + 1) / 17 - 1, atol=1e-6)
    assert set(np.unique(levels)) == set(range(17))
    np.testing.assert_allclose(train.images.min(), -16 / 17, rtol=1e-6)
    assert set(np.unique(train.labels)) == set(range(10))
    np.testing.assert_array_equal(data.digits("test").images, test.images)  # fixed split
    batch = data.build_source(data_config("digits"), seed=5).batch(7, 32, 1, 2)
    again = data.build_source(data_config("digits"), seed=5).batch(7, 32, 1, 2)
    assert batch["image"].shape == (16, 8, 8, 1) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"], again["image"])


@functools.cache
def jitted(fn, **kwargs):
    return jax.jit(fn, **kwargs)


def sample_toy(name, seed, num=4096):
    """Samples as NumPy: the checks below run eagerly, where every jnp op would compile."""
    sample = jitted(toy2d.TOY_2D[name].sample, static_argnums=1)
    return np.asarray(sample(jax.random.key(seed), num))


def log_prob_toy(name, x):
    return np.asarray(jitted(toy2d.TOY_2D[name].log_prob)(jnp.asarray(x)))


@pytest.mark.parametrize("name", sorted(toy2d.TOY_2D))
def test_toy_2d_sampling(name):
    toy = toy2d.TOY_2D[name]
    x = sample_toy(name, 0)
    assert x.shape == (4096, 2) and x.dtype == np.float32
    assert np.all(np.isfinite(x)) and np.abs(x).max() < 8.0
    np.testing.assert_array_equal(x, sample_toy(name, 0))
    assert not np.array_equal(x, sample_toy(name, 1))
    if toy.log_prob is not None:
        assert np.all(np.isfinite(log_prob_toy(name, x)))  # samples lie on the support


def test_toy_2d_shapes_of_the_distributions():
    x = sample_toy("8gaussians", 0, 8192)
    assert abs(np.linalg.norm(x, axis=-1).mean() - 5.0) < 0.1
    x = sample_toy("checkerboard", 0, 8192)
    assert x.min() >= -4.0 and x.max() < 4.0
    cells = np.floor(x / 2.0).astype(np.int64)
    assert np.all(cells.sum(-1) % 2 == 0)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8 and counts.min() > 8192 / 8 * 0.85
    x = sample_toy("moons", 0, 8192)
    assert abs(x[:, 0].mean() - 0.5) < 0.1  # the moons' centre, 0.5, maps to 3(0.5) - 1


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard"])
def test_toy_2d_density_integrates_to_one(name):
    h = 0.02
    axis = np.arange(-10.0 + h / 2, 10.0, h)  # cell midpoints
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2).astype(np.float32)
    density = np.exp(log_prob_toy(name, grid).astype(np.float64))
    assert abs(density.sum() * h * h - 1.0) < 1e-4


def test_eight_gaussians_log_prob_at_a_centre():
    toy = toy2d.eight_gaussians(radius=5.0, std=0.5)
    # At a centre the nearest other component is 3.8 / 0.5 > 7 standard deviations away.
    expected = -np.log(8 * 2 * np.pi * 0.25)
    log_prob = jax.jit(toy.log_prob)(jnp.array([[5.0, 0.0]]))
    np.testing.assert_allclose(log_prob, [expected], rtol=1e-5)
