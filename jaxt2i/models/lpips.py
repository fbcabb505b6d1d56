"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"), VGG-16 variant, as the VQ-GAN / LDM autoencoder loss uses it.

    d(x, y) = sum_l mean_{h,w} || w_l * (phi_l(x)^ - phi_l(y)^) ||^2

phi_l are VGG-16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations of the input
shifted and scaled per channel, ^ is the unit-length normalisation over channels, and w_l are
learned non-negative per-channel weights (1x1 convolutions without bias).

Weights are never downloaded: `load_lpips_params` reads files the user has, with torchvision's
VGG-16 keys (`features.{i}.weight`, as in `vgg16-397923af.pth`) and the lpips package's linear
heads (`lin{l}.model.1.weight`, its `weights/v0.1/vgg.pth`), or one file holding both (an
`lpips.LPIPS` state_dict, `net.slice{k}.{i}.*` keys, works too). Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.state_dict import check_layout, read_state_dict, set_path

# torchvision's vgg16().features: conv indices and widths; max-pool before 5, 10, 17, 24.
_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256), (14, 256), (17, 512),
          (19, 512), (21, 512), (24, 512), (26, 512), (28, 512))
_POOL_BEFORE = (5, 10, 17, 24)
_TAPS = (2, 7, 14, 21, 28)   # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 follow these convs
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
  """VGG-16's convolutional trunk up to relu5_3; returns the five LPIPS taps."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for index, width in _CONVS:
      if index in _POOL_BEFORE:
        x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name=f"conv_{index}")(x))
      if index in _TAPS:
        taps.append(x)
    return taps


class LPIPS(nn.Module):
  """Per-example LPIPS distance [B] between two image batches in [-1, 1]."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    features = VGG16Features(self.dtype, name="vgg")
    batch = x.shape[0]
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
    total = jnp.zeros((batch,), jnp.float32)
    for layer, tap in enumerate(features(both)):
      tap = tap.astype(jnp.float32)
      tap = tap / (jnp.sqrt(jnp.sum(tap * tap, -1, keepdims=True)) + 1e-10)
      diff = jnp.square(tap[:batch] - tap[batch:])
      lin = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin_{layer}")(diff)
      total = total + jnp.mean(lin, axis=(1, 2, 3))
    return total


def _expected_layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (flax param path, torch shape)."""
  layout = {}
  previous = 3
  for index, width in _CONVS:
    layout[f"features.{index}.weight"] = (("vgg", f"conv_{index}", "kernel"),
                                          (width, previous, 3, 3))
    layout[f"features.{index}.bias"] = (("vgg", f"conv_{index}", "bias"), (width,))
    previous = width
  for layer, index in enumerate(_TAPS):
    width = dict(_CONVS)[index]
    layout[f"lin{layer}.model.1.weight"] = (("lin_" + str(layer), "kernel"), (1, width, 1, 1))
  return layout


def _canonical(key: str) -> str | None:
  """Maps torchvision / lpips key spellings onto `features.{i}.*` and `lin{l}.model.1.weight`;
  None for keys LPIPS does not use (a VGG classifier, the scaling layer's buffers)."""
  key = re.sub(r"^(module\.)", "", key)
  match = re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", key)
  if match:
    return f"features.{match.group(1)}.{match.group(2)}"
  match = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
  if match:
    return key
  if key.startswith(("classifier.", "scaling_layer.")):
    return None
  return key  # kept, so the layout check reports it as unexpected


def load_lpips_params(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
  """LPIPS params from one or more weight files (or a comma-separated string of paths).

  Raises:
    FileNotFoundError / ValueError / ImportError: as `read_state_dict`; ValueError also when
      the files together lack a key or hold a wrongly shaped one (the message names them).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [p for p in os.fspath(paths).split(",") if p.strip()]
  state: dict[str, np.ndarray] = {}
  for path in paths:
    for key, value in read_state_dict(os.fspath(path).strip(), "LPIPS weights").items():
      name = _canonical(key)
      if name is not None:
        state[name] = value
  layout = _expected_layout()
  check_layout(state, {k: v[1] for k, v in layout.items()},
               f"{', '.join(map(os.fspath, paths))} do not hold VGG-16 + LPIPS weights (need "
               "torchvision's vgg16 features.* and lpips' lin0-4)")
  params: dict[str, Any] = {}
  for key, (path, _) in layout.items():
    value = state[key]
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    set_path(params, path, np.ascontiguousarray(value, np.float32))
  return params
