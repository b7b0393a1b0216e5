r"""The digits score: an offline analogue of FID for the 8x8 digits, in a classifier's features.

The feature space is the 64 ReLU units of a one-hidden-layer classifier fitted (seeded,
deterministic) on the digits training split; it reaches 99% accuracy on the 300 test digits,
so its features see what makes a digit a digit. The score of a set of samples is

.. math::

    \mathrm{FD} = \lVert \mu_s - \mu_t \rVert^2
        + \operatorname{tr}\big(\Sigma_s + \Sigma_t - 2 (\Sigma_s \Sigma_t)^{1/2}\big)

between the Gaussian fits of the samples' features and the held-out test digits' features.
Two reference points make it readable: the *floor*, the score of the training digits
themselves (what a perfect model would get, up to the train/test difference), and a trivial
*noise* baseline (uniform noise in [-1, 1]). Scores are comparable only with the same
scikit-learn version (the classifier's fit may change between versions).
"""

import functools
from typing import NamedTuple

import numpy as np
from jaxtyping import Float

from fmjax import data
from fmjax.metrics.frechet import frechet_distance, gaussian_statistics

__all__ = ["DigitsScore", "digits_features", "digits_score", "histogram_bits_per_dim"]


@functools.lru_cache(maxsize=1)
def _classifier():
    from sklearn.neural_network import MLPClassifier

    train = data.digits("train")
    x = train.images.reshape(train.num_examples, -1).astype(np.float64)
    return MLPClassifier(hidden_layer_sizes=(64,), random_state=0, max_iter=1000).fit(
        x, train.labels
    )


def digits_features(images: Float[np.ndarray, " n 8 8 1"]) -> Float[np.ndarray, " n 64"]:
    """The classifier's hidden ReLU activations of images in [-1, 1] (float64)."""
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
        raise ValueError(f"digits images must have shape [n, 8, 8, 1]; got {images.shape}.")
    clf = _classifier()
    return np.maximum(images.reshape(len(images), -1) @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


@functools.lru_cache(maxsize=1)
def _test_statistics():
    return gaussian_statistics(digits_features(data.digits("test").images))


class DigitsScore(NamedTuple):
    """The score of a set of samples and its two reference points (lower is better).

    Attributes:
        fd: Fréchet distance of the samples to the test digits.
        floor: that of the 1,497 training digits (a perfect model's level).
        noise: that of 1,000 uniform-noise images (a model that learned nothing).
    """

    fd: float
    floor: float
    noise: float


def digits_score(samples: Float[np.ndarray, " n 8 8 1"]) -> DigitsScore:
    """Scores generated digits against the held-out test split (see the module doc).

    Example:
        >>> from fmjax import data
        >>> from fmjax.metrics.digits import digits_score
        >>> score = digits_score(data.digits("train").images[:500])
        >>> score.fd < score.noise / 10
        True
    """
    samples = np.asarray(samples)
    if len(samples) < 2:
        raise ValueError(f"digits_score needs at least 2 samples; got {len(samples)}.")
    test = _test_statistics()
    fd = frechet_distance(*gaussian_statistics(digits_features(samples)), *test)
    return DigitsScore(fd=fd, floor=_floor(), noise=_noise_baseline())


@functools.lru_cache(maxsize=1)
def _floor() -> float:
    return frechet_distance(
        *gaussian_statistics(digits_features(data.digits("train").images)), *_test_statistics()
    )


@functools.lru_cache(maxsize=1)
def _noise_baseline() -> float:
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, (1000, 8, 8, 1))
    return frechet_distance(*gaussian_statistics(digits_features(noise)), *_test_statistics())


def histogram_bits_per_dim() -> float:
    r"""Bits/dim on the test digits of a per-pixel histogram fitted on the training digits.

    Each of the 64 pixels gets its own categorical distribution over the 17 levels, the
    training counts plus one (Laplace smoothing); the result is the cross-entropy
    :math:`-\frac{1}{64 N} \sum_{n, d} \log_2 p_d(k_{n,d})` over the :math:`N` test digits.
    It ignores every dependence between pixels, so a model that learns the digits' shapes
    beats it; a uniform distribution over the levels scores :math:`\log_2 17 = 4.09`.
    These are discrete probabilities, directly comparable with the uniform-dequantisation
    bound of a continuous model (:func:`fmjax.likelihood.dequantized_bits_per_dim`), which
    bounds a discrete model's bits/dim from above.

    Example:
        >>> from fmjax.metrics.digits import histogram_bits_per_dim
        >>> round(histogram_bits_per_dim(), 3) < 4.087
        True
    """
    levels = data.DIGITS_LEVELS
    train = data.digits_levels(data.digits("train").images).reshape(-1, 64)
    test = data.digits_levels(data.digits("test").images).reshape(-1, 64)
    counts = np.stack([np.bincount(train[:, d], minlength=levels) for d in range(64)]) + 1.0
    log2_p = np.log2(counts / counts.sum(axis=1, keepdims=True))
    return float(-np.mean(log2_p[np.arange(64), test]))
