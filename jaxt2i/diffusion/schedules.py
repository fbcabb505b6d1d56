"""Noise schedules, the eps / x0 / v parameterisations, and loss weighting for discrete diffusion.

The forward process is the variance-preserving one of DDPM (Ho et al. 2020, eq. 4):
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), abar_t = prod_{s <= t} (1 - beta_s), with
integer timesteps t in [0, T). This file holds:

- `make_schedule`: beta schedules "linear", "scaled_linear" (Stable Diffusion's) and "cosine"
  (Nichol & Dhariwal 2021, eq. 17; diffusers' "squaredcos_cap_v2"), whose `betas` and
  `alphas_cumprod` equal diffusers' for the same settings, optionally rescaled to zero terminal SNR
  (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1).
- The three model parameterisations: "epsilon" (the noise), "sample" (x_0) and "v_prediction"
  (v = sqrt(abar) eps - sqrt(1 - abar) x_0; Salimans & Ho 2022, section 4), with `training_target`
  to build the regression target and `to_x0_eps` to turn any model output back into (x_0, eps).
- `loss_weight`: min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy", section 3.4) expressed for each parameterisation.

Timesteps `t` are int arrays of shape [B]; per-example coefficients broadcast over the trailing axes
of NHWC images or latents.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")  # "squaredcos_cap_v2": alias of "cosine"
LOSS_WEIGHTINGS = ("uniform", "min_snr")
# Samplers compute timesteps as int32 products like T * num_steps; keep them below 2**31.
MAX_TRAIN_TIMESTEPS = 46340


@flax.struct.dataclass
class Schedule:
  """A discrete noise schedule; a pytree whose arrays are leaves and whose settings are static.

  Attributes:
    betas: [T] float32 per-step noise variances beta_t.
    alphas_cumprod: [T] float32 abar_t = prod_{s <= t} (1 - beta_s), the signal fraction at t.
    num_train_timesteps: T (static).
    prediction_type: what the model outputs (static): "epsilon" | "sample" | "v_prediction".
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  num_train_timesteps: int = flax.struct.field(pytree_node=False)
  prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

  def __post_init__(self):
    # Only static fields are checked: __post_init__ also runs when jax rebuilds the pytree from
    # tracers.
    _check_prediction_type(self.prediction_type)


def infer_snr_shift(trained_betas, kind: str, num_train_timesteps: int, beta_start: float,
                    beta_end: float) -> float:
  """The `snr_shift` s for which make_schedule(kind, ..., snr_shift=s) has these betas (as
  diffusers' `trained_betas` carry an exported shifted schedule); ValueError for other betas."""
  betas = np.asarray(trained_betas, np.float64)
  if betas.shape != (num_train_timesteps,):
    raise ValueError(f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)")
  base = make_schedule(kind, num_train_timesteps, beta_start, beta_end)
  a = np.asarray(base.alphas_cumprod, np.float64)
  b = np.cumprod(1.0 - betas)
  middle = slice(num_train_timesteps // 4, 3 * num_train_timesteps // 4)
  shift = float(np.sqrt(np.median((a / (1 - a))[middle] / (b / (1 - b))[middle])))
  if not 0.0 < shift < math.inf:
    raise ValueError("trained_betas are not a shifted schedule")
  rebuilt = make_schedule(kind, num_train_timesteps, beta_start, beta_end, snr_shift=shift)
  if not np.allclose(rebuilt.betas, betas, rtol=1e-3, atol=1e-6):
    raise ValueError(f"trained_betas are not a {kind} schedule with shifted SNRs "
                     "(other explicit betas are not supported)")
  return round(shift, 6)


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's betas from abar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008.

  Python floats (float64) in the same order as diffusers' `betas_for_alpha_bar`, so the float32 cast
  is bit-identical to it.
  """
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  t = num_train_timesteps
  return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_0 is kept and abar_T = 0.

  Computed in float64. diffusers runs the same algorithm in float32, where sqrt(abar_t) -
  sqrt(abar_T) cancels catastrophically near t = T, so its betas there carry float32 noise of up to
  ~1e-5; these are the exact values its float32 ones approximate.
  """
  alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return 1.0 - alphas


def _shift_snr(betas: np.ndarray, shift: float) -> np.ndarray:
  """The betas whose abar' has SNR' = SNR / shift^2 at every t (float64):
  abar' = abar / (abar + shift^2 (1 - abar))."""
  alphas_bar = np.cumprod(1.0 - betas)
  shifted = alphas_bar / (alphas_bar + shift**2 * (1.0 - alphas_bar))
  return 1.0 - np.concatenate([shifted[:1], shifted[1:] / shifted[:-1]])


def make_schedule(kind: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, prediction_type: str = "epsilon",
                  rescale_zero_terminal_snr: bool = False, snr_shift: float = 1.0) -> Schedule:
  """Builds a `Schedule` equal to diffusers' `betas` / `alphas_cumprod` for the same settings.

  Args:
    kind: "linear" (betas linearly spaced), "scaled_linear" (sqrt(beta) linearly spaced, then
      squared: Stable Diffusion) or "cosine" (alias "squaredcos_cap_v2"; betas capped at 0.999,
      `beta_start` / `beta_end` ignored).
    num_train_timesteps: T, the number of training timesteps (2 .. 46340).
    beta_start: beta_0 for the linear kinds, in (0, 1).
    beta_end: beta_{T-1} for the linear kinds, in [beta_start, 1).
    prediction_type: what the model predicts: "epsilon" | "sample" | "v_prediction".
    rescale_zero_terminal_snr: rescale to abar_{T-1} = 0 (Lin et al. 2023, Algorithm 1); pair it
      with "v_prediction", since an epsilon model cannot recover x_0 from pure noise.
    snr_shift: s > 0; every timestep's signal-to-noise ratio abar / (1 - abar) is divided by
      s^2 (before any zero-terminal-SNR rescale): the resolution shift of Hoogeboom et al. 2023
      ("simple diffusion", section 3.1) and Esser et al. 2024 (SD3, section 5.3.2). A schedule
      tuned for 64x64 latents leaves small or sparse images recognisable at its noisiest
      timestep; s > 1 moves training and sampling towards noise that hides them. 1 = off.

  Returns:
    The schedule. Betas are computed in float64 and cast to float32; alphas_cumprod is the float64
    cumulative product of the float32 (1 - beta), cast to float32, which is what torch's CPU cumprod
    (double accumulator) gives diffusers.

  Raises:
    ValueError: for an unknown kind or prediction_type, or out-of-range arguments.
  """
  if (isinstance(num_train_timesteps, bool)
      or not isinstance(num_train_timesteps, (int, np.integer))):
    raise ValueError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
  if not 2 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
    raise ValueError(f"num_train_timesteps must be in [2, {MAX_TRAIN_TIMESTEPS}], "
                     f"got {num_train_timesteps}")
  _check_prediction_type(prediction_type)
  if isinstance(snr_shift, bool) or not (isinstance(snr_shift, (int, float, np.floating))
                                         and 0.0 < snr_shift < math.inf):
    raise ValueError(f"snr_shift must be a positive number, got {snr_shift!r}")
  t = int(num_train_timesteps)
  if kind in ("linear", "scaled_linear"):
    if not 0.0 < beta_start <= beta_end < 1.0:
      raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
                       f"beta_end={beta_end}")
    if kind == "linear":
      betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
    else:
      betas = np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64) ** 2
  elif kind in ("cosine", "squaredcos_cap_v2"):
    betas = _cosine_betas(t)
  else:
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS} "
                     "(or 'squaredcos_cap_v2')")
  if snr_shift != 1.0:
    betas = _shift_snr(betas, snr_shift)
  if rescale_zero_terminal_snr:
    betas = _rescale_zero_terminal_snr(betas)
  betas32 = betas.astype(np.float32)
  alphas_cumprod = np.cumprod((np.float32(1.0) - betas32).astype(np.float64)).astype(np.float32)
  return Schedule(betas=jnp.asarray(betas32), alphas_cumprod=jnp.asarray(alphas_cumprod),
                  num_train_timesteps=t, prediction_type=prediction_type)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
  """[B] -> [B, 1, ..., 1] with `ndim` axes, to scale NHWC (or any-rank) tensors per example."""
  return jnp.reshape(values, values.shape + (1,) * (ndim - values.ndim))


def _alphas_cumprod_at(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"timesteps must be an integer array, got dtype {t.dtype}")
  return _per_example(schedule.alphas_cumprod[t], ndim)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a draw from q(x_t | x_0) given the noise."""
  a = _alphas_cumprod_at(schedule, t, x0.ndim)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction target (Salimans & Ho 2022)."""
  a = _alphas_cumprod_at(schedule, t, x0.ndim)
  return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio abar_t / (1 - abar_t), shape [B] (0 at a zero-terminal-SNR end)."""
  a = _alphas_cumprod_at(schedule, t, jnp.ndim(t))
  return a / (1.0 - a)


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The model's regression target at x_t = add_noise(x0, noise, t), by its prediction_type."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "sample":
    return x0
  return velocity(schedule, x0, noise, t)


def x0_eps_from_output(prediction_type: str, model_output: jax.Array, x_t: jax.Array,
                       alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x_0, eps) implied by a model output, given x_t = alpha x_0 + sigma eps.

  The coefficient form lets samplers that carry their own (alpha, sigma) - DPM-Solver derives them
  from its sigma table - share this conversion with `to_x0_eps`.

  Args:
    prediction_type: "epsilon" | "sample" | "v_prediction".
    model_output: the model's prediction, same shape as x_t.
    x_t: the noisy input the model saw.
    alpha: sqrt(abar_t), broadcastable against x_t.
    sigma: sqrt(1 - abar_t), broadcastable against x_t.

  Returns:
    (x_0, eps) in the dtype promotion of the inputs.
  """
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return (x_t - sigma * model_output) / alpha, model_output
  if prediction_type == "sample":
    return model_output, (x_t - alpha * model_output) / sigma
  return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t


def to_x0_eps(schedule: Schedule, model_output: jax.Array, x_t: jax.Array,
              t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Converts a model output of any parameterisation to (x_0, eps) at timesteps t ([B] ints)."""
  a = _alphas_cumprod_at(schedule, t, x_t.ndim)
  return x0_eps_from_output(schedule.prediction_type, model_output, x_t, jnp.sqrt(a),
                            jnp.sqrt(1.0 - a))


def loss_weight(schedule: Schedule, t: jax.Array, kind: str = "uniform",
                gamma: float = 5.0) -> jax.Array:
  """Per-example weights [B] for the mean-squared error on `training_target`.

  "min_snr" is min-SNR-gamma (Hang et al. 2023): weight the x_0-space loss by min(SNR, gamma), which
  for each parameterisation's own loss becomes
    epsilon: min(SNR, gamma) / SNR,
    v_prediction: min(SNR, gamma) / (SNR + 1),
    sample: min(SNR, gamma).
  The epsilon weight is written min(1, gamma / SNR) so that it takes its limit 1 (not 0 / 0) at
  SNR = 0, the last step of a zero-terminal-SNR schedule.

  Args:
    schedule: the schedule; its prediction_type picks the formula.
    t: [B] integer timesteps.
    kind: "uniform" (all ones) | "min_snr".
    gamma: the SNR clamp, > 0 (the paper's default is 5).

  Raises:
    ValueError: for an unknown kind or a non-positive gamma.
  """
  if kind not in LOSS_WEIGHTINGS:
    raise ValueError(f"loss weighting kind must be one of {LOSS_WEIGHTINGS}, got {kind!r}")
  s = snr(schedule, t)
  if kind == "uniform":
    return jnp.ones_like(s)
  if isinstance(gamma, (int, float)) and not gamma > 0:
    raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
  if schedule.prediction_type == "epsilon":
    return jnp.minimum(1.0, gamma / s)
  if schedule.prediction_type == "v_prediction":
    return jnp.minimum(s, gamma) / (s + 1.0)
  return jnp.minimum(s, gamma)
