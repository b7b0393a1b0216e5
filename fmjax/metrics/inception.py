r"""The FID Inception-v3 in Flax and its pickle-free weights: conversion, checks, the cache.

FID's features are the 2048-d ``pool3`` activations of the Inception-v3 graph that TensorFlow
published as ``inception-2015-12-05`` (the network of the original FID code, so of every
published CIFAR-10 number). :class:`FIDInceptionV3` is that graph as pytorch-fid ports it, which
differs from torchvision's Inception-v3 in three places: the average pools of the mixed blocks
ignore padding (``count_include_pad=False``, as TF's ``AVG`` pooling does), the pool branch of
the last block takes a *max* pool, and the weights are TF's (its 1008-class head is unused).
:mod:`fmjax.metrics.fid` preprocesses images, runs the network over a mesh and computes FID.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is converted once
(:func:`convert_file`; PyTorch is needed for that step only, and reads the file with the
restricted ``weights_only=True`` loader) into an ``.npz`` that :func:`load_variables` reads
back with ``allow_pickle=False``, checking every name and shape. :func:`download_weights`
fetches the file, checks it against the sha256 prefix in its name and converts it into the
cache (:func:`default_weights_path`). From a checkout, ``python -m experiments.fid convert``
and ``python -m experiments.fid download`` run these two steps.
"""

import contextlib
import functools
import hashlib
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jaxtyping import Array, ArrayLike, Float, PyTree

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SIZE",
    "WEIGHTS_URL",
    "FIDInceptionV3",
    "convert_file",
    "convert_state_dict",
    "default_weights_path",
    "download_weights",
    "inception_variables",
    "load_variables",
    "plain_arrays",
    "save_variables",
]

FEATURE_DIM = 2048
"""The width of the ``pool3`` features."""
INCEPTION_SIZE = 299
"""The image side FID feeds the network."""
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
"""pytorch-fid's release of the TF weights."""
# The file name carries the first hex digits of the file's sha256 (torch.hub's convention).
_WEIGHTS_SHA256_PREFIX = "6726825d"
_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.npz"
_BATCH_NORM_EPSILON = 1e-3  # TF's Inception-v3 value, kept by the port

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
    return traverse_util.unflatten_dict(out)


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
def plain_arrays(path: str | os.PathLike):
    """Turns NumPy's refusal to read a member of ``path`` that only unpickling could read
    into a ``ValueError`` that names the file; wrap the reads of ``np.load(path,
    allow_pickle=False)`` in it."""
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
            f"{WEIGHTS_URL} and run `python -m experiments.fid convert "
            f"--in=pt_inception-2015-12-05-6726825d.pth --out={path}` (needs PyTorch), or run "
            "`python -m experiments.fid download` on a machine with network access to fill "
            f"the cache ({default_weights_path()})."
        )
    with np.load(path, allow_pickle=False) as npz, plain_arrays(path):
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
    return traverse_util.unflatten_dict(flat)


def default_weights_path() -> pathlib.Path:
    """``$FMJAX_CACHE`` (default ``~/.cache/fmjax``) ``/pt_inception-2015-12-05-6726825d.npz``."""
    cache = os.environ.get("FMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fmjax"))
    return pathlib.Path(cache) / _WEIGHTS_FILE


def convert_file(pth: str | os.PathLike, out: str | os.PathLike) -> None:
    """Converts pytorch-fid's ``.pth`` weights at ``pth`` into the ``.npz`` ``out`` (needs
    PyTorch, whose restricted ``weights_only=True`` loader reads the file).

    Raises:
        ValueError: without PyTorch, or for a state dict that is not the FID Inception's.
    """
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
        convert_file(pth, out)
    return out
