"""fmjax's AutoencoderKL against diffusers' ``AutoencoderKL`` (issue 39).

diffusers' network is built for small configurations with random weights, perturbed so that
the GroupNorm scales and every bias are not at their initial ones and ones; its state dict
is loaded with :func:`fmjax.models.params_from_torch`, and both networks encode the same
images (posterior mean and log-variance) and decode the same latents: relative error (the
largest difference over the largest value) at most 2e-4 in float32. Exports load into
diffusers' network strictly, diffusers' own ``save_pretrained`` safetensors file loads with
:func:`fmjax.models.load_vae_safetensors`, and the SD VAE's configuration has the parameter
count of ``stabilityai/sd-vae-ft-mse`` (83,653,863) in both libraries.

Needs ``torch`` (the CPU build) and ``diffusers``; skipped without them. CI runs it in the
torch leg (.ci/run).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _torch_helpers import perturb, relative_error  # noqa: E402

from fmjax.models import (  # noqa: E402
    SDVAE,
    AutoencoderKL,
    load_vae_safetensors,
    params_from_torch,
    params_to_torch,
)
from fmjax.models.vae_params import vae_layers  # noqa: E402

TOLERANCE = 2e-4

# name: (block_out_channels, layers_per_block, norm_num_groups, image side)
CONFIGS = {
    "two_levels": ((16, 32), 1, 8, 16),
    "three_levels": ((16, 32, 32), 2, 8, 16),
}


def diffusers_vae(widths, layers, groups):
    torch.manual_seed(0)
    net = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
    ).eval()
    return perturb(net)


def _setup(name):
    widths, layers, groups, side = CONFIGS[name]
    net = diffusers_vae(widths, layers, groups)
    model = AutoencoderKL(
        block_out_channels=widths, layers_per_block=layers, norm_num_groups=groups
    )
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    return net, model, params_from_torch(sd, model, (side, side, 3)), side


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_matches_diffusers(name):
    net, model, params, side = _setup(name)
    images = np.random.default_rng(0).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = net.encode(_nchw(images)).latent_dist
    mean, logvar = model.apply({"params": params}, jnp.asarray(images), method="encode")
    for ours, theirs in ((mean, posterior.mean), (logvar, posterior.logvar)):
        ours = np.asarray(ours).transpose(0, 3, 1, 2)
        assert ours.shape == tuple(theirs.shape)
        assert relative_error(ours, theirs.numpy()) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_matches_diffusers(name):
    net, model, params, side = _setup(name)
    f = model.downsampling
    latents = np.random.default_rng(1).standard_normal((2, side // f, side // f, 4))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        theirs = net.decode(_nchw(latents)).sample.numpy()
    ours = model.apply({"params": params}, jnp.asarray(latents), method="decode")
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert ours.shape == theirs.shape == (2, 3, side, side)
    assert relative_error(ours, theirs) <= TOLERANCE


def test_wrong_weights_are_detected():
    """The parity check can fail: one perturbed kernel moves the decoding far past it."""
    net, model, params, side = _setup("two_levels")
    latents = np.random.default_rng(1).standard_normal((2, side // 2, side // 2, 4))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        theirs = net.decode(_nchw(latents)).sample.numpy()
    kernel = params["decoder"]["up0_res0"]["conv1"]["kernel"]
    params["decoder"]["up0_res0"]["conv1"]["kernel"] = kernel + 0.05
    ours = model.apply({"params": params}, jnp.asarray(latents), method="decode")
    assert relative_error(np.asarray(ours).transpose(0, 3, 1, 2), theirs) > 1e-2


def test_export_loads_into_diffusers_strictly():
    net, model, params, _ = _setup("three_levels")
    sd = params_to_torch(params, model)
    fresh = diffusers_vae((16, 32, 32), 2, 8)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())


def test_deprecated_attention_names_are_diffusers_own():
    """diffusers renames ``query, key, value, proj_attn`` on load as fmjax does."""
    net, model, params, _ = _setup("two_levels")
    sd = params_to_torch(params, model)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in sd.items():
        for new, deprecated in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{deprecated}.")
        old[key] = value
    assert any(".attentions.0.query.weight" in key for key in old)
    fixed = net._fix_state_dict_keys_on_load(dict(old))
    assert sorted(fixed) == sorted(sd)
    back = params_from_torch(old, model)
    for (path, ours), theirs in zip(
        jax.tree_util.tree_flatten_with_path(back)[0], jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs, err_msg=str(path))


def test_diffusers_safetensors_file_loads(tmp_path):
    net, model, params, _ = _setup("two_levels")
    net.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_vae_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", model)
    for ours, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_sd_vae_parameter_count():
    """diffusers' AutoencoderKL with sd-vae-ft-mse's config.json has 83,653,863 parameters;
    fmjax's SDVAE the same (and the same names and shapes: the mapping checks them all)."""
    with torch.device("meta"):
        net = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=256,
        )
    assert sum(p.numel() for p in net.parameters()) == 83_653_863
    images = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(SDVAE().init, jax.random.key(0), images)
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == 83_653_863
    names = {
        f"{prefix}.{leaf}" for _, prefix, _ in vae_layers(SDVAE()) for leaf in ("weight", "bias")
    }
    assert names == set(net.state_dict())
