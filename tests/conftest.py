"""Tests run on CPU with 8 fake devices, so multi-device sharding is exercised for real."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

# Trained shapes-v1 evaluators are cached here (the Makefile sets the same place), so only the
# first run of the suite on a machine trains them.
os.environ.setdefault("JAXT2I_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "jaxt2i"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def evaluator_64():
  """The real 64px shapes-v1 evaluator: loaded from the cache, trained there on first use."""
  from jaxt2i.eval import shapes
  return shapes.load_evaluator(64)
