"""Task: latent diffusion (Rombach et al. 2022): a text-conditioned U-Net denoising the latents
of a frozen, separately trained autoencoder.

    image -> frozen encoder -> latents * scale -> add noise at t ~ U{0..T-1}
    caption -> text encoder (trained jointly; dropped to the empty caption with probability
               caption_dropout, for classifier-free guidance) -> per-token states
    U-Net(x_t, t, states) -> eps / x0 / v; loss = weight(t) * ||output - target||^2

The autoencoder's params are copied from its run (model.autoencoder_workdir) into this run's
state under "autoencoder" and never updated (Task.frozen_keys), so a workdir is self-contained:
`jaxt2i eval` and the sampling API need nothing but it.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax.core import meta

from jaxt2i.diffusion import samplers, schedules
from jaxt2i.models import lora
from jaxt2i.models.autoencoder import Autoencoder
from jaxt2i.models.controlnet import ControlNet, params_from_unet, sum_residuals
from jaxt2i.models.text_encoder import CLIPTextTransformer, TextEncoder
from jaxt2i.models.unet import UNet
from jaxt2i.tasks.base import Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError

# Autoencoder model fields read from its run's config.json.
_AE_FIELDS = ("kind", "latent_channels", "block_out_channels", "layers_per_block", "norm_groups",
              "mid_attention", "num_codes", "vq_beta", "vq_l2_normalize", "vq_ema_decay")


def autoencoder_from_config(model_cfg: Any, dtype: Any = jnp.float32) -> Autoencoder:
  m = model_cfg
  return Autoencoder(kind=m["kind"], latent_channels=m["latent_channels"],
                     block_out_channels=tuple(m["block_out_channels"]),
                     layers_per_block=m["layers_per_block"], groups=m["norm_groups"],
                     mid_attention=m.get("mid_attention", True),
                     num_codes=m.get("num_codes", 1024), vq_beta=m.get("vq_beta", 0.25),
                     vq_l2_normalize=m.get("vq_l2_normalize", False),
                     vq_ema_decay=m.get("vq_ema_decay", 0.0),
                     in_channels=m.get("in_channels", 3), dtype=dtype)


def _mask(images: jax.Array) -> jax.Array:
  """1 where a pixel differs from the black background (shapes-v1 objects)."""
  inside = jnp.max(images, axis=-1, keepdims=True) > 0.1
  return jnp.broadcast_to(inside, images.shape[:-1] + (3,)).astype(jnp.float32)


def _edges(images: jax.Array) -> jax.Array:
  """Sobel gradient magnitude of the grey image, thresholded at 0.25: 1 on edges."""
  grey = jnp.mean(images, axis=-1)
  padded = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")

  def at(dy, dx):
    return padded[:, 1 + dy:padded.shape[1] - 1 + dy, 1 + dx:padded.shape[2] - 1 + dx]
  gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
  gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
  edges = jnp.sqrt(gx ** 2 + gy ** 2) > 0.25
  return jnp.broadcast_to(edges[..., None], images.shape[:-1] + (3,)).astype(jnp.float32)


# How ControlNet training derives a control image from each image in [0, 1].
CONTROL_IMAGES = {"mask": _mask, "edges": _edges}


@register
class LatentDiffusionTask(Task):
  name = "latent_diffusion"
  derived_fields = ("latent_scale",)

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.autoencoder_workdir = ""       # the trained first stage (configs/autoencoder_shapes.py)
    # A diffusers Stable Diffusion folder whose U-Net, VAE and CLIP text encoder a fresh run
    # starts from (configs/sd_finetune.py; the other fields then describe that folder).
    m.pretrained = ""
    m.autoencoder = ml_collections.ConfigDict()  # its model fields, copied from that run
    m.latent_scale = 0.0             # latents are multiplied by this; 0 = 1/std measured at start
    # Text encoder: "jaxt2i" (models/text_encoder.TextEncoder over the run's sentencepiece
    # tokens, the fields below) or "clip" (CLIPTextTransformer with the `clip_text` fields, over
    # CLIP BPE tokens: Stable Diffusion's, see jaxt2i.from_diffusers).
    m.text_encoder = "jaxt2i"
    m.clip_text = ml_collections.ConfigDict()
    m.text_width = 256
    m.text_depth = 4
    m.text_heads = 4
    m.text_trainable = True          # False keeps the text encoder at its initial weights
    # The token row of the empty prompt (CLIP: start, end, padding), the unconditional input
    # of guidance and of caption dropout; () = all padding (jaxt2i's own text encoder).
    m.unconditional_tokens = ()     # (its mask: the row's length; CLIP reads no mask)
    # U-Net: the fields below, or all UNet fields at once in `unet` (e.g. SD's, from its
    # diffusers config) when that is set.
    m.unet = ml_collections.ConfigDict()
    # ControlNets beside the U-Net: name -> ControlNet fields (jaxt2i.from_diffusers(...,
    # controlnet=FOLDER) fills it); their params are the run's `name` subtrees.
    m.controlnets = ml_collections.ConfigDict()
    # LoRA (models/lora.py): lora_rank > 0 trains low-rank adapters on the U-Net's attention
    # projections (and the text encoder's, with lora_text_encoder) and nothing else. The base
    # model (model.pretrained) stays out of the optimizer and the checkpoints, which hold the
    # adapters alone; it is read from the folder again on resume and for sampling.
    m.lora_rank = 0
    m.lora_alpha = 0.0               # updates are scaled by alpha / rank; 0 = rank (scale 1)
    m.lora_targets = lora.ATTENTION_TARGETS  # module names adapted (regex, full match)
    m.lora_text_encoder = False
    # A trained latent-diffusion run (its EMA weights) that a LoRA or ControlNet run adapts,
    # as model.pretrained does for a diffusers folder; its model fields are this run's
    # (configs/controlnet_shapes.py copies them).
    m.base_workdir = ""
    # ControlNet training: "" off, else how each training image becomes its control image
    # ("mask": where it differs from the black background; "edges": Sobel edges), [0, 1],
    # 3 channels. The one ControlNet of model.controlnets trains, initialised from the base
    # U-Net's encoder with zero convolutions; the base is constant.
    m.control_image = ""
    m.block_out_channels = (64, 128, 256)
    m.layers_per_block = 2
    m.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    m.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    m.attention_head_dim = 8         # heads per attention, as SD 1.x configs say it
    m.transformer_layers_per_block = 1
    m.use_linear_projection = True
    m.norm_num_groups = 32
    # Append each latent pixel's (x, y) to conv_in's input (models/unet.py): absolute position
    # for captions that name places. Not a diffusers U-Net field (no export with it).
    m.position_channels = False
    m.attention_implementation = "auto"
    m.remat_policy = ""              # U-Net / ControlNet remat: "" | full | dots | dots_no_batch
    # Diffusion.
    m.schedule = "scaled_linear"     # linear | scaled_linear | cosine
    m.num_train_timesteps = 1000
    m.beta_start = 0.00085
    m.beta_end = 0.012
    m.prediction_type = "epsilon"    # epsilon | sample | v_prediction
    m.rescale_zero_terminal_snr = False
    # Divide every timestep's SNR by snr_shift^2 (diffusion/schedules.make_schedule): for small
    # latents, whose objects the unshifted schedule never fully hides. 1 = off.
    m.snr_shift = 1.0
    m.loss_weighting = "uniform"     # uniform | min_snr
    m.snr_gamma = 5.0
    m.caption_dropout = 0.1          # classifier-free guidance training
    # Sampling defaults (the eval hook, `jaxt2i eval`, the pipeline).
    m.sampler = "ddim"               # ddim | ddpm | dpmpp_2m
    m.timestep_spacing = ""          # leading | trailing | linspace; '' = the sampler's default
    m.steps_offset = 0               # diffusers' steps_offset (Stable Diffusion: 1)
    m.set_alpha_to_one = True        # DDIM's final alpha-bar (Stable Diffusion: False)
    m.num_sampling_steps = 50
    m.guidance_scale = 5.0
    return m

  def validate(self) -> None:
    super().validate()
    m = self.config.model
    if not m.autoencoder_workdir and not m.autoencoder:
      raise ConfigError("config.model.autoencoder_workdir is empty: train the first stage "
                        "(configs/autoencoder_shapes.py) and point this at its workdir")
    if not 0.0 <= m.caption_dropout < 1.0:
      raise ConfigError(f"config.model.caption_dropout={m.caption_dropout}: must be in [0, 1)")
    if m.sampler not in samplers.SAMPLERS:
      raise ConfigError(f"config.model.sampler={m.sampler!r}: choose one of "
                        f"{list(samplers.SAMPLERS)}")
    if m.text_encoder not in ("jaxt2i", "clip"):
      raise ConfigError(f"config.model.text_encoder={m.text_encoder!r}: choose 'jaxt2i' or "
                        "'clip'")
    if m.text_encoder == "clip" and not m.clip_text:
      raise ConfigError("config.model.text_encoder='clip' needs config.model.clip_text (the "
                        "CLIPTextTransformer fields)")
    if not m.unet and (len(m.down_block_types) != len(m.block_out_channels)
                       or len(m.up_block_types) != len(m.block_out_channels)):
      raise ConfigError("config.model.down_block_types / up_block_types need one entry per "
                        f"block_out_channels entry ({len(m.block_out_channels)})")
    if m.lora_rank < 0:
      raise ConfigError(f"config.model.lora_rank={m.lora_rank}: must be >= 0 (0: no LoRA)")
    if (m.lora_rank or m.control_image) and not (m.pretrained or m.base_workdir):
      raise ConfigError("LoRA (config.model.lora_rank > 0) and ControlNet training "
                        "(config.model.control_image) adapt a trained model: set "
                        "config.model.pretrained (a diffusers folder, configs/sd_lora.py) or "
                        "config.model.base_workdir (a jaxt2i run, configs/controlnet_shapes.py)")
    if m.control_image not in ("", *CONTROL_IMAGES):
      raise ConfigError(f"config.model.control_image={m.control_image!r}: choose '' (off) or "
                        f"one of {list(CONTROL_IMAGES)}")
    if m.control_image and len(m.controlnets) != 1:
      raise ConfigError("config.model.control_image trains one ControlNet: config.model."
                        f"controlnets has {len(m.controlnets)}")
    self.schedule  # unknown schedule / prediction type raise here  # noqa: B018

  # -- the frozen first stage ------------------------------------------------------------------

  @property
  def adapts_base(self) -> bool:
    """LoRA or ControlNet training: a trained base, constant, and only new weights trained."""
    return bool(self.config.model.lora_rank or self.config.model.control_image)

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    if self.adapts_base:
      return ()  # all base weights are constants
    return ("autoencoder",) if self.config.model.text_trainable else ("autoencoder",
                                                                      "text_encoder")

  @property
  def constant_keys(self) -> tuple[str, ...]:
    """With LoRA or ControlNet training: every base subtree (trained: `lora`, or the
    ControlNet)."""
    if not self.adapts_base:
      return ()
    keys = ("unet", "text_encoder", "autoencoder")
    if self.config.model.lora_rank:
      keys += tuple(sorted(self.config.model.controlnets))
    return keys

  @property
  def lora_scale(self) -> float:
    m = self.config.model
    return (m.lora_alpha or m.lora_rank) / m.lora_rank if m.lora_rank else 1.0

  def with_lora(self, params: PyTree) -> PyTree:
    """`params` with the run's LoRA adapters (params["lora"]) merged into their kernels;
    params without adapters unchanged."""
    if "lora" not in params:
      return params
    base = {k: v for k, v in params.items() if k != "lora"}
    return lora.merge(base, params["lora"], self.lora_scale)

  def _autoencoder_run(self) -> tuple[dict, Any]:
    """(model fields, float32 numpy params) of the first stage, read once."""
    if getattr(self, "_ae_cache", None) is None:
      from jaxt2i.eval.runner import load_run
      workdir = epath.Path(self.config.model.autoencoder_workdir)
      config, task, params = load_run(workdir, ema=False)
      if config.task != "autoencoder":
        raise ConfigError(f"config.model.autoencoder_workdir={workdir} is a {config.task!r} "
                          "run, not an autoencoder")
      defaults = task.default_model_config()
      fields = {k: config.model.get(k, defaults[k]) for k in _AE_FIELDS}
      self._ae_cache = (fields, jax.tree.map(np.asarray, jax.device_get(params["autoencoder"])))
      with self.config.unlocked():
        self.config.model.autoencoder = ml_collections.ConfigDict(fields)
    return self._ae_cache

  @property
  def autoencoder(self) -> Autoencoder:
    m = self.config.model
    fields = m.autoencoder.to_dict() if m.autoencoder else self._autoencoder_run()[0]
    return autoencoder_from_config(fields, self.compute_dtype)

  def prepare(self, batch: Batch) -> None:
    """Before the first init: read the autoencoder run and measure the latent scale on a
    (preprocessed) batch: the SD recipe, 1 / std of the latents, so the diffusion sees unit
    variance."""
    if self.config.model.pretrained or self.config.model.base_workdir:
      return  # the base's autoencoder and latent scale
    _, ae_params = self._autoencoder_run()
    if self.config.model.latent_scale:
      return
    moments = jax.jit(lambda p, x: self.autoencoder.apply({"params": p}, x, method="encode"))(
        ae_params, np.asarray(batch["image"], np.float32))
    latents = moments["mean"] if "mean" in moments else moments["latents"]
    std = float(np.std(np.asarray(latents)))
    with self.config.unlocked():
      self.config.model.latent_scale = 1.0 / max(std, 1e-6)
    logging.info("latent scale 1/std = %.5f (from %d images)", self.config.model.latent_scale,
                 len(batch["image"]))

  def initial_values(self) -> dict[str, PyTree]:
    """The trained first stage, replacing its random init in a fresh run; with
    model.pretrained or model.base_workdir, all of the base's weights (and, training a
    ControlNet, its initial copy of the base U-Net's encoder)."""
    m = self.config.model
    if not (m.base_workdir or m.pretrained):
      return {"autoencoder": self._autoencoder_run()[1]}
    values = self._base_values()
    if m.control_image:
      (name, net), = self.controlnets.items()
      size = self.config.data.image_size
      h, w, c = self.latent_shape()
      fresh = jax.jit(net.init)(jax.random.key(self.config.seed), jnp.zeros((1, h, w, c)),
                                jnp.zeros((1,), jnp.int32),
                                jnp.zeros((1, 1, self.text_width)),
                                jnp.zeros((1, size, size, net.conditioning_channels)))["params"]
      values[name] = params_from_unet(values["unet"],
                                      jax.tree.map(np.asarray, meta.unbox(fresh)))
    return values

  def constant_values(self) -> dict[str, PyTree]:
    """The constant base subtrees alone (no fresh ControlNet copy): what resumed and loaded
    LoRA / ControlNet runs read again."""
    if not self.constant_keys:
      return {}
    values = self._base_values()
    return {k: values[k] for k in self.constant_keys}

  def _base_values(self) -> dict[str, PyTree]:
    """All weights of model.base_workdir (EMA) or model.pretrained, float32 numpy."""
    m = self.config.model
    if m.base_workdir:
      from jaxt2i.eval.runner import load_run
      config, _, params = load_run(m.base_workdir)
      if config.task != self.name:
        raise ConfigError(f"config.model.base_workdir={m.base_workdir} is a {config.task!r} "
                          "run, not latent diffusion")
      return {k: jax.tree.map(np.asarray, jax.device_get(params[k]))
              for k in ("unet", "text_encoder", "autoencoder")}
    from jaxt2i.convert.diffusers_pipeline import params_from_diffusers
    return params_from_diffusers(m.pretrained)

  def control_from_images(self, images: jax.Array) -> jax.Array:
    """Control images [B, H, W, 3] in [0, 1] derived from images in the data value range, as
    model.control_image says (see CONTROL_IMAGES)."""
    low, high = self.config.data.value_range
    return CONTROL_IMAGES[self.config.model.control_image]((images - low) / (high - low))

  def unconditional(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The empty prompt's (tokens, mask), shaped like the given batch."""
    row = self.config.model.unconditional_tokens
    if not row:
      return jnp.zeros_like(tokens), jnp.zeros_like(mask)
    row = jnp.asarray(row, tokens.dtype)[:tokens.shape[1]]
    return (jnp.broadcast_to(row, tokens.shape),
            jnp.broadcast_to(jnp.arange(tokens.shape[1]) < len(row), mask.shape).astype(
                mask.dtype))

  # -- modules ---------------------------------------------------------------------------------

  @property
  def schedule(self) -> schedules.Schedule:
    m = self.config.model
    return schedules.make_schedule(m.schedule, m.num_train_timesteps, m.beta_start, m.beta_end,
                                   prediction_type=m.prediction_type,
                                   rescale_zero_terminal_snr=m.rescale_zero_terminal_snr,
                                   snr_shift=m.snr_shift)

  @property
  def tokenized_unconditional(self) -> bool:
    """Whether the unconditional prompt is the tokenized empty string (CLIP, as Stable
    Diffusion was trained) rather than all padding (caption dropout here)."""
    return self.config.model.text_encoder == "clip"

  @property
  def text_width(self) -> int:
    m = self.config.model
    return m.clip_text.hidden_size if m.text_encoder == "clip" else m.text_width

  @property
  def text_encoder(self) -> TextEncoder | CLIPTextTransformer:
    m = self.config.model
    if m.text_encoder == "clip":
      return CLIPTextTransformer(**m.clip_text.to_dict(),
                                 attention_implementation=m.attention_implementation,
                                 dtype=self.compute_dtype)
    return TextEncoder(vocab_size=self.config.data.vocab_size,
                       max_length=self.config.data.max_caption_length, width=m.text_width,
                       depth=m.text_depth, num_heads=m.text_heads,
                       attention_implementation=m.attention_implementation,
                       dtype=self.compute_dtype)

  @property
  def controlnets(self) -> dict[str, ControlNet]:
    m = self.config.model
    out = {}
    for name, fields in sorted(m.controlnets.items()):
      fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.to_dict().items()}
      out[name] = ControlNet(**{**fields, "attention_implementation": m.attention_implementation,
                                "remat_policy": m.remat_policy, "dtype": self.compute_dtype})
    return out

  @property
  def unet(self) -> UNet:
    m = self.config.model
    if m.unet:
      fields = {k: tuple(v) if isinstance(v, list) else v for k, v in m.unet.to_dict().items()}
      return UNet(**{**fields, "attention_implementation": m.attention_implementation,
                     "remat_policy": m.remat_policy, "dtype": self.compute_dtype})
    latent = self.autoencoder.latent_channels
    return UNet(in_channels=latent, out_channels=latent,
                block_out_channels=tuple(m.block_out_channels),
                layers_per_block=m.layers_per_block, down_block_types=tuple(m.down_block_types),
                up_block_types=tuple(m.up_block_types), attention_head_dim=m.attention_head_dim,
                cross_attention_dim=m.text_width, use_linear_projection=m.use_linear_projection,
                transformer_layers_per_block=m.transformer_layers_per_block,
                norm_num_groups=m.norm_num_groups, position_channels=m.position_channels,
                attention_implementation=m.attention_implementation,
                remat_policy=m.remat_policy, dtype=self.compute_dtype)

  def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
    size = (image_size or self.config.data.image_size) // self.autoencoder.downsample_factor
    return size, size, self.autoencoder.latent_channels

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    r1, r2, r3 = jax.random.split(rng, 3)
    text = self.text_encoder.init(r1, batch["tokens"], batch["tokens_mask"])["params"]
    b = batch["tokens"].shape[0]
    latents = jnp.zeros((b,) + self.latent_shape(), jnp.float32)
    context = jnp.zeros((b, batch["tokens"].shape[1], self.text_width))
    unet = self.unet.init(r2, latents, jnp.zeros((b,), jnp.int32), context)["params"]
    # Replaced by the trained first stage in a fresh run (initial_values), then frozen.
    size = self.config.data.image_size
    ae = self.autoencoder.init(r3, jnp.zeros((1, size, size, 3)))["params"]
    params = {"unet": unet, "text_encoder": text, "autoencoder": ae}
    for k, (name, controlnet) in enumerate(self.controlnets.items()):
      cond = jnp.zeros((b, size, size, controlnet.conditioning_channels))
      params[name] = controlnet.init(jax.random.fold_in(r2, k + 1), latents,
                                     jnp.zeros((b,), jnp.int32), context, cond)["params"]
    m = self.config.model
    if m.lora_rank:
      adapted = ("unet", "text_encoder") if m.lora_text_encoder else ("unet",)
      params["lora"] = {name: lora.init_adapters(meta.unbox(params[name]), m.lora_rank,
                                                 jax.random.fold_in(r1, k), m.lora_targets)
                        for k, name in enumerate(adapted)}
    return params

  # -- training --------------------------------------------------------------------------------

  def encode_text(self, params: PyTree, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    if self.config.model.text_encoder == "clip":
      # Stable Diffusion's U-Nets saw CLIP's states of the padded row, pads included, under
      # the causal mask alone (no padding mask).
      return self.text_encoder.apply({"params": params["text_encoder"]},
                                     tokens)["last_hidden_state"]
    states, _ = self.text_encoder.apply({"params": params["text_encoder"]}, tokens, mask)
    return states

  def encode_images(self, params: PyTree, images: jax.Array, rng: jax.Array | None) -> jax.Array:
    ae = jax.lax.stop_gradient(params["autoencoder"])
    moments = self.autoencoder.apply({"params": ae}, images, method="encode")
    if "mean" in moments:
      latents = moments["mean"]
      if rng is not None:
        latents = latents + jnp.exp(0.5 * moments["logvar"]) * jax.random.normal(
            rng, latents.shape)
    else:
      latents = moments["latents"]
    return jax.lax.stop_gradient(latents * self.config.model.latent_scale)

  def decode_latents(self, params: PyTree, latents: jax.Array) -> jax.Array:
    """Latents (scaled) -> uint8 images."""
    images = self.autoencoder.apply({"params": params["autoencoder"]},
                                    latents / self.config.model.latent_scale, method="decode")
    low, high = self.config.data.value_range
    images = (images.astype(jnp.float32) - low) / (high - low)
    return jnp.clip(images * 255.0 + 0.5, 0, 255).astype(jnp.uint8)

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    m, schedule = self.config.model, self.schedule
    params = self.with_lora(params)
    r_lat, r_t, r_noise, r_drop = jax.random.split(rng, 4)
    x0 = self.encode_images(params, batch["image"], r_lat)
    b = x0.shape[0]
    t = jax.random.randint(r_t, (b,), 0, m.num_train_timesteps)
    noise = jax.random.normal(r_noise, x0.shape)
    x_t = schedules.add_noise(schedule, x0, noise, t)
    keep = jax.random.uniform(r_drop, (b, 1)) >= m.caption_dropout
    empty_tokens, empty_mask = self.unconditional(batch["tokens"], batch["tokens_mask"])
    tokens = jnp.where(keep, batch["tokens"], empty_tokens)
    mask = jnp.where(keep, batch["tokens_mask"], empty_mask)
    # (With LoRA only the adapters get gradients: the base subtrees are constants.)
    text_params = params if m.text_trainable or m.lora_rank else jax.lax.stop_gradient(params)
    context = self.encode_text(text_params, tokens, mask)
    residuals = {}
    if m.control_image:
      (name, net), = self.controlnets.items()
      down, mid = net.apply({"params": params[name]}, x_t, t, context,
                            self.control_from_images(batch["image"]))
      residuals = {"down_block_additional_residuals": down,
                   "mid_block_additional_residual": mid}
    out = self.unet.apply({"params": params["unet"]}, x_t, t, context,
                          **residuals).astype(jnp.float32)
    target = schedules.training_target(schedule, x0, noise, t)
    per_example = jnp.mean(jnp.square(out - target), axis=(1, 2, 3))
    weight = schedules.loss_weight(schedule, t, m.loss_weighting, m.snr_gamma)
    loss = jnp.mean(weight * per_example)
    return loss, {"mse": jnp.mean(per_example), "latent_std": jnp.std(x0)}

  # -- sampling --------------------------------------------------------------------------------

  def _sampling_inputs(self, tokens, mask, rng, guidance_scale, num_steps, sampler, latents,
                       negative_tokens, negative_mask):
    """generate's arguments with the run's defaults filled in: (guidance_scale, num_steps,
    sampler, the loop's rng, initial latents, negative tokens and mask (the empty caption
    unless given))."""
    m = self.config.model
    guidance_scale = m.guidance_scale if guidance_scale is None else guidance_scale
    num_steps = m.num_sampling_steps if num_steps is None else num_steps
    r_init, r_loop = jax.random.split(rng)
    if latents is None:
      latents = jax.random.normal(r_init, (tokens.shape[0],) + self.latent_shape())
    if negative_tokens is None:
      negative_tokens, negative_mask = self.unconditional(tokens, mask)
    return (guidance_scale, num_steps, sampler or m.sampler, r_loop, latents, negative_tokens,
            negative_mask)

  def generate(self, params: PyTree, tokens: jax.Array, mask: jax.Array, rng: jax.Array, *,
               guidance_scale: Any = None, num_steps: Any = None, sampler: str | None = None,
               eta: Any = 0.0, negative_tokens: jax.Array | None = None,
               negative_mask: jax.Array | None = None, latents: jax.Array | None = None,
               guidance_rescale: Any = 0.0, image: jax.Array | None = None,
               inpaint_mask: jax.Array | None = None, strength: Any = None,
               control_image: jax.Array | None = None,
               controlnet_conditioning_scale: Any = 1.0) -> jax.Array:
    """uint8 images [B, H, W, 3] for token batches; every numeric argument may be traced.

    The unconditional branch is the empty caption (all padding) unless negative tokens are
    given; both halves run in one U-Net call per step. `latents` is the initial noise.

    img2img (`image` [B, H, W, 3] in the data value range, `strength` in [0, 1], default
    0.8): the image's latents noised to the timestep of step n - floor(n * strength), then
    the remaining steps (diffusers' StableDiffusionImg2ImgPipeline). Inpainting (also
    `inpaint_mask` [B, h, w, 1] at latent size, 1 = repaint; strength default 1, which starts
    from pure noise): after every step the kept region is reset to the image's latents noised
    to the next step's timestep (StableDiffusionInpaintPipeline with a plain U-Net).

    ControlNet (runs with model.controlnets): `control_image` [B, H, W, c] in [0, 1], or
    [B, K, H, W, c] for K ControlNets (in name order), each ControlNet's residuals times its
    `controlnet_conditioning_scale` (a number or K numbers), summed into the U-Net; both
    guidance halves see the control image (StableDiffusionControlNetPipeline).
    """
    m = self.config.model
    params = self.with_lora(params)
    guidance_scale, num_steps, sampler, r_loop, latents, negative_tokens, negative_mask = (
        self._sampling_inputs(tokens, mask, rng, guidance_scale, num_steps, sampler, latents,
                              negative_tokens, negative_mask))
    b = tokens.shape[0]
    context = self.encode_text(params, jnp.concatenate([negative_tokens, tokens]),
                               jnp.concatenate([negative_mask, mask]))

    controlnets = self.controlnets
    if control_image is not None and not controlnets:
      raise ValueError("control_image given, but this run has no ControlNet")
    if control_image is not None:
      images = control_image if control_image.ndim == 5 else control_image[:, None]
      if images.shape[1] != len(controlnets):
        raise ValueError(f"{images.shape[1]} control images for {len(controlnets)} ControlNets")
      images = jnp.concatenate([images, images])  # the unconditional half sees it too
      scales = jnp.broadcast_to(jnp.asarray(controlnet_conditioning_scale, jnp.float32),
                                (len(controlnets),))

    def both(x, t):
      residuals = {}
      if control_image is not None:
        residuals = dict(zip(("down_block_additional_residuals", "mid_block_additional_residual"),
                             sum_residuals([
                                 net.apply({"params": params[name]}, x, t, context,
                                           images[:, k], scales[k])
                                 for k, (name, net) in enumerate(controlnets.items())])))
      return self.unet.apply({"params": params["unet"]}, x, t, context,
                             **residuals).astype(jnp.float32)

    denoise = samplers.guided(both, guidance_scale, guidance_rescale)
    spacing = dict(timestep_spacing=m.timestep_spacing or None, steps_offset=m.steps_offset)
    start, blend = 0, None
    if image is not None:
      schedule, noise = self.schedule, latents
      n = jnp.asarray(num_steps, jnp.int32)
      if strength is None:
        strength = 1.0 if inpaint_mask is not None else 0.8
      strength = jnp.clip(jnp.asarray(strength, jnp.float32), 0.0, 1.0)
      start = n - jnp.minimum(jnp.floor(n * strength).astype(jnp.int32), n)
      at = lambda i: jnp.full((b,), samplers.timestep(  # noqa: E731
          sampler, m.num_train_timesteps, jnp.minimum(i, n - 1), n, **spacing), jnp.int32)
      known = self.encode_images(params, image, None)
      latents = schedules.add_noise(schedule, known, noise, at(start))
      if inpaint_mask is not None:
        latents = jnp.where(strength >= 1.0, noise, latents)
        repaint = inpaint_mask.astype(jnp.float32)

        def keep_known(i, x):
          kept = jnp.where(i < n - 1, schedules.add_noise(schedule, known, noise, at(i + 1)),
                           known)
          return (1.0 - repaint) * kept + repaint * x
        blend = keep_known
    out = samplers.sample(denoise, self.schedule, latents, r_loop, sampler=sampler,
                          num_steps=num_steps, eta=eta if sampler == "ddim" else 0.0,
                          set_alpha_to_one=m.set_alpha_to_one, start_step=start, blend=blend,
                          **spacing)
    return self.decode_latents(params, out)

  def sample(self, params: PyTree, batch: Batch, rng: jax.Array) -> jax.Array:
    return self.generate(params, batch["tokens"], batch["tokens_mask"], rng)

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    loss, metrics = self.loss(params, batch, rng)
    images = self.generate(params, batch["tokens"][:8], batch["tokens_mask"][:8], rng,
                           num_steps=min(20, self.config.model.num_sampling_steps))
    low, high = self.config.data.value_range
    reference = jnp.clip((batch["image"][:8] - low) / (high - low) * 255 + 0.5, 0,
                         255).astype(jnp.uint8)
    return {"loss": loss, **metrics, "samples": images, "reference": reference}
