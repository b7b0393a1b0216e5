"""The run configuration: every key the engine reads, its validation, and what it builds.

Experiment config files (``experiments/configs/*.py``) start from :func:`base_config` and
change what they need; every key can then be set from the command line, e.g.
``--config.train.num_steps=100``. Each key is documented where it is defined below;
:func:`validate` checks a config before anything is compiled, and :func:`build_model`,
:func:`build_path` and :func:`make_optimizer` turn its sections into objects. Every named
choice is looked up in one mapping, the same for checking and for building:
:data:`fmjax.paths.SCHEDULERS`, :data:`fmjax.couplings.COUPLINGS`,
:data:`fmjax.timesteps.TIME_SAMPLERS`, :data:`fmjax.sampling.SOLVERS`,
:data:`fmjax.models.PRESETS`, :data:`OPTIMIZERS` and :data:`LR_SCHEDULES`.
"""

import difflib
import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from fmjax import couplings, models, paths, timesteps
from fmjax.couplings import COUPLINGS, Coupling
from fmjax.meanflow import INTERVAL_ORDERS, INTERVAL_SAMPLERS, IntervalSampler, MeanFlowGuidance
from fmjax.paths import BRIDGE_NOISES, PREDICTIONS, SCHEDULERS
from fmjax.sampling import SOLVERS
from fmjax.timesteps import TIME_SAMPLERS, TimeSampler

__all__ = [
    "LR_SCHEDULES",
    "OBJECTIVES",
    "OPTIMIZERS",
    "RESUMABLE_KEYS",
    "base_config",
    "build_intervals",
    "build_model",
    "build_path",
    "check_known_keys",
    "closest_key",
    "flat_keys",
    "make_optimizer",
    "meanflow_guidance",
    "resume_differences",
    "validate",
    "validate_image_shape",
]


def _warmup(o: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))


OBJECTIVES = ("flow_matching", "mean_flow")
"""What a run trains: ``flow_matching`` (:func:`fmjax.loss.cfm_loss`, a velocity field) or
``mean_flow`` (:func:`fmjax.meanflow.meanflow_loss`, an average velocity over an interval)."""


LR_SCHEDULES: dict[str, Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = {
    "constant": lambda o, num_steps: optax.constant_schedule(o.learning_rate),
    "warmup_constant": lambda o, num_steps: optax.join_schedules(
        [_warmup(o), optax.constant_schedule(o.learning_rate)], [max(o.warmup_steps, 1)]
    ),
    "warmup_cosine": lambda o, num_steps: optax.warmup_cosine_decay_schedule(
        0.0,
        o.learning_rate,
        max(o.warmup_steps, 1),
        max(num_steps, o.warmup_steps + 1),
        o.learning_rate * o.final_lr_fraction,
    ),
}
"""The learning-rate schedules ``config.optim.schedule`` may name, name -> ``(optim_config,
num_steps) -> schedule``: ``constant``; ``warmup_constant`` (linear from 0 over
``warmup_steps``, then constant); ``warmup_cosine`` (the same warmup, then cosine decay to
``final_lr_fraction * learning_rate`` at ``num_steps``)."""

OPTIMIZERS: dict[
    str, Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]
] = {
    "adam": lambda o, lr: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
    "adamw": lambda o, lr: optax.adamw(
        lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay
    ),
}
"""The optimizers ``config.optim.optimizer`` may name, name -> ``(optim_config, schedule) ->
optax transformation``."""


def base_config() -> ml_collections.ConfigDict:
    """Every key the training engine reads, with its default.

    Example:
        >>> from fmjax.configs import base_config
        >>> config = base_config()
        >>> config.train.batch_size, config.path.scheduler
        (128, 'condot')
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # every random draw derives from (seed, step, global example index)

    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 1000  # optimizer updates
    t.batch_size = 128  # global batch per update; divisible by devices x accumulation_steps
    t.accumulation_steps = 1  # micro-batches per update (gradient accumulation)
    t.log_every = 50  # metrics.jsonl / TensorBoard / progress line
    t.checkpoint_every = 1000  # Orbax checkpoint (also saved at the end)
    t.keep_checkpoints = 3  # the last K are kept
    t.sample_every = 1000  # sample grid PNG from the EMA parameters; 0 turns it off
    t.num_grid_samples = 64
    t.sample_solver = "heun"  # for the grid; see fmjax.sampling.SOLVERS
    t.sample_steps = 50
    t.eval_every = 0  # the experiment's in-training score every N steps; 0 turns it off
    t.eval_samples = 500  # samples per in-training score

    c.model = m = ml_collections.ConfigDict()
    m.name = "unet_tiny"  # a preset of fmjax.models.PRESETS (a label when a model is passed in)
    m.num_classes = ml_collections.config_dict.placeholder(int)  # set for class conditioning
    m.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); params stay float32

    c.optim = o = ml_collections.ConfigDict()
    o.optimizer = "adamw"  # adam | adamw
    o.learning_rate = 1e-4
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0  # adamw only
    o.schedule = "constant"  # constant | warmup_constant | warmup_cosine
    o.warmup_steps = 0
    o.final_lr_fraction = 0.0  # warmup_cosine: the LR at the last step, as a fraction
    o.grad_clip = 0.0  # clip by global norm; 0 turns it off
    o.ema_decay = 0.9999
    o.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates

    c.data = d = ml_collections.ConfigDict()
    d.name = "digits"  # see fmjax.data.SOURCES, or "tfds:<tfds dataset name>"
    d.data_dir = ml_collections.config_dict.placeholder(str)  # tfds; None: TFDS_DATA_DIR or default
    d.image_size = ml_collections.config_dict.placeholder(
        int
    )  # crop + resize tfds images; None: as stored
    d.image_shape = ml_collections.config_dict.placeholder(tuple)  # filled in from the source
    d.random_flip = False  # random horizontal flip (keyed by seed, epoch, example)
    d.label_drop_prob = 0.0  # classifier-free guidance training: labels -> null label
    # name="pairs": the directory of (noise, sample) pairs that experiments.reflow wrote
    d.pairs_dir = ml_collections.config_dict.placeholder(str)
    # name="latents": the directory of VAE posteriors that experiments.imagenet --mode=encode wrote
    d.latents_dir = ml_collections.config_dict.placeholder(str)

    c.path = p = ml_collections.ConfigDict()
    p.scheduler = "condot"  # condot | cosine | linear_vp | vp | polynomial
    p.sigma_min = 0.0  # condot only (Lipman et al.)
    p.polynomial_n = 2.0  # polynomial only
    p.coupling = "independent"  # independent | exact_ot | sinkhorn_ot (per-device batch)
    p.sinkhorn_epsilon = 0.1
    p.bridge_noise = "none"  # none | constant (torchcfm's I-CFM) | brownian (SB-CFM)
    p.bridge_sigma = 0.1  # the bridge noise's sigma (SB-CFM: sinkhorn_epsilon = 2 sigma^2)
    p.time_sampler = "uniform"  # uniform | logit_normal | constant
    p.logit_mean = 0.0
    p.logit_std = 1.0
    p.t_min = 0.0
    p.t_constant = 0.0  # constant only: the one training time (0 with pairs: distillation)
    p.prediction = "velocity"  # velocity | target | epsilon
    p.loss_space = "prediction"  # prediction | velocity

    c.objective = "flow_matching"  # flow_matching (fmjax.loss) | mean_flow (fmjax.meanflow)
    c.meanflow = mf = ml_collections.ConfigDict()  # objective="mean_flow" only
    mf.interval_sampler = "logit_normal"  # logit_normal | uniform (fmjax.meanflow)
    mf.logit_mean = 0.4  # logit-normal times, in fmjax's direction (the papers' -0.4)
    mf.logit_std = 1.0
    mf.equal_fraction = 0.75  # pairs with t_end = t (the instantaneous velocity)
    # logit_normal only: t_end's own law (None: t's) and how the pair is ordered, "sort" or
    # "clip" (fmjax.meanflow.logit_normal_intervals; py-meanflow's v1 sampler: 4.0, 1.6, clip).
    mf.end_logit_mean = ml_collections.config_dict.placeholder(float)
    mf.end_logit_std = ml_collections.config_dict.placeholder(float)
    mf.order = "sort"
    mf.adaptive_power = 1.0  # p of the adaptive weight 1 / (|delta|^2 + c)^p; 0: plain MSE
    mf.adaptive_eps = 1e-3  # c
    mf.sample_steps = 1  # jumps of the sample grids and in-training scores
    # MeanFlow's training-time guidance (fmjax.meanflow.MeanFlowGuidance; class-conditional
    # models): omega = 1, kappa = 0 is none; its ImageNet recipe is omega = 1, kappa = 0.5.
    mf.guidance_omega = 1.0
    mf.guidance_kappa = 0.0
    mf.guidance_t_min = 0.0  # guidance applies for t in [t_min, t_max] (noise at t = 0)
    mf.guidance_t_max = 1.0
    return c


RESUMABLE_KEYS: tuple[str, ...] = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.num_grid_samples",
    "train.sample_solver",
    "train.sample_steps",
    "train.eval_every",
    "train.eval_samples",
    "eval",
    "fid",
    "data.data_dir",
    "model.attention",
    "model.group_norm",
)
"""The keys (or whole sections) that may differ when a run is resumed; every other key defines
the run, and a resume with another value is refused (:func:`resume_differences`).

They say how long to train and how often to log, checkpoint, sample and evaluate
(``train.num_steps``, the ``*_every`` intervals, ``keep_checkpoints``, the sample grid's
solver and size), how to evaluate (``train.eval_samples`` and the experiments' ``eval`` and
``fid`` sections), where the data is read from (``data.data_dir``, not what it is), and which
kernels compute the same network on another device (``model.attention``,
``model.group_norm``). The device count and placement are not config keys: a run resumes
on any mesh. Changing ``train.num_steps`` also stretches a ``warmup_cosine`` schedule."""


def flat_keys(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested config (a ``ConfigDict`` or a dict), by dotted key.

    Example:
        >>> from fmjax.configs import base_config, flat_keys
        >>> flat_keys(base_config())["train.batch_size"]
        128
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def resume_differences(
    saved: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The run-defining keys whose values differ between a run's saved config and a new one,
    dotted key -> ``(saved, new)``, in key order; the keys of :data:`RESUMABLE_KEYS` aside.

    Values are compared as JSON (a tuple equals the list ``config.json`` stores). A key that
    one side lacks counts as the default of :func:`base_config` there (a config saved before
    the key existed), or as missing if it has none.

    Example:
        >>> from fmjax.configs import base_config, resume_differences
        >>> saved, new = base_config(), base_config()
        >>> new.train.num_steps, new.seed = 5000, 1
        >>> resume_differences(saved, new)
        {'seed': (0, 1)}
    """
    saved_keys = flat_keys(json.loads(json.dumps(_to_dict(saved))))
    new_keys = flat_keys(json.loads(json.dumps(_to_dict(new))))
    defaults = flat_keys(json.loads(base_config().to_json()))
    missing = object()
    out = {}
    for key in sorted(set(saved_keys) | set(new_keys)):
        if _resumable(key):
            continue
        a = saved_keys.get(key, defaults.get(key, missing))
        b = new_keys.get(key, defaults.get(key, missing))
        if a != b:
            out[key] = (None if a is missing else a, None if b is missing else b)
    return out


def _to_dict(config: Mapping[str, Any]) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


_OPEN_SECTIONS = ("model",)  # a model's fields are its own (presets, modules passed in)


def closest_key(key: str, keys: Sequence[str]) -> str | None:
    """The key of ``keys`` closest in spelling to ``key`` (``difflib``), or None.

    Example:
        >>> from fmjax.configs import base_config, closest_key, flat_keys
        >>> closest_key("trian.num_step", list(flat_keys(base_config())))
        'train.num_steps'
    """
    found = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return found[0] if found else None


def check_known_keys(config: ml_collections.ConfigDict) -> None:
    """Refuses keys that :func:`base_config` does not define in its sections (``train``,
    ``optim``, ``data``, ``path``) or at the top level, naming the closest valid key.

    Sections that an experiment adds (``eval``, ``fid``) and the ``model`` section (the
    model's own fields) are open.

    Example:
        >>> from fmjax.configs import base_config, check_known_keys
        >>> config = base_config()
        >>> config.train.num_step = 5
        >>> check_known_keys(config)
        Traceback (most recent call last):
        ...
        ValueError: config.train.num_step is not a config key; did you mean config.train.num_steps?
    """
    base = base_config()
    known = list(flat_keys(base))
    for key in flat_keys(config):
        section = key.split(".")[0]
        if key in known or ("." in key and (section in _OPEN_SECTIONS or section not in base)):
            continue  # a known key, a model field, or a key of a section the experiment adds
        guess = closest_key(key, known)
        raise ValueError(
            f"config.{key} is not a config key"
            + (f"; did you mean config.{guess}?" if guess else "; see fmjax.configs.base_config.")
        )


def _check_bridge_noise(p: ml_collections.ConfigDict, objective: str) -> None:
    _choice("path.bridge_noise", p.bridge_noise, ("none", *BRIDGE_NOISES))
    if p.bridge_noise == "none":
        return
    if not (isinstance(p.bridge_sigma, int | float) and 0 < p.bridge_sigma < math.inf):
        raise ValueError(
            f"config.path.bridge_sigma={p.bridge_sigma!r} must be a positive finite number with "
            f"config.path.bridge_noise={p.bridge_noise!r}."
        )
    if p.prediction != "velocity" or objective != "flow_matching":
        raise ValueError(
            f"config.path.bridge_noise={p.bridge_noise!r} needs config.path.prediction='velocity' "
            f"and config.objective='flow_matching'; got {p.prediction!r} and {objective!r}."
        )


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"config.{name}={value!r} is not valid; expected one of {list(choices)}.")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        raise ValueError(
            f"config.{name}={value!r} is not valid; expected {'a non-negative' if allow_zero else 'a positive'} integer."
        )


def _stored_data(d: ml_collections.ConfigDict, name: str, made_by: str) -> bool:
    """Whether ``config.data`` reads data stored on disk as ``name`` (``pairs``, ``latents``),
    whose directory is ``config.data.{name}_dir``; that key is refused without the name and
    required with it (``made_by``: the command that writes such a directory)."""
    key = f"{name}_dir"
    directory = d.get(key)
    if d.name != name:
        if directory is not None:
            raise ValueError(
                f"config.data.{key}={directory!r} is read only with "
                f"config.data.name={name!r}; got config.data.name={d.name!r}."
            )
        return False
    if not directory:
        raise ValueError(
            f"config.data.name={name!r} needs config.data.{key}: the directory that "
            f"{made_by} wrote."
        )
    return True


def _check_pairs(config: ml_collections.ConfigDict) -> None:
    """Training on stored pairs (``data.name="pairs"``) is flow matching on given noise."""
    d, p = config.data, config.path
    if not _stored_data(d, "pairs", "`python -m experiments.reflow pairs --out=DIR`"):
        return
    fixed = {
        "objective": (config.objective, "flow_matching"),
        "path.coupling": (p.coupling, "independent"),
        "path.bridge_noise": (p.bridge_noise, "none"),
        "data.random_flip": (d.random_flip, False),
    }
    for key, (value, expected) in fixed.items():
        if value != expected:
            raise ValueError(
                f"config.{key}={value!r} is not valid with config.data.name='pairs': the "
                f"noise of each pair is given, so {key} must be {expected!r}."
            )


def _check_latents(d: ml_collections.ConfigDict) -> None:
    """Training on stored VAE posteriors (``data.name="latents"``): their flips are stored."""
    if not _stored_data(
        d, "latents", "`python -m experiments.imagenet --mode=encode --workdir=DIR`"
    ):
        return
    if d.random_flip:
        raise ValueError(
            "config.data.random_flip=True is not valid with config.data.name='latents': a "
            "latent cannot be flipped; encode with flips stored as entries instead."
        )


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks a config before anything is compiled; raises ``ValueError`` naming the key.

    Args:
        config: a config from :func:`base_config` (or an experiment file).
        num_devices: the number of devices the global batch is split over.
    """
    check_known_keys(config)
    t, o, p = config.train, config.optim, config.path
    for name in (
        "num_steps",
        "batch_size",
        "accumulation_steps",
        "keep_checkpoints",
        "sample_steps",
    ):
        _positive(f"train.{name}", t[name])
    for name in ("log_every", "checkpoint_every"):
        _positive(f"train.{name}", t[name])
    _positive("train.sample_every", t.sample_every, allow_zero=True)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.eval_samples", t.eval_samples)
    _positive("train.num_grid_samples", t.num_grid_samples)
    _choice("train.sample_solver", t.sample_solver, SOLVERS)
    per_update = num_devices * t.accumulation_steps
    if t.batch_size % per_update:
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must be divisible by devices x "
            f"accumulation_steps = {num_devices} x {t.accumulation_steps} = {per_update}."
        )
    if p.coupling != "independent" and t.batch_size // per_update < 2:
        raise ValueError(
            f"config.path.coupling={p.coupling!r} pairs within each per-device micro-batch, which "
            f"has {t.batch_size // per_update} example(s) here; it needs at least 2."
        )
    _choice("optim.optimizer", o.optimizer, OPTIMIZERS)
    _choice("optim.schedule", o.schedule, LR_SCHEDULES)
    _choice("path.scheduler", p.scheduler, SCHEDULERS)
    _choice("path.coupling", p.coupling, COUPLINGS)
    _choice("path.time_sampler", p.time_sampler, TIME_SAMPLERS)
    _choice("path.prediction", p.prediction, PREDICTIONS)
    _choice("path.loss_space", p.loss_space, ("prediction", "velocity"))
    _check_bridge_noise(p, config.objective)
    _choice("model.dtype", config.model.dtype, ("float32", "bfloat16", "float16"))
    # U-Net fields that the CIFAR-10 configs add (experiments/configs/cifar10.py).
    _choice(
        "model.group_norm",
        config.model.get("group_norm", "fmjax"),
        models.GROUP_NORM_IMPLEMENTATIONS,
    )
    attention = config.model.get("attention", "xla")
    _choice("model.attention", attention, models.ATTENTION_IMPLEMENTATIONS)
    # How the U-Net's biases and label embedding start ("torch": as the peers' networks do).
    _choice("model.init", config.model.get("init", "fmjax"), models.INITIALIZATIONS)
    if attention == "cudnn" and config.model.dtype == "float32":
        raise ValueError(
            "config.model.attention='cudnn' computes in bfloat16 or float16; set "
            "config.model.dtype to one of them, or config.model.attention='xla'."
        )
    _choice("objective", config.objective, OBJECTIVES)
    if config.objective == "mean_flow":
        mf = config.meanflow
        _choice("meanflow.interval_sampler", mf.interval_sampler, INTERVAL_SAMPLERS)
        _choice("meanflow.order", mf.order, INTERVAL_ORDERS)
        for name in ("logit_std", "end_logit_std"):
            if mf[name] is not None and not mf[name] > 0:
                raise ValueError(f"config.meanflow.{name}={mf[name]!r} must be > 0.")
        if p.prediction != "velocity":
            raise ValueError(
                f"config.path.prediction={p.prediction!r} is not valid with "
                "config.objective='mean_flow', whose network predicts an average velocity; "
                "expected 'velocity'."
            )
        if not 0.0 <= mf.equal_fraction <= 1.0:
            raise ValueError(
                f"config.meanflow.equal_fraction={mf.equal_fraction!r} must be in [0, 1]."
            )
        if not mf.adaptive_power >= 0:
            raise ValueError(
                f"config.meanflow.adaptive_power={mf.adaptive_power!r} must be a number >= 0."
            )
        if not mf.adaptive_eps > 0:
            raise ValueError(f"config.meanflow.adaptive_eps={mf.adaptive_eps!r} must be > 0.")
        _positive("meanflow.sample_steps", mf.sample_steps)
        if not mf.guidance_kappa >= 0:
            raise ValueError(
                f"config.meanflow.guidance_kappa={mf.guidance_kappa!r} must be a number >= 0."
            )
        if not 0.0 <= mf.guidance_t_min <= mf.guidance_t_max <= 1.0:
            raise ValueError(
                f"config.meanflow.guidance_t_min={mf.guidance_t_min!r} and guidance_t_max="
                f"{mf.guidance_t_max!r} must satisfy 0 <= t_min <= t_max <= 1."
            )
        if meanflow_guidance(config) is None and (
            mf.guidance_omega != 1.0 or mf.guidance_kappa != 0.0
        ):
            raise ValueError(
                "config.meanflow.guidance_omega/guidance_kappa guide towards labels, which needs "
                "a class-conditional model: set config.model.num_classes (and "
                "config.data.label_drop_prob > 0 to train the unconditional model too)."
            )
    if not (isinstance(o.learning_rate, int | float) and 0 < o.learning_rate < math.inf):
        raise ValueError(
            f"config.optim.learning_rate={o.learning_rate!r} is not valid; expected a positive "
            "finite number."
        )
    if not 0.0 <= o.ema_decay < 1.0:
        raise ValueError(f"config.optim.ema_decay={o.ema_decay!r} must be in [0, 1).")
    if o.schedule != "constant":
        _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0.0 <= config.data.label_drop_prob <= 1.0:
        raise ValueError(
            f"config.data.label_drop_prob={config.data.label_drop_prob!r} must be in [0, 1]."
        )
    if config.data.image_size is not None:
        _positive("data.image_size", config.data.image_size)
    if config.model.num_classes is not None:
        _positive("model.num_classes", config.model.num_classes)
    if p.time_sampler == "constant" and not 0.0 <= p.t_constant <= 1.0:
        raise ValueError(f"config.path.t_constant={p.t_constant!r} must be in [0, 1].")
    _check_pairs(config)
    _check_latents(config.data)
    if config.data.label_drop_prob > 0 and config.model.num_classes is None:
        raise ValueError(
            "config.data.label_drop_prob > 0 trains classifier-free guidance, which needs a "
            "class-conditional model: set config.model.num_classes."
        )


def validate_image_shape(model, image_shape: Sequence[int]) -> None:
    """Checks that ``model`` takes images of ``image_shape = (height, width, channels)``
    before anything is traced; raises ``ValueError`` naming the size and what is expected.

    A model that defines ``check_image_shape(image_shape)`` (every :class:`fmjax.models.UNet`:
    its levels halve the image, so the sides must divide by ``2 ** (levels - 1)``) is asked;
    any other model is checked only when it is first traced.

    Example:
        >>> from fmjax.configs import validate_image_shape
        >>> from fmjax.models import UNetTiny
        >>> validate_image_shape(UNetTiny(), (12, 12, 1))
        >>> validate_image_shape(UNetTiny(), (7, 7, 1))
        Traceback (most recent call last):
        ...
        ValueError: Image size 7x7 cannot be downsampled by channel_mult=(1, 2): ...
    """
    if len(image_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in image_shape):
        raise ValueError(
            f"image_shape={tuple(image_shape)!r} is not valid; expected (height, width, "
            "channels) of positive integers."
        )
    check = getattr(model, "check_image_shape", None)
    if check is not None:
        check(tuple(image_shape))


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The Flax module named by ``model_config.name`` (one of :data:`fmjax.models.PRESETS`).

    Every other key overrides a field of the preset; ``dtype`` is a name ("bfloat16"). A model
    that no preset names is passed to :func:`fmjax.train.train_and_evaluate` as an object.

    A key that the preset does not take is an error, not ignored: the U-Net's ``init``,
    ``group_norm`` or ``dropout`` set on a transformer preset (``sit_*``, ``dit_*``) would
    otherwise be silently dropped. Delete such keys when switching a config from a U-Net to a
    transformer, as the ``sit`` recipe of ``experiments/configs/cifar10.py`` does.

    Raises:
        ValueError: for an unknown preset, or a key that is not a field of the preset (naming
            the key, its value and the preset's fields).

    Example:
        >>> import ml_collections
        >>> from fmjax.configs import build_model
        >>> model = build_model(ml_collections.ConfigDict({"name": "unet_tiny", "dtype": "bfloat16"}))
        >>> model.model_channels, model.dtype
        (8, dtype(bfloat16))
        >>> build_model(ml_collections.ConfigDict({"name": "dit_tiny", "init": "torch"}))
        Traceback (most recent call last):
        ...
        ValueError: config.model.init='torch' is not a field of the preset 'dit_tiny' (DiT); ...
    """
    fields = dict(model_config)
    name = fields.pop("name")
    if name not in models.PRESETS:
        raise ValueError(
            f"config.model.name={name!r} is not a known model; expected one of "
            f"{sorted(models.PRESETS)}, or pass the model object to train_and_evaluate(model=...)."
        )
    constructor = models.PRESETS[name]
    accepted = _keyword_fields(constructor)
    unknown = sorted(set(fields) - accepted)
    if unknown:
        key, module = unknown[0], inspect.unwrap(constructor)
        module = getattr(module, "func", module).__name__
        raise ValueError(
            f"config.model.{key}={fields[key]!r} is not a field of the preset {name!r} "
            f"({module}); its fields are {sorted(accepted)}. Delete the key "
            f"(`del config.model[{key!r}]`), e.g. a U-Net's key when switching to a transformer."
        )
    fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
    return constructor(**fields)


def _keyword_fields(constructor: Callable[..., nn.Module]) -> set[str]:
    """The keywords a preset constructor takes: a ``functools.partial`` of a Flax module
    takes the module's fields; a wrapper with ``**fields`` (``functools.wraps``) its own
    keywords and those of what it wraps. Flax's ``parent`` and ``name`` are not fields."""
    parameters = inspect.signature(constructor, follow_wrapped=False).parameters.values()
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in parameters) and hasattr(constructor, "__wrapped__"):
        names |= _keyword_fields(constructor.__wrapped__)
    return names - {"parent", "name"}


def build_path(
    path_config: ml_collections.ConfigDict,
) -> tuple[paths.AffinePath, Coupling, TimeSampler]:
    """``(path, coupling, time_sampler)`` from the ``config.path`` section.

    Each is built by its mapping's constructor with the options the section holds for it
    (``sigma_min`` for ``condot``, ``polynomial_n`` for ``polynomial``, ``sinkhorn_epsilon``
    for ``sinkhorn_ot``, ``bridge_sigma`` for a ``bridge_noise`` other than ``"none"``,
    ``logit_mean``/``logit_std`` for ``logit_normal``, ``t_min`` for it and ``uniform``,
    ``t_constant`` for ``constant``;
    ``logit_normal`` keeps at least ``1e-4`` from the ends, where a float32 sigmoid rounds to 0
    or 1).
    """
    p = path_config
    scheduler_options = {
        "condot": {"sigma_min": p.sigma_min},
        "polynomial": {"n": p.polynomial_n},
    }
    coupling_options = {"sinkhorn_ot": {"epsilon": p.sinkhorn_epsilon}}
    sampler_options = {
        "uniform": {"t_min": p.t_min},
        "logit_normal": {"mean": p.logit_mean, "std": p.logit_std, "t_min": max(p.t_min, 1e-4)},
        "constant": {"value": p.t_constant},
    }
    scheduler = paths.SCHEDULERS[p.scheduler](**scheduler_options.get(p.scheduler, {}))
    coupling = couplings.COUPLINGS[p.coupling](**coupling_options.get(p.coupling, {}))
    time_sampler = timesteps.TIME_SAMPLERS[p.time_sampler](**sampler_options[p.time_sampler])
    bridge = None
    if p.bridge_noise != "none":
        bridge = paths.BRIDGE_NOISES[p.bridge_noise](sigma=p.bridge_sigma)
    return paths.AffinePath(scheduler, bridge=bridge), coupling, time_sampler


def meanflow_guidance(config: ml_collections.ConfigDict) -> MeanFlowGuidance | None:
    """The training-time guidance of a mean-flow run (``config.meanflow.guidance_*``), or
    ``None`` when it is off (``omega = 1, kappa = 0``) or the model has no classes. Its two
    evaluations run without dropout (``train=False``), as MeanFlow's do.

    Example:
        >>> from fmjax.configs import base_config, meanflow_guidance
        >>> c = base_config()
        >>> c.model.num_classes, c.meanflow.guidance_kappa = 10, 0.5
        >>> meanflow_guidance(c).kappa, meanflow_guidance(c).null_label
        (0.5, 10)
    """
    mf = config.meanflow
    if config.model.num_classes is None:
        return None
    if mf.guidance_omega == 1.0 and mf.guidance_kappa == 0.0:
        return None
    return MeanFlowGuidance(
        null_label=config.model.num_classes,
        omega=float(mf.guidance_omega),
        kappa=float(mf.guidance_kappa),
        interval=(float(mf.guidance_t_min), float(mf.guidance_t_max)),
        model_kwargs={"train": False},
    )


def build_intervals(meanflow_config: ml_collections.ConfigDict) -> IntervalSampler:
    """The interval sampler of a mean-flow run, from the ``config.meanflow`` section.

    Example:
        >>> import jax
        >>> from fmjax.configs import base_config, build_intervals
        >>> build_intervals(base_config().meanflow)(jax.random.key(0), (3,)).shape
        (3, 2)
    """
    mf = meanflow_config
    options = {
        "logit_normal": {
            "mean": mf.logit_mean,
            "std": mf.logit_std,
            "end_mean": mf.end_logit_mean,
            "end_std": mf.end_logit_std,
            "order": mf.order,
        },
    }.get(mf.interval_sampler, {})
    return INTERVAL_SAMPLERS[mf.interval_sampler](equal_fraction=mf.equal_fraction, **options)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The Optax optimizer and its learning-rate schedule from ``config.optim``.

    The schedule is ``LR_SCHEDULES[optim.schedule]``, the optimizer
    ``OPTIMIZERS[optim.optimizer]`` driven by it; gradient clipping by global norm comes
    first when ``grad_clip > 0``.

    Example:
        >>> from fmjax.configs import base_config, make_optimizer
        >>> tx, schedule = make_optimizer(base_config().optim, num_steps=100)
        >>> float(schedule(0))
        0.0001
    """
    o = optim_config
    schedule = LR_SCHEDULES[o.schedule](o, num_steps)
    opt = OPTIMIZERS[o.optimizer](o, schedule)
    if o.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt, schedule
