"""diffusers AutoencoderKL checkpoints -> jaxt2i's KL Autoencoder (models/autoencoder.py).

A Stable Diffusion folder's `vae/` (config.json + diffusion_pytorch_model.safetensors or .bin)
holds one. The module layout is the same; convolutions go OIHW -> HWIO, the mid-block
attention's projections become Attention's (embed, heads, kv) kernels, and checkpoints with
the old attention names (query / key / value / proj_attn) are read too.

  model, params, scaling_factor = load_diffusers_vae("sd-folder/vae")
  latents = scaling_factor * model.apply({"params": params}, images,
                                         method=model.encode)["mean"]
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.state_dict import layout_of, params_from_layout, read_model_config, \
    read_state_dict, weights_file
from jaxt2i.models.autoencoder import Autoencoder

_BLOCK_TYPES = {"down_block_types": ("DownEncoderBlock2D",),
                "up_block_types": ("UpDecoderBlock2D",)}
# Settings that must keep their "off" value (diffusers' default) for this layout.
_FIXED = {"act_fn": ("silu", "swish"), "use_quant_conv": (True,),
          "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
          "force_upcast": (True, False), "shift_factor": (None, 0, 0.0),
          "latents_mean": (None,), "latents_std": (None,)}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size",
            "scaling_factor", "_use_default_values", "norm_num_groups", "in_channels",
            "out_channels", "block_out_channels", "layers_per_block", "latent_channels"}
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def vae_config_from_diffusers(config: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
  """(Autoencoder fields, latent scaling factor) from an AutoencoderKL config dict."""
  problems = []
  for key, allowed in _BLOCK_TYPES.items():
    if any(t not in allowed for t in config.get(key, allowed)):
      problems.append(f"{key}={config[key]!r} (supported: {allowed[0]} only)")
  for key, allowed in _FIXED.items():
    if key in config and config[key] not in allowed:
      problems.append(f"{key}={config[key]!r}")
  unknown = set(config) - set(_BLOCK_TYPES) - set(_FIXED) - _IGNORED
  if unknown:
    problems.append(f"unknown settings {sorted(unknown)}")
  if config.get("in_channels", 3) != config.get("out_channels", 3):
    problems.append("in_channels != out_channels")
  if problems:
    raise ValueError("this AutoencoderKL config is outside what jaxt2i's Autoencoder "
                     "expresses: " + "; ".join(problems))
  fields = {"kind": "kl", "latent_channels": config.get("latent_channels", 4),
            "block_out_channels": tuple(config.get("block_out_channels", (64,))),
            "layers_per_block": config.get("layers_per_block", 1),
            "groups": config.get("norm_num_groups", 32),
            "in_channels": config.get("in_channels", 3)}
  return fields, float(config.get("scaling_factor", 0.18215))


def _torch_key(path: tuple[str, ...]) -> str:
  parts = []
  for p in path[:-1]:
    if m := re.fullmatch(r"(down|up)_blocks_(\d+)_resnets_(\d+)", p):
      parts += [f"{m[1]}_blocks", m[2], "resnets", m[3]]
    elif m := re.fullmatch(r"down_blocks_(\d+)_downsample", p):
      parts += ["down_blocks", m[1], "downsamplers", "0", "conv"]
    elif m := re.fullmatch(r"up_blocks_(\d+)_upsample", p):
      parts += ["up_blocks", m[1], "upsamplers", "0"]
    elif m := re.fullmatch(r"(resnets|attentions|to_out)_(\d+)", p):
      parts += [m[1], m[2]]
    elif p != "attn":  # the attention's projections sit directly under attentions.0
      parts.append(p)
  return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":
    if len(shape) == 4:  # conv HWIO -> OIHW
      return (shape[3], shape[2], shape[0], shape[1])
    if path[-2] == "to_out_0":  # (heads, kv, embed) <- [embed, heads * kv]
      return (shape[2], shape[0] * shape[1])
    return (shape[1] * shape[2], shape[0])  # to_q / to_k / to_v (embed, heads, kv)
  return (int(np.prod(shape)),)


def expected_layout(model: Autoencoder) -> dict[str, tuple[tuple[str, ...], tuple[int, ...],
                                                           tuple[int, ...]]]:
  """torch key -> (param path, Flax shape, torch shape) for every param of `model`."""
  side = 2 ** (len(model.block_out_channels) - 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32))
  return layout_of(shapes["params"], _torch_key, _torch_shape)


def _modern_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames the old mid-block attention keys (diffusers < 0.14 checkpoints); 4-D 1x1-conv
  attention weights of the original LDM layout become matrices."""
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION and "attentions" in parts:
      key = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
    value = np.asarray(value, dtype=np.float32)
    if "attentions" in parts and value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    out[key] = value
  return out


def vae_params_from_diffusers(state_dict: Mapping[str, Any],
                              model: Autoencoder) -> dict[str, Any]:
  """Converts a diffusers AutoencoderKL state_dict into `model`'s params.

  Raises:
    ValueError: keys are missing, unexpected or wrongly shaped; the message lists them.
  """
  if model.kind != "kl":
    raise ValueError("AutoencoderKL weights need Autoencoder(kind='kl')")
  return params_from_layout(_modern_keys(state_dict), expected_layout(model),
                            "state_dict does not match the autoencoder")


def load_diffusers_vae(path: str | os.PathLike, **overrides: Any
                       ) -> tuple[Autoencoder, dict[str, Any], float]:
  """Loads a local diffusers AutoencoderKL: a `vae/` folder (or a pipeline folder holding one)
  with config.json and diffusion_pytorch_model.safetensors (or .bin).

  Args:
    path: the folder.
    **overrides: Autoencoder fields beyond the config, e.g. dtype=jnp.bfloat16.

  Returns:
    (model, params, scaling_factor): latents for the U-Net are scaling_factor times the
    posterior's samples (SD 1.x / 2.x: 0.18215).
  """
  path, config = read_model_config(path, "vae", "AutoencoderKL")
  fields, scaling_factor = vae_config_from_diffusers(config)
  model = Autoencoder(**{**fields, **overrides})
  state_dict = read_state_dict(weights_file(path, _WEIGHT_FILES, "AutoencoderKL"),
                               "AutoencoderKL weights")
  return model, vae_params_from_diffusers(state_dict, model), scaling_factor
