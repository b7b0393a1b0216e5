"""Sample-quality metrics, each a submodule imported on its own (as ``python -m`` runs them):

- ``fmjax.metrics.frechet``: the Fréchet distance between Gaussians (NumPy/SciPy, float64),
  re-exported here.
- ``fmjax.metrics.fid``: FID by the standard protocol (Flax Inception-v3, pickle-free weights,
  reference statistics, ``fid_of_samples``); needs the ``train`` extra, and PyTorch only to
  convert pytorch-fid's weights once.
- ``fmjax.metrics.digits``: the offline analogue of FID for the 8x8 digits.
"""

from fmjax.metrics.frechet import frechet_distance, gaussian_statistics

__all__ = ["frechet_distance", "gaussian_statistics"]
