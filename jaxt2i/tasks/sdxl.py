"""Stable Diffusion XL (Podell et al., 2023) from a local diffusers folder: the sampling task.

    pipe = jaxt2i.from_diffusers("path/to/stable-diffusion-xl-base-1.0")
    images = pipe(["an astronaut riding a horse"], seed=0, steps=30, guidance_scale=5.0)

`StableDiffusionXLPipeline.save_pretrained` writes what SD 1.x / 2.x folders hold plus
text_encoder_2/ (a CLIPTextModelWithProjection) and tokenizer_2/. jaxt2i.from_diffusers
(convert/diffusers_pipeline.py, convert/diffusers_sdxl.py) recognises the folder and
builds a run of the task below,
"stable_diffusion_xl": LatentDiffusionTask with SDXL's text conditioning (Sec. 2.1-2.2):

  prompt -> tokenizer   -> text_encoder   -> hidden_states[-2] [B, L, D1] --+-> concat on
         -> tokenizer_2 -> text_encoder_2 -> hidden_states[-2] [B, L, D2] --+   features
                                          -> text_projection(pooled) [B, P] = text_embeds
  time_ids = (original height, width, crop top, left, target height, width) per image
  U-Net(x_t, t, states, text_embeds, time_ids)   (addition_embed_type="text_time")

The pipeline hands the task both tokenizers' rows side by side ([B, 2L] tokens: tokenizer's,
then tokenizer_2's). Classifier-free guidance follows diffusers: with
force_zeros_for_empty_prompt (model_index.json; SDXL base: true) and no negative prompt,
the unconditional states and text_embeds are zeros, which the pipeline signals with an
all-zero negative mask; otherwise the negative prompt (or "") is encoded like the prompt.

Sampling only (text-to-image): training, LoRA, ControlNet, img2img / inpainting and the
refiner (no text_encoder/, aesthetic-score time ids) are not implemented for SDXL.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxt2i.diffusion import samplers
from jaxt2i.models.text_encoder import CLIPTextTransformer
from jaxt2i.tasks.base import Batch, PyTree, register
from jaxt2i.tasks.ldm import LatentDiffusionTask
from jaxt2i.training.config import ConfigError


def default_time_ids(height: Any, width: Any, original_size: Any = None,
                     crops_coords_top_left: Any = None, target_size: Any = None) -> jax.Array:
  """SDXL's six size numbers [6]: (original h, w, crop top, left, target h, w), by default
  (h, w, 0, 0, h, w) as StableDiffusionXLPipeline does for an h x w image."""
  size = jnp.stack([jnp.asarray(height, jnp.float32), jnp.asarray(width, jnp.float32)])

  def pair(value, default):
    return default if value is None else jnp.broadcast_to(jnp.asarray(value, jnp.float32), (2,))
  return jnp.concatenate([pair(original_size, size),
                          pair(crops_coords_top_left, jnp.zeros((2,), jnp.float32)),
                          pair(target_size, size)])


@register
class StableDiffusionXLTask(LatentDiffusionTask):
  """SDXL base sampling over converted weights (see the module docstring). Params:
  {"unet", "text_encoder", "text_encoder_2", "autoencoder"}."""
  name = "stable_diffusion_xl"

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = super().default_model_config()
    m.text_encoder = "clip"
    m.clip_text_2 = ml_collections.ConfigDict()  # CLIPTextTransformer fields, projection_dim > 0
    m.tokenizer_2 = ""               # tokenizer_2/ folder (CLIP BPE; SDXL pads it with "!")
    # diffusers' force_zeros_for_empty_prompt: without a negative prompt, guidance's
    # unconditional branch gets zero states and text_embeds instead of encoding "".
    m.force_zeros_for_empty_prompt = True
    return m

  def validate(self) -> None:
    super().validate()
    m = self.config.model
    if m.text_encoder != "clip" or not m.clip_text_2 or not m.clip_text_2.get("projection_dim"):
      raise ConfigError("stable_diffusion_xl needs config.model.text_encoder='clip', clip_text "
                        "and clip_text_2 (with projection_dim): SDXL's two CLIP text encoders")
    if m.clip_text.get("max_position_embeddings", 77) != m.clip_text_2.get(
        "max_position_embeddings", 77):
      raise ConfigError("SDXL's two text encoders must take the same number of tokens (their "
                        "states are concatenated on features)")
    if not m.unet or m.unet.get("addition_embed_type") != "text_time":
      raise ConfigError("stable_diffusion_xl needs config.model.unet with "
                        "addition_embed_type='text_time'")
    if m.lora_rank or m.controlnets or m.control_image:
      raise ConfigError("LoRA and ControlNet are not implemented for stable_diffusion_xl")

  @property
  def text_width(self) -> int:
    m = self.config.model
    return m.clip_text.hidden_size + m.clip_text_2.hidden_size

  @property
  def text_encoder_2(self) -> CLIPTextTransformer:
    m = self.config.model
    return CLIPTextTransformer(**m.clip_text_2.to_dict(),
                               attention_implementation=m.attention_implementation,
                               dtype=self.compute_dtype)

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    return ("autoencoder", "text_encoder", "text_encoder_2")

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    """Random params of every part (the shapes a converted folder fills)."""
    r1, r2, r3, r4 = jax.random.split(rng, 4)
    tokens = batch["tokens"]
    length = tokens.shape[1] // 2
    b = tokens.shape[0]
    text = self.text_encoder.init(r1, tokens[:, :length])["params"]
    text_2 = self.text_encoder_2.init(r2, tokens[:, length:])["params"]
    unet = self.unet
    pooled = self.config.model.clip_text_2.projection_dim
    unet_params = unet.init(
        r3, jnp.zeros((b,) + self.latent_shape()), jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, length, self.text_width)), text_embeds=jnp.zeros((b, pooled)),
        time_ids=jnp.zeros((b, 6)))["params"]
    size = self.config.data.image_size
    ae = self.autoencoder.init(r4, jnp.zeros((1, size, size, 3)))["params"]
    return {"unet": unet_params, "text_encoder": text, "text_encoder_2": text_2,
            "autoencoder": ae}

  def encode_prompts(self, params: PyTree, tokens: jax.Array, mask: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """tokens [B, 2L] (tokenizer's row, then tokenizer_2's) -> (states [B, L, D1 + D2]: both
    encoders' penultimate hidden states, not final-normed; text_embeds [B, P]: text_encoder_2's
    projected pooled state). Rows whose mask is all zero (no negative prompt, with
    force_zeros_for_empty_prompt) get zeros for both."""
    length = tokens.shape[1] // 2
    one = self.text_encoder.apply({"params": params["text_encoder"]}, tokens[:, :length],
                                  output_hidden_states=True)
    two = self.text_encoder_2.apply({"params": params["text_encoder_2"]}, tokens[:, length:],
                                    output_hidden_states=True)
    states = jnp.concatenate([one["hidden_states"][-2], two["hidden_states"][-2]], axis=-1)
    pooled = two["text_embeds"]
    if self.config.model.force_zeros_for_empty_prompt:
      keep = jnp.any(mask != 0, axis=-1)
      states = jnp.where(keep[:, None, None], states, 0).astype(states.dtype)
      pooled = jnp.where(keep[:, None], pooled, 0).astype(pooled.dtype)
    return states, pooled

  def encode_text(self, params: PyTree, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return self.encode_prompts(params, tokens, mask)[0]

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    raise NotImplementedError("training Stable Diffusion XL is not implemented (sampling only)")

  def generate(self, params: PyTree, tokens: jax.Array, mask: jax.Array, rng: jax.Array, *,
               guidance_scale: Any = None, num_steps: Any = None, sampler: str | None = None,
               eta: Any = 0.0, negative_tokens: jax.Array | None = None,
               negative_mask: jax.Array | None = None, latents: jax.Array | None = None,
               guidance_rescale: Any = 0.0, original_size: Any = None,
               crops_coords_top_left: Any = None, target_size: Any = None) -> jax.Array:
    """uint8 images [B, H, W, 3] from [B, 2L] token rows (see encode_prompts); every numeric
    argument may be traced.

    Guidance: both halves in one U-Net call per step, [unconditional; prompt], each with its
    text_embeds and the same time ids. No negative tokens: the empty prompt's rows (zeros
    with force_zeros_for_empty_prompt). `original_size`, `crops_coords_top_left`,
    `target_size` ((h, w) / (top, left) pixel pairs) override the default time ids
    (h, w, 0, 0, h, w) of the output size, as in StableDiffusionXLPipeline.
    """
    m = self.config.model
    zeros_branch = negative_tokens is None and m.force_zeros_for_empty_prompt
    guidance_scale, num_steps, sampler, r_loop, latents, negative_tokens, negative_mask = (
        self._sampling_inputs(tokens, mask, rng, guidance_scale, num_steps, sampler, latents,
                              negative_tokens, negative_mask))
    if zeros_branch:
      negative_mask = jnp.zeros_like(negative_mask)
    b = tokens.shape[0]
    context, text_embeds = self.encode_prompts(
        params, jnp.concatenate([negative_tokens, tokens]),
        jnp.concatenate([negative_mask, mask]))
    factor = self.autoencoder.downsample_factor
    time_ids = default_time_ids(latents.shape[1] * factor, latents.shape[2] * factor,
                                original_size, crops_coords_top_left, target_size)
    time_ids = jnp.broadcast_to(time_ids, (2 * b, time_ids.shape[0]))

    def both(x, t):
      return self.unet.apply({"params": params["unet"]}, x, t, context,
                             text_embeds=text_embeds, time_ids=time_ids).astype(jnp.float32)

    denoise = samplers.guided(both, guidance_scale, guidance_rescale)
    out = samplers.sample(denoise, self.schedule, latents, r_loop, sampler=sampler,
                          num_steps=num_steps, eta=eta if sampler == "ddim" else 0.0,
                          set_alpha_to_one=m.set_alpha_to_one,
                          timestep_spacing=m.timestep_spacing or None,
                          steps_offset=m.steps_offset)
    return self.decode_latents(params, out)
