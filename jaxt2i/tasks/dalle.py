"""Task: DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation"): a decoder-only
transformer over a caption's tokens followed by the image's discrete-VAE tokens.

    image -> frozen dVAE encoder -> argmax codes [h, w] (Sec. 2.1; trained by configs/dvae_shapes.py)
    caption -> sentencepiece ids, padding at position i the token text_vocab + i (Sec. 2.2);
               dropped to all padding with probability caption_dropout (classifier-free
               guidance on the logits at sampling)
    transformer(text, image) -> next-token logits; loss = 1/8 text CE + 7/8 image CE

Sampling (`generate`) draws every image token in one jitted loop with a key/value cache
(temperature, top-k, top-p, guidance), decodes the codes with the dVAE and, when the run has a
CLIP model (model.clip_workdir, configs/clip_shapes.py), draws `num_candidates` images per
caption and keeps the best by CLIP score (Sec. 2.5's reranking).

The frozen dVAE's (and CLIP's) params are copied from their runs into this run's state and never
updated (Task.frozen_keys); their run configs are copied into model.dvae / model.clip, so a
workdir is self-contained: `jaxt2i eval` and `jaxt2i.load` need nothing but it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxt2i.models import transformer as transformer_lib
from jaxt2i.models.attention import PATTERNS
from jaxt2i.tasks.base import Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError


def frozen_run(workdir: str, expected_task: str, field: str) -> tuple[dict, PyTree]:
  """(config.json as a dict, float32 numpy params) of a trained run used as a frozen part."""
  from jaxt2i.eval.runner import load_run
  from jaxt2i.training.config import to_json_dict
  if not epath.Path(workdir).exists():
    raise ConfigError(f"config.model.{field}={workdir}: no such directory")
  config, _, params = load_run(workdir, ema=True)
  if config.task != expected_task:
    raise ConfigError(f"config.model.{field}={workdir} is a {config.task!r} run, not "
                      f"{expected_task!r}")
  return to_json_dict(config), jax.tree.map(np.asarray, jax.device_get(params))


def task_from_json(values: dict) -> Task:
  """The Task of a run from its saved config (a dict)."""
  from jaxt2i.tasks.base import get_task
  from jaxt2i.training.config import from_json_dict
  return get_task(from_json_dict(values))


@register
class DalleTask(Task):
  name = "dalle"
  # Pipelines compile separate programs with and without the unconditional branch, so unguided
  # sampling (the paper's) costs one transformer pass per token, not two.
  guidance_static = True

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.dvae_workdir = ""              # the trained discrete VAE (configs/dvae_shapes.py)
    m.dvae = ml_collections.ConfigDict()  # its run config, copied from that run
    m.clip_workdir = ""              # optional: a CLIP run (configs/clip_shapes.py) for reranking
    m.clip = ml_collections.ConfigDict()  # its run config, copied from that run
    # Transformer (the text length is config.data.max_caption_length, the text vocabulary
    # config.data.vocab_size, the image grid the dVAE's).
    m.width = 256
    m.depth = 8
    m.num_heads = 8
    m.mlp_ratio = 4
    m.attention_patterns = ()        # per layer row | column | conv | dense; () = the paper's
    m.conv_kernel = 11               # window of conv layers (paper: 11 x 11 at 32 x 32 tokens)
    m.attention_implementation = "auto"  # auto | einsum | xla | cudnn | splash (auto on TPUs)
    m.remat = False                  # recompute block activations in the backward pass
    m.remat_policy = "full"          # what remat keeps: full (nothing) | dots | dots_no_batch
    m.scan_layers = False            # nn.scan over the pattern's period: compile time flat in depth
    m.text_loss_weight = 1.0 / 8     # paper: 1/8 text, 7/8 image
    m.caption_dropout = 0.1          # for classifier-free guidance; 0 = the paper's training
    # Sampling defaults (the eval hook, `jaxt2i eval`, the pipeline).
    m.temperature = 1.0
    m.top_k = 0                      # 0: no top-k filter
    m.top_p = 1.0                    # 1: no nucleus filter
    m.guidance_scale = 1.0           # 1: no guidance (one branch)
    m.num_candidates = 1             # images drawn per caption; the CLIP-best is kept
    return m

  def validate(self) -> None:
    super().validate()
    m = self.config.model
    if not m.dvae_workdir and not m.dvae:
      raise ConfigError("config.model.dvae_workdir is empty: train the discrete VAE "
                        "(configs/dvae_shapes.py) and point this at its workdir")
    for name in ("width", "depth", "num_heads", "mlp_ratio", "num_candidates"):
      if isinstance(m[name], bool) or not isinstance(m[name], int) or m[name] < 1:
        raise ConfigError(f"config.model.{name}={m[name]!r}: must be a positive int")
    if m.width % m.num_heads:
      raise ConfigError(f"config.model.width={m.width} is not divisible by "
                        f"config.model.num_heads={m.num_heads}")
    patterns = tuple(m.attention_patterns)
    if patterns and len(patterns) != m.depth:
      raise ConfigError(f"config.model.attention_patterns has {len(patterns)} entries for "
                        f"depth {m.depth}")
    bad = [p for p in patterns if p not in PATTERNS]
    if bad:
      raise ConfigError(f"config.model.attention_patterns: unknown {bad}; choose from "
                        f"{list(PATTERNS)}")
    if not 0.0 <= m.text_loss_weight <= 1.0:
      raise ConfigError(f"config.model.text_loss_weight={m.text_loss_weight}: must be in [0, 1]")
    if not 0.0 <= m.caption_dropout < 1.0:
      raise ConfigError(f"config.model.caption_dropout={m.caption_dropout}: must be in [0, 1)")
    if not m.temperature > 0:
      raise ConfigError(f"config.model.temperature={m.temperature}: must be > 0")
    if m.top_k < 0 or not 0.0 < m.top_p <= 1.0:
      raise ConfigError(f"config.model.top_k={m.top_k} / top_p={m.top_p}: need top_k >= 0 "
                        "and 0 < top_p <= 1")
    if m.num_candidates > 1 and not (m.clip_workdir or m.clip):
      raise ConfigError(f"config.model.num_candidates={m.num_candidates} needs a CLIP run to "
                        "rank the candidates: set config.model.clip_workdir")

  # -- frozen parts ----------------------------------------------------------------------------

  def _load(self, part: str, expected: str) -> tuple[dict, PyTree]:
    """(run config dict, numpy params) of the dVAE or CLIP run, read once; copies the run's
    config into model.<part>."""
    cache = self.__dict__.setdefault("_frozen", {})
    if part not in cache:
      cache[part] = frozen_run(self.config.model[f"{part}_workdir"], expected, f"{part}_workdir")
      with self.config.unlocked():
        self.config.model[part] = ml_collections.ConfigDict(cache[part][0])
    return cache[part]

  def _part_config(self, part: str, expected: str) -> dict | None:
    m = self.config.model
    if m[part]:
      return m[part].to_dict()
    if m[f"{part}_workdir"]:
      return self._load(part, expected)[0]
    return None

  def prepare(self, batch: Batch) -> None:
    """Before the first init (outside any trace): read the dVAE and CLIP runs."""
    del batch
    self._load("dvae", "dvae")
    if self.config.model.clip_workdir:
      self._load("clip", "clip")
      self._check_clip()

  def _check_clip(self) -> None:
    clip, data = self.clip_task.config.data, self.config.data
    for field in ("vocab_size", "max_caption_length"):
      if clip[field] != data[field]:
        raise ConfigError(f"the CLIP run has data.{field}={clip[field]} but this run "
                          f"{data[field]}: rerank with a CLIP trained on the same tokenization")

  @functools.cached_property
  def dvae_task(self) -> Task:
    return task_from_json(self._part_config("dvae", "dvae"))

  @functools.cached_property
  def clip_task(self) -> Task | None:
    values = self._part_config("clip", "clip")
    return None if values is None else task_from_json(values)

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    return ("dvae", "clip") if self.clip_task is not None else ("dvae",)

  def with_clip(self, params: PyTree, clip_workdir: str) -> PyTree:
    """`params` with the CLIP run in `clip_workdir` as the reranker (replacing the run's own, if
    it was trained with one): CLIP is independent of the transformer, so it may be trained
    after it. Sets config.model.clip_workdir / clip in memory; checkpoints are untouched."""
    m = self.config.model
    self.__dict__.setdefault("_frozen", {}).pop("clip", None)
    self.__dict__.pop("clip_task", None)
    with self.config.unlocked():
      m.clip_workdir, m.clip = str(clip_workdir), ml_collections.ConfigDict()
    clip = self._load("clip", "clip")[1]
    self._check_clip()
    return {**params, "clip": clip}

  def initial_values(self) -> dict[str, PyTree]:
    values = {"dvae": self._load("dvae", "dvae")[1]["dvae"]}
    if self.config.model.clip_workdir:
      values["clip"] = self._load("clip", "clip")[1]
    return values

  # -- the transformer -------------------------------------------------------------------------

  @property
  def grid(self) -> tuple[int, int]:
    d = self.dvae_task.config
    side = d.data.image_size // d.model.downsample_factor
    return side, side

  @property
  def transformer(self) -> transformer_lib.Transformer:
    m = self.config.model
    size, dvae_size = self.config.data.image_size, self.dvae_task.config.data.image_size
    if size != dvae_size:
      raise ConfigError(f"config.data.image_size={size} but the dVAE run was trained at "
                        f"{dvae_size}")
    return transformer_lib.Transformer(
        text_vocab=self.config.data.vocab_size,
        image_vocab=self.dvae_task.config.model.vocab_size,
        text_len=self.config.data.max_caption_length, grid=self.grid, width=m.width,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        attention_patterns=tuple(m.attention_patterns) or None, conv_kernel=m.conv_kernel,
        attention_implementation=m.attention_implementation, remat=m.remat,
        remat_policy=m.remat_policy, scan_layers=m.scan_layers, dtype=self.compute_dtype)

  def text_stream(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Tokenizer output -> the stream's text: padding position i becomes text_vocab + i."""
    pads = self.config.data.vocab_size + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return jnp.where(mask.astype(bool), tokens.astype(jnp.int32), pads[None])

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    r1, r2, r3 = jax.random.split(rng, 3)
    b = batch["tokens"].shape[0]
    model = self.transformer
    text = self.text_stream(batch["tokens"], batch["tokens_mask"])
    params = {"transformer": model.init(r1, text, jnp.zeros((b,) + self.grid, jnp.int32)
                                        )["params"]}
    # Replaced by the trained runs in a fresh run (initial_values), then frozen.
    params["dvae"] = self.dvae_task.init(r2, batch)["dvae"]
    if self.clip_task is not None:
      params["clip"] = self.clip_task.init(r3, batch)
    return params

  def image_tokens(self, params: PyTree, images: jax.Array) -> jax.Array:
    dvae = jax.lax.stop_gradient({"dvae": params["dvae"]})
    return jax.lax.stop_gradient(self.dvae_task.encode_tokens(dvae, images))

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    m = self.config.model
    codes = self.image_tokens(params, batch["image"])
    keep = jax.random.uniform(rng, (codes.shape[0], 1)) >= m.caption_dropout
    text = self.text_stream(batch["tokens"], batch["tokens_mask"] * keep)
    text_logits, image_logits = self.transformer.apply({"params": params["transformer"]},
                                                       text, codes)
    loss, metrics = transformer_lib.loss(text_logits, image_logits, text, codes,
                                         m.text_loss_weight)
    image_accuracy = jnp.mean(jnp.argmax(image_logits, -1) == codes.reshape(codes.shape[0], -1))
    return loss, {**metrics, "image_accuracy": image_accuracy}

  # -- sampling --------------------------------------------------------------------------------

  def generate(self, params: PyTree, tokens: jax.Array, mask: jax.Array, rng: jax.Array, *,
               guidance_scale: Any = None, num_steps: Any = None, sampler: str | None = None,
               eta: Any = 0.0, negative_tokens: jax.Array | None = None,
               negative_mask: jax.Array | None = None, latents: jax.Array | None = None,
               temperature: Any = None, top_k: Any = None, top_p: Any = None,
               num_candidates: int = 1, keep: int = 1) -> jax.Array:
    """uint8 images [B * keep, H, W, 3] (caption-major) for token batches [B, L].

    guidance_scale None samples without guidance (one branch); a number (may be traced) runs
    the unconditional branch on `negative_tokens` (default: the empty caption). With
    num_candidates > 1 (static) each caption draws that many images and the `keep` best by
    CLIP score are returned, best first. num_steps / sampler / eta (diffusion settings) are
    ignored; `latents` are not accepted.
    """
    del num_steps, sampler, eta
    if latents is not None:
      raise ValueError("DALL-E sampling takes no initial latents (it draws discrete tokens)")
    if not 1 <= keep <= num_candidates:
      raise ValueError(f"keep={keep} must be in [1, num_candidates={num_candidates}]")
    if num_candidates > 1 and self.clip_task is None:
      raise ValueError(f"num_candidates={num_candidates} needs a CLIP model to rank the "
                       "candidates: train the run with model.clip_workdir, or attach a CLIP "
                       "run when loading (jaxt2i.load(workdir, clip_workdir=DIR), "
                       "`--clip_workdir DIR`)")
    m = self.config.model
    model = self.transformer
    text = self.text_stream(tokens, mask)
    uncond = None
    if guidance_scale is not None:
      if negative_tokens is None:
        negative_tokens, negative_mask = jnp.zeros_like(tokens), jnp.zeros_like(mask)
      uncond = self.text_stream(negative_tokens, negative_mask)
    codes = transformer_lib.generate(
        model, params["transformer"], text, rng, num_samples=num_candidates,
        temperature=m.temperature if temperature is None else temperature,
        top_k=m.top_k if top_k is None else top_k, top_p=m.top_p if top_p is None else top_p,
        guidance_scale=guidance_scale, unconditional=uncond)
    b = tokens.shape[0]
    codes = codes.reshape(b * num_candidates, *self.grid)
    images = self.dvae_task.decode_tokens({"dvae": params["dvae"]}, codes)
    low, high = self.config.data.value_range
    images = jnp.clip((images - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(jnp.uint8)
    if num_candidates == 1:
      return images
    scores = self.clip_task.score(params["clip"], images,
                                  jnp.repeat(tokens, num_candidates, axis=0),
                                  jnp.repeat(mask, num_candidates, axis=0))
    _, best = jax.lax.top_k(scores.reshape(b, num_candidates), keep)
    images = images.reshape(b, num_candidates, *images.shape[1:])
    images = jnp.take_along_axis(images, best[:, :, None, None, None], axis=1)
    return images.reshape(b * keep, *images.shape[2:])

  def sample(self, params: PyTree, batch: Batch, rng: jax.Array) -> jax.Array:
    m = self.config.model
    scale = None if m.guidance_scale == 1.0 else m.guidance_scale
    return self.generate(params, batch["tokens"], batch["tokens_mask"], rng,
                         guidance_scale=scale, num_candidates=m.num_candidates)

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    loss, metrics = self.loss(params, batch, rng)
    n = min(8, batch["tokens"].shape[0])
    m = self.config.model
    scale = None if m.guidance_scale == 1.0 else m.guidance_scale
    images = self.generate(params, batch["tokens"][:n], batch["tokens_mask"][:n], rng,
                           guidance_scale=scale)
    low, high = self.config.data.value_range
    reference = jnp.clip((batch["image"][:n] - low) / (high - low) * 255 + 0.5, 0,
                         255).astype(jnp.uint8)
    return {"loss": loss, **metrics, "samples": images, "reference": reference}
