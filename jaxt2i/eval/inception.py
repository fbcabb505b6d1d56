"""The FID Inception-v3 network in Flax, its weight loader and a batched feature extractor.

Frechet Inception Distance (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update
Rule...", Sec. 4) compares Gaussians fitted to the 2048-d pool features of one specific network:
the TensorFlow graph `inception-2015-12-05`, not torchvision's ImageNet Inception-v3. pytorch-fid
ported that graph to PyTorch as torchvision's `Inception3` (1008 classes, no aux head) with four
blocks patched to match TensorFlow: the pool branch of Mixed_5b..Mixed_7b averages over valid
pixels only (`count_include_pad=False`) and Mixed_7c's pool branch is a max-pool. This module
mirrors that network layer for layer, so FID numbers computed here are comparable with
pytorch-fid's.

Weights: pytorch-fid's release file `pt_inception-2015-12-05-6726825d.pth` (its state_dict keys,
e.g. `Mixed_5b.branch1x1.conv.weight`, are what `load_fid_inception` reads; `.safetensors` and
`.npz` copies with the same keys work too). Nothing is downloaded here: fetch the file once by
hand and pass its path.

The input path copies pytorch-fid's: uint8 images / 255, bilinear resize to 299x299 without
antialiasing (`F.interpolate(mode="bilinear", align_corners=False)`), then 2x - 1.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.convert.state_dict import check_layout, read_state_dict, set_path

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_NAME)
INPUT_SIZE = 299  # pytorch-fid resizes every image to this before the network.
NUM_CLASSES = 1008  # The TF graph has 1008 outputs (1000 ImageNet classes plus unused ones).

Pair = tuple[int, int]


class BasicConv2d(nn.Module):
  """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU: torchvision's BasicConv2d.

  Padding is explicit per side because every torch conv here pads symmetrically, which flax's
  'SAME' does not do for stride 2.
  """
  features: int
  kernel_size: Pair
  strides: Pair = (1, 1)
  padding: Pair = (0, 0)  # (rows, cols) of zeros added on each side, as torch's `padding`.
  precision: Any = jax.lax.Precision.HIGHEST  # Full f32 on GPU/TPU too, so FID is stable.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_valid_only(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over in-image pixels only, like TF's SAME avg-pool."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(3, stride=2) with no padding: floor((n - 3) / 2) + 1 outputs."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/c/d) with pytorch-fid's valid-pixel avg-pool branch."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_valid_only(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a), unchanged from torchvision."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convs (Mixed_6b..6e), valid-pixel avg-pool branch."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_valid_only(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a), unchanged from torchvision."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 convs (Mixed_7b, Mixed_7c).

  pytorch-fid's Mixed_7b averages valid pixels in its pool branch; Mixed_7c max-pools there
  (a quirk of the TF graph that FID's numbers depend on).
  """
  pool: str = "avg"  # "avg" (Mixed_7b) | "max" (Mixed_7c).
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_valid_only(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `fid_inception_v3()` on NHWC float32 input already scaled to [-1, 1].

  Submodule names equal the torch attribute names, so torch key `A.B.conv.weight` lives at
  params[A][B]["conv"]["kernel"]. Returns {"pool": [B, 2048], "logits": [B, num_classes]};
  "pool" is the FID feature. Any input of at least 75x75 runs; FID uses 299x299.
  """
  num_classes: int = NUM_CLASSES  # 1008 for the FID weights.
  precision: Any = jax.lax.Precision.HIGHEST  # jax.lax.Precision.DEFAULT allows TF32 on GPU.

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149x149
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # 73x73
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71
    x = _max_pool_3x3_s2(x)  # 35x35
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # 256 channels
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # 288
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # 768 at 17x17
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # 1280 at 8x8
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # 2048
    pool = jnp.mean(x, axis=(1, 2))
    # Dropout sits between pool and fc in torchvision; it is the identity at inference.
    logits = nn.Dense(self.num_classes, precision=p, name="fc")(pool)
    return {"pool": pool, "logits": logits}


# ------------------------------------------------------------------------------------------
# Weight loading.

@functools.lru_cache(maxsize=1)
def _expected_layout() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (collection, flax path, torch shape) for every array of the network.

  Derived from the Flax module itself (shapes only, nothing computed), so the loader cannot
  drift from the architecture.
  """
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  flax_to_torch = {"params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
                   "batch_stats": {"mean": "running_mean", "var": "running_var"}}
  layout = {}
  for collection in ("params", "batch_stats"):
    leaves = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for key_path, leaf in leaves:
      path = tuple(k.key for k in key_path)
      key = ".".join(path[:-1] + (flax_to_torch[collection][path[-1]],))
      shape = tuple(leaf.shape)
      if path[-1] == "kernel":  # HWIO -> OIHW for convs, (in, out) -> (out, in) for fc.
        shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
      layout[key] = (collection, path, shape)
  return layout


def load_fid_inception(path: str | os.PathLike) -> dict[str, Any]:
  """Loads pytorch-fid's FID Inception weights into Flax variables.

  Args:
    path: a `.pth`/`.pt` (torch.save of the state_dict, e.g. pytorch-fid's
      `pt_inception-2015-12-05-6726825d.pth`), `.safetensors` or `.npz` file with the same keys.

  Returns:
    {"params": ..., "batch_stats": ...}, ready for `FIDInceptionV3().apply(variables, x)`.

  Raises:
    FileNotFoundError: `path` does not exist (nothing is downloaded).
    ValueError: a key is missing, unexpected or wrongly shaped; the message names them.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"FID Inception weights not found at {path}. The standard file is pytorch-fid's "
        f"{FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}); download it once by hand, this code never "
        "downloads anything.")
  state = {k: v for k, v in read_state_dict(path, "FID Inception weights").items()
           if not k.endswith("num_batches_tracked")}
  layout = _expected_layout()
  check_layout(state, {k: v[2] for k, v in layout.items()},
               f"{path} is not an FID Inception-v3 state_dict")

  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for key, (collection, flax_path, _) in layout.items():
    value = np.asarray(state[key], dtype=np.float32)
    if flax_path[-1] == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    set_path(variables[collection], flax_path, jnp.asarray(value))
  return variables


# ------------------------------------------------------------------------------------------
# Inference.

def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[N, H, W, C] float -> [N, size, size, C] exactly as pytorch-fid resizes.

  That is torch's F.interpolate(mode="bilinear", align_corners=False): half-pixel centres,
  clamped edges and no antialiasing when shrinking (jax.image.resize would blur by default).
  """
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1], pytorch-fid's input path."""
  x = images.astype(jnp.float32) / 255.0
  return 2.0 * resize_bilinear(x) - 1.0


# Two separate jits so the network compiles once per batch shape, whatever the image size.
_preprocess = jax.jit(preprocess)


@jax.jit
def inception_outputs(variables: Mapping[str, Any], x: jax.Array) -> dict[str, jax.Array]:
  """Jitted FIDInceptionV3 forward on preprocessed [B, 299, 299, 3] float32 input."""
  return FIDInceptionV3().apply(variables, x)


def fid_features(variables: Mapping[str, Any], images: np.ndarray,
                 batch_size: int = 50) -> np.ndarray:
  """2048-d FID pool features of uint8 images [N, H, W, 3] (any H, W) as float64 [N, 2048].

  The last partial batch is padded to `batch_size` so one compiled program serves every batch.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"fid_features expects uint8 images [N, H, W, 3], got {images.dtype} "
                     f"{images.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  out = np.empty((len(images), 2048), np.float64)
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.uint8)])
    pool = inception_outputs(variables, _preprocess(batch))["pool"]
    out[start:start + n] = np.asarray(pool[:n], np.float64)
  return out


def fid_between(images, reference, weights_path: str | os.PathLike, *,
                batch_size: int = 50) -> dict[str, float]:
  """Inception FID and KID between two uint8 image sets (any sizes; resized to 299)."""
  from jaxt2i.eval import distribution
  variables = load_fid_inception(weights_path)
  a = fid_features(variables, images, batch_size=batch_size)
  b = fid_features(variables, reference, batch_size=batch_size)
  kid, kid_std = distribution.kernel_distance(a, b, subset_size=min(1000, len(a), len(b)))
  return {"fid": distribution.frechet_distance_features(a, b), "kid": kid, "kid_std": kid_std,
          "num_images": len(a), "num_reference": len(b)}
