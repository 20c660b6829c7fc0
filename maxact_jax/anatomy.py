"""Outlier anatomy: which channels carry the massive activations, on which tokens, from which layer.

`measure` already reduces, on device, where each tap's extremes and top-K
entries sit. For the residual stream (`layer_{i}_hidden`) it also keeps

- the max |x| of every channel over the corpus (`stats.tap_partial(...,
  anatomy=True)`: one max over B * T per channel, max-merged on the host),
  saved as a [layers, hidden] float32 array in `<model>_channel_absmax.npz`;
- Sun et al.'s per-token flag (max |x| over the channels > 100 and > 1000x the
  token's median |x|), returned as a [B, T] bool per layer and counted here
  with the batch's token ids: by token id, by position and by *class* (BOS,
  first token, other special tokens, newline, delimiter/punctuation, other).

From these, `<model>_anatomy.json` lists the persistent outlier channels
(over a threshold in at least a share of the layers, with the layer where each
appears and the last where it is over it), the token attribution, the
layerwise top-1/2/3 |x| against the median, and the residual stream's peak
location per layer. The threshold rule is selectable (`ChannelRule`):

- `sun`: a channel's max |x| over `t_val` (100) and over `t_ratio` (1000)
  times the layer's median |x| (the median from measure's log histogram);
- `mad`: a robust z-score over the layer's channels, (a - median) /
  (1.4826 * MAD) over `mad_k`, for models whose outliers stay under 100.

The token x channel surface of one layer for one sample is not part of
`measure` (it needs the raw activations): `surface` runs that one sample
again, on request (`maxact-jax anatomy`). The views (PNG, matplotlib Agg)
are rendered by `plot_surface`, `plot_layerwise` and `plot_channels`, for the
`anatomy` command and for the cross-model report.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np

from maxact_jax import data, gguf_file, results, stats
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


def _text_class(text: str) -> int:
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
      table[:n] = [_text_class(t) for t in texts]
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


class TokenAttribution:
  """Which tokens carry massive activations (Sun's criterion), counted over the corpus.

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

  def summary(self, corpus: data.Corpus, table: TokenTable, num_layers: int) -> dict[str, Any]:
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
        'criterion': {'sun_t_val': stats.SUN_T_VAL, 'sun_t_ratio': stats.SUN_T_RATIO,
                      'rule': 'a token is flagged at a layer when its max |x| over the channels of the '
                              'residual stream is > t_val and > t_ratio x its median |x| (Sun et al.)'},
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


def take_flags(partials: dict[str, dict[str, Any]]) -> dict[int, np.ndarray]:
  """Remove the per-token flags from the residual-stream partials: {layer: [B, T] bool}."""
  flags = {}
  for name, p in partials.items():
    layer = hidden_layer(name)
    if layer is not None and 'sun_tok' in p:
      flags[layer] = np.asarray(p.pop('sun_tok'))
  return flags


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
  import io  # pylint: disable=import-outside-toplevel
  from maxact_jax import atomic  # pylint: disable=import-outside-toplevel

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
  """The anatomy document of one model (see the module docstring)."""
  name = doc.get('model_name')
  out = {k: doc.get(k) for k in ('model_name', 'model_type', 'num_hidden_layers', 'hidden_size', 'data_path',
                                  'num_samples')}
  detail = doc.get('global_max_detail')
  if detail:
    out['global_max'] = {'value': doc.get('global_max_activation'), **detail}
  out['residual_peaks'] = residual_peaks(doc)
  out['outlier_channels'] = outlier_channels(layers, absmax, medians, rule) if len(layers) else None
  out['token_attribution'] = tokens
  out['layerwise'] = layerwise_top(layers, absmax, medians)
  out['files'] = {'channel_absmax': f'{name}{CHANNELS_SUFFIX}'}
  return out


def write_measure_outputs(output_dir: str, doc: Mapping[str, Any], taps: Mapping[str, stats.TapStats],
                          attribution: TokenAttribution | None, corpus: data.Corpus, table: TokenTable, rule: ChannelRule = ChannelRule()
                          ) -> tuple[str, str] | None:
  """After `measure`: `<model>_channel_absmax.npz` and `<model>_anatomy.json` beside the results."""
  layers, absmax = channel_matrix(taps)
  if not layers:
    return None
  name = doc['model_name']
  p = paths(output_dir, name)
  medians = layer_medians(doc, layers)
  write_npz(p['channels'], channel_absmax=absmax, layers=np.asarray(layers, np.int32),
            abs_median=medians.astype(np.float64))
  tokens = attribution.summary(corpus, table, int(doc['num_hidden_layers'])) if attribution else None
  results.atomic_write_json(p['anatomy'], build_doc(doc, layers, absmax, medians, rule, tokens))
  return p['channels'], p['anatomy']


# ---------------------------------------------------------------------------
# The token x channel surface of one layer for one sample (a separate pass).


def raw_hidden_handler(call, x):
  """Sow the residual stream (`hidden` taps) as float32; every other tap untouched."""
  if call.in_layer and call.suffix == 'hidden':
    return x, x.astype('float32')
  return x, None


def surface(config, params, dtype, token_ids: np.ndarray, layer: int, tokens: int,
            around: int | None = None) -> dict[str, np.ndarray]:
  """|x| of layer `layer`'s output for one sample: [window, D] float32 and its positions.

  The sample's prefix up to the window's end runs once (causal attention: the
  prefix gives the same activations as the whole sample). The window holds
  `tokens` positions: from 0 when the peak (or `around`) falls among the first
  `tokens`, else centred on it. Every residual layer is sown ([L, T, D]) and
  one is kept; the prefix is at most max(tokens, around + 1) long.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from maxact_jax import capture  # pylint: disable=import-outside-toplevel
  from maxact_jax.models import transformer  # pylint: disable=import-outside-toplevel

  ids = np.asarray(token_ids, np.int32)
  n = min(len(ids), max(tokens, (around or 0) + 1))
  model = transformer.build(config, dtype)

  @jax.jit
  def run(p, i, v):
    with nn.intercept_methods(capture.interceptor(raw_hidden_handler)):
      _, sown = model.apply({'params': p}, i, v, mutable=[capture.COLLECTION])
    return sown[capture.COLLECTION]

  sown = run(params, jnp.asarray(ids[None, :n]), jnp.ones((1, n), bool))
  absx = np.abs(np.asarray(capture.collect(config, jax.device_get(sown))[f'layer_{layer}_hidden'][0]))
  focus = around if around is not None else int(np.unravel_index(np.argmax(absx), absx.shape)[0])
  start = 0 if focus < tokens else min(focus - tokens // 2, n - tokens)
  window = absx[start:start + tokens]
  return {'abs': window.astype(np.float32), 'positions': np.arange(start, start + len(window)),
          'token_ids': ids[start:start + len(window)]}


# ---------------------------------------------------------------------------
# Views (PNG bytes; matplotlib's object API on an Agg canvas, as the report).


def _pool_columns(a: np.ndarray, max_cols: int) -> tuple[np.ndarray, int]:
  """Max-pool the last axis into at most `max_cols` blocks (a peak never vanishes); (pooled, block)."""
  block = max(1, math.ceil(a.shape[-1] / max_cols))
  pad = -a.shape[-1] % block
  if pad:
    a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1)
  return a.reshape(a.shape[:-1] + (-1, block)).max(axis=-1), block


def _label(text: str | None, token_id: int) -> str:
  return repr(text) if text is not None else f'id {token_id}'


def plot_surface(surf: Mapping[str, Any], model_name: str) -> bytes:
  """Sun et al.'s figure 1: |x| over token position x channel of one layer, as a 3-D surface and a heat map."""
  from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from maxact_jax import report  # pylint: disable=import-outside-toplevel

  absx = np.asarray(surf['abs'], np.float64)
  positions = np.asarray(surf['positions'])
  t, d = absx.shape
  pt, pc = np.unravel_index(int(np.argmax(absx)), absx.shape)
  texts = list(surf.get('tokens') or [None] * t)
  peak_label = (f'channel {pc}, token {_label(texts[pt], int(surf["token_ids"][pt]))} at position '
                f'{positions[pt]}: |x| = {absx[pt, pc]:.4g}')
  pooled, block = _pool_columns(absx, 256)
  fig = report._figure(15, 6.2)  # pylint: disable=protected-access
  ax = fig.add_subplot(1, 2, 1, projection='3d')
  cx = (np.arange(pooled.shape[1]) * block + (block - 1) / 2) if block > 1 else np.arange(d)
  xx, yy = np.meshgrid(cx, positions)
  ax.plot_surface(xx, yy, pooled, cmap='viridis', linewidth=0, antialiased=False, rcount=min(t, 128),
                  ccount=min(pooled.shape[1], 256))
  ax.set_xlabel('channel')
  ax.set_ylabel('token position')
  ax.set_zlabel('|x|')
  ax.view_init(elev=28, azim=-60)
  ax.text(pc, positions[pt], absx[pt, pc] * 1.04, f'channel {pc}', color='#b2182b', fontsize=10)
  ax.set_title(f'|x| of the layer {surf["layer"]} output (residual stream)', fontsize=10)

  bx = fig.add_subplot(1, 2, 2)
  img = bx.imshow(np.log10(np.maximum(pooled, 1e-3)), aspect='auto', origin='upper', cmap='magma',
                  interpolation='nearest', extent=(-0.5, pooled.shape[1] * block - 0.5, positions[-1] + 0.5,
                                                   positions[0] - 0.5))
  bx.set_xlabel('channel' + (f' (max over blocks of {block})' if block > 1 else ''))
  bx.set_ylabel('token position')
  if t <= 40:
    bx.set_yticks(positions)
    bx.set_yticklabels([f'{p} {(_label(x, int(i)))[:14]}' for p, x, i in zip(positions, texts, surf['token_ids'])],
                       fontsize=7)
  bx.annotate(f'channel {pc}', xy=(pc, positions[pt]), textcoords='offset points', color='white', fontsize=10,
              xytext=(25 if pc < d / 2 else -95, -30 if pt < t / 2 else 30),
              arrowprops={'arrowstyle': '->', 'color': 'white'})
  fig.colorbar(img, ax=bx, label='log10 |x|')
  bx.set_title('the same as a heat map (log colour scale)', fontsize=10)
  fig.suptitle(f'{model_name}: sample {surf["sample"]}, layer {surf["layer"]}. Peak: {peak_label}', fontsize=11)
  return report._png(fig)  # pylint: disable=protected-access


def plot_layerwise(layerwise: Mapping[str, Sequence[float]], model_name: str) -> bytes | None:
  """Sun et al.'s figure 2 over a corpus: the three largest per-channel max |x| of each layer's
  output against its median |x|, log scale."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  from maxact_jax import report  # pylint: disable=import-outside-toplevel

  if not layerwise.get('layer'):
    return None
  fig = report._figure(9, 5)  # pylint: disable=protected-access
  ax = fig.add_subplot()
  layers = layerwise['layer']
  for key, style in (('top1', dict(color='#b2182b', marker='o')), ('top2', dict(color='#ef8a62', marker='s')),
                     ('top3', dict(color='#fddbc7', marker='^', markeredgecolor='#999')),
                     ('median', dict(color='#2166ac', marker='.', linestyle='--'))):
    ys = [v if v and v > 0 else math.nan for v in layerwise[key]]
    ax.plot(layers, ys, linewidth=1.6, label={'median': 'median |x| (all elements)'}.get(
        key, f'top-{key[-1]} channel: its max |x|'), **style)
  # Name the top channel where it changes (and at the peak layer).
  tops, chans = layerwise['top1'], layerwise['top1_channel']
  for i, (layer, v, c) in enumerate(zip(layers, tops, chans)):
    if v and (i == 0 or chans[i - 1] != c):
      ax.annotate(f'ch {c}', (layer, v), textcoords='offset points', xytext=(4, 6), fontsize=8, color='#b2182b')
  report._log_axis(ax, '|x| in the residual stream (layer output)')  # pylint: disable=protected-access
  peak = max((v for v in tops if v), default=None)
  if peak:
    ax.set_ylim(top=peak * 4)  # room for the channel labels
  ax.set_xlabel('layer')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title(f'{model_name}: the three largest channels per layer against the median')
  ax.legend(loc='best', fontsize=9)
  return report._png(fig)  # pylint: disable=protected-access


def plot_channels(layers: Sequence[int], absmax: np.ndarray, channels: Sequence[Mapping[str, Any]],
                  model_name: str, label_top: int = 8) -> bytes | None:
  """The per-channel max |x| of every layer's output as a heat map (layers x channels, log colour)."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  from maxact_jax import report  # pylint: disable=import-outside-toplevel

  if not len(layers):
    return None
  absmax = np.asarray(absmax, np.float64)
  pooled, block = _pool_columns(absmax, 1024)
  d = absmax.shape[1]
  fig = report._figure(12, max(3.5, min(9.0, 0.12 * len(layers) + 2.5)))  # pylint: disable=protected-access
  ax = fig.add_subplot()
  img = ax.imshow(np.log10(np.maximum(pooled, 1e-3)), aspect='auto', origin='lower', cmap='magma',
                  interpolation='nearest', extent=(-0.5, pooled.shape[1] * block - 0.5, layers[0] - 0.5,
                                                   layers[-1] + 0.5))
  ax.set_xlim(-0.5, d - 0.5)
  ax.set_xlabel('residual channel' + (f' (max over blocks of {block})' if block > 1 else ''))
  ax.set_ylabel('layer')
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(img, ax=ax, label='log10 of the max |x| over the corpus')
  top = [c['channel'] for c in channels[:label_top]]
  if top:
    sec = ax.secondary_xaxis('top')
    sec.set_xticks(top)
    sec.set_xticklabels([str(c) for c in top], fontsize=8, rotation=90 if len(top) > 4 else 0)
    sec.set_xlabel('persistent outlier channels', fontsize=9)
  ax.set_title(f'{model_name}: per-channel max |x| of each layer output', pad=28 if top else 6)
  return report._png(fig)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# The `anatomy` job: re-derive the channels with a chosen rule, the surface, the views.


@dataclasses.dataclass
class AnatomyOptions:
  model_path: str
  output_dir: str
  rule: ChannelRule = ChannelRule()
  surface: bool = True
  sample: int | None = None  # default: the sample of the global maximum
  layer: int | None = None  # default: the layer of the global maximum (or of the first outlier channel)
  surface_tokens: int = 64
  data_path: str | None = None  # default, with max_samples / max_seq_len: what measure used
  max_samples: int | None = None
  max_seq_len: int | None = None
  dtype: str | None = None  # default: measure's dtype


@dataclasses.dataclass
class AnatomyResult:
  doc: dict
  path: str
  views: dict[str, str]  # view name -> PNG path


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise UserError(f'no {what} at {path}: run `maxact-jax measure` with the same --model_path and --output_dir '
                    'first')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


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


def run_anatomy(opts: AnatomyOptions) -> AnatomyResult:
  """Read measure's outputs, apply the channel rule, compute the surface, render the views."""
  from maxact_jax import measure  # pylint: disable=import-outside-toplevel
  from maxact_jax.config import load_config  # pylint: disable=import-outside-toplevel

  opts.rule.check()
  name = results.model_name_of(opts.model_path)
  p = paths(opts.output_dir, name)
  doc = _read_json(p['activation'], 'measure result')
  anat = _read_json(p['anatomy'], 'anatomy file (written by measure)')
  if not os.path.isfile(p['channels']):
    raise UserError(f'no per-channel maxima at {p["channels"]}: run `maxact-jax measure` first')
  layers, absmax, medians = read_channels(p['channels'])
  anat['outlier_channels'] = outlier_channels(layers, absmax, medians, opts.rule)
  anat['layerwise'] = layerwise_top(layers, absmax, medians)
  views_dir = os.path.join(opts.output_dir, 'anatomy')
  os.makedirs(views_dir, exist_ok=True)
  views: dict[str, str] = {}

  if opts.surface:
    sample, layer = default_focus(doc, anat)
    sample = opts.sample if opts.sample is not None else sample
    layer = opts.layer if opts.layer is not None else layer
    if sample is None or layer is None:
      raise UserError('no residual-stream peak to show: give --sample and --layer')
    config = load_config(opts.model_path)
    if not 0 <= layer < config.num_hidden_layers:
      raise UserError(f'--layer={layer} does not exist (the model has {config.num_hidden_layers} layers)')
    run_info = doc.get('run', {})
    data_path = opts.data_path or (None if doc.get('data_path') in (None, 'builtin') else doc['data_path'])
    mopts = measure.MeasureOptions(
        model_path=opts.model_path, output_dir=opts.output_dir, data_path=data_path,
        max_samples=opts.max_samples or run_info.get('max_samples') or doc.get('num_samples'),
        max_seq_len=opts.max_seq_len or doc.get('max_seq_len'), source_tokenizer=run_info.get('source_tokenizer'),
        tokenizer=run_info.get('tokenizer'))
    corpus = measure.load_measure_corpus(mopts, config)
    if not 0 <= sample < len(corpus.samples):
      raise UserError(f'--sample={sample} is not in the corpus ({len(corpus.samples)} samples)')
    dtype_name = opts.dtype or run_info.get('dtype') or 'float32'
    params = measure.load_params(opts.model_path, config, dtype_name)
    around = None
    peak = next((e for e in anat.get('residual_peaks', []) if e['layer'] == layer and e.get('sample') == sample),
                None)
    if peak is not None:
      around = peak['position']
    surf = surface(config, params, measure.DTYPES[dtype_name], corpus.samples[sample], layer,
                   opts.surface_tokens, around)
    tokenizer = data.Tokenizer.maybe(mopts.tokenizer_source)
    texts = tokenizer.decode_each(surf['token_ids']) if tokenizer else None
    surf.update(sample=sample, layer=layer)
    write_npz(p['surface'], abs=surf['abs'], positions=surf['positions'], token_ids=surf['token_ids'],
              sample=np.int64(sample), layer=np.int64(layer),
              **({'tokens': np.array(texts, dtype=str)} if texts else {}))
    pt, pc = np.unravel_index(int(np.argmax(surf['abs'])), surf['abs'].shape)
    anat['surface'] = {'sample': sample, 'layer': layer, 'positions': [int(surf['positions'][0]),
                                                                        int(surf['positions'][-1])],
                       'dtype': dtype_name, 'peak': {'position': int(surf['positions'][pt]), 'channel': int(pc),
                                                     'token_id': int(surf['token_ids'][pt]),
                                                     'token': texts[pt] if texts else None,
                                                     'abs': float(surf['abs'][pt, pc])},
                       'file': os.path.basename(p['surface'])}
    views['surface'] = os.path.join(views_dir, f'{name}_surface.png')
    _write_png(views['surface'], plot_surface({**surf, 'tokens': texts}, name))
  for key, png in (('layerwise', plot_layerwise(anat['layerwise'], name)),
                   ('channels', plot_channels(layers, absmax, anat['outlier_channels']['channels'], name))):
    if png is not None:
      views[key] = os.path.join(views_dir, f'{name}_{key}.png')
      _write_png(views[key], png)
  anat['views'] = {k: os.path.relpath(v, os.path.dirname(p['anatomy'])) for k, v in views.items()}
  results.atomic_write_json(p['anatomy'], anat)
  return AnatomyResult(anat, p['anatomy'], views)


def _write_png(path: str, png: bytes) -> None:
  from maxact_jax import atomic  # pylint: disable=import-outside-toplevel

  atomic.write_bytes(path, png)


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
  ta = anat.get('token_attribution')
  if ta:
    parts = [f'{c} {v["flagged"]}/{v["total"]}' for c, v in ta['classes'].items() if v['total']]
    lines.append(f'tokens with a massive activation (Sun et al.) in any layer: {ta["flagged_tokens"]:,} of '
                 f'{ta["tokens"]:,}; by class (flagged/total): {", ".join(parts)}')
    if ta['top_token_ids']:
      lines.append('  most often: ' + ', '.join(f'{_label(t["token"], t["token_id"])} {t["flagged"]}'
                                                for t in ta['top_token_ids'][:8]))
  s = anat.get('surface')
  if s:
    pk = s['peak']
    lines.append(f'surface: sample {s["sample"]}, layer {s["layer"]}, positions {s["positions"][0]}-'
                 f'{s["positions"][1]}; peak |x| {pk["abs"]:.4g} at position {pk["position"]}, channel '
                 f'{pk["channel"]}, token {_label(pk["token"], pk["token_id"])}')
  return lines
