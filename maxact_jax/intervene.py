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

Modes: `zero` sets the channel to 0; `mean` to its mean over the corpus's
valid tokens under the unmodified model (a first pass, reduced on device).
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
from maxact_jax import anatomy, capture, data, measure, measure_step, next_token, results
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.models import transformer

Array = jax.Array

MODES = ('zero', 'mean')
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


def make_eval_step(config: ModelConfig, dtype: Any, chunk: int = next_token.LOGITS_CHUNK) -> Callable:
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
    log_probs = next_token.head_log_probs(model, params)
    return next_token.next_token_metrics(h0, hv, input_ids, valid, log_probs, log_probs, chunk)

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
  acc = next_token.EvalAccumulator(len(variants), table)
  step = make_eval_step(config, dtype)
  t0 = time.perf_counter()
  measure_step.run(lambda p, i, v: step(p, i, v, masks, values), params,
              enumerate(data.iter_batches(corpus, plan, pad)), acc)
  timings['eval_s'] = time.perf_counter() - t0

  describe = measure.describer(corpus, tokenizer)
  base = next_token.base_summary(acc)
  out_variants = []
  for v, (name, vpairs) in enumerate(variants):
    out_variants.append({
        'name': name,
        'channels': [{'layer': l, 'channel': c,
                      'value': float(means[l, c]) if means is not None else 0.0} for l, c in vpairs],
        **next_token.variant_summary(acc, v, base, describe),
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
