"""diffusers `UNet2DConditionModel` checkpoints (Stable Diffusion 1.x / 2.x / XL) -> jaxt2i UNet.

jaxt2i.models.unet.UNet keeps diffusers' submodule names with list indices as suffixes, so a
state_dict key maps to a param path by name alone:

  down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight
  -> down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel

and only the array layouts change: conv OIHW -> HWIO, linear (out, in) -> (in, out), the
attention kernels split their heads out ((H*D, in) -> (in, H, D); to_out (out, H*D) ->
(H, D, out)), norm `weight` -> `scale`. The expected keys and shapes come from the Flax module
itself (jax.eval_shape, nothing computed), so the converter cannot drift from the model.

Everything reads local files; nothing is downloaded.
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
    read_state_dict
from jaxt2i.models.unet import UNet

# diffusers config keys that become UNet fields (same names), with diffusers' defaults for
# configs that omit them (old config.json files do).
_FIELD_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": 8, "num_attention_heads": None, "cross_attention_dim": 1280,
    "use_linear_projection": False, "transformer_layers_per_block": 1,
    "upcast_attention": False, "norm_num_groups": 32, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "dropout": 0.0,
    # SDXL's added text / size embedding (None, or "text_time" with both widths set).
    "addition_embed_type": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
# Options of UNet2DConditionModel outside the SD 1.x / 2.x / XL family: each must keep a value
# that means "off" (diffusers' default, or an equivalent spelling).
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,), "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "act_fn": ("silu", "swish"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "attention_type": ("default",), "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
}
# Metadata, or settings that only matter for options fixed above.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size",
            "addition_embed_type_num_heads", "_use_default_values"}

# Module lists of diffusers (nn.ModuleList / Sequential), whose `name.<i>` is `name_<i>` here.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
          "downsamplers", "upsamplers", "net", "to_out",
          "controlnet_down_blocks", "blocks")  # ControlNetModel's (convert/diffusers_controlnet)
_LIST_NAME = re.compile(rf"^({'|'.join(_LISTS)})_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _as_tuple(value: Any) -> Any:
  return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
  """UNet fields for a diffusers UNet2DConditionModel config (its config.json as a dict).

  Raises:
    ValueError: the config uses an option outside the SD 1.x / 2.x / XL family (class
      conditioning, other added embeddings, other block types, ...) or a key this converter does
      not know; the message names every offending key.
  """
  problems = []
  class_name = config.get("_class_name", "UNet2DConditionModel")
  if class_name != "UNet2DConditionModel":
    problems.append(f"_class_name={class_name!r} (expected 'UNet2DConditionModel')")
  for key, allowed in _FIXED.items():
    value = _as_tuple(config.get(key, allowed[0]))
    if isinstance(value, tuple) and key == "only_cross_attention":
      value = any(value)
    if value not in allowed:
      problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, allowed))})")
  unknown = sorted(set(config) - set(_FIELD_DEFAULTS) - set(_FIXED) - _IGNORED)
  if unknown:
    problems.append(f"unknown keys {unknown}")
  fields = {key: _as_tuple(config.get(key, default)) for key, default in _FIELD_DEFAULTS.items()}
  cross = fields["cross_attention_dim"]
  if isinstance(cross, tuple):  # per-block widths: fine when they agree
    if len(set(cross)) != 1:
      problems.append(f"cross_attention_dim={cross} (one width for all blocks is supported)")
    fields["cross_attention_dim"] = cross[0]
  layers = fields["transformer_layers_per_block"]
  if isinstance(layers, tuple) and any(isinstance(v, tuple) for v in layers):
    problems.append(f"transformer_layers_per_block={layers} (per-layer counts are not supported)")
  if fields["addition_embed_type"] not in (None, "text_time"):
    problems.append(f"addition_embed_type={fields['addition_embed_type']!r} (supported: None or "
                    "'text_time', SDXL's)")
  elif fields["addition_embed_type"] and not (fields["addition_time_embed_dim"] and
                                              fields["projection_class_embeddings_input_dim"]):
    problems.append("addition_embed_type='text_time' without addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim")
  if fields["norm_num_groups"] is None:
    problems.append("norm_num_groups=None (GroupNorm is required)")
  if problems:
    raise ValueError("diffusers UNet config is outside what jaxt2i's UNet expresses: "
                     + "; ".join(problems))
  return fields


def _torch_key(path: tuple[str, ...]) -> str:
  parts = [".".join(m.groups()) if (m := _LIST_NAME.match(p)) else p for p in path[:-1]]
  return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] != "kernel":
    return (int(np.prod(shape)),)
  if len(shape) == 4:  # conv HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  num_in = 2 if path[-2] == "to_out_0" else 1  # attention out: (heads, kv, embed)
  return (int(np.prod(shape[num_in:])), int(np.prod(shape[:num_in])))


def expected_layout(model: UNet) -> dict[str, tuple[tuple[str, ...], tuple[int, ...],
                                                    tuple[int, ...]]]:
  """torch key -> (param path, Flax shape, torch shape) for every param of `model`."""
  n = len(model.block_out_channels)
  side = 2 ** (n - 1)
  added = {}
  if model.addition_embed_type == "text_time":
    # add_embedding's kernel only sees the total width: split it as SDXL base does (6 ids).
    width = model.projection_class_embeddings_input_dim - 6 * model.addition_time_embed_dim
    added = {"text_embeds": jax.ShapeDtypeStruct((1, width), jnp.float32),
             "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}
  shapes = jax.eval_shape(
      lambda rng, sample, t, context, added: model.init(rng, sample, t, context, **added),
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32),
      jax.ShapeDtypeStruct((1, 1, model.cross_attention_dim), jnp.float32), added)
  return layout_of(shapes["params"], _torch_key, _torch_shape)


def unet_params_from_diffusers(state_dict: Mapping[str, Any], model: UNet) -> dict[str, Any]:
  """Converts a diffusers UNet2DConditionModel state_dict into `model`'s params.

  Args:
    state_dict: diffusers key -> array (numpy, or anything np.asarray takes: a CPU torch
      tensor, a safetensors array).
    model: the UNet the weights are for (`UNet(**unet_config_from_diffusers(config))`); it
      fixes the expected keys, the shapes and the head count the attention kernels split by.

  Returns:
    The params tree (float32 numpy arrays), for `model.apply({"params": params}, ...)`.

  Raises:
    ValueError: keys are missing, unexpected or wrongly shaped; the message lists them.
  """
  return params_from_layout(state_dict, expected_layout(model),
                            "state_dict does not match the UNet")


_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_diffusers_unet(path: str | os.PathLike, **overrides: Any) -> tuple[UNet, dict[str, Any]]:
  """Loads a local diffusers UNet: a `unet/` folder (or a pipeline folder holding one) with
  config.json and diffusion_pytorch_model.safetensors (or .bin).

  Args:
    path: the folder.
    **overrides: UNet fields to set beyond the config, e.g. dtype=jnp.bfloat16 or
      attention_implementation="einsum".

  Returns:
    (model, params), for `model.apply({"params": params}, sample, timesteps, text_states)`.
  """
  path, config = read_model_config(path, "unet", "diffusers UNet")
  model = UNet(**{**unet_config_from_diffusers(config), **overrides})
  for name in _WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      state = read_state_dict(os.path.join(path, name), "diffusers UNet weights")
      return model, unet_params_from_diffusers(state, model)
  raise FileNotFoundError(f"no weights in {path}: expected one of {list(_WEIGHT_FILES)} "
                          f"(found {sorted(os.listdir(path))}; sharded or variant files are "
                          "not read)")
