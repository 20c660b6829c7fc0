"""Gemma families (gemma, gemma2, gemma3_text, multimodal gemma3): every tap and
statistic against the reference pipeline in PyTorch, crosscheck against
transformers, and proof that each Gemma-specific setting is exercised.

The tiny fixtures (maxact_jax/fixtures.py TINY) have sliding windows of 8 under
test sequences of up to 40 tokens, query_pre_attn_scalar != head_dim, a linear
global rope beside a default local rope, soft-caps small enough to bend the
logits, and random (1 + w) norm weights.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from maxact_jax import capture, crosscheck, measure_step, torch_reference
from maxact_jax.families import load_config, parse_config
from maxact_jax.models import layers
from tests import parity_utils
from tests.conftest import REAL_CONFIGS, REFERENCE_RESULTS

GEMMA = ['gemma', 'gemma2', 'gemma3_text', 'gemma3']


def run_crosscheck(model_dir: str, corpus: str, **kwargs) -> dict:
  return crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=corpus, num_samples=6, max_seq_len=40), **kwargs)


@pytest.fixture(scope='module')
def hf_models():
  """transformers models of the session's checkpoints, loaded once per module."""
  cache = {}

  def get(model_dir: str):
    if model_dir not in cache:
      cache[model_dir] = torch_reference.load_hf_model(model_dir)
    return cache[model_dir]

  return get


@pytest.mark.parametrize('model_type', ['gemma', 'gemma2', 'gemma3_text',
                                        pytest.param('gemma3', marks=pytest.mark.slow)])
def test_measure_matches_reference_pipeline(model_type, checkpoint, ids_corpus, tmp_path):
  parity_utils.assert_measure_matches_reference(checkpoint(model_type), ids_corpus, str(tmp_path))


@pytest.mark.parametrize('model_type,layout', [(t, 'hub') for t in GEMMA] + [('gemma3', 'modules')])
def test_crosscheck_passes(model_type, layout, checkpoint, hf_models, ids_corpus):
  model_dir = checkpoint(model_type, **({'original_format': False} if layout == 'modules' else {}))
  report = run_crosscheck(model_dir, ids_corpus, hf_model=hf_models(model_dir))
  parity_utils.assert_crosscheck_passed(report)
  config = load_config(model_dir)
  if config.sliding_window:
    assert report['batch_shape'][1] > 4 * config.sliding_window  # the window is exercised
  assert len(report['taps']) == 2 + 4 * config.num_hidden_layers


def config_variant(src: str, dst: str, edit) -> str:
  """A copy of checkpoint `src` (weights linked) whose config.json `edit` changes."""
  os.makedirs(dst)
  for name in os.listdir(src):
    if name != 'config.json':
      os.symlink(os.path.join(src, name), os.path.join(dst, name))
  with open(os.path.join(src, 'config.json')) as f:
    raw = json.load(f)
  edit(raw.get('text_config', raw))
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(raw, f)
  return dst


# (model type, config edit, first tap that must diverge or 'logits').
KNOBS = {
    'gemma2 sliding window': ('gemma2', lambda c: c.update(layer_types=['full_attention'] * 4), 'layer_0_attn_output'),
    'gemma2 attention soft-cap': ('gemma2', lambda c: c.update(attn_logit_softcapping=None), 'layer_0_attn_output'),
    'gemma2 query_pre_attn_scalar': ('gemma2', lambda c: c.update(query_pre_attn_scalar=16), 'layer_0_attn_output'),
    'gemma2 final soft-cap': ('gemma2', lambda c: c.update(final_logit_softcapping=None), 'logits'),
    'gemma3 local rope base': ('gemma3_text', lambda c: c['rope_parameters']['sliding_attention'].update(
        rope_theta=1_000_000.0), 'layer_0_attn_output'),
    'gemma3 global rope scaling': ('gemma3_text', lambda c: c['rope_parameters'].update(
        full_attention={'rope_type': 'default', 'rope_theta': 1_000_000.0}), 'layer_1_attn_output'),
    'gemma3 sliding window': ('gemma3_text', lambda c: c.update(sliding_window=64), 'layer_0_attn_output'),
}


@pytest.mark.parametrize('knob', list(KNOBS))
def test_each_gemma_setting_is_exercised(knob, checkpoint, hf_models, ids_corpus, tmp_path):
  """The same weights under a config with one Gemma setting changed must diverge from
  transformers at the first tap that setting touches: the fixtures exercise it (and
  test_crosscheck_passes shows the unchanged config agrees)."""
  model_type, edit, where = KNOBS[knob]
  model_dir = checkpoint(model_type)
  report = run_crosscheck(config_variant(model_dir, str(tmp_path / 'variant'), edit), ids_corpus,
                          hf_model=hf_models(model_dir))
  if where == 'logits':
    assert report['passed']  # the final soft-cap touches only the logits
    assert report['logits']['kl'] > 1e-3
  else:
    assert report['first_failure'] == where, crosscheck.format_report(report)


def test_multimodal_gemma3_head_is_not_soft_capped(checkpoint):
  """Gemma3ForConditionalGeneration does not soft-cap its logits (Gemma3ForCausalLM
  does): the same text_config gives a cap for gemma3_text and none for gemma3."""
  assert load_config(checkpoint('gemma3_text')).final_logit_softcap == 2.0
  assert load_config(checkpoint('gemma3')).final_logit_softcap is None


@pytest.mark.parametrize('norm,clean,first_bad', [
    ('post_attention_layernorm', 'layer_1_attn_output', 'layer_1_mlp_gate'),
    ('post_feedforward_layernorm', 'layer_1_mlp_output', 'layer_1_hidden'),
])
def test_crosscheck_names_the_perturbed_tap(norm, clean, first_bad, checkpoint, ids_corpus):
  """The sandwich norms sit after the attention / MLP taps, as in the reference hooks."""
  model_dir = checkpoint('gemma3')
  params = measure_step.load_params(model_dir, load_config(model_dir), 'float32')
  weight = np.array(params['model']['layers'][norm]['weight'])
  weight[1] += 0.05
  params['model']['layers'][norm]['weight'] = weight
  report = run_crosscheck(model_dir, ids_corpus, params=params)
  assert not report['passed']
  assert report['first_failure'] == first_bad
  assert report['taps'][clean]['passed']


def test_embedding_scale_rounds_like_transformers():
  """sqrt(hidden) is cast to the weight dtype before the multiply: 55.5 for hidden 3072 in bf16."""
  emb = layers.ScaledEmbedding(4, 3072, 3072**0.5, jnp.bfloat16)
  params = {'params': {'embedding': jnp.ones((4, 3072), jnp.bfloat16)}}
  out = emb.apply(params, jnp.array([[1, 2]]))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), 55.5)
  emb32 = layers.ScaledEmbedding(4, 3072, 3072**0.5, jnp.float32)
  out32 = emb32.apply({'params': {'embedding': jnp.ones((4, 3072))}}, jnp.array([[1]]))
  np.testing.assert_array_equal(np.asarray(out32), np.float32(3072**0.5))


@pytest.mark.parametrize('name', ['gemma-2b', 'gemma-3-4b-it'])
def test_tap_list_is_the_reference_results(name):
  """The full tap list of the real checkpoint, in order, is the one in the paper's result file."""
  with open(os.path.join(REAL_CONFIGS, name, 'config.json')) as f:
    config = parse_config(json.load(f), name)
  with open(os.path.join(REFERENCE_RESULTS, f'{name}_activation_stats.json')) as f:
    reference = json.load(f)
  assert capture.tap_names(config) == list(reference['per_layer_stats'])
  assert config.num_hidden_layers == reference['num_hidden_layers']
  assert config.hidden_size == reference['hidden_size']
