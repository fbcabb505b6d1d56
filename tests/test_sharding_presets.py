"""Every model family under the parallelism presets (`configs/<recipe>.py:VARIANT,PRESET`) on
8 fake CPU devices: the same loss and gradients as one device, the intended PartitionSpecs for
its main weights, and each device holding exactly its share of the parameters."""

import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import flat
from jaxt2i.parallel import mesh as mesh_lib
from jaxt2i.parallel import partitioning
from jaxt2i.tasks import get_task
from jaxt2i.training.config import ConfigError, split_config_arg

PRESETS = ("dp", "fsdp", "fsdp_tp")
_AE_FIELDS = ("kind", "latent_channels", "block_out_channels", "layers_per_block", "norm_groups",
              "mid_attention", "num_codes", "vq_beta", "vq_l2_normalize")


def recipe(name: str, arg: str):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def family_config(name: str, preset: str | None):
  config = recipe(name, f"tiny,{preset}" if preset else "tiny")
  config.batch_size = 8
  # First stages at random weights, from their fields alone (no trained run needed).
  if name == "dalle_shapes":
    config.model.dvae = recipe("dvae_shapes", "tiny").to_dict()
  if name == "ldm_shapes":
    ae = recipe("autoencoder_shapes", "tiny").model
    config.model.autoencoder = {k: ae[k] for k in _AE_FIELDS}
    config.model.latent_scale = 1.0
  return config


# (family, main weight, its spec under fsdp over 8 devices, under fsdp 4 x tensor 2)
MAIN_WEIGHTS = {
    "dvae_shapes": ("dvae/decoder/group_1_block_1/conv_4/kernel",
                    P(None, None, "fsdp"), P(None, None, "fsdp", "tensor")),
    "dalle_shapes": ("transformer/blocks_3/fc1/kernel", P("fsdp"), P("fsdp", "tensor")),
    "autoencoder_shapes": ("autoencoder/encoder/mid_block/resnets_0/conv1/kernel",
                           P(None, None, "fsdp"), P(None, None, "fsdp", "tensor")),
    "ldm_shapes": ("unet/up_blocks_0/resnets_0/conv1/kernel",
                   P(None, None, "fsdp"), P(None, None, "fsdp", "tensor")),
    "clip_shapes": ("image_encoder/fc/kernel", P("fsdp"), P("fsdp", "tensor")),
}
# More of each family's weights under fsdp_tp: attention and MLP projections.
MORE_SPECS = {
    "dalle_shapes": {"transformer/blocks_3/fc2/kernel": P("tensor", "fsdp")},
    "clip_shapes": {"text_encoder/block_0/fc1/kernel": P("fsdp", "tensor"),
                    "text_encoder/block_0/fc2/kernel": P("tensor", "fsdp")},
}


def batch_for(config):
  rng = np.random.default_rng(0)
  size, length = config.data.image_size, config.data.max_caption_length
  mask = (np.arange(length)[None] < rng.integers(4, length, (config.batch_size, 1)))
  return {"image": rng.uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32),
          "tokens": (rng.integers(1, config.data.vocab_size, (config.batch_size, length))
                     * mask).astype(np.int32),
          "tokens_mask": mask.astype(np.int32)}


def loss_and_grads(config, devices):
  """As the trainer shards them: params by the config's rules, the batch over data x fsdp."""
  task = get_task(config)
  mesh = mesh_lib.create_mesh(config.mesh.to_dict(), devices)
  rules = partitioning.logical_axis_rules(config.sharding.strategy)
  batch = {k: v for k, v in batch_for(config).items() if k in task.batch_keys}
  dummy = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda r: task.init(r, dummy), jax.random.key(0))
  shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda r: partitioning.unbox(task.init(r, dummy)),
                     out_shardings=shardings)(jax.random.key(0))
    batch = jax.device_put(batch, partitioning.batch_sharding(mesh))
    kwargs = {"step": jnp.int32(5)} if task.needs_step else {}
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: task.loss(p, b, jax.random.key(1), **kwargs)[0]))
    loss, grads = grad_fn(params, batch)
  return params, float(loss), jax.device_get(grads), mesh


def per_device_bytes(params, device) -> tuple[int, int]:
  """(bytes this device holds, bytes its shards should hold by their specs)."""
  held = expected = 0
  for leaf in jax.tree.leaves(params):
    shard = next(s for s in leaf.addressable_shards if s.device == device)
    held += shard.data.nbytes
    axes = [a for dim in leaf.sharding.spec if dim is not None
            for a in (dim if isinstance(dim, tuple) else (dim,))]
    expected += leaf.nbytes // math.prod(leaf.sharding.mesh.shape[a] for a in axes)
  return held, expected


def _at(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


@functools.lru_cache(maxsize=None)
def reference(family):
  _, loss, grads, _ = loss_and_grads(family_config(family, None), jax.devices()[:1])
  return loss, flat(grads)


# In the fast suite fsdp_tp (both weight axes at once) for CLIP (convolutions, dense layers,
# attention; it compiles quickly); the other families and presets are slow (CI time).
_FAST = {"clip_shapes"}
CASES = [pytest.param(family, preset, id=f"{family}-{preset}",
                      marks=() if preset == "fsdp_tp" and family in _FAST else pytest.mark.slow)
         for family in sorted(MAIN_WEIGHTS) for preset in PRESETS]


@pytest.mark.parametrize("family,preset", CASES)
def test_preset_matches_one_device(family, preset):
  ref_loss, ref_grads = reference(family)
  total = sum(g.nbytes for g in ref_grads.values())
  # Absolute tolerance against the largest gradient: some are zero in exact arithmetic (the
  # key bias of softmax attention) and only rounding noise in float32.
  atol = 1e-5 * max(np.abs(g).max() for g in ref_grads.values())
  path, fsdp_spec, fsdp_tp_spec = MAIN_WEIGHTS[family]
  config = family_config(family, preset)
  params, loss, grads, mesh = loss_and_grads(config, jax.devices()[:8])
  assert dict(mesh.shape) == {"dp": {"data": 8, "fsdp": 1, "tensor": 1},
                              "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
                              "fsdp_tp": {"data": 1, "fsdp": 4, "tensor": 2}}[preset]
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  for key, value in flat(grads).items():
    np.testing.assert_allclose(value, ref_grads[key], rtol=1e-4, atol=atol, err_msg=key)
  want = {"dp": P(), "fsdp": fsdp_spec, "fsdp_tp": fsdp_tp_spec}[preset]
  assert _at(params, path).sharding.spec == want
  if preset == "fsdp_tp":
    for other, spec in MORE_SPECS.get(family, {}).items():
      assert _at(params, other).sharding.spec == spec, other
  held, expected = per_device_bytes(params, jax.devices()[0])
  assert held == expected
  # Replicated under dp; sharded, each device keeps close to an eighth (small arrays whose
  # dimensions 8 does not divide, norms and biases stay replicated).
  if preset == "dp":
    assert held == total
  else:
    assert total / held > 4.0, total / held


def test_preset_argument_is_checked():
  assert split_config_arg("demo,fsdp", "reference") == ("demo", "fsdp")
  assert split_config_arg(None, "reference") == ("reference", None)
  with pytest.raises(ConfigError, match="preset 'zero3' .* is unknown"):
    recipe("ldm_shapes", "demo,zero3")
  config = recipe("dalle_shapes", "demo,fsdp_tp")
  assert (config.mesh.to_dict(), config.sharding.strategy) == (
      {"data": 1, "fsdp": -1, "tensor": 2}, "fsdp_tp")
