"""Device mesh from config, and multi-host start-up.

One mesh with three named axes serves every parallelism strategy:
  data   - replicas that each see a different slice of the batch (pure data parallel),
  fsdp   - also splits the batch, and additionally shards parameters / optimizer state (ZeRO-3),
  tensor - splits weights along their hidden dimensions (Megatron-style tensor parallel).
Which weights land on which axis is decided only by the config's `logical_axis_rules`
(see partitioning.py), so DP, FSDP and TP are the same code.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
# Axes over which the batch dimension is split; the product of their sizes is the
# data-parallel size that the global batch must divide.
BATCH_AXES = ("data", "fsdp")


class MeshConfigError(ValueError):
  """A mesh shape that does not fit the available devices."""


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills one `-1` axis so the product equals `num_devices`; validates the rest."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshConfigError(
        f"config.mesh has unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise MeshConfigError(f"config.mesh.{axis}={size}: must be a positive size or -1 (fill)")
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise MeshConfigError(f"config.mesh: only one axis may be -1, got {fill}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise MeshConfigError(
          f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
          f"{ {a: s for a, s in sizes.items() if s != -1} } (product {known})")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise MeshConfigError(
        f"config.mesh {sizes} uses {known} devices but {num_devices} are available; "
        "set one axis to -1 to fill")
  return sizes


def create_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over all (global) devices with axes MESH_AXES.

  `mesh_utils.create_device_mesh` orders devices so that the innermost axes (tensor) sit on
  the fastest interconnect (ICI / NVLink); across hosts, the outer axes (data) span the slow
  network, which suits data parallelism's one all-reduce per step.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  dims = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware placement is unavailable for some platforms/shapes (e.g. CPU
    # processes); process-major order still keeps each host's devices together.
    device_array = np.asarray(
        sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(dims)
  return Mesh(device_array, MESH_AXES)


def batch_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def initialize_distributed(cfg: Mapping | None = None) -> None:
  """Starts multi-host JAX when the run spans several processes.

  cfg fields (all optional): `mode` in {'auto', 'cluster', 'explicit', 'none'},
  `coordinator_address`, `num_processes`, `process_id`, `local_device_ids` (a sequence or a
  comma-separated string), `heartbeat_timeout_s`, `initialization_timeout_s`,
  `shutdown_timeout_s`, `cpu_collectives`.
  - auto: initialise when a cluster environment is detected (Cloud TPU VM with several
    workers, SLURM with several tasks, or JAX_COORDINATOR_ADDRESS set); else single process.
  - cluster: always initialise, leaving coordinator, process count and id to JAX's cluster
    detection (TPU VM metadata, SLURM variables, ...): for launchers that know the job spans
    several hosts.
  - explicit: use the given coordinator address / process count / id.
  """
  cfg = dict(cfg or {})
  mode = cfg.get("mode", "auto")
  if mode == "none" or jax.distributed.is_initialized():
    return
  timeouts = {
      "heartbeat_timeout_seconds": int(cfg.get("heartbeat_timeout_s", 100)),
      "initialization_timeout": int(cfg.get("initialization_timeout_s", 300)),
      "shutdown_timeout_seconds": int(cfg.get("shutdown_timeout_s", 300)),
  }
  coordinator = cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if mode == "explicit" or coordinator:
    if not coordinator:
      raise ValueError("config.distributed.coordinator_address is required when mode='explicit'")
    num_processes = cfg.get("num_processes") or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    process_id = cfg.get("process_id")
    if process_id is None or process_id < 0:
      process_id = int(os.environ.get("JAX_PROCESS_ID", -1))
    if not num_processes or process_id < 0:
      raise ValueError(
          "config.distributed.num_processes and process_id (or JAX_NUM_PROCESSES / "
          "JAX_PROCESS_ID) are required with an explicit coordinator")
    if jax.config.jax_platforms in (None, "", "cpu") or cfg.get("cpu_collectives"):
      # CPU devices of several processes talk through gloo; harmless elsewhere.
      jax.config.update("jax_cpu_collectives_implementation",
                        cfg.get("cpu_collectives") or "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=int(num_processes),
        process_id=int(process_id), local_device_ids=local_device_ids(cfg), **timeouts)
  elif mode == "cluster" or (mode == "auto" and _cluster_detected()):
    # JAX's cluster detection fills coordinator, process count/id and local devices
    # for TPU VMs (metadata server), SLURM (SLURM_* variables) and others.
    jax.distributed.initialize(local_device_ids=local_device_ids(cfg), **timeouts)
  elif mode == "auto":
    return
  else:
    raise ValueError(f"config.distributed.mode={mode!r}; allowed: 'auto', 'cluster', "
                     "'explicit', 'none'")
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def local_device_ids(cfg: Mapping) -> list[int] | None:
  """`local_device_ids` as a list of ints (None when unset), from a sequence or a string such
  as "3" or "0,1"."""
  ids = cfg.get("local_device_ids")
  if ids is None or ids == "" or (not isinstance(ids, str) and not len(ids)):
    return None
  parts = ids.split(",") if isinstance(ids, str) else list(ids)
  try:
    return [int(str(i).strip()) for i in parts]
  except ValueError:
    raise ValueError(f"config.distributed.local_device_ids={ids!r}: give device indices, "
                     "e.g. '3' or '0,1'") from None


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  # Multi-worker Cloud TPU VMs list their workers' addresses in TPU_WORKER_HOSTNAMES.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1
