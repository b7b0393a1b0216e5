"""fmjax: flow matching for image generation in JAX.

The core re-exported here (paths, couplings, time samplers, the loss, sampling, the SDE
sampler, likelihoods, per-example keys, the device mesh; mean flows as ``fmjax.meanflow``)
needs only jax, optax, diffrax, numpy and jaxtyping. The layers above it are imported on their
own, as they need the ``train`` extra, each importing only from the layers below it: ``fmjax.models`` (Flax networks); ``fmjax.data``,
``fmjax.images``, ``fmjax.toy2d``; ``fmjax.latents``; ``fmjax.metrics``; ``fmjax.checkpoint``; and the engine:
``fmjax.configs``, ``fmjax.step``, ``fmjax.rundir``, ``fmjax.generate``, ``fmjax.reflow``,
``fmjax.train``, ``fmjax.evaluate``.

Convention: noise x0 ~ N(0, I) at t = 0, data x1 at t = 1.
"""

from fmjax import (
    couplings,
    keys,
    likelihood,
    loss,
    meanflow,
    mesh,
    paths,
    sampling,
    sde,
    timesteps,
)
from fmjax.couplings import COUPLINGS, Coupled, exact_ot, independent, sinkhorn_ot
from fmjax.keys import Stream, example_keys
from fmjax.likelihood import (
    BitsPerDim,
    LikelihoodResult,
    bits_per_dim,
    dequantize,
    dequantized_bits_per_dim,
    log_likelihood,
    standard_normal_log_prob,
)
from fmjax.loss import LossAux, Pairs, Source, cfm_loss, cfm_loss_on_pairs, draw_pairs
from fmjax.mesh import make_mesh
from fmjax.paths import (
    BRIDGE_NOISES,
    PREDICTIONS,
    SCHEDULERS,
    VP,
    AffinePath,
    BridgeNoise,
    BrownianBridge,
    CondOT,
    ConstantBridge,
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
from fmjax.sde import DIFFUSIONS, LAST_STEPS, SDE_SOLVERS, SDEResult, sample_sde
from fmjax.timesteps import TIME_SAMPLERS, logit_normal, uniform

__version__ = "0.1.0"

__all__ = [
    "BRIDGE_NOISES",
    "COUPLINGS",
    "DIFFUSIONS",
    "LAST_STEPS",
    "PREDICTIONS",
    "SCHEDULERS",
    "SDE_SOLVERS",
    "SOLVERS",
    "TIME_SAMPLERS",
    "VP",
    "AffinePath",
    "BitsPerDim",
    "BridgeNoise",
    "BrownianBridge",
    "CondOT",
    "ConstantBridge",
    "Cosine",
    "Coupled",
    "FunctionScheduler",
    "LikelihoodResult",
    "LinearVP",
    "LossAux",
    "Pairs",
    "PathSample",
    "Polynomial",
    "SDEResult",
    "SampleResult",
    "Scheduler",
    "SchedulerOutput",
    "Source",
    "Stream",
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
    "example_keys",
    "independent",
    "keys",
    "likelihood",
    "log_likelihood",
    "logit_normal",
    "loss",
    "make_mesh",
    "meanflow",
    "mesh",
    "paths",
    "sample",
    "sample_sde",
    "sampling",
    "sde",
    "sinkhorn_ot",
    "standard_normal_log_prob",
    "timesteps",
    "uniform",
    "uniform_time_grid",
]
