"""Sample grids: float images in [-1, 1] to a uint8 mosaic and a PNG file."""

import math
import os

import numpy as np
from jaxtyping import Float, UInt8

__all__ = ["make_grid", "save_grid", "to_uint8"]


def to_uint8(images: Float[np.ndarray, " *shape"]) -> UInt8[np.ndarray, " *shape"]:
    """Maps [-1, 1] to {0, ..., 255} (clipping outside), rounding to nearest.

    Example:
        >>> import numpy as np
        >>> from fmjax.images import to_uint8
        >>> to_uint8(np.array([-1.0, 0.0, 1.0, 2.0]))
        array([  0, 128, 255, 255], dtype=uint8)
    """
    scaled = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def make_grid(
    images: Float[np.ndarray, " n h w c"], ncols: int | None = None, padding: int = 1
) -> UInt8[np.ndarray, " H W c"]:
    """Tiles ``n`` images ``[n, h, w, c]`` in [-1, 1] into one uint8 image, row by row.

    ``ncols`` defaults to ``ceil(sqrt(n))``; cells are separated by ``padding`` black pixels.

    Example:
        >>> import numpy as np
        >>> from fmjax.images import make_grid
        >>> make_grid(np.zeros((5, 8, 8, 1)), ncols=3).shape
        (19, 28, 1)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [n, h, w, 1 or 3]; got shape {images.shape}.")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), np.uint8)
    pixels = to_uint8(images)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_grid(
    images: Float[np.ndarray, " n h w c"],
    path: str | os.PathLike,
    ncols: int | None = None,
    scale: int = 1,
) -> None:
    """Writes :func:`make_grid` of ``images`` as a PNG, each pixel enlarged ``scale`` times.

    The file is written to a temporary name and renamed, so a crash never leaves half a PNG.
    """
    from PIL import Image

    grid = make_grid(images, ncols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    tmp = f"{os.fspath(path)}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
