"""The offline quick start: scikit-learn's 8x8 digits on a laptop CPU.

Variants (``--config=experiments/configs/digits.py:VARIANT``):
- default: about 10–15 minutes on 2 idle CPU cores (see README.md); recognisable digits.
- ``quick``: a few steps of a tiny U-Net, to check that everything runs (CI).
- ``meanflow``: the same U-Net trained as a mean flow (``fmjax.meanflow``) for one- and
  few-step generation, with MeanFlow's ImageNet interval sampler and adaptive weight
  converted to fmjax's time direction (docs/one-step.md). ``meanflow,quick`` checks it runs.
- ``dit``: a diffusion transformer (``dit_digits``: 2x2 patches, 6 blocks of width 96)
  instead of the U-Net (docs/transformers.md); combines with the others (``dit,quick`` checks
  it runs, with ``dit_tiny``; ``dit,meanflow`` trains it as a mean flow).
- ``reflow`` and ``distill``: the U-Net trained on a run's stored ODE pairs
  (``--config.data.pairs_dir=DIR`` from ``python -m experiments.reflow pairs``; start from the
  teacher with ``--init_from=RUN``), at uniform times (reflow) or at ``t = 0`` only (one-step
  distillation), sampled and scored with one Euler step (docs/one-step.md).
"""

import ml_collections

from fmjax.configs import base_config


def get_config(variant: str | None = None):
    """The digits config; ``variant`` is None (default) or comma-separated modifiers of
    "quick", "meanflow", "dit", "reflow" and "distill" (e.g. "meanflow,quick" or
    "distill,quick")."""
    parts = set() if variant is None else set(variant.split(","))
    known = {"quick", "meanflow", "dit", "reflow", "distill"}
    if parts - known or len(parts & {"meanflow", "reflow", "distill"}) > 1:
        raise ValueError(
            f"Unknown digits config variant {variant!r}; expected comma-separated modifiers of "
            "'quick', 'dit' and at most one of 'meanflow', 'reflow', 'distill' (e.g. "
            "'meanflow,quick', 'dit,quick', 'distill,quick') or none."
        )
    c = base_config()
    c.model.name = "unet_digits"
    c.data.name = "digits"
    c.train.num_steps = 3000
    c.train.batch_size = 64
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.sample_every = 1000
    c.train.num_grid_samples = 100
    c.train.sample_solver = "heun"
    c.train.sample_steps = 25
    c.train.eval_every = 1000  # digits score (Fréchet distance to the test digits); best kept
    c.train.eval_samples = 500
    c.eval = ml_collections.ConfigDict()
    c.eval.bpd_examples = 300  # test digits for the final bits/dim (all of them)
    c.optim.optimizer = "adam"
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.final_lr_fraction = 0.05
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.999
    if "dit" in parts:
        c.model.name = "dit_digits"
        c.optim.learning_rate = 1e-3  # transformers want a gentler step than the U-Net's 2e-3
    if "meanflow" in parts:
        c.objective = "mean_flow"
        c.model.mean_flow = True  # the network's second time input (t_end)
        # MeanFlow's ImageNet interval sampler (in fmjax's direction): on the digits it scored
        # better than py-meanflow's CIFAR-10 one (docs/benchmarks.md, the mean-flow objective).
        c.meanflow.update(
            interval_sampler="logit_normal", logit_mean=0.4, logit_std=1.0,
            equal_fraction=0.75, adaptive_power=1.0, sample_steps=1,
        )  # fmt: skip
    if parts & {"reflow", "distill"}:
        c.data.name = "pairs"  # with --config.data.pairs_dir=DIR
        c.train.sample_solver = "euler"  # grids and scores: one Euler step
        c.train.sample_steps = 1
    if "distill" in parts:
        c.path.time_sampler = "constant"  # t = 0 only: v(x0, 0) regresses x1 - x0
        c.path.t_constant = 0.0
    if "quick" in parts:
        c.train.update(
            num_steps=6, log_every=2, checkpoint_every=3, sample_every=6,
            sample_steps=1 if parts & {"reflow", "distill"} else 2, eval_every=3, eval_samples=64,
        )  # fmt: skip
        c.train.num_grid_samples = 16
        c.optim.schedule = "constant"  # independent of num_steps: a longer rerun reuses the compile
        # Compiles in a fraction of the time.
        c.model.name = "dit_tiny" if "dit" in parts else "unet_tiny"
        c.eval.bpd_examples = 16
    return c
