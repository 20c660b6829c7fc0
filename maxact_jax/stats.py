"""Per-tap statistics: on-device reduction to mergeable state, float64 host merge.

The contract (shared/DESIGN.md) follows the reference pipeline exactly:

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
extreme and top-K entry, and NaN/Inf counts. NaNs never enter a maximum or a
sum; +-inf (a bf16 overflow, say) does enter the maximum and is counted.

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


def tap_partial(x: jax.Array, valid: jax.Array, *, full: bool, top_k: int = TOP_K) -> dict[str, jax.Array]:
  """Reduce one tap's output for one batch to mergeable statistics.

  Args:
    x: [B, T, ...] activations, any float dtype (reduced in float32).
    valid: [B, T] bool, False on padding.
    full: also compute the Sun ratios, histogram and top-K (activation taps).

  Returns arrays whose leading axis is B for additive quantities (summed on the
  host in float64) and small fixed-size arrays for extremes, with coordinates
  (batch row, position, flat channel) as int32.
  """
  b, t = x.shape[:2]
  x = x.astype(jnp.float32).reshape(b, t, -1)
  f = x.shape[-1]
  v = valid[:, :, None]
  isnan = jnp.isnan(x)
  finite = jnp.isfinite(x)
  xz = jnp.where(v & finite, x, 0.0)
  out = {
      'count': (valid.sum(axis=1) * f).astype(jnp.int32),
      'sum': xz.sum(axis=(1, 2)),
      'sum_sq': (xz * xz).sum(axis=(1, 2)),
      'abs_sum': jnp.abs(xz).sum(axis=(1, 2)),
      'nan': (v & isnan).sum(axis=(1, 2), dtype=jnp.int32),
      'posinf': (v & (x == jnp.inf)).sum(axis=(1, 2), dtype=jnp.int32),
      'neginf': (v & (x == -jnp.inf)).sum(axis=(1, 2), dtype=jnp.int32),
  }
  usable = v & ~isnan
  for name, sign in (('max', 1.0), ('min', -1.0)):
    s = jnp.where(usable, x * sign, -jnp.inf)  # min is the max of -x
    tok = s.max(axis=-1)
    tok_ch = jnp.argmax(s, axis=-1)
    flat = _first_argmax(tok)
    bi, ti = flat // t, flat % t
    out[name] = tok[bi, ti] * sign
    out[f'{name}_at'] = jnp.stack([bi, ti, tok_ch[bi, ti]]).astype(jnp.int32)
  if full:
    out.update(_activation_partial(x, valid, finite, top_k))
  return out


def lower_median(a: jax.Array) -> jax.Array:
  """The lower of the two middle values along the last axis (torch.median)."""
  return jnp.sort(a, axis=-1)[..., (a.shape[-1] - 1) // 2]


def _activation_partial(x, valid, finite, top_k):
  b, t, f = x.shape
  a = jnp.abs(jnp.where(jnp.isnan(x), 0.0, x))
  tok_max = a.max(axis=-1)
  tok_med = lower_median(a)
  ratio = tok_max / jnp.maximum(tok_med, TINY)
  out = {}
  for name, key in (('sun_peak', tok_max), ('sun_max_ratio', ratio)):
    flat = _first_argmax(jnp.where(valid, key, -jnp.inf))
    bi, ti = flat // t, flat % t
    out[f'{name}_abs'] = tok_max[bi, ti]
    out[f'{name}_median'] = tok_med[bi, ti]
    out[f'{name}_ratio'] = ratio[bi, ti]
    out[f'{name}_at'] = jnp.stack([bi, ti]).astype(jnp.int32)
  out['sun_n_pass'] = (valid & (tok_max > SUN_T_VAL) & (ratio > SUN_T_RATIO)).sum(axis=1, dtype=jnp.int32)
  r = jnp.where(valid, ratio, 0.0)
  out['sun_sum_ratio'] = r.sum(axis=1)
  out['sun_sum_ratio_sq'] = (r * r).sum(axis=1)

  # Log-histogram of |x| over valid, finite elements. The bin arithmetic is the
  # reference's in float32: floor((log10|x| - LOG_MIN) / span * BINS).
  v = valid[:, :, None] & finite
  nonzero = v & (a > 0)
  logs = jnp.log10(jnp.where(nonzero, a, 1.0))
  span = HIST_LOG_MAX - HIST_LOG_MIN
  idx = jnp.clip(jnp.floor((logs - HIST_LOG_MIN) / span * HIST_BINS), 0, HIST_BINS - 1).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None, None], idx.shape)
  flat_bin = jnp.where(nonzero, rows * HIST_BINS + idx, b * HIST_BINS)  # dropped: out of range
  hist = jnp.zeros((b * HIST_BINS,), jnp.int32).at[flat_bin.reshape(-1)].add(1, mode='drop')
  out['hist'] = hist.reshape(b, HIST_BINS)
  out['hist_zero'] = (v & (a <= 0)).sum(axis=(1, 2), dtype=jnp.int32)
  out['hist_count'] = v.sum(axis=(1, 2), dtype=jnp.int32)

  # Top-K |x| with the signed value; padding scores -1 so it never wins.
  k = min(top_k, b * t * f)
  scores = jnp.where(valid[:, :, None], jnp.where(jnp.isnan(x), -1.0, a), -1.0).reshape(-1)
  vals, flat = jax.lax.top_k(scores, k)
  out['topk_abs'] = vals
  out['topk_signed'] = x.reshape(-1)[flat]
  out['topk_at'] = jnp.stack([flat // (t * f), (flat // f) % t, flat % f], axis=-1).astype(jnp.int32)
  return out


# Partial fields with a leading batch-row axis, summed on the host.
ADDITIVE_FIELDS = ('count', 'sum', 'sum_sq', 'abs_sum', 'nan', 'posinf', 'neginf', 'sun_n_pass',
                   'sun_sum_ratio', 'sun_sum_ratio_sq', 'hist', 'hist_zero', 'hist_count')


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
  for name, sign in (('max', 1.0), ('min', -1.0)):
    out[name], out[f'{name}_at'] = first_best(partial[name] * sign, partial[name], shift(partial[f'{name}_at']))
  for name, key in (('sun_peak', 'abs'), ('sun_max_ratio', 'ratio')):
    if f'{name}_at' not in partial:
      continue
    fields = [f'{name}_abs', f'{name}_median', f'{name}_ratio']
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
    if not self.full:
      return
    self.n_tokens += int(n_tokens)
    for name in ('sun_peak', 'sun_max_ratio'):
      at = p[f'{name}_at']
      cand = (float(p[f'{name}_abs']), float(p[f'{name}_median']), float(p[f'{name}_ratio']),
              (int(sample_ids[at[0]]), int(at[1])))
      self._take_sun(name, cand)
    self.sun_n_pass += int(p['sun_n_pass'].sum())
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

  def _take_sun(self, name: str, cand) -> None:
    cur = self.sun[name]
    key = 0 if name == 'sun_peak' else 2  # peak: by |x|; max_ratio: by ratio
    if cand[key] > cur[key] or (cand[key] == cur[key] and cand[3] < cur[3]):
      self.sun[name] = cand

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
    if self.full:
      self.n_tokens += other.n_tokens
      for name in self.sun:
        self._take_sun(name, other.sun[name])
      for name in ('sun_n_pass', 'sun_sum_ratio', 'sun_sum_ratio_sq', 'hist', 'hist_zero', 'hist_count'):
        setattr(self, name, getattr(self, name) + getattr(other, name))
      self._take_topk(other.topk_abs, other.topk_signed, other.topk_at)
    return self

  # -- results ---------------------------------------------------------------

  def quantile(self, q: float) -> float:
    """|x| quantile from the log histogram: the reference's interpolation exactly."""
    total = self.hist_count
    target = q * total
    if target <= self.hist_zero:
      return 0.0
    rest = target - self.hist_zero
    cum = np.cumsum(self.hist)
    i = int(np.searchsorted(cum, rest, side='left'))
    i = min(i, HIST_BINS - 1)
    prev = int(cum[i - 1]) if i > 0 else 0
    in_bin = int(cum[i]) - prev
    frac = (rest - prev) / in_bin if in_bin > 0 else 0.5
    width = (HIST_LOG_MAX - HIST_LOG_MIN) / HIST_BINS
    return float(10.0 ** (HIST_LOG_MIN + i * width + frac * width))

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
