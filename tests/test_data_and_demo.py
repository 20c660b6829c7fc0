"""Batching, masks, text corpora, and the demo finding its planted outlier."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from maxact_jax import data, fixtures, measure


def test_batches_have_fixed_rows_masks_and_ascending_samples():
  lengths = np.array([5, 17, 9, 33, 12, 3, 21, 8, 40, 16, 11])
  plan = data.plan_batches(lengths, batch_size=4, max_shapes=2)
  assert len(plan.shapes) <= 2
  corpus = data.Corpus([np.arange(n, dtype=np.int32) + 1 for n in lengths], [None] * len(lengths), 'x')
  seen = []
  for batch in data.iter_batches(corpus, plan, pad_id=0):
    assert batch.input_ids.shape[0] == 4
    for row, s in enumerate(batch.sample_ids):
      if s < 0:
        assert not batch.valid[row].any()
        continue
      n = lengths[s]
      assert batch.valid[row, :n].all() and not batch.valid[row, n:].any()
      np.testing.assert_array_equal(batch.input_ids[row, :n], corpus.samples[s])
      seen.append(int(s))
    real = [s for s in batch.sample_ids if s >= 0]
    assert real == sorted(real)
  assert sorted(seen) == list(range(len(lengths)))


def test_bucketing_is_optimal_for_its_shape_budget():
  import itertools
  rng = np.random.RandomState(0)
  lengths = rng.randint(1, 200, 22)
  plan = data.plan_batches(lengths, batch_size=3, max_shapes=3, shape_cost_tokens=0)
  natural = [int(lengths[g].max()) for g in plan.groups]  # non-increasing
  best = min(  # brute force over every choice of 3 padded lengths among the batches' own
      sum(min(c for c in combo if c >= n) for n in natural)
      for combo in itertools.combinations(sorted(set(natural)), 3) if max(combo) == max(natural))
  assert sum(plan.lengths) == best
  ratios = [data.plan_batches(lengths, 3, s, shape_cost_tokens=0).padding_ratio(lengths) for s in (1, 2, 4, 8)]
  assert ratios == sorted(ratios, reverse=True) and ratios[-1] < ratios[0]


def test_a_shape_is_added_only_when_it_saves_more_than_it_costs():
  # Two batches of 2 rows: natural lengths 100 and 60. One shape pads the second
  # batch to 100: 2 * 40 = 80 more tokens than two shapes.
  lengths = np.array([100, 100, 60, 60])
  for cost, shapes in ((0, 2), (79, 2), (80, 1), (1000, 1)):  # a tie keeps the fewer shapes
    plan = data.plan_batches(lengths, batch_size=2, max_shapes=8, shape_cost_tokens=cost)
    assert len(plan.shapes) == shapes, cost


def test_text_corpus_is_tokenized_with_the_checkpoint_tokenizer(tokenizer_dir, tmp_path):
  path = tmp_path / 'text.jsonl'
  path.write_text('\n'.join(json.dumps({'text': t, 'category': c}) for t, c in
                            [('def f(x):\n  return x', 'code'), ('The cat sat.', 'prose')]) + '\n')
  tok = data.Tokenizer(tokenizer_dir)
  corpus = data.load_corpus(str(path), vocab_size=10_000, tokenizer=tok, max_seq_len=4)
  bos = fixtures.token_id(tokenizer_dir, fixtures.BOS)
  assert [int(s[0]) for s in corpus.samples] == [bos, bos]
  assert corpus.categories == ['code', 'prose']
  assert corpus.truncated == 2 and all(len(s) == 4 for s in corpus.samples)


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  return fixtures.build_demo_checkpoint(str(tmp_path_factory.mktemp('demo') / 'demo-checkpoint'))


def test_demo_finds_the_planted_outlier(demo_dir, tmp_path):
  planted = fixtures.planted_info(demo_dir)
  m = measure.measure(measure.MeasureOptions(model_path=demo_dir, output_dir=str(tmp_path), max_samples=24,
                                             max_seq_len=128, dtype='float32', progress=False))
  doc = m.doc
  layer, channel = planted['layer'], planted['channel']
  # Below the planted layer the residual stream is ordinary; from it on, one channel is massive.
  before = doc['per_layer_stats'][f'layer_{layer - 1}_hidden']
  at = doc['per_layer_stats'][f'layer_{layer}_hidden']
  assert max(abs(before['max']), abs(before['min'])) < 5
  assert at['max'] > 500 and at['sun_peak_token_ratio'] > 1000
  assert doc['extremes'][f'layer_{layer}_hidden']['max']['channel'] == channel
  assert doc['extremes'][f'layer_{layer}_hidden']['max']['token_id'] == planted['token_id']
  assert doc['extremes'][f'layer_{layer}_hidden']['max']['position'] == 0  # BOS opens every sample
  assert doc['global_max_detail']['channel'] == channel
  assert int(doc['global_max_location'].split('_')[1]) >= layer
  report = measure.planted_report(doc, planted)
  assert report.startswith(f'planted outlier (layer {layer}, channel {channel}') and ': found at layer' in report
  # Only BOS carries it: both of Sun's token rules (the layer-median rule of the attribution and the
  # reference's per-token rule beside it) flag every BOS and no other token (an earlier demo also fired
  # on ~10% of ordinary tokens), and the planted channel is the one persistent outlier channel.
  anat = json.load(open(m.anatomy_paths[1]))
  assert anat['token_attribution']['criterion']['name'] == 'layer_median'
  assert anat['token_attribution_token_median']['criterion']['name'] == 'token_median'
  for tokens in (anat['token_attribution'], anat['token_attribution_token_median']):
    assert tokens['classes']['bos']['flagged'] == tokens['classes']['bos']['total'] == 24
    assert tokens['flagged_tokens'] == 24 and tokens['top_positions'] == [{'position': 0, 'flagged': 24}]
  assert [(c['channel'], c['first_layer'], c['disappears_at']) for c in anat['outlier_channels']['channels']] == [
      (channel, layer, None)]
