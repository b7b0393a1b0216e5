r"""FID by the standard protocol: Inception features, their Gaussian statistics, the distance.

The Fréchet Inception Distance of a set of samples to a reference set is the Fréchet distance
(:func:`fmjax.metrics.frechet.frechet_distance`) between Gaussian fits of their Inception
features:

.. math::

    \mathrm{FID} = \lVert \mu_s - \mu_r \rVert^2
        + \operatorname{tr}\big(\Sigma_s + \Sigma_r - 2 (\Sigma_s \Sigma_r)^{1/2}\big)

where the features are the 2048-d ``pool3`` activations of the 2015 TensorFlow Inception-v3
(:class:`fmjax.metrics.inception.FIDInceptionV3`, with its weights).

Two protocols feed that network (``protocol``, :data:`FID_PROTOCOLS`); both take uint8 images
``[n, h, w, 3]`` (one-channel images are repeated to three channels) and differ only in how they
reach the network's 299 x 299 input in ``[-1, 1]``:

- ``"legacy-tensorflow"`` (the default): the 2015 graph's own preprocessing. TF1's
  ``ResizeBilinear(align_corners=False)`` samples output pixel :math:`i` at input coordinate
  :math:`i \cdot \mathrm{in} / \mathrm{out}` (a grid anchored at the top-left corner, not the
  centre: :func:`resize_bilinear` with ``half_pixel_centers=False``), then
  :math:`(x - 128) / 128`. This is what the original FID code, clean-fid's
  ``mode="legacy_tensorflow"`` (torchcfm's ``compute_fid.py``), torch-fidelity and torchmetrics
  (Meta's ``flow_matching`` example) and StyleGAN/EDM's Inception detector compute, so their
  published numbers compare with fmjax's.
- ``"pytorch-fid"``: pytorch-fid's order: divide by 255, resize with half-pixel centres
  (``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``), then
  :math:`2x - 1`.

Upsampling 32 to 299, the two grids are :math:`\tfrac12 (1 - 32/299) \approx 0.45` input
pixels apart (TF1's grid, anchored at the top-left corner, samples further right and down)
and the scales differ by 0.4% (:math:`1/128` against :math:`2/255`), so the network sees
slightly shifted, differently scaled images (clean-fid studies how much such choices move FID).
Reference statistics record the protocol they were computed with, and :func:`fid_of_samples`
refuses to compare across protocols.

:func:`load_inception` gives the feature function of converted weights
(:mod:`fmjax.metrics.inception` makes them), :func:`dataset_statistics` the reference
statistics of a tfds split and :func:`fid_of_samples` the FID of a sampler. Reference
statistics are ``.npz`` files with pytorch-fid's keys ``mu`` and ``sigma``, so pytorch-fid's
own statistics files load too. From a checkout::

    python -m experiments.fid convert --in=pt_inception-2015-12-05-6726825d.pth --out=inception.npz
    python -m experiments.fid stats --dataset=cifar10 --split=train --weights=inception.npz \
        --out=cifar10_train.npz
"""

import dataclasses
import functools
import hashlib
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, Float, PyTree, UInt8

from fmjax.data import TfdsSource
from fmjax.mesh import make_mesh
from fmjax.metrics.frechet import frechet_distance, gaussian_statistics
from fmjax.metrics.inception import (
    FEATURE_DIM,
    INCEPTION_SIZE,
    FIDInceptionV3,
    default_weights_path,
    load_variables,
    plain_arrays,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_PROTOCOL",
    "FID_PROTOCOLS",
    "QUANTIZATIONS",
    "FIDResult",
    "GaussianStats",
    "InceptionFeatures",
    "dataset_statistics",
    "fid_of_samples",
    "inception_inputs",
    "load_inception",
    "load_reference",
    "load_statistics",
    "make_inception",
    "resize_bilinear",
    "save_statistics",
    "to_uint8",
]

DEFAULT_BATCH_SIZE = 256
"""Images per chunk of the Inception feature function, by default."""
FID_PROTOCOLS = ("legacy-tensorflow", "pytorch-fid")
"""How uint8 images become the network's input (see the module's docstring)."""
DEFAULT_PROTOCOL = "legacy-tensorflow"
"""The original FID code's preprocessing, which the peers' published numbers use."""
QUANTIZATIONS = ("round", "floor")
"""How :func:`to_uint8` maps samples to grey levels: to the nearest (saving a PNG, torchcfm)
or down (Meta's ``flow_matching`` example)."""

# --- preprocessing ----------------------------------------------------------------------------


def _interpolation_matrix(in_size: int, out_size: int, half_pixel_centers: bool) -> np.ndarray:
    """``[out, in]`` weights of 1-D linear interpolation, clamped edges."""
    scale = in_size / out_size
    if half_pixel_centers:
        # (i + 1/2) * in / out - 1/2, clamped at 0: PyTorch's source index for align_corners=False.
        src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    else:
        # TF1's legacy ResizeBilinear (align_corners=False): i * in / out, never negative.
        src = np.arange(out_size) * scale
    # The upper neighbour is clamped at the last pixel.
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix.astype(np.float32)


def resize_bilinear(
    images: Float[ArrayLike, " n h w c"],
    size: int | tuple[int, int],
    *,
    half_pixel_centers: bool = True,
) -> Float[Array, " n out_h out_w c"]:
    r"""Bilinear resize without antialiasing, on either of the two grids FID code uses.

    Output pixel :math:`i` samples the input at :math:`s_i` and interpolates linearly between
    pixels :math:`\lfloor s_i \rfloor` and :math:`\min(\lfloor s_i \rfloor + 1,
    \mathrm{in} - 1)`, where

    - ``half_pixel_centers=True`` (pytorch-fid):
      :math:`s_i = \max(0, (i + \tfrac12)\,\tfrac{\mathrm{in}}{\mathrm{out}} - \tfrac12)`,
      equal (to float32 round-off) to ``torch.nn.functional.interpolate(x, size,
      mode="bilinear", align_corners=False)`` and TF2's ``tf.image.resize(...,
      antialias=False)``;
    - ``half_pixel_centers=False`` (the 2015 FID graph):
      :math:`s_i = i\,\tfrac{\mathrm{in}}{\mathrm{out}}`, TF1's
      ``tf.image.resize_bilinear(x, size, align_corners=False)``, which clean-fid's
      ``legacy_tensorflow`` mode emulates with ``grid_sample``.

    Each axis is one matrix product (at full float32 precision), which accelerators run fast.
    Downsizing takes no antialiasing filter, exactly like the references.

    Args:
        images: float images, shape ``[n, h, w, c]``.
        size: the output side, or ``(out_h, out_w)``.
        half_pixel_centers: which grid (above).

    Returns:
        The resized images, float32.

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.fid import resize_bilinear
        >>> row = np.array([0.0, 4.0], np.float32).reshape(1, 1, 2, 1)
        >>> resize_bilinear(row, (1, 4))[0, 0, :, 0].tolist()
        [0.0, 1.0, 3.0, 4.0]
        >>> resize_bilinear(row, (1, 4), half_pixel_centers=False)[0, 0, :, 0].tolist()
        [0.0, 2.0, 4.0, 4.0]
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [n, h, w, c]; got {images.shape}.")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, h, w, _ = images.shape
    highest = jax.lax.Precision.HIGHEST
    if (out_h, out_w) != (h, w):
        rows = jnp.asarray(_interpolation_matrix(h, out_h, half_pixel_centers))
        cols = jnp.asarray(_interpolation_matrix(w, out_w, half_pixel_centers))
        images = jnp.einsum("oh,nhwc->nowc", rows, images, precision=highest)
        images = jnp.einsum("pw,nowc->nopc", cols, images, precision=highest)
    return images


def to_uint8(
    images: Float[ArrayLike, " *shape"], quantize: str = "round"
) -> UInt8[Array, " *shape"]:
    r"""Images in ``[-1, 1]`` to uint8 by :math:`\mathrm{round}((x + 1) \cdot 127.5)`, clipped.

    The exact inverse of :class:`fmjax.data.TfdsSource`'s scaling ``u / 127.5 - 1``, and the
    quantisation a sample goes through when it is saved as a PNG, or by torchcfm's
    ``(x * 127.5 + 128)`` truncated. ``quantize="floor"`` takes
    :math:`\lfloor (x + 1) \cdot 127.5 \rfloor` instead, as Meta's ``flow_matching`` example
    does (half a grey level darker on average). Jittable; keeps the sharding of its input.

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.fid import to_uint8
        >>> to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])).tolist()
        [0, 128, 255, 255]
        >>> to_uint8(np.array([-1.0, 0.0, 1.0, 2.0]), "floor").tolist()
        [0, 127, 255, 255]
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not valid; expected one of {QUANTIZATIONS}.")
    x = (jnp.asarray(images, jnp.float32) + 1.0) * 127.5
    x = jnp.round(x) if quantize == "round" else jnp.floor(x)
    return jnp.clip(x, 0, 255).astype(jnp.uint8)


# --- features over a mesh ---------------------------------------------------------------------


def _check_protocol(protocol: str) -> None:
    if protocol not in FID_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not valid; expected one of {FID_PROTOCOLS}.")


def inception_inputs(
    images: UInt8[ArrayLike, " n h w c"], protocol: str = DEFAULT_PROTOCOL
) -> Float[Array, " n 299 299 3"]:
    r"""The FID network's input for uint8 images ``[n, h, w, 1 or 3]``, by ``protocol``.

    ``"legacy-tensorflow"``: :math:`(R_{\mathrm{TF1}}(u) - 128) / 128`; ``"pytorch-fid"``:
    :math:`2 R(u / 255) - 1`, where :math:`R` is :func:`resize_bilinear` to 299 x 299 on the
    protocol's grid (the module's docstring compares them). One channel is repeated to three.
    Jittable.

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.fid import inception_inputs
        >>> white = np.full((1, 32, 32, 3), 255, np.uint8)
        >>> float(inception_inputs(white)[0, 0, 0, 0])  # (255 - 128) / 128
        0.9921875
        >>> float(inception_inputs(white, "pytorch-fid")[0, 0, 0, 0])
        1.0
    """
    _check_protocol(protocol)
    images = jnp.asarray(images)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    x = images.astype(jnp.float32)
    if protocol == "legacy-tensorflow":
        x = resize_bilinear(x, INCEPTION_SIZE, half_pixel_centers=False)
        return (x - 128.0) / 128.0
    return 2.0 * resize_bilinear(x / 255.0, INCEPTION_SIZE) - 1.0


def _features(variables: PyTree, images: jax.Array, precision: Any, protocol: str) -> jax.Array:
    x = inception_inputs(images, protocol)
    return FIDInceptionV3(precision=precision).apply(variables, x)


@functools.cache
def _sharded_features(mesh: Mesh, precision: Any, protocol: str) -> Callable:
    """``(variables, uint8 [b, h, w, c]) -> [b, 2048]``, each device on its slice of the batch;
    one compiled program per mesh and protocol, shared by every set of weights."""
    per_device = jax.shard_map(
        functools.partial(_features, precision=precision, protocol=protocol),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
    )
    # Replicated output: every host can read all features without another collective.
    return jax.jit(per_device, out_shardings=NamedSharding(mesh, P()))


def _global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole (multi-host safe)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


@dataclasses.dataclass(eq=False)
class InceptionFeatures:
    """uint8 images ``[n, h, w, c]`` (c = 1 or 3) to FID features ``[n, 2048]`` (NumPy float32).

    Call it with a host array of any size: it runs in chunks of at most ``batch_size`` images,
    the last one padded, each chunk sharded over the ``("data",)`` axis of ``mesh``. A global
    ``jax.Array`` whose size divides by the device count and is at most ``batch_size`` (e.g. a
    batch of samples) goes straight to the devices without a trip through the host; on several
    hosts, that is the only way to pass an array that no single host holds whole. Every
    process of a multi-host run passes the same images and gets all features. Build it with
    :func:`load_inception` or :func:`make_inception`.

    Attributes:
        variables: the :class:`~fmjax.metrics.inception.FIDInceptionV3` variables, replicated
            over ``mesh``.
        mesh: a 1-D ``("data",)`` mesh.
        batch_size: images per chunk, a multiple of the device count.
        fingerprint: identifies the weights (sha256 prefix of the weights file; None for
            weights not read from a file), stored with reference statistics.
        precision: of the convolutions and the resize.
        protocol: how images become the network's input, one of :data:`FID_PROTOCOLS`
            (:func:`inception_inputs`).
    """

    variables: PyTree
    mesh: Mesh
    batch_size: int
    fingerprint: str | None = None
    precision: Any = jax.lax.Precision.HIGHEST
    protocol: str = DEFAULT_PROTOCOL

    def __post_init__(self):
        _check_protocol(self.protocol)

    def sharded(self, images: UInt8[Array, " b h w c"]) -> Float[Array, " b 2048"]:
        """Features of a global batch (``b`` a multiple of the device count), replicated."""
        _check_images(images)
        num_devices = self.mesh.devices.size
        if images.shape[0] % num_devices:
            raise ValueError(
                f"A sharded batch must divide over the {num_devices} devices; got "
                f"{images.shape[0]} images."
            )
        sharding = NamedSharding(self.mesh, P("data"))
        if isinstance(images, jax.Array):
            images = jax.device_put(images, sharding)
        else:
            images = _global_array(np.asarray(images), sharding)
        return _sharded_features(self.mesh, self.precision, self.protocol)(self.variables, images)

    def __call__(self, images: UInt8[ArrayLike, " n h w c"]) -> Float[np.ndarray, " n 2048"]:
        _check_images(images)
        num_devices = self.mesh.devices.size
        n = images.shape[0]
        if isinstance(images, jax.Array) and n % num_devices == 0 and n <= self.batch_size:
            return np.asarray(self.sharded(images))
        images = np.asarray(images)
        chunk = min(self.batch_size, -(-n // num_devices) * num_devices)
        out = []
        for start in range(0, n, chunk):
            part = images[start : start + chunk]
            if len(part) < chunk:
                pad = np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)
                part = np.concatenate([part, pad])
            out.append(np.asarray(self.sharded(part)))
        if not out:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(out)[:n]


def _check_images(images: Any) -> None:
    shape, dtype = np.shape(images), getattr(images, "dtype", None)
    if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8:
        raise ValueError(
            f"FID Inception takes uint8 images of shape [n, h, w, 1 or 3]; got dtype {dtype} "
            f"and shape {shape}. Map [-1, 1] samples with fmjax.metrics.fid.to_uint8 first."
        )


def make_inception(
    variables: PyTree,
    *,
    mesh: Mesh | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fingerprint: str | None = None,
    precision: Any = jax.lax.Precision.HIGHEST,
    protocol: str = DEFAULT_PROTOCOL,
) -> InceptionFeatures:
    """:class:`InceptionFeatures` for given variables (e.g.
    :func:`fmjax.metrics.inception.inception_variables` in tests).

    Args:
        variables: :class:`~fmjax.metrics.inception.FIDInceptionV3` variables (``params`` and
            ``batch_stats``).
        mesh: a ``("data",)`` mesh; default :func:`fmjax.mesh.make_mesh` (every device).
        batch_size: images per chunk, rounded up to a multiple of the device count.
        fingerprint: see :class:`InceptionFeatures`.
        precision: of the convolutions and the resize.
        protocol: one of :data:`FID_PROTOCOLS` (:func:`inception_inputs`).
    """
    _check_protocol(protocol)
    if mesh is None:
        mesh = make_mesh()
    if mesh.axis_names != ("data",):
        raise ValueError(f"FID runs on a 1-D ('data',) mesh; got axes {mesh.axis_names}.")
    num_devices = mesh.devices.size
    batch_size = -(-max(batch_size, 1) // num_devices) * num_devices
    replicated = NamedSharding(mesh, P())
    variables = jax.tree.map(
        lambda v: _global_array(np.asarray(v, np.float32), replicated), variables
    )
    return InceptionFeatures(variables, mesh, batch_size, fingerprint, precision, protocol)


def load_inception(
    path: str | os.PathLike | None = None,
    *,
    mesh: Mesh | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    protocol: str = DEFAULT_PROTOCOL,
) -> InceptionFeatures:
    """The FID feature function of converted weights (default: the cache,
    :func:`fmjax.metrics.inception.default_weights_path`), preprocessing by ``protocol``
    (:data:`FID_PROTOCOLS`).

    Example::

        inception = load_inception("inception.npz")
        features = inception(images)  # uint8 [n, h, w, 3] -> float32 [n, 2048]

    Raises:
        ValueError: when the file is missing (the message says how to make it) or holds
            something else, or for an unknown protocol.
    """
    _check_protocol(protocol)
    path = default_weights_path() if path is None else pathlib.Path(path)
    variables = load_variables(path)
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return make_inception(
        variables, mesh=mesh, batch_size=batch_size, fingerprint=fingerprint, protocol=protocol
    )


# --- statistics and FID -----------------------------------------------------------------------


class GaussianStats(NamedTuple):
    """A Gaussian fit of features: what FID compares.

    Attributes:
        mu: the mean, ``[d]`` float64.
        sigma: the unbiased covariance, ``[d, d]`` float64.
        num_examples: how many feature vectors were fitted (0 when unknown).
        weights: the :attr:`InceptionFeatures.fingerprint` of the network ("" when unknown).
        protocol: the :attr:`InceptionFeatures.protocol` of the features ("" when unknown,
            as in statistics files of other tools).
    """

    mu: Float[np.ndarray, " d"]
    sigma: Float[np.ndarray, " d d"]
    num_examples: int = 0
    weights: str = ""
    protocol: str = ""

    @classmethod
    def of(
        cls,
        features: Float[np.ndarray, " n d"],
        weights: str | None = None,
        protocol: str | None = None,
    ) -> "GaussianStats":
        mu, sigma = gaussian_statistics(features)
        return cls(mu, sigma, len(features), weights or "", protocol or "")


def save_statistics(path: str | os.PathLike, stats: GaussianStats, **metadata: str) -> None:
    """Writes statistics as ``.npz`` with pytorch-fid's keys ``mu`` and ``sigma`` (+ metadata)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(
            f,
            mu=stats.mu,
            sigma=stats.sigma,
            num_examples=np.int64(stats.num_examples),
            weights=np.str_(stats.weights),
            protocol=np.str_(stats.protocol),
            **{k: np.str_(v) for k, v in metadata.items()},
        )
    os.replace(f.name, path)


def load_statistics(path: str | os.PathLike) -> GaussianStats:
    """Reads statistics written by :func:`save_statistics`, pytorch-fid or clean-fid (no pickle).

    Files of other tools record no protocol (``protocol=""``: the caller's choice is used);
    files of fmjax versions before protocols were recorded hold pytorch-fid's.

    Raises:
        ValueError: for a file without ``mu`` and ``sigma``, with an object array (which would
            need pickle), or whose ``mu`` is not ``[d]`` and ``sigma`` not a finite ``[d, d]``.
    """
    with np.load(path, allow_pickle=False) as npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {npz.files}).")
        with plain_arrays(path):
            stats = GaussianStats(
                np.asarray(npz["mu"], np.float64),
                np.asarray(npz["sigma"], np.float64),
                int(npz["num_examples"]) if "num_examples" in npz.files else 0,
                str(npz["weights"]) if "weights" in npz.files else "",
                _recorded_protocol(npz),
            )
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else None
    if d is None or stats.sigma.shape != (d, d):
        raise ValueError(
            f"{path} holds mu of shape {stats.mu.shape} and sigma of shape {stats.sigma.shape}; "
            "expected [d] and [d, d] (d = 2048 for FID)."
        )
    if not (np.all(np.isfinite(stats.mu)) and np.all(np.isfinite(stats.sigma))):
        raise ValueError(f"{path} holds non-finite statistics (NaN or inf in mu or sigma).")
    return stats


def load_reference(
    stats: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    protocol: str | None = None,
    mesh: Mesh | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[GaussianStats, InceptionFeatures]:
    """Reference statistics and the feature function that matches them.

    The protocol is ``protocol`` when given, else the one the statistics record, else
    :data:`DEFAULT_PROTOCOL` (files of other tools record none); :func:`fid_of_samples` refuses
    a given protocol that contradicts the record.

    Example::

        reference, inception = load_reference("cifar10_train.npz", "inception.npz")
        result = fid_of_samples(sample_fn, 50_000, reference, inception, batch_size=500)

    Args:
        stats: statistics (:func:`load_statistics`).
        weights: converted Inception weights (:func:`load_inception`; None: the cache).
        protocol: one of :data:`FID_PROTOCOLS`, or None (above).
        mesh: as for :func:`load_inception`.
        batch_size: as for :func:`load_inception`.
    """
    reference = load_statistics(stats)
    protocol = protocol or reference.protocol or DEFAULT_PROTOCOL
    inception = load_inception(weights, mesh=mesh, batch_size=batch_size, protocol=protocol)
    return reference, inception


def _recorded_protocol(npz: Any) -> str:
    if "protocol" in npz.files:
        return str(npz["protocol"])
    # fmjax recorded the weights before it recorded the protocol, and then used pytorch-fid's.
    return "pytorch-fid" if "weights" in npz.files else ""


def _progress(iterable, total: int, desc: str):
    if jax.process_index() != 0:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", mininterval=10.0)


def dataset_statistics(
    name: str,
    split: str,
    inception: InceptionFeatures,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    flips: bool = False,
) -> GaussianStats:
    """Inception statistics of every image of a tfds split, read by :class:`fmjax.data.TfdsSource`
    at their stored size and mapped back to the stored uint8 exactly (:func:`to_uint8`).

    ``flips=True`` fits the features of every image and of its mirror image: the statistics,
    in expectation, of a set whose images are each flipped with probability 1/2, which is
    what Meta's ``flow_matching`` example scores against (its training loader's images, under
    ``RandomHorizontalFlip``).
    """
    source = TfdsSource(name, split, data_dir=data_dir)
    n, step = source.num_examples, inception.batch_size
    starts = range(0, n, step)
    features = []
    for start in _progress(starts, len(starts), f"{name}/{split}") if progress else starts:
        images, _ = source.read(np.arange(start, min(start + step, n)))
        pixels = np.asarray(to_uint8(images))
        features.append(inception(pixels))
        if flips:
            features.append(inception(np.ascontiguousarray(pixels[:, :, ::-1])))
    return GaussianStats.of(np.concatenate(features), inception.fingerprint, inception.protocol)


class FIDResult(NamedTuple):
    """What :func:`fid_of_samples` returns.

    Attributes:
        fid: the Fréchet Inception Distance to the reference statistics.
        stats: the samples' own statistics (cacheable with :func:`save_statistics`).
        seconds: wall time of sampling and feature extraction.
    """

    fid: float
    stats: GaussianStats
    seconds: float


def fid_of_samples(
    sample_fn: Callable[[int, int], Float[Array, " b h w c"]],
    num_samples: int,
    reference: GaussianStats,
    inception: Callable[[UInt8[Array, " b h w c"]], Float[ArrayLike, " b d"]],
    *,
    batch_size: int,
    progress: bool = True,
    quantize: str = "round",
) -> FIDResult:
    """FID of ``num_samples`` generated images against reference statistics.

    ``sample_fn(index, batch_size)`` returns batch number ``index`` of images in ``[-1, 1]``
    (a global array, ideally sharded over the devices; deriving its noise from
    ``fold_in(key, index)`` makes the result independent of the device count). Batches are
    quantised to uint8 on the devices (:func:`to_uint8` by ``quantize``, one of
    :data:`QUANTIZATIONS`; ``"round"``, as saving PNGs would) and fed to
    ``inception``; the last batch is generated whole and trimmed, so one program serves all
    batches.

    Args:
        sample_fn: ``(index, batch_size) -> [batch_size, h, w, c]`` images in ``[-1, 1]``.
        num_samples: how many samples to score (the protocol uses 50,000).
        reference: statistics of the reference set (:func:`dataset_statistics`).
        inception: uint8 images to features, e.g. :func:`load_inception`'s function.
        batch_size: images per ``sample_fn`` call; a multiple of the device count and at most
            ``inception.batch_size`` keeps the samples on the devices.
        progress: show a progress bar on process 0.
        quantize: ``"round"`` or ``"floor"`` (:func:`to_uint8`).

    Raises:
        ValueError: for ``num_samples < 2``, an unknown ``quantize``, or statistics computed with other Inception
            weights or another protocol than ``inception``'s.
    """
    if num_samples < 2:
        raise ValueError(f"FID needs at least 2 samples; got num_samples={num_samples}.")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not valid; expected one of {QUANTIZATIONS}.")
    fingerprint = getattr(inception, "fingerprint", None)
    if reference.weights and fingerprint and reference.weights != fingerprint:
        raise ValueError(
            f"The reference statistics were computed with Inception weights {reference.weights}, "
            f"but the feature function uses {fingerprint}; recompute them with these weights."
        )
    protocol = getattr(inception, "protocol", None)
    if reference.protocol and protocol and reference.protocol != protocol:
        raise ValueError(
            f"The reference statistics were computed with the {reference.protocol!r} FID "
            f"protocol, but the feature function uses {protocol!r}; pass "
            f"protocol={reference.protocol!r} (--fid_protocol) or recompute the statistics."
        )
    start_time = time.perf_counter()
    num_batches = -(-num_samples // batch_size)
    indices = range(num_batches)
    features = []
    for index in _progress(indices, num_batches, "FID samples") if progress else indices:
        images = sample_fn(index, batch_size)
        if images.shape[0] != batch_size:
            raise ValueError(f"sample_fn({index}, {batch_size}) returned {images.shape[0]} images.")
        features.append(np.asarray(inception(_to_uint8_jit(images, quantize))))
    stats = GaussianStats.of(np.concatenate(features)[:num_samples], fingerprint, protocol)
    fid = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
    return FIDResult(fid, stats, time.perf_counter() - start_time)


_to_uint8_jit = jax.jit(to_uint8, static_argnums=1)
