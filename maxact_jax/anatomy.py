"""Outlier anatomy: which channels carry the massive activations, on which tokens, from which layer.

`measure` already reduces, on device, where each tap's extremes and top-K
entries sit. For the residual stream (`layer_{i}_hidden`) it also keeps

- the max |x| of every channel over the corpus (`stats.tap_partial(...,
  anatomy=True)`: one max over B * T per channel, max-merged on the host),
  saved as a [layers, hidden] float32 array in `<model>_channel_absmax.npz`;
- two flags per token, one per rule of which tokens carry a massive
  activation (`TOKEN_RULES`), returned as [B, T] bools per layer and counted
  here with the batch's token ids: by token id, by position and by *class*
  (BOS, first token, other special tokens, newline, delimiter/punctuation,
  other). Both rules ask for max |x| over the channels > 100 and > 1000x a
  median |x|; they differ in which median:
  - `layer_median` (the token attribution): the median |x| of the whole layer
    output of the token's sequence, as Sun et al.'s code takes it;
  - `token_median` (recorded beside it): the token's own median |x| over the
    channels, the reference pipeline's rule behind its `sun_*` fields. It
    misses a token whose whole state is large: the first token of
    SmolLM2-135M has a median |x| near 50 against the layer's ~2, so its
    peak is ~500x the one and ~14,000x the other.

From these, `<model>_anatomy.json` lists the persistent outlier channels
(over a threshold in at least a share of the layers, with the layer where each
appears and the last where it is over it), the token attribution, the
layerwise top-1/2/3 |x| against the median, and the residual stream's peak
location per layer. The threshold rule is selectable (`ChannelRule`):

- `sun`: a channel's max |x| over `t_val` (100) and over `t_ratio` (1000)
  times the layer's median |x| (the median from measure's log histogram);
- `mad`: a robust z-score over the layer's channels, (a - median) /
  (1.4826 * MAD) over `mad_k`, for models whose outliers stay under 100.

This module is the analysis: pure functions over merged statistics and the
documents measure wrote, no device and no figure. The token x channel surface
of one layer for one sample is not part of `measure` (it needs the raw
activations): `maxact_jax.surface` runs that one sample again, on request.
The `anatomy` job (`maxact_jax.anatomy_job`, behind `maxact-jax anatomy`)
puts the two together; the views (PNG) are drawn by `maxact_jax.plots`, for
the `anatomy` command and for the cross-model report alike.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np

from maxact_jax import atomic, data, gguf_file, results, stats
from maxact_jax.config import read_config_json
from maxact_jax.errors import UserError

ANATOMY_SUFFIX = '_anatomy.json'
CHANNELS_SUFFIX = '_channel_absmax.npz'
SURFACE_SUFFIX = '_surface.npz'

# Token classes, in order of precedence: BOS anywhere; else the first token of
# a sample; else another special token; else by the token's text.
CLASSES = ('bos', 'first', 'special', 'newline', 'delimiter', 'other')
BOS, FIRST, SPECIAL, NEWLINE, DELIMITER, OTHER = range(len(CLASSES))
CLASS_HELP = {
    'bos': 'the BOS token (any position)',
    'first': 'the first token of a sample, when it is not BOS',
    'special': 'another special token (EOS, padding, chat markers)',
    'newline': 'a token whose text holds a newline',
    'delimiter': 'a token of punctuation only (.,;:!? quotes, brackets), spaces aside',
    'other': 'every other token',
}
TOP_TOKENS = 20
TOP_POSITIONS = 10


# ---------------------------------------------------------------------------
# Token classes.


def text_class(text: str) -> int:
  """The class of a token by its text alone: NEWLINE, DELIMITER or OTHER."""
  if '\n' in text or '\r' in text:
    return NEWLINE
  core = text.strip()
  if core and all(unicodedata.category(c).startswith('P') for c in core):
    return DELIMITER
  return OTHER


def bos_token_id(model_path: str, tokenizer: data.Tokenizer | None) -> int | None:
  """The BOS id: tokenizer_config.json's bos_token, else config.json's bos_token_id."""
  path = os.path.join(model_path, 'tokenizer_config.json')
  if tokenizer is not None and os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      tok = json.load(f).get('bos_token')
    if isinstance(tok, dict):
      tok = tok.get('content')
    if isinstance(tok, str) and tokenizer.token_id(tok) is not None:
      return tokenizer.token_id(tok)
  path = os.path.join(model_path, 'config.json')
  if os.path.isfile(path) or gguf_file.find(model_path):
    raw = read_config_json(model_path)
    for cfg in (raw, raw.get('text_config') or {}):
      if isinstance(cfg.get('bos_token_id'), int):
        return cfg['bos_token_id']
  return None


@dataclasses.dataclass(frozen=True)
class TokenTable:
  """Per vocabulary id: its class (int8, see CLASSES, before the first-token rule) and text."""

  classes: np.ndarray  # [V] int8
  texts: list[str] | None  # None without a tokenizer
  bos_id: int | None

  @classmethod
  def build(cls, vocab_size: int, tokenizer: data.Tokenizer | None, bos_id: int | None) -> 'TokenTable':
    table = np.full(vocab_size, OTHER, np.int8)
    texts = None
    if tokenizer is not None:
      n = min(vocab_size, tokenizer.vocab_size)
      texts = tokenizer.decode_each(range(n))
      table[:n] = [text_class(t) for t in texts]
      for i in tokenizer.special_ids():
        if i < vocab_size:
          table[i] = SPECIAL
    if bos_id is not None and 0 <= bos_id < vocab_size:
      table[bos_id] = BOS
    return cls(table, texts, bos_id)

  def classify(self, token_ids: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Class of each token (ids and first-position flags of the same shape)."""
    ids = np.asarray(token_ids, np.int64)
    cls = np.where((ids >= 0) & (ids < len(self.classes)), self.classes[np.clip(ids, 0, len(self.classes) - 1)],
                   OTHER)
    return np.where(np.asarray(first, bool) & (cls != BOS), FIRST, cls).astype(np.int8)

  def text(self, token_id: int) -> str | None:
    if self.texts is None or not 0 <= token_id < len(self.texts):
      return None
    return self.texts[token_id]


# ---------------------------------------------------------------------------
# Token attribution: host-side counts of the per-token flags.


# The rules of which tokens carry a massive activation: name -> (the flag in a residual-stream
# partial, the field of the activation statistics that counts it, what it means).
TOKEN_RULES = {
    'layer_median': ('layer_median_tok', 'layer_median_n_pass',
                     f'a token is flagged at a layer when its max |x| over the channels of the residual stream '
                     f'is > {stats.SUN_T_VAL:g} and > {stats.SUN_T_RATIO:g}x the median |x| of that layer\'s '
                     f'output over the token\'s whole sequence (all its tokens and channels), as Sun et al.\'s '
                     f'code computes it (torch.median of one sequence\'s layer output)'),
    'token_median': ('sun_tok', 'sun_n_pass',
                     f'a token is flagged at a layer when its max |x| over the channels of the residual stream '
                     f'is > {stats.SUN_T_VAL:g} and > {stats.SUN_T_RATIO:g}x the token\'s OWN median |x| over '
                     f'the channels: the reference pipeline\'s per-token rule (its sun_* fields); it misses '
                     f'tokens whose whole hidden state is large'),
}
ATTRIBUTION_RULE = 'layer_median'  # the rule of `token_attribution`; the other is recorded beside it
# The anatomy document's key of each rule's attribution.
ATTRIBUTION_KEYS = {'layer_median': 'token_attribution', 'token_median': 'token_attribution_token_median'}


class TokenAttribution:
  """Which tokens carry massive activations (under one of `TOKEN_RULES`), counted over the corpus.

  A token occurrence is keyed by (token id, whether it is the sample's first
  token) as `2 * id + first`; per layer and over all layers ("flagged in at
  least one layer") the flagged occurrences are counted per key, plus the
  positions and the number of layers of each occurrence flagged anywhere.
  Counts add, so batches, resumed runs and hosts merge in any order.
  """

  def __init__(self):
    self.per_layer: dict[int, collections.Counter] = {}
    self.any = collections.Counter()
    self.positions = collections.Counter()
    self.n_layers = collections.Counter()

  def add(self, flags: Mapping[int, np.ndarray], input_ids: np.ndarray, valid: np.ndarray) -> None:
    """Fold one batch: flags {layer: [B, T] bool}, input_ids and valid [B, T]."""
    if not flags:
      return
    first = np.zeros(valid.shape, bool)
    first[:, 0] = True
    key = input_ids.astype(np.int64) * 2 + first
    anywhere = np.zeros(valid.shape, bool)
    n_layers = np.zeros(valid.shape, np.int32)
    for layer, f in flags.items():
      f = np.asarray(f, bool) & valid
      if f.any():
        keys, counts = np.unique(key[f], return_counts=True)
        self.per_layer.setdefault(int(layer), collections.Counter()).update(dict(zip(keys.tolist(),
                                                                                     counts.tolist())))
      anywhere |= f
      n_layers += f
    if anywhere.any():
      keys, counts = np.unique(key[anywhere], return_counts=True)
      self.any.update(dict(zip(keys.tolist(), counts.tolist())))
      self.positions.update(collections.Counter(np.nonzero(anywhere)[1].tolist()))
      self.n_layers.update(collections.Counter(n_layers[anywhere].tolist()))

  def merge(self, other: 'TokenAttribution') -> 'TokenAttribution':
    for layer, c in other.per_layer.items():
      self.per_layer.setdefault(layer, collections.Counter()).update(c)
    self.any.update(other.any)
    self.positions.update(other.positions)
    self.n_layers.update(other.n_layers)
    return self

  # JSON-able state (resumable runs keep it beside the tap states).
  def state(self) -> dict[str, Any]:
    pairs = lambda c: sorted([int(k), int(v)] for k, v in c.items())
    return {'per_layer': {str(l): pairs(c) for l, c in sorted(self.per_layer.items())}, 'any': pairs(self.any),
            'positions': pairs(self.positions), 'n_layers': pairs(self.n_layers)}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> 'TokenAttribution':
    obj = cls()
    counter = lambda pairs: collections.Counter({int(k): int(v) for k, v in pairs})
    obj.per_layer = {int(l): counter(p) for l, p in state.get('per_layer', {}).items()}
    obj.any = counter(state.get('any', []))
    obj.positions = counter(state.get('positions', []))
    obj.n_layers = counter(state.get('n_layers', []))
    return obj

  def summary(self, corpus: data.Corpus, table: TokenTable, num_layers: int,
              rule: str = ATTRIBUTION_RULE) -> dict[str, Any]:
    """Counts by class (with the corpus totals), per layer, by token id and by position."""
    ids = np.concatenate(corpus.samples).astype(np.int64)
    first = np.concatenate([np.arange(len(s)) == 0 for s in corpus.samples])
    totals = np.bincount(table.classify(ids, first), minlength=len(CLASSES))

    def by_class(counter: Mapping[int, int]) -> np.ndarray:
      out = np.zeros(len(CLASSES), np.int64)
      if counter:
        keys = np.fromiter(counter.keys(), np.int64)
        cls = table.classify(keys // 2, keys % 2 == 1)
        np.add.at(out, cls, np.fromiter(counter.values(), np.int64))
      return out

    flagged = by_class(self.any)
    per_layer = np.stack([by_class(self.per_layer.get(i, {})) for i in range(num_layers)]) if num_layers else \
        np.zeros((0, len(CLASSES)), np.int64)
    by_id = collections.Counter()
    for key, n in self.any.items():
      by_id[key // 2] += n
    occurrences = np.bincount(ids, minlength=max(by_id, default=0) + 1)
    top = []
    for token, n in sorted(by_id.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TOKENS]:
      cls = int(table.classify(np.array([token]), np.array([False]))[0])
      first_n = self.any.get(2 * token + 1, 0)
      top.append({'token_id': int(token), 'token': table.text(token), 'class': CLASSES[cls], 'flagged': int(n),
                  'flagged_as_first_token': int(first_n), 'occurrences': int(occurrences[token]),
                  'share_flagged': float(n / occurrences[token]) if occurrences[token] else None})
    n_flagged = int(sum(self.any.values()))
    return {
        'criterion': {'name': rule, 'sun_t_val': stats.SUN_T_VAL, 'sun_t_ratio': stats.SUN_T_RATIO,
                      'rule': TOKEN_RULES[rule][2], 'counted_by': TOKEN_RULES[rule][1]},
        'tokens': int(len(ids)),
        'flagged_tokens': n_flagged,
        'classes': {c: {'flagged': int(flagged[k]), 'total': int(totals[k]),
                        'share_flagged': float(flagged[k] / totals[k]) if totals[k] else None,
                        'share_of_flagged': float(flagged[k] / n_flagged) if n_flagged else None,
                        'meaning': CLASS_HELP[c]}
                    for k, c in enumerate(CLASSES)},
        'per_layer': {'layer': list(range(num_layers)), 'flagged': per_layer.sum(axis=1).tolist(),
                      **{c: per_layer[:, k].tolist() for k, c in enumerate(CLASSES)}},
        'top_token_ids': top,
        'top_positions': [{'position': int(p), 'flagged': int(n)}
                          for p, n in sorted(self.positions.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_POSITIONS]],
        'layers_flagged': {str(k): int(v) for k, v in sorted(self.n_layers.items())},
        'bos_token_id': table.bos_id,
    }


def hidden_layer(name: str) -> int | None:
  """i of `layer_{i}_hidden`, else None."""
  if name.startswith('layer_') and name.endswith('_hidden'):
    middle = name[len('layer_'):-len('_hidden')]
    if middle.isdigit():
      return int(middle)
  return None


def take_flags(partials: dict[str, dict[str, Any]]) -> dict[str, dict[int, np.ndarray]]:
  """Remove the per-token flags from the residual-stream partials: {rule: {layer: [B, T] bool}}."""
  flags: dict[str, dict[int, np.ndarray]] = {rule: {} for rule in TOKEN_RULES}
  for name, p in partials.items():
    layer = hidden_layer(name)
    if layer is None:
      continue
    for rule, (key, _, _) in TOKEN_RULES.items():
      if key in p:
        flags[rule][layer] = np.asarray(p.pop(key))
  return flags


def new_attributions() -> dict[str, TokenAttribution]:
  """One empty attribution per rule."""
  return {rule: TokenAttribution() for rule in TOKEN_RULES}


# ---------------------------------------------------------------------------
# Persistent outlier channels.


RULES = ('sun', 'mad')
MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation
MEAN_AD_SCALE = 1.2533  # mean absolute deviation of a normal -> its standard deviation


@dataclasses.dataclass(frozen=True)
class ChannelRule:
  """When a channel counts as an outlier at a layer, and in how many layers it must be."""

  kind: str = 'sun'
  t_val: float = stats.SUN_T_VAL
  t_ratio: float = stats.SUN_T_RATIO
  mad_k: float = 10.0
  min_layer_share: float = 0.25

  def check(self) -> 'ChannelRule':
    if self.kind not in RULES:
      raise UserError(f'--rule={self.kind} is not a channel rule (choose from {", ".join(RULES)})')
    if not 0 < self.min_layer_share <= 1:
      raise UserError(f'--min_layer_share must be in (0, 1], got {self.min_layer_share}')
    if self.mad_k <= 0 or self.t_val < 0 or self.t_ratio < 0:
      raise UserError('--mad_k must be positive, --t_val and --t_ratio not negative')
    return self

  def describe(self) -> dict[str, Any]:
    if self.kind == 'sun':
      text = (f'max |x| of the channel over the corpus > {self.t_val:g} and > {self.t_ratio:g} x the '
              'layer\'s median |x|')
      params = {'t_val': self.t_val, 't_ratio': self.t_ratio}
    else:
      text = (f'robust z-score of the channel\'s max |x| among the layer\'s channels, (a - median) / '
              f'({MAD_SCALE} MAD), > {self.mad_k:g}')
      params = {'mad_k': self.mad_k}
    return {'kind': self.kind, **params, 'min_layer_share': self.min_layer_share, 'rule': text}


def channel_mask(absmax: np.ndarray, medians: np.ndarray, rule: ChannelRule) -> np.ndarray:
  """[L, D] bool: channel c is over the rule's threshold at layer l.

  absmax: [L, D] max |x| per layer and channel; medians: [L] median |x| of
  each layer (all elements), used by the `sun` rule.
  """
  a = np.asarray(absmax, np.float64)
  if rule.kind == 'sun':
    return (a > rule.t_val) & (a > rule.t_ratio * np.asarray(medians, np.float64)[:, None])
  med = np.median(a, axis=1, keepdims=True)
  dev = np.abs(a - med)
  # Half the channels or more at the median (MAD = 0): the mean absolute
  # deviation stands in, scaled to a normal's standard deviation (Iglewicz and
  # Hoaglin's fallback); a layer of identical channels flags none.
  scale = np.median(dev, axis=1, keepdims=True) * MAD_SCALE
  scale = np.where(scale > 0, scale, dev.mean(axis=1, keepdims=True) * MEAN_AD_SCALE)
  with np.errstate(divide='ignore', invalid='ignore'):
    z = np.where(scale > 0, (a - med) / scale, 0.0)
  return z > rule.mad_k


def outlier_channels(layers: Sequence[int], absmax: np.ndarray, medians: np.ndarray,
                     rule: ChannelRule) -> dict[str, Any]:
  """The channels over the threshold in at least `min_layer_share` of the layers.

  Each with the layers where it is over it: the first (where it appears), the
  last, the layer after the last (where it disappears; None when it lasts to
  the final layer), whether those layers are contiguous, and its peak.
  """
  layers = [int(l) for l in layers]
  mask = channel_mask(absmax, medians, rule)
  need = max(1, math.ceil(rule.min_layer_share * len(layers) - 1e-9))
  counts = mask.sum(axis=0)
  found = []
  for c in np.nonzero(counts >= need)[0]:
    rows = np.nonzero(mask[:, c])[0]
    peak_row = int(np.argmax(absmax[:, c]))
    last = layers[rows[-1]]
    found.append({
        'channel': int(c),
        'layers_over': int(len(rows)),
        'share_of_layers': float(len(rows) / len(layers)),
        'first_layer': layers[rows[0]],
        'last_layer': last,
        'disappears_at': (layers[rows[-1] + 1] if rows[-1] + 1 < len(layers) else None),
        'contiguous': bool(rows[-1] - rows[0] + 1 == len(rows)),
        'peak_abs': float(absmax[peak_row, c]),
        'peak_layer': layers[peak_row],
    })
  found.sort(key=lambda e: (-e['peak_abs'], e['channel']))
  return {'rule': rule.describe(), 'min_layers': need, 'num_layers': len(layers),
          'channels_over_per_layer': mask.sum(axis=1).astype(int).tolist(), 'channels': found}


# ---------------------------------------------------------------------------
# The files beside the results.


def channel_matrix(taps: Mapping[str, stats.TapStats]) -> tuple[list[int], np.ndarray]:
  """(layers, [L, D] float32 max |x|) of the residual-stream taps that carry per-channel maxima."""
  rows = sorted((layer, t.chan_absmax) for name, t in taps.items()
                if (layer := hidden_layer(name)) is not None and t.chan_absmax is not None)
  if not rows:
    return [], np.zeros((0, 0), np.float32)
  return [l for l, _ in rows], np.stack([a for _, a in rows]).astype(np.float32)


def layer_medians(doc: Mapping[str, Any], layers: Sequence[int]) -> np.ndarray:
  """Median |x| of each residual layer, from measure's log-histogram quantile (NaN when absent)."""
  per = doc.get('per_layer_stats', {})
  return np.array([float(per.get(f'layer_{l}_hidden', {}).get('abs_median', math.nan)) for l in layers])


def layerwise_top(layers: Sequence[int], absmax: np.ndarray, medians: np.ndarray) -> dict[str, list]:
  """Per residual layer: the three largest per-channel max |x| (and their channels) and the median |x|.

  Sun et al.'s figure 2 compares the top-1/2/3 |x| of a sequence with the
  median; over a corpus the top elements repeat one (token, channel) pair
  (BOS at position 0 has the same state in every sample), so the top three
  *channels* are compared instead: a massive activation is one or a few
  channels far above the rest.
  """
  out: dict[str, list] = {'layer': [int(l) for l in layers], 'median': [float(m) for m in medians]}
  order = np.argsort(-np.asarray(absmax), axis=1, kind='stable')[:, :3]
  for k in range(3):
    has = order.shape[1] > k
    out[f'top{k + 1}'] = [float(absmax[i, order[i, k]]) if has else None for i in range(len(layers))]
    out[f'top{k + 1}_channel'] = [int(order[i, k]) if has else None for i in range(len(layers))]
  return out


def residual_peaks(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Per residual layer, its largest |x| and where it sits (from `extremes`)."""
  per, ext = doc.get('per_layer_stats', {}), doc.get('extremes', {})
  out = []
  for name, s in per.items():
    layer = hidden_layer(name)
    if layer is None or name not in ext:
      continue
    side = 'max' if abs(s['max']) >= abs(s['min']) else 'min'
    out.append({'layer': layer, 'value': s[side], **ext[name][side]})
  return sorted(out, key=lambda e: e['layer'])


def paths(output_dir: str, model_name: str) -> dict[str, str]:
  json_dir = os.path.join(output_dir, 'json')
  return {k: os.path.join(json_dir, model_name + suffix) for k, suffix in (
      ('activation', '_activation_stats.json'), ('anatomy', ANATOMY_SUFFIX),
      ('channels', CHANNELS_SUFFIX), ('surface', SURFACE_SUFFIX))}


def write_npz(path: str, **arrays: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic.write_bytes(path, buf.getvalue())


def read_channels(path: str) -> tuple[list[int], np.ndarray, np.ndarray]:
  """(layers, [L, D] max |x|, [L] median |x|) of a `<model>_channel_absmax.npz`."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return [int(l) for l in z['layers']], z['channel_absmax'], z['abs_median']
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f'cannot read per-channel maxima from {path}: {e}') from None


def build_doc(doc: Mapping[str, Any], layers: Sequence[int],
              absmax: np.ndarray, medians: np.ndarray, rule: ChannelRule,
              tokens: Mapping[str, Any] | None) -> dict[str, Any]:
  """The anatomy document of one model (see the module docstring); `tokens`: each rule's
  attribution summary, {rule: summary}."""
  name = doc.get('model_name')
  out = {k: doc.get(k) for k in ('model_name', 'model_type', 'num_hidden_layers', 'hidden_size', 'data_path',
                                  'num_samples')}
  detail = doc.get('global_max_detail')
  if detail:
    out['global_max'] = {'value': doc.get('global_max_activation'), **detail}
  out['residual_peaks'] = residual_peaks(doc)
  out['outlier_channels'] = outlier_channels(layers, absmax, medians, rule) if len(layers) else None
  for token_rule, key in ATTRIBUTION_KEYS.items():
    out[key] = (tokens or {}).get(token_rule)
  out['layerwise'] = layerwise_top(layers, absmax, medians)
  out['files'] = {'channel_absmax': f'{name}{CHANNELS_SUFFIX}'}
  return out


def write_measure_outputs(output_dir: str, doc: Mapping[str, Any], taps: Mapping[str, stats.TapStats],
                          attributions: Mapping[str, TokenAttribution] | None, corpus: data.Corpus,
                          table: TokenTable, rule: ChannelRule = ChannelRule()) -> tuple[str, str] | None:
  """After `measure`: `<model>_channel_absmax.npz` and `<model>_anatomy.json` beside the results."""
  layers, absmax = channel_matrix(taps)
  if not layers:
    return None
  name = doc['model_name']
  p = paths(output_dir, name)
  medians = layer_medians(doc, layers)
  write_npz(p['channels'], channel_absmax=absmax, layers=np.asarray(layers, np.int32),
            abs_median=medians.astype(np.float64))
  tokens = {r: a.summary(corpus, table, int(doc['num_hidden_layers']), r) for r, a in (attributions or {}).items()}
  results.atomic_write_json(p['anatomy'], build_doc(doc, layers, absmax, medians, rule, tokens))
  return p['channels'], p['anatomy']


# ---------------------------------------------------------------------------
# What the `anatomy` job looks at, and what it prints.


def default_focus(doc: Mapping[str, Any], anat: Mapping[str, Any]) -> tuple[int | None, int | None]:
  """(sample, layer) of the global maximum when it sits in the residual stream, else of the
  largest residual peak."""
  peaks = anat.get('residual_peaks') or []
  detail = doc.get('global_max_detail') or {}
  layer = hidden_layer(detail.get('tap', ''))
  if layer is not None:
    return detail.get('sample'), layer
  if peaks:
    best = max(peaks, key=lambda e: abs(e['value']))
    return best.get('sample'), best['layer']
  return None, None


def token_label(text: str | None, token_id: int) -> str:
  """A token for people: its text quoted, else its id."""
  return repr(text) if text is not None else f'id {token_id}'


RULE_LABELS = {
    'layer_median': 'layer-median rule (Sun et al.\'s code: max |x| > 100 and > 1000x the median |x| of the '
                    'layer output of the token\'s sequence)',
    'token_median': 'per-token rule (the reference pipeline\'s sun_* fields: max |x| > 100 and > 1000x the '
                    'token\'s own median |x|)',
}


def attribution_rule(ta: Mapping[str, Any]) -> str:
  """The rule of an attribution summary; files written before the layer-median rule carried the
  per-token rule without naming it."""
  return (ta.get('criterion') or {}).get('name', 'token_median')


def attribution_lines(anat: Mapping[str, Any]) -> list[str]:
  """The tokens that carry massive activations, under each rule the document holds."""
  lines = []
  for key in ATTRIBUTION_KEYS.values():
    ta = anat.get(key)
    if not ta:
      continue
    parts = [f'{c} {v["flagged"]}/{v["total"]}' for c, v in ta['classes'].items() if v['total']]
    lines.append(f'tokens with a massive activation in any layer, {RULE_LABELS[attribution_rule(ta)]}: '
                 f'{ta["flagged_tokens"]:,} of {ta["tokens"]:,}; by class (flagged/total): {", ".join(parts)}')
    if ta['top_token_ids']:
      lines.append('  most often: ' + ', '.join(f'{token_label(t["token"], t["token_id"])} {t["flagged"]}'
                                                for t in ta['top_token_ids'][:8]))
  return lines


def summary_lines(anat: Mapping[str, Any]) -> list[str]:
  """What the anatomy found, for the terminal."""
  lines = [f'{anat.get("model_name")}: {anat.get("num_hidden_layers")} layers, hidden {anat.get("hidden_size")}']
  g = anat.get('global_max')
  if g:
    lines.append(f'global max {g["value"]:.6g} in {g["tap"]} ({g["which"]}): sample {g.get("sample")}, position '
                 f'{g.get("position")}, channel {g.get("channel")}, token {g.get("token")!r} (id {g.get("token_id")})')
  oc = anat.get('outlier_channels')
  if oc:
    lines.append(f'outlier channels ({oc["rule"]["rule"]}; in >= {oc["min_layers"]} of {oc["num_layers"]} layers): '
                 + (', '.join(f'{c["channel"]} (layers {c["first_layer"]}-{c["last_layer"]}, peak '
                              f'{c["peak_abs"]:.4g} at layer {c["peak_layer"]})' for c in oc['channels'][:10])
                    or 'none'))
  lines += attribution_lines(anat)
  s = anat.get('surface')
  if s:
    pk = s['peak']
    lines.append(f'surface: sample {s["sample"]}, layer {s["layer"]}, positions {s["positions"][0]}-'
                 f'{s["positions"][1]}; peak |x| {pk["abs"]:.4g} at position {pk["position"]}, channel '
                 f'{pk["channel"]}, token {token_label(pk["token"], pk["token_id"])}')
  return lines
