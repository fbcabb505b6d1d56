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

import inspect
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
from jaxt2i.training.compilation import enable_compilation_cache


# Arguments of Task.generate the pipeline itself fills in.
_FIXED_ARGUMENTS = frozenset({"self", "params", "tokens", "mask", "rng", "guidance_scale",
                              "num_steps", "sampler", "eta", "negative_tokens", "negative_mask",
                              "latents", "num_candidates", "keep"})


class Pipeline:
  """Samples a trained run. See the module docstring."""

  def __init__(self, workdir: str | os.PathLike | None, *,
               devices: Sequence[jax.Device] | None = None, ema: bool = True,
               compilation_cache: bool = True, run: tuple[Any, Any, Any] | None = None,
               weights_dtype: str | None = None, clip_workdir: str | None = None,
               step: int | None = None):
    """Samples the run in `workdir`, or `run` = (config, task, params) built in memory (as
    jaxt2i.from_diffusers does; `workdir` may then be None). `weights_dtype="bfloat16"`
    stores floating-point weights in bfloat16 (half the device memory; SD 1.5: 1.7 GB).
    `clip_workdir` (DALL-E): a CLIP run that ranks `num_candidates` draws, for runs trained
    without one or to replace theirs. `step`: a kept checkpoint (default the latest)."""
    if compilation_cache:
      enable_compilation_cache()
    self.workdir = None if workdir is None else epath.Path(workdir)
    if run is None:
      if self.workdir is None:
        raise ValueError("Pipeline needs a workdir or run=(config, task, params)")
      self.config, self.task, params = load_run(self.workdir, ema=ema,
                                                clip_workdir=clip_workdir, step=step)
    else:
      if clip_workdir:
        raise ValueError("clip_workdir is for trained runs loaded from a workdir")
      self.config, self.task, params = run
    self.tokenizer = data_pipeline.load_tokenizer(self.config.data, self.workdir)
    self.max_length = int(self.config.data.max_caption_length)
    # SDXL's second tokenizer: its row follows the first one's in each prompt's tokens.
    self.tokenizer_2 = None
    if self.config.get("model") and self.config.model.get("tokenizer_2"):
      from jaxt2i.data.tokenizer import CLIPTokenizer
      self.tokenizer_2 = CLIPTokenizer.load(self.config.model.tokenizer_2)
    self.mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
    # A LoRA run samples its base with the adapters merged once, here (kept for save_lora).
    self.run_adapters = params.get("lora") if isinstance(params, dict) else None
    if self.run_adapters is not None:
      params = self.task.with_lora(params)
    self._loaded_loras: list[tuple[Any, float]] = []
    if weights_dtype is not None:
      dtype = jnp.dtype(weights_dtype)
      params = jax.tree.map(
          lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    # Straight from host memory onto every device of the mesh (no single-device copy first).
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
    if self.tokenizer_2 is not None:
      tokens_2, mask_2 = self.tokenizer_2.encode(list(prompts), self.max_length)
      tokens = np.concatenate([tokens, tokens_2], axis=1)
      mask = np.concatenate([mask, mask_2], axis=1)
    if getattr(self.task, "tokenized_unconditional", False):
      return tokens.astype(np.int32), mask.astype(np.int32)
    empty = np.array([not p.strip() for p in prompts])
    # The empty prompt is the unconditional one: all padding, as in caption dropout.
    tokens = np.where(empty[:, None], 0, tokens).astype(np.int32)
    mask = np.where(empty[:, None], 0, mask).astype(np.int32)
    return tokens, mask

  # -- sampling --------------------------------------------------------------------------------

  def _program(self, batch: int, sampler: str | None, with_latents: bool, guided: bool,
               options: tuple[str, ...], num_candidates: int, keep: int):
    key = (batch, sampler, with_latents, guided, options, num_candidates, keep)
    if key not in self._compiled:
      task = self.task
      ranked = {"num_candidates": num_candidates, "keep": keep} if num_candidates > 1 else {}

      def run(params, tokens, mask, neg_tokens, neg_mask, rng, scale, steps, eta, latents,
              extra):
        if hasattr(task, "generate"):
          return task.generate(params, tokens, mask, rng,
                               guidance_scale=scale if guided else None, num_steps=steps,
                               sampler=sampler, eta=eta, negative_tokens=neg_tokens,
                               negative_mask=neg_mask,
                               latents=latents if with_latents else None, **extra, **ranked)
        return task.sample(params, {"tokens": tokens, "tokens_mask": mask}, rng)

      self._compiled[key] = jax.jit(run, out_shardings=self._replicated)
    return self._compiled[key]

  def _generate_options(self) -> set[str]:
    generate = getattr(self.task, "generate", None)
    return set(inspect.signature(generate).parameters) if generate else set()

  def __call__(self, prompts: str | Sequence[str], *, num_images_per_prompt: int = 1,
               seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None, eta: float = 0.0,
               negative_prompt: str | Sequence[str] | None = None,
               latents: np.ndarray | None = None, output: str = "pil",
               num_candidates: int | None = None, rerank: int | None = None,
               image: Any = None, mask_image: Any = None, strength: float | None = None,
               control_image: Any = None, **options: float):
    """Images for `prompts` (prompt-major: all samples of the first prompt first).

    `latents`: the initial noise [N, h, w, c] (NHWC), like diffusers' pipelines; `output`:
    "pil" (list of PIL images) or "np" (uint8 [N, H, W, 3]).
    `image` (latent diffusion): img2img from a PIL image or uint8 / [0, 1] float array
    (one for every prompt, or one per prompt), `strength` in [0, 1] (default 0.8: how much
    of the schedule to rerun); with `mask_image` (white / 1 = repaint; default strength 1)
    inpainting.
    `control_image` (runs with ControlNets, e.g. from_diffusers(..., controlnet=...)): one
    image, or one per prompt; a list of those for several ControlNets; with
    `controlnet_conditioning_scale=` (a number or one per ControlNet).
    `num_candidates=N, rerank=K` (runs with a CLIP model, e.g. DALL-E): draw N images per
    prompt and return the K best by CLIP score, best first (K defaults to
    num_images_per_prompt). Further keyword settings go to the model's sampler as traced
    numbers, e.g. temperature, top_k, top_p for DALL-E.
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
    accepted = self._generate_options()
    unknown = sorted(set(options) - (accepted - _FIXED_ARGUMENTS))
    if unknown:
      raise ValueError(f"unknown sampling setting(s) {unknown} for a {self.config.task!r} "
                       f"run; it takes {sorted(accepted - _FIXED_ARGUMENTS)}")
    options = {k: v for k, v in options.items() if v is not None}
    if image is None and (mask_image is not None or strength is not None):
      raise ValueError("mask_image and strength need an image")
    if image is not None:
      if "image" not in accepted:
        raise ValueError(f"{self.config.task!r} runs do not take an image (img2img)")
      if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength} must be in [0, 1]")
      if strength is not None:
        options["strength"] = float(strength)
    keep = num_images_per_prompt if rerank is None else int(rerank)
    candidates = int(num_candidates or 1)
    if rerank is not None and num_images_per_prompt not in (1, keep):
      raise ValueError(f"rerank={rerank} and num_images_per_prompt={num_images_per_prompt} "
                       "disagree: rerank is the number of images kept per prompt")
    if candidates > 1:
      if "num_candidates" not in accepted:
        raise ValueError(f"{self.config.task!r} runs do not rerank (num_candidates)")
      if not 1 <= keep <= candidates:
        raise ValueError(f"rerank={keep} must be in [1, num_candidates={candidates}]")
      num_images_per_prompt = 1  # one row per prompt; the program returns its `keep` best
    else:
      keep = 1
    # Static guidance (a program without the unconditional branch at scale 1) for models that
    # support it; the others take the scale as a traced number.
    guided = scale != 1.0 or not getattr(self.task, "guidance_static", False)
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
    if negative_prompt is None and self.config.model.get("force_zeros_for_empty_prompt"):
      # SDXL: no negative prompt means a zero unconditional branch (an all-zero mask says so).
      neg_mask = np.zeros_like(neg_mask)
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
    program = self._program(padded, sampler, latents is not None, guided,
                            tuple(sorted(options)) + (image is not None, mask_image is not None,
                                                      control_image is not None),
                            candidates, keep)
    before = program._cache_size() if hasattr(program, "_cache_size") else None
    extra = {k: jnp.asarray(v, jnp.int32 if isinstance(v, int) else jnp.float32)
             for k, v in options.items()}
    if control_image is not None:
      if "control_image" not in accepted or not getattr(self.task, "controlnets", None):
        raise ValueError("control_image needs a model with a ControlNet (jaxt2i.from_diffusers"
                         "(..., controlnet=FOLDER))")
      several = len(self.task.controlnets) > 1
      if several and (not isinstance(control_image, (list, tuple))
                      or len(control_image) != len(self.task.controlnets)):
        raise ValueError(f"give one control image (or batch) per ControlNet: "
                         f"{len(self.task.controlnets)}")
      per_net = list(control_image) if several else [control_image]
      controls = [self._images(c, len(prompts), num_images_per_prompt, value_range=(0.0, 1.0))
                  for c in per_net]
      extra["control_image"] = put(np.stack(controls, axis=1))
    if image is not None:
      images = self._images(image, len(prompts), num_images_per_prompt)
      extra["image"] = put(images)
      if mask_image is not None:
        extra["inpaint_mask"] = put(self._latent_mask(mask_image, len(prompts),
                                                      num_images_per_prompt))
    images = program(self.params, put(tokens), put(mask), put(neg_tokens), put(neg_mask),
                     jax.random.key(seed), jnp.float32(scale), jnp.int32(steps),
                     jnp.float32(eta), latents, extra)
    if before is not None and program._cache_size() != before:
      self.num_compilations += 1
    images = np.asarray(jax.device_get(images))[:n * keep]
    if output == "np":
      return images
    from PIL import Image
    return [Image.fromarray(im) for im in images]


  # -- img2img / inpainting inputs ----------------------------------------------------------

  def _per_row(self, x: np.ndarray, num_prompts: int, per_prompt: int, what: str) -> np.ndarray:
    """One item ([H, W] masks, [H, W, C] images) or [1 | num_prompts, ...] of them -> one
    row per output image."""
    if x.ndim == (2 if what == "mask_image" else 3):
      x = x[None]
    if x.shape[0] == 1:
      x = np.repeat(x, num_prompts, 0)
    if x.shape[0] != num_prompts:
      raise ValueError(f"{x.shape[0]} {what}s for {num_prompts} prompts: give one, or one per "
                       "prompt")
    return np.repeat(x, per_prompt, 0)

  @staticmethod
  def _as_array(x: Any, mode: str) -> np.ndarray:
    from PIL import Image
    if isinstance(x, Image.Image):
      return np.asarray(x.convert(mode))
    if isinstance(x, (list, tuple)):
      return np.stack([Pipeline._as_array(v, mode) for v in x])
    return np.asarray(x)

  def _images(self, image: Any, num_prompts: int, per_prompt: int,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Images in the run's value range (or `value_range`), [N, size, size, 3] float32."""
    x = self._as_array(image, "RGB")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    x = self._per_row(x, num_prompts, per_prompt, "image")
    size = self.config.data.image_size
    if x.shape[1:] != (size, size, 3):
      raise ValueError(f"image has shape {x.shape[1:]}; this model takes {size}x{size} RGB "
                       "images (resize or crop them first)")
    low, high = value_range or self.config.data.value_range
    return low + (high - low) * np.clip(x, 0.0, 1.0)

  def _latent_mask(self, mask: Any, num_prompts: int, per_prompt: int) -> np.ndarray:
    """The repaint mask at latent size [N, h, w, 1] (1 = repaint), binarised at 0.5 and
    subsampled (nearest) as diffusers' inpainting pipeline does."""
    x = self._as_array(mask, "L")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim >= 3 and x.shape[-1] == 1:
      x = x[..., 0]
    x = self._per_row(x, num_prompts, per_prompt, "mask_image")
    size, f = self.config.data.image_size, self.task.autoencoder.downsample_factor
    if x.shape[1:] != (size, size):
      raise ValueError(f"mask_image has shape {x.shape[1:]}; expected {size}x{size}")
    return (x[:, ::f, ::f, None] >= 0.5).astype(np.float32)

  # -- LoRA -----------------------------------------------------------------------------------

  def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
    """Merges a LoRA file (diffusers / PEFT or kohya safetensors, see jaxt2i.convert.lora)
    into the weights, times `scale`; returns the number of adapted kernels. Several may be
    loaded; `unload_lora` takes them all out again."""
    from jaxt2i.convert import lora as lora_files
    from jaxt2i.convert.to_diffusers import lora_layouts
    from jaxt2i.models import lora
    if self.config.task != "latent_diffusion":
      raise ValueError(f"LoRA files adapt Stable Diffusion models, not {self.config.task!r} "
                       "runs")
    adapters = lora_files.read_lora(path, lora_layouts(self.task))
    self.params = jax.jit(lora.merge)(self.params, adapters, jnp.float32(scale))
    self._loaded_loras.append((adapters, scale))
    count = sum(1 for _ in jax.tree.leaves(adapters)) // 2
    logging.info("LoRA %s: %d kernels adapted (scale %g)", path, count, scale)
    return count

  def unload_lora(self) -> None:
    """Takes every loaded LoRA out of the weights again (up to float rounding)."""
    from jaxt2i.models import lora
    while self._loaded_loras:
      adapters, scale = self._loaded_loras.pop()
      self.params = jax.jit(lora.unmerge)(self.params, adapters, jnp.float32(scale))

  def save_lora(self, out: str | os.PathLike) -> str:
    """Writes a LoRA run's own adapters as diffusers LoRA weights (see
    jaxt2i.convert.to_diffusers.save_lora); returns the file."""
    from jaxt2i.convert.to_diffusers import save_lora
    if self.run_adapters is None:
      raise ValueError("this pipeline's run trained no LoRA adapters")
    return save_lora(self.task, {"lora": self.run_adapters}, out)

  def save_diffusers(self, out: str | os.PathLike) -> list[str]:
    """Writes this latent-diffusion model as a diffusers Stable Diffusion folder (see
    jaxt2i.convert.to_diffusers); returns the parts written."""
    from jaxt2i.convert.to_diffusers import save_diffusers
    return save_diffusers(self.config, self.task, self.params, out)


def load(workdir: str | os.PathLike, **kwargs) -> Pipeline:
  """A sampling pipeline for the run in `workdir` (see `Pipeline`)."""
  logging.info("loading %s", workdir)
  return Pipeline(workdir, **kwargs)
