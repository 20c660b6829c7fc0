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


def ling_tensors(glm_model, mtp_layers: int = 1, seed: int = 2) -> dict[str, np.ndarray]:
  """The glm4_moe model's weights renamed and fused into Ling's checkpoint layout,
  plus random MTP-layer tensors (which a correct loader skips)."""
  c = glm_model.config
  sd = {k: v.detach().float().numpy() for k, v in glm_model.state_dict().items()}
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    if '.self_attn.k_proj.' in key or '.self_attn.v_proj.' in key:
      continue  # fused with q_proj below
    if key.endswith('.self_attn.q_proj.weight'):
      p = key[:-len('self_attn.q_proj.weight')]
      out[p + 'attention.query_key_value.weight'] = np.concatenate(
          [value, sd[p + 'self_attn.k_proj.weight'], sd[p + 'self_attn.v_proj.weight']], axis=0)
    elif key.endswith('.mlp.experts.gate_up_proj'):  # [E, 2I, D] in memory
      p = key[:-len('gate_up_proj')]
      i = value.shape[1] // 2
      for e in range(value.shape[0]):
        out[f'{p}{e}.gate_proj.weight'] = value[e, :i]
        out[f'{p}{e}.up_proj.weight'] = value[e, i:]
    elif key.endswith('.mlp.experts.down_proj'):  # [E, D, I]
      p = key[:-len('down_proj')]
      for e in range(value.shape[0]):
        out[f'{p}{e}.down_proj.weight'] = value[e]
    else:
      new = (key.replace('model.embed_tokens.', 'model.word_embeddings.')
             .replace('.self_attn.o_proj.', '.attention.dense.')
             .replace('.self_attn.q_norm.', '.attention.query_layernorm.')
             .replace('.self_attn.k_norm.', '.attention.key_layernorm.')
             .replace('.mlp.gate.e_score_correction_bias', '.mlp.gate.expert_bias'))
      out[new] = value
  rng = np.random.RandomState(seed)
  d, n = c.hidden_size, c.num_hidden_layers
  last = f'model.layers.{n - 1}.'
  for j in range(mtp_layers):
    p = f'model.layers.{n + j}.'
    for key in [k for k in out if k.startswith(last)]:
      out[p + key[len(last):]] = rng.standard_normal(out[key].shape).astype(np.float32) * 0.02
    for name in ('enorm', 'hnorm', 'final_layernorm'):
      out[f'{p}{name}.weight'] = np.ones(d, np.float32)
    out[f'{p}eh_proj.weight'] = rng.standard_normal((d, 2 * d)).astype(np.float32) * 0.02
  return out


def ling_checkpoint(out_dir: str, seed: int = 0, mtp_layers: int = 1, **overrides):
  """(Ling-layout checkpoint directory, the glm4_moe model computing the same function)."""
  from converters.safetensors_io import write_safetensors  # pylint: disable=import-outside-toplevel

  glm = moe_model('glm4_moe', seed, **overrides)
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(os.path.join(out_dir, 'model.safetensors'), ling_tensors(glm, mtp_layers, seed + 2))
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(ling_config(glm.config, mtp_layers), f, indent=2, sort_keys=True)
  return out_dir, glm
