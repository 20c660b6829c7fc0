"""Gemma families: gemma (gemma-2b), gemma2, gemma3_text and the multimodal gemma3.

What they add to a llama-style decoder, all as ModelConfig flags over the shared
blocks: embeddings scaled by sqrt(hidden) inside the embedding module, RMSNorm
times (1 + weight), GeGLU; gemma2 adds sandwich norms (post-attention, pre/post
feed-forward), attention and final logit soft-capping, query scaling by
query_pre_attn_scalar and alternating sliding-window layers; gemma3 adds q/k
RMSNorm, separate rope for sliding (local) and full (global) layers, and ships
as a multimodal wrapper around gemma3_text.

Defaults are transformers 5's config-class defaults: the real gemma3 configs
leave most text fields out (gemma-3-4b-it states neither head counts nor
head_dim), so a default here is a model dimension, not a guess.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxact_jax.config import (FULL_ATTENTION, SLIDING_ATTENTION, ConfigReader, ModelConfig, RopeConfig,
                               read_rope)
from maxact_jax.errors import UserError
from maxact_jax.families.dense import read_layer_types
from maxact_jax.models.layers import ACTIVATIONS

# transformers 5.24 GemmaConfig / Gemma2Config / Gemma3TextConfig defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    'gemma': dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256),
    'gemma2': dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    'gemma3_text': dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None, sliding_window_pattern=6,
                        global_rope_theta=1_000_000.0, local_rope_theta=10_000.0),
}
GELU_TANH = 'gelu_pytorch_tanh'


def nullable_float(r: ConfigReader, key: str, default: float | None) -> float | None:
  """A float where an explicit JSON null means None (off) and absence means `default`.

  ConfigReader.get treats null as absent; for soft-capping the two differ
  (gemma2 configs turn soft-capping off with null).
  """
  if key in r.raw:
    return r.float(key, None)
  r.ignore(key)
  return default


def gemma_fields(r: ConfigReader, family: str, act_key: str) -> dict[str, Any]:
  """The fields all Gemma generations share, with `family`'s defaults."""
  d = DEFAULTS[family]
  heads = r.int('num_attention_heads', d['num_attention_heads'])
  head_dim = r.int('head_dim', d['head_dim'])  # Gemma states head_dim; never hidden // heads
  act = r.get(act_key, GELU_TANH, (str,))
  if family == 'gemma' and act == 'gelu':
    act = GELU_TANH  # transformers rewrites gemma's legacy "gelu": the released models use the tanh form
  if act not in ACTIVATIONS:
    raise UserError(f'{r.where}: {act_key} {act!r} is not supported (supported: {", ".join(ACTIVATIONS)})')
  # Gemma reads `hidden_act`, Gemma2/3 `hidden_activation`; transformers 5 ignores the other one.
  r.ignore('hidden_activation' if act_key == 'hidden_act' else 'hidden_act')
  r.expect('use_bidirectional_attention', (None, False), None)
  bias = r.bool('attention_bias', False)
  r.ignore('max_position_embeddings')  # used only by rope types Gemma does not have
  return dict(
      vocab_size=r.int('vocab_size', d['vocab_size']),
      hidden_size=r.int('hidden_size', d['hidden_size']),
      num_hidden_layers=r.int('num_hidden_layers', d['num_hidden_layers']),
      num_attention_heads=heads,
      num_key_value_heads=r.int('num_key_value_heads', d['num_key_value_heads']),
      head_dim=head_dim,
      intermediate_size=r.int('intermediate_size', d['intermediate_size']),
      rms_norm_eps=r.float('rms_norm_eps', 1e-6),
      hidden_act=act,
      tie_word_embeddings=r.bool('tie_word_embeddings', True),
      pad_token_id=r.get('pad_token_id', 0, (int,)),
      qkv_bias=bias,
      o_bias=bias,
      norm_offset=1.0,
      embed_scale=True,
  )


def sliding_window(r: ConfigReader, family: str, types: tuple[str, ...]) -> int | None:
  """The window of the sliding layers; an explicit null means none (not the default)."""
  if 'sliding_window' in r.raw and r.raw['sliding_window'] is None:
    r.ignore('sliding_window')
    window = None
  else:
    window = r.int('sliding_window', DEFAULTS[family]['sliding_window'])
  if SLIDING_ATTENTION in types and not window:
    raise UserError(f'{r.where}: sliding_attention layers need a positive sliding_window, got {window!r}')
  return window


def query_scale(r: ConfigReader, family: str) -> float:
  scalar = r.float('query_pre_attn_scalar', DEFAULTS[family]['query_pre_attn_scalar'])
  if scalar <= 0:
    raise UserError(f'{r.where}: query_pre_attn_scalar must be positive, got {scalar!r}')
  return scalar**-0.5  # as transformers: config.query_pre_attn_scalar ** -0.5 in Python floats


def parse_gemma(r: ConfigReader) -> ModelConfig:
  f = gemma_fields(r, 'gemma', 'hidden_act')
  n = f['num_hidden_layers']
  types = read_layer_types(r, n, (FULL_ATTENTION,) * n, allowed=(FULL_ATTENTION,))
  return ModelConfig(model_type=r.model_type, **f, rope=read_rope(r, f['head_dim']), layer_types=types)


def parse_gemma2(r: ConfigReader) -> ModelConfig:
  f = gemma_fields(r, 'gemma2', 'hidden_activation')
  n = f['num_hidden_layers']
  # transformers: layer i slides when (i + 1) % 2, so layers 0, 2, 4, ... are local.
  default = tuple(SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(n))
  types = read_layer_types(r, n, default)
  window = sliding_window(r, 'gemma2', types)
  if r.has('sliding_window_size') and r.get('sliding_window_size', types=(int,)) != window:
    raise UserError(f'{r.where}: sliding_window_size {r.raw["sliding_window_size"]} differs from '
                    f'sliding_window {window}; transformers uses sliding_window')
  r.ignore('sliding_window_size', 'cache_implementation')  # old duplicate; generation-time cache choice
  d = DEFAULTS['gemma2']
  return ModelConfig(
      model_type=r.model_type, **f, rope=read_rope(r, f['head_dim']), layer_types=types,
      sliding_window=window, sandwich_norms=True, query_scale=query_scale(r, 'gemma2'),
      attn_logit_softcap=nullable_float(r, 'attn_logit_softcapping', d['attn_logit_softcapping']),
      final_logit_softcap=nullable_float(r, 'final_logit_softcapping', d['final_logit_softcapping']))


def _rope_of(params: dict[str, Any], where: str, head_dim: int) -> RopeConfig:
  """One rope-parameters object (rope_type, rope_theta, scaling) through read_rope's rules."""
  return read_rope(ConfigReader({'rope_parameters': params}, where), head_dim)


def gemma3_ropes(r: ConfigReader, head_dim: int) -> tuple[RopeConfig, RopeConfig]:
  """(global rope of full-attention layers, local rope of sliding layers).

  transformers-5 configs nest `rope_parameters` by layer type; older ones give
  `rope_theta` (global, default 1e6), `rope_local_base_freq` (local, default
  1e4) and a `rope_scaling` that applies to the full-attention layers only
  (the linear factor 8 of gemma-3-4b/27b).
  """
  d = DEFAULTS['gemma3_text']
  if r.has('rope_parameters'):
    params = r.get('rope_parameters', types=(dict,))
    unknown = sorted(set(params) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
      raise UserError(f'{r.where}: gemma3 rope_parameters must be keyed by layer type '
                      f'({FULL_ATTENTION}, {SLIDING_ATTENTION}), got {unknown}')
    full = dict(params.get(FULL_ATTENTION) or {'rope_type': 'default'})
    local = dict(params.get(SLIDING_ATTENTION) or {'rope_type': 'default'})
    if r.has('rope_scaling'):
      full.update(r.get('rope_scaling', types=(dict,)))
    r.ignore('rope_scaling')
  else:
    r.ignore('rope_parameters')
    full = dict(r.get('rope_scaling', None, (dict,)) or {'rope_type': 'default'})
    local = {'rope_type': 'default'}
  full.setdefault('rope_theta', r.float('rope_theta', d['global_rope_theta']))
  local.setdefault('rope_theta', r.float('rope_local_base_freq', d['local_rope_theta']))
  return (_rope_of(full, f'{r.where}:rope[{FULL_ATTENTION}]', head_dim),
          _rope_of(local, f'{r.where}:rope[{SLIDING_ATTENTION}]', head_dim))


def gemma3_text_config(r: ConfigReader, *, causal_lm_head: bool) -> ModelConfig:
  """A gemma3_text ModelConfig; `causal_lm_head` when the head is Gemma3ForCausalLM's."""
  f = gemma_fields(r, 'gemma3_text', 'hidden_activation')
  n = f['num_hidden_layers']
  # transformers: with no layer_types, layer i slides unless (i + 1) is a multiple of
  # `sliding_window_pattern` (6: five local layers, then one global). The
  # `_sliding_window_pattern` that transformers 5 writes back is not read again.
  pattern = r.int('sliding_window_pattern', DEFAULTS['gemma3_text']['sliding_window_pattern'])
  if pattern < 1:
    raise UserError(f'{r.where}: sliding_window_pattern must be at least 1, got {pattern}')
  r.ignore('_sliding_window_pattern')
  default = tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n))
  types = read_layer_types(r, n, default)
  window = sliding_window(r, 'gemma3_text', types)
  full_rope, local_rope = gemma3_ropes(r, f['head_dim'])
  # Gemma3Attention keeps attn_logit_softcapping but never passes it to the attention
  # function (transformers 5.24), so it changes nothing.
  r.ignore('attn_logit_softcapping')
  final_cap = nullable_float(r, 'final_logit_softcapping', DEFAULTS['gemma3_text']['final_logit_softcapping'])
  return ModelConfig(
      model_type=r.model_type or 'gemma3_text', **f, rope=full_rope, local_rope=local_rope, layer_types=types,
      sliding_window=window, sandwich_norms=True, qk_norm=True, query_scale=query_scale(r, 'gemma3_text'),
      # Gemma3ForCausalLM soft-caps the final logits; Gemma3ForConditionalGeneration does not.
      final_logit_softcap=final_cap if causal_lm_head else None)


def parse_gemma3_text(r: ConfigReader) -> ModelConfig:
  return gemma3_text_config(r, causal_lm_head=True)


# Gemma3ForConditionalGeneration's top-level fields that only concern images.
GEMMA3_VISION_FIELDS = ('vision_config', 'mm_tokens_per_image', 'boi_token_index', 'eoi_token_index',
                        'image_token_index', 'initializer_range')


def parse_gemma3(r: ConfigReader) -> ModelConfig:
  """The multimodal wrapper: the language model of `text_config`; the vision tower
  and projector are not part of the measurement (the converter skips them by rule)."""
  text = r.sub('text_config') if r.has('text_config') else ConfigReader({}, f'{r.where}:text_config')
  if text.raw.get('model_type', 'gemma3_text') != 'gemma3_text':
    raise UserError(f'{text.where}: model_type {text.raw["model_type"]!r} is not gemma3_text')
  config = gemma3_text_config(text, causal_lm_head=False)
  # The wrapper ties lm_head to the embedding by its own flag; the text config's
  # flag is not consulted (checked against transformers 5.24).
  text.ignore('tie_word_embeddings')
  text.finish()
  r.ignore(*GEMMA3_VISION_FIELDS)
  return dataclasses.replace(
      config, model_type='gemma3', tie_word_embeddings=r.bool('tie_word_embeddings', True),
      # The hub layout; converters/gemma.py also accepts transformers 5's module layout.
      weight_prefix='language_model.model.', lm_head_key='language_model.lm_head.weight')


PARSERS = {
    'gemma': parse_gemma,
    'gemma2': parse_gemma2,
    'gemma3_text': parse_gemma3_text,
    'gemma3': parse_gemma3,
}
