"""`jaxt2i bench` (jaxt2i/bench.py): the jaxpr FLOP counter against hand counts and against
benchmarks/transformer.py's formula, and the command end to end on a tiny recipe."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, worker_env
from jaxt2i import bench, main
from jaxt2i.models import transformer as tr

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402
import transformer as transformer_bench  # noqa: E402  (benchmarks/transformer.py)


def _abstract_params(module, *inputs):
  return jax.eval_shape(module.init, jax.random.key(0), *inputs)


def test_dense_layer():
  dense = nn.Dense(24, name="proj")
  x = jax.ShapeDtypeStruct((8, 5, 16), jnp.float32)
  count = bench.count_flops(dense.apply, _abstract_params(dense, x), x)
  assert count.total == 2 * (8 * 5) * 16 * 24
  assert count.by_kind == {"dot_general": count.total}
  assert count.by_scope == {"proj": count.total} and not count.notes


def test_convolution_and_its_gradient():
  # Grouped: each output sums over 6 / 2 = 3 input channels of a 3 x 3 window.
  conv = nn.Conv(8, (3, 3), strides=2, feature_group_count=2, padding="SAME")
  x = jnp.ones((2, 16, 16, 6))
  params = _abstract_params(conv, x)
  forward = bench.count_flops(conv.apply, params, x)
  assert forward.total == 2 * (2 * 8 * 8 * 8) * (3 * 3) * 3
  assert forward.by_kind == {"conv_general_dilated": forward.total}
  # Stride 1: the input and the kernel gradients are convolutions as costly as the forward
  # one, with other dimension numbers (and batch_group_count for the grouped kernel's).
  conv = nn.Conv(8, (3, 3), feature_group_count=2, padding="SAME", use_bias=False)
  params = _abstract_params(conv, x)
  forward = bench.count_flops(conv.apply, params, x)
  assert forward.total == 2 * (2 * 16 * 16 * 8) * 9 * 3
  grads = bench.count_flops(jax.grad(lambda p, x: conv.apply(p, x).sum(), argnums=(0, 1)),
                            params, x)
  assert grads.total == 3 * forward.total


def test_scan_remat_cond_while():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = nn.scan(nn.remat(lambda mdl, h, _: (nn.Dense(16)(h), None)),
                      variable_axes={"params": 0}, split_rngs={"params": True}, length=5)
      return layer(self, x, None)[0]
  x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
  model = Stack()
  count = bench.count_flops(model.apply, _abstract_params(model, x), x)
  assert count.total == 5 * 2 * 4 * 16 * 16

  def control(a):
    a = jax.lax.cond(a[0, 0] > 0, lambda b: b @ b @ b, lambda b: b @ b, a)  # 2 products
    return jax.lax.while_loop(lambda b: b[0, 0] < 9, lambda b: b @ b, a)      # 1, noted
  count = bench.count_flops(control, jax.ShapeDtypeStruct((8, 8), jnp.float32))
  assert count.total == 3 * 2 * 8 ** 3
  assert any("while" in n for n in count.notes) and any("cond" in n for n in count.notes)


def _computed_pairs(pattern, text_len, grid, kernel):
  """Query-key pairs that sparse_attention multiplies (its docstring's blocks): all L x L
  for dense; else the text's T x T, and per image query the T text keys plus its own row
  (column) and, for conv, the kernel // 2 rows above it."""
  rows, width = (grid[1], grid[0]) if pattern == "column" else grid
  if pattern == "dense":
    return (text_len + rows * width) ** 2
  halo = min(kernel // 2, rows - 1) if pattern == "conv" else 0
  return text_len ** 2 + rows * width * (text_len + (halo + 1) * width)


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
def test_dalle_transformer_against_the_analytic_formula(implementation):
  batch, text_len, grid, kernel = 2, 6, (6, 4), 3
  counts = {}
  for layout, patterns in (("dense", ("dense",) * 4),
                           ("sparse", tr.paper_attention_patterns(4))):
    model = tr.Transformer(text_vocab=40, image_vocab=64, text_len=text_len, grid=grid,
                           width=32, depth=4, num_heads=2, conv_kernel=kernel,
                           attention_patterns=patterns,
                           attention_implementation=implementation)
    text = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
    image = jax.ShapeDtypeStruct((batch, model.image_len), jnp.int32)
    count = bench.count_flops(model.apply, _abstract_params(model, text, image), text, image)
    formula = transformer_bench.model_flops(model, batch)  # training FLOPs, 3 x forward
    attention = 4 * model.width * batch * sum(_computed_pairs(p, text_len, grid, kernel)
                                              for p in patterns)
    assert count.total == (formula["dense_layers"] + formula["heads"]) / 3 + attention
    # The formula credits only the pairs each mask keeps; the program multiplies whole
    # blocks (dense: the masked upper triangle too).
    assert count.total > formula["total"] / 3
    counts[layout] = count.total
  assert counts["sparse"] < counts["dense"]


def test_synthetic_batch_has_the_task_batch_spec():
  sys.path.insert(0, str(REPO))
  from configs import shapes_evaluator
  from jaxt2i.tasks.base import get_task
  config = shapes_evaluator.get_config()
  config.batch_size = 4
  task = get_task(config)
  batch = bench.synthetic_batch(task, config)
  assert tuple(batch) == task.batch_keys  # image plus the per-record targets
  assert batch["image"].shape == (4, config.data.image_size, config.data.image_size, 3)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= config.data.value_range[0]


def test_cpu_name_tells_apart_chips_of_one_vendor_line():
  # Two VMs that both call themselves "AMD EPYC": the family / model and vector width say
  # which one a recorded number came from.
  milan = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu sse2 fma avx avx2\n\n"
           "processor\t: 1\nmodel name\t: something else\n")
  genoa = milan.replace("model\t\t: 1", "model\t\t: 17").replace("avx2", "avx2 avx512f")
  assert bench.cpu_name(milan) == "AMD EPYC (family 25 model 1, AVX2)"
  assert bench.cpu_name(genoa) == "AMD EPYC (family 25 model 17, AVX-512)"
  assert bench.cpu_name("model name\t: Some ARM core\n") == "Some ARM core"
  assert bench.environment()["cpu"] == bench.cpu_name()


def test_harness_shares_the_ceiling_measurement():
  assert harness.matmul_ceiling is bench.matmul_ceiling and harness.time_fn is bench.time_fn
  ceiling = bench.matmul_ceiling(sizes=(64,), repeats=1)
  assert ceiling["flops_per_s"] > 0 and ceiling["dtype"] == "float32"


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.py:tiny"], "cannot load the --config recipe: No such file"),
    (["--config", "configs/baseline_shapes.py:huge"], "unknown variant 'huge'"),
    (["--config", "configs/baseline_shapes.py:tiny", "--config.train.nmu_steps=3"],
     "unknown config field 'nmu_steps'"),
    (["--config", "configs/baseline_shapes.py:tiny", "--stpes=3"],
     "Unknown command line flag 'stpes'. Did you mean: steps"),
    (["--config", "configs/baseline_shapes.py:tiny", "--data=disk"], "--data"),
    (["--steps=3"], "--config is required"),
])
def test_bad_arguments_are_clear(args, message, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as exit_info:
    main.run(["bench", *args])
  assert str(exit_info.value).startswith("jaxt2i bench: ") and message in str(exit_info.value)


def test_command_end_to_end(tmp_path):
  out, results_md = tmp_path / "bench.json", tmp_path / "RESULTS.md"
  args = ["bench", "--config", "configs/baseline_shapes.py:tiny", "--config.batch_size=8",
          f"--config.data.data_dir={tmp_path / 'no_data'}", "--steps", "2", "--warmup", "1",
          "--peak_tflops", "0.05", "--profile", str(tmp_path / "profile"), "--profile_steps",
          "1", "--out", str(out), "--record", "--results_md", str(results_md)]
  proc = subprocess.run([sys.executable, "-m", "jaxt2i", *args], env=worker_env(1), cwd=REPO,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SYNTHETIC" in proc.stdout and "MFU" in proc.stdout
  r = json.loads(out.read_text())
  for key in ("config", "command", "task", "devices", "batch", "params", "compile_s", "flops",
              "xla_cost_per_device", "memory_per_device", "timing", "examples_per_s", "peak",
              "mfu", "mfu_gradient_program", "final_loss", "environment", "config_values"):
    assert key in r, key
  assert r["config"] == "configs/baseline_shapes.py:tiny" and r["devices"] == 1
  assert r["batch"]["source"] == "synthetic" and r["batch_size"] == 8
  assert r["batch"]["shapes"]["image"] == [[8, 32, 32, 3], "float32"]
  f = r["flops"]
  assert f["train"] == 3 * f["forward"] > 0 and f["train_rule"] == "3 x forward"
  assert 0 < f["gradient_program"] <= f["train"]
  # The baseline is dense layers and convolutions: XLA's count adds only elementwise work.
  assert f["train"] <= r["xla_cost_per_device"]["flops"] < 1.5 * f["train"]
  t = r["timing"]
  assert len(t["samples_s"]) == 2 and t["min_s"] <= t["median_s"]
  assert set(t["load_average"]) == {"before", "after"}
  assert r["examples_per_s"] == pytest.approx(8 / t["median_s"])
  assert r["peak"]["flops_per_s"] == 0.05e12 and r["peak"]["source"] == "--peak_tflops"
  assert r["mfu"] == pytest.approx(f["train"] / t["median_s"] / 0.05e12)
  assert r["memory_per_device"]["argument_bytes"] > 0
  assert np.isfinite(r["final_loss"])
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))
  text = results_md.read_text()
  assert "<!-- bench:bench -->" in text and "configs/baseline_shapes.py:tiny" in text
  bench.record(r, results_md)  # a second run appends a second row
  rows = [l for l in results_md.read_text().splitlines() if "baseline_shapes.py:tiny" in l]
  assert len(rows) == 2 and results_md.read_text().count("## bench") == 1
