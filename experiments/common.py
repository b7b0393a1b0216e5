"""What every entry point shares: logging, the compilation cache, and how a failure ends.

A failure ends with one ``error: …`` line, the last line on stderr, and exit status 2 for
bad input or a bad environment (a config or flag mistake, a busy or full workdir), 1 for
anything else. Library tracebacks and error logs (Orbax's background writers, asyncio's
"Task exception was never retrieved") go to ``WORKDIR/error.log`` instead of the terminal;
``--verbose`` prints them too.
"""

import contextlib
import datetime
import functools
import gc
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence

import jax
from absl import app, flags

from fmjax import configs
from fmjax.generate import MEAN_FLOW_SAMPLER, SAMPLERS, SamplingOptions
from fmjax.rundir import LOCK_FILE, WorkdirBusyError
from fmjax.sde import DIFFUSIONS, LAST_STEPS, SDE_SOLVERS

FLAGS = flags.FLAGS

USER_ERRORS = (ValueError, OSError, WorkdirBusyError)
"""The exceptions that are the user's input or environment (exit status 2): fmjax's checks
raise ``ValueError`` naming the value and what is expected, a missing file or a full disk an
``OSError`` (:class:`fmjax.checkpoint.CheckpointWriteError` included), a second run into a
busy workdir :class:`fmjax.rundir.WorkdirBusyError`."""

_LIBRARY_LOG_CAP = 10_000  # records kept in memory while the workdir does not exist yet


class _NoTpuProbe(logging.Filter):
    """Drops JAX's record that no TPU backend could be initialised: JAX tries every platform
    it knows, so each run on a machine without a TPU would print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


def quiet_tpu_probe() -> None:
    """Silences JAX's ``Unable to initialize backend 'tpu'`` line (a log record of
    ``jax._src.xla_bridge``); platform selection is unchanged. Idempotent."""
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoTpuProbe) for f in logger.filters):
        logger.addFilter(_NoTpuProbe())


def setup(distributed: bool = False) -> None:
    """Logging and a persistent compilation cache for an entry point; with ``distributed``
    (``--distributed``), first ``jax.distributed.initialize`` with the flags of
    :func:`define_distributed_flags` (none: the cluster's environment, e.g. Slurm or a TPU pod).

    fmjax's progress lines show at INFO; the libraries' own chatter (Orbax's per-save lines,
    absl) only from WARNING up, and JAX's note that no TPU is present not at all
    (:func:`quiet_tpu_probe`). Compiled programs are cached under ``$FMJAX_JAX_CACHE``
    (default ``~/.cache/fmjax/jax``), so running or resuming the same job again starts in
    seconds instead of recompiling.
    """
    if distributed:
        # Every process must join before JAX picks its backend, i.e. before any device use.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    quiet_tpu_probe()
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("fmjax").setLevel(logging.INFO)
    cache = os.environ.get("FMJAX_JAX_CACHE", os.path.expanduser("~/.cache/fmjax/jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@contextlib.contextmanager
def heartbeat(what: str, every: float = 20.0) -> Iterator[None]:
    """Logs ``<what>: still running (N s)`` every ``every`` seconds until the block ends, so
    that a long blocking call (a solve, its first compilation) never leaves the terminal
    silent; a block shorter than ``every`` logs nothing. JAX releases the GIL while it
    compiles and computes, so the lines come on time.

    Example::

        with heartbeat("Bits/dim of test digits 1-25"):
            result = likelihood.dequantized_bits_per_dim(...)
    """
    done = threading.Event()
    began = time.perf_counter()

    def beat():
        while not done.wait(every):
            logging.info("%s: still running (%.0f s)", what, time.perf_counter() - began)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class ErrorLog(logging.Filter):
    """A filter for the terminal's log handlers that diverts library errors to
    ``WORKDIR/error.log``: records with a traceback, and records at ERROR or above from
    loggers outside fmjax and the experiments (Orbax's background writers, asyncio). The
    file is opened when the workdir exists; until then records wait in memory.

    Example::

        errors = ErrorLog("runs/digits")
        for handler in logging.getLogger().handlers:
            handler.addFilter(errors)
    """

    def __init__(self, workdir: str | os.PathLike | None, verbose: bool = False):
        super().__init__()
        self.workdir, self.verbose = workdir, verbose
        self.count = 0
        self._pending: list[str] = []
        self._file = None
        self.saved = False  # whether everything so far reached the file
        self._formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    @property
    def path(self) -> str | None:
        """``WORKDIR/error.log``, or None without a workdir."""
        return None if self.workdir is None else os.path.join(self.workdir, "error.log")

    def writable(self) -> bool:
        """Whether this process may write into the workdir: it exists, and no other run holds
        its lease (a run refused as a second launch leaves the first one's workdir alone)."""
        if self.workdir is None or not os.path.isdir(self.workdir):
            return False
        try:
            with open(os.path.join(self.workdir, LOCK_FILE), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return True  # no lease there (yet): an entry point without one
        ours = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
        return ours or bool(record.get("released"))

    def _library(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return True
        ours = record.name.split(".")[0] in ("fmjax", "experiments", "__main__")
        return record.levelno >= logging.ERROR and not ours

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._library(record):
            return True
        if getattr(record, "_fmjax_logged", False):
            return self.verbose  # another handler of the same record: already written
        record._fmjax_logged = True
        self.write(self._formatter.format(record))
        return self.verbose

    def write(self, text: str) -> None:
        """Appends ``text`` to the log (or keeps it until the workdir exists)."""
        self.count += 1
        self.saved = False
        if len(self._pending) < _LIBRARY_LOG_CAP:
            self._pending.append(text)
        self.flush()

    def flush(self) -> None:
        """Writes what waits in memory, if the workdir exists; never raises (a full disk)."""
        if not self._pending or not self.writable():
            return
        with contextlib.suppress(OSError):
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
                stamp = datetime.datetime.now().isoformat(timespec="seconds")
                self._file.write(f"=== {stamp} {' '.join(sys.argv)}\n")
            self._file.write("\n".join(self._pending) + "\n")
            self._file.flush()
            self._pending.clear()
            self.saved = True

    def close(self) -> None:
        """Flushes and closes the file."""
        self.flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _install(errors: ErrorLog) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(errors)
    previous = sys.unraisablehook

    def unraisable(info):  # "Exception ignored in ..." at garbage collection
        if errors.verbose:
            previous(info)
        text = "".join(
            traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback)
        )
        errors.write(f"unraisable exception in {info.object!r}:\n{text}")

    sys.unraisablehook = unraisable


def _end(errors: ErrorLog, line: str, code: int) -> None:
    """Collects what background tasks left (their complaints go to the log), prints ``line``
    last on stderr, and exits with ``code``; stderr goes to the log from then on, so that
    nothing printed at interpreter shutdown follows the line."""
    gc.collect()
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    errors.close()
    if errors.saved:
        line += f" (details: {errors.path})"
    sys.stdout.flush()
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        target = errors.path if errors.writable() else os.devnull
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 2)
    sys.exit(code)


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line (the first line of a multi-line message).

    Example:
        >>> from experiments.common import error_line
        >>> error_line(ValueError("config.seed=-1 is not valid."))
        'error: config.seed=-1 is not valid.'
    """
    message = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename is None:
        message = error.strerror  # fmjax's own: the whole message, without "[Errno 28]"
    return "error: " + message.splitlines()[0]


def user_errors_exit(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """Wraps an absl ``main`` so that every failure ends with one ``error: <message>`` line,
    the last on stderr: exit status 2 for :data:`USER_ERRORS`, 1 for anything else (whose
    traceback is printed above the line: it is a bug). Every traceback also goes to
    ``WORKDIR/error.log`` (``--workdir``, when the program has one), with the libraries'
    error logs, which the terminal shows only with ``--verbose``. Prefer :func:`run`, which
    also turns flag mistakes into such a line.

    Example::

        def main(argv):
            raise ValueError("config.optim.learning_rate=0 is not valid.")

        app.run(user_errors_exit(main))  # stderr ends "error: config.optim...", exit 2
    """

    @functools.wraps(main)
    def wrapped(argv):
        workdir = _flag("workdir")
        errors = ErrorLog(workdir, verbose=bool(_flag("verbose")))
        _install(errors)
        try:
            result = main(argv)
        except KeyboardInterrupt:
            raise
        except Exception as error:
            text = "".join(traceback.format_exception(error))
            errors.write(f"the run failed:\n{text}")
            user = isinstance(error, USER_ERRORS)
            if not user and not errors.verbose:
                print(text, file=sys.stderr, end="")  # a bug: its traceback is the report
            line = error_line(error)
            _end(errors, line, 2 if user else 1)
        errors.close()
        if errors.count > 0 and errors.path:
            logging.warning("%d library error(s) were logged to %s.", errors.count, errors.path)
        return result

    return wrapped


def _flag(name: str):
    return FLAGS[name].value if name in FLAGS else None


def _config_override_keys(argv: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """``(argument, dotted key)`` of each ``--FLAG.key=value`` override in ``argv``."""
    found = []
    for arg in argv:
        match = re.match(rf"--{flag}\.([\w.]+)(=|$)", arg)
        if match:
            found.append((arg, match.group(1)))
    return found


def _unknown_key_message(
    argv: Sequence[str], flag: str, load: Callable[[list[str]], None]
) -> str | None:
    """The message for a ``--config.key`` override naming no key, with the closest valid
    key; None if every override names a key (the error was another). ``load(args)`` loads
    the config flag from ``args`` (the arguments without the overrides)."""
    overrides = _config_override_keys(argv, flag)
    rest = [a for a in argv if a not in {o for o, _ in overrides}]
    try:
        load(rest)
        keys = list(configs.flat_keys(FLAGS[flag].value))
    except Exception:  # the config itself cannot be loaded: the original error says why
        return None
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for arg, key in overrides:
        if key in keys or key in sections:
            continue
        guess = configs.closest_key(key, keys)
        hint = f"; did you mean --{flag}.{guess}?" if guess else ""
        return f"{arg.split('=')[0]}: {key!r} is not a key of the config{hint}"
    return None


def _flag_error_message(error: Exception) -> str:
    """One line for a flag error: a config file's own error is the last line of the
    traceback that ml_collections puts in the message."""
    if "Configuration is not available" in str(error):  # the config file's own error
        while error.__cause__ is not None or error.__context__ is not None:
            error = error.__cause__ or error.__context__
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in text:
        where = lines[0].replace("Error whilst parsing config file", "").rstrip(": ")
        cause = re.sub(r"^\w+(Error|Exception): ", "", lines[-1].strip())
        return f"{where}: {cause}"
    return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str], config_flag: str = "config") -> list[str]:
    """Parses ``argv`` into absl's flags (``--help`` prints the usage and exits 0); a mistake
    ends the program with one ``error: …`` line and exit status 2: an unknown flag, a value
    of the wrong type (``--config.train.batch_size=abc``), a config file that fails to load,
    or an override naming no config key (``--config.train.num_step=5``: the closest valid key
    is named).

    Example::

        app.run(main, flags_parser=parse_flags)  # what run(main) does
    """
    try:
        try:
            rest = FLAGS(argv)
        except SystemExit as exit_:  # absl's --help (--helpfull...) prints the usage, exits 1
            sys.exit(0 if exit_.code == 1 else exit_.code)
        if config_flag in FLAGS:
            configs.flat_keys(FLAGS[config_flag].value)  # a config file that fails to load
        return rest
    except flags.Error as error:
        message = _flag_error_message(error)
    except Exception as error:  # ml_collections raises KeyError / AttributeError for a typo

        def load(args):
            FLAGS.unparse_flags()
            FLAGS(args)

        message = _unknown_key_message(argv, config_flag, load) or _flag_error_message(error)
        if message.startswith("Failed loading config file"):
            given = [a for a in argv if a.startswith(f"--{config_flag}=")]
            message = (
                f"{given[-1] if given else '--' + config_flag}: no such config file ({message})"
            )
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def define_flags_or_exit(define: Callable[[], None], config_flag: str = "config") -> None:
    """Calls ``define()`` (an entry point's flag definitions); a config override in
    ``sys.argv`` that names no key ends the program as :func:`parse_flags` does
    (ml_collections applies the overrides when the config flag is defined)."""
    try:
        define()
    except flags.DuplicateFlagError:
        raise  # the program's own mistake
    except Exception as error:
        argv = list(sys.argv)

        def load(args):
            sys.argv = args
            with contextlib.suppress(flags.DuplicateFlagError):
                define()

        message = _unknown_key_message(argv, config_flag, load) or _flag_error_message(error)
        sys.argv = argv
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def run(
    main: Callable[[list[str]], object],
    define_flags: Callable[[], None] | None = None,
    config_flag: str = "config",
) -> None:
    """Runs an entry point's ``main`` as absl's ``app.run`` does, with ``--verbose`` added,
    flag mistakes turned into one ``error: …`` line (:func:`define_flags_or_exit`,
    :func:`parse_flags`), ``--help`` ending with status 0, and failures ended as
    :func:`user_errors_exit` says.

    Example::

        if __name__ == "__main__":
            common.run(main, define_flags)
    """
    quiet_tpu_probe()
    if define_flags is not None:
        define_flags_or_exit(define_flags, config_flag)
    if "verbose" not in FLAGS:
        flags.DEFINE_bool(
            "verbose",
            False,
            "Print library tracebacks and error logs on the terminal too (they always go to "
            "WORKDIR/error.log).",
        )
    app.run(
        user_errors_exit(main),
        flags_parser=functools.partial(parse_flags, config_flag=config_flag),
    )


def define_distributed_flags() -> None:
    """``--distributed`` and its ``--coordinator_address``, ``--num_processes``,
    ``--process_id`` (read by :func:`setup`)."""
    flags.DEFINE_bool(
        "distributed", False, "Multi-process launch: call jax.distributed.initialize() first."
    )
    flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0.")
    flags.DEFINE_integer("num_processes", None, "--distributed: the number of processes.")
    flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")


def define_sampling_flags(when: str, *, guidance_scale: float, batch_size: int) -> None:
    """The flags of :class:`fmjax.generate.SamplingOptions` (read back by
    :func:`sampling_options`); ``when`` starts their help (e.g. ``"--mode=sample|eval"``)."""
    flags.DEFINE_integer("num_samples", 64, f"{when}: how many samples (--mode=sample).")
    flags.DEFINE_enum(
        "solver",
        "heun",
        list(SAMPLERS),
        f"{when}: an ODE solver; sde: the SDE with the flow's marginals (the --sde_* flags); "
        "meanflow: a mean-flow run's jumps (its default).",
    )
    flags.DEFINE_integer(
        "steps", 50, f"{when}: steps of a fixed-step solver or of sde (jumps of meanflow: 1)."
    )
    flags.DEFINE_enum(
        "time_grid", "edm", ["edm", "uniform"], f"{when}: the grid of a fixed-step ODE solver."
    )
    flags.DEFINE_float("rtol", 1e-5, f"{when}: relative tolerance of an adaptive solver.")
    flags.DEFINE_float("atol", 1e-5, f"{when}: absolute tolerance of an adaptive solver.")
    flags.DEFINE_enum("sde_solver", "euler", list(SDE_SOLVERS), f"{when}: sde's stepper.")
    flags.DEFINE_enum(
        "sde_diffusion", "sigma", list(DIFFUSIONS), f"{when}: sde's diffusion w_t (SiT: sigma)."
    )
    flags.DEFINE_float("sde_diffusion_norm", 1.0, f"{when}: sde's diffusion scale (0: the ODE).")
    flags.DEFINE_enum("sde_last_step", "mean", list(LAST_STEPS), f"{when}: sde's last step.")
    flags.DEFINE_float(
        "sde_last_step_size", None, f"{when}: sde's last step size (SiT: 0.04; default: h)."
    )
    flags.DEFINE_list("labels", None, f"{when}, conditional runs: classes to cycle through.")
    flags.DEFINE_float(
        "guidance_scale", guidance_scale, f"{when}: classifier-free guidance weight w."
    )
    flags.DEFINE_list(
        "guidance_interval",
        None,
        f"{when}: t_min,t_max (noise at t = 0): guide only at these times, e.g. 0.3,1.0 "
        "(REPA's guidance_high=0.7).",
    )
    flags.DEFINE_integer(
        "guidance_channels",
        None,
        f"{when}: guide only the first this many channels (SiT's released sampler: 3).",
    )
    flags.DEFINE_integer("sample_seed", 0, f"{when}: the seed of the noise (sample i: i-th key).")
    flags.DEFINE_integer("sample_batch_size", batch_size, f"{when}: samples per solve.")


def sampling_options() -> SamplingOptions:
    """:class:`fmjax.generate.SamplingOptions` from :func:`define_sampling_flags`' flags; a
    ``--solver=meanflow`` without ``--steps`` jumps once.

    Raises:
        ValueError: for labels that are not integers or an interval that is not two numbers.
    """

    def numbers(name, kind, what):
        values = FLAGS[name].value
        try:
            parsed = None if values is None else tuple(kind(v) for v in values)
        except ValueError:
            parsed = ()
        if parsed is not None and (
            not parsed or (name == "guidance_interval" and len(parsed) != 2)
        ):
            raise ValueError(f"--{name}={','.join(values)} must be {what}.")
        return parsed

    interval = numbers("guidance_interval", float, "two numbers t_min,t_max")
    steps = FLAGS.steps
    if FLAGS.solver == MEAN_FLOW_SAMPLER and not FLAGS["steps"].present:
        steps = 1
    return SamplingOptions(
        num_samples=FLAGS.num_samples,
        solver=FLAGS.solver,
        steps=steps,
        time_grid=FLAGS.time_grid,
        rtol=FLAGS.rtol,
        atol=FLAGS.atol,
        labels=numbers("labels", int, "integers"),
        guidance_scale=FLAGS.guidance_scale,
        guidance_interval=interval,
        guidance_channels=FLAGS.guidance_channels,
        sde_solver=FLAGS.sde_solver,
        sde_diffusion=FLAGS.sde_diffusion,
        sde_diffusion_norm=FLAGS.sde_diffusion_norm,
        sde_last_step=FLAGS.sde_last_step,
        sde_last_step_size=FLAGS.sde_last_step_size,
        seed=FLAGS.sample_seed,
        batch_size=FLAGS.sample_batch_size,
    )
