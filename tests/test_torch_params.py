"""The PyTorch mapping of the U-Nets (fmjax.models.torch_params), the null-label row and
``model.init="torch"``: pure NumPy and JAX, so these run everywhere. The comparisons against
torchcfm's own networks are in test_peers_torch.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import cifar10
from experiments.configs.cifar10 import get_config
from fmjax import configs, models
from fmjax.generate import SamplingOptions
from fmjax.models import (
    UNet,
    UNetTiny,
    load_params,
    params_from_torch,
    params_to_torch,
    save_params,
)

SHAPE = (8, 8, 1)


def _init(model, shape=SHAPE, seed=0):
    x = jnp.zeros((1, *shape))
    return model.init(jax.random.key(seed), x, jnp.zeros(1))["params"]


def _random_like(params, seed=1):
    """Every parameter random, so no zero-initialised layer hides a wrong mapping."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [rng.normal(size=np.shape(v)).astype(np.float32) for v in leaves]
    )


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


VARIANTS = {
    "tiny": UNetTiny(),
    "tiny_conditional": UNetTiny(num_classes=10),
    "updown_scale_shift": UNet(
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_ds=(1, 2),
        head_channels=4,
        num_groups=4,
        resblock_updown=True,
    ),
    "pool_resample": UNet(
        model_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_ds=(2,),
        num_heads=2,
        num_groups=4,
        conv_resample=False,
        scale_shift_norm=False,
    ),
}


@pytest.mark.parametrize("peer", models.PEERS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_through_torch_names_is_exact(name, peer):
    model = VARIANTS[name]
    params = _random_like(_init(model))
    if model.num_classes is not None and peer == "torchcfm":
        # torchcfm's embedding has no null row: only a zero one round-trips.
        params["label_embedding"]["embedding"][-1] = 0.0
    state_dict = params_to_torch(params, model, SHAPE, peer=peer)
    assert all(v.dtype == np.float32 for v in state_dict.values())
    _assert_trees_equal(params_from_torch(state_dict, model, SHAPE, peer=peer), params)
    # DDP's prefix is stripped.
    ddp = {f"module.{k}": v for k, v in state_dict.items()}
    _assert_trees_equal(params_from_torch(ddp, model, SHAPE, peer=peer), params)


def test_torch_names_and_layouts():
    model = UNetTiny(num_classes=10)
    params = _random_like(_init(model))
    sd = params_to_torch(params, model, SHAPE, peer="meta")
    # guided-diffusion's names for the first residual block, its attention and the output.
    for name, shape in {
        "time_embed.0.weight": (32, 8),
        "time_embed.2.bias": (32,),
        "label_emb.weight": (11, 32),
        "input_blocks.0.0.weight": (8, 1, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (8,),
        "input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (16, 32),  # scale and shift
        "input_blocks.1.0.out_layers.3.weight": (8, 8, 3, 3),
        "input_blocks.2.0.op.weight": (8, 8, 3, 3),
        "input_blocks.3.0.skip_connection.weight": (16, 8, 1, 1),
        "input_blocks.3.1.qkv.weight": (48, 16, 1),
        "input_blocks.3.1.proj_out.weight": (16, 16, 1),
        "middle_block.1.norm.bias": (16,),
        "output_blocks.1.2.conv.weight": (16, 16, 3, 3),  # after attention
        "out.0.weight": (8,),
        "out.2.weight": (1, 8, 3, 3),
    }.items():
        assert sd[name].shape == shape, name
    np.testing.assert_array_equal(
        sd["input_blocks.0.0.weight"], np.asarray(params["conv_in"]["kernel"]).transpose(3, 2, 0, 1)
    )
    np.testing.assert_array_equal(
        sd["time_embed.0.weight"], np.asarray(params["time_mlp_0"]["kernel"]).T
    )
    assert sd["label_emb.weight"].shape == (11, 32)
    assert params_to_torch(params, model, SHAPE, peer="torchcfm")["label_emb.weight"].shape == (
        10,
        32,
    )


def test_legacy_attention_rows_are_reordered():
    # PyTorch row r of the qkv projection carries the value r; fmjax's output column
    # (which, head, channel) must read the legacy row (head, which, channel).
    model = UNetTiny()  # 2 heads of 8 channels at 16 channels
    sd = params_to_torch(_random_like(_init(model)), model, SHAPE, peer="torchcfm")
    c, heads = 16, 2
    d = c // heads
    sd["input_blocks.3.1.qkv.bias"] = np.arange(3 * c, dtype=np.float32)
    for peer, row in (
        ("torchcfm", lambda which, head, ch: head * 3 * d + which * d + ch),
        ("meta", lambda which, head, ch: which * c + head * d + ch),
    ):
        bias = np.asarray(
            params_from_torch(sd, model, SHAPE, peer=peer)["down1_attn0"]["qkv"]["bias"]
        )
        for which in range(3):
            for head in range(heads):
                for ch in (0, d - 1):
                    assert bias[which * c + head * d + ch] == row(which, head, ch)


def test_one_error_lists_every_missing_unexpected_and_misshaped_name():
    model = UNetTiny()
    sd = params_to_torch(_random_like(_init(model)), model, SHAPE)
    del sd["out.2.bias"], sd["middle_block.1.qkv.weight"]
    sd["input_blocks.0.0.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    sd["module.extra.weight"] = np.zeros(2, np.float32)
    sd["label_emb.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(ValueError) as info:
        params_from_torch(sd, model, SHAPE)
    message = str(info.value)
    assert "2 missing, 2 unexpected, 1 mis-shaped" in message
    assert "out.2.bias (1,)" in message and "middle_block.1.qkv.weight (48, 16, 1)" in message
    assert "module.extra.weight" in message and "label_emb.weight" in message
    assert "input_blocks.0.0.weight: got (8, 3, 3, 3), expected (8, 1, 3, 3)" in message


def test_bad_arguments_are_named():
    model = UNetTiny()
    with pytest.raises(ValueError, match="peer='pytorch' is not valid; expected one of"):
        params_from_torch({}, model, SHAPE, peer="pytorch")
    with pytest.raises(ValueError, match=r"model must be an fmjax\.models\.UNet"):
        params_from_torch({}, object(), SHAPE)
    with pytest.raises(ValueError, match=r"input_shape=\(8, 8\) is not valid"):
        params_from_torch({}, model, (8, 8))
    with pytest.raises(ValueError, match=r"unexpected \['extra/w'\]"):
        params = _init(model)
        params_to_torch({**params, "extra": {"w": np.zeros(1)}}, model, SHAPE)


# --- the parameter file -----------------------------------------------------------------------


def test_save_and_load_params(tmp_path):
    model = UNetTiny(num_classes=10)
    params = _random_like(_init(model))
    path = tmp_path / "p.npz"
    save_params(path, params, model, preset="unet_tiny")
    _assert_trees_equal(load_params(path, model, preset="unet_tiny"), params)
    with pytest.raises(ValueError, match="preset 'unet_tiny', not 'unet_digits'"):
        load_params(path, model, preset="unet_digits")
    with pytest.raises(ValueError, match="num_classes=10 in the file, None in the model"):
        load_params(path, UNetTiny(), preset="unet_tiny")
    with pytest.raises(ValueError, match="No parameters at"):
        load_params(tmp_path / "none.npz", model)


def test_truncated_and_pickled_parameter_files_are_refused(tmp_path):
    model = UNetTiny()
    path = tmp_path / "p.npz"
    save_params(path, _init(model), model, preset="unet_tiny")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot be read as an \.npz of plain arrays"):
        load_params(truncated, model)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"params/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="never unpickles"):
        load_params(pickled, model)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(2))
    with pytest.raises(ValueError, match="is not an fmjax parameter file"):
        load_params(other, model)


# --- training as the peers do ------------------------------------------------------------------


def test_frozen_null_label_row_is_zero_and_gets_no_gradient():
    model = UNetTiny(num_classes=10, frozen_null_label=True, initialization="torch")
    params = _init(model)
    table = np.asarray(params["label_embedding"]["embedding"])
    assert np.all(table[-1] == 0) and np.all(table[:-1] != 0)
    assert models.UNetCIFAR10Meta(num_classes=10).frozen_null_label

    x = jax.random.normal(jax.random.key(1), (4, *SHAPE))
    y = jnp.array([10, 3, 10, 10])  # mostly the null label

    def loss(p):
        return jnp.sum(model.apply({"params": p}, x, jnp.full(4, 0.5), y) ** 2)

    # The zero-initialised convolutions would stop every gradient: randomise all but that row.
    params = _random_like(params)
    params["label_embedding"]["embedding"][-1] = 0.0
    # Compiled: an eager backward pass through the U-Net dispatches op by op, far slower.
    grad = np.asarray(jax.jit(jax.grad(loss))(params)["label_embedding"]["embedding"])
    assert np.all(grad[-1] == 0) and np.any(grad[3] != 0)
    # Without freezing, the null row trains.
    free = UNetTiny(num_classes=10)
    grad_free = jax.jit(
        jax.grad(lambda p: jnp.sum(free.apply({"params": p}, x, jnp.full(4, 0.5), y) ** 2))
    )(params)
    assert np.any(np.asarray(grad_free["label_embedding"]["embedding"])[-1] != 0)


def _biases(params, zero_layers):
    """(bias, fan_in) of every layer that is not zero-initialised."""
    flat = {
        tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    out = []
    for path, bias in flat.items():
        if path[-1] != "bias" or path[-2] in zero_layers:
            continue
        kernel = flat.get((*path[:-1], "kernel"))
        if kernel is None:  # a GroupNorm: bias 0, as PyTorch's
            assert np.all(np.asarray(bias) == 0)
            continue
        fan_in = int(np.prod(kernel.shape[:-1]))
        out.append((np.asarray(bias), fan_in))
    return out


def test_torch_initialisation_matches_pytorch_statistics():
    model = models.UNetDigits(num_classes=10, initialization="torch")
    params = _init(model, seed=3)
    zero = {"conv_out", "proj_out"}
    biases = _biases(params, zero)
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), pooled over layers once scaled to U(-1, 1).
    scaled = np.concatenate([b * np.sqrt(fan_in) for b, fan_in in biases])
    assert scaled.size > 1500
    assert np.abs(scaled).max() <= 1.0 and np.abs(scaled).max() > 0.99
    np.testing.assert_allclose(scaled.var(), 1 / 3, rtol=0.1)
    assert abs(scaled.mean()) < 0.05
    # nn.Embedding: N(0, 1).
    table = np.asarray(params["label_embedding"]["embedding"])
    np.testing.assert_allclose(table.std(), 1.0, rtol=0.1)
    # zero_module layers start at zero, bias included.
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-2].key in zero:
            assert np.all(np.asarray(leaf) == 0), path
    # "fmjax": zero biases, Flax's embedding (std 1/sqrt(features)); same tree either way.
    default = _init(models.UNetDigits(num_classes=10), seed=3)
    assert all(np.all(b == 0) for b, _ in _biases(default, zero))
    np.testing.assert_allclose(
        np.asarray(default["label_embedding"]["embedding"]).std(), 1 / np.sqrt(64), rtol=0.1
    )
    assert jax.tree.structure(default) == jax.tree.structure(params)


def test_config_model_init_reaches_the_model_and_is_validated():
    config = configs.base_config()
    config.model.init = "torch"
    configs.validate(config, num_devices=1)
    assert configs.build_model(config.model).initialization == "torch"
    config.model.init = "pytorch"
    with pytest.raises(ValueError, match=r"config.model.init='pytorch' is not valid"):
        configs.validate(config, num_devices=1)
    model_config = ml_collections.ConfigDict({"name": "unet_tiny"})
    assert configs.build_model(model_config).initialization == "fmjax"
    with pytest.raises(ValueError, match="init='x' is not valid"):
        _init(UNetTiny(initialization="x"))


def test_experiments_cifar10_samples_an_imported_parameter_file(tmp_path):
    config = get_config("smoke")  # UNetTiny on 8x8x3
    model = configs.build_model(config.model)
    path = tmp_path / "tiny.npz"
    save_params(path, _random_like(_init(model, (8, 8, 3))), model, preset="unet_tiny")
    network = cifar10.imported_network(config, params=path)
    options = SamplingOptions(num_samples=4, steps=2, batch_size=4)
    result = cifar10.run(config, tmp_path / "out", "sample", options, network=network)
    images = np.load(result.npz, allow_pickle=False)["images"]
    assert images.shape == (4, 8, 8, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="exactly one of --params"):
        cifar10.imported_network(config)
    with pytest.raises(ValueError, match="for --mode=sample and --mode=eval"):
        cifar10.run(config, tmp_path / "out", "train", options, network=network)
    wrong = get_config("torchcfm")  # unet_cifar10_torchcfm
    with pytest.raises(ValueError, match="preset 'unet_tiny', not 'unet_cifar10_torchcfm'"):
        cifar10.imported_network(wrong, params=path)
