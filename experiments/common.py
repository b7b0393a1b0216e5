"""What every entry point shares."""

import logging
import os

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
