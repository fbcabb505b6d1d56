"""Reading PyTorch-world weight files and checking them against the layout a model expects.

Shared by every converter (diffusers U-Net, FID Inception, LPIPS, ...): one reader for
.safetensors, .npz and torch .pth / .pt / .bin files, and one check that names every missing,
unexpected or wrongly shaped key instead of failing deep inside a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = _TORCH_SUFFIXES + (".safetensors", ".npz")


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, np.ndarray]:
  """Reads a state_dict file into {key: float32 numpy array}.

  Args:
    path: .safetensors, .npz, or a torch.save'd state_dict (.pth / .pt / .bin).
    what: what the file should hold, for error messages ("FID Inception weights").

  Raises:
    FileNotFoundError: no such file (nothing is ever downloaded).
    ValueError: an unsupported suffix, or a file that is not a state_dict of tensors.
    ImportError: a torch file without PyTorch installed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found at {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"unsupported {what} file {path}: expected one of {', '.join(SUFFIXES)}")
  if suffix in _TORCH_SUFFIXES:
    try:
      import torch  # Lazy: only torch's own formats need PyTorch.
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch), or a .safetensors "
                        "/ .npz copy with the same keys") from e
  try:
    if suffix == ".safetensors":
      from safetensors.numpy import load_file
      return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    if suffix == ".npz":
      with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k], np.float32) for k in data.files}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
      return {str(k): v.detach().float().cpu().numpy() for k, v in obj.items()}
    error = f"it holds a {type(obj).__name__}, not a state_dict of tensors"
  except Exception as e:  # A corrupt file: say which one, not where deep in a library it broke.
    error = f"{type(e).__name__}: {e}"
  raise ValueError(f"could not read {what} from {path}: {error}")


def abbreviate(items: list[str], limit: int = 10) -> str:
  """The first `limit` items, then a count, so a wholly wrong file gives a readable error."""
  shown = ", ".join(items[:limit])
  return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def check_layout(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                 what: str) -> None:
  """Raises ValueError("`what`: missing keys [...]; unexpected keys [...]; wrong shapes [...]")
  unless `state` has exactly the keys of `expected`, each with its shape."""
  shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
  wrong = [f"{k}: {shapes[k]} (expected {tuple(expected[k])})"
           for k in sorted(set(expected) & set(shapes)) if shapes[k] != tuple(expected[k])]
  problems = [f"{name} {abbreviate(keys)}" for name, keys in (
      ("missing keys", sorted(set(expected) - set(shapes))),
      ("unexpected keys", sorted(set(shapes) - set(expected))),
      ("wrong shapes", wrong)) if keys]
  if problems:
    raise ValueError(f"{what}: " + "; ".join(problems))


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def to_state_dict(params: Mapping[str, Any], layout: Mapping[str, tuple[tuple[str, ...],
                                                                      tuple[int, ...],
                                                                      tuple[int, ...]]]
                  ) -> dict[str, np.ndarray]:
  """The inverse of the converters' params-from-state_dict step, for a layout of
  torch key -> (param path, Flax shape, torch shape) in which a convolution kernel is HWIO
  (torch OIHW) and any other kernel is the torch [out, in] matrix transposed and reshaped:
  {torch key: float32 array} ready for safetensors."""
  out = {}
  for key, (path, _, torch_shape) in layout.items():
    value = params
    for name in path:
      value = value[name]
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      value = (value.transpose(3, 2, 0, 1) if value.ndim == 4
               else value.reshape(torch_shape[1], torch_shape[0]).T)
    out[key] = np.ascontiguousarray(value.reshape(torch_shape))
  return out


Layout = dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]


def layout_of(abstract_params: Any, torch_key: Any, torch_shape: Any) -> Layout:
  """torch key -> (param path, Flax shape, torch shape) for every leaf of `abstract_params`
  (e.g. `jax.eval_shape(model.init, ...)["params"]`, boxed or not), through a converter's
  `torch_key(path)` and `torch_shape(path, shape)`."""
  import jax
  from flax.core import meta
  layout = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(meta.unbox(abstract_params))[0]:
    path = tuple(k.key for k in key_path)
    shape = tuple(leaf.shape)
    layout[torch_key(path)] = (path, shape, torch_shape(path, shape))
  return layout


def params_from_layout(state_dict: Mapping[str, Any], layout: Layout, what: str
                       ) -> dict[str, Any]:
  """The params tree (float32 numpy) of a state_dict that matches `layout` (checked first:
  ValueError "`what`: missing keys ..."). Convolution kernels go OIHW -> HWIO, other kernels
  are the transposed torch matrix reshaped, everything else is reshaped; `to_state_dict`
  inverts it."""
  check_layout(state_dict, {k: v[2] for k, v in layout.items()}, what)
  params: dict[str, Any] = {}
  for key, (path, shape, _) in layout.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T.reshape(shape)
    else:
      value = value.reshape(shape)
    set_path(params, path, np.ascontiguousarray(value))
  return params


def weights_file(path: str, names: Sequence[str], what: str) -> str:
  """The first of `names` present in the folder `path` (FileNotFoundError naming them)."""
  for name in names:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"no {what} weights in {path}: expected one of {', '.join(names)}")


def read_model_config(path: str | os.PathLike, subfolder: str, what: str
                      ) -> tuple[str, dict[str, Any]]:
  """(the model's folder, its config.json as a dict) for a diffusers / transformers model
  folder, or a pipeline folder holding it in `subfolder` (e.g. "unet"). FileNotFoundError
  names `what` when there is no config.json (nothing is downloaded)."""
  import json
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
      os.path.join(path, subfolder, "config.json")):
    path = os.path.join(path, subfolder)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no {what} at {path}: config.json is missing (nothing is "
                            f"downloaded; pass a local {subfolder}/ folder)")
  with open(config_file) as f:
    return path, json.load(f)
