"""fmjax.keys: the named PRNG streams never move, and per-example keys."""

import jax
import numpy as np
import pytest

from fmjax.keys import Stream, example_keys, stream_key


def test_stream_numbers_are_fixed_and_distinct():
    # Every run's samples and scores depend on these numbers: renumbering one changes results.
    assert {s.name: int(s) for s in Stream} == {
        "NOISE": 0,
        "DROPOUT": 1,
        "GRID": 2,
        "INIT": 3,
        "DIGITS_SCORE": 7,
        "DIGITS_FINAL": 8,
        "DIGITS_BPD": 9,
        "FID": 11,
        "LATENTS": 12,
        "TOY2D_REFERENCE": 100,
    }


@pytest.mark.parametrize("stream", list(Stream))
def test_stream_key_is_fold_in_of_the_seed(stream):
    expected = jax.random.fold_in(jax.random.key(5), int(stream))
    np.testing.assert_array_equal(
        jax.random.key_data(stream_key(5, stream)), jax.random.key_data(expected)
    )


def test_streams_of_one_seed_differ():
    data = {s: tuple(np.asarray(jax.random.key_data(stream_key(0, s)))) for s in Stream}
    assert len(set(data.values())) == len(Stream)


def test_example_keys_split_one_key_and_check_a_batch():
    keys = example_keys(jax.random.key(0), 3)
    assert keys.shape == (3,)
    np.testing.assert_array_equal(
        jax.random.key_data(keys), jax.random.key_data(jax.random.split(jax.random.key(0), 3))
    )
    assert example_keys(keys, 3) is keys
    raw = jax.random.key_data(keys)
    np.testing.assert_array_equal(jax.random.key_data(example_keys(raw, 3)), raw)
    with pytest.raises(ValueError, match=r"shape \[batch\]=\(4,\).*got 3 keys"):
        example_keys(keys, 4)
    with pytest.raises(ValueError, match="must be a PRNG key"):
        example_keys(np.zeros((3,), np.float32), 3)
