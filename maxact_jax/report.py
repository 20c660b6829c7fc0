"""Cross-model report, its numbers: where the largest activation sits, MoE vs dense, top-K scan.

Reads every `*_activation_stats.json` under a results folder (ours, or the
reference repository's: the schema is the same, ours may carry extra keys) and
the matching `*_top5_stats.json` beside it into one summary (`build_summary`):
one entry per model (peak, its location and component, per-component peaks,
the residual stream's layerwise max |x|), the MoE/dense pairs with their peak
ratio, how many models carry their maximum in the residual stream, the top-K
scan, and per model whose anatomy files sit beside its results (`maxact-jax
measure` writes `<model>_anatomy.json` and `<model>_channel_absmax.npz`,
`maxact-jax anatomy` adds `<model>_surface.npz`) its outlier anatomy,
condensed; and from every `<model>_qeval.json` under the folder (`maxact-jax
qeval`) the quantization impact, scheme by scheme, against the model's global
maximum (`quantization_summary`).

This module holds all the numbers and no rendering: `maxact_jax.report_render`
writes them as `summary.json`, `report.md`, `report.html` and the plots, so a
summary.json can be re-rendered without the result files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maxact_jax import anatomy, results
from maxact_jax.errors import UserError
from maxact_jax.stats import is_activation_tap

ACTIVATION_SUFFIX = '_activation_stats.json'
TOP5_SUFFIX = '_top5_stats.json'

MOE_MODEL_TYPES = ('qwen3_moe', 'qwen3_5_moe', 'gpt_oss', 'bailing_moe', 'glm4_moe')
ROUTER_SUFFIXES = ('_router_logits', '_moe_gate')

# Components, in forward order, as they appear in summary.json.
COMPONENTS = ('embedding', 'attention', 'mlp', 'moe', 'residual', 'final_norm')
COMPONENT_LABELS = {
    'embedding': 'embedding',
    'attention': 'attention',
    'mlp': 'MLP',
    'moe': 'MoE',
    'residual': 'residual stream',
    'final_norm': 'final norm',
    'other': 'other',
}

# Hot layers reported by the top-K scan.
N_HOT_LAYERS = 3

_LAYER_RE = re.compile(r'^layer_(\d+)_(.+)$')
_LOCATION_RE = re.compile(r'^(\S+)(?:\s+\((max|min)\))?$')
# A parameter count in a model name: '-32B', '_0.8b', '-30B-A3B' (total first).
_SIZE_RE = re.compile(r'[-_](\d+(?:\.\d+)?)[bB](?=$|[-_.])')
_ACTIVE_RE = re.compile(r'[-_][aA](\d+(?:\.\d+)?)[bB](?=$|[-_.])')
# Training tokens in a checkpoint name (Ling-mini-5T): not part of the family.
_TOKENS_RE = re.compile(r'[-_]\d+(?:\.\d+)?[tT]$')


# ---------------------------------------------------------------------------
# Small parsers.


def parse_location(location: str) -> tuple[str, str | None]:
  """'layer_3_hidden (max)' -> ('layer_3_hidden', 'max')."""
  m = _LOCATION_RE.match(location.strip())
  if not m:
    raise ValueError(f'unrecognised location {location!r}')
  return m.group(1), m.group(2)


def layer_of(tap: str) -> int | None:
  """The layer index of `layer_{i}_...` taps, None for the others."""
  m = _LAYER_RE.match(tap)
  return int(m.group(1)) if m else None


def tap_component(tap: str, moe_layer: bool = False) -> str:
  """Which component a tap measures (see COMPONENTS); 'other' if unknown."""
  if tap == 'embedding_output':
    return 'embedding'
  if tap == 'final_layernorm':
    return 'final_norm'
  if tap.endswith('_hidden'):
    return 'residual'
  if tap.endswith('_attn_output'):
    return 'attention'
  if tap.endswith('_mlp_output'):
    return 'moe' if moe_layer else 'mlp'
  return 'other'


def params_from_name(name: str) -> tuple[float | None, float | None]:
  """(total, active) parameter counts in billions read from a model name.

  'Qwen3-32B' -> (32, None); 'Qwen3-30B-A3B' -> (30, 3); 'Qwen3.5-0.8B' ->
  (0.8, None); 'Ling-mini-5T' -> (None, None) (5T counts training tokens).
  """
  total = None
  for m in _SIZE_RE.finditer(name):
    if name[m.start() + 1] in 'aA':  # '-A3B' is the active count
      continue
    total = float(m.group(1))
    break
  m = _ACTIVE_RE.search(name)
  return total, (float(m.group(1)) if m else None)


def family_from_name(name: str) -> str:
  """The family part of a checkpoint name: what precedes its size.

  'Qwen3-30B-A3B' and 'Qwen3-32B' -> 'Qwen3'; 'Qwen3.5-35B-A3B' -> 'Qwen3.5';
  'gemma-2-9b' -> 'gemma-2'; 'gemma-2b' -> 'gemma'; 'Ling-mini-5T' -> 'Ling-mini'.
  """
  m = _SIZE_RE.search(name)
  if m:
    return name[:m.start()]
  return _TOKENS_RE.sub('', name)


def estimate_params(config: Mapping[str, Any]) -> int | None:
  """Language-model parameters estimated from a Hugging Face config.json.

  Counts embeddings, the LM head (unless tied), attention (full, gated, or
  Gated-DeltaNet linear layers), dense MLPs and MoE blocks (experts, router,
  shared expert). Norm weights and biases are left out (well under 0.1%); a
  multimodal wrapper's vision tower is not counted. Returns None when the
  config lacks a field the estimate needs.
  """
  text = config.get('text_config') or config
  try:
    h = int(text['hidden_size'])
    n_layers = int(text['num_hidden_layers'])
    vocab = int(text['vocab_size'])
    n_heads = int(text['num_attention_heads'])
    n_kv = int(text.get('num_key_value_heads') or n_heads)
    head_dim = int(text.get('head_dim') or h // n_heads)
    inter = int(text.get('intermediate_size') or 0)
    n_experts = int(text.get('num_experts') or text.get('num_local_experts') or
                    text.get('n_routed_experts') or 0)
    q_out = n_heads * head_dim * (2 if text.get('attn_output_gate') else 1)
    attn = h * q_out + 2 * h * n_kv * head_dim + n_heads * head_dim * h
    linear = 0
    layer_types = list(text.get('layer_types') or [])
    if 'linear_attention' in layer_types:
      nk, nv = int(text['linear_num_key_heads']), int(text['linear_num_value_heads'])
      dk, dv = int(text['linear_key_head_dim']), int(text['linear_value_head_dim'])
      conv_dim = 2 * nk * dk + nv * dv
      # qkv + z projections, beta/alpha projections, output, depthwise conv.
      linear = (h * (conv_dim + nv * dv) + 2 * h * nv + nv * dv * h +
                conv_dim * int(text.get('linear_conv_kernel_dim') or 4))
    dense_mlp = 3 * h * inter
    moe = 0
    if n_experts:
      expert_inter = int(text.get('moe_intermediate_size') or inter)
      shared = int(text.get('shared_expert_intermediate_size') or text.get(
          'moe_shared_expert_intermediate_size') or 0)
      n_shared = int(text.get('num_shared_experts') or text.get('n_shared_experts') or 0)
      if not shared and n_shared:
        shared = n_shared * expert_inter
      moe = n_experts * 3 * h * expert_inter + n_experts * h + 3 * h * shared
  except (KeyError, TypeError, ValueError, ZeroDivisionError):
    return None
  if not inter and not n_experts:
    return None
  dense_layers = set(range(n_layers)) if not n_experts else set(text.get('mlp_only_layers') or [])
  if n_experts:
    dense_layers |= set(range(int(text.get('first_k_dense_replace') or 0)))
  total = 0
  for i in range(n_layers):
    kind = layer_types[i] if i < len(layer_types) else 'full_attention'
    total += linear if kind == 'linear_attention' else attn
    total += dense_mlp if i in dense_layers else moe
  tied = text.get('tie_word_embeddings', config.get('tie_word_embeddings', True))
  total += vocab * h * (1 if tied else 2)
  return total


# ---------------------------------------------------------------------------
# Reading result files.


def _load_json(path: Path) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON: {e}') from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read {path}: {e}') from None


def _per_layer(data: Any, path: Path) -> dict[str, dict[str, Any]]:
  if not isinstance(data, dict):
    raise UserError(f'{path}: expected a JSON object at the top level')
  pls = data.get('per_layer_stats')
  if not isinstance(pls, dict) or not pls:
    raise UserError(f'{path}: no per_layer_stats object (is it a maxact result file?)')
  for tap, entry in pls.items():
    if not isinstance(entry, dict):
      raise UserError(f'{path}: per_layer_stats[{tap!r}] is not an object')
  return pls


def find_result_files(results_dir: str | os.PathLike[str]) -> list[tuple[Path, Path | None]]:
  """(activation stats, matching top5 stats or None) for every model under a folder."""
  root = Path(results_dir)
  if not root.exists():
    raise UserError(f'results dir {root} does not exist')
  if not root.is_dir():
    raise UserError(f'results dir {root} is not a directory')
  found = []
  for path in sorted(root.rglob('*' + ACTIVATION_SUFFIX)):
    if not path.is_file():
      continue
    top5 = path.with_name(path.name[:-len(ACTIVATION_SUFFIX)] + TOP5_SUFFIX)
    found.append((path, top5 if top5.is_file() else None))
  if not found:
    raise UserError(f'no *{ACTIVATION_SUFFIX} files under {root}')
  return found


def _abs_peak(entry: Mapping[str, Any]) -> float | None:
  """max(|max|, |min|) of one tap's statistics, None when it has neither."""
  vals = [abs(float(entry[k])) for k in ('max', 'min') if isinstance(entry.get(k), (int, float))]
  vals = [v for v in vals if not math.isnan(v)]
  return max(vals) if vals else None


def _global_max(pls: Mapping[str, Mapping[str, Any]]) -> tuple[float, str] | None:
  """(signed value, 'tap (max|min)') over activation taps; first in forward order wins ties."""
  best = None
  for tap, entry in pls.items():
    if not is_activation_tap(tap):
      continue
    for side in ('max', 'min'):
      v = entry.get(side)
      if not isinstance(v, (int, float)) or math.isnan(v):
        continue
      if best is None or abs(v) > abs(best[0]):
        best = (float(v), f'{tap} ({side})')
  return best


def _moe_evidence(data: Mapping[str, Any], pls: Mapping[str, Any]) -> list[str]:
  evidence = []
  if data.get('model_type') in MOE_MODEL_TYPES:
    evidence.append(f'model_type {data["model_type"]}')
  if any(tap.endswith(ROUTER_SUFFIXES) for tap in pls):
    evidence.append('router taps')
  if params_from_name(str(data.get('model_name', '')))[1] is not None:
    evidence.append('name -A<n>B')
  return evidence


def _params(data: Mapping[str, Any], name: str) -> tuple[float | None, float | None, str | None]:
  """(total, active) in billions and where the total came from."""
  _, active = params_from_name(name)
  for key in ('total_params', 'num_params', 'num_parameters'):
    if isinstance(data.get(key), (int, float)) and data[key] > 0:
      return float(data[key]) / 1e9, active, f'file:{key}'
  config = data.get('config')
  source = 'file:config'
  if not isinstance(config, dict) and isinstance(data.get('model_path'), str):
    path = Path(data['model_path']) / 'config.json'
    try:
      config = json.loads(path.read_text(encoding='utf-8')) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      config = None
    source = f'config:{path}'
  if isinstance(config, dict):
    n = estimate_params(config)
    if n:
      return n / 1e9, active, source
  total, _ = params_from_name(name)
  return total, active, ('name' if total is not None else None)


def model_entry(data: Mapping[str, Any], path: Path, results_dir: Path) -> dict[str, Any]:
  """The summary entry of one activation-stats file."""
  pls = _per_layer(data, path)
  name = str(data.get('model_name') or path.name[:-len(ACTIVATION_SUFFIX)])
  evidence = _moe_evidence({**data, 'model_name': name}, pls)
  is_moe = bool(evidence)
  router_layers = {layer_of(t) for t in pls if t.endswith(ROUTER_SUFFIXES)}

  def moe_layer(i: int | None) -> bool:
    # Dense layers inside a MoE model (Ling's first layer) stay 'mlp' when the
    # file has router taps to tell them apart.
    return is_moe and (not router_layers or i in router_layers)

  value = data.get('global_max_activation')
  location = data.get('global_max_location')
  if not isinstance(value, (int, float)) or not isinstance(location, str):
    found = _global_max(pls)
    if found is None:
      raise UserError(f'{path}: no global maximum and no activation tap with max/min')
    value, location = found
  try:
    tap, side = parse_location(location)
  except ValueError:
    raise UserError(f'{path}: global_max_location {location!r} is not "<tap> (max|min)"') from None
  max_layer = layer_of(tap)

  n_layers = data.get('num_hidden_layers')
  hidden_layers = sorted(i for t in pls if t.endswith('_hidden') and (i := layer_of(t)) is not None)
  if not isinstance(n_layers, int) or n_layers <= 0:
    n_layers = (hidden_layers[-1] + 1) if hidden_layers else None
  residual: dict[str, list] = {'layer': [], 'max_abs': []}
  for i in hidden_layers:
    v = _abs_peak(pls[f'layer_{i}_hidden'])
    if v is not None and (n_layers is None or i < n_layers):
      residual['layer'].append(i)
      residual['max_abs'].append(v)
  extra = [i for i in hidden_layers if n_layers is not None and i >= n_layers]

  peaks: dict[str, float] = {}
  for t, entry in pls.items():
    if not is_activation_tap(t):
      continue
    comp = tap_component(t, moe_layer(layer_of(t)))
    v = _abs_peak(entry)
    if v is not None and v > peaks.get(comp, -1.0):
      peaks[comp] = v

  # Residual layers with a token flagged: `sun_pass` by the reference's per-token rule (sun_n_pass),
  # `layer_median_pass` by the layer-median rule of Sun et al.'s code (our files only; None otherwise).
  def passing(key):
    return [(t, e.get(key)) for t, e in pls.items() if t.endswith('_hidden') and isinstance(e.get(key), (int, float))]

  sun, lm = passing('sun_n_pass'), passing('layer_median_n_pass')
  total, active, params_source = _params(data, name)
  return {
      'model_name': name,
      'model_type': data.get('model_type'),
      'family': family_from_name(name),
      'is_moe': is_moe,
      'moe_evidence': evidence,
      'num_hidden_layers': n_layers,
      'hidden_size': data.get('hidden_size'),
      'num_samples': data.get('num_samples'),
      'total_params_b': total,
      'active_params_b': active,
      'params_source': params_source,
      'global_max_activation': float(value),
      'global_max_abs': abs(float(value)),
      'global_max_location': location,
      'global_max_tap': tap,
      'component': tap_component(tap, moe_layer(max_layer)),
      'max_layer': max_layer,
      'peak_relative_depth': (max_layer / (n_layers - 1)
                              if max_layer is not None and n_layers and n_layers > 1 else None),
      'component_peaks': {c: peaks[c] for c in COMPONENTS if c in peaks},
      'residual_layerwise': residual,
      'extra_layers': extra,
      'sun_pass': (any(n >= 1 for _, n in sun) if sun else None),
      'sun_pass_layers': sum(1 for _, n in sun if n >= 1),
      'layer_median_pass': (any(n >= 1 for _, n in lm) if lm else None),
      'layer_median_pass_layers': sum(1 for _, n in lm if n >= 1),
      'files': {
          'activation_stats': str(path.relative_to(results_dir)),
          'top5_stats': None,
      },
  }


# ---------------------------------------------------------------------------
# MoE / dense pairs.


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
  """'A:B,C:D' -> [('A', 'B'), ('C', 'D')] (MoE first, dense second)."""
  if not text:
    return []
  pairs = []
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    parts = [p.strip() for p in item.split(':')]
    if len(parts) != 2 or not all(parts):
      raise UserError(f'--pairs entry {item!r} is not MOE:DENSE (e.g. Qwen3-30B-A3B:Qwen3-32B)')
    pairs.append((parts[0], parts[1]))
  return pairs


# Auto pairs whose total sizes differ by more than this factor are flagged.
PAIR_SIZE_TOLERANCE = 2.0


def _pair(moe: Mapping[str, Any], dense: Mapping[str, Any], source: str) -> dict[str, Any]:
  moe_peak, dense_peak = moe['global_max_abs'], dense['global_max_abs']
  mp, dp = moe['total_params_b'], dense['total_params_b']
  size_ratio = dp / mp if mp and dp else None
  return {
      'moe': moe['model_name'],
      'dense': dense['model_name'],
      'moe_peak': moe_peak,
      'dense_peak': dense_peak,
      'ratio': (dense_peak / moe_peak) if moe_peak else math.inf,
      'moe_params_b': mp,
      'dense_params_b': dp,
      'size_mismatch': (size_ratio is not None and
                        max(size_ratio, 1 / size_ratio) > PAIR_SIZE_TOLERANCE),
      'source': source,
  }


def match_pairs(models: Sequence[Mapping[str, Any]],
                overrides: Sequence[tuple[str, str]] = ()) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
  """Each MoE model with the dense model of its family nearest in total parameters.

  Returns (pairs, unpaired): a MoE model with no dense model of its family in
  the results is listed in `unpaired` with the reason; none is invented.
  `overrides` (MoE, dense) replace the automatic choice for their MoE model.
  """
  by_name = {m['model_name']: m for m in models}
  by_lower = {n.lower(): m for n, m in by_name.items()}

  def lookup(name: str) -> Mapping[str, Any]:
    m = by_name.get(name) or by_lower.get(name.lower())
    if m is None:
      raise UserError(f'--pairs names {name!r}, which is not among the models found '
                      f'({", ".join(sorted(by_name))})')
    return m

  chosen: dict[str, dict[str, Any]] = {}
  for moe_name, dense_name in overrides:
    moe, dense = lookup(moe_name), lookup(dense_name)
    if moe['model_name'] in chosen:
      raise UserError(f'--pairs gives {moe["model_name"]} twice')
    chosen[moe['model_name']] = _pair(moe, dense, 'override')

  pairs, unpaired = [], []
  for moe in models:
    if moe['model_name'] in chosen:
      pairs.append(chosen.pop(moe['model_name']))
      continue
    if not moe['is_moe']:
      continue
    family = moe['family'].lower()
    candidates = [m for m in models if not m['is_moe'] and m['family'].lower() == family]
    if not candidates:
      unpaired.append({'moe': moe['model_name'],
                       'reason': f'no dense model of family {moe["family"]} in the results'})
      continue
    sized = [m for m in candidates if m['total_params_b'] is not None]
    if moe['total_params_b'] is not None and sized:
      best = min(sized, key=lambda m: (abs(m['total_params_b'] - moe['total_params_b']),
                                       -m['total_params_b']))
    elif len(candidates) == 1:
      best = candidates[0]
    else:
      unpaired.append({'moe': moe['model_name'],
                       'reason': 'total parameters unknown: cannot choose the nearest dense model '
                                 '(use --pairs)'})
      continue
    pairs.append(_pair(moe, best, 'auto'))
  pairs.extend(chosen.values())  # overrides whose left side is not MoE
  return pairs, unpaired


# ---------------------------------------------------------------------------
# Top-K scan.


def _tap_topk(entry: Mapping[str, Any]) -> tuple[list[float], list[float]]:
  for key in ('topk', 'top100', 'top10', 'top5'):
    a, s = entry.get(f'{key}_abs'), entry.get(f'{key}_signed')
    if isinstance(a, list) and a:
      s = s if isinstance(s, list) and len(s) == len(a) else list(a)
      return [float(x) for x in a], [float(x) for x in s]
  return [], []


def _strip_padding(abs_vals: list[float], signed: list[float]) -> tuple[list[float], list[float]]:
  # The reference starts every top-K from K zeros: trailing zeros are padding.
  n = len(abs_vals)
  while n and abs_vals[n - 1] == 0.0:
    n -= 1
  return abs_vals[:n], signed[:n]


def global_topk(pls: Mapping[str, Mapping[str, Any]], k: int | None = None) -> tuple[list[float], list[float]]:
  """The top-K over the union of every activation tap's top-K list.

  Ordered by (|x|, signed x) descending, as the reference builds its
  `global_top5_*` lists; K defaults to the longest per-tap list.
  """
  merged, longest = [], 0
  for tap, entry in pls.items():
    if not is_activation_tap(tap):
      continue
    a, s = _tap_topk(entry)
    longest = max(longest, len(a))
    merged.extend(zip(a, s))
  merged.sort(reverse=True)
  merged = merged[:k or longest]
  return [a for a, _ in merged], [s for _, s in merged]


def topk_scan(data: Mapping[str, Any], num_layers: int | None = None) -> dict[str, Any] | None:
  """Saturation, concentration, sign consistency and hot layers of one model.

  `data` is a top5-stats file or an activation-stats file carrying top-K
  lists. None when it has no top-K lists.
  """
  pls = data.get('per_layer_stats') or {}
  if not any(_tap_topk(e)[0] for t, e in pls.items() if is_activation_tap(t)):
    return None
  g_abs, g_signed = data.get('global_top5_abs'), data.get('global_top5_signed')
  if isinstance(g_abs, list) and g_abs and isinstance(g_signed, list) and len(g_signed) == len(g_abs):
    g_abs, g_signed, source = [float(x) for x in g_abs], [float(x) for x in g_signed], 'file'
  else:
    (g_abs, g_signed), source = global_topk(pls), 'recomputed'
  g_abs, g_signed = _strip_padding(g_abs, g_signed)
  if not g_abs:
    return None
  top1, top1_signed = g_abs[0], g_signed[0]
  sign = 1.0 if top1_signed >= 0 else -1.0
  top5 = g_abs[:5]

  # Per layer: the largest top-1 over the layer's activation taps; and the
  # residual stream's top-1 / mean(top-5).
  layer_top1: dict[int, tuple[float, str]] = {}
  taps_at_max = []
  per_layer = []
  for tap, entry in pls.items():
    if not is_activation_tap(tap):
      continue
    a, _ = _strip_padding(*_tap_topk(entry))
    if not a:
      continue
    if a[0] == top1:
      taps_at_max.append(tap)
    i = layer_of(tap)
    if i is not None and (i not in layer_top1 or a[0] > layer_top1[i][0]):
      layer_top1[i] = (a[0], tap)
    if i is not None and tap.endswith('_hidden'):
      m5 = entry.get('top5_abs_mean')
      m5 = float(m5) if isinstance(m5, (int, float)) else sum(a[:5]) / len(a[:5])
      per_layer.append({'layer': i, 'top1': a[0], 'top5_mean': m5,
                        'top1_over_top5_mean': a[0] / m5 if m5 else None})
  per_layer.sort(key=lambda r: r['layer'])
  hot = sorted(layer_top1.items(), key=lambda kv: (-kv[1][0], kv[0]))[:N_HOT_LAYERS]
  layers_at_max = sorted({layer_of(t) for t in taps_at_max if layer_of(t) is not None})
  return {
      'k': len(g_abs),
      'global_source': source,
      'top1': top1,
      'top1_signed': top1_signed,
      'saturation': {
          'value': top1,
          'count': sum(1 for x in g_abs if x == top1),
          'taps_at_max': len(taps_at_max),
          'layers_at_max': layers_at_max,
      },
      'concentration': {
          'top1_over_top5_mean': top1 / (sum(top5) / len(top5)),
          'top1_over_topk_mean': top1 / (sum(g_abs) / len(g_abs)),
      },
      'sign_consistency': sum(1 for s in g_signed if s * sign > 0) / len(g_signed),
      'hot_layers': [{'layer': i, 'tap': tap, 'top1': v} for i, (v, tap) in hot],
      'per_layer': per_layer,
      'num_layers': num_layers,
  }


# ---------------------------------------------------------------------------
# Outlier anatomy (files written by `maxact-jax measure` and `maxact-jax anatomy`).

N_ANATOMY_CHANNELS = 12
N_ANATOMY_TOKENS = 8


def anatomy_entry(path: Path, results_dir: Path) -> dict[str, Any] | None:
  """The anatomy of the model of an activation-stats file, condensed; None without an anatomy file."""
  stem = path.name[:-len(ACTIVATION_SUFFIX)]
  apath = path.with_name(stem + anatomy.ANATOMY_SUFFIX)
  if not apath.is_file():
    return None
  a = _load_json(apath)
  if not isinstance(a, dict):
    raise UserError(f'{apath}: expected a JSON object at the top level')
  rel = lambda p: str(p.relative_to(results_dir)) if p.is_file() else None
  oc = a.get('outlier_channels') or {}
  channels = oc.get('channels') or []
  return {
      'file': rel(apath),
      'channels_file': rel(path.with_name(stem + anatomy.CHANNELS_SUFFIX)),
      'surface_file': rel(path.with_name(stem + anatomy.SURFACE_SUFFIX)),
      'global_max': a.get('global_max'),
      'rule': (oc.get('rule') or {}).get('rule'),
      'min_layers': oc.get('min_layers'),
      'num_layers': oc.get('num_layers'),
      'n_outlier_channels': len(channels),
      'outlier_channels': channels[:N_ANATOMY_CHANNELS],
      # The token attribution under each rule the file holds, the attribution's own rule first
      # (files written before the layer-median rule hold only the per-token rule).
      'tokens': [_tokens_entry(a[key]) for key in anatomy.ATTRIBUTION_KEYS.values() if a.get(key)],
      'layerwise': a.get('layerwise'),
      'surface': a.get('surface'),
  }


def _tokens_entry(ta: Mapping[str, Any]) -> dict[str, Any]:
  return {
      'rule': anatomy.attribution_rule(ta),
      'rule_label': anatomy.RULE_LABELS[anatomy.attribution_rule(ta)],
      'flagged': ta.get('flagged_tokens'),
      'total': ta.get('tokens'),
      'classes': {c: {'flagged': v.get('flagged'), 'total': v.get('total')}
                  for c, v in (ta.get('classes') or {}).items()},
      'top_token_ids': (ta.get('top_token_ids') or [])[:N_ANATOMY_TOKENS],
  }


# ---------------------------------------------------------------------------
# Quantization impact (files written by `maxact-jax qeval`).

QEVAL_METRICS = ('delta_loss', 'kl_mean', 'kl_p99', 'top1_agreement')


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
  """Spearman's rho (Pearson's r of the ranks, ties sharing their mean rank); None
  under 3 points or when either side is constant."""
  if len(x) < 3:
    return None

  def ranks(v):
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind='stable')
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):  # ties: their mean rank
      r[v == value] = r[v == value].mean()
    return r

  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return None
  return float(np.corrcoef(rx, ry)[0, 1])


def quantization_summary(results_dir: Path, models: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
  """Every `*_qeval.json` under the folder: per model and scheme the change in loss, the KL
  (mean, p99), top-1 agreement and the fewest INT levels a linear input keeps, against the
  model's global maximum |x| (its measure result's where the report has one, else what
  qeval recorded), and per scheme the rank correlation of KL with the global maximum."""
  paths = sorted(p for p in results_dir.rglob('*' + results.QEVAL_SUFFIX) if p.is_file())
  if not paths:
    return None
  measured = {m['model_name']: m for m in models}
  out_models, schemes = [], []
  for path in paths:
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get('schemes'), dict):
      raise UserError(f'{path}: not a qeval result (no "schemes")')
    name = doc.get('model_name') or path.name[:-len(results.QEVAL_SUFFIX)]
    if name in measured:
      peak, source = measured[name]['global_max_abs'], 'measure'
    else:
      value = doc.get('global_max_activation')
      peak, source = (abs(float(value)) if value is not None else None), 'qeval calibration'
    entry = {'model_name': name, 'file': str(path.relative_to(results_dir)), 'global_max_abs': peak,
             'global_max_source': source, 'dtype': doc.get('dtype'),
             'baseline_loss': (doc.get('baseline') or {}).get('loss'),
             'eval_positions': doc.get('predicted_positions'), 'schemes': {}}
    for scheme, s in doc['schemes'].items():
      if scheme not in schemes:
        schemes.append(scheme)
      levels = ((s.get('sites_summary') or {}).get('min_levels') or {})
      entry['schemes'][scheme] = {**{k: s.get(k) for k in QEVAL_METRICS}, 'min_levels': levels.get('levels'),
                                  'min_levels_site': levels.get('site')}
    out_models.append(entry)
  correlation = {}
  for scheme in schemes:
    pts = [(m['global_max_abs'], m['schemes'][scheme]['kl_mean']) for m in out_models
           if scheme in m['schemes'] and m['global_max_abs'] is not None
           and m['schemes'][scheme]['kl_mean'] is not None]
    correlation[scheme] = {'models': len(pts),
                           'spearman_kl_vs_global_max': rank_correlation([p[0] for p in pts], [p[1] for p in pts])}
  return {'schemes': schemes, 'models': out_models, 'correlation': correlation}


# ---------------------------------------------------------------------------
# The summary.


def _sort_key(m: Mapping[str, Any]):
  p = m['total_params_b']
  return (m['family'].lower(), p if p is not None else math.inf, m['model_name'].lower())


def build_summary(results_dir: str | os.PathLike[str],
                  pairs: str | Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
  """Read the result files under `results_dir` into the report's numbers.

  Args:
    results_dir: searched recursively for `*_activation_stats.json`.
    pairs: MoE/dense overrides, as 'MOE:DENSE,...' or a list of (moe, dense).
  """
  root = Path(results_dir)
  overrides = parse_pairs(pairs) if isinstance(pairs, str) or pairs is None else list(pairs)
  models, scans, seen = [], [], {}
  for path, top5_path in find_result_files(root):
    data = _load_json(path)
    entry = model_entry(data, path, root)
    entry['anatomy'] = anatomy_entry(path, root)
    name = entry['model_name']
    if name in seen:
      raise UserError(f'two result files for model {name}: {seen[name]} and {path}')
    seen[name] = path
    scan = None
    if top5_path is not None:
      top5 = _load_json(top5_path)
      _per_layer(top5, top5_path)
      scan = topk_scan(top5, entry['num_hidden_layers'])
      entry['files']['top5_stats'] = str(top5_path.relative_to(root))
    if scan is None:
      scan = topk_scan(data, entry['num_hidden_layers'])
      if scan is not None:
        scan['source_file'] = entry['files']['activation_stats']
    elif top5_path is not None:
      scan['source_file'] = entry['files']['top5_stats']
    models.append(entry)
    if scan is not None:
      scans.append({'model_name': name, **scan})
  models.sort(key=_sort_key)
  order = {m['model_name']: i for i, m in enumerate(models)}
  scans.sort(key=lambda s: order[s['model_name']])
  moe_pairs, unpaired = match_pairs(models, overrides)
  # Where the maximum is not in the residual stream, say whether the residual
  # stream reaches the same |x| anyway (a tie resolved by forward order).
  elsewhere = [{'model_name': m['model_name'], 'location': m['global_max_location'],
                'component': m['component'],
                'residual_peak': m['component_peaks'].get('residual'),
                'residual_ties': m['component_peaks'].get('residual') == m['global_max_abs']}
               for m in models if m['component'] != 'residual']
  return {
      'results_dir': str(root),
      'models': models,
      'moe_dense_pairs': moe_pairs,
      'moe_unpaired': unpaired,
      'residual_stream_max': {
          'count': len(models) - len(elsewhere),
          'total': len(models),
          'elsewhere': elsewhere,
      },
      'topk_scan': scans,
      'no_topk': [m['model_name'] for m in models if m['model_name'] not in {s['model_name'] for s in scans}],
      'quantization': quantization_summary(root, models),
  }


# ---------------------------------------------------------------------------
# Numbers for people.


def fmt_value(v: float | None) -> str:
  """A peak for a table: '17,664', '122', '1.25', '—' for None."""
  if v is None:
    return '—'
  if not math.isfinite(v):
    return str(v)
  if abs(v) >= 1000:
    return f'{v:,.0f}'
  if abs(v) >= 100:
    return f'{v:.0f}'
  return f'{v:.3g}'


def fmt_params(b: float | None) -> str:
  return '—' if b is None else (f'{b:.3g}B')


def fmt_ratio(r: float | None) -> str:
  """'23.4x'; two significant digits below 1 ('0.92x')."""
  if r is None:
    return '—'
  if not math.isfinite(r):
    return str(r)
  return f'{r:.1f}x' if r >= 1 else f'{r:.2g}x'


def headline(summary: Mapping[str, Any]) -> str:
  """A few lines for the terminal."""
  rs = summary['residual_stream_max']
  lines = [f'{rs["total"]} models; residual stream carries the global max in {rs["count"]} of {rs["total"]}']
  lines += [f'{p["dense"]} / {p["moe"]}: {fmt_ratio(p["ratio"])}'
            + (f' (sizes differ: {fmt_params(p["dense_params_b"])} vs {fmt_params(p["moe_params_b"])})'
               if p['size_mismatch'] else '')
            for p in summary['moe_dense_pairs']]
  lines += [f'{u["moe"]}: not paired ({u["reason"]})' for u in summary['moe_unpaired']]
  return '\n'.join(lines)
