"""LoRA weight files for Stable Diffusion <-> jaxt2i adapters (jaxt2i.models.lora).

Reads the three layouts in circulation, from .safetensors (or a torch file):
  - diffusers / PEFT:  unet.<module>.lora_A.weight [r, in], unet.<module>.lora_B.weight
    [out, r]; text_encoder.text_model.<module>...; alpha from the file's
    `lora_adapter_metadata` (r and lora_alpha per component) when present;
  - diffusers' older attention-processor keys: unet.<block>.processor.to_q_lora.down.weight
    / .up.weight, text_encoder.<module>.lora_linear_layer.down.weight / .up.weight;
  - kohya-ss (sd-scripts, A1111): lora_unet_<module with _ for .>.lora_down.weight /
    .lora_up.weight / .alpha, lora_te_text_model_<...>; convolution adapters (LoCon) too.
Each adapter's alpha / r is folded into its `up` matrix, so merging at scale 1 applies the
file as written. Writes the diffusers / PEFT layout (what `pipe.load_lora_weights(folder)`
reads).

Module names resolve against the converted models' own layouts (convert/diffusers_unet,
convert/transformers_clip), so a kohya name such as
`lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k` finds its module
without guessing where its underscores were dots.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxt2i.convert.state_dict import Layout, abbreviate, read_state_dict, set_path

PyTree = Any
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# File component prefix -> jaxt2i params subtree.
_COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder"}
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# Key suffixes of each part, longest first where one ends another.
_SUFFIXES = (("down", (".lora_A.weight", ".lora_down.weight", ".lora_linear_layer.down.weight",
                       ".lora_layer.down.weight", ".down.weight")),
             ("up", (".lora_B.weight", ".lora_up.weight", ".lora_linear_layer.up.weight",
                     ".lora_layer.up.weight", ".up.weight")),
             ("alpha", (".alpha",)))
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def _modules(layout: Layout) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch module name -> (Flax path of its module, torch weight shape) for every kernel."""
  return {key.removesuffix(".weight"): (path[:-1], torch_shape)
          for key, (path, _, torch_shape) in layout.items() if path[-1] == "kernel"}


def _text_module(name: str) -> str:
  # transformers 4 named the tower `text_model`; CLIPTextModel keeps it under that name.
  return name.removeprefix("text_model.")


def _split_components(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """{subtree: {module key: array}} with the component prefix removed, kohya names kept."""
  out: dict[str, dict[str, np.ndarray]] = {"unet": {}, "text_encoder": {}}
  unknown = []
  for key, value in state.items():
    for prefix, component in _KOHYA.items():
      if key.startswith(prefix):
        out[component]["kohya:" + key[len(prefix):]] = value
        break
    else:
      head, _, rest = key.partition(".")
      if head in _COMPONENTS:
        out[_COMPONENTS[head]][rest] = value
      elif head in ("down_blocks", "up_blocks", "mid_block"):  # the oldest files: bare U-Net
        out["unet"][key] = value
      else:
        unknown.append(key)
  if unknown:
    raise ValueError(f"LoRA file: keys of no U-Net or text encoder "
                     f"(SDXL's lora_te1_/lora_te2_ and text_encoder_2 are not supported): "
                     f"{abbreviate(sorted(unknown))}")
  return out


def _parse(key: str) -> tuple[str, str] | None:
  """(module name, "down" | "up" | "alpha") of a LoRA key."""
  for part, suffixes in _SUFFIXES:
    for suffix in suffixes:
      if key.endswith(suffix):
        return key[:-len(suffix)], part
  return None


def _resolve(name: str, modules: Mapping[str, Any], kohya: Mapping[str, str],
             text: bool) -> str | None:
  if name.startswith("kohya:"):
    flat = name[len("kohya:"):]
    return kohya.get(flat.removeprefix("text_model_") if text else flat)
  name = _PROCESSOR.sub(lambda m: "." + (m.group(1) if m.group(1) != "to_out" else "to_out.0"),
                        name)
  name = _text_module(name) if text else name
  return name if name in modules else None


def adapters_from_state_dict(state: Mapping[str, np.ndarray], layouts: Mapping[str, Layout],
                             alphas: Mapping[str, float] | None = None) -> PyTree:
  """jaxt2i adapters {"unet": ..., "text_encoder": ...} from a LoRA state_dict in any of the
  module docstring's layouts.

  Args:
    state: key -> float32 array.
    layouts: subtree -> its model's converter layout (`expected_layout(model)`), for the
      components the file may adapt.
    alphas: subtree -> lora_alpha for adapters without their own `.alpha` (diffusers'
      metadata); missing means alpha = rank (scale 1), as diffusers assumes.

  Raises:
    ValueError: a key names no module of the models, an adapter lacks its down or up matrix,
      or shapes do not fit the module's weight.
  """
  alphas = alphas or {}
  adapters: dict[str, Any] = {}
  problems = []
  for component, entries in _split_components(state).items():
    if not entries:
      continue
    if component not in layouts:
      raise ValueError(f"LoRA file adapts the {component}, which this model does not have")
    modules = _modules(layouts[component])
    kohya = {m.replace(".", "_"): m for m in modules}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in entries.items():
      parsed = _parse(key)
      if parsed is None:
        problems.append(f"{component}.{key} (not a LoRA down / up / alpha key)")
        continue
      raw, part = parsed
      module = _resolve(raw, modules, kohya, component == "text_encoder")
      if module is None:
        problems.append(f"{component}.{raw} (no such module)")
        continue
      parts.setdefault(module, {})[part] = value
    for module, part in sorted(parts.items()):
      if "down" not in part or "up" not in part:
        problems.append(f"{component}.{module} (needs both down and up)")
        continue
      path, weight_shape = modules[module]
      down, up = np.asarray(part["down"], np.float32), np.asarray(part["up"], np.float32)
      rank = down.shape[0]
      alpha = float(np.asarray(part["alpha"]).reshape(())) if "alpha" in part else \
          float(alphas.get(component, rank))
      up = up.reshape(up.shape[0], rank) * (alpha / rank)
      n_out, n_in = weight_shape[0], weight_shape[1]
      if up.shape[0] != n_out or down.shape[1] != n_in or (
          math.prod(down.shape[2:]) != math.prod(weight_shape[2:])):
        problems.append(f"{component}.{module} (down {down.shape}, up {part['up'].shape} do "
                        f"not fit its weight {tuple(weight_shape)})")
        continue
      # torch [r, in(, kh, kw)] -> [in, r] / HWIO [kh, kw, in, r]; up [out, r] -> [r, out].
      down = down.transpose(2, 3, 1, 0) if down.ndim == 4 else down.reshape(rank, -1).T
      set_path(adapters, (component,) + path, {"down": np.ascontiguousarray(down),
                                                "up": np.ascontiguousarray(up.T)})
  if problems:
    raise ValueError(f"LoRA file does not fit the model: {abbreviate(problems)}")
  if not adapters:
    raise ValueError("LoRA file holds no adapters")
  return adapters


def _metadata_alphas(path: str) -> dict[str, float]:
  """lora_alpha per component from a diffusers file's `lora_adapter_metadata`."""
  if not path.endswith(".safetensors"):
    return {}
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    meta = (f.metadata() or {}).get("lora_adapter_metadata")
  if not meta:
    return {}
  meta = json.loads(meta)
  alphas = {}
  for component in _COMPONENTS:
    if f"{component}.lora_alpha" in meta:
      alphas[_COMPONENTS[component]] = float(meta[f"{component}.lora_alpha"])
  return alphas


def lora_file(path: str | os.PathLike) -> str:
  """The weights file of `path`: the file itself, or pytorch_lora_weights.safetensors (or
  the folder's only .safetensors file) in a folder."""
  path = os.fspath(path)
  if os.path.isdir(path):
    candidates = [WEIGHT_NAME] if os.path.isfile(os.path.join(path, WEIGHT_NAME)) else sorted(
        n for n in os.listdir(path) if n.endswith(".safetensors"))
    if len(candidates) != 1:
      raise FileNotFoundError(f"no single LoRA weights file in {path}: expected {WEIGHT_NAME}"
                              f" (found {sorted(os.listdir(path))})")
    path = os.path.join(path, candidates[0])
  return path


def read_lora(path: str | os.PathLike, layouts: Mapping[str, Layout]) -> PyTree:
  """Adapters from a LoRA file or folder (see adapters_from_state_dict)."""
  path = lora_file(path)
  return adapters_from_state_dict(read_state_dict(path, "LoRA weights"), layouts,
                                  _metadata_alphas(path))


def lora_state_dict(adapters: PyTree, layouts: Mapping[str, Layout],
                    scale: float = 1.0) -> dict[str, np.ndarray]:
  """The diffusers / PEFT state_dict of jaxt2i adapters (dense ones), `scale` folded into
  lora_B so that loading at alpha = rank reproduces the merged model."""
  out = {}
  for component, tree in adapters.items():
    by_path = {path: module for module, (path, _) in _modules(layouts[component]).items()}
    prefix = "unet." if component == "unet" else "text_encoder.text_model."

    def visit(node, path):
      if isinstance(node, Mapping) and "down" in node and "up" in node:
        down, up = np.asarray(node["down"], np.float32), np.asarray(node["up"], np.float32)
        if down.ndim != 2:
          raise ValueError(f"{component}/{'/'.join(path)}: only dense adapters are written")
        module = prefix + by_path[path]
        out[f"{module}.lora_A.weight"] = np.ascontiguousarray(down.T)
        out[f"{module}.lora_B.weight"] = np.ascontiguousarray(scale * up.T)
        return
      for name, child in node.items():
        visit(child, path + (name,))
    visit(tree, ())
  return out


def save_lora(adapters: PyTree, layouts: Mapping[str, Layout], out: str | os.PathLike,
              scale: float = 1.0) -> str:
  """Writes OUT/pytorch_lora_weights.safetensors (OUT a folder, made if needed, or a
  .safetensors path); returns the file written."""
  from safetensors.numpy import save_file
  out = os.fspath(out)
  if not out.endswith(".safetensors"):
    os.makedirs(out, exist_ok=True)
    out = os.path.join(out, WEIGHT_NAME)
  save_file(lora_state_dict(adapters, layouts, scale), out)
  return out
