"""Bad Gemma / Qwen2.5-VL configs and checkpoints give one-line UserErrors; legacy field
spellings read the way transformers reads them."""

from __future__ import annotations

import pytest

import converters
from converters.weight_map import resolve_layout
from maxact_jax.config import FULL_ATTENTION, SLIDING_ATTENTION
from maxact_jax.errors import UserError
from maxact_jax.families import parse_config

GEMMA3_TEXT = {'model_type': 'gemma3_text', 'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 6,
               'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16, 'vocab_size': 256}
QWEN_VL = {'model_type': 'qwen2_5_vl', 'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
           'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 256,
           'rope_scaling': {'type': 'mrope', 'mrope_section': [2, 3, 3]}}


@pytest.mark.parametrize('raw,message', [
    ({**GEMMA3_TEXT, 'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4}}, 'keyed by layer type'),
    ({**GEMMA3_TEXT, 'use_bidirectional_attention': True}, 'use_bidirectional_attention'),
    ({**GEMMA3_TEXT, 'sliding_window': None}, 'positive sliding_window'),
    ({**GEMMA3_TEXT, 'hidden_activation': 'relu'}, "hidden_activation 'relu' is not supported"),
    ({'model_type': 'gemma3', 'text_config': {**GEMMA3_TEXT, 'new_knob': 1}}, 'unknown config field(s) new_knob'),
    ({'model_type': 'gemma2', 'sliding_window': 4096, 'sliding_window_size': 2048}, 'sliding_window_size'),
    ({**QWEN_VL, 'rope_scaling': {'type': 'mrope', 'mrope_section': [2, 3, 4]}}, 'mrope_section'),
    ({**QWEN_VL, 'rope_scaling': {'type': 'yarn', 'factor': 4.0}}, 'rope type'),
    ({**QWEN_VL, 'use_sliding_window': True}, 'use_sliding_window'),
    ({**QWEN_VL, 'head_dim': 32}, 'head_dim 32 differs'),
])
def test_bad_config_is_a_user_error(raw, message):
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')) as err:
    parse_config(raw, 'config.json')
  assert '\n' not in str(err.value)


def test_gemma3_legacy_rope_fields():
  """Older gemma3 configs: rope_theta (global), rope_local_base_freq (local), rope_scaling
  on the global layers only, sliding_window_pattern for the layer kinds."""
  c = parse_config({**GEMMA3_TEXT, 'rope_theta': 5e5, 'rope_local_base_freq': 2e4, 'sliding_window_pattern': 3,
                    'rope_scaling': {'rope_type': 'linear', 'factor': 4.0}}, 'config.json')
  assert (c.rope.theta, c.rope.rope_type, c.rope.factor) == (5e5, 'linear', 4.0)
  assert (c.local_rope.theta, c.local_rope.rope_type) == (2e4, 'default')
  assert c.layer_types == (SLIDING_ATTENTION, SLIDING_ATTENTION, FULL_ATTENTION) * 2


def test_gemma2_null_soft_caps_are_off():
  """An explicit null turns a soft-cap off; an absent field means transformers' default."""
  off = parse_config({'model_type': 'gemma2', 'attn_logit_softcapping': None, 'final_logit_softcapping': None},
                     'config.json')
  default = parse_config({'model_type': 'gemma2'}, 'config.json')
  assert (off.attn_logit_softcap, off.final_logit_softcap) == (None, None)
  assert (default.attn_logit_softcap, default.final_logit_softcap) == (50.0, 30.0)


def test_qwen_vl_flat_and_nested_configs_agree():
  """The hub's flat config and transformers 5's text_config nesting read the same."""
  flat = parse_config(dict(QWEN_VL, tie_word_embeddings=True), 'flat')
  text = {k: v for k, v in QWEN_VL.items() if k != 'model_type'}
  nested = parse_config({'model_type': 'qwen2_5_vl', 'tie_word_embeddings': True,
                         'text_config': {**text, 'model_type': 'qwen2_5_vl_text'}}, 'nested')
  assert flat == nested


def test_unknown_checkpoint_layout_is_a_user_error():
  config = parse_config({'model_type': 'gemma3', 'text_config': GEMMA3_TEXT}, 'config.json')
  keys = ['model.embed_tokens.weight', 'model.layers.0.mlp.up_proj.weight']  # a gemma3_text layout
  with pytest.raises(UserError, match='cannot tell the gemma3 checkpoint layout: it has none of '
                     r'language_model\.model\.embed_tokens\.weight \(hub\)'):
    resolve_layout(config, converters.weight_map(config), keys, 'ckpt')
