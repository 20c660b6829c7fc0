"""`qeval`: what quantizing every linear layer does to a model's predictions, scheme by scheme.

Fake quantization runs inside the jitted forward pass, through the capture
interceptor (`capture.module_interceptor`), on the model itself:

- the *sites* are the inputs of the linear layers of every decoder layer: the
  attention block's input (q/k/v, or the linear attention's in_proj), o_proj's
  (out_proj's) input, the MLP's input (gate/up), down_proj's input, the MoE
  experts' input and hidden activation (one tensor over all experts, as fused
  MoE kernels quantize it), shared experts like MLPs; optionally the router's
  and shared-expert gate's input (`+router`) and the attention products'
  operands q, k (after rope) and v (`+attn`). The embedding, the final norm and
  lm_head stay in the run's dtype;
- weights are quantized once per scheme (a map over the parameter tree: a
  weight's fake quantization depends on the weight alone), after the scheme's
  transforms (`maxact_jax.qtransforms`) are folded in.

Passes: calibration on the first samples (per-channel max |x| of every site,
and where a scheme clips at a quantile, `quant`'s linear histogram of |x|), on
the model with each scheme's transforms (and for smoothing, on the model
before it); a baseline pass on the evaluation samples (the unquantized model's
final hidden states, kept for the scheme passes, and the max |x| of every
site); then one pass per scheme, which runs the quantized model and compares
its next-token distributions with the baseline's on the same batches
(`next_token.next_token_metrics`). Everything is reduced on device; the host
merges in float64.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import converters
from maxact_jax import (anatomy, capture, data, fakequant, measure, measure_step, next_token, qschemes, qtransforms,
                        results, stats)
from maxact_jax.config import ModelConfig, read_config_json
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.models import deltanet, layers, moe, transformer

Array = jax.Array

HIST_BINS = 2048  # `quant`'s linear histogram for the clip quantile
LINEAR_OUTPUTS = ('o_proj', 'down_proj', 'out_proj')  # Dense layers whose own input is a site
ATTENTION_OPERANDS = ('q', 'k', 'v')


# ---------------------------------------------------------------------------
# Sites: which module calls carry the input of a linear layer.


def site_of(call: capture.ModuleCall) -> tuple[str | None, str | None]:
  """(kind, site name) of a module call: kind 'linear' (args[0] is a linear input),
  'experts' (the MoE experts: two sites), 'gate' (router, shared-expert gate) or
  'attn' (q, k, v after rope); (None, None) for any other call."""
  if not call.in_layer or not call.path:
    return None, None
  m, name, last = call.module, '.'.join(call.path), call.path[-1]
  if isinstance(m, layers.Attention):
    return 'linear', f'{name}.qkv_proj'
  if isinstance(m, deltanet.GatedDeltaNet):
    return 'linear', f'{name}.in_proj'
  if isinstance(m, layers.GatedMLP):
    return 'linear', f'{name}.gate_up_proj'
  if isinstance(m, moe.Experts):
    return 'experts', name
  if isinstance(m, nn.Dense) and last in LINEAR_OUTPUTS:
    return 'linear', name
  if isinstance(m, moe.Router) or (isinstance(m, nn.Dense) and last == 'shared_expert_gate'):
    return 'gate', name
  if isinstance(m, layers.Probe) and last in ATTENTION_OPERANDS:
    return 'attn', name
  return None, None


SiteOp = Callable[[str, Array, Array, Array], tuple[Array, dict | None]]
"""(site, x [..., F], mask of the real rows [...], traced layer index) -> (x to continue
with, partial statistics to sow or None)."""


def _expand(mask: Array, x: Array) -> Array:
  """A row mask [...] as [..., 1, ..] broadcastable to x [..., F] (x may have more axes)."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def site_handler(op: SiteOp, valid: Array, kinds: frozenset[str], taps: bool = False,
                 expert_tokens: bool = False) -> capture.CallHandler:
  """A module-call handler applying `op` at every site of the given kinds and sowing
  what it returns under the site's name; with `taps`, also each activation tap's max
  and min (the global maximum); with `expert_tokens`, the tokens each expert receives."""
  token_valid = valid.reshape(-1)

  def on_call(call: capture.ModuleCall, next_fun, args, kwargs):
    kind, site = site_of(call)
    if kind is not None and kind in kinds:
      if kind == 'experts':
        x, index, weights = args
        x, sown_in = op(f'{site}.gate_up_proj', x, token_valid, call.layer_index)
        sown = {}

        def hidden(h, mask):
          h, sown['hidden'] = op(f'{site}.down_proj', h, mask, call.layer_index)
          return h

        module = call.module
        out = moe.experts_forward(module.moe, module.dtype, module.variables['params'], x, index, weights,
                                  hidden=hidden, token_valid=token_valid)
        for name, value in ((f'{site}.gate_up_proj', sown_in), (f'{site}.down_proj', sown['hidden'])):
          if value is not None:
            module.sow(capture.COLLECTION, name, value)
        if expert_tokens:
          e = module.moe.num_experts
          k = index.shape[-1]
          w = jnp.repeat(token_valid, k).astype(jnp.int32)
          module.sow(capture.COLLECTION, f'{site}.tokens',
                     {'tokens': jnp.zeros((e,), jnp.int32).at[index.reshape(-1)].add(w)})
      else:
        x, sown_in = op(site, args[0], valid, call.layer_index)
        if sown_in is not None:
          call.module.sow(capture.COLLECTION, site, sown_in)
        out = next_fun(x, *args[1:], **kwargs)
    else:
      out = next_fun(*args, **kwargs)
    if taps:
      suffix = capture.tap_suffix(call)
      if suffix is not None and capture.full_stats_for(suffix, call.in_layer):
        value = (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)
        m = _expand(valid, value)
        call.module.sow(capture.COLLECTION, suffix, {'max': jnp.where(m, value, -jnp.inf).max(),
                                                     'min': jnp.where(m, value, jnp.inf).min()})
    return out

  return on_call


# ---------------------------------------------------------------------------
# The ops of each pass.


def _row_axes(x: Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def calibration_op(uppers: dict[str, Array] | None = None, bins: int = HIST_BINS) -> SiteOp:
  """Per-channel max |x| over the real rows; with `uppers` ({site: [L] upper bounds}),
  also `quant`'s linear histogram of |x| over [0, upper] for those sites."""

  def op(site, x, mask, layer):
    a = jnp.abs(x.astype(jnp.float32))
    m = jnp.broadcast_to(_expand(mask, a), a.shape)
    a = jnp.where(m, a, 0.0)
    out = {'ch_max': a.max(axis=_row_axes(a))}
    if uppers is not None:
      if site not in uppers:
        return x, None
      upper = uppers[site][layer]
      idx = fakequant.linear_bins(a, jnp.where(upper > 0, upper, 1.0), bins)
      out = {'hist': stats.row_histogram(idx.reshape(1, -1), m.reshape(1, -1), bins)[0]}
    return x, out

  return op


def baseline_op(site, x, mask, layer):
  """The unquantized model's max |x| at every site."""
  del site, layer
  a = jnp.abs(x.astype(jnp.float32))
  return x, {'max_abs': jnp.where(jnp.broadcast_to(_expand(mask, a), a.shape), a, 0.0).max()}


def scheme_op(spec: fakequant.ActSpec, thresholds: dict[str, Array]) -> SiteOp:
  """Fake-quantize every site per the scheme's activation spec (static thresholds [L] per site)."""

  def op(site, x, mask, layer):
    static = thresholds[site][layer] if spec.static and site in thresholds else None
    if spec.static and static is None:
      static = jnp.zeros((), jnp.float32)  # a site the calibration never saw: nothing survives
    return fakequant.quantize_act(x, spec, _expand(mask, x), static)

  return op


def with_online(op: SiteOp, online: dict[int, qtransforms.Rotation]) -> SiteOp:
  """`op` after the online rotation of the down projections' input (`qtransforms.rotate_down`),
  where the scheme has one: the MLPs' and experts' down_proj sites, by their width."""
  if not online:
    return op

  def rotated(site, x, mask, layer):
    if site.startswith('mlp.') and site.endswith('down_proj') and x.shape[-1] in online:
      x = online[x.shape[-1]].apply(x)
    return op(site, x, mask, layer)

  return rotated


# ---------------------------------------------------------------------------
# Steps.


def _apply(model, params, ids, valid, handler):
  with nn.intercept_methods(capture.module_interceptor(handler)):
    h, sown = model.apply({'params': params}, ids, valid, mutable=[capture.COLLECTION])
  return h, sown.get(capture.COLLECTION, {})


ALL_KINDS = frozenset({'linear', 'experts', 'gate', 'attn'})


def make_calibration_step(config: ModelConfig, dtype: Any, hist: bool,
                          online: dict[int, qtransforms.Rotation] | None = None) -> Callable:
  """jit(params, ids, valid, uppers) -> sown per-site calibration partials (and, without
  `hist`, the activation taps' extremes and the experts' token counts); `online`: the
  model's online rotations (`with_online`)."""
  model = transformer.build(config, dtype)

  def step(params, ids, valid, uppers):
    handler = site_handler(with_online(calibration_op(uppers if hist else None), online or {}), valid, ALL_KINDS,
                           taps=not hist, expert_tokens=not hist)
    return _apply(model, params, ids, valid, handler)[1]

  return jax.jit(step)


def make_baseline_step(config: ModelConfig, dtype: Any) -> Callable:
  """jit(params, ids, valid) -> (final hidden states [B, T, D], sown max |x| per site)."""
  model = transformer.build(config, dtype)
  return jax.jit(lambda params, ids, valid: _apply(model, params, ids, valid,
                                                   site_handler(baseline_op, valid, ALL_KINDS)))


def make_scheme_step(config: ModelConfig, scheme_config: ModelConfig, dtype: Any, scheme: qschemes.Scheme,
                     online: dict[int, qtransforms.Rotation] | None = None) -> Callable:
  """jit(base params, scheme params, ids, valid, h0, thresholds) -> (next-token metrics of the
  quantized model against the baseline's hidden states h0, sown per-site statistics);
  `online`: the scheme's online rotations (`with_online`)."""
  base_model = transformer.build(config, dtype)
  model = transformer.build(scheme_config, dtype)
  kinds = {'linear', 'experts'} | ({'gate'} if scheme.router else set()) | ({'attn'} if scheme.attention else set())

  def step(base_params, params, ids, valid, h0, thresholds):
    op = with_online(scheme_op(scheme.acts, thresholds), online or {})
    h, sown = _apply(model, params, ids, valid, site_handler(op, valid, frozenset(kinds)))
    metrics = next_token.next_token_metrics(h0, h[None], ids, valid, next_token.head_log_probs(base_model, base_params),
                                           next_token.head_log_probs(model, params))
    return metrics, sown

  return jax.jit(step)


# ---------------------------------------------------------------------------
# Host merges.


_MAX_KEYS = ('ch_max', 'max', 'max_abs')


def merge_partial(state: dict | None, p: dict) -> dict:
  """float64/int64 merge of one batch's partials: maxima by max, minima by min, the rest summed."""
  p = {k: np.asarray(v, np.float64 if np.asarray(v).dtype.kind == 'f' else np.int64) for k, v in p.items()}
  if state is None:
    return p
  out = {}
  for k, v in p.items():
    if k in _MAX_KEYS:
      out[k] = np.maximum(state[k], v)
    elif k == 'min':
      out[k] = np.minimum(state[k], v)
    else:
      out[k] = state[k] + v
  return out


class SiteAccumulator:
  """Per named site (and tap): the merged partials of one pass."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.sites: dict[str, dict[str, np.ndarray]] = {}

  def add_sown(self, sown: Any) -> None:
    for name, partial in capture.collect(self.config, jax.device_get(sown)).items():
      self.sites[name] = merge_partial(self.sites.get(name), partial)

  def add(self, sown: Any, batch: data.Batch) -> None:
    del batch
    self.add_sown(sown)


class SchemeAccumulator:
  """The scheme pass: next-token metrics (`next_token.EvalAccumulator`) and per-site statistics."""

  def __init__(self, config: ModelConfig, table: anatomy.TokenTable):
    self.metrics = next_token.EvalAccumulator(1, table)
    self.sites = SiteAccumulator(config)

  def add(self, out: Any, batch: data.Batch) -> None:
    metrics, sown = out
    self.metrics.add(metrics, batch)
    self.sites.add_sown(sown)


class BaselineAccumulator(SiteAccumulator):
  """The baseline pass: per-site max |x|, and the final hidden states kept (on device) in batch order."""

  def __init__(self, config: ModelConfig):
    super().__init__(config)
    self.hidden: list[Array] = []

  def add(self, out: Any, batch: data.Batch) -> None:
    h, sown = out
    self.hidden.append(h)
    self.add_sown(sown)


def split_sites(merged: dict[str, dict], key: str) -> dict[str, dict[int, np.ndarray]]:
  """'layer_{i}_<site>' entries holding `key` -> {site: {layer: the entry's key}}
  (sites have a dot; taps do not)."""
  out: dict[str, dict[int, np.ndarray]] = {}
  for name, p in merged.items():
    where, suffix, layer = capture.split_tap(name)
    if where == 'layer' and '.' in suffix and key in p:
      out.setdefault(suffix, {})[layer] = p[key]
  return out


def layer_table(config: ModelConfig, per_layer: dict[str, dict[int, float]]) -> dict[str, Array]:
  """{site: {layer: value}} -> {site: float32 [num_layers]} (0 where the site is absent)."""
  out = {}
  for site, values in per_layer.items():
    a = np.zeros(config.num_hidden_layers, np.float32)
    for layer, v in values.items():
      a[layer] = v
    out[site] = jnp.asarray(a)
  return out


# ---------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class QevalOptions:
  model_path: str
  output_dir: str
  schemes: list[str] = dataclasses.field(default_factory=lambda: list(qschemes.DEFAULT_SCHEMES))
  data_path: str | None = None
  stats_path: str | None = None  # default: <output_dir>/json/<model>_activation_stats.json if present
  calibration_samples: int = 128
  eval_samples: int = 256
  eval_start: int | None = None  # default: right after the calibration samples
  max_seq_len: int | None = 2048
  batch_size: int = 8
  dtype: str = 'bfloat16'
  max_shapes: int = 4
  progress: bool = True
  source_tokenizer: str | None = None
  tokenizer: str | None = None  # instead of the checkpoint's own


@dataclasses.dataclass
class QevalResult:
  doc: dict
  path: str


def check_options(opts: QevalOptions) -> list[qschemes.Scheme]:
  if opts.dtype not in measure_step.DTYPES:
    raise UserError(f'--dtype={opts.dtype} is not supported (choose from {", ".join(measure_step.DTYPES)})')
  for name in ('calibration_samples', 'eval_samples', 'batch_size', 'max_shapes'):
    if getattr(opts, name) < 1:
      raise UserError(f'--{name} must be a positive integer, got {getattr(opts, name)}')
  if opts.max_seq_len is not None and opts.max_seq_len < 2:
    raise UserError(f'--max_seq_len must be at least 2 (a next token to predict), got {opts.max_seq_len}')
  if opts.eval_start is not None and opts.eval_start < opts.calibration_samples:
    raise UserError(f'--eval_start={opts.eval_start} overlaps the calibration samples 0..'
                    f'{opts.calibration_samples - 1}: evaluation must come after them')
  return qschemes.parse_schemes(opts.schemes)


def split_samples(corpus: data.Corpus, n_calibration: int, start: int, n_eval: int) -> tuple[data.Corpus, data.Corpus]:
  """Calibration samples 0..n_calibration-1 and evaluation samples start..start+n_eval-1 (disjoint)."""
  need = start + n_eval
  if len(corpus.samples) < need:
    raise UserError(f'the corpus has {len(corpus.samples)} samples: calibration on 0..{n_calibration - 1} and '
                    f'evaluation on {start}..{need - 1} need {need} (lower --calibration_samples or --eval_samples)')
  cut = [(0, n_calibration), (start, need)]
  return tuple(data.Corpus(corpus.samples[a:b], corpus.categories[a:b], corpus.source) for a, b in cut)


class _Runner:
  """Drives passes over one corpus split (batches planned once) with an optional progress bar."""

  def __init__(self, corpus: data.Corpus, opts: QevalOptions, pad_id: int, model_name: str):
    self.corpus, self.opts, self.pad_id, self.model_name = corpus, opts, pad_id, model_name
    self.plan = data.plan_batches(corpus.lengths, opts.batch_size, opts.max_shapes)

  def run(self, step: Callable, params: Any, acc: Any, desc: str) -> float:
    bar = None
    if self.opts.progress:
      bar = tqdm(total=self.corpus.num_tokens, unit='tok', unit_scale=True, desc=f'  {desc}', file=sys.stderr,
                 dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()
    measure_step.run(step, params, enumerate(data.iter_batches(self.corpus, self.plan, self.pad_id)), acc,
                on_merged=(lambda _, b: bar.update(b.num_tokens)) if bar else None)
    if bar:
      bar.close()
    return time.perf_counter() - t0


class Calibrations:
  """Calibration statistics of the model under each chain of transforms, computed once each."""

  def __init__(self, config: ModelConfig, dtype: Any, params: Any, runner: _Runner):
    self.config, self.dtype, self.params, self.runner = config, dtype, params, runner
    self.max: dict[tuple[str, ...], dict] = {}
    self.hist: dict[tuple[str, ...], dict] = {}
    self.models: dict[tuple[str, ...], tuple[ModelConfig, Any, dict]] = {}
    self.timings: dict[str, float] = {}

  def model(self, chain: tuple[str, ...]) -> tuple[ModelConfig, Any, dict]:
    """(config, params, info) of the model with the transforms of `chain` folded in."""
    if chain in self.models:
      return self.models[chain]
    if not chain:
      return self.config, self.params, {}
    config, params, info = self.model(chain[:-1])
    info = dict(info)
    t0 = time.perf_counter()
    last = chain[-1]
    if last.startswith('rotdown'):
      params, rotations = qtransforms.rotate_down(config, params, int(last[len('rotdown'):]))
      info['online'] = {**info.get('online', {}), **rotations}
      info['rotation_down'] = {str(n): r.how for n, r in rotations.items()}
    elif last.startswith('rotate'):
      config, params, how = qtransforms.rotate(config, params, int(last[len('rotate'):]))
      info['rotation'] = how
    else:
      alpha = float(last[len('smooth'):])
      input_max = split_sites(self.calibration(chain[:-1]), 'ch_max')
      params, factors = qtransforms.smooth(config, params, input_max, alpha)
      info['smoothing_factors'] = factors
    self.timings[f'transform_{"+".join(chain)}_s'] = time.perf_counter() - t0
    self.models = {chain: (config, params, info)}  # one transformed copy of the weights at a time
    return config, params, info

  def calibration(self, chain: tuple[str, ...]) -> dict:
    """Per-channel max |x| of every site (and tap extremes, expert tokens) under `chain`."""
    if chain not in self.max:
      self.max[chain] = self._site_pass(chain, None)
    return self.max[chain]

  def histograms(self, chain: tuple[str, ...]) -> dict:
    """`quant`'s linear |x| histograms of every site under `chain`, over [0, calibrated max]."""
    if chain not in self.hist:
      per_site = split_sites(self.calibration(chain), 'ch_max')
      uppers = layer_table(self.config, {s: {l: float(m.max()) for l, m in per.items()}
                                         for s, per in per_site.items()})
      self.hist[chain] = self._site_pass(chain, uppers)
    return self.hist[chain]

  def _site_pass(self, chain: tuple[str, ...], uppers: Any) -> dict:
    """One pass over the calibration samples under `chain`: every site's per-channel max |x|,
    or with `uppers` (each site's histogram range) `quant`'s linear histograms of |x|."""
    config, params, info = self.model(chain)
    acc = SiteAccumulator(config)
    hist = uppers is not None
    step = make_calibration_step(config, self.dtype, hist=hist, online=info.get('online'))
    key = '+'.join(chain) or 'none'
    timing, label = (f'calibration_hist_{key}_s', 'histograms') if hist else (f'calibration_{key}_s', 'calibrate')
    self.timings[timing] = self.runner.run(lambda p, i, v: step(p, i, v, uppers), params, acc,
                                           f'{self.runner.model_name} {label} {key}')
    return acc.sites

  def thresholds(self, chain: tuple[str, ...], clip: float | None) -> dict[str, dict[int, float]]:
    """Static per-tensor thresholds of every site: the calibrated max |x|, or its clip quantile."""
    per_site = split_sites(self.calibration(chain), 'ch_max')
    maxima = {s: {l: float(m.max()) for l, m in per.items()} for s, per in per_site.items()}
    if clip is None:
      return maxima
    hists = split_sites(self.histograms(chain), 'hist')
    return {s: {l: fakequant.linear_hist_quantile(hists[s][l], maxima[s][l], clip) for l in per}
            for s, per in maxima.items() if s in hists}


def global_maximum(opts: QevalOptions, model_name: str, calib: dict) -> dict[str, Any]:
  """The model's global maximum activation: a measure result's when one is there (the
  corpus `measure` ran on), else the calibration samples' over the activation taps."""
  path = opts.stats_path
  if path is None:
    default = os.path.join(opts.output_dir, 'json', f'{model_name}_activation_stats.json')
    path = default if os.path.isfile(default) else None
  if path:
    doc = results.read_stats_file(path)
    return {'global_max_activation': float(doc['global_max_activation']),
            'global_max_location': doc['global_max_location'], 'global_max_source': path}
  taps = {n: {'max': float(p['max']), 'min': float(p['min'])} for n, p in calib.items()
          if 'max' in p and stats.is_activation_tap(n)}
  value, location = stats.global_max(taps)
  return {'global_max_activation': value, 'global_max_location': location, 'global_max_source': 'calibration'}


def site_results(scheme: qschemes.Scheme, merged: dict[str, dict], base: dict[str, dict],
                 static: dict[str, dict[int, float]] | None) -> dict[str, dict]:
  """Per site: threshold (static, or the mean of the dynamic ones), max |x| under the scheme
  and in the baseline, effective levels of the bulk (INT), clip rate."""
  bits = fakequant.format_bits(scheme.acts.fmt)
  out = {}
  for name, p in merged.items():
    where, site, layer = capture.split_tap(name)
    if where != 'layer' or 'count' not in p:
      continue
    count = max(int(p['count']), 1)
    entry: dict[str, Any] = {'max_abs': float(p['max_abs']),
                             'max_abs_base': float(base[name]['max_abs']) if name in base else None}
    if 'sum_ratio' in p:
      if static is not None:
        entry['threshold'] = static.get(site, {}).get(layer, 0.0)
        entry['threshold_kind'] = 'static'
      else:
        entry['threshold'] = float(p['sum_threshold'] / max(int(p['groups']), 1))
        entry['threshold_kind'] = 'mean per token' if scheme.acts.scale == 'token' else 'mean per batch'
      entry['levels'] = (2 ** bits) * float(p['sum_ratio']) / count if bits else None
      entry['clip_rate'] = float(p['clipped']) / count
    out[name] = entry
  return out


def summarize_sites(sites: dict[str, dict]) -> dict[str, Any]:
  """The worst sites: fewest effective levels, highest clip rate, largest max |x|."""
  out: dict[str, Any] = {}
  with_levels = {n: e for n, e in sites.items() if e.get('levels') is not None}
  if with_levels:
    n = min(with_levels, key=lambda k: with_levels[k]['levels'])
    out['min_levels'] = {'site': n, 'levels': with_levels[n]['levels']}
    out['median_levels'] = float(np.median([e['levels'] for e in with_levels.values()]))
  clipped = {n: e for n, e in sites.items() if e.get('clip_rate') is not None}
  if clipped:
    n = max(clipped, key=lambda k: clipped[k]['clip_rate'])
    out['max_clip_rate'] = {'site': n, 'clip_rate': clipped[n]['clip_rate']}
  if sites:
    n = max(sites, key=lambda k: sites[k]['max_abs'])
    out['max_abs'] = {'site': n, 'value': sites[n]['max_abs'], 'base': sites[n]['max_abs_base']}
  return out


def expert_tokens(calib: dict) -> dict[str, list[int]]:
  """Tokens each expert received on the calibration samples, per MoE layer."""
  out = {}
  for name, p in calib.items():
    where, site, layer = capture.split_tap(name)
    if where == 'layer' and site.endswith('.tokens'):
      out[f'layer_{layer}_{site[:-len(".tokens")]}'] = [int(v) for v in p['tokens']]
  return out


def qeval(opts: QevalOptions) -> QevalResult:
  """Calibrate, run the baseline and every scheme, write `<output_dir>/json/<model>_qeval.json`."""
  schemes = check_options(opts)
  results.ensure_output_dir(opts.output_dir)
  model_name = results.model_name_of(opts.model_path)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  config = load_config(opts.model_path)
  converters.check_checkpoint(opts.model_path, config, measure_step.DTYPES[opts.dtype])
  for s in schemes:
    if s.rotate is not None and config.sandwich_norms:
      raise UserError(f'scheme {s.name!r}: {config.model_type} has sandwich norms (a norm between each block and '
                      'the residual stream): the rotation cannot be folded through them')
  start = opts.calibration_samples if opts.eval_start is None else opts.eval_start
  mopts = measure.MeasureOptions(model_path=opts.model_path, output_dir=opts.output_dir, data_path=opts.data_path,
                                 max_samples=start + opts.eval_samples, max_seq_len=opts.max_seq_len,
                                 source_tokenizer=opts.source_tokenizer, tokenizer=opts.tokenizer)
  corpus = measure.load_measure_corpus(mopts, config)
  calib_corpus, eval_corpus = split_samples(corpus, opts.calibration_samples, start, opts.eval_samples)
  if all(len(s) < 2 for s in eval_corpus.samples):
    raise UserError('every evaluation sample has fewer than 2 tokens: there is no next token to predict')
  timings['data_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  params = measure_step.load_params(opts.model_path, config, opts.dtype)
  timings['load_s'] = time.perf_counter() - t0
  dtype = measure_step.DTYPES[opts.dtype]
  pad_id = config.pad_token_id or 0
  calib_runner = _Runner(calib_corpus, opts, pad_id, model_name)
  eval_runner = _Runner(eval_corpus, opts, pad_id, model_name)
  calibrations = Calibrations(config, dtype, params, calib_runner)
  base_calibration = calibrations.calibration(())

  base_acc = BaselineAccumulator(config)
  timings['baseline_s'] = eval_runner.run(make_baseline_step(config, dtype), params, base_acc,
                                          f'{model_name} baseline')
  base_sites = base_acc.sites
  tokenizer = data.Tokenizer.maybe(mopts.tokenizer_source)
  table = anatomy.TokenTable.build(config.vocab_size, tokenizer, anatomy.bos_token_id(opts.model_path, tokenizer))
  describe = measure.describer(eval_corpus, tokenizer)
  offset = start  # evaluation sample i is corpus sample start + i

  def describe_corpus(at):
    d = describe(at)
    d['sample'] = int(d['sample']) + offset
    return d

  out_schemes: dict[str, dict] = {}
  baseline = None
  for scheme in schemes:
    chain = scheme.transforms
    s_config, t_params, info = calibrations.model(chain)
    static = None
    if scheme.acts.static:
      static = calibrations.thresholds(chain, scheme.acts.clip)
    t0 = time.perf_counter()
    s_params = qtransforms.map_kernels(s_config, t_params, lambda w: fakequant.quantize_weight(w, scheme.weights),
                                       gates=scheme.router) if scheme.weights.fmt != fakequant.NONE else t_params
    timings[f'weights_{scheme.name}_s'] = time.perf_counter() - t0
    thresholds = layer_table(config, static) if static is not None else {}
    step = make_scheme_step(config, s_config, dtype, scheme, info.get('online'))
    h0 = iter(base_acc.hidden)  # the scheme pass sees the batches in the baseline's order

    def run_step(p, ids, valid, step=step, h0=h0, s_params=s_params, thresholds=thresholds):
      return step(p, s_params, ids, valid, next(h0), thresholds)

    acc = SchemeAccumulator(config, table)
    elapsed = eval_runner.run(run_step, params, acc, f'{model_name} {scheme.name}')
    timings[f'scheme_{scheme.name}_s'] = elapsed
    if baseline is None:
      baseline = next_token.base_summary(acc.metrics)
    entry = next_token.variant_summary(acc.metrics, 0, baseline, describe_corpus)
    entry['kl_p99'] = acc.metrics.kl_quantile(0, 0.99)
    sites = site_results(scheme, acc.sites.sites, base_sites, static)
    out_schemes[scheme.name] = {
        'definition': scheme.describe(),
        **{k: entry[k] for k in ('loss', 'perplexity', 'delta_loss', 'perplexity_ratio', 'kl_mean', 'kl_p99',
                                 'kl_max', 'kl_max_at', 'top1_agreement')},
        'by_class': entry['by_class'],
        'sites_summary': summarize_sites(sites),
        'linear_inputs': sites,
        **{k: info[k] for k in ('rotation', 'rotation_down') if k in info},
        'time_s': round(elapsed, 3),
    }
    del s_params
  doc = {
      'model_name': model_name,
      'model_path': opts.model_path,
      'model_type': read_config_json(opts.model_path).get('model_type', config.model_type),
      'num_hidden_layers': config.num_hidden_layers,
      'hidden_size': config.hidden_size,
      'dtype': opts.dtype,
      'data_path': opts.data_path or 'builtin',
      'calibration_samples': len(calib_corpus.samples),
      'calibration_tokens': calib_corpus.num_tokens,
      'eval_samples': len(eval_corpus.samples),
      'eval_first_sample': start,
      'eval_tokens': eval_corpus.num_tokens,
      'predicted_positions': int(acc.metrics.count.sum()),
      'max_seq_len': opts.max_seq_len,
      'batch_size': opts.batch_size,
      **global_maximum(opts, model_name, base_calibration),
      'baseline': baseline,
      'schemes': out_schemes,
      'expert_tokens_calibration': expert_tokens(base_calibration),
      'kl': 'KL(unquantized || scheme) of the next-token distributions, nats per predicted position',
      'sites': 'inputs of linear layers, layer_{i}_<module path> (see README, "Quantization impact")',
      'run': {'devices': [str(d) for d in jax.devices()], 'jax_version': jax.__version__,
              'weights': converters.weights_info(opts.model_path), 'tokenizer': opts.tokenizer,
              **{k: round(v, 3) for k, v in {**timings, **calibrations.timings}.items()}},
  }
  path = os.path.join(results.ensure_output_dir(opts.output_dir), f'{model_name}{results.QEVAL_SUFFIX}')
  results.atomic_write_json(path, doc)
  return QevalResult(doc, path)


# ---------------------------------------------------------------------------
# Printing.


def _fmt(v: float | None, spec: str = '.4g') -> str:
  if v is None:
    return '-'
  if isinstance(v, float) and math.isinf(v):
    return 'inf'
  return format(v, spec)


def table(doc: dict) -> str:
  """scheme x metric, the baseline first."""
  base = doc['baseline']
  width = max([len('scheme')] + [len(n) for n in doc['schemes']])
  lines = [f'{"scheme":<{width}} {"loss":>8} {"Δloss":>9} {"ppl":>9} {"KL mean":>9} {"KL p99":>9} {"KL max":>9} '
           f'{"top-1":>7} {"min lvls":>9} {"max clip":>9}',
           f'{"(unquantized)":<{width}} {_fmt(base["loss"]):>8} {"":>9} {_fmt(base["perplexity"]):>9}']
  for name, s in doc['schemes'].items():
    summ = s['sites_summary']
    levels = summ.get('min_levels', {}).get('levels')
    clip = summ.get('max_clip_rate', {}).get('clip_rate')
    lines.append(f'{name:<{width}} {_fmt(s["loss"]):>8} {_fmt(s["delta_loss"], "+.3g"):>9} '
                 f'{_fmt(s["perplexity"]):>9} {_fmt(s["kl_mean"], ".3g"):>9} {_fmt(s["kl_p99"], ".3g"):>9} '
                 f'{_fmt(s["kl_max"], ".3g"):>9} {_fmt(s["top1_agreement"], ".1%"):>7} '
                 f'{_fmt(levels, ".3g"):>9} {_fmt(clip, ".2g"):>9}')
  return '\n'.join(lines)


def summary_lines(doc: dict) -> list[str]:
  lines = [f'model {doc["model_name"]} ({doc["model_type"]}), dtype {doc["dtype"]}: calibration on samples '
           f'0..{doc["calibration_samples"] - 1} ({doc["calibration_tokens"]:,} tokens), evaluation on '
           f'{doc["eval_first_sample"]}..{doc["eval_first_sample"] + doc["eval_samples"] - 1} '
           f'({doc["predicted_positions"]:,} predicted positions)',
           f'global max activation {doc["global_max_activation"]:.6g} at {doc["global_max_location"]} '
           f'({"calibration samples" if doc["global_max_source"] == "calibration" else doc["global_max_source"]})']
  for name, s in doc['schemes'].items():
    m = s['sites_summary'].get('max_abs')
    d = s['definition']
    if m and any(d[k] is not None for k in ('rotate_seed', 'rotate_down_seed', 'smooth_alpha')):
      lines.append(f'{name}: largest linear input max |x| {m["value"]:.4g} at {m["site"]} '
                   f'(unquantized, untransformed: {_fmt(m["base"])})')
  return lines


__all__ = ['QevalOptions', 'QevalResult', 'qeval', 'table', 'summary_lines', 'site_of']
