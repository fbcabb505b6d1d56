"""The one trainer on 8 fake CPU devices: strategies agree, resume is exact, bad steps skip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import flat, read_item, records, tiny_config, tokenizer_path
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.tasks.baseline import CaptionRegressionTask
from jaxt2i.training import config as config_lib
from jaxt2i.training.trainer import Trainer, TrainingDivergedError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.load(str(tokenizer_path(tmp_path_factory.mktemp("tok"))))


def run(config, workdir, tok, devices=None, source=None, task=None):
  trainer = Trainer(config, workdir, source=source or records(), tokenizer=tok, devices=devices,
                    task=task)
  state = trainer.train()
  return trainer, state


def metric_lines(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
  return np.array([l["train/loss"] for l in metric_lines(workdir) if "train/loss" in l])


STRATEGIES = {
    # name: (mesh data, fsdp, tensor), strategy
    "dp": ((8, 1, 1), "dp"),
    "fsdp": ((2, 4, 1), "fsdp"),
    "tp": ((2, 1, 4), "tp"),
    "fsdp_tp": ((2, 2, 2), "fsdp_tp"),
}
# fc1 kernel is (embed=20*16, mlp=32); token_embed (vocab=64, embed=16); conv kernels
# (3, 3, in, out) with out=8, except to_rgb (out=3, not divisible: stays replicated).
EXPECTED_SPECS = {
    "dp": {"fc1/kernel": P(), "token_embed/embedding": P(), "up_conv_16/kernel": P()},
    "fsdp": {"fc1/kernel": P("fsdp"), "token_embed/embedding": P(None, "fsdp"),
             "up_conv_16/kernel": P(None, None, "fsdp"), "to_rgb/kernel": P(None, None, "fsdp"),
             "fc1/bias": P()},
    "tp": {"fc1/kernel": P(None, "tensor"), "fc2/kernel": P("tensor"),
           "token_embed/embedding": P("tensor"), "up_conv_16/kernel": P(None, None, None, "tensor"),
           "to_rgb/kernel": P(), "fc1/bias": P("tensor")},
    "fsdp_tp": {"fc1/kernel": P("fsdp", "tensor"), "fc2/kernel": P("tensor", "fsdp"),
                "token_embed/embedding": P("tensor", "fsdp")},
}


def _spec(state, path):
  node = state.params
  for part in path.split("/"):
    node = node[part]
  return node.sharding.spec


@pytest.mark.parametrize("names", [
    ("fsdp", "fsdp_tp"),
    # dp is most other tests' mesh; tp's specs also show in fsdp_tp.
    pytest.param(("dp", "tp"), marks=pytest.mark.slow)])
def test_strategies_match_single_device(tmp_path, tok, names):
  config = tiny_config(**{"train.num_steps": 3, "mesh.data": 1, "train.eval_at_end": True})
  _, single = run(config, tmp_path / "single", tok, devices=jax.devices()[:1])
  reference = losses(tmp_path / "single")
  single_params = flat(jax.device_get(single.params))
  assert len(reference) == 3 and np.all(np.isfinite(reference))
  assert any("eval/mse" in l for l in metric_lines(tmp_path / "single"))
  for name in names:
    (d, f, t), strategy = STRATEGIES[name]
    # train.eval_at_end off (tiny_config's default): no eval step compiled.
    config = tiny_config(**{"train.num_steps": 3, "mesh.data": d, "mesh.fsdp": f,
                            "mesh.tensor": t, "sharding.strategy": strategy})
    trainer, state = run(config, tmp_path / name, tok)
    assert not any(k.startswith("eval/") for l in metric_lines(tmp_path / name) for k in l)
    np.testing.assert_allclose(losses(tmp_path / name), reference, rtol=2e-5, err_msg=name)
    got = flat(jax.device_get(state.params))
    for key in single_params:
      np.testing.assert_allclose(got[key], single_params[key], atol=2e-6, err_msg=f"{name} {key}")
    for path, spec in EXPECTED_SPECS[name].items():
      assert _spec(state, path) == spec, (name, path, _spec(state, path))
    # Optimizer moments and EMA follow the params' shardings.
    assert state.ema_params["fc1"]["kernel"].sharding.spec == _spec(state, "fc1/kernel")
    if name == "fsdp":
      kernel = state.params["fc1"]["kernel"]
      shard = kernel.addressable_shards[0].data
      assert shard.size * 4 == kernel.size  # 4-way fsdp: each device holds a quarter


def test_resume_is_exact_and_data_order_restored(tmp_path, tok):
  straight = tiny_config(**{"train.num_steps": 6, "mesh.data": 4})
  _, full = run(straight, tmp_path / "straight", tok, devices=jax.devices()[:4])
  half = tiny_config(**{"train.num_steps": 3, "mesh.data": 4})
  run(half, tmp_path / "resumed", tok, devices=jax.devices()[:4])
  trainer, resumed = run(straight, tmp_path / "resumed", tok, devices=jax.devices()[:4])
  assert int(resumed.step) == 6
  a, b = flat(jax.device_get(full)), flat(jax.device_get(resumed))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_array_equal(losses(tmp_path / "straight"), losses(tmp_path / "resumed"))


def test_a_restarted_run_loads_its_step_from_the_compilation_cache(tmp_path, tok):
  from jaxt2i.eval.shapes import cache_root
  from jaxt2i.training.compilation import enable_compilation_cache
  config = tiny_config(**{"train.num_steps": 1, "mesh.data": 1})
  # What the trainer turns on ($JAXT2I_CACHE_DIR/jax: the tests' own cache, conftest.py).
  assert enable_compilation_cache() == str(cache_root() / "jax")
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # this tiny step too
  try:
    run(config, tmp_path / "first", tok, devices=jax.devices()[:1])
    again, _ = run(config, tmp_path / "again", tok, devices=jax.devices()[:1])
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  assert list((cache_root() / "jax").glob("jit__train_step-*"))
  assert again.step_from_cache
  assert losses(tmp_path / "again").tolist() == losses(tmp_path / "first").tolist()


def test_the_trainer_turns_the_compilation_cache_on_unless_told_not_to(tmp_path, monkeypatch):
  from jaxt2i.training import compilation
  calls = []
  monkeypatch.setattr(compilation, "enable_compilation_cache", lambda: calls.append(1) or "d")
  Trainer(tiny_config(), tmp_path / "on", devices=jax.devices()[:1])
  assert calls == [1]
  Trainer(tiny_config(**{"train.compilation_cache": False}), tmp_path / "off",
          devices=jax.devices()[:1])
  assert calls == [1]


def test_reshard_on_restore_8_to_2_devices(tmp_path, tok):
  config = tiny_config(**{"train.num_steps": 2, "mesh.data": 1, "mesh.fsdp": 8,
                          "sharding.strategy": "fsdp", "batch_size": 16})
  _, state8 = run(config, tmp_path, tok)
  saved = flat(jax.device_get(state8))
  config2 = tiny_config(**{"train.num_steps": 2, "mesh.data": 1, "mesh.fsdp": 2,
                           "sharding.strategy": "fsdp"})
  trainer = Trainer(config2, tmp_path, source=records(), tokenizer=tok,
                    devices=jax.devices()[:2])
  it = iter(trainer.make_loader(source=records()))
  trainer.build({k: jax.ShapeDtypeStruct((16,) + v.shape[1:], v.dtype,
                                         sharding=trainer.batch_sharding)
                 for k, v in next(it).items()})
  state2 = trainer.initial_state()
  assert trainer.data_position == 2 * 16
  kernel = state2.params["fc1"]["kernel"]
  assert kernel.sharding.spec == P("fsdp") and len(kernel.sharding.device_set) == 2
  restored = flat(jax.device_get(state2))
  for key in saved:
    np.testing.assert_array_equal(saved[key], restored[key], err_msg=key)


def _poisoned(batch):
  """Batches holding an all-white image (never drawn by shapes-v1) are the poisoned ones."""
  return jnp.any(jnp.all(batch["image"] > 0.999, axis=(1, 2, 3)))


class PoisonTask(CaptionRegressionTask):
  """The baseline whose loss is NaN on poisoned batches."""

  def loss(self, params, batch, rng):
    loss, aux = super().loss(params, batch, rng)
    return jnp.where(_poisoned(batch), jnp.nan, loss), aux


def _poisoned_source(poison_batches, batch=16):
  items = []
  for i, r in enumerate(records()[:64]):
    r = dict(r)
    if i // batch in poison_batches:
      r["image"] = np.full_like(r["image"], 255)
    items.append(r)
  return items


def test_nan_step_is_skipped_and_counted(tmp_path, tok):
  config = tiny_config(**{"train.num_steps": 1, "data.shuffle": False, "mesh.data": 2})
  devices = jax.devices()[:2]
  task = PoisonTask(config)
  _, one = run(config, tmp_path / "one", tok, devices, _poisoned_source({1}), task)
  config2 = tiny_config(**{"train.num_steps": 2, "data.shuffle": False, "mesh.data": 2})
  trainer, two = run(config2, tmp_path / "two", tok, devices, _poisoned_source({1}), task)
  assert int(two.skipped) == 1 and int(two.bad_streak) == 1 and int(two.step) == 2
  a, b = flat(jax.device_get(one.params)), flat(jax.device_get(two.params))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # params unchanged by step 2
  a, b = flat(jax.device_get(one.opt_state)), flat(jax.device_get(two.opt_state))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert trainer.last_metrics["train/skipped_total"] == 1


def test_consecutive_bad_steps_stop_with_clear_error(tmp_path, tok):
  config = tiny_config(**{"train.num_steps": 8, "data.shuffle": False, "mesh.data": 1,
                          "train.max_bad_steps": 3})
  task = PoisonTask(config)
  with pytest.raises(TrainingDivergedError, match="3 consecutive steps"):
    run(config, tmp_path, tok, jax.devices()[:1], _poisoned_source({1, 2, 3}), task)


def test_loss_spike_is_skipped(tmp_path, tok):
  config = tiny_config(**{"train.num_steps": 4, "data.shuffle": False, "mesh.data": 1,
                          "train.loss_spike_factor": 1.5, "train.loss_spike_warmup": 1})

  class SpikeTask(CaptionRegressionTask):
    def loss(self, params, batch, rng):
      loss, aux = super().loss(params, batch, rng)
      return jnp.where(_poisoned(batch), loss * 100, loss), aux

  task = SpikeTask(config)
  _, state = run(config, tmp_path, tok, jax.devices()[:1], _poisoned_source({2}), task)
  assert int(state.skipped) == 1 and int(state.step) == 4


def test_state_updates_replace_what_the_optimizer_made(tmp_path, tok):
  """Task.loss's STATE_UPDATES leaves are written after the optimizer step (an EMA codebook's
  way of updating): here a bias that counts steps, whatever its gradient says."""
  from jaxt2i.tasks.base import STATE_UPDATES
  config = tiny_config(**{"train.num_steps": 3, "mesh.data": 1})

  class CountingTask(CaptionRegressionTask):
    def loss(self, params, batch, rng):
      loss, aux = super().loss(params, batch, rng)
      bias = params["to_rgb"]["bias"]
      return loss, {**aux, STATE_UPDATES: {"to_rgb": {"bias": bias + 1.0}}}

  _, state = run(config, tmp_path / "run", tok, jax.devices()[:1], task=CountingTask(config))
  # Biases start at zero; the optimizer's own update of them is discarded every step.
  np.testing.assert_allclose(np.asarray(state.params["to_rgb"]["bias"]), 3.0, atol=1e-6)
  assert not any("state_updates" in l for l in (tmp_path / "run" / "metrics.jsonl").open())


def test_state_deltas_add_to_what_the_optimizer_made(tmp_path, tok):
  """Task.loss's STATE_DELTAS are added after the optimizer step (a codebook restart's way of
  moving learned weights): one step with and without them differs by exactly the delta."""
  from jaxt2i.tasks.base import STATE_DELTAS
  config = tiny_config(**{"train.num_steps": 1, "mesh.data": 1})

  class ShiftingTask(CaptionRegressionTask):
    def loss(self, params, batch, rng):
      loss, aux = super().loss(params, batch, rng)
      shift = jnp.zeros_like(params["to_rgb"]["bias"]).at[0].set(0.25)
      return loss, {**aux, STATE_DELTAS: {"to_rgb": {"bias": shift}}}

  _, plain = run(config, tmp_path / "plain", tok, jax.devices()[:1])
  _, shifted = run(config, tmp_path / "shifted", tok, jax.devices()[:1],
                   task=ShiftingTask(config))
  diff = np.asarray(shifted.params["to_rgb"]["bias"]) - np.asarray(plain.params["to_rgb"]["bias"])
  np.testing.assert_allclose(diff, np.eye(1, diff.size, 0)[0] * 0.25, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(shifted.params["to_rgb"]["kernel"]),
                                np.asarray(plain.params["to_rgb"]["kernel"]))


def test_resume_reads_derived_fields_back(tmp_path, tok):
  """Fields Task.prepare derives from data (an LDM's latent scale) are not derived again on
  resume, where the first batch may differ: they come back from the run's config.json."""

  class DerivedTask(CaptionRegressionTask):
    derived_fields = ("derived",)
    calls = 0

    @classmethod
    def default_model_config(cls):
      m = super().default_model_config()
      m.derived = 0.0
      return m

    def prepare(self, batch):
      if not self.config.model.derived:
        DerivedTask.calls += 1
        self.config.model.derived = float(DerivedTask.calls)

  for steps in (2, 4):  # the second run resumes the first
    config = tiny_config(**{"train.num_steps": steps, "mesh.data": 1})
    with config.unlocked():
      config.model.derived = 0.0
    trainer, _ = run(config, tmp_path, tok, jax.devices()[:1], task=DerivedTask(config))
    assert trainer.config.model.derived == 1.0
  assert DerivedTask.calls == 1
  assert json.loads((tmp_path / "config.json").read_text())["model"]["derived"] == 1.0


class AdaptedTask(CaptionRegressionTask):
  """A fixed base model ("base", a constant subtree) plus a trained output bias ("delta"),
  the shape of a LoRA run."""
  constant_keys = ("base",)

  def init(self, rng, batch):
    base = super().init(rng, batch)
    return {"base": base, "delta": {"bias": jnp.zeros(3)}}

  def initial_values(self):
    dummy = {"tokens": jnp.zeros((1, self.config.data.max_caption_length), jnp.int32),
             "tokens_mask": jnp.ones((1, self.config.data.max_caption_length), jnp.int32)}
    from jaxt2i.parallel import partitioning
    base = partitioning.unbox(super().init(jax.random.key(7), dummy))
    return {"base": jax.tree.map(np.asarray, base)}

  def _merged(self, params):
    base = params["base"]
    rgb = {**base["to_rgb"], "bias": base["to_rgb"]["bias"] + params["delta"]["bias"]}
    return {**base, "to_rgb": rgb}

  def loss(self, params, batch, rng):
    return super().loss(self._merged(params), batch, rng)

  def evaluate(self, params, batch, rng):
    return super().evaluate(self._merged(params), batch, rng)


def test_constant_subtrees_stay_out_of_state_and_checkpoints(tmp_path, tok):
  """Task.constant_keys: the base comes from initial_values at every start, sharded by its
  logical names; only the rest is optimized, EMA'd and checkpointed; resume is exact."""
  from helpers import read_item
  from jaxt2i.eval.runner import load_run
  overrides = {"mesh.data": 2, "mesh.fsdp": 4, "sharding.strategy": "fsdp",
               "eval.shapes_prompts": 0, "data.worker_count": 0,
               "train.eval_at_end": True}  # the final eval sees the constants too
  straight = tiny_config(**{"train.num_steps": 4, **overrides})
  trainer, full = run(straight, tmp_path / "straight", tok, task=AdaptedTask(straight))
  assert set(full.params) == set(full.ema_params) == {"delta"}
  assert sum(x.size for x in jax.tree.leaves(full.opt_state)) <= 2 * 3 + 2  # mu, nu, counts
  assert float(jnp.abs(full.params["delta"]["bias"]).sum()) > 0
  kernel = trainer.constants["base"]["fc1"]["kernel"]
  assert kernel.sharding.spec == P("fsdp") and len(kernel.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(kernel),
                                AdaptedTask(straight).initial_values()["base"]["fc1"]["kernel"])
  _, saved = read_item(tmp_path / "straight")
  assert set(saved) == {"delta"}
  half = tiny_config(**{"train.num_steps": 2, **overrides})
  run(half, tmp_path / "resumed", tok, task=AdaptedTask(half))
  _, resumed = run(straight, tmp_path / "resumed", tok, task=AdaptedTask(straight))
  np.testing.assert_array_equal(np.asarray(full.params["delta"]["bias"]),
                                np.asarray(resumed.params["delta"]["bias"]))
  np.testing.assert_array_equal(losses(tmp_path / "straight"), losses(tmp_path / "resumed"))
  # A loaded run gets its constants back from the task.
  from jaxt2i.tasks import base as tasks_base
  tasks_base.TASKS["adapted_test"] = AdaptedTask
  try:
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    config["task"] = "adapted_test"
    (tmp_path / "straight" / "config.json").write_text(json.dumps(config))
    _, _, params = load_run(tmp_path / "straight")
  finally:
    del tasks_base.TASKS["adapted_test"]
  assert set(params) == {"base", "delta"}


def test_grad_accumulation_matches_full_batch(tmp_path, tok):
  base = {"train.num_steps": 2, "mesh.data": 2, "optim.name": "sgd", "optim.b1": 0.0,
          "optim.grad_clip_norm": 0.0}
  _, full = run(tiny_config(**base), tmp_path / "full", tok, jax.devices()[:2])
  _, accum = run(tiny_config(**base, **{"train.grad_accum_steps": 4}), tmp_path / "accum", tok,
                 jax.devices()[:2])
  a, b = flat(jax.device_get(full.params)), flat(jax.device_get(accum.params))
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


def test_checkpoint_items_and_workdir_layout(tmp_path, tok):
  config = tiny_config(**{"train.num_steps": 4, "checkpoint.every_steps": 2,
                          "checkpoint.keep": 1, "mesh.data": 1, "train.eval_at_end": True})
  run(config, tmp_path, tok, jax.devices()[:1])
  ckpt = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["4"]
  items = {p.name for p in (ckpt / "4").iterdir()}
  assert {"params", "opt_state", "ema_params", "counters", "data_position", "config"} <= items
  step, counters = read_item(tmp_path, "counters")
  assert int(counters["step"]) == 4
  position = json.loads((ckpt / "4" / "data_position" / "metadata").read_text())
  assert position == {"position": 4 * config.batch_size}
  assert json.loads((tmp_path / "config.json").read_text())["task"] == "caption_regression"
  assert list((tmp_path / "tensorboard").iterdir())
  assert list((tmp_path / "samples").glob("samples_*.png"))
  # The run's own tokenizer copy: sampling needs neither the data nor the tokenizer cache.
  assert (tmp_path / "tokenizer.model").read_bytes() == tok.model_proto
  from jaxt2i.data import pipeline
  config.data.tokenizer = "/nowhere/tok.model"
  assert pipeline.load_tokenizer(config.data, tmp_path).model_proto == tok.model_proto


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", -4, "config.batch_size=-4"),
    ("task", "nope", "config.task='nope' is unknown"),
    ("sharding.strategy", "zero", "config.sharding.strategy='zero'"),
    ("train.compute_dtype", "float16", "config.train.compute_dtype"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate"),
    ("model.channels", 0, "config.model.channels=0"),
    ("data.image_size", 48, "config.data.image_size=48"),
])
def test_bad_config_values_name_the_field(field, value, message, tok):
  config = tiny_config(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
    Trainer(config, "/nonexistent/never-written", tokenizer=tok, source=records())


def test_batch_not_divisible_by_mesh_names_the_field(tok):
  config = tiny_config(**{"batch_size": 12, "mesh.data": 8})
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=12 .*data\*fsdp = 8"):
    Trainer(config, "/nonexistent/never-written", tokenizer=tok, source=records())


def test_unknown_config_key_is_rejected(tok):
  config = tiny_config()
  config.unlock()
  config.train.nmu_steps = 3
  with pytest.raises(config_lib.ConfigError, match=r"train.nmu_steps"):
    config_lib.validate(config)
  config = tiny_config()
  config.unlock()
  config.model.widht = 3
  with pytest.raises(config_lib.ConfigError, match=r"model.widht"):
    Trainer(config, "/nonexistent/never-written", tokenizer=tok, source=records())


def test_bad_mesh_is_a_clear_error(tok):
  config = tiny_config(**{"mesh.data": 3})
  with pytest.raises(ValueError, match=r"config.mesh .* uses 3 devices but 8"):
    Trainer(config, "/nonexistent/never-written", tokenizer=tok, source=records())


def test_bfloat16_compute_keeps_float32_params(tmp_path, tok):
  config = tiny_config(**{"train.num_steps": 2, "mesh.data": 2,
                          "train.compute_dtype": "bfloat16"})
  trainer, state = run(config, tmp_path, tok, jax.devices()[:2])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(trainer.last_metrics["train/loss"])
  # The activations really are bfloat16: the jaxpr of the loss contains bf16 convolutions.
  batch = {k: jnp.zeros((2,) + s.shape[1:], s.dtype) for k, s in trainer.abstract_batch.items()}
  jaxpr = str(jax.make_jaxpr(trainer.task.loss)(state.params, batch, jax.random.key(0)))
  assert "bf16" in jaxpr


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, tok):
  from jaxt2i.training.checkpoint import CheckpointError
  run(tiny_config(**{"train.num_steps": 1, "mesh.data": 1}), tmp_path, tok, jax.devices()[:1])
  wider = tiny_config(**{"train.num_steps": 2, "mesh.data": 1, "model.mlp_dim": 48})
  with pytest.raises(CheckpointError, match=r"cannot be restored into this run \(changed model"):
    run(wider, tmp_path, tok, jax.devices()[:1])
