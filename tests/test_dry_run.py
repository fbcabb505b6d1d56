"""Planning a sharded training step without materialising the model
(jaxt2i/parallel/dry_run.py), on the 8 fake CPU devices of the test session."""

import jax
import jax.numpy as jnp
import pytest

from jaxt2i.models import transformer as tr
from jaxt2i.parallel import dry_run, mesh as mesh_lib, partitioning


def _plan(strategy, shape):
  model = tr.variant("tiny", width=64, num_heads=4, depth=2, attention_patterns=("row", "conv"))
  text = jax.ShapeDtypeStruct((8, model.text_len), jnp.int32)
  image = jax.ShapeDtypeStruct((8, model.image_len), jnp.int32)

  def init():
    return model.init(jax.random.key(0), jnp.zeros(text.shape, jnp.int32),
                      jnp.zeros(image.shape, jnp.int32))["params"]

  def loss(params, batch):
    return tr.loss(*model.apply({"params": params}, batch["text"], batch["image"]),
                   batch["text"], batch["image"])[0]
  mesh = mesh_lib.create_mesh(shape, jax.devices()[:8])
  return dry_run.train_step_memory(init, loss, {"text": text, "image": image}, mesh,
                                   partitioning.logical_axis_rules(strategy))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_dry_run_reports_sharded_memory():
  dp = _plan("dp", {"data": 8, "fsdp": 1, "tensor": 1})
  fsdp = _plan("fsdp", {"data": 1, "fsdp": 8, "tensor": 1})
  fsdp_tp = _plan("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2})
  assert dp["params"] == fsdp["params"] == fsdp_tp["params"] > 0
  # Data parallel replicates; FSDP divides nearly every weight by 8 (norm scales and odd
  # dimensions stay whole); the AdamW moments shard like the weights.
  assert dp["param_bytes_per_device"] == dp["param_bytes"]
  for plan, factor in ((fsdp, 8), (fsdp_tp, 4)):
    assert plan["param_bytes"] / plan["param_bytes_per_device"] > 0.6 * factor
    assert plan["optimizer_bytes_per_device"] < dp["optimizer_bytes_per_device"] / (0.6 * factor)
  # XLA's memory analysis of the compiled step: arguments hold the shards it was given.
  for plan in (dp, fsdp, fsdp_tp):
    memory = plan["memory"]
    assert memory["argument"] >= plan["param_bytes_per_device"] + plan[
        "optimizer_bytes_per_device"]
    assert memory["peak_estimate"] >= memory["argument"]
  assert fsdp["memory"]["argument"] < dp["memory"]["argument"]
