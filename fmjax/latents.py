r"""Latent data: images cropped as ADM does, encoded by a VAE over every device, stored as shards.

Latent flow models (SiT, REPA, LightningDiT) train on the posteriors of the Stable Diffusion
VAE (:class:`fmjax.models.AutoencoderKL`) of 256x256 centre crops, computed once:

- :func:`center_crop_arr`: ADM's centre crop (box downsampling by 2 while the short side is at
  least twice the size, a bicubic resize of the short side to the size, the central square);
- :func:`encode_images`: the posterior mean and standard deviation
  :math:`\sigma = \exp(\log\sigma^2 / 2)` of a batch, sharded over a ``("data",)`` mesh;
- :func:`encode_dataset`: a whole dataset into a directory of shards (the horizontal flips as
  entries of their own, as SiT and REPA precompute them), resumable, with the VAE's
  fingerprint recorded; :class:`fmjax.data.LatentSource` trains on it.
"""

import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Float, UInt8

from fmjax.data import LATENTS_FILE, _claim_info, latent_shard_name
from fmjax.mesh import make_mesh
from fmjax.models.vae import AutoencoderKL

__all__ = [
    "EncodeInfo",
    "center_crop_arr",
    "encode_dataset",
    "encode_images",
    "file_fingerprint",
    "params_fingerprint",
    "vae_record",
]

log = logging.getLogger(__name__)


def center_crop_arr(
    image: UInt8[np.ndarray, "h w c"], size: int
) -> UInt8[np.ndarray, "size size c"]:
    """ADM's centre crop of a uint8 image to ``size x size`` (what SiT and REPA preprocess
    ImageNet with).

    While the short side is at least ``2 * size`` the image is halved (PIL's BOX filter,
    integer division of both sides); then it is resized with PIL's BICUBIC filter so that the
    short side is ``size`` (the other side rounded); then its central ``size x size`` square is
    cut out (offsets rounded down).

    Raises:
        ValueError: for an image that is not uint8 ``[h, w, 1 or 3]`` or a size below 1.

    Example:
        >>> import numpy as np
        >>> from fmjax.latents import center_crop_arr
        >>> center_crop_arr(np.zeros((300, 500, 3), np.uint8), 256).shape
        (256, 256, 3)
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"center_crop_arr needs a uint8 [height, width, 1 or 3] image; got dtype "
            f"{image.dtype} and shape {image.shape}."
        )
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"size={size!r} must be a positive integer.")
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(pil).reshape(pil.size[1], pil.size[0], channels)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae: AutoencoderKL, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = vae.apply({"params": params}, images, method="encode")
    return mean, jnp.exp(0.5 * logvar)


def encode_images(
    vae: AutoencoderKL,
    params: Any,
    images: UInt8[np.ndarray, "b h w c"] | Float[np.ndarray, "b h w c"],
    mesh: Mesh | None = None,
) -> tuple[Float[np.ndarray, "b h2 w2 latent"], Float[np.ndarray, "b h2 w2 latent"]]:
    r"""The posterior mean :math:`\mu` and standard deviation :math:`\sigma = \exp(\log
    \sigma^2 / 2)` of ``images`` under ``vae`` with ``params``, float32 NumPy arrays.

    ``images`` are uint8 (mapped to ``x / 127.5 - 1``) or floats in ``[-1, 1]``, NHWC. The
    batch is sharded over the ``"data"`` axis of ``mesh`` (default: this process's devices,
    :func:`fmjax.mesh.make_mesh` of ``jax.local_devices()``), padded to a multiple of its size with copies of the last
    image, whose results are dropped; the parameters are replicated.

    Raises:
        ValueError: for images that are not a non-empty 4-D batch of uint8 or floats.

    Example:
        >>> import jax, numpy as np
        >>> from fmjax.latents import encode_images
        >>> from fmjax.models import VAETiny
        >>> vae = VAETiny()
        >>> params = vae.init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]
        >>> mean, std = encode_images(vae, params, np.zeros((3, 8, 8, 3), np.uint8))
        >>> mean.shape, bool((std > 0).all())
        ((3, 4, 4, 4), True)
    """
    images = np.asarray(images)
    if (
        images.ndim != 4
        or not len(images)
        or not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating))
    ):
        raise ValueError(
            f"encode_images needs a non-empty batch [b, height, width, channels] of uint8 or "
            f"float images; got dtype {images.dtype} and shape {images.shape}."
        )
    mesh = mesh or make_mesh(jax.local_devices())
    count = len(images)
    padded = -(-count // mesh.size) * mesh.size
    if padded > count:
        images = np.concatenate([images, np.repeat(images[-1:], padded - count, axis=0)])
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    mean, std = _encode(vae, params, jax.device_put(images, NamedSharding(mesh, P("data"))))
    return np.asarray(mean)[:count], np.asarray(std)[:count]


def file_fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes (a weights file's fingerprint).

    Example:
        >>> import pathlib, tempfile
        >>> from fmjax.latents import file_fingerprint
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "w"
        >>> _ = path.write_bytes(b"")
        >>> file_fingerprint(path)[:15]
        'sha256:e3b0c442'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def params_fingerprint(params: Any) -> str:
    """``"sha256:<hex>"`` of a parameter tree: every leaf's path, dtype, shape and bytes, in
    path order (the same for the same values wherever they were computed).

    Example:
        >>> import numpy as np
        >>> from fmjax.latents import params_fingerprint
        >>> a = params_fingerprint({"w": np.zeros(2, np.float32)})
        >>> a == params_fingerprint({"w": np.zeros(2, np.float32)}), a == params_fingerprint(
        ...     {"w": np.ones(2, np.float32)})
        (True, False)
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return f"sha256:{digest.hexdigest()}"


def vae_record(vae: AutoencoderKL, fingerprint: str, weights: str) -> dict:
    """What ``latents.json`` records of the VAE: its configuration, its weights' fingerprint
    (:func:`file_fingerprint` or :func:`params_fingerprint`) and where they came from."""
    return {
        "block_out_channels": list(vae.block_out_channels),
        "layers_per_block": vae.layers_per_block,
        "latent_channels": vae.latent_channels,
        "norm_num_groups": vae.norm_num_groups,
        "dtype": jnp.dtype(vae.dtype).name,
        "fingerprint": fingerprint,
        "weights": weights,
    }


@dataclasses.dataclass(frozen=True)
class EncodeInfo:
    """What :func:`encode_dataset` made.

    Attributes:
        directory: the latents' directory.
        num_images: the images of the dataset.
        num_shards: the shards of the whole directory.
        encoded: the shards this call encoded (the others were there already or are another
            process's).
        images_per_sec: this call's images (flips included) encoded per second.
    """

    directory: pathlib.Path
    num_images: int
    num_shards: int
    encoded: int
    images_per_sec: float


def encode_dataset(
    out_dir: str | os.PathLike,
    example: Callable[[int], tuple[UInt8[np.ndarray, "h w c"], int]],
    num_images: int,
    *,
    vae: AutoencoderKL,
    params: Any,
    vae_info: dict,
    image_size: int,
    num_classes: int | None,
    flip: bool = True,
    shard_size: int = 4096,
    batch_size: int = 64,
    dataset: dict | None = None,
    mesh: Mesh | None = None,
    max_shards: int | None = None,
) -> EncodeInfo:
    """Encodes images ``0 .. num_images - 1`` of a dataset into shards of posteriors in
    ``out_dir``, for :class:`fmjax.data.LatentSource`.

    ``example(i)`` gives image ``i`` (uint8 ``[h, w, c]``, any size) and its label; each is
    cropped by :func:`center_crop_arr` to ``image_size`` and encoded by
    :func:`encode_images` in batches of ``batch_size`` over ``mesh``. In a multi-process
    launch (``jax.distributed``) with a shared ``out_dir``, process ``p`` of ``P`` encodes
    the shards ``k`` with ``k mod P = p`` on its own devices; nothing is exchanged. Shard ``k``
    (``shard_{k:06d}/``: ``mean.npy``, ``std.npy``, float32 ``[n, h, w, c]``, and
    ``label.npy``, int32 ``[n]``) covers the images ``[k S, (k + 1) S)`` for ``S =
    shard_size``, followed with ``flip`` by their horizontal flips, so ``n`` is twice the
    images. A shard is written under a temporary name and renamed when complete, so running
    the same call again after an interruption keeps the complete shards, encodes the others
    and ends with the files of an uninterrupted run; other arguments or weights for an
    existing directory are refused (``latents.json`` records them, ``vae_info`` with the
    weights' fingerprint from :func:`vae_record`).

    Args:
        out_dir: where the shards go (created if missing).
        example: image and label by index.
        num_images: how many images.
        vae: the autoencoder.
        params: its parameters.
        vae_info: its record in ``latents.json`` (:func:`vae_record`).
        image_size: the side of the crops.
        num_classes: the dataset's classes (None: unlabelled; the labels are then 0).
        flip: also store every image's horizontal flip.
        shard_size: images per shard.
        batch_size: images per encoder call.
        dataset: what the images are (recorded, e.g. ``{"name": "imagenet2012", "split":
            "train"}``).
        mesh: this process's devices (default: its local devices).
        max_shards: stop after encoding this many shards in this process (None: all).

    Returns:
        An :class:`EncodeInfo`.

    Raises:
        ValueError: for a count, size or batch that is not a positive integer, or an
            ``out_dir`` holding other latents.

    Example::

        info = encode_dataset("latents", source.example, source.num_examples, vae=vae,
                              params=params, vae_info=vae_record(vae, fp, "sd-vae-ft-ema"),
                              image_size=256, num_classes=1000)
    """
    for name, value in (
        ("num_images", num_images),
        ("image_size", image_size),
        ("shard_size", shard_size),
        ("batch_size", batch_size),
    ):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    f = vae.downsampling
    if image_size % f:
        raise ValueError(
            f"image_size={image_size} must be a multiple of the VAE's {f}x downsampling."
        )
    mesh = mesh or make_mesh(jax.local_devices())
    process, processes = jax.process_index(), jax.process_count()
    out = pathlib.Path(out_dir)
    side = image_size // f
    record = {
        "num_images": num_images,
        "shard_size": shard_size,
        "flip": bool(flip),
        "image_size": image_size,
        "latent_shape": [side, side, vae.latent_channels],
        "num_classes": num_classes,
        "scaling_factor": float(vae.scaling_factor),
        "vae": vae_info,
        "dataset": dataset or {},
    }
    _claim_info(
        out / LATENTS_FILE,
        record,
        what="latents",
        advice="resume with the same arguments and weights or choose another directory",
    )
    starts = range(0, num_images, shard_size)
    encoded, count, began = 0, 0, time.perf_counter()
    for index, start in enumerate(starts):
        path = out / latent_shard_name(index)
        if index % processes != process or path.is_dir():
            continue
        if max_shards is not None and encoded >= max_shards:
            break
        stop = min(start + shard_size, num_images)
        crops, labels = [], []
        for i in range(start, stop):
            image, label = example(i)
            crops.append(center_crop_arr(np.asarray(image, np.uint8), image_size))
            labels.append(label)
        images, labels = np.stack(crops), np.asarray(labels, np.int32)
        if flip:
            images = np.concatenate([images, images[:, :, ::-1]])
            labels = np.concatenate([labels, labels])
        parts = [
            encode_images(vae, params, images[b : b + batch_size], mesh)
            for b in range(0, len(images), batch_size)
        ]
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a shard an interruption left half-written
        tmp.mkdir()
        np.save(tmp / "mean.npy", np.concatenate([m for m, _ in parts]))
        np.save(tmp / "std.npy", np.concatenate([s for _, s in parts]))
        np.save(tmp / "label.npy", labels)
        os.replace(tmp, path)
        encoded, count = encoded + 1, count + len(images)
        log.info(
            "Shard %d of %d: images %d-%d (%.1f images/s)",
            index + 1, len(starts), start + 1, stop, count / (time.perf_counter() - began),
        )  # fmt: skip
    seconds = time.perf_counter() - began
    return EncodeInfo(
        directory=out,
        num_images=num_images,
        num_shards=len(starts),
        encoded=encoded,
        images_per_sec=count / seconds if count else 0.0,
    )
