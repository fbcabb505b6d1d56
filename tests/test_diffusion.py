"""jaxt2i.diffusion against diffusers' PyTorch schedulers: schedules, sampler steps, whole loops.

Each sampler step is compared with the diffusers scheduler it reproduces on the same sample, model
output and injected noise; whole loops run a fixed linear "model" in both frameworks. Samples are
O(1) and must agree to 1e-5 in float32; x_0 estimates, up to ~15 at high noise, to 1e-5 of
max(1, |x_0|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.diffusion import samplers, schedules

try:
  import torch
  from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
  # The same function as the Stable Diffusion pipelines' copy, importable without transformers.
  from diffusers.guiders.guider_utils import rescale_noise_cfg as torch_rescale_noise_cfg
  from diffusers.schedulers import scheduling_ddpm
except ImportError:  # The equation and API tests still run; parity needs torch + diffusers.
  torch = None
  DDIMScheduler = DDPMScheduler = DPMSolverMultistepScheduler = None

needs_diffusers = pytest.mark.skipif(torch is None, reason="torch + diffusers not installed")

T = 1000
SHAPE = (2, 8, 8, 4)
ATOL = 1e-5
STEP_COUNTS = (7, 10, 25, 50)


# --------------------------------------------------------------------------------------------------
# Helpers.


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
  """Tiny torch ops contending with XLA's threads take ~10 ms each; on one thread, ~10 us."""
  if torch is None:
    yield
    return
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def schedule(prediction_type="epsilon", kind="scaled_linear", zero_snr=False):
  """A cached schedule; call it outside jit (a first call under a trace would cache tracers)."""
  return schedules.make_schedule(kind, T, prediction_type=prediction_type,
                                 rescale_zero_terminal_snr=zero_snr)


def reference_scheduler(cls, sched, **kwargs):
  """The diffusers scheduler on exactly our betas, so that only the sampler maths is compared."""
  return cls(num_train_timesteps=T, trained_betas=np.asarray(sched.betas),
             prediction_type=sched.prediction_type, **kwargs)


class FakeModel:
  """A fixed random linear map of (x_t, t), written once in JAX and once in torch."""

  def __init__(self, seed=0):
    rng = np.random.default_rng(seed)
    c = SHAPE[-1]
    self.w = (0.8 * np.eye(c) + 0.2 * rng.normal(size=(c, c))).astype(np.float32)
    self.b = (0.5 * rng.normal(size=(c,))).astype(np.float32)

  def jax(self, x, t):
    scale = (t.astype(jnp.float32) / T - 0.5)[:, None, None, None]
    return x @ self.w + scale * self.b

  def torch(self, x, t):
    scale = float(t) / T - 0.5
    return x @ torch.from_numpy(self.w) + scale * torch.from_numpy(self.b)


MODEL = FakeModel()


def normal(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def jitted_step(name, **static):
  """A jitted per-step function; i, num_steps, eta and the arrays are traced."""
  fn = {"ddpm": samplers.ddpm_step, "ddim": samplers.ddim_step,
        "dpmpp_2m": samplers.dpmpp_2m_step}[name]
  return jax.jit(functools.partial(fn, **static))


def jitted_sample(sampler, **static):
  """`samplers.sample` under jit with num_steps (and eta) traced."""
  def run(sched, x_t, rng, num_steps, eta):
    return samplers.sample(MODEL.jax, sched, x_t, rng, sampler=sampler, num_steps=num_steps,
                           eta=eta, **static)

  def run_deterministic(sched, x_t, rng, num_steps, eta):
    del eta
    return samplers.sample(MODEL.jax, sched, x_t, rng, sampler=sampler, num_steps=num_steps,
                           **static)

  return jax.jit(run if sampler == "ddim" else run_deterministic)


def loop_noise(rng, i):
  """The noise `samplers.sample` injects at step i."""
  return np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE, jnp.float32))


@pytest.fixture
def ddpm_noise(monkeypatch):
  """Makes DDPMScheduler.step draw its noise from `holder[0]` (it takes no noise argument)."""
  holder = [None]
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: holder[0])
  return holder


def max_diff(a, b):
  d = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  assert np.isfinite(d), "NaN or inf in a compared value"  # max() over diffs would drop a NaN
  return d


def scaled_diff(a, b):
  """max_diff relative to max(1, max |b|): x_0 estimates at high noise reach ~15, not O(1)."""
  return max_diff(a, b) / max(1.0, float(np.max(np.abs(np.asarray(b)))))


# --------------------------------------------------------------------------------------------------
# Schedules.


@needs_diffusers
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_schedule_matches_diffusers(kind, zero_snr, num_train_timesteps):
  ours = schedules.make_schedule(kind, num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                                 rescale_zero_terminal_snr=zero_snr)
  ref = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                      beta_schedule=kind, rescale_betas_zero_snr=zero_snr)
  assert ours.betas.dtype == jnp.float32 and ours.betas.shape == (num_train_timesteps,)
  if zero_snr:
    # diffusers rescales in float32, where sqrt(abar_t) - sqrt(abar_T) cancels near t = T: its
    # betas there carry ~1e-5 of rounding noise; ours are the float64 values they approximate.
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=3e-6)
    assert float(ours.alphas_cumprod[-1]) == 0.0  # zero terminal SNR, exactly
    plain = schedules.make_schedule(kind, num_train_timesteps)
    np.testing.assert_allclose(ours.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6)
  else:
    # Betas within an ulp of torch.linspace's float32 ones; cumprod accumulates like torch's.
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=5e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_snr_shift_divides_every_snr(kind):
  plain = schedules.make_schedule(kind, 1000)
  shifted = schedules.make_schedule(kind, 1000, snr_shift=4.0)
  a, b = (np.asarray(s.alphas_cumprod, np.float64) for s in (plain, shifted))
  # (float32 abar near 1 at the first steps: 1 - abar carries ~1e-4 relative rounding)
  np.testing.assert_allclose(b / (1 - b), a / (1 - a) / 16.0, rtol=1e-3)
  assert (np.asarray(shifted.betas) > 0).all() and (np.asarray(shifted.betas) < 1).all()
  # Then rescaled to zero terminal SNR; snr_shift 1 is the unshifted schedule.
  both = schedules.make_schedule(kind, 1000, snr_shift=4.0, rescale_zero_terminal_snr=True)
  assert float(both.alphas_cumprod[-1]) == 0.0
  np.testing.assert_allclose(both.alphas_cumprod[0], shifted.alphas_cumprod[0], rtol=1e-6)
  np.testing.assert_array_equal(schedules.make_schedule(kind, 1000, snr_shift=1.0).betas,
                                plain.betas)


@needs_diffusers
def test_shifted_schedule_exports_as_diffusers_trained_betas():
  ours = schedules.make_schedule("scaled_linear", 1000, snr_shift=3.0)
  ref = DDIMScheduler(num_train_timesteps=1000, trained_betas=np.asarray(ours.betas).tolist())
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-7)


def test_cosine_alias_and_schedule_is_a_pytree():
  a = schedules.make_schedule("cosine", 100, prediction_type="v_prediction")
  b = schedules.make_schedule("squaredcos_cap_v2", 100, prediction_type="v_prediction")
  np.testing.assert_array_equal(a.betas, b.betas)
  leaves, treedef = jax.tree_util.tree_flatten(a)
  assert len(leaves) == 2
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.prediction_type == "v_prediction" and rebuilt.num_train_timesteps == 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="sigmoid"), "unknown schedule kind"),
    (dict(kind="linear", prediction_type="flow"), "prediction_type"),
    (dict(kind="linear", num_train_timesteps=1), "num_train_timesteps"),
    (dict(kind="linear", num_train_timesteps=10.0), "num_train_timesteps"),
    (dict(kind="linear", beta_start=0.02, beta_end=0.01), "beta_start"),
    (dict(kind="scaled_linear", beta_end=1.0), "beta_start"),
    (dict(kind="scaled_linear", snr_shift=0.0), "snr_shift"),
    (dict(kind="scaled_linear", snr_shift=float("inf")), "snr_shift"),
])
def test_make_schedule_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.make_schedule(**kwargs)


@needs_diffusers
def test_add_noise_and_velocity_match_diffusers():
  sched = schedule()
  ref = reference_scheduler(DDPMScheduler, sched)
  x0, eps = normal(1), normal(2)
  t = np.array([0, 999], np.int32)
  np.testing.assert_allclose(
      schedules.add_noise(sched, x0, eps, t),
      ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t).long()),
      rtol=0, atol=1e-6)
  np.testing.assert_allclose(
      schedules.velocity(sched, x0, eps, t),
      ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t).long()),
      rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_parameterisations_round_trip(prediction_type):
  sched = schedule(prediction_type)
  x0, eps = normal(3), normal(4)
  t = jnp.array([3, 640], jnp.int32)
  x_t = schedules.add_noise(sched, x0, eps, t)
  target = schedules.training_target(sched, x0, eps, t)
  expected = {"epsilon": eps, "sample": x0,
              "v_prediction": schedules.velocity(sched, x0, eps, t)}[prediction_type]
  np.testing.assert_array_equal(target, expected)
  x0_hat, eps_hat = schedules.to_x0_eps(sched, target, x_t, t)
  np.testing.assert_allclose(x0_hat, x0, rtol=0, atol=2e-5)
  np.testing.assert_allclose(eps_hat, eps, rtol=0, atol=2e-5)
  with pytest.raises(ValueError, match="integer"):
    schedules.to_x0_eps(sched, target, x_t, t.astype(jnp.float32))


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_min_snr_weights(prediction_type):
  sched = schedule(prediction_type, zero_snr=True)
  t = jnp.array([0, 10, 100, 500, 900, 999], jnp.int32)
  a = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
  s = a / (1 - a)
  np.testing.assert_allclose(schedules.snr(sched, t), s, rtol=1e-5)
  gamma = 5.0
  with np.errstate(divide="ignore", invalid="ignore"):
    expected = {"epsilon": np.minimum(s, gamma) / s, "v_prediction": np.minimum(s, gamma) / (s + 1),
                "sample": np.minimum(s, gamma)}[prediction_type]
  if prediction_type == "epsilon":
    expected[-1] = 1.0  # the SNR -> 0 limit at the zero-SNR last step, instead of 0 / 0
  w = schedules.loss_weight(sched, t, "min_snr", gamma)
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w, expected, rtol=1e-5)
  np.testing.assert_array_equal(schedules.loss_weight(sched, t), np.ones(6))
  with pytest.raises(ValueError, match="loss weighting"):
    schedules.loss_weight(sched, t, "p2")
  with pytest.raises(ValueError, match="gamma"):
    schedules.loss_weight(sched, t, "min_snr", 0.0)


# --------------------------------------------------------------------------------------------------
# Timesteps.


@needs_diffusers
@pytest.mark.parametrize("sampler, cls, spacing, offset, all_n", [
    ("ddim", DDIMScheduler, "leading", 1, False),
    ("ddim", DDIMScheduler, "trailing", 0, True),
    ("ddim", DDIMScheduler, "linspace", 0, True),
    ("ddpm", DDPMScheduler, "leading", 0, False),
    ("ddpm", DDPMScheduler, "trailing", 0, False),
    ("dpmpp_2m", DPMSolverMultistepScheduler, "linspace", 0, True),
    ("dpmpp_2m", DPMSolverMultistepScheduler, "leading", 1, False),
    ("dpmpp_2m", DPMSolverMultistepScheduler, "trailing", 0, False),
])
def test_timesteps_match_diffusers(sampler, cls, spacing, offset, all_n):
  """Traced (i, num_steps) -> timestep equals diffusers' numpy set_timesteps, for every n <= T."""
  all_steps = jax.jit(jax.vmap(functools.partial(
      samplers.timestep, sampler, T, timestep_spacing=spacing, steps_offset=offset),
      in_axes=(0, None)))
  ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
  ns = range(1, T + 1) if all_n else [1, 2, 3, 7, 10, 25, 48, 50, 61, 96, 333, 500, 999, 1000]
  longer = []
  for n in ns:
    ref.set_timesteps(n)
    expected = ref.timesteps.numpy()
    if len(expected) != n:
      # diffusers' float np.arange quirk (trailing only): one extra timestep, -1, at the end.
      assert spacing == "trailing" and len(expected) == n + 1 and expected[-1] == -1
      longer.append(n)
    ours = np.asarray(all_steps(jnp.arange(T), jnp.int32(n)))[:n]
    np.testing.assert_array_equal(ours, expected[:n], err_msg=f"num_steps={n}")
    np.testing.assert_array_equal(
        samplers.reference_timesteps(sampler, T, n, timestep_spacing=spacing, steps_offset=offset),
        expected[:n])
  if spacing == "trailing":
    assert 61 in longer


# --------------------------------------------------------------------------------------------------
# Samplers, one step at a time.


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing, clip", [("leading", False), ("trailing", False),
                                           ("linspace", True)])
def test_ddpm_steps_match_diffusers(prediction_type, spacing, clip, ddpm_noise):
  sched = schedule(prediction_type)
  ref = reference_scheduler(DDPMScheduler, sched, variance_type="fixed_small", clip_sample=clip,
                            clip_sample_range=1.5, timestep_spacing=spacing)
  step = jitted_step("ddpm", timestep_spacing=spacing, clip_sample=clip)
  timestep = jax.jit(functools.partial(samplers.timestep, "ddpm", T, timestep_spacing=spacing))
  worst = 0.0
  for n in STEP_COUNTS:
    ref.set_timesteps(n)
    x = normal(n)
    for i, t in enumerate(ref.timesteps):
      assert int(timestep(i, n)) == int(t)
      out = MODEL.torch(torch.from_numpy(x), t).numpy() + 0.3 * normal(100 + i)
      ddpm_noise[0] = torch.from_numpy(normal(200 + i))
      expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x))
      x_prev, x0 = step(sched, i, n, out, x, ddpm_noise[0].numpy(), clip_sample_range=1.5)
      worst = max(worst, max_diff(x_prev, expected.prev_sample),
                  scaled_diff(x0, expected.pred_original_sample))
      x = expected.prev_sample.numpy()
  print(f"ddpm {prediction_type} {spacing}: max abs diff {worst:.2e}")
  assert worst < ATOL


@needs_diffusers
@pytest.mark.parametrize("prediction_type, spacing, offset, alpha_to_one, clip", [
    ("epsilon", "leading", 1, False, False),  # Stable Diffusion's DDIM settings
    ("epsilon", "trailing", 0, True, False),
    ("v_prediction", "linspace", 0, True, False),
    ("v_prediction", "trailing", 0, False, True),
    ("sample", "leading", 0, True, False),
    ("sample", "linspace", 0, False, True),
])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match_diffusers(prediction_type, spacing, offset, alpha_to_one, clip, eta):
  sched = schedule(prediction_type)
  ref = reference_scheduler(DDIMScheduler, sched, set_alpha_to_one=alpha_to_one,
                            steps_offset=offset, timestep_spacing=spacing, clip_sample=clip)
  step = jitted_step("ddim", timestep_spacing=spacing, steps_offset=offset,
                     set_alpha_to_one=alpha_to_one, clip_sample=clip)
  worst = 0.0
  for n in STEP_COUNTS:
    ref.set_timesteps(n)
    x = normal(n)
    for i, t in enumerate(ref.timesteps):
      out = MODEL.torch(torch.from_numpy(x), t).numpy() + 0.3 * normal(100 + i)
      noise = normal(200 + i)
      expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                          variance_noise=torch.from_numpy(noise) if eta else None)
      x_prev, x0 = step(sched, i, n, out, x, noise, eta=eta)
      worst = max(worst, max_diff(x_prev, expected.prev_sample),
                  scaled_diff(x0, expected.pred_original_sample))
      x = expected.prev_sample.numpy()
  print(f"ddim {prediction_type} {spacing} eta={eta}: max abs diff {worst:.2e}")
  assert worst < ATOL


@needs_diffusers
@pytest.mark.parametrize("prediction_type, spacing, zero_snr", [
    ("epsilon", "linspace", False),
    ("v_prediction", "linspace", False),
    ("sample", "linspace", False),
    ("epsilon", "leading", False),
    ("v_prediction", "trailing", True),
])
def test_dpmpp_2m_steps_match_diffusers(prediction_type, spacing, zero_snr):
  sched = schedule(prediction_type, zero_snr=zero_snr)
  ref = reference_scheduler(
      DPMSolverMultistepScheduler, sched, algorithm_type="dpmsolver++", solver_order=2,
      solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
      timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
      # Our betas are already rescaled (a no-op again); the flag turns on diffusers' 2**-24 floor.
      rescale_betas_zero_snr=zero_snr)
  step = jitted_step("dpmpp_2m", timestep_spacing=spacing,
                     steps_offset=1 if spacing == "leading" else 0)
  worst = 0.0
  for n in STEP_COUNTS + (1, 2, 16):
    ref.set_timesteps(n)
    x = normal(n)
    prev_x0 = np.zeros(SHAPE, np.float32)
    for i, t in enumerate(ref.timesteps):
      out = MODEL.torch(torch.from_numpy(x), t).numpy() + 0.3 * normal(100 + i)
      expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample
      x_next, prev_x0 = step(sched, i, n, out, x, prev_x0)
      worst = max(worst, max_diff(x_next, expected))
      x = expected.numpy()
  print(f"dpmpp_2m {prediction_type} {spacing} zero_snr={zero_snr}: max abs diff {worst:.2e}")
  assert worst < ATOL


# --------------------------------------------------------------------------------------------------
# Whole loops.


def reference_loop(scheduler, n, x_T, rng, ddpm_noise, eta=0.0):
  """diffusers' denoising loop with the torch twin of the fake model and our injected noise."""
  scheduler.set_timesteps(n)
  x = torch.from_numpy(x_T)
  for i, t in enumerate(scheduler.timesteps):
    out = MODEL.torch(x, t)
    noise = torch.from_numpy(loop_noise(rng, i).copy())
    if isinstance(scheduler, DDPMScheduler):
      ddpm_noise[0] = noise
      x = scheduler.step(out, t, x).prev_sample
    elif isinstance(scheduler, DDIMScheduler):
      x = scheduler.step(out, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
    else:
      x = scheduler.step(out, t, x).prev_sample
  return x.numpy()


@needs_diffusers
@pytest.mark.parametrize("sampler, prediction_type, zero_snr, static, eta", [
    ("ddpm", "epsilon", False, dict(), 0.0),
    ("ddpm", "v_prediction", False, dict(timestep_spacing="trailing"), 0.0),
    ("ddim", "epsilon", False, dict(steps_offset=1, set_alpha_to_one=False), 0.0),
    ("ddim", "v_prediction", True, dict(timestep_spacing="trailing"), 0.5),
    ("ddim", "sample", False, dict(timestep_spacing="linspace", clip_sample=True), 1.0),
    ("dpmpp_2m", "epsilon", False, dict(), 0.0),
    ("dpmpp_2m", "v_prediction", True, dict(timestep_spacing="trailing"), 0.0),
    ("dpmpp_2m", "sample", False, dict(), 0.0),
])
def test_sample_loop_matches_diffusers(sampler, prediction_type, zero_snr, static, eta,
                                       ddpm_noise):
  sched = schedule(prediction_type, zero_snr=zero_snr)
  spacing = static.get("timestep_spacing", samplers.DEFAULT_SPACING[sampler])
  if sampler == "ddpm":
    ref = reference_scheduler(DDPMScheduler, sched, timestep_spacing=spacing, clip_sample=False)
  elif sampler == "ddim":
    ref = reference_scheduler(
        DDIMScheduler, sched, timestep_spacing=spacing,
        clip_sample=static.get("clip_sample", False), steps_offset=static.get("steps_offset", 0),
        set_alpha_to_one=static.get("set_alpha_to_one", True))
  else:
    ref = reference_scheduler(DPMSolverMultistepScheduler, sched, timestep_spacing=spacing,
                              rescale_betas_zero_snr=zero_snr)
  run = jitted_sample(sampler, **static)
  rng = jax.random.key(7)
  x_T = normal(0)
  worst = 0.0
  for n in (7, 25):
    ours = np.asarray(run(sched, x_T, rng, n, eta))
    expected = reference_loop(ref, n, x_T, rng, ddpm_noise, eta)
    assert np.all(np.isfinite(ours)) and np.max(np.abs(expected)) < 20
    worst = max(worst, max_diff(ours, expected))
  print(f"sample {sampler} {prediction_type} zero_snr={zero_snr}: max abs diff {worst:.2e}")
  assert worst < ATOL
  assert run._cache_size() == 1


def test_num_steps_eta_and_guidance_are_traced():
  """One compilation serves every num_steps, eta and guidance scale."""
  traces = []

  def batched_model(x, t):
    traces.append(x.shape)
    return MODEL.jax(x, t) + jnp.where(jnp.arange(x.shape[0]) < x.shape[0] // 2, 0.0, 0.1)[
        :, None, None, None]

  sched = schedule()

  @jax.jit
  def run(x_T, rng, num_steps, eta, scale):
    return samplers.sample(samplers.guided(batched_model, scale), sched, x_T, rng,
                           sampler="ddim", num_steps=num_steps, eta=eta)

  x_T, rng = normal(0), jax.random.key(0)
  a = run(x_T, rng, 10, 0.0, 7.5)
  b = run(x_T, rng, 25, 0.3, 1.5)
  c = run(x_T, rng, 10, 0.0, 7.5)
  assert traces == [(2 * SHAPE[0],) + SHAPE[1:]]  # traced once, one doubled-batch forward
  assert run._cache_size() == 1
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)

  for sampler in ("ddpm", "dpmpp_2m"):
    fn = jax.jit(functools.partial(lambda s, x, r, n: samplers.sample(
        MODEL.jax, sched, x, r, sampler=s, num_steps=n), sampler))
    fn(x_T, rng, 5)
    fn(x_T, rng, 12)
    assert fn._cache_size() == 1


def test_out_of_range_traced_num_steps_gives_nan():
  sched = schedule()
  run = jax.jit(lambda x, n: samplers.sample(MODEL.jax, sched, x, num_steps=n))
  assert np.all(np.isnan(run(normal(0), 0)))
  assert np.all(np.isnan(run(normal(0), T + 1)))
  offset = jax.jit(lambda x, n: samplers.sample(MODEL.jax, sched, x, num_steps=n,
                                                steps_offset=1))
  assert np.all(np.isnan(offset(normal(0), T)))  # first timestep would be T
  assert np.all(np.isfinite(offset(normal(0), T - 1)))
  assert np.all(np.isfinite(run(normal(0), T // 100)))
  dpm = jax.jit(lambda x, n: samplers.sample(MODEL.jax, sched, x, sampler="dpmpp_2m", num_steps=n))
  assert np.all(np.isnan(dpm(normal(0), T)))  # two of T + 1 linspace points would coincide
  assert np.all(np.isfinite(dpm(normal(0), T - 1)))


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
  x_T = normal(0)
  sched = schedule()
  ddim = jax.jit(lambda x, r: samplers.sample(MODEL.jax, sched, x, r, num_steps=10))
  np.testing.assert_array_equal(ddim(x_T, jax.random.key(1)), ddim(x_T, jax.random.key(2)))
  ddpm = jax.jit(lambda x, r: samplers.sample(MODEL.jax, sched, x, r, sampler="ddpm",
                                              num_steps=10))
  assert not np.allclose(ddpm(x_T, jax.random.key(1)), ddpm(x_T, jax.random.key(2)))


def test_sampler_bad_arguments():
  sched, x = schedule(), normal(0)
  rng = jax.random.key(0)
  cases = [
      (dict(sampler="euler", num_steps=10), "unknown sampler"),
      (dict(num_steps=0), "num_steps"),
      (dict(num_steps=T + 1), "num_steps"),
      (dict(num_steps=2.5), "num_steps"),
      (dict(num_steps=10, timestep_spacing="karras"), "timestep_spacing"),
      (dict(num_steps=10, steps_offset=-1), "steps_offset"),
      (dict(num_steps=T, steps_offset=1), "steps_offset=1"),
      (dict(sampler="dpmpp_2m", num_steps=T), "num_steps must be in"),
      (dict(sampler="dpmpp_2m", num_steps=10, eta=0.5), "eta"),
      (dict(sampler="dpmpp_2m", num_steps=10, clip_sample=True), "clip_sample"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      samplers.sample(MODEL.jax, sched, x, rng, **kwargs)
  with pytest.raises(ValueError, match="rng"):
    samplers.sample(MODEL.jax, sched, x, sampler="ddpm", num_steps=10)
  with pytest.raises(ValueError, match="noise"):
    samplers.ddim_step(sched, 0, 10, x, x, eta=0.5)


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def fake_cfg_model():
  """A fake batched model whose halves are fixed [uncond; cond] outputs, recording batch sizes."""
  cond, uncond = normal(1), normal(2)
  calls = []

  def batched(x, t):
    calls.append(x.shape[0])
    return jnp.concatenate([jnp.asarray(uncond), jnp.asarray(cond)]) + 0.0 * x

  return batched, cond, uncond, calls


def test_guidance():
  batched, cond, uncond, calls = fake_cfg_model()
  x, t = normal(3), jnp.full((SHAPE[0],), 500, jnp.int32)
  np.testing.assert_allclose(samplers.guided(batched, 1.0)(x, t), cond, rtol=0, atol=1e-6)
  assert calls == [2 * SHAPE[0]]
  guided = samplers.guided(batched, 7.5)(x, t)
  np.testing.assert_allclose(guided, uncond + 7.5 * (cond - uncond), rtol=1e-6, atol=1e-6)
  # Rescale with factor 0 is a no-op, also when the factor is traced.
  np.testing.assert_array_equal(samplers.rescale_noise_cfg(guided, cond, 0.0), guided)
  traced = jax.jit(lambda phi: samplers.guided(batched, 7.5, phi)(x, t))
  np.testing.assert_allclose(traced(0.0), guided, rtol=0, atol=1e-6)
  # The rescaled prediction at factor 1 has the conditional prediction's per-example std.
  full = samplers.rescale_noise_cfg(guided, cond, 1.0)
  np.testing.assert_allclose(np.std(full, axis=(1, 2, 3)), np.std(cond, axis=(1, 2, 3)), rtol=1e-5)


@needs_diffusers
def test_guidance_rescale_matches_diffusers():
  batched, cond, _, _ = fake_cfg_model()
  x, t = normal(3), jnp.full((SHAPE[0],), 500, jnp.int32)
  guided = samplers.guided(batched, 7.5)(x, t)
  traced = jax.jit(lambda phi: samplers.guided(batched, 7.5, phi)(x, t))
  expected = torch_rescale_noise_cfg(torch.from_numpy(np.array(guided)), torch.from_numpy(cond),
                                     guidance_rescale=0.7).numpy()
  np.testing.assert_allclose(samplers.guided(batched, 7.5, 0.7)(x, t), expected, rtol=0,
                             atol=1e-5)
  np.testing.assert_allclose(traced(0.7), expected, rtol=0, atol=1e-5)
