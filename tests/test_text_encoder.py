"""The transformer text encoder: padding is invisible, gradients reach every weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models.text_encoder import TextEncoder
from jaxt2i.parallel import partitioning

ENC = TextEncoder(vocab_size=32, max_length=12, width=32, depth=2, num_heads=4)


def _batch(lengths, total=12):
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 32, (len(lengths), total)).astype(np.int32)
  mask = (np.arange(total)[None] < np.array(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(tokens * mask), jnp.asarray(mask)


@pytest.fixture(scope="module")
def params():
  tokens, mask = _batch([5, 12])
  boxed = ENC.init(jax.random.key(0), tokens, mask)["params"]
  names = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
  assert all(hasattr(b, "names") for b in names)  # every weight has logical axis names
  return partitioning.unbox(boxed)


def test_shapes_and_padding_is_invisible(params):
  tokens, mask = _batch([5, 12])
  states, pooled = ENC.apply({"params": params}, tokens, mask)
  assert states.shape == (2, 12, 32) and pooled.shape == (2, 32)
  # The same 5-token caption padded to 8: identical states on its tokens and pooled vector.
  short_states, short_pooled = ENC.apply({"params": params}, tokens[:1, :8], mask[:1, :8])
  np.testing.assert_allclose(short_states[0, :5], states[0, :5], atol=1e-5)
  np.testing.assert_allclose(short_pooled[0], pooled[0], atol=1e-5)
  # Garbage in padded positions changes nothing either.
  noisy = tokens.at[0, 5:].set(7)
  np.testing.assert_allclose(ENC.apply({"params": params}, noisy, mask)[1][0], pooled[0],
                             atol=1e-5)


def test_empty_caption_is_finite(params):
  tokens = jnp.zeros((1, 12), jnp.int32)
  states, pooled = ENC.apply({"params": params}, tokens, jnp.zeros_like(tokens))
  assert np.isfinite(np.asarray(states)).all() and np.isfinite(np.asarray(pooled)).all()


def test_gradient_reaches_every_weight(params):
  tokens, mask = _batch([5, 12])

  def loss(p):
    states, pooled = ENC.apply({"params": p}, tokens, mask)
    return jnp.sum(jnp.sin(states)) + jnp.sum(pooled ** 2)
  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_bad_config_and_overlong_input():
  tokens, mask = _batch([3], total=12)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    TextEncoder(vocab_size=32, max_length=12, width=30, num_heads=4).init(
        jax.random.key(0), tokens, mask)
  with pytest.raises(ValueError, match="at most 8"):
    TextEncoder(vocab_size=32, max_length=8, width=32, num_heads=4).init(
        jax.random.key(0), tokens, mask)
