"""What several test files share: a tiny velocity model, its training config and data, running an
entry point in a fresh process, and reading a run's ``metrics.jsonl``.

Test modules import it as ``import helpers`` (pytest puts ``tests/`` on ``sys.path``, as the
directory of a test module outside a package). The fault suite
(``experiments/bench/faults.py``) keeps its own model and config: experiments cannot import
tests.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from fmjax import configs, data

ROOT = pathlib.Path(__file__).resolve().parent.parent
BATCH = 16  # the tiny config's global batch: divides over 1, 2, 4 and 8 devices

_FORMS = ("plain", "transposed", "doubled")
_ACTIVATIONS = ("silu", "silu_by_tanh")


def _transposed_dot(x, kernel, dimension_numbers, precision=None, **_):
    """``x @ kernel`` through transposed products: the same function as ``lax.dot_general``
    for a dense layer, computed another way."""
    del dimension_numbers  # a dense layer's: the last axis of x against the first of kernel
    return (kernel.T @ x.T).T


class TinyVelocity(nn.Module):
    """A two-layer MLP velocity on flattened images: compiles in about a second, enough to
    test the engine (the U-Nets are exercised end to end elsewhere).

    No registry knows it: tests pass it to ``fmjax.train.train_and_evaluate(..., model=...)``
    and ``fmjax.rundir.load_run(..., model=...)``.

    Attributes:
        num_classes: with a number, an embedding of the label (the null label included) joins
            the input.
        hidden: the width of the hidden layer.
        form: how the hidden layer is computed: ``"plain"``; ``"transposed"``, the same
            function through transposed products; ``"doubled"``, another function (twice the
            output). For the benchmarks' model-option comparison.
        activation: ``"silu"``, or ``"silu_by_tanh"``, the same function as
            ``h (1 + tanh(h / 2)) / 2``.
        zero_output: start the output layer at zero, as the U-Nets' attention projections do.
    """

    num_classes: int | None = None
    hidden: int = 32
    form: str = "plain"
    activation: str = "silu"
    zero_output: bool = False

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
        if self.form not in _FORMS:
            raise ValueError(f"form={self.form!r} is not valid; expected one of {_FORMS}.")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is not valid; expected one of {_ACTIVATIONS}."
            )
        b = x.shape[0]
        h = jnp.concatenate([x.reshape(b, -1), jnp.broadcast_to(t, (b,))[:, None]], axis=1)
        if self.num_classes is not None:
            h = jnp.concatenate([h, nn.Embed(self.num_classes + 1, 4)(y)], axis=1)
        dot = _transposed_dot if self.form == "transposed" else None
        h = nn.Dense(self.hidden, dot_general=dot)(h)
        h = nn.silu(h) if self.activation == "silu" else h * (1 + jnp.tanh(h / 2)) / 2
        init = nn.initializers.zeros if self.zero_output else nn.initializers.lecun_normal()
        out = nn.Dense(x[0].size, kernel_init=init)(h)
        return (2 * out if self.form == "doubled" else out).reshape(x.shape)


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    """A 12-step run of :class:`TinyVelocity` (``model.name`` is only its label) on batches of
    :data:`BATCH`, logging every step, checkpointing every 4, no sample grids;
    ``train_overrides`` update ``config.train``."""
    c = configs.base_config()
    c.model.name = "tiny_velocity"
    c.train.update(
        num_steps=12,
        batch_size=BATCH,
        log_every=1,
        checkpoint_every=4,
        sample_every=0,
        num_grid_samples=4,
        sample_steps=2,
    )
    c.train.update(train_overrides)
    c.optim.update(learning_rate=1e-2, ema_decay=0.9)
    return c


def tiny_source(seed: int = 0) -> data.ArraySource:
    """40 fixed 4x4 grey images in (-1, 1) with labels in {0, 1, 2}, in the order of
    ``seed``."""
    rng = np.random.default_rng(0)
    images = np.tanh(rng.normal(size=(40, 4, 4, 1))).astype(np.float32)
    return data.ArraySource(images, rng.integers(0, 3, 40), seed=seed)


# --- fresh processes --------------------------------------------------------------------------


def one_device_env() -> dict[str, str]:
    """This process's environment for a child that sees one CPU device, as on a laptop (the
    suite's simulated devices removed), and uses the suite's compilation cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env["FMJAX_JAX_CACHE"] = jax.config.jax_compilation_cache_dir
    return env


def run_module(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root on one CPU device (whatever its exit
    status); stdout and stderr are captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=one_device_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def two_processes(script: str, *args: str, timeout: float = 600) -> list[str]:
    """Runs ``python -c SCRIPT PROCESS_ID PORT ARGS`` as processes 0 and 1 of a
    ``jax.distributed`` cluster on localhost (a free port; the script sets its own device
    count) and returns what each printed; fails the test unless both exited with status 0."""
    import portpicker

    port = str(portpicker.pick_unused_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), port, *args],
            cwd=ROOT,
            env=one_device_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return outputs


def module_output(module: str, *args: str) -> str:
    """What :func:`run_module` printed (stdout, then stderr); fails the test, with the end of
    both, unless it exited with status 0."""
    result = run_module(module, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


# --- a run's metrics --------------------------------------------------------------------------


def metrics_lines(workdir: str | os.PathLike) -> list[dict]:
    """Every line of the run's ``metrics.jsonl`` (training metrics and evaluation scores)."""
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def training_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the training-metric lines (those with a loss; evaluation scores have
    lines of their own)."""
    return [m["step"] for m in metrics_lines(workdir) if "loss" in m]
