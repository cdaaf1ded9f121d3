import jax
import jax.numpy as jnp
import pytest

from jaxtl.backbones.vgg import VGG16
from jaxtl.model import Classifier
from jaxtl.split import SplitPoint

CONV_NAMES = VGG16.units


@pytest.fixture(scope="module")
def params():
    return Classifier(3, hidden=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]


@pytest.mark.parametrize("k", [0, 4, 10, 13])
def test_labels_cover_every_param_once_by_the_split(params, k):
    labels = SplitPoint(k, CONV_NAMES).labels(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    for i, name in enumerate(CONV_NAMES):
        assert set(jax.tree.leaves(labels["base"][name])) == {"frozen" if i < k else "base"}
    assert set(jax.tree.leaves(labels["head"])) == {"head"}


@pytest.mark.parametrize("k", [0, 7, 13])
def test_partition_and_join_give_the_params_back(params, k):
    frozen, trainable = SplitPoint(k, CONV_NAMES).partition(params)
    assert list(frozen) == list(CONV_NAMES[:k]) and set(trainable["base"]) == set(CONV_NAMES[k:])
    joined = SplitPoint.join(frozen, trainable)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(params)):
        assert a is b  # the same arrays: nothing copied


def test_a_split_point_outside_the_base_is_refused():
    with pytest.raises(ValueError, match="0..13"):
        SplitPoint(14, CONV_NAMES)
    assert SplitPoint(13, CONV_NAMES).head_only and not SplitPoint(10, CONV_NAMES).head_only
