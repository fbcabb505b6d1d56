"""Ring attention (jaxt2i/parallel/context_parallel.py) on 8 fake CPU devices: outputs and
gradients equal dense attention's, the output keeps the sequence sharding, bad inputs fail
with the offending value named, and no device holds full-length logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxt2i.models import attention
from jaxt2i.parallel.context_parallel import ring_attention


def _mesh(shape, names):
  return Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _dense_mask(lq, lk, causal, kv_mask):
  """The [B | 1, 1, Lq, Lk] mask of the same attention for the dense reference."""
  mask = jnp.tril(jnp.ones((lq, lk), bool))[None, None] if causal else None
  if kv_mask is not None:
    mask = kv_mask[:, None, None, :] if mask is None else mask & kv_mask[:, None, None, :]
  return mask


# (mesh shape, mesh axis names, batch_axes, head_axes, causal, key mask, key length,
#  attention.EINSUM_CHUNK_BYTES): the small chunk sizes force the ring's cache-sized steps
#  into several (batch, head) pairs per step (2048) and into query blocks of one pair (512).
CASES = [
    ((2, 4), ("data", "context"), "data", None, False, True, 64, None),
    ((2, 4), ("data", "context"), "data", None, True, False, 64, 2048),
    ((1, 8), ("data", "context"), "data", None, True, True, 64, 512),
    ((1, 8), ("data", "context"), None, None, False, False, 32, None),
    ((2, 2, 2), ("data", "context", "tensor"), "data", "tensor", True, True, 64, None),
]


@pytest.mark.parametrize("mesh_shape,names,batch_axes,head_axes,causal,use_mask,lk,chunk",
                         CASES)
def test_matches_dense_attention(monkeypatch, mesh_shape, names, batch_axes, head_axes,
                                 causal, use_mask, lk, chunk):
  if chunk is not None:
    monkeypatch.setattr(attention, "EINSUM_CHUNK_BYTES", chunk)
  mesh = _mesh(mesh_shape, names)
  batch, lq, heads, dim = 2, 64, 4, 8
  rng = np.random.default_rng(0)
  q, dout = (jnp.asarray(rng.standard_normal((batch, lq, heads, dim)), jnp.float32)
             for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((batch, lk, heads, dim)), jnp.float32)
          for _ in range(2))
  kv_mask = None
  if use_mask:  # random padding; key 0 stays visible so that every query sees some key
    kv_mask = jnp.asarray(rng.random((batch, lk)) > 0.3).at[:, 0].set(True)
  spec = PartitionSpec(batch_axes, "context", head_axes)
  q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))

  def ring(q, k, v):
    return ring_attention(q, k, v, mesh=mesh, axis="context", causal=causal, kv_mask=kv_mask,
                          batch_axes=batch_axes, head_axes=head_axes)

  def dense(q, k, v):
    return attention.dot_product_attention(q, k, v, mask=_dense_mask(lq, lk, causal, kv_mask))

  out = jax.jit(ring)(q, k, v)
  assert out.sharding.spec == spec
  np.testing.assert_allclose(out, jax.jit(dense)(q, k, v), atol=1e-5, rtol=1e-5)
  grads = {name: jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * dout), argnums=(0, 1, 2)))(
      q, k, v) for name, f in (("ring", ring), ("dense", dense))}
  for got, want in zip(grads["ring"], grads["dense"]):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(q_shape=(2, 60, 2, 8), kv_shape=(2, 60, 2, 8)), "divisible by the size 8"),
    (dict(axis="sequence"), "axis 'sequence' is not an axis"),
    (dict(kv_shape=(2, 64, 4, 8)), "shapes disagree"),
    (dict(kv_shape=(2, 32, 2, 8), causal=True), "equal query and key lengths"),
    (dict(kv_mask=np.ones((2, 32), bool)), r"kv_mask must have shape \[B, Lk\]"),
    (dict(batch_axes="context"), "must not share a mesh axis"),
    (dict(batch_axes="batch"), r"batch_axes \['batch'\] are not axes"),
])
def test_rejects_bad_inputs(change, message):
  change = dict(change)
  mesh = _mesh((1, 8), ("data", "context"))
  q = jnp.zeros(change.pop("q_shape", (2, 64, 2, 8)))
  kv = jnp.zeros(change.pop("kv_shape", (2, 64, 2, 8)))
  kwargs = dict(mesh=mesh, axis="context") | change
  with pytest.raises(ValueError, match=message):
    ring_attention(q, kv, kv, **kwargs)


def test_no_device_holds_full_length_logits():
  """Compiled per-device temporaries, forward + backward, with inputs sequence-sharded 8
  ways: far below plain jit of the `xla` backend (which holds each device's [L/8, L]
  logits) and below the size of those logits. (jaxt2i's default CPU backend, einsum, is
  chunked itself and under jit reshards to whole heads per device; there the ring's
  temporaries are smaller or larger depending on the shape, so nothing is asserted.)"""
  batch, length, heads, dim = 1, 2048, 4, 32
  mesh = _mesh((1, 8), ("data", "context"))
  sharding = NamedSharding(mesh, PartitionSpec("data", "context"))
  x = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32, sharding=sharding)
  mask = jnp.tril(jnp.ones((length, length), bool))

  def temp_bytes(attend):
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)),
                   in_shardings=(sharding,) * 3, out_shardings=(sharding,) * 3)
    return step.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  ring = temp_bytes(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis="context",
                                                   causal=True, batch_axes="data"))
  dense = temp_bytes(lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=mask, implementation="xla"))
  logits = batch * heads * (length // 8) * length * 4
  assert ring < logits / 2, (ring, logits)
  assert ring < dense / 4, (ring, dense)
