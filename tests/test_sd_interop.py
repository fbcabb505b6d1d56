"""Stable Diffusion interop: diffusers AutoencoderKL folders load into jaxt2i's KL
autoencoder with the same posteriors and decodings (random-init reference models saved
locally; nothing is downloaded)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers import sd_folder, tiny_vae  # noqa: E402
from jaxt2i.convert import diffusers_vae  # noqa: E402

VAE_CONFIGS = {
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       latent_channels=4),
    "three_levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                         norm_num_groups=16, latent_channels=8, scaling_factor=0.13025),
}


def _rel_err(ours, theirs):
  theirs = theirs.detach().numpy().transpose(0, 2, 3, 1)
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_matches_diffusers(tmp_path, name):
  reference = tiny_vae(VAE_CONFIGS[name])
  reference.save_pretrained(tmp_path / "sd" / "vae")
  model, params, scaling = diffusers_vae.load_diffusers_vae(tmp_path / "sd")  # SD folder
  assert scaling == VAE_CONFIGS[name].get("scaling_factor", 0.18215)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 24)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images)).latent_dist
    decoded = reference.decode(posterior.mean).sample
  ours = model.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)),
                     method=model.encode)
  assert _rel_err(ours["mean"], posterior.mean) <= 1e-4
  assert _rel_err(ours["logvar"], posterior.logvar) <= 1e-4
  out = model.apply({"params": params}, ours["mean"], method=model.decode)
  assert _rel_err(out, decoded) <= 1e-4


def test_vae_old_attention_names(tmp_path):
  """Checkpoints from before diffusers 0.14 name the mid-block attention query / key / value /
  proj_attn, and the original LDM layout stores them as 1x1 convolutions."""
  reference = tiny_vae(VAE_CONFIGS["two_levels"])
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in reference.state_dict().items():
    for new, legacy in renames.items():
      key = key.replace(f".{new}.", f".{legacy}.")
    if ".proj_attn.weight" in key or ".query.weight" in key:
      value = value[:, :, None, None]
    old[key] = value.numpy()
  fields, _ = diffusers_vae.vae_config_from_diffusers(dict(reference.config))
  model = diffusers_vae.Autoencoder(**fields)
  params = diffusers_vae.vae_params_from_diffusers(old, model)
  current = diffusers_vae.vae_params_from_diffusers(
      {k: v.numpy() for k, v in reference.state_dict().items()}, model)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(current)):
    np.testing.assert_array_equal(a, b)


def test_vae_errors(tmp_path):
  reference = tiny_vae(VAE_CONFIGS["two_levels"])
  config = dict(reference.config)
  with pytest.raises(ValueError, match="use_quant_conv=False"):
    diffusers_vae.vae_config_from_diffusers({**config, "use_quant_conv": False})
  with pytest.raises(ValueError, match="down_block_types"):
    diffusers_vae.vae_config_from_diffusers(
        {**config, "down_block_types": ["DownBlock2D", "DownBlock2D"]})
  fields, _ = diffusers_vae.vae_config_from_diffusers(config)
  with pytest.raises(ValueError, match="missing keys"):
    diffusers_vae.vae_params_from_diffusers({}, diffusers_vae.Autoencoder(**fields))
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                            if not k.startswith("_")}))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    diffusers_vae.load_diffusers_vae(tmp_path)


def test_from_diffusers_matches_stable_diffusion_pipeline(tmp_path):
  """jaxt2i.from_diffusers on a saved StableDiffusionPipeline: the same images from the same
  initial latents, with guidance and a negative prompt, as diffusers' own pipeline."""
  import jaxt2i
  folder, reference = sd_folder(tmp_path)
  pipe = jaxt2i.from_diffusers(folder, compilation_cache=False)
  assert pipe.config.data.image_size == 16 and pipe.config.model.sampler == "ddim"
  assert pipe.config.model.steps_offset == 1 and not pipe.config.model.set_alpha_to_one
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  prompts = ["a red circle", "a blue circle"]
  for negative in (None, "red"):
    with torch.no_grad():
      theirs = reference(prompts, num_inference_steps=4, guidance_scale=7.5,
                         negative_prompt=[negative] * 2 if negative else None,
                         latents=torch.from_numpy(latents), output_type="np").images
    ours = pipe(prompts, steps=4, guidance_scale=7.5, negative_prompt=negative,
                latents=latents.transpose(0, 2, 3, 1), output="np")
    assert ours.shape == theirs.shape == (2, 16, 16, 3) and ours.dtype == np.uint8
    # Ours rounds to uint8; theirs is float in [0, 1].
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)
  # bfloat16 weights and compute: close, not equal.
  half = jaxt2i.from_diffusers(folder, dtype="bfloat16", compilation_cache=False)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.params))
  low = half(prompts, steps=4, guidance_scale=7.5, latents=latents.transpose(0, 2, 3, 1),
             output="np")
  assert np.abs(low / 255.0 - theirs).mean() < 0.05
  # Unconditional (scale 1) as well: the prompt branch only.
  with torch.no_grad():
    theirs = reference(prompts[:1], num_inference_steps=3, guidance_scale=1.0,
                       latents=torch.from_numpy(latents[:1]), output_type="np").images
  ours = pipe(prompts[:1], steps=3, guidance_scale=1.0,
              latents=latents[:1].transpose(0, 2, 3, 1), output="np")
  np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)


def test_from_diffusers_errors(tmp_path):
  import jaxt2i
  with pytest.raises(FileNotFoundError, match="missing unet/, vae/"):
    jaxt2i.from_diffusers(tmp_path)
  from jaxt2i.convert import diffusers_pipeline
  with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
    diffusers_pipeline.scheduler_fields({"beta_schedule": "sigmoid"})
  fields = diffusers_pipeline.scheduler_fields(
      {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
       "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
  assert fields["sampler"] == "dpmpp_2m" and fields["prediction_type"] == "v_prediction"
  assert fields["timestep_spacing"] == "trailing" and fields["snr_shift"] == 1.0
  # Explicit betas: a shifted schedule (as save_diffusers writes one) is recognised; others not.
  from jaxt2i.diffusion import schedules
  config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
  betas = np.asarray(schedules.make_schedule("scaled_linear", snr_shift=3.0).betas)
  fields = diffusers_pipeline.scheduler_fields({**config, "trained_betas": betas.tolist()})
  assert fields["snr_shift"] == pytest.approx(3.0, rel=1e-4)
  with pytest.raises(ValueError, match="trained_betas are not a scaled_linear schedule"):
    diffusers_pipeline.scheduler_fields({**config, "trained_betas": (betas * 1.1).tolist()})


def test_to_diffusers_round_trip(tmp_path):
  """from_diffusers -> save_diffusers -> from_diffusers gives the params bit for bit, and
  diffusers' own pipeline loads the written folder and draws the same images."""
  import jax
  import jaxt2i
  folder, reference = sd_folder(tmp_path)
  pipe = jaxt2i.from_diffusers(folder, compilation_cache=False)
  parts = pipe.save_diffusers(tmp_path / "out")
  assert set(parts) == {"unet", "vae", "scheduler", "text_encoder", "tokenizer",
                        "model_index.json"}
  again = jaxt2i.from_diffusers(tmp_path / "out", compilation_cache=False)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(pipe.params))[0]
  flat_again = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(again.params))[0])
  assert len(flat) == len(flat_again)
  for path, value in flat:
    np.testing.assert_array_equal(value, flat_again[path], err_msg=str(path))
  for key in ("sampler", "steps_offset", "set_alpha_to_one", "latent_scale", "schedule",
              "beta_start", "beta_end", "prediction_type"):
    assert again.config.model[key] == pipe.config.model[key], key
  loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out",
                                                             local_files_only=True)
  latents = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 4, 8, 8),
                                                                      dtype=np.float32))
  with torch.no_grad():
    before = reference(["a red circle"], num_inference_steps=3, latents=latents,
                       output_type="np").images
    after = loaded(["a red circle"], num_inference_steps=3, latents=latents,
                   output_type="np").images
  np.testing.assert_allclose(after, before, atol=1e-5)
  # A shifted noise schedule (model.snr_shift) leaves as diffusers' trained_betas and comes back.
  from jaxt2i.convert import diffusers_pipeline
  from jaxt2i.diffusion import schedules
  with pipe.config.unlocked():
    pipe.config.model.snr_shift = 2.0
  pipe.save_diffusers(tmp_path / "shifted")
  theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path / "shifted" / "scheduler")
  m = pipe.config.model
  ours = schedules.make_schedule(m.schedule, m.num_train_timesteps, m.beta_start, m.beta_end,
                                 snr_shift=2.0)
  np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), ours.alphas_cumprod, atol=1e-7)
  read = json.loads((tmp_path / "shifted" / "scheduler" / "scheduler_config.json").read_text())
  assert diffusers_pipeline.scheduler_fields(read)["snr_shift"] == pytest.approx(2.0, rel=1e-4)


def _fixed_randomness(monkeypatch, module, noise):
  """diffusers' img2img / inpainting pipelines draw the initial noise and sample the VAE
  posterior from torch's generator: make them use `noise` and the posterior mean, as the
  jaxt2i call does (latents=noise)."""
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: noise.clone())
  monkeypatch.setattr(module, "retrieve_latents",
                      lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


@pytest.mark.slow  # ~40 s on 2 cores: three sampling programs and two diffusers pipelines
def test_img2img_and_inpainting_match_diffusers(tmp_path, monkeypatch):
  import jaxt2i
  from diffusers.pipelines.stable_diffusion import (pipeline_stable_diffusion_img2img as i2i,
                                                    pipeline_stable_diffusion_inpaint as inp)
  from PIL import Image
  folder, _ = sd_folder(tmp_path)
  pipe = jaxt2i.from_diffusers(folder, compilation_cache=False)
  rng = np.random.default_rng(2)
  init = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
  noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  ours_noise = noise.transpose(0, 2, 3, 1)

  _fixed_randomness(monkeypatch, i2i, torch.from_numpy(noise))
  img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder)
  for strength in (0.6, 1.0):
    with torch.no_grad():
      theirs = img2img(["a red circle"], image=init, strength=strength, num_inference_steps=5,
                       guidance_scale=7.5, output_type="np").images
    ours = pipe(["a red circle"], image=init, strength=strength, steps=5, guidance_scale=7.5,
                latents=ours_noise, output="np")
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)

  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 2:10] = 255  # repaint this
  _fixed_randomness(monkeypatch, inp, torch.from_numpy(noise))
  inpaint = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder)
  with torch.no_grad():
    theirs = inpaint(["a red circle"], image=init, mask_image=Image.fromarray(mask),
                     num_inference_steps=5, guidance_scale=7.5, latents=torch.from_numpy(noise),
                     output_type="np").images
  ours = pipe(["a red circle"], image=init, mask_image=Image.fromarray(mask), steps=5,
              guidance_scale=7.5, latents=ours_noise, output="np")
  np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)

  # A batch of masks, one per prompt (here the same twice): per-prompt rows.
  both = pipe(["a red circle"] * 2, image=init, mask_image=np.stack([mask, mask]) / 255.0,
              steps=5, guidance_scale=7.5, latents=np.concatenate([ours_noise] * 2),
              output="np")
  np.testing.assert_allclose(both[0].astype(int), ours[0].astype(int), atol=1)
  with pytest.raises(ValueError, match="need an image"):
    pipe(["a red circle"], strength=0.5)
  with pytest.raises(ValueError, match="strength=1.5"):
    pipe(["a red circle"], image=init, strength=1.5)
  with pytest.raises(ValueError, match="this model takes 16x16"):
    pipe(["a red circle"], image=np.zeros((8, 8, 3), np.uint8))


@pytest.mark.slow  # ~2 min on 2 cores: compiling the trainer's step and the sampler
def test_finetune_a_loaded_model_with_the_trainer(tmp_path):
  """configs/sd_finetune.py on a saved Stable Diffusion folder: the run starts from its
  weights, trains the U-Net only (VAE and CLIP frozen), drops captions to CLIP's empty-prompt
  row, and the result samples through jaxt2i.load and exports back to diffusers."""
  import jax
  import jaxt2i
  import jaxt2i.data.tokenizer
  from helpers import override, records, train_run
  from configs.sd_finetune import get_config
  folder, _ = sd_folder(tmp_path)
  config = override(get_config(str(folder)), **{
      "batch_size": 4, "train.num_steps": 2, "train.compute_dtype": "float32",
      "train.ema_decay": 0.0, "data.worker_count": 0, "optim.warmup_steps": 1,
      "optim.learning_rate": 1e-3, "checkpoint.every_steps": 100, "model.caption_dropout": 0.5})
  tok = jaxt2i.data.tokenizer.CLIPTokenizer.load(folder)
  assert config.model.unconditional_tokens == tuple(tok.encode([""])[0][0])
  start = jaxt2i.from_diffusers(folder, compilation_cache=False).params
  trainer, state = train_run(config, tmp_path / "run", source=records(8, 32))
  final = jax.device_get(state.params)
  changed = lambda key: any(not np.array_equal(a, b) for a, b in zip(  # noqa: E731
      jax.tree.leaves(jax.device_get(start[key])), jax.tree.leaves(final[key])))
  assert changed("unet") and not changed("autoencoder") and not changed("text_encoder")
  pipe = jaxt2i.load(tmp_path / "run", compilation_cache=False)
  images = pipe(["a red circle"], steps=2, output="np")
  assert images.shape == (1, 16, 16, 3)
  assert pipe.save_diffusers(tmp_path / "exported")[-1] == "model_index.json"


def _controlnet(seed):
  """A tiny ControlNetModel for sd_folder's U-Net, every weight random (the zero
  convolutions too, or its residuals would be zero)."""
  torch.manual_seed(seed)
  net = diffusers.ControlNetModel(
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
      attention_head_dim=4, conditioning_embedding_out_channels=(8, 16)).eval()
  with torch.no_grad():
    for p in net.parameters():
      p.normal_(0.0, 0.05)
  return net


def test_controlnet_matches_diffusers(tmp_path):
  """ControlNetModel weights convert: every residual within 1e-4 of diffusers'."""
  from jaxt2i.convert.diffusers_controlnet import load_diffusers_controlnet
  net = _controlnet(1)
  net.save_pretrained(tmp_path / "controlnet")
  model, params = load_diffusers_controlnet(tmp_path / "controlnet")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  text = rng.standard_normal((2, 5, 32)).astype(np.float32)
  cond = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  t = np.array([10, 500])
  with torch.no_grad():
    down, mid = net(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(text), torch.from_numpy(cond.transpose(0, 3, 1, 2)),
                        conditioning_scale=0.7, return_dict=False)
  ours_down, ours_mid = model.apply({"params": params}, x, t, text, cond, 0.7)
  assert len(ours_down) == len(down)
  for a, b in zip(ours_down + [ours_mid], list(down) + [mid]):
    assert _rel_err(a, b) <= 1e-4


@pytest.mark.slow  # ~1 min on 2 cores: two sampling programs and two diffusers pipelines
def test_controlnet_pipeline_matches_diffusers(tmp_path):
  """from_diffusers with one or two ControlNets draws what StableDiffusionControlNetPipeline
  draws from the same latents and control images."""
  import jaxt2i
  from PIL import Image
  folder, sd = sd_folder(tmp_path)
  nets = [_controlnet(1), _controlnet(2)]
  for k, net in enumerate(nets):
    net.save_pretrained(tmp_path / f"controlnet_{k}")
  rng = np.random.default_rng(0)
  controls = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
              for _ in nets]
  latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  for count in (1, 2):
    reference = diffusers.StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=sd.scheduler, controlnet=nets[0] if count == 1 else nets,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    images = controls[0] if count == 1 else controls
    scale = 0.8 if count == 1 else [0.8, 0.5]
    with torch.no_grad():
      theirs = reference(["a red circle"], image=images, num_inference_steps=3,
                         guidance_scale=7.5, controlnet_conditioning_scale=scale,
                         latents=torch.from_numpy(latents), output_type="np").images
    pipe = jaxt2i.from_diffusers(
        folder, controlnet=[tmp_path / f"controlnet_{k}" for k in range(count)],
        compilation_cache=False)
    ours = pipe(["a red circle"], control_image=images, controlnet_conditioning_scale=scale,
                steps=3, guidance_scale=7.5, latents=latents.transpose(0, 2, 3, 1), output="np")
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)
  with pytest.raises(ValueError, match="one control image .* per ControlNet"):
    pipe(["a red circle"], control_image=controls[0], steps=2)
