"""Strict JAX settings shared by every test and every doctest (hence at the repository root).

- Several CPU devices, so sharding tests run on any machine (set before JAX starts).
- Rank promotion raises: silent broadcasting of a `[batch]` array against `[batch, d]` is a
  classic source of wrong-but-running code.
- A persistent compilation cache, so a second run of the suite skips most XLA compiles.
- `x64` fixture for tests that check numerics to tight tolerances.
- `FMJAX_CORE_ONLY=1` collects only the core modules and their tests: CI's second leg runs
  them on the oldest supported versions, where flax and the rest are not installed.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("FMJAX_JAX_CACHE", os.path.join(os.path.dirname(__file__), ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats (the config flag exists on every supported JAX)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


ROOT = pathlib.Path(__file__).resolve().parent
CORE_MODULES = {
    "__init__",
    "_checks",
    "_integrate",
    "paths",
    "couplings",
    "timesteps",
    "loss",
    "sampling",
    "sde",
    "likelihood",
    "keys",
    "mesh",
    "meanflow",
}
CORE_TESTS = {f"test_{name}" for name in CORE_MODULES} | {"test_readme", "test_migration"}


def pytest_ignore_collect(collection_path: pathlib.Path, config):
    """Under FMJAX_CORE_ONLY=1, skips every file and package outside the core and its tests."""
    if os.environ.get("FMJAX_CORE_ONLY") != "1":
        return None
    parts = collection_path.resolve().relative_to(ROOT).parts
    if parts[0] == "fmjax" and len(parts) > 1:
        return collection_path.is_dir() or collection_path.stem not in CORE_MODULES
    if parts[0] == "tests" and len(parts) > 1:
        return collection_path.stem not in CORE_TESTS
    return None
