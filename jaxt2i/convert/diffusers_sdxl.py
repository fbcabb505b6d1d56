"""Stable Diffusion XL folders (diffusers format): recognising the base pipeline's folder and
rejecting the refiner. The sampling task is jaxt2i/tasks/sdxl.py; from_diffusers
(convert/diffusers_pipeline.py) builds a run of it from such a folder.
"""

from __future__ import annotations

import json
import os
from typing import Any


# The folder parts beyond SD 1.x / 2.x's.
PARTS = ("text_encoder_2", "tokenizer_2")


def is_sdxl_folder(path: str | os.PathLike) -> bool:
  """Whether the diffusers folder at `path` is an SDXL pipeline (it has text_encoder_2/)."""
  index = os.path.join(path, "model_index.json")
  if os.path.isfile(index):
    with open(index) as f:
      if json.load(f).get("_class_name", "").startswith("StableDiffusionXL"):
        return True
  return os.path.isdir(os.path.join(path, "text_encoder_2"))


def check_sdxl_folder(path: str | os.PathLike) -> dict[str, Any]:
  """model_index.json of the SDXL folder at `path` (empty if absent); raises for the
  refiner and for missing parts."""
  path = os.fspath(path)
  index_file = os.path.join(path, "model_index.json")
  index = {}
  if os.path.isfile(index_file):
    with open(index_file) as f:
      index = json.load(f)
  if index.get("requires_aesthetics_score") or not os.path.isdir(
      os.path.join(path, "text_encoder")):
    raise ValueError(f"{path} looks like the SDXL refiner (no text_encoder/, or "
                     "requires_aesthetics_score): only the SDXL base pipeline is supported")
  missing = [p for p in PARTS if not os.path.isdir(os.path.join(path, p))]
  if missing:
    raise FileNotFoundError(f"{path} is not a diffusers SDXL folder: missing "
                            f"{', '.join(p + '/' for p in missing)}")
  return index
