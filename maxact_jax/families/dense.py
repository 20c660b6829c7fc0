"""Dense decoder families: llama, qwen2 (Qwen2.5), qwen3."""

from __future__ import annotations

from maxact_jax.config import (FULL_ATTENTION, SLIDING_ATTENTION, ConfigReader, ModelConfig,
                               default_head_dim, read_rope)
from maxact_jax.errors import UserError


def core_fields(r: ConfigReader, *, tie_default: bool, acts: tuple[str, ...] = ('silu',),
                eps_default: float = 1e-6) -> dict:
  """The fields every dense decoder shares, read once."""
  head_dim = default_head_dim(r)
  heads = r.int('num_attention_heads')
  return dict(
      model_type=r.model_type,
      vocab_size=r.int('vocab_size'),
      hidden_size=r.int('hidden_size'),
      num_hidden_layers=r.int('num_hidden_layers'),
      num_attention_heads=heads,
      num_key_value_heads=r.int('num_key_value_heads', heads),
      head_dim=head_dim,
      intermediate_size=r.int('intermediate_size'),
      rms_norm_eps=r.float('rms_norm_eps', eps_default),
      hidden_act=r.expect('hidden_act', acts, acts[0]),
      tie_word_embeddings=r.bool('tie_word_embeddings', tie_default),
      pad_token_id=r.get('pad_token_id', None, (int,)),
      rope=read_rope(r, head_dim),
  )


def read_layer_types(r: ConfigReader, num_layers: int, default: tuple[str, ...],
                     allowed: tuple[str, ...] = (FULL_ATTENTION, SLIDING_ATTENTION)) -> tuple[str, ...]:
  """Per-layer attention kinds: config's `layer_types` when present, else `default`."""
  if not r.has('layer_types'):
    r.ignore('layer_types')
    return default
  types = tuple(r.get('layer_types', types=(list,)))
  bad = sorted(set(types) - set(allowed))
  if bad:
    raise UserError(f'{r.where}: layer_types holds unsupported kinds {bad} (supported: {list(allowed)})')
  if len(types) != num_layers:
    raise UserError(f'{r.where}: layer_types has {len(types)} entries for {num_layers} layers')
  return types


def qwen_sliding(r: ConfigReader, num_layers: int) -> tuple[tuple[str, ...], int | None]:
  """Qwen2/Qwen3 sliding-window rule: layers at or past max_window_layers slide when
  use_sliding_window is set."""
  use_sliding = r.bool('use_sliding_window', False)
  window = r.get('sliding_window', None, (int,))
  max_window_layers = r.int('max_window_layers', num_layers)
  if not use_sliding:
    window = None
  default = tuple(SLIDING_ATTENTION if window is not None and i >= max_window_layers else FULL_ATTENTION
                  for i in range(num_layers))
  types = read_layer_types(r, num_layers, default)
  if window is None:
    types = (FULL_ATTENTION,) * num_layers  # transformers drops the window with use_sliding_window off
  return types, window


def parse_llama(r: ConfigReader) -> ModelConfig:
  f = core_fields(r, tie_default=False)
  bias = r.bool('attention_bias', False)
  r.expect('pretraining_tp', (1,), 1)
  return ModelConfig(**f, qkv_bias=bias, o_bias=bias, mlp_bias=r.bool('mlp_bias', False),
                     layer_types=read_layer_types(r, f['num_hidden_layers'],
                                                  (FULL_ATTENTION,) * f['num_hidden_layers'],
                                                  allowed=(FULL_ATTENTION,)))


def parse_qwen2(r: ConfigReader) -> ModelConfig:
  f = core_fields(r, tie_default=False)
  r.expect('use_mrope', (False,), False)
  types, window = qwen_sliding(r, f['num_hidden_layers'])
  return ModelConfig(**f, qkv_bias=True, layer_types=types, sliding_window=window)


def parse_qwen3(r: ConfigReader) -> ModelConfig:
  f = core_fields(r, tie_default=False)
  bias = r.bool('attention_bias', False)
  types, window = qwen_sliding(r, f['num_hidden_layers'])
  return ModelConfig(**f, qkv_bias=bias, o_bias=bias, qk_norm=True, layer_types=types,
                     sliding_window=window)


PARSERS = {
    'llama': parse_llama,
    'qwen2': parse_qwen2,
    'qwen3': parse_qwen3,
}
