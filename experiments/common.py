"""What every entry point shares."""

import functools
import logging
import os
import sys
from collections.abc import Callable

import jax


def setup() -> None:
    """Logging and a persistent compilation cache for an entry point.

    fmjax's progress lines show at INFO; the libraries' own chatter (Orbax's per-save lines,
    absl) only from WARNING up. Compiled programs are cached under ``$FMJAX_JAX_CACHE``
    (default ``~/.cache/fmjax/jax``), so running or resuming the same job again starts in
    seconds instead of recompiling.
    """
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("fmjax").setLevel(logging.INFO)
    cache = os.environ.get("FMJAX_JAX_CACHE", os.path.expanduser("~/.cache/fmjax/jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def user_errors_exit(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """Wraps an absl ``main`` so that bad input ends the program with ``error: <message>``
    on stderr and exit status 2, not a traceback.

    Bad input is a ``ValueError`` (fmjax's checks name the value and what is expected) or an
    ``OSError`` (a missing file, a full disk): the message says all the user needs. Any other
    exception is a bug and keeps its traceback. Use it as ``app.run(user_errors_exit(main))``.

    Example:
        >>> from experiments.common import user_errors_exit
        >>> def main(argv):
        ...     raise ValueError("config.optim.learning_rate=0 is not valid.")
        >>> user_errors_exit(main)(["prog"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapped
