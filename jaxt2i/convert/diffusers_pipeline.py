"""A local diffusers Stable Diffusion folder as a jaxt2i latent-diffusion run.

    pipe = jaxt2i.from_diffusers("path/to/stable-diffusion-v1-5")
    images = pipe(["a photo of an astronaut riding a horse"], seed=0, steps=50,
                  guidance_scale=7.5)

The folder is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/; safetensors or .bin weights). Each part is
converted (convert/diffusers_unet, diffusers_vae, transformers_clip), the scheduler config is
mapped onto jaxt2i's schedule and sampler settings, and the result is the same Pipeline that
`jaxt2i.load` returns for a trained run: config.task "latent_diffusion" with
model.text_encoder "clip". An SDXL folder (StableDiffusionXLPipeline's: text_encoder_2/ and
tokenizer_2/ besides) becomes a "stable_diffusion_xl" run instead (tasks/sdxl.py).
Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any


from jaxt2i.convert import diffusers_sdxl
from jaxt2i.diffusion import schedules
from jaxt2i.tasks.sdxl import StableDiffusionXLTask
from jaxt2i.convert.diffusers_controlnet import controlnet_config_from_diffusers, \
    load_diffusers_controlnet
from jaxt2i.convert.diffusers_unet import load_diffusers_unet, unet_config_from_diffusers
from jaxt2i.convert.diffusers_vae import load_diffusers_vae, vae_config_from_diffusers
from jaxt2i.convert.transformers_clip import clip_text_config_from_transformers, \
    load_clip_text_encoder

log = logging.getLogger(__name__)

# diffusers scheduler class -> jaxt2i sampler. PNDM (SD 1.x's default) and the other
# multistep solvers are not implemented; DDIM with the same schedule stands in for them.
_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
             "DPMSolverMultistepScheduler": "dpmpp_2m"}
_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
              "squaredcos_cap_v2": "cosine"}
_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def scheduler_fields(config: dict[str, Any]) -> dict[str, Any]:
  """LatentDiffusionTask model fields from a diffusers scheduler config."""
  kind = config.get("beta_schedule", "linear")
  if kind not in _SCHEDULES:
    raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported (supported: "
                     f"{sorted(_SCHEDULES)})")
  num_train_timesteps = int(config.get("num_train_timesteps", 1000))
  beta_start, beta_end = (float(config.get("beta_start", 0.0001)),
                          float(config.get("beta_end", 0.02)))
  snr_shift = 1.0
  if config.get("trained_betas") is not None:  # as jaxt2i exports a shifted schedule
    try:
      snr_shift = schedules.infer_snr_shift(config["trained_betas"], _SCHEDULES[kind],
                                            num_train_timesteps, beta_start, beta_end)
    except ValueError as e:
      raise ValueError(f"scheduler config: trained_betas: {e}") from None
  name = config.get("_class_name", "DDIMScheduler")
  sampler = _SAMPLERS.get(name)
  if sampler is None:
    log.warning("scheduler %s is not implemented in jaxt2i; sampling with DDIM on the same "
                "noise schedule (pass sampler='dpmpp_2m' or 'ddpm' to choose another)", name)
    sampler = "ddim"
  return {"schedule": _SCHEDULES[kind], "num_train_timesteps": num_train_timesteps,
          "beta_start": beta_start, "beta_end": beta_end, "snr_shift": snr_shift,
          "prediction_type": config.get("prediction_type", "epsilon"),
          "rescale_zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
          "sampler": sampler,
          "timestep_spacing": config.get("timestep_spacing", "") or "",
          "steps_offset": int(config.get("steps_offset", 0)),
          "set_alpha_to_one": bool(config.get("set_alpha_to_one", True))}


def _check_folder(path: str) -> None:
  if diffusers_sdxl.is_sdxl_folder(path):
    diffusers_sdxl.check_sdxl_folder(path)  # names the refiner before its missing parts
  missing = [p for p in _PARTS if not os.path.isdir(os.path.join(path, p))]
  if missing:
    raise FileNotFoundError(f"{path} is not a diffusers Stable Diffusion folder: missing "
                            f"{', '.join(p + '/' for p in missing)}")


def _controlnet_folders(controlnet: Any) -> list[str]:
  if controlnet is None:
    return []
  if isinstance(controlnet, (str, os.PathLike)):
    return [os.fspath(controlnet)]
  return [os.fspath(c) for c in controlnet]


def config_from_diffusers(path: str | os.PathLike, *, dtype: str = "float32",
                          attention_implementation: str = "auto",
                          guidance_scale: float | None = None, num_sampling_steps: int = 50,
                          controlnet: Any = None) -> Any:
  """The jaxt2i run config (task "latent_diffusion", model.text_encoder "clip"; SDXL:
  "stable_diffusion_xl") describing the Stable Diffusion folder at `path`; model.pretrained
  points at it, so a trainer started from this config begins from the folder's weights
  (configs/sd_finetune.py; not for SDXL)."""
  from jaxt2i.data.tokenizer import CLIPTokenizer
  from jaxt2i.tasks.ldm import LatentDiffusionTask
  from jaxt2i.training import config as config_lib

  path = os.fspath(path)
  _check_folder(path)
  xl = diffusers_sdxl.is_sdxl_folder(path)
  if xl and controlnet is not None:
    raise ValueError("ControlNets are not implemented for SDXL folders")
  unet_config = _read_json(os.path.join(path, "unet", "config.json"))
  vae_config = _read_json(os.path.join(path, "vae", "config.json"))
  vae_fields, scaling_factor = vae_config_from_diffusers(vae_config)
  clip_fields = clip_text_config_from_transformers(
      _read_json(os.path.join(path, "text_encoder", "config.json")))
  scheduler_file = os.path.join(path, "scheduler", "scheduler_config.json")
  scheduler = _read_json(scheduler_file) if os.path.isfile(scheduler_file) else {}
  tokenizer = CLIPTokenizer.load(os.path.join(path, "tokenizer"))
  max_length = clip_fields.get("max_position_embeddings", 77)

  config = config_lib.trainer_defaults()
  task_class = StableDiffusionXLTask if xl else LatentDiffusionTask
  model = task_class.default_model_config()
  model.update({
      "pretrained": path, "autoencoder_workdir": "",
      "autoencoder": {"kind": "kl", "latent_channels": vae_fields["latent_channels"],
                      "block_out_channels": vae_fields["block_out_channels"],
                      "layers_per_block": vae_fields["layers_per_block"],
                      "norm_groups": vae_fields["groups"], "mid_attention": True,
                      "in_channels": vae_fields["in_channels"]},
      "latent_scale": scaling_factor,
      "text_encoder": "clip", "clip_text": clip_fields, "text_trainable": False,
      "unconditional_tokens": tuple(int(i) for i in tokenizer.encode([""], max_length)[0][0]),
      "unet": unet_config_from_diffusers(unet_config),
      "attention_implementation": attention_implementation,
      # diffusers' defaults: 7.5 (StableDiffusionPipeline), 5.0 (StableDiffusionXLPipeline).
      "guidance_scale": float(guidance_scale if guidance_scale is not None else
                              5.0 if xl else 7.5),
      "num_sampling_steps": int(num_sampling_steps),
      **scheduler_fields(scheduler)})
  if xl:
    model.update(_sdxl_fields(path, model.unconditional_tokens, max_length))
  for k, folder in enumerate(_controlnet_folders(controlnet)):
    fields = controlnet_config_from_diffusers(_read_json(os.path.join(folder, "config.json")))
    model.controlnets[f"controlnet_{k}"] = fields
  config.task = task_class.name
  config.model = model
  factor = 2 ** (len(vae_fields["block_out_channels"]) - 1)
  config.data.image_size = int(unet_config.get("sample_size") or 64) * factor
  config.data.tokenizer = os.path.join(path, "tokenizer")
  config.data.max_caption_length = max_length
  config.data.vocab_size = tokenizer.vocab_size
  config.data.value_range = (-1.0, 1.0)
  config.train.compute_dtype = dtype
  return config


def _sdxl_fields(path: str, unconditional_tokens: tuple[int, ...], max_length: int
                 ) -> dict[str, Any]:
  """The StableDiffusionXLTask model fields beyond SD's: the second text encoder and
  tokenizer, both tokenizers' empty-prompt rows side by side, force_zeros_for_empty_prompt."""
  from jaxt2i.data.tokenizer import CLIPTokenizer
  index = diffusers_sdxl.check_sdxl_folder(path)
  config_2 = _read_json(os.path.join(path, "text_encoder_2", "config.json"))
  clip_fields_2 = clip_text_config_from_transformers(config_2)
  clip_fields_2["projection_dim"] = int(config_2.get("projection_dim", 512))
  if clip_fields_2.get("max_position_embeddings", 77) != max_length:
    raise ValueError(f"{path}: text_encoder_2 takes {clip_fields_2.get('max_position_embeddings')}"
                     f" tokens, text_encoder {max_length}; SDXL concatenates their states, so "
                     "they must agree")
  tokenizer_2 = CLIPTokenizer.load(os.path.join(path, "tokenizer_2"))
  empty_2 = tuple(int(i) for i in tokenizer_2.encode([""], max_length)[0][0])
  return {"clip_text_2": clip_fields_2, "tokenizer_2": os.path.join(path, "tokenizer_2"),
          "unconditional_tokens": tuple(unconditional_tokens) + empty_2,
          "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}


def params_from_diffusers(path: str | os.PathLike, controlnet: Any = None) -> dict[str, Any]:
  """{"unet", "text_encoder", "autoencoder", "controlnet_<k>"...} params (float32 numpy) of
  the folder at `path` and of the ControlNet folder(s); SDXL folders add "text_encoder_2"."""
  path = os.fspath(path)
  _check_folder(path)
  _, unet_params = load_diffusers_unet(os.path.join(path, "unet"))
  _, vae_params, _ = load_diffusers_vae(os.path.join(path, "vae"))
  _, text_params = load_clip_text_encoder(os.path.join(path, "text_encoder"))
  params = {"unet": unet_params, "text_encoder": text_params, "autoencoder": vae_params}
  if diffusers_sdxl.is_sdxl_folder(path):
    diffusers_sdxl.check_sdxl_folder(path)
    params["text_encoder_2"] = load_clip_text_encoder(os.path.join(path, "text_encoder_2"),
                                                      with_projection=True)[1]
  for k, folder in enumerate(_controlnet_folders(controlnet)):
    params[f"controlnet_{k}"] = load_diffusers_controlnet(folder)[1]
  return params


def from_diffusers(path: str | os.PathLike, *, dtype: str = "float32",
                   attention_implementation: str = "auto", guidance_scale: float | None = None,
                   num_sampling_steps: int = 50, controlnet: Any = None,
                   **pipeline_kwargs: Any):
  """The Stable Diffusion (1.x, 2.x or XL base) folder at `path` as a jaxt2i Pipeline (see
  the module docstring).

  Args:
    path: the local folder.
    dtype: compute dtype, "float32" or "bfloat16"; with "bfloat16" the weights are stored in
      bfloat16 too unless pipeline_kwargs say weights_dtype="float32".
    attention_implementation: "auto", "einsum", "xla" or "cudnn".
    guidance_scale, num_sampling_steps: the pipeline's defaults (diffusers': guidance 7.5, or
      5.0 for SDXL; 50 steps).
    controlnet: a diffusers ControlNetModel folder, or a list of them (summed); the pipeline
      then takes `control_image=` (and `controlnet_conditioning_scale=`).
    **pipeline_kwargs: for jaxt2i.pipelines.Pipeline (devices, compilation_cache).
  """
  from jaxt2i.pipelines import Pipeline
  from jaxt2i.tasks.base import get_task

  config = config_from_diffusers(path, dtype=dtype,
                                 attention_implementation=attention_implementation,
                                 guidance_scale=guidance_scale,
                                 num_sampling_steps=num_sampling_steps, controlnet=controlnet)
  task = get_task(config)
  params = params_from_diffusers(path, controlnet)
  log.info("loaded %s: %d-px images, %s sampler", path, config.data.image_size,
           config.model.sampler)
  if dtype == "bfloat16":
    pipeline_kwargs.setdefault("weights_dtype", "bfloat16")
  return Pipeline(None, run=(config, task, params), **pipeline_kwargs)
