r"""FID by the standard protocol: the 2015 TensorFlow Inception-v3 in Flax, pickle-free weights,
reference statistics and a sharded evaluation of a sampler.

The Fréchet Inception Distance of a set of samples to a reference set is the Fréchet distance
(:func:`fmjax.metrics.frechet.frechet_distance`) between Gaussian fits of their Inception
features:

.. math::

    \mathrm{FID} = \lVert \mu_s - \mu_r \rVert^2
        + \operatorname{tr}\big(\Sigma_s + \Sigma_r - 2 (\Sigma_s \Sigma_r)^{1/2}\big)

where the features are the 2048-d ``pool3`` activations of the Inception-v3 graph that
TensorFlow published as ``inception-2015-12-05`` (the network of the original FID code, so of
every published CIFAR-10 number). :class:`FIDInceptionV3` is that graph as pytorch-fid ports it,
which differs from torchvision's Inception-v3 in three places: the average pools of the mixed
blocks ignore padding (``count_include_pad=False``, as TF's ``AVG`` pooling does), the pool branch
of the last block takes a *max* pool, and the weights are TF's (its 1008-class head is unused).

Preprocessing is pytorch-fid's, in its order: uint8 images ``[n, h, w, 3]`` are divided by 255,
resized to 299 x 299 by :func:`resize_bilinear` (half-pixel centres, clamped edges, no
antialiasing: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``), then
mapped to ``[-1, 1]`` by ``2x - 1``. One-channel images are repeated to three channels, as
pytorch-fid's ``convert("RGB")`` does.

How this differs from the TF1 code: the 2015 graph resizes with TF1's ``ResizeBilinear``
(``align_corners=False`` *without* half-pixel centres), which samples output pixel ``i`` at input
coordinate ``i * in / out``. That grid is anchored at the top-left corner instead of the centre,
so the image is shifted by up to half an input pixel (about 0.45 pixels when upsampling 32 to
299) and the right/bottom edge pixels are under-weighted. pytorch-fid's authors checked that
their port gives the TF features on identical 299 x 299 inputs; the resize is what remains
(clean-fid studies how much such resize choices move FID). Numbers from this module are therefore "pytorch-fid protocol" FIDs, the convention of most
PyTorch flow-matching papers (torchcfm, Meta's ``flow_matching`` example).

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is converted once (PyTorch is
needed for that step only, and reads the file with the restricted ``weights_only=True`` loader)
into an ``.npz`` that is read back with ``allow_pickle=False``::

    python -m fmjax.metrics.fid convert --in=pt_inception-2015-12-05-6726825d.pth --out=inception.npz
    python -m fmjax.metrics.fid stats --dataset=cifar10 --split=train --weights=inception.npz \
        --out=cifar10_train.npz

or ``python -m fmjax.metrics.fid download`` does the download (checked against the sha256
prefix in the file name) and the conversion into the cache directory. Reference statistics are
``.npz`` files with pytorch-fid's keys ``mu`` and ``sigma``, so pytorch-fid's own statistics
files load too.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, Float, PyTree, UInt8

from fmjax.metrics.frechet import frechet_distance, gaussian_statistics

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SIZE",
    "WEIGHTS_URL",
    "FIDInceptionV3",
    "FIDResult",
    "GaussianStats",
    "InceptionFeatures",
    "convert_state_dict",
    "dataset_statistics",
    "default_weights_path",
    "download_weights",
    "fid_of_samples",
    "inception_variables",
    "load_inception",
    "load_statistics",
    "load_variables",
    "make_inception",
    "resize_bilinear",
    "save_statistics",
    "save_variables",
    "to_uint8",
]

log = logging.getLogger(__name__)

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
# The file name carries the first hex digits of the file's sha256 (torch.hub's convention).
_WEIGHTS_SHA256_PREFIX = "6726825d"
_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.npz"
_BATCH_NORM_EPSILON = 1e-3  # TF's Inception-v3 value, kept by the port
_DEFAULT_BATCH_SIZE = 256

# --- preprocessing ----------------------------------------------------------------------------


def _interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of 1-D linear interpolation with half-pixel centres, clamped edges."""
    # Output pixel i samples the input at (i + 1/2) * in / out - 1/2, clamped at 0 (PyTorch's
    # source index for align_corners=False); the upper neighbour is clamped at the last pixel.
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix.astype(np.float32)


def resize_bilinear(
    images: Float[ArrayLike, " n h w c"], size: int | tuple[int, int]
) -> Float[Array, " n out_h out_w c"]:
    r"""Bilinear resize with half-pixel centres and no antialiasing, as pytorch-fid resizes.

    Equal (to float32 round-off) to ``torch.nn.functional.interpolate(x, size,
    mode="bilinear", align_corners=False)`` and to TF2's ``tf.image.resize(...,
    antialias=False)``: output pixel :math:`i` samples the input at
    :math:`s_i = \max(0, (i + \tfrac12)\,\tfrac{\mathrm{in}}{\mathrm{out}} - \tfrac12)` and
    interpolates linearly between pixels :math:`\lfloor s_i \rfloor` and
    :math:`\min(\lfloor s_i \rfloor + 1, \mathrm{in} - 1)`. Each axis is one matrix product (at
    full float32 precision), which accelerators run fast. Downsizing takes no antialiasing
    filter, exactly like the reference.

    Args:
        images: float images, shape ``[n, h, w, c]``.
        size: the output side, or ``(out_h, out_w)``.

    Returns:
        The resized images, float32.

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.fid import resize_bilinear
        >>> row = np.array([0.0, 4.0], np.float32).reshape(1, 1, 2, 1)
        >>> resize_bilinear(row, (1, 4))[0, 0, :, 0].tolist()
        [0.0, 1.0, 3.0, 4.0]
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [n, h, w, c]; got {images.shape}.")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, h, w, _ = images.shape
    highest = jax.lax.Precision.HIGHEST
    if (out_h, out_w) != (h, w):
        rows = jnp.asarray(_interpolation_matrix(h, out_h))
        cols = jnp.asarray(_interpolation_matrix(w, out_w))
        images = jnp.einsum("oh,nhwc->nowc", rows, images, precision=highest)
        images = jnp.einsum("pw,nowc->nopc", cols, images, precision=highest)
    return images


def to_uint8(images: Float[ArrayLike, " *shape"]) -> UInt8[Array, " *shape"]:
    r"""Images in ``[-1, 1]`` to uint8 by :math:`\mathrm{round}((x + 1) \cdot 127.5)`, clipped.

    The exact inverse of :class:`fmjax.data.TfdsSource`'s scaling ``u / 127.5 - 1``, and the
    quantisation a sample goes through when it is saved as a PNG for pytorch-fid. Jittable;
    keeps the sharding of its input.

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.fid import to_uint8
        >>> to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])).tolist()
        [0, 128, 255, 255]
    """
    x = (jnp.asarray(images, jnp.float32) + 1.0) * 127.5
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


# --- the network ------------------------------------------------------------------------------


class _ConvBN(nn.Module):
    """Convolution without bias, batch norm with stored statistics, ReLU (``BasicConv2d``)."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BATCH_NORM_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TF's AVG pooling divides by the number of real (unpadded) inputs in each window.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _InceptionA(nn.Module):
    pool_features: int
    precision: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_ConvBN, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
    precision: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_ConvBN, precision=self.precision)
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class _InceptionC(nn.Module):
    channels_7x7: int
    precision: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_ConvBN, precision=self.precision)
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorised 7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
        b7 = conv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, col[0], padding=col[1], name="branch7x7dbl_2")(bd)
        bd = conv(c7, row[0], padding=row[1], name="branch7x7dbl_3")(bd)
        bd = conv(c7, col[0], padding=col[1], name="branch7x7dbl_4")(bd)
        bd = conv(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
    precision: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_ConvBN, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class _InceptionE(nn.Module):
    max_pool: bool
    precision: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_ConvBN, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        # The 2015 graph's last block max-pools here (likely a slip in that graph, but it is
        # the network every FID was computed with); padding is -inf, as in TF and PyTorch.
        pooled = (
            nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
            if self.max_pool
            else _avg_pool_same(x)
        )
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to ``pool3``: ``[n, h, w, 3]`` in ``[-1, 1]`` to ``[n, 2048]``.

    Layer names are those of pytorch-fid's ``fid_inception_v3`` (``Conv2d_1a_3x3``,
    ``Mixed_5b/branch1x1``...), each ``BasicConv2d`` being ``conv`` + ``bn``: parameters
    ``conv/kernel`` (HWIO), ``bn/scale``, ``bn/bias`` and batch statistics ``bn/mean``,
    ``bn/var`` (batch norm epsilon 1e-3). The network is fully convolutional; FID feeds it
    299 x 299 images (spatial sizes 149, 147, 73, 71, 35, 17, 8 on the way, then the mean over
    the final 8 x 8). Inputs smaller than 75 x 75 leave no pixel for the last blocks.

    Attributes:
        precision: of the convolutions; full float32 by default, since accelerators otherwise
            use reduced-precision products (TF32, bf16) that move features by ~1e-3.
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Float[Array, " n h w 3"]) -> Float[Array, " n 2048"]:
        p = self.precision
        conv = functools.partial(_ConvBN, precision=p)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        x = _InceptionA(32, p, name="Mixed_5b")(x)
        x = _InceptionA(64, p, name="Mixed_5c")(x)
        x = _InceptionA(64, p, name="Mixed_5d")(x)
        x = _InceptionB(p, name="Mixed_6a")(x)
        for name, channels in [("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)]:
            x = _InceptionC(channels, p, name=f"Mixed_{name}")(x)
        x = _InceptionD(p, name="Mixed_7a")(x)
        x = _InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@functools.cache
def _abstract_variables() -> dict[str, Any]:
    shape = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), shape)


def _flat_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(_abstract_variables())[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def inception_variables(seed: int = 0) -> PyTree:
    """Random variables of :class:`FIDInceptionV3` (from NumPy, nothing compiled), for tests.

    Kernels are He-scaled and batch-norm statistics near the identity, so activations keep
    their scale through the 94 layers and features are neither zero nor huge.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for path, shape in _flat_shapes().items():
        kind = path[-1]
        if kind == "kernel":
            value = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[:-1]))
        elif kind in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(shape)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[kind] = value.astype(np.float32)
    return out


# --- weights ----------------------------------------------------------------------------------

_TORCH_TO_FLAX = {
    ("conv", "weight"): ("params", "conv", "kernel"),
    ("bn", "weight"): ("params", "bn", "scale"),
    ("bn", "bias"): ("params", "bn", "bias"),
    ("bn", "running_mean"): ("batch_stats", "bn", "mean"),
    ("bn", "running_var"): ("batch_stats", "bn", "var"),
}


def convert_state_dict(state_dict: Mapping[str, ArrayLike]) -> PyTree:
    """pytorch-fid's Inception state dict (names to arrays) as :class:`FIDInceptionV3` variables.

    ``Mixed_5b.branch1x1.conv.weight`` (OIHW) becomes ``params/Mixed_5b/branch1x1/conv/kernel``
    (HWIO); ``bn.weight``/``bn.bias`` the batch norm's ``scale``/``bias``; ``bn.running_mean``/
    ``bn.running_var`` its ``batch_stats`` ``mean``/``var``. The unused 1008-class head
    (``fc.*``) and ``num_batches_tracked`` counters are dropped.

    Raises:
        ValueError: naming the missing, unexpected or misshapen entries.
    """
    expected = _flat_shapes()
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for name, value in state_dict.items():
        parts = tuple(name.split("."))
        if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
            continue
        role = _TORCH_TO_FLAX.get(parts[-2:])
        if role is None:
            unexpected.append(name)
            continue
        path = (role[0], *parts[:-2], *role[1:])
        if path not in expected:
            unexpected.append(name)
            continue
        value = np.asarray(value, np.float32)
        if role[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != expected[path]:
            raise ValueError(
                f"{name} has shape {value.shape} after conversion; the FID Inception expects "
                f"{expected[path]}. Is this pytorch-fid's pt_inception-2015-12-05 state dict?"
            )
        out[path] = value
    missing = sorted("/".join(p) for p in set(expected) - set(out))
    if unexpected or missing:
        raise ValueError(
            "The state dict is not pytorch-fid's FID Inception: "
            f"unexpected entries {sorted(unexpected)[:10]}, missing {missing[:10]} "
            f"({len(unexpected)} unexpected, {len(missing)} missing in all)."
        )
    return _unflatten(out)


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> PyTree:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def save_variables(path: str | os.PathLike, variables: PyTree) -> None:
    """Writes Inception variables to an ``.npz`` (keys like ``params/Mixed_5b/.../kernel``)."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    arrays = {"/".join(k.key for k in p): np.asarray(v, np.float32) for p, v in flat}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target then renamed, so a crash never leaves a truncated file.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path)


@contextlib.contextmanager
def _plain_arrays(path: str | os.PathLike):
    """Names the file when NumPy refuses a member that only unpickling could read."""
    try:
        yield
    except ValueError as error:
        raise ValueError(
            f"{path} cannot be read as plain arrays ({error}); fmjax never unpickles a file."
        ) from None


def load_variables(path: str | os.PathLike) -> PyTree:
    """Reads variables written by :func:`save_variables` (no pickle), checking names and shapes.

    Raises:
        ValueError: for a missing file (saying how to make one) or a file of other variables.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(
            f"No Inception weights at {path}. Convert pytorch-fid's weights once: download "
            f"{WEIGHTS_URL} and run `python -m fmjax.metrics.fid convert "
            f"--in=pt_inception-2015-12-05-6726825d.pth --out={path}` (needs PyTorch), or run "
            "`python -m fmjax.metrics.fid download` on a machine with network access to fill "
            f"the cache ({default_weights_path()})."
        )
    with np.load(path, allow_pickle=False) as npz, _plain_arrays(path):
        flat = {tuple(k.split("/")): npz[k] for k in npz.files}
    expected = _flat_shapes()
    wrong = sorted(
        "/".join(k)
        for k in set(expected) | set(flat)
        if flat.get(k, np.empty(0)).shape != expected.get(k)
    )
    if wrong:
        raise ValueError(
            f"{path} does not hold FID Inception variables; wrong or missing: {wrong[:10]}."
        )
    return _unflatten(flat)


def default_weights_path() -> pathlib.Path:
    """``$FMJAX_CACHE`` (default ``~/.cache/fmjax``) ``/pt_inception-2015-12-05-6726825d.npz``."""
    cache = os.environ.get("FMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fmjax"))
    return pathlib.Path(cache) / _WEIGHTS_FILE


def _convert_file(pth: str | os.PathLike, out: str | os.PathLike) -> None:
    try:
        import torch
    except ImportError:
        raise ValueError(
            "Converting the .pth weights needs PyTorch (`pip install torch`, the CPU build is "
            "enough); nothing else in fmjax does."
        ) from None
    # weights_only=True: the restricted unpickler, which loads tensors and refuses code.
    state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    save_variables(out, convert_state_dict({k: v.numpy() for k, v in state_dict.items()}))


def download_weights(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Downloads pytorch-fid's weights, checks their sha256 prefix and converts them (needs
    network access and PyTorch). Returns the ``.npz`` path; a present file is reused."""
    import urllib.request

    out = default_weights_path() if cache_dir is None else pathlib.Path(cache_dir) / _WEIGHTS_FILE
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pth = pathlib.Path(tmp) / "weights.pth"
        urllib.request.urlretrieve(WEIGHTS_URL, pth)
        digest = hashlib.sha256(pth.read_bytes()).hexdigest()
        if not digest.startswith(_WEIGHTS_SHA256_PREFIX):
            raise ValueError(
                f"{WEIGHTS_URL} downloaded with sha256 {digest}, expected a digest starting "
                f"with {_WEIGHTS_SHA256_PREFIX}; the file is corrupt or not the FID weights."
            )
        _convert_file(pth, out)
    return out


# --- features over a mesh ---------------------------------------------------------------------


def _features(variables: PyTree, images: jax.Array, precision: Any) -> jax.Array:
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    x = resize_bilinear(images.astype(jnp.float32) / 255.0, INCEPTION_SIZE)
    return FIDInceptionV3(precision=precision).apply(variables, 2.0 * x - 1.0)


@functools.cache
def _sharded_features(mesh: Mesh, precision: Any) -> Callable:
    """``(variables, uint8 [b, h, w, c]) -> [b, 2048]``, each device on its slice of the batch;
    one compiled program per mesh, shared by every set of weights."""
    per_device = jax.shard_map(
        functools.partial(_features, precision=precision),
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
    hosts, that is the only way to pass an array that no single host holds whole. Every process of a multi-host run passes
    the same images and gets all features. Build it with :func:`load_inception` or
    :func:`make_inception`.

    Attributes:
        variables: the :class:`FIDInceptionV3` variables, replicated over ``mesh``.
        mesh: a 1-D ``("data",)`` mesh.
        batch_size: images per chunk, a multiple of the device count.
        fingerprint: identifies the weights (sha256 prefix of the weights file; None for
            weights not read from a file), stored with reference statistics.
        precision: of the convolutions and the resize.
    """

    variables: PyTree
    mesh: Mesh
    batch_size: int
    fingerprint: str | None = None
    precision: Any = jax.lax.Precision.HIGHEST

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
        return _sharded_features(self.mesh, self.precision)(self.variables, images)

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
    batch_size: int = _DEFAULT_BATCH_SIZE,
    fingerprint: str | None = None,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> InceptionFeatures:
    """:class:`InceptionFeatures` for given variables (e.g. :func:`inception_variables` in tests).

    Args:
        variables: :class:`FIDInceptionV3` variables (``params`` and ``batch_stats``).
        mesh: a ``("data",)`` mesh; default :func:`fmjax.train.make_mesh` (every device).
        batch_size: images per chunk, rounded up to a multiple of the device count.
        fingerprint: see :class:`InceptionFeatures`.
        precision: of the convolutions and the resize.
    """
    if mesh is None:
        from fmjax.train import make_mesh

        mesh = make_mesh()
    if mesh.axis_names != ("data",):
        raise ValueError(f"FID runs on a 1-D ('data',) mesh; got axes {mesh.axis_names}.")
    num_devices = mesh.devices.size
    batch_size = -(-max(batch_size, 1) // num_devices) * num_devices
    replicated = NamedSharding(mesh, P())
    variables = jax.tree.map(
        lambda v: _global_array(np.asarray(v, np.float32), replicated), variables
    )
    return InceptionFeatures(variables, mesh, batch_size, fingerprint, precision)


def load_inception(
    path: str | os.PathLike | None = None,
    *,
    mesh: Mesh | None = None,
    batch_size: int = _DEFAULT_BATCH_SIZE,
) -> InceptionFeatures:
    """The FID feature function of converted weights (default :func:`default_weights_path`).

    Example::

        inception = load_inception("inception.npz")
        features = inception(images)  # uint8 [n, h, w, 3] -> float32 [n, 2048]

    Raises:
        ValueError: when the file is missing (the message says how to make it) or holds
            something else.
    """
    path = default_weights_path() if path is None else pathlib.Path(path)
    variables = load_variables(path)
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return make_inception(variables, mesh=mesh, batch_size=batch_size, fingerprint=fingerprint)


# --- statistics and FID -----------------------------------------------------------------------


class GaussianStats(NamedTuple):
    """A Gaussian fit of features: what FID compares.

    Attributes:
        mu: the mean, ``[d]`` float64.
        sigma: the unbiased covariance, ``[d, d]`` float64.
        num_examples: how many feature vectors were fitted (0 when unknown).
        weights: the :attr:`InceptionFeatures.fingerprint` of the network ("" when unknown).
    """

    mu: Float[np.ndarray, " d"]
    sigma: Float[np.ndarray, " d d"]
    num_examples: int = 0
    weights: str = ""

    @classmethod
    def of(cls, features: Float[np.ndarray, " n d"], weights: str | None = None) -> "GaussianStats":
        mu, sigma = gaussian_statistics(features)
        return cls(mu, sigma, len(features), weights or "")


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
            **{k: np.str_(v) for k, v in metadata.items()},
        )
    os.replace(f.name, path)


def load_statistics(path: str | os.PathLike) -> GaussianStats:
    """Reads statistics written by :func:`save_statistics` or pytorch-fid (no pickle).

    Raises:
        ValueError: for a file without ``mu`` and ``sigma``, with an object array (which would
            need pickle), or whose ``mu`` is not ``[d]`` and ``sigma`` not a finite ``[d, d]``.
    """
    with np.load(path, allow_pickle=False) as npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {npz.files}).")
        with _plain_arrays(path):
            stats = GaussianStats(
                np.asarray(npz["mu"], np.float64),
                np.asarray(npz["sigma"], np.float64),
                int(npz["num_examples"]) if "num_examples" in npz.files else 0,
                str(npz["weights"]) if "weights" in npz.files else "",
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
) -> GaussianStats:
    """Inception statistics of every image of a tfds split, read by :class:`fmjax.data.TfdsSource`
    at their stored size and mapped back to the stored uint8 exactly (:func:`to_uint8`)."""
    from fmjax.data import TfdsSource

    source = TfdsSource(name, split, data_dir=data_dir)
    n, step = source.num_examples, inception.batch_size
    starts = range(0, n, step)
    features = []
    for start in _progress(starts, len(starts), f"{name}/{split}") if progress else starts:
        images, _ = source.read(np.arange(start, min(start + step, n)))
        features.append(inception(np.asarray(to_uint8(images))))
    return GaussianStats.of(np.concatenate(features), inception.fingerprint)


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
) -> FIDResult:
    """FID of ``num_samples`` generated images against reference statistics.

    ``sample_fn(index, batch_size)`` returns batch number ``index`` of images in ``[-1, 1]``
    (a global array, ideally sharded over the devices; deriving its noise from
    ``fold_in(key, index)`` makes the result independent of the device count). Batches are
    quantised to uint8 on the devices (:func:`to_uint8`, as saving PNGs would) and fed to
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

    Raises:
        ValueError: for ``num_samples < 2``, or statistics computed with other Inception
            weights than ``inception``'s.
    """
    if num_samples < 2:
        raise ValueError(f"FID needs at least 2 samples; got num_samples={num_samples}.")
    fingerprint = getattr(inception, "fingerprint", None)
    if reference.weights and fingerprint and reference.weights != fingerprint:
        raise ValueError(
            f"The reference statistics were computed with Inception weights {reference.weights}, "
            f"but the feature function uses {fingerprint}; recompute them with these weights."
        )
    start_time = time.perf_counter()
    num_batches = -(-num_samples // batch_size)
    indices = range(num_batches)
    features = []
    for index in _progress(indices, num_batches, "FID samples") if progress else indices:
        images = sample_fn(index, batch_size)
        if images.shape[0] != batch_size:
            raise ValueError(f"sample_fn({index}, {batch_size}) returned {images.shape[0]} images.")
        features.append(np.asarray(inception(_to_uint8_jit(images))))
    stats = GaussianStats.of(np.concatenate(features)[:num_samples], fingerprint)
    fid = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
    return FIDResult(fid, stats, time.perf_counter() - start_time)


_to_uint8_jit = jax.jit(to_uint8)


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fmjax.metrics.fid convert|download|stats ...``; ``--help`` for the flags.

    Bad input (a ``ValueError`` or ``OSError``) exits with status 2 and ``error: <message>``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fmjax.metrics.fid", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="pytorch-fid .pth weights to a pickle-free .npz")
    convert.add_argument(
        "--in", dest="pth", required=True, help="pt_inception-2015-12-05-6726825d.pth"
    )
    convert.add_argument("--out", required=True, help="the .npz to write")
    download = commands.add_parser("download", help="download and convert into the cache")
    download.add_argument(
        "--cache_dir", default=None, help=f"default: {default_weights_path().parent}"
    )
    stats = commands.add_parser("stats", help="reference statistics of a tfds split")
    stats.add_argument("--dataset", required=True, help="a tfds name, e.g. cifar10")
    stats.add_argument("--split", default="train")
    stats.add_argument("--data_dir", default=None, help="tfds data directory")
    stats.add_argument("--weights", default=None, help="converted .npz (default: the cache)")
    stats.add_argument("--out", required=True, help="the .npz statistics to write")
    stats.add_argument("--batch_size", type=int, default=_DEFAULT_BATCH_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        _run_command(args)
    except (ValueError, OSError) as error:
        # Bad input (a missing or wrong file, a bad name): its message, not a traceback.
        parser.exit(2, f"error: {error}\n")


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "convert":
        _convert_file(args.pth, args.out)
        log.info("wrote %s", args.out)
    elif args.command == "download":
        log.info("weights at %s", download_weights(args.cache_dir))
    else:
        inception = load_inception(args.weights, batch_size=args.batch_size)
        result = dataset_statistics(args.dataset, args.split, inception, data_dir=args.data_dir)
        if jax.process_index() == 0:
            save_statistics(args.out, result, dataset=args.dataset, split=args.split)
        log.info("wrote %s (%d images)", args.out, result.num_examples)


if __name__ == "__main__":
    main(sys.argv[1:])
