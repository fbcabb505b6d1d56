"""Context-parallel ("ring") attention: self-attention over a sequence split across devices.

Long image-token sequences (a 64 x 64 latent is 4096 tokens; DALL-E's stream is 256 text +
1024 image tokens) make attention's activations grow with L^2 per example. Splitting the
sequence dimension of every activation over one mesh axis divides the per-layer activations
by that axis' size n, but attention needs every key for every query. Under plain `jit` the
SPMD partitioner picks the collectives itself: it all-gathers K and V, or all-reduces softmax
statistics and partial outputs inside the attention's loop, and with the `xla` backend every
device forms logits against all L keys. Ring attention (Liu et al., 2023, "Ring Attention
with Blockwise Transformers for Near-Infinite Context", Sec. 3; the blockwise softmax of
Milakov & Gimelshein, 2018 and Dao et al., 2022, Alg. 1) instead keeps each device's query
block in place and passes the key / value blocks around a ring of the n devices with
`lax.ppermute`, neighbour to neighbour: after n steps every query block has met every key
block, and a device holds two K/V blocks at a time (the one it works on and the next one
arriving), never the full K/V or logits against all keys. The softmax is accumulated online
in float32 (running max, running sum, output accumulator), so the result equals dense
attention up to rounding.

Each ring step's [L/n, L/n] block runs in the cache-sized steps of attention.py's einsum
backend (a few (batch, head) pairs, or one pair's queries a block at a time), so the logits a
device holds at once stay under `attention.EINSUM_CHUNK_BYTES` whatever L. That size suits
CPU caches; on accelerators it means more, smaller matmuls than they need.

The gradient is a custom VJP written the same way (Dao et al., 2022, Alg. 2 over the ring):
only the local output and softmax statistics are saved, the probabilities are recomputed
block by block, and the dK / dV partial sums travel around the ring with their K / V block,
taking one extra hop at the end to arrive back on the device that owns the block.

Causal attention: at ring step s device i holds the K/V block of device (i - s) mod n. Step 0
is the diagonal block (a triangular mask); for s >= 1 the block is entirely in the past when
s <= i and entirely in the future otherwise, and future blocks are skipped with `lax.cond`
(no FLOPs, not only masked). The ring therefore does unequal work per device (device 0 one
block, device n - 1 all n), and a step takes as long as the busiest device; a load-balanced
("zig-zag" / striped) token order is not implemented.

`ring_attention` takes and returns global [B, L, H, D] arrays, the layout of
`jaxt2i.models.attention.dot_product_attention`, and wraps the per-device computation in
`jax.shard_map`: call it inside or outside `jit`, with inputs already sharded as
P(batch_axes, axis, head_axes) to avoid a reshard on entry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

# The einsum backend's step plan: (pairs, queries) per step whose logits fit in cache.
from jaxt2i.models.attention import block_plan as attention_plan
from jaxt2i.models.attention import check_qkv

_NEG = float(jnp.finfo(jnp.float32).min)  # masked logits: finite, so no inf - inf = nan


class _Ring(NamedTuple):
  """Static settings of one ring: hashable, a non-differentiable argument of the custom VJP."""
  axis: str                 # mesh axis the sequence is split over
  size: int                 # its size n: ring steps
  causal: bool
  precision: Any
  varying: tuple[str, ...]  # every mesh axis the local blocks differ over (for pcast)


def _axes(value: str | Sequence[str] | None, what: str, mesh: Mesh) -> tuple[str, ...]:
  names = () if value is None else ((value,) if isinstance(value, str) else tuple(value))
  unknown = [n for n in names if n not in mesh.axis_names]
  if unknown:
    raise ValueError(f"ring_attention: {what} {unknown} are not axes of the mesh "
                     f"{tuple(mesh.axis_names)}")
  return names


def _spec_entry(names: tuple[str, ...]):
  return None if not names else (names[0] if len(names) == 1 else names)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis: str,
                   causal: bool = False, kv_mask: jax.Array | None = None,
                   batch_axes: str | Sequence[str] | None = None,
                   head_axes: str | Sequence[str] | None = None,
                   precision: Any = None) -> jax.Array:
  """Multi-head softmax(q k^T / sqrt(D)) v with the sequence split over mesh axis `axis`.

  Args:
    q: queries [B, Lq, H, D], global; Lq is split into `mesh.shape[axis]` contiguous blocks.
    k: keys [B, Lk, H, D], split the same way.
    v: values [B, Lk, H, D], same dtype as `k`.
    mesh: the device mesh.
    axis: the mesh axis that splits the sequence (the ring runs over its devices).
    causal: query position p attends to key positions <= p (needs Lq == Lk).
    kv_mask: optional boolean [B, Lk], True = the key may be attended to (e.g. text
      padding); split over `axis` with the keys and passed around the ring with them. A
      query that sees no key at all gets a finite but meaningless output.
    batch_axes: mesh axes that split the batch dimension too (e.g. ("data", "fsdp"));
      None: the batch is replicated over the other axes.
    head_axes: mesh axes that split the heads (e.g. "tensor"); None: not split.
    precision: matmul precision (e.g. `jax.lax.Precision.HIGHEST`).

  Returns:
    [B, Lq, H, D] in q's dtype, sharded as P(batch_axes, axis, head_axes). The softmax and
    the accumulation run in float32.
  """
  if not isinstance(mesh, Mesh):
    raise ValueError(f"ring_attention: mesh must be a jax.sharding.Mesh, got {type(mesh)}")
  if axis not in mesh.axis_names:
    raise ValueError(f"ring_attention: axis {axis!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}")
  batch_names = _axes(batch_axes, "batch_axes", mesh)
  head_names = _axes(head_axes, "head_axes", mesh)
  names = (axis,) + batch_names + head_names
  if len(set(names)) != len(names):
    raise ValueError(f"ring_attention: axis {axis!r}, batch_axes {batch_names} and head_axes "
                     f"{head_names} must not share a mesh axis")
  check_qkv(q, k, v, "ring_attention")
  batch, lq, heads, _ = q.shape
  lk = k.shape[1]
  n = mesh.shape[axis]
  if lq % n or lk % n:
    raise ValueError(f"ring_attention: query / key lengths {lq} / {lk} must be divisible by "
                     f"the size {n} of mesh axis {axis!r}, which splits the sequence")
  if causal and lq != lk:
    raise ValueError(f"ring_attention: causal attention needs equal query and key lengths, "
                     f"got {lq} and {lk}")
  for what, dim, group in (("batch", batch, batch_names), ("heads", heads, head_names)):
    size = math.prod(mesh.shape[a] for a in group)
    if dim % size:
      raise ValueError(f"ring_attention: {what} {dim} is not divisible by the mesh axes "
                       f"{group} (size {size}) that split it")
  if kv_mask is not None:
    kv_mask = jnp.asarray(kv_mask)
    if kv_mask.shape != (batch, lk):
      raise ValueError(f"ring_attention: kv_mask must have shape [B, Lk] = {(batch, lk)}, "
                       f"got {kv_mask.shape}")
    kv_mask = kv_mask.astype(bool)

  ring = _Ring(axis, n, bool(causal), precision, names)
  qkv_spec = PartitionSpec(_spec_entry(batch_names), axis, _spec_entry(head_names))
  mask_spec = PartitionSpec(_spec_entry(batch_names), axis)
  local = functools.partial(_local_attention, ring=ring)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, mask_spec),
                       out_specs=qkv_spec)(q, k, v, kv_mask)


def _local_attention(q, k, v, kv_mask, *, ring: _Ring):
  """Per device: [B, Lq/n, H, D] blocks in, this device's [B, Lq/n, H, D] output out.

  The blocks are flattened to heads-first [B * H, L, D] (batch, head) pairs, the layout of
  the einsum backend in attention.py, whose cache-sized steps each ring step reuses."""
  batch, lq, heads, dim = q.shape

  def pairs(x):
    return jnp.swapaxes(x, 1, 2).reshape(batch * heads, x.shape[1], dim)
  out = _ring_flash(pairs(q), pairs(k), pairs(v), kv_mask, ring)
  return jnp.swapaxes(out.reshape(batch, heads, lq, dim), 1, 2)


def _shift(x, ring: _Ring):
  """Every device's `x` to the next device of the ring (i -> i + 1 mod n)."""
  perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, ring.axis, perm), x)


def _zeros(shape, ring: _Ring, value: float = 0.0):
  """A float32 accumulator that varies over the ring's axes like the blocks it sums."""
  return jax.lax.pcast(jnp.full(shape, value, jnp.float32), ring.varying, to="varying")


def _pair_mask(kv_mask, pairs: int):
  """[B, Lk] key mask -> [B * H, Lk], one row per (batch, head) pair (None stays None)."""
  if kv_mask is None:
    return None
  batch, lk = kv_mask.shape
  return jnp.broadcast_to(kv_mask[:, None], (batch, pairs // batch, lk)).reshape(pairs, lk)


def _mask(kv_mask, diagonal: bool, q_offset, lq: int, lk: int, ring: _Ring):
  """Boolean [..., Lq, Lk] mask of one step, or None when every key is visible.

  kv_mask: [..., Lk] or None; q_offset: the position of the step's first query within the
  device's block (the diagonal block's causal triangle shifts with it)."""
  mask = None if kv_mask is None else kv_mask[..., None, :]
  if ring.causal and diagonal:
    tri = jnp.arange(lk)[None, :] <= q_offset + jnp.arange(lq)[:, None]
    mask = tri if mask is None else mask & tri
  return mask


def _logits(q, k, mask, ring: _Ring):
  logits = jnp.einsum("...qd,...kd->...qk", q, k, precision=ring.precision,
                      preferred_element_type=jnp.float32)
  return logits if mask is None else jnp.where(mask, logits, _NEG)


def _forward_rows(rows, keys, q_offset, diagonal: bool, ring: _Ring):
  """One online-softmax update of queries `rows` = (q pre-scaled, running max, running sum,
  output accumulator) by one key block `keys` = (k, v, kv_mask); [..., Lq | Lk, ...]."""
  q, peak, total, acc = rows
  k, v, kv_mask = keys
  logits = _logits(q, k, _mask(kv_mask, diagonal, q_offset, q.shape[-2], k.shape[-2], ring),
                   ring)
  new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
  scale = jnp.exp(peak - new_peak)
  weights = jnp.exp(logits - new_peak[..., None])
  total = total * scale + jnp.sum(weights, axis=-1)
  acc = acc * scale[..., None] + jnp.einsum(
      "...qk,...kd->...qd", weights, v.astype(jnp.float32), precision=ring.precision)
  return new_peak, total, acc


def _backward_rows(rows, keys, q_offset, diagonal: bool, ring: _Ring):
  """(dq [..., Lq, D], dk^T, dv^T [..., D, Lk]) of one key block, recomputing the
  probabilities from the forward statistics. rows = (q pre-scaled, dout, row max,
  1 / row sum, rowsum(dout * out)); keys = (k, v, kv_mask).

  dk and dv come out transposed, as in attention.py's backward step: XLA:CPU contracts the
  leading axis ~10x faster when the matrix is the right-hand operand."""
  q, dout, peak, inv_total, delta = rows
  k, v, kv_mask = keys
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  mask = _mask(kv_mask, diagonal, q_offset, q.shape[-2], k.shape[-2], ring)
  p = jnp.exp(_logits(q, k, mask, ring) - peak[..., None]) * inv_total[..., None]
  dp = jnp.einsum("...qd,...kd->...qk", dout, v, precision=ring.precision)
  ds = p * (dp - delta[..., None])
  if mask is not None:  # masked logits are constants: no gradient, even in all-masked rows
    ds = jnp.where(mask, ds, 0.0)
  dq = jnp.einsum("...qk,...kd->...qd", ds, k, precision=ring.precision)
  dk_t = jnp.einsum("...qd,...qk->...dk", q, ds, precision=ring.precision)
  dv_t = jnp.einsum("...qd,...qk->...dk", dout, p, precision=ring.precision)
  return dq, dk_t, dv_t


def _blocks(x, block: int):
  return None if x is None else x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _over_steps(fn, rows, keys, diagonal: bool, ring: _Ring, sum_keys: bool):
  """fn(rows, keys, q_offset, diagonal) over [P, ...] pairs in cache-sized steps: several
  pairs per step, or one pair's queries a block at a time (the einsum backend's plan, so that
  a step's logits stay in cache rather than streaming [L/n, L/n] per pair through DRAM).

  With `sum_keys` fn returns (per-query, per-key, ...) outputs and the per-key ones are
  summed over the query blocks of a pair (the backward pass's dk, dv)."""
  pairs, lq = rows[0].shape[:2]
  group, block = attention_plan(pairs, lq, keys[0].shape[1])
  one = lambda a: fn(a[0], a[1], 0, diagonal, ring)
  if block == lq:
    if group == pairs:
      return one((rows, keys))
    return jax.lax.map(one, (rows, keys), batch_size=group if group > 1 else None)

  def one_pair(a):
    rows1, keys1 = a
    blocked = (jax.tree.map(lambda x: _blocks(x, block), rows1), jnp.arange(lq // block) * block)
    if not sum_keys:
      out = jax.lax.map(lambda b: fn(b[0], keys1, b[1], diagonal, ring), blocked)
      return jax.tree.map(lambda x: x.reshape(lq, *x.shape[2:]), out)

    def step(sums, b):
      per_query, *per_key = fn(b[0], keys1, b[1], diagonal, ring)
      return [s + x for s, x in zip(sums, per_key)], per_query
    zeros = [_zeros(s.shape, ring) for s in jax.eval_shape(
        lambda: fn(jax.tree.map(lambda x: x[0], blocked[0]), keys1, 0, diagonal, ring))[1:]]
    per_key, per_query = jax.lax.scan(step, zeros, blocked)
    return (per_query.reshape(lq, *per_query.shape[2:]), *per_key)
  return jax.lax.map(one_pair, (rows, keys))


def _visit(s, ring: _Ring, update, state):
  """`update(state)` at ring step s >= 1, skipped for a causal ring's future blocks."""
  if not ring.causal:
    return update(state)
  return jax.lax.cond(s <= jax.lax.axis_index(ring.axis), update, lambda st: st, state)


def _ring_forward(q, k, v, kv_mask, ring: _Ring):
  """Online-softmax pass over the ring on [P, L, D] pairs. Returns the output in q's dtype
  and the statistics (row max, 1 / row sum; [P, Lq] float32) that the backward pass uses.

  The statistics are kept apart rather than as one logsumexp, which in a row whose keys are
  all masked (max = finfo.min) would lose its log(row sum)."""
  pairs, lq, dim = q.shape
  qs = q * jnp.asarray(1.0 / np.sqrt(dim), q.dtype)

  def update(state, block, diagonal):
    k_b, v_b, m_b = block
    rows = (qs, *state)
    return _over_steps(_forward_rows, rows, (k_b, v_b, _pair_mask(m_b, pairs)), diagonal,
                       ring, sum_keys=False)

  state = (_zeros((pairs, lq), ring, _NEG), _zeros((pairs, lq), ring),
           _zeros((pairs, lq, dim), ring))
  block = (k, v, kv_mask)
  state = update(state, block, diagonal=True)  # step 0: the device's own keys
  if ring.size > 1:
    # The next block's transfer is issued before this block's matmuls, so that devices with
    # asynchronous collectives overlap the two; the last step sends nothing.
    def step(carry, s):
      state, block = carry
      incoming = _shift(block, ring)
      state = _visit(s, ring, lambda st: update(st, block, diagonal=False), state)
      return (state, incoming), None

    block = _shift(block, ring)
    (state, block), _ = jax.lax.scan(step, (state, block), jnp.arange(1, ring.size - 1))
    state = _visit(ring.size - 1, ring, lambda st: update(st, block, diagonal=False), state)
  peak, total, acc = state
  inv_total = 1.0 / total  # >= 1 term per row: step 0 always contributes
  return (acc * inv_total[..., None]).astype(q.dtype), (peak, inv_total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_flash(q, k, v, kv_mask, ring: _Ring):
  return _ring_forward(q, k, v, kv_mask, ring)[0]


def _ring_flash_fwd(q, k, v, kv_mask, ring: _Ring):
  out, stats = _ring_forward(q, k, v, kv_mask, ring)
  return out, (q, k, v, kv_mask, out, stats)


def _ring_flash_bwd(ring: _Ring, residuals, dout):
  """dq, dk, dv by a second pass over the ring, recomputing each block's probabilities from
  the forward statistics; each block's dk / dv sums travel with it and hop home at the end."""
  q, k, v, kv_mask, out, (peak, inv_total) = residuals
  pairs, lq, dim = q.shape
  q_scale = 1.0 / np.sqrt(dim)
  dout = dout.astype(jnp.float32)
  delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)  # rowsum(p * dp)
  rows = (q.astype(jnp.float32) * q_scale, dout, peak, inv_total, delta)

  def update(carry, block, diagonal):
    dq, dk_t, dv_t = carry
    k_b, v_b, m_b = block
    dq_b, dk_b, dv_b = _over_steps(_backward_rows, rows, (k_b, v_b, _pair_mask(m_b, pairs)),
                                   diagonal, ring, sum_keys=True)
    return dq + dq_b, dk_t + dk_b, dv_t + dv_b

  lk = k.shape[1]
  carry = (_zeros(q.shape, ring), _zeros((pairs, dim, lk), ring),
           _zeros((pairs, dim, lk), ring))
  block = (k, v, kv_mask)
  carry = update(carry, block, diagonal=True)
  if ring.size > 1:
    def visit(s, carry, block):
      return _visit(s, ring, lambda c: update(c, block, diagonal=False), carry)

    def step(state, s):
      carry, block = state
      incoming = _shift(block, ring)  # K/V do not change: sent while this block computes
      dq, dk_t, dv_t = visit(s, carry, block)
      dk_t, dv_t = _shift((dk_t, dv_t), ring)  # the block's partial sums go with it
      return ((dq, dk_t, dv_t), incoming), None

    dq, dk_t, dv_t = carry
    block = _shift(block, ring)
    dk_t, dv_t = _shift((dk_t, dv_t), ring)
    (carry, block), _ = jax.lax.scan(step, ((dq, dk_t, dv_t), block),
                                     jnp.arange(1, ring.size - 1))
    dq, dk_t, dv_t = visit(ring.size - 1, carry, block)
    # Device i now holds the sums of block i + 1 (mod n): one more hop takes them home.
    dk_t, dv_t = _shift((dk_t, dv_t), ring)
    carry = (dq, dk_t, dv_t)
  dq, dk_t, dv_t = carry
  dk, dv = jnp.swapaxes(dk_t, 1, 2), jnp.swapaxes(dv_t, 1, 2)
  return (dq * q_scale).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_flash.defvjp(_ring_flash_fwd, _ring_flash_bwd)
