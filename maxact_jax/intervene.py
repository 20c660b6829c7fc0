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
of the next-token distributions, plus whether the top-1 prediction survives.
The host merges in float64: loss and perplexity of each, the change in loss,
mean and max KL (with where the max sits), top-1 agreement, and the same by
the class of the predicting token (BOS, first token, ..., see
`maxact_jax.anatomy.CLASSES`).

Modes: `zero` sets the channel to 0; `mean` to its mean over the corpus's
valid tokens under the unmodified model (a first pass, reduced on device).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import converters
from maxact_jax import anatomy, capture, data, measure, measure_step, results
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.models import transformer

Array = jax.Array

MODES = ('zero', 'mean')
INTERVENTION_SUFFIX = '_intervention.json'
# Positions whose logits are computed at once (bounds the [B, chunk, vocab] logits).
LOGITS_CHUNK = 256

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
  """(mask [L, D] bool, value [L, D] float32): what replaces each chosen channel (0 or its mean)."""
  mask = np.zeros((num_layers, hidden_size), bool)
  value = np.zeros((num_layers, hidden_size), np.float32)
  for layer, channel in pairs:
    mask[layer, channel] = True
    if means is not None:
      value[layer, channel] = means[layer, channel]
  return mask, value


# ---------------------------------------------------------------------------
# Handlers.


def edit_handler(mask: Array, value: Array) -> capture.Handler:
  """Replace residual-stream channels: hidden tap of layer l -> where(mask[l], value[l], x).

  mask, value: [L, D]; indexed by the traced layer index inside the scan.
  """

  def handle(call: capture.TapCall, x: Array):
    if not (call.in_layer and call.suffix == 'hidden'):
      return x, None
    return jnp.where(mask[call.layer_index], value[call.layer_index].astype(x.dtype), x), None

  return handle


def channel_sum_handler(valid: Array) -> capture.Handler:
  """Sow each residual layer's per-channel sum of x over the valid tokens ([D] float32)."""

  def handle(call: capture.TapCall, x: Array):
    if not (call.in_layer and call.suffix == 'hidden'):
      return x, None
    return x, jnp.where(valid[:, :, None], x.astype(jnp.float32), 0.0).sum(axis=(0, 1))

  return handle


# ---------------------------------------------------------------------------
# Device steps.


def make_means_step(config: ModelConfig, dtype: Any) -> Callable:
  """jit(params, ids, valid) -> the sown per-layer channel sums of the unmodified model."""
  model = transformer.build(config, dtype)

  def step(params, input_ids, valid):
    with nn.intercept_methods(capture.interceptor(channel_sum_handler(valid))):
      _, sown = model.apply({'params': params}, input_ids, valid, mutable=[capture.COLLECTION])
    return sown[capture.COLLECTION]

  return jax.jit(step)


def next_token_metrics(h0: Array, hv: Array, input_ids: Array, valid: Array,
                       log_probs0: Callable[[Array], Array], log_probs_v: Callable[[Array], Array],
                       chunk: int = LOGITS_CHUNK) -> dict[str, Array]:
  """Per predicted position, a base model against variants, from their final hidden states.

  h0 [B, T, D] (the base), hv [V, B, T, D] (the variants); `log_probs0` and
  `log_probs_v` map hidden states [..., D] to float32 next-token
  log-probabilities [..., vocab] (the base's and the variants' heads). Returns,
  over the T - 1 predicted positions (position t predicts token t + 1): `ok`
  [B, T-1] (both valid), `nll_base` [B, T-1], and per variant `nll`, `kl`
  (KL(base || variant), nats) [V, B, T-1] and `agree` (same argmax) [V, B, T-1].
  Logits are computed `chunk` positions at a time, so a large vocabulary never
  holds [B, T, vocab] for more than one chunk.
  """
  b, t = input_ids.shape
  n_var = hv.shape[0]
  h0, hv = h0[:, :-1], hv[:, :, :-1]
  targets = input_ids[:, 1:]
  ok = valid[:, :-1] & valid[:, 1:]
  n = t - 1
  if n == 0:  # one-token batch: nothing to predict
    zeros = jnp.zeros((n_var, b, 0))
    return {'ok': ok, 'nll_base': zeros[0], 'nll': zeros, 'kl': zeros, 'agree': zeros.astype(bool)}
  c = min(chunk, n)
  pad = -n % c
  padded = lambda a, axis: jnp.pad(a, [(0, pad if i == axis else 0) for i in range(a.ndim)])
  # [chunks, ...] leading axis for lax.map.
  h0c = padded(h0, 1).reshape(b, -1, c, h0.shape[-1]).swapaxes(0, 1)
  hvc = padded(hv, 2).reshape(n_var, b, -1, c, hv.shape[-1]).transpose(2, 0, 1, 3, 4)
  tc = padded(targets, 1).reshape(b, -1, c).swapaxes(0, 1)

  def metrics(args):
    h0_, hv_, t_ = args
    lp0 = log_probs0(h0_)  # [B, c, V]
    nll0 = -jnp.take_along_axis(lp0, t_[..., None], axis=-1)[..., 0]
    p0 = jnp.exp(lp0)
    top0 = jnp.argmax(lp0, axis=-1)
    nll, kl, agree = [], [], []
    for v in range(n_var):
      lpv = log_probs_v(hv_[v])
      nll.append(-jnp.take_along_axis(lpv, t_[..., None], axis=-1)[..., 0])
      # KL(base || variant); 0 * log 0 terms are 0 (p0 underflows to exactly 0). KL >= 0: the
      # float32 sum over nearly equal distributions can end at -1e-7, which is rounding.
      kl.append(jnp.maximum(jnp.sum(jnp.where(p0 > 0, p0 * (lp0 - lpv), 0.0), axis=-1), 0.0))
      agree.append(jnp.argmax(lpv, axis=-1) == top0)
    return nll0, jnp.stack(nll), jnp.stack(kl), jnp.stack(agree)

  nll0, nll, kl, agree = jax.lax.map(metrics, (h0c, hvc, tc))
  # [chunks, B, c] -> [B, T-1]; [chunks, V, B, c] -> [V, B, T-1].
  nll0 = nll0.transpose(1, 0, 2).reshape(b, -1)[:, :n]
  nll, kl, agree = (a.transpose(1, 2, 0, 3).reshape(n_var, b, -1)[:, :, :n] for a in (nll, kl, agree))
  return {'ok': ok, 'nll_base': nll0, 'nll': nll, 'kl': kl, 'agree': agree}


def head_log_probs(model: transformer.CausalLM, params: Any) -> Callable[[Array], Array]:
  """Final hidden states [..., D] -> float32 next-token log-probabilities [..., vocab]."""

  def log_probs(h):
    logits = model.apply({'params': params}, h, method='head')
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return log_probs


def make_eval_step(config: ModelConfig, dtype: Any, chunk: int = LOGITS_CHUNK) -> Callable:
  """jit(params, ids [B,T], valid [B,T], masks [V,L,D], values [V,L,D]) -> per-position metrics
  (`next_token_metrics` of the unmodified model against each edit)."""
  model = transformer.build(config, dtype)

  def forward(params, ids, valid, edit=None):
    if edit is None:
      return model.apply({'params': params}, ids, valid)
    with nn.intercept_methods(capture.interceptor(edit_handler(*edit))):
      return model.apply({'params': params}, ids, valid)

  def step(params, input_ids, valid, masks, values):
    h0 = forward(params, input_ids, valid)
    hv = jnp.stack([forward(params, input_ids, valid, (masks[v], values[v])) for v in range(masks.shape[0])])
    log_probs = head_log_probs(model, params)
    return next_token_metrics(h0, hv, input_ids, valid, log_probs, log_probs, chunk)

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


class EvalAccumulator:
  """float64 sums of the per-position metrics, overall and by class of the predicting token."""

  def __init__(self, n_variants: int, table: anatomy.TokenTable):
    self.table = table
    k = len(anatomy.CLASSES)
    self.count = np.zeros(k, np.int64)
    self.nll_base = np.zeros(k)
    self.nll = np.zeros((n_variants, k))
    self.kl = np.zeros((n_variants, k))
    self.agree = np.zeros((n_variants, k), np.int64)
    self.kl_max = np.full(n_variants, -1.0)
    self.kl_max_at: list[tuple[int, int] | None] = [None] * n_variants
    self.kl_values: list[list[np.ndarray]] = [[] for _ in range(n_variants)]  # for quantiles

  def add(self, out: Any, batch: data.Batch) -> None:
    o = jax.device_get(out)
    ok = np.asarray(o['ok'], bool)
    ids = batch.input_ids[:, :-1]
    first = np.zeros(ids.shape, bool)
    first[:, 0] = True
    cls = self.table.classify(ids, first)[ok]
    add = lambda acc, vals: np.add.at(acc, cls, np.asarray(vals, np.float64)[ok])
    np.add.at(self.count, cls, 1)
    add(self.nll_base, o['nll_base'])
    for v in range(len(self.kl_max)):
      add(self.nll[v], o['nll'][v])
      add(self.kl[v], o['kl'][v])
      self.kl_values[v].append(np.asarray(o['kl'][v], np.float64)[ok])
      np.add.at(self.agree[v], cls, np.asarray(o['agree'][v], np.int64)[ok])
      kl = np.where(ok, np.asarray(o['kl'][v], np.float64), -np.inf)
      row, pos = np.unravel_index(int(np.argmax(kl)), kl.shape)
      # Ties and order: batches come in corpus order of their first sample, so keep the first maximum.
      if kl[row, pos] > self.kl_max[v]:
        self.kl_max[v] = float(kl[row, pos])
        self.kl_max_at[v] = (int(batch.sample_ids[row]), int(pos))

  def kl_quantile(self, v: int, q: float) -> float | None:
    """The q-quantile of variant v's per-position KL (numpy's linear interpolation)."""
    values = np.concatenate(self.kl_values[v]) if self.kl_values[v] else np.zeros(0)
    return float(np.quantile(values, q)) if values.size else None


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


def _summary(nll: np.ndarray, count: np.ndarray) -> dict[str, float | None]:
  n = int(count.sum())
  loss = float(nll.sum() / n) if n else None
  return {'loss': loss, 'perplexity': (math.exp(loss) if loss is not None and loss < 700 else None)}


def base_summary(acc: EvalAccumulator) -> dict[str, Any]:
  """Loss and perplexity of the base model, overall and by class of the predicting token."""
  return {**_summary(acc.nll_base, acc.count),
          'by_class': {cls: {'positions': int(acc.count[k]), 'loss': float(acc.nll_base[k] / acc.count[k])}
                       for k, cls in enumerate(anatomy.CLASSES) if acc.count[k]}}


def variant_summary(acc: EvalAccumulator, v: int, base: dict[str, Any], describe: Callable) -> dict[str, Any]:
  """Variant v against the base: loss, perplexity, their change, KL (mean, max and where),
  top-1 agreement, and the same by class of the predicting token."""
  s = _summary(acc.nll[v], acc.count)
  n = int(acc.count.sum())
  entry = {
      **s,
      'delta_loss': (s['loss'] - base['loss']) if s['loss'] is not None else None,
      'perplexity_ratio': (s['perplexity'] / base['perplexity']
                           if s['perplexity'] and base['perplexity'] else None),
      'kl_mean': float(acc.kl[v].sum() / n) if n else None,
      'kl_max': float(acc.kl_max[v]) if acc.kl_max_at[v] else None,
      # Where the largest KL sits: the predicting token (its sample, position, id, text).
      'kl_max_at': (describe((*acc.kl_max_at[v], 0)) if acc.kl_max_at[v] else None),
      'top1_agreement': float(acc.agree[v].sum() / n) if n else None,
      'by_class': {},
  }
  if entry['kl_max_at']:
    entry['kl_max_at'].pop('channel', None)
  for k, cls in enumerate(anatomy.CLASSES):
    m = int(acc.count[k])
    if m:
      entry['by_class'][cls] = {
          'positions': m,
          'delta_loss': float((acc.nll[v, k] - acc.nll_base[k]) / m),
          'kl_mean': float(acc.kl[v, k] / m),
          'top1_agreement': float(acc.agree[v, k] / m),
      }
  return entry


def intervene(opts: InterveneOptions) -> InterventionResult:
  """Base and intervened passes over the corpus; `<output_dir>/json/<model>_intervention.json`."""
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

  means = None
  if opts.mode == 'mean':
    t0 = time.perf_counter()
    macc = MeansAccumulator(config)
    measure_step.run(make_means_step(config, dtype), params, enumerate(data.iter_batches(corpus, plan, pad)), macc)
    means = macc.means()
    timings['means_s'] = time.perf_counter() - t0

  tables = [edit_tables(p, config.num_hidden_layers, config.hidden_size, means) for _, p in variants]
  masks = jnp.asarray(np.stack([m for m, _ in tables]))
  values = jnp.asarray(np.stack([v for _, v in tables]), dtype)
  tokenizer = data.Tokenizer.maybe(mopts.tokenizer_source)
  table = anatomy.TokenTable.build(config.vocab_size, tokenizer, anatomy.bos_token_id(opts.model_path, tokenizer))
  acc = EvalAccumulator(len(variants), table)
  step = make_eval_step(config, dtype)
  t0 = time.perf_counter()
  measure_step.run(lambda p, i, v: step(p, i, v, masks, values), params,
              enumerate(data.iter_batches(corpus, plan, pad)), acc)
  timings['eval_s'] = time.perf_counter() - t0

  describe = measure.describer(corpus, tokenizer)
  base = base_summary(acc)
  out_variants = []
  for v, (name, vpairs) in enumerate(variants):
    out_variants.append({
        'name': name,
        'channels': [{'layer': l, 'channel': c,
                      'value': float(means[l, c]) if means is not None else 0.0} for l, c in vpairs],
        **variant_summary(acc, v, base, describe),
    })
  name = results.model_name_of(opts.model_path)
  doc = {
      'model_name': name,
      'model_path': opts.model_path,
      'mode': opts.mode,
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
           f'{"":<12} {"loss":>9} {"ppl":>10} {"Δloss":>10} {"KL mean":>10} {"KL max":>10} {"top-1 kept":>10}',
           f'{"unmodified":<12} {_fmt(base["loss"]):>9} {_fmt(base["perplexity"]):>10}']
  for v in doc['variants']:
    lines.append(f'{v["name"]:<12} {_fmt(v["loss"]):>9} {_fmt(v["perplexity"]):>10} '
                 f'{_fmt(v["delta_loss"], "+.3g"):>10} {_fmt(v["kl_mean"], ".3g"):>10} {_fmt(v["kl_max"], ".3g"):>10} '
                 f'{_fmt(v["top1_agreement"], ".1%"):>10}')
  for v in doc['variants'][1:]:
    lines.append(f'  {v["name"]}: ' + ', '.join(f'{c["layer"]}:{c["channel"]}' for c in v['channels']))
  return lines
