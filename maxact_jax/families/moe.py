"""Mixture-of-experts families: qwen3_moe, gpt_oss, glm4_moe, bailing_moe (Ling 2.0).

Each parser reads the config.json fields its transformers (or, for Ling, remote)
implementation reads, and says in a comment where a field is deliberately not
used. The MoE block itself is `maxact_jax/models/moe.py`, configured by `MoEConfig`.
"""

from __future__ import annotations

import dataclasses

from maxact_jax.config import (FULL_ATTENTION, SLIDING_ATTENTION, ConfigReader, ModelConfig, MoEConfig,
                               default_head_dim, read_rope)
from maxact_jax.errors import UserError
from maxact_jax.families.dense import core_fields, read_layer_types


def _num_experts(r: ConfigReader, *names: str) -> int:
  """The expert count under whichever of its names the config uses (they must agree)."""
  values = {n: r.int(n, None) for n in names}
  found = {v for v in values.values() if v is not None}
  if not found:
    raise UserError(f'{r.where}: missing required field {names[0]!r} for model_type {r.model_type!r}')
  if len(found) > 1:
    raise UserError(f'{r.where}: {" and ".join(names)} disagree ({values})')
  return found.pop()


def _check_groups(r: ConfigReader, num_experts: int, n_group: int, topk_group: int) -> None:
  if n_group < 1 or num_experts % n_group:
    raise UserError(f'{r.where}: n_group {n_group} does not divide the {num_experts} experts')
  if not 1 <= topk_group <= n_group:
    raise UserError(f'{r.where}: topk_group {topk_group} must be between 1 and n_group {n_group}')
  if n_group > 1 and num_experts // n_group < 2:
    raise UserError(f'{r.where}: group-limited routing needs at least 2 experts per group')


def _check_top_k(r: ConfigReader, moe: MoEConfig) -> None:
  if not 1 <= moe.num_experts_per_tok <= moe.num_experts:
    raise UserError(f'{r.where}: num_experts_per_tok {moe.num_experts_per_tok} must be between 1 and '
                    f'the number of experts {moe.num_experts}')


def parse_qwen3_moe(r: ConfigReader) -> ModelConfig:
  f = core_fields(r, tie_default=False)
  n = f['num_hidden_layers']
  bias = r.bool('attention_bias', False)
  moe = MoEConfig(
      num_experts=_num_experts(r, 'num_experts', 'num_local_experts'),
      num_experts_per_tok=r.int('num_experts_per_tok', 8),
      moe_intermediate_size=r.int('moe_intermediate_size'),
      router='softmax_topk',
      norm_topk_prob=r.bool('norm_topk_prob', False),
  )
  _check_top_k(r, moe)
  # A layer is MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer.
  step = r.int('decoder_sparse_step', 1)
  mlp_only = set(r.get('mlp_only_layers', [], (list,)))
  if step < 1:
    raise UserError(f'{r.where}: decoder_sparse_step must be positive, got {step}')
  kinds = tuple('moe' if i not in mlp_only and moe.num_experts > 0 and (i + 1) % step == 0 else 'dense'
                for i in range(n))
  # Qwen3-MoE slides every layer when use_sliding_window is set (transformers ignores
  # max_window_layers for this family); off in every released checkpoint.
  window = r.get('sliding_window', None, (int,)) if r.bool('use_sliding_window', False) else None
  r.ignore('sliding_window', 'max_window_layers')
  types = read_layer_types(r, n, ((SLIDING_ATTENTION if window else FULL_ATTENTION),) * n)
  return ModelConfig(**f, qkv_bias=bias, o_bias=bias, qk_norm=True, moe=moe, mlp_layer_kinds=kinds,
                     layer_types=types, sliding_window=window)


def parse_gpt_oss(r: ConfigReader) -> ModelConfig:
  # hidden_act is not read by GptOssExperts (they use the clamped SwiGLU below).
  f = core_fields(r, tie_default=False, eps_default=1e-5)
  n = f['num_hidden_layers']
  r.ignore('experts_per_token', 'initial_context_length')  # old names transformers does not read
  if r.has('quantization_config'):
    q = r.sub('quantization_config')
    # The converter dequantises MXFP4 experts to the model dtype, as transformers does
    # when it cannot run the MXFP4 kernels (Mxfp4Config(dequantize=True)).
    q.expect('quant_method', ('mxfp4',))
    q.ignore('modules_to_not_convert', 'dequantize')
    q.finish()
  moe = MoEConfig(
      num_experts=_num_experts(r, 'num_local_experts', 'num_experts'),
      num_experts_per_tok=r.int('num_experts_per_tok', 4),
      # GptOssExperts: gate_up_proj [E, H, 2 * intermediate_size].
      moe_intermediate_size=f['intermediate_size'],
      router='topk_softmax',
      router_bias=True,
      expert_bias=True,
      swiglu_limit=r.float('swiglu_limit', 7.0),
      swiglu_alpha=r.float('swiglu_alpha', 1.702),
      router_name='router',
      router_logits_tap='topk_weights',
  )
  _check_top_k(r, moe)
  bias = r.bool('attention_bias', True)
  default = tuple(SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(n))
  return ModelConfig(
      **f, qkv_bias=bias, o_bias=bias, attention_sinks=True, moe=moe,
      layer_types=read_layer_types(r, n, default), sliding_window=r.int('sliding_window', 128),
      norm_weight_fp32=True)


def parse_glm4_moe(r: ConfigReader) -> ModelConfig:
  f = core_fields(r, tie_default=False, eps_default=1e-5)
  rope_params = r.raw.get('rope_parameters') or r.raw.get('rope_scaling') or {}
  if not r.has('partial_rotary_factor') and 'partial_rotary_factor' not in rope_params:
    # Glm4MoeConfig: kwargs.setdefault('partial_rotary_factor', 0.5).
    f['rope'] = dataclasses.replace(f['rope'], partial_rotary_factor=0.5)
  n = f['num_hidden_layers']
  num_experts = _num_experts(r, 'n_routed_experts', 'num_local_experts')
  n_group, topk_group = r.int('n_group', 1), r.int('topk_group', 1)
  _check_groups(r, num_experts, n_group, topk_group)
  moe_width = r.int('moe_intermediate_size', 1408)
  moe = MoEConfig(
      num_experts=num_experts,
      num_experts_per_tok=r.int('num_experts_per_tok', 8),
      moe_intermediate_size=moe_width,
      router='sigmoid_group_topk',
      norm_topk_prob=r.bool('norm_topk_prob', True),
      score_correction_bias=True,
      n_group=n_group,
      topk_group=topk_group,
      routed_scaling_factor=r.float('routed_scaling_factor', 1.0),
      shared_expert_intermediate_size=moe_width * r.int('n_shared_experts', 1),
      router_fp32=True,
      router_fp32_params=True,  # Glm4MoePreTrainedModel._keep_in_fp32_modules_strict
  )
  _check_top_k(r, moe)
  first_dense = r.int('first_k_dense_replace', 1)
  # MTP layers (model.layers.{N..}) are not run by transformers; their tensors are skipped.
  mtp = _num_mtp(r, 'num_nextn_predict_layers', 'num_mtp_layers')
  return ModelConfig(
      **f, qkv_bias=r.bool('attention_bias', False), qk_norm=r.bool('use_qk_norm', False), moe=moe,
      mlp_layer_kinds=tuple('dense' if i < first_dense else 'moe' for i in range(n)), mtp_layers=mtp)


def parse_bailing_moe(r: ConfigReader) -> ModelConfig:
  """Ling 2.0 (BailingMoeV2, remote code `modeling_bailing_moe_v2.py`): see docs/moe.md."""
  # Defaults are those of the remote BailingMoeV2Config (the Ling-mini-2.0 shape) for
  # the switches; sizes are required.
  head_dim = default_head_dim(r)
  heads = r.int('num_attention_heads')
  n = r.int('num_hidden_layers')
  num_experts = r.int('num_experts')
  n_group, topk_group = r.int('n_group', 8), r.int('topk_group', 4)
  _check_groups(r, num_experts, n_group, topk_group)
  moe_width = r.int('moe_intermediate_size')
  shared = r.int('num_shared_experts', 1)
  # The remote code hard-codes a float32 sigmoid router with an expert-bias buffer and
  # always renormalises the top-k weights (top_k > 1); these fields are not read by it.
  r.expect('score_function', ('sigmoid',), 'sigmoid')
  r.expect('router_dtype', ('fp32', 'float32'), 'fp32')
  r.expect('moe_router_enable_expert_bias', (True,), True)
  r.ignore('norm_topk_prob')
  # The shared expert's width is moe_intermediate_size * num_shared_experts in the
  # remote code; moe_shared_expert_intermediate_size is written by the export tool
  # but not read.
  r.ignore('moe_shared_expert_intermediate_size')
  r.expect('use_sliding_window', (False,), False)
  r.ignore('sliding_window', 'max_window_layers')
  r.expect('norm_head', (False,), False)
  r.ignore('embedding_dropout', 'output_dropout', 'mtp_loss_scaling_factor')
  moe = MoEConfig(
      num_experts=num_experts,
      num_experts_per_tok=r.int('num_experts_per_tok'),
      moe_intermediate_size=moe_width,
      router='sigmoid_group_topk',
      norm_topk_prob=True,
      score_correction_bias=True,
      n_group=n_group,
      topk_group=topk_group,
      routed_scaling_factor=r.float('routed_scaling_factor', 1.0),
      shared_expert_intermediate_size=moe_width * shared,
      router_fp32=True,  # the expert bias follows the model dtype (a plain buffer)
  )
  _check_top_k(r, moe)
  first_dense = r.int('first_k_dense_replace', 1)
  return ModelConfig(
      model_type=r.model_type,
      vocab_size=r.int('vocab_size'),
      hidden_size=r.int('hidden_size'),
      num_hidden_layers=n,
      num_attention_heads=heads,
      num_key_value_heads=r.int('num_key_value_heads', heads),
      head_dim=head_dim,
      intermediate_size=r.int('intermediate_size'),
      rms_norm_eps=r.float('rms_norm_eps', 1e-6),
      hidden_act=r.expect('hidden_act', ('silu',), 'silu'),
      tie_word_embeddings=r.bool('tie_word_embeddings', False),
      pad_token_id=r.get('pad_token_id', None, (int,)),
      rope=read_rope(r, head_dim, default_theta=600000.0),
      qkv_bias=r.bool('use_qkv_bias', False),
      o_bias=r.bool('use_bias', False),
      qk_norm=r.bool('use_qk_norm', True),
      moe=moe,
      mlp_layer_kinds=tuple('dense' if i < first_dense else 'moe' for i in range(n)),
      mtp_layers=_num_mtp(r, 'num_nextn_predict_layers'),
  )


def _num_mtp(r: ConfigReader, *names: str) -> int:
  return max([r.int(name, 0) for name in names])


PARSERS = {
    'qwen3_moe': parse_qwen3_moe,
    'gpt_oss': parse_gpt_oss,
    'glm4_moe': parse_glm4_moe,
    'bailing_moe': parse_bailing_moe,
}
