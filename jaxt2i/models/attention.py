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

DALL-E's sparse attention (Ramesh et al., 2021, Sec. 2.2 and App. B.1): `sparse_attention`
attends over one stream of `text_len` text tokens followed by an H x W grid of image tokens
in raster order. Attention is causal everywhere, text queries see text only, image queries
always see every text token, and among image tokens `pattern` keeps:

  dense   every earlier image token (plain causal attention);
  row     the earlier tokens of the query's own row;
  column  the earlier tokens of its own column;
  conv    the earlier tokens of the kernel_h x kernel_w window centred on it (rows
          r - kernel_h // 2 .. r, columns c - kernel_w // 2 .. c + kernel_w // 2; the paper
          uses 11 x 11 on a 32 x 32 grid).

`pattern_mask` builds the dense boolean mask of each pattern (the reference, also the mask
rows that KV-cache decoding uses). `sparse_attention` computes the same numbers without the
masked-out blocks: image queries are grouped by row (for `column`, by column: the paper's
transposed image states), and each group attends to the text keys and its own row's keys
(for `conv`, also the kernel_h // 2 rows above it); text queries attend causally to text.
On the einsum backend one softmax spans separate parts: the logits of all image queries
against the shared text keys (one matmul, not a copy of the text keys per row) and, for each
row offset o = 0 .. kernel_h // 2, against the row o above (one padded copy of the keys,
sliced per offset, rather than a halo gathered per row), each under a static [G, n, n]
mask; the parts share the row maximum and sum, and a flash-style gradient recomputes them.
Gathering [text + halo] key blocks per row instead copies every key ~7 times for conv and
runs narrow [n, T + K] matmuls; on the 2-core benchmark machine that made conv at 32 x 32
slower than dense masked attention, and the parts run it ~2x faster than dense. The jax.nn
backends take the gathered blocks ([B * G, T + K, H, D]) under each block's mask.
On TPUs (`auto` there, or `implementation="splash"` anywhere) `sparse_attention` runs the
pattern through JAX's Pallas splash-attention kernel (the block-sparse flash attention of
jax.experimental.pallas.ops.tpu): the stream is padded to a multiple of SPLASH_BLOCK, for
`column` the image tokens are put in column-major order (the paper's transposed states, so a
column is contiguous), and the kernel skips every SPLASH_BLOCK x SPLASH_BLOCK block of the
pattern's mask that is all False, in the forward and both backward kernels. Under a mesh it
runs inside `jax.shard_map` over the batch and heads axes of the logical rules (a Mosaic
kernel cannot be partitioned automatically). Elsewhere it runs in Pallas' interpret mode:
exact, slow, for tests.
`CausalSelfAttention` is the Linen module over it, with a static-shaped key/value cache for
one-token-at-a-time decoding.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.parallel.partitioning import fit_spec

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def cudnn_supported(q: jax.Array, k: jax.Array) -> bool:
  """Whether the cuDNN flash-attention kernel accepts these operands on this backend: half
  precision, a head size that is a multiple of 8 and at most 128, and even query and key
  lengths (its training kernels refuse odd ones, e.g. the U-Net's cross-attention to CLIP's
  77 text tokens: "Unsupported sequence length Q 4096, KV 77")."""
  head_dim = q.shape[-1]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.float16, jnp.bfloat16)
          and k.dtype == q.dtype and head_dim % 8 == 0 and head_dim <= 128
          and q.shape[-3] % 2 == 0 and k.shape[-3] % 2 == 0)


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


def block_plan(pairs: int, lq: int, lk: int) -> tuple[int, int]:
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


def _transposed(x):
  """x [..., a, b] as [..., b, a], materialised. XLA:CPU runs a product that contracts the
  left operand's major axis (ds^T q, the key gradients) as a generic dot, ~3x slower than a
  transpose copy followed by a plain one ([16, 32] blocks of [32, 32] x [32, 64], or
  [1024, 32]^T x [1024, 64], on the 2-core benchmark machine); the barrier keeps XLA from
  folding the transpose back into the product."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


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
  group, block = block_plan(pairs, lq, k.shape[1])
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
  group, block = block_plan(pairs, lq, lk)
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


def check_qkv(q, k, v, name: str) -> None:
  """Clear errors for q, k, v that are not [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D]."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{name} expects q, k, v of rank 4 [B, L, H, D], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"{name} shapes disagree: q {q.shape}, k {k.shape}, v {v.shape} "
                     "(expected [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D])")


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
  check_qkv(q, k, v, "attention")
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  backend = resolve_implementation(implementation, q, k)
  if backend == "einsum":
    return _einsum_attention(q, k, v, mask, precision)
  if backend == "cudnn" and not cudnn_supported(q, k):
    raise ValueError(
        f"attention implementation 'cudnn' needs a GPU, float16/bfloat16 operands, a head "
        f"size that is a multiple of 8 and <= 128 and even sequence lengths; got backend "
        f"{jax.default_backend()!r}, dtype {q.dtype}, head size {q.shape[-1]}, query / key "
        f"lengths {q.shape[-3]} / {k.shape[-3]}")
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
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_axes:]
    init = nn.initializers.lecun_normal(
        in_axis=tuple(range(self.in_axes)),
        out_axis=tuple(range(self.in_axes, self.in_axes + len(self.features))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                        in_shape + tuple(self.features), self.param_dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_axes)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.names[-len(self.features):]), tuple(self.features),
          self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _projection(features: tuple[int, ...], axis: int | tuple[int, ...], names: tuple[str, ...],
                dtype: Any, use_bias: bool, name: str,
                param_dtype: Any = jnp.float32) -> _Projection:
  in_axes = 1 if isinstance(axis, int) else len(axis)
  return _Projection(tuple(features), in_axes, tuple(names), use_bias, dtype, param_dtype,
                     name=name)


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


PATTERNS = ("dense", "row", "column", "conv")


def check_pattern(pattern: str, text_len: int, grid: tuple[int, int],
                  kernel: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Validated ((grid_h, grid_w), (kernel_h, kernel_w))."""
  if pattern not in PATTERNS:
    raise ValueError(f"attention pattern {pattern!r} is unknown; choose one of {PATTERNS}")
  if isinstance(text_len, bool) or not isinstance(text_len, (int, np.integer)) or text_len < 0:
    raise ValueError(f"text_len={text_len!r} must be an int >= 0")
  grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
  if len(grid) != 2 or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid):
    raise ValueError(f"grid={grid!r} must be two positive ints (height, width)")
  size = (kernel, kernel) if isinstance(kernel, (int, np.integer)) else tuple(kernel)
  if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 and s % 2
                               for s in size):
    raise ValueError(f"conv kernel={kernel!r} must be an odd positive int or two of them "
                     "(height, width): the window is centred on its query")
  return (int(grid[0]), int(grid[1])), (int(size[0]), int(size[1]))


def _allowed(query, key, pattern: str, text_len: int, grid: tuple[int, int],
             kernel: tuple[int, int]):
  """Whether stream position `query` may attend to position `key`: the definition every mask
  here comes from. Broadcasting integer arrays, numpy or jax (traced while decoding)."""
  causal = key <= query
  text_key = key < text_len
  if pattern == "dense":
    return causal
  width = grid[1]
  # Text keys have negative image indices; the `text_key |` below decides those.
  query_row, query_col = (query - text_len) // width, (query - text_len) % width
  key_row, key_col = (key - text_len) // width, (key - text_len) % width
  if pattern == "row":
    local = key_row == query_row
  elif pattern == "column":
    local = key_col == query_col
  else:  # conv: with `causal`, the window's rows above and its left half of the own row
    local = (query_row - key_row <= kernel[0] // 2) & (abs(key_col - query_col) <= kernel[1] // 2)
  return causal & (text_key | ((query >= text_len) & local))


def pattern_mask(pattern: str, text_len: int, grid: tuple[int, int],
                 kernel: int | tuple[int, int] = 11, positions: Any = None):
  """The dense boolean mask of a DALL-E attention pattern (the module docstring).

  Args:
    pattern: "dense", "row", "column" or "conv".
    text_len: T, the text tokens at the start of the stream.
    grid: (H, W) of the image tokens that follow, in raster order.
    kernel: the conv window, an odd int or (height, width); other patterns ignore it.
    positions: None for every query position (a numpy [L, L] mask, L = T + H * W), or an
      integer array [S] of query positions (possibly traced) for just those rows, as jax.

  Returns:
    bool [L, L] or [S, L]; True = may attend.
  """
  grid, kernel = check_pattern(pattern, text_len, grid, kernel)
  keys = np.arange(text_len + grid[0] * grid[1])
  if positions is None:
    return _allowed(keys[:, None], keys[None, :], pattern, text_len, grid, kernel)
  positions = jnp.asarray(positions)
  return _allowed(positions[:, None], jnp.asarray(keys)[None, :], pattern, text_len, grid,
                  kernel)


def _image_blocks(pattern: str, text_len: int, grid: tuple[int, int],
                  kernel: tuple[int, int]) -> tuple[int, np.ndarray]:
  """How sparse_attention groups the image: (halo, block mask [G or 1, n, T + K]).

  Groups are the G image rows (for `column`, columns) of n queries each. A group's K keys are
  its own row or, for `conv`, the `halo` rows above it and its own, after the T text keys
  (the order of `_key_blocks`); halo rows above the image are masked out.
  """
  positions = text_len + np.arange(grid[0] * grid[1]).reshape(grid)
  if pattern == "column":
    positions = positions.T
  groups, per_group = positions.shape
  halo = min(kernel[0] // 2, groups - 1) if pattern == "conv" else 0
  rows = np.arange(groups)[:, None] - halo + np.arange(halo + 1)[None, :]
  image_keys = positions[np.maximum(rows, 0)].reshape(groups, -1)
  keys = np.concatenate([np.broadcast_to(np.arange(text_len), (groups, text_len)), image_keys],
                        axis=1)
  valid = np.concatenate([np.ones((groups, text_len), bool),
                          np.repeat(rows >= 0, per_group, axis=1)], axis=1)
  mask = (_allowed(positions[:, :, None], keys[:, None, :], pattern, text_len, grid, kernel)
          & valid[:, None, :])
  if (mask == mask[:1]).all():
    mask = mask[:1]
  return halo, mask


def _key_blocks(x: jax.Array, text_len: int, grid: tuple[int, int], halo: int,
                column: bool) -> jax.Array:
  """Keys (or values) [B, H, L, D] -> each group's [B, H, G, T + (halo + 1) * n, D]: the text,
  then rows r - halo .. r (zeros above the image). Slices and a concatenation rather than a
  gather: on CPU they copy about twice as fast, and their gradient is a sum, not a scatter."""
  batch, heads, _, dim = x.shape
  image = x[:, :, text_len:].reshape(batch, heads, *grid, dim)
  if column:
    image = jnp.swapaxes(image, 2, 3)
  groups = image.shape[2]
  parts = [jnp.broadcast_to(x[:, :, None, :text_len], (batch, heads, groups, text_len, dim))]
  if halo:
    image = jnp.pad(image, ((0, 0), (0, 0), (halo, 0), (0, 0), (0, 0)))
  parts += [image[:, :, o:o + groups] for o in range(halo + 1)]
  return jnp.concatenate(parts, axis=3)


def _local_masks(halo: int, groups: int, width: int, band: int) -> np.ndarray:
  """[halo + 1, G, n, n] bool, static: which keys of the row `o` rows above (o = 0 .. halo)
  a query of row r may see, by (o, r, query column, key column). Within its own row a query
  sees the columns up to its own; above it, those within `band` of its own (the conv
  window's half-width; `width` for row and column, which have no rows above), and nothing
  above the image (r < o)."""
  query, key = np.arange(width)[:, None], np.arange(width)[None, :]
  near = np.abs(key - query) <= band
  rows = np.arange(groups)[:, None, None]
  return np.stack([np.broadcast_to(near & (key <= query), (groups, width, width)) if o == 0
                   else near & (rows >= o) for o in range(halo + 1)])


def _above(x, halo):
  """x [..., G, n, D] -> a function of a part (row offsets o, `_offset_parts`) giving, for
  each row, the keys of the rows o above it side by side ([..., G, len(part) * n, D], zeros
  above the image): slices of one padded copy, not a halo gathered per row."""
  groups = x.shape[-3]
  if halo:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(halo, 0), (0, 0), (0, 0)])

  def rows(part):
    slices = [x[..., halo - o:halo - o + groups, :, :] for o in part]
    return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-2)
  return rows


# Image keys per matmul of `_rows_logits`. Narrow rows: one [n, n] matmul per row offset
# is slow on XLA:CPU (16-wide rows: ~1.3x the forward + backward time of 48-96 keys); wide
# ones: one [n, 6 n] matmul over the whole conv halo is ~10% slower than three [n, 2 n]
# (32-wide rows). Measured for conv 11 x 11 on the 2-core benchmark machine, 16 .. 192 keys.
OFFSET_PART_KEYS = 64


def _offset_parts(halo, width):
  """Row offsets 0 .. halo in parts of consecutive offsets, whose keys one matmul takes:
  about OFFSET_PART_KEYS keys each (for narrow rows, a part of several rows' keys)."""
  size = max(1, OFFSET_PART_KEYS // width)
  return [tuple(range(o, min(o + size, halo + 1))) for o in range(0, halo + 1, size)]


def _rows_logits(q, kt, k_above, local, precision):
  """The logits of image queries q [..., G, n, D] (pre-scaled), in parts: against the text
  keys kt [..., T, D] ([..., G, n, T], one matmul for all rows: the text keys are shared,
  never copied per row) and, for each part of the row offsets 0 .. halo, against the keys of
  those rows above (`_above`; [..., G, n, len(part) * n], masked with finfo.min)."""
  halo, band = local
  masks = _local_masks(halo, *q.shape[-3:-1], band)
  text = jnp.einsum("...gqd,...td->...gqt", q, kt, precision=precision,
                    preferred_element_type=jnp.float32)
  rows = [jnp.where(np.concatenate([masks[o] for o in part], axis=-1), jnp.einsum(
      "...gqd,...gkd->...gqk", q, k_above(part), precision=precision,
      preferred_element_type=jnp.float32), jnp.finfo(jnp.float32).min)
          for part in _offset_parts(halo, q.shape[-2])]
  return text, rows


def _rows_forward_step(q, kt, vt, k, v, local, precision):
  """Image queries' attention over the parts of `_rows_logits`, which one softmax spans
  through a shared row maximum and sum, and its statistics (row max, 1 / row sum:
  [..., G, n])."""
  text, rows = _rows_logits(q, kt, _above(k, local[0]), local, precision)
  # Every query sees itself: the maximum is finite.
  peak = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in rows])
  if text.shape[-1]:
    peak = jnp.maximum(peak, jnp.max(text, axis=-1, keepdims=True))
  weights = jnp.exp(text - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("...gqt,...td->...gqd", weights, vt.astype(jnp.float32), precision=precision)
  v_above = _above(v.astype(jnp.float32), local[0])
  for part, x in zip(_offset_parts(local[0], q.shape[-2]), rows):
    weights = jnp.exp(x - peak)
    total = total + jnp.sum(weights, axis=-1, keepdims=True)
    out = out + jnp.einsum("...gqk,...gkd->...gqd", weights, v_above(part),
                           precision=precision)
  inv_total = 1.0 / total
  return (out * inv_total).astype(v.dtype), (peak[..., 0], inv_total[..., 0])


def _rows_backward_step(q, kt, vt, k, v, out, stats, dout, local, precision):
  """(dq, dkt, dvt, dk, dv) in float32 for `_rows_forward_step`, recomputing the
  probabilities from `stats`."""
  q, kt, vt, k, v, out, dout = (x.astype(jnp.float32) for x in (q, kt, vt, k, v, out, dout))
  peak, inv_total = (x[..., None] for x in stats)
  delta = jnp.sum(dout * out, axis=-1, keepdims=True)  # rowsum(p * dp)
  k_above, v_above = _above(k, local[0]), _above(v, local[0])
  text, rows = _rows_logits(q, kt, k_above, local, precision)
  p = jnp.exp(text - peak) * inv_total
  ds = p * (jnp.einsum("...gqd,...td->...gqt", dout, vt, precision=precision) - delta)
  dq = jnp.einsum("...gqt,...td->...gqd", ds, kt, precision=precision)
  groups, width = q.shape[-3:-1]

  def flat(x):  # [..., G, n, X] -> [..., G * n, X]
    return x.reshape(*x.shape[:-3], groups * width, x.shape[-1])
  dkt = jnp.einsum("...tq,...qd->...td", _transposed(flat(ds)), flat(q), precision=precision)
  dvt = jnp.einsum("...tq,...qd->...td", _transposed(flat(p)), flat(dout), precision=precision)
  dk = dv = 0.0

  def to_keys(x, part):
    """[..., G, len(part) * n, D]: per query row r, the gradients of key rows r - o -> the
    sum over the part's offsets o, each moved to its key row."""
    total = 0.0
    for i, o in enumerate(part):
      y = x[..., i * width:(i + 1) * width, :]
      if o:
        y = jnp.pad(y[..., o:, :, :], [(0, 0)] * (y.ndim - 3) + [(0, o), (0, 0), (0, 0)])
      total = total + y
    return total
  for part, x in zip(_offset_parts(local[0], width), rows):
    # Masked logits are finfo.min: p is exactly 0 there, and so is ds.
    p = jnp.exp(x - peak) * inv_total
    ds = p * (jnp.einsum("...gqd,...gkd->...gqk", dout, v_above(part), precision=precision)
              - delta)
    dq = dq + jnp.einsum("...gqk,...gkd->...gqd", ds, k_above(part), precision=precision)
    dk = dk + to_keys(jnp.einsum("...gkq,...gqd->...gkd", _transposed(ds), q,
                                 precision=precision), part)
    dv = dv + to_keys(jnp.einsum("...gkq,...gqd->...gkd", _transposed(p), dout,
                                 precision=precision), part)
  return dq, dkt, dvt, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _rows_flash(q, kt, vt, k, v, local, precision):
  """Image queries' attention (`_rows_forward_step`) over [P, G, n, D] groups, a cache-sized
  step of pairs at a time, with the flash-style gradient of `_flash`."""
  return _rows_flash_forward(q, kt, vt, k, v, local, precision)[0]


def _rows_group(q, kt, local):
  """(batch, head) pairs per step of `_rows_flash`: all of them in one step when their logits
  and, for conv, the shifted copies of their keys and values (`_above`) fit
  EINSUM_CHUNK_BYTES, else one. On the 2-core benchmark machine, steps of several pairs
  (lax.map's batch_size) ran conv slower than one pair per step: ~15% in forward + backward
  at 32 x 32 (4 pairs per step before). Row and column keep one step of all pairs: looping
  over them cost more than their logits missing the cache."""
  pairs, groups, width, dim = q.shape
  halo = local[0]
  pair_bytes = groups * width * (kt.shape[1] + (halo + 1) * width) * 4
  if halo:
    pair_bytes += 2 * groups * (halo + 1) * width * dim * 4
  return pairs if pairs * pair_bytes <= EINSUM_CHUNK_BYTES else 1


def _rows_flash_forward(q, kt, vt, k, v, local, precision):
  out, stats = _map_pairs(lambda a: _rows_forward_step(*a, local, precision),
                          _rows_group(q, kt, local), (q, kt, vt, k, v))
  return out, (q, kt, vt, k, v, out, stats)


def _rows_flash_backward(local, precision, residuals, dout):
  q, kt, vt, k, v, out, stats = residuals
  grads = _map_pairs(lambda a: _rows_backward_step(*a, local, precision),
                     _rows_group(q, kt, local), (q, kt, vt, k, v, out, stats, dout))
  return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, kt, vt, k, v)))


_rows_flash.defvjp(_rows_flash_forward, _rows_flash_backward)


def _attend_heads_first(q, k, v, mask, implementation, precision):
  """Attention over q [B, H, *G, Lq, D], k / v [B, H, *G, Lk, D] with a static boolean mask
  broadcastable to [B, H, *G, Lq, Lk]: the einsum backend takes this layout as it is; the
  jax.nn backends get theirs ([B * G, L, H, D])."""
  lq, dim = q.shape[-2:]
  lk = k.shape[-2]
  lead = q.shape[:-2]
  # Broadcast in the program, not in numpy: the constant stays the size of one block's mask.
  mask = jnp.broadcast_to(jnp.asarray(mask), lead + (lq, lk))
  if resolve_implementation(implementation, q, k) == "einsum":
    q = q * jnp.asarray(1.0 / np.sqrt(dim), q.dtype)
    out = _flash(q.reshape(-1, lq, dim), k.reshape(-1, lk, dim), v.reshape(-1, lk, dim),
                 mask.reshape(-1, lq, lk), precision)
    return out.reshape(lead + (lq, dim))
  heads = q.shape[1]
  q, k, v = (jnp.moveaxis(x, 1, -2).reshape(-1, x.shape[-2], heads, dim) for x in (q, k, v))
  mask = jnp.moveaxis(mask, 1, -3).reshape(-1, heads, lq, lk)
  out = dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                              precision=precision)
  return jnp.moveaxis(out.reshape(lead[:1] + lead[2:] + (lq, heads, dim)), -2, 1)


def _image_rows(x, text_len, grid, column):
  """The image tokens of x [B, L, H, D], heads first and grouped by row: [B, H, G, n, D]
  (for `column`, by column: the paper's transposed image states)."""
  batch, _, heads, dim = x.shape
  x = x[:, text_len:].reshape(batch, *grid, heads, dim)
  return jnp.transpose(x, (0, 3, 2, 1, 4) if column else (0, 3, 1, 2, 4))


SPARSE_IMPLEMENTATIONS = IMPLEMENTATIONS + ("splash",)
# Query and key block of the splash kernel: TPU tiles want multiples of 128.
SPLASH_BLOCK = 128


def resolve_sparse_implementation(implementation: str, q: jax.Array, k: jax.Array) -> str:
  """The backend `sparse_attention` runs: "splash" on TPUs under "auto", else as
  `resolve_implementation`."""
  if implementation not in SPARSE_IMPLEMENTATIONS:
    raise ValueError(f"sparse attention implementation {implementation!r} is unknown; choose "
                     f"one of {SPARSE_IMPLEMENTATIONS}")
  backend = jax.default_backend()
  if implementation == "splash" and backend not in ("tpu", "cpu"):
    raise ValueError(f"sparse attention implementation 'splash' is a TPU kernel (run in "
                     f"interpret mode on CPUs, for tests); on {backend!r} use 'auto'")
  if implementation == "splash" or (implementation == "auto" and backend == "tpu"):
    return "splash"
  return resolve_implementation(implementation, q, k)


def _stream_order(pattern: str, text_len: int, grid: tuple[int, int]) -> np.ndarray:
  """Stream positions in the order the splash kernel sees them: as they are, or for `column`
  the text then the image in column-major order."""
  image = np.arange(grid[0] * grid[1]).reshape(grid)
  image = image.T if pattern == "column" else image
  return np.concatenate([np.arange(text_len), text_len + image.reshape(-1)])


def _splash_length(length: int) -> int:
  """The stream length padded to a multiple of SPLASH_BLOCK."""
  return -(-length // SPLASH_BLOCK) * SPLASH_BLOCK


def _splash_mask(pattern: str, text_len: int, grid: tuple[int, int],
                 kernel: tuple[int, int]) -> np.ndarray:
  """The pattern's mask over the reordered stream, padded to a multiple of SPLASH_BLOCK."""
  order = _stream_order(pattern, text_len, grid)
  length = len(order)
  padded = _splash_length(length)
  mask = np.zeros((padded, padded), bool)
  mask[:length, :length] = pattern_mask(pattern, text_len, grid, kernel)[np.ix_(order, order)]
  pad = np.arange(length, padded)
  mask[pad, pad] = True  # padding queries see themselves: no empty softmax
  return mask


def splash_blocks(pattern: str, text_len: int, grid: tuple[int, int],
                  kernel: int | tuple[int, int] = 11) -> tuple[int, int]:
  """(blocks the splash kernel computes, blocks of the padded stream's full [L, L] logits):
  SPLASH_BLOCK x SPLASH_BLOCK blocks of the reordered mask with any True entry. Their ratio is
  the FLOP ratio the kernel can realise against dense attention: at 32 text + 32 x 32 image
  tokens 81 / 17 for row and column, 81 / 30 for the 11 x 11 conv and 81 / 45 for causal
  dense (against query-key pair ratios of 16.75, 16.75 and 4.84: 128-token blocks are
  coarser than a 32-token row)."""
  grid, kernel = check_pattern(pattern, text_len, grid, kernel)
  mask = _splash_mask(pattern, text_len, grid, kernel)
  n = mask.shape[0] // SPLASH_BLOCK
  kept = mask.reshape(n, SPLASH_BLOCK, n, SPLASH_BLOCK).any(axis=(1, 3))
  return int(kept.sum()), n * n


@functools.lru_cache(maxsize=32)
def _splash_kernel(pattern: str, text_len: int, grid: tuple[int, int], kernel: tuple[int, int],
                   heads: int, interpret: bool):
  """The splash kernel of a pattern over `heads` heads of the reordered, padded stream (its
  block tables are built in numpy once per pattern and shape)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  mask = _splash_mask(pattern, text_len, grid, kernel)
  blocks = {name: SPLASH_BLOCK for name in (
      "block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
      "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")}
  # Its block tables become concrete arrays even when first built inside a trace: the
  # cached kernel outlives that trace.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.NumpyMask(mask)] * heads),
        block_sizes=splash.BlockSizes(**blocks), head_shards=1, q_seq_shards=1,
        interpret=interpret)


def _splash_attention(q, k, v, pattern, text_len, grid, kernel):
  """`sparse_attention` on the splash kernel (module docstring), [B, L, H, D] in and out."""
  order = _stream_order(pattern, text_len, grid)
  inverse = np.argsort(order)
  length = len(order)
  padded = _splash_length(length)
  interpret = jax.default_backend() != "tpu"
  scale = jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)

  def local(q, k, v):  # [b, L, h, D] on one device
    splash_fn = _splash_kernel(pattern, text_len, grid, kernel, q.shape[2], interpret)

    def heads_first(x):  # -> [b, h, padded, D], reordered
      x = x if pattern != "column" else x[:, order]
      x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
      return jnp.swapaxes(x, 1, 2)
    out = jax.vmap(splash_fn)(heads_first(q * scale), heads_first(k), heads_first(v))
    out = jnp.swapaxes(out, 1, 2)[:, :length]
    return (out if pattern != "column" else out[:, inverse]).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, k, v)
  # Batch and heads split as the logical rules say (the axes that divide them); the stream
  # stays whole on each device.
  batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  spec = fit_spec(jax.sharding.PartitionSpec(batch_axes, None, head_axes), q.shape, mesh, [])
  return jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, pattern: str, text_len: int,
                     grid: tuple[int, int], kernel: int | tuple[int, int] = 11,
                     implementation: str = "auto", precision: Any = None) -> jax.Array:
  """Self-attention under a DALL-E pattern, computing only the blocks the mask keeps.

  Equals `dot_product_attention(q, k, v, mask=pattern_mask(pattern, text_len, grid,
  kernel))` (values and gradients, to float rounding); see the module docstring for the
  patterns and the blocks.

  Args:
    q, k, v: [B, L, H, D], L = text_len + grid_h * grid_w (the text, then the image in raster
      order).
    pattern: "dense", "row", "column" or "conv".
    text_len: T.
    grid: (grid_h, grid_w).
    kernel: the conv window, an odd int or (height, width).
    implementation: as `dot_product_attention`, for every block, or "splash" (the module
      docstring; what "auto" runs on TPUs).
    precision: as `dot_product_attention`.

  Returns:
    [B, L, H, D] in q's dtype.
  """
  grid, size = check_pattern(pattern, text_len, grid, kernel)
  length = text_len + grid[0] * grid[1]
  if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape or q.shape[1] != length:
    raise ValueError(f"sparse self-attention over {text_len} text + {grid[0]}x{grid[1]} image "
                     f"tokens expects q, k, v of one shape [B, {length}, H, D], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if resolve_sparse_implementation(implementation, q, k) == "splash":
    return _splash_attention(q, k, v, pattern, text_len, grid, size)
  if pattern == "dense":
    return dot_product_attention(q, k, v, mask=pattern_mask(pattern, text_len, grid),
                                 implementation=implementation, precision=precision)
  batch, _, heads, dim = q.shape
  column = pattern == "column"
  causal = np.tril(np.ones((text_len, text_len), bool))
  if resolve_implementation(implementation, q, k) == "einsum":
    groups, width = (grid[1], grid[0]) if column else grid
    local = ((min(size[0] // 2, groups - 1), size[1] // 2) if pattern == "conv"
             else (0, width))
    scaled = q * jnp.asarray(1.0 / np.sqrt(dim), q.dtype)
    # Heads first, each part transposed straight from the input in the layout its matmuls
    # take; the barrier keeps one copy of the image queries for both the text and the row
    # products. Transposing the whole stream and slicing it instead let XLA repeat the
    # transpose in each consumer: 10-15% more forward time on the 2-core benchmark machine.
    (qi, ki, vi), (qt, kt, vt) = jax.lax.optimization_barrier((
        [_image_rows(x, text_len, grid, column).reshape(batch * heads, groups, width, dim)
         for x in (scaled, k, v)],
        [jnp.swapaxes(x[:, :text_len], 1, 2) for x in (q, k, v)]))
    out = _rows_flash(qi, *(x.reshape(batch * heads, text_len, dim) for x in (kt, vt)), ki, vi,
                      local, precision).reshape(batch, heads, groups, width, dim)
  else:
    qi = _image_rows(q, text_len, grid, column)
    # Heads first, once: building [B, L, H, D] blocks and transposing them instead would
    # move every duplicated halo and text key three times.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    halo, mask = _image_blocks(pattern, text_len, grid, size)
    ki, vi = (_key_blocks(x, text_len, grid, halo, column) for x in (k, v))
    out = _attend_heads_first(qi, ki, vi, mask, implementation, precision)
    qt, kt, vt = (x[:, :, :text_len] for x in (q, k, v))
  if column:
    out = jnp.swapaxes(out, 2, 3)
  out = out.reshape(batch, heads, -1, dim)
  if text_len:
    text = _attend_heads_first(qt, kt, vt, causal, implementation, precision)
    out = jnp.concatenate([text, out], axis=2)
  return jnp.swapaxes(out, 1, 2)


class CausalSelfAttention(nn.Module):
  """Causal self-attention over a text + image token stream with a DALL-E sparsity pattern
  (`sparse_attention`), and key/value-cache decoding.

  Projections and their logical names are `Attention`'s (to_q / to_k / to_v (embed, heads,
  kv), to_out_0 (heads, kv, embed)). The cache is {"k", "v"}: [B, L, heads, head_dim] each,
  static-shaped over the whole stream (`init_cache`); a decoding call writes its positions'
  keys and values and attends densely over the cache with those positions' rows of
  `pattern_mask`, which also hide the slots not yet written (they lie in the future).
  """
  num_heads: int
  head_dim: int
  text_len: int                          # T text tokens, then the image grid
  grid: tuple[int, int]                  # (height, width) of the image tokens, raster order
  pattern: str = "dense"                 # "dense" | "row" | "column" | "conv"
  kernel: int | tuple[int, int] = 11     # conv window (odd); the paper's 11 x 11
  use_bias: bool = False                 # bias on q/k/v; the output projection always has one
  implementation: str = "auto"           # "auto" | "einsum" | "xla" | "cudnn" | "splash"
  precision: Any = None                  # einsum matmul precision
  dtype: Any = jnp.float32               # compute (and cache) dtype
  param_dtype: Any = jnp.float32

  @property
  def length(self) -> int:
    return self.text_len + self.grid[0] * self.grid[1]

  def init_cache(self, batch: int) -> dict[str, jax.Array]:
    """An empty cache for `batch` streams."""
    shape = (batch, self.length, self.num_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict[str, jax.Array] | None = None,
               start: Any = None) -> Any:
    """The whole stream, or a decoding chunk.

    Args:
      x: [B, L, width] (the whole stream) or, with `cache`, [B, S, width]: positions
        start .. start + S - 1.
      cache: None, or the layer's cache (`init_cache`) holding every earlier position.
      start: the first position of `x` when decoding; an int or a traced scalar.

    Returns:
      [B, L, out] without a cache; with one, ([B, S, out], the cache with x's positions
      written).
    """
    check_pattern(self.pattern, self.text_len, self.grid, self.kernel)
    heads = (self.num_heads, self.head_dim)
    qkv_names = ("embed", "heads", "kv")
    q, k, v = (_projection(heads, -1, qkv_names, self.dtype, self.use_bias, name,
                           self.param_dtype)(x) for name in ("to_q", "to_k", "to_v"))
    if cache is None:
      if x.shape[1] != self.length:
        raise ValueError(f"self-attention over {self.text_len} text + {self.grid[0]}x"
                         f"{self.grid[1]} image tokens got a stream of {x.shape[1]}")
      out = sparse_attention(q, k, v, pattern=self.pattern, text_len=self.text_len,
                             grid=self.grid, kernel=self.kernel,
                             implementation=self.implementation, precision=self.precision)
    else:
      if start is None:
        raise ValueError("decoding with a cache needs `start`, the position of x's first token")
      index = (0, start, 0, 0)
      cache = {name: jax.lax.dynamic_update_slice(cache[name], y.astype(cache[name].dtype),
                                                  index) for name, y in (("k", k), ("v", v))}
      cache = {name: nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
               for name, y in cache.items()}
      mask = pattern_mask(self.pattern, self.text_len, self.grid, self.kernel,
                          positions=start + jnp.arange(x.shape[1]))
      # One query row per step: the dense backends (splash serves whole streams).
      implementation = "auto" if self.implementation == "splash" else self.implementation
      out = dot_product_attention(q, cache["k"], cache["v"], mask=mask,
                                  implementation=implementation, precision=self.precision)
    out = _projection((x.shape[-1],), (-2, -1), ("heads", "kv", "embed"), self.dtype, True,
                      "to_out_0", self.param_dtype)(out)
    return out if cache is None else (out, cache)
