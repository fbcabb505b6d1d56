"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") as a params transform.

An adapter adds a low-rank update to one kernel: W' = W + scale * down @ up, down [in, r],
up [r, out] (the kernel seen as its [in, out] matrix). Nothing in the models changes: the
adapters live in their own tree that mirrors the params tree down to the kernel's module,

    params   {"unet": {"down_blocks_0": {... {"attn1": {"to_q": {"kernel": [in, H, D]}}}}}}
    adapters {"unet": {"down_blocks_0": {... {"attn1": {"to_q": {"down": [in, r],
                                                                  "up": [r, H * D]}}}}}}

and `merge` adds every update to its kernel, inside jit while training (gradients reach the
adapters through the sum) or once when sampling. Training through the merged kernel costs one
[in, out] weight gradient per adapted layer, which the attention projections' share of a
U-Net step makes small, and keeps the forward pass the base model's own program.

A convolution kernel [kh, kw, in, out] takes down [kh, kw, in, r] (LoCon / kohya's conv
adapters, loaded from files); trained adapters target dense kernels.

jaxt2i's kernels split heads out: to_q / to_k / to_v are [in, heads, head_dim] and to_out_0
is [heads, head_dim, out], so the [in, out] matrix of a kernel needs to know how many leading
axes are its input: `input_axes`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Attention projections of jaxt2i's Attention (the U-Net's attn1 / attn2, the text encoders'
# self-attention): PEFT's and diffusers' default LoRA targets for Stable Diffusion.
ATTENTION_TARGETS = r"(to_q|to_k|to_v|to_out_0)"


def input_axes(module: str, kernel_ndim: int) -> int:
  """How many leading axes of a dense kernel are its input ([heads, head_dim, out]: 2)."""
  return 2 if module == "to_out_0" and kernel_ndim == 3 else 1


def is_adapter(node: Any) -> bool:
  return isinstance(node, Mapping) and "down" in node and "up" in node


def _kernels(params: PyTree, prefix: tuple[str, ...] = ()):
  """(module path, kernel) for every `kernel` leaf of a nested dict."""
  for name, value in params.items():
    if name == "kernel":
      yield prefix, value
    elif isinstance(value, Mapping):
      yield from _kernels(value, prefix + (name,))


def init_adapters(params: PyTree, rank: int, rng: jax.Array,
                  targets: str = ATTENTION_TARGETS) -> PyTree:
  """Fresh adapters for every dense kernel of `params` (one model's params, e.g. the
  U-Net's) whose module name fully matches the regex `targets`.

  As PEFT initialises them: `down` uniform in +-1/sqrt(in) (Kaiming-uniform with a = sqrt(5),
  torch's Linear init), `up` zero, so the adapted model starts as the base model. Works on
  abstract params (ShapeDtypeStructs) too.

  Raises:
    ValueError: `targets` matches no kernel, or matches a convolution kernel.
  """
  pattern = re.compile(targets)
  adapters: dict[str, Any] = {}
  matched = []
  for path, kernel in _kernels(params):
    if not pattern.fullmatch(path[-1]):
      continue
    if len(kernel.shape) == 4:
      raise ValueError(f"LoRA target {'/'.join(path)} is a convolution; trained adapters "
                       "take dense kernels (narrow the targets pattern)")
    axes = input_axes(path[-1], len(kernel.shape))
    n_in, n_out = math.prod(kernel.shape[:axes]), math.prod(kernel.shape[axes:])
    key = jax.random.fold_in(rng, len(matched))
    bound = 1.0 / math.sqrt(n_in)
    node = adapters
    for name in path:
      node = node.setdefault(name, {})
    node["down"] = jax.random.uniform(key, (n_in, rank), jnp.float32, -bound, bound)
    node["up"] = jnp.zeros((rank, n_out), jnp.float32)
    matched.append(path)
  if not matched:
    raise ValueError(f"LoRA targets {targets!r} match no kernel's module name")
  return adapters


def delta(adapter: Mapping[str, Any], shape: tuple[int, ...]) -> Any:
  """The adapter's update, shaped like the kernel it adapts."""
  down, up = adapter["down"], adapter["up"]
  xp = jnp if isinstance(down, jax.Array) or isinstance(up, jax.Array) else np
  return xp.tensordot(down, up, axes=1).reshape(shape)


def _apply(params: PyTree, adapters: PyTree, combine: Callable[[Any, Any], Any],
           path: tuple[str, ...] = ()) -> PyTree:
  out = dict(params)
  for name, node in adapters.items():
    if name not in params:
      raise ValueError(f"LoRA adapter for {'/'.join(path + (name,))}: no such module in the "
                       "params")
    if is_adapter(node):
      module = dict(params[name])
      kernel = module["kernel"]
      module["kernel"] = combine(kernel, delta(node, kernel.shape).astype(kernel.dtype))
      out[name] = module
    else:
      out[name] = _apply(params[name], node, combine, path + (name,))
  return out


def merge(params: PyTree, adapters: PyTree, scale: Any = 1.0) -> PyTree:
  """`params` with every adapter's update times `scale` added to its kernel. `adapters`
  mirrors `params` (any top-level subset of its subtrees); the untouched leaves are shared,
  not copied. Works with jax arrays inside jit and numpy arrays outside."""
  return _apply(params, adapters, lambda k, d: k + scale * d)


def unmerge(params: PyTree, adapters: PyTree, scale: Any = 1.0) -> PyTree:
  """The inverse of merge (exact up to float rounding)."""
  return _apply(params, adapters, lambda k, d: k - scale * d)


def count(adapters: PyTree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
