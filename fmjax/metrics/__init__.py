"""Sample-quality metrics, each a submodule imported on its own:

- ``fmjax.metrics.frechet``: the Fréchet distance between Gaussians (NumPy/SciPy, float64),
  re-exported here.
- ``fmjax.metrics.fid``: FID by the standard protocol (Inception features over a mesh,
  reference statistics, ``fid_of_samples``); needs the ``train`` extra.
- ``fmjax.metrics.inception``: the FID Inception-v3 network and its pickle-free weights
  (PyTorch only to convert pytorch-fid's weights once).
- ``fmjax.metrics.digits``: the offline analogue of FID for the 8x8 digits.
"""

from fmjax.metrics.frechet import frechet_distance, gaussian_statistics

__all__ = ["frechet_distance", "gaussian_statistics"]
