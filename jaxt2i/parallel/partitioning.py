"""Logical axis names -> mesh axes: the one table that decides DP, FSDP or TP.

Every weight names its dimensions where it is defined, with this vocabulary:
  embed     model width (d_model) / input features of a dense layer
  mlp       hidden width of a feed-forward block, output features of an up-projection
  heads     attention heads;  kv  per-head feature size
  vocab     token vocabulary
  conv_in / conv_out   input / output channels of a convolution; conv_h / conv_w its kernel
  norm      scale/bias of a normalisation layer (never sharded)
  layers    the stacked layer axis of scanned layers (nn.scan; never sharded)
Activations name theirs with `nn.with_logical_constraint(x, ("batch", "length", "embed"))`;
also `height`, `width`, `channels`.

A strategy is only a different table (`STRATEGIES`): data parallel replicates weights,
FSDP shards their `embed` / `conv_in` dimension over the `fsdp` axis, tensor parallel splits
`mlp` / `heads` / `vocab` / `conv_out` over `tensor`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxt2i.parallel.mesh import BATCH_AXES

Rules = tuple[tuple[str, Any], ...]

# Activations: the batch is split over every batch-parallel axis in all strategies.
_ACTIVATIONS: Rules = (
    ("batch", BATCH_AXES),
    ("length", None), ("height", None), ("width", None), ("channels", None),
)
_REPLICATED_WEIGHTS: Rules = (
    ("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
    ("conv_in", None), ("conv_out", None), ("conv_h", None), ("conv_w", None), ("norm", None),
    ("layers", None),
)

STRATEGIES: dict[str, Rules] = {
    # Every device holds all weights; gradients are all-reduced over data and fsdp.
    "dp": _ACTIVATIONS + _REPLICATED_WEIGHTS,
    # ZeRO-3: weights and optimizer state sharded over `fsdp`, gathered per layer.
    "fsdp": _ACTIVATIONS + (("embed", "fsdp"), ("conv_in", "fsdp")) + _REPLICATED_WEIGHTS,
    # Megatron: column-parallel up-projections / heads, row-parallel down-projections.
    "tp": _ACTIVATIONS + (("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
                          ("conv_out", "tensor")) + _REPLICATED_WEIGHTS,
    "fsdp_tp": _ACTIVATIONS + (("embed", "fsdp"), ("conv_in", "fsdp"), ("mlp", "tensor"),
                               ("heads", "tensor"), ("vocab", "tensor"),
                               ("conv_out", "tensor")) + _REPLICATED_WEIGHTS,
}


def logical_axis_rules(strategy: str, extra: Iterable[Sequence[Any]] = ()) -> Rules:
  """The rules table for a strategy; `extra` pairs come first and so take precedence."""
  if strategy not in STRATEGIES:
    raise ValueError(
        f"config.sharding.strategy={strategy!r} is unknown; choose one of {sorted(STRATEGIES)}")
  extra_rules = []
  for pair in extra:
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"config.sharding.extra_rules entry {pair!r} must be (logical_name, "
                       "mesh_axis | tuple of mesh axes | None)")
    target = pair[1]
    extra_rules.append((pair[0], tuple(target) if isinstance(target, list) else target))
  return tuple(extra_rules) + STRATEGIES[strategy]


def _is_box(x: Any) -> bool:
  return isinstance(x, meta.AxisMetadata)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
             dropped: list[str]) -> PartitionSpec:
  """Drops mesh axes that do not divide a dimension (small models on large meshes); `mesh` may
  be abstract (`jax.sharding.get_abstract_mesh()` while tracing). Appends what it dropped to
  `dropped`."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    size = 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    if len(kept) != len(names):
      dropped.append(f"{dim} over {names}")
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  while fitted and fitted[-1] is None:
    fitted.pop()
  return PartitionSpec(*fitted)


def logical_to_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names.

  `tree` is typically `jax.eval_shape(init)` (boxes holding ShapeDtypeStructs). Unboxed
  leaves are replicated. The result has the structure of the *unboxed* tree.
  """
  replicated_dims: dict[str, list[str]] = {}

  def one(path, leaf):
    if _is_box(leaf):
      names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
      value = leaf.unbox()
      dropped: list[str] = []
      spec = fit_spec(nn.logical_to_mesh_axes(names, rules), value.shape, mesh, dropped)
      if dropped:
        replicated_dims[jax.tree_util.keystr(path)] = dropped
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)
  shardings = jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)
  if replicated_dims:
    shown = list(replicated_dims.items())[:4]
    logging.warning(
        "%d arrays keep a dimension unsharded because the mesh axis does not divide it, "
        "e.g. %s", len(replicated_dims), "; ".join(f"{k}: dim {', '.join(v)}" for k, v in shown))
  return shardings


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: targets for AOT compilation and for restoring
  (onto any mesh)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def unbox(tree: Any) -> Any:
  return meta.unbox(tree)


def fetch_replicated(tree: Any) -> Any:
  """Host numpy copies of replicated arrays, also when they span other hosts' devices
  (where `jax.device_get` refuses): every replica holds the value, so read the local one."""
  import numpy as np

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)
