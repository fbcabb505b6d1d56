"""Diffusion samplers (ancestral DDPM, DDIM, DPM-Solver++(2M)) and classifier-free guidance.

Each sampler is a pure per-step function (`ddpm_step`, `ddim_step`, `dpmpp_2m_step`) that takes the
step index i, the number of steps, the model output, the current sample and - for the stochastic
ones - the noise to inject, or - for DPM-Solver++ - the previous step's x_0, and returns
(next sample, x_0 estimate). `sample` runs the whole loop inside one `lax.fori_loop`; call it under
`jax.jit`. The number of steps is a traced value: each step's timestep is computed from
(i, num_steps) by `timestep`, so changing num_steps (or eta, or a guidance scale) never recompiles.

Each sampler reproduces one diffusers scheduler (checked against 0.42 step by step in
tests/test_diffusion.py):

- "ddpm": `DDPMScheduler(variance_type="fixed_small", thresholding=False, clip_sample=clip_sample,
  clip_sample_range=..., timestep_spacing=... (default "leading"), steps_offset=...)` after
  `set_timesteps(num_steps)`: ancestral sampling (Ho et al. 2020, eq. 6-7) between consecutive
  inference timesteps, the last one going to abar = 1; noise is added whenever t > 0.
- "ddim": `DDIMScheduler(set_alpha_to_one=..., steps_offset=..., timestep_spacing=... (default
  "leading"), clip_sample=..., thresholding=False)` with `step(eta=eta,
  use_clipped_model_output=False, variance_noise=noise)` (Song et al. 2021, eq. 12 and 16). As in
  diffusers, the previous timestep is always t - T // num_steps, whatever the spacing.
- "dpmpp_2m": `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
  use_karras_sigmas=False, lambda_min_clipped=-inf, thresholding=False, timestep_spacing=...
  (default "linspace"))` (Lu et al. 2022, "DPM-Solver++", Algorithm 2): first order at the first
  and the last step, second-order multistep in between; as in diffusers, a zero-terminal-SNR
  schedule's abar_{T-1} = 0 is replaced by 2**-24 so that its sigma is finite.

Timesteps: diffusers computes them in float64 numpy (np.linspace / np.arange, then round half to
even). `timestep` uses exact integer arithmetic instead, plus a short table, built once per
(T, spacing) with numpy, of the few (num_steps, i) where numpy's float64 rounding lands an exact
.5 tie on the other side; the result equals diffusers' for every num_steps in [1, T]. One diffusers
quirk is not reproduced: for some num_steps (62 of 1..1000 at T = 1000, e.g. 61), "trailing"
spacing's np.arange yields num_steps + 1 values, the last being -1; these samplers run num_steps
steps, i.e. diffusers' first num_steps timesteps.

Arithmetic is float32, in the same order as diffusers', so results agree to ~1e-6 on O(1) values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.diffusion import schedules as schedules_lib

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace"}  # diffusers'
# diffusers' DPM-Solver spaces num_steps + 1 points and drops the last (t = 0); DDPM / DDIM space
# num_steps points.
_PLUS_ONE = {"ddpm": False, "ddim": False, "dpmpp_2m": True}
# DPMSolverMultistepScheduler's stand-in for abar_{T-1} = 0 (zero terminal SNR).
_DPM_MIN_ALPHA_CUMPROD = 2.0**-24

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _concrete(x: Any) -> Any:
  """x as a Python scalar when known at trace time, else None (a tracer)."""
  try:
    return np.asarray(x).item()
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_sampler(sampler: str) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def _resolve_spacing(sampler: str, timestep_spacing: str | None) -> str:
  _check_sampler(sampler)
  spacing = DEFAULT_SPACING[sampler] if timestep_spacing is None else timestep_spacing
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")
  return spacing


def max_num_steps(sampler: str, num_train_timesteps: int,
                  timestep_spacing: str | None = None) -> int:
  """The largest num_steps whose timesteps are all distinct.

  That is T, except for DPM-Solver++ with "linspace" / "leading" spacing: its num_steps + 1 points
  collide at num_steps = T, and the solver then divides by a zero log-SNR step (NaN, in diffusers
  too), so T - 1.
  """
  spacing = _resolve_spacing(sampler, timestep_spacing)
  if _PLUS_ONE[sampler] and spacing != "trailing":
    return num_train_timesteps - 1
  return num_train_timesteps


def _check_num_steps(num_steps: Any, max_steps: int) -> None:
  """Rejects a num_steps outside [1, max_steps] when it is known at trace time."""
  n = _concrete(num_steps)
  if n is None:
    return
  if isinstance(n, bool) or not isinstance(n, int):
    raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
  if not 1 <= n <= max_steps:
    raise ValueError(f"num_steps must be in [1, {max_steps}] for this sampler and schedule, "
                     f"got {n}")


def _check_steps_offset(steps_offset: int) -> None:
  if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
    raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")


# --------------------------------------------------------------------------------------------------
# Timesteps.


def reference_timesteps(sampler: str, num_train_timesteps: int, num_steps: int, *,
                        timestep_spacing: str | None = None, steps_offset: int = 0) -> np.ndarray:
  """diffusers' `set_timesteps(num_steps).timesteps` for `sampler`, in numpy (first num_steps).

  The float64 numpy arithmetic is diffusers' own; `timestep` must (and is tested to) agree with it.
  """
  spacing = _resolve_spacing(sampler, timestep_spacing)
  t, n = num_train_timesteps, num_steps
  if spacing == "linspace":
    if _PLUS_ONE[sampler]:
      ts = np.linspace(0, t - 1, n + 1).round()[::-1][:-1]
    else:
      ts = np.linspace(0, t - 1, n).round()[::-1]
  elif spacing == "leading":
    if _PLUS_ONE[sampler]:
      ts = (np.arange(0, n + 1) * (t // (n + 1))).round()[::-1][:-1] + steps_offset
    else:
      ts = (np.arange(0, n) * (t // n)).round()[::-1] + steps_offset
  else:
    ts = np.round(np.arange(t, 0, -t / n)) - 1
  return ts.astype(np.int64)[:n]


def _round_half_even(xp: Any, num: Any, den: Any) -> Any:
  """round(num / den) with ties to even, for non-negative integer arrays (numpy or jax.numpy)."""
  q = num // den
  r = num - q * den
  up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
  return q + xp.where(up, 1, 0)


def _integer_timesteps(xp: Any, sampler: str, spacing: str, num_train_timesteps: int, i: Any,
                       n: Any, steps_offset: int) -> Any:
  """The exact-rational version of `reference_timesteps`, element i (numpy or jax.numpy)."""
  t = num_train_timesteps
  if spacing == "leading":
    if _PLUS_ONE[sampler]:
      return (n - i) * (t // (n + 1)) + steps_offset
    return (n - 1 - i) * (t // n) + steps_offset
  if spacing == "trailing":  # round(T - i * T / n) - 1
    return _round_half_even(xp, t * (n - i), n) - 1
  if _PLUS_ONE[sampler]:  # linspace over n + 1 points: round((T - 1) * (n - i) / n)
    return _round_half_even(xp, (t - 1) * (n - i), n)
  # linspace over n points: round((T - 1) * (n - 1 - i) / (n - 1)); a single point is 0.
  return xp.where(n == 1, 0, _round_half_even(xp, (t - 1) * (n - 1 - i), xp.maximum(n - 1, 1)))


@functools.lru_cache(maxsize=None)
def _float_tie_table(sampler: str, spacing: str,
                     num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(num_steps, i, timestep) wherever numpy's float64 rounding differs from the exact rational.

  That happens only at exact .5 ties, which numpy's inexact step can push either way; there are a
  few hundred at T = 1000 and none for "leading" (pure integers).
  """
  ns, idx, vals = [], [], []
  if spacing != "leading":
    for n in range(1, num_train_timesteps + 1):
      ref = reference_timesteps(sampler, num_train_timesteps, n, timestep_spacing=spacing)
      exact = _integer_timesteps(np, sampler, spacing, num_train_timesteps, np.arange(n), n, 0)
      (bad,) = np.nonzero(ref != exact)
      ns.extend([n] * len(bad))
      idx.extend(bad.tolist())
      vals.extend(ref[bad].tolist())
  return (np.asarray(ns, np.int32), np.asarray(idx, np.int32), np.asarray(vals, np.int32))


def timestep(sampler: str, num_train_timesteps: int, i: Any, num_steps: Any, *,
             timestep_spacing: str | None = None, steps_offset: int = 0) -> jax.Array:
  """The model timestep of step i (0-based, noisiest first) out of num_steps, as diffusers sets it.

  Args:
    sampler: one of SAMPLERS (DPM-Solver spaces its steps differently from DDPM / DDIM).
    num_train_timesteps: T (static).
    i: step index, int scalar, may be traced; in [0, num_steps).
    num_steps: number of inference steps, int scalar, may be traced; in [1, T].
    timestep_spacing: "leading" | "trailing" | "linspace"; None = the scheduler's diffusers default.
    steps_offset: added to "leading" timesteps (Stable Diffusion uses 1), ignored otherwise.

  Returns:
    int32 scalar timestep.
  """
  spacing = _resolve_spacing(sampler, timestep_spacing)
  _check_steps_offset(steps_offset)
  i = jnp.asarray(i, jnp.int32)
  n = jnp.asarray(num_steps, jnp.int32)
  t = _integer_timesteps(jnp, sampler, spacing, num_train_timesteps, i, n, steps_offset)
  table_n, table_i, table_t = _float_tie_table(sampler, spacing, num_train_timesteps)
  if table_n.size:
    hit = (jnp.asarray(table_n) == n) & (jnp.asarray(table_i) == i)
    t = jnp.where(hit.any(), jnp.max(jnp.where(hit, jnp.asarray(table_t), -1)), t)
  return t.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Per-step functions.


def _maybe_clip(x0: jax.Array, clip_sample: bool, clip_sample_range: Any) -> jax.Array:
  return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def ddpm_step(schedule: schedules_lib.Schedule, i: Any, num_steps: Any, model_output: jax.Array,
              x_t: jax.Array, noise: jax.Array, *, timestep_spacing: str = "leading",
              steps_offset: int = 0, clip_sample: bool = False,
              clip_sample_range: Any = 1.0) -> tuple[jax.Array, jax.Array]:
  """One ancestral DDPM step from timestep(i) to timestep(i + 1) (abar = 1 after the last).

  x_prev = c_0 x_0 + c_t x_t + sqrt(var) noise with the posterior q(x_prev | x_t, x_0) of Ho et al.
  2020 (eq. 7) for the skipped-step pair (abar_t, abar_prev), var = "fixed_small" (the posterior
  variance, floored at 1e-20); no noise when t = 0.

  Args:
    schedule: noise schedule (its prediction_type interprets model_output).
    i: step index (may be traced).
    num_steps: number of inference steps (may be traced).
    model_output: the model's output at (x_t, timestep(i)).
    x_t: current sample.
    noise: standard normal noise, same shape as x_t.
    timestep_spacing: diffusers' timestep_spacing.
    steps_offset: diffusers' steps_offset ("leading" only).
    clip_sample: clip the x_0 estimate to [-clip_sample_range, clip_sample_range].
    clip_sample_range: the clip bound (may be traced).

  Returns:
    (x_prev, x_0 estimate).
  """
  spacing = _resolve_spacing("ddpm", timestep_spacing)
  kw = dict(timestep_spacing=spacing, steps_offset=steps_offset)
  big_t = schedule.num_train_timesteps
  n = jnp.asarray(num_steps, jnp.int32)
  t = timestep("ddpm", big_t, i, n, **kw)
  prev_t = jnp.where(i < n - 1, timestep("ddpm", big_t, jnp.minimum(i + 1, n - 1), n, **kw), -1)
  ac = schedule.alphas_cumprod
  alpha_prod_t = ac[t]
  alpha_prod_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], 1.0)
  beta_prod_t = 1.0 - alpha_prod_t
  beta_prod_prev = 1.0 - alpha_prod_prev
  current_alpha = alpha_prod_t / alpha_prod_prev
  current_beta = 1.0 - current_alpha

  x0, _ = schedules_lib.x0_eps_from_output(schedule.prediction_type, model_output, x_t,
                                           jnp.sqrt(alpha_prod_t), jnp.sqrt(beta_prod_t))
  x0 = _maybe_clip(x0, clip_sample, clip_sample_range)
  x0_coeff = (jnp.sqrt(alpha_prod_prev) * current_beta) / beta_prod_t
  xt_coeff = jnp.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
  mean = x0_coeff * x0 + xt_coeff * x_t
  variance = jnp.maximum((1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * current_beta, 1e-20)
  std = jnp.where(t > 0, jnp.sqrt(variance), 0.0)
  return mean + std * noise, x0


def ddim_step(schedule: schedules_lib.Schedule, i: Any, num_steps: Any, model_output: jax.Array,
              x_t: jax.Array, noise: jax.Array | None = None, *, eta: Any = 0.0,
              timestep_spacing: str = "leading", steps_offset: int = 0,
              set_alpha_to_one: bool = True, clip_sample: bool = False,
              clip_sample_range: Any = 1.0) -> tuple[jax.Array, jax.Array]:
  """One DDIM step (Song et al. 2021, eq. 12) from timestep(i) to timestep(i) - T // num_steps.

  x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - s^2) eps + s noise, with
  s = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) (eq. 16): eta = 0 is
  deterministic DDIM, eta = 1 the DDPM posterior. Below timestep 0, abar_prev is 1
  (set_alpha_to_one) or abar_0. The direction term's radicand is floored at 0 so that float32
  rounding at eta = 1 cannot make it NaN (diffusers does not floor it; equal wherever it is >= 0).

  Args:
    schedule: noise schedule (its prediction_type interprets model_output).
    i: step index (may be traced).
    num_steps: number of inference steps (may be traced).
    model_output: the model's output at (x_t, timestep(i)).
    x_t: current sample.
    noise: standard normal noise like x_t; may be None only when eta is the constant 0.
    eta: stochasticity in [0, 1] (may be traced).
    timestep_spacing: diffusers' timestep_spacing.
    steps_offset: diffusers' steps_offset ("leading" only).
    set_alpha_to_one: diffusers' set_alpha_to_one (Stable Diffusion uses False).
    clip_sample: clip the x_0 estimate (eps is not recomputed: use_clipped_model_output=False).
    clip_sample_range: the clip bound (may be traced).

  Returns:
    (x_prev, x_0 estimate).

  Raises:
    ValueError: if noise is None while eta may be non-zero.
  """
  if noise is None and _concrete(eta) != 0:
    raise ValueError("ddim_step needs `noise` unless eta is the constant 0")
  spacing = _resolve_spacing("ddim", timestep_spacing)
  big_t = schedule.num_train_timesteps
  n = jnp.asarray(num_steps, jnp.int32)
  t = timestep("ddim", big_t, i, n, timestep_spacing=spacing, steps_offset=steps_offset)
  prev_t = t - big_t // n
  ac = schedule.alphas_cumprod
  final_alpha_cumprod = 1.0 if set_alpha_to_one else ac[0]
  alpha_prod_t = ac[t]
  alpha_prod_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], final_alpha_cumprod)
  beta_prod_t = 1.0 - alpha_prod_t

  x0, eps = schedules_lib.x0_eps_from_output(schedule.prediction_type, model_output, x_t,
                                             jnp.sqrt(alpha_prod_t), jnp.sqrt(beta_prod_t))
  x0 = _maybe_clip(x0, clip_sample, clip_sample_range)
  variance = ((1.0 - alpha_prod_prev) / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(jnp.maximum(1.0 - alpha_prod_prev - std**2, 0.0)) * eps
  x_prev = jnp.sqrt(alpha_prod_prev) * x0 + direction
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev, x0


def _dpm_sigma(schedule: schedules_lib.Schedule, t: jax.Array) -> jax.Array:
  """DPM-Solver's sigma_t = sqrt((1 - abar_t) / abar_t), with abar = 0 replaced by 2**-24."""
  ac = schedule.alphas_cumprod[t]
  ac = jnp.where(ac == 0.0, _DPM_MIN_ALPHA_CUMPROD, ac)
  return jnp.sqrt((1.0 - ac) / ac)


def dpmpp_2m_step(schedule: schedules_lib.Schedule, i: Any, num_steps: Any,
                  model_output: jax.Array, x_t: jax.Array, prev_x0: jax.Array, *,
                  timestep_spacing: str = "linspace", steps_offset: int = 0,
                  first_step: Any = 0) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2, midpoint form) in log-SNR time.

  With alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha, lambda = log(alpha / sigma_t) and
  h = lambda_next - lambda_i, D = x_0 - (x_0 - x0_prev) / (2 r) with r = h_prev / h:
  x_next = (sigma_next / sigma_i) x - alpha_next (exp(-h) - 1) D. Steps 0 and num_steps - 1 are
  first order (D = x_0: DDIM); the last goes to sigma = 0, so its result is the x_0 estimate.

  Args:
    schedule: noise schedule (its prediction_type interprets model_output).
    i: step index (may be traced).
    num_steps: number of inference steps (may be traced).
    model_output: the model's output at (x_t, timestep(i)).
    x_t: current sample.
    prev_x0: the x_0 estimate returned by step i - 1 (ignored at i = 0).
    timestep_spacing: diffusers' timestep_spacing (its default for this scheduler is "linspace").
    steps_offset: diffusers' steps_offset ("leading" only).
    first_step: the step the loop started at (img2img starts part-way): it is first order.

  Returns:
    (x_next, x_0 estimate); pass the latter as prev_x0 to step i + 1.
  """
  spacing = _resolve_spacing("dpmpp_2m", timestep_spacing)
  kw = dict(timestep_spacing=spacing, steps_offset=steps_offset)
  big_t = schedule.num_train_timesteps
  n = jnp.asarray(num_steps, jnp.int32)
  last = n - 1
  t = timestep("dpmpp_2m", big_t, i, n, **kw)
  t_next = timestep("dpmpp_2m", big_t, jnp.minimum(i + 1, last), n, **kw)
  t_prev = timestep("dpmpp_2m", big_t, jnp.maximum(i - 1, 0), n, **kw)
  sigma_s0 = _dpm_sigma(schedule, t)
  sigma_t = jnp.where(i == last, 0.0, _dpm_sigma(schedule, t_next))
  sigma_s1 = _dpm_sigma(schedule, t_prev)

  def alpha_sigma(sigma):
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha

  alpha_t, sigma_t = alpha_sigma(sigma_t)
  alpha_s0, sigma_s0 = alpha_sigma(sigma_s0)
  alpha_s1, sigma_s1 = alpha_sigma(sigma_s1)
  # At the last step sigma_t = 0: lambda_t = h = inf and exp(-h) = 0, so x_next = x_0 exactly.
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
  h = lambda_t - lambda_s0
  r0 = (lambda_s0 - lambda_s1) / h

  x0, _ = schedules_lib.x0_eps_from_output(schedule.prediction_type, model_output, x_t, alpha_s0,
                                           sigma_s0)
  x0_coeff = alpha_t * (jnp.exp(-h) - 1.0)
  x_next = (sigma_t / sigma_s0) * x_t - x0_coeff * x0
  # The second-order correction; its coefficient is NaN at the last step, hence the where.
  first_order = (i == first_step) | (i == last)
  d1_coeff = jnp.where(first_order, 0.0, 0.5 * x0_coeff * (1.0 / r0))
  return x_next - d1_coeff * (x0 - prev_x0), x0


# --------------------------------------------------------------------------------------------------
# The whole loop.


def sample(denoise_fn: DenoiseFn, schedule: schedules_lib.Schedule, x_T: jax.Array,
           rng: jax.Array | None = None, *, sampler: str = "ddim", num_steps: Any,
           eta: Any = 0.0, timestep_spacing: str | None = None, steps_offset: int = 0,
           set_alpha_to_one: bool = True, clip_sample: bool = False,
           clip_sample_range: Any = 1.0, start_step: Any = 0,
           blend: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
  """Runs a sampler from x_T to x_0 in one `lax.fori_loop`; meant to be called under `jax.jit`.

  `num_steps`, `eta` and `clip_sample_range` may be traced: one compilation serves every value.
  Stochastic steps draw their noise as `jax.random.normal(jax.random.fold_in(rng, i), x_T.shape,
  jnp.float32)` at step i, so a run is reproducible from (rng, num_steps) alone.

  Example:
    run = jax.jit(lambda params, x, rng, n: sample(
        lambda x, t: unet.apply(params, x, t), schedule, x, rng, sampler="dpmpp_2m", num_steps=n))

  Args:
    denoise_fn: pure function (x_t [B, ...] float32, t [B] int32) -> model output like x_t, in
      `schedule.prediction_type`; wrap it with `guided` for classifier-free guidance.
    schedule: the noise schedule the model was trained with.
    x_T: initial noise [B, ...] (unit variance: every sampler here has init_noise_sigma = 1).
    rng: PRNG key; required by "ddpm" and by "ddim" unless eta is the constant 0.
    sampler: "ddpm" | "ddim" | "dpmpp_2m".
    num_steps: number of inference steps in [1, `max_num_steps`] (T, or T - 1 for dpmpp_2m with
      "linspace" / "leading" spacing) such that the first timestep, steps_offset included, is
      < T. Checked at trace time when concrete; when traced and out of range, no step runs and
      the result is all NaN.
    eta: DDIM stochasticity (0 = deterministic); must be 0 for the other samplers.
    timestep_spacing: "leading" | "trailing" | "linspace"; None = the diffusers default of the
      sampler ("leading" for ddpm / ddim, "linspace" for dpmpp_2m).
    steps_offset: added to "leading" timesteps (Stable Diffusion: 1).
    set_alpha_to_one: DDIM only: abar after the last step is 1 (True) or abar_0 (SD: False).
    clip_sample: ddpm / ddim: clip x_0 estimates to [-clip_sample_range, clip_sample_range].
    clip_sample_range: the clip bound.
    start_step: run steps start_step .. num_steps - 1 only (may be traced): img2img, whose x_T
      is the image's latents noised to timestep(start_step).
    blend: (i, x after step i) -> x, applied after every step (inpainting puts the known
      region back).

  Returns:
    The final sample, float32 like the loop carry, shape of x_T.

  Raises:
    ValueError: unknown sampler or spacing, a concrete num_steps out of range, a missing rng,
      eta != 0 for a sampler other than "ddim", or clip_sample with "dpmpp_2m".
  """
  spacing = _resolve_spacing(sampler, timestep_spacing)
  _check_steps_offset(steps_offset)
  big_t = schedule.num_train_timesteps
  max_steps = max_num_steps(sampler, big_t, spacing)
  _check_num_steps(num_steps, max_steps)
  eta_value = _concrete(eta)
  if sampler != "ddim" and eta_value != 0:
    raise ValueError(f"eta applies to the 'ddim' sampler only, got eta={eta!r} for {sampler!r}")
  if sampler == "dpmpp_2m" and clip_sample:
    raise ValueError("clip_sample is not supported by 'dpmpp_2m' (nor by diffusers' scheduler)")
  n_value = _concrete(num_steps)
  if n_value is not None:
    first = reference_timesteps(sampler, big_t, n_value, timestep_spacing=spacing,
                                steps_offset=steps_offset)[0]
    if first >= big_t:  # e.g. "leading" with steps_offset=1 and num_steps=T (diffusers: IndexError)
      raise ValueError(f"steps_offset={steps_offset} puts the first of num_steps={n_value} "
                       f"timesteps at {first} >= num_train_timesteps={big_t}")
  stochastic = sampler == "ddpm" or (sampler == "ddim" and eta_value != 0)
  if stochastic and rng is None:
    raise ValueError(f"sampler {sampler!r} with eta={eta!r} needs an rng")

  x = jnp.asarray(x_T, jnp.float32)
  batch = x.shape[0]
  n = jnp.asarray(num_steps, jnp.int32)
  valid = (n >= 1) & (n <= max_steps)
  valid &= timestep(sampler, big_t, 0, jnp.clip(n, 1, max_steps), timestep_spacing=spacing,
                    steps_offset=steps_offset) < big_t

  start = jnp.clip(jnp.asarray(start_step, jnp.int32), 0, n)

  def body(i, carry):
    x, prev_x0 = carry
    x, x0 = step(i, x, prev_x0)
    return (x, x0) if blend is None else (blend(i, x), x0)

  def step(i, x, prev_x0):
    t = timestep(sampler, big_t, i, n, timestep_spacing=spacing, steps_offset=steps_offset)
    model_output = denoise_fn(x, jnp.full((batch,), t, jnp.int32)).astype(jnp.float32)
    noise = None
    if stochastic:
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    if sampler == "ddpm":
      return ddpm_step(schedule, i, n, model_output, x, noise, timestep_spacing=spacing,
                       steps_offset=steps_offset, clip_sample=clip_sample,
                       clip_sample_range=clip_sample_range)
    if sampler == "ddim":
      return ddim_step(schedule, i, n, model_output, x, noise, eta=eta, timestep_spacing=spacing,
                       steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range)
    return dpmpp_2m_step(schedule, i, n, model_output, x, prev_x0, timestep_spacing=spacing,
                         steps_offset=steps_offset, first_step=start)

  x, _ = jax.lax.fori_loop(start, jnp.where(valid, n, 0), body, (x, jnp.zeros_like(x)))
  return jnp.where(valid, x, jnp.nan)


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def rescale_noise_cfg(guided_output: jax.Array, cond_output: jax.Array,
                      guidance_rescale: Any) -> jax.Array:
  """Guidance rescale (Lin et al. 2023, section 3.4; diffusers' `rescale_noise_cfg`).

  Rescales the guided prediction to the per-example standard deviation of the conditional one
  (guidance inflates it, which over-exposes images), then mixes
  phi * rescaled + (1 - phi) * guided.
  """
  axes = tuple(range(1, guided_output.ndim))
  std_cond = jnp.std(cond_output, axis=axes, keepdims=True, ddof=1)
  std_guided = jnp.std(guided_output, axis=axes, keepdims=True, ddof=1)
  rescaled = guided_output * (std_cond / std_guided)
  return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided_output


def guided(batched_denoise_fn: DenoiseFn, guidance_scale: Any,
           guidance_rescale: Any = 0.0) -> DenoiseFn:
  """Classifier-free guidance (Ho & Salimans 2022) as a `denoise_fn` for `sample`.

  The returned function makes ONE model call on the doubled batch [x; x] with timesteps [t; t];
  `batched_denoise_fn` must condition its first half on the unconditional (empty) context and its
  second half on the real one, e.g. with a context batch `concatenate([uncond, cond])` in its
  closure. Output: uncond + s * (cond - uncond), then `rescale_noise_cfg` unless guidance_rescale
  is the constant 0.

  Args:
    batched_denoise_fn: (x [2B, ...], t [2B]) -> output [2B, ...], halves [uncond; cond].
    guidance_scale: s (1 = the conditional prediction); may be traced.
    guidance_rescale: phi in [0, 1]; may be traced.

  Returns:
    denoise_fn(x_t [B, ...], t [B]) -> guided output [B, ...].
  """
  skip_rescale = _concrete(guidance_rescale) == 0

  def denoise_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
    both = batched_denoise_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]))
    uncond, cond = jnp.split(both, 2)
    out = uncond + guidance_scale * (cond - uncond)
    if skip_rescale:
      return out
    return rescale_noise_cfg(out, cond, guidance_rescale)

  return denoise_fn
