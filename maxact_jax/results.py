"""Results files in the reference's schema (a superset of it), written atomically.

`<output_dir>/json/<model>_activation_stats.json` keeps the reference's
per-tap scalars (`per_layer_stats`); `<model>_top5_stats.json` its top-K lists.
What this project adds sits under new top-level keys, so tools written for the
reference read our files unchanged:

- `extremes`: per tap, where its max and min sit (sample index in the corpus,
  token position, token id and text, channel);
- `moe`: per MoE layer (`layer_{i}_moe_experts`), tokens and max |output| per
  expert, the expert behind the block's largest output, router entropy;
- in the top-K document, `topk_locations`: per tap, where each entry of its
  `topk_abs` list sits (same fields; null for the reference's zero padding);
- `run`: how the numbers were made (dtype, batch shapes, padding, versions).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from maxact_jax import atomic, stats
from maxact_jax.errors import UserError


atomic_write_json = atomic.write_json
# `qeval`'s result document, read by the report.
QEVAL_SUFFIX = '_qeval.json'


def ensure_output_dir(output_dir: str) -> str:
  """`<output_dir>/json`, created; an output path that is a file is a UserError."""
  if not output_dir:
    raise UserError('no --output_dir given')
  for path in (output_dir, os.path.join(output_dir, 'json')):
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f'output path {path} exists and is not a directory')
  json_dir = os.path.join(output_dir, 'json')
  try:
    os.makedirs(json_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create output directory {json_dir}: {e.strerror or e}') from None
  return json_dir


def model_name_of(model_path: str) -> str:
  """The name results are filed under: the checkpoint directory's name (a GGUF file's
  name without .gguf)."""
  name = os.path.basename(os.path.normpath(model_path))
  return name[:-len('.gguf')] if name.endswith('.gguf') and len(name) > len('.gguf') else name


def build_documents(*, header: dict[str, Any], taps: dict[str, stats.TapStats],
                    describe: Callable[[tuple[int, int, int]], dict[str, Any]] | None = None,
                    run_info: dict[str, Any] | None = None) -> tuple[dict, dict]:
  """(activation_stats document, top5_stats document) from the merged tap states.

  header: model_name, model_path, model_type, num_hidden_layers, hidden_size,
    data_path, num_samples, max_seq_len (the reference's header fields).
  describe: (sample, position, channel) -> location fields (token id, text).
  """
  moe_taps = {name: t for name, t in taps.items() if isinstance(t, stats.MoEStats)}
  taps = {name: t for name, t in taps.items() if name not in moe_taps}
  summary = {name: t.finalize() for name, t in taps.items()}
  summary = {k: v for k, v in summary.items() if v}
  value, location = stats.global_max(summary)
  per_layer, top5 = {}, {}
  for name, entry in summary.items():
    per_layer[name] = {k: float(v) for k, v in entry.items() if k not in stats.TOPK_FIELDS}
    t = taps[name]
    per_layer[name]['nan_count'] = float(t.nan)
    per_layer[name]['posinf_count'] = float(t.posinf)
    per_layer[name]['neginf_count'] = float(t.neginf)
    lists = {k: v for k, v in entry.items() if k in stats.TOPK_FIELDS}
    if lists:
      top5[name] = lists
  describe = describe or (lambda at: {'sample': at[0], 'position': at[1], 'channel': at[2]})
  extremes = {}
  for name in summary:
    locs = taps[name].locations()
    extremes[name] = {'max': describe(locs['max']), 'min': describe(locs['min'])}
  doc = dict(header)
  doc['global_max_activation'] = value
  doc['global_max_location'] = location
  doc['per_layer_stats'] = per_layer
  if location:
    tap, which = location.rsplit(' (', 1)
    doc['global_max_detail'] = {'tap': tap, 'which': which.rstrip(')'), **extremes[tap][which.rstrip(')')]}
  doc['extremes'] = extremes
  nonfinite = {name: {'nan': t.nan, 'posinf': t.posinf, 'neginf': t.neginf}
               for name, t in taps.items() if t.nan or t.posinf or t.neginf}
  doc['nonfinite'] = nonfinite
  if moe_taps:
    doc['moe'] = {name: t.finalize(describe) for name, t in moe_taps.items()}
  if run_info:
    doc['run'] = run_info

  # Global top-K over the per-tap top-5 lists, as the reference builds it.
  pairs = [(a, s) for e in top5.values() for a, s in zip(e['top5_abs'], e['top5_signed'])]
  pairs = sorted(pairs, reverse=True)[:stats.TOP_K]
  abs_vals = [p[0] for p in pairs]
  top_doc = dict(header)
  top_doc.update({
      'global_top5_abs': abs_vals,
      'global_top5_signed': [p[1] for p in pairs],
      'global_top5_abs_mean': sum(abs_vals) / len(abs_vals) if abs_vals else 0.0,
      'per_layer_stats': top5,
  })
  # Where each top-K entry sits, aligned with its topk_abs list (outside
  # per_layer_stats, so the reference's per-tap entries keep their keys).
  top_doc['topk_locations'] = {
      name: [describe(at) if at[0] != stats.NO_SAMPLE else None for at in taps[name].locations()['topk']]
      for name in top5}
  return doc, top_doc


def write_documents(output_dir: str, model_name: str, doc: dict, top_doc: dict) -> tuple[str, str]:
  json_dir = ensure_output_dir(output_dir)
  main = os.path.join(json_dir, f'{model_name}_activation_stats.json')
  top = os.path.join(json_dir, f'{model_name}_top5_stats.json')
  atomic_write_json(main, doc)
  atomic_write_json(top, top_doc)
  return main, top


def read_stats_file(path: str) -> dict[str, Any]:
  """A previous `measure` result (its global maximum: `quant`'s `peak` tap, `qeval`'s x axis)."""
  if not os.path.isfile(path):
    raise UserError(f'stats file {path} does not exist')
  try:
    with open(path, encoding='utf-8') as f:
      doc = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'stats file {path} is not valid JSON: {e}') from None
  if not isinstance(doc, dict) or not isinstance(doc.get('global_max_location'), str):
    raise UserError(f'stats file {path} has no global_max_location (is it an *_activation_stats.json?)')
  return doc
