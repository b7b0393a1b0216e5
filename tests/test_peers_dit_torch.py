"""fmjax's DiT against diffusers' ``DiTTransformer2DModel`` (issue 38).

diffusers implements DiT's network under other names: every block carries its own copy of
the time and label embedders (the output layer uses block 0's), the ``qkv`` projection is
split into ``to_q``, ``to_k``, ``to_v``, the MLP is ``ff.net.{0.proj,2}`` and the output layer
``proj_out_{1,2}`` (the correspondence of diffusers' ``scripts/convert_dit_to_diffusers.py``).
The network is built with random weights, perturbed so that the zero-initialised adaLN and
output layers are not zero, with every block's embedders equal (as a converted checkpoint has
them); its state dict is renamed to SiT's layout and loaded with
:func:`fmjax.models.params_from_torch`, and both networks are evaluated on the same inputs
with labels including the null class: relative error at most 1e-4 in float32.

Two differences of diffusers' port from DiT's own code are set to DiT's in the test, so that
the network compared is the one of DiT's and SiT's checkpoints: its time embedding's
frequencies are ``10000**(-k / (half - 1))`` (``downscale_freq_shift=1``) where DiT's are
``10000**(-k / half)``, and its MLP's LayerNorm has ``norm_eps`` (default 1e-5) where DiT's
has 1e-6. diffusers' timesteps are DDPM's, ``[0, 1000)``: the fmjax model has
``time_scale=1000`` and ``t = timestep / 1000``.

Needs ``torch`` (the CPU build) and ``diffusers``; skipped without them. CI runs it in the
torch leg (.ci/run).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _torch_helpers import perturb, relative_error  # noqa: E402

from fmjax.models import (  # noqa: E402
    DiT,
    load_torch_checkpoint,
    params_from_torch,
    params_to_torch,
)

TOLERANCE = 1e-4


def diffusers_net(config):
    torch.manual_seed(0)  # diffusers' initial weights, before the perturbation below
    net = diffusers.DiTTransformer2DModel(
        num_attention_heads=config["num_heads"],
        attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=config["channels"],
        num_layers=config["depth"],
        sample_size=config["size"],
        patch_size=config["patch_size"],
        num_embeds_ada_norm=config["num_classes"],
        norm_eps=1e-6,
    ).eval()
    perturb(net)
    first = net.transformer_blocks[0].norm1.emb.state_dict()
    for block in net.transformer_blocks:
        block.norm1.emb.load_state_dict(first)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return net


def to_sit_names(state_dict, depth):
    """diffusers' DiT state dict under SiT's (and DiT's) names."""
    sd = {k: v.numpy() for k, v in state_dict.items()}
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
    }
    for ours, theirs in (("mlp.0", "linear_1"), ("mlp.2", "linear_2")):
        for leaf in ("weight", "bias"):
            out[f"t_embedder.{ours}.{leaf}"] = sd[f"{emb}timestep_embedder.{theirs}.{leaf}"]
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.adaLN_modulation.1.{leaf}"] = sd[f"{block}norm1.linear.{leaf}"]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
                [sd[f"{block}attn1.to_{x}.{leaf}"] for x in "qkv"]
            )
            out[f"blocks.{i}.attn.proj.{leaf}"] = sd[f"{block}attn1.to_out.0.{leaf}"]
            out[f"blocks.{i}.mlp.fc1.{leaf}"] = sd[f"{block}ff.net.0.proj.{leaf}"]
            out[f"blocks.{i}.mlp.fc2.{leaf}"] = sd[f"{block}ff.net.2.{leaf}"]
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = sd[f"proj_out_1.{leaf}"]
        out[f"final_layer.linear.{leaf}"] = sd[f"proj_out_2.{leaf}"]
    return out


CONFIGS = {
    "small": dict(
        patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, channels=3, size=8
    ),
    "patch4": dict(
        patch_size=4, hidden_size=48, depth=3, num_heads=3, num_classes=7, channels=4, size=16
    ),
}


def _model(config):
    return DiT(
        patch_size=config["patch_size"],
        hidden_size=config["hidden_size"],
        depth=config["depth"],
        num_heads=config["num_heads"],
        num_classes=config["num_classes"],
        time_scale=1000.0,
    )


def diffusers_out(net, x, t, y):
    """diffusers' output for NHWC images ``x`` at times ``t`` in [0, 1], as NCHW."""
    with torch.no_grad():
        return net(
            torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
            timestep=torch.from_numpy(1000.0 * np.asarray(t)),
            class_labels=torch.from_numpy(np.array(y)),
        ).sample.numpy()


def fmjax_out(model, params, x, t, y):
    """fmjax's output for the same inputs, as NCHW."""
    return np.asarray(model.apply({"params": params}, jnp.asarray(x), t, y)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dit_matches_diffusers(name):
    config = CONFIGS[name]
    net = diffusers_net(config)
    model = _model(config)
    shape = (config["size"], config["size"], config["channels"])
    params = params_from_torch(to_sit_names(net.state_dict(), config["depth"]), model, shape)

    rng = np.random.default_rng(0)
    batch = 4
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    t = np.array([0.0, 0.3, 0.77, 1.0], np.float32)
    y = np.array([0, 3, config["num_classes"] - 1, config["num_classes"]])  # the last: null
    theirs = diffusers_out(net, x, t, y)
    assert np.abs(theirs).max() > 0.1  # the perturbed zero layers make the output non-trivial
    assert relative_error(fmjax_out(model, params, x, t, y), theirs) <= TOLERANCE


def test_dit_to_diffusers():
    """The other direction: random fmjax parameters (perturbed) exported to SiT's layout and
    renamed to diffusers', loaded into diffusers' network: the same outputs."""
    config = CONFIGS["small"]
    net = diffusers_net(config)
    model = _model(config)
    shape = (config["size"], config["size"], config["channels"])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *shape)), jnp.float32)
    t, y = jnp.array([0.2, 0.6]), jnp.array([1, config["num_classes"]])
    params = model.init(jax.random.key(0), x, t, y)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    sit = params_to_torch(params, model, shape)
    renamed = {}  # the inverse of to_sit_names
    emb = "norm1.emb."
    for i in range(config["depth"]):
        block = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = np.split(sit[f"blocks.{i}.attn.qkv.{leaf}"], 3)
            renamed.update(
                {
                    f"{block}attn1.to_q.{leaf}": q,
                    f"{block}attn1.to_k.{leaf}": k,
                    f"{block}attn1.to_v.{leaf}": v,
                    f"{block}attn1.to_out.0.{leaf}": sit[f"blocks.{i}.attn.proj.{leaf}"],
                    f"{block}norm1.linear.{leaf}": sit[f"blocks.{i}.adaLN_modulation.1.{leaf}"],
                    f"{block}ff.net.0.proj.{leaf}": sit[f"blocks.{i}.mlp.fc1.{leaf}"],
                    f"{block}ff.net.2.{leaf}": sit[f"blocks.{i}.mlp.fc2.{leaf}"],
                    f"{block}{emb}timestep_embedder.linear_1.{leaf}": sit[
                        f"t_embedder.mlp.0.{leaf}"
                    ],
                    f"{block}{emb}timestep_embedder.linear_2.{leaf}": sit[
                        f"t_embedder.mlp.2.{leaf}"
                    ],
                }
            )
        renamed[f"{block}{emb}class_embedder.embedding_table.weight"] = sit[
            "y_embedder.embedding_table.weight"
        ]
    for leaf in ("weight", "bias"):
        renamed[f"pos_embed.proj.{leaf}"] = sit[f"x_embedder.proj.{leaf}"]
        renamed[f"proj_out_1.{leaf}"] = sit[f"final_layer.adaLN_modulation.1.{leaf}"]
        renamed[f"proj_out_2.{leaf}"] = sit[f"final_layer.linear.{leaf}"]
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in renamed.items()})
    np.testing.assert_allclose(  # the buffer SiT keeps is the one diffusers computes
        sit["pos_embed"], net.pos_embed.pos_embed.numpy(), atol=1e-6
    )
    ours, theirs = fmjax_out(model, params, x, t, y), diffusers_out(net, x, t, y)
    assert relative_error(ours, theirs) <= TOLERANCE


def test_diffusers_time_frequencies_differ_from_dit():
    """The reason the test sets ``downscale_freq_shift=0``: with diffusers' own frequencies the
    network is measurably another function than DiT's (and SiT's)."""
    config = CONFIGS["small"]
    net = diffusers_net(config)
    model = _model(config)
    shape = (config["size"], config["size"], config["channels"])
    params = params_from_torch(to_sit_names(net.state_dict(), config["depth"]), model, shape)
    for block in net.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    x = np.random.default_rng(2).standard_normal((2, *shape)).astype(np.float32)
    t, y = np.array([0.3, 0.8], np.float32), np.array([2, 5])
    assert relative_error(fmjax_out(model, params, x, t, y), diffusers_out(net, x, t, y)) > 1e-3


def test_sit_training_checkpoint_and_released_file(tmp_path):
    """SiT's train.py saves {"model", "ema", "opt", "args"} (args an argparse.Namespace); the
    released SiT-XL-2-256x256.pt is a bare state dict, of a learn_sigma network: both load."""
    config = CONFIGS["small"]
    model = _model(config)
    shape = (config["size"], config["size"], config["channels"])
    sit = to_sit_names(diffusers_net(config).state_dict(), config["depth"])
    sit["pos_embed"] = params_to_torch(params_from_torch(sit, model, shape), model, shape)[
        "pos_embed"
    ]
    ema = {k: torch.from_numpy(np.array(v)) for k, v in sit.items()}
    raw = {k: v + 1.0 for k, v in ema.items()}
    checkpoint = tmp_path / "0400000.pt"
    torch.save(
        {"model": raw, "ema": ema, "opt": {}, "args": argparse.Namespace(model="SiT-S/2")},
        checkpoint,
    )
    for weights, expected in (("ema", ema), ("raw", raw)):
        loaded = load_torch_checkpoint(checkpoint, source="sit", weights=weights)
        assert loaded.keys() == expected.keys()
        np.testing.assert_array_equal(
            loaded["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"].numpy()
        )
    with pytest.raises(ValueError, match="not a SiT or DiT training checkpoint"):
        torch.save({"state": ema}, tmp_path / "other.pt")
        load_torch_checkpoint(tmp_path / "other.pt", source="sit")

    released = dict(ema)
    p, c = config["patch_size"], config["channels"]
    for leaf in ("weight", "bias"):  # learn_sigma: (mean, variance) per pixel, channels fastest
        mean = released[f"final_layer.linear.{leaf}"]
        per_pixel = mean.reshape(p * p, c, *mean.shape[1:])
        both = torch.cat([per_pixel, 7 + per_pixel], dim=1)
        released[f"final_layer.linear.{leaf}"] = both.reshape(2 * mean.shape[0], *mean.shape[1:])
    torch.save(released, tmp_path / "SiT-S-2.pt")
    params = params_from_torch(load_torch_checkpoint(tmp_path / "SiT-S-2.pt"), model, shape)
    for x, y in zip(
        jax.tree.leaves(params), jax.tree.leaves(params_from_torch(sit, model, shape)), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_cifar10_sit_imports_a_torch_checkpoint_and_samples(tmp_path):
    """experiments.cifar10 --torch_checkpoint with the ``sit`` recipe: the layout defaults to
    SiT's, the parameters are the checkpoint's, and the network samples."""
    from experiments import cifar10
    from experiments.configs.cifar10 import get_config
    from fmjax.generate import SamplingOptions

    config = get_config("sit,conditional,smoke")
    model = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    x = jnp.zeros((1, 8, 8, 3))
    params = model.init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, int))["params"]
    params = jax.tree.map(lambda p: p + 0.05, params)
    state_dict = params_to_torch(params, model, (8, 8, 3))
    ckpt = tmp_path / "sit.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, ckpt)
    network = cifar10.imported_network(config, torch_checkpoint=ckpt)
    for a, b in zip(jax.tree.leaves(network.ema_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    options = SamplingOptions(num_samples=4, steps=2, batch_size=4)
    result = cifar10.run(config, tmp_path / "samples", "sample", options, network=network)
    images = np.load(result.npz, allow_pickle=False)["images"]
    assert images.shape == (4, 8, 8, 3) and np.isfinite(images).all()
