"""The Stable Diffusion VAE (fmjax.models.AutoencoderKL): shapes, the posterior's clamp, the
SD VAE's parameter count, diffusers' layout (params_from_torch / params_to_torch) and the
safetensors loader. The comparison against diffusers' own network is in
test_peers_vae_torch.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fmjax.models import (
    SD_VAE_SCALING_FACTOR,
    SDVAE,
    VAE_PRESETS,
    AutoencoderKL,
    VAETiny,
    load_vae_safetensors,
    params_from_torch,
    params_to_torch,
)

SIDE = 16


@pytest.fixture(scope="module")
def tiny():
    model = VAETiny()
    params = model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)))["params"]
    return model, params


def _images(batch=2, side=SIDE, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)


def test_encode_decode_shapes(tiny):
    model, params = tiny
    mean, logvar = model.apply({"params": params}, _images(), method="encode")
    assert mean.shape == logvar.shape == (2, SIDE // 2, SIDE // 2, 4)
    assert mean.dtype == logvar.dtype == jnp.float32
    images = model.apply({"params": params}, mean, method="decode")
    assert images.shape == (2, SIDE, SIDE, 3) and images.dtype == jnp.float32
    np.testing.assert_allclose(model.apply({"params": params}, _images()), images, atol=1e-6)


def test_logvar_is_clamped(tiny):
    """diffusers clamps the log-variance to [-30, 20]; a huge quant_conv bias hits both ends."""
    model, params = tiny
    bias = np.zeros(8, np.float32)
    bias[4:6], bias[6:] = 1e4, -1e4  # the log-variance half of the moments
    clamped = jax.tree.map(lambda x: x, params)
    clamped["quant_conv"]["bias"] = jnp.asarray(bias)
    _, logvar = model.apply({"params": clamped}, _images(), method="encode")
    np.testing.assert_array_equal(logvar[..., :2], 20.0)
    np.testing.assert_array_equal(logvar[..., 2:], -30.0)


def test_bfloat16_computes_with_float32_parameters(tiny):
    model, params = tiny
    fast = model.clone(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(fast.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    images = _images(batch=1, side=8)
    mean32, _ = model.apply({"params": params}, images, method="encode")
    mean16, _ = fast.apply({"params": params}, images, method="encode")
    assert mean16.dtype == jnp.float32
    error = float(jnp.abs(mean16 - mean32).max() / jnp.abs(mean32).max())
    assert 0 < error < 0.1


def test_sd_vae_preset():
    """diffusers' AutoencoderKL with sd-vae-ft-mse's configuration has 83,653,863 parameters
    (counted in test_peers_vae_torch.py)."""
    vae = SDVAE()
    assert VAE_PRESETS["sd_vae"] is SDVAE
    assert vae.scaling_factor == SD_VAE_SCALING_FACTOR == 0.18215
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512) and vae.downsampling == 8
    images = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(vae.init, jax.random.key(0), images)
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == 83_653_863
    latents = jax.eval_shape(
        lambda p, x: vae.apply(p, x, method="encode"),
        shapes,
        jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
    )
    assert latents[0].shape == (2, 32, 32, 4)


def test_bad_inputs_are_refused(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"height and width 2 divides; got shape \(1, 15, 16, 3\)"):
        model.apply({"params": params}, np.zeros((1, 15, 16, 3)), method="encode")
    with pytest.raises(ValueError, match=r"latents \[batch, h, w, 4\]; got shape \(1, 8, 8, 3\)"):
        model.apply({"params": params}, np.zeros((1, 8, 8, 3)), method="decode")
    with pytest.raises(ValueError, match="norm_num_groups dividing every width"):
        AutoencoderKL(block_out_channels=(12, 32), norm_num_groups=8).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )


def test_torch_round_trip(tiny):
    model, params = tiny
    sd = params_to_torch(params, model, peer="diffusers")
    assert sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (32, 16, 1, 1)
    assert sd["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (32, 32, 3, 3)
    assert sd["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (32, 32)
    np.testing.assert_array_equal(
        sd["encoder.conv_in.weight"],
        np.transpose(params["encoder"]["conv_in"]["kernel"], (3, 2, 0, 1)),
    )
    back = params_from_torch(sd, model)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for ours, theirs in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_deprecated_attention_names(tiny):
    model, params = tiny
    sd = params_to_torch(params, model)
    old = {
        k.replace("attentions.0.to_q.", "attentions.0.query.").replace(
            "attentions.0.to_out.0.", "attentions.0.proj_attn."
        ): v
        for k, v in sd.items()
    }
    back = params_from_torch(old, model)
    np.testing.assert_array_equal(
        back["decoder"]["mid_attn"]["to_out"]["kernel"],
        params["decoder"]["mid_attn"]["to_out"]["kernel"],
    )
    both = {
        **sd,
        "encoder.mid_block.attentions.0.key.weight": sd[
            "encoder.mid_block.attentions.0.to_k.weight"
        ],
    }
    with pytest.raises(ValueError, match=r"1 unexpected(.|\n)*attentions.0.key.weight"):
        params_from_torch(both, model)


def test_one_error_names_every_problem(tiny):
    model, params = tiny
    sd = params_to_torch(params, model)
    del sd["decoder.conv_out.bias"]
    sd["encoder.conv_in.weight"] = np.zeros((16, 3, 1, 1), np.float32)
    sd["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as error:
        params_from_torch(sd, model)
    message = str(error.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "decoder.conv_out.bias (3,)" in message
    assert "extra.weight" in message
    assert "encoder.conv_in.weight: got (16, 3, 1, 1), expected (16, 3, 3, 3)" in message
    with pytest.raises(
        ValueError, match=r"peer='sit' is not valid; expected one of \['diffusers'\]"
    ):
        params_from_torch(sd, model, peer="sit")
    broken = jax.tree.map(lambda x: x, params)
    del broken["quant_conv"]
    with pytest.raises(
        ValueError, match=r"missing \['quant_conv/kernel \(1, 1, 8, 8\)', 'quant_conv/bias"
    ):
        params_to_torch(broken, model)


def test_safetensors_loader(tiny, tmp_path):
    model, params = tiny
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.numpy.save_file(params_to_torch(params, model), path)
    loaded = load_vae_safetensors(path, model)
    for ours, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # A file of another configuration: every difference named in one error.
    with pytest.raises(ValueError, match=r"0 missing, 4 unexpected, \d+ mis-shaped"):
        load_vae_safetensors(
            path, AutoencoderKL(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)
        )
    with pytest.raises(ValueError, match="No safetensors file at"):
        load_vae_safetensors(tmp_path / "absent.safetensors", model)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read as a safetensors file"):
        load_vae_safetensors(corrupt, model)


def test_the_latent_sampling_recipe_of_the_docs_runs_with_small_presets(tiny, tmp_path):
    """docs/latents.md's SiT-XL/2 + VAE recipe, with DiTTiny and VAETiny: a SiT-layout state
    dict and a diffusers safetensors file in, guided latents sampled, images decoded."""
    from fmjax.models import DiTTiny
    from fmjax.sampling import classifier_free_guidance, sample

    vae, vae_init = tiny
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.numpy.save_file(params_to_torch(vae_init, vae), str(file))
    latent_shape = (SIDE // 2, SIDE // 2, 4)  # VAETiny downsamples by 2
    sit = DiTTiny(num_classes=10)
    sit_init = sit.init(
        jax.random.key(1), jnp.zeros((1, *latent_shape)), jnp.zeros(1), y=jnp.zeros(1, jnp.int32)
    )["params"]
    sit_params = params_from_torch(params_to_torch(sit_init, sit, latent_shape), sit, latent_shape)
    vae_params = load_vae_safetensors(file, vae)

    def apply_fn(params, x, t, y):
        return sit.apply({"params": params}, x, t, y=y)

    labels = jnp.array([1, 7])
    field = classifier_free_guidance(
        apply_fn, sit_params, labels, null_label=10, scale=1.8, interval=(0.3, 1.0)
    )
    x0 = jax.random.normal(jax.random.key(2), (2, *latent_shape))
    result = sample(field, x0, solver="euler", steps=4)
    images = vae.apply({"params": vae_params}, result.x / SD_VAE_SCALING_FACTOR, method="decode")
    assert images.shape == (2, SIDE, SIDE, 3) and bool(jnp.all(jnp.isfinite(images)))
    # The loaded networks are the ones written: the same latents decode the same way.
    direct = vae.apply({"params": vae_init}, result.x / SD_VAE_SCALING_FACTOR, method="decode")
    np.testing.assert_array_equal(images, direct)
    jax.tree.map(np.testing.assert_array_equal, sit_params, sit_init)
