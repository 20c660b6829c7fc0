"""qwen2_5_vl: the text backbone of the Qwen2.5-VL checkpoints.

The language model is Qwen2 (q/k/v bias, SwiGLU, RMSNorm) with multimodal rope
(mrope): three position rows (temporal, height, width), each feeding one
section of the rotary frequencies. For text-only input transformers builds
the three rows from the same 0..T-1 positions, so every section sees the
ordinary position and mrope is the 1-D rope of the same theta; this is tested
against transformers' own rotary module, not assumed
(tests/test_parity_qwen2_5_vl.py).

Hub configs are flat (the text fields at the top level, as transformers 4
wrote them); transformers 5 writes them nested under `text_config`. Both read
the same. The vision tower's fields are not part of the measurement.
"""

from __future__ import annotations

from maxact_jax.config import FULL_ATTENTION, ConfigReader, ModelConfig, RopeConfig
from maxact_jax.errors import UserError
from maxact_jax.families.dense import read_layer_types

# transformers 5.24 Qwen2_5_VLTextConfig defaults.
DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                mrope_section=(16, 24, 24))
VISION_FIELDS = ('vision_config', 'image_token_id', 'video_token_id', 'vision_start_token_id',
                 'vision_end_token_id', 'vision_token_id')


def mrope_as_rope(t: ConfigReader, head_dim: int) -> RopeConfig:
  """The rope of text-only input: mrope's theta, with its sections checked."""
  if t.has('rope_parameters'):
    params = dict(t.get('rope_parameters', types=(dict,)))
    t.ignore('rope_scaling')
  else:
    params = dict(t.get('rope_scaling', None, (dict,)) or {})
    t.ignore('rope_parameters')
  kinds = {params.pop('rope_type', None), params.pop('type', None)} - {None}
  # transformers turns rope type "mrope" into "default" (mrope is the position layout, not a scaling).
  if not kinds <= {'mrope', 'default'}:
    raise UserError(f'{t.where}: qwen2_5_vl rope type {sorted(kinds)} is not supported (supported: mrope)')
  section = params.pop('mrope_section', DEFAULTS['mrope_section'])
  if (not isinstance(section, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in section)
      or sum(section) != head_dim // 2):
    raise UserError(f'{t.where}: mrope_section {section!r} must be positive integers summing to '
                    f'head_dim / 2 = {head_dim // 2}')
  theta = params.pop('rope_theta', None)
  theta = float(theta) if theta is not None else t.float('rope_theta', DEFAULTS['rope_theta'])
  t.ignore('rope_theta')
  if params:
    raise UserError(f'{t.where}: rope field(s) {", ".join(sorted(params))} are not supported for qwen2_5_vl')
  return RopeConfig(theta=theta)


def parse_qwen2_5_vl(r: ConfigReader) -> ModelConfig:
  nested = r.has('text_config')
  t = r.sub('text_config') if nested else r
  if nested and t.raw.get('model_type', 'qwen2_5_vl_text') != 'qwen2_5_vl_text':
    raise UserError(f'{t.where}: model_type {t.raw["model_type"]!r} is not qwen2_5_vl_text')
  hidden = t.int('hidden_size', DEFAULTS['hidden_size'])
  heads = t.int('num_attention_heads', DEFAULTS['num_attention_heads'])
  if heads == 0 or hidden % heads:
    raise UserError(f'{t.where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}')
  head_dim = hidden // heads  # Qwen2_5_VLAttention always uses hidden // heads
  if t.has('head_dim') and t.int('head_dim') != head_dim:
    raise UserError(f'{t.where}: head_dim {t.raw["head_dim"]} differs from hidden_size / num_attention_heads '
                    f'= {head_dim}, which the qwen2_5_vl attention uses')
  t.ignore('head_dim')
  if 'num_key_value_heads' in t.raw and t.raw['num_key_value_heads'] is None:
    kv = heads  # transformers: an explicit null means one key/value head per query head
    t.ignore('num_key_value_heads')
  else:
    kv = t.int('num_key_value_heads', DEFAULTS['num_key_value_heads'])
  n = t.int('num_hidden_layers', DEFAULTS['num_hidden_layers'])
  # No paper checkpoint slides; transformers drops the window unless use_sliding_window.
  t.expect('use_sliding_window', (False,), False)
  t.ignore('sliding_window', 'max_window_layers', 'max_position_embeddings')
  types = read_layer_types(t, n, (FULL_ATTENTION,) * n, allowed=(FULL_ATTENTION,))
  # transformers 5: the wrapper's flag, or the text config's when that one is set.
  tie = r.bool('tie_word_embeddings', False)
  if nested:
    tie = tie or t.bool('tie_word_embeddings', False)
  config = ModelConfig(
      model_type=r.model_type,
      vocab_size=t.int('vocab_size', DEFAULTS['vocab_size']),
      hidden_size=hidden,
      num_hidden_layers=n,
      num_attention_heads=heads,
      num_key_value_heads=kv,
      head_dim=head_dim,
      intermediate_size=t.int('intermediate_size', DEFAULTS['intermediate_size']),
      rms_norm_eps=t.float('rms_norm_eps', DEFAULTS['rms_norm_eps']),
      rope=mrope_as_rope(t, head_dim),
      hidden_act=t.expect('hidden_act', ('silu',), 'silu'),
      tie_word_embeddings=tie,
      pad_token_id=t.get('pad_token_id', None, (int,)),
      qkv_bias=True,
      layer_types=types,
      # The hub layout; converters/qwen_vl.py also accepts transformers 5's module layout.
      weight_prefix='model.',
      lm_head_key='lm_head.weight',
  )
  r.ignore(*VISION_FIELDS)
  if nested:
    t.finish()
  return config


PARSERS = {'qwen2_5_vl': parse_qwen2_5_vl}
