"""The contract between one model family and the one trainer.

A Task turns a config into a model and a loss. The trainer owns everything else: sharding,
the optimizer, EMA, the step loop, checkpoints, metrics. Batches arrive as dicts of arrays
made by jaxt2i.data.pipeline: `image` float [B, H, W, 3] in config.data.value_range,
`tokens` int32 [B, L] and `tokens_mask` int32 [B, L].
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxt2i.data.pipeline import BATCH_KEYS
from jaxt2i.training.config import ConfigError

PyTree = Any
Batch = Mapping[str, jax.Array]


# A key `Task.loss` may put in its metrics: a nested dict of new values for some params (the
# same tree layout, only the replaced leaves), written after the optimizer step instead of what
# the optimizer made of them. For state that is not learned by gradients (e.g. an EMA codebook).
STATE_UPDATES = "state_updates"
# Another such key: a nested dict of amounts added to some learned params after the optimizer
# step (zero where nothing changes). For surgery on trained weights at chosen steps, e.g.
# restarting unused codes of a codebook, while the optimizer keeps training them.
STATE_DELTAS = "state_deltas"


class Task(abc.ABC):
  """Subclasses set `name` and `default_model_config()`, and implement init / loss."""

  name: str = ""
  # What the input pipeline delivers: the arrays of a batch, whether captions are tokenized,
  # and an optional picklable function adding per-record targets (e.g. labels).
  batch_keys: tuple[str, ...] = BATCH_KEYS
  uses_text: bool = True
  record_features: Callable[[Mapping[str, Any]], dict[str, np.ndarray]] | None = None
  # Whether `loss` takes the (traced) optimizer step as `step=` (schedules inside the loss,
  # e.g. when a GAN loss switches on).
  needs_step: bool = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.compute_dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()

  def validate(self) -> None:
    """Raises ConfigError for bad model fields; the default checks names against defaults."""
    defaults = self.default_model_config()
    unknown = sorted(set(self.config.model.keys()) - set(defaults.keys()))
    if unknown:
      raise ConfigError(f"unknown config field(s) {['model.' + k for k in unknown]} for task "
                        f"{self.name!r}; it knows {sorted('model.' + k for k in defaults)}")

  # Top-level param subtrees the optimizer never updates (e.g. a frozen first stage). They
  # stay in the train state and its checkpoints, so a workdir is self-contained.
  frozen_keys: tuple[str, ...] = ()

  # Top-level param subtrees that are inputs rather than state: `initial_values()` supplies
  # them at every start (fresh, resumed, or loaded for sampling) and they have no optimizer
  # state, EMA or checkpoint; loss / evaluate / sample see them merged into `params`. For a
  # large pretrained base that a run only adapts (e.g. LoRA on Stable Diffusion).
  constant_keys: tuple[str, ...] = ()

  # Model fields `prepare` derives from data (e.g. a latent scale): a resumed run reads them
  # back from its config.json instead of deriving them again (its first batch may differ,
  # e.g. on another number of hosts).
  derived_fields: tuple[str, ...] = ()

  def prepare(self, batch: Batch) -> None:
    """Called once before the first init with a preprocessed (host) batch: derive config
    fields from data or other runs. The config is written to the workdir afterwards."""
    del batch

  def initial_values(self) -> dict[str, PyTree] | None:
    """Values (numpy) for top-level param subtrees that replace their random init in a fresh
    run (not on resume), e.g. a pretrained, frozen component."""
    return None

  def constant_values(self) -> dict[str, PyTree]:
    """Values (numpy) of the constant subtrees (constant_keys) alone: what a resumed or
    loaded run reads again. By default taken from initial_values(); override it when those
    include costly values of trained subtrees that only a fresh run needs."""
    values = self.initial_values() or {}
    return {k: values[k] for k in self.constant_keys if k in values}

  def data_source(self, split: str) -> Sequence[Mapping[str, Any]] | None:
    """Records of `split` when the task makes its own data (e.g. generated on the fly);
    None reads config.data from tfds."""
    del split
    return None

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    """Trainable params (may be boxed with logical axis names); `batch` is abstract-shaped."""

  @abc.abstractmethod
  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Scalar training loss and a dict of scalar metrics (averaged over the batch), optionally
    with new values for non-gradient params under STATE_UPDATES."""

  def sample(self, params: PyTree, batch: Batch, rng: jax.Array) -> jax.Array:
    """Images for the captions of `batch` (`tokens`, `tokens_mask`): uint8 [B, H, W, 3].
    Runs inside jit; text-to-image tasks implement it (used by `jaxt2i eval`)."""
    raise NotImplementedError(f"task {self.name!r} does not generate images")

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    """Optional periodic evaluation on a batch with the (EMA) params: scalar metrics and
    images (uint8 [N, H, W, 3], logged as grids). Runs inside jit."""
    return {}


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
  if not cls.name:
    raise ValueError(f"{cls.__name__} needs a `name`")
  TASKS[cls.name] = cls
  return cls


def get_task(config: ml_collections.ConfigDict) -> Task:
  # Importing the package registers the built-in tasks.
  import jaxt2i.tasks  # noqa: F401
  if config.task not in TASKS:
    raise ConfigError(f"config.task={config.task!r} is unknown; registered tasks: {sorted(TASKS)}")
  task = TASKS[config.task](config)
  task.validate()
  return task


