"""The one attention entry point of jaxt2i, and the Linen multi-head attention built on it.

`dot_product_attention` is scaled dot-product attention (Vaswani et al., 2017, Sec. 3.2.1):
softmax(Q K^T / sqrt(D)) V, with one layout for every model and a choice of backend:

  einsum  for CPUs: heads-first einsums ([B * H, L, D]) computed a few (batch, head) pairs,
          or for long sequences a block of queries, at a time, so that a step's [Lq, Lk]
          logits stay in cache: XLA:CPU fuses neither the two matmuls nor the softmax, and
          each pass over the full logits would stream through DRAM. Its gradient is written
          out flash-attention style (Dao et al., 2022, Alg. 2 without the online softmax):
          only the softmax statistics are kept and the probabilities are recomputed per
          step. For the U-Net benchmark's 1024-token self-attention (batch 8, 8 heads of 8)
          on the 2-core benchmark machine: 0.05 s forward and 0.14 s forward + backward,
          against 0.14 / 0.57 s for torch's scaled_dot_product_attention and 0.55 / 2.0 s
          for the xla backend.
  xla     `jax.nn.dot_product_attention(implementation="xla")`.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention, which
          never materialises the [Lq, Lk] matrix; GPU only, float16 / bfloat16, head size a
          multiple of 8 and at most 128.
  auto    cudnn where it applies, else einsum on CPU and xla elsewhere.

Every backend computes the softmax in float32 whatever the input dtype (what diffusers calls
`upcast_attention`, which the SD 2.x U-Net needs in float16) and returns the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def cudnn_supported(q: jax.Array, k: jax.Array) -> bool:
  """Whether the cuDNN flash-attention kernel accepts these operands on this backend."""
  head_dim = q.shape[-1]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.float16, jnp.bfloat16)
          and k.dtype == q.dtype and head_dim % 8 == 0 and head_dim <= 128)


def resolve_implementation(implementation: str, q: jax.Array, k: jax.Array) -> str:
  """The concrete backend that `implementation` ("auto" or a backend name) runs."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is unknown; choose one of "
                     f"{IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if cudnn_supported(q, k):
    return "cudnn"
  return "einsum" if jax.default_backend() == "cpu" else "xla"


# Bytes of float32 logits one step of the einsum backend holds: small enough to stay in a
# core's L2/L3 cache, large enough that the loop over steps costs little (4 MiB: the U-Net
# benchmark's 1024-token self-attention, one (batch, head) pair per step).
EINSUM_CHUNK_BYTES = 4 << 20


def _largest_divisor(n: int, limit: int) -> int:
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _plan(pairs: int, lq: int, lk: int) -> tuple[int, int]:
  """(pairs, queries) per step, so that a step's [Lq, Lk] logits fit EINSUM_CHUNK_BYTES."""
  pair_bytes = lq * lk * 4
  if pair_bytes <= EINSUM_CHUNK_BYTES:
    return _largest_divisor(pairs, EINSUM_CHUNK_BYTES // pair_bytes), lq
  return 1, _largest_divisor(lq, EINSUM_CHUNK_BYTES // (lk * 4))


def _blocks(x, block):
  return None if x is None else x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _map_pairs(fn, group, xs):
  """fn over [P, ...] arrays, `group` pairs per step (one step: no loop)."""
  if group == xs[0].shape[0]:
    return fn(xs)
  return jax.lax.map(fn, xs, batch_size=group if group > 1 else None)


def _logits(q, k, mask, precision):
  logits = jnp.einsum("...qd,...kd->...qk", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  return logits if mask is None else jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


def _forward_step(q, k, v, mask, precision):
  """softmax(q k^T) v for q [..., Lq, D] (pre-scaled), k / v [..., Lk, D], and the softmax
  statistics (row max and 1 / row sum, [..., Lq]) that the backward pass recomputes it from.

  The normalisation divides the [Lq, D] product rather than the [Lq, Lk] weights: one
  pass less over the largest array. The statistics are kept apart rather than as one
  logsumexp, which in a fully masked row (logits all finfo.min) would lose its log(Lk).
  """
  logits = _logits(q, k, mask, precision)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("...qk,...kd->...qd", weights, v.astype(jnp.float32), precision=precision)
  return (out / total).astype(v.dtype), (peak[..., 0], 1.0 / total[..., 0])


def _backward_step(q, k, v, mask, out, stats, dout, precision):
  """(dq [..., Lq, D], dk^T, dv^T [..., D, Lk]) in float32 for one step, recomputing the
  probabilities from `stats`.

  dk and dv come out transposed: XLA:CPU contracts the leading axis of a matrix ~10x faster
  when the matrix is the right-hand operand (q^T ds) than when it is the left (ds^T q), and
  the caller transposes the small [D, Lk] results once, outside its loop (inside, XLA would
  fold the transpose back into the product).
  """
  q, k, v, out, dout = (x.astype(jnp.float32) for x in (q, k, v, out, dout))
  peak, inv_total = stats
  p = jnp.exp(_logits(q, k, mask, precision) - peak[..., :, None]) * inv_total[..., :, None]
  delta = jnp.sum(dout * out, axis=-1)  # [..., Lq]: rowsum(p * dp)
  ds = p * (jnp.einsum("...qd,...kd->...qk", dout, v, precision=precision) - delta[..., :, None])
  if mask is not None:  # masked logits are constants: no gradient, even in all-masked rows
    ds = jnp.where(mask, ds, 0.0)
  dq = jnp.einsum("...qk,...kd->...qd", ds, k, precision=precision)
  dk_t = jnp.einsum("...qd,...qk->...dk", q, ds, precision=precision)
  dv_t = jnp.einsum("...qd,...qk->...dk", dout, p, precision=precision)
  return dq, dk_t, dv_t


def _chunked_forward(q, k, v, mask, precision):
  """Attention over [P, L, D] pairs (+ softmax statistics), a cache-sized step at a time."""
  pairs, lq, dim = q.shape
  group, block = _plan(pairs, lq, k.shape[1])
  if block == lq:
    return _map_pairs(lambda a: _forward_step(*a, precision), group, (q, k, v, mask))

  def one_pair(a):
    q1, k1, v1, m1 = a
    out, stats = jax.lax.map(lambda b: _forward_step(b[0], k1, v1, b[1], precision),
                             (_blocks(q1, block), _blocks(m1, block)))
    return out.reshape(lq, dim), tuple(x.reshape(lq) for x in stats)
  return jax.lax.map(one_pair, (q, k, v, mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask, precision):
  return _chunked_forward(q, k, v, mask, precision)[0]


def _flash_forward(q, k, v, mask, precision):
  out, stats = _chunked_forward(q, k, v, mask, precision)
  return out, (q, k, v, mask, out, stats)


def _flash_backward(precision, residuals, dout):
  q, k, v, mask, out, stats = residuals
  pairs, lq, dim = q.shape
  lk = k.shape[1]
  group, block = _plan(pairs, lq, lk)
  if block == lq:
    dq, dk_t, dv_t = _map_pairs(lambda a: _backward_step(*a, precision), group,
                                (q, k, v, mask, out, stats, dout))
  else:  # query blocks of one pair: dk, dv accumulate over the blocks
    def one_pair(a):
      q1, k1, v1, m1, o1, s1, d1 = a

      def step(sums, b):
        dq, dk_t, dv_t = _backward_step(b[0], k1, v1, b[1], b[2], b[3], b[4], precision)
        return (sums[0] + dk_t, sums[1] + dv_t), dq
      zeros = jnp.zeros((dim, lk), jnp.float32)
      (dk_t, dv_t), dq = jax.lax.scan(
          step, (zeros, zeros), jax.tree.map(lambda x: _blocks(x, block), (q1, m1, o1, s1, d1)))
      return dq.reshape(lq, dim), dk_t, dv_t
    dq, dk_t, dv_t = jax.lax.map(one_pair, (q, k, v, mask, out, stats, dout))
  dk, dv = jnp.swapaxes(dk_t, 1, 2), jnp.swapaxes(dv_t, 1, 2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_forward, _flash_backward)


def _einsum_attention(q, k, v, mask, precision):
  """Heads-first einsums in float32, a cache-sized step at a time (the module docstring)."""
  batch, lq, heads, dim = q.shape
  lk = k.shape[1]
  q = q * jnp.asarray(1.0 / np.sqrt(dim), q.dtype)  # Lq x D values, fewer than the logits
  q, k, v = (jnp.transpose(x, (0, 2, 1, 3)).reshape(batch * heads, x.shape[1], dim)
             for x in (q, k, v))
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, heads, lq, lk)).reshape(batch * heads, lq, lk)
  out = _flash(q, k, v, mask, precision)
  return jnp.transpose(out.reshape(batch, heads, lq, dim), (0, 2, 1, 3))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, implementation: str = "auto",
                          precision: Any = None) -> jax.Array:
  """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(D)) v.

  Args:
    q: queries [B, Lq, H, D] (batch, query length, heads, head size): the layout the
      projections produce and `jax.nn.dot_product_attention` takes, so no backend pays for a
      transpose it does not need.
    k: keys [B, Lk, H, D].
    v: values [B, Lk, H, D], same dtype as `k`.
    mask: optional boolean array broadcastable to [B, H, Lq, Lk]; True = may attend.
    implementation: "auto", "einsum", "xla" or "cudnn" (see the module docstring).
    precision: matmul precision for the einsum backend (e.g. `jax.lax.Precision.HIGHEST`);
      the jax.nn backends choose their own.

  Returns:
    [B, Lq, H, D] in q's dtype. The softmax runs in float32.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q, k, v of rank 4 [B, L, H, D], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape} "
                     "(expected [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D])")
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  backend = resolve_implementation(implementation, q, k)
  if backend == "einsum":
    return _einsum_attention(q, k, v, mask, precision)
  if backend == "cudnn" and not cudnn_supported(q, k):
    raise ValueError(
        f"attention implementation 'cudnn' needs a GPU, float16/bfloat16 operands and a head "
        f"size that is a multiple of 8 and <= 128; got backend {jax.default_backend()!r}, "
        f"dtype {q.dtype}, head size {q.shape[-1]}")
  # jax.nn computes the logits in float32 for half-precision inputs, and the softmax in
  # float32 always.
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=backend)


class _Projection(nn.Module):
  """DenseGeneral's math (contract the last `in_axes` input axes into `features`) with the
  kernel created in its final shape: flax's DenseGeneral initialises a flattened 2-D kernel,
  on which a 3-name logical sharding constraint fails inside a mesh."""
  features: tuple[int, ...]
  in_axes: int
  names: tuple[str, ...]
  use_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_axes:]
    init = nn.initializers.lecun_normal(
        in_axis=tuple(range(self.in_axes)),
        out_axis=tuple(range(self.in_axes, self.in_axes + len(self.features))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                        in_shape + tuple(self.features))
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_axes)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.names[-len(self.features):]), tuple(self.features))
      y = y + bias.astype(self.dtype)
    return y


def _projection(features: tuple[int, ...], axis: int | tuple[int, ...], names: tuple[str, ...],
                dtype: Any, use_bias: bool, name: str) -> _Projection:
  in_axes = 1 if isinstance(axis, int) else len(axis)
  return _Projection(tuple(features), in_axes, tuple(names), use_bias, dtype, name=name)


class Attention(nn.Module):
  """Multi-head attention with q/k/v/out projections: self-attention, or cross-attention when
  `context` is given.

  Kernels keep heads as their own dimension, named for Megatron-style tensor parallelism:
  to_q / to_k / to_v are (embed, heads, kv) (column-parallel: each device computes whole
  heads) and to_out_0 is (heads, kv, embed) (row-parallel: one all-reduce per layer); FSDP
  shards `embed`. The names to_q, ..., to_out_0 are diffusers' (`to_out.0`), so that its
  weights convert one to one.
  """
  num_heads: int
  head_dim: int
  out_features: int | None = None  # output width; None: the query's width
  use_bias: bool = False           # bias on q/k/v (diffusers' `attention_bias`); out always has one
  implementation: str = "auto"     # "auto" | "einsum" | "xla" | "cudnn"
  precision: Any = None            # einsum matmul precision
  dropout_rate: float = 0.0        # on the output, as diffusers' to_out.1
  dtype: Any = jnp.float32         # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """x [B, Lq, Dq], context [B, Lk, Dk] (None: x) -> [B, Lq, out_features or Dq]."""
    context = x if context is None else context
    heads = (self.num_heads, self.head_dim)
    qkv_names = ("embed", "heads", "kv")
    q = _projection(heads, -1, qkv_names, self.dtype, self.use_bias, "to_q")(x)
    k = _projection(heads, -1, qkv_names, self.dtype, self.use_bias, "to_k")(context)
    v = _projection(heads, -1, qkv_names, self.dtype, self.use_bias, "to_v")(context)
    out = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation,
                                precision=self.precision)
    out = _projection((self.out_features or x.shape[-1],), (-2, -1), ("heads", "kv", "embed"),
                      self.dtype, True, "to_out_0")(out)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
