"""jaxt2i: text-to-image models in JAX/Flax, trained on TPU pods and GPU clusters."""

__version__ = "0.1.0"


def load(workdir, **kwargs):
  """A sampling pipeline for a trained run: `jaxt2i.load(workdir)(prompts)`; see
  jaxt2i.pipelines.Pipeline. (Imported lazily: `import jaxt2i` stays cheap.)"""
  from jaxt2i.pipelines import load as _load
  return _load(workdir, **kwargs)


def from_diffusers(path, **kwargs):
  """A sampling pipeline for a local diffusers Stable Diffusion folder (unet/, vae/,
  text_encoder/, tokenizer/, scheduler/): the same object `load` returns; see
  jaxt2i.convert.diffusers_pipeline."""
  from jaxt2i.convert.diffusers_pipeline import from_diffusers as _from_diffusers
  return _from_diffusers(path, **kwargs)
