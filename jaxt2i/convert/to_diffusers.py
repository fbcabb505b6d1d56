"""A jaxt2i latent-diffusion run -> a diffusers Stable Diffusion folder.

    jaxt2i convert to-diffusers WORKDIR OUT        # or Pipeline.save_diffusers(OUT)

writes what `StableDiffusionPipeline.from_pretrained(OUT)` (and `jaxt2i.from_diffusers`)
reads: model_index.json, unet/, vae/, scheduler/ and, for runs with a CLIP text encoder
(loaded from diffusers, possibly fine-tuned), text_encoder/ and tokenizer/. Weights are
float32 safetensors, the exact inverse of the loaders: from_diffusers(OUT) gives back the
same params bit for bit. A run with jaxt2i's own sentencepiece text encoder has no
transformers equivalent: its unet/, vae/ and scheduler/ are written (each loads on its own
with diffusers' from_pretrained) and the pipeline files are left out, with a warning.
Only KL autoencoders convert (diffusers' AutoencoderKL); PyTorch is not needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np

from jaxt2i.convert import diffusers_unet, diffusers_vae, transformers_clip
from jaxt2i.diffusion import schedules
from jaxt2i.convert.diffusers_unet import _FIELD_DEFAULTS as UNET_FIELDS
from jaxt2i.convert.state_dict import to_state_dict

log = logging.getLogger(__name__)

_SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
               "dpmpp_2m": "DPMSolverMultistepScheduler"}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "cosine": "squaredcos_cap_v2", "squaredcos_cap_v2": "squaredcos_cap_v2"}


def _jsonable(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _write_json(path: str, data: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump({k: _jsonable(v) for k, v in data.items()}, f, indent=2, sort_keys=True)


def _save(folder: str, filename: str, state: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  save_file(state, os.path.join(folder, filename), metadata={"format": "pt"})


def lora_layouts(task: Any) -> dict[str, Any]:
  """The converter layouts LoRA files resolve against: the U-Net's, and the CLIP text
  encoder's when the run has one."""
  layouts = {"unet": diffusers_unet.expected_layout(task.unet)}
  if task.config.model.text_encoder == "clip":
    layouts["text_encoder"] = transformers_clip.expected_layout(task.text_encoder)
  return layouts


def save_lora(task: Any, params: Any, out: str | os.PathLike) -> str:
  """Writes a LoRA run's adapters as diffusers LoRA weights (OUT/pytorch_lora_weights
  .safetensors, for `pipe.load_lora_weights(OUT)`); returns the file."""
  from jaxt2i.convert import lora as lora_files
  if "lora" not in params:
    raise ValueError("this run has no LoRA adapters (config.model.lora_rank is 0)")
  adapters = jax.tree.map(np.asarray, jax.device_get(params["lora"]))
  return lora_files.save_lora(adapters, lora_layouts(task), out, task.lora_scale)


def save_diffusers(config: Any, task: Any, params: Any, out: str | os.PathLike) -> list[str]:
  """Writes the run (config, task, params) as a diffusers folder at `out`; returns the parts
  written. Raises ValueError for runs that are not KL latent diffusion."""
  if config.task != "latent_diffusion":
    raise ValueError(f"only latent-diffusion runs convert to diffusers, not {config.task!r}")
  params = task.with_lora(params)  # a LoRA run exports its base with the adapters merged
  m = config.model
  ae = task.autoencoder
  if ae.kind != "kl" or not ae.mid_attention:
    raise ValueError("diffusers' AutoencoderKL needs a KL autoencoder with mid-block "
                     f"attention; this run's is kind={ae.kind!r}, "
                     f"mid_attention={ae.mid_attention}")
  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  parts = ["unet", "vae", "scheduler"]

  unet = task.unet
  if unet.position_channels:
    raise ValueError("this run's U-Net has position_channels (coordinates appended to "
                     "conv_in's input), which diffusers' UNet2DConditionModel cannot express")
  latent_size = task.latent_shape()[0]
  unet_config = {key: getattr(unet, key) for key in UNET_FIELDS}

  def _write_json_dir(part: str, name: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.join(out, part), exist_ok=True)
    _write_json(os.path.join(out, part, name), data)

  _write_json_dir("unet", "config.json", {"_class_name": "UNet2DConditionModel",
                                          "sample_size": latent_size, **unet_config})
  _save(os.path.join(out, "unet"), "diffusion_pytorch_model.safetensors",
        to_state_dict(params["unet"], diffusers_unet.expected_layout(unet)))

  levels = len(ae.block_out_channels)
  _write_json_dir("vae", "config.json", {
      "_class_name": "AutoencoderKL", "in_channels": ae.in_channels,
      "out_channels": ae.in_channels, "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "block_out_channels": list(ae.block_out_channels), "layers_per_block": ae.layers_per_block,
      "latent_channels": ae.latent_channels, "norm_num_groups": ae.groups, "act_fn": "silu",
      "sample_size": config.data.image_size, "scaling_factor": float(m.latent_scale)})
  _save(os.path.join(out, "vae"), "diffusion_pytorch_model.safetensors",
        to_state_dict(params["autoencoder"], diffusers_vae.expected_layout(ae)))

  scheduler = _SCHEDULERS[m.sampler]
  scheduler_config = {
      "_class_name": scheduler, "num_train_timesteps": m.num_train_timesteps,
      "beta_start": m.beta_start, "beta_end": m.beta_end,
      "beta_schedule": _BETA_SCHEDULES[m.schedule], "prediction_type": m.prediction_type,
      "rescale_betas_zero_snr": m.rescale_zero_terminal_snr, "clip_sample": False,
      "steps_offset": m.steps_offset, "trained_betas": None}
  if m.snr_shift != 1.0:
    # diffusers has no SNR shift: the shifted betas, which it rescales (rescale_betas_zero_snr)
    # after, as make_schedule does.
    scheduler_config["trained_betas"] = np.asarray(schedules.make_schedule(
        m.schedule, m.num_train_timesteps, m.beta_start, m.beta_end,
        snr_shift=m.snr_shift).betas).tolist()
  if m.timestep_spacing:
    scheduler_config["timestep_spacing"] = m.timestep_spacing
  if scheduler == "DDIMScheduler":
    scheduler_config["set_alpha_to_one"] = m.set_alpha_to_one
  _write_json_dir("scheduler", "scheduler_config.json", scheduler_config)

  if m.text_encoder != "clip":
    log.warning("this run's text encoder is jaxt2i's own (sentencepiece), which diffusers' "
                "pipelines cannot load: wrote unet/, vae/ and scheduler/ only")
    return parts
  text = task.text_encoder
  state = to_state_dict(params["text_encoder"], transformers_clip.expected_layout(text))
  _save(os.path.join(out, "text_encoder"), "model.safetensors",
        {f"text_model.{k}": v for k, v in state.items()})
  _write_json_dir("text_encoder", "config.json", {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      **{k: getattr(text, k) for k in transformers_clip._CONFIG_FIELDS}})
  source = config.data.tokenizer
  if not source or not os.path.isdir(source):
    raise ValueError(f"the run's CLIP tokenizer folder (config.data.tokenizer={source!r}) "
                     "is missing")
  shutil.copytree(source, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
  _write_json(os.path.join(out, "model_index.json"), {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler],
      "safety_checker": [None, None], "feature_extractor": [None, None],
      "image_encoder": [None, None], "requires_safety_checker": False})
  return parts + ["text_encoder", "tokenizer", "model_index.json"]
