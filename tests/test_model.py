import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from jaxtl.model import BLOCK_END, CONV_NAMES, Classifier, Head, VGG16Base, block_split, output_shape


@pytest.fixture(scope="module")
def base_vars():
    return VGG16Base().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_param_names_and_shapes_follow_keras(base_vars):
    params = base_vars["params"]
    assert list(params) == list(CONV_NAMES)
    assert params["block1_conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert params["block5_conv3"]["kernel"].shape == (3, 3, 512, 512)
    assert all(p["kernel"].dtype == jnp.float32 for p in params.values())


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 64, 96, 3), (1, 40, 56, 3)])
def test_output_shape(base_vars, shape):
    out = VGG16Base().apply(base_vars, jnp.ones(shape))
    assert out.shape == (shape[0], shape[1] // 32, shape[2] // 32, 512)
    assert output_shape(shape[1], shape[2], 0, 13) == out.shape[1:]


@pytest.mark.parametrize("k", [2, 4, 7, 10, 11, 12, 13])
def test_prefix_then_suffix_equals_whole_base(base_vars, k):
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    whole = VGG16Base().apply(base_vars, x)
    prefix = VGG16Base().apply(base_vars, x, stop=k)
    assert prefix.shape[1:] == output_shape(32, 32, 0, k)
    np.testing.assert_allclose(VGG16Base().apply(base_vars, prefix, start=k), whole, rtol=1e-5, atol=1e-6)


def test_block_split_maps_blocks_to_conv_counts():
    assert [block_split(b) for b in range(6)] == list(BLOCK_END)
    with pytest.raises(ValueError, match="block"):
        block_split(6)


def test_bfloat16_compute_keeps_float32_params(base_vars):
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 3))
    out16 = VGG16Base(dtype=jnp.bfloat16).apply(base_vars, x)
    assert out16.dtype == jnp.bfloat16
    bf_vars = VGG16Base(dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    assert bf_vars["params"]["block1_conv1"]["kernel"].dtype == jnp.float32
    assert rel_l2(out16.astype(jnp.float32), VGG16Base().apply(base_vars, x)) < 5e-2


def test_head_pooling_and_normalisation():
    h = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 2, 8))
    for pooling, width in (("flatten", 32), ("avg", 8), ("avgmax", 16)):
        head = Head(5, hidden=0, pooling=pooling, normalize=True)
        v = head.init(jax.random.PRNGKey(0), h)
        assert v["params"]["logits"]["kernel"].shape == (width, 5)
        assert v["norm"]["mean"].shape == (width,)
        assert head.apply(v, h).shape == (4, 5)


def test_head_normalisation_is_the_affine_map_it_stores():
    h = jax.random.normal(jax.random.PRNGKey(4), (3, 6))[:, None, None, :]
    head = Head(2, hidden=0, normalize=True)
    v = head.init(jax.random.PRNGKey(0), h)
    mean, scale = jnp.arange(6.0), jnp.full(6, 2.0)
    v = {"params": v["params"], "norm": {"mean": mean, "scale": scale}}
    w, b = v["params"]["logits"]["kernel"], v["params"]["logits"]["bias"]
    expected = ((h.reshape(3, 6) - mean) * scale) @ w + b
    np.testing.assert_allclose(head.apply(v, h), expected, rtol=1e-5)


def test_dropout_only_in_training():
    model = Classifier(3, dropout=0.5)
    x = jnp.ones((2, 32, 32, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(v, x)
    np.testing.assert_array_equal(a, model.apply(v, x))
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    c = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(b, c)


def test_classifier_split_composition():
    model = Classifier(4, hidden=16)
    x = jax.random.uniform(jax.random.PRNGKey(5), (2, 32, 32, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    assert set(v["params"]) == {"base", "head"}
    h = model.apply(v, x, stop=10, method=Classifier.features)
    np.testing.assert_allclose(model.apply(v, h, start=10), model.apply(v, x), rtol=1e-5, atol=1e-6)
