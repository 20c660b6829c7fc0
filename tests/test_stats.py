"""Statistics against values computed by hand with numpy (odd/even widths, padding, zeros)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxact_jax import stats


_partial = jax.jit(stats.tap_partial, static_argnames=('full', 'top_k'))


def partial(x, valid, full=True, top_k=5):
  out = _partial(jnp.asarray(x, jnp.float32), jnp.asarray(valid), full=full, top_k=top_k)
  return {k: np.asarray(v) for k, v in out.items()}


def run(x, valid, sample_ids=None, full=True, top_k=5):
  x, valid = np.asarray(x, np.float32), np.asarray(valid, bool)
  t = stats.TapStats(full=full, top_k=top_k)
  ids = np.arange(x.shape[0]) if sample_ids is None else np.asarray(sample_ids)
  t.update(partial(x, valid, full, top_k), ids, int(valid.sum()))
  return t


# A [2, 3, 4] tap (even width) with the last position of sample 1 padded.
X = np.array([
    [[1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0], [4.0, 1.0, -1.0, 2.0]],
    [[-8.0, 0.25, 0.5, 1.0], [2.0, 2.0, -2.0, 2.0], [99.0, -99.0, 99.0, 99.0]],
])
VALID = np.array([[True, True, True], [True, True, False]])


def test_basic_moments_exclude_padding():
  t = run(X, VALID)
  v = X[VALID].reshape(-1)
  out = t.finalize()
  assert out['count'] == 20
  assert out['mean'] == pytest.approx(v.mean(), rel=1e-12)
  assert out['abs_mean'] == pytest.approx(np.abs(v).mean(), rel=1e-12)
  assert out['rms'] == pytest.approx(np.sqrt((v**2).mean()), rel=1e-12)
  assert out['std'] == pytest.approx(v.std(), rel=1e-9)
  assert out['max'] == 4.0 and out['min'] == -8.0
  assert t.max_at == (0, 2, 0) and t.min_at == (1, 0, 0)


def test_sun_ratio_uses_lower_median_for_even_width():
  out = run(X, VALID).finalize()
  # Token medians of |x| (lower middle of 4): [0.5,1,2,3]->1; [0,0,0,0]->0; [1,1,2,4]->1;
  # [0.25,0.5,1,8]->0.5; [2,2,2,2]->2. Token maxima: 3, 0, 4, 8, 2.
  ratios = [3 / 1, 0.0, 4 / 1, 8 / 0.5, 2 / 2]
  assert out['sun_peak_abs'] == 8.0 and out['sun_peak_token_median'] == 0.5
  assert out['sun_peak_token_ratio'] == 16.0
  assert out['sun_max_ratio'] == 16.0 and out['sun_max_ratio_abs'] == 8.0
  assert out['sun_n_tokens'] == 5
  assert out['sun_mean_ratio'] == pytest.approx(np.mean(ratios))
  assert out['sun_std_ratio'] == pytest.approx(np.std(ratios))
  assert out['sun_n_pass'] == 0


def test_lower_median_odd_and_even():
  a = jnp.array([[5.0, 1.0, 3.0], [4.0, 1.0, 3.0]])
  np.testing.assert_array_equal(stats.lower_median(a), [3.0, 3.0])
  b = jnp.array([[5.0, 1.0, 3.0, 2.0]])
  np.testing.assert_array_equal(stats.lower_median(b), [2.0])  # torch.median: lower middle


def test_odd_width_median_and_massive_token():
  x = np.full((1, 2, 5), 0.01, np.float32)
  x[0, 1, 3] = 150.0  # a massive activation: max 150, median 0.01, ratio 15000 > 1000
  out = run(x, np.ones((1, 2), bool)).finalize()
  assert out['sun_n_pass'] == 1
  assert out['sun_peak_abs'] == 150.0
  assert out['sun_peak_token_median'] == pytest.approx(0.01)
  assert out['sun_max_ratio'] == pytest.approx(15000.0, rel=1e-6)


def test_all_zero_rows_give_zero_ratio_not_nan():
  x = np.zeros((1, 3, 4), np.float32)
  out = run(x, np.ones((1, 3), bool)).finalize()
  assert out['sun_max_ratio'] == 0.0 and out['sun_mean_ratio'] == 0.0
  assert out['abs_hist_zero_frac'] == 1.0
  assert out['abs_median'] == 0.0 and out['abs_q999'] == 0.0
  assert out['max'] == 0.0 and out['min'] == 0.0 and out['std'] == 0.0


def test_histogram_bins_and_quantiles():
  values = np.array([1e-3, 1.0, 1.0, 10.0, 0.0, 100.0], np.float32)
  x = values.reshape(1, 1, -1)
  t = run(x, np.ones((1, 1), bool))
  # bin = floor((log10|x| + 8) / 16 * 512) = floor(32 * (log10|x| + 8))
  expect = np.zeros(stats.HIST_BINS, np.int64)
  for v in (1e-3, 1.0, 1.0, 10.0, 100.0):
    expect[int(math.floor(32 * (math.log10(v) + 8)))] += 1
  np.testing.assert_array_equal(t.hist, expect)
  assert t.hist_zero == 1 and t.hist_count == 6
  # Median: target 3 of 6; 1 zero below, so the 2nd non-zero: the first of the two
  # 1.0s in bin 256 (cum before = 1, bin count 2): frac 0.5 -> 10 ** (0 + 0.5 / 32).
  assert t.quantile(0.5) == pytest.approx(10 ** (0.5 / 32))
  assert t.quantile(0.1) == 0.0  # inside the zero bucket


def test_top_k_ignores_padding_and_keeps_signs():
  t = run(X, VALID, top_k=5)
  out = t.finalize()
  assert out['topk_abs'] == [8.0, 4.0, 3.0, 2.0, 2.0]
  assert out['topk_signed'][:3] == [-8.0, 4.0, 3.0]
  assert 99.0 not in out['topk_abs']
  assert [tuple(r) for r in t.topk_at[:3]] == [(1, 0, 0), (0, 2, 0), (0, 0, 2)]


def test_top_k_starts_from_zeros_like_the_reference():
  x = np.array([[[3.0, -1.0]]], np.float32)
  out = run(x, np.ones((1, 1), bool), top_k=5).finalize()
  assert out['topk_abs'] == [3.0, 1.0, 0.0, 0.0, 0.0]
  assert out['topk_signed'] == [3.0, -1.0, 0.0, 0.0, 0.0]


def test_merge_is_associative_and_order_free():
  rng = np.random.RandomState(0)
  x = rng.standard_normal((6, 7, 9)).astype(np.float32) * rng.choice([1, 50], (6, 7, 1))
  valid = rng.rand(6, 7) > 0.3
  whole = run(x, valid, top_k=10)
  parts = []
  for rows in ([0, 1], [2, 3, 4], [5]):
    parts.append(run(x[rows], valid[rows], sample_ids=rows, top_k=10))
  a = stats.TapStats(True, 10).merge(parts[0]).merge(parts[1]).merge(parts[2])
  b = stats.TapStats(True, 10).merge(parts[2]).merge(parts[0]).merge(parts[1])
  for merged in (a, b):
    fa, fw = merged.finalize(), whole.finalize()
    for key, want in fw.items():
      if isinstance(want, float):
        assert fa[key] == pytest.approx(want, rel=1e-6), key
      else:
        assert fa[key] == want, key
    assert merged.max_at == whole.max_at and merged.min_at == whole.min_at
    np.testing.assert_array_equal(merged.topk_at, whole.topk_at)
    np.testing.assert_array_equal(merged.hist, whole.hist)


def test_ties_go_to_the_earliest_location_whatever_the_batching():
  x3 = np.array([[[5.0, 1.0]]], np.float32)  # sample 3: tie at channel 0
  x7 = np.array([[[5.0, 5.0]]], np.float32)  # sample 7: ties at channels 0 and 1
  together = run(np.concatenate([x3, x7]), np.ones((2, 1), bool), sample_ids=[3, 7])
  late_first = run(x7, np.ones((1, 1), bool), sample_ids=[7]).merge(run(x3, np.ones((1, 1), bool), sample_ids=[3]))
  for t in (together, late_first):
    assert t.max == 5.0 and t.max_at == (3, 0, 0)


def test_nan_and_inf_are_counted_never_hidden():
  x = np.array([[[1.0, np.nan, 2.0, np.inf], [-np.inf, 0.5, 0.5, 0.5]]], np.float32)
  t = run(x, np.ones((1, 2), bool))
  out = t.finalize()
  assert (t.nan, t.posinf, t.neginf) == (1, 1, 1)
  assert out['max'] == math.inf and out['min'] == -math.inf  # overflow is the extreme
  assert out['count'] == 8  # every valid element, as the reference counts
  assert out['mean'] == pytest.approx((1 + 2 + 0.5 * 3) / 5)  # moments over the 5 finite ones
  assert t.hist_count == 5  # finite, valid elements


def test_basic_taps_have_only_the_seven_fields():
  t = run(X, VALID, full=False)
  assert list(t.finalize()) == ['mean', 'std', 'abs_mean', 'rms', 'max', 'min', 'count']


def test_global_max_is_strict_and_skips_router_taps():
  summary = {
      'embedding_output': {'max': 1.0, 'min': -1.0},
      'layer_0_router_logits': {'max': 500.0, 'min': -3.0},
      'layer_0_hidden': {'max': 10.0, 'min': -12.0},
      'layer_1_hidden': {'max': 12.0, 'min': -2.0},  # ties layer 0's min: the earlier one stays
  }
  assert stats.global_max(summary) == (-12.0, 'layer_0_hidden (min)')


def test_lower_median_of_a_tap_searched_in_cached_slices():
  # Over stats.MEDIAN_SLICE elements, and rows that do not fill the last slice.
  r = np.random.RandomState(0)
  a = np.abs(r.standard_cauchy((3, 701, 512))).astype(np.float32)
  a[0, 0, :300] = 0.0  # a median of zero
  a[1, 5] = 7.0  # every channel the same
  assert a.size > stats.MEDIAN_SLICE and (a.size // 512) % (stats.MEDIAN_SLICE // 512)
  got = np.asarray(jax.jit(stats.lower_median)(a))
  np.testing.assert_array_equal(got, np.sort(a, axis=-1)[..., (512 - 1) // 2])


def test_a_non_finite_token_changes_nothing_about_the_other_rows():
  # One NaN sends the tap down the element-masked path; the clean row's partial is
  # what the unmasked path gives, and a NaN in padding sends it nowhere.
  r = np.random.RandomState(1)
  x = r.randn(2, 6, 8).astype(np.float32)
  valid = np.ones((2, 6), bool)
  valid[1, 4:] = False
  clean = partial(x, valid, True, 5)
  bad = x.copy()
  bad[1, 2, 3] = np.nan
  masked = partial(bad, valid, True, 5)
  for key in ('sum', 'sum_sq', 'abs_sum', 'hist', 'hist_zero', 'hist_count', 'sun_sum_ratio'):
    np.testing.assert_allclose(masked[key][0], clean[key][0], rtol=1e-6, err_msg=key)
  assert masked['nan'].tolist() == [0, 1] and masked['hist_count'][1] == clean['hist_count'][1] - 1
  padded = x.copy()
  padded[1, 5, 0] = np.nan
  assert all(np.array_equal(v, clean[k]) for k, v in partial(padded, valid, True, 5).items())
