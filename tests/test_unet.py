"""The latent-diffusion U-Net against diffusers' UNet2DConditionModel, its converter and the
attention entry point.

The references are small random diffusers U-Nets built here (nothing is downloaded), with
every parameter perturbed, since diffusers zero-initialises some layers (e.g. conv_out) and
a zero layer would hide a wrong path behind it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from helpers import random_params
from jaxt2i.convert import diffusers_unet
from jaxt2i.models import attention, layers, unet
from jaxt2i.parallel import partitioning

try:
  import diffusers
  import torch
except ImportError:  # Loader and model tests still run; parity needs torch + diffusers.
  diffusers = torch = None

needs_diffusers = pytest.mark.skipif(diffusers is None, reason="torch + diffusers not installed")
TOL = 1e-4  # max |jax - torch| / max |torch|, float32 throughout.

# SD1 style: 1x1-conv projections, one head count (`attention_head_dim` = heads), plain and
# cross-attention blocks, two resnets per block.
SD1 = {"block_out_channels": (32, 64), "layers_per_block": 2, "norm_num_groups": 8,
       "cross_attention_dim": 32, "attention_head_dim": 4,
       "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
       "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
# SD2 style: Dense projections, per-block heads, upcast attention, 2 transformer layers,
# attention at every resolution, non-default time embedding and output channels.
SD2 = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 16,
       "cross_attention_dim": 32, "attention_head_dim": (2, 4), "use_linear_projection": True,
       "upcast_attention": True, "transformer_layers_per_block": 2,
       "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
       "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
       "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "out_channels": 5}
KNOWN_AXES = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "conv_h", "conv_w",
              "norm"}


def torch_unet(config: dict, seed: int = 0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(sample_size=16, **config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@needs_diffusers
@pytest.mark.parametrize("name,config,size,safe,implementations", [
    ("sd1", SD1, (16, 16), True, ("einsum", "xla")),
    # 17x15 is odd after the first downsample: the decoder upsamples to the skip's size.
    ("sd2", SD2, (17, 15), False, ("auto",)),
])
def test_matches_diffusers(tmp_path, name, config, size, safe, implementations):
  reference = torch_unet(config)
  reference.save_pretrained(tmp_path / "unet", safe_serialization=safe)
  model, params = diffusers_unet.load_diffusers_unet(tmp_path)  # finds unet/ inside

  rng = np.random.default_rng(0)
  batch, tokens = 2, 7
  sample = rng.standard_normal((batch, config.get("in_channels", 4)) + size).astype(np.float32)
  timesteps = np.array([3, 981], np.int64)
  text = rng.standard_normal((batch, tokens, 32)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(sample), torch.from_numpy(timesteps),
                         torch.from_numpy(text)).sample.numpy()

  outputs = {}
  for implementation in implementations:
    apply = jax.jit(model.clone(attention_implementation=implementation).apply)
    out = np.asarray(apply({"params": params}, sample.transpose(0, 2, 3, 1),
                           timesteps.astype(np.int32), text))
    outputs[implementation] = out.transpose(0, 3, 1, 2)
    assert np.isfinite(out).all()
    error = np.abs(outputs[implementation] - expected).max() / np.abs(expected).max()
    print(f"{name} {implementation}: max relative error {error:.2e}")
    assert error <= TOL, (name, implementation, error)
  for out in outputs.values():
    np.testing.assert_allclose(out, outputs[implementations[0]],
                               atol=1e-5 * np.abs(expected).max())


@needs_diffusers
def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0, 1, 17.5, 999], np.float32)
  for dim, flip, shift in ((32, True, 0), (33, False, 1), (8, True, 1)):
    expected = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
    got = np.asarray(layers.timestep_embedding(t, dim, flip, shift))
    # sin/cos of arguments up to 999 in float32: one ulp of the argument is 6e-5.
    np.testing.assert_allclose(got, expected, atol=1e-4)


def _numpy_attention(q, k, v, mask=None):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


def test_attention_implementations_agree():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 9, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 5, 4, 8)).astype(np.float32) for _ in range(2))
  mask = rng.random((2, 1, 9, 5)) > 0.3
  mask[..., 0] = True  # every query attends to something
  available = ["auto", "einsum", "xla"] + (["cudnn"] if attention.cudnn_supported(
      jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)) else [])
  for m in (None, mask):
    expected = _numpy_attention(q, k, v, m)
    for impl in available:
      dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
      out = attention.dot_product_attention(*(jnp.asarray(x, dtype) for x in (q, k, v)),
                                            mask=m, implementation=impl)
      assert out.shape == q.shape and out.dtype == dtype
      np.testing.assert_allclose(np.asarray(out, np.float32), expected,
                                 atol=2e-2 if dtype == jnp.bfloat16 else 2e-5)
  # Half precision keeps its dtype and still sums probabilities in float32.
  for impl in ("einsum", "xla"):
    out = attention.dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
                                          implementation=impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v),
                               atol=3e-2)
  with pytest.raises(ValueError, match="unknown"):
    attention.dot_product_attention(q, k, v, implementation="flash")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="cudnn"):
      attention.dot_product_attention(q, k, v, implementation="cudnn")


def test_cudnn_supported_rules(monkeypatch):
  """`auto` must not send cuDNN what it refuses at run time: on a GPU, half precision, head
  sizes that are multiples of 8 up to 128, and even lengths (the SD U-Net's cross-attention
  to 77 CLIP tokens raised "Unsupported sequence length Q 4096, KV 77" in its training pass)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  def supported(lq, lk, head=40, dtype=jnp.bfloat16):
    return attention.cudnn_supported(jax.ShapeDtypeStruct((2, lq, 8, head), dtype),
                                     jax.ShapeDtypeStruct((2, lk, 8, head), dtype))
  assert supported(4096, 4096) and supported(4096, 78)
  assert not supported(4096, 77) and not supported(77, 4096)
  assert not supported(64, 64, head=160) and not supported(64, 64, head=36)
  assert not supported(64, 64, dtype=jnp.float32)


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 1024, 64])
def test_einsum_attention_steps_and_gradient(monkeypatch, chunk_bytes):
  """The einsum backend's three plans (one step; groups of (batch, head) pairs; query blocks
  with dk / dv summed over blocks) and its hand-written gradient, against jax.nn's."""
  monkeypatch.setattr(attention, "EINSUM_CHUNK_BYTES", chunk_bytes)
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 12, 3, 4)).astype(np.float32)
  k, v = (rng.standard_normal((2, 10, 3, 4)).astype(np.float32) for _ in range(2))
  weights = rng.standard_normal(q.shape).astype(np.float32)
  mask = rng.random((2, 1, 12, 10)) > 0.3
  mask[..., 0] = True
  mask[0, 0, 3] = False  # a fully masked row: uniform weights, no gradient to its logits
  for m in (None, mask):
    results = {}
    for impl in ("einsum", "xla"):
      def loss(q, k, v, impl=impl):
        out = attention.dot_product_attention(q, k, v, mask=m, implementation=impl)
        return jnp.sum(weights * jnp.sin(out))
      results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    (value, grads), (ref_value, ref_grads) = results["einsum"], results["xla"]
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, ref, atol=1e-5)


def _tiny(**overrides):
  """The tiny variant, inputs, its boxed param shapes and random params (helpers.random_params:
  no init compile)."""
  model = unet.variant("tiny", **overrides)
  rng = np.random.default_rng(2)
  inputs = (jnp.asarray(rng.standard_normal((2, 8, 8, model.in_channels)), jnp.float32),
            jnp.array([10, 500]),
            jnp.asarray(rng.standard_normal((2, 5, model.cross_attention_dim)), jnp.float32))
  boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
  return model, inputs, boxed, random_params(boxed)


def test_every_param_has_logical_axes_and_gradient():
  model, inputs, boxed, params = _tiny(use_linear_projection=True)
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == len(leaf.value.shape), (jax.tree_util.keystr(path), leaf.names)
    assert set(leaf.names) <= KNOWN_AXES, (jax.tree_util.keystr(path), leaf.names)
    assert leaf.value.dtype == jnp.float32

  # The names shard as intended: heads and conv outputs over `tensor`, embed over `fsdp`.
  attn = boxed["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]
  fsdp_tp = partitioning.logical_axis_rules("fsdp_tp")
  assert nn.logical_to_mesh_axes(attn["to_q"]["kernel"].names, fsdp_tp) == PartitionSpec(
      "fsdp", "tensor", None)
  assert nn.logical_to_mesh_axes(attn["to_out_0"]["kernel"].names, fsdp_tp) == PartitionSpec(
      "tensor", None, "fsdp")
  conv1 = boxed["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
  assert nn.logical_to_mesh_axes(conv1.names, fsdp_tp) == PartitionSpec(
      None, None, "fsdp", "tensor")

  def loss(p):
    return jnp.mean(model.apply({"params": p}, *inputs) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    g = np.asarray(g)
    assert np.isfinite(g).all(), jax.tree_util.keystr(path)
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"

  # Gradient checkpointing: the same params, loss and gradients.
  remat = model.clone(remat_policy="dots")
  assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), *inputs)) == \
      jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), *inputs))
  value2, grads2 = jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(remat.apply({"params": p}, *inputs) ** 2)))(params)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads2, grads)
  with pytest.raises(ValueError, match="remat policy 'some'"):
    model.clone(remat_policy="some").init(jax.random.key(0), *inputs)


def test_bfloat16_compute_close_to_float32():
  model, inputs, _, params = _tiny()
  full = jax.jit(model.apply)({"params": params}, *inputs)
  half = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *inputs)
  assert half.dtype == jnp.float32 and np.isfinite(np.asarray(half)).all()
  assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_position_channels_extend_conv_in():
  model, inputs, _, params = _tiny()
  coord = model.clone(position_channels=True)
  shapes = jax.eval_shape(coord.init, jax.random.key(0), *inputs)["params"]
  kernel = params["conv_in"]["kernel"]
  assert partitioning.unbox(shapes)["conv_in"]["kernel"].shape == \
      kernel.shape[:2] + (kernel.shape[2] + 2,) + kernel.shape[3:]
  # Zero weights on the coordinates: the model without them (how a trained U-Net grows them).
  grown = {**params, "conv_in": {**params["conv_in"], "kernel": jnp.concatenate(
      [kernel, jnp.zeros(kernel.shape[:2] + (2,) + kernel.shape[3:])], axis=2)}}
  apply = jax.jit(coord.apply)
  zero_weights = apply({"params": grown}, *inputs)
  np.testing.assert_allclose(zero_weights, jax.jit(model.apply)({"params": params}, *inputs),
                             atol=1e-6)
  # Weights there change the output.
  rng = np.random.default_rng(0)
  grown["conv_in"]["kernel"] = grown["conv_in"]["kernel"].at[:, :, -2:].set(
      jnp.asarray(rng.standard_normal(kernel.shape[:2] + (2,) + kernel.shape[3:]), jnp.float32))
  assert np.abs(apply({"params": grown}, *inputs) - zero_weights).max() > 1e-3


def test_bad_state_dicts_are_named():
  model = unet.variant("tiny")
  layout = diffusers_unet.expected_layout(model)
  state = {key: np.zeros(torch_shape, np.float32) for key, (_, _, torch_shape) in layout.items()}
  params = diffusers_unet.unet_params_from_diffusers(state, model)
  assert params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"][
      "kernel"].shape == (32, 4, 8)

  bad = dict(state)
  del bad["mid_block.attentions.0.proj_in.weight"]
  bad["mid_block.attentions.0.extra.weight"] = np.zeros(3, np.float32)
  bad["conv_in.weight"] = np.zeros((32, 4, 3, 1), np.float32)
  with pytest.raises(ValueError) as error:
    diffusers_unet.unet_params_from_diffusers(bad, model)
  message = str(error.value)
  assert "missing keys [mid_block.attentions.0.proj_in.weight]" in message
  assert "unexpected keys [mid_block.attentions.0.extra.weight]" in message
  assert "conv_in.weight: (32, 4, 3, 1) (expected (32, 4, 3, 3))" in message


def test_unsupported_configs_are_named(tmp_path):
  config = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
            "attention_head_dim": [2, 4], "addition_embed_type": "text_time",
            "mystery_option": 1}
  with pytest.raises(ValueError) as error:
    diffusers_unet.unet_config_from_diffusers(config)
  assert "addition_embed_type='text_time'" in str(error.value)
  assert "mystery_option" in str(error.value)
  fields = diffusers_unet.unet_config_from_diffusers(
      {"block_out_channels": [32, 64], "attention_head_dim": [2, 4], "sample_size": 64})
  assert fields["block_out_channels"] == (32, 64) and fields["attention_head_dim"] == (2, 4)
  assert fields["cross_attention_dim"] == 1280  # diffusers' default, not jaxt2i's
  with pytest.raises(FileNotFoundError, match="config.json"):
    diffusers_unet.load_diffusers_unet(tmp_path)
