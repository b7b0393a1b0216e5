"""The configuration every experiment shares, as an ``ml_collections.ConfigDict``.

Experiment config files (``experiments/configs/*.py``) start from :func:`base_config` and
change what they need; every key can then be set from the command line, e.g.
``--config.train.num_steps=100``. Each key is documented where it is defined below, and
:func:`validate` checks a config before anything is compiled.
"""

import math
import os
import pathlib
import tempfile
from collections.abc import Sequence

import ml_collections

from fmjax.models import ATTENTION_IMPLEMENTATIONS, GROUP_NORM_IMPLEMENTATIONS
from fmjax.sampling import SOLVERS

__all__ = ["base_config", "prepare_workdir", "validate", "validate_image_shape"]

SCHEDULERS = ("condot", "cosine", "linear_vp", "vp", "polynomial")
COUPLINGS = ("independent", "exact_ot", "sinkhorn_ot")
TIME_SAMPLERS = ("uniform", "logit_normal")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


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
    m.name = "unet_tiny"  # a preset of fmjax.models.PRESETS; other keys override its fields
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

    c.path = p = ml_collections.ConfigDict()
    p.scheduler = "condot"  # condot | cosine | linear_vp | vp | polynomial
    p.sigma_min = 0.0  # condot only (Lipman et al.)
    p.polynomial_n = 2.0  # polynomial only
    p.coupling = "independent"  # independent | exact_ot | sinkhorn_ot (per-device batch)
    p.sinkhorn_epsilon = 0.1
    p.time_sampler = "uniform"  # uniform | logit_normal
    p.logit_mean = 0.0
    p.logit_std = 1.0
    p.t_min = 0.0
    p.prediction = "velocity"  # velocity | target | epsilon
    p.loss_space = "prediction"  # prediction | velocity
    return c


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


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks a config before anything is compiled; raises ``ValueError`` naming the key.

    Args:
        config: a config from :func:`base_config` (or an experiment file).
        num_devices: the number of devices the global batch is split over.
    """
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
    _choice("path.prediction", p.prediction, ("velocity", "target", "epsilon"))
    _choice("path.loss_space", p.loss_space, ("prediction", "velocity"))
    _choice("model.dtype", config.model.dtype, ("float32", "bfloat16", "float16"))
    # U-Net fields that the CIFAR-10 configs add (experiments/configs/cifar10.py).
    _choice("model.group_norm", config.model.get("group_norm", "fmjax"), GROUP_NORM_IMPLEMENTATIONS)
    attention = config.model.get("attention", "xla")
    _choice("model.attention", attention, ATTENTION_IMPLEMENTATIONS)
    if attention == "cudnn" and config.model.dtype == "float32":
        raise ValueError(
            "config.model.attention='cudnn' computes in bfloat16 or float16; set "
            "config.model.dtype to one of them, or config.model.attention='xla'."
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


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates the run directory if needed and checks that it can be read and written.

    Raises ``ValueError`` naming the path and the reason (a regular file in the way, no
    permission, a read-only file system) before anything is compiled, instead of an
    ``OSError`` at the first checkpoint. Writing is probed by creating and removing a file,
    which also catches what permission bits do not show (root ignores them; a read-only mount
    does not).

    Example:
        >>> import tempfile, pathlib
        >>> from fmjax.configs import prepare_workdir
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> prepare_workdir(root / "run").is_dir()
        True
        >>> (root / "file").write_text("")
        0
        >>> prepare_workdir(root / "file" / "run")
        Traceback (most recent call last):
        ...
        ValueError: workdir '.../file/run' cannot be created: .../file is not a directory.
    """
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"workdir {str(path)!r} is not valid: it exists and is not a directory; expected a "
            "directory (or a path where one can be created)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise ValueError(
            f"workdir {str(path)!r} cannot be created: {blocker} is not a directory."
        ) from None
    except OSError as error:
        raise ValueError(f"workdir {str(path)!r} cannot be created: {error.strerror}.") from None
    try:
        os.listdir(path)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(
            f"workdir {str(path)!r} is not readable and writable ({error.strerror}); expected a "
            "directory this process can read and write."
        ) from None
    return path
