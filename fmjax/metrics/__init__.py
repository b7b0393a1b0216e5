"""Sample-quality metrics: FID by the standard protocol and the Fréchet distance beneath it.

``fmjax.metrics.fid`` needs the ``train`` extra (Flax, tensorflow-datasets for reference
statistics); PyTorch only to convert pytorch-fid's weights once. ``fmjax.metrics.digits`` is
the offline analogue for the 8x8 digits.
"""

from fmjax.metrics.fid import (
    FIDInceptionV3,
    FIDResult,
    GaussianStats,
    InceptionFeatures,
    dataset_statistics,
    fid_of_samples,
    load_inception,
    load_statistics,
    save_statistics,
    to_uint8,
)
from fmjax.metrics.frechet import frechet_distance, gaussian_statistics

__all__ = [
    "FIDInceptionV3",
    "FIDResult",
    "GaussianStats",
    "InceptionFeatures",
    "dataset_statistics",
    "fid_of_samples",
    "frechet_distance",
    "gaussian_statistics",
    "load_inception",
    "load_statistics",
    "save_statistics",
    "to_uint8",
]
