"""ImageNet 256 in the Stable Diffusion VAE's latent space (32x32x4) with SiT's recipe.

Variants (``--config=experiments/configs/imagenet.py:VARIANT``):

- default / ``sit_xl_2``: SiT-XL/2 (675M parameters) with SiT's recipe: 1,000 classes, 10%
  label dropout (classifier-free guidance), CondOT (linear) path, velocity prediction,
  uniform times, AdamW 1e-4 without weight decay, constant LR, no clipping, EMA 0.9999,
  global batch 256, bfloat16 compute, 7M updates (SiT's longest run; its table's FIDs at
  400k updates are without guidance).
- ``sit_b_2``: the same recipe on SiT-B/2 (130M parameters).
- ``smoke``: a CPU check in seconds: ``dit_tiny`` on the latents of a ``VAETiny`` (e.g. 8x8x4
  from 16x16 mock images), batch 8, 2 updates, float32.

Every variant trains on ``config.data.latents_dir``, a directory written by ``python -m
experiments.imagenet --mode=encode`` (docs/latents.md); pass it as
``--config.data.latents_dir=DIR/latents``. The stored latents are already multiplied by the
VAE's scaling factor (0.18215 for the SD VAE).
"""

import ml_collections

from fmjax.configs import base_config

VARIANTS = ("sit_xl_2", "sit_b_2", "smoke")
NUM_CLASSES = 1000


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The ImageNet latent config for ``variant``: ``"sit_xl_2"`` (default), ``"sit_b_2"`` or
    ``"smoke"``.

    Example:
        >>> from experiments.configs.imagenet import get_config
        >>> c = get_config("sit_b_2")
        >>> c.model.name, c.model.num_classes, c.data.name, c.train.batch_size
        ('sit_b_2', 1000, 'latents', 256)
    """
    name = (variant or "sit_xl_2").strip()
    if name not in VARIANTS:
        raise ValueError(
            f"Unknown ImageNet config variant {variant!r}; expected one of {list(VARIANTS)}."
        )
    c = base_config()
    c.model.name = "sit_b_2" if name == "sit_b_2" else "sit_xl_2"
    # Set explicitly: base_config's placeholder (None) would make the model unconditional.
    c.model.num_classes = NUM_CLASSES  # the null label of classifier-free guidance is 1000
    c.model.dtype = "bfloat16"
    c.data.name = "latents"
    c.data.label_drop_prob = 0.1
    c.data.random_flip = False  # flips are stored as separate entries by --mode=encode
    c.path.update(
        scheduler="condot", sigma_min=0.0, prediction="velocity", time_sampler="uniform",
        coupling="independent",
    )  # fmt: skip
    c.optim.update(
        optimizer="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
        schedule="constant", warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False,
    )  # fmt: skip
    c.train.update(
        num_steps=7_000_000, batch_size=256, log_every=100, checkpoint_every=10_000,
        keep_checkpoints=3, sample_every=10_000, num_grid_samples=32, sample_solver="heun",
        sample_steps=50,
    )  # fmt: skip
    # How experiments.imagenet decodes latents: samples per VAE call (in-training grids too).
    c.vae = ml_collections.ConfigDict()
    c.vae.path = ml_collections.config_dict.placeholder(str)  # SD VAE .safetensors; None: VAETiny
    c.vae.seed = 0  # the random VAETiny's seed (tests), as --mode=encode --seed
    if name == "smoke":
        c.model.name = "dit_tiny"
        c.model.num_classes = 10  # mock datasets' classes
        c.model.dtype = "float32"
        c.train.update(
            num_steps=2, batch_size=8, accumulation_steps=1, log_every=1, checkpoint_every=2,
            sample_every=2, num_grid_samples=4, sample_steps=2,
        )  # fmt: skip
    return c
