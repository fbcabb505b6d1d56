"""The `jaxt2i` command line: flags only; every command calls a library function.

  jaxt2i train --config configs/NAME.py[:VARIANT] --workdir DIR [--config.FIELD=VALUE ...]
  jaxt2i data build shapes [--variant 64|32|128|tiny] [--data_dir DIR]
  jaxt2i data build folder --path DIR --dataset_name NAME [--data_dir DIR]
  jaxt2i data tokenizer --dataset NAME [--vocab_size N] [--out PATH] [--data_dir DIR]
  jaxt2i eval --workdir DIR [--num_prompts M] [--samples_per_prompt K]
  jaxt2i eval shapes --images DIR_OR_NPZ --captions FILE [--out report.json]
  jaxt2i eval train-evaluator [--image_size 64] [--force]
  jaxt2i eval fid --images A --reference B --inception_weights FILE
  jaxt2i sample --workdir DIR --prompt "..." [--prompt ...] [--out grid.png]
  jaxt2i convert dall-e-dvae --encoder encoder.pkl --decoder decoder.pkl --out DIR
  jaxt2i convert to-diffusers WORKDIR OUT [--lora_only]
  jaxt2i bench --config configs/NAME.py[:VARIANT] [--config.FIELD=VALUE ...] [--steps N]
      [--peak_tflops X] [--profile DIR] [--out FILE] [--record]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

USAGE = """usage: jaxt2i COMMAND [options]

Text-to-image models in JAX/Flax.

commands:
  train      train (or resume) a recipe:  jaxt2i train --config configs/baseline_shapes.py:tiny --workdir /tmp/run
             any config field can be overridden: --config.batch_size=128 --config.mesh.fsdp=4
  data       build data sets and tokenizers:
               jaxt2i data build shapes --variant 64          (shapes-v1, the built-in benchmark)
               jaxt2i data build folder --path DIR --dataset_name NAME   (your image+caption files)
               jaxt2i data tokenizer --dataset shapes_v1/64 --vocab_size 64
  sample     images from a trained run:  jaxt2i sample --workdir DIR --prompt "a red circle ..."
  eval       sample a run and score it on shapes-v1 (eval.json + index.html in the workdir):
               jaxt2i eval --workdir DIR
             score your own images:  jaxt2i eval shapes --images DIR --captions captions.txt
             (re)train the cached scorer:  jaxt2i eval train-evaluator --image_size 64
             Inception FID between two image sets:  jaxt2i eval fid --images A --reference B
               --inception_weights pt_inception-2015-12-05-6726825d.pth
  convert    published weights -> a jaxt2i run directory (local files only):
               jaxt2i convert dall-e-dvae --encoder encoder.pkl --decoder decoder.pkl --out DIR
             a latent-diffusion run -> a diffusers Stable Diffusion folder:
               jaxt2i convert to-diffusers WORKDIR OUT
  bench      time one training step of any recipe: compile time, analytic and XLA FLOPs,
             memory per device, step time, examples/s, MFU (JSON; --record adds a row to
             benchmarks/RESULTS.md):
               jaxt2i bench --config configs/baseline_shapes.py:tiny --steps 10

`jaxt2i COMMAND --help` explains each command's options.
"""


TRAIN_HELP = """usage: jaxt2i train --config configs/NAME.py[:VARIANT] --workdir DIR [--config.FIELD=VALUE ...]

Trains a recipe, or resumes the run already in DIR.

  --config FILE[:VARIANT]   recipe (Python file with get_config(variant)); e.g.
                            configs/baseline_shapes.py:tiny
  --config.FIELD=VALUE      override any field of the recipe, e.g. --config.batch_size=128
                            --config.mesh.fsdp=4 --config.sharding.strategy=fsdp
                            --config.train.num_steps=10000; unknown fields are rejected
  --workdir DIR             run directory (local path or gs://...): checkpoints/, config.json,
                            metrics.jsonl, tensorboard/, samples/

Several processes (TPU pod, GPU cluster): run the same command on every host; see
config.distributed (auto-detects Cloud TPU VMs and SLURM) and launch/.
"""


def _train(argv: list[str]) -> None:
  if not argv or any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(TRAIN_HELP)
    return
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config", None, "Recipe file: configs/NAME.py or configs/NAME.py:VARIANT. Fields can be "
      "overridden with --config.FIELD=VALUE; unknown fields are rejected.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, config.json, metrics, "
                      "samples. An existing run there is resumed.")
  flags.mark_flags_as_required(["config", "workdir"])

  parsed = []  # set once the flags are parsed: later errors are the run's, not a flag's

  def main(args):
    parsed.append(True)
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments {args[1:]}")
    import logging
    # Orbax and friends log every checkpoint file at INFO through absl; the run's own
    # progress lines (root logger) stay visible. --verbosity=1 brings them back.
    if flags.FLAGS.verbosity <= 0:
      logging.getLogger("absl").setLevel(logging.WARNING)
    from jaxt2i.training import config as config_lib
    from jaxt2i.training.trainer import Preempted, train_and_evaluate
    config = flags.FLAGS.config
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as e:
      raise app.UsageError(str(e)) from None
    from jaxt2i.data.builders import DataSetError
    try:
      train_and_evaluate(config, flags.FLAGS.workdir)
    except (config_lib.ConfigError, DataSetError, FileNotFoundError) as e:
      # What the run needs and does not have (a first stage's workdir, a data set not built,
      # a field the task rejects): one line saying so, not a traceback.
      sys.exit(f"jaxt2i train: {e}")
    except Preempted as e:
      # 128 + SIGTERM, as if the signal had ended the process: `&&` chains (make demo) and
      # schedulers see an unfinished run, not a finished one.
      print(f"jaxt2i train: {e}", file=sys.stderr)
      sys.exit(128 + 15)

  try:
    app.run(main, argv=["jaxt2i train"] + argv)
  except (AttributeError, KeyError) as e:
    if parsed:
      raise
    # ml_collections rejects --config.FIELD overrides of fields the recipe does not have.
    sys.exit(f"jaxt2i train: {_config_field_error(e, argv)}")


def _data(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="jaxt2i data", description="Build data sets and tokenizers.")
  sub = parser.add_subparsers(dest="action", required=True)
  build = sub.add_parser("build", help="build a tfds data set (array_record) into --data_dir",
                         description="Build a data set: 'shapes' (the shapes-v1 benchmark, "
                         "generated) or 'folder' (image + caption files of your own).")
  build.add_argument("name", choices=["shapes", "folder"])
  build.add_argument("--variant", default="64", help="shapes: 64 | 32 | 128 | tiny (default 64)")
  build.add_argument("--path", help="folder: the directory of images and captions")
  build.add_argument("--dataset_name", help="folder: name to read it back as "
                     "image_text_folder/NAME")
  build.add_argument("--data_dir", default=None, help="default $JAXT2I_DATA_DIR or "
                     "~/.cache/jaxt2i/data")
  tok = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer on a data set's captions")
  tok.add_argument("--dataset", required=True, help="e.g. shapes_v1/64")
  tok.add_argument("--vocab_size", type=int, default=64)
  tok.add_argument("--out", default=None, help="where to write the .model (default: cached "
                   "beside the data)")
  tok.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)

  from jaxt2i.data import builders, tokenizer
  if args.action == "build":
    kwargs = ({"variant": args.variant} if args.name == "shapes"
              else {"path": args.path, "dataset_name": args.dataset_name})
    if args.name == "folder" and not args.path:
      parser.error("data build folder needs --path")
    try:
      summary = builders.build(args.name, data_dir=args.data_dir, **kwargs)
    except ValueError as e:
      sys.exit(f"jaxt2i data build: {e}")
    print(json.dumps(summary, indent=2, default=str))
  else:
    try:
      tok_obj = tokenizer.tokenizer_for_dataset(args.dataset, data_dir=args.data_dir,
                                                vocab_size=args.vocab_size, output_path=args.out)
      print(tok_obj.path)
    except ValueError as e:
      sys.exit(f"jaxt2i data tokenizer: {e}")


def _quiet_logs(verbose: bool) -> None:
  import logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  if not verbose:
    logging.getLogger("absl").setLevel(logging.WARNING)


def _autoregressive_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--temperature", type=float, default=None,
                      help="DALL-E: softmax temperature (default: config.model.temperature)")
  parser.add_argument("--top_k", type=int, default=None,
                      help="DALL-E: sample among the k likeliest tokens (0: all)")
  parser.add_argument("--top_p", type=float, default=None,
                      help="DALL-E: nucleus sampling mass (1: off)")
  parser.add_argument("--num_candidates", type=int, default=None,
                      help="DALL-E with CLIP: images drawn per prompt, the CLIP-best kept")
  parser.add_argument("--clip_workdir", default=None,
                      help="DALL-E: a CLIP run (configs/clip_shapes.py) that ranks the "
                      "candidates (default: the one the run was trained with, if any)")


def _eval(argv: list[str]) -> None:
  actions = ("shapes", "train-evaluator", "fid")
  if argv and argv[0] in actions:
    action, argv = argv[0], argv[1:]
  else:
    action = "run"
  parser = argparse.ArgumentParser(prog=f"jaxt2i eval{'' if action == 'run' else ' ' + action}")
  parser.add_argument("--cache_dir", default=None, help="where trained evaluators are cached "
                      "(default $JAXT2I_CACHE_DIR or ~/.cache/jaxt2i)")
  parser.add_argument("--verbose", action="store_true", help="library INFO logs too")
  if action == "run":
    parser.description = ("Samples a trained run on shapes-v1 prompts (of test and test_heldout "
                          "unless --splits says otherwise), scores them and writes eval.json + "
                          "index.html (+ samples/).")
    parser.add_argument("--workdir", required=True, help="the run's directory")
    parser.add_argument("--num_prompts", type=int, default=16, help="prompts per split")
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint_step", type=int, default=None,
                        help="a kept checkpoint's step (default: the latest)")
    parser.add_argument("--out", default=None, help="report directory (default: the workdir)")
    parser.add_argument("--splits", nargs="+", default=["test", "test_heldout"],
                        choices=["train", "test", "test_heldout"],
                        help="shapes-v1 splits whose first --num_prompts captions are sampled; "
                        "`train` (training captions) for choosing sampling settings without "
                        "looking at the test prompts")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="diffusion: classifier-free guidance scale (default: the run's "
                        "config.model.guidance_scale; 1 = no guidance)")
    parser.add_argument("--steps", type=int, default=None,
                        help="diffusion: sampling steps (default: config.model.num_sampling_steps)")
    parser.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "dpmpp_2m"],
                        help="diffusion: sampler (default: config.model.sampler)")
    _autoregressive_flags(parser)
  elif action == "shapes":
    parser.description = ("Scores images against their shapes-v1 captions: fraction fully "
                          "correct and per-attribute accuracy.")
    parser.add_argument("--images", required=True, help="folder of images (sorted by name) or "
                        ".npz of uint8 [N, H, W, 3]")
    parser.add_argument("--captions", required=True, help="text file, one caption per line, in "
                        "the images' order")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--split", default="custom", help="name of this prompt set in the report")
    parser.add_argument("--per_image", action="store_true", help="include per-image verdicts")
  elif action == "train-evaluator":
    parser.description = ("Trains the shapes-v1 evaluator for an image size into the cache "
                          "(skipped when already there, unless --force).")
    parser.add_argument("--image_size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--force", action="store_true")
  else:
    parser.description = "Inception-v3 FID and KID between two image sets (local weights only)."
    parser.add_argument("--images", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--inception_weights", required=True, help="pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth (or .safetensors / .npz)")
    parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  _quiet_logs(args.verbose)
  from jaxt2i.eval import runner, shapes as shapes_eval
  try:
    if action == "run":
      sampling = {k: v for k, v in (("guidance_scale", args.guidance_scale),
                                    ("num_sampling_steps", args.steps),
                                    ("sampler", args.sampler),
                                    ("temperature", args.temperature), ("top_k", args.top_k),
                                    ("top_p", args.top_p),
                                    ("num_candidates", args.num_candidates)) if v is not None}
      results = runner.evaluate_workdir(args.workdir, num_prompts=args.num_prompts,
                                        samples_per_prompt=args.samples_per_prompt,
                                        seed=args.seed, out_dir=args.out,
                                        cache_dir=args.cache_dir, sampling=sampling,
                                        clip_workdir=args.clip_workdir, step=args.checkpoint_step,
                                        splits=args.splits)
      out = args.out or args.workdir
      print(runner.main_summary(results))
      print(f"report: {out}/index.html  numbers: {out}/eval.json")
    elif action == "shapes":
      images = runner.read_images(args.images)
      captions = runner.read_captions(args.captions)
      report = shapes_eval.score(images, captions, cache_dir=args.cache_dir,
                                 include_images=args.per_image)
      if args.out:
        with open(args.out, "w") as f:
          f.write(json.dumps({args.split: report}, indent=2))
        report = {k: v for k, v in report.items() if k != "images"}  # the file has them
      print(json.dumps({args.split: report}, indent=2))
    elif action == "train-evaluator":
      directory = shapes_eval.train_evaluator(args.image_size, args.cache_dir, force=args.force)
      print((directory / "evaluator.json").read_text())
      print(f"evaluator: {directory}")
    else:
      from jaxt2i.eval import inception
      result = inception.fid_between(runner.read_images(args.images),
                                     runner.read_images(args.reference), args.inception_weights)
      text = json.dumps(result, indent=2)
      if args.out:
        with open(args.out, "w") as f:
          f.write(text)
      print(text)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"jaxt2i eval{'' if action == 'run' else ' ' + action}: {e}")


def _sample(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="jaxt2i sample",
                                   description="Sample a trained run and save a grid (one row "
                                   "per prompt).")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompt", action="append", required=True,
                      help="repeat for several prompts; '' is the unconditional prompt")
  parser.add_argument("--out", default="samples.png")
  parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--checkpoint_step", type=int, default=None,
                      help="a kept checkpoint's step (default: the latest)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--guidance_scale", type=float, default=None)
  parser.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "dpmpp_2m"])
  parser.add_argument("--negative_prompt", default=None)
  _autoregressive_flags(parser)
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  _quiet_logs(args.verbose)
  try:
    from PIL import Image

    import jaxt2i
    from jaxt2i.training.metrics import image_grid
    pipe = jaxt2i.load(args.workdir, clip_workdir=args.clip_workdir, step=args.checkpoint_step)
    images = pipe(args.prompt, num_images_per_prompt=args.num_images, seed=args.seed,
                  steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                  negative_prompt=args.negative_prompt, output="np",
                  num_candidates=args.num_candidates,
                  **{k: getattr(args, k) for k in ("temperature", "top_k", "top_p")
                     if getattr(args, k) is not None})
    Image.fromarray(image_grid(images, columns=args.num_images)).save(args.out)
    print(f"{len(images)} images -> {args.out}")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"jaxt2i sample: {e}")


def _convert(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="jaxt2i convert", description="Convert published "
                                   "weights (local files) into a jaxt2i run directory.")
  sub = parser.add_subparsers(dest="kind", required=True)
  dalle = sub.add_parser(
      "dall-e-dvae", help="OpenAI's DALL-E discrete VAE (the dall_e package's pickles)",
      description="Writes DIR as a 'dvae' run (config.json + checkpoint) from the dall_e "
      "package's encoder.pkl and decoder.pkl; the DALL-E task reads it through "
      "model.dvae_workdir. The pickles are unpickled: convert only files you trust.")
  dalle.add_argument("--encoder", required=True, help="encoder.pkl (or its state_dict .pt)")
  dalle.add_argument("--decoder", required=True, help="decoder.pkl (or its state_dict .pt)")
  dalle.add_argument("--out", required=True, help="the run directory to write (must be new)")
  dalle.add_argument("--image_size", type=int, default=256,
                     help="config.data.image_size of the run (the published model: 256)")
  export = sub.add_parser(
      "to-diffusers", help="a latent-diffusion run -> a diffusers Stable Diffusion folder",
      description="Writes OUT as a diffusers folder (model_index.json, unet/, vae/, "
      "scheduler/, and text_encoder/ + tokenizer/ for runs with a CLIP text encoder) that "
      "StableDiffusionPipeline.from_pretrained and jaxt2i.from_diffusers read. EMA weights "
      "unless --no_ema.")
  export.add_argument("workdir", help="the latent-diffusion run")
  export.add_argument("out", help="the folder to write")
  export.add_argument("--no_ema", action="store_true", help="the raw (not EMA) weights")
  export.add_argument("--lora_only", action="store_true",
                      help="a LoRA run: write only its adapters, OUT/pytorch_lora_weights"
                      ".safetensors (diffusers' load_lora_weights reads it); without it the "
                      "base model is written with the adapters merged")
  args = parser.parse_args(argv)
  _quiet_logs(False)
  try:
    if args.kind == "to-diffusers":
      from jaxt2i.convert.to_diffusers import save_diffusers, save_lora
      from jaxt2i.eval.runner import load_run
      config, task, params = load_run(args.workdir, ema=not args.no_ema)
      if args.lora_only:
        summary = {"out": save_lora(task, params, args.out)}
      else:
        summary = {"out": args.out, "parts": save_diffusers(config, task, params, args.out)}
    else:
      from jaxt2i.convert.dall_e import convert_dall_e_dvae
      summary = convert_dall_e_dvae(args.encoder, args.decoder, args.out,
                                    image_size=args.image_size)
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"jaxt2i convert {args.kind}: {e}")
  print(json.dumps(summary, indent=2))


BENCH_HELP = """usage: jaxt2i bench --config configs/NAME.py[:VARIANT] [--config.FIELD=VALUE ...]
                    [options]

Builds the recipe's Trainer, compiles its training step ahead of time and times it on the
initialised state: compile seconds, analytic FLOPs (3 x the forward loss's matmul and
convolution FLOPs, counted on its jaxpr) beside XLA's cost analysis, memory per device,
median / min step time, examples/s and model FLOP utilisation (MFU). Writes a JSON.

  --config FILE[:VARIANT]   recipe, e.g. configs/baseline_shapes.py:tiny; --config.FIELD=VALUE
                            overrides a field as for `jaxt2i train`
  --steps N                 timed steps (default 10), after --warmup N (default 2)
  --data auto|loader|synthetic
                            the batch: the config's data loader, or random values of the
                            loader's shapes; auto (default) uses the loader when the data set
                            exists. The same device-resident batch feeds every step.
  --peak_tflops X           peak TFLOP/s of one device for MFU (e.g. 989 for an H100's dense
                            bf16); default: the measured matmul ceiling of this machine
  --profile DIR             also trace --profile_steps (default 3) steps into DIR with
                            jax.profiler (TensorBoard / Perfetto)
  --devices N               use the first N devices (default: all)
  --workdir DIR             the Trainer's directory (default: a temporary one); a run with
                            checkpoints there is restored and benchmarked as it is
  --out FILE                the JSON (default: WORKDIR/bench.json with --workdir, else
                            benchmarks/results/bench_<recipe>_<variant>.json)
  --record                  append a row to the `bench` table of benchmarks/RESULTS.md
                            (--results_md FILE for another file)
  --verbose                 library INFO logs too
"""


def _config_field_error(e: Exception, argv: list[str]) -> str:
  """ml_collections' KeyError / AttributeError for an unknown --config.FIELD, readable."""
  text = str(e.args[0] if e.args else e).replace("\\n", "\n")
  names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
  field = names[0] if names else text
  hint = re.search(r"Did you mean \S+", text)
  overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
  bad = [o for o in overrides if o.split(".")[-1] == field] or overrides
  return (f"unknown config field {field!r} (from {', '.join(bad)})"
          f"{'; ' + hint.group(0).replace(chr(34), '') + '?' if hint else ''}")


def _bench(argv: list[str]) -> None:
  if not argv or any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(BENCH_HELP)
    return
  import shlex

  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()  # not absl's global FLAGS: `bench` can run beside other commands
  config_flags.DEFINE_config_file("config", None, "recipe", flag_values=fv, lock_config=True,
                                  sys_argv=["jaxt2i bench"] + argv)
  flags.DEFINE_integer("steps", 10, "timed steps", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "untimed steps first", flag_values=fv)
  flags.DEFINE_enum("data", "auto", ["auto", "loader", "synthetic"], "batch source",
                    flag_values=fv)
  flags.DEFINE_float("peak_tflops", 0.0, "peak TFLOP/s per device; 0: measure", flag_values=fv)
  flags.DEFINE_string("profile", "", "jax.profiler trace directory", flag_values=fv)
  flags.DEFINE_integer("profile_steps", 3, "steps traced", flag_values=fv)
  flags.DEFINE_integer("devices", 0, "first N devices; 0: all", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Trainer directory", flag_values=fv)
  flags.DEFINE_string("out", None, "JSON file", flag_values=fv)
  flags.DEFINE_bool("record", False, "append a row to RESULTS.md", flag_values=fv)
  flags.DEFINE_string("results_md", None, "the RESULTS.md for --record", flag_values=fv)
  flags.DEFINE_bool("verbose", False, "library INFO logs", flag_values=fv)
  # Before parsing: loading the recipe imports modules that may log (and so set up logging).
  _quiet_logs("--verbose" in argv)
  try:
    rest = fv(["jaxt2i bench"] + argv)
    if fv.config is not None:
      fv.config.keys()  # a recipe that failed to load raises here
  except (AttributeError, KeyError) as e:
    sys.exit(f"jaxt2i bench: {_config_field_error(e, argv)}")
  except OSError as e:  # the recipe file
    reason = re.search(r"\[Errno \d+\] (.*)", str(e))
    sys.exit(f"jaxt2i bench: cannot load the --config recipe: "
             f"{reason.group(1) if reason else str(e).splitlines()[-1]}")
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # A failing get_config() comes with its traceback: its last line says what failed.
    sys.exit(f"jaxt2i bench: {lines[-1] if 'Traceback' in str(e) else str(e)}")
  if len(rest) > 1:
    sys.exit(f"jaxt2i bench: unexpected arguments {rest[1:]}")
  if fv.config is None:
    sys.exit("jaxt2i bench: --config is required, e.g. --config configs/baseline_shapes.py:tiny")

  from jaxt2i import bench
  from jaxt2i.training import config as config_lib
  config_arg = config_flags.get_config_filename(fv["config"])  # as given: PATH[:VARIANT]
  options = bench.BenchOptions(
      steps=fv.steps, warmup=fv.warmup, data=fv.data, peak_tflops=fv.peak_tflops,
      profile_dir=fv.profile, profile_steps=fv.profile_steps, num_devices=fv.devices)
  try:
    result = bench.run(fv.config, fv.workdir, options)
  except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
    sys.exit(f"jaxt2i bench: {e}")
  result = {"config": config_arg,
            "overrides": [a for a in argv if a.startswith("--config.")],
            "command": " ".join(["jaxt2i", "bench"] + [shlex.quote(a) for a in argv]),
            **result, "config_values": config_lib.to_json_dict(fv.config)}
  out = bench.write_json(result, fv.out or bench.default_out(config_arg, fv.workdir))
  written = [("json", str(out))]
  if fv.record:
    results_md = fv.results_md or bench.RESULTS_MD
    bench.record(result, results_md)
    written.append(("recorded in", str(results_md)))
  print(f"\njaxt2i bench\n{bench.summary(result, written)}")


COMMANDS = {"train": _train, "data": _data, "eval": _eval, "sample": _sample,
            "convert": _convert, "bench": _bench}


def run(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return
  command = argv.pop(0)
  if command not in COMMANDS:
    sys.exit(f"jaxt2i: unknown command {command!r}\n\n{USAGE}")
  COMMANDS[command](argv)


if __name__ == "__main__":
  run()
