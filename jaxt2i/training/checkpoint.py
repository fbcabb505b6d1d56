"""Orbax checkpoints: one item per component, restorable onto any mesh.

Items: `params`, `opt_state`, `ema_params` (when EMA is on), `counters` (step, skipped, ...),
`data_position` (JSON: how many records of the global data order the run has consumed, the
same for every host and every topology; see jaxt2i/data/pipeline.py) and `config` (JSON). Saves are asynchronous: the
device->host copy happens before `save` returns (so the next step may donate the buffers),
the write continues in the background. A save only becomes visible once finalised (written to
a temporary directory, then renamed), so a process killed mid-save leaves the previous
checkpoint as the latest one.
"""

from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from jaxt2i.parallel import partitioning
from jaxt2i.training.state import TrainState

_ARRAY_ITEMS = ("params", "opt_state", "ema_params", "counters")
_JSON_ITEMS = ("config", "data_position")


def _item_handlers() -> dict[str, Any]:
  """A handler per item this layout writes, so a manager in a fresh process reads their
  metadata without guessing (orbax warns about every item it has no handler for)."""
  return {**{name: ocp.StandardCheckpointHandler() for name in _ARRAY_ITEMS},
          **{name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS}}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into the current run."""


class Checkpointer:
  def __init__(self, directory: epath.PathLike, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    self.every_steps = every_steps
    # The trainer decides when to save (every N steps, at the end, on preemption), so every
    # save request is honoured; orbax alone would also save the very first step.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save,
        # Temporary directories of saves interrupted by a kill are removed at start-up.
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=_item_handlers())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, state: TrainState, data_position: int | None, config: dict) -> bool:
    """Saves now (the caller decides when); async unless configured otherwise."""
    step = int(partitioning.fetch_replicated(state.step))
    items = {
        "params": ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "counters": ocp.args.StandardSave(state.counters()),
        "config": ocp.args.JsonSave(config),
    }
    if state.ema_params is not None:
      items["ema_params"] = ocp.args.StandardSave(state.ema_params)
    if data_position is not None:
      items["data_position"] = ocp.args.JsonSave({"position": int(data_position)})
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: TrainState, shardings: TrainState
              ) -> tuple[TrainState, int | None]:
    """Restores `step` onto `shardings` (any mesh); also returns the data position (None
    when the checkpoint has none: runs fed their batches directly)."""
    stored = set(self.manager.item_metadata(step).keys())
    missing = {"params", "opt_state", "counters"} - stored
    if missing:
      raise CheckpointError(f"checkpoint {self.directory}/{step} lacks items {sorted(missing)}")
    items = {}
    for name in _ARRAY_ITEMS:
      if name == "counters":
        target = partitioning.with_shardings(abstract_state.counters(), shardings.counters())
      else:
        target = getattr(abstract_state, name)
        if target is None:
          continue
        if name not in stored:
          raise CheckpointError(f"checkpoint step {step} has no {name!r} but the run needs it "
                                "(was EMA off when it was written?)")
        # Restoring onto the target shardings reshards from whatever mesh wrote it.
        target = partitioning.with_shardings(target, getattr(shardings, name))
      items[name] = ocp.args.StandardRestore(target)
    if "data_position" in stored:
      items["data_position"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} cannot be restored into this run (changed "
          f"model, optimizer or data config?): {e}") from e
    counters = restored["counters"]
    position = None
    if "data_position" in items:
      position = int(restored["data_position"]["position"])
    elif "data" in stored:
      logging.warning("checkpoint %s/%d holds a per-host grain iterator state (an older layout) "
                      "instead of a data position: the data order continues from the position "
                      "step x batch_size", self.directory, step)
    state = TrainState(
        step=counters["step"], params=restored["params"], opt_state=restored["opt_state"],
        ema_params=restored.get("ema_params") if abstract_state.ema_params is not None else None,
        loss_ema=counters["loss_ema"], skipped=counters["skipped"],
        bad_streak=counters["bad_streak"])
    return state, position

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_params(directory: epath.PathLike, abstract_params: Any, *, step: int | None = None,
                   ema: bool = True, device: Any = None) -> Any:
  """The params (EMA params when stored and `ema`) of a checkpoint, onto one device, for
  inference; `abstract_params` gives the tree of shapes and dtypes."""
  import os

  import jax
  directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
  if not directory.exists():
    raise CheckpointError(f"no checkpoints in {directory}")
  step = ocp.CheckpointManager(directory).latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoints in {directory}")
  name = "ema_params" if ema and (directory / str(step) / "ema_params").exists() else "params"
  # Only the one item gets a handler: the optimizer state and data iterator stay on disk.
  manager = ocp.CheckpointManager(directory, item_names=(name,),
                                  item_handlers={name: ocp.StandardCheckpointHandler()})
  try:
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract_params)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(target)}))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"checkpoint {directory}/{step} does not hold this model's params "
                            f"({e})") from e
    return restored[name]
  finally:
    manager.close()


def save_params(directory: epath.PathLike, params: Any, config: dict | None = None, *,
                step: int = 0) -> None:
  """Writes `params` (numpy or jax arrays) as checkpoint `step` of `directory`, in the
  trainer's layout, so `restore_params` (and so `load_run`) reads it like a trained run's:
  how converted weights become a run. It holds no optimizer state, so a run cannot resume
  training from it."""
  import os
  directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
  items = {"params": ocp.args.StandardSave(params)}
  if config is not None:
    items["config"] = ocp.args.JsonSave(config)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
