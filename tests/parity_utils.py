"""Helpers shared by the parity tests of every family.

`measure_and_reference` runs `maxact-jax measure` (the library call) and the
reference pipeline's statistics in PyTorch (`torch_reference`) on the same
checkpoint and corpus; `assert_stats_match` checks every tap and every
statistic at the contract's tolerances.
"""

from __future__ import annotations

import math

import numpy as np

from maxact_jax import crosscheck, data, measure, stats, torch_reference
from maxact_jax.families import load_config

HIST_BIN = (stats.HIST_LOG_MAX - stats.HIST_LOG_MIN) / stats.HIST_BINS
QUANTILES = ('abs_median', 'abs_q25', 'abs_q75', 'abs_q90', 'abs_q99', 'abs_q999')
SCALE_FIELDS = ('mean', 'std', 'abs_mean', 'rms')
RATIO_FIELDS = ('sun_peak_abs', 'sun_peak_token_median', 'sun_peak_token_ratio', 'sun_max_ratio',
                'sun_max_ratio_abs', 'sun_max_ratio_median', 'sun_mean_ratio', 'sun_std_ratio')
EXACT_FIELDS = ('count', 'sun_n_tokens', 'sun_n_pass', 'abs_hist_count', 'sun_t_val', 'sun_t_ratio')


def measure_and_reference(model_dir: str, data_path: str, output_dir: str, batch_size: int = 4,
                          max_seq_len: int | None = None, hf_model=None, max_shapes: int | None = None):
  """(activation doc, top-K doc, reference summary) for one checkpoint and corpus.

  max_shapes: bound the batch shapes (compilations) of our side; padding is masked.
  """
  extra = {} if max_shapes is None else {'max_shapes': max_shapes}
  m = measure.measure(measure.MeasureOptions(
      model_path=model_dir, output_dir=output_dir, data_path=data_path, batch_size=batch_size,
      max_seq_len=max_seq_len, dtype='float32', progress=False, **extra))
  config = load_config(model_dir)
  corpus = data.load_corpus(data_path, vocab_size=config.vocab_size, max_seq_len=max_seq_len,
                            model_dir=model_dir)
  model = hf_model or torch_reference.load_hf_model(model_dir, 'float32')
  ref = torch_reference.run_reference(model, [s.tolist() for s in corpus.samples], batch_size,
                                      pad_id=config.pad_token_id or 0)
  return m.doc, m.top_doc, ref


def _close(a: float, b: float, scale: float, rel: float) -> bool:
  return abs(a - b) <= rel * max(abs(scale), 1e-30) or a == b


def assert_stats_match(doc: dict, top_doc: dict, ref: dict, rel: float = 1e-3,
                       taps: list[str] | None = None) -> int:
  """Every statistic of every tap of `ref` agrees with ours; returns fields checked."""
  per, top = doc['per_layer_stats'], top_doc['per_layer_stats']
  names = taps or list(ref)
  missing = [n for n in names if n not in per]
  assert not missing, f'taps missing from our results: {missing}'
  checked = 0
  for name in names:
    r, o = ref[name], {**per[name], **top.get(name, {})}
    scale = r.get('rms', 1.0)
    extent = max(abs(r['max']), abs(r['min']))
    for field, want in r.items():
      got = o.get(field)
      assert got is not None, f'{name}.{field} missing'
      where = f'{name}.{field}: ours {got!r} vs reference {want!r}'
      if field in EXACT_FIELDS:
        assert got == want, where
      elif field in SCALE_FIELDS:
        assert _close(got, want, scale, rel), where
      elif field in ('max', 'min'):
        assert _close(got, want, extent, rel), where
      elif field in QUANTILES:
        if want == 0 or got == 0:
          assert got == want, where
        else:
          assert abs(math.log10(got) - math.log10(want)) <= HIST_BIN + 1e-9, where
      elif field == 'abs_hist_zero_frac':
        assert abs(got - want) <= 1e-9, where
      elif field in RATIO_FIELDS:
        assert _close(got, want, want, rel), where
      elif field in ('topk_abs', 'topk_signed'):
        np.testing.assert_allclose(np.abs(got) if field == 'topk_signed' else got,
                                   np.abs(want) if field == 'topk_signed' else want,
                                   rtol=0, atol=rel * max(abs(want[0]), 1e-30), err_msg=where)
      elif field in ('topk_abs_mean',):
        assert _close(got, want, want, rel), where
      elif field in ('topk_signed_mean', 'top_k'):
        continue  # sign order among |x| ties is arbitrary; top_k is the list length
      else:
        raise AssertionError(f'unexpected reference field {name}.{field}')
      checked += 1
  return checked


def assert_same_global_max(doc: dict, ref: dict) -> None:
  value, location = stats.global_max(ref)
  assert doc['global_max_location'] == location, (doc['global_max_location'], location)
  assert _close(doc['global_max_activation'], value, value, 1e-3)


def assert_measure_matches_reference(model_dir: str, corpus: str, output_dir: str,
                                     batch_size: int = 6) -> None:
  """measure == the reference pipeline at every tap and statistic, same global maximum.

  With the 12-sample `ids_corpus`, batches of 6 make two batches (the second up to
  40 tokens): the merge across batches is exercised with one compilation fewer
  than batches of 4.
  """
  doc, top_doc, ref = measure_and_reference(model_dir, corpus, output_dir, batch_size=batch_size)
  checked = assert_stats_match(doc, top_doc, ref)
  assert_same_global_max(doc, ref)
  n_layers = load_config(model_dir).num_hidden_layers
  assert len(ref) == 2 + 4 * n_layers  # embedding, 4 taps per layer, final norm
  assert list(doc['per_layer_stats']) == list(ref)  # same taps in the same (forward) order
  # 30 statistics per activation tap (basic, Sun, quantiles, top-K), 7 per mlp_gate tap.
  assert checked == 30 * (len(ref) - n_layers) + 7 * n_layers


def assert_crosscheck_passed(report: dict, max_rel_err: float | None = 1e-5) -> None:
  """A float32 crosscheck report: passed, every tap compared, each within `max_rel_err`
  (None: the caller checks the errors its own way), the logits agreeing."""
  assert report['passed'], crosscheck.format_report(report)
  assert report['missing_taps'] == []
  if max_rel_err is not None:
    assert max(r['rel_err'] for r in report['taps'].values()) < max_rel_err
  assert report['logits']['top1_agreement'] == 1.0
  assert report['logits']['kl'] < 1e-9
