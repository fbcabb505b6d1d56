"""OpenAI's DALL-E dVAE (the `dall_e` package's encoder.pkl / decoder.pkl) -> jaxt2i.

jaxt2i.models.dvae keeps the package's module names, so a state_dict key maps to a param path
by name alone,

    blocks.group_2.block_1.res_path.conv_3.w  ->  group_2_block_1/conv_3/kernel
    blocks.group_2.block_1.id_path.b          ->  group_2_block_1/id_path/bias
    blocks.output.conv.w                      ->  output/kernel

and only the conv layout changes (OIHW -> HWIO). The model fields (codebook size, widths,
blocks per group, downsampling factor) are read off the weights' shapes, and the expected keys
and shapes come from the Flax module itself (jax.eval_shape), so the converter cannot drift
from the model. `convert_dall_e_dvae` writes a jaxt2i run directory (config.json for task
"dvae" + a step-0 checkpoint) that `jaxt2i.eval.runner.load_run` and the DALL-E task's
`model.dvae_workdir` read like a trained run.

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
from flax.core import meta

from jaxt2i.convert.state_dict import abbreviate, check_layout, set_path
from jaxt2i.models.dvae import DiscreteVAE, check_fields

_GROUP_BLOCK = re.compile(r"^group_(\d+)_block_(\d+)$")
_TORCH_GROUP = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")
_LEAF_TO_TORCH = {"kernel": "w", "bias": "b"}


def _torch_key(path: tuple[str, ...]) -> str:
  """Param path inside the encoder or decoder -> the `dall_e` state_dict key."""
  parts = ["blocks"]
  for name in path[:-1]:
    if m := _GROUP_BLOCK.match(name):
      parts += [f"group_{m.group(1)}", f"block_{m.group(2)}"]
    elif re.fullmatch(r"conv_\d", name):
      parts += ["res_path", name]
    elif name == "output":
      parts += ["output", "conv"]
    else:
      parts.append(name)
  return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def expected_layout(model: DiscreteVAE, part: str
                    ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
  """torch key -> (param path, Flax shape, torch shape) for every param of the `part`
  ("encoder" | "decoder") of `model`."""
  side = model.downsample_factor
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, side, side, model.channels), jnp.float32))
  layout = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
      meta.unbox(shapes["params"][part]))[0]:
    path = tuple(k.key for k in key_path)
    shape = tuple(leaf.shape)
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    layout[_torch_key(path)] = ((part,) + path, shape, torch_shape)
  return layout


def _count(keys, pattern: re.Pattern, group: int, where: str) -> int:
  found = {int(m.group(group)) for k in keys if (m := pattern.match(k))}
  if not found or found != set(range(1, max(found) + 1)):
    raise ValueError(f"{where}: expected {pattern.pattern} keys numbered from 1, found "
                     f"{sorted(found)}")
  return max(found)


def dvae_fields_from_dall_e(encoder: Mapping[str, Any], decoder: Mapping[str, Any]
                            ) -> dict[str, int]:
  """DiscreteVAE fields of a `dall_e` Encoder + Decoder pair, read off their state_dicts.

  Raises:
    ValueError: a state_dict is not a `dall_e` Encoder / Decoder, or the two do not belong
      together (another codebook size, widths, depth); the message names the field.
  """
  for what, state in (("encoder", encoder), ("decoder", decoder)):
    missing = [k for k in ("blocks.input.w", "blocks.output.conv.w") if k not in state]
    if missing:
      raise ValueError(f"the {what} state_dict is not a dall_e {what.capitalize()}: missing "
                       f"keys {missing} (it has {abbreviate(sorted(state))})")
  enc_in, enc_out = np.shape(encoder["blocks.input.w"]), np.shape(encoder["blocks.output.conv.w"])
  dec_in, dec_out = np.shape(decoder["blocks.input.w"]), np.shape(decoder["blocks.output.conv.w"])
  enc_groups = _count(encoder, _TORCH_GROUP, 1, "encoder")
  dec_groups = _count(decoder, _TORCH_GROUP, 1, "decoder")
  enc_blocks = _count(encoder, re.compile(r"^blocks\.group_1\.block_(\d+)\."), 1, "encoder")
  dec_blocks = _count(decoder, re.compile(r"^blocks\.group_1\.block_(\d+)\."), 1, "decoder")
  pairs = {"vocab_size": (enc_out[0], dec_in[1]),
           "hidden": (enc_in[0], dec_out[1]),       # first encoder / last decoder group width
           "blocks_per_group": (enc_blocks, dec_blocks),
           "downsample_factor": (2 ** (enc_groups - 1), 2 ** (dec_groups - 1)),
           "channels": (enc_in[1], dec_out[0] // 2)}
  differ = [f"{k}: encoder {a}, decoder {b}" for k, (a, b) in pairs.items() if a != b]
  if differ:
    raise ValueError("the encoder and decoder do not belong to one dVAE (jaxt2i's DiscreteVAE "
                     "shares these fields): " + "; ".join(differ))
  fields = {k: int(a) for k, (a, _) in pairs.items()}
  fields["init_width"] = int(dec_in[0])
  check_fields(**fields)
  return fields


def dvae_params_from_dall_e(encoder: Mapping[str, Any], decoder: Mapping[str, Any],
                            model: DiscreteVAE) -> dict[str, Any]:
  """Converts `dall_e` Encoder + Decoder state_dicts into `model`'s params.

  Args:
    encoder, decoder: state_dict key -> array (numpy or CPU torch tensors).
    model: the DiscreteVAE they are for (`DiscreteVAE(**dvae_fields_from_dall_e(...))`).

  Returns:
    {"encoder": ..., "decoder": ...} of float32 numpy arrays, for
    `model.apply({"params": params}, ...)`.

  Raises:
    ValueError: keys are missing, unexpected or wrongly shaped; the message lists them.
  """
  params: dict[str, Any] = {}
  for part, state in (("encoder", encoder), ("decoder", decoder)):
    layout = expected_layout(model, part)
    check_layout(state, {k: v[2] for k, v in layout.items()},
                 f"the {part} state_dict does not match the dVAE")
    for key, (path, shape, _) in layout.items():
      value = np.asarray(_numpy(state[key]), dtype=np.float32)
      if len(shape) == 4:
        value = value.transpose(2, 3, 1, 0)
      set_path(params, path, np.ascontiguousarray(value))
  return params


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (possibly float16, or needing grad)
    return value.detach().float().cpu().numpy()
  return np.asarray(value)


def read_dall_e_module(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
  """The state_dict of a published `dall_e` pickle (a whole torch module, as
  `dall_e.load_model` reads it) or of a torch.save'd state_dict.

  Unpickling a module runs code from the file: only convert files from a source you trust.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dall_e {what} not found at {path} (nothing is downloaded: "
                            "give the local encoder.pkl / decoder.pkl)")
  try:
    import torch  # Lazy: only this converter needs PyTorch.
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=False)
  except ModuleNotFoundError as e:
    raise ValueError(f"could not unpickle the dall_e {what} {path}: it needs the module "
                     f"{e.name!r} (pip install DALL-E, OpenAI's package)") from e
  except Exception as e:  # A corrupt file: say which one, not where deep in torch it broke.
    raise ValueError(f"could not read the dall_e {what} from {path}: "
                     f"{type(e).__name__}: {e}") from e
  if isinstance(obj, torch.nn.Module):
    obj = obj.state_dict()
  if not (isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a dall_e {what} module or "
                     "state_dict")
  return {str(k): _numpy(v) for k, v in obj.items()}


def convert_dall_e_dvae(encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
                        out_dir: str | os.PathLike, *, image_size: int = 256) -> dict[str, Any]:
  """Writes `out_dir` as a jaxt2i "dvae" run holding the converted weights.

  Args:
    encoder_path, decoder_path: the `dall_e` encoder.pkl / decoder.pkl (or state_dicts).
    out_dir: the run directory to create (config.json + checkpoints/0); must not hold a run.
    image_size: config.data.image_size of the run (the published model: 256).

  Returns:
    A summary: the directory, the model fields and the parameter count.
  """
  from etils import epath

  from jaxt2i.tasks.dvae import DiscreteVAETask
  from jaxt2i.training import config as config_lib
  from jaxt2i.training.checkpoint import save_params
  from jaxt2i.training.config import trainer_defaults

  encoder = read_dall_e_module(encoder_path, "encoder")
  decoder = read_dall_e_module(decoder_path, "decoder")
  fields = dvae_fields_from_dall_e(encoder, decoder)
  if image_size % fields["downsample_factor"]:
    raise ValueError(f"image_size={image_size} is not divisible by the model's downsampling "
                     f"factor {fields['downsample_factor']}")
  params = {"dvae": dvae_params_from_dall_e(encoder, decoder, DiscreteVAE(**fields))}

  out = epath.Path(out_dir if "://" in str(out_dir) else os.path.abspath(out_dir))
  if (out / "config.json").exists() or (out / "checkpoints").exists():
    raise ValueError(f"{out} already holds a run; choose a new --out directory")
  config = trainer_defaults()
  config.task = DiscreteVAETask.name
  config.model = DiscreteVAETask.default_model_config()
  config.model.update(fields)
  # The published dVAE was trained with the logit-Laplace loss on 256 px images.
  config.model.reconstruction = "logit_laplace"
  config.data.image_size = image_size
  config.train.num_steps = 0
  config.train.ema_decay = 0.0
  DiscreteVAETask(config).validate()
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(config.to_json_best_effort(indent=2))
  save_params(out / "checkpoints", params, config_lib.to_json_dict(config))
  return {"workdir": str(out), "model": fields,
          "params": int(sum(np.size(v) for v in jax.tree.leaves(params)))}
