"""The diffusion transformer (fmjax.models.DiT): presets against the papers' parameter counts,
the network's function, and SiT's checkpoint layout (params_from_torch / params_to_torch).
The comparison against diffusers' own network is in test_peers_dit_torch.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fmjax import configs, models
from fmjax.models import (
    DIT_PRESETS,
    PRESETS,
    DiT,
    DiTTiny,
    load_params,
    param_count,
    params_from_torch,
    params_to_torch,
    save_params,
    sincos_position_embedding,
)

SHAPE = (8, 8, 1)


def _init(model, shape=SHAPE, labels=None, seed=0):
    x = jnp.zeros((1, *shape))
    y = None if labels is None else jnp.asarray(labels)
    return model.init(jax.random.key(seed), x, jnp.zeros(1), y)["params"]


def _random_like(params, seed=1, scale=1.0):
    """Every parameter random, so no zero-initialised layer hides a wrong mapping."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [scale * rng.normal(size=np.shape(v)).astype(np.float32) for v in leaves]
    )


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- presets -------------------------------------------------------------------------------

# SiT's and DiT's published sizes (DiT's Table 1, SiT's Table 1), in millions, counted on
# 32x32x4 latents with 1,000 classes.
PUBLISHED = {"sit_s_2": 33, "sit_b_2": 130, "sit_l_2": 458, "sit_xl_2": 675}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_the_papers(name):
    count = param_count(PRESETS[name](), (32, 32, 4))
    assert abs(count / 1e6 - PUBLISHED[name]) < 0.5, count


def test_presets_have_the_papers_shapes():
    sizes = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
    for size, (depth, width, heads) in sizes.items():
        for patch in (2, 4, 8):
            model = PRESETS[f"sit_{size}_{patch}"]()
            assert (model.depth, model.hidden_size, model.num_heads) == (depth, width, heads)
            assert (model.patch_size, model.num_classes, model.time_scale) == (patch, 1000, 1.0)
    assert set(DIT_PRESETS) <= set(PRESETS)


def test_build_model_builds_a_transformer_preset():
    model = configs.build_model(
        ml_collections.ConfigDict({"name": "sit_s_2", "num_classes": 10, "dtype": "bfloat16"})
    )
    assert isinstance(model, DiT) and model.num_classes == 10 and model.dtype == jnp.bfloat16


def test_build_model_names_a_unet_field_set_on_a_transformer():
    # The CIFAR-10 U-Net recipes set config.model.init; switching the name alone keeps it.
    config = ml_collections.ConfigDict({"name": "sit_s_2", "init": "torch", "dtype": "float32"})
    with pytest.raises(
        ValueError,
        match=r"config.model.init='torch' is not a field of the preset 'sit_s_2' \(DiT\)",
    ):
        configs.build_model(config)


# --- the network ---------------------------------------------------------------------------


def test_sincos_position_embedding_formula():
    d, grid_h, grid_w = 16, 3, 5
    emb = sincos_position_embedding(d, grid_h, grid_w)
    omega = 1.0 / 10000.0 ** (np.arange(d // 4) / (d // 4))
    i, j = 2, 3  # row 2, column 3: the column's sines and cosines first
    expected = np.concatenate(
        [np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
    )
    np.testing.assert_allclose(emb[i * grid_w + j], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(6, 2, 2)


def test_fresh_network_outputs_zero_and_conditions_on_everything():
    model = DiTTiny(num_classes=10)
    x = jax.random.normal(jax.random.key(0), (3, *SHAPE))
    t, y = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 4, 10])
    params = _init(model, labels=[0])
    assert float(jnp.abs(model.apply({"params": params}, x, t, y)).max()) == 0.0  # adaLN-Zero
    params = _random_like(params, scale=0.3)
    out = model.apply({"params": params}, x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    for changed in (
        model.apply({"params": params}, x, t + 0.1, y),
        model.apply({"params": params}, x, t, jnp.array([1, 4, 10])),
        model.apply({"params": params}, x.at[:, 0, 0].add(1.0), t, y),
    ):
        assert float(jnp.abs(changed - out).max()) > 1e-4
    # y=None is the null label for every example.
    np.testing.assert_array_equal(
        model.apply({"params": params}, x, t),
        model.apply({"params": params}, x, t, jnp.full(3, 10)),
    )


def test_examples_do_not_interact_and_patches_are_unpatchified_in_place():
    """Each output pixel comes from its own image; a change confined to one 2x2 patch moves
    the output there through attention only, and one example's change leaves the others."""
    model = DiTTiny(out_channels=3, depth=1)
    params = _random_like(_init(model), scale=0.3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    out = model.apply({"params": params}, x, 0.5)
    assert out.shape == (2, 8, 8, 3)
    moved = model.apply({"params": params}, x.at[1].add(1.0), 0.5)
    np.testing.assert_array_equal(moved[0], out[0])
    # Without blocks, a token's output depends on its patch alone: un-patchifying puts it back
    # on the same pixels.
    shallow = DiTTiny(depth=0)
    params = _random_like(_init(shallow), scale=0.3)
    out = shallow.apply({"params": params}, x, 0.5)
    moved = shallow.apply({"params": params}, x.at[:, 2:4, 4:6].add(1.0), 0.5)
    changed = np.abs(np.asarray(moved - out)).max(axis=(0, 3)) > 0
    expected = np.zeros((8, 8), bool)
    expected[2:4, 4:6] = True
    np.testing.assert_array_equal(changed, expected)


def test_bfloat16_compute_keeps_float32_parameters_and_is_close():
    model = DiTTiny(num_classes=10)
    params = _random_like(_init(model, labels=[0]), scale=0.3)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = jax.random.normal(jax.random.key(0), (2, *SHAPE))
    t, y = jnp.array([0.2, 0.7]), jnp.array([1, 2])
    full = model.apply({"params": params}, x, t, y)
    half = DiTTiny(num_classes=10, dtype=jnp.bfloat16).apply({"params": params}, x, t, y)
    assert half.dtype == jnp.float32
    assert float(jnp.abs(half - full).max() / jnp.abs(full).max()) < 5e-2


def test_float64_model_computes_in_float64(x64):
    model = DiTTiny(dtype=jnp.float64)
    params = _random_like(_init(model), scale=0.3)
    x = jax.random.normal(jax.random.key(0), (2, *SHAPE), jnp.float64)
    out = model.apply({"params": params}, x, jnp.array([0.2, 0.7]))
    single = DiTTiny().apply({"params": params}, x.astype(jnp.float32), jnp.array([0.2, 0.7]))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, single, rtol=1e-4, atol=1e-5)


def test_mean_flow_adds_an_interval_embedding_and_forward_mode_works():
    model = DiTTiny(mean_flow=True)
    x = jax.random.normal(jax.random.key(0), (2, *SHAPE))
    t = jnp.array([0.2, 0.5])
    params = _random_like(model.init(jax.random.key(0), x, t, t_end=t)["params"], scale=0.3)
    assert {"interval_mlp_0", "interval_mlp_1"} <= set(params)
    out = model.apply({"params": params}, x, t, t_end=t + 0.3)
    assert float(jnp.abs(out - model.apply({"params": params}, x, t)).max()) > 1e-4
    # MeanFlow's target needs jax.jvp through the network (attention="xla").
    _, tangent = jax.jvp(
        lambda x, t: model.apply({"params": params}, x, t, t_end=t + 0.3),
        (x, t),
        (jnp.ones_like(x), jnp.ones_like(t)),
    )
    assert tangent.shape == x.shape and bool(jnp.isfinite(tangent).all())


def test_remat_is_the_same_function():
    x = jax.random.normal(jax.random.key(0), (2, *SHAPE))
    params = _random_like(_init(DiTTiny()), scale=0.3)

    def loss(p, model):
        return jnp.sum(model.apply({"params": p}, x, 0.4) ** 2)

    plain = jax.grad(loss)(params, DiTTiny())
    remat = jax.grad(loss)(params, DiTTiny(remat=True))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    model = DiTTiny(num_classes=10)
    params = _init(model, labels=[0])
    x = jnp.zeros((2, *SHAPE))

    def apply(*args, model=model, **kwargs):
        return model.apply({"params": params}, *args, **kwargs)

    with pytest.raises(ValueError, match="float images"):
        apply(jnp.zeros((2, 8, 8)), 0.5)
    with pytest.raises(ValueError, match="t must be a scalar"):
        apply(x, jnp.zeros(3))
    with pytest.raises(ValueError, match="mean_flow=False"):
        apply(x, 0.5, t_end=0.7)
    with pytest.raises(ValueError, match="cannot be cut into 2x2 patches"):
        apply(jnp.zeros((2, 9, 8, 1)), 0.5)
    with pytest.raises(ValueError, match=r"Class labels must be in \[0, num_classes=10\]"):
        apply(x, 0.5, jnp.array([0, 11]))
    with pytest.raises(ValueError, match="integers of shape"):
        apply(x, 0.5, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        DiTTiny().apply({"params": _init(DiTTiny())}, x, 0.5, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(hidden_size=6, depth=0, num_heads=2).check_image_shape(SHAPE)
    with pytest.raises(ValueError, match="attention='cudnn' computes in bfloat16"):
        apply(x, 0.5, model=DiTTiny(num_classes=10, attention="cudnn"))
    with pytest.raises(ValueError, match="attention='flash' is not valid"):
        apply(x, 0.5, model=DiTTiny(num_classes=10, attention="flash"))
    # Under jit labels cannot be checked: an out-of-range label gives NaN, never a class.
    out = jax.jit(lambda y: apply(x, 0.5, y))(jnp.array([3, 12]))
    assert bool(jnp.isfinite(out[0]).all()) and bool(jnp.isnan(out[1]).all())


# --- SiT's layout --------------------------------------------------------------------------


def sit_state_dict(model, shape, *, learn_sigma=False, null_row=True, seed=0):
    """A state dict of SiT's names and shapes, built here from SiT's ``models.py``: random
    values, ``pos_embed`` the fixed buffer."""
    rng = np.random.default_rng(seed)
    d, p, c = model.hidden_size, model.patch_size, shape[2]
    out_c = (2 if learn_sigma else 1) * c
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (model.num_classes + null_row, d),
        "final_layer.linear.weight": (p * p * out_c, d),
        "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    hidden = int(model.mlp_ratio * d)
    for i in range(model.depth):
        shapes.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * d, d),
                f"blocks.{i}.attn.qkv.bias": (3 * d,),
                f"blocks.{i}.attn.proj.weight": (d, d),
                f"blocks.{i}.attn.proj.bias": (d,),
                f"blocks.{i}.mlp.fc1.weight": (hidden, d),
                f"blocks.{i}.mlp.fc1.bias": (hidden,),
                f"blocks.{i}.mlp.fc2.weight": (d, hidden),
                f"blocks.{i}.mlp.fc2.bias": (d,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
            }
        )
    sd = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    grid = sincos_position_embedding(d, shape[0] // p, shape[1] // p)
    sd["pos_embed"] = grid[None]
    return sd


@pytest.mark.parametrize("num_classes", [None, 10])
def test_round_trip_is_the_identity(num_classes):
    model = DiTTiny(num_classes=num_classes)
    params = _random_like(_init(model, labels=None if num_classes is None else [0]))
    sd = params_to_torch(params, model, SHAPE)
    assert sd["x_embedder.proj.weight"].shape == (32, 1, 2, 2)  # OIHW
    assert sd["blocks.1.attn.qkv.weight"].shape == (96, 32)  # [out, in]
    assert sd["pos_embed"].shape == (1, 16, 32)
    _assert_trees_equal(params_from_torch(sd, model, SHAPE), params)
    ddp = {f"module.{k}": v for k, v in sd.items()}
    _assert_trees_equal(params_from_torch(ddp, model, SHAPE, peer="sit"), params)


def test_sit_layout_maps_names_and_transposes():
    model = DiTTiny(num_classes=10)
    sd = sit_state_dict(model, SHAPE)
    params = params_from_torch(sd, model, SHAPE)
    np.testing.assert_array_equal(
        params["patch_embed"]["kernel"], sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["block1"]["qkv"]["kernel"], sd["blocks.1.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(params["time_mlp_1"]["bias"], sd["t_embedder.mlp.2.bias"])
    np.testing.assert_array_equal(
        params["label_embedding"]["embedding"], sd["y_embedder.embedding_table.weight"]
    )
    np.testing.assert_array_equal(
        params["final_adaLN_modulation"]["kernel"], sd["final_layer.adaLN_modulation.1.weight"].T
    )
    _assert_trees_equal(params_to_torch(params, model, SHAPE), sd)


def test_learn_sigma_checkpoint_keeps_the_velocity_half():
    """A learn_sigma state dict (2C outputs per pixel) gives the first C channels of the
    network that has all 2C: the velocity, as SiT's forward keeps it."""
    model = DiTTiny(num_classes=10)
    sd = sit_state_dict(model, SHAPE, learn_sigma=True)
    params = params_from_torch(sd, model, SHAPE)
    assert params["final_linear"]["kernel"].shape == (32, 4)
    both = DiTTiny(num_classes=10, out_channels=2)
    params_both = params_from_torch(sd, both, SHAPE)
    x = jax.random.normal(jax.random.key(0), (2, *SHAPE))
    t, y = jnp.array([0.3, 0.6]), jnp.array([2, 10])
    np.testing.assert_allclose(
        model.apply({"params": params}, x, t, y),
        both.apply({"params": params_both}, x, t, y)[..., :1],
        rtol=1e-6,
        atol=1e-6,
    )


def test_label_table_without_null_row_gets_a_zero_row():
    model = DiTTiny(num_classes=10)
    sd = sit_state_dict(model, SHAPE, null_row=False)
    table = params_from_torch(sd, model, SHAPE)["label_embedding"]["embedding"]
    assert table.shape == (11, 32)
    np.testing.assert_array_equal(table[-1], 0.0)
    np.testing.assert_array_equal(table[:-1], sd["y_embedder.embedding_table.weight"])


def test_sit_layout_errors_name_every_problem():
    model = DiTTiny(num_classes=10)
    sd = sit_state_dict(model, SHAPE)
    del sd["blocks.0.mlp.fc1.bias"]
    sd["blocks.1.attn.proj.weight"] = np.zeros((3, 3), np.float32)
    sd["blocks.2.attn.qkv.weight"] = np.zeros((96, 32), np.float32)
    with pytest.raises(ValueError, match="1 missing, 1 unexpected, 1 mis-shaped") as info:
        params_from_torch(sd, model, SHAPE)
    message = str(info.value)
    for name in ("blocks.0.mlp.fc1.bias", "blocks.1.attn.proj.weight", "blocks.2.attn.qkv.weight"):
        assert name in message
    assert "sit PyTorch network of this DiT" in message


def test_pos_embed_is_checked_not_loaded():
    model = DiTTiny(num_classes=10)
    sd = sit_state_dict(model, (16, 16, 1))
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 64, 32\).*\(1, 16, 32\)"):
        params_from_torch(sd, model, SHAPE)
    params_from_torch(sd, model, (16, 16, 1))  # the grid it was made for
    sd["pos_embed"] = sd["pos_embed"] + 0.01
    with pytest.raises(ValueError, match="differs from the 2-D sine-cosine embedding"):
        params_from_torch(sd, model, (16, 16, 1))
    del sd["pos_embed"]  # a buffer: not needed
    params_from_torch(sd, model, (16, 16, 1))


def test_bad_models_and_peers_are_refused():
    model = DiTTiny(num_classes=10)
    sd = sit_state_dict(model, SHAPE)
    with pytest.raises(ValueError, match="peer='torchcfm' is not valid; expected one of"):
        params_from_torch(sd, model, SHAPE, peer="torchcfm")
    with pytest.raises(ValueError, match="mean-flow DiT"):
        params_from_torch(sd, DiTTiny(num_classes=10, mean_flow=True), SHAPE)
    with pytest.raises(ValueError, match="cannot be cut into 2x2 patches"):
        params_from_torch(sd, model, (7, 8, 1))


def test_save_and_load_params(tmp_path):
    model = DiTTiny(num_classes=10)
    params = _random_like(_init(model, labels=[0]))
    path = tmp_path / "dit.npz"
    save_params(path, params, model, preset="dit_tiny")
    _assert_trees_equal(load_params(path, model, preset="dit_tiny"), params)
    with pytest.raises(ValueError, match="hidden_size=32 in the file, 64 in the model"):
        load_params(path, DiTTiny(num_classes=10, hidden_size=64))
    assert models.PRESETS["dit_tiny"] is DIT_PRESETS["dit_tiny"]


# --- configs and the engine ----------------------------------------------------------------


def test_cifar10_sit_recipe_is_valid():
    from experiments.configs.cifar10 import get_config

    config = get_config("sit,conditional")
    configs.validate(config, num_devices=8)
    assert "group_norm" not in config.model and "init" not in config.model
    model = configs.build_model(config.model)
    assert isinstance(model, DiT) and model.patch_size == 2 and model.num_classes == 10
    # SiT-S/2 on pixels: 3 channels in and out, 10 classes + null.
    assert param_count(model, (32, 32, 3)) == 32_475_660
    assert get_config("sit,smoke").model.name == "dit_tiny"


def test_digits_dit_variant():
    from experiments.configs.digits import get_config

    assert get_config("dit").model.name == "dit_digits"
    assert get_config("dit,quick").model.name == "dit_tiny"
    assert get_config("dit,meanflow").model.mean_flow
    configs.validate(get_config("dit"), num_devices=8)


@pytest.mark.slow
def test_cifar10_sit_smoke_trains(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments import cifar10
    from experiments.configs.cifar10 import get_config

    with tfds.testing.mock_data(num_examples=32):
        cifar10.run(get_config("sit,conditional,smoke"), tmp_path / "run", "train")
    assert any((tmp_path / "run" / "samples").iterdir())
