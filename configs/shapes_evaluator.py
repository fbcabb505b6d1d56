"""The shapes-v1 evaluator: the CNN that scores every model's images (jaxt2i/eval/shapes.py).

Usually trained for you, once, into the cache on first use, or by hand:
  jaxt2i eval train-evaluator --image_size 64
This file is the same recipe as a plain training run (e.g. to study or change it):
  jaxt2i train --config configs/shapes_evaluator.py:64 --workdir workdirs/evaluator_64
Variants: 32, 64 (default), 128 (the image size). Its data is rendered on the fly by the
shapes-v1 generator; nothing needs to be built first.
"""

from jaxt2i.eval.shapes import evaluator_config


def get_config(arg: str | None = None):
  try:
    size = int(arg or 64)
  except ValueError:
    raise ValueError(f"unknown variant {arg!r} for configs/shapes_evaluator.py; use 32, 64 "
                     "or 128") from None
  return evaluator_config(size)
