"""Input data with a stateless global order: the batch at step k is a pure function of (seed, k).

Global batch ``k`` holds the examples at positions ``k * B, ..., k * B + B - 1`` of an endless
stream made of one seeded permutation of the data per epoch. Each host reads only its slice
of that batch (process ``p`` of ``P`` takes rows ``p * B / P`` to ``(p + 1) * B / P``, which is
how :func:`jax.make_array_from_process_local_data` lays out a batch over a mesh whose devices
are ordered by process). So the global batch at step ``k`` is the same on any number of
hosts or devices, and resuming needs nothing but the step.

Augmentation (a random horizontal flip) is keyed by (seed, epoch, example index) for the
same reason.

Sources (all :class:`Source`: ``batch``, ``image_shape``, ``num_classes``, ``num_examples``):

- :class:`ArraySource`: images in memory, e.g. :func:`digits` (offline, scikit-learn).
- :class:`TfdsSource`: any tensorflow-datasets image dataset, read by random access from its
  ArrayRecord files (``tfds.data_source``; no TensorFlow at train time).
- :class:`PairSource`: stored ``(noise, sample)`` pairs of a trained run (reflow and
  distillation, :mod:`fmjax.reflow`); its batches also carry ``"noise"``.
- :class:`LatentSource`: stored VAE posteriors (:mod:`fmjax.latents`); each batch is a draw
  from them keyed by (seed, step, example index).

:func:`prefetch_batches` produces consecutive batches on a pool of threads (grain), in order.
"""

import abc
import functools
import importlib.util
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from jaxtyping import Float, Int

from fmjax.keys import Stream, stream_key

__all__ = [
    "DIGITS_LEVELS",
    "LATENTS_FILE",
    "PAIRS_FILE",
    "SOURCES",
    "ArraySource",
    "LatentSource",
    "PairSource",
    "Source",
    "TfdsSource",
    "build_source",
    "digits",
    "digits_levels",
    "global_batch_indices",
    "latent_noise",
    "latent_shard_name",
    "pair_chunk_name",
    "prefetch_batches",
    "read_latents_info",
    "read_pairs_info",
]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    # Cached: every batch of an epoch needs the same permutation, which is costly to draw for
    # a large dataset. Read-only, because the cache hands out the same array.
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    permutation.flags.writeable = False
    return permutation


def global_batch_indices(
    step: int, batch_size: int, num_examples: int, seed: int
) -> tuple[Int[np.ndarray, " batch"], Int[np.ndarray, " batch"]]:
    """The example indices of global batch ``step`` and the epoch each belongs to.

    Example:
        >>> from fmjax.data import global_batch_indices
        >>> idx, epoch = global_batch_indices(step=2, batch_size=4, num_examples=10, seed=0)
        >>> epoch.tolist()  # positions 8..11 of the stream: two from epoch 0, two from epoch 1
        [0, 0, 1, 1]
    """
    position = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, within = np.divmod(position, num_examples)
    indices = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        indices[epoch == e] = _epoch_permutation(seed, int(e), num_examples)[within[epoch == e]]
    return indices, epoch


def _hash_bits(seed: int, epoch: np.ndarray, index: np.ndarray) -> np.ndarray:
    """A uniform pseudo-random uint64 per (seed, epoch, index): splitmix64 of their mix."""
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
            + epoch.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            + index.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Source(abc.ABC):
    """Examples read by index, served in the stateless global order of this module.

    A subclass says how many examples there are, their shape and classes, and how to
    :meth:`read` examples by index; the order, the per-host slice and the flip are shared.

    Args:
        seed: the seed of the order and the augmentation.
        random_flip: flip each example horizontally with probability 1/2, keyed by (seed,
            epoch, example index).
    """

    num_classes: int | None
    """The number of classes, or None for an unlabelled source."""

    def __init__(self, *, seed: int, random_flip: bool):
        self.seed, self.random_flip = seed, random_flip

    @property
    @abc.abstractmethod
    def num_examples(self) -> int:
        """The number of examples (one epoch)."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""

    @abc.abstractmethod
    def read(
        self, indices: Int[np.ndarray, " b"]
    ) -> tuple[Float[np.ndarray, " b h w c"], Int[np.ndarray, " b"]]:
        """Examples ``indices``: float32 images in [-1, 1] and int32 labels (zeros if none)."""

    def read_extra(self, indices: Int[np.ndarray, " b"]) -> dict[str, np.ndarray]:
        """Arrays of examples ``indices`` that a batch carries beside the images and labels
        (none here; :class:`PairSource` adds ``"noise"``)."""
        del indices
        return {}

    def _local_indices(
        self, step: int, batch_size: int, process_index: int, process_count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The example indices and epochs of this host's rows of global batch ``step``."""
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by process_count={process_count}."
            )
        indices, epoch = global_batch_indices(step, batch_size, self.num_examples, self.seed)
        local = batch_size // process_count
        rows = slice(process_index * local, (process_index + 1) * local)
        return indices[rows], epoch[rows]

    def batch(
        self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This host's slice of global batch ``step``: ``{"image": [b, h, w, c], "label": [b]}``
        and the arrays of :meth:`read_extra`.

        ``b = batch_size / process_count``; images are float32 in [-1, 1], labels int32
        (zeros for an unlabelled source).
        """
        indices, epoch = self._local_indices(step, batch_size, process_index, process_count)
        images, labels = self.read(indices)
        if self.random_flip:
            flip = (_hash_bits(self.seed, epoch, indices) >> np.uint64(63)).astype(bool)
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return {"image": images, "label": labels, **self.read_extra(indices)}


class ArraySource(Source):
    """An in-memory image dataset.

    Args:
        images: ``[n, h, w, c]`` float images in [-1, 1].
        labels: ``[n]`` integer class labels, or None.
        seed: the seed of the order and the augmentation.
        random_flip: flip each example horizontally with probability 1/2.
        num_classes: the number of classes (default: ``max(labels) + 1``).

    Example:
        >>> import numpy as np
        >>> from fmjax.data import ArraySource
        >>> source = ArraySource(np.zeros((10, 8, 8, 1), np.float32), np.arange(10) % 3)
        >>> batch = source.batch(step=0, batch_size=4, process_index=1, process_count=2)
        >>> batch["image"].shape, batch["label"].shape
        ((2, 8, 8, 1), (2,))
    """

    def __init__(
        self,
        images: Float[np.ndarray, " n h w c"],
        labels: Int[np.ndarray, " n"] | None = None,
        *,
        seed: int = 0,
        random_flip: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__(seed=seed, random_flip=random_flip)
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(
                f"images must be [n, height, width, channels]; got shape {images.shape}."
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"labels must be integers of shape [n]=({images.shape[0]},); got dtype "
                    f"{labels.dtype} and shape {labels.shape}."
                )
            labels = labels.astype(np.int32)
        self.images, self.labels = images, labels
        self.num_classes = (
            num_classes
            if num_classes is not None
            else (int(labels.max()) + 1 if labels is not None else None)
        )

    @property
    def num_examples(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def read(
        self, indices: Int[np.ndarray, " b"]
    ) -> tuple[Float[np.ndarray, " b h w c"], Int[np.ndarray, " b"]]:
        labels = (
            self.labels[indices] if self.labels is not None else np.zeros(len(indices), np.int32)
        )
        return self.images[indices], labels


PAIRS_FILE = "pairs.json"
"""The description of a directory of stored pairs (:func:`fmjax.reflow.generate_pairs`)."""


def pair_chunk_name(index: int) -> str:
    """The file name of chunk ``index`` of a directory of stored pairs.

    Example:
        >>> from fmjax.data import pair_chunk_name
        >>> pair_chunk_name(3)
        'pairs_000003.npz'
    """
    return f"pairs_{index:06d}.npz"


class PairSource(ArraySource):
    r"""Stored pairs ``(x0, x1)`` of a trained run's ODE, as training data: the examples are
    the samples ``x1`` and each batch also carries their noise, ``"noise"`` (``x0``).

    Reads the directory that :func:`fmjax.reflow.generate_pairs` writes: ``pairs.json``
    (:data:`PAIRS_FILE`: ``num_pairs``, ``chunk_size``, ``image_shape``, ``num_classes``) and
    the chunks ``pairs_{i:06d}.npz`` (:func:`pair_chunk_name`) with ``x0``, ``x1`` and, for a
    class-conditional teacher, ``labels``. Every chunk must be there: an unfinished
    directory raises a ``ValueError`` that says how to finish it. The order is the stateless
    one of :class:`Source` (each pair once per epoch); the pairs are not flipped, as the
    teacher's map from noise to sample is not symmetric.

    Args:
        directory: the pairs' directory.
        seed: the seed of the order.

    Raises:
        ValueError: for a directory without ``pairs.json``, with missing chunks, or with a
            chunk whose arrays do not match its description.
    Example:
        >>> import json, pathlib, tempfile
        >>> import numpy as np
        >>> from fmjax.data import PAIRS_FILE, PairSource, pair_chunk_name
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> info = {"num_pairs": 6, "chunk_size": 6, "image_shape": [8, 8, 1],
        ...         "num_classes": None, "config": {}}
        >>> _ = (directory / PAIRS_FILE).write_text(json.dumps(info))
        >>> x0 = np.zeros((6, 8, 8, 1), np.float32)
        >>> np.savez(directory / pair_chunk_name(0), x0=x0, x1=x0 + 1)
        >>> batch = PairSource(directory).batch(step=0, batch_size=4)
        >>> sorted(batch), batch["noise"].shape
        (['image', 'label', 'noise'], (4, 8, 8, 1))
    """

    def __init__(self, directory: str | os.PathLike, *, seed: int = 0):
        self.directory = pathlib.Path(directory)
        self.info = read_pairs_info(self.directory)
        num, size = self.info["num_pairs"], self.info["chunk_size"]
        shape = tuple(self.info["image_shape"])
        parts = {"x0": [], "x1": [], "labels": []}
        for index, start in enumerate(range(0, num, size)):
            path = self.directory / pair_chunk_name(index)
            if not path.is_file():
                raise ValueError(
                    f"{path} is missing: the pairs in {self.directory} are unfinished. Run the "
                    "same `python -m experiments.reflow pairs` command again to finish them."
                )
            count = min(size, num - start)
            with np.load(path, allow_pickle=False) as chunk:
                for name in ("x0", "x1"):
                    if chunk[name].shape != (count, *shape):
                        raise ValueError(
                            f"{path}: {name} has shape {chunk[name].shape}; expected "
                            f"{(count, *shape)} (pairs.json)."
                        )
                    parts[name].append(np.asarray(chunk[name], np.float32))
                if "labels" in chunk:
                    parts["labels"].append(np.asarray(chunk["labels"], np.int32))
        num_classes = self.info.get("num_classes")
        labels = np.concatenate(parts["labels"]) if parts["labels"] else None
        if (labels is None) != (num_classes is None):
            raise ValueError(
                f"{self.directory}: labels must be stored exactly when pairs.json names "
                f"num_classes (got num_classes={num_classes!r})."
            )
        self.noise = np.concatenate(parts["x0"])
        super().__init__(np.concatenate(parts["x1"]), labels, seed=seed, num_classes=num_classes)

    def read_extra(self, indices: Int[np.ndarray, " b"]) -> dict[str, np.ndarray]:
        return {"noise": self.noise[indices]}


def read_pairs_info(directory: str | os.PathLike) -> dict:
    """The ``pairs.json`` of a directory of stored pairs, checked to hold what
    :class:`PairSource` reads."""
    return _read_info(
        pathlib.Path(directory) / PAIRS_FILE,
        ("num_pairs", "chunk_size", "image_shape", "num_classes", "config"),
        "config.data.pairs_dir must be a directory written by "
        "`python -m experiments.reflow pairs --out=DIR`",
    )


def _read_info(path: pathlib.Path, needed: tuple[str, ...], missing: str) -> dict:
    """The JSON object in ``path``, checked to have the keys ``needed``; ``missing`` says, for
    the message, what should have written it."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: {missing}.") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(info, dict) or any(k not in info for k in needed):
        raise ValueError(f"{path} must be an object with the keys {list(needed)}.")
    return info


def _claim_info(
    path: pathlib.Path, record: dict, *, what: str, advice: str, ignore: tuple[str, ...] = ()
) -> None:
    """Writes the description ``record`` of a directory of stored data to ``path``
    (``pairs.json``, ``latents.json``), or checks that the one there describes the same data:
    how a resumed writer makes sure that it adds to its own.

    Raises:
        ValueError: for a description there that differs from ``record`` in a key not in
            ``ignore``; the message lists the differences, calls the data ``what`` and ends
            with ``advice``.
    """
    if path.is_file():
        saved = json.loads(path.read_text())
        differing = {
            k: (saved.get(k), v) for k, v in record.items() if k not in ignore and saved.get(k) != v
        }
        if differing:
            lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differing.items())
            raise ValueError(f"{path.parent} holds other {what} ({lines}); {advice}.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every process of a multi-process launch writes the same record, each through its own name.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


LATENTS_FILE = "latents.json"
"""The description of a directory of stored VAE posteriors (:func:`fmjax.latents.encode_dataset`)."""


def latent_shard_name(index: int) -> str:
    """The directory name of shard ``index`` of stored VAE posteriors.

    Example:
        >>> from fmjax.data import latent_shard_name
        >>> latent_shard_name(3)
        'shard_000003'
    """
    return f"shard_{index:06d}"


def read_latents_info(directory: str | os.PathLike) -> dict:
    """The ``latents.json`` of a directory of stored posteriors, checked to hold what
    :class:`LatentSource` reads."""
    return _read_info(
        pathlib.Path(directory) / LATENTS_FILE,
        ("num_images", "shard_size", "flip", "latent_shape", "num_classes", "scaling_factor"),
        "config.data.latents_dir must be a directory written by "
        "`python -m experiments.imagenet --mode=encode --workdir=DIR`",
    )


@functools.lru_cache(maxsize=8)
def _latent_noise_fn(shape: tuple[int, ...]):
    def draw(seed, step, indices):
        key = jax.random.fold_in(stream_key(seed, Stream.LATENTS), step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
        return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)

    return jax.jit(draw)


def latent_noise(
    seed: int, step: int, indices: Int[np.ndarray, " b"], shape: tuple[int, ...]
) -> Float[np.ndarray, " b *shape"]:
    r"""Standard normal draws :math:`\epsilon_i` of ``shape``, one per example index, from
    ``fold_in(fold_in(stream_key(seed, LATENTS), step), index)``: a function of (seed, step,
    example index) only, so the same on any number of devices or hosts. Computed on the CPU.

    Example:
        >>> import numpy as np
        >>> from fmjax.data import latent_noise
        >>> a = latent_noise(0, 5, np.array([3, 9]), (2, 2, 4))
        >>> b = latent_noise(0, 5, np.array([9]), (2, 2, 4))
        >>> a.shape, bool((a[1] == b[0]).all())
        ((2, 2, 2, 4), True)
    """
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        eps = _latent_noise_fn(tuple(shape))(
            np.uint32(seed), np.uint32(step), np.asarray(indices, np.uint32)
        )
    return np.asarray(eps)


class LatentSource(Source):
    r"""Stored VAE posteriors as training data: example :math:`i` at step :math:`k` is the
    draw :math:`z = s\,(\mu_i + \sigma_i\,\epsilon)`, with :math:`s` the VAE's scaling factor
    and :math:`\epsilon` from :func:`latent_noise` ``(seed, k, i)``, as SiT and REPA train.

    Reads the directory that :func:`fmjax.latents.encode_dataset` writes: ``latents.json``
    (:data:`LATENTS_FILE`) and the shards ``shard_{i:06d}/`` (:func:`latent_shard_name`),
    each with ``mean.npy``, ``std.npy`` and ``label.npy``, memory-mapped (nothing is loaded
    until read). Shard ``i`` holds the images ``[i S, (i + 1) S)`` of the dataset, then (with
    ``flip``) their horizontal flips. The order is the stateless one of :class:`Source`; no
    flip is drawn (flips are stored entries). Every shard must be there: an unfinished
    directory raises a ``ValueError`` that says how to finish it.

    Args:
        directory: the latents' directory.
        seed: the seed of the order and of the draws.

    Raises:
        ValueError: for a directory without ``latents.json``, with missing shards, or with a
            shard whose arrays do not match its description.

    Example:
        >>> import json, pathlib, tempfile
        >>> import numpy as np
        >>> from fmjax.data import LATENTS_FILE, LatentSource, latent_shard_name
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> info = {"num_images": 3, "shard_size": 4, "flip": False, "latent_shape": [2, 2, 4],
        ...         "num_classes": 10, "scaling_factor": 0.5}
        >>> _ = (directory / LATENTS_FILE).write_text(json.dumps(info))
        >>> (directory / latent_shard_name(0)).mkdir()
        >>> for name, value in (("mean", np.ones((3, 2, 2, 4))), ("std", np.zeros((3, 2, 2, 4))),
        ...                     ("label", np.arange(3))):
        ...     np.save(directory / latent_shard_name(0) / f"{name}.npy", value)
        >>> batch = LatentSource(directory).batch(step=0, batch_size=2)
        >>> batch["image"].shape, float(batch["image"].max())  # 0.5 * (1 + 0 * eps)
        ((2, 2, 2, 4), 0.5)
    """

    def __init__(self, directory: str | os.PathLike, *, seed: int = 0):
        super().__init__(seed=seed, random_flip=False)
        self.directory = pathlib.Path(directory)
        self.info = read_latents_info(self.directory)
        num, size = self.info["num_images"], self.info["shard_size"]
        shape = tuple(self.info["latent_shape"])
        copies = 2 if self.info["flip"] else 1
        self._shards, starts = [], [0]
        for index, start in enumerate(range(0, num, size)):
            path = self.directory / latent_shard_name(index)
            if not path.is_dir():
                raise ValueError(
                    f"{path} is missing: the latents in {self.directory} are unfinished. Run "
                    "the same `python -m experiments.imagenet --mode=encode` command again to "
                    "finish them."
                )
            count = copies * min(size, num - start)
            arrays = {
                n: np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                for n in ("mean", "std", "label")
            }
            for name, expected in (("mean", (count, *shape)), ("std", (count, *shape)),
                                   ("label", (count,))):  # fmt: skip
                if arrays[name].shape != expected:
                    raise ValueError(
                        f"{path}: {name} has shape {arrays[name].shape}; expected {expected} "
                        "(latents.json)."
                    )
            self._shards.append(arrays)
            starts.append(starts[-1] + count)
        self._starts = np.asarray(starts, np.int64)
        self.num_classes = self.info["num_classes"]
        self.scaling_factor = float(self.info["scaling_factor"])

    @property
    def num_examples(self) -> int:
        return int(self._starts[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.info["latent_shape"])

    def read_posterior(
        self, indices: Int[np.ndarray, " b"]
    ) -> tuple[Float[np.ndarray, " b h w c"], Float[np.ndarray, " b h w c"], Int[np.ndarray, " b"]]:
        """The stored posterior mean and std (float32) and label (int32) of entries ``indices``."""
        indices = np.asarray(indices, np.int64)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        mean = np.empty((len(indices), *self.image_shape), np.float32)
        std, labels = np.empty_like(mean), np.empty(len(indices), np.int32)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            within = indices[rows] - self._starts[s]
            arrays = self._shards[s]
            mean[rows], std[rows] = arrays["mean"][within], arrays["std"][within]
            labels[rows] = arrays["label"][within]
        return mean, std, labels

    def read(
        self, indices: Int[np.ndarray, " b"]
    ) -> tuple[Float[np.ndarray, " b h w c"], Int[np.ndarray, " b"]]:
        """The scaled posterior means (no draw) and labels of entries ``indices``."""
        mean, _, labels = self.read_posterior(indices)
        return self.scaling_factor * mean, labels

    def batch(
        self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This host's slice of global batch ``step``: ``{"image": z, "label": [b]}`` with ``z``
        drawn from the stored posteriors by (seed, step, example index)."""
        indices, _ = self._local_indices(step, batch_size, process_index, process_count)
        mean, std, labels = self.read_posterior(indices)
        eps = latent_noise(self.seed, step, indices, self.image_shape)
        return {"image": self.scaling_factor * (mean + std * eps), "label": labels}


DIGITS_LEVELS = 17  # scikit-learn's digits have pixel values 0..16


def digits_levels(images: np.ndarray) -> np.ndarray:
    """The integer levels ``k`` in ``[0, 17)`` of digits scaled by :func:`digits` (or of
    samples in that scale, rounded to the nearest level and clipped).

    Example:
        >>> from fmjax.data import digits, digits_levels
        >>> levels = digits_levels(digits("test").images)
        >>> int(levels.min()), int(levels.max()), levels.dtype.name
        (0, 16, 'int32')
    """
    k = np.rint((np.asarray(images, np.float64) + 1.0) * DIGITS_LEVELS / 2.0 - 0.5)
    return np.clip(k, 0, DIGITS_LEVELS - 1).astype(np.int32)


def digits(split: str = "train", **kwargs) -> ArraySource:
    r"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), offline.

    The 17 pixel levels :math:`k = 0, \dots, 16` sit at the centres of 17 equal bins that
    tile :math:`[-1, 1]`: :math:`x = (2k + 1) / 17 - 1`. That is the convention of
    :func:`fmjax.likelihood.dequantize` with ``num_bins=17``, so the bits/dim of a model is
    the standard uniform-dequantisation bound (:func:`digits_levels` recovers :math:`k`). The
    split is fixed: 300 test images chosen by a permutation with seed 0, the other 1,497 for
    training. ``kwargs`` go to :class:`ArraySource`.

    Example:
        >>> from fmjax.data import digits
        >>> source = digits("test")
        >>> source.num_examples, source.image_shape, source.num_classes
        (300, (8, 8, 1), 10)
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test'; got {split!r}.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = ((2.0 * bunch.images.astype(np.float32) + 1.0) / DIGITS_LEVELS - 1.0)[..., None]
    order = np.random.default_rng(0).permutation(images.shape[0])
    chosen = order[:300] if split == "test" else order[300:]
    return ArraySource(images[chosen], bunch.target[chosen], num_classes=10, **kwargs)


# --- tensorflow-datasets ----------------------------------------------------------------------


def _import_tfds():
    """``tensorflow_datasets``, after hiding every accelerator from TensorFlow if it is installed.

    tfds imports TensorFlow when it can, and TensorFlow would otherwise reserve most of the
    GPU memory JAX needs. Hiding must happen before TF initialises its runtime.
    """
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        for kind in ("GPU", "TPU"):
            if tf.config.list_physical_devices(kind):
                try:
                    tf.config.set_visible_devices([], kind)
                except RuntimeError:  # TF was initialised before this module could hide them
                    log.warning("TensorFlow already initialised; it may hold %s memory.", kind)
    import tensorflow_datasets as tfds

    return tfds


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 ``[h, w, c]`` image cropped to its central square, then resized to ``size``."""
    from PIL import Image

    h, w, c = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    # PIL's bicubic filter widens with the scale factor, so downsizing is antialiased.
    resized = Image.fromarray(square[..., 0] if c == 1 else square).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return np.asarray(resized).reshape(size, size, c)


def _not_prepared(name: str, split: str, data_dir: str | None, builder, reason: Exception) -> str:
    where = f" --data_dir={data_dir}" if data_dir else ""
    build = f"tfds build {name} --file_format=array_record{where}"
    if builder.is_prepared():
        return (
            f"tfds dataset {name!r} is prepared at {builder.data_dir}, but its split {split!r} "
            f"cannot be read by random access ({reason}). fmjax reads ArrayRecord files: "
            f"rebuild it with `{build}` or choose another config.data.data_dir."
        )
    return (
        f"tfds dataset {name!r} is not prepared in {builder.data_dir} and fmjax never downloads "
        f"during training. Prepare it once on a machine with network access (TensorFlow may be "
        f"needed for this step only): `{build}`, or in Python `tfds.builder({name!r}, "
        f"data_dir=..., file_format='array_record').download_and_prepare()`. If it is already "
        f"prepared elsewhere, set config.data.data_dir (or TFDS_DATA_DIR) to that directory."
    )


# [namespace:]dataset_name[/config_name][:version], the forms tfds.builder takes; stricter
# than tfds on purpose: tfds joins the name to the data directory, so it must not be a path.
_TFDS_NAME = re.compile(r"([a-z0-9_]+:)?[a-z0-9_]+(/[A-Za-z0-9_.+-]+)?(:[0-9.*]+)?")


def _check_tfds_name(name: str) -> None:
    valid = isinstance(name, str) and _TFDS_NAME.fullmatch(name)
    if not valid or name.partition("/")[2].split(":")[0] in (".", ".."):
        raise ValueError(
            f"tfds dataset name {name!r} is not valid; expected dataset_name[/config_name]"
            "[:version] (e.g. 'cifar10', 'imagenette/160px'), never a path: no '..', no "
            "leading '/', at most one '/'."
        )


class TfdsSource(Source):
    """A tensorflow-datasets image dataset, read by random access from ArrayRecord files.

    Reading goes through ``builder.as_data_source`` (what ``tfds.data_source`` returns), so no
    TensorFlow is needed at train time, and nothing is downloaded: a dataset that is not
    prepared raises a ``ValueError`` that says what to run. Images are scaled to [-1, 1];
    with ``image_size`` they are cropped to their central square and resized (bicubic) when
    their size differs. Labels come from a ``"label"`` class feature when there is one.

    Args:
        name: a tfds name, with a config if any: ``"cifar10"``, ``"imagenette/160px"``.
        split: a tfds split: ``"train"``, ``"test"``, ``"train[:90%]"``...
        data_dir: where the dataset is prepared (default: ``TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        image_size: the side of the square images produced; None keeps the stored size
            (required when stored sizes vary).
        seed: the seed of the order and the augmentation.
        random_flip: flip each example horizontally with probability 1/2.

    Raises:
        ValueError: for an unknown dataset, one without an ``"image"`` feature, one whose
            images vary in size without ``image_size``, or one not prepared as ArrayRecord.

    Example (offline, with tfds' generated examples):
        >>> import tensorflow_datasets as tfds
        >>> from fmjax.data import TfdsSource
        >>> with tfds.testing.mock_data(num_examples=8):
        ...     source = TfdsSource("cifar10", "train", image_size=16)
        >>> batch = source.batch(step=0, batch_size=4)
        >>> batch["image"].shape, batch["label"].dtype, source.num_classes
        ((4, 16, 16, 3), dtype('int32'), 10)
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        data_dir: str | None = None,
        image_size: int | None = None,
        seed: int = 0,
        random_flip: bool = False,
    ):
        super().__init__(seed=seed, random_flip=random_flip)
        _check_tfds_name(name)
        tfds = _import_tfds()
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.DatasetNotFoundError:
            raise ValueError(
                f"{name!r} is not a tensorflow-datasets dataset; see `tfds.list_builders()` or "
                "https://www.tensorflow.org/datasets/catalog for names."
            ) from None
        features = builder.info.features
        if "image" not in features or not isinstance(features["image"], tfds.features.Image):
            raise ValueError(
                f"tfds dataset {name!r} has no 'image' feature (features: {sorted(features)})."
            )
        height, width, channels = features["image"].shape
        if image_size is None and (height is None or width is None):
            raise ValueError(
                f"The images of tfds dataset {name!r} vary in size; set an image size "
                "(config.data.image_size) to crop and resize them to."
            )
        label = features["label"] if "label" in features else None
        self.num_classes = (
            label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
        )
        try:
            self._examples = builder.as_data_source(split=split)
        except (KeyError, NotImplementedError) as error:
            raise ValueError(_not_prepared(name, split, data_dir, builder, error)) from None
        self.name, self.split, self.image_size = name, split, image_size
        self._image_shape = (
            (height, width, channels) if image_size is None else (image_size, image_size, channels)
        )

    @property
    def num_examples(self) -> int:
        return len(self._examples)

    def example(self, index: int) -> tuple[np.ndarray, int]:
        """Example ``index`` as stored: its uint8 ``[h, w, c]`` image and its label (0 if
        none), neither cropped nor resized (for :func:`fmjax.latents.encode_dataset`)."""
        ex = self._examples[int(index)]
        return np.asarray(ex["image"]), int(ex["label"]) if self.num_classes is not None else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def read(
        self, indices: Int[np.ndarray, " b"]
    ) -> tuple[Float[np.ndarray, " b h w c"], Int[np.ndarray, " b"]]:
        examples = [self._examples[int(i)] for i in indices]
        size = self.image_size
        images = np.stack(
            [
                _center_crop_resize(ex["image"], size)
                if size is not None and ex["image"].shape[:2] != (size, size)
                else ex["image"]
                for ex in examples
            ]
        )
        if self.num_classes is None:
            labels = np.zeros(len(indices), np.int32)
        else:
            labels = np.array([ex["label"] for ex in examples], np.int32)
        return images.astype(np.float32) / 127.5 - 1.0, labels


def prefetch_batches(
    source: Source,
    start: int,
    stop: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    num_threads: int = 8,
    buffer_size: int = 16,
) -> Iterator[dict[str, np.ndarray]]:
    """``source.batch(step, ...)`` for ``step`` in ``[start, stop)``, in order, made ahead.

    grain computes up to ``buffer_size`` batches ahead on ``num_threads`` threads, so slow
    reads (decoding, resizing) overlap with each other and with the train step. The batches
    are exactly those of :meth:`Source.batch`: resuming is starting at another ``start``.

    Example:
        >>> import numpy as np
        >>> from fmjax.data import ArraySource, prefetch_batches
        >>> source = ArraySource(np.zeros((10, 4, 4, 1), np.float32))
        >>> [b["image"].shape[0] for b in prefetch_batches(source, 3, 6, batch_size=2)]
        [2, 2, 2]
    """
    import grain

    batches = grain.MapDataset.range(start, stop).map(
        functools.partial(
            _batch_at,
            source,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
        )
    )
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer_size)
    return iter(batches.to_iter_dataset(options))


def _batch_at(source: Source, step: int, **kwargs) -> dict[str, np.ndarray]:
    return source.batch(int(step), **kwargs)


# --- the registry --------------------------------------------------------------------------


def _digits_source(
    split: str, *, seed: int, random_flip: bool, data_dir: str | None, image_size: int | None
) -> ArraySource:
    del data_dir  # the digits ship with scikit-learn
    if image_size not in (None, 8):
        raise ValueError(f"digits are 8x8; config.data.image_size={image_size} is not supported.")
    return digits(split, seed=seed, random_flip=random_flip)


SOURCES: dict[str, Callable[..., Source]] = {
    "digits": _digits_source,
    "cifar10": functools.partial(TfdsSource, "cifar10"),
    "mnist": functools.partial(TfdsSource, "mnist"),
    "fashion_mnist": functools.partial(TfdsSource, "fashion_mnist"),
}
"""Data sources by ``config.data.name``. Each is called as ``factory(split, seed=...,
random_flip=..., data_dir=..., image_size=...)``. Any other tfds image dataset is named
``"tfds:<name>"``, e.g. ``"tfds:imagenette/160px"`` with ``config.data.image_size=64``."""

TFDS_PREFIX = "tfds:"


def build_source(data_config, seed: int, split: str = "train") -> Source:
    """The source named by ``data_config.name``, seeded, with its options.

    Reads ``name``, ``random_flip``, ``data_dir`` and ``image_size`` (see
    :func:`fmjax.configs.base_config`). ``name="latents"`` is the :class:`LatentSource` of
    ``latents_dir`` (for every split). ``name="pairs"`` is the :class:`PairSource` of
    ``pairs_dir`` for the train split, and the teacher's data (as ``pairs.json`` records it)
    for any other split.

    Example:
        >>> from fmjax.configs import base_config
        >>> from fmjax.data import build_source
        >>> build_source(base_config().data, seed=0).image_shape
        (8, 8, 1)
    """
    name = data_config.name
    if name == "latents":
        return LatentSource(data_config.latents_dir, seed=seed)
    if name == "pairs":
        if split == "train":
            return PairSource(data_config.pairs_dir, seed=seed)
        # The pairs are training data only; other splits are the teacher's data.
        teacher = read_pairs_info(data_config.pairs_dir)["config"]["data"]
        return build_source(ml_collections.ConfigDict(teacher), seed, split)
    options = {"data_dir": data_config.data_dir, "image_size": data_config.image_size}
    if name.startswith(TFDS_PREFIX):
        factory = functools.partial(TfdsSource, name.removeprefix(TFDS_PREFIX))
    elif name in SOURCES:
        factory = SOURCES[name]
    else:
        raise ValueError(
            f"config.data.name={name!r} is not a known source; expected one of "
            f"{sorted(SOURCES)} or '{TFDS_PREFIX}<tfds dataset name>'."
        )
    return factory(split, seed=seed, random_flip=data_config.random_flip, **options)
