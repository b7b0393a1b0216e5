"""fmjax.models.conv: lax's convolution with a per-tap GEMM kernel gradient on CPU.

Every derivative must equal lax's (float64, so only summation order differs), the tap form
must be the one compiled for CPU and lax's own elsewhere, and shapes it does not serve must go
to lax unchanged.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models.conv import (
    BATCH_CHUNK,
    MIN_PIXELS,
    conv_general_dilated,
    map_in_chunks,
    upsample_nearest,
    upsampled_conv_general_dilated,
)

SIDE = int(MIN_PIXELS**0.5)  # the smallest square image that takes the tap form
FEATURES = 4


def _inputs(shape, features, dtype=jnp.float64, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, dtype)
    w = jax.random.normal(kw, (3, 3, shape[-1], features), dtype) / 6
    return x, w


def _dims(x, w):
    return jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))


def _loss(conv, strides, padding, x, w):
    y = conv(x, w, strides, padding, dimension_numbers=_dims(x, w))
    return jnp.sum(jnp.sin(y))


def _assert_same_values_and_derivatives(ours, lax, x, w):
    """Values, both reverse-mode gradients and a forward-mode tangent in (x, w) agree."""
    np.testing.assert_allclose(ours(x, w), lax(x, w), rtol=1e-12)
    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(lax, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    tangents = (jnp.cos(x), jnp.sin(w))
    np.testing.assert_allclose(
        jax.jvp(ours, (x, w), tangents)[1], jax.jvp(lax, (x, w), tangents)[1], rtol=1e-10
    )


CASES = [
    ((1, 1), ((1, 1), (1, 1))),
    ((2, 1), ((0, 2), (1, 0))),  # strides (the U-Nets downsample by 2) and asymmetric padding
    ((1, 1), "VALID"),
]


@pytest.mark.parametrize(("strides", "padding"), CASES)
def test_value_gradients_and_tangents_equal_lax(x64, strides, padding):
    # A batch that does not fill its last chunk of images.
    x, w = _inputs((BATCH_CHUNK + 1, strides[0] * SIDE + 2, strides[1] * SIDE + 2, 3), FEATURES)
    ours = functools.partial(_loss, conv_general_dilated, strides, padding)
    lax = functools.partial(_loss, jax.lax.conv_general_dilated, strides, padding)
    # The tap form is the one compiled: no convolution computes the kernel gradient.
    assert _convolutions(jax.jit(jax.grad(ours, 1)).lower(x, w).as_text()) == 1
    np.testing.assert_allclose(ours(x, w), lax(x, w), rtol=1e-12)
    for got, want in zip(
        jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.jit(jax.grad(lax, (0, 1)))(x, w), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # Forward mode, in x alone (as the exact divergence takes it) and in both.
    tangents = _inputs(x.shape, w.shape[-1], seed=1)
    np.testing.assert_allclose(
        jax.jvp(lambda x: ours(x, w), (x,), (tangents[0],))[1],
        jax.jvp(lambda x: lax(x, w), (x,), (tangents[0],))[1],
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        jax.jvp(ours, (x, w), tangents)[1], jax.jvp(lax, (x, w), tangents)[1], rtol=1e-10
    )


@pytest.mark.parametrize("side", [SIDE, SIDE // 2])  # with the tap form's kernel term, without
def test_a_1x1_convolution_is_a_dot_with_lax_values_and_derivatives(x64, side):
    x, _ = _inputs((BATCH_CHUNK + 1, side, side, 6), FEATURES)
    w = jax.random.normal(jax.random.key(2), (1, 1, 6, FEATURES), jnp.float64)
    ours = functools.partial(_loss, conv_general_dilated, (1, 1), "VALID")
    lax = functools.partial(_loss, jax.lax.conv_general_dilated, (1, 1), "VALID")
    # No convolution at all: forward pass, input and kernel gradients are dots.
    assert _convolutions(jax.jit(jax.grad(ours, (0, 1))).lower(x, w).as_text()) == 0
    _assert_same_values_and_derivatives(ours, lax, x, w)


def test_per_example_kernel_gradients_under_vmap(x64):
    x, w = _inputs((3, SIDE, SIDE, 2), FEATURES)
    per_example = [
        functools.partial(_loss, conv, (1, 1), ((1, 1), (1, 1))) for conv in
        (conv_general_dilated, jax.lax.conv_general_dilated)
    ]  # fmt: skip
    got, want = (jax.vmap(jax.grad(loss, 1), (0, None))(x[:, None], w) for loss in per_example)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def _convolutions(text: str) -> int:
    return text.count("stablehlo.convolution")


def test_kernel_gradient_is_a_product_on_cpu_and_lax_elsewhere():
    x, w = _inputs((1, SIDE + 2, SIDE + 2, 2), FEATURES, jnp.float32)
    grad = jax.jit(jax.grad(functools.partial(_loss, conv_general_dilated, (1, 1), "VALID"), 1))
    lax_grad = jax.jit(
        jax.grad(functools.partial(_loss, jax.lax.conv_general_dilated, (1, 1), "VALID"), 1)
    )
    # lax: the forward convolution and the kernel gradient's; ours on CPU: the forward one only.
    assert _convolutions(lax_grad.lower(x, w).as_text()) == 2
    assert _convolutions(grad.lower(x, w).as_text()) == 1
    tpu = grad.trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
    assert _convolutions(tpu) == 2


@pytest.mark.parametrize(
    ("shape", "features", "kwargs"),
    [
        ((1, SIDE - 2, SIDE, 2), FEATURES, {}),  # too few output pixels
        ((1, SIDE, SIDE, 2), FEATURES, {"rhs_dilation": (2, 2)}),
        ((1, SIDE, SIDE, 2), FEATURES, {"padding": "SAME"}),
    ],
)
def test_what_it_does_not_serve_is_lax_unchanged(shape, features, kwargs):
    x, w = _inputs(shape, features, jnp.float32)
    options = {"padding": ((1, 1), (1, 1)), **kwargs}

    def loss(conv, w):
        y = conv(x, w, (1, 1), dimension_numbers=_dims(x, w), **options)
        return jnp.sum(y**2)

    ours = jax.make_jaxpr(jax.grad(functools.partial(loss, conv_general_dilated)))(w)
    lax = jax.make_jaxpr(jax.grad(functools.partial(loss, jax.lax.conv_general_dilated)))(w)
    assert str(ours) == str(lax)


def test_nchw_is_lax_unchanged():
    x = jnp.ones((1, 2, SIDE, SIDE))
    w = jnp.ones((FEATURES, 2, 3, 3))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NCHW", "OIHW", "NCHW"))
    got = jax.make_jaxpr(
        lambda w: conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims)
    )(w)
    want = jax.make_jaxpr(
        lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims)
    )(w)
    assert str(got) == str(want)


def test_bad_padding_gets_lax_error_message():
    x, w = _inputs((1, SIDE, SIDE, 2), FEATURES, jnp.float32)
    with pytest.raises(TypeError, match="explicit pads for convolution: expected 2, got 1"):
        conv_general_dilated(x, w, (1, 1), ((1, 1),), dimension_numbers=_dims(x, w))


def test_reverse_mode_stores_no_shifted_copies():
    # The nine shifted copies of the input are rebuilt in the backward pass, not stored: they
    # would add 9x the input to lax's temporary memory (measured: +12x without the rebuild,
    # +4x with it at this small size, +0.4x at 16x32x32x64).
    x, w = _inputs((4, 2 * SIDE, 2 * SIDE, 8), 8, jnp.float32)

    def temp_bytes(conv):
        loss = functools.partial(_loss, conv, (1, 1), ((1, 1), (1, 1)))
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert (
        temp_bytes(conv_general_dilated) <= temp_bytes(jax.lax.conv_general_dilated) + 6 * x.nbytes
    )


def test_map_in_chunks_pads_the_last_chunk_and_checks_its_input():
    x = jnp.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(map_in_chunks(lambda a: a[:, ::-1], x, chunk=2), x[:, ::-1])
    with pytest.raises(ValueError, match=r"chunk >= 1; got shapes \[\(5, 2\)\] and chunk=0"):
        map_in_chunks(lambda a: a, x, chunk=0)
    with pytest.raises(ValueError, match="one batch size"):
        map_in_chunks(lambda a, b: a, x, x[:3], chunk=2)


def _upsampled_loss(conv, x, w):
    y = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_dims(x, w))
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("side", [SIDE // 2, SIDE])  # phases below and from MIN_PIXELS on
def test_upsampled_convolution_equals_the_convolution_of_the_upsampled_image(x64, side):
    x, w = _inputs((BATCH_CHUNK + 1, side, side + 2, 3), FEATURES)
    ours = functools.partial(_upsampled_loss, upsampled_conv_general_dilated)
    lax = functools.partial(
        _upsampled_loss,
        lambda x, *a, **k: jax.lax.conv_general_dilated(upsample_nearest(x), *a, **k),
    )
    # Four 2x2 convolutions of the input, and no upsampled image (of its 3 channels).
    text = jax.jit(ours).lower(x, w).as_text()
    assert _convolutions(text) == 4 and f"x{2 * side}x{2 * side + 4}x3x" not in text
    assert f"x{2 * side}x{2 * side + 4}x3x" in jax.jit(lax).lower(x, w).as_text()
    _assert_same_values_and_derivatives(ours, lax, x, w)


def test_upsampled_convolution_of_other_kernels_upsamples_then_convolves(x64):
    x, _ = _inputs((2, 5, 6, 3), FEATURES)
    w = jax.random.normal(jax.random.key(3), (5, 5, 3, FEATURES), jnp.float64)
    padding = ((2, 2), (2, 2))
    got = upsampled_conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_dims(x, w))
    want = jax.lax.conv_general_dilated(
        upsample_nearest(x), w, (1, 1), padding, dimension_numbers=_dims(x, w)
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 8, 8, 3, 1)])
def test_upsample_nearest_needs_nhwc_images(shape):
    with pytest.raises(ValueError, match=r"NHWC.*" + re.escape(str(shape))):
        upsample_nearest(jnp.zeros(shape))
