"""The DALL-E transformer: sparse attention masks and their blocked implementation, KV-cache
decoding against the full forward pass, sampling, gradients and sharding."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxt2i.models import attention
from jaxt2i.models import transformer as tr
from jaxt2i.parallel import mesh as mesh_lib
from jaxt2i.parallel import partitioning

MODEL = tr.variant("tiny")  # T = 4 text tokens, a 3 x 4 image grid, one layer per pattern
# Sampling does not depend on the layers' patterns (decoding parity is tested on MODEL): one
# layer keeps the compiled loops small.
GEN_MODEL = tr.variant("tiny", depth=1, attention_patterns=("conv",))
BATCH = 4
_forward = jax.jit(MODEL.apply)
_gen_forward = jax.jit(GEN_MODEL.apply)


def _naive_mask(pattern, text_len, grid, kernel):
  """The patterns as the paper's figure draws them, one (query, key) pair at a time."""
  height, width = grid
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  length = text_len + height * width
  mask = np.zeros((length, length), bool)
  for p in range(length):
    for j in range(p + 1):
      if j < text_len:
        mask[p, j] = True
        continue
      if p < text_len:
        continue
      (qr, qc), (kr, kc) = divmod(p - text_len, width), divmod(j - text_len, width)
      mask[p, j] = {"dense": True, "row": kr == qr, "column": kc == qc,
                    "conv": qr - kr <= kh // 2 and abs(kc - qc) <= kw // 2}[pattern]
  return mask


def test_mask_structure_on_a_tiny_stream():
  # T = 2, 3 x 3 grid: positions 0, 1 are text, 2 + 3r + c is image token (r, c).
  masks = {p: attention.pattern_mask(p, 2, (3, 3), kernel=3) for p in attention.PATTERNS}
  for pattern, mask in masks.items():
    assert mask.shape == (11, 11) and mask.dtype == bool
    assert not mask[0, 1] and mask[1, 0] and mask[1, 1]  # text: causal, text only
    assert mask[2:, :2].all()                            # image sees all text
    assert not mask[np.triu_indices(11, 1)].any()        # causal everywhere
    np.testing.assert_array_equal(mask, _naive_mask(pattern, 2, (3, 3), 3), err_msg=pattern)
  assert masks["dense"][np.tril_indices(11)].all()
  row, column, conv = masks["row"], masks["column"], masks["conv"]
  # (1, 2) = position 7: its row is positions 5, 6, 7; its column 4, 7.
  assert row[7, 5] and row[7, 6] and not row[7, 4] and not row[7, 3]
  assert column[7, 4] and not column[7, 5] and not column[7, 6] and not column[7, 3]
  # 3 x 3 window around (1, 1) = position 6: (0, 0..2) = 2, 3, 4 and (1, 0) = 5.
  assert conv[6, 2:7].all()
  # (2, 0) = position 8: rows 1-2 of columns 0-1 only: (1, 0) = 5, (1, 1) = 6, not (0, *).
  assert conv[8, 5] and conv[8, 6] and not conv[8, 7] and not conv[8, 2:5].any()
  # (2, 2) = position 10: (1, 1..2) = 6, 7 and (2, 1) = 9; not (1, 0) or (2, 0).
  assert conv[10, [6, 7, 9, 10]].all() and not conv[10, [5, 8]].any()
  # Traced rows (decoding) are the same rows.
  rows = jax.jit(lambda p: attention.pattern_mask("conv", 2, (3, 3), 3, positions=p))(
      jnp.array([6, 10]))
  np.testing.assert_array_equal(rows, conv[[6, 10]])


def _numpy_attention_vjp(q, k, v, mask, dout):
  """Dense masked attention and its gradient in float64 numpy: out, (dq, dk, dv)."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  scale = 1 / np.sqrt(q.shape[-1])
  logits = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  dp = np.einsum("bqhd,bkhd->bhqk", dout, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
  return out, (np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q),
               np.einsum("bhqk,bqhd->bkhd", p, dout))


# (text_len, grid, kernel): non-square grids and windows, windows wider or taller than the
# grid (clipped at its edges), a one-column window, no text. (The 3 x 3 grid of the mask test
# is covered there.)
SPARSE_CASES = [(3, (4, 5), (3, 5)), (0, (5, 2), 5), (5, (2, 6), 11), (1, (6, 3), (5, 1))]


@pytest.mark.parametrize("pattern", ["row", "column", "conv", "dense"])
def test_sparse_attention_equals_dense_masked(pattern):
  rng = np.random.default_rng(0)
  for text_len, grid, kernel in SPARSE_CASES[:1] if pattern == "dense" else SPARSE_CASES:
    length = text_len + grid[0] * grid[1]
    q, k, v, g = (rng.standard_normal((2, length, 3, 4)).astype(np.float32) for _ in range(4))
    mask = attention.pattern_mask(pattern, text_len, grid, kernel)
    np.testing.assert_array_equal(mask, _naive_mask(pattern, text_len, grid, kernel))

    def sparse(q, k, v, text_len=text_len, grid=grid, kernel=kernel):
      out, vjp = jax.vjp(functools.partial(
          attention.sparse_attention, pattern=pattern, text_len=text_len, grid=grid,
          kernel=kernel), q, k, v)
      return out, vjp(g)
    out, grads = jax.jit(sparse)(q, k, v)
    want_out, want_grads = _numpy_attention_vjp(q, k, v, mask, g)
    case = f"{pattern} text_len={text_len} grid={grid} kernel={kernel}"
    np.testing.assert_allclose(out, want_out, atol=1e-5, err_msg=case)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=case)


def test_splash_backend_equals_dense_masked():
  # JAX's splash-attention kernel (the TPU backend) in Pallas' interpret mode on this CPU:
  # 4 text + 16 x 20 image tokens pad to three 128-token blocks, so the kernel skips blocks.
  # Column (reordered to column-major) and conv (several rows per block); the model test below
  # runs every pattern of the tiny transformer through it.
  rng = np.random.default_rng(1)
  text_len, grid, kernel = 4, (16, 20), (5, 7)
  length = text_len + grid[0] * grid[1]
  q, k, v, g = (rng.standard_normal((2, length, 2, 8)).astype(np.float32) for _ in range(4))
  for pattern in ("column", "conv"):
    def splash(q, k, v, pattern=pattern):
      out, vjp = jax.vjp(functools.partial(
          attention.sparse_attention, pattern=pattern, text_len=text_len, grid=grid,
          kernel=kernel, implementation="splash"), q, k, v)
      return out, vjp(g)
    out, grads = jax.jit(splash)(q, k, v)
    want_out, want_grads = _numpy_attention_vjp(
        q, k, v, attention.pattern_mask(pattern, text_len, grid, kernel), g)
    np.testing.assert_allclose(out, want_out, atol=1e-5, err_msg=pattern)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=pattern)


def test_splash_backend_under_a_mesh_splits_batch_and_heads():
  mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = partitioning.logical_axis_rules("fsdp_tp")
  rng = np.random.default_rng(2)
  text_len, grid = 3, (4, 5)
  q, k, v = (rng.standard_normal((4, 23, 4, 8)).astype(np.float32) for _ in range(3))
  # Batch 3 divides no batch axis: it stays whole, the heads still split.
  for x in (q, k, v), tuple(y[:3] for y in (q, k, v)):
    want = attention.sparse_attention(*x, pattern="column", text_len=text_len, grid=grid)
    fn = functools.partial(attention.sparse_attention, pattern="column", text_len=text_len,
                           grid=grid, implementation="splash")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      lowered = jax.jit(fn).lower(*x)
      got = lowered.compile()(*x)
    assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_splash_skips_the_blocks_the_pattern_masks(monkeypatch):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_mask as mask_lib, splash_attention_mask_info as mask_info)
  # The kernel's own block table agrees with splash_blocks: a block is computed iff some
  # query in it may attend to some key in it.
  for pattern, expected in (("row", 17), ("column", 17), ("conv", 30), ("dense", 45)):
    assert attention.splash_blocks(pattern, 32, (32, 32)) == (expected, 81)
    info, _ = mask_info.process_mask(
        mask_lib.MultiHeadMask([mask_lib.NumpyMask(attention._splash_mask(
            pattern, 32, (32, 32), (11, 11)))]),
        (attention.SPLASH_BLOCK, attention.SPLASH_BLOCK))
    assert int(np.count_nonzero(info.block_mask)) == expected, pattern
  # "auto" picks it on TPUs only; the generic entry point does not know it.
  q = jnp.zeros((1, 8, 1, 4))
  assert attention.resolve_sparse_implementation("auto", q, q) == "einsum"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.resolve_sparse_implementation("auto", q, q) == "splash"
  with pytest.raises(ValueError, match="'flash' is unknown; choose one of"):
    attention.resolve_sparse_implementation("flash", q, q)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="'splash' is a TPU kernel.*on 'gpu' use 'auto'"):
    attention.resolve_sparse_implementation("splash", q, q)


def test_bad_patterns_are_named():
  q = jnp.zeros((1, 11, 2, 4))
  with pytest.raises(ValueError, match="'diagonal' is unknown"):
    attention.sparse_attention(q, q, q, pattern="diagonal", text_len=2, grid=(3, 3))
  with pytest.raises(ValueError, match=r"kernel=4 must be an odd"):
    attention.pattern_mask("conv", 2, (3, 3), kernel=4)
  with pytest.raises(ValueError, match=r"grid=\(3, 0\)"):
    attention.pattern_mask("row", 2, (3, 0))
  with pytest.raises(ValueError, match=r"\[B, 12, H, D\], got \(1, 11, 2, 4\)"):
    attention.sparse_attention(q, q, q, pattern="row", text_len=3, grid=(3, 3))


def test_paper_layer_patterns():
  assert tr.paper_attention_patterns(8) == (
      "row", "column", "row", "row", "row", "column", "row", "conv")
  patterns = tr.paper_attention_patterns(64)
  assert [i + 1 for i, p in enumerate(patterns) if p == "column"] == list(range(2, 63, 4))
  assert patterns[-1] == "conv" and patterns.count("row") == 64 - 16 - 1
  assert tr.paper_attention_patterns(1) == ("conv",)
  assert tr.Transformer(text_vocab=8, depth=3).patterns == ("row", "column", "conv")
  with pytest.raises(ValueError, match="depth=0"):
    tr.paper_attention_patterns(0)


def test_pad_text_gives_each_position_its_own_pad():
  ids = np.array([[5, 6, 3, 0], [1, 2, 3, 4]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(tr.pad_text(ids, mask, 10), [[5, 6, 3, 13], [1, 2, 3, 4]])
  np.testing.assert_array_equal(tr.unconditional_text(2, 4, 10), [[10, 11, 12, 13]] * 2)
  with pytest.raises(ValueError, match="text token id 12 is outside"):
    tr.pad_text([[12, 0]], [[1, 0]], 10)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([1, 2, 4, 3])[:BATCH]
  mask = np.arange(MODEL.text_len)[None] < lengths[:, None]
  text = tr.pad_text(rng.integers(0, MODEL.text_vocab, (BATCH, MODEL.text_len)), mask,
                     MODEL.text_vocab)
  image = rng.integers(0, MODEL.image_vocab, (BATCH, *MODEL.grid))
  return jnp.asarray(text), jnp.asarray(image, jnp.int32)


def _boxed(model):
  return jax.eval_shape(model.init, jax.random.key(0), *_inputs())["params"]


def _draw(boxed):
  """Random params drawn with numpy (a jitted init would compile for longer than the tests
  run), large enough that every token and position moves the logits."""
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:2] if path[-2].key == "to_out_0" else leaf.shape[:-1])
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
    base = 1.0 if name == "scale" else 0.0
    scale = 0.1 if name in ("scale", "bias") else 1.0
    return jnp.asarray(base + scale * rng.standard_normal(leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, partitioning.unbox(boxed))


@pytest.fixture(scope="module")
def boxed():
  return _boxed(MODEL)


@pytest.fixture(scope="module")
def params(boxed):
  return _draw(boxed)


@pytest.fixture(scope="module")
def gen_params():
  return _draw(_boxed(GEN_MODEL))


def test_forward_shapes_and_logical_axes(boxed, params):
  text, image = _inputs()
  text_logits, image_logits = _forward({"params": params}, text, image)
  assert text_logits.shape == (BATCH, 3, 32 + 4) and image_logits.shape == (BATCH, 12, 16)
  assert text_logits.dtype == image_logits.dtype == jnp.float32
  known = {n for n, _ in partitioning.STRATEGIES["fsdp_tp"]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= known, (
        jax.tree_util.keystr(path), leaf.names)
  half = jax.eval_shape(tr.variant("tiny", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).init,
                        jax.random.key(0), text, image)["params"]
  assert {x.dtype for x in jax.tree.leaves(partitioning.unbox(half))} == {jnp.dtype(jnp.bfloat16)}
  # Image logits at j depend on image tokens before j only; text logits on no image token.
  changed = image.at[:, 1, 2].set((image[:, 1, 2] + 1) % MODEL.image_vocab)  # token 6
  text2, image2 = _forward({"params": params}, text, changed)
  np.testing.assert_array_equal(text2, text_logits)
  np.testing.assert_array_equal(image2[:, :7], image_logits[:, :7])
  assert np.abs(image2[:, 7:] - image_logits[:, 7:]).max() > 1e-3


def test_cached_decoding_matches_forward_at_every_image_position(params):
  text, image = _inputs()
  _, expected = _forward({"params": params}, text, image)
  decode = jax.jit(functools.partial(MODEL.apply, method=tr.Transformer.decode))
  variables = {"params": params}
  cache = tr.init_cache(MODEL, BATCH)
  assert len(cache) == 4 and cache[0]["k"].shape == cache[3]["v"].shape == (BATCH, 16, 4, 8)
  logits, cache = decode(variables, text, cache, 0)
  got = [logits]
  flat = image.reshape(BATCH, -1)
  for j in range(MODEL.image_len - 1):
    logits, cache = decode(variables, flat[:, j:j + 1], cache, jnp.int32(MODEL.text_len + j))
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, axis=1), expected, atol=1e-5, rtol=1e-5)


def test_splash_model_matches_default_and_decodes(params):
  # The whole model on the splash backend; decoding (one query per step) takes the default.
  model = MODEL.clone(attention_implementation="splash")
  text, image = _inputs()
  want = _forward({"params": params}, text, image)
  got = jax.jit(model.apply)({"params": params}, text, image)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  decode = jax.jit(functools.partial(model.apply, method=tr.Transformer.decode))
  logits, _ = decode({"params": params}, text, tr.init_cache(model, BATCH), 0)
  np.testing.assert_allclose(logits, want[1][:, 0], atol=1e-5, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _generator(guided: bool, use_cache: bool):
  def run(params, text, rng, temperature, top_k, top_p, scale, uncond):
    return tr.generate(GEN_MODEL, params, text, rng, num_samples=2, temperature=temperature,
                       top_k=top_k, top_p=top_p, guidance_scale=scale if guided else None,
                       unconditional=uncond if guided else None, use_cache=use_cache)
  return jax.jit(run)


def _empty(n):
  return tr.unconditional_text(n, GEN_MODEL.text_len, GEN_MODEL.text_vocab)


def _generate(params, text, seed, *, temperature=1.0, top_k=0, top_p=1.0, scale=None,
              uncond=None, use_cache=True):
  return np.asarray(_generator(scale is not None, use_cache)(
      params, text, jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k),
      jnp.float32(top_p), jnp.float32(1.0 if scale is None else scale),
      _empty(len(text)) if uncond is None else uncond))


def _is_greedy(params, text, tokens, scale=None, uncond=None):
  """Whether every sampled token is the argmax of its logits given the tokens before it (the
  greedy sequence is the only one that is); with `scale`, of the guided logits."""
  flat = tokens.reshape(-1, GEN_MODEL.image_len)
  text = jnp.repeat(text, tokens.shape[1], axis=0)
  _, logits = _gen_forward({"params": params}, text, flat)
  if scale is not None:
    uncond = jnp.repeat(_empty(len(tokens)) if uncond is None else uncond, tokens.shape[1], 0)
    _, uncond = _gen_forward({"params": params}, uncond, flat)
    logits = uncond + scale * (logits - uncond)
  return np.array_equal(np.asarray(logits).argmax(-1), flat)


def test_generate_sampling_settings(gen_params):
  text, _ = _inputs()
  text = text[:2]
  sampled = _generate(gen_params, text, 0)
  assert sampled.shape == (2, 2, *GEN_MODEL.grid) and sampled.dtype == np.int32
  assert ((sampled >= 0) & (sampled < GEN_MODEL.image_vocab)).all()
  np.testing.assert_array_equal(_generate(gen_params, text, 0), sampled)  # deterministic
  assert not np.array_equal(_generate(gen_params, text, 1), sampled)
  assert not np.array_equal(sampled[:, 0], sampled[:, 1])  # samples of one prompt differ
  assert not _is_greedy(gen_params, text, sampled)

  greedy = _generate(gen_params, text, 0, top_k=1)
  assert _is_greedy(gen_params, text, greedy)
  np.testing.assert_array_equal(_generate(gen_params, text, 5, top_k=1), greedy)
  np.testing.assert_array_equal(_generate(gen_params, text, 0, top_p=1e-6), greedy)
  np.testing.assert_array_equal(_generate(gen_params, text, 0, temperature=1e-5), greedy)
  # Recomputing the whole stream every step samples the same tokens.
  np.testing.assert_array_equal(_generate(gen_params, text, 0, top_k=1, use_cache=False), greedy)

  # Guidance: scale 1 is the conditional branch; scale 3 follows the guided logits, against
  # the empty caption or a negative prompt.
  np.testing.assert_array_equal(_generate(gen_params, text, 0, scale=1.0), sampled)
  guided = _generate(gen_params, text, 0, top_k=1, scale=3.0)
  assert _is_greedy(gen_params, text, guided, scale=3.0)
  assert not np.array_equal(guided, greedy)
  negative = text[::-1]
  steered = _generate(gen_params, text, 0, top_k=1, scale=3.0, uncond=negative)
  assert _is_greedy(gen_params, text, steered, scale=3.0, uncond=negative)
  assert not np.array_equal(steered, guided)
  with pytest.raises(ValueError, match=r"unconditional text must be \[P, 4\]"):
    tr.generate(GEN_MODEL, gen_params, text, jax.random.key(0), guidance_scale=2.0,
                unconditional=negative[:1])


def test_sample_logits_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  sample = jax.jit(tr.sample_logits)  # the settings are traced: one compilation

  def counts(temperature=1.0, top_k=0, top_p=1.0):
    tokens = sample(logits, jax.random.key(0), jnp.float32(temperature), jnp.int32(top_k),
                    jnp.float32(top_p))
    return np.bincount(np.asarray(tokens), minlength=4) / len(tokens)
  np.testing.assert_allclose(counts(), [0.5, 0.3, 0.15, 0.05], atol=0.03)
  top2 = counts(top_k=2)
  assert top2[2:].sum() == 0 and abs(top2[0] - 0.625) < 0.03
  nucleus = counts(top_p=0.7)  # 0.5 < 0.7 <= 0.8: the two most likely
  assert nucleus[2:].sum() == 0 and abs(nucleus[0] - 0.625) < 0.03
  nucleus = counts(top_p=0.85)
  assert nucleus[3] == 0 and nucleus[2] > 0.1
  assert counts(top_k=3, top_p=0.99)[3] == 0
  assert counts(temperature=2.0)[3] > 0.08  # flatter: p ~ sqrt(p), 0.05 -> 0.11
  # A Python top_k ranks with lax.top_k instead of a sort: the same distribution.
  tokens = jax.jit(functools.partial(tr.sample_logits, top_k=3, top_p=0.7))(
      logits, jax.random.key(1))
  fractions = np.bincount(np.asarray(tokens), minlength=4) / len(tokens)
  assert fractions[2:].sum() == 0 and abs(fractions[0] - 0.625) < 0.03
  rng = jax.random.key(0)
  for kwargs, message in (({"temperature": 0.0}, "temperature=0.0"), ({"top_k": -1}, "top_k=-1"),
                          ({"top_p": 0.0}, "top_p=0.0")):
    with pytest.raises(ValueError, match=message):
      tr.sample_logits(logits, rng, **kwargs)


def _objective(model, text, image):
  def f(p):
    text_logits, image_logits = model.apply({"params": p}, text, image)
    return tr.loss(text_logits, image_logits, text, image)
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_gradient_reaches_every_parameter(params):
  text, image = _inputs()
  (value, metrics), grads = _objective(MODEL, text, image)(params)
  np.testing.assert_allclose(value, metrics["text_loss"] / 8 + 7 * metrics["image_loss"] / 8,
                             rtol=1e-6)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
  # Remat keeps the parameter tree (so checkpoints load either way); its gradient: slow test.
  assert jax.tree.structure(_boxed(MODEL.clone(remat=True))) == jax.tree.structure(
      _boxed(MODEL))


@pytest.mark.slow
def test_remat_gradient_equals_plain(params):
  text, image = _inputs()
  (value, _), grads = _objective(MODEL, text, image)(params)
  (value2, _), grads2 = _objective(MODEL.clone(remat=True), text, image)(params)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads2, grads)


def test_scan_over_layers_gives_the_unrolled_numbers():
  """scan_layers: the pattern's period scanned (here (row, column) x 2, then row and conv
  unrolled), the same logits, gradients and cached decoding as the unrolled model, with remat
  policies too."""
  assert tr.scan_plan(tr.paper_attention_patterns(64)) == (("row", "column", "row", "row"), 15)
  assert tr.scan_plan(MODEL.patterns)[1] == 1  # no repeat: nothing to scan
  patterns = ("row", "column", "row", "column", "row", "conv")
  plain = MODEL.clone(depth=6, attention_patterns=patterns)
  scanned = plain.clone(scan_layers=True)
  assert scanned.plan == (("row", "column"), 2, ("row", "conv"))
  text, image = _inputs()
  params = _draw(_boxed(plain))
  boxed = _boxed(scanned)
  kernel = boxed["scan"]["block_0"]["fc1"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape == (2, 32, 128)
  converted = tr.scanned_params(params, scanned)
  assert jax.tree.structure(converted) == jax.tree.structure(partitioning.unbox(boxed))
  (value, _), grads = _objective(plain, text, image)(params)
  # Gradients through the scan with remat (the scan alone: its logits, below).
  (value2, _), grads2 = _objective(scanned.clone(remat=True, remat_policy="dots"), text,
                                   image)(converted)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               grads2, tr.scanned_params(grads, scanned))
  _, expected = jax.jit(plain.apply)({"params": params}, text, image)
  _, logits = jax.jit(scanned.apply)({"params": converted}, text, image)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  # Cached decoding over the stacked cache.
  decode = jax.jit(functools.partial(scanned.apply, method=tr.Transformer.decode))
  cache = tr.init_cache(scanned, BATCH)
  assert len(cache) == 4 and cache[0]["k"].shape == (2, BATCH, 16, 4, 8)
  logits, cache = decode({"params": converted}, text, cache, 0)
  got = [logits]
  flat = image.reshape(BATCH, -1)
  for j in range(scanned.image_len - 1):
    logits, cache = decode({"params": converted}, flat[:, j:j + 1], cache,
                           jnp.int32(scanned.text_len + j))
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, axis=1), expected, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="remat_policy='some'"):
    _boxed(plain.clone(remat_policy="some"))


def test_loss_weighting():
  rng = np.random.default_rng(0)
  text_logits = jnp.asarray(rng.standard_normal((2, 3, 7)), jnp.float32)
  image_logits = jnp.asarray(rng.standard_normal((2, 4, 5)), jnp.float32)
  text, image = jnp.array([[0, 1, 2, 3], [4, 5, 6, 0]]), jnp.array([[0, 1, 2, 3], [4, 3, 2, 1]])
  total, m = jax.jit(functools.partial(tr.loss, text_weight=0.25))(
      text_logits, image_logits, text, image)
  log_probs = text_logits - np.log(np.exp(np.asarray(text_logits)).sum(-1, keepdims=True))
  expected_text = -np.mean(np.take_along_axis(log_probs, np.asarray(text[:, 1:, None]), -1))
  np.testing.assert_allclose(m["text_loss"], expected_text, rtol=1e-6)
  np.testing.assert_allclose(total, 0.25 * m["text_loss"] + 0.75 * m["image_loss"], rtol=1e-6)
  with pytest.raises(ValueError, match="text_weight=1.5"):
    tr.loss(text_logits, image_logits, text, image, text_weight=1.5)


def test_bad_configs_and_inputs_are_named():
  text, image = _inputs()
  for overrides, message in (({"width": 30}, "width=30 is not divisible by num_heads=4"),
                             ({"attention_patterns": ("row",)}, "1 entries for depth=4"),
                             ({"attention_patterns": ("row",) * 3 + ("strided",)}, "'strided'"),
                             ({"conv_kernel": 2}, "kernel=2"),
                             ({"text_vocab": 0}, "text_vocab=0")):
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(tr.variant("tiny", **overrides).init, jax.random.key(0), text, image)
  with pytest.raises(ValueError, match=r"text tokens must be \[B, 4\], got \(4, 5\)"):
    jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((4, 5), jnp.int32), image)
  with pytest.raises(ValueError, match=r"image tokens must be .* got \(4, 11\)"):
    jax.eval_shape(MODEL.init, jax.random.key(0), text, jnp.zeros((4, 11), jnp.int32))
  with pytest.raises(ValueError, match="num_samples=0"):
    tr.generate(MODEL, {}, text, jax.random.key(0), num_samples=0)
  with pytest.raises(ValueError, match="unknown Transformer variant 'huge'"):
    tr.variant("huge")


def test_sharded_forward_matches_one_device(boxed, params):
  mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = partitioning.logical_axis_rules("fsdp_tp")
  shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  block = shardings["blocks_0"]
  assert block["attn"]["to_q"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
  assert block["attn"]["to_out_0"]["kernel"].spec == PartitionSpec("tensor", None, "fsdp")
  assert block["fc1"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
  assert block["fc2"]["kernel"].spec == PartitionSpec("tensor", "fsdp")
  assert shardings["image_embed"]["embedding"].spec == PartitionSpec("tensor", "fsdp")
  assert shardings["image_head"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
  assert shardings["row_embed"].spec == PartitionSpec(None, "fsdp")

  text, image = _inputs()
  expected = _forward({"params": params}, text, image)
  placed = jax.device_put(params, shardings)
  batch = partitioning.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    apply = jax.jit(MODEL.apply, in_shardings=({"params": shardings}, batch, batch))
    got = apply({"params": placed}, jax.device_put(text, batch), jax.device_put(image, batch))
  assert got[1].sharding.num_devices == 8
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
