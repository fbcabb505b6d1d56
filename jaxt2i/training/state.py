"""Train state and optimizer, both built from config and initialised already sharded."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32: steps taken (skipped ones included); fold_in key for RNG
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree       # None when EMA is off
  loss_ema: jax.Array      # float32 running mean of accepted losses (spike detection)
  skipped: jax.Array       # int32 total steps skipped as non-finite or spiking
  bad_streak: jax.Array    # int32 consecutive skipped steps

  def counters(self) -> dict[str, jax.Array]:
    return {"step": self.step, "loss_ema": self.loss_ema, "skipped": self.skipped,
            "bad_streak": self.bad_streak}


def lr_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  num_steps = optim.decay_steps or num_steps
  peak, warmup = optim.learning_rate, optim.warmup_steps
  decay_steps = max(num_steps - warmup, 1)
  end = peak * optim.end_lr_factor
  if optim.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif optim.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_factor)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  schedule = lr_schedule(optim, num_steps)
  if optim.name == "adamw":
    opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=_decay_mask)
  elif optim.name == "adam":
    opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  else:
    opt = optax.sgd(schedule, momentum=optim.b1 or None)
  if optim.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt)
  return opt


def _decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices and kernels only, not on biases, norms or 1-D embeddings."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def init_state(params: PyTree, tx: optax.GradientTransformation, ema: bool) -> TrainState:
  """Works on boxed (logically partitioned) params too: opt_state and EMA inherit the boxes,
  so their shardings follow from the same logical names."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      loss_ema=jnp.zeros((), jnp.float32), skipped=jnp.zeros((), jnp.int32),
      bad_streak=jnp.zeros((), jnp.int32))
