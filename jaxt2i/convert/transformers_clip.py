"""transformers' CLIPTextModel(WithProjection) checkpoints -> jaxt2i's CLIPTextTransformer.

A Stable Diffusion folder's `text_encoder/` (config.json + model.safetensors or
pytorch_model.bin) holds one; so does any local `CLIPTextModel.save_pretrained` output.
SDXL's `text_encoder_2/` is a CLIPTextModelWithProjection: with_projection=True keeps its
text_projection (CLIPTextTransformer.projection_dim). The
attention projections become the (embed, heads, kv) / (heads, kv, embed) kernels of
jaxt2i.models.attention.Attention; everything else is a transpose or a copy.

  model, params = load_clip_text_encoder("sd-folder/text_encoder")
  out = model.apply({"params": params}, input_ids)   # out["last_hidden_state"], out["pooled"]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.state_dict import layout_of, params_from_layout, read_model_config, \
    read_state_dict, weights_file
from jaxt2i.models.text_encoder import ACTIVATIONS, CLIPTextTransformer

_CONFIG_FIELDS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps",
                  "eos_token_id")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers a CLIPTextModel(WithProjection) checkpoint may hold beside the weights.
_IGNORED = ("embeddings.position_ids",)
_PROJECTION = "text_projection.weight"  # read only into a model with projection_dim
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_MODULE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out_0": "out_proj",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def clip_text_config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
  """CLIPTextTransformer fields from a transformers CLIPTextConfig dict (config.json)."""
  if config.get("model_type") == "clip" and "text_config" in config:
    config = config["text_config"]  # a full CLIPModel config
  fields = {k: config[k] for k in _CONFIG_FIELDS if k in config}
  if fields.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
    raise ValueError(f"CLIP text config: hidden_act {fields['hidden_act']!r} is not supported "
                     f"(supported: {sorted(ACTIVATIONS)})")
  return fields


def _torch_key(path: tuple[str, ...]) -> str:
  if path[0] == "text_projection":
    return _PROJECTION
  if path[0] == "token_embedding":
    return "embeddings.token_embedding.weight"
  if path[0] == "position_embedding":
    return "embeddings.position_embedding.weight"
  if path[0] == "final_layer_norm":
    return f"final_layer_norm.{_LEAF[path[-1]]}"
  layer = path[0].split("_")[-1]  # layers_{i}
  module = _MODULE.get(path[-2], path[-2])
  prefix = "self_attn." if path[1] == "self_attn" else ""
  return f"encoder.layers.{layer}.{prefix}{module}.{_LEAF[path[-1]]}"


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":
    if path[-2] == "to_out_0":  # (heads, kv, embed) <- [embed, heads * kv]
      return (shape[2], shape[0] * shape[1])
    if len(shape) == 3:  # to_q / to_k / to_v (embed, heads, kv) <- [heads * kv, embed]
      return (shape[1] * shape[2], shape[0])
    return (shape[1], shape[0])
  if path[-1] == "bias":  # the q / k / v biases are (heads, kv)
    return (int(np.prod(shape)),)
  return shape  # embeddings, LayerNorm scales


def expected_layout(model: CLIPTextTransformer) -> dict[str, tuple[tuple[str, ...],
                                                                   tuple[int, ...],
                                                                   tuple[int, ...]]]:
  """torch key -> (param path, Flax shape, torch shape) for every param of `model`."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 2), jnp.int32))
  return layout_of(shapes["params"], _torch_key, _torch_shape)


def clip_text_params_from_transformers(state_dict: Mapping[str, Any],
                                       model: CLIPTextTransformer) -> dict[str, Any]:
  """Converts a transformers CLIPTextModel state_dict (keys with or without the
  "text_model." prefix) into `model`'s params.

  Raises:
    ValueError: keys are missing, unexpected or wrongly shaped; the message lists them.
  """
  # transformers 4 saved the tower under "text_model."; transformers 5 saves it bare.
  state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
  ignored = _IGNORED if model.projection_dim else _IGNORED + (_PROJECTION,)
  state_dict = {k: v for k, v in state_dict.items() if k not in ignored}
  return params_from_layout(state_dict, expected_layout(model),
                            "state_dict does not match the CLIP text encoder")


def load_clip_text_encoder(path: str | os.PathLike, *, with_projection: bool = False,
                           subfolder: str = "text_encoder", **overrides: Any
                           ) -> tuple[CLIPTextTransformer, dict[str, Any]]:
  """Loads a local transformers CLIPTextModel: a folder with config.json and model.safetensors
  (or pytorch_model.bin), or a Stable Diffusion folder holding one in `subfolder`.

  Args:
    path: the folder.
    with_projection: a CLIPTextModelWithProjection (SDXL's text_encoder_2): keep its
      text_projection (projection_dim from the config), whose output is "text_embeds".
      Otherwise the projection, if the checkpoint has one, is not read.
    subfolder: the part of a pipeline folder to read ("text_encoder_2" for SDXL's second).
    **overrides: CLIPTextTransformer fields beyond the config, e.g. dtype=jnp.bfloat16.

  Returns:
    (model, params), for `model.apply({"params": params}, input_ids)`.
  """
  path, config = read_model_config(path, subfolder, "CLIP text encoder")
  fields = clip_text_config_from_transformers(config)
  if with_projection:
    fields["projection_dim"] = int(config.get("projection_dim", 512))  # transformers' default
  model = CLIPTextTransformer(**{**fields, **overrides})
  state_dict = read_state_dict(weights_file(path, _WEIGHT_FILES, "CLIP text encoder"),
                               "CLIP text encoder weights")
  return model, clip_text_params_from_transformers(state_dict, model)
