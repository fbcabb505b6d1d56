"""eval.json + index.html: the numbers, and every sample with its caption and verdicts.

    out/eval.json         results (per split: fully_correct, per_attribute, distances, ...)
    out/index.html        summary table, then per prompt its samples with a tick or cross per
                          attribute (C colour, S shape, Z size, P place, N count)
    out/samples/*.png     one PNG per sample, shown pixelated at 2x or more
    out/grid_SPLIT.png    all samples of a split: one row per prompt
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from jaxt2i.training.metrics import image_grid

_MARKS = (("color", "C"), ("shape", "S"), ("size", "Z"), ("place", "P"), ("count", "N"))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 2em; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
.prompt { margin: 1em 0; }
.caption { font-weight: 600; }
.samples { display: flex; gap: 10px; flex-wrap: wrap; }
.sample { text-align: center; font-size: 12px; }
.sample img { image-rendering: pixelated; border: 2px solid #ccc; }
.sample.ok img { border-color: #2a2; }
.sample.bad img { border-color: #c22; }
.yes { color: #2a2; } .no { color: #c22; }
"""


def _verdict_marks(verdict: Mapping[str, Any]) -> str:
  parts = []
  for key, letter in _MARKS:
    if key in ("place", "count"):
      ok = verdict[key]
    else:
      ok = all(verdict["objects"][key])
    parts.append(f'<span class="{"yes" if ok else "no"}">{letter}{"&#10003;" if ok else "&#10007;"}'
                 "</span>")
  return " ".join(parts)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  return html.escape(str(value))


def _summary_rows(results: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  rows = []
  for split, res in results.get("splits", {}).items():
    flat = {"fully_correct": res.get("fully_correct")}
    flat.update(res.get("per_attribute", {}))
    for key in ("frechet_distance", "frechet_distance_real", "kid", "diversity", "num_images"):
      if key in res:
        flat[key] = res[key]
    rows.append((split, flat))
  return rows


def _split_grid(out: epath.Path, split: Any, prompts: Sequence[Mapping[str, Any]]) -> str | None:
  """grid_SPLIT.png: one row per prompt (prompts with the same sample count only)."""
  counts = {len(p["images"]) for p in prompts}
  if len(counts) != 1:
    return None
  images = np.concatenate([np.asarray(p["images"]) for p in prompts])
  name = f"grid_{''.join(c if c.isalnum() or c in '-_' else '_' for c in str(split))}.png"
  Image.fromarray(image_grid(images, columns=counts.pop())).save(out / name)
  return name


def write_report(out_dir: epath.PathLike, results: Mapping[str, Any],
                 prompts: Sequence[Mapping[str, Any]] = (), title: str = "jaxt2i evaluation"
                 ) -> epath.Path:
  """Writes eval.json, index.html and samples/ under `out_dir`; returns the html path.

  `prompts`: per prompt {"split", "caption", "images": uint8 [K, H, W, 3], "verdicts": K
  verdicts from jaxt2i.eval.shapes.judge (optional)}.
  """
  out = epath.Path(out_dir)
  (out / "samples").mkdir(parents=True, exist_ok=True)
  (out / "eval.json").write_text(json.dumps(results, indent=2, default=float))
  rows = _summary_rows(results)
  columns = list(dict.fromkeys(k for _, flat in rows for k in flat))
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
  meta = {k: v for k, v in results.items() if k != "splits"}
  if meta:
    parts.append("<p>" + "; ".join(f"{html.escape(str(k))}: {_fmt(v)}" for k, v in meta.items()
                                   if not isinstance(v, (dict, list))) + "</p>")
  if rows:
    parts.append("<table class='summary'><tr><th>split</th>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
    for split, flat in rows:
      parts.append(f"<tr><th>{html.escape(split)}</th>"
                   + "".join(f"<td>{_fmt(flat.get(c, ''))}</td>" for c in columns) + "</tr>")
    parts.append("</table>")
    parts.append("<p>C colour, S shape, Z size, P place, N object count; a green frame marks a "
                 "fully correct image.</p>")
  current = None
  for p_index, prompt in enumerate(prompts):
    if prompt.get("split") != current:
      current = prompt.get("split")
      grid = _split_grid(out, current, [p for p in prompts if p.get("split") == current])
      link = f" <a href='{grid}'>(all samples as one PNG)</a>" if grid else ""
      parts.append(f"<h2>{html.escape(str(current))}{link}</h2>")
    parts.append(f"<div class='prompt'><div class='caption'>{html.escape(prompt['caption'])}"
                 "</div><div class='samples'>")
    images = np.asarray(prompt["images"])
    verdicts = prompt.get("verdicts") or [None] * len(images)
    for j, (image, verdict) in enumerate(zip(images, verdicts)):
      name = f"samples/{p_index:04d}_{j}.png"
      Image.fromarray(image).save(out / name)
      width = max(128, image.shape[1] * 2)
      cls = "" if verdict is None else ("ok" if verdict["correct"] else "bad")
      marks = "" if verdict is None else f"<div>{_verdict_marks(verdict)}</div>"
      parts.append(f"<div class='sample {cls}'><img src='{name}' width='{width}'>{marks}</div>")
    parts.append("</div></div>")
  parts.append("</body></html>")
  page = out / "index.html"
  page.write_text("\n".join(parts))
  return page
