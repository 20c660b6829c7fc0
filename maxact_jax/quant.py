"""The paper's INT8 sanity check, reduced on device, and what lies beyond it.

The reference (`quant_sanity_check.py` of the paper's repository) asks: if one
tap's activations were fake-quantized to symmetric per-tensor INT<bits>, how
large would the error be? Its definitions, followed here exactly:

1. taps (`layer_policy`): `peak`, the tap of the model's global maximum (from a
   previous measure result); `all_hidden`, every layer's residual stream and
   the final norm; `list:L10,24,layer_3_hidden,final_layernorm`;
2. calibration on the first N samples of the corpus: per tap, the threshold
   `max_abs` = max |x|, and `clip_q<q>` read off a `hist_bins`-bin linear
   histogram of |x| over [0, max |x|] (bin floor(|x| / max * (bins - 1))): the
   lower edge max * i / (bins - 1) of the first bin i whose cumulative count
   reaches ceil(q * n). Its resolution is max / (bins - 1), so when the
   quantile sits below that the threshold is 0 and the policy is skipped;
3. evaluation on the next M samples: Q = 2^(bits-1) - 1, s = t / Q,
   x -> clamp(round(clamp(x, -t, t) / s), -Q, Q) * s (round half to even);
   MAE, RMSE, rel_mae = MAE / mean |x|, rel_rmse = RMSE / RMS x,
   SQNR = 10 log10(sum x^2 / sum err^2) dB, clip rate = share of |x| > t.

Every pass runs the model under the capture interceptor with a handler of its
own, so activations never leave the device: pass 1 reduces every tap to its
per-channel max and min (the thresholds, the peak and the float headroom come
from them), pass 2 the histograms of the selected taps, pass 3 their error
sums under every scheme, with the thresholds as inputs. Inside a scanned layer
segment the handler is traced once for all layers, so the inputs are indexed
by the traced layer index and unselected layers skip the work (`lax.cond`).
The host merges in float64.

Beyond the reference (new keys, the reference's keys keep their meaning):
- any tap can be checked: the reference hooks only decoder-layer outputs and
  the final norm, so a `peak` in `layer_23_mlp_output` (gpt-oss) checked
  nothing there; here it is checked;
- `peak` without a measure result is the global maximum of the calibration
  samples (the reference falls back to `all_hidden`);
- `clip_q<q>_loghist`: the same quantile from the 512-bin log10 histogram of
  `stats` (interpolated inside a bin: about 1% precision at any magnitude);
- FP8 e4m3 (scale t / 448, round to nearest even in float8_e4m3fn) as well as
  INT<bits>; per-channel scales (calibrated max |x| of each channel) and
  per-token scales (dynamic: max |x| of each token) as well as per-tensor;
- the headroom of every activation tap's max |x| to the fp8 e4m3 (448), fp16
  (65504) and bf16 (3.39e38) limits, and fp16/fp8 overflow counts on the
  evaluation samples.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import converters
from maxact_jax import capture, data, measure, measure_step, report, results, stats
from maxact_jax.config import ModelConfig, read_config_json
from maxact_jax.errors import UserError
from maxact_jax.fakequant import (FLOAT_LIMITS, FP8_E4M3, Format, int_format, linear_bins, linear_hist_quantile,
                                  policy_name)
from maxact_jax.families import load_config
from maxact_jax.models import transformer

Array = jax.Array

QUANT_SUFFIX = '_quant_sanity.json'
SUMMARY_FILE = 'quant_sanity_summary.json'

# Per-tensor threshold policies, in the order of the `t_tensor` input.
TENSOR_POLICIES = ('max_abs', 'clip', 'clip_loghist')
# Tap selections (besides `list:...`): the global maximum's tap, the residual
# stream and final norm (the reference's set), every activation tap.
POLICIES = ('peak', 'all_hidden', 'all')
N_TOP_CHANNELS = 8


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One (format, scale granularity, threshold policy) evaluated at every selected tap."""

  fmt: int  # index into the formats: 0 = INT<bits>, 1 = FP8 e4m3
  granularity: str  # 'tensor', 'channel' or 'token'
  policy: str  # a TENSOR_POLICIES entry; 'max_abs' for channel and token


SCHEMES: tuple[Scheme, ...] = (
    *(Scheme(f, 'tensor', p) for f in (0, 1) for p in TENSOR_POLICIES),
    Scheme(0, 'channel', 'max_abs'), Scheme(1, 'channel', 'max_abs'),
    Scheme(0, 'token', 'max_abs'), Scheme(1, 'token', 'max_abs'),
)
# The reference's two rows: INT<bits>, per tensor, max_abs and clip.
REFERENCE_SCHEMES = (Scheme(0, 'tensor', 'max_abs'), Scheme(0, 'tensor', 'clip'))


# ---------------------------------------------------------------------------
# Host-side formulas (float64), shared by the passes and the tests.


def error_metrics(count: int, sum_abs: float, sum_sq: float, err_abs: float, err_sq: float,
                  clipped: int) -> dict[str, float]:
  """The reference's row: mae, rmse, their relative forms, SQNR in dB, clip rate."""
  count = max(1, int(count))
  mae = err_abs / count
  rmse = math.sqrt(err_sq / count)
  rms = math.sqrt(sum_sq / count) if sum_sq > 0 else 0.0
  abs_mean = sum_abs / count
  return {
      'count': count,
      'mae': mae,
      'rmse': rmse,
      'rel_mae': mae / abs_mean if abs_mean > 0 else 0.0,
      'rel_rmse': rmse / rms if rms > 0 else 0.0,
      'sqnr_db': 10.0 * math.log10(sum_sq / err_sq) if err_sq > 0 and sum_sq > 0 else math.inf,
      'clip_rate': clipped / count,
  }


# ---------------------------------------------------------------------------
# Device side: the handlers of the three passes.

def _btf(x: Array, valid: Array) -> bool:
  """Whether a tap output is [B, T, ...] over the batch (only those are quantized)."""
  return x.ndim >= 3 and tuple(x.shape[:2]) == tuple(valid.shape)


def _as_btf(x: Array, valid: Array) -> tuple[Array, Array]:
  """(x as float32 [B, T, F], mask [B, T, F] of valid non-NaN elements)."""
  b, t = valid.shape
  x = x.astype(jnp.float32).reshape(b, t, -1)
  return x, valid[:, :, None] & ~jnp.isnan(x)


def _inputs_of(qp: dict[str, Any], call: capture.TapCall) -> dict[str, Array] | None:
  """This tap's inputs (indexed by the traced layer index inside a layer), or None."""
  group = qp['layer' if call.in_layer else 'model'].get(call.suffix)
  if group is None:
    return None
  if call.in_layer:
    return jax.tree_util.tree_map(lambda a: a[call.layer_index], group)
  return group


def _selected(fn: Callable, x: Array, p: dict[str, Array], every_layer: bool):
  """fn(x, p) on selected layers; zeros, without the work, on the others."""
  if every_layer:
    return fn(x, p)
  shapes = jax.eval_shape(fn, x, p)

  def zeros(x, p):
    del x, p
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  return jax.lax.cond(p['sel'], fn, zeros, x, p)


def _selected_handler(compute: Callable, valid: Array, qp: dict[str, Any],
                      every_layer: frozenset[str]) -> capture.Handler:
  """A handler running compute(x, this tap's inputs) on the taps `qp` selects: at
  every layer for the suffixes in `every_layer` (and model-level taps), else on
  the selected layers only (`_selected`)."""

  def handle(call: capture.TapCall, x: Array):
    p = _inputs_of(qp, call)
    if p is None or not _btf(x, valid):
      return x, None
    return x, _selected(compute, x, p, call.suffix in every_layer or not call.in_layer)

  return handle


def extremes_handler(valid: Array) -> capture.Handler:
  """Pass 1, every [B, T, ...] tap: per-channel max and min of x over valid positions."""

  def handle(call: capture.TapCall, x: Array):
    del call
    if not _btf(x, valid):
      return x, None
    x32, ok = _as_btf(x, valid)
    return x, {'ch_max': jnp.where(ok, x32, -jnp.inf).max(axis=(0, 1)),
               'ch_min': jnp.where(ok, x32, jnp.inf).min(axis=(0, 1))}

  return handle


def histogram_handler(valid: Array, qp: dict[str, Any], bins: int, every_layer: frozenset[str]) -> capture.Handler:
  """Pass 2, selected taps: the reference's linear histogram over [0, upper] and the log histogram."""

  def compute(x, p):
    x32, ok = _as_btf(x, valid)
    a = jnp.where(ok, jnp.abs(x32), 0.0)
    idx = linear_bins(a, p['upper'], bins)
    log_hist, log_zero, log_count = stats.log_histogram(a, ok & jnp.isfinite(x32))
    return {'lin_hist': stats.row_histogram(idx, ok, bins), 'log_hist': log_hist, 'log_zero': log_zero,
            'log_count': log_count}

  return _selected_handler(compute, valid, qp, every_layer)


def error_handler(valid: Array, qp: dict[str, Any], formats: tuple[Format, Format],
                  every_layer: frozenset[str]) -> capture.Handler:
  """Pass 3, selected taps: per batch row, the sums behind every scheme's metrics."""
  row = (1, 2)

  def compute(x, p):
    x32, ok = _as_btf(x, valid)
    x32 = jnp.where(ok, x32, 0.0)
    a = jnp.abs(x32)
    tok_max = a.max(axis=-1, keepdims=True)  # [B, T, 1]: the dynamic per-token threshold
    err_abs, err_sq, clipped = [], [], []
    for s in SCHEMES:
      fmt = formats[s.fmt]
      if s.granularity == 'tensor':
        i = TENSOR_POLICIES.index(s.policy)
        t, scale = p['t_tensor'][i], p['s_tensor'][s.fmt, i]
      elif s.granularity == 'channel':
        t, scale = p['t_channel'], p['s_channel'][s.fmt]
      else:
        t, scale = tok_max, tok_max / fmt.qmax
      err = jnp.where(ok, fmt.quantize(x32, t, scale) - x32, 0.0)
      err_abs.append(jnp.abs(err).sum(axis=row))
      err_sq.append((err * err).sum(axis=row))
      clipped.append((ok & (a > t)).sum(axis=row, dtype=jnp.int32))
    return {
        'count': ok.sum(axis=row, dtype=jnp.int32),
        'sum_abs': a.sum(axis=row),
        'sum_sq': (x32 * x32).sum(axis=row),
        'max_abs': a.max(),
        'over_fp16': (a > FLOAT_LIMITS['fp16']).sum(axis=row, dtype=jnp.int32),
        'over_fp8_e4m3': (a > FLOAT_LIMITS['fp8_e4m3']).sum(axis=row, dtype=jnp.int32),
        'err_abs': jnp.stack(err_abs),  # [schemes, B]
        'err_sq': jnp.stack(err_sq),
        'clipped': jnp.stack(clipped),
    }

  return _selected_handler(compute, valid, qp, every_layer)


def make_pass_step(config: ModelConfig, dtype: Any, handler: Callable[..., capture.Handler]) -> Callable:
  """jit(params, input_ids [B,T], valid [B,T], qp) -> the sown `taps` tree of one pass."""
  model = transformer.build(config, dtype)

  def step(params, input_ids, valid, qp):
    with nn.intercept_methods(capture.interceptor(handler(valid, qp))):
      _, sown = model.apply({'params': params}, input_ids, valid, mutable=[capture.COLLECTION])
    return sown.get(capture.COLLECTION, {})

  return jax.jit(step)


def pass_inputs(config: ModelConfig, per_tap: dict[str, dict[str, np.ndarray]]) -> tuple[dict, frozenset[str]]:
  """Per-tap inputs -> the step's `qp` tree and the layer suffixes selected at every layer.

  Layer taps are stacked per suffix into [num_layers, ...] arrays (zeros and
  sel=False at unselected layers) so the scanned handler can index them by its
  traced layer index; model-level taps keep their own arrays.
  """
  qp: dict[str, dict[str, Any]] = {'layer': {}, 'model': {}}
  by_suffix: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for name, inputs in per_tap.items():
    where, suffix, layer = capture.split_tap(name)
    if where == 'model':
      qp['model'][suffix] = {k: jnp.asarray(v) for k, v in inputs.items()}
    else:
      by_suffix.setdefault(suffix, {})[layer] = inputs
  n = config.num_hidden_layers
  every = set()
  for suffix, layers in by_suffix.items():
    first = next(iter(layers.values()))
    stacked = {k: np.zeros((n,) + np.shape(v), np.asarray(v).dtype) for k, v in first.items()}
    sel = np.zeros(n, bool)
    for layer, inputs in layers.items():
      sel[layer] = True
      for k, v in inputs.items():
        stacked[k][layer] = v
    qp['layer'][suffix] = {**{k: jnp.asarray(v) for k, v in stacked.items()}, 'sel': jnp.asarray(sel)}
    if sel.all():
      every.add(suffix)
  return qp, frozenset(every)


# ---------------------------------------------------------------------------
# Host-side merge of each pass.


class _PassAccumulator:
  """Merges one pass's per-batch partials (numpy) into per-tap float64/int64 state."""

  def __init__(self, config: ModelConfig, merge: Callable[[dict | None, dict], dict],
               keep: Iterable[str] | None = None):
    self.config = config
    self.merge = merge
    self.keep = None if keep is None else set(keep)
    self.taps: dict[str, dict[str, np.ndarray]] = {}
    self.tokens = 0

  def add(self, sown: Any, batch: data.Batch) -> None:
    for name, partial in capture.collect(self.config, jax.device_get(sown)).items():
      if self.keep is not None and name not in self.keep:
        continue
      self.taps[name] = self.merge(self.taps.get(name), partial)
    self.tokens += batch.num_tokens


def _merge_extremes(state, p):
  if state is None:
    return {'ch_max': p['ch_max'].astype(np.float64), 'ch_min': p['ch_min'].astype(np.float64)}
  return {'ch_max': np.maximum(state['ch_max'], p['ch_max']), 'ch_min': np.minimum(state['ch_min'], p['ch_min'])}


def _merge_histograms(state, p):
  summed = {'lin_hist': p['lin_hist'].astype(np.int64).sum(axis=0),
            'log_hist': p['log_hist'].astype(np.int64).sum(axis=0),
            'log_zero': int(p['log_zero'].astype(np.int64).sum()),
            'log_count': int(p['log_count'].astype(np.int64).sum())}
  if state is None:
    return summed
  return {k: state[k] + summed[k] for k in state}


def _merge_errors(state, p):
  summed = {
      'count': int(p['count'].astype(np.int64).sum()),
      'sum_abs': float(p['sum_abs'].astype(np.float64).sum()),
      'sum_sq': float(p['sum_sq'].astype(np.float64).sum()),
      'max_abs': float(p['max_abs']),
      'over_fp16': int(p['over_fp16'].astype(np.int64).sum()),
      'over_fp8_e4m3': int(p['over_fp8_e4m3'].astype(np.int64).sum()),
      'err_abs': p['err_abs'].astype(np.float64).sum(axis=1),
      'err_sq': p['err_sq'].astype(np.float64).sum(axis=1),
      'clipped': p['clipped'].astype(np.int64).sum(axis=1),
  }
  if state is None:
    return summed
  out = {k: state[k] + summed[k] for k in state}
  out['max_abs'] = max(state['max_abs'], summed['max_abs'])
  return out


# ---------------------------------------------------------------------------
# Tap selection.


def parse_list_policy(spec: str) -> list[str]:
  """The reference's `list:` items: 'L10' or '10' -> layer_10_hidden; tap names as they are."""
  names = []
  for item in spec.split(','):
    item = item.strip()
    if not item:
      continue
    if item[:1] in 'Ll' and item[1:].isdigit():
      names.append(f'layer_{int(item[1:])}_hidden')
    elif item.isdigit():
      names.append(f'layer_{int(item)}_hidden')
    else:
      names.append(item)
  return names


def select_taps(policy: str, taps: list[str] | None, available: list[str], peak_tap: str | None) -> list[str]:
  """The taps to check, in forward order.

  taps: explicit names (win over the policy). peak_tap: the global maximum's
  tap, for `peak`. `available` are the model's [B, T, ...] taps in forward order.
  """
  if taps:
    names = list(taps)
  elif policy == 'peak':
    names = [peak_tap] if peak_tap else []
  elif policy == 'all_hidden':  # the reference's set: decoder-layer outputs and the final norm
    names = [n for n in available if n.endswith('_hidden') or n == 'final_layernorm']
  elif policy == 'all':
    names = [n for n in available if stats.is_activation_tap(n)]
  elif policy.startswith('list:'):
    names = parse_list_policy(policy[len('list:'):])
  else:
    raise UserError(f'--layer_policy={policy} is not one of {", ".join(POLICIES)}, list:L10,L24,...')
  unknown = [n for n in names if n not in available]
  if unknown:
    raise UserError(f'no tap named {unknown[0]} in this model (taps look like layer_0_hidden, '
                    f'layer_0_mlp_output, final_layernorm; {len(available)} in all)')
  if not names:
    raise UserError(f'--layer_policy={policy} selects no tap')
  order = {n: i for i, n in enumerate(available)}
  return sorted(set(names), key=order.__getitem__)


# ---------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class QuantOptions:
  model_path: str
  output_dir: str
  data_path: str | None = None
  stats_path: str | None = None  # default: <output_dir>/json/<model>_activation_stats.json if present
  taps: list[str] | None = None
  layer_policy: str = 'peak'
  calibration_samples: int = 128
  eval_samples: int = 256
  max_seq_len: int | None = 4096
  batch_size: int = 8
  dtype: str = 'bfloat16'
  bits: int = 8
  clip_quantile: float = 0.999
  hist_bins: int = 2048
  family: str | None = None
  role: str | None = None
  max_shapes: int = 8
  progress: bool = True
  tokenizer: str | None = None  # instead of the checkpoint's own


@dataclasses.dataclass
class QuantResult:
  doc: dict[str, Any]
  path: str
  summary_path: str
  timings: dict[str, float]


def check_options(opts: QuantOptions) -> None:
  if opts.dtype not in measure_step.DTYPES:
    raise UserError(f'--dtype={opts.dtype} is not supported (choose from {", ".join(measure_step.DTYPES)})')
  for name in ('calibration_samples', 'eval_samples', 'batch_size'):
    if getattr(opts, name) < 1:
      raise UserError(f'--{name} must be a positive integer, got {getattr(opts, name)}')
  if opts.max_seq_len is not None and opts.max_seq_len < 1:
    raise UserError(f'--max_seq_len must be a positive integer, got {opts.max_seq_len}')
  if not 2 <= opts.bits <= 16:
    raise UserError(f'--bits must be between 2 and 16, got {opts.bits}')
  if not 0.0 < opts.clip_quantile <= 1.0:
    raise UserError(f'--clip_quantile must be in (0, 1], got {opts.clip_quantile}')
  if opts.hist_bins < 2:
    raise UserError(f'--hist_bins must be at least 2, got {opts.hist_bins}')
  if not opts.taps and opts.layer_policy not in POLICIES and not opts.layer_policy.startswith('list:'):
    raise UserError(f'--layer_policy={opts.layer_policy} is not one of {", ".join(POLICIES)}, list:L10,L24,...')


def split_corpus(corpus: data.Corpus, n_calibration: int, n_eval: int) -> tuple[data.Corpus, data.Corpus]:
  """The first n_calibration samples and the next n_eval, in corpus order (as the reference)."""
  if len(corpus.samples) <= n_calibration:
    raise UserError(f'the corpus has {len(corpus.samples)} samples: none left for evaluation after '
                    f'{n_calibration} calibration samples (lower --calibration_samples)')
  cut = [(0, n_calibration), (n_calibration, n_calibration + n_eval)]
  return tuple(data.Corpus(corpus.samples[a:b], corpus.categories[a:b], corpus.source) for a, b in cut)


def _run_pass(step, params, corpus: data.Corpus, opts: QuantOptions, pad_id: int, acc: _PassAccumulator,
              qp: dict, desc: str) -> float:
  plan = data.plan_batches(corpus.lengths, opts.batch_size, opts.max_shapes)
  bar = None
  if opts.progress:
    bar = tqdm(total=corpus.num_tokens, unit='tok', unit_scale=True, desc=f'  {desc}', file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
  t0 = time.perf_counter()
  measure_step.run(lambda p, i, v: step(p, i, v, qp), params, enumerate(data.iter_batches(corpus, plan, pad_id)), acc,
              on_merged=(lambda _, b: bar.update(b.num_tokens)) if bar else None)
  if bar:
    bar.close()
  return time.perf_counter() - t0


def quant(opts: QuantOptions) -> QuantResult:
  """Calibrate, evaluate, write `<output_dir>/json/<model>_quant_sanity.json`."""
  check_options(opts)
  results.ensure_output_dir(opts.output_dir)
  model_name = results.model_name_of(opts.model_path)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  config = load_config(opts.model_path)
  converters.check_checkpoint(opts.model_path, config, measure_step.DTYPES[opts.dtype])
  stats_path = opts.stats_path
  if stats_path is None:
    default = os.path.join(opts.output_dir, 'json', f'{model_name}_activation_stats.json')
    stats_path = default if os.path.isfile(default) else None
  stats_doc = results.read_stats_file(stats_path) if stats_path else None
  # Validate the selection before any work; `peak` without a measure result waits for pass 1.
  available = capture.tap_names(config)
  selected = None
  peak_tap, peak_source = None, None
  if opts.taps is None and opts.layer_policy == 'peak' and stats_doc is not None:
    peak_tap, peak_source = stats_doc['global_max_location'].split()[0], 'stats_file'
  if opts.taps or opts.layer_policy != 'peak' or peak_tap:
    selected = select_taps(opts.layer_policy, opts.taps, available, peak_tap)
  corpus = measure.load_measure_corpus(measure.MeasureOptions(
      model_path=opts.model_path, output_dir=opts.output_dir, data_path=opts.data_path,
      max_samples=opts.calibration_samples + opts.eval_samples, max_seq_len=opts.max_seq_len,
      tokenizer=opts.tokenizer), config)
  calib, evals = split_corpus(corpus, opts.calibration_samples, opts.eval_samples)
  timings['data_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  params = measure_step.load_params(opts.model_path, config, opts.dtype)
  timings['load_s'] = time.perf_counter() - t0
  dtype = measure_step.DTYPES[opts.dtype]
  pad_id = config.pad_token_id or 0
  formats = (int_format(opts.bits), FP8_E4M3)

  # Pass 1: per-channel extremes of every tap on the calibration samples.
  step = make_pass_step(config, dtype, lambda valid, qp: extremes_handler(valid))
  acc1 = _PassAccumulator(config, _merge_extremes)
  timings['calibration_max_s'] = _run_pass(step, params, calib, opts, pad_id, acc1, {}, f'{model_name} calibr-max')
  extremes = acc1.taps
  ch_abs = {name: np.maximum(np.abs(e['ch_max']), np.abs(e['ch_min'])) for name, e in extremes.items()}
  max_abs = {name: float(v.max()) for name, v in ch_abs.items()}
  calib_value, calib_location = stats.global_max(
      {name: {'max': float(e['ch_max'].max()), 'min': float(e['ch_min'].min())} for name, e in extremes.items()})
  if selected is None:
    peak_tap, peak_source = calib_location.rsplit(' (', 1)[0] if calib_location else None, 'calibration'
    selected = select_taps('peak', None, available, peak_tap)
  odd = [n for n in selected if n not in extremes]
  if odd:
    raise UserError(f'tap {odd[0]} is not a [batch, position, ...] activation: it cannot be quantized here')

  # Pass 2: the histograms of the selected taps, over [0, their calibration max].
  upper = {name: np.float32(max_abs[name]) for name in selected}
  hist_taps = [n for n in selected if upper[n] > 0]  # the reference skips taps whose max is 0
  thresholds = {'max_abs': {n: max_abs[n] for n in sorted(selected)}}
  clip_q = policy_name('clip', opts.clip_quantile)
  clip_log = policy_name('clip_loghist', opts.clip_quantile)
  thresholds[clip_q], log_thresholds = {}, {}
  if hist_taps:
    qp, every = pass_inputs(config, {n: {'upper': upper[n]} for n in hist_taps})
    step = make_pass_step(config, dtype,
                          lambda valid, qp_: histogram_handler(valid, qp_, opts.hist_bins, every))
    acc2 = _PassAccumulator(config, _merge_histograms, keep=hist_taps)
    timings['calibration_hist_s'] = _run_pass(step, params, calib, opts, pad_id, acc2, qp,
                                              f'{model_name} calibr-hist')
    for name in sorted(hist_taps):
      h = acc2.taps[name]
      thresholds[clip_q][name] = linear_hist_quantile(h['lin_hist'], float(upper[name]), opts.clip_quantile)
      log_thresholds[name] = stats.log_hist_quantile(h['log_hist'], h['log_zero'], h['log_count'],
                                                     opts.clip_quantile)

  # Pass 3: the error sums of every scheme on the evaluation samples.
  per_tap = {}
  for name in selected:
    t_tensor = np.array([max_abs[name], thresholds[clip_q].get(name, 0.0), log_thresholds.get(name, 0.0)])
    t_channel = ch_abs[name]
    qmax = np.array([[f.qmax] for f in formats])
    per_tap[name] = {
        't_tensor': t_tensor.astype(np.float32),
        # Scales in float64 on the host, then float32, as the reference's python float scale.
        's_tensor': (t_tensor[None, :] / qmax).astype(np.float32),
        't_channel': t_channel.astype(np.float32),
        's_channel': (t_channel[None, :] / qmax).astype(np.float32),
    }
  qp, every = pass_inputs(config, per_tap)
  step = make_pass_step(config, dtype, lambda valid, qp_: error_handler(valid, qp_, formats, every))
  acc3 = _PassAccumulator(config, _merge_errors, keep=selected)
  timings['eval_s'] = _run_pass(step, params, evals, opts, pad_id, acc3, qp, f'{model_name} eval')

  tap_thresholds = {'max_abs': thresholds['max_abs'], 'clip': thresholds[clip_q], 'clip_loghist': log_thresholds}
  metrics, extended = [], []
  for name in sorted(selected):
    e = acc3.taps[name]
    for k, s in enumerate(SCHEMES):
      if s.granularity == 'tensor' and tap_thresholds[s.policy].get(name, 0.0) <= 0:
        continue  # as the reference: no row for a threshold of 0
      row = {'layer': name, 'policy': policy_name(s.policy, opts.clip_quantile),
             **error_metrics(e['count'], e['sum_abs'], e['sum_sq'], float(e['err_abs'][k]),
                             float(e['err_sq'][k]), int(e['clipped'][k])),
             'format': formats[s.fmt].name, 'granularity': s.granularity}
      (metrics if s in REFERENCE_SCHEMES else extended).append(row)
  metrics.sort(key=lambda r: (r['layer'], r['policy']))
  extended.sort(key=lambda r: (r['layer'], r['format'], r['granularity'], r['policy']))

  raw = read_config_json(opts.model_path)
  doc = {
      'model_name': model_name,
      'family': opts.family or _family(model_name),
      'role': opts.role,
      'model_path': opts.model_path,
      'data_path': opts.data_path or 'builtin',
      'bits': opts.bits,
      'clip_quantile': opts.clip_quantile,
      'calibration_samples': len(calib.samples),
      'eval_samples': len(evals.samples),
      'max_seq_len': opts.max_seq_len,
      'layer_policy': opts.layer_policy if opts.taps is None else 'list:' + ','.join(opts.taps),
      'selected_layers': sorted(selected),
      'reference_global_max_abs': abs(float(stats_doc['global_max_activation'])) if stats_doc else None,
      'reference_global_max_location': stats_doc['global_max_location'] if stats_doc else None,
      'thresholds': thresholds,
      'metrics': metrics,
      # Beyond the reference.
      'tool': 'maxact-jax',
      'model_type': raw.get('model_type', config.model_type),
      'dtype': opts.dtype,
      'stats_path': stats_path,
      'peak_source': peak_source,
      'calibration_global_max_abs': abs(calib_value),
      'calibration_global_max_location': calib_location,
      'calibration_tokens': calib.num_tokens,
      'eval_tokens': evals.num_tokens,
      'hist_bins': opts.hist_bins,
      'formats': {f.name: {'kind': f.kind, 'qmax': f.qmax} for f in formats},
      'thresholds_extended': {clip_log: log_thresholds},
      'extended_metrics': extended,
      'channels': {name: channel_summary(extremes[name]) for name in selected},
      'eval_stats': {name: eval_summary(acc3.taps[name]) for name in selected},
      'headroom': headroom({n: max_abs[n] for n in extremes if stats.is_activation_tap(n)}),
      'run': {'batch_size': opts.batch_size, 'devices': [str(d) for d in jax.devices()],
              'jax_version': jax.__version__, 'weights': converters.weights_info(opts.model_path),
              **{k: round(v, 3) for k, v in timings.items()}},
  }
  json_dir = results.ensure_output_dir(opts.output_dir)
  path = os.path.join(json_dir, f'{model_name}{QUANT_SUFFIX}')
  results.atomic_write_json(path, doc)
  summary_path = write_summary(json_dir)
  return QuantResult(doc, path, summary_path, timings)


def _family(model_name: str) -> str:
  return report.family_from_name(model_name)


def channel_summary(e: dict[str, np.ndarray]) -> dict[str, Any]:
  """The channels with the largest calibration max |x| (the per-channel scales' outliers)."""
  signed = np.where(np.abs(e['ch_max']) >= np.abs(e['ch_min']), e['ch_max'], e['ch_min'])
  a = np.abs(signed)
  order = np.argsort(-a, kind='stable')[:N_TOP_CHANNELS]
  return {
      'num_channels': int(a.size),
      'median_channel_max_abs': float(np.median(a)),
      'top_channels': [{'channel': int(c), 'max_abs': float(a[c]), 'signed': float(signed[c])} for c in order],
  }


def eval_summary(e: dict[str, Any]) -> dict[str, Any]:
  n = max(1, e['count'])
  return {'count': e['count'], 'max_abs': e['max_abs'], 'abs_mean': e['sum_abs'] / n,
          'rms': math.sqrt(e['sum_sq'] / n), 'over_fp16': e['over_fp16'], 'over_fp8_e4m3': e['over_fp8_e4m3']}


def headroom(max_abs: dict[str, float]) -> dict[str, Any]:
  """limit / max |x| per activation tap and format (< 1: the tap overflows that format)."""

  def ratio(limit, m):
    return limit / m if m > 0 else None

  taps = {name: {'max_abs': m, **{f: ratio(limit, m) for f, limit in FLOAT_LIMITS.items()}}
          for name, m in max_abs.items()}
  tightest = {}
  if max_abs:
    name = max(max_abs, key=max_abs.__getitem__)  # the first tap in forward order on ties
    m = max_abs[name]
    for f, limit in FLOAT_LIMITS.items():
      tightest[f] = {'tap': name, 'max_abs': m, 'headroom': ratio(limit, m),
                     'overflowing_taps': sum(1 for v in max_abs.values() if v > limit)}
  return {'limits': dict(FLOAT_LIMITS), 'tightest': tightest, 'taps': taps}


# ---------------------------------------------------------------------------
# Cross-model summary (the reference's quant_sanity_summary.json).


def summarize(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per model and policy: count-weighted means of rel_rmse, rel_mae, clip rate and SQNR.

  As the reference: the SQNR mean sums only finite values but divides by the
  count of every row.
  """
  out = []
  for doc in docs:
    by_policy: dict[str, list[dict]] = {}
    for row in doc.get('metrics', []):
      by_policy.setdefault(row['policy'], []).append(row)
    for policy, rows in by_policy.items():
      weight = sum(r['count'] for r in rows)
      if weight == 0:
        continue
      out.append({
          'model_name': doc['model_name'],
          'family': doc.get('family'),
          'role': doc.get('role'),
          'policy': policy,
          'reference_global_max_abs': doc.get('reference_global_max_abs'),
          'mean_rel_rmse': sum(r['rel_rmse'] * r['count'] for r in rows) / weight,
          'mean_rel_mae': sum(r['rel_mae'] * r['count'] for r in rows) / weight,
          'mean_clip_rate': sum(r['clip_rate'] * r['count'] for r in rows) / weight,
          'mean_sqnr_db': sum(r['sqnr_db'] * r['count'] for r in rows if math.isfinite(r['sqnr_db'])) / weight,
          'layers': len(rows),
      })
  return out


def write_summary(json_dir: str) -> str:
  """Rebuild `quant_sanity_summary.json` from every *_quant_sanity.json in json_dir."""
  docs = []
  for path in sorted(glob.glob(os.path.join(json_dir, '*' + QUANT_SUFFIX))):
    try:
      with open(path, encoding='utf-8') as f:
        docs.append(json.load(f))
    except (OSError, json.JSONDecodeError):
      continue  # a foreign or broken file does not stop the summary
  path = os.path.join(json_dir, SUMMARY_FILE)
  results.atomic_write_json(path, summarize(docs))
  return path


# ---------------------------------------------------------------------------
# Printing.


def _fmt(v: float | None) -> str:
  if v is None:
    return '-'
  if isinstance(v, float) and math.isinf(v):
    return 'inf'
  return f'{v:.4g}'


def table(doc: dict[str, Any]) -> str:
  """Per selected tap: every scheme's relative errors, SQNR and clip rate."""
  lines = [f'{"tap":<22} {"format":<9} {"scale":<8} {"policy":<20} {"threshold":>11} {"rel_mae":>9} '
           f'{"rel_rmse":>9} {"sqnr_db":>8} {"clip_rate":>10}']
  rows = sorted(doc['metrics'] + doc['extended_metrics'],
                key=lambda r: (doc['selected_layers'].index(r['layer']), r['format'] != f'int{doc["bits"]}',
                               ('tensor', 'channel', 'token').index(r['granularity']), r['policy']))
  all_thresholds = {**doc['thresholds'], **doc['thresholds_extended']}
  for r in rows:
    t = all_thresholds.get(r['policy'], {}).get(r['layer']) if r['granularity'] == 'tensor' else None
    lines.append(f'{r["layer"]:<22} {r["format"]:<9} {r["granularity"]:<8} {r["policy"]:<20} {_fmt(t):>11} '
                 f'{r["rel_mae"]:>9.4f} {r["rel_rmse"]:>9.4f} {_fmt(r["sqnr_db"]):>8} {r["clip_rate"]:>10.3g}')
  return '\n'.join(lines)


def summary_lines(doc: dict[str, Any]) -> list[str]:
  lines = [f'model {doc["model_name"]} ({doc["model_type"]}), dtype {doc["dtype"]}: '
           f'{doc["calibration_samples"]} calibration samples ({doc["calibration_tokens"]} tokens), '
           f'{doc["eval_samples"]} evaluation samples ({doc["eval_tokens"]} tokens)']
  where = {'stats_file': f'from {doc["stats_path"]}', 'calibration': 'from the calibration samples'}
  if doc['peak_source']:
    lines.append(f'peak tap {doc["selected_layers"][0]} ({where[doc["peak_source"]]})')
  lines.append(f'calibration global max |x| {doc["calibration_global_max_abs"]:.6g} at '
               f'{doc["calibration_global_max_location"]}')
  for f, t in doc['headroom']['tightest'].items():
    lines.append(f'headroom to {f} (max {t["max_abs"]:.6g} at {t["tap"]}): {_fmt(t["headroom"])}x'
                 + (f' — {t["overflowing_taps"]} taps overflow {f}' if t['overflowing_taps'] else ''))
  for name in doc['selected_layers']:
    e = doc['eval_stats'][name]
    top = doc['channels'][name]['top_channels'][:3]
    lines.append(f'{name}: eval max |x| {e["max_abs"]:.6g}, rms {e["rms"]:.4g}; top channels '
                 + ', '.join(f'{c["channel"]} ({c["signed"]:.4g})' for c in top))
  return lines


__all__ = ['QuantOptions', 'QuantResult', 'quant', 'summarize', 'table', 'summary_lines', 'error_metrics',
           'select_taps']
