"""Fault injection for the training engine: kills, a corrupted checkpoint, SIGTERM, a NaN batch,
a full disk, and determinism, each checked end to end against an uninterrupted run.

    python -m experiments.bench.faults [--workdir=/tmp/fmjax-faults] [--kills=5] [--seed=0]
                                       [--model=mlp|unet_tiny] [--steps=60] [--devices=2]

Every training run is a subprocess (``python -m experiments.bench.faults --child ...``: the
digits, a tiny model, ``--devices`` simulated CPU devices), so that it can be SIGKILLed at any
moment.
Prints one row per injection (what was done, what was expected, what happened, pass/fail,
seconds) and exits with status 1 if any row fails. ``tests/test_faults.py`` runs a reduced
form of it in CI.

Rows:

- ``kill -9`` at random steps, during start-up and while an asynchronous Orbax save is in
  flight, ``--kills`` times in one run: each restart resumes from the newest complete
  checkpoint; the final parameters, EMA and optimizer state are bit-identical to the
  uninterrupted run's, and so is ``metrics.jsonl`` (timing fields excepted).
- a truncated newest checkpoint: the run falls back to the previous one with a warning naming
  the bad step, replaces it, and ends bit-identical to the uninterrupted run.
- SIGTERM to the entry point (``python -m experiments.digits``): exit status 0 with a
  checkpoint at the stop step; the same command again resumes from it.
- NaN in the batch of step k: an error naming step k; the newest checkpoint before k is
  readable and bit-identical to the uninterrupted run's at that step.
- a full disk (a tmpfs workdir filled at a chosen step; needs root to mount): a
  :class:`fmjax.checkpoint.CheckpointWriteError` naming the step and the directory, or an
  ``OSError`` naming ``metrics.jsonl``; the previous checkpoint and the earlier lines intact.
- the same config and seed twice: identical ``metrics.jsonl`` (timing fields excepted) and
  parameters.
- a double launch into one workdir, simultaneous and staggered: one run is refused at once
  ("is in use by another run") and writes nothing; the other ends bit-identical to the
  uninterrupted run, metrics included.
- a lock left by a run killed with ``kill -9``: the next run recovers it (a warning naming
  the dead holder) and resumes exactly.
- a resume with other run-defining keys (learning rate, prediction): refused with one line
  naming each key, saved and new value; ``config.json`` and every other file untouched.
- a full disk while the best-checkpoint hook saves: the error names ``checkpoints_best``,
  the full disk and the resumable steps of ``checkpoints/``.
"""

import argparse
import dataclasses
import functools
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from experiments import common
from fmjax import checkpoint, configs, data, rundir, train
from fmjax.step import abstract_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMING = ("steps_per_sec", "images_per_sec")  # the metrics that differ between identical runs
_WAIT = 600.0  # seconds: generous bounds for a process to start, stop or finish


class FaultsMLP(nn.Module):
    """A two-layer MLP velocity on flattened images: compiles in a second, so a dozen restarts
    stay cheap (``--model=unet_tiny`` runs the suite on a real U-Net instead). No preset names
    it: the suite passes it to the engine as an object (:func:`model_of`)."""

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
        b = x.shape[0]
        h = jnp.concatenate([x.reshape(b, -1), jnp.broadcast_to(t, (b,))[:, None]], axis=1)
        h = nn.silu(nn.Dense(64)(h))
        return nn.Dense(x[0].size)(h).reshape(x.shape)


MODELS = {"mlp": "faults_mlp", "unet_tiny": "unet_tiny"}
"""``--model`` -> ``config.model.name``: a label for the MLP (no preset names it: the engine
gets it as an object, see :func:`model_of`), the preset's name for the U-Net."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every run of the suite shares.

    Attributes:
        workdir: the suite's directory (one subdirectory per scenario).
        model: a key of :data:`MODELS`.
        steps: training steps of a full run.
        checkpoint_every: steps between checkpoints.
        devices: simulated CPU devices of each training process.
    """

    workdir: pathlib.Path
    model: str = "mlp"
    steps: int = 60
    checkpoint_every: int = 10
    devices: int = 2


@dataclasses.dataclass
class Row:
    """One line of the table: an injection and what it did."""

    injection: str
    expected: str
    observed: str
    ok: bool | None  # None: skipped
    seconds: float = 0.0
    ok_if_resumed_from: int | None = None  # a kill's row: the step its restart must resume from


# --- the training child ----------------------------------------------------------------------


def child_config(
    model: str,
    steps: int,
    checkpoint_every: int,
    keep: int,
    learning_rate: float = 1e-3,
    prediction: str = "velocity",
):
    """The config of every training run of the suite (log every step, no sample grids);
    ``learning_rate`` and ``prediction`` change it into another run."""
    c = configs.base_config()
    c.model.name = MODELS[model]
    c.train.update(
        num_steps=steps,
        batch_size=16,
        log_every=1,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep,
        sample_every=0,
    )
    c.optim.update(learning_rate=learning_rate, ema_decay=0.99)
    c.path.prediction = prediction
    return c


def model_of(config) -> nn.Module:
    """The network a run of the suite trains: :class:`FaultsMLP` for ``--model=mlp``, else the
    preset that ``config.model`` names."""
    if config.model.name == MODELS["mlp"]:
        return FaultsMLP()
    return configs.build_model(config.model)


class PoisonedSource(data.ArraySource):
    """An in-memory source (the suite's: the digits), with NaN images in the batch of one
    update (``poison_step``, 1-based)."""

    def __init__(self, poison_step: int, source: data.ArraySource):
        super().__init__(source.images, source.labels, seed=source.seed)
        self.poison_step = poison_step

    def batch(self, step, *args, **kwargs):
        out = super().batch(step, *args, **kwargs)
        if step + 1 == self.poison_step:  # batch k feeds update k + 1
            out["image"] = np.full_like(out["image"], np.nan)
        return out


def fill_disk(workdir: pathlib.Path, step: int, checkpoint_every: int) -> dict:
    """Fills the file system of ``workdir`` with zeros (on the first call only), after the
    checkpoint before ``step`` is complete: a save still in flight would fail instead of the
    next write. An :class:`fmjax.train.EvalHook` function: returns no metrics."""
    if (workdir / "filler").exists():
        return {}
    due = (step - 1) // checkpoint_every * checkpoint_every
    deadline = time.monotonic() + _WAIT
    while due and due not in complete_steps(workdir) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with open(workdir / "filler", "ab", buffering=0) as f:
            while f.write(bytes(1 << 16)):
                pass
    except OSError:  # full
        pass
    try:  # the last bytes, a page at a time
        with open(workdir / "filler", "ab", buffering=0) as f:
            while f.write(bytes(4096)):
                pass
    except OSError:
        pass
    return {}


def best_hook(every: int) -> train.EvalHook:
    """A hook whose score improves at every evaluation, so the best-checkpoint hook saves a
    state to ``checkpoints_best`` each time."""
    return train.EvalHook(every=every, fn=lambda step, state: {"score": -step}, keep_best="score")


def hold_hook(release: pathlib.Path, at: int = 2) -> train.EvalHook:
    """A hook that holds the run at step ``at`` (while it holds the workdir) until the file
    ``release`` exists: the parent lets it go once another run has tried the workdir."""

    def hold(step, state):
        deadline = time.monotonic() + _WAIT
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {}

    return train.EvalHook(every=at, fn=hold)


def child_main(args) -> None:
    """One training run (the ``--child`` mode): prints ``SAVE-STARTED <step>`` after each
    asynchronous save starts, when asked, so that the parent can kill it mid-save."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    common.setup()
    workdir = pathlib.Path(args.workdir)
    config = child_config(
        args.model,
        args.steps,
        args.checkpoint_every,
        args.keep,
        args.learning_rate,
        args.prediction,
    )
    source = data.digits(seed=config.seed)
    if args.poison_step:
        source = PoisonedSource(args.poison_step, source)
    hooks = []
    if args.fill_disk_at:
        fill = functools.partial(fill_disk, workdir, checkpoint_every=args.checkpoint_every)
        hooks.append(train.EvalHook(every=args.fill_disk_at, fn=lambda step, state: fill(step)))
    if args.best_every:
        hooks.append(best_hook(args.best_every))
    if args.hold_file:
        hooks.append(hold_hook(pathlib.Path(args.hold_file)))
    if args.announce_saves:
        save = checkpoint.Checkpoints.save

        def announced(self, step, state):
            save(self, step, state)
            print(f"SAVE-STARTED {step}", flush=True)

        checkpoint.Checkpoints.save = announced
    try:
        state = train.train_and_evaluate(
            config, workdir, model=model_of(config), source=source, hooks=hooks
        )
    except Exception as error:  # the one line the parent reads, before the traceback
        print(f"FAILED {type(error).__name__}: {error}", flush=True)
        raise
    print(f"DONE {int(state.step)}", flush=True)


# --- running and inspecting children --------------------------------------------------------


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env


class Child:
    """A training subprocess whose output goes to ``log`` (polled by the parent)."""

    def __init__(self, setup: Setup, workdir: pathlib.Path, log: pathlib.Path, **options):
        command = [
            sys.executable, "-m", "experiments.bench.faults", "--child",
            f"--workdir={workdir}", f"--model={setup.model}", f"--steps={setup.steps}",
            f"--checkpoint_every={setup.checkpoint_every}",
        ]  # fmt: skip
        command += [f"--{k}={v}" for k, v in options.items()]
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=_env(setup.devices), stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float = _WAIT) -> bool:
        """Polls until ``predicate(output)`` holds (True) or the process ends first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.output()):
                return True
            if self.process.poll() is not None:
                return predicate(self.output())
            time.sleep(0.005)
        raise TimeoutError(f"{self.log}: nothing happened in {timeout:.0f} s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=_WAIT)

    def finish(self) -> int:
        return self.process.wait(timeout=_WAIT)


def logged_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of the lines of ``metrics.jsonl`` so far (empty if none)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            break
    return steps


def metrics_without_timing(workdir: pathlib.Path) -> list[dict]:
    """``metrics.jsonl`` without the timing fields."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def complete_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints (without touching any left-over save)."""
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def leftovers(workdir: pathlib.Path) -> list[str]:
    """The temporary directories of interrupted saves."""
    directory = workdir / "checkpoints"
    return (
        sorted(p.name for p in directory.iterdir() if "tmp" in p.name) if directory.exists() else []
    )


def load_state(workdir: pathlib.Path, step: int | None = None):
    """A run's checkpoint at ``step`` (default: the newest readable) on the host, and its step."""
    config = rundir.load_config(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_state(config, model_of(config), sharding=device)
    checkpoints = checkpoint.Checkpoints(workdir, async_save=False)
    try:
        if step is None:
            state, step = checkpoints.restore_latest(abstract)
        else:
            state = checkpoints.restore(step, abstract)
    finally:
        checkpoints.close()
    return jax.device_get(state), step


def identical(a, b) -> bool:
    """Whether two pytrees of arrays are bit-for-bit equal (same structure, dtypes, bytes)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def _resumed_from(output: str) -> int:
    """The step a child resumed from (0: a fresh start)."""
    found = re.findall(r"Resuming .* from step (\d+)\.", output)
    return int(found[-1]) if found else 0


# --- the scenarios ---------------------------------------------------------------------------


def reference(setup: Setup, name: str = "reference") -> tuple[pathlib.Path, float]:
    """An uninterrupted run keeping every checkpoint; its directory and duration."""
    workdir = setup.workdir / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    child = Child(setup, workdir, setup.workdir / f"{name}.log", keep=1000)
    if child.finish() != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{child.output()[-3000:]}")
    return workdir, time.perf_counter() - start


def determinism(setup: Setup, ref: pathlib.Path) -> list[Row]:
    """The same config and seed again: identical metrics (timing aside) and state."""
    start = time.perf_counter()
    again, _ = reference(setup, "reference_again")
    same_metrics = metrics_without_timing(again) == metrics_without_timing(ref)
    same_state = identical(load_state(again)[0], load_state(ref)[0])
    return [
        Row(
            "the same config and seed twice",
            "identical metrics.jsonl (timing aside) and parameters",
            f"metrics {'identical' if same_metrics else 'DIFFER'}, "
            f"state {'bit-identical' if same_state else 'DIFFERS'}",
            same_metrics and same_state,
            time.perf_counter() - start,
        )
    ]


def _trained_steps(output: str) -> list[int]:
    """The steps a child has logged ("step N/M | ..." progress lines)."""
    return [int(n) for n in re.findall(r"step (\d+)/\d+ \|", output)]


def _past_restore(output: str) -> bool:
    return "Resuming" in output or bool(_trained_steps(output))


def kills(setup: Setup, ref: pathlib.Path, count: int, rng: random.Random) -> list[Row]:
    """``count`` SIGKILLs in one run, cycling through: during an async save, at a random step,
    during start-up; then a last restart runs to the end and is compared with ``ref``."""
    workdir = setup.workdir / "killed"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    rows: list[Row] = []
    modes = ("during an async save", "at a random step", "during start-up")
    expected_start, unchecked = 0, []  # rows whose restart has not shown where it resumed
    for i in range(count + 1):
        t0 = time.perf_counter()
        child = Child(setup, workdir, setup.workdir / f"killed_{i}.log", announce_saves=1)
        mode = modes[i % len(modes)] if i < count else "none: runs to the end"
        if mode == "during an async save":
            finished = not child.wait_for(lambda out: "SAVE-STARTED" in out)  # its first save
            saving = re.findall(r"SAVE-STARTED (\d+)", child.output())
            what = f"save of step {saving[-1]} just started" if saving else ""
        elif mode == "at a random step":
            child.wait_for(_past_restore)
            resumed = _resumed_from(child.output())  # within two checkpoints: kills left
            step = rng.randint(
                resumed + 1, min(setup.steps - 1, resumed + 2 * setup.checkpoint_every)
            )
            finished = not child.wait_for(
                lambda out, n=step: any(s >= n for s in _trained_steps(out))
            )
            delay_ms = rng.uniform(0, 50)
            time.sleep(delay_ms / 1000)
            what = f"step {step} + {delay_ms:.0f} ms"
        elif mode == "during start-up":
            delay = rng.uniform(0.0, 4.0)
            time.sleep(delay)
            finished = child.process.poll() is not None
            what = f"{delay:.1f} s after launch"
        else:
            finished, what = True, ""
        if not finished:
            child.kill()
        code = child.finish()
        output = child.output()
        if _past_restore(output):
            resumed = _resumed_from(output)
            for row in unchecked:
                row.observed += f"; the restart resumed from {resumed}"
                row.ok = resumed == row.ok_if_resumed_from
            unchecked = []
        if finished:
            rows.append(
                Row(
                    f"restart {i}: run to the end",
                    "exit 0; temporary directories of killed saves removed",
                    f"exit {code}, leftovers {leftovers(workdir)}",
                    code == 0 and not leftovers(workdir),
                    time.perf_counter() - t0,
                )
            )
            break
        steps = complete_steps(workdir)
        expected_start = steps[-1] if steps else 0
        saved = re.findall(r"SAVE-STARTED (\d+)", output)
        in_flight = bool(saved) and int(saved[-1]) not in steps
        row = Row(
            f"SIGKILL {i + 1} {mode}: {what}",
            "the restart resumes from the newest complete checkpoint",
            f"newest complete checkpoint {expected_start}"
            + (
                f"; save of {saved[-1]} cut short, tmp dirs {leftovers(workdir)}"
                if in_flight
                else ""
            ),
            False,
            time.perf_counter() - t0,
        )
        row.ok_if_resumed_from = expected_start
        rows.append(row)
        unchecked.append(row)
    final, _ = load_state(workdir)
    same_state = identical(final, load_state(ref)[0])
    metrics = metrics_without_timing(workdir)
    same_metrics = metrics == metrics_without_timing(ref)
    killed = sum(row.injection.startswith("SIGKILL") for row in rows)
    rows.append(
        Row(
            f"after {killed} SIGKILLs and restarts",
            "params, EMA, opt state and metrics.jsonl equal the uninterrupted run's",
            f"state {'bit-identical' if same_state else 'DIFFERS'}, metrics "
            f"{'identical' if same_metrics else 'DIFFER'} ({len(metrics)} lines)",
            same_state and same_metrics,
        )
    )
    return rows


def corrupted_checkpoint(setup: Setup, ref: pathlib.Path) -> list[Row]:
    """The finished reference run with its newest checkpoint's array files cut in half."""
    t0 = time.perf_counter()
    workdir = setup.workdir / "corrupted"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(ref, workdir)
    newest = complete_steps(workdir)[-1]
    for blob in (workdir / "checkpoints" / str(newest)).rglob("*"):
        if blob.is_file() and blob.parent.name == "d":  # the array data files
            blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    child = Child(setup, workdir, setup.workdir / "corrupted.log", keep=1000)
    code = child.finish()
    output = child.output()
    warned = f"Checkpoint at step {newest} cannot be restored" in output
    resumed = _resumed_from(output)
    same = code == 0 and identical(load_state(workdir)[0], load_state(ref)[0])
    return [
        Row(
            f"newest checkpoint ({newest}) truncated",
            "warning naming it; resume from the previous one; same final state",
            f"exit {code}, warning {'names' if warned else 'MISSING'} step {newest}, resumed "
            f"from {resumed}, final state {'bit-identical' if same else 'DIFFERS'}",
            warned and resumed == newest - setup.checkpoint_every and same,
            time.perf_counter() - t0,
        )
    ]


def nan_batch(setup: Setup, ref: pathlib.Path, step: int) -> list[Row]:
    """NaN images in the batch of update ``step``."""
    t0 = time.perf_counter()
    workdir = setup.workdir / "nan"
    shutil.rmtree(workdir, ignore_errors=True)
    child = Child(setup, workdir, setup.workdir / "nan.log", keep=1000, poison_step=step)
    code = child.finish()
    named = f"Non-finite loss at step {step}" in child.output()
    good = (step - 1) // setup.checkpoint_every * setup.checkpoint_every
    steps = complete_steps(workdir)
    state, restored = load_state(workdir)
    same = identical(state, load_state(ref, good)[0])
    logged = logged_steps(workdir)
    return [
        Row(
            f"NaN batch at step {step}",
            f"error naming step {step}; checkpoint {good} untouched",
            f"exit {code}, FloatingPointError {'names' if named else 'MISSING'} the step, "
            f"checkpoints {steps}, step {restored} {'bit-identical' if same else 'DIFFERS'} "
            f"to the uninterrupted run's, last logged step {logged[-1] if logged else None}",
            code != 0 and named and steps[-1] == good and same,
            time.perf_counter() - t0,
        )
    ]


def mount_tmpfs(directory: pathlib.Path, size: str) -> str | None:
    """Mounts a tmpfs of ``size`` on ``directory``; the reason it could not, or None."""
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs"
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    return None if result.returncode == 0 else f"mount failed: {result.stderr.strip()}"


def unmount(directory: pathlib.Path) -> None:
    """Unmounts what :func:`mount_tmpfs` mounted (lazily: a file may still be open)."""
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def full_disk(setup: Setup, ref: pathlib.Path, size: str = "16m") -> list[Row]:
    """A tmpfs workdir filled (1) at the last step, after its log line and before its
    checkpoint: the checkpoint fails; (2) three steps after a checkpoint: whichever write
    comes next fails (``metrics.jsonl``, TensorBoard or a checkpoint: appends that fit in a
    page already allocated still succeed on tmpfs)."""
    rows = []
    for case, fill_at in (("last step", setup.steps), ("mid-run", setup.checkpoint_every + 3)):
        t0 = time.perf_counter()
        mount = setup.workdir / f"disk_{case.split()[0]}"
        reason = mount_tmpfs(mount, size)
        injection = f"disk full at step {fill_at} ({case}; tmpfs)"
        if reason is not None:
            rows.append(Row(injection, "a clear error", f"skipped: {reason}", None))
            continue
        try:
            workdir = mount / "run"
            log = setup.workdir / f"disk_{case.split()[0]}.log"
            child = Child(setup, workdir, log, keep=1000, fill_disk_at=fill_at)
            code = child.finish()
            errors = re.findall(r"^FAILED (.*)$", child.output(), re.MULTILINE)
            message = errors[-1] if errors else "no error"
            clear = str(workdir) in message and "disk" in message and "full" in message
            if case == "last step":
                clear = clear and f"checkpoint at step {fill_at} could not be written" in message
            logged = logged_steps(workdir)
            # The newest checkpoint complete before the fill (fill_disk waits for it).
            before = (fill_at - 1) // setup.checkpoint_every * setup.checkpoint_every
            state, restored = load_state(workdir)
            same = restored >= before and identical(state, load_state(ref, restored)[0])
            lines = (workdir / "metrics.jsonl").read_bytes()
            whole = lines.endswith(b"\n") and all(json.loads(line) for line in lines.splitlines())
            rows.append(
                Row(
                    injection,
                    "an error naming the step and the path; the previous checkpoint and the "
                    "earlier metrics lines intact",
                    f"exit {code}: {message[:150]}{'...' if len(message) > 150 else ''} | "
                    f"checkpoint {restored} {'bit-identical' if same else 'DIFFERS'}, metrics "
                    f"lines {'whole' if whole else 'TORN'}, steps 1-{logged[-1]}",
                    code != 0 and clear and same and whole
                    and logged == list(range(1, logged[-1] + 1)) and logged[-1] >= fill_at,
                    time.perf_counter() - t0,
                )
            )  # fmt: skip
        finally:
            unmount(mount)
    return rows


def sigterm_entry_point(setup: Setup) -> list[Row]:
    """SIGTERM to ``python -m experiments.digits`` (quick config, a long run) once training has
    logged a few steps; then the same command again, SIGTERMed once it has resumed."""
    workdir = setup.workdir / "sigterm"
    shutil.rmtree(workdir, ignore_errors=True)
    command = [
        sys.executable, "-m", "experiments.digits", f"--workdir={workdir}",
        "--config=experiments/configs/digits.py:quick", "--config.train.num_steps=100000",
        "--config.train.eval_every=0", "--config.train.sample_every=0",
        "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
    ]  # fmt: skip
    env = _env(setup.devices)
    if jax.config.jax_compilation_cache_dir and "FMJAX_JAX_CACHE" not in env:
        env["FMJAX_JAX_CACHE"] = jax.config.jax_compilation_cache_dir  # e.g. the test suite's
    rows, stopped_at = [], 0
    for attempt in range(2):
        t0 = time.perf_counter()
        log = setup.workdir / f"sigterm_{attempt}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        target = stopped_at + 3
        deadline = time.monotonic() + _WAIT
        while not any(s >= target for s in logged_steps(workdir)):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "hung"
        output = log.read_text(errors="replace")
        resumed = _resumed_from(output)
        steps = complete_steps(workdir)
        stop = steps[-1] if steps else None
        logged = logged_steps(workdir)
        ok = code == 0 and stop is not None and stop > stopped_at and logged[-1] == stop
        if attempt:
            ok = ok and resumed == stopped_at
        rows.append(
            Row(
                f"SIGTERM to python -m experiments.digits (run {attempt + 1})",
                "exit 0, checkpoint at the stop step" + ("; resumed from it" if attempt else ""),
                f"exit {code}, checkpoint at {stop}, last logged step {logged[-1] if logged else None}"
                + (f", resumed from {resumed}" if attempt else ""),
                ok,
                time.perf_counter() - t0,
            )
        )
        stopped_at = stop or 0
    return rows


def double_launch(setup: Setup, ref: pathlib.Path, staggered: bool) -> list[Row]:
    """Two runs started into one workdir, at once or the second once the first trains: one is
    refused and writes nothing, the other ends as the uninterrupted run does."""
    t0 = time.perf_counter()
    kind = "staggered" if staggered else "simultaneous"
    workdir = setup.workdir / f"double_{kind}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # Whichever run takes the workdir holds at step 2 until the other has given up.
    release = setup.workdir / f"double_{kind}.release"
    release.unlink(missing_ok=True)
    options = {"keep": 1000, "hold_file": release}
    first = Child(setup, workdir, setup.workdir / f"double_{kind}_1.log", **options)
    if staggered:
        first.wait_for(lambda out: bool(_trained_steps(out)))
    second = Child(setup, workdir, setup.workdir / f"double_{kind}_2.log", **options)
    deadline = time.monotonic() + _WAIT
    while all(c.process.poll() is None for c in (first, second)) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.touch()
    codes = [first.finish(), second.finish()]
    outputs = [first.output(), second.output()]
    refused = [
        i for i, out in enumerate(outputs) if "FAILED WorkdirBusyError" in out and "in use" in out
    ]
    done = [i for i, out in enumerate(outputs) if f"DONE {setup.steps}" in out]
    same_state = identical(load_state(workdir)[0], load_state(ref)[0])
    same_metrics = metrics_without_timing(workdir) == metrics_without_timing(ref)
    message = re.findall(r"^FAILED (.*)$", outputs[refused[0]], re.MULTILINE) if refused else []
    return [
        Row(
            f"double launch into one workdir ({kind})",
            "one run refused at once naming the holder; the other bit-identical to the "
            "uninterrupted run (state and metrics)",
            f"exits {codes}, refused: run {[i + 1 for i in refused]} "
            f"({message[0][:90] if message else 'no message'}...), state "
            f"{'bit-identical' if same_state else 'DIFFERS'}, metrics "
            f"{'identical' if same_metrics else 'DIFFER'}",
            len(refused) == 1 and len(done) == 1 and (not staggered or refused == [1])
            and same_state and same_metrics,
            time.perf_counter() - t0,
        )
    ]  # fmt: skip


def stale_lock(setup: Setup, ref: pathlib.Path) -> list[Row]:
    """A run killed with SIGKILL while it holds the workdir's lock; the next run recovers the
    lock and resumes exactly."""
    t0 = time.perf_counter()
    workdir = setup.workdir / "stale_lock"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    child = Child(setup, workdir, setup.workdir / "stale_lock_1.log", keep=1000)
    child.wait_for(lambda out: any(s > setup.checkpoint_every for s in _trained_steps(out)))
    child.kill()
    record = json.loads((workdir / rundir.LOCK_FILE).read_text())
    again = Child(setup, workdir, setup.workdir / "stale_lock_2.log", keep=1000)
    code = again.finish()
    recovered = "Recovered the lock" in again.output() and f"pid {record['pid']}" in again.output()
    same = code == 0 and identical(load_state(workdir)[0], load_state(ref)[0])
    same_metrics = metrics_without_timing(workdir) == metrics_without_timing(ref)
    return [
        Row(
            "a lock left by kill -9",
            "the next run recovers it (warning naming the dead pid) and ends bit-identical",
            f"exit {code}, lock of pid {record['pid']} (released: {record.get('released', False)}) "
            f"{'recovered' if recovered else 'NOT RECOVERED'}, state "
            f"{'bit-identical' if same else 'DIFFERS'}, metrics "
            f"{'identical' if same_metrics else 'DIFFER'}",
            recovered and same and same_metrics,
            time.perf_counter() - t0,
        )
    ]


def changed_run(setup: Setup, ref: pathlib.Path) -> list[Row]:
    """The finished reference run resumed with another learning rate and prediction."""
    t0 = time.perf_counter()
    workdir = setup.workdir / "changed"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(ref, workdir)
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    child = Child(setup, workdir, setup.workdir / "changed.log", keep=1000, learning_rate=2e-3,
                  prediction="epsilon", steps=setup.steps + 10)  # fmt: skip
    code = child.finish()
    errors = re.findall(r"^FAILED (.*)$", child.output(), re.MULTILINE)
    message = errors[-1] if errors else "no error"
    expected = (
        "different config (optim.learning_rate: saved 0.001, now 0.002; path.prediction: "
        "saved 'velocity', now 'epsilon')"
    )
    after = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    untouched = {p: b for p, b in after.items() if p.name != rundir.LOCK_FILE} == {
        p: b for p, b in before.items() if p.name != rundir.LOCK_FILE
    }
    return [
        Row(
            "resume with another learning rate and prediction (and more steps)",
            "refused naming each key, saved and new value; config.json and the run untouched",
            f"exit {code}: {message[:160]}... | files {'untouched' if untouched else 'CHANGED'}",
            code != 0 and expected in message and untouched,
            time.perf_counter() - t0,
        )
    ]


def full_disk_best(setup: Setup, size: str = "16m") -> list[Row]:
    """A tmpfs workdir filled just before the best-checkpoint hook saves."""
    t0 = time.perf_counter()
    mount = setup.workdir / "disk_best"
    fill_at = 2 * setup.checkpoint_every
    injection = f"disk full at step {fill_at} as the best-checkpoint hook saves (tmpfs)"
    reason = mount_tmpfs(mount, size)
    if reason is not None:
        return [Row(injection, "a clear error", f"skipped: {reason}", None)]
    try:
        workdir = mount / "run"
        child = Child(setup, workdir, setup.workdir / "disk_best.log", keep=1000,
                      fill_disk_at=fill_at, best_every=setup.checkpoint_every)  # fmt: skip
        code = child.finish()
        errors = re.findall(r"^FAILED (.*)$", child.output(), re.MULTILINE)
        message = errors[-1] if errors else "no error"
        steps = complete_steps(workdir)
        clear = (
            f"could not be written to {workdir}/checkpoints_best: the disk is full" in message
            and f"intact: steps {steps} in {workdir}/checkpoints" in message
        )
        return [
            Row(
                injection,
                "an error naming checkpoints_best, the full disk and the resumable steps of "
                "checkpoints/",
                f"exit {code}: {message[:200]}...",
                code != 0 and clear and bool(steps),
                time.perf_counter() - t0,
            )
        ]
    finally:
        unmount(mount)


# --- the command -----------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| injection | expected | observed | result | s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        result = "skip" if r.ok is None else ("pass" if r.ok else "FAIL")
        lines.append(
            f"| {r.injection} | {r.expected} | {r.observed} | {result} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def run_suite(setup: Setup, kill_count: int, seed: int) -> list[Row]:
    """Every scenario; the rows of the table."""
    setup.workdir.mkdir(parents=True, exist_ok=True)
    ref, seconds = reference(setup)
    rows = [Row("none (uninterrupted reference run)", "exit 0", "exit 0", True, seconds)]
    scenarios = [
        ("the same config and seed twice", lambda: determinism(setup, ref)),
        ("SIGKILLs", lambda: kills(setup, ref, kill_count, random.Random(seed))),
        ("a truncated newest checkpoint", lambda: corrupted_checkpoint(setup, ref)),
        ("a NaN batch", lambda: nan_batch(setup, ref, step=setup.checkpoint_every * 2 + 3)),
        ("a full disk", lambda: full_disk(setup, ref)),
        ("a full disk with the best-checkpoint hook", lambda: full_disk_best(setup)),
        ("a double launch", lambda: double_launch(setup, ref, staggered=False)),
        ("a staggered double launch", lambda: double_launch(setup, ref, staggered=True)),
        ("a lock left by kill -9", lambda: stale_lock(setup, ref)),
        ("a resume with other run-defining keys", lambda: changed_run(setup, ref)),
        ("SIGTERM to the entry point", lambda: sigterm_entry_point(setup)),
    ]
    for name, scenario in scenarios:
        try:
            rows += scenario()
        except Exception as error:  # a broken scenario is a failed row, not a lost table
            rows.append(Row(name, "the scenario runs", f"{type(error).__name__}: {error}", False))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fmjax-faults"))
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs in one run")
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--devices", type=int, default=2, help="simulated CPU devices per run")
    # The training child (see child_main).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--poison_step", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fill_disk_at", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--announce_saves", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--best_every", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hold_file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help=argparse.SUPPRESS)
    parser.add_argument("--prediction", default="velocity", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    setup = Setup(
        pathlib.Path(args.workdir).absolute(),
        model=args.model,
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        devices=args.devices,
    )
    start = time.perf_counter()
    rows = run_suite(setup, args.kills, args.seed)
    print(table(rows))
    failed = [r for r in rows if r.ok is False]
    print(f"\n{len(rows)} rows, {len(failed)} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
