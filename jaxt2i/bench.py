"""Training-step benchmark for any recipe (`jaxt2i bench`), and the pieces it is made of.

    config -> Trainer (mesh, task) -> one batch (the config's loader, or a synthetic batch of
    the task's batch spec when the data set is not there) -> AOT-compiled train step
    -> analytic FLOPs (`count_flops` over the jaxpr of the task's forward loss) beside XLA's
    cost analysis and memory analysis -> N timed steps on the initialised state
    -> model FLOP utilisation against a peak (given, or the measured matmul ceiling)
    -> JSON, and optionally a row of the `bench` table in benchmarks/RESULTS.md.

`count_flops` counts what the program's matrix units do: 2 M N K for every dot_general, and
2 x output elements x kernel window x input channels per group for every
conv_general_dilated, walking into every sub-jaxpr (jit, remat, custom_vjp / custom_jvp,
shard_map; scan bodies times their length; the larger branch of a cond; a while body once,
its trip count being unknown). Elementwise work, reductions and gathers are not counted: by
the usual MFU convention (PaLM, Chowdhery et al. 2022, App. B) they are small and not what
the hardware peak measures. Block-sparse attention is counted as the blocks the program
computes, since jaxt2i's sparse attention multiplies only gathered blocks.

Model FLOPs of a training step are 3 x the forward loss's (the backward pass costs two
forward passes: gradients with respect to activations and to weights). The gradient
program's own count is reported beside them: it leaves out backward passes that are not
needed (frozen first stages behind stop_gradient, input gradients of the first layer) and
includes rematerialised forward passes.

`time_fn`, `matmul_ceiling` and `environment` are shared with benchmarks/harness.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

# benchmarks/ of the source tree this package sits in (absent in an installed wheel).
BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS_MD = BENCHMARKS_DIR / "RESULTS.md"
RESULTS_DIR = BENCHMARKS_DIR / "results"
SECTION = "bench"  # the RESULTS.md section that --record appends to


# -- timing and the machine ------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  median_s: float
  min_s: float
  max_s: float
  repeats: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> Timing:
  """Times `fn()` (which must block on its own result, e.g. via jax.block_until_ready)."""
  for _ in range(warmup):
    fn()
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)
  return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def on_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def matmul_ceiling(sizes: Sequence[int] | None = None, dtype: Any = None,
                   repeats: int = 5) -> dict:
  """The machine's measured dense-matmul rate under XLA on one device: the best FLOP/s of
  square [n, n] @ [n, n] products over `sizes` (2 n^3 FLOPs each), the denominator of model
  FLOP utilisation. Defaults: float32 at n = 1024..4096 on CPUs; bfloat16 at n = 4096..16384
  on accelerators, whose published peaks are seldom reached (the measured rate is the honest
  denominator)."""
  if sizes is None:
    sizes = (4096, 8192, 16384) if on_accelerator() else (1024, 2048, 4096)
  if dtype is None:
    dtype = "bfloat16" if on_accelerator() else "float32"
  dtype = jnp.dtype(dtype).name
  rates = {}
  for n in sizes:
    a = jnp.ones((n, n), dtype) * 0.5
    b = jnp.ones((n, n), dtype) * 0.25
    f = jax.jit(lambda x, y: x @ y)
    timing = time_fn(lambda: jax.block_until_ready(f(a, b)), warmup=1, repeats=repeats)
    rates[n] = 2.0 * n ** 3 / timing.min_s
  best = max(rates, key=rates.get)
  return {"flops_per_s": rates[best], "best_size": best, "by_size": rates, "dtype": dtype}


def cpu_name(cpuinfo: str | None = None) -> str:
  """The CPU a number ran on, as /proc/cpuinfo names it, plus its family / model and widest
  vector unit where listed: cloud VMs often name only the vendor line ("AMD EPYC"), which
  covers chips whose float32 matmul peaks differ by more than 2x (AVX2 against AVX-512)."""
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      return platform.processor() or "unknown CPU"
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      break  # the first processor's block is enough
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  name = fields.get("model name") or platform.processor() or "unknown CPU"
  details = []
  if "cpu family" in fields and "model" in fields:
    details.append(f"family {fields['cpu family']} model {fields['model']}")
  flags = set(fields.get("flags", "").split())
  simd = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                         ("avx", "AVX")) if flag in flags), None)
  if simd:
    details.append(simd)
  return f"{name} ({', '.join(details)})" if details else name


def environment() -> dict:
  """Date, CPU, devices, Python and library versions: what a recorded number ran on."""
  cpu = cpu_name()
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                  "tensorflow-datasets", "numpy", "torch", "diffusers"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "python": platform.python_version(), "versions": versions}


# -- analytic FLOPs --------------------------------------------------------------------------


@dataclasses.dataclass
class FlopCount:
  """FLOPs of one call: `total`, split by primitive (`by_kind`) and by the name scope of the
  equations (`by_scope`: Flax module paths, cut to a few levels), and what could not be
  counted exactly (`notes`)."""
  total: float = 0.0
  by_kind: dict[str, float] = dataclasses.field(default_factory=dict)
  by_scope: dict[str, float] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class _Tally:
  def __init__(self):
    self.kinds: collections.Counter = collections.Counter()
    self.scopes: collections.Counter = collections.Counter()
    self.notes: set[str] = set()

  @property
  def total(self) -> float:
    return float(sum(self.kinds.values()))

  def add(self, kind: str, scope: str, flops: float) -> None:
    self.kinds[kind] += flops
    self.scopes[scope] += flops

  def merge(self, other: _Tally, times: float = 1) -> None:
    for k, v in other.kinds.items():
      self.kinds[k] += v * times
    for k, v in other.scopes.items():
      self.scopes[k] += v * times
    self.notes |= other.notes


# XLA's HloCostAnalysis counts a while loop's body once, whatever its trip count.
LOOP_NOTE = ("scan bodies counted x their length (XLA's cost analysis counts a loop body "
             "once)")


def _size(shape: Sequence[int]) -> int:
  return math.prod(int(d) for d in shape)


def _dot_flops(eqn) -> float:
  """2 x (every lhs element) x (rhs free dimensions) = 2 M N K per batch element."""
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return 2.0 * _size(lhs) * _size(free)


def _conv_flops(eqn) -> float:
  """2 x output elements x kernel window x kernel input features. The kernel's input-feature
  dimension is already per group (feature_group_count), and with batch_group_count each
  output still sums over that many features; lhs dilation (transposed convolutions) counts
  the inserted zeros, as the convolution multiplies them."""
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
  window = _size([rhs[d] for d in spec[2:]])
  return 2.0 * _size(eqn.outvars[0].aval.shape) * window * rhs[spec[1]]


def _cudnn_attention_flops(eqn, backward: bool) -> float:
  """jax.nn.dot_product_attention(implementation="cudnn"): QK^T and PV over every
  query-key pair (4 B N T S H); its backward recomputes QK^T and does four more products."""
  q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  layout = eqn.params.get("layout", 0)
  seq_k = k[2] if getattr(layout, "value", layout) == 1 else k[1]  # BNTH else BTNH
  forward = 4.0 * _size(q) * seq_k
  return forward * (2.5 if backward else 1.0)


def _sub_jaxprs(params: Mapping[str, Any]):
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _join(prefix: str, name: str) -> str:
  return "/".join(p for p in (prefix, name) if p)


def _count(jaxpr, prefix: str) -> _Tally:
  tally = _Tally()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    scope = _join(prefix, str(eqn.source_info.name_stack))
    if name == "dot_general":
      tally.add("dot_general", scope, _dot_flops(eqn))
    elif name == "conv_general_dilated":
      tally.add("conv_general_dilated", scope, _conv_flops(eqn))
    elif name in ("dot_product_attention_fwd", "dot_product_attention_bwd"):
      tally.add("cudnn_attention", scope, _cudnn_attention_flops(eqn, name.endswith("bwd")))
      tally.notes.add("cuDNN attention counted as dense attention over every query-key pair "
                      "(its backward as 2.5 forward passes)")
    elif name == "scan":
      body = _count(eqn.params["jaxpr"].jaxpr, scope)
      tally.merge(body, eqn.params["length"])
      if body.total and eqn.params["length"] > 1:
        tally.notes.add(LOOP_NOTE)
    elif name == "cond":
      branches = [_count(b.jaxpr, scope) for b in eqn.params["branches"]]
      tally.merge(max(branches, key=lambda t: t.total))
      if len({b.total for b in branches}) > 1:
        tally.notes.add("cond: the costlier branch counted")
    elif name == "while":
      body = _count(eqn.params["body_jaxpr"].jaxpr, scope)
      body.merge(_count(eqn.params["cond_jaxpr"].jaxpr, scope))
      tally.merge(body)
      if body.total:
        tally.notes.add("while loop: body counted once (its trip count is not static)")
    elif name == "shard_map":
      # The body sees per-shard shapes: it runs once on each device of its manual axes.
      mesh = eqn.params["mesh"]
      axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes") or mesh.axis_names
      shards = _size([dict(mesh.shape)[a] for a in axes])
      tally.merge(_count(eqn.params["jaxpr"], scope), shards)
    elif name == "pallas_call":
      # The kernel body sees one block: it runs once per grid point.
      try:
        grid = eqn.params["grid_mapping"].grid
        tally.merge(_count(eqn.params["jaxpr"], scope), _size(grid))
        tally.notes.add("pallas_call: kernel body x grid size")
      except (AttributeError, KeyError, TypeError):
        tally.notes.add("pallas_call: not counted (no static grid)")
    else:
      for sub in _sub_jaxprs(eqn.params):  # jit, remat, custom_vjp / custom_jvp, ...
        tally.merge(_count(sub, scope))
  return tally


def _scope_key(path: str, depth: int) -> str:
  parts = [p for p in path.split("/") if p]
  return "/".join(parts[:depth]) or "(top level)"


def count_flops(fn: Callable[..., Any], *args, scope_depth: int = 2, **kwargs) -> FlopCount:
  """Analytic FLOPs of `fn(*args, **kwargs)` from its jaxpr (the module docstring).

  `args` may be arrays or jax.ShapeDtypeStruct (nothing is computed). `by_scope` adds up
  FLOPs per name-scope path cut to `scope_depth` levels (Flax modules name their scopes).
  """
  closed = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
  tally = _count(closed.jaxpr, "")
  scopes: collections.Counter = collections.Counter()
  for path, flops in tally.scopes.items():
    scopes[_scope_key(path, scope_depth)] += flops
  return FlopCount(total=tally.total, by_kind=dict(tally.kinds),
                   by_scope=dict(scopes.most_common()), notes=sorted(tally.notes))


# -- the benchmark ---------------------------------------------------------------------------


def synthetic_batch(task, config: ml_collections.ConfigDict,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """This host's share of a batch with the shapes and dtypes the input pipeline delivers
  (jaxt2i.data.pipeline: `image` float32 [B, S, S, 3] in data.value_range, `tokens` /
  `tokens_mask` int32 [B, max_caption_length]); a task's per-record features
  (Task.record_features) come from generated shapes-v1 records. Random values: timing and
  FLOPs do not depend on them."""
  data = config.data
  local = config.batch_size // jax.process_count()
  size, length = data.image_size, data.max_caption_length
  rng = np.random.default_rng(seed)
  low, high = data.value_range
  batch = {"image": rng.uniform(low, high, (local, size, size, 3)).astype(np.float32)}
  if task.uses_text:
    batch["tokens"] = rng.integers(1, data.vocab_size, (local, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, (local, 1))
    batch["tokens_mask"] = (np.arange(length)[None] < lengths).astype(np.int32)
  if task.record_features is not None:
    from jaxt2i.data import shapes
    rows = [task.record_features(r) for r in shapes.generate("train", local, image_size=size)]
    batch.update({k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]})
  missing = [k for k in task.batch_keys if k not in batch]
  if missing:
    raise ValueError(f"no synthetic values for the task's batch keys {missing}")
  return {k: batch[k] for k in task.batch_keys}


@contextlib.contextmanager
def _field(config: ml_collections.ConfigDict, name: str, value: Any):
  """config[name] = value for a while."""
  old = config[name]
  config[name] = value
  try:
    yield
  finally:
    config[name] = old


def first_batch(trainer, mode: str = "auto") -> tuple[dict[str, np.ndarray], dict]:
  """(this host's batch, where it came from). `mode`: "loader" (the config's data set, or
  fail), "synthetic", or "auto" (the loader when its data set exists, else synthetic)."""
  if mode not in ("auto", "loader", "synthetic"):
    raise ValueError(f"batch source {mode!r}: choose auto, loader or synthetic")
  data = trainer.config.data
  if mode != "synthetic":
    try:
      # One batch is all we need: no grain worker processes.
      with _field(data, "worker_count", 0):
        local = next(iter(trainer.make_loader()))
      return dict(local), {"source": "loader",
                           "detail": f"{data.name} [{data.split}] through the config's loader"}
    except Exception as e:  # a missing data set surfaces as several error types
      if mode == "loader":
        raise ValueError(f"cannot read a batch of {data.name!r}: {e}") from e
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      log.warning("data set %r unavailable (%s): using a synthetic batch", data.name, reason)
  else:
    reason = "requested"
  return synthetic_batch(trainer.task, trainer.config), {
      "source": "synthetic", "detail": f"random values with the loader's shapes ({reason})"}


def _memory(compiled) -> dict[str, int] | None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # backend-specific, may be unimplemented
    return None
  if mem is None:
    return None
  fields = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
            "alias_bytes": "alias_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
            "generated_code_bytes": "generated_code_size_in_bytes"}
  out = {k: int(getattr(mem, v, 0) or 0) for k, v in fields.items()}
  # What the step holds at its peak, at most: inputs, outputs not aliased to inputs, scratch.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  return out


def _xla_cost(compiled) -> dict[str, float] | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost:
    return None
  return {k: float(cost[k]) for k in ("flops", "transcendentals", "bytes accessed")
          if k in cost}


def step_flops(trainer, scope_depth: int = 2) -> dict[str, Any]:
  """Analytic FLOPs of one training step of a built Trainer (global batch, all devices):
  the forward loss's count, 3 x it (the model FLOPs of the step), and the gradient program's
  own count."""
  task, state = trainer.task, trainer.abstract_state
  constants = trainer.abstract_constants
  kwargs = {"step": jnp.zeros((), jnp.int32)} if task.needs_step else {}

  def forward(params, batch, rng):
    return task.loss({**constants, **params}, batch, rng, **kwargs)

  def gradient(params, batch, rng):
    return jax.value_and_grad(forward, has_aux=True)(params, batch, rng)
  rng = jax.random.key(0)
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    fwd = count_flops(forward, state.params, trainer.abstract_batch, rng,
                      scope_depth=scope_depth)
    grad = count_flops(gradient, state.params, trainer.abstract_batch, rng, scope_depth=1)
  return {"forward": fwd.total, "train": 3.0 * fwd.total, "train_rule": "3 x forward",
          "gradient_program": grad.total, "by_kind": fwd.by_kind, "by_scope": fwd.by_scope,
          "notes": sorted(set(fwd.notes) | set(grad.notes))}


@dataclasses.dataclass
class BenchOptions:
  steps: int = 10                 # timed steps
  warmup: int = 2                 # steps run before timing (the first may still load code)
  data: str = "auto"              # auto | loader | synthetic (first_batch)
  peak_tflops: float = 0.0        # per device; 0 = measure the matmul ceiling
  profile_dir: str = ""           # jax.profiler trace of `profile_steps` extra steps
  profile_steps: int = 3
  num_devices: int = 0            # first N devices; 0 = all
  scope_depth: int = 2            # name-scope levels in the FLOP breakdown

  def validate(self) -> None:
    if self.steps < 1 or self.warmup < 0 or self.profile_steps < 1 or self.num_devices < 0:
      raise ValueError(f"need steps >= 1, warmup >= 0, profile_steps >= 1, devices >= 0; got "
                       f"steps={self.steps}, warmup={self.warmup}, "
                       f"profile_steps={self.profile_steps}, devices={self.num_devices}")
    if self.peak_tflops < 0:
      raise ValueError(f"peak_tflops={self.peak_tflops} must be > 0 (or 0: measure it)")
    if self.data not in ("auto", "loader", "synthetic"):
      raise ValueError(f"data={self.data!r}: choose auto, loader or synthetic")


def run(config: ml_collections.ConfigDict, workdir: str | None = None,
        options: BenchOptions | None = None) -> dict[str, Any]:
  """Benchmarks one training step of `config`; returns the result dict (see `summary`).

  Without `workdir` the Trainer works in a temporary directory (a fresh, randomly
  initialised state plus the task's pretrained parts); a workdir with checkpoints is
  restored, so a trained run can be benchmarked as it is.
  """
  from jaxt2i.training import config as config_lib
  from jaxt2i.training.trainer import Trainer
  options = options or BenchOptions()
  options.validate()
  config_lib.validate(config)
  devices = jax.devices()
  if options.num_devices:
    if options.num_devices > len(devices):
      raise ValueError(f"--devices {options.num_devices}: only {len(devices)} available")
    devices = devices[:options.num_devices]
  with contextlib.ExitStack() as stack:
    if workdir is None:
      workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxt2i-bench-"))
    trainer = Trainer(config, workdir, devices=devices)
    stack.callback(trainer.checkpointer.close)
    stack.callback(trainer.writer.close)
    return _run(trainer, options)


def _run(trainer, options: BenchOptions) -> dict[str, Any]:
  config, task = trainer.config, trainer.task
  n_dev = trainer.mesh.size
  log.info("bench: task %s, mesh %s (%d x %s)", config.task, dict(trainer.mesh.shape), n_dev,
           trainer.mesh.devices.flat[0].device_kind)
  local, batch_info = first_batch(trainer, options.data)
  log.info("bench: batch of %d from %s", config.batch_size, batch_info["source"])
  missing = [k for k in task.batch_keys if k not in local]
  if missing:
    raise ValueError(f"the batch lacks the task's keys {missing} (it has {sorted(local)})")
  task.prepare(local)
  abstract = {k: jax.ShapeDtypeStruct((config.batch_size,) + np.shape(local[k])[1:],
                                      np.asarray(local[k]).dtype, sharding=trainer.batch_sharding)
              for k in task.batch_keys}
  batch_info["shapes"] = {k: [list(v.shape), str(v.dtype)] for k, v in abstract.items()}
  log.info("bench: compiling the train step")
  trainer.build(abstract)
  compiled = trainer.compiled_step
  log.info("bench: compiled in %.1f s; counting FLOPs", trainer.compile_seconds)
  flops = step_flops(trainer, options.scope_depth)
  xla = _xla_cost(compiled)
  memory = _memory(compiled)

  params = trainer.abstract_state.params
  n_params = sum(_size(x.shape) for x in jax.tree.leaves(params))
  frozen = set(task.frozen_keys)
  n_trainable = sum(_size(x.shape) for k, v in params.items() if k not in frozen
                    for x in jax.tree.leaves(v))

  log.info("bench: initialising the state")
  state = trainer.initial_state()
  batch = trainer.global_batch(local)
  samples, metrics = [], None
  load_before = os.getloadavg()[0]
  for phase, count in (("warm-up", options.warmup), ("timed", options.steps)):
    for i in range(count):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready((state, metrics))
      seconds = time.perf_counter() - start
      if phase == "timed":
        samples.append(seconds)
      log.info("bench: %s step %d/%d %.1f ms", phase, i + 1, count, seconds * 1e3)
  load_after = os.getloadavg()[0]
  loss = float(np.asarray(jax.device_get(metrics["train/loss"])))

  profile_dir = None
  if options.profile_dir:
    profile_dir = os.path.abspath(options.profile_dir)
    log.info("bench: tracing %d steps into %s", options.profile_steps, profile_dir)
    with jax.profiler.trace(profile_dir):
      for _ in range(options.profile_steps):
        state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready((state, metrics))

  if options.peak_tflops:
    peak = {"per_device_flops_per_s": options.peak_tflops * 1e12, "source": "--peak_tflops"}
  else:
    dtype = "bfloat16" if config.train.compute_dtype == "bfloat16" else "float32"
    log.info("bench: measuring the %s matmul ceiling of one device", dtype)
    ceiling = matmul_ceiling(dtype=dtype)
    peak = {"per_device_flops_per_s": ceiling["flops_per_s"],
            "source": f"measured {dtype} matmul ceiling (n={ceiling['best_size']})",
            "ceiling": ceiling}
  peak["devices"] = n_dev
  peak["flops_per_s"] = peak["per_device_flops_per_s"] * n_dev

  median = statistics.median(samples)
  timing = {"warmup": options.warmup, "steps": options.steps, "median_s": median,
            "min_s": min(samples), "max_s": max(samples), "mean_s": statistics.fmean(samples),
            "samples_s": samples,
            # Other processes on the machine slow the steps: the 1-minute load average.
            "load_average": {"before": load_before, "after": load_after}}
  if xla and "flops" in xla:
    xla["flops_all_devices"] = xla["flops"] * n_dev
  notes = []
  if on_accelerator():
    notes.append("XLA's compiled cost analysis on GPUs leaves out library calls (cuBLAS / "
                 "cuDNN matmuls and convolutions)")
  return {
      "task": config.task, "devices": n_dev,
      "device_kind": trainer.mesh.devices.flat[0].device_kind, "backend": jax.default_backend(),
      "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
      "batch_size": config.batch_size, "batch": batch_info,
      "compute_dtype": config.train.compute_dtype,
      "params": {"total": n_params, "trainable": n_trainable},
      "compile_s": trainer.compile_seconds, "compile_from_cache": trainer.step_from_cache,
      "flops": flops, "xla_cost_per_device": xla,
      "memory_per_device": memory, "timing": timing,
      "steps_per_s": 1.0 / median, "examples_per_s": config.batch_size / median,
      "model_flops_per_s": flops["train"] / median, "peak": peak,
      "mfu": flops["train"] / median / peak["flops_per_s"],
      "mfu_gradient_program": flops["gradient_program"] / median / peak["flops_per_s"],
      "final_loss": loss,
      "profile_dir": profile_dir, "notes": notes,
      "environment": environment(),
  }


# -- reporting -------------------------------------------------------------------------------


def _si(x: float, unit: str = "") -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def _gib(n: int) -> str:
  return f"{n / (1 << 30):.3f} GiB"


def summary(result: Mapping[str, Any], extra: Sequence[tuple[str, str]] = ()) -> str:
  """The result as a two-column table for the terminal (`extra` rows at the end)."""
  r = result
  f, t, p = r["flops"], r["timing"], r["peak"]
  rows = [
      ("config", f"{r.get('config', '?')} (task {r['task']})"),
      ("devices", f"{r['devices']} x {r['device_kind']} ({r['backend']}), mesh "
                  + " ".join(f"{k}={v}" for k, v in r["mesh"].items())),
      ("params", f"{r['params']['total'] / 1e6:.3f} M ({r['params']['trainable'] / 1e6:.3f} M "
                 "trainable)"),
      ("batch", f"{r['batch_size']} examples, {r['batch']['source'].upper()}: "
                f"{r['batch']['detail']}"),
      ("compile", f"{r['compile_s']:.1f} s (" + ("loaded from the compilation cache"
                                                 if r.get("compile_from_cache")
                                                 else "ahead of time") + ")"),
      ("FLOPs/step analytic", f"{_si(f['train'], 'FLOP')} = 3 x forward "
                              f"{_si(f['forward'], 'FLOP')} (gradient program: "
                              f"{_si(f['gradient_program'], 'FLOP')})"),
  ]
  top = list(f["by_scope"].items())[:4]
  if top and f["forward"]:
    rows.append(("  forward by scope", ", ".join(f"{k} {v / f['forward']:.0%}" for k, v in top)))
  xla = r.get("xla_cost_per_device") or {}
  if "flops" in xla:
    rows.append(("FLOPs/step XLA", f"{_si(xla['flops'], 'FLOP')} per device, "
                                   f"{_si(xla['flops_all_devices'], 'FLOP')} all devices "
                                   "(compiled cost analysis)"))
  mem = r.get("memory_per_device")
  if mem:
    rows.append(("memory/device", f"args {_gib(mem['argument_bytes'])}, out "
                                  f"{_gib(mem['output_bytes'])} (aliased "
                                  f"{_gib(mem['alias_bytes'])}), temp {_gib(mem['temp_bytes'])}"))
  rows += [
      ("step time", f"median {t['median_s'] * 1e3:.1f} ms, min {t['min_s'] * 1e3:.1f} ms "
                    f"({t['steps']} steps after {t['warmup']} warm-up; load average "
                    f"{t['load_average']['before']:.1f} -> {t['load_average']['after']:.1f} "
                    f"on {os.cpu_count()} cores)"),
      ("throughput", f"{r['examples_per_s']:.1f} examples/s, {r['steps_per_s']:.2f} steps/s, "
                     f"{_si(r['model_flops_per_s'], 'FLOP/s')}"),
      ("peak", f"{_si(p['flops_per_s'], 'FLOP/s')} = {p['devices']} x "
               f"{_si(p['per_device_flops_per_s'], 'FLOP/s')} ({p['source']})"),
      ("MFU", f"{r['mfu']:.1%} ({r['mfu_gradient_program']:.1%} with the gradient program's "
              "count)"),
      ("final loss", f"{r['final_loss']:.4g}"),
  ]
  if r.get("profile_dir"):
    rows.append(("profile", r["profile_dir"]))
  for note in f["notes"] + r.get("notes", []):
    rows.append(("note", note))
  rows += list(extra)
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def default_out(config_arg: str, workdir: str | None) -> Path:
  """WORKDIR/bench.json, else benchmarks/results/bench_<recipe>_<variant>[_<backend>].json
  in the source tree (the working directory when there is none)."""
  if workdir:
    return Path(workdir) / "bench.json"
  path, _, variant = config_arg.partition(":")
  name = "_".join(x for x in ("bench", Path(path).stem, variant) if x)
  if on_accelerator():
    name += f"_{jax.default_backend()}"
  folder = RESULTS_DIR if BENCHMARKS_DIR.is_dir() else Path.cwd()
  return folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"


def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2, default=str) + "\n")
  return path


_HEADER = (
    "One row per `jaxt2i bench --record` run, oldest first. Analytic FLOPs are the training "
    "step's model FLOPs, 3 x the forward loss's dot_general and convolution FLOPs counted on "
    "its jaxpr (jaxt2i/bench.py); XLA's are the compiled step's cost analysis over all "
    "devices (elementwise work included, each loop body once). MFU = analytic FLOPs / median "
    "step time / peak (the measured matmul ceiling unless --peak_tflops). Step times use one "
    "device-resident "
    "batch (input pipeline excluded); `load` is the machine's 1-minute load average when the "
    "steps started.\n\n"
    "| date | config | machine | versions | batch (data) | params | compile s | ms/step median "
    "(min) | examples/s | TFLOP/step analytic / XLA | peak TFLOP/s | MFU | memory/device "
    "args + temp GiB | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(result: Mapping[str, Any]) -> str:
  r, env = result, result["environment"]
  xla = (r.get("xla_cost_per_device") or {}).get("flops_all_devices")
  mem = r.get("memory_per_device")
  versions = ", ".join(f"{k} {env['versions'][k]}" for k in ("jax", "flax")
                       if k in env["versions"])
  cells = [
      env["date"], f"`{r.get('config', '?')}`",
      (f"{env['cpu']}, {env['cores']} cores, {env['devices']}; load "
       f"{r['timing']['load_average']['before']:.1f}"), versions,
      f"{r['batch_size']} ({r['batch']['source']})",
      f"{r['params']['total'] / 1e6:.2f}M",
      f"{r['compile_s']:.1f}",
      f"{r['timing']['median_s'] * 1e3:.1f} ({r['timing']['min_s'] * 1e3:.1f})",
      f"{r['examples_per_s']:.1f}",
      f"{r['flops']['train'] / 1e12:.4g} / " + (f"{xla / 1e12:.4g}" if xla else "n/a"),
      f"{r['peak']['flops_per_s'] / 1e12:.3g}" + ("" if r["peak"]["source"] == "--peak_tflops"
                                                  else " (measured)"),
      f"**{r['mfu']:.1%}**",
      (f"{(mem['argument_bytes']) / (1 << 30):.3f} + {mem['temp_bytes'] / (1 << 30):.3f}"
       if mem else "n/a"),
      f"`{r.get('command', '')}`",
  ]
  return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def record(result: Mapping[str, Any], results_md: str | os.PathLike = RESULTS_MD) -> str:
  """Appends the result's row to the `bench` section of `results_md` (created if missing)."""
  path = Path(results_md)
  text = path.read_text() if path.exists() else "# Benchmark results\n"
  row = table_row(result)
  start, end = f"<!-- bench:{SECTION} -->", f"<!-- /bench:{SECTION} -->"
  if start in text and end in text:
    head, rest = text.split(end, 1)
    text = head.rstrip("\n") + "\n" + row + "\n" + end + rest
  else:
    text = (text.rstrip() + f"\n\n{start}\n## {SECTION}\n\n{_HEADER}\n{row}\n{end}\n")
  path.write_text(text)
  return row
