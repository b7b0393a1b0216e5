r"""SiT's and DiT's PyTorch checkpoints and :class:`fmjax.models.DiT`, name for name.

:func:`fmjax.models.params_from_torch` and :func:`fmjax.models.params_to_torch` map a
:class:`~fmjax.models.DiT` through this layout (``peer="sit"``; DiT's ``models.py`` uses the
same names, so its checkpoints map the same way):

| SiT / DiT | fmjax |
| --- | --- |
| ``x_embedder.proj`` (convolution ``[D, C, p, p]``) | ``patch_embed`` (``[p, p, C, D]``) |
| ``t_embedder.mlp.0``, ``t_embedder.mlp.2`` | ``time_mlp_0``, ``time_mlp_1`` |
| ``y_embedder.embedding_table`` | ``label_embedding`` |
| ``blocks.{i}.adaLN_modulation.1`` | ``block{i}/adaLN_modulation`` |
| ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj`` | ``block{i}/qkv``, ``block{i}/proj`` |
| ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2`` | ``block{i}/fc1``, ``block{i}/fc2`` |
| ``final_layer.adaLN_modulation.1`` | ``final_adaLN_modulation`` |
| ``final_layer.linear`` | ``final_linear`` |

Linear weights ``[out, in]`` become kernels ``[in, out]``; the ``qkv`` outputs are in the same
order on both sides (``[q | k | v]``, each split into heads). Besides:

- ``pos_embed``, a fixed buffer, is not loaded: it is checked against
  :func:`fmjax.models.sincos_position_embedding` of the token grid of ``input_shape`` (a
  checkpoint of another image size is refused), and written on export;
- checkpoints trained with ``learn_sigma=True`` (the released 256x256 ones) have twice the
  output channels, the variance after the prediction: the first half is kept, as SiT's
  forward keeps it;
- a label table of ``num_classes`` rows (trained with ``class_dropout_prob=0``, no null label)
  gets a zero null row.
"""

from collections.abc import Iterator, Mapping

import numpy as np
from jaxtyping import ArrayLike

from fmjax.models.dit import DiT, sincos_position_embedding

__all__ = ["DIT_ARCHITECTURE", "dit_layers", "dit_state_dict", "position_embedding"]

DIT_ARCHITECTURE = (
    "patch_size",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "out_channels",
    "time_scale",
)
"""The fields of a :class:`~fmjax.models.DiT` that decide its function and parameters."""


def dit_layers(model: DiT) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """``(Flax path, PyTorch prefix, kind)`` of every layer of ``model``, kinds as
    :mod:`fmjax.models.torch_params` converts them (``conv``, ``dense``, ``embed``).

    Raises:
        ValueError: for a mean-flow DiT, whose second time MLP SiT does not have.

    Example:
        >>> from fmjax.models import DiTTiny
        >>> from fmjax.models.dit_params import dit_layers
        >>> list(dit_layers(DiTTiny()))[-1]
        (('final_linear',), 'final_layer.linear', 'dense')
    """
    if model.mean_flow:
        raise ValueError(
            "A mean-flow DiT (mean_flow=True) has a second time MLP (interval_mlp_*) that SiT's "
            "and DiT's checkpoints do not have; map a plain DiT (mean_flow=False)."
        )
    yield ("patch_embed",), "x_embedder.proj", "conv"
    yield ("time_mlp_0",), "t_embedder.mlp.0", "dense"
    yield ("time_mlp_1",), "t_embedder.mlp.2", "dense"
    if model.num_classes is not None:
        yield ("label_embedding",), "y_embedder.embedding_table", "embed"
    for i in range(model.depth):
        block = f"block{i}"
        yield (block, "adaLN_modulation"), f"blocks.{i}.adaLN_modulation.1", "dense"
        yield (block, "qkv"), f"blocks.{i}.attn.qkv", "dense"
        yield (block, "proj"), f"blocks.{i}.attn.proj", "dense"
        yield (block, "fc1"), f"blocks.{i}.mlp.fc1", "dense"
        yield (block, "fc2"), f"blocks.{i}.mlp.fc2", "dense"
    yield ("final_adaLN_modulation",), "final_layer.adaLN_modulation.1", "dense"
    yield ("final_linear",), "final_layer.linear", "dense"


def position_embedding(model: DiT, input_shape: tuple[int, int, int]) -> np.ndarray:
    """SiT's ``pos_embed`` buffer, ``[1, tokens, hidden_size]``, for images of
    ``input_shape`` ``(height, width, channels)``.

    Example:
        >>> from fmjax.models import DiTTiny
        >>> from fmjax.models.dit_params import position_embedding
        >>> position_embedding(DiTTiny(), (8, 8, 1)).shape  # 4x4 tokens of width 32
        (1, 16, 32)
    """
    p = model.patch_size
    grid = sincos_position_embedding(model.hidden_size, input_shape[0] // p, input_shape[1] // p)
    return grid[None]


def dit_state_dict(
    state_dict: Mapping[str, ArrayLike], model: DiT, input_shape: tuple[int, int, int]
) -> dict[str, ArrayLike]:
    """``state_dict`` (prefixes stripped) as the layout of :func:`dit_layers` expects it:
    ``pos_embed`` checked and removed, a ``learn_sigma`` output layer's variance half dropped,
    a missing null-label row added (see the module docstring).

    Raises:
        ValueError: for a ``pos_embed`` of another token grid or other values.

    Example:
        >>> import numpy as np
        >>> from fmjax.models import DiTTiny
        >>> from fmjax.models.dit_params import dit_state_dict
        >>> sd = {"final_layer.linear.weight": np.ones((8, 32)),  # learn_sigma: 2 x 2x2x1
        ...       "final_layer.linear.bias": np.ones(8)}
        >>> dit_state_dict(sd, DiTTiny(), (8, 8, 1))["final_layer.linear.weight"].shape
        (4, 32)
    """
    out = dict(state_dict)
    p, d = model.patch_size, model.hidden_size
    if "pos_embed" in out:
        value = np.asarray(out.pop("pos_embed"), np.float32)
        expected = position_embedding(model, input_shape)
        if value.shape != expected.shape:
            raise ValueError(
                f"The checkpoint's pos_embed has shape {value.shape}, but images of "
                f"input_shape={tuple(input_shape)} make {expected.shape[1]} tokens of "
                f"{p}x{p} patches, i.e. {expected.shape}: pass the image (latent) shape the "
                "checkpoint was trained on, e.g. (32, 32, 4) for 256x256 ImageNet latents."
            )
        error = float(np.abs(value - expected).max()) if value.size else 0.0
        if error > 1e-4:
            raise ValueError(
                f"The checkpoint's pos_embed differs from the 2-D sine-cosine embedding of a "
                f"{input_shape[0] // p}x{input_shape[1] // p} grid by up to {error:.3g}: not "
                "SiT's or DiT's fixed positional embedding."
            )
    channels = input_shape[2] if model.out_channels is None else model.out_channels
    weight, bias = out.get("final_layer.linear.weight"), out.get("final_layer.linear.bias")
    if (
        weight is not None
        and bias is not None
        and np.shape(weight) == (2 * p * p * channels, d)
        and np.shape(bias) == (2 * p * p * channels,)
    ):
        # Outputs are (row, column, channel) within the patch, channels fastest: keep the
        # first `channels` of each position's 2 * channels.
        out["final_layer.linear.weight"] = (
            np.asarray(weight).reshape(p * p, 2 * channels, d)[:, :channels].reshape(-1, d)
        )
        out["final_layer.linear.bias"] = (
            np.asarray(bias).reshape(p * p, 2 * channels)[:, :channels].reshape(-1)
        )
    table = out.get("y_embedder.embedding_table.weight")
    if (
        table is not None
        and model.num_classes is not None
        and np.shape(table) == (model.num_classes, d)
    ):
        table = np.asarray(table, np.float32)
        out["y_embedder.embedding_table.weight"] = np.concatenate([table, np.zeros_like(table[:1])])
    return out
