"""The Python sampling API over any trained run: `pipe = jaxt2i.load(workdir); pipe(prompts)`.

    pipe = jaxt2i.load("workdirs/ldm")
    images = pipe(["a large red circle in the center"], num_images_per_prompt=4, seed=0,
                  steps=50, guidance_scale=5.0, sampler="ddim")      # list of PIL images

One compiled program per (batch size, sampler): prompts, seed, guidance scale, number of
steps, eta and initial latents are traced arguments, so changing them never recompiles. JAX's
persistent compilation cache is on (under $JAXT2I_CACHE_DIR/jax), so a second process reuses
the first one's compilations. Batches are split over the devices of the `data` mesh axis.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jaxt2i.data import pipeline as data_pipeline
from jaxt2i.eval.runner import load_run
from jaxt2i.parallel import mesh as mesh_lib


def enable_compilation_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (unless the user configured one)."""
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  from jaxt2i.eval.shapes import cache_root
  directory = directory or str(cache_root() / "jax")
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory


class Pipeline:
  """Samples a trained run. See the module docstring."""

  def __init__(self, workdir: str | os.PathLike, *, devices: Sequence[jax.Device] | None = None,
               ema: bool = True, compilation_cache: bool = True):
    if compilation_cache:
      enable_compilation_cache()
    self.workdir = epath.Path(workdir)
    self.config, self.task, params = load_run(self.workdir, ema=ema)
    self.tokenizer = data_pipeline.load_tokenizer(self.config.data, self.workdir)
    self.max_length = int(self.config.data.max_caption_length)
    self.mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
    self.params = jax.device_put(params, self._replicated)
    self._compiled: dict[Any, Any] = {}
    self.num_compilations = 0

  # -- text ------------------------------------------------------------------------------------

  def _encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = self.tokenizer.encode(list(prompts), self.max_length)
    _, full = self.tokenizer.encode(list(prompts), 4 * self.max_length)
    for prompt, length in zip(prompts, np.asarray(full).sum(1)):
      if length > self.max_length:
        warnings.warn(f"prompt truncated from {length} to {self.max_length} tokens: "
                      f"{prompt!r}", stacklevel=3)
    empty = np.array([not p.strip() for p in prompts])
    # The empty prompt is the unconditional one: all padding, as in caption dropout.
    tokens = np.where(empty[:, None], 0, tokens).astype(np.int32)
    mask = np.where(empty[:, None], 0, mask).astype(np.int32)
    return tokens, mask

  # -- sampling --------------------------------------------------------------------------------

  def _program(self, batch: int, sampler: str | None, with_latents: bool):
    key = (batch, sampler, with_latents)
    if key not in self._compiled:
      task = self.task

      def run(params, tokens, mask, neg_tokens, neg_mask, rng, scale, steps, eta, latents):
        if hasattr(task, "generate"):
          return task.generate(params, tokens, mask, rng, guidance_scale=scale, num_steps=steps,
                               sampler=sampler, eta=eta, negative_tokens=neg_tokens,
                               negative_mask=neg_mask,
                               latents=latents if with_latents else None)
        return task.sample(params, {"tokens": tokens, "tokens_mask": mask}, rng)

      self._compiled[key] = jax.jit(run, out_shardings=self._replicated)
    return self._compiled[key]

  def __call__(self, prompts: str | Sequence[str], *, num_images_per_prompt: int = 1,
               seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None, eta: float = 0.0,
               negative_prompt: str | Sequence[str] | None = None,
               latents: np.ndarray | None = None, output: str = "pil"):
    """Images for `prompts` (prompt-major: all samples of the first prompt first).

    `latents`: the initial noise [N, h, w, c] (NHWC), like diffusers' pipelines; `output`:
    "pil" (list of PIL images) or "np" (uint8 [N, H, W, 3]).
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts or num_images_per_prompt < 1:
      raise ValueError("need at least one prompt and num_images_per_prompt >= 1")
    if output not in ("pil", "np"):
      raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
    m = self.config.model
    steps = int(steps if steps is not None else m.get("num_sampling_steps", 1))
    scale = float(guidance_scale if guidance_scale is not None else m.get("guidance_scale", 1.0))
    repeated = [p for p in prompts for _ in range(num_images_per_prompt)]
    n = len(repeated)
    if isinstance(negative_prompt, str) or negative_prompt is None:
      negative = [negative_prompt or ""] * n
    else:
      negative = [p for p in negative_prompt for _ in range(num_images_per_prompt)]
      if len(negative) != n:
        raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
    tokens, mask = self._encode(repeated)
    neg_tokens, neg_mask = self._encode(negative)
    # Pad the batch to a multiple of the data-parallel width (extra rows are dropped).
    width = self.mesh.shape["data"]
    padded = -(-n // width) * width

    def pad(x):
      return np.concatenate([x, np.repeat(x[-1:], padded - n, 0)]) if padded > n else x
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      if latents.shape[0] != n:
        raise ValueError(f"latents has {latents.shape[0]} rows, expected {n} (prompts x "
                         "num_images_per_prompt)")
      latents = jax.device_put(pad(latents), self._batch)
    put = lambda x: jax.device_put(pad(x), self._batch)  # noqa: E731
    program = self._program(padded, sampler, latents is not None)
    before = program._cache_size() if hasattr(program, "_cache_size") else None
    images = program(self.params, put(tokens), put(mask), put(neg_tokens), put(neg_mask),
                     jax.random.key(seed), jnp.float32(scale), jnp.int32(steps),
                     jnp.float32(eta), latents)
    if before is not None and program._cache_size() != before:
      self.num_compilations += 1
    images = np.asarray(jax.device_get(images))[:n]
    if output == "np":
      return images
    from PIL import Image
    return [Image.fromarray(im) for im in images]


def load(workdir: str | os.PathLike, **kwargs) -> Pipeline:
  """A sampling pipeline for the run in `workdir` (see `Pipeline`)."""
  logging.info("loading %s", workdir)
  return Pipeline(workdir, **kwargs)
