"""Full-size MoE configs: the model builds abstractly (jax.eval_shape), has exactly
transformers' parameter count (meta device), and the weight map covers the
checkpoint's tensor names exactly.

- gpt-oss-20b: its real config.json and model.safetensors.index.json (the MXFP4
  `*_blocks` / `*_scales` names included);
- Qwen3-30B-A3B: its real config.json; tensor names as transformers 5 writes the
  checkpoint (save_pretrained's reverted layout: per-expert tensors, as on the hub);
- GLM-4.5 (glm4_moe): transformers' default Glm4MoeConfig, which is that shape, with
  GLM-4.5's head_dim 128 (the default leaves head_dim to hidden // heads = 42, which
  our parser refuses: 96 heads do not divide 4096);
- Ling-mini-2.0 (bailing_moe): no config.json copy exists in configs/real;
  the shape below is the published config as transcribed in public test fixtures
  (see configs/real/SOURCES.md, LING_ARCH.md). Its parameter count is checked
  against the transformers glm4_moe model of the same function, and its tensor names
  are that model's, in the Ling layout of maxact_jax.fixtures_moe.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
import torch

import converters
from converters.weight_map import check_coverage, plan, resolve
from maxact_jax import capture, fixtures_moe
from maxact_jax.families import parse_config
from maxact_jax.models import transformer
from tests.conftest import REAL_CONFIGS

LING_MINI_2 = {
    'architectures': ['BailingMoeV2ForCausalLM'], 'auto_map': fixtures_moe.LING_AUTO_MAP,
    'model_type': 'bailing_moe', 'vocab_size': 157184, 'hidden_size': 2048, 'intermediate_size': 5120,
    'num_hidden_layers': 20, 'num_attention_heads': 16, 'num_key_value_heads': 4, 'head_dim': 128,
    'first_k_dense_replace': 1, 'moe_intermediate_size': 512, 'moe_shared_expert_intermediate_size': 512,
    'num_shared_experts': 1, 'num_experts': 256, 'num_experts_per_tok': 8, 'n_group': 8, 'topk_group': 4,
    'norm_topk_prob': True, 'routed_scaling_factor': 2.5, 'score_function': 'sigmoid',
    'moe_router_enable_expert_bias': True, 'router_dtype': 'fp32', 'use_qk_norm': True, 'use_qkv_bias': False,
    'use_bias': False, 'partial_rotary_factor': 0.5, 'rope_theta': 600000, 'rope_scaling': None,
    'hidden_act': 'silu', 'rms_norm_eps': 1e-6, 'tie_word_embeddings': False, 'max_position_embeddings': 32768,
    'num_nextn_predict_layers': 1, 'pad_token_id': 156892, 'eos_token_id': 156892, 'torch_dtype': 'bfloat16',
}
GLM_OF_LING = dict(  # the glm4_moe config computing Ling-mini-2.0's function
    vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, first_k_dense_replace=1, moe_intermediate_size=512, n_shared_experts=1,
    n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True,
    routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=False, tie_word_embeddings=False,
    rope_parameters={'rope_type': 'default', 'rope_theta': 600000.0, 'partial_rotary_factor': 0.5})


def real(name: str) -> dict:
  with open(os.path.join(REAL_CONFIGS, name, 'config.json')) as f:
    return json.load(f)


def hf_meta_model(model_type: str, **fields):
  import transformers

  cfg = transformers.AutoConfig.for_model(model_type, **fields)
  with torch.device('meta'):
    return transformers.AutoModelForCausalLM.from_config(cfg)


def cases():
  glm = hf_meta_model('glm4_moe', head_dim=128).config.to_dict()
  return {
      'Qwen3-30B-A3B': (real('Qwen3-30B-A3B'), lambda: hf_meta_model(**real('Qwen3-30B-A3B'))),
      'gpt-oss-20b': (real('gpt-oss-20b'), lambda: hf_meta_model(**real('gpt-oss-20b'))),
      'GLM-4.5 (transformers default)': (glm, lambda: hf_meta_model('glm4_moe', head_dim=128)),
      'Ling-mini-2.0': (LING_MINI_2, lambda: hf_meta_model('glm4_moe', **GLM_OF_LING)),
  }


CASES = ['Qwen3-30B-A3B', 'gpt-oss-20b', 'GLM-4.5 (transformers default)', 'Ling-mini-2.0']


@pytest.fixture(scope='module')
def built():
  out = {}
  for name, (raw, meta) in cases().items():
    out[name] = (parse_config(raw, name), meta())
  return out


@pytest.mark.parametrize('name', CASES)
def test_full_size_builds_with_transformers_parameter_count(name, built):
  config, hf = built[name]
  params = transformer.abstract_params(config, jax.numpy.bfloat16)
  ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
  # transformers' count of what its checkpoint holds: parameters plus persistent
  # buffers (glm4_moe's e_score_correction_bias is a buffer).
  assert ours == sum(t.numel() for t in hf.state_dict().values())
  moe_layers = config.mlp_layer_kinds.count('moe')
  dense_layers = config.num_hidden_layers - moe_layers
  taps = capture.tap_names(config)
  assert len(taps) == 2 + 6 * moe_layers + 4 * dense_layers
  if dense_layers and moe_layers:  # first_k_dense_replace: two scanned segments
    assert [s.kinds for s in transformer.plan_segments(config)] == [('attn/dense',), ('attn/moe',)]


def expected_keys(name: str, config, hf) -> set[str]:
  if name == 'gpt-oss-20b':
    with open(os.path.join(REAL_CONFIGS, name, 'model.safetensors.index.json')) as f:
      return set(json.load(f)['weight_map'])
  keys = list(fixtures_moe.hub_state_dict(hf))
  if name == 'Ling-mini-2.0':
    keys = [k for k in map(fixtures_moe.ling_name, keys) if k is not None]
    keys += fixtures_moe.mtp_names(keys, config.num_hidden_layers, config.mtp_layers)
  return set(keys)


@pytest.mark.parametrize('name', CASES)
def test_weight_map_covers_the_checkpoint_names_exactly(name, built):
  config, hf = built[name]
  keys = expected_keys(name, config, hf)
  wmap = converters.weight_map(config)
  plans = resolve(plan(config, wmap, jax.numpy.bfloat16), keys)
  check_coverage(plans, keys, wmap, config, name)  # raises on any unused or missing tensor
  used = {k for p in plans for r in p.recipes for k in r.keys}
  skipped = keys - used
  assert all(re.match(r'model\.layers\.(\d+)\.', k) and int(k.split('.')[2]) >= config.num_hidden_layers
             for k in skipped), sorted(skipped)[:5]
  if name == 'gpt-oss-20b':
    assert 'model.layers.23.mlp.experts.gate_up_proj_blocks' in used and not skipped
  if name == 'Qwen3-30B-A3B':
    assert 'model.layers.47.mlp.experts.127.down_proj.weight' in used
  if name == 'Ling-mini-2.0':
    assert 'model.layers.5.attention.query_key_value.weight' in used and len(skipped) > 0
