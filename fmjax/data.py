"""Input data with a stateless global order: the batch at step k is a pure function of (seed, k).

Global batch ``k`` holds the examples at positions ``k * B, ..., k * B + B - 1`` of an endless
stream made of one seeded permutation of the data per epoch. Each host reads only its slice
of that batch (process ``p`` of ``P`` takes rows ``p * B / P`` to ``(p + 1) * B / P``, which is
how :func:`jax.make_array_from_process_local_data` lays out a batch over a mesh whose devices
are ordered by process). So the global batch at step ``k`` is the same on any number of
hosts or devices, and resuming needs nothing but the step.

Augmentation (a random horizontal flip) is keyed by (seed, epoch, example index) for the
same reason.
"""

from collections.abc import Callable

import numpy as np
from jaxtyping import Float, Int

__all__ = ["SOURCES", "ArraySource", "build_source", "digits", "global_batch_indices"]


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
        permutation = np.random.default_rng([seed, int(e)]).permutation(num_examples)
        indices[epoch == e] = permutation[within[epoch == e]]
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


class ArraySource:
    """An in-memory image dataset with the stateless global order of this module.

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
        self.seed, self.random_flip = seed, random_flip
        self.num_classes = (
            num_classes
            if num_classes is not None
            else (int(labels.max()) + 1 if labels is not None else None)
        )

    @property
    def num_examples(self) -> int:
        """The number of examples (one epoch)."""
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""
        return tuple(self.images.shape[1:])

    def batch(
        self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This host's slice of global batch ``step``: ``{"image": [b, h, w, c], "label": [b]}``.

        ``b = batch_size / process_count``; labels are zeros for an unlabelled source.
        """
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by process_count={process_count}."
            )
        indices, epoch = global_batch_indices(step, batch_size, self.num_examples, self.seed)
        local = batch_size // process_count
        rows = slice(process_index * local, (process_index + 1) * local)
        indices, epoch = indices[rows], epoch[rows]
        images = self.images[indices]
        if self.random_flip:
            flip = (_hash_bits(self.seed, epoch, indices) >> np.uint64(63)).astype(bool)
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        labels = self.labels[indices] if self.labels is not None else np.zeros(local, np.int32)
        return {"image": images, "label": labels}


def digits(split: str = "train", **kwargs) -> ArraySource:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), offline.

    Pixel values 0..16 are scaled to [-1, 1]. The split is fixed: 300 test images chosen by a
    permutation with seed 0, the other 1,497 for training. ``kwargs`` go to
    :class:`ArraySource`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test'; got {split!r}.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
    order = np.random.default_rng(0).permutation(images.shape[0])
    chosen = order[:300] if split == "test" else order[300:]
    return ArraySource(images[chosen], bunch.target[chosen], num_classes=10, **kwargs)


SOURCES: dict[str, Callable[..., ArraySource]] = {"digits": digits}
"""Data sources by ``config.data.name``: each takes ``split`` and :class:`ArraySource` kwargs."""


def build_source(data_config, seed: int, split: str = "train") -> ArraySource:
    """The source named by ``data_config.name``, seeded, with its augmentation options."""
    if data_config.name not in SOURCES:
        raise ValueError(
            f"config.data.name={data_config.name!r} is not a known source; expected one of "
            f"{sorted(SOURCES)}."
        )
    return SOURCES[data_config.name](split, seed=seed, random_flip=data_config.random_flip)
