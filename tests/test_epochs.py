"""One pass over clips and its reporting: the host-side loss of the test pass is the steps' loss."""

import jax.numpy as jnp
import numpy as np
import optax

from jaxtl.epochs import mean_loss


def test_mean_loss_is_the_steps_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, (64, 10)).astype(np.float32)  # large logits: the max must be subtracted
    y = rng.integers(0, 10, 64)
    want = float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y)).mean())
    assert abs(mean_loss(logits, y) - want) < 1e-4 * max(1.0, abs(want))
