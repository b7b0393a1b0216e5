"""Data benchmarks: images/s the CIFAR-10 source delivers vs images/s a train step consumes.

Both run on this host: the source reads tfds mock CIFAR-10 (examples generated from the
dataset's metadata, offline), one batch at a time (`Source.batch`, what the engine's
prefetch thread calls) and through `prefetch_batches` (grain threads); the train step is
`fmjax.step.make_train_step` on every local device, for the tiny U-Net (quick) or torchcfm's
CIFAR-10 U-Net (full), in bfloat16 on accelerators. `data / step` is the goal column (>= 5).

Mock examples are generated, not decoded, so a last row times what real files add: decoding
a 32x32 PNG (tfds' numpy decoder), per image and thread.
"""

import io
import time

import jax
import numpy as np

from experiments.bench import median_seconds
from fmjax import configs, data
from fmjax.mesh import make_mesh
from fmjax.step import init_state, make_train_step

GOAL = 5.0


def _images_per_second(batches, batch_size: int, num_batches: int) -> float:
    next(batches)  # warm-up: thread start, the first permutation
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch_size / (time.perf_counter() - start)


def train_step_images_per_second(model_name: str, batch_size: int, repeats: int) -> float:
    """Images/s of the engine's jitted step at ``batch_size`` on every local device."""
    config = configs.base_config()
    config.model.name = model_name
    if jax.default_backend() != "cpu":
        config.model.dtype = "bfloat16"
    config.train.batch_size = batch_size
    config.data.image_shape = (32, 32, 3)
    mesh = make_mesh(jax.local_devices())
    model = configs.build_model(config.model)
    tx, schedule = configs.make_optimizer(config.optim, config.train.num_steps)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.jit(lambda: init_state(config, model, tx), out_shardings=sharding)()
    step = make_train_step(config, model, tx, schedule, mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(
            rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32), batch_sharding
        ),
        "label": jax.device_put(np.zeros(batch_size, np.int32), batch_sharding),
    }

    def one_step():
        nonlocal state
        state, metrics = step(state, batch)  # the step donates the state it is given
        return metrics["loss"]

    return batch_size / median_seconds(one_step, repeats)


def png_decode_images_per_second(num_images: int) -> float:
    """Images/s one thread decodes 32x32x3 PNGs with tfds' numpy image decoder."""
    import tensorflow_datasets as tfds
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(num_images):
        # Smooth images compress like photographs; uniform noise would be a worst case.
        image = np.cumsum(rng.integers(0, 16, (32, 32, 3)), axis=1).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    feature = tfds.features.Image(shape=(32, 32, 3))
    feature.decode_example_np(encoded[0])  # warm-up: lazy imports
    start = time.perf_counter()
    for png in encoded:
        feature.decode_example_np(png)
    return num_images / (time.perf_counter() - start)


def run(quick: bool) -> list[dict]:
    import tensorflow_datasets as tfds

    model_name, train_batch = ("unet_tiny", 32) if quick else ("unet_cifar10_torchcfm", 128)
    num_batches, threads, repeats = (4, 2, 3) if quick else (40, 8, 10)
    data_batch = 128
    consumed = train_step_images_per_second(model_name, train_batch, repeats)
    rows = [
        {
            "measure": f"train step ({model_name}, batch {train_batch}, "
            f"{jax.local_device_count()} {jax.default_backend()} device(s))",
            "images_per_s": consumed,
        }
    ]
    with tfds.testing.mock_data(num_examples=50_000):
        source = data.TfdsSource("cifar10", "train", seed=0, random_flip=True)
        sequential = (source.batch(step, data_batch) for step in range(num_batches + 1))
        prefetched = data.prefetch_batches(
            source, 0, num_batches + 1, data_batch, num_threads=threads
        )
        for name, batches in [
            ("cifar10 mock: Source.batch, one thread", sequential),
            (f"cifar10 mock: prefetch_batches, {threads} threads", prefetched),
        ]:
            delivered = _images_per_second(batches, data_batch, num_batches)
            rows.append(
                {
                    "measure": name,
                    "images_per_s": delivered,
                    "data / step": delivered / consumed,
                    f"goal >= {GOAL:g}": delivered / consumed >= GOAL,
                }
            )
    rows.append(
        {
            "measure": "32x32 PNG decode (real files add this), one thread",
            "images_per_s": png_decode_images_per_second(256 if quick else 2048),
        }
    )
    return rows
