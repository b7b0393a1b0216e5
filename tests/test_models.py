"""fmjax.models.UNet: shapes, preset sizes, dropout, class conditioning, bf16, errors, training.

XLA on CPU compiles and runs conv backward passes slowly, so shapes, sizes and errors are checked
with ``jax.eval_shape`` (nothing compiled or computed), forward passes share jitted functions
through module-scoped fixtures, and parameters come from NumPy instead of a compiled ``init``.
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax.loss import cfm_loss
from fmjax.models import (
    GROUP_NORM_IMPLEMENTATIONS,
    UNet,
    UNetCIFAR10Meta,
    UNetCIFAR10TorchCFM,
    UNetDigits,
    UNetTiny,
    UNetTinyConditional,
    drop_labels,
    param_count,
)

IMAGE = (8, 8, 1)
B = 4


def abstract_params(model, image_shape, batch=1):
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t)


def random_params(model, image_shape, seed=0):
    """Parameters with no zero-initialised layer (a fresh init outputs exactly 0), from NumPy."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(noise / math.sqrt(math.prod(leaf.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(0.1 * noise)  # biases and embeddings

    return jax.tree_util.tree_map_with_path(fill, abstract_params(model, image_shape))


def images(batch=B, shape=IMAGE, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, *shape))


TIMES = jnp.linspace(0.05, 0.95, B)


# --- shapes and sizes (abstract evaluation only) ---------------------------------------------


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (UNetTiny(), (8, 8, 1)),
        (UNetTiny(), (16, 16, 3)),
        (UNetTiny(), (8, 16, 2)),
        (UNetTinyConditional(channel_mult=(1, 2, 2), attention_ds=(2, 4)), (16, 16, 3)),
        (
            UNetTiny(resblock_updown=True, scale_shift_norm=False, head_channels=8),
            (16, 8, 4),
        ),
        (UNetTiny(conv_resample=False, num_res_blocks=2), (8, 8, 3)),
        (UNet(model_channels=8, channel_mult=(1,), attention_ds=(1,), num_groups=4), (4, 4, 1)),
    ],
)
def test_output_shape_is_input_shape(model, shape):
    params = abstract_params(model, shape, batch=2)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    out = jax.eval_shape(model.apply, params, x, jax.ShapeDtypeStruct((2,), jnp.float32))
    assert out.shape == x.shape
    assert out.dtype == jnp.float32


def test_out_channels_and_scalar_time():
    model = UNetTiny(out_channels=2)
    params = abstract_params(model, IMAGE)
    out = jax.eval_shape(model.apply, params, jnp.zeros((3, *IMAGE)), 0.5)
    assert out.shape == (3, 8, 8, 2)


@pytest.mark.parametrize(
    ("preset", "peer_count"),
    [(UNetCIFAR10Meta, 55.7e6), (UNetCIFAR10TorchCFM, 35.7e6)],
    ids=["meta", "torchcfm"],
)
def test_preset_parameter_count_matches_peer(preset, peer_count):
    assert param_count(preset(), (32, 32, 3)) == pytest.approx(peer_count, rel=0.02)


def test_small_presets_are_small():
    assert param_count(UNetDigits(), (8, 8, 1)) < 300_000
    assert param_count(UNetTiny(), IMAGE) < 60_000
    # 11 rows of the label embedding: 10 classes and the null label.
    extra = param_count(UNetTinyConditional(), IMAGE) - param_count(UNetTiny(), IMAGE)
    assert extra == 11 * 4 * UNetTiny().model_channels


def test_params_are_float32_under_bfloat16():
    params = abstract_params(UNetTiny(dtype=jnp.bfloat16), IMAGE)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (UNetTiny(), (9, 8, 1), r"9x8 cannot be downsampled by channel_mult=\(1, 2\)"),
        (UNetTiny(channel_mult=(1, 2, 2, 2)), (12, 12, 1), r"12x12 .* divisible by .* = 8"),
        (UNetTiny(num_groups=32), IMAGE, "num_groups=32 must divide every channel count"),
        (UNetTiny(attention_ds=(4,)), IMAGE, r"attention_ds=\(4,\) contains 4"),
        (UNetTiny(num_heads=3), IMAGE, "num_heads=3"),
        (UNetTiny(head_channels=64), IMAGE, "head_channels=64"),
        (UNetTiny(dropout=1.0), IMAGE, r"dropout=1.0 is not valid; expected a rate in \[0, 1\)"),
    ],
)
def test_bad_configuration_raises(model, shape, match):
    with pytest.raises(ValueError, match=match):
        abstract_params(model, shape)


def test_bad_inputs_raise():
    model = UNetTiny()
    params = abstract_params(model, IMAGE)
    x = jnp.zeros((2, *IMAGE))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[batch\]=\(2,\)"):
        jax.eval_shape(model.apply, params, x, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"x_t must be float images .* shape \(2, 64\)"):
        jax.eval_shape(model.apply, params, x.reshape(2, 64), jnp.zeros(2))
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(model.apply, params, x, jnp.zeros(2), jnp.zeros(2, jnp.int32))


def test_labels_out_of_range_raise_when_concrete():
    model = UNetTinyConditional()
    params = abstract_params(model, IMAGE)
    x, t = jnp.zeros((3, *IMAGE)), jnp.zeros(3)
    # Labels made outside and closed over stay concrete while eval_shape traces the parameters.
    bad, floats = jnp.array([11, 3, -1]), jnp.zeros(3)
    with pytest.raises(ValueError, match=r"\[0, num_classes=10\] .* got \[11, -1\]"):
        jax.eval_shape(lambda p: model.apply(p, x, t, bad), params)
    with pytest.raises(ValueError, match=r"integers of shape \[batch\]=\(3,\)"):
        jax.eval_shape(lambda p: model.apply(p, x, t, floats), params)


# --- forward passes on the tiny presets (shared compilations) ----------------------------------

# One class-conditional model with dropout serves the dropout and the conditioning tests.
COND = UNetTinyConditional(dropout=0.2)


@pytest.fixture(scope="module")
def cond_apply():
    params = random_params(COND, IMAGE)
    apply = jax.jit(COND.apply, static_argnames="train")
    return functools.partial(apply, params)


def test_deterministic_without_dropout(cond_apply):
    x, y = images(), jnp.arange(B)
    a = cond_apply(x, TIMES, y, rngs={"dropout": jax.random.key(0)})
    b = cond_apply(x, TIMES, y, rngs={"dropout": jax.random.key(1)})
    assert a.shape == x.shape
    assert jnp.all(jnp.isfinite(a))
    np.testing.assert_array_equal(a, b)


def test_stochastic_with_dropout(cond_apply):
    x, y = images(), jnp.arange(B)
    eval_out = cond_apply(x, TIMES, y, rngs={"dropout": jax.random.key(0)})
    a = cond_apply(x, TIMES, y, train=True, rngs={"dropout": jax.random.key(0)})
    b = cond_apply(x, TIMES, y, train=True, rngs={"dropout": jax.random.key(0)})
    c = cond_apply(x, TIMES, y, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    assert float(jnp.max(jnp.abs(a - eval_out))) > 1e-3


def test_class_conditioning(cond_apply):
    x = images()
    rngs = {"dropout": jax.random.key(0)}
    out = cond_apply(x, TIMES, jnp.array([0, 1, 2, 3]), rngs=rngs)
    other = cond_apply(x, TIMES, jnp.array([0, 1, 2, 9]), rngs=rngs)
    np.testing.assert_array_equal(out[:3], other[:3])
    assert float(jnp.max(jnp.abs(out[3] - other[3]))) > 1e-3
    # y=None is the null label (10) for every example: the unconditional field of CFG.
    np.testing.assert_array_equal(
        cond_apply(x, TIMES, None, rngs=rngs), cond_apply(x, TIMES, jnp.full(B, 10), rngs=rngs)
    )


def test_out_of_range_label_under_jit_gives_nan(cond_apply):
    out = cond_apply(images(), TIMES, jnp.array([0, 11, 2, 3]), rngs={"dropout": jax.random.key(0)})
    finite = jnp.all(jnp.isfinite(out), axis=(1, 2, 3))
    np.testing.assert_array_equal(finite, [True, False, True, True])


def test_unconditional_and_bfloat16_close_to_float32():
    f32, bf16 = UNetTiny(), UNetTiny(dtype=jnp.bfloat16)
    params = random_params(f32, IMAGE)
    x = images()
    ref = jax.jit(f32.apply)(params, x, TIMES)
    out = jax.jit(bf16.apply)(params, x, TIMES)
    assert out.dtype == jnp.float32
    assert float(jnp.std(ref)) > 0.1
    # bfloat16 keeps 8 bits of mantissa: a few 1e-3 relative error per op, accumulated over ~30.
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out - ref))) > 0.0


@pytest.mark.slow  # compiling an init takes ~30 s on a busy 2-core CPU (threefry per parameter)
def test_fresh_init_outputs_zero_with_float32_params():
    model = UNetTiny(dtype=jnp.bfloat16)
    x = images(batch=1)
    params = jax.jit(model.init)(jax.random.key(0), x, TIMES[:1])
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(model.apply(params, x, TIMES[:1]), jnp.zeros_like(x))


# --- label dropout -----------------------------------------------------------------------------


def test_drop_labels():
    labels = jnp.arange(10_000) % 10
    key = jax.random.key(3)
    dropped = drop_labels(key, labels, 0.25, null_label=10)
    is_null = dropped == 10
    assert float(jnp.mean(is_null)) == pytest.approx(0.25, abs=0.02)
    np.testing.assert_array_equal(dropped[~is_null], labels[~is_null])
    # Example i's draw comes from its own key: the first half alone gives the same labels.
    keys = jax.random.split(key, labels.shape[0])
    np.testing.assert_array_equal(drop_labels(keys[:5000], labels[:5000], 0.25, 10), dropped[:5000])
    jitted = jax.jit(drop_labels, static_argnames="null_label")
    np.testing.assert_array_equal(jitted(key, labels, 0.25, null_label=10), dropped)


def test_drop_labels_errors():
    with pytest.raises(ValueError, match=r"prob=1.5"):
        drop_labels(jax.random.key(0), jnp.arange(3), 1.5, 10)
    with pytest.raises(ValueError, match=r"integers of shape \[batch\]; got dtype float32"):
        drop_labels(jax.random.key(0), jnp.zeros(3), 0.1, 10)


# --- training ----------------------------------------------------------------------------------


def overfit(steps, fixed_noise):
    """Adam on one batch of 4 labelled 8x8 images; returns the mean loss of the first 10 and
    last 50 steps, and the seconds taken (compilation included)."""
    model = UNetTinyConditional()
    x1 = jnp.sign(images(seed=2))  # a binary, digit-like batch
    labels = jnp.arange(B)
    params = random_params(model, IMAGE, seed=4)
    optimizer = optax.adam(3e-3)

    def loss_fn(params, key):
        return cfm_loss(
            model.apply,
            params,
            key,
            x1,
            model_kwargs={"train": True, "rngs": {"dropout": key}},
            example_kwargs={"y": labels},
        )[0]

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    if fixed_noise:
        keys = jnp.broadcast_to(jax.random.key(5), (steps,))
    else:
        keys = jax.random.split(jax.random.key(5), steps)
    start = time.perf_counter()
    _, losses = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
        (params, optimizer.init(params)), keys
    )
    losses = np.asarray(losses)
    return losses[:10].mean(), losses[-50:].mean(), time.perf_counter() - start


def test_tiny_model_overfits_one_batch():
    # The same noise and times every step: pure regression, the classic "can it fit" check.
    first, last, seconds = overfit(steps=200, fixed_noise=True)
    print(f"\nfixed noise: loss {first:.3f} -> {last:.4f} in 200 steps, {seconds:.1f} s")
    assert last < first / 10


@pytest.mark.slow
def test_tiny_model_overfits_one_batch_with_fresh_noise():
    first, last, seconds = overfit(steps=2000, fixed_noise=False)
    print(f"\nfresh noise: loss {first:.3f} -> {last:.4f} in 2000 steps, {seconds:.1f} s")
    assert last < first / 10


@pytest.mark.parametrize("shape", [(7,), (3, 4, 6), (2, 5, 3, 9)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_masks_are_jax_random_bernoulli_bit_for_bit(shape, p):
    # The written-out hash gives the very masks jax.random.bernoulli draws, so dropout is the
    # same stream as before it (runs reproduce); its compiled form has no loop left.
    from fmjax.models.dropout import bernoulli

    keys = jax.random.split(jax.random.key(17), 4)
    want = jax.vmap(lambda k: jax.random.bernoulli(k, p, shape))(keys)
    ours = jax.jit(lambda keys: bernoulli(keys, p, shape))
    np.testing.assert_array_equal(ours(keys), want)
    assert 0 < want.mean() < 1
    assert "while" not in ours.lower(keys).compile().as_text()


def test_dropout_masks_of_other_keys_and_x64_are_jax_randombernoulli(x64):
    from fmjax.models.dropout import bernoulli

    for keys in (
        jax.random.split(jax.random.key(3), 2),  # float64 draws under x64
        jax.random.split(jax.random.key(3, impl="rbg"), 2),
    ):
        want = jax.vmap(lambda k: jax.random.bernoulli(k, 0.7, (4, 5)))(keys)
        np.testing.assert_array_equal(jax.jit(lambda k: bernoulli(k, 0.7, (4, 5)))(keys), want)


def _softmax_attention(q, k, v):
    """The textbook formula, [batch, heads, positions, head_dim]: softmax(q kᵀ / √d) v."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)


def test_attention_normalised_after_the_product_is_softmax_attention(x64):
    from fmjax.models.attention import attend

    # Logits up to ~±40: the max shift matters, and the weights are far from uniform.
    q, k, v, g = (
        5 * jax.random.normal(key, (2, 3, 10, 8)) for key in jax.random.split(jax.random.key(0), 4)
    )

    def ours(q, k, v):
        return attend(q, k, v, jnp.float64)

    np.testing.assert_allclose(ours(q, k, v), _softmax_attention(q, k, v), rtol=1e-12, atol=1e-13)

    def loss(f):
        return lambda q, k, v: jnp.vdot(jnp.tanh(f(q, k, v)), g)

    for got, want in zip(
        jax.grad(loss(ours), (0, 1, 2))(q, k, v),
        jax.grad(loss(_softmax_attention), (0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    tangents = (jnp.cos(q), jnp.sin(k), v**2)  # forward mode, as the exact divergence takes it
    np.testing.assert_allclose(
        jax.jvp(ours, (q, k, v), tangents)[1],
        jax.jvp(_softmax_attention, (q, k, v), tangents)[1],
        rtol=1e-10,
        atol=1e-12,
    )


def test_attention_projection_initialises_as_the_dense_layer_it_replaced():
    # Same key, same initial parameters as nn.Dense(3c) named "qkv": runs seeded before the
    # heads-major projection start from the same weights.
    import flax.linen as nn

    from fmjax.models.attention import Attention
    from fmjax.models.group_norm import group_norm
    from fmjax.models.initializers import torch_kernel_init

    class DenseQKV(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = group_norm(x, 2, jnp.float32, "norm")
            nn.Dense(3 * x.shape[-1], kernel_init=torch_kernel_init, name="qkv")(h)
            return nn.Dense(x.shape[-1], name="proj_out")(h)

    x = jnp.ones((1, 2, 2, 8))
    want = DenseQKV().init(jax.random.key(3), x)["params"]
    got = Attention(num_heads=2, num_groups=2, dtype=jnp.float32).init(jax.random.key(3), x)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(got["params"]["qkv"][name], want["qkv"][name])
    assert float(jnp.abs(want["qkv"]["kernel"]).max()) > 0


@pytest.mark.parametrize("implementation", ["xla", "cudnn"])
def test_attention_block_splits_its_projection_into_queries_keys_values_head_by_head(
    x64, implementation, monkeypatch
):
    # The parameters' meaning is fixed by checkpoints: the qkv projection's 3c outputs are
    # [queries | keys | values], each of heads of head_dim consecutive channels. The "cudnn"
    # block's own part (position-major projections, the output's layout) is checked here
    # with jax.nn.dot_product_attention's XLA implementation standing in for cuDNN's kernel
    # (which needs a GPU and bfloat16; a test below compares the two there).
    from fmjax.models import attention
    from fmjax.models.attention import Attention

    fused = attention.attend_fused
    monkeypatch.setattr(attention, "attend_fused", lambda q, k, v, _: fused(q, k, v, "xla"))
    heads, groups, (b, side, c) = 2, 2, (2, 3, 8)
    block = Attention(heads, groups, jnp.float64, implementation)
    x = jax.random.normal(jax.random.key(0), (b, side, side, c))
    params = jax.tree.map(
        lambda p: p + jax.random.normal(jax.random.key(1), p.shape),
        block.init(jax.random.key(2), x),
    )["params"]
    h = x.reshape(b, side * side, groups, c // groups)
    h = (h - h.mean((1, 3), keepdims=True)) / jnp.sqrt(h.var((1, 3), keepdims=True) + 1e-5)
    row = {
        name: {k: w[None, None] if w.ndim == 1 else w for k, w in p.items()}
        for name, p in params.items()
    }
    h = h.reshape(b, side * side, c) * row["norm"]["scale"] + row["norm"]["bias"]
    qkv = h @ row["qkv"]["kernel"] + row["qkv"]["bias"]
    q, k, v = (
        qkv[..., i * c : (i + 1) * c].reshape(b, -1, heads, c // heads).transpose(0, 2, 1, 3)
        for i in range(3)
    )
    out = _softmax_attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, side * side, c)
    want = x + (out @ row["proj_out"]["kernel"] + row["proj_out"]["bias"]).reshape(x.shape)
    # The stand-in for cuDNN takes its softmax in float32 (a layout error would be O(1)).
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if implementation == "xla" else {"rtol": 2e-5}
    np.testing.assert_allclose(block.apply({"params": params}, x), want, **tolerance)


def test_fused_attention_takes_position_major_arrays_and_scales_by_the_head_width(x64):
    from fmjax.models.attention import attend, attend_fused

    q, k, v = (
        3 * jax.random.normal(key, (2, 10, 3, 8)) for key in jax.random.split(jax.random.key(0), 3)
    )
    heads_major = [jnp.moveaxis(a, 2, 1) for a in (q, k, v)]
    want = jnp.moveaxis(_softmax_attention(*heads_major), 1, 2)
    # JAX's XLA implementation takes its softmax in float32 whatever the inputs: 1e-5.
    np.testing.assert_allclose(attend_fused(q, k, v, "xla"), want, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(
        jnp.moveaxis(attend(*heads_major, jnp.float64), 1, 2), want, rtol=1e-12, atol=1e-13
    )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs there")
def test_cudnn_attention_without_a_gpu_raises_a_value_error_naming_the_setting():
    model = UNetTiny(dtype=jnp.bfloat16, attention="cudnn")
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match=r"attention='cudnn' cannot run here.*attention='xla'"):
        jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros(1))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel needs an NVIDIA GPU")
def test_cudnn_attention_is_the_xla_attention_in_value_and_gradient_on_a_gpu():
    xla, cudnn = (UNetTiny(dtype=jnp.bfloat16, attention=a) for a in ("xla", "cudnn"))
    params, x = random_params(xla, (16, 16, 1)), images(shape=(16, 16, 1))

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x, TIMES) ** 2)))

    (want, want_grad), (got, got_grad) = loss(xla)(params), loss(cudnn)(params)
    assert float(want) > 0.01
    # Both in bfloat16, summed in different orders: as close as bfloat16 runs of one formula.
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        assert float(jnp.linalg.norm(g - w)) <= 0.05 * float(jnp.linalg.norm(w)) + 1e-6


@pytest.mark.parametrize(
    "attention, dtype, match",
    [
        ("cudnn", jnp.float32, "bfloat16 or float16; got dtype float32"),
        ("flash", jnp.bfloat16, r"attention='flash' is not valid; expected one of \['xla'"),
    ],
)
def test_bad_attention_setting_raises(attention, dtype, match):
    model = UNetTiny(dtype=dtype, attention=attention)
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros(1))


def test_group_norm_settings_are_one_model_in_parameters_value_gradient_and_jvp(x64):
    # group_norm="flax" swaps every norm of the U-Net (residual blocks, attention, output)
    # for nn.GroupNorm: the same parameter tree, and to float64 rounding the same function,
    # gradient and forward-mode tangent, so a run can switch either way.
    ours, flax = (
        UNet(8, (1,), 1, (1,), num_groups=4, dtype=jnp.float64, group_norm=g)
        for g in GROUP_NORM_IMPLEMENTATIONS
    )
    shape = (4, 4, 2)
    x = images(shape=shape).astype(jnp.float64)
    params = random_params(ours, shape)
    assert jax.tree.structure(jax.eval_shape(flax.init, jax.random.key(0), x, TIMES)) == (
        jax.tree.structure(params)
    )

    @functools.partial(jax.jit, static_argnums=2)
    def run(params, x, model):
        def loss(p):
            return jnp.mean(jnp.sin(model.apply(p, x, TIMES)))

        tangent = jax.jvp(lambda x: model.apply(params, x, TIMES), (x,), (jnp.cos(x),))[1]
        return model.apply(params, x, TIMES), jax.grad(loss)(params), tangent

    want, got = run(params, x, ours), run(params, x, flax)
    assert float(jnp.abs(want[2]).max()) > 0.01
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def test_bad_group_norm_setting_raises():
    model = UNetTiny(group_norm="torch")
    with pytest.raises(ValueError, match=r"group_norm='torch' is not valid; expected one of"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *IMAGE)), jnp.zeros(1))


def test_attention_output_projection_is_the_dense_layer_in_value_gradient_and_jvp(x64):
    # Same parameters (names, shapes, dtypes, zero initialisation) as nn.Dense(c) with zero
    # kernel named "proj_out", and the same map, gradient and forward-mode tangent: its custom
    # JVP only changes the form in which the kernel gradient is computed on CPU.
    import flax.linen as nn

    from fmjax.models.attention import OutProjection

    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 6), jnp.float64)
    dense = nn.Dense(5, kernel_init=nn.initializers.zeros, dtype=jnp.float64)
    ours = OutProjection(5, jnp.float64)
    params, dense_params = ours.init(jax.random.key(1), x), dense.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(dense_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dense_params), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), params)
    cotangent = jax.random.normal(jax.random.key(3), (2, 3, 4, 5), jnp.float64)
    param_tangents = jax.tree.map(jnp.cos, params)

    def kernel_gradient(layer):
        return lambda x: jax.grad(lambda p: jnp.vdot(layer.apply(p, x), cotangent))(params)

    for want, got in (
        (dense.apply(params, x), ours.apply(params, x)),
        (
            jax.vjp(dense.apply, params, x)[1](cotangent),
            jax.vjp(ours.apply, params, x)[1](cotangent),
        ),
        (
            jax.jvp(dense.apply, (params, x), (param_tangents, jnp.sin(x)))[1],
            jax.jvp(ours.apply, (params, x), (param_tangents, jnp.sin(x)))[1],
        ),
        (  # tangents of the parameters only, then of the input only (symbolic zeros)
            jax.jvp(lambda p: dense.apply(p, x), (params,), (param_tangents,))[1],
            jax.jvp(lambda p: ours.apply(p, x), (params,), (param_tangents,))[1],
        ),
        (
            jax.jvp(lambda x: dense.apply(params, x), (x,), (jnp.sin(x),))[1],
            jax.jvp(lambda x: ours.apply(params, x), (x,), (jnp.sin(x),))[1],
        ),
        (  # second order: the kernel gradient's own derivative along the input
            jax.jvp(kernel_gradient(dense), (x,), (jnp.sin(x),))[1],
            jax.jvp(kernel_gradient(ours), (x,), (jnp.sin(x),))[1],
        ),
    ):
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5, 4, 12), (2, 7, 8)])
def test_group_norm_is_flax_group_norm_in_value_gradient_and_jvp(x64, shape):
    # Same parameters, and to float64 rounding the same map, gradient (of input and both
    # parameters) and forward-mode tangent as nn.GroupNorm: the custom JVP's algebra is exact.
    import flax.linen as nn

    from fmjax.models.group_norm import GROUP_NORM_EPSILON, GroupNorm

    x = 2 * jax.random.normal(jax.random.key(0), shape, jnp.float64) + 0.7
    flax_norm = nn.GroupNorm(4, epsilon=GROUP_NORM_EPSILON, dtype=jnp.float64)
    ours = GroupNorm(4, GROUP_NORM_EPSILON, jnp.float64)
    params = ours.init(jax.random.key(1), x)
    flax_params = flax_norm.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(flax_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="num_groups=5 divides"):
        GroupNorm(5, GROUP_NORM_EPSILON, jnp.float64).init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), params)
    cotangent = jax.random.normal(jax.random.key(3), shape, jnp.float64)
    tangents = (jax.tree.map(lambda a: a - 0.5, params), cotangent)
    for want, got in (
        (flax_norm.apply(params, x), ours.apply(params, x)),
        (
            jax.vjp(flax_norm.apply, params, x)[1](cotangent),
            jax.vjp(ours.apply, params, x)[1](cotangent),
        ),
        (
            jax.jvp(flax_norm.apply, (params, x), tangents)[1],
            jax.jvp(ours.apply, (params, x), tangents)[1],
        ),
    ):
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
