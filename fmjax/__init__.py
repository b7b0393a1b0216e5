"""fmjax: flow matching for image generation in JAX.

The core re-exported here (paths, couplings, time samplers, the loss, sampling, likelihoods)
needs only jax, optax, diffrax, numpy and jaxtyping. The layers above it are imported on their
own, as they need the ``train`` extra: ``fmjax.models`` (Flax U-Net), ``fmjax.data``,
``fmjax.train``, ``fmjax.checkpoint``, ``fmjax.images``, ``fmjax.configs``.

Convention: noise x0 ~ N(0, I) at t = 0, data x1 at t = 1.
"""

from fmjax import couplings, likelihood, loss, paths, sampling, timesteps
from fmjax.couplings import Coupled, exact_ot, independent, sinkhorn_ot
from fmjax.likelihood import (
    BitsPerDim,
    LikelihoodResult,
    bits_per_dim,
    dequantize,
    dequantized_bits_per_dim,
    log_likelihood,
)
from fmjax.loss import LossAux, Pairs, cfm_loss, cfm_loss_on_pairs, draw_pairs
from fmjax.paths import (
    VP,
    AffinePath,
    CondOT,
    Cosine,
    FunctionScheduler,
    LinearVP,
    PathSample,
    Polynomial,
    Scheduler,
    SchedulerOutput,
)
from fmjax.sampling import (
    SOLVERS,
    SampleResult,
    classifier_free_guidance,
    edm_time_grid,
    sample,
    uniform_time_grid,
)
from fmjax.timesteps import logit_normal, uniform

__version__ = "0.1.0"

__all__ = [
    "SOLVERS",
    "VP",
    "AffinePath",
    "BitsPerDim",
    "CondOT",
    "Cosine",
    "Coupled",
    "FunctionScheduler",
    "LikelihoodResult",
    "LinearVP",
    "LossAux",
    "Pairs",
    "PathSample",
    "Polynomial",
    "SampleResult",
    "Scheduler",
    "SchedulerOutput",
    "bits_per_dim",
    "cfm_loss",
    "cfm_loss_on_pairs",
    "classifier_free_guidance",
    "couplings",
    "dequantize",
    "dequantized_bits_per_dim",
    "draw_pairs",
    "edm_time_grid",
    "exact_ot",
    "independent",
    "likelihood",
    "log_likelihood",
    "logit_normal",
    "loss",
    "paths",
    "sample",
    "sampling",
    "sinkhorn_ot",
    "timesteps",
    "uniform",
    "uniform_time_grid",
]
