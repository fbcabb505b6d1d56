"""The trainer's config sections, their defaults, and validation that names the bad field.

A recipe (`configs/<name>.py`) starts from `trainer_defaults()`, sets `task` and `model`, and
overrides what it needs. `validate(config)` runs before anything is compiled: unknown keys
(a typo in a recipe) and invalid values fail with the field's dotted name.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config field with an invalid value or an unknown name."""


# Parallelism presets, `configs/<recipe>.py:VARIANT,PRESET` (e.g. `:demo,fsdp`): the mesh
# shape over all devices and the logical_axis_rules table (jaxt2i/parallel/partitioning.py).
PARALLELISM: dict[str, tuple[dict[str, int], str]] = {
    "dp": ({"data": -1, "fsdp": 1, "tensor": 1}, "dp"),        # weights replicated
    "fsdp": ({"data": 1, "fsdp": -1, "tensor": 1}, "fsdp"),    # weights + Adam state sharded
    # FSDP over the devices left by a tensor-parallel width the recipe picks (heads / widths
    # of its model divisible by it).
    "fsdp_tp": ({"data": 1, "fsdp": -1, "tensor": 0}, "fsdp_tp"),
}


def split_config_arg(arg: str | None, default: str) -> tuple[str, str | None]:
  """`VARIANT[,PRESET]` of a recipe's `get_config(arg)` -> (variant, preset or None)."""
  variant, _, preset = (arg or default).partition(",")
  variant = variant or default
  if preset and preset not in PARALLELISM:
    raise ConfigError(f"parallelism preset {preset!r} (in config argument {arg!r}) is unknown; "
                      f"use one of {sorted(PARALLELISM)}")
  return variant, preset or None


def apply_parallelism(config: ml_collections.ConfigDict, preset: str | None, *,
                      tensor: int = 2) -> ml_collections.ConfigDict:
  """Sets config.mesh and config.sharding.strategy for `preset` (None: unchanged);
  `tensor` is the recipe's tensor-parallel width for fsdp_tp."""
  if preset is None:
    return config
  mesh, strategy = PARALLELISM[preset]
  for axis, size in mesh.items():
    config.mesh[axis] = size or tensor
  config.sharding.strategy = strategy
  return config


def trainer_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""                      # registered task name (see jaxt2i.tasks.TASKS)
  c.model = ml_collections.ConfigDict()  # task-specific model fields; the task validates them
  c.seed = 0                       # params init and per-step RNG: fold_in(seed, step)
  c.batch_size = 64                # global batch (all hosts); divisible by data*fsdp*grad_accum

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # data-parallel replicas; -1 = all devices left over
  c.mesh.fsdp = 1                  # parameter/optimizer-state sharding (also splits the batch)
  c.mesh.tensor = 1                # tensor (model) parallel width

  c.sharding = ml_collections.ConfigDict()
  c.sharding.strategy = "dp"       # logical_axis_rules table: dp | fsdp | tp | fsdp_tp
  c.sharding.extra_rules = ()      # ((logical_name, mesh_axis_or_None), ...) checked first

  c.distributed = ml_collections.ConfigDict()
  # auto: start jax.distributed when a cluster is detected (multi-worker TPU VM, SLURM with
  # several tasks, JAX_COORDINATOR_ADDRESS); cluster: always, with JAX's own detection (what
  # launch/tpu_vm.sh and launch/slurm_gpu.sbatch use); explicit: the fields below; none.
  c.distributed.mode = "auto"      # auto | cluster | explicit | none
  c.distributed.coordinator_address = ""  # host:port of process 0 (explicit mode)
  c.distributed.num_processes = 0  # explicit mode: total processes
  c.distributed.process_id = -1    # explicit mode: this process's index
  c.distributed.local_device_ids = ""  # e.g. "3": this process's local devices (one per GPU)
  c.distributed.heartbeat_timeout_s = 100  # a dead peer is detected after this long
  c.distributed.initialization_timeout_s = 300  # wait this long for all processes to join
  c.distributed.shutdown_timeout_s = 300  # barrier at exit

  c.data = ml_collections.ConfigDict()
  c.data.name = "shapes_v1/64"     # tfds name: shapes_v1/<variant>, image_text_folder/<name>, ...
  c.data.data_dir = ""             # '' = $JAXT2I_DATA_DIR or ~/.cache/jaxt2i/data
  c.data.split = "train"           # split to train on
  c.data.image_size = 64           # images are resized (shorter side) + center-cropped to this
  c.data.value_range = (-1.0, 1.0)  # pixel values are mapped linearly from [0, 255] to this
  c.data.max_caption_length = 24   # tokens per caption incl. EOS; longer ones are truncated
  c.data.tokenizer = ""            # sentencepiece .model path; '' = trained from the captions
  c.data.vocab_size = 128          # for the auto-trained tokenizer
  c.data.shuffle = True            # reshuffle every epoch (seeded; restored on resume)
  c.data.worker_count = 0          # grain worker processes (0 = in the training process)
  c.data.worker_buffer_size = 2    # batches each worker prefetches

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000         # total optimizer steps (resumed runs count from the checkpoint)
  c.train.grad_accum_steps = 1     # micro-batches per step (the batch is split, grads averaged)
  c.train.compute_dtype = "float32"  # activations dtype: float32 | bfloat16 (params stay float32)
  c.train.ema_decay = 0.999        # EMA of params for sampling; 0 disables
  c.train.log_every = 50           # console line + metrics every N steps
  c.train.max_bad_steps = 10       # stop after this many skipped (non-finite/spike) steps in a row
  c.train.loss_spike_factor = 0.0  # skip steps whose loss > factor * running loss; 0 = off
  c.train.loss_spike_warmup = 100  # steps before the spike check starts
  c.train.eval_every = 0           # task eval hook every N steps; 0 = none during training
  c.train.eval_at_end = True       # run the eval hook after the last step too
  c.train.profile_steps = ()       # (first, last) step of a jax.profiler trace; () = off
  c.train.compilation_cache = True  # JAX's persistent compilation cache ($JAXT2I_CACHE_DIR/jax):
                                   # a restarted run loads its compiled step instead of compiling

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"           # adamw | adam | sgd
  c.optim.learning_rate = 1e-3     # peak learning rate
  c.optim.warmup_steps = 100       # linear warm-up from 0
  c.optim.schedule = "cosine"      # cosine | constant | linear (decay after warm-up)
  c.optim.end_lr_factor = 0.1      # final lr = factor * peak (cosine, linear)
  c.optim.decay_steps = 0          # schedule length incl. warm-up; 0 = train.num_steps (set it
                                   # when a run may later be extended, so the lr stays the same)
  c.optim.b1 = 0.9                 # Adam beta1 / SGD momentum
  c.optim.b2 = 0.999               # Adam beta2
  c.optim.eps = 1e-8               # Adam epsilon
  c.optim.weight_decay = 0.01      # decoupled weight decay (adamw)
  c.optim.grad_clip_norm = 1.0     # clip the global grad norm; 0 = off

  c.eval = ml_collections.ConfigDict()
  c.eval.shapes_prompts = 0        # eval hook: shapes-v1 score on this many prompts of each of
                                   # test and test_heldout (text-to-image tasks); 0 = off
  c.eval.samples_per_prompt = 2    # images per prompt for the score, diversity and grids
  c.eval.seed = 0                  # sampling seed of the eval hook

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500   # save every N steps (and at the end / on preemption)
  c.checkpoint.keep = 3            # keep the last K checkpoints
  c.checkpoint.async_save = True   # write in the background while training continues
  return c


_SECTIONS = ("mesh", "sharding", "distributed", "data", "train", "optim", "eval", "checkpoint")
_CHOICES = {
    "sharding.strategy": ("dp", "fsdp", "tp", "fsdp_tp"),
    "distributed.mode": ("auto", "cluster", "explicit", "none"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("cosine", "constant", "linear"),
}
_POSITIVE = ("batch_size", "data.image_size", "data.max_caption_length", "data.vocab_size",
             "train.num_steps", "train.grad_accum_steps", "train.log_every",
             "train.max_bad_steps", "eval.samples_per_prompt", "checkpoint.every_steps",
             "checkpoint.keep")
_NON_NEGATIVE = ("seed", "data.worker_count", "data.worker_buffer_size", "train.eval_every",
                 "train.loss_spike_factor", "train.loss_spike_warmup", "optim.learning_rate",
                 "optim.warmup_steps", "optim.decay_steps", "optim.weight_decay",
                 "optim.grad_clip_norm", "optim.end_lr_factor", "optim.eps",
                 "eval.shapes_prompts", "eval.seed")


def get(config: Any, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _unknown_keys(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                  prefix: str = "") -> list[str]:
  unknown = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in defaults:
      unknown.append(name)
    elif (key != "model" and isinstance(config[key], ml_collections.ConfigDict)
          and isinstance(defaults[key], ml_collections.ConfigDict)):
      unknown += _unknown_keys(config[key], defaults[key], name + ".")
  return unknown


def validate(config: ml_collections.ConfigDict, *, extra_top_level: tuple[str, ...] = ()) -> None:
  """Raises ConfigError naming the first bad field. Called before any compilation."""
  defaults = trainer_defaults()
  for name in extra_top_level:
    defaults[name] = None
  unknown = _unknown_keys(config, defaults)
  if unknown:
    raise ConfigError(f"unknown config field(s) {unknown}; the trainer knows "
                      f"{sorted(defaults.keys())} (+ model.* for the task)")
  for section in _SECTIONS:
    if not isinstance(config.get(section), ml_collections.ConfigDict):
      raise ConfigError(f"config.{section} is missing or not a ConfigDict")
  for dotted, allowed in _CHOICES.items():
    if get(config, dotted) not in allowed:
      raise ConfigError(f"config.{dotted}={get(config, dotted)!r}: must be one of {list(allowed)}")
  for dotted in _POSITIVE:
    value = get(config, dotted)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.{dotted}={value!r}: must be a positive number")
  for dotted in _NON_NEGATIVE:
    value = get(config, dotted)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"config.{dotted}={value!r}: must be >= 0")
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise ConfigError(f"config.train.ema_decay={config.train.ema_decay}: must be in [0, 1)")
  if not config.task:
    raise ConfigError("config.task is empty; set it to a registered task name")
  if not config.data.name:
    raise ConfigError("config.data.name is empty; e.g. 'shapes_v1/64'")
  low, high = config.data.value_range
  if not low < high:
    raise ConfigError(f"config.data.value_range={tuple(config.data.value_range)}: need low < high")
  if config.train.profile_steps and len(config.train.profile_steps) != 2:
    raise ConfigError("config.train.profile_steps must be () or (first_step, last_step)")


def validate_batch(config: ml_collections.ConfigDict, batch_parallel: int,
                   num_processes: int) -> None:
  """Checks the global batch against the mesh; needs the device count, so runs after mesh."""
  unit = batch_parallel * config.train.grad_accum_steps
  if config.batch_size % unit:
    raise ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by the batch-parallel size "
        f"(mesh data*fsdp = {batch_parallel}) times train.grad_accum_steps "
        f"({config.train.grad_accum_steps}) = {unit}")
  if config.batch_size % num_processes:
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the number "
                      f"of processes ({num_processes}): each host loads an equal share")


def from_json_dict(values: dict) -> ml_collections.ConfigDict:
  """A run's saved config.json back as a config; fields added since it was written take their
  defaults (older runs stay loadable)."""
  config = trainer_defaults()

  def merge(target, source):
    for key, value in source.items():
      if isinstance(value, dict) and key != "model" and isinstance(target.get(key),
                                                                   ml_collections.ConfigDict):
        merge(target[key], value)
      else:
        target[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value

  with config.unlocked():
    merge(config, values)
    model = values.get("model")
    if isinstance(model, dict):
      # Model fields are the task's: its current defaults, overridden by what the run saved.
      from jaxt2i.tasks.base import TASKS  # Lazy: tasks import this module.
      task = TASKS.get(values.get("task", ""))
      if task is not None:
        config.model = ml_collections.ConfigDict({**task.default_model_config().to_dict(),
                                                  **model})
  return config


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-serialisable copy (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
