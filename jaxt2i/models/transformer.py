"""The DALL-E transformer: a decoder-only model of text tokens followed by image tokens, and
its sampling loop (Ramesh et al., 2021, Sec. 2.2 and App. B.1).

One stream per example: `text_len` sentencepiece ids, then the dVAE's grid_h x grid_w image
codes in raster order. Short captions are padded per the paper's scheme: the padding at text
position i is its own token, `text_vocab + i` (`pad_text`), so the model can tell padding
positions apart and an all-padding caption is the unconditional prompt of classifier-free
guidance (`unconditional_text`). Text and image tokens have separate embeddings; text
positions a learned position embedding, image positions learned row and column embeddings.
Pre-LN blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> GELU MLP ->
residual), each layer with its own sparse attention pattern (`paper_attention_patterns`, or
any list of "row" / "column" / "conv" / "dense"; jaxt2i/models/attention.py implements them).

Logits layout. Position p predicts the token at p + 1, so with T = text_len, N = grid_h *
grid_w:
  text_logits  [B, T - 1, text_vocab + T]: positions 0 .. T - 2, predicting text tokens
               1 .. T - 1 (padding included: the pad tokens are part of the text vocabulary);
  image_logits [B, N, image_vocab]: positions T - 1 .. T + N - 2, so image_logits[:, j] is the
               distribution of image token j given the text and image tokens before it.
The first text token is not predicted and the last position's output is unused. `loss`
weights the two cross-entropies 1/8 (text) and 7/8 (image), as the paper does.

Decoding keeps a static-shaped key/value cache per layer ([B, L, heads, head_dim], L = T + N):
`decode` runs a chunk of positions (the text prefix at once, then one image token per step)
and returns the image logits at its last position. `generate` samples every image token in one
`lax.fori_loop` (temperature, top-k, top-p, classifier-free guidance), with the cache or, as
the reference, recomputing the whole stream every step.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxt2i.models import layers
from jaxt2i.models.attention import PATTERNS, CausalSelfAttention, check_pattern

PyTree = Any


def paper_attention_patterns(depth: int) -> tuple[str, ...]:
  """The paper's per-layer patterns (App. B.1): 1-indexed layer i uses column attention if
  (i - 2) % 4 == 0, else row attention, and the last layer convolutional attention."""
  if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
    raise ValueError(f"transformer depth={depth!r} must be a positive int")
  patterns = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]
  patterns[-1] = "conv"
  return tuple(patterns)


def pad_text(tokens: Any, mask: Any, text_vocab: int) -> np.ndarray:
  """Tokenizer output (ids [B, T], mask [B, T], True = text) -> the stream's text tokens, with
  padding position i replaced by its own token text_vocab + i."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(f"text tokens {tokens.shape} and mask {mask.shape} must both be [B, T]")
  bad = tokens[mask & ((tokens < 0) | (tokens >= text_vocab))]
  if bad.size:
    raise ValueError(f"text token id {int(bad[0])} is outside the text vocabulary "
                     f"[0, {text_vocab})")
  pads = text_vocab + np.arange(tokens.shape[1], dtype=np.int32)
  return np.where(mask, tokens, pads[None]).astype(np.int32)


def unconditional_text(batch: int, text_len: int, text_vocab: int) -> jax.Array:
  """All-padding captions [batch, text_len]: the unconditional branch of guidance."""
  pads = text_vocab + jnp.arange(text_len, dtype=jnp.int32)
  return jnp.broadcast_to(pads, (batch, text_len))


def _dense(features: int, axes: tuple[str, str], dtype: Any, param_dtype: Any,
           name: str | None = None) -> nn.Dense:
  """layers.dense with a parameter dtype."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def _layer_norm(dtype: Any, param_dtype: Any, name: str | None = None) -> nn.LayerNorm:
  """layers.layer_norm (float32 two-pass statistics) with a parameter dtype."""
  return nn.LayerNorm(
      epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class Block(nn.Module):
  """Pre-LN transformer block: causal (sparse) self-attention, then a GELU MLP."""
  width: int
  num_heads: int
  mlp_dim: int
  text_len: int
  grid: tuple[int, int]
  pattern: str = "dense"
  kernel: int | tuple[int, int] = 11
  attention_implementation: str = "auto"
  precision: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict[str, jax.Array] | None = None,
               start: Any = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """x [B, L or S, width] -> (x, cache); see CausalSelfAttention for `cache` and `start`."""
    attn = CausalSelfAttention(
        self.num_heads, self.width // self.num_heads, self.text_len, self.grid, self.pattern,
        self.kernel, use_bias=True, implementation=self.attention_implementation,
        precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")
    h = _layer_norm(self.dtype, self.param_dtype, "norm1")(x)
    if cache is None:
      h = attn(h)
    else:
      h, cache = attn(h, cache, start)
    x = x + h
    h = _layer_norm(self.dtype, self.param_dtype, "norm2")(x)
    h = nn.gelu(_dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(h))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    x = x + _dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


REMAT_POLICIES = layers.REMAT_POLICIES


def scan_plan(patterns: Sequence[str]) -> tuple[tuple[str, ...], int]:
  """(period, repeats): the layer patterns as `repeats` copies of `period` followed by an
  unrolled rest, choosing the period that leaves the shortest rest (then the shortest
  period). The paper's pattern at depth 64 is (row, column, row, row) x 15 + 4 layers."""
  best, best_rest = (tuple(patterns), 1), len(patterns)  # (no repeat: nothing to scan)
  for p in range(1, len(patterns) // 2 + 1):
    period = tuple(patterns[:p])
    n = 1
    while tuple(patterns[n * p:(n + 1) * p]) == period:
      n += 1
    if n >= 2 and len(patterns) - n * p < best_rest:
      best, best_rest = (period, n), len(patterns) - n * p
  return best


class BlockGroup(nn.Module):
  """Consecutive blocks with the given patterns: the body `nn.scan` repeats."""
  patterns: tuple[str, ...]
  block: Any                                # Block or its nn.remat
  config: tuple[Any, ...]                   # the Block fields other than the pattern

  @nn.compact
  def __call__(self, x: jax.Array, cache: Any, start: Any) -> tuple[jax.Array, Any]:
    written = []
    for i, pattern in enumerate(self.patterns):
      width, heads, mlp, text_len, grid, kernel, impl, precision, dtype, pdtype = self.config
      x, layer_cache = self.block(width, heads, mlp, text_len, grid, pattern, kernel, impl,
                                  precision, dtype, pdtype, name=f"block_{i}")(
                                      x, None if cache is None else cache[i], start)
      written.append(layer_cache)
    return x, None if cache is None else tuple(written)


class Transformer(nn.Module):
  """Decoder-only text + image transformer (the module docstring has the stream and the logits
  layout); `variant()` gives standard sizes."""
  text_vocab: int                      # sentencepiece vocabulary; pads add text_len more ids
  image_vocab: int = 8192              # dVAE codebook size
  text_len: int = 256                  # T text tokens per stream
  grid: tuple[int, int] = (32, 32)     # image tokens (height, width), raster order
  width: int = 512                     # d_model
  depth: int = 8
  num_heads: int = 8                   # head size = width // num_heads
  mlp_ratio: int = 4                   # MLP hidden width = mlp_ratio * width
  # Per layer: "row" | "column" | "conv" | "dense"; None: paper_attention_patterns(depth).
  attention_patterns: Sequence[str] | None = None
  conv_kernel: int | tuple[int, int] = 11  # window of "conv" layers (odd); the paper's 11 x 11
  attention_implementation: str = "auto"   # "auto" | "einsum" | "xla" | "cudnn" | "splash"
  precision: Any = None                    # einsum attention matmul precision
  remat: bool = False                      # recompute each block's activations in backward
  remat_policy: str = "full"               # what remat keeps: "full" | "dots" | "dots_no_batch"
  # Layers as nn.scan over repeats of the pattern period (`scan_plan`): one compiled block
  # body instead of `depth`, so compile time stops growing with depth. Params of the scanned
  # layers are stacked ("layers" axis) under scan/block_i; the numbers are the unrolled ones.
  scan_layers: bool = False
  dtype: Any = jnp.float32                 # compute and cache dtype; logits are float32
  param_dtype: Any = jnp.float32

  @property
  def image_len(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def length(self) -> int:
    return self.text_len + self.grid[0] * self.grid[1]

  @property
  def patterns(self) -> tuple[str, ...]:
    if self.attention_patterns is None:
      return paper_attention_patterns(self.depth)
    return tuple(self.attention_patterns)

  def _check(self) -> None:
    for field in ("text_vocab", "image_vocab", "text_len", "width", "depth", "num_heads",
                  "mlp_ratio"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Transformer.{field}={value!r} must be a positive int")
    if self.width % self.num_heads:
      raise ValueError(f"Transformer.width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}")
    patterns = self.patterns
    if len(patterns) != self.depth:
      raise ValueError(f"Transformer.attention_patterns has {len(patterns)} entries for "
                       f"depth={self.depth}: give one pattern per layer")
    for pattern in patterns:
      if pattern not in PATTERNS:
        raise ValueError(f"Transformer.attention_patterns: {pattern!r} is unknown; choose "
                         f"from {PATTERNS}")
    check_pattern("conv", self.text_len, self.grid, self.conv_kernel)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"Transformer.remat_policy={self.remat_policy!r}: choose one of "
                       f"{sorted(REMAT_POLICIES)}")

  @property
  def plan(self) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    """(scanned period, repeats, unrolled rest); no scan: ((), 0, all patterns)."""
    patterns = self.patterns
    if not self.scan_layers:
      return (), 0, patterns
    period, n = scan_plan(patterns)
    if n < 2:
      return (), 0, patterns
    return period, n, patterns[len(period) * n:]

  def setup(self):
    self._check()
    embed_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
    self.text_embed = nn.Embed(self.text_vocab + self.text_len, self.width, dtype=self.dtype,
                               param_dtype=self.param_dtype, embedding_init=embed_init)
    self.image_embed = nn.Embed(self.image_vocab, self.width, dtype=self.dtype,
                                param_dtype=self.param_dtype, embedding_init=embed_init)

    def position(name, axis, size):
      return self.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                           (axis, "embed")),
                        (size, self.width), self.param_dtype)
    self.text_pos_embed = position("text_pos_embed", "length", self.text_len)
    self.row_embed = position("row_embed", "height", self.grid[0])
    self.col_embed = position("col_embed", "width", self.grid[1])
    block = (nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy],
                      prevent_cse=not self.scan_layers)  # scan already keeps CSE apart
             if self.remat else Block)
    fields = (self.width, self.num_heads, self.mlp_ratio * self.width, self.text_len,
              tuple(self.grid))
    rest = (self.conv_kernel, self.attention_implementation, self.precision, self.dtype,
            self.param_dtype)
    period, repeats, unrolled = self.plan
    self.scan = None
    if repeats:
      self.scan = nn.scan(BlockGroup, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast), length=repeats,
                          metadata_params={nn.PARTITION_NAME: "layers"})(
                              period, block, fields + rest)
    self.blocks = [block(*fields, pattern, *rest) for pattern in unrolled]
    self.final_norm = _layer_norm(self.dtype, self.param_dtype)
    self.text_head = _dense(self.text_vocab + self.text_len, ("embed", "vocab"), self.dtype,
                            self.param_dtype)
    self.image_head = _dense(self.image_vocab, ("embed", "vocab"), self.dtype, self.param_dtype)

  def _embed(self, tokens: jax.Array, positions: Any) -> jax.Array:
    """tokens [B, S] at stream positions [S] (ints or traced) -> [B, S, width].

    Ids are clipped to their vocabulary (a gather out of range would give NaN); `pad_text`
    checks captions on the host.
    """
    t, width = self.text_len, self.grid[1]
    positions = jnp.asarray(positions)
    image_pos = jnp.maximum(positions - t, 0)
    text = (self.text_embed(jnp.clip(tokens, 0, self.text_vocab + t - 1))
            + self.text_pos_embed[jnp.minimum(positions, t - 1)].astype(self.dtype))
    image = (self.image_embed(jnp.clip(tokens, 0, self.image_vocab - 1))
             + self.row_embed[jnp.minimum(image_pos // width, self.grid[0] - 1)].astype(self.dtype)
             + self.col_embed[image_pos % width].astype(self.dtype))
    x = jnp.where((positions < t)[None, :, None], text, image)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _stream(self, text: jax.Array, image: jax.Array) -> jax.Array:
    batch = text.shape[0]
    if text.ndim != 2 or text.shape[1] != self.text_len:
      raise ValueError(f"text tokens must be [B, {self.text_len}], got {text.shape}")
    if image.shape not in ((batch, self.image_len), (batch,) + tuple(self.grid)):
      raise ValueError(f"image tokens must be [{batch}, {self.image_len}] or "
                       f"[{batch}, {self.grid[0]}, {self.grid[1]}], got {image.shape}")
    return jnp.concatenate([text, image.reshape(batch, self.image_len)], axis=1)

  def features(self, text: jax.Array, image: jax.Array) -> jax.Array:
    """The final-normed states [B, L, width] of the stream (text, image)."""
    x = self._embed(self._stream(text, image), np.arange(self.length))
    if self.scan is not None:
      x, _ = self.scan(x, None, None)
    for block in self.blocks:
      x, _ = block(x)
    return self.final_norm(x)

  def __call__(self, text: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced logits of the whole stream.

    Args:
      text: padded text tokens [B, T] (`pad_text`).
      image: image tokens [B, N] or [B, grid_h, grid_w].

    Returns:
      (text_logits [B, T - 1, text_vocab + T], image_logits [B, N, image_vocab]), float32;
      see the module docstring for which token each predicts.
    """
    x = self.features(text, image)
    t = self.text_len
    text_logits = self.text_head(x[:, :t - 1])
    image_logits = self.image_head(x[:, t - 1:-1])
    return text_logits.astype(jnp.float32), image_logits.astype(jnp.float32)

  def image_logits_at(self, text: jax.Array, image: jax.Array, index: Any) -> jax.Array:
    """image_logits[:, index] from a full forward pass ([B, image_vocab], float32): the
    no-cache decoding step, which recomputes the whole stream."""
    x = self.features(text, image)
    x = jax.lax.dynamic_index_in_dim(x, self.text_len - 1 + index, axis=1, keepdims=False)
    return self.image_head(x).astype(jnp.float32)

  def decode(self, tokens: jax.Array, cache: Sequence[dict[str, jax.Array]],
             start: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], ...]]:
    """Runs positions start .. start + S - 1 against the cache of every earlier position.

    Args:
      tokens: [B, S] (the text prefix with start = 0, or one image token with start = T + j).
      cache: one {"k", "v"} per layer (`init_cache`).
      start: first position of `tokens`, an int or a traced scalar.

    Returns:
      (the image logits at the last position [B, image_vocab] float32, i.e. those of image
      token start + S - T, and the cache with these positions written).
    """
    period, repeats, unrolled = self.plan
    if len(cache) != len(period) + len(unrolled):
      raise ValueError(f"cache has {len(cache)} entries; this transformer takes "
                       f"{len(period) + len(unrolled)} (init_cache(model, batch))")
    x = self._embed(tokens, start + jnp.arange(tokens.shape[1]))
    written = []
    if self.scan is not None:
      x, stacked = self.scan(x, tuple(cache[:len(period)]), start)
      written.extend(stacked)
    for block, layer_cache in zip(self.blocks, cache[len(period):]):
      x, layer_cache = block(x, layer_cache, start)
      written.append(layer_cache)
    x = self.final_norm(x[:, -1])
    return self.image_head(x).astype(jnp.float32), tuple(written)


def scanned_params(params: PyTree, model: Transformer) -> PyTree:
  """Params of the unrolled layout (blocks_0 .. blocks_{depth-1}) in `model`'s layout, which
  may scan its layers (model.scan_layers): the repeats of each period layer stacked under
  scan/block_i, the rest renumbered. Lets a run switch scan_layers on for a checkpoint."""
  period, repeats, unrolled = model.plan
  if not repeats:
    return params
  p = len(period)
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  out["scan"] = {f"block_{i}": jax.tree.map(
      lambda *xs: jnp.stack(xs), *[params[f"blocks_{r * p + i}"] for r in range(repeats)])
      for i in range(p)}
  for j in range(len(unrolled)):
    out[f"blocks_{j}"] = params[f"blocks_{p * repeats + j}"]
  return out


def init_cache(model: Transformer, batch: int) -> tuple[dict[str, jax.Array], ...]:
  """An empty key/value cache for `batch` streams: per layer {"k", "v"} [B, L, heads,
  head_dim] in the model's dtype; with scan_layers, the scanned layers' caches come first,
  one per layer of the period, stacked over its repeats ([repeats, B, L, heads, head_dim])."""
  layer = CausalSelfAttention(model.num_heads, model.width // model.num_heads, model.text_len,
                              tuple(model.grid), dtype=model.dtype)
  period, repeats, unrolled = model.plan
  stacked = tuple(jax.tree.map(lambda x: jnp.broadcast_to(x, (repeats,) + x.shape),
                               layer.init_cache(batch)) for _ in period)
  return stacked + tuple(layer.init_cache(batch) for _ in unrolled)


def loss(text_logits: jax.Array, image_logits: jax.Array, text: jax.Array, image: jax.Array,
         text_weight: float = 1 / 8) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paper's objective: text_weight * mean text cross-entropy + (1 - text_weight) * mean
  image cross-entropy (Sec. 2.2: 1/8 and 7/8), each averaged over its own tokens.

  Args:
    text_logits, image_logits: `Transformer.__call__`'s outputs.
    text: the padded text tokens [B, T] (targets: text[:, 1:]).
    image: image tokens [B, N] or [B, grid_h, grid_w].
    text_weight: in [0, 1].

  Returns:
    (loss, {"text_loss", "image_loss"}), float32 scalars.
  """
  if not 0.0 <= text_weight <= 1.0:
    raise ValueError(f"text_weight={text_weight!r} must lie in [0, 1]")
  image = image.reshape(image.shape[0], -1)
  text_loss = jnp.zeros((), jnp.float32)
  if text_logits.shape[1]:  # a one-token text has nothing to predict
    text_loss = optax.softmax_cross_entropy_with_integer_labels(
        text_logits.astype(jnp.float32), text[:, 1:]).mean()
  image_loss = optax.softmax_cross_entropy_with_integer_labels(
      image_logits.astype(jnp.float32), image).mean()
  total = text_weight * text_loss + (1.0 - text_weight) * image_loss
  return total, {"text_loss": text_loss, "image_loss": image_loss}


def _check_sampling(temperature: Any, top_k: Any, top_p: Any) -> None:
  """Checks the settings that are concrete Python numbers (traced ones are taken as given)."""
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise ValueError(f"temperature={temperature!r} must be > 0 (top_k=1 samples greedily)")
  if isinstance(top_k, numbers.Real) and (top_k < 0 or int(top_k) != top_k):
    raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0: no top-k filter)")
  if isinstance(top_p, numbers.Real) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p!r} must lie in (0, 1] (1: no nucleus filter)")


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: Any = 1.0, top_k: Any = 0,
                  top_p: Any = 1.0) -> jax.Array:
  """One token per row of logits [B, V]: softmax(logits / temperature) restricted to the
  top_k most likely tokens (0: all) and then to the smallest set whose probability reaches
  top_p (nucleus sampling, Holtzman et al., 2020). Every setting may be traced; a Python
  top_k > 0 ranks only the top k (`lax.top_k`), a cheaper step than sorting the vocabulary."""
  _check_sampling(temperature, top_k, top_p)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  static_k = isinstance(top_k, numbers.Integral)
  if static_k and top_k == 0 and isinstance(top_p, numbers.Real) and top_p >= 1.0:
    return jax.random.categorical(rng, logits)
  if static_k and 0 < top_k < vocab:
    values, indices = jax.lax.top_k(logits, int(top_k))  # descending
    kept = jnp.ones(values.shape, bool)
  else:
    iota = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), logits.shape)
    negated, indices = jax.lax.sort_key_val(-logits, iota)
    values = -negated
    top_k = jnp.asarray(top_k)
    kept = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
  probs = jax.nn.softmax(jnp.where(kept, values, -jnp.inf), axis=-1)
  # A token stays while the mass before it is short of top_p: the most likely always does.
  kept &= jnp.cumsum(probs, axis=-1) - probs < top_p
  choice = jax.random.categorical(rng, jnp.where(kept, values, -jnp.inf))
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]


def generate(model: Transformer, params: PyTree, text: jax.Array, rng: jax.Array, *,
             num_samples: int = 1, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0,
             guidance_scale: Any = None, unconditional: jax.Array | None = None,
             use_cache: bool = True) -> jax.Array:
  """Samples image tokens for padded captions, the whole loop in one `lax.fori_loop`.

  Pure and jit-able (`jax.jit(functools.partial(generate, model, num_samples=4))`):
  temperature, top_k, top_p and guidance_scale may be traced.

  Args:
    model: the Transformer.
    params: its "params" collection.
    text: padded captions [P, T] (`pad_text`).
    rng: a PRNG key; step j samples with fold_in(rng, j), so a fixed key gives fixed images.
    num_samples: images per caption.
    temperature, top_k, top_p: see `sample_logits`.
    guidance_scale: None for plain sampling; else classifier-free guidance, with a batched
      unconditional branch: logits = uncond + scale * (cond - uncond).
    unconditional: padded captions [P, T] of that branch (e.g. a negative prompt); default
      all padding, the caption-dropout token sequence.
    use_cache: decode one token per step against the key/value cache; False recomputes the
      whole stream every step (the reference the cache is measured against).

  Returns:
    int32 image tokens [P, num_samples, grid_h, grid_w].
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} must be a positive int")
  _check_sampling(temperature, top_k, top_p)
  if text.ndim != 2 or text.shape[1] != model.text_len:
    raise ValueError(f"text tokens must be [P, {model.text_len}], got {text.shape}")
  batch = text.shape[0] * num_samples
  text = jnp.repeat(jnp.asarray(text, jnp.int32), num_samples, axis=0)
  guided = guidance_scale is not None
  if guided:
    if unconditional is None:
      uncond = unconditional_text(batch, model.text_len, model.text_vocab)
    else:
      if unconditional.shape != (text.shape[0] // num_samples, model.text_len):
        raise ValueError(f"unconditional text must be [P, {model.text_len}] like the captions, "
                         f"got {unconditional.shape}")
      uncond = jnp.repeat(jnp.asarray(unconditional, jnp.int32), num_samples, axis=0)
    text = jnp.concatenate([text, uncond])
  variables = {"params": params}
  steps = model.image_len

  def sample(logits, j):
    if guided:
      cond, uncond = jnp.split(logits, 2)
      logits = uncond + guidance_scale * (cond - uncond)
    return sample_logits(logits, jax.random.fold_in(rng, j), temperature, top_k,
                         top_p).astype(jnp.int32)

  def both_branches(tokens):
    return jnp.concatenate([tokens, tokens]) if guided else tokens

  tokens = jnp.zeros((batch, steps), jnp.int32)
  if use_cache:
    logits, cache = model.apply(variables, text, init_cache(model, text.shape[0]), 0,
                                method=Transformer.decode)

    def step(j, carry):
      tokens, logits, cache = carry
      token = sample(logits, j)
      logits, cache = model.apply(variables, both_branches(token)[:, None], cache,
                                  model.text_len + j, method=Transformer.decode)
      return tokens.at[:, j].set(token), logits, cache
    tokens, logits, _ = jax.lax.fori_loop(0, steps - 1, step, (tokens, logits, cache))
    tokens = tokens.at[:, steps - 1].set(sample(logits, steps - 1))
  else:
    def step(j, tokens):
      logits = model.apply(variables, text, both_branches(tokens), j,
                           method=Transformer.image_logits_at)
      return tokens.at[:, j].set(sample(logits, j))
    tokens = jax.lax.fori_loop(0, steps, step, tokens)
  return tokens.reshape(-1, num_samples, *model.grid)


VARIANTS: dict[str, dict[str, Any]] = {
    # The paper's 12-billion-parameter model: 64 layers, 62 heads of 64 (App. B.1).
    "paper": {"text_vocab": 16384, "image_vocab": 8192, "text_len": 256, "grid": (32, 32),
              "width": 3968, "depth": 64, "num_heads": 62},
    # CPU-sized, for tests and `runlocal` configs: every pattern once.
    "tiny": {"text_vocab": 32, "image_vocab": 16, "text_len": 4, "grid": (3, 4), "width": 32,
             "depth": 4, "num_heads": 4, "conv_kernel": 3,
             "attention_patterns": ("row", "column", "dense", "conv")},
}


def variant(name: str, **overrides: Any) -> Transformer:
  """A Transformer of a standard size ("paper", "tiny"), with fields overridden by keyword."""
  if name not in VARIANTS:
    raise ValueError(f"unknown Transformer variant {name!r}; choose one of {sorted(VARIANTS)}")
  return Transformer(**{**VARIANTS[name], **overrides})
