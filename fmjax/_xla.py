"""The XLA compiler options fmjax compiles its ODE solves and train steps with. Private.

On CPU, XLA (from about JAX 0.8) hands convolutions, matrix products and the element-wise work
around them to YNNPACK as fused library calls. Restricting those fusions to matrix products
alone (``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``:
convolutions and element-wise work go back to XLA's own kernels) makes the programs of small
U-Nets faster: the sampling solves, the exact-divergence likelihood and the train step on
small images. The train step of the CIFAR-10 U-Net is slower with it (its large reductions
leave YNNPACK), so the train step asks for it only on small images (figures:
docs/benchmarks.md). It is a per-program compile option, so it touches no other program of
the process, and it changes results only by float rounding (the order of summation). A user
who sets the same option in ``XLA_FLAGS`` keeps their own choice, and an XLA that does not
know it (JAX 0.7) gets none.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def solve_compiler_options() -> dict[str, Any] | None:
    """:func:`compiler_options` for the default backend's platform."""
    return compiler_options(jax.default_backend())


@functools.cache
def compiler_options(platform: str) -> dict[str, Any] | None:
    """:data:`CPU_OPTIONS` for ``platform="cpu"`` when the user's ``XLA_FLAGS`` do not
    set the option and this XLA accepts it; ``None`` (XLA's defaults) otherwise.

    Decided once per process and platform, at the first program that asks (not at import:
    the backend may not be chosen yet then).
    """
    if platform != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    probe = jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32))
    try:
        probe.compile(compiler_options=CPU_OPTIONS)
    except jax.errors.JaxRuntimeError:  # "No such compile option": an XLA without YNNPACK
        return None
    return dict(CPU_OPTIONS)


def solve_jit(fn: Callable, *, static_argnames: tuple[str, ...]) -> Callable:
    """``jax.jit(fn, static_argnames=...)`` compiled with :func:`solve_compiler_options`.

    The jitted function is built at the first call, once per set of options. JAX accepts
    compile options only on a top-level ``jit``: under a caller's transformation (``jit``,
    ``shard_map``, a loop body, ``grad``, ``vmap``) the solve is compiled without them, as
    part of the caller's program.
    """

    @functools.cache
    def jitted(options: tuple[tuple[str, Any], ...]) -> Callable:
        return jax.jit(fn, static_argnames=static_argnames, compiler_options=dict(options) or None)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        options = None if _traced(args, kwargs) else solve_compiler_options()
        if options:
            try:
                return jitted(tuple(sorted(options.items())))(*args, **kwargs)
            except ValueError as err:
                # A tracer closed over by the velocity (under a caller's grad, say) that the
                # checks above cannot see: JAX stages the solve, which then takes no options.
                if "top-level" not in str(err):
                    raise
        return jitted(())(*args, **kwargs)

    return call


def _traced(*trees: Any) -> bool:
    """Whether a caller's transformation is at work: an argument is a tracer (``grad``,
    ``vmap``, a caller's ``jit``), or JAX is staging a program here all the same (then even a
    constant's sum is a tracer: a ``jit`` whose arguments do not reach the solve)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees)):
        return True
    return isinstance(jnp.zeros((), jnp.int32) + 0, jax.core.Tracer)
