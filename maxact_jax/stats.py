"""Per-tap statistics: on-device reduction to mergeable state, float64 host merge.

The contract (the design notes of the README) follows the reference pipeline exactly:

- over valid (unpadded) positions: mean, std = sqrt(max(0, E[x^2] - E[x]^2)),
  abs_mean, rms, max, min, count;
- for activation taps ([B, T, D], names in `is_activation_tap`): per token the
  max |x| over D and the LOWER median of |x| over D (torch.median's
  convention), Sun et al.'s ratio max / max(median, float32 tiny), the peak
  token, the largest-ratio token, the ratio's mean and std, and the count of
  tokens with max > 100 and ratio > 1000; a 512-bin log10 histogram of |x|
  over [1e-8, 1e8] with a zero bucket, from which quantiles are interpolated;
  the top-100 |x| with their signed values.

Beyond the reference: the location (sample, position, channel) of every
extreme and top-K entry, and NaN/Inf counts; with `anatomy=True` (the
residual stream in `measure`) also the max |x| of every channel over the
batch and, for `maxact_jax.anatomy`, two flags per token, one per rule:

- the reference's per-token rule (`sun_tok`, counted by `sun_n_pass`): the
  token's max |x| > 100 and > 1000x the token's OWN median |x| over D;
- the layer-median rule of Sun et al.'s code (`layer_median_tok`, counted
  by `layer_median_n_pass`): the token's max |x| > 100 and > 1000x the
  median |x| of the whole layer output of the token's sequence (all its
  valid tokens and channels; `sequence_median`). Their code takes
  torch.median of |x| over the layer output of one sequence; a per-sequence
  median is exact, independent of how sequences are batched, and merges as
  the counts do. A token whose whole state is large (the first token of a
  trained llama) passes this rule and fails the per-token one. NaNs never enter a maximum or a sum; +-inf (a
bf16 overflow, say) does enter the maximum and is counted.

Ties are broken by the smallest (sample, position, channel), so the merge is
associative and commutative: batches, devices, hosts and resumed runs combine
to the same answer in any order.

`tap_partial` runs inside the jitted step and returns small arrays; `TapStats`
holds the float64 running state on the host.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TOP_K = 100
HIST_BINS = 512
HIST_LOG_MIN = -8.0
HIST_LOG_MAX = 8.0
SUN_T_VAL = 100.0
SUN_T_RATIO = 1000.0
TINY = float(np.finfo(np.float32).tiny)

ACTIVATION_SUFFIXES = ('_hidden', '_attn_output', '_mlp_output')
ACTIVATION_NAMES = ('embedding_output', 'final_layernorm')

# What `tap_partial(..., anatomy=True)` adds to a partial.
ANATOMY_KEYS = ('chan_absmax', 'sun_tok', 'layer_median_tok', 'layer_median_n_pass', 'layer_median_seq_sum',
                'layer_median_n_seq', 'layer_median_peak')

# Sample index given to coordinates that point at nothing (empty state).
NO_SAMPLE = np.iinfo(np.int64).max


def is_activation_tap(name: str) -> bool:
  """Taps that get the full statistics and count towards the global maximum."""
  return name in ACTIVATION_NAMES or name.endswith(ACTIVATION_SUFFIXES)


# ---------------------------------------------------------------------------
# Device side.


def _first_argmax(values: jax.Array) -> jax.Array:
  """Flat index of the first maximum (row-major) of `values`."""
  return jnp.argmax(values.reshape(-1))


def tap_partial(x: jax.Array, valid: jax.Array, *, full: bool, top_k: int = TOP_K,
                anatomy: bool = False) -> dict[str, jax.Array]:
  """Reduce one tap's output for one batch to mergeable statistics.

  Args:
    x: [B, T, ...] activations, any float dtype (reduced in float32).
    valid: [B, T] bool, False on padding.
    full: also compute the Sun ratios, histogram and top-K (activation taps).
    anatomy: with `full`, also `chan_absmax` [F] (max |x| of each channel over
      the valid tokens, NaN left out; 0 for an empty batch), `sun_tok`
      [B, T] bool (the tokens that pass the reference's per-token rule,
      counted by `sun_n_pass`) and the layer-median rule's fields:
      `layer_median_tok` [B, T] bool and `layer_median_n_pass` [B] (the
      tokens that pass it), `layer_median_seq_sum` [B] float32 and
      `layer_median_n_seq` [B] int32 (each row's median |x| and whether the
      row holds a token, to average the medians over sequences) and
      `layer_median_peak` (the median of the row holding the `sun_peak` token).

  Returns arrays whose leading axis is B for additive quantities (summed on the
  host in float64) and small fixed-size arrays for extremes, with coordinates
  (batch row, position, flat channel) as int32.

  Every per-token quantity (max, min and their channels; the median) is taken
  once and reused: the extremes, the Sun ratios and the top-K all read them.
  """
  b, t = x.shape[:2]
  x = x.astype(jnp.float32).reshape(b, t, -1)
  f = x.shape[-1]
  tok = _token_reductions(x, valid)
  out = {
      'count': (valid.sum(axis=1) * f).astype(jnp.int32),
      'sum': tok['sum'].sum(axis=1),
      'sum_sq': tok['sum_sq'].sum(axis=1),
      'abs_sum': tok['abs_sum'].sum(axis=1),
      'nan': tok['nan'],
      'posinf': tok['posinf'],
      'neginf': tok['neginf'],
  }
  tok_max, tok_min = tok['max'], tok['min']
  for name, extreme, sign in (('max', tok_max, 1.0), ('min', tok_min, -1.0)):
    flat = _first_argmax(extreme * sign)  # the first token holding the extreme
    bi, ti = flat // t, flat % t
    row = x[bi, ti]  # its channels: only this one row needs an argmax
    ch = jnp.argmax(jnp.where(jnp.isnan(row), -jnp.inf, row * sign))
    out[name] = extreme[bi, ti]
    out[f'{name}_at'] = jnp.stack([bi, ti, ch]).astype(jnp.int32)
  if full:
    # max |x| per token (NaN excluded; a token of only NaN counts as 0).
    tok_abs = jnp.maximum(jnp.maximum(tok_max, -tok_min), 0.0)
    out.update(_activation_partial(x, valid, tok_abs, top_k, anatomy, tok['clean'], out['nan']))
  return out


def _token_reductions(x: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Per token over the channels: the sums of x, x^2 and |x| over finite values,
  max and min with NaN left out (padding: -inf / +inf); per row the NaN, +inf and
  -inf counts over valid elements; and `clean`, True when no valid token holds a
  non-finite value.

  A non-finite element makes its token's plain sum non-finite, so one plain
  reduction tells whether any valid token needs the element-wise masks; when none
  does (every healthy run), the unmasked reductions are the answer and the masked
  pass (three times dearer on CPU) is never run. A token whose finite values sum
  past float32's range takes the masked pass too, with the same result.
  """
  v = valid[:, :, None]
  tok_sum = x.sum(axis=-1)
  clean = ~(valid & ~jnp.isfinite(tok_sum)).any()
  zeros = jnp.zeros(x.shape[:1], jnp.int32)

  # Both branches close over x: passing it as the operand costs a copy on CPU.
  def unmasked(_):
    return {'sum': jnp.where(valid, tok_sum, 0.0), 'sum_sq': jnp.where(valid, (x * x).sum(axis=-1), 0.0),
            'abs_sum': jnp.where(valid, jnp.abs(x).sum(axis=-1), 0.0),
            'max': jnp.where(valid, x.max(axis=-1), -jnp.inf), 'min': jnp.where(valid, x.min(axis=-1), jnp.inf),
            'nan': zeros, 'posinf': zeros, 'neginf': zeros}

  def masked(_):
    xz = jnp.where(v & jnp.isfinite(x), x, 0.0)
    ok = v & ~jnp.isnan(x)
    count = lambda m: (v & m).sum(axis=(1, 2), dtype=jnp.int32)
    return {'sum': xz.sum(axis=-1), 'sum_sq': (xz * xz).sum(axis=-1), 'abs_sum': jnp.abs(xz).sum(axis=-1),
            'max': jnp.where(ok, x, -jnp.inf).max(axis=-1), 'min': jnp.where(ok, x, jnp.inf).min(axis=-1),
            'nan': count(jnp.isnan(x)), 'posinf': count(x == jnp.inf), 'neginf': count(x == -jnp.inf)}

  return {**jax.lax.cond(clean, unmasked, masked, None), 'clean': clean}


# Elements per slice of the median search on CPU: the 31 passes then run over data
# held in cache instead of streaming the whole tap from memory 31 times.
MEDIAN_SLICE = 1 << 20


def lower_median(a: jax.Array) -> jax.Array:
  """The lower of the two middle values along the last axis (torch.median's convention),
  for a >= 0, exactly, without sorting.

  Non-negative float32 values order like their bit patterns read as int32, so
  the k-th smallest value is found bit by bit from the top: 31 passes of
  compare-and-count over the last axis (a sort costs several times more on CPU).
  On CPU a large tap is searched a slice of rows at a time (`MEDIAN_SLICE`
  elements, about 2x faster than whole-tap passes once the tap outgrows the
  cache); accelerators take the whole tap in each pass.
  """
  a = a.astype(jnp.float32)
  lead, d = a.shape[:-1], a.shape[-1]
  if jax.default_backend() != 'cpu' or a.size <= MEDIAN_SLICE:
    return _bitwise_median(a)
  rows = a.reshape(-1, d)
  n, per = rows.shape[0], max(1, MEDIAN_SLICE // d)
  rows = jnp.pad(rows, ((0, -n % per), (0, 0)))
  return jax.lax.map(_bitwise_median, rows.reshape(-1, per, d)).reshape(-1)[:n].reshape(lead)


def _bitwise_median(a: jax.Array, k=None, count_dtype=jnp.float32) -> jax.Array:
  """The k-th smallest (0-based; default the lower median's rank) along the last axis, a >= 0;
  k may be an array over the leading axes."""
  k = (a.shape[-1] - 1) // 2 if k is None else k

  def step(i, prefix):
    cand = prefix | jnp.left_shift(jnp.int32(1), 30 - i)
    # Compare as floats and count in float32 (exact below 2**24 channels): XLA:CPU
    # vectorises this better than int32 compares and sums.
    below = (a < jax.lax.bitcast_convert_type(cand, jnp.float32)[..., None]).sum(axis=-1, dtype=count_dtype)
    return jnp.where(below <= k, cand, prefix)

  prefix = jax.lax.fori_loop(0, 31, step, jnp.zeros(a.shape[:-1], jnp.int32))
  # XLA:CPU compares subnormals as zero, so a median of 0 ends as the largest
  # subnormal bit pattern: below the smallest normal the answer is 0.
  normal = jnp.int32(np.float32(TINY).view(np.int32))
  return jnp.where(prefix < normal, 0.0, jax.lax.bitcast_convert_type(prefix, jnp.float32))


def massive(a: jax.Array, median: jax.Array) -> jax.Array:
  """Sun et al.'s criterion: |x| > SUN_T_VAL and > SUN_T_RATIO x the median it is compared with
  (the ratio taken as `tap_partial` takes it, over max(median, float32 tiny))."""
  return (a > SUN_T_VAL) & (a / jnp.maximum(median, TINY) > SUN_T_RATIO)


def sequence_median(a: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, T, D] |x| (no NaN), valid [B, T] -> [B]: each row's lower median of |x| over its
  valid tokens and all channels (torch.median over the layer output of one sequence, as
  Sun et al.'s code takes it); 0 for a row without a valid token.

  The bit-by-bit search of `lower_median`, with padding as +inf (above every
  candidate) and each row's own rank. Counts are float32 (exact) below 2**24
  elements per row, int32 above. On CPU a large tap is searched a row at a
  time, for the reason `lower_median` slices.
  """
  b = a.shape[0]
  rows = jnp.where(valid[:, :, None], a.astype(jnp.float32), jnp.inf).reshape(b, -1)
  n = valid.sum(axis=1, dtype=jnp.int32) * a.shape[-1]
  count_dtype = jnp.float32 if rows.shape[1] < 2**24 else jnp.int32
  if jax.default_backend() == 'cpu' and rows.size > MEDIAN_SLICE:
    med = jax.lax.map(lambda rk: _bitwise_median(rk[0][None], (rk[1][None] - 1) // 2, count_dtype)[0], (rows, n))
  else:
    med = _bitwise_median(rows, (n - 1) // 2, count_dtype)
  return jnp.where(n > 0, med, 0.0)


def row_histogram(idx: jax.Array, mask: jax.Array, bins: int) -> jax.Array:
  """Per-row counts of bin indices: idx in [0, bins), mask [B, ...] -> int32 [B, bins]
  (masked out: not counted)."""
  b = idx.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32).reshape((b,) + (1,) * (idx.ndim - 1)), idx.shape)
  # Masked elements land in one spare slot past the end, so every index is in
  # bounds and the scatter needs no bounds checks (a quarter faster on CPU).
  flat_bin = jnp.where(mask, rows * bins + idx, b * bins)
  hist = jnp.zeros((b * bins + 1,), jnp.int32).at[flat_bin.reshape(-1)].add(1, mode='promise_in_bounds')
  return hist[:-1].reshape(b, bins)


def log_histogram(a: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The log10 histogram of |x| per batch row, over the elements where `mask`.

  Args:
    a: [B, ...] float32 |x| (no NaN).
    mask: [B, ...] bool, the elements to count (valid and finite).

  Returns (hist int32 [B, HIST_BINS], zero count [B], element count [B]). The
  bin arithmetic is the reference's in float32:
  floor((log10|x| - LOG_MIN) / span * BINS), clipped to the range.
  """
  nonzero = mask & (a > 0)
  logs = jnp.log10(jnp.where(nonzero, a, 1.0))
  span = HIST_LOG_MAX - HIST_LOG_MIN
  idx = jnp.clip(jnp.floor((logs - HIST_LOG_MIN) / span * HIST_BINS), 0, HIST_BINS - 1).astype(jnp.int32)
  axes = tuple(range(1, a.ndim))
  return (row_histogram(idx, nonzero, HIST_BINS), (mask & (a <= 0)).sum(axis=axes, dtype=jnp.int32),
          mask.sum(axis=axes, dtype=jnp.int32))


def _activation_partial(x, valid, tok_abs, top_k, anatomy, clean, nan_rows):
  b, t, f = x.shape
  # |x| with NaN as 0 (the median's convention); the masked select only runs
  # when some valid token holds a non-finite value.
  a = jax.lax.cond(clean, lambda _: jnp.abs(x), lambda _: jnp.abs(jnp.where(jnp.isnan(x), 0.0, x)), None)
  tok_med = lower_median(a)
  ratio = tok_abs / jnp.maximum(tok_med, TINY)
  out = {}
  for name, key in (('sun_peak', tok_abs), ('sun_max_ratio', ratio)):
    flat = _first_argmax(jnp.where(valid, key, -jnp.inf))
    bi, ti = flat // t, flat % t
    out[f'{name}_abs'] = tok_abs[bi, ti]
    out[f'{name}_median'] = tok_med[bi, ti]
    out[f'{name}_ratio'] = ratio[bi, ti]
    out[f'{name}_at'] = jnp.stack([bi, ti]).astype(jnp.int32)
  sun_tok = valid & (tok_abs > SUN_T_VAL) & (ratio > SUN_T_RATIO)  # [B, T]
  out['sun_n_pass'] = sun_tok.sum(axis=1, dtype=jnp.int32)
  if anatomy:
    out['sun_tok'] = sun_tok
    out['chan_absmax'] = jnp.where(valid[:, :, None], a, 0.0).max(axis=(0, 1))  # [F]
    seq_med = sequence_median(a, valid)  # [B]
    lm_tok = valid & massive(tok_abs, seq_med[:, None])  # [B, T]
    has = valid.any(axis=1)
    out['layer_median_tok'] = lm_tok
    out['layer_median_n_pass'] = lm_tok.sum(axis=1, dtype=jnp.int32)
    out['layer_median_seq_sum'] = jnp.where(has, seq_med, 0.0)
    out['layer_median_n_seq'] = has.astype(jnp.int32)
    out['layer_median_peak'] = seq_med[out['sun_peak_at'][0]]
  r = jnp.where(valid, ratio, 0.0)
  out['sun_sum_ratio'] = r.sum(axis=1)
  out['sun_sum_ratio_sq'] = (r * r).sum(axis=1)

  # The histogram counts the finite valid elements: +inf is excluded by `a < inf`,
  # a NaN (0 in `a`) would count as a zero and is taken back out of both counts.
  hist, zero, count = log_histogram(a, valid[:, :, None] & (a < jnp.inf))
  out['hist'], out['hist_zero'], out['hist_count'] = hist, zero - nan_rows, count - nan_rows

  # Top-K |x| with the signed value, in two stages: the K tokens of largest
  # max |x| hold every one of the K largest elements (a token holding one of them
  # has max |x| at least the K-th value, and at most K tokens can), so a top-K
  # over their K rows replaces one over all B * T * D elements. Padding and NaN
  # score -1 and never win.
  k_tok = min(top_k, b * t)
  tok_score = jnp.where(valid, tok_abs, -1.0).reshape(-1)
  _, toks = jax.lax.top_k(tok_score, k_tok)  # [k_tok] flat token index, ties: lowest first
  rows_x = x.reshape(b * t, f)[toks]  # [k_tok, F]
  rows_ok = valid.reshape(-1)[toks][:, None] & ~jnp.isnan(rows_x)
  scores = jnp.where(rows_ok, jnp.abs(rows_x), -1.0).reshape(-1)
  k = min(top_k, k_tok * f)
  vals, flat = jax.lax.top_k(scores, k)
  tok_index = toks[flat // f]
  out['topk_abs'] = vals
  out['topk_signed'] = rows_x.reshape(-1)[flat]
  out['topk_at'] = jnp.stack([tok_index // t, tok_index % t, flat % f], axis=-1).astype(jnp.int32)
  return out


# Partial fields with a leading batch-row axis, summed on the host.
ADDITIVE_FIELDS = ('count', 'sum', 'sum_sq', 'abs_sum', 'nan', 'posinf', 'neginf', 'sun_n_pass',
                   'sun_sum_ratio', 'sun_sum_ratio_sq', 'hist', 'hist_zero', 'hist_count', 'layer_median_n_pass',
                   'layer_median_seq_sum', 'layer_median_n_seq')


def combine_across(partial: dict[str, jax.Array], axis_name: str, top_k: int = TOP_K) -> dict[str, jax.Array]:
  """One device's partial over its rows -> the partial of the whole batch.

  Runs inside `shard_map`/`pmap` over `axis_name`, whose devices hold
  consecutive blocks of batch rows in axis-index order. The result, the same on
  every device, is exactly what `tap_partial` returns for the whole batch on
  one device:

  - additive fields keep their per-row axis (all_gather): int32 counts summed
    over many rows could overflow, and the host sums rows in float64;
  - extremes: all_gather of every device's candidate, then the first device
    holding the best (jnp.argmax, as on one device, NaN included), whose
    coordinates are shifted by its row offset; ties therefore go to the
    smallest row, as on one device;
  - top-K: all_gather of every device's top-K, then top-K again; lax.top_k
    puts equal values in index order, which is row order here.
  """
  rows = partial['count'].shape[0]
  offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * rows

  def gather(a):
    return jax.lax.all_gather(a, axis_name)  # [devices, ...]

  def first_best(key, *fields):
    best = jnp.argmax(gather(key))
    return tuple(gather(f)[best] for f in fields)

  def shift(at):  # local row -> batch row (first coordinate)
    return at.at[..., 0].add(offset)

  out = {k: jax.lax.all_gather(partial[k], axis_name, tiled=True) for k in ADDITIVE_FIELDS if k in partial}
  if 'sun_tok' in partial:  # anatomy extras: per-row token flags, per-channel maxima
    for key in ('sun_tok', 'layer_median_tok'):
      out[key] = jax.lax.all_gather(partial[key], axis_name, tiled=True)
    out['chan_absmax'] = jax.lax.pmax(partial['chan_absmax'], axis_name)
  for name, sign in (('max', 1.0), ('min', -1.0)):
    out[name], out[f'{name}_at'] = first_best(partial[name] * sign, partial[name], shift(partial[f'{name}_at']))
  for name, key in (('sun_peak', 'abs'), ('sun_max_ratio', 'ratio')):
    if f'{name}_at' not in partial:
      continue
    fields = [f'{name}_abs', f'{name}_median', f'{name}_ratio']
    if name == 'sun_peak' and 'layer_median_peak' in partial:
      fields.append('layer_median_peak')  # the median of the peak token's row goes with it
    picked = first_best(partial[f'{name}_{key}'], *(partial[f] for f in fields), shift(partial[f'{name}_at']))
    out.update(zip(fields + [f'{name}_at'], picked))
  if 'topk_abs' in partial:
    scores = jax.lax.all_gather(partial['topk_abs'], axis_name, tiled=True)
    signed = jax.lax.all_gather(partial['topk_signed'], axis_name, tiled=True)
    at = jax.lax.all_gather(shift(partial['topk_at']), axis_name, tiled=True)
    vals, idx = jax.lax.top_k(scores, min(top_k, scores.shape[0]))
    out['topk_abs'], out['topk_signed'], out['topk_at'] = vals, signed[idx], at[idx]
  return out


# ---------------------------------------------------------------------------
# Host side.


class TapStats:
  """The running float64 state of one tap; `update` a batch, `merge` another state."""

  # max |x| per channel ([F] float32, max-merged) when the partials carry
  # `chan_absmax`; a class default, so states saved before it existed load.
  chan_absmax: np.ndarray | None = None
  # The layer-median rule's state when the partials carry it (anatomy): tokens
  # passing, the sum and count of the per-sequence medians, and the peak token
  # (abs, the median of its sequence, (sample, position)), taken as `sun_peak`.
  layer_median: dict[str, Any] | None = None

  def __init__(self, full: bool, top_k: int = TOP_K):
    self.full = full
    self.top_k = top_k
    self.count = 0
    self.sum = 0.0
    self.sum_sq = 0.0
    self.abs_sum = 0.0
    self.nan = self.posinf = self.neginf = 0
    # Extremes: value and (sample, position, channel).
    self.max, self.max_at = -math.inf, (NO_SAMPLE, 0, 0)
    self.min, self.min_at = math.inf, (NO_SAMPLE, 0, 0)
    if full:
      self.n_tokens = 0
      self.sun = {
          'sun_peak': (0.0, 0.0, 0.0, (NO_SAMPLE, 0)),  # (abs, median, ratio, at)
          'sun_max_ratio': (0.0, 0.0, 0.0, (NO_SAMPLE, 0)),
      }
      self.sun_n_pass = 0
      self.sun_sum_ratio = 0.0
      self.sun_sum_ratio_sq = 0.0
      self.hist = np.zeros(HIST_BINS, np.int64)
      self.hist_zero = 0
      self.hist_count = 0
      # The reference starts its top-K from K zeros: keep that, located nowhere.
      self.topk_abs = np.zeros(top_k, np.float64)
      self.topk_signed = np.zeros(top_k, np.float64)
      self.topk_at = np.tile(np.array([NO_SAMPLE, 0, 0], np.int64), (top_k, 1))

  # -- updates ---------------------------------------------------------------

  def update(self, partial: dict[str, np.ndarray], sample_ids: np.ndarray, n_tokens: int | None = None) -> None:
    """Fold one batch's partial (numpy) into the state.

    sample_ids: [B] corpus index of each batch row, ascending over the rows that
    hold tokens (the device breaks ties by row, so ascending rows make that the
    smallest sample); all-padding rows may carry any id. n_tokens: valid tokens.
    """
    p = partial
    if int(p['count'].sum()) == 0:
      return
    self.count += int(p['count'].sum())
    self.sum += float(p['sum'].astype(np.float64).sum())
    self.sum_sq += float(p['sum_sq'].astype(np.float64).sum())
    self.abs_sum += float(p['abs_sum'].astype(np.float64).sum())
    self.nan += int(p['nan'].sum())
    self.posinf += int(p['posinf'].sum())
    self.neginf += int(p['neginf'].sum())

    def where(at):
      return (int(sample_ids[at[0]]), int(at[1]), int(at[2]))

    self._take_extreme('max', float(p['max']), where(p['max_at']))
    self._take_extreme('min', float(p['min']), where(p['min_at']))
    if 'chan_absmax' in p:
      self._take_channels(np.asarray(p['chan_absmax'], np.float32))
    if not self.full:
      return
    self.n_tokens += int(n_tokens)
    for name in ('sun_peak', 'sun_max_ratio'):
      at = p[f'{name}_at']
      cand = (float(p[f'{name}_abs']), float(p[f'{name}_median']), float(p[f'{name}_ratio']),
              (int(sample_ids[at[0]]), int(at[1])))
      self._take_sun(name, cand)
    self.sun_n_pass += int(p['sun_n_pass'].sum())
    if 'layer_median_n_pass' in p:
      at = p['sun_peak_at']
      self._take_layer_median({
          'n_pass': int(p['layer_median_n_pass'].sum()),
          'seq_sum': float(p['layer_median_seq_sum'].astype(np.float64).sum()),
          'n_seq': int(p['layer_median_n_seq'].sum()),
          'peak': (float(p['sun_peak_abs']), float(p['layer_median_peak']), (int(sample_ids[at[0]]), int(at[1]))),
      })
    self.sun_sum_ratio += float(p['sun_sum_ratio'].astype(np.float64).sum())
    self.sun_sum_ratio_sq += float(p['sun_sum_ratio_sq'].astype(np.float64).sum())
    self.hist += p['hist'].astype(np.int64).sum(axis=0)
    self.hist_zero += int(p['hist_zero'].sum())
    self.hist_count += int(p['hist_count'].sum())
    keep = p['topk_abs'] >= 0  # padding entries scored -1
    at = p['topk_at'][keep].astype(np.int64)
    at[:, 0] = sample_ids[at[:, 0]]
    self._take_topk(p['topk_abs'][keep].astype(np.float64), p['topk_signed'][keep].astype(np.float64), at)

  def _take_extreme(self, name: str, value: float, at: tuple[int, int, int]) -> None:
    cur, cur_at = getattr(self, name), getattr(self, f'{name}_at')
    better = value > cur if name == 'max' else value < cur
    if better or (value == cur and at < cur_at):
      setattr(self, name, value)
      setattr(self, f'{name}_at', at)

  def _take_channels(self, absmax: np.ndarray) -> None:
    self.chan_absmax = absmax.copy() if self.chan_absmax is None else np.maximum(self.chan_absmax, absmax)

  def _take_sun(self, name: str, cand) -> None:
    cur = self.sun[name]
    key = 0 if name == 'sun_peak' else 2  # peak: by |x|; max_ratio: by ratio
    if cand[key] > cur[key] or (cand[key] == cur[key] and cand[3] < cur[3]):
      self.sun[name] = cand

  def _take_layer_median(self, other: dict[str, Any]) -> None:
    cur = self.layer_median
    if cur is None:
      self.layer_median = dict(other)
      return
    peak, cand = cur['peak'], other['peak']
    self.layer_median = {k: cur[k] + other[k] for k in ('n_pass', 'seq_sum', 'n_seq')}
    self.layer_median['peak'] = cand if cand[0] > peak[0] or (cand[0] == peak[0] and cand[2] < peak[2]) else peak

  def _take_topk(self, abs_vals, signed, at) -> None:
    abs_all = np.concatenate([self.topk_abs, abs_vals])
    signed_all = np.concatenate([self.topk_signed, signed])
    at_all = np.concatenate([self.topk_at, at])
    # Sort by |x| descending, ties by (sample, position, channel) ascending.
    order = np.lexsort((at_all[:, 2], at_all[:, 1], at_all[:, 0], -abs_all))[: self.top_k]
    self.topk_abs, self.topk_signed, self.topk_at = abs_all[order], signed_all[order], at_all[order]

  def merge(self, other: 'TapStats') -> 'TapStats':
    """Fold another state (another device, host or resumed run) into this one."""
    for name in ('count', 'sum', 'sum_sq', 'abs_sum', 'nan', 'posinf', 'neginf'):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    self._take_extreme('max', other.max, other.max_at)
    self._take_extreme('min', other.min, other.min_at)
    if other.chan_absmax is not None:
      self._take_channels(other.chan_absmax)
    if self.full:
      self.n_tokens += other.n_tokens
      for name in self.sun:
        self._take_sun(name, other.sun[name])
      if other.layer_median is not None:
        self._take_layer_median(other.layer_median)
      for name in ('sun_n_pass', 'sun_sum_ratio', 'sun_sum_ratio_sq', 'hist', 'hist_zero', 'hist_count'):
        setattr(self, name, getattr(self, name) + getattr(other, name))
      self._take_topk(other.topk_abs, other.topk_signed, other.topk_at)
    return self

  # -- results ---------------------------------------------------------------

  def quantile(self, q: float) -> float:
    """|x| quantile from the log histogram: the reference's interpolation exactly."""
    return log_hist_quantile(self.hist, self.hist_zero, self.hist_count, q)

  def finalize(self) -> dict[str, Any]:
    """The reference's per-tap fields, in its order (scalars, then top-K lists)."""
    if self.count == 0:
      return {}
    # Moments over finite elements (non-finite ones are counted, not summed).
    n = max(self.count - self.nan - self.posinf - self.neginf, 1)
    mean = self.sum / n
    mean_sq = self.sum_sq / n
    out: dict[str, Any] = {
        'mean': mean,
        'std': max(0.0, mean_sq - mean**2) ** 0.5,
        'abs_mean': self.abs_sum / n,
        'rms': mean_sq**0.5,
        'max': self.max,
        'min': self.min,
        'count': self.count,
    }
    if not self.full:
      return out
    peak_abs, peak_med, _, _ = self.sun['sun_peak']
    r_abs, r_med, r_val, _ = self.sun['sun_max_ratio']
    nt = self.n_tokens
    mean_r = self.sun_sum_ratio / nt if nt else 0.0
    std_r = max(0.0, self.sun_sum_ratio_sq / nt - mean_r**2) ** 0.5 if nt else 0.0
    out.update({
        'sun_peak_abs': peak_abs,
        'sun_peak_token_median': peak_med,
        'sun_peak_token_ratio': peak_abs / peak_med if peak_med > 0 else 0.0,
        'sun_max_ratio': r_val,
        'sun_max_ratio_abs': r_abs,
        'sun_max_ratio_median': r_med,
        'sun_mean_ratio': mean_r,
        'sun_std_ratio': std_r,
        'sun_n_tokens': nt,
        'sun_n_pass': self.sun_n_pass,
        'sun_t_val': SUN_T_VAL,
        'sun_t_ratio': SUN_T_RATIO,
    })
    lm = self.layer_median
    if lm is not None:  # beyond the reference: the layer-median rule (module docstring)
      lm_abs, lm_med, _ = lm['peak']
      out.update({
          'layer_median_n_pass': lm['n_pass'],
          'layer_median_peak_median': lm_med,
          'layer_median_peak_ratio': lm_abs / lm_med if lm_med > 0 else 0.0,
          'layer_median_seq_mean': lm['seq_sum'] / lm['n_seq'] if lm['n_seq'] else 0.0,
          'layer_median_n_seq': lm['n_seq'],
      })
    if self.hist_count > 0:
      out.update({
          'abs_median': self.quantile(0.5),
          'abs_q25': self.quantile(0.25),
          'abs_q75': self.quantile(0.75),
          'abs_q90': self.quantile(0.90),
          'abs_q99': self.quantile(0.99),
          'abs_q999': self.quantile(0.999),
          'abs_hist_count': self.hist_count,
          'abs_hist_zero_frac': self.hist_zero / self.hist_count,
      })
    abs_vals = [float(v) for v in self.topk_abs]
    signed = [float(v) for v in self.topk_signed]
    out.update({
        'topk_abs': abs_vals,
        'topk_signed': signed,
        'top_k': len(abs_vals),
        'topk_abs_mean': sum(abs_vals) / len(abs_vals),
        'topk_signed_mean': sum(signed) / len(signed),
        'top5_abs': abs_vals[:5],
        'top5_signed': signed[:5],
        'top5_abs_mean': sum(abs_vals[:5]) / min(5, len(abs_vals)),
        'top5_signed_mean': sum(signed[:5]) / min(5, len(signed)),
        'top10_abs': abs_vals[:10],
        'top10_signed': signed[:10],
        'top100_abs': abs_vals[:100],
        'top100_signed': signed[:100],
    })
    return out

  def locations(self) -> dict[str, Any]:
    """Where the extremes sit: {'max': (sample, position, channel), ...}."""
    out = {'max': self.max_at, 'min': self.min_at}
    if self.full:
      out['sun_peak'] = self.sun['sun_peak'][3]
      out['sun_max_ratio'] = self.sun['sun_max_ratio'][3]
      out['topk'] = [tuple(int(v) for v in row) for row in self.topk_at]
    return out

  # -- serialisation (resume, multi-host) --------------------------------------

  def state_dict(self) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

  @classmethod
  def from_state_dict(cls, state: dict[str, Any]) -> 'TapStats':
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def log_hist_quantile(hist: np.ndarray, zero: int, total: int, q: float) -> float:
  """|x| quantile from a `log_histogram` (summed over rows): linear interpolation
  inside the bin, the zero bucket first, as the reference interpolates."""
  target = q * total
  if target <= zero:
    return 0.0
  rest = target - zero
  cum = np.cumsum(hist)
  i = int(np.searchsorted(cum, rest, side='left'))
  i = min(i, HIST_BINS - 1)
  prev = int(cum[i - 1]) if i > 0 else 0
  in_bin = int(cum[i]) - prev
  frac = (rest - prev) / in_bin if in_bin > 0 else 0.5
  width = (HIST_LOG_MAX - HIST_LOG_MIN) / HIST_BINS
  return float(10.0 ** (HIST_LOG_MIN + i * width + frac * width))


TOPK_FIELDS = ('topk_abs', 'topk_signed', 'topk_abs_mean', 'topk_signed_mean', 'top_k', 'top5_abs',
               'top5_signed', 'top5_abs_mean', 'top5_signed_mean', 'top10_abs', 'top10_signed',
               'top100_abs', 'top100_signed')


def global_max(summary: dict[str, dict[str, Any]]) -> tuple[float, str]:
  """The signed activation of largest |x| over activation taps, and where.

  Taps are visited in forward order and only a strictly larger |x| replaces the
  current one, as in the reference; router and gate taps do not count.
  """
  best_abs, best_val, best_loc = 0.0, 0.0, ''
  for name, s in summary.items():
    if not is_activation_tap(name) or 'max' not in s:
      continue
    for key in ('max', 'min'):
      value = s[key]
      if abs(value) > best_abs:
        best_abs, best_val, best_loc = abs(value), value, f'{name} ({key})'
  return best_val, best_loc


# ---------------------------------------------------------------------------
# MoE-aware statistics (beyond the reference): one `<layer>_moe_experts` tap per
# MoE layer, reduced from the block's routing and per-assignment expert outputs.

MOE_SUFFIX = '_moe_experts'


def moe_partial(v: dict[str, jax.Array], valid: jax.Array) -> dict[str, jax.Array]:
  """Reduce one MoE layer's routing for one batch, over valid tokens only.

  Args:
    v: the block's probe: 'index' [B, T, K] int32 chosen experts, 'weight'
      [B, T, K] routing weights, 'probs' [B, T, E] the router's distribution,
      'expert_out' [B, T, K, D] each chosen expert's own (unweighted) output,
      'output' [B, T, D] the block output, optionally 'shared' [B, T, D].
    valid: [B, T] bool.

  Returns per-expert token counts, routing-weight sums and max |output| (with
  the (batch row, position) of the first token reaching it), the block's
  largest |output| with its coordinates and the chosen experts' weighted
  contributions at that element, and router-entropy sums.
  """
  index, probs = v['index'], v['probs'].astype(jnp.float32)
  b, t, k = index.shape
  e = probs.shape[-1]
  flat_valid = jnp.broadcast_to(valid[:, :, None], index.shape).reshape(-1)
  segment = jnp.where(flat_valid, index.reshape(-1), e)  # padding -> a dropped segment
  out: dict[str, jax.Array] = {
      'expert_count': jax.ops.segment_sum(jnp.ones_like(segment), segment, e + 1)[:e].astype(jnp.int32),
      'expert_weight_sum': jax.ops.segment_sum(v['weight'].astype(jnp.float32).reshape(-1), segment, e + 1)[:e],
  }
  amax = jnp.abs(v['expert_out'].astype(jnp.float32)).max(axis=-1).reshape(-1)  # [M]
  amax = jnp.where(flat_valid & ~jnp.isnan(amax), amax, -jnp.inf)
  emax = jax.ops.segment_max(amax, segment, e + 1)  # [E + 1], -inf where unused
  token = jnp.arange(b * t * k, dtype=jnp.int32) // k
  first = jax.ops.segment_min(jnp.where(amax == emax[segment], token, b * t), segment, e + 1)[:e]
  out['expert_max'] = emax[:e]
  out['expert_max_at'] = jnp.stack([first // t, first % t], axis=-1).astype(jnp.int32)

  # The block's largest |output| (first in row-major order) and who made it.
  y = v['output'].astype(jnp.float32)
  score = jnp.where(valid[:, :, None] & ~jnp.isnan(y), jnp.abs(y), -1.0)
  flat = jnp.argmax(score.reshape(-1))
  d = y.shape[-1]
  bi, ti, ci = flat // (t * d), (flat // d) % t, flat % d
  out['peak_value'] = y[bi, ti, ci]
  out['peak_at'] = jnp.stack([bi, ti, ci]).astype(jnp.int32)
  out['peak_experts'] = index[bi, ti]
  out['peak_contrib'] = v['weight'][bi, ti].astype(jnp.float32) * v['expert_out'][bi, ti, :, ci].astype(jnp.float32)
  out['peak_shared'] = v['shared'][bi, ti, ci].astype(jnp.float32) if 'shared' in v else jnp.zeros((), jnp.float32)

  # Router entropy (nats) of each valid token's distribution over all experts.
  ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
  out['entropy_sum'] = jnp.where(valid, ent, 0.0).sum(axis=1)
  out['entropy_sum_sq'] = jnp.where(valid, ent * ent, 0.0).sum(axis=1)
  out['entropy_max'] = jnp.where(valid, ent, -jnp.inf).max()
  out['entropy_min'] = jnp.where(valid, ent, jnp.inf).min()
  out['tokens'] = valid.sum(axis=1, dtype=jnp.int32)
  return out


def moe_combine_across(partial: dict[str, jax.Array], axis_name: str, top_k: int = TOP_K) -> dict[str, jax.Array]:
  """`moe_partial` of one device's rows -> that of the whole batch (pmap layout),
  with the same tie rules as `combine_across`: the first device in row order wins."""
  del top_k
  rows = partial['tokens'].shape[0]
  offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * rows
  gather = lambda a: jax.lax.all_gather(a, axis_name)  # [devices, ...]
  shift = lambda at: at.at[..., 0].add(offset)
  out = {k: jax.lax.psum(partial[k], axis_name) for k in ('expert_count', 'expert_weight_sum')}
  out.update({k: jax.lax.all_gather(partial[k], axis_name, tiled=True)
              for k in ('entropy_sum', 'entropy_sum_sq', 'tokens')})
  out['entropy_max'] = jax.lax.pmax(partial['entropy_max'], axis_name)
  out['entropy_min'] = jax.lax.pmin(partial['entropy_min'], axis_name)
  # Per expert: the device holding the largest |output| (first device on ties).
  emax = gather(partial['expert_max'])  # [devices, E]
  best = jnp.argmax(emax, axis=0)  # [E]
  experts = jnp.arange(emax.shape[1])
  out['expert_max'] = emax[best, experts]
  out['expert_max_at'] = gather(shift(partial['expert_max_at']))[best, experts]
  # The block's largest |output| and who made it.
  dev = jnp.argmax(gather(jnp.abs(partial['peak_value'])))
  for k in ('peak_value', 'peak_experts', 'peak_contrib', 'peak_shared'):
    out[k] = gather(partial[k])[dev]
  out['peak_at'] = gather(shift(partial['peak_at']))[dev]
  return out


class MoEStats:
  """Running MoE statistics of one layer: associative merge like `TapStats`."""

  def __init__(self, num_experts: int, top_k: int):
    self.num_experts, self.top_k = num_experts, top_k
    self.tokens = 0
    self.expert_count = np.zeros(num_experts, np.int64)
    self.expert_weight_sum = np.zeros(num_experts, np.float64)
    self.expert_max = np.full(num_experts, -np.inf)
    self.expert_max_at = np.tile(np.array([NO_SAMPLE, 0], np.int64), (num_experts, 1))
    # The block's largest |output|: (signed value, (sample, position, channel), experts, contributions, shared).
    self.peak = (0.0, (NO_SAMPLE, 0, 0), [], [], 0.0)
    self.entropy_sum = self.entropy_sum_sq = 0.0
    self.entropy_max, self.entropy_min = -math.inf, math.inf

  @classmethod
  def for_partial(cls, p: dict[str, np.ndarray]) -> 'MoEStats':
    return cls(int(p['expert_count'].shape[0]), int(p['peak_experts'].shape[0]))

  def update(self, p: dict[str, np.ndarray], sample_ids: np.ndarray, n_tokens: int | None = None) -> None:
    del n_tokens
    tokens = int(p['tokens'].sum())
    if tokens == 0:
      return
    self.tokens += tokens
    self.expert_count += p['expert_count'].astype(np.int64)
    self.expert_weight_sum += p['expert_weight_sum'].astype(np.float64)
    at = p['expert_max_at'].astype(np.int64)
    used = p['expert_count'] > 0
    at[:, 0] = np.where(used, sample_ids[np.minimum(at[:, 0], len(sample_ids) - 1)], NO_SAMPLE)
    self._take_expert_max(p['expert_max'].astype(np.float64), at)
    bi, ti, ci = (int(v) for v in p['peak_at'])
    self._take_peak((float(p['peak_value']), (int(sample_ids[bi]), ti, ci), [int(e) for e in p['peak_experts']],
                     [float(c) for c in p['peak_contrib']], float(p['peak_shared'])))
    self.entropy_sum += float(p['entropy_sum'].astype(np.float64).sum())
    self.entropy_sum_sq += float(p['entropy_sum_sq'].astype(np.float64).sum())
    self.entropy_max = max(self.entropy_max, float(p['entropy_max']))
    self.entropy_min = min(self.entropy_min, float(p['entropy_min']))

  def _take_expert_max(self, values: np.ndarray, at: np.ndarray) -> None:
    for j in range(self.num_experts):
      cand, cur = (values[j], tuple(at[j])), (self.expert_max[j], tuple(self.expert_max_at[j]))
      if cand[0] > cur[0] or (cand[0] == cur[0] and cand[1] < cur[1]):
        self.expert_max[j], self.expert_max_at[j] = cand[0], at[j]

  def _take_peak(self, cand) -> None:
    cur = self.peak
    if abs(cand[0]) > abs(cur[0]) or (abs(cand[0]) == abs(cur[0]) and cand[1] < cur[1]):
      self.peak = cand

  def merge(self, other: 'MoEStats') -> 'MoEStats':
    self.tokens += other.tokens
    self.expert_count += other.expert_count
    self.expert_weight_sum += other.expert_weight_sum
    self._take_expert_max(other.expert_max, other.expert_max_at)
    self._take_peak(other.peak)
    self.entropy_sum += other.entropy_sum
    self.entropy_sum_sq += other.entropy_sum_sq
    self.entropy_max = max(self.entropy_max, other.entropy_max)
    self.entropy_min = min(self.entropy_min, other.entropy_min)
    return self

  def dominant(self) -> tuple[int | str | None, float]:
    """The expert (or 'shared') whose weighted contribution to the peak element is largest."""
    value, _, experts, contrib, shared = self.peak
    if not experts:
      return None, 0.0
    candidates = list(zip(experts, contrib)) + ([('shared', shared)] if shared != 0.0 else [])
    who, c = max(candidates, key=lambda ec: abs(ec[1]))
    return who, c

  def finalize(self, describe=None) -> dict[str, Any]:
    """JSON-ready per-layer MoE statistics; `describe` turns (sample, position, channel) into fields."""
    n = self.tokens
    if n == 0:
      return {}
    describe = describe or (lambda at: {'sample': at[0], 'position': at[1], 'channel': at[2]})
    counts = self.expert_count
    mean_r = self.entropy_sum / n
    value, at, experts, contrib, shared = self.peak
    who, c = self.dominant()
    return {
        'num_experts': self.num_experts,
        'top_k': self.top_k,
        'tokens': n,
        'expert_tokens': [int(x) for x in counts],
        'expert_load_fraction': [float(x) / (n * self.top_k) for x in counts],
        'expert_mean_weight': [float(w / x) if x else 0.0 for w, x in zip(self.expert_weight_sum, counts)],
        'expert_max_abs_output': [float(x) if np.isfinite(x) else None for x in self.expert_max],
        'expert_max_at': [None if at_[0] == NO_SAMPLE else
                          {k: v for k, v in describe((int(at_[0]), int(at_[1]), 0)).items() if k != 'channel'}
                          for at_ in self.expert_max_at],
        'unused_experts': int((counts == 0).sum()),
        'load_max_over_mean': float(counts.max() / counts.mean()) if counts.mean() > 0 else 0.0,
        'block_max': {
            'value': value, **describe(at), 'experts': experts, 'contributions': contrib,
            'shared_contribution': shared, 'dominant_expert': who, 'dominant_contribution': c,
        },
        'router_entropy_mean': mean_r,
        'router_entropy_std': max(0.0, self.entropy_sum_sq / n - mean_r**2) ** 0.5,
        'router_entropy_max': self.entropy_max,
        'router_entropy_min': self.entropy_min,
        'router_entropy_uniform': math.log(self.num_experts),
    }

  def state_dict(self) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

  @classmethod
  def from_state_dict(cls, state: dict[str, Any]) -> 'MoEStats':
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def new_state(partial: dict[str, Any], top_k: int = TOP_K):
  """The running state that fits a tap's partial: MoEStats for MoE taps, else TapStats."""
  if 'expert_count' in partial:
    return MoEStats.for_partial(partial)
  return TapStats(full='hist' in partial, top_k=top_k)
