"""experiments.convert with a transformer: a checkpoint in SiT's layout (its names and shapes,
built in tests/test_dit.py) through the command line to an fmjax file and back, with the
preset's class count and SiT's latent input shape as defaults.

Needs ``torch`` (the CPU build) to write and read the ``.pt`` files; skipped without it."""

import argparse
import re

import numpy as np
import pytest
from test_dit import sit_state_dict

from experiments import convert
from fmjax.models import DiTTiny, SiTS2, UNetTiny, load_params, params_from_torch

torch = pytest.importorskip("torch")

SHAPE = (8, 8, 1)


def _tensors(state_dict):
    return {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}


def test_a_sit_checkpoint_converts_through_the_cli_and_back(tmp_path, capsys):
    model = DiTTiny(num_classes=10)
    raw, ema = sit_state_dict(model, SHAPE, seed=0), sit_state_dict(model, SHAPE, seed=1)
    # SiT's train.py checkpoint: {"model", "ema", "opt", "args"}.
    ckpt = tmp_path / "0400000.pt"
    args = argparse.Namespace(model="SiT-XL/2", image_size=256)
    torch.save({"model": _tensors(raw), "ema": _tensors(ema), "opt": {}, "args": args}, ckpt)
    flags = ["--preset=dit_tiny", "--num_classes=10", "--input_shape=8,8,1"]  # --source: sit

    out = tmp_path / "sit.npz"
    convert.main([f"--in={ckpt}", f"--out={out}", *flags])
    assert f"wrote {out}" in capsys.readouterr().out
    loaded = load_params(out, model, preset="dit_tiny")
    expected = params_from_torch(ema, model, SHAPE)
    np.testing.assert_array_equal(
        loaded["block1"]["qkv"]["kernel"], expected["block1"]["qkv"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["patch_embed"]["kernel"], ema["x_embedder.proj.weight"].transpose(2, 3, 1, 0)
    )
    raw_out = tmp_path / "raw.npz"
    convert.main([f"--in={ckpt}", f"--out={raw_out}", "--weights=raw", *flags])
    np.testing.assert_array_equal(
        load_params(raw_out, model)["final_linear"]["bias"], raw["final_layer.linear.bias"]
    )

    # ... and back to SiT's state dict: every entry as given.
    exported = tmp_path / "sd.pt"
    convert.main([f"--in={out}", f"--out={exported}", "--to_torch", *flags])
    back = torch.load(exported, weights_only=True)
    assert set(back) == set(ema)
    for name, value in ema.items():
        np.testing.assert_array_equal(back[name].numpy(), value, err_msg=name)
    # Without --input_shape: the channels from the file, SiT's 32x32 latent grid (256 tokens).
    convert.main([f"--in={out}", f"--out={exported}", "--to_torch", *flags[:2]])
    back = torch.load(exported, weights_only=True)
    assert back["pos_embed"].shape == (1, 256, 32)
    np.testing.assert_array_equal(back["x_embedder.proj.weight"], ema["x_embedder.proj.weight"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--input_shape=9,8,1"], "cannot be cut into 2x2 patches"),
        (["--input_shape=16,16,1"], "pos_embed"),
        (["--input_shape=8,8"], r"--input_shape=\(8, 8\) is not valid"),
        (["--num_classes=-1"], r"--num_classes=-1 is not valid"),
        (["--num_classes=0"], "unexpected"),  # an unconditional network has no label table
    ],
)
def test_bad_shapes_and_class_counts_exit_with_one_error_line(tmp_path, capsys, flags, message):
    ckpt = tmp_path / "sit.pt"
    torch.save(_tensors(sit_state_dict(DiTTiny(num_classes=10), SHAPE)), ckpt)  # a bare dict
    base = [f"--in={ckpt}", f"--out={tmp_path / 'x.npz'}", "--preset=dit_tiny"]
    with pytest.raises(SystemExit) as exit_info:
        convert.main([*base, "--num_classes=10", "--input_shape=8,8,1", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "x.npz").exists()


def test_defaults_follow_the_preset():
    sit = convert._model("sit_s_2", None)
    assert isinstance(sit, type(SiTS2())) and sit.num_classes == 1000  # the preset's own
    assert convert._input_shape(sit, None) == (32, 32, 4)  # 256x256 images as latents
    assert convert._source(sit, None) == "sit"
    unet = convert._model("unet_tiny", None)
    assert unet == UNetTiny() and convert._input_shape(unet, None) == (32, 32, 3)
    assert convert._source(unet, None) == "torchcfm"
    assert convert._model("sit_s_2", 0).num_classes is None
