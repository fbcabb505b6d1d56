"""The one training loop, generic over a Task.

    config -> mesh + logical_axis_rules -> task -> grain loader
      -> abstract state (eval_shape) -> shardings -> jit(init, out_shardings) or Orbax restore
      -> AOT-compiled step (explicit shardings, donated state) -> loop: metrics, evals,
         async checkpoints, preemption
Per-step RNG is fold_in(seed, step) and the data order is one global sequence whose position
(records consumed) is checkpointed, so a resumed run continues exactly as an uninterrupted one
(bitwise on CPU), also on a different number of processes or devices.
Skipped steps (non-finite loss or gradients, or a loss spike) leave params, optimizer state
and EMA untouched but still advance the step and consume their batch.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxt2i.data import pipeline
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.parallel import mesh as mesh_lib
from jaxt2i.parallel import partitioning
from jaxt2i.tasks.base import STATE_DELTAS, STATE_UPDATES, Task, get_task
from jaxt2i.training import compilation
from jaxt2i.training import config as config_lib
from jaxt2i.training import metrics as metrics_lib
from jaxt2i.training.checkpoint import Checkpointer
from jaxt2i.training.state import TrainState, init_state, lr_schedule, make_optimizer


class TrainingDivergedError(RuntimeError):
  """Too many consecutive steps had to be skipped."""


class Preempted(RuntimeError):
  """train_and_evaluate stopped early on SIGTERM / a preemption notice, after writing a
  checkpoint; the same command resumes from it."""


class _PreemptionWatcher:
  """SIGTERM (TPU maintenance, SLURM time limit, spot reclaim) -> save and exit cleanly.

  With several processes, JAX's coordination service already listens for SIGTERM and all
  processes agree on the step to stop at (`reached_preemption_sync_point`); a single process
  uses its own handler.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service not running
        return False
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _abstract_batch(local: Mapping[str, np.ndarray], global_size: int,
                    sharding: NamedSharding, keys: Sequence[str]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((global_size,) + v.shape[1:], v.dtype, sharding=sharding)
          for k, v in local.items() if k in keys}


def _whole_batch(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The global batch, as numpy on every host, from each host's share (a collective: every
  process calls it). Tasks measure derived fields on the first batch (e.g. the latent
  scale), which must be the same on every host and the same as on one process."""
  if jax.process_count() == 1:
    return dict(local)
  from jax.experimental import multihost_utils
  numeric = {k: np.asarray(v) for k, v in local.items()
             if np.asarray(v).dtype.kind in "biuf"}
  gathered = multihost_utils.process_allgather(numeric, tiled=True)
  return {k: np.asarray(v) for k, v in gathered.items()}


def _init_compiler_options() -> dict[str, Any]:
  """XLA options for the one-off init program. On CPUs its LLVM code is built without
  optimisation: a run executes it once, and its random-number kernels (one per parameter
  shape) take long to optimise: 20 s instead of 40 s for the `ldm_shapes.py:demo` U-Net's
  init alone on a 2-core CPU. The random bits are the same; the floats drawn from them differ
  from an optimised build's by at most an ulp."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


class Trainer:
  """Builds everything from `config`; `train()` runs (or resumes) the loop.

  `task`, `source` (training records), `eval_source` and `tokenizer` may be given directly
  (tests, notebooks); otherwise they come from the config.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
               task: Task | None = None, source: Sequence[Mapping[str, Any]] | None = None,
               eval_source: Sequence[Mapping[str, Any]] | None = None,
               tokenizer: Tokenizer | None = None, devices: Sequence[jax.Device] | None = None):
    config_lib.validate(config)
    self.config = config
    if config.train.compilation_cache:
      logging.info("compilation cache: %s", compilation.enable_compilation_cache())
    # Orbax needs absolute paths; URLs (gs://...) pass through unchanged.
    self.workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
    self.task = task or get_task(config)
    self.mesh = mesh_lib.create_mesh(config.mesh.to_dict(), devices)
    config_lib.validate_batch(config, mesh_lib.batch_parallel_size(self.mesh), jax.process_count())
    self.preempted = False  # set by train(); stays False for a run already at num_steps
    self.rules = partitioning.logical_axis_rules(config.sharding.strategy,
                                                 config.sharding.extra_rules)
    self.batch_sharding = partitioning.batch_sharding(self.mesh)
    self.tx = make_optimizer(config.optim, config.train.num_steps)
    self.schedule = lr_schedule(config.optim, config.train.num_steps)
    self._source, self._eval_source, self._tokenizer = source, eval_source, tokenizer
    self.checkpointer = Checkpointer(
        self.workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    self.writer = metrics_lib.MetricWriter(self.workdir)
    logging.info("mesh %s over %d devices (%d processes); rules %s", dict(self.mesh.shape),
                 self.mesh.size, jax.process_count(), self.rules)

  # -- building ---------------------------------------------------------------------------

  @contextlib.contextmanager
  def _sharding_context(self):
    """Mesh + logical rules in scope while tracing, so activation constraints resolve."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def _tokenizer_or_load(self) -> Tokenizer | None:
    if not self.task.uses_text:
      return None
    if self._tokenizer is None:
      self._tokenizer = pipeline.load_tokenizer(self.config.data)
    return self._tokenizer

  def make_loader(self, *, split: str | None = None, source=None, shuffle=None, num_epochs=None,
                  start: int = 0):
    """This host's loader; `start` is the global data position (records consumed)."""
    if source is None:
      source = self.task.data_source(split or self.config.data.split)
    return pipeline.make_loader(
        self.config.data, global_batch_size=self.config.batch_size, seed=self.config.seed,
        split=split, source=source, tokenizer=self._tokenizer_or_load(), shuffle=shuffle,
        num_epochs=num_epochs, start=start, text=self.task.uses_text,
        features=self.task.record_features)

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's numpy share -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(v), (self.config.batch_size,) + v.shape[1:])
            for k, v in local.items() if k in self.task.batch_keys}

  def build(self, abstract_batch: Mapping[str, jax.ShapeDtypeStruct], *,
            compile_step: bool = True) -> None:
    """Abstract state, its shardings, the sharded init and (unless `compile_step` is False:
    a finished run only restores) the compiled train step."""
    task, tx, ema = self.task, self.tx, self.config.train.ema_decay > 0
    self.abstract_batch = dict(abstract_batch)
    constant_keys = tuple(task.constant_keys)

    def boxed_params(rng):
      dummy = {k: jnp.zeros((1,) + s.shape[1:], s.dtype) for k, s in abstract_batch.items()}
      return task.init(rng, dummy)

    def boxed_init(rng):
      params = boxed_params(rng)
      return init_state({k: v for k, v in params.items() if k not in constant_keys}, tx, ema)

    rng = jax.random.key(self.config.seed)
    with self._sharding_context():
      boxed = jax.eval_shape(boxed_init, rng)
      boxed_constants = {k: v for k, v in jax.eval_shape(boxed_params, rng).items()
                         if k in constant_keys}
    self.state_shardings = partitioning.logical_to_shardings(boxed, self.mesh, self.rules)
    self.abstract_state = partitioning.unbox(boxed)
    self.constant_shardings = partitioning.logical_to_shardings(boxed_constants, self.mesh,
                                                                self.rules)
    self.abstract_constants = partitioning.unbox(boxed_constants)
    self._init = jax.jit(lambda r: partitioning.unbox(boxed_init(r)),
                         out_shardings=self.state_shardings)
    replicated = partitioning.replicated(self.mesh)
    step = jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, self.constant_shardings,
                                 self.batch_sharding),
                   out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    abstract_state = partitioning.with_shardings(self.abstract_state, self.state_shardings)
    abstract_constants = partitioning.with_shardings(self.abstract_constants,
                                                     self.constant_shardings)
    self.compiled_step = None
    if compile_step:
      start = time.perf_counter()
      with self._sharding_context(), compilation.count_cache_hits() as hits:
        lowered = step.lower(abstract_state, abstract_constants, self.abstract_batch)
        self.lower_seconds = time.perf_counter() - start
        self.compiled_step = lowered.compile()
      self.compile_seconds = time.perf_counter() - start
      self.step_from_cache = bool(hits)
      self._log_compile_report()
    self._eval_step = jax.jit(lambda p, c, b, r: task.evaluate({**c, **p}, b, r),
                              out_shardings=replicated)
    self.constants: dict[str, Any] | None = None

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    """One compiled step (the task's constant subtrees, loaded by initial_state, go in)."""
    return self.compiled_step(state, self._constants(), batch)

  def _constants(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The task's constant subtrees (Task.constant_keys) on the mesh, read once (from
    `values`, Task.initial_values() already read, when given)."""
    if self.constants is None:
      keys = tuple(self.task.constant_keys)
      if values is None and keys:
        values = self.task.constant_values()
      values = values or {}
      missing = sorted(set(keys) - set(values))
      if missing:
        raise ValueError(f"Task.initial_values gave no value for the constant subtrees "
                         f"{missing}")
      self.constants = {k: self._place(k, values[k], self.abstract_constants[k],
                                       self.constant_shardings[k]) for k in keys}
    return self.constants

  @staticmethod
  def _place(key: str, values: Any, abstract: Any, shardings: Any) -> Any:
    """Host (numpy) values onto the mesh with `shardings`: each device gets its shard."""
    try:
      return jax.tree.map(lambda v, a, s: jax.device_put(np.asarray(v, a.dtype), s), values,
                          abstract, shardings)
    except ValueError as e:
      raise ValueError(f"initial values of {key!r} do not match the model's params: {e}") from e

  def _log_compile_report(self) -> None:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))
    xla = self.compile_seconds - self.lower_seconds
    report = [f"params {n_params / 1e6:.3f}M",
              f"compile {self.compile_seconds:.1f}s (trace + lower {self.lower_seconds:.1f}s, "
              + (f"loaded from the compilation cache {xla:.1f}s)" if self.step_from_cache
                 else f"XLA {xla:.1f}s)")]
    try:
      cost = self.compiled_step.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      if cost and "flops" in cost:
        self.step_flops = float(cost["flops"])
        report.append(f"XLA flops/step/device {self.step_flops:.3g}")
    except Exception:  # cost analysis is best-effort and backend-specific
      pass
    try:
      mem = self.compiled_step.memory_analysis()
      if mem is not None:
        gib = 1 << 30
        report.append(
            f"memory/device: args {mem.argument_size_in_bytes / gib:.3f} GiB, "
            f"temp {mem.temp_size_in_bytes / gib:.3f} GiB, "
            f"out {mem.output_size_in_bytes / gib:.3f} GiB (aliased "
            f"{mem.alias_size_in_bytes / gib:.3f})")
    except Exception:
      pass
    logging.info("train step compiled: %s", "; ".join(report))

  # -- the step ---------------------------------------------------------------------------

  def _grads(self, params, constants, batch, rng, step):
    task = self.task

    def loss_fn(params, batch, rng, **kwargs):
      return task.loss({**constants, **params}, batch, rng, **kwargs)
    if self.task.needs_step:
      loss_fn = functools.partial(loss_fn, step=step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = self.config.train.grad_accum_steps
    if accum == 1:
      return grad_fn(params, batch, rng)
    # Micro-batch i takes rows i, i+accum, ...: each micro-batch stays spread over all
    # batch-parallel devices instead of living on 1/accum of them.
    micro_sharding = NamedSharding(self.mesh, PartitionSpec(None, mesh_lib.BATCH_AXES))
    micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1),
            micro_sharding), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, rng))

    def body(carry, xs):
      i, mb = xs
      out = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return jax.tree.map(lambda x: x / accum, total)

  def _train_step(self, state: TrainState, constants: dict[str, Any],
                  batch: Mapping[str, jax.Array]):
    cfg = self.config.train
    rng = jax.random.fold_in(jax.random.key(self.config.seed + 1), state.step)
    (loss, aux), grads = self._grads(state.params, constants, batch, rng, state.step)
    aux = dict(aux)
    state_updates = aux.pop(STATE_UPDATES, None)
    state_deltas = aux.pop(STATE_DELTAS, None)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if cfg.loss_spike_factor > 0:
      spike = ((state.step >= cfg.loss_spike_warmup)
               & (loss > cfg.loss_spike_factor * state.loss_ema))
      ok &= ~spike
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    for key in set(self.task.frozen_keys) & set(updates):  # weight decay must not move them
      updates = {**updates, key: jax.tree.map(jnp.zeros_like, updates[key])}
    params = optax.apply_updates(state.params, updates)
    if state_deltas is not None:
      params = _replace_leaves(params, state_deltas, add=True)
    if state_updates is not None:
      params = _replace_leaves(params, state_updates)

    def keep_if_bad(new, old):
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    ema_params = state.ema_params
    if ema_params is not None:
      # Warm-up so early EMA is not dominated by the random init (as in flaxformer/big_vision).
      decay = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
      ema_params = keep_if_bad(
          jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1 - decay),
                       ema_params, params), ema_params)
    accepted = state.step - state.skipped
    loss_ema = jnp.where(ok, jnp.where(accepted == 0, loss, 0.98 * state.loss_ema + 0.02 * loss),
                         state.loss_ema)
    bad = (~ok).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1, params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state), ema_params=ema_params,
        loss_ema=loss_ema.astype(jnp.float32), skipped=state.skipped + bad,
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1))
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/lr": self.schedule(state.step), "train/skipped": bad,
               "train/skipped_total": new_state.skipped, "train/bad_streak": new_state.bad_streak,
               **{f"train/{k}": v for k, v in aux.items()}}
    return new_state, metrics

  # -- the loop ---------------------------------------------------------------------------

  def initial_state(self) -> TrainState:
    """A fresh state, or the latest checkpoint's on this mesh; sets `data_position` (the
    global records consumed; None when a checkpoint has none)."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      self.data_position = 0
      key = jax.random.key(self.config.seed)
      start = time.perf_counter()
      with self._sharding_context():
        init = self._init.lower(key).compile(compiler_options=_init_compiler_options())
        state = init(key)
      logging.info("initial state: compiled and ran in %.1fs", time.perf_counter() - start)
      return self._with_initial_values(state)
    logging.info("resuming from %s step %d", self.checkpointer.directory, latest)
    state, self.data_position = self.checkpointer.restore(latest, self.abstract_state,
                                                          self.state_shardings)
    return state

  def _with_initial_values(self, state: TrainState) -> TrainState:
    """Replaces the task's pretrained subtrees (Task.initial_values) in a fresh state."""
    values = self.task.initial_values()
    if not values:
      return state
    self._constants(values)
    constant = set(self.task.constant_keys)

    def put(tree, key):
      if key not in tree:
        raise ValueError(f"Task.initial_values gave {key!r}, not a top-level param subtree "
                         f"({sorted(tree)})")
      target = tree[key]
      placed = self._place(key, values[key], target,
                           jax.tree.map(lambda t: t.sharding, target))
      return {**tree, key: placed}

    params, ema = state.params, state.ema_params
    for key in set(values) - constant:
      params = put(params, key)
      if ema is not None:
        ema = put(ema, key)
    return state.replace(params=params, ema_params=ema)

  def _save(self, state, data_position: int | None) -> None:
    self.checkpointer.save(state, data_position, config_lib.to_json_dict(self.config))

  def train(self, batches: Iterator[Mapping[str, np.ndarray]] | None = None) -> TrainState:
    """Trains to config.train.num_steps, resuming from the workdir's latest checkpoint.

    `batches` (per-host numpy batches) replaces the grain loader, e.g. for benchmarks; its
    position is then not checkpointed.
    """
    cfg = self.config
    if batches is None:
      # Peeked for the shapes; the loader is made again at the run's data position.
      first_local = next(iter(self.make_loader(source=self._source)))
    else:
      data_iter = iter(batches)
      first_local = next(data_iter)
      data_iter = itertools.chain([first_local], data_iter)
    self._restore_derived_fields()
    self.task.prepare(_whole_batch(first_local))
    if jax.process_index() == 0:
      # After `prepare`, which may fill derived fields (e.g. a latent scale).
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
      if self.task.uses_text and (self._tokenizer is not None or batches is None):
        # The run keeps its own tokenizer: sampling it needs neither the data nor its cache.
        pipeline.save_run_tokenizer(self._tokenizer_or_load(), self.workdir)
    latest = self.checkpointer.latest_step()
    finished = latest is not None and latest >= cfg.train.num_steps
    # A finished run (e.g. `make demo` run again) restores without compiling its step.
    self.build(_abstract_batch(first_local, cfg.batch_size, self.batch_sharding,
                               self.task.batch_keys), compile_step=not finished)
    state = self.initial_state()
    step = int(partitioning.fetch_replicated(state.step))
    if step >= cfg.train.num_steps:
      logging.info("already trained to step %d (num_steps %d)", step, cfg.train.num_steps)
      return state
    position = None
    if batches is None:
      position = self.data_position
      if position is None:
        position = step * cfg.batch_size
      data_iter = iter(self.make_loader(source=self._source, start=position))
    watcher = _PreemptionWatcher()
    self.preempted = False
    pending: list[dict[str, jax.Array]] = []
    previous_metrics = None
    last_log_time, last_log_step = time.perf_counter(), step
    profiling = False
    loop_start, first_step = time.perf_counter(), step
    try:
      while step < cfg.train.num_steps:
        if cfg.train.profile_steps and step == cfg.train.profile_steps[0] and not profiling:
          jax.profiler.start_trace(str(self.workdir / "profile"))
          profiling = True
        batch = self.global_batch(next(data_iter))
        if position is not None:
          position += cfg.batch_size
        state, metrics = self.train_step(state, batch)
        step += 1
        pending.append(metrics)
        # Check the previous step's streak: reading it does not wait for the step in flight.
        if previous_metrics is not None:
          self._check_divergence(previous_metrics)
        previous_metrics = metrics
        if profiling and step > cfg.train.profile_steps[1]:
          jax.profiler.stop_trace()
          profiling = False
        if step % cfg.train.log_every == 0 or step == cfg.train.num_steps:
          now = time.perf_counter()
          self._log(step, pending, (step - last_log_step) / max(now - last_log_time, 1e-9))
          pending, last_log_time, last_log_step = [], time.perf_counter(), step
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
          self.evaluate(state, step)
        if watcher.reached(step):
          self._save(state, position)
          self.checkpointer.wait()
          logging.warning("preempted: checkpoint for step %d written; exiting", step)
          self.preempted = True
          return state
        if self.checkpointer.due(step):
          self._save(state, position)
      self._check_divergence(previous_metrics)
      jax.block_until_ready(state)
      self.loop_timing = {"steps": step - first_step,
                          "seconds": time.perf_counter() - loop_start}
      if self.checkpointer.latest_step() != step:
        self._save(state, position)
      if cfg.train.eval_at_end and (not cfg.train.eval_every or step % cfg.train.eval_every):
        self.evaluate(state, step)
      return state
    finally:
      if profiling:
        jax.profiler.stop_trace()
      watcher.close()
      self.checkpointer.wait()
      self.writer.flush()

  def _restore_derived_fields(self) -> None:
    """On resume, Task.derived_fields come from the run's config.json, as first derived."""
    saved = self.workdir / "config.json"
    if (not self.task.derived_fields or self.checkpointer.latest_step() is None
        or not saved.exists()):
      return
    model = json.loads(saved.read_text()).get("model", {})
    with self.config.unlocked():
      for field in self.task.derived_fields:
        if field in model:
          self.config.model[field] = model[field]

  def _check_divergence(self, metrics: Mapping[str, jax.Array] | None) -> None:
    if metrics is None:
      return
    streak = int(partitioning.fetch_replicated(metrics["train/bad_streak"]))
    if streak >= self.config.train.max_bad_steps:
      loss = float(partitioning.fetch_replicated(metrics["train/loss"]))
      raise TrainingDivergedError(
          f"{streak} consecutive steps had a non-finite loss/gradient or a loss spike "
          f"(train.max_bad_steps={self.config.train.max_bad_steps}); last loss {loss}. Lower "
          "optim.learning_rate, enable optim.grad_clip_norm, or resume from an earlier checkpoint.")

  def _log(self, step: int, pending: list[dict[str, jax.Array]], steps_per_s: float) -> None:
    fetched = partitioning.fetch_replicated(pending)
    summary = {}
    for key in fetched[-1]:
      values = np.asarray([m[key] for m in fetched], np.float64)
      if key in ("train/skipped_total", "train/bad_streak", "train/lr"):
        summary[key] = values[-1]
      elif key == "train/skipped":
        summary[key] = values.sum()
      else:
        # Skipped (non-finite) steps would poison the mean.
        finite = values[np.isfinite(values)]
        summary[key] = finite.mean() if finite.size else float("nan")
    summary["perf/steps_per_s"] = steps_per_s
    summary["perf/examples_per_s"] = steps_per_s * self.config.batch_size
    self.writer.scalars(step, summary)
    if jax.process_index() == 0:
      logging.info("%s", metrics_lib.progress_line(step, self.config.train.num_steps, summary,
                                                   steps_per_s, summary["perf/examples_per_s"]))
    self.last_metrics = summary

  def _eval_batch(self):
    if not hasattr(self, "_cached_eval_batch"):
      source = self._eval_source
      try:
        loader = self.make_loader(split="test" if source is None else None, source=source,
                                  shuffle=False, num_epochs=1)
        self._cached_eval_batch = self.global_batch(next(iter(loader)))
      except (ValueError, StopIteration) as e:
        logging.warning("no eval data (%s); evaluating on a training batch", e)
        self._cached_eval_batch = self.global_batch(
            next(iter(self.make_loader(source=self._source, shuffle=False, num_epochs=1))))
    return self._cached_eval_batch

  def evaluate(self, state: TrainState, step: int) -> dict[str, Any]:
    params = state.ema_params if state.ema_params is not None else state.params
    with self._sharding_context():
      out = partitioning.fetch_replicated(self._eval_step(
          params, self._constants(), self._eval_batch(), jax.random.key(self.config.seed + 2)))
    scalars = {f"eval/{k}": v for k, v in out.items() if np.ndim(v) == 0}
    images = {f"eval/{k}": v for k, v in out.items() if np.ndim(v) == 4}
    if self.config.eval.shapes_prompts:
      shape_scalars, grids = self._shapes_eval({**self._constants(), **params})
      scalars.update({f"eval/{k}": v for k, v in shape_scalars.items()})
      images.update({f"eval/{k}": v for k, v in grids.items()})
    self.writer.scalars(step, scalars)
    self.writer.images(step, images)
    if jax.process_index() == 0 and images:
      from PIL import Image
      samples = self.workdir / "samples"
      samples.mkdir(parents=True, exist_ok=True)
      for key, batch in images.items():
        grid = metrics_lib.image_grid(np.asarray(batch))
        Image.fromarray(grid).save(samples / f"{key.split('/')[-1]}_{step:07d}.png")
    if scalars and jax.process_index() == 0:
      logging.info("eval step %d: %s", step, ", ".join(f"{k} {float(v):.4g}"
                                                       for k, v in scalars.items()))
    return out


  def _shapes_eval(self, params) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """shapes-v1 score of samples from the current (EMA) params: scalars and sample grids."""
    from jaxt2i.eval import runner, shapes as shapes_eval
    size = shapes_eval.nearest_evaluator_size(self.config.data.image_size)
    if (jax.process_count() > 1
        and not (shapes_eval.evaluator_dir(size) / "evaluator.json").exists()):
      logging.warning("eval.shapes_prompts: no cached %dpx shapes-v1 evaluator; train it once "
                      "with `jaxt2i eval train-evaluator --image_size %d` (skipping)", size, size)
      return {}, {}
    replicated = partitioning.replicated(self.mesh)
    if not hasattr(self, "_sample_step"):
      self._sample_step = jax.jit(self.task.sample, out_shardings=replicated)

    def sample_fn(params, batch, rng):
      batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()}, replicated)
      with self._sharding_context():
        return partitioning.fetch_replicated(self._sample_step(params, batch, rng))

    start = time.perf_counter()
    scalars, grids = runner.hook_results(self.task, params, self._tokenizer_or_load(),
                                         self.config.eval, self.config.data.image_size,
                                         sample_fn=sample_fn)
    logging.info("shapes-v1 eval took %.1fs", time.perf_counter() - start)
    return scalars, grids


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """The CLI's `train`: start multi-host JAX if needed, then train or resume. Raises
  Preempted when a SIGTERM stopped the run before its last step."""
  config_lib.validate(config)
  mesh_lib.initialize_distributed(config.distributed.to_dict())
  trainer = Trainer(config, workdir)
  try:
    state = trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  if trainer.preempted:
    raise Preempted(f"preempted at step {int(partitioning.fetch_replicated(state.step))} of "
                    f"{config.train.num_steps}: checkpoint written to {workdir}/checkpoints; "
                    "the same command resumes from it")
  return state


def _replace_leaves(params: Any, updates: Mapping[str, Any], path: str = "",
                    add: bool = False) -> Any:
  """params with the leaves named in the nested dict `updates` replaced (dtype kept), or,
  with `add`, incremented by them."""
  if not isinstance(params, Mapping):
    return (params + updates if add else jnp.asarray(updates)).astype(params.dtype)
  out = dict(params)
  for key, value in updates.items():
    if key not in params:
      raise KeyError(f"Task.loss state update names {path + key!r}, which is not a param")
    out[key] = _replace_leaves(params[key], value, f"{path}{key}/", add)
  return out
