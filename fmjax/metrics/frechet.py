r"""The Fréchet distance between two Gaussians, in float64 on the host.

.. math::

    d^2 = \lVert \mu_1 - \mu_2 \rVert^2
        + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big)

The trace of the square root is computed as
:math:`\operatorname{tr} (\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2})^{1/2}
= \sum_k \sqrt{\lambda_k}`, the eigenvalues of a symmetric PSD matrix, by two symmetric
eigendecompositions. :math:`\Sigma_1\Sigma_2` has the same eigenvalues, so this equals
pytorch-fid's ``trace(sqrtm(sigma1 @ sigma2))`` wherever that is defined (to ~1e-9 on full-rank
2048-d covariances), and stays exact and real for singular covariances (fewer samples than
features), where ``sqrtm`` needs pytorch-fid's ``1e-6`` diagonal offset. Symmetric
eigendecompositions are also much cheaper than the Schur decomposition behind ``sqrtm`` at
2048-d, which matters for an FID computed every few thousand training steps.
(figures: docs/benchmarks.md)
"""

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
) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Raises:
        ValueError: for shapes that do not match, or covariances that are not symmetric
            positive semi-definite (up to round-off).

    Example:
        >>> import numpy as np
        >>> from fmjax.metrics.frechet import frechet_distance
        >>> # Equal covariances: only the means differ.
        >>> round(frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)), 6)
        2.0
    """
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
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        _check_symmetric(sigma, name)
    eigenvalues, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(_clip_psd(eigenvalues, "sigma1"))) @ vectors.T
    # Symmetric PSD when sigma2 is, and its square root has the trace we need.
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = np.sum(np.sqrt(_clip_psd(eigenvalues, "sigma2 (seen through sigma1)")))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def _check_symmetric(sigma: np.ndarray, name: str) -> None:
    scale = max(float(np.abs(sigma).max()), 1e-300)
    asymmetry = float(np.abs(sigma - sigma.T).max()) / scale
    if not np.isfinite(sigma).all() or asymmetry > 1e-6:
        raise ValueError(
            f"frechet_distance: {name} must be a finite symmetric covariance; got relative "
            f"asymmetry {asymmetry:.3g}."
        )


def _clip_psd(eigenvalues: np.ndarray, name: str) -> np.ndarray:
    """Sets round-off negatives (ascending eigenvalues of a PSD matrix) to 0; raises on more."""
    if eigenvalues[0] < -1e-6 * len(eigenvalues) * max(float(np.abs(eigenvalues).max()), 1e-300):
        raise ValueError(
            f"frechet_distance: {name} must be positive semi-definite; it has the eigenvalue "
            f"{eigenvalues[0]:.3g}."
        )
    return np.clip(eigenvalues, 0.0, None)
