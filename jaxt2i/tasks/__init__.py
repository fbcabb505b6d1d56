"""Tasks: one per model family; importing this package registers them all."""

from jaxt2i.tasks import autoencoder, baseline, ldm, shapes_evaluator  # noqa: F401
from jaxt2i.tasks.base import TASKS, Task, get_task, register  # noqa: F401
