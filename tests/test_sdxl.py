"""Stable Diffusion XL interop: SDXL's U-Net (added text / size embedding), its projected
second CLIP text encoder and a whole StableDiffusionXLPipeline folder load into jaxt2i and
compute what diffusers / transformers compute (tiny random-init models saved locally;
nothing is downloaded)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers import SDXL_UNET, sdxl_folder, tiny_clip_text, write_clip_vocab  # noqa: E402
from jaxt2i.convert import diffusers_unet, transformers_clip  # noqa: E402


def _rel_err(ours, theirs):
  theirs = np.asarray(theirs)
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def test_sdxl_unet_matches_diffusers(tmp_path):
  """text_time conditioning, per-block transformer depths and linear projections: the
  converted U-Net's output within 1e-4 of diffusers' (and the time ids matter)."""
  torch.manual_seed(0)
  reference = diffusers.UNet2DConditionModel(**SDXL_UNET).eval()
  reference.save_pretrained(tmp_path / "unet")
  model, params = diffusers_unet.load_diffusers_unet(tmp_path)
  assert model.addition_embed_type == "text_time" and model.transformer_layers_per_block == (1, 2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  text = rng.standard_normal((2, 5, 64)).astype(np.float32)
  pooled = rng.standard_normal((2, 16)).astype(np.float32)
  time_ids = np.array([[16, 16, 0, 0, 16, 16], [32, 24, 4, 2, 16, 16]], np.float32)
  t = np.array([10, 700])
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                       torch.from_numpy(text),
                       added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                          "time_ids": torch.from_numpy(time_ids)}).sample
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  apply = jax.jit(lambda p, ids: model.apply({"params": p}, x, t, text, text_embeds=pooled,
                                             time_ids=ids))
  assert _rel_err(apply(params, time_ids), theirs) <= 1e-4
  other = apply(params, np.full_like(time_ids, 64.0))
  assert _rel_err(other, theirs) > 1e-3  # the size conditioning reaches the output
  assert params["add_embedding"]["linear_1"]["kernel"].shape == (64, 128)
  with pytest.raises(ValueError, match="needs text_embeds"):
    model.apply({"params": params}, x, t, text)


@pytest.mark.slow  # traces the 2.6B-parameter U-Net (~20 s); the tiny SDXL tests cover the code
def test_sdxl_variant_has_sdxl_base_size():
  """UNet variant "sdxl" lays out SDXL base's U-Net: its 2,567,463,684 parameters (shapes
  only, nothing allocated)."""
  from jaxt2i.models import unet
  layout = diffusers_unet.expected_layout(unet.variant("sdxl"))
  assert sum(int(np.prod(shape)) for _, shape, _ in layout.values()) == 2_567_463_684
  assert layout["add_embedding.linear_1.weight"][2] == (1280, 2816)


def test_clip_text_with_projection_matches_transformers(tmp_path):
  """CLIPTextModelWithProjection (SDXL's text_encoder_2): every hidden state, the pooled
  state and the projected text_embeds; loaded without projection, the tower alone."""
  tokenizer = write_clip_vocab(tmp_path / "tok", pad_token="!", max_length=12)
  reference = tiny_clip_text(tokenizer, projection_dim=16)
  reference.save_pretrained(tmp_path / "te2")
  model, params = transformers_clip.load_clip_text_encoder(tmp_path / "te2", with_projection=True)
  assert model.projection_dim == 16
  ids = np.asarray(tokenizer(["a red circle", "blue"], padding="max_length", max_length=12,
                             return_tensors="np").input_ids)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(ids), output_hidden_states=True)
  ours = model.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
  assert _rel_err(ours["text_embeds"], theirs.text_embeds) <= 1e-4
  assert len(ours["hidden_states"]) == len(theirs.hidden_states) == 4
  for a, b in zip(ours["hidden_states"], theirs.hidden_states):
    assert _rel_err(a, b) <= 1e-4
  assert _rel_err(ours["last_hidden_state"], theirs.last_hidden_state) <= 1e-4
  tower, tower_params = transformers_clip.load_clip_text_encoder(tmp_path / "te2")
  assert tower.projection_dim == 0 and "text_projection" not in tower_params
  np.testing.assert_allclose(
      tower.apply({"params": tower_params}, jnp.asarray(ids))["pooled"], ours["pooled"],
      atol=1e-6)


def test_from_diffusers_matches_sdxl_pipeline(tmp_path):
  """jaxt2i.from_diffusers on a saved StableDiffusionXLPipeline: the same images from the
  same initial latents as diffusers' pipeline, with zeroed unconditional embeddings (no
  negative prompt), with a negative prompt, and with size conditioning."""
  import jaxt2i
  from jaxt2i.tasks.sdxl import StableDiffusionXLTask
  folder, reference = sdxl_folder(tmp_path)
  pipe = jaxt2i.from_diffusers(folder, compilation_cache=False)
  assert isinstance(pipe, jaxt2i.pipelines.Pipeline)
  assert isinstance(pipe.task, StableDiffusionXLTask)
  assert pipe.config.data.image_size == 16 and pipe.config.model.guidance_scale == 5.0
  assert pipe.config.model.force_zeros_for_empty_prompt
  # The task's own init has exactly the converted params' tree and shapes.
  shapes = jax.eval_shape(pipe.task.init, jax.random.key(0),
                          {"tokens": jnp.zeros((1, 24), jnp.int32),
                           "tokens_mask": jnp.ones((1, 24), jnp.int32)})
  from flax.core import meta
  expected = jax.tree.map(lambda x: x.shape, meta.unbox(shapes))
  assert jax.tree.map(lambda x: x.shape, jax.device_get(pipe.params)) == expected
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  prompts = ["a red circle", "a blue circle"]
  for kwargs in ({}, {"negative_prompt": "red", "original_size": (32, 24)}):
    theirs_kwargs = dict(kwargs)
    if "negative_prompt" in kwargs:
      theirs_kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * 2
    with torch.no_grad():
      theirs = reference(prompts, num_inference_steps=2, guidance_scale=5.0,
                         latents=torch.from_numpy(latents), output_type="np",
                         **theirs_kwargs).images
    ours = pipe(prompts, steps=2, guidance_scale=5.0, latents=latents.transpose(0, 2, 3, 1),
                output="np", **kwargs)
    assert ours.shape == theirs.shape == (2, 16, 16, 3) and ours.dtype == np.uint8
    # Ours rounds to uint8; theirs is float in [0, 1].
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)
  with pytest.raises(ValueError, match="do not take an image"):
    pipe(prompts, image=np.zeros((16, 16, 3), np.uint8))
  # model_index.json's force_zeros_for_empty_prompt=false: "" is encoded instead.
  from jaxt2i.convert import diffusers_pipeline
  index = json.loads((folder / "model_index.json").read_text())
  (folder / "model_index.json").write_text(json.dumps(
      {**index, "force_zeros_for_empty_prompt": False}))
  assert not diffusers_pipeline.config_from_diffusers(folder).model.force_zeros_for_empty_prompt


def test_sdxl_folder_errors(tmp_path):
  import jaxt2i
  from jaxt2i.convert import diffusers_sdxl
  from jaxt2i.tasks import sdxl
  folder = tmp_path / "refiner"
  for part in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
    (folder / part).mkdir(parents=True)
  (folder / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True}))
  assert diffusers_sdxl.is_sdxl_folder(folder)
  with pytest.raises(ValueError, match="refiner"):
    jaxt2i.from_diffusers(folder)
  with pytest.raises(ValueError, match="addition_embed_type='image'"):
    diffusers_unet.unet_config_from_diffusers({**SDXL_UNET, "addition_embed_type": "image"})
  fields = diffusers_unet.unet_config_from_diffusers(SDXL_UNET)
  assert fields["projection_class_embeddings_input_dim"] == 64
  ids = sdxl.default_time_ids(16, 24)
  np.testing.assert_array_equal(ids, [16, 24, 0, 0, 16, 24])
