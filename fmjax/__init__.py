"""fmjax: flow matching for image generation in JAX.

The core (paths, couplings, time samplers, the loss) needs only jax, optax, diffrax, numpy and
jaxtyping. Convention: noise x0 ~ N(0, I) at t = 0, data x1 at t = 1.
"""

from fmjax import couplings, loss, paths, timesteps
from fmjax.couplings import Coupled, exact_ot, independent, sinkhorn_ot
from fmjax.loss import LossAux, cfm_loss
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
from fmjax.timesteps import logit_normal, uniform

__version__ = "0.1.0"

__all__ = [
    "VP",
    "AffinePath",
    "CondOT",
    "Cosine",
    "Coupled",
    "FunctionScheduler",
    "LinearVP",
    "LossAux",
    "PathSample",
    "Polynomial",
    "Scheduler",
    "SchedulerOutput",
    "cfm_loss",
    "couplings",
    "exact_ot",
    "independent",
    "logit_normal",
    "loss",
    "paths",
    "sinkhorn_ot",
    "timesteps",
    "uniform",
]
