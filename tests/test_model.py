import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from jaxtl.backbones.vgg import VGG16, VGG16_LAYERS
from jaxtl.model import Classifier, Head, VGG16Base, pool_features

CONV_LAYERS, CONV_NAMES, BLOCK_END = VGG16_LAYERS, VGG16.units, VGG16.stage_end



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


@pytest.mark.parametrize("k", [2, 4, 7, 10, 11, 12, 13])
def test_prefix_then_suffix_equals_whole_base(base_vars, k):
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    whole = VGG16Base().apply(base_vars, x)
    prefix = VGG16Base().apply(base_vars, x, stop=k)
    pools = sum(1 for end in BLOCK_END[1:] if end <= k)  # a 2x2 pool closes each block
    assert prefix.shape[1:] == (32 // 2**pools, 32 // 2**pools, CONV_LAYERS[k - 1][1])
    np.testing.assert_allclose(VGG16Base().apply(base_vars, prefix, start=k), whole, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params(base_vars):
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 3))
    out16 = VGG16Base(dtype=jnp.bfloat16).apply(base_vars, x)
    assert out16.dtype == jnp.bfloat16
    bf_vars = VGG16Base(dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    assert bf_vars["params"]["block1_conv1"]["kernel"].dtype == jnp.float32
    assert rel_l2(out16.astype(jnp.float32), VGG16Base().apply(base_vars, x)) < 5e-2


def test_pooling():
    h = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 3, 8))
    np.testing.assert_array_equal(pool_features(h, "flatten"), h.reshape(4, 48))
    np.testing.assert_allclose(pool_features(h, "avg"), h.mean(axis=(1, 2)), rtol=1e-6)
    avgmax = pool_features(h, "avgmax")
    assert avgmax.shape == (4, 16)
    np.testing.assert_allclose(avgmax[:, 8:], h.max(axis=(1, 2)))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_features(h, "median")


def test_head_normalisation_is_the_affine_map_it_stores():
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 6))
    head = Head(2, hidden=0, normalize=True)
    v = head.init(jax.random.PRNGKey(0), x)
    mean, scale = jnp.arange(6.0), jnp.full(6, 2.0)
    v = {"params": v["params"], "norm": {"mean": mean, "scale": scale}}
    w, b = v["params"]["logits"]["kernel"], v["params"]["logits"]["bias"]
    np.testing.assert_allclose(head.apply(v, x), ((x - mean) * scale) @ w + b, rtol=1e-5)


@pytest.mark.parametrize("taps,pooling,width", [((5,), "flatten", 512), ((3, 4, 5), "avgmax", 2 * (256 + 512 + 512)),
                                                ((2, 4), "avg", 128 + 512)])
def test_taps_feed_the_head_pooled_block_outputs(base_vars, taps, pooling, width):
    model = Classifier(3, hidden=0, pooling=pooling, taps=taps)
    x = jax.random.uniform(jax.random.PRNGKey(6), (2, 32, 32, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    v = {"params": {"base": base_vars["params"], "head": v["params"]["head"]}}
    feats = model.apply(v, x, method=Classifier.head_inputs)
    assert feats.shape == (2, width)
    expected = [pool_features(VGG16Base().apply(base_vars, x, stop=BLOCK_END[b]), pooling) for b in taps]
    np.testing.assert_allclose(feats, jnp.concatenate(expected, -1), rtol=1e-5, atol=1e-6)
    for k in (4, 7, 10, 13):  # any split point gives the same head input
        mid = model.apply(v, x, k, method=Classifier.prefix)
        assert (mid["h"] is None) == (k == 13)
        np.testing.assert_allclose(model.apply(v, mid, k, method=Classifier.head_inputs), feats, rtol=1e-5, atol=1e-6)


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
    at10 = model.apply(v, x, 10, method=Classifier.prefix)
    np.testing.assert_allclose(model.apply(v, at10, start=10), model.apply(v, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("taps,convs", [((3,), 7), ((3, 4), 10), ((3, 4, 5), 13), ((2, 4), 10)])
def test_the_frozen_pass_runs_no_block_past_the_last_tap(base_vars, taps, convs):
    """The prefix pass is most of a frozen job: it stops at the last block the head reads."""
    model = Classifier(3, hidden=0, pooling="avgmax", taps=taps)
    x = jnp.zeros((1, 32, 32, 3))
    v = {"params": {"base": base_vars["params"], "head": {}}}
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, 13, method=Classifier.prefix))(v, x)
    assert str(jaxpr).count("conv_general_dilated") == convs
