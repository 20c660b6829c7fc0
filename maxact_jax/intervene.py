"""Interventions: replace chosen residual channels at chosen layers, measure what it costs.

The replacement goes through the same `nn.intercept_methods` mechanism as
every tap (`capture.interceptor` with a handler that returns a new output),
not a copy of the model: inside the scanned layers the handler sees the
traced layer index and selects the layer with `jnp.where` on a [layers,
hidden] mask, so the layer stack stays compiled once per segment.

`intervene` runs, in one jitted step per batch, the unmodified model and every
variant (the requested channels, then `controls` sets of random channels of
the same size at the same layers), and reduces on device, per predicted
position, the next-token loss of each and the KL divergence KL(base || variant)
of the next-token distributions, plus whether the top-1 prediction survives
(`maxact_jax.next_token`). The host merges in float64: loss and perplexity of each, the change in loss,
mean and max KL (with where the max sits), top-1 agreement, and the same by
the class of the predicting token (BOS, first token, ..., see
`maxact_jax.anatomy.CLASSES`).

Modes (`MODES`), two that replace the channel at every position and two
that replace only its massive values, where they occur (Sun et al.'s
experiment):

- `zero`: every position of the channel set to 0;
- `channel_mean`: every position set to the channel's mean over all valid
  tokens of the corpus under the unmodified model (a first pass, reduced on
  device). Where the channel carries a massive activation on a few tokens,
  this mean is small, so those tokens lose it. (This mode was called `mean`;
  that name is refused with a message naming both, see `RENAMED_MODES`.)
- `massive_mean`: Sun et al.'s "set to mean": only the elements where the
  channel is massive by the layer-median rule (|x| > 100 and > 1000x the
  median |x| of that layer's output over the token's own sequence, as
  `maxact_jax.stats.sequence_median` takes it) are set to the mean of the
  channel's massive values over the corpus (a first pass over the
  unmodified model, with the same rule); so they stay massive, at one value,
  and every other position is untouched. Their code does this at the layer
  where the massive activations appear, with means measured beforehand, at
  the positions that carry them (the first token, and the strongest other
  one): the rule finds those positions here;
- `massive_zero`: Sun et al.'s "set to zero": the same elements set to 0,
  every other position untouched.

In the massive modes the rule is applied to the layer output the edited
model produces (an edit at layer 2 feeds layer 3's rule), inside the step;
a layer without a chosen channel skips the median (`lax.cond`). Every
variant reports how many (token, channel) elements it replaced.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import converters
from maxact_jax import anatomy, capture, data, measure, measure_step, next_token, results, stats
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.models import transformer

Array = jax.Array

MODES = ('zero', 'channel_mean', 'massive_mean', 'massive_zero')
MODE_MEANING = {
    'zero': 'every position of the channel set to 0',
    'channel_mean': ('every position of the channel set to the channel\'s mean over all valid tokens of the '
                     'corpus (unmodified model); massive values on a few tokens become that small mean'),
    'massive_mean': ('Sun et al.\'s set-to-mean: only where the channel is massive (|x| > 100 and > 1000x the '
                     'median |x| of the layer output over the token\'s sequence), set to the mean of the '
                     'channel\'s massive values over the corpus (unmodified model); other positions untouched'),
    'massive_zero': ('Sun et al.\'s set-to-zero: only where the channel is massive (the same rule), set to 0; '
                     'other positions untouched'),
}
MASSIVE_MODES = ('massive_mean', 'massive_zero')
# Names no longer accepted, with why: `mean` read as Sun et al.'s experiment, which it is not.
RENAMED_MODES = {
    'mean': ('--mode=mean is ambiguous and no longer accepted: the mode it named is now channel_mean (every '
             'position set to the channel\'s mean over all tokens, so a massive value becomes small); Sun et '
             'al.\'s experiment (the massive values, where they occur, set to their mean) is massive_mean'),
}
INTERVENTION_SUFFIX = '_intervention.json'

_SPEC_RE = re.compile(r'^(\d+)(?:-(\d+))?:(\d+)$')


def parse_channels(specs: Sequence[str], num_layers: int, hidden_size: int) -> list[tuple[int, int]]:
  """'L:C' items (L may be a range 'A-B', inclusive) -> sorted unique (layer, channel) pairs."""
  if not specs:
    raise UserError('--channels is required: layer:channel pairs, e.g. --channels=2:37 or 2-5:37,3:100')
  pairs = set()
  for spec in specs:
    m = _SPEC_RE.match(spec.strip())
    if not m:
      raise UserError(f'--channels: {spec!r} is not layer:channel (e.g. 2:37, or 2-5:37 for layers 2 to 5)')
    first, last, channel = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3))
    if last < first:
      raise UserError(f'--channels: {spec!r}: the layer range runs backwards')
    if last >= num_layers:
      raise UserError(f'--channels: {spec!r}: layer {last} does not exist (the model has {num_layers} layers)')
    if channel >= hidden_size:
      raise UserError(f'--channels: {spec!r}: channel {channel} does not exist (hidden size {hidden_size})')
    pairs.update((layer, channel) for layer in range(first, last + 1))
  return sorted(pairs)


def control_channels(pairs: Sequence[tuple[int, int]], hidden_size: int, seed: int) -> list[tuple[int, int]]:
  """As many random channels as `pairs` holds at each layer, none of the requested ones, for a baseline."""
  rng = np.random.RandomState(seed)
  by_layer: dict[int, list[int]] = {}
  for layer, channel in pairs:
    by_layer.setdefault(layer, []).append(channel)
  out = []
  taken = {c for _, c in pairs}  # a channel requested at any layer is never a control
  for layer, channels in sorted(by_layer.items()):
    pool = np.array([c for c in range(hidden_size) if c not in taken])
    if len(pool) < len(channels):
      raise UserError(f'no channels left at layer {layer} to draw a random control from')
    out += [(layer, int(c)) for c in rng.choice(pool, len(channels), replace=False)]
  return sorted(out)


def edit_tables(pairs: Sequence[tuple[int, int]], num_layers: int, hidden_size: int,
                means: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(mask [L, D] bool, value [L, D] float32): what replaces each chosen channel (0 or its mean).

  A NaN mean (a channel without a massive value to average, in `massive_mean`)
  leaves that channel out: there is nothing to replace.
  """
  mask = np.zeros((num_layers, hidden_size), bool)
  value = np.zeros((num_layers, hidden_size), np.float32)
  for layer, channel in pairs:
    if means is not None and np.isnan(means[layer, channel]):
      continue
    mask[layer, channel] = True
    if means is not None:
      value[layer, channel] = means[layer, channel]
  return mask, value


def layer_mask(pairs: Sequence[tuple[int, int]], num_layers: int) -> np.ndarray:
  """[L] bool: the layers with a chosen channel."""
  out = np.zeros(num_layers, bool)
  out[[layer for layer, _ in pairs]] = True
  return out


# ---------------------------------------------------------------------------
# Handlers.


def massive_elements(x: Array, valid: Array) -> Array:
  """[B, T, D] bool: the valid elements that are massive by the layer-median rule (|x| > 100 and
  > 1000x the median |x| of the row's layer output; NaN counts as 0, as in the statistics)."""
  a = jnp.abs(jnp.where(jnp.isnan(x), 0.0, x.astype(jnp.float32)))
  return stats.massive(a, stats.sequence_median(a, valid)[:, None, None]) & valid[:, :, None]


def edit_handler(mask: Array, value: Array, valid: Array, massive_only: bool = False) -> capture.Handler:
  """Replace residual-stream channels: hidden tap of layer l -> where(selected, value[l], x), and sow
  the number of valid elements replaced per channel ([D] int32).

  mask, value: [L, D]; indexed by the traced layer index inside the scan. Selected: every position of
  the channels of mask[l]; with `massive_only`, only their massive elements (`massive_elements`), the
  median being skipped at layers without a chosen channel.
  """

  def handle(call: capture.TapCall, x: Array):
    if not (call.in_layer and call.suffix == 'hidden'):
      return x, None
    m = mask[call.layer_index]
    if massive_only:
      sel = jax.lax.cond(m.any(), lambda: massive_elements(x, valid) & m, lambda: jnp.zeros(x.shape, bool))
    else:
      sel = jnp.broadcast_to(m, x.shape)
    replaced = (sel & valid[:, :, None]).sum(axis=(0, 1), dtype=jnp.int32)
    return jnp.where(sel, value[call.layer_index].astype(x.dtype), x), replaced

  return handle


def channel_sum_handler(valid: Array) -> capture.Handler:
  """Sow each residual layer's per-channel sum of x over the valid tokens ([D] float32)."""

  def handle(call: capture.TapCall, x: Array):
    if not (call.in_layer and call.suffix == 'hidden'):
      return x, None
    return x, jnp.where(valid[:, :, None], x.astype(jnp.float32), 0.0).sum(axis=(0, 1))

  return handle


def massive_sum_handler(valid: Array, layers: Array) -> capture.Handler:
  """Sow each residual layer's per-channel sum of its massive values and their count ([D] float32,
  [D] int32), at the layers of `layers` ([L] bool; zeros elsewhere, without the median)."""

  def handle(call: capture.TapCall, x: Array):
    if not (call.in_layer and call.suffix == 'hidden'):
      return x, None

    def sums():
      sel = massive_elements(x, valid)
      return {'sum': jnp.where(sel, x.astype(jnp.float32), 0.0).sum(axis=(0, 1)),
              'count': sel.sum(axis=(0, 1), dtype=jnp.int32)}

    def nothing():
      return {'sum': jnp.zeros(x.shape[-1:], jnp.float32), 'count': jnp.zeros(x.shape[-1:], jnp.int32)}

    return x, jax.lax.cond(layers[call.layer_index], sums, nothing)

  return handle


# ---------------------------------------------------------------------------
# Device steps.


def make_means_step(config: ModelConfig, dtype: Any, massive_layers: np.ndarray | None = None) -> Callable:
  """jit(params, ids, valid) -> the sown per-layer channel sums of the unmodified model: of every
  valid x, or, with `massive_layers` ([L] bool), of the massive values at those layers with counts."""
  model = transformer.build(config, dtype)

  def step(params, input_ids, valid):
    handler = (channel_sum_handler(valid) if massive_layers is None
               else massive_sum_handler(valid, jnp.asarray(massive_layers)))
    with nn.intercept_methods(capture.interceptor(handler)):
      _, sown = model.apply({'params': params}, input_ids, valid, mutable=[capture.COLLECTION])
    return sown[capture.COLLECTION]

  return jax.jit(step)


def make_eval_step(config: ModelConfig, dtype: Any, chunk: int = next_token.LOGITS_CHUNK,
                   massive_only: bool = False) -> Callable:
  """jit(params, ids [B,T], valid [B,T], masks [V,L,D], values [V,L,D]) -> per-position metrics
  (`next_token.next_token_metrics` of the unmodified model against each edit) and `replaced`, per
  variant the sown tree of elements replaced per layer and channel. `massive_only`: the edits
  replace only massive elements (`edit_handler`).
  """
  model = transformer.build(config, dtype)

  def forward(params, ids, valid, edit=None):
    if edit is None:
      return model.apply({'params': params}, ids, valid), None
    with nn.intercept_methods(capture.interceptor(edit_handler(*edit, valid, massive_only))):
      h, sown = model.apply({'params': params}, ids, valid, mutable=[capture.COLLECTION])
    return h, sown[capture.COLLECTION]

  def step(params, input_ids, valid, masks, values):
    h0 = forward(params, input_ids, valid)[0]
    edited = [forward(params, input_ids, valid, (masks[v], values[v])) for v in range(masks.shape[0])]
    hv = jnp.stack([h for h, _ in edited])
    log_probs = next_token.head_log_probs(model, params)
    out = next_token.next_token_metrics(h0, hv, input_ids, valid, log_probs, log_probs, chunk)
    return {**out, 'replaced': [sown for _, sown in edited]}

  return jax.jit(step)


# ---------------------------------------------------------------------------
# Host merges.


class MeansAccumulator:
  """Per-layer channel sums over the corpus -> [L, D] means."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.sums = np.zeros((config.num_hidden_layers, config.hidden_size), np.float64)
    self.tokens = 0

  def add(self, sown: Any, batch: data.Batch) -> None:
    for name, s in capture.collect(self.config, jax.device_get(sown)).items():
      layer = anatomy.hidden_layer(name)
      if layer is not None:
        self.sums[layer] += np.asarray(s, np.float64)
    self.tokens += batch.num_tokens

  def means(self) -> np.ndarray:
    return (self.sums / max(self.tokens, 1)).astype(np.float32)


class MassiveMeansAccumulator:
  """Per-layer channel sums and counts of the massive values over the corpus -> [L, D] means
  (NaN where a channel has none) and counts."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.sums = np.zeros((config.num_hidden_layers, config.hidden_size), np.float64)
    self.counts = np.zeros((config.num_hidden_layers, config.hidden_size), np.int64)

  def add(self, sown: Any, batch: data.Batch) -> None:
    del batch
    for name, s in capture.collect(self.config, jax.device_get(sown)).items():
      layer = anatomy.hidden_layer(name)
      if layer is not None:
        self.sums[layer] += np.asarray(s['sum'], np.float64)
        self.counts[layer] += np.asarray(s['count'], np.int64)

  def means(self) -> np.ndarray:
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan).astype(np.float32)


class EvalAccumulator(next_token.EvalAccumulator):
  """`next_token.EvalAccumulator`, and the elements each variant replaced per layer and channel."""

  def __init__(self, n_variants: int, table: anatomy.TokenTable, config: ModelConfig):
    super().__init__(n_variants, table)
    self.config = config
    self.replaced = np.zeros((n_variants, config.num_hidden_layers, config.hidden_size), np.int64)

  def add(self, out: Any, batch: data.Batch) -> None:
    super().add(out, batch)
    for v, sown in enumerate(jax.device_get(out['replaced'])):
      for name, n in capture.collect(self.config, sown).items():
        layer = anatomy.hidden_layer(name)
        if layer is not None:
          self.replaced[v, layer] += np.asarray(n, np.int64)


# ---------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class InterveneOptions:
  model_path: str
  output_dir: str
  channels: list[str]
  mode: str = 'zero'
  controls: int = 1
  seed: int = 0
  data_path: str | None = None
  max_samples: int | None = 64
  max_seq_len: int | None = 512
  batch_size: int = 8
  dtype: str = 'bfloat16'
  max_shapes: int = 4
  source_tokenizer: str | None = None
  tokenizer: str | None = None  # instead of the checkpoint's own


@dataclasses.dataclass
class InterventionResult:
  doc: dict
  path: str


def intervene(opts: InterveneOptions) -> InterventionResult:
  """Base and intervened passes over the corpus; `<output_dir>/json/<model>_intervention.json`."""
  if opts.mode in RENAMED_MODES:
    raise UserError(RENAMED_MODES[opts.mode])
  if opts.mode not in MODES:
    raise UserError(f'--mode={opts.mode} is not supported (choose from {", ".join(MODES)})')
  if opts.dtype not in measure_step.DTYPES:
    raise UserError(f'--dtype={opts.dtype} is not supported (choose from {", ".join(measure_step.DTYPES)})')
  if opts.controls < 0:
    raise UserError(f'--controls must be 0 or more, got {opts.controls}')
  if opts.batch_size < 1:
    raise UserError(f'--batch_size must be a positive integer, got {opts.batch_size}')
  results.ensure_output_dir(opts.output_dir)
  config = load_config(opts.model_path)
  pairs = parse_channels(opts.channels, config.num_hidden_layers, config.hidden_size)
  variants = [('requested', pairs)]
  variants += [(f'control_{k + 1}', control_channels(pairs, config.hidden_size, opts.seed + k))
               for k in range(opts.controls)]
  mopts = measure.MeasureOptions(model_path=opts.model_path, output_dir=opts.output_dir, data_path=opts.data_path,
                                 max_samples=opts.max_samples, max_seq_len=opts.max_seq_len,
                                 source_tokenizer=opts.source_tokenizer, tokenizer=opts.tokenizer)
  corpus = measure.load_measure_corpus(mopts, config)
  if all(len(s) < 2 for s in corpus.samples):
    raise UserError('every sample has fewer than 2 tokens: there is no next token to predict')
  plan = data.plan_batches(corpus.lengths, opts.batch_size, opts.max_shapes)
  pad = config.pad_token_id or 0
  dtype = measure_step.DTYPES[opts.dtype]
  params = measure_step.load_params(opts.model_path, config, opts.dtype)
  timings: dict[str, float] = {}

  means, massive_counts = None, None
  if opts.mode == 'channel_mean':
    t0 = time.perf_counter()
    macc = MeansAccumulator(config)
    measure_step.run(make_means_step(config, dtype), params, enumerate(data.iter_batches(corpus, plan, pad)), macc)
    means = macc.means()
    timings['means_s'] = time.perf_counter() - t0
  elif opts.mode == 'massive_mean':
    t0 = time.perf_counter()
    mmacc = MassiveMeansAccumulator(config)
    every = layer_mask([p for _, vp in variants for p in vp], config.num_hidden_layers)
    measure_step.run(make_means_step(config, dtype, every), params,
                     enumerate(data.iter_batches(corpus, plan, pad)), mmacc)
    means, massive_counts = mmacc.means(), mmacc.counts
    timings['means_s'] = time.perf_counter() - t0

  tables = [edit_tables(p, config.num_hidden_layers, config.hidden_size, means) for _, p in variants]
  masks = jnp.asarray(np.stack([m for m, _ in tables]))
  values = jnp.asarray(np.stack([v for _, v in tables]), dtype)
  tokenizer = data.Tokenizer.maybe(mopts.tokenizer_source)
  table = anatomy.TokenTable.build(config.vocab_size, tokenizer, anatomy.bos_token_id(opts.model_path, tokenizer))
  acc = EvalAccumulator(len(variants), table, config)
  step = make_eval_step(config, dtype, massive_only=opts.mode in MASSIVE_MODES)
  t0 = time.perf_counter()
  measure_step.run(lambda p, i, v: step(p, i, v, masks, values), params,
              enumerate(data.iter_batches(corpus, plan, pad)), acc)
  timings['eval_s'] = time.perf_counter() - t0

  describe = measure.describer(corpus, tokenizer)
  base = next_token.base_summary(acc)
  out_variants = []
  for v, (name, vpairs) in enumerate(variants):
    channels = []
    for l, c in vpairs:
      e = {'layer': l, 'channel': c,
           # What replaced the channel: 0, its mean, or the mean of its massive values (None when it
           # had none: nothing replaced).
           'value': (None if np.isnan(means[l, c]) else float(means[l, c])) if means is not None else 0.0,
           'replaced': int(acc.replaced[v, l, c])}
      if massive_counts is not None:
        e['massive_values'] = int(massive_counts[l, c])  # in the unmodified model, over the corpus
      channels.append(e)
    out_variants.append({
        'name': name,
        'channels': channels,
        'replaced': int(sum(e['replaced'] for e in channels)),
        **next_token.variant_summary(acc, v, base, describe),
    })
  name = results.model_name_of(opts.model_path)
  doc = {
      'model_name': name,
      'model_path': opts.model_path,
      'mode': opts.mode,
      'mode_meaning': MODE_MEANING[opts.mode],
      'channels': [f'{l}:{c}' for l, c in pairs],
      'data_path': opts.data_path or 'builtin',
      'num_samples': len(corpus.samples),
      'max_seq_len': opts.max_seq_len,
      'predicted_positions': int(acc.count.sum()),
      'dtype': opts.dtype,
      'seed': opts.seed,
      'base': base,
      'variants': out_variants,
      'kl': 'KL(base || variant) of the next-token distributions, nats per predicted position',
      'replaced': '(token, channel) elements of the valid tokens replaced, over every chosen layer',
      'classes': 'by the class of the predicting token (see maxact_jax.anatomy.CLASSES)',
      'run': {'weights': converters.weights_info(opts.model_path), **{k: round(v, 3) for k, v in timings.items()}},
  }
  path = f'{results.ensure_output_dir(opts.output_dir)}/{name}{INTERVENTION_SUFFIX}'
  results.atomic_write_json(path, doc)
  return InterventionResult(doc, path)


def _fmt(v: float | None, spec: str = '.4g') -> str:
  return '—' if v is None else format(v, spec)


def summary_lines(doc: dict) -> list[str]:
  """A table for the terminal: base, requested, controls."""
  base = doc['base']
  lines = [f'{doc["model_name"]}: {doc["mode"]} channels {", ".join(doc["channels"])} on '
           f'{doc["num_samples"]} samples ({doc["predicted_positions"]:,} predicted positions, {doc["dtype"]})',
           f'  {doc["mode"]}: {MODE_MEANING[doc["mode"]]}',
           f'{"":<12} {"loss":>9} {"ppl":>10} {"Δloss":>10} {"KL mean":>10} {"KL max":>10} {"top-1 kept":>10} '
           f'{"replaced":>10}',
           f'{"unmodified":<12} {_fmt(base["loss"]):>9} {_fmt(base["perplexity"]):>10}']
  for v in doc['variants']:
    lines.append(f'{v["name"]:<12} {_fmt(v["loss"]):>9} {_fmt(v["perplexity"]):>10} '
                 f'{_fmt(v["delta_loss"], "+.3g"):>10} {_fmt(v["kl_mean"], ".3g"):>10} {_fmt(v["kl_max"], ".3g"):>10} '
                 f'{_fmt(v["top1_agreement"], ".1%"):>10} {v["replaced"]:>10,}')
  if doc['mode'] in MASSIVE_MODES:
    lines.append('  massive values replaced per channel: ' + ', '.join(
        f'{c["layer"]}:{c["channel"]} {c["replaced"]:,}' + (f' (by {c["value"]:.6g})' if c.get('value') else '')
        for c in doc['variants'][0]['channels']))
  for v in doc['variants'][1:]:
    lines.append(f'  {v["name"]}: ' + ', '.join(f'{c["layer"]}:{c["channel"]}' for c in v['channels']))
  return lines
