r"""The Fréchet distance between two Gaussians, in float64 on the host.

.. math::

    d^2 = \lVert \mu_1 - \mu_2 \rVert^2
        + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big)

The matrix square root is scipy's ``sqrtm``; when the product is singular (rank-deficient
covariances, e.g. fewer samples than features) its result can be inaccurate or not finite,
and then ``eps`` is added to both diagonals first, as pytorch-fid does. Imaginary parts left
by round-off are dropped when they are negligible, and raise otherwise.
"""

import warnings

import numpy as np
from jaxtyping import Float

__all__ = ["frechet_distance", "gaussian_statistics"]


def gaussian_statistics(
    features: Float[np.ndarray, " n d"],
) -> tuple[Float[np.ndarray, " d"], Float[np.ndarray, " d d"]]:
    """Mean and (unbiased) covariance of ``[n, d]`` features, in float64.

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.frechet import gaussian_statistics
        >>> mu, sigma = gaussian_statistics(np.array([[0.0, 1.0], [2.0, 3.0]]))
        >>> mu.tolist(), sigma.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [n >= 2, d]; got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, " d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, " d d"],
    eps: float = 1e-6,
) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.frechet import frechet_distance
        >>> # Equal covariances: only the means differ.
        >>> round(frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)), 6)
        2.0
    """
    from scipy import linalg

    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "frechet_distance needs means of shape [d] and covariances [d, d] for one d; got "
            f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}."
        )
    product = sigma1 @ sigma2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(product)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all() or _sqrtm_error(covmean, product) > 1e-3:
        offset = eps * np.eye(d)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: the matrix square root has a large imaginary part "
                f"({np.max(np.abs(covmean.imag)):.3g}); are the covariances symmetric PSD?"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm_error(root: np.ndarray, matrix: np.ndarray) -> float:
    scale = max(np.abs(matrix).max(), 1e-12)
    return float(np.abs(root @ root - matrix).max() / scale)
