"""Tasks: one per model family; importing this package registers them all."""

from jaxt2i.tasks import (autoencoder, baseline, clip, dalle, dvae, ldm,  # noqa: F401
                          sdxl, shapes_evaluator)
from jaxt2i.tasks.base import TASKS, Task, get_task, register  # noqa: F401
