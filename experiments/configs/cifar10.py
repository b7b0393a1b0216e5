"""CIFAR-10 (32x32x3, 50,000 training images) with the peers' recipes.

Variants (``--config=experiments/configs/cifar10.py:VARIANT``); a variant is a recipe
(``meta``, the default, ``torchcfm``, ``meanflow`` or ``sit``) followed by modifiers, separated by commas, e.g.
``torchcfm,conditional`` or ``conditional,smoke``:

- default / ``meta``: Meta ``flow_matching``'s example (FID 2.07 in ``REFERENCES.md``):
  ``UNetCIFAR10Meta`` (55.7M parameters), CondOT path, velocity prediction, logit-normal
  times with ``logit(t) ~ N(1.2, 1.2)``, AdamW 1e-4 with betas (0.9, 0.95), constant LR, no
  clipping, EMA 0.999 with warmup, global batch 512, random flips, 175,000 updates.
- ``torchcfm``: torchcfm's I-CFM recipe (FID ~3.5): ``UNetCIFAR10TorchCFM`` (35.7M
  parameters), uniform times, Adam 2e-4 with a 5,000-step linear warmup, gradient clipping at
  1.0, EMA 0.9999 (no warmup), batch 128, 400,000 updates, random flips. Add
  ``--config.path.coupling=exact_ot`` for its OT-CFM.
- ``meanflow``: py-meanflow's one-step CIFAR-10 recipe (its ``cifar10_v1.sh``, FID ~2.9 in
  one step) on ``UNetCIFAR10Meta`` with ``mean_flow=True``: the mean-flow objective with
  its v1 interval sampler (``t`` logit-normal (0.6, 1.6), ``t_end`` (4.0, 1.6), clipped,
  25% of pairs with ``t_end = t``), adaptive weight power 0.75, Adam 6e-4 with betas (0.9,
  0.999) after a 9,600-step linear warmup, dropout 0.2, EMA 0.9999, batch 1,024, random
  flips, 768,000 updates (16,000 epochs of 48). Not reproduced: its network (EDM's DDPM++
  ``SongUNet``) and EDM's augmentation pipeline.
- ``sit``: a transformer, ``sit_s_2`` (SiT-S/2, 32.5M parameters here) on the 32x32 pixels
  (2x2 patches, 256 tokens) with SiT's recipe: CondOT path, velocity prediction, uniform
  times, AdamW 1e-4 without weight decay, constant LR, EMA 0.9999, global batch 256, random
  flips; 400,000 updates (SiT's schedule is ImageNet's; this length is untuned).
- ``conditional``: the recipe with 10 classes and 20% label dropout, so that sampling can
  use classifier-free guidance.
- ``smoke``: shrinks the recipe to a CPU check in seconds: ``UNetTiny`` (``dit_tiny`` for
  ``sit``) on 8x8 crops, batch 8, 4 updates, a checkpoint every 2, float32.

Every run needs CIFAR-10 prepared for tfds once (``tfds build cifar10
--file_format=array_record``; see README.md, "CIFAR-10").
"""

import ml_collections

from fmjax.configs import base_config

RECIPES = ("meta", "torchcfm", "meanflow", "sit")
MODIFIERS = ("conditional", "smoke")

# Meta's example reaches FID 2.07 after about 175k updates at batch 512 (REFERENCES.md), i.e.
# about 1,790 epochs of the 50,000 training images.
META_STEPS = 175_000


def _meta(c) -> None:
    c.model.name = "unet_cifar10_meta"
    c.train.num_steps = META_STEPS
    c.train.batch_size = 512
    c.path.time_sampler = "logit_normal"
    c.path.logit_mean = 1.2  # t = 1 / (1 + exp(s)), s ~ N(-1.2, 1.2): leans to the data end
    c.path.logit_std = 1.2
    # Meta's script builds torch.optim.AdamW(params, lr, betas) without weight_decay, so it
    # runs at PyTorch's default of 0.01 (decoupled, on every parameter, as optax.adamw does).
    c.optim.update(
        optimizer="adamw", learning_rate=1e-4, b1=0.9, b2=0.95, weight_decay=0.01,
        schedule="constant", grad_clip=0.0, ema_decay=0.999, ema_warmup=True,
    )  # fmt: skip


def _torchcfm(c) -> None:
    c.model.name = "unet_cifar10_torchcfm"
    c.train.num_steps = 400_000
    c.train.batch_size = 128
    c.path.time_sampler = "uniform"
    c.optim.update(
        optimizer="adam", learning_rate=2e-4, b1=0.9, b2=0.999, schedule="warmup_constant",
        warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999, ema_warmup=False,
    )  # fmt: skip


def _meanflow(c) -> None:
    c.model.name = "unet_cifar10_meta"
    c.model.mean_flow = True
    c.model.dropout = 0.2
    c.objective = "mean_flow"
    c.meanflow.update(
        interval_sampler="logit_normal", logit_mean=0.6, logit_std=1.6, end_logit_mean=4.0,
        end_logit_std=1.6, order="clip", equal_fraction=0.25, adaptive_power=0.75,
        # py-meanflow's eps 1e-3 weights the error summed over 32 * 32 * 3 dimensions; fmjax's
        # is the mean (fmjax.meanflow.meanflow_loss).
        adaptive_eps=1e-3 / (32 * 32 * 3), sample_steps=1,
    )  # fmt: skip
    c.train.update(num_steps=768_000, batch_size=1024, sample_steps=1)
    # Adam without weight decay, a linear warmup over 200 epochs of 48 updates, then constant;
    # no clipping; EMA 0.9999 (py-meanflow applies decay**16 every 16 updates).
    c.optim.update(
        optimizer="adam", learning_rate=6e-4, b1=0.9, b2=0.999, schedule="warmup_constant",
        warmup_steps=9600, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False,
    )  # fmt: skip


def _sit(c) -> None:
    c.model.name = "sit_s_2"
    # The U-Net's keys: a DiT has no GroupNorm and starts as SiT's networks do.
    del c.model["group_norm"]
    del c.model["init"]
    c.train.num_steps = 400_000
    c.train.batch_size = 256
    c.path.time_sampler = "uniform"
    c.optim.update(
        optimizer="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
        schedule="constant", grad_clip=0.0, ema_decay=0.9999, ema_warmup=False,
    )  # fmt: skip


def _conditional(c) -> None:
    c.model.num_classes = 10  # the null label of classifier-free guidance is 10
    c.data.label_drop_prob = 0.2


def _smoke(c) -> None:
    c.model.name = "dit_tiny" if c.model.name.startswith("sit_") else "unet_tiny"
    c.model.dtype = "float32"
    c.data.image_size = 8
    c.train.update(
        num_steps=4, batch_size=8, accumulation_steps=1, log_every=2, checkpoint_every=2,
        sample_every=4, num_grid_samples=16, sample_steps=2, eval_samples=16,
    )  # fmt: skip
    c.fid.batch_size = 8
    # A warmup far longer than the run would leave the LR near 0; the smoke run checks the
    # plumbing, not the schedule.
    c.optim.schedule = "constant"


def get_config(variant: str | None = None):
    """The CIFAR-10 config for ``variant``:
    ``"[meta|torchcfm|meanflow|sit][,conditional][,smoke]"``.

    Example:
        >>> from experiments.configs.cifar10 import get_config
        >>> c = get_config("conditional,smoke")
        >>> c.model.name, c.model.num_classes, c.data.image_size, c.train.batch_size
        ('unet_tiny', 10, 8, 8)
    """
    parts = [p.strip() for p in (variant or "").split(",") if p.strip()]
    recipe = parts.pop(0) if parts and parts[0] in RECIPES else "meta"
    unknown = [p for p in parts if p not in MODIFIERS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"Unknown CIFAR-10 config variant {variant!r}; expected an optional recipe of "
            f"{list(RECIPES)} followed by modifiers of {list(MODIFIERS)}, comma-separated, each "
            "at most once (e.g. 'torchcfm,conditional' or 'conditional,smoke')."
        )
    c = base_config()
    c.data.name = "cifar10"
    c.data.random_flip = True
    c.path.scheduler = "condot"
    c.path.prediction = "velocity"
    c.path.coupling = "independent"
    c.train.update(
        log_every=100, checkpoint_every=5000, keep_checkpoints=3, sample_every=5000,
        num_grid_samples=64, sample_solver="heun", sample_steps=50,
        eval_every=0, eval_samples=5000,
    )  # fmt: skip
    # In-training FID (fmjax.evaluate.fid_hook), on when train.eval_every > 0: e.g.
    # --config.train.eval_every=10000 --config.fid.stats=cifar10_train.npz
    c.fid = ml_collections.ConfigDict()
    c.fid.stats = ml_collections.config_dict.placeholder(str)  # `python -m experiments.fid stats`
    c.fid.inception = ml_collections.config_dict.placeholder(str)  # None: the cache
    # fmjax.metrics.fid.FID_PROTOCOLS; None: the one fid.stats records, else legacy-tensorflow.
    c.fid.protocol = ml_collections.config_dict.placeholder(str)
    c.fid.batch_size = 500  # samples per ODE solve; a multiple of the device count
    # How the U-Net computes attention: "xla" (every backend) or "cudnn" (cuDNN's fused
    # kernel; NVIDIA GPUs with --config.model.dtype=bfloat16; see fmjax.models.UNet).
    c.model.attention = "xla"
    # How the U-Net computes GroupNorm: "fmjax" (its own gradient, written for CPU) or "flax"
    # (nn.GroupNorm); the same parameters and function (see fmjax.models.UNet).
    c.model.group_norm = "fmjax"
    # How biases and the label embedding start: "torch", as the peers' PyTorch networks do, so a
    # run starts from the same distribution of networks as the peer's script ("fmjax": zero
    # biases, Flax's embedding). See fmjax.models.UNet.initialization.
    c.model.init = "torch"
    {"meta": _meta, "torchcfm": _torchcfm, "meanflow": _meanflow, "sit": _sit}[recipe](c)
    # Modifiers in a fixed order, so that "smoke,conditional" is "conditional,smoke".
    if "conditional" in parts:
        _conditional(c)
    if "smoke" in parts:
        _smoke(c)
    return c
