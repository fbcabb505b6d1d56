"""jaxt2i: text-to-image models in JAX/Flax, trained on TPU pods and GPU clusters."""

__version__ = "0.1.0"
