"""Sun et al.'s findings on the real model of the suite, SmolLM2-135M-Instruct (Q4_1 GGUF).

What the layer-median rule and the massive modes of `intervene` exist for, on
trained weights: the token attribution finds the first token of every sample
(its massive activation, ~29,000 in channel 507 from layer 11 to 27, sits on a
hidden state that is large everywhere, so the reference's per-token rule never
fires); replacing those massive values by their mean, where they occur, leaves
the model nearly as it was, while zeroing them destroys it. Small samples (8 of
at most 64 tokens, float32) keep the module to about a minute and a half on 2 CPU
cores. docs/real-models.md has the full-size figures.
"""

from __future__ import annotations

import json
import sys

import pytest

import converters
from maxact_jax import fixtures_gguf, intervene, measure

CHANNEL = 507  # SmolLM2-135M's massive-activation channel (residual stream)
LAYER = 11  # where channel 507 jumps from ~1,000 to ~29,000: the first layer where Sun's rule holds
N_SAMPLES, SEQ_LEN = 8, 64


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory) -> str:
  """The GGUF file dequantized once, into a float32 orbax model directory (every run restores it)."""
  out = str(tmp_path_factory.mktemp('smollm2') / 'SmolLM2-135M-Instruct')
  converters.convert(fixtures_gguf.smollm2_gguf(), out, 'float32')
  return out


@pytest.fixture(scope='module')
def measured(smollm2, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('measured'))
  return measure.measure(measure.MeasureOptions(model_path=smollm2, output_dir=out, max_samples=N_SAMPLES,
                                                max_seq_len=SEQ_LEN, batch_size=N_SAMPLES, dtype='float32',
                                                progress=False))


def test_layer_median_rule_finds_the_first_token_the_per_token_rule_misses(measured):
  doc = measured.doc
  per = doc['per_layer_stats']
  assert doc['global_max_detail']['channel'] == CHANNEL and doc['global_max_detail']['position'] == 0
  assert abs(doc['global_max_activation']) > 20_000
  for layer in range(LAYER, 28):
    s = per[f'layer_{layer}_hidden']
    # The peak token: ~500x its own median (it is large everywhere), thousands of times its sequence's.
    assert s['sun_peak_token_ratio'] < 1000 < s['layer_median_peak_ratio'], layer
    assert s['sun_n_pass'] == 0 and s['layer_median_n_pass'] >= N_SAMPLES, layer
  assert all(per[f'layer_{layer}_hidden']['layer_median_n_pass'] == 0 for layer in (0, 1, 29))

  anat = json.load(open(measured.anatomy_paths[1]))
  ta, reference = anat['token_attribution'], anat['token_attribution_token_median']
  assert ta['criterion']['name'] == 'layer_median' and reference['criterion']['name'] == 'token_median'
  assert reference['flagged_tokens'] == 0
  # Every sample's first token, whatever it is (class `first`, or `bos` for a sample that opens with
  # <|im_start|>).
  assert ta['top_positions'][0] == {'position': 0, 'flagged': N_SAMPLES}
  assert ta['classes']['first']['flagged'] == ta['classes']['first']['total'] > 0
  assert all(ta['per_layer']['flagged'][layer] >= N_SAMPLES for layer in range(LAYER, 28))
  assert [c['channel'] for c in anat['outlier_channels']['channels']] == [CHANNEL]


def test_sun_mean_keeps_the_model_zeroing_destroys_it(smollm2, tmp_path):
  run = lambda mode: intervene.intervene(intervene.InterveneOptions(
      model_path=smollm2, output_dir=str(tmp_path / mode), channels=[f'{LAYER}:{CHANNEL}'], mode=mode, controls=0,
      max_samples=N_SAMPLES, max_seq_len=SEQ_LEN, batch_size=N_SAMPLES, dtype='float32')).doc
  sun_mean, sun_zero = run('massive_mean'), run('massive_zero')
  for doc in (sun_mean, sun_zero):
    print(*intervene.summary_lines(doc), sep='\n', file=sys.stderr)
  (mean_v,), (zero_v,) = sun_mean['variants'], sun_zero['variants']
  assert sun_mean['base']['loss'] == pytest.approx(sun_zero['base']['loss'], rel=1e-6)
  # The first token of every sample is where they occur; replaced by their mean, they stay massive.
  assert mean_v['replaced'] == zero_v['replaced'] >= N_SAMPLES
  assert mean_v['channels'][0]['value'] > 20_000
  assert abs(mean_v['delta_loss']) < 0.05 and mean_v['kl_mean'] < 0.05 and mean_v['top1_agreement'] > 0.9
  assert zero_v['delta_loss'] > 1.0 and zero_v['kl_mean'] > 1.0 and zero_v['top1_agreement'] < 0.6
