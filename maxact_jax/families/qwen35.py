"""Qwen3.5 hybrids: qwen3_5 (dense) and qwen3_5_moe, text-only or multimodal.

A Qwen3.5 decoder interleaves Gated DeltaNet linear-attention layers with gated
full attention (q_proj packs [query | output gate] per head, q/k RMSNorm,
partial rotary), and every RMSNorm multiplies by (1 + weight). The hub
checkpoints are multimodal (`qwen3_5` / `qwen3_5_moe` with a `text_config`);
only the language model is measured, so the vision tower's config is
acknowledged and its tensors skipped (converters/qwen35.py). A text-only
checkpoint (`qwen3_5_text` / `qwen3_5_moe_text`) carries the same fields at top
level.

Defaults are those of transformers' Qwen3_5TextConfig / Qwen3_5MoeTextConfig.
"""

from __future__ import annotations

from maxact_jax.config import (FULL_ATTENTION, LINEAR_ATTENTION, ConfigReader, LinearAttentionConfig,
                               ModelConfig, MoEConfig, read_rope)
from maxact_jax.errors import UserError
from maxact_jax.families.dense import read_layer_types

TEXT_TYPES = {'qwen3_5': 'qwen3_5_text', 'qwen3_5_moe': 'qwen3_5_moe_text'}
# Multimodal wrapper fields that only matter for image / video input.
VISION_ONLY = ('vision_config', 'image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id')
# text-only positions make the three mrope sections (t, h, w) equal, so mrope is 1-D rope.
MROPE_FIELDS = ('mrope_section', 'mrope_interleaved')


def _text_reader(r: ConfigReader) -> tuple[ConfigReader, bool]:
  """(reader over the text model's fields, whether the config is a multimodal wrapper)."""
  if r.model_type not in TEXT_TYPES:
    return r, False
  t = r.sub('text_config')
  want = TEXT_TYPES[r.model_type]
  if t.raw.get('model_type', want) != want:
    raise UserError(f'{t.where}: model_type {t.raw.get("model_type")!r}, expected {want!r}')
  r.ignore(*VISION_ONLY)
  return t, True


def _fields(r: ConfigReader, t: ConfigReader, multimodal: bool, moe: bool) -> dict:
  n = t.int('num_hidden_layers')
  heads = t.int('num_attention_heads')
  head_dim = t.int('head_dim', 256)
  interval = t.int('full_attention_interval', 4)
  if interval < 1:
    raise UserError(f'{t.where}: full_attention_interval must be at least 1, got {interval}')
  default_types = tuple(LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(n))
  linear = LinearAttentionConfig(
      num_key_heads=t.int('linear_num_key_heads', 16),
      num_value_heads=t.int('linear_num_value_heads', 32),
      key_head_dim=t.int('linear_key_head_dim', 128),
      value_head_dim=t.int('linear_value_head_dim', 128),
      conv_kernel_dim=t.int('linear_conv_kernel_dim', 4))
  if not linear.num_key_heads or linear.num_value_heads % linear.num_key_heads:
    raise UserError(f'{t.where}: linear_num_value_heads {linear.num_value_heads} is not a multiple of '
                    f'linear_num_key_heads {linear.num_key_heads}')
  kv_heads = t.int('num_key_value_heads', 2 if moe else 4)
  if not kv_heads or heads % kv_heads:
    raise UserError(f'{t.where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}')
  bias = t.bool('attention_bias', False)
  # Fields of the hub configs that do not change transformers' forward pass:
  # the multi-token-prediction head (its mtp.* tensors are skipped) and vLLM's
  # SSM state dtype (the recurrent state here is float32, as transformers').
  t.ignore('mtp_num_hidden_layers', 'mtp_use_dedicated_embeddings')
  t.expect('mamba_ssm_dtype', ('float32',), 'float32')
  t.expect('attn_output_gate', (True,), True)
  t.expect('mlp_only_layers', ([],), [])
  # The wrapper's own tie_word_embeddings decides for the multimodal model (transformers
  # ties on the config of the model class that owns lm_head).
  tie = r.bool('tie_word_embeddings', False) if multimodal else t.bool('tie_word_embeddings', False)
  if multimodal:
    t.ignore('tie_word_embeddings')
  pad = t.get('pad_token_id', None, (int,))
  if multimodal and pad is None:
    pad = r.get('pad_token_id', None, (int,))
  return dict(
      model_type=r.model_type,
      vocab_size=t.int('vocab_size'),
      hidden_size=t.int('hidden_size'),
      num_hidden_layers=n,
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=t.float('rms_norm_eps', 1e-6),
      hidden_act=t.expect('hidden_act', ('silu',), 'silu'),
      tie_word_embeddings=tie,
      pad_token_id=pad,
      rope=read_rope(t, head_dim, default_partial=0.25, ignore=MROPE_FIELDS),
      qkv_bias=bias,
      o_bias=bias,
      qk_norm=True,
      attn_output_gate=True,
      layer_types=read_layer_types(t, n, default_types, allowed=(FULL_ATTENTION, LINEAR_ATTENTION)),
      linear_attention=linear,
      norm_offset=1.0,  # Qwen3_5RMSNorm: x_normed * (1 + weight), weight initialised to zeros
      weight_prefix='model.language_model.' if multimodal else 'model.',
  )


def parse_qwen3_5(r: ConfigReader) -> ModelConfig:
  t, multimodal = _text_reader(r)
  f = _fields(r, t, multimodal, moe=False)
  f['intermediate_size'] = t.int('intermediate_size')
  if multimodal:
    t.finish()
  return ModelConfig(**f)


def parse_qwen3_5_moe(r: ConfigReader) -> ModelConfig:
  t, multimodal = _text_reader(r)
  f = _fields(r, t, multimodal, moe=True)
  # Every layer is sparse: transformers builds Qwen3_5MoeSparseMoeBlock on all of them.
  t.expect('decoder_sparse_step', (1,), 1)
  # The router always renormalises its top-k weights.
  t.expect('norm_topk_prob', (True,), True)
  moe = MoEConfig(
      num_experts=t.int('num_experts', 256),
      num_experts_per_tok=t.int('num_experts_per_tok', 8),
      moe_intermediate_size=t.int('moe_intermediate_size', 512),
      router='softmax_topk',
      norm_topk_prob=True,
      shared_expert_intermediate_size=t.int('shared_expert_intermediate_size', 512),
      shared_expert_gate=True)
  if not 0 < moe.num_experts_per_tok <= moe.num_experts:
    raise UserError(f'{t.where}: num_experts_per_tok {moe.num_experts_per_tok} must be in 1..{moe.num_experts}')
  t.ignore('intermediate_size')  # no dense MLP in any qwen3_5_moe layer
  if multimodal:
    t.finish()
  return ModelConfig(**f, intermediate_size=0, moe=moe)


PARSERS = {
    'qwen3_5': parse_qwen3_5,
    'qwen3_5_text': parse_qwen3_5,
    'qwen3_5_moe': parse_qwen3_5_moe,
    'qwen3_5_moe_text': parse_qwen3_5_moe,
}
