"""Dry runs of large models: shard a model over a mesh without materialising it, and read the
per-device memory of its training step from the compiled program.

    report = dry_run.train_step_memory(model_init, loss_fn, batch, mesh, rules)

Parameters exist only as ShapeDtypeStructs (`jax.eval_shape` of the init) carrying the
NamedShardings the logical-axis rules give; the AdamW state gets its shardings from compiling
its init; the train step (loss, gradients, update, params and state donated) is lowered and
compiled for the mesh, and XLA's memory analysis gives what one device holds: arguments
(its shard of the params, optimizer state and batch), outputs, and temporaries (activations,
gathered weights, gradients). Nothing of model size is ever allocated, so an SD-1.5 U-Net or a
1B-parameter transformer plans on a laptop with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): `python benchmarks/dry_run.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jaxt2i.parallel import partitioning


def _bytes(x: Any) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _shard_bytes(x: Any) -> int:
  """Bytes of one device's shard of an abstract array with a NamedSharding."""
  sharding = getattr(x, "sharding", None)
  shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
  return int(np.prod(shape)) * np.dtype(x.dtype).itemsize


def sharded_params(init: Callable[[], Any], mesh: Mesh, rules: Any) -> Any:
  """ShapeDtypeStructs of `init()`'s params with their NamedShardings (nothing allocated)."""
  boxed = jax.eval_shape(init)
  shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  return partitioning.with_shardings(partitioning.unbox(boxed), shardings)


def train_step_memory(init: Callable[[], Any], loss_fn: Callable[[Any, Mapping[str, Any]], Any],
                      batch: Mapping[str, Any], mesh: Mesh, rules: Any,
                      optimizer: optax.GradientTransformation | None = None) -> dict[str, Any]:
  """Plans one AdamW training step of the model whose params `init()` returns (boxed with
  logical axis names), on `mesh` under `rules`.

  Args:
    init: () -> boxed params (e.g. lambda: model.init(key, *example_inputs)["params"]).
    loss_fn: (params, batch) -> scalar loss.
    batch: {name: jax.ShapeDtypeStruct} of the global batch; sharded over the batch axes.
    mesh, rules: the mesh and the logical-axis rules (partitioning.logical_axis_rules).
    optimizer: default optax.adamw(1e-4).

  Returns:
    {"params": count, "param_bytes": total, "param_bytes_per_device": one device's shards,
     "optimizer_bytes_per_device", "memory": XLA's per-device analysis (argument, output,
     temp, alias bytes; "peak_estimate" = argument + output + temp - alias), "compile_s"}.
  """
  optimizer = optimizer or optax.adamw(1e-4)
  batch_sharding = partitioning.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in batch.items()}

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # The optimizer state of boxed params keeps the boxes: its moments shard like the params.
  boxed = jax.eval_shape(init)
  boxed_opt = jax.eval_shape(optimizer.init, boxed)
  param_shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  opt_shardings = partitioning.logical_to_shardings(boxed_opt, mesh, rules)
  params = partitioning.with_shardings(partitioning.unbox(boxed), param_shardings)
  opt_state = partitioning.with_shardings(partitioning.unbox(boxed_opt), opt_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1),
                       out_shardings=(param_shardings, opt_shardings, None)).lower(
                           params, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  memory = {}
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
    value = getattr(analysis, field, None)
    if value is not None:
      memory[field.removesuffix("_size_in_bytes")] = int(value)
  if {"argument", "output", "temp"} <= set(memory):
    memory["peak_estimate"] = (memory["argument"] + memory["output"] + memory["temp"]
                               - memory.get("alias", 0))
  leaves = jax.tree.leaves(params)
  return {"params": int(sum(np.prod(x.shape) for x in leaves)),
          "param_bytes": sum(_bytes(x) for x in leaves),
          "param_bytes_per_device": sum(_shard_bytes(x) for x in leaves),
          "optimizer_bytes_per_device": sum(_shard_bytes(x) for x in jax.tree.leaves(opt_state)
                                            if hasattr(x, "shape")),
          "memory": memory, "compile_s": compile_s, "devices": mesh.size,
          "mesh": dict(mesh.shape)}
