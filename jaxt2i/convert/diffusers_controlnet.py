"""diffusers ControlNetModel checkpoints -> jaxt2i's ControlNet (models/controlnet.py).

  controlnet, params = load_diffusers_controlnet("sd-controlnet-canny")
  pipe = jaxt2i.from_diffusers("stable-diffusion-v1-5", controlnet="sd-controlnet-canny")

The module names are diffusers' (conv_in, time_embedding, controlnet_cond_embedding,
down_blocks, mid_block, controlnet_down_blocks, controlnet_mid_block); the key mapping and
shape rules are the U-Net converter's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxt2i.convert.diffusers_unet import _torch_key, _torch_shape, unet_config_from_diffusers
from jaxt2i.convert.state_dict import layout_of, params_from_layout, read_model_config, \
    read_state_dict, weights_file
from jaxt2i.models.controlnet import ControlNet

_CONTROL_KEYS = {"conditioning_channels": 3,
                 "conditioning_embedding_out_channels": (16, 32, 96, 256)}
_FIXED = {"controlnet_conditioning_channel_order": ("rgb",), "global_pool_conditions": (False,)}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def controlnet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
  """ControlNet fields for a diffusers ControlNetModel config (config.json as a dict)."""
  config = dict(config)
  if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
    raise ValueError(f"_class_name={config['_class_name']!r}: expected 'ControlNetModel'")
  problems = [f"{k}={config[k]!r}" for k, allowed in _FIXED.items()
              if k in config and config[k] not in allowed]
  if config.get("addition_embed_type"):  # SDXL ControlNets: not wired into ControlNet yet
    problems.append(f"addition_embed_type={config['addition_embed_type']!r}")
  if problems:
    raise ValueError("this ControlNetModel config is outside what jaxt2i's ControlNet "
                     "expresses: " + "; ".join(problems))
  control = {k: config.pop(k, default) for k, default in _CONTROL_KEYS.items()}
  control["conditioning_embedding_out_channels"] = tuple(
      control["conditioning_embedding_out_channels"])
  for key in _FIXED:
    config.pop(key, None)
  config["_class_name"] = "UNet2DConditionModel"
  down = config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
  config["up_block_types"] = tuple("CrossAttnUpBlock2D" if kind == "CrossAttnDownBlock2D"
                                   else "UpBlock2D" for kind in reversed(down))
  return {**unet_config_from_diffusers(config), **control}


def expected_layout(model: ControlNet) -> dict[str, tuple[tuple[str, ...], tuple[int, ...],
                                                          tuple[int, ...]]]:
  """torch key -> (param path, Flax shape, torch shape) for every param of `model`."""
  n = len(model.block_out_channels)
  side = 2 ** (n - 1)
  factor = 2 ** (len(model.conditioning_embedding_out_channels) - 1)
  shapes = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32),
      jax.ShapeDtypeStruct((1, 1, model.cross_attention_dim), jnp.float32),
      jax.ShapeDtypeStruct((1, factor * side, factor * side, model.conditioning_channels),
                           jnp.float32))
  return layout_of(shapes["params"], _torch_key, _torch_shape)


def controlnet_params_from_diffusers(state_dict: Mapping[str, Any],
                                     model: ControlNet) -> dict[str, Any]:
  """Converts a diffusers ControlNetModel state_dict into `model`'s params.

  Raises:
    ValueError: keys are missing, unexpected or wrongly shaped; the message lists them.
  """
  return params_from_layout(state_dict, expected_layout(model),
                            "state_dict does not match the ControlNet")


def load_diffusers_controlnet(path: str | os.PathLike, **overrides: Any
                              ) -> tuple[ControlNet, dict[str, Any]]:
  """Loads a local diffusers ControlNetModel folder (config.json +
  diffusion_pytorch_model.safetensors or .bin); **overrides set ControlNet fields (dtype=...).
  """
  path, config = read_model_config(path, "controlnet", "ControlNetModel")
  fields = controlnet_config_from_diffusers(config)
  model = ControlNet(**{**fields, **overrides})
  state_dict = read_state_dict(weights_file(path, _WEIGHT_FILES, "ControlNetModel"),
                               "ControlNetModel weights")
  return model, controlnet_params_from_diffusers(state_dict, model)
