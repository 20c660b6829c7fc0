"""Dense families (llama, qwen2, qwen3): every tap and statistic against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from maxact_jax import crosscheck, measure_step
from maxact_jax.families import load_config
from tests import parity_utils

DENSE = ['llama', 'qwen2', 'qwen3']


@pytest.mark.parametrize('model_type', DENSE)
def test_measure_matches_reference_pipeline(model_type, checkpoint, ids_corpus, tmp_path):
  model_dir = checkpoint(model_type)
  doc, top_doc, ref = parity_utils.measure_and_reference(model_dir, ids_corpus, str(tmp_path), batch_size=4)
  checked = parity_utils.assert_stats_match(doc, top_doc, ref)
  parity_utils.assert_same_global_max(doc, ref)
  n_layers = load_config(model_dir).num_hidden_layers
  assert len(ref) == 2 + 4 * n_layers  # embedding, 4 taps per layer, final norm
  assert checked > 25 * len(ref)


@pytest.mark.parametrize('model_type', DENSE)
def test_crosscheck_passes(model_type, checkpoint, ids_corpus, tmp_path):
  model_dir = checkpoint(model_type)
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=ids_corpus, num_samples=6, max_seq_len=40, output_dir=str(tmp_path)))
  parity_utils.assert_crosscheck_passed(report)
  assert len(report['taps']) == 2 + 4 * load_config(model_dir).num_hidden_layers


def test_crosscheck_names_the_perturbed_tap(checkpoint, ids_corpus, tmp_path):
  model_dir = checkpoint('qwen3')
  config = load_config(model_dir)
  params = measure_step.load_params(model_dir, config, 'float32')
  kernel = np.array(params['model']['layers']['mlp']['down_proj']['kernel'])
  kernel[1] *= 1.01  # layer 1's MLP output projection, 1% off
  params['model']['layers']['mlp']['down_proj']['kernel'] = kernel
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=ids_corpus, num_samples=6, max_seq_len=40), params=params)
  assert not report['passed']
  assert report['first_failure'] == 'layer_1_mlp_output'
  assert report['taps']['layer_1_mlp_gate']['passed']
  assert report['taps']['layer_0_hidden']['passed']
