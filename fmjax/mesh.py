"""The device mesh: one ``("data",)`` axis over every device of every host.

Everything data-parallel in fmjax (the train step, sharded sampling, FID's Inception
features) lays its batch out on this mesh, so it lives in the core, below every layer that
needs it.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = ["make_mesh"]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over ``devices`` (default: every device of every host).

    Devices are ordered by process, then id, so each host's devices hold a contiguous slice of
    the batch (the layout :func:`jax.make_array_from_process_local_data` expects).

    Example:
        >>> import jax
        >>> from fmjax.mesh import make_mesh
        >>> mesh = make_mesh(jax.devices()[:2])
        >>> mesh.axis_names, mesh.size
        (('data',), 2)
    """
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))
