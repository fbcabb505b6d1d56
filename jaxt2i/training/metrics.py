"""Metrics: TensorBoard event files, a metrics.jsonl, and a console progress line.

Keys are namespaced (`train/loss`, `train/grad_norm`, `eval/...`). Only process 0 writes;
other processes get a writer that does nothing, so call sites need no `if`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*H, cols*W, C] image with 2-pixel gaps."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * (h + 2) - 2, columns * (w + 2) - 2, c), images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + 2):r * (h + 2) + h, col * (w + 2):col * (w + 2) + w] = image
  return grid


class MetricWriter:
  def __init__(self, workdir: epath.PathLike, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = (workdir / "metrics.jsonl").open("a")

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    for key, value in clean.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
    self._jsonl.flush()

  def images(self, step: int, values: Mapping[str, np.ndarray]) -> None:
    if not self.enabled:
      return
    for key, batch in values.items():
      self._tb.add_image(key, image_grid(np.asarray(batch)), step, dataformats="HWC")

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def progress_line(step: int, num_steps: int, metrics: Mapping[str, float], steps_per_s: float,
                  examples_per_s: float) -> str:
  eta = (num_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
  parts = [f"step {step}/{num_steps}"]
  for key in ("train/loss", "train/grad_norm", "train/lr"):
    if key in metrics:
      parts.append(f"{key.split('/')[1]} {metrics[key]:.4g}")
  parts.append(f"{steps_per_s:.2f} steps/s")
  parts.append(f"{examples_per_s:.0f} ex/s")
  if metrics.get("train/skipped_total", 0):
    parts.append(f"skipped {int(metrics['train/skipped_total'])}")
  if math.isfinite(eta):
    parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
  return " | ".join(parts)
