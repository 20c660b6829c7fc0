"""Tiny MoE checkpoints for tests: transformers' own models, and a Ling-layout one.

Random init leaves some parameters constant (biases and score-correction biases at
zero, norm weights at one, small attention sinks), so a bug in how they are used
would go unseen; `jitter_constants` gives every parameter a random value. The
experts' init is scaled up (initializer_range) so that MoE outputs are of order
one and the float32 tolerance of crosscheck means something.

Ling 2.0 (`bailing_moe`) has no transformers implementation here; its modeling
code ships with each checkpoint. `ling_checkpoint` writes a checkpoint in the real
Ling layout (fused `attention.query_key_value`, `attention.dense`,
`word_embeddings`, `query_layernorm`/`key_layernorm`, per-expert tensors,
`mlp.gate.expert_bias`, MTP layer tensors after the stack) and a Ling config.json,
from a transformers glm4_moe model configured to compute the same function
(qk-norm on, partial rotary 0.5, no attention bias, renormalised top-k, one
ungated shared expert, first layer dense). That glm4_moe model is then the
PyTorch reference for our bailing_moe.

This module imports torch (inside the functions); the measurement path does not.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from converters.safetensors_io import write_safetensors
from maxact_jax import fixtures

# Tiny shapes: GQA, a few layers, 8 experts (4 groups of 2 for the grouped routers).
TINY_MOE: dict[str, dict[str, Any]] = {
    'qwen3_moe': dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[1], initializer_range=0.1),
    'gpt_oss': dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=6, swiglu_limit=1.0, initializer_range=0.1),
    'glm4_moe': dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, n_group=4, topk_group=2, n_shared_experts=1,
                     first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True,
                     initializer_range=0.1),
}

# Constant-at-init parameters get this much noise; sinks and correction biases more,
# so that they change which keys / experts win.
JITTER = {'sinks': 1.0, 'e_score_correction_bias': 0.1, 'default': 0.1}


def jitter_constants(model, seed: int = 1) -> None:
  """Add noise to every parameter or buffer whose entries are all equal (in place)."""
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      if not t.is_floating_point() or t.numel() < 2 or 'inv_freq' in name:
        continue
      if bool((t == t.reshape(-1)[0]).all()):
        std = next((v for k, v in JITTER.items() if k in name), JITTER['default'])
        t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * std)


def moe_model(model_type: str, seed: int = 0, vocab_size: int = 256, **overrides):
  """A tiny transformers MoE model with every parameter random."""
  kwargs = dict(TINY_MOE[model_type])
  kwargs.update(overrides)
  model = fixtures.random_model(fixtures.make_config(model_type, vocab_size, **kwargs), seed)
  jitter_constants(model, seed + 1)
  return model


def moe_checkpoint(model_type: str, out_dir: str, seed: int = 0, **overrides) -> str:
  return fixtures.save_checkpoint(moe_model(model_type, seed, **overrides), out_dir)


# ---------------------------------------------------------------------------
# Ling (bailing_moe) from glm4_moe.

LING_AUTO_MAP = {
    'AutoConfig': 'configuration_bailing_moe_v2.BailingMoeV2Config',
    'AutoModel': 'modeling_bailing_moe_v2.BailingMoeV2Model',
    'AutoModelForCausalLM': 'modeling_bailing_moe_v2.BailingMoeV2ForCausalLM',
}


def ling_config(glm_config, mtp_layers: int = 1) -> dict[str, Any]:
  """A Ling 2.0 config.json (the export tool's field names) for a glm4_moe config."""
  c = glm_config
  rope = c.rope_parameters
  return {
      'architectures': ['BailingMoeV2ForCausalLM'],
      'auto_map': LING_AUTO_MAP,
      'model_type': 'bailing_moe',
      'vocab_size': c.vocab_size,
      'hidden_size': c.hidden_size,
      'intermediate_size': c.intermediate_size,
      'num_hidden_layers': c.num_hidden_layers,
      'num_attention_heads': c.num_attention_heads,
      'num_key_value_heads': c.num_key_value_heads,
      'head_dim': c.head_dim,
      'hidden_act': 'silu',
      'use_qkv_bias': False,
      'use_bias': False,
      'use_qk_norm': True,
      'rms_norm_eps': c.rms_norm_eps,
      'tie_word_embeddings': False,
      'max_position_embeddings': c.max_position_embeddings,
      'rope_theta': rope['rope_theta'],
      'rope_scaling': None,
      'partial_rotary_factor': rope.get('partial_rotary_factor', 0.5),
      'num_experts': c.n_routed_experts,
      'num_shared_experts': c.n_shared_experts,
      'num_experts_per_tok': c.num_experts_per_tok,
      'n_group': c.n_group,
      'topk_group': c.topk_group,
      'moe_intermediate_size': c.moe_intermediate_size,
      'moe_shared_expert_intermediate_size': c.moe_intermediate_size * c.n_shared_experts,
      'first_k_dense_replace': c.first_k_dense_replace,
      'routed_scaling_factor': c.routed_scaling_factor,
      'norm_topk_prob': True,
      'score_function': 'sigmoid',
      'router_dtype': 'fp32',
      'moe_router_enable_expert_bias': True,
      'num_nextn_predict_layers': mtp_layers,
      'mtp_loss_scaling_factor': 0.1,
      'embedding_dropout': 0.0,
      'output_dropout': 0.0,
      'output_router_logits': False,
      'use_cache': True,
      'torch_dtype': 'float32',
      'pad_token_id': 0,
      'eos_token_id': 1,
      'initializer_range': c.initializer_range,
  }


def hub_state_dict(model) -> dict[str, Any]:
  """The tensors as save_pretrained writes them (transformers 5 reverts its load-time
  expert merge: per-expert `mlp.experts.{e}.*_proj.weight`); works on meta tensors."""
  # Optional PyTorch side.
  from transformers.core_model_loading import revert_weight_conversion  # pylint: disable=import-outside-toplevel

  return revert_weight_conversion(model, model.state_dict())


LING_RENAMES = (
    ('model.embed_tokens.', 'model.word_embeddings.'),
    ('.self_attn.q_proj.', '.attention.query_key_value.'),  # q, k, v rows fused, in that order
    ('.self_attn.o_proj.', '.attention.dense.'),
    ('.self_attn.q_norm.', '.attention.query_layernorm.'),
    ('.self_attn.k_norm.', '.attention.key_layernorm.'),
    ('.mlp.gate.e_score_correction_bias', '.mlp.gate.expert_bias'),
)


def ling_name(key: str) -> str | None:
  """Ling's checkpoint name of a glm4_moe hub-layout tensor (None: k/v, fused into q's)."""
  if '.self_attn.k_proj.' in key or '.self_attn.v_proj.' in key:
    return None
  for old, new in LING_RENAMES:
    key = key.replace(old, new)
  return key


def mtp_names(layer_names: list[str], num_layers: int, mtp_layers: int) -> list[str]:
  """Tensor names of MTP layers num_layers.. : the last decoder layer's, plus the MTP-only ones."""
  last = f'model.layers.{num_layers - 1}.'
  out = []
  for j in range(mtp_layers):
    p = f'model.layers.{num_layers + j}.'
    out += [p + k[len(last):] for k in layer_names if k.startswith(last)]
    out += [f'{p}{name}.weight' for name in ('enorm', 'hnorm', 'final_layernorm', 'eh_proj')]
  return out


def ling_tensors(glm_model, mtp_layers: int = 1, seed: int = 2) -> dict[str, np.ndarray]:
  """The glm4_moe model's weights renamed and fused into Ling's checkpoint layout,
  plus random MTP-layer tensors (which a correct loader skips)."""
  c = glm_model.config
  sd = {k: v.detach().float().numpy() for k, v in hub_state_dict(glm_model).items()}
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    name = ling_name(key)
    if name is None:
      continue
    if key.endswith('.self_attn.q_proj.weight'):
      p = key[:-len('q_proj.weight')]
      value = np.concatenate([value, sd[p + 'k_proj.weight'], sd[p + 'v_proj.weight']], axis=0)
    out[name] = value
  rng = np.random.RandomState(seed)
  d = c.hidden_size
  for name in mtp_names(list(out), c.num_hidden_layers, mtp_layers):
    if name.endswith('eh_proj.weight'):
      out[name] = rng.standard_normal((d, 2 * d)).astype(np.float32) * 0.02
    elif name.endswith(('enorm.weight', 'hnorm.weight', 'final_layernorm.weight')):
      out[name] = np.ones(d, np.float32)
    else:
      src = f'model.layers.{c.num_hidden_layers - 1}.' + name.split('.', 3)[3]
      out[name] = rng.standard_normal(out[src].shape).astype(np.float32) * 0.02
  return out


def ling_checkpoint(out_dir: str, seed: int = 0, mtp_layers: int = 1, **overrides):
  """(Ling-layout checkpoint directory, the glm4_moe model computing the same function)."""

  glm = moe_model('glm4_moe', seed, **overrides)
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(os.path.join(out_dir, 'model.safetensors'), ling_tensors(glm, mtp_layers, seed + 2))
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(ling_config(glm.config, mtp_layers), f, indent=2, sort_keys=True)
  return out_dir, glm
