"""Weight maps of the MoE families: qwen3_moe, glm4_moe, gpt_oss, bailing_moe (Ling 2.0).

The Flax experts are stacked per layer: `mlp/experts/gate_up_proj` [E, D, 2I] with
[gate | up] halves and `mlp/experts/down_proj` [E, I, D]. Checkpoints hold them as

- per-expert Linear weights `mlp.experts.{e}.{gate,up,down}_proj.weight` (the hub
  layout of Qwen3-MoE, GLM-4.5 and Ling, and what transformers 5 writes back with
  save_pretrained, reverting its load-time merge);
- fused tensors `mlp.experts.gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I]
  (transformers 5's in-memory layout, conversion_mapping "qwen2_moe");
- gpt-oss: `mlp.experts.gate_up_proj` [E, D, 2I] with gate and up *interleaved*
  (even / odd columns) and `down_proj` [E, I, D], or their MXFP4 form
  `*_blocks` / `*_scales` (the released checkpoints), dequantised here.

Each layout is an explicit Recipe; `OneOf` picks the one the checkpoint has.
"""

from __future__ import annotations

import re

import numpy as np

from converters import mxfp4
from converters.weight_map import OneOf, Recipe, WeightMap, same_name, transpose
from maxact_jax.config import ModelConfig


def _stack_gate_up(*weights: np.ndarray) -> np.ndarray:
  """[E, D, 2I] from gate_0..gate_{E-1}, up_0..up_{E-1}, each HF [I, D]."""
  e = len(weights) // 2
  i, d = weights[0].shape
  out = np.empty((e, d, 2 * i), np.result_type(*weights[:1]))
  for j in range(e):
    out[j, :, :i] = weights[j].T
    out[j, :, i:] = weights[e + j].T
  return out


def _stack_down(*weights: np.ndarray) -> np.ndarray:
  """[E, I, D] from down_0..down_{E-1}, each HF [D, I]."""
  return np.stack([w.T for w in weights])


def _transpose_experts(a: np.ndarray) -> np.ndarray:
  """HF fused [E, out, in] -> [E, in, out]."""
  return a.transpose(0, 2, 1)


def expert_rules(config: ModelConfig) -> dict:
  """Per-expert or fused SwiGLU experts (qwen3_moe, glm4_moe, bailing_moe)."""
  e = config.moe.num_experts

  def gate_up(prefix: str):
    per_expert = Recipe(tuple(f'{prefix}mlp.experts.{j}.gate_proj.weight' for j in range(e))
                        + tuple(f'{prefix}mlp.experts.{j}.up_proj.weight' for j in range(e)), _stack_gate_up)
    fused = Recipe((f'{prefix}mlp.experts.gate_up_proj',), _transpose_experts)
    return OneOf((per_expert, fused))

  def down(prefix: str):
    per_expert = Recipe(tuple(f'{prefix}mlp.experts.{j}.down_proj.weight' for j in range(e)), _stack_down)
    fused = Recipe((f'{prefix}mlp.experts.down_proj',), _transpose_experts)
    return OneOf((per_expert, fused))

  return {'mlp/experts/gate_up_proj': gate_up, 'mlp/experts/down_proj': down}


def mtp_skip(config: ModelConfig) -> tuple[tuple[str, str], ...]:
  """Multi-token-prediction layers stored after the decoder stack."""
  if not config.mtp_layers:
    return ()
  first = config.num_hidden_layers
  indices = '|'.join(str(first + j) for j in range(config.mtp_layers))
  return ((rf'{re.escape(config.weight_prefix)}layers\.({indices})\.',
           'multi-token-prediction (MTP) layers: an auxiliary training head, not part of the forward pass'),)


def qwen3_moe_map(config: ModelConfig) -> WeightMap:
  return WeightMap(layer_rules=expert_rules(config))


def glm4_moe_map(config: ModelConfig) -> WeightMap:
  return WeightMap(layer_rules=expert_rules(config), skip_for=mtp_skip)


# ---------------------------------------------------------------------------
# gpt-oss.


def _deinterleave(a: np.ndarray) -> np.ndarray:
  """gpt-oss gate/up interleaved on the last axis (gate even, up odd) -> [gate | up]."""
  return np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)


def _gate_up_from_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """[E, D, 2I] (halves) from MXFP4 blocks [E, 2I, G, 16] / scales [E, 2I, G]; one expert at a time."""
  e, rows = scales.shape[:2]
  cols = scales.shape[2] * 32
  out = np.empty((e, cols, rows), np.float32)
  for j in range(e):
    w = mxfp4.dequantize(blocks[j], scales[j])  # [2I, D], gate/up interleaved by row
    out[j, :, :rows // 2] = w[0::2].T
    out[j, :, rows // 2:] = w[1::2].T
  return out


def _down_from_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """[E, I, D] from MXFP4 blocks [E, D, G, 16] / scales [E, D, G]."""
  return np.stack([mxfp4.dequantize(blocks[j], scales[j]).T for j in range(scales.shape[0])])


def gpt_oss_map(config: ModelConfig) -> WeightMap:
  del config

  def gate_up(prefix: str):
    p = f'{prefix}mlp.experts.gate_up_proj'
    return OneOf((Recipe((p + '_blocks', p + '_scales'), _gate_up_from_mxfp4), Recipe((p,), _deinterleave)))

  def down(prefix: str):
    p = f'{prefix}mlp.experts.down_proj'
    return OneOf((Recipe((p + '_blocks', p + '_scales'), _down_from_mxfp4), Recipe((p,))))

  return WeightMap(layer_rules={
      'mlp/experts/gate_up_proj': gate_up,
      'mlp/experts/gate_up_proj_bias': same_name('mlp.experts.gate_up_proj_bias', _deinterleave),
      'mlp/experts/down_proj': down,
  })


# ---------------------------------------------------------------------------
# bailing_moe (Ling 2.0): the checkpoint's own module names.


def bailing_moe_map(config: ModelConfig) -> WeightMap:
  h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  # attention.query_key_value rows: all query heads, then all key heads, then all value heads.
  spans = {'q_proj': (0, h * hd), 'k_proj': (h * hd, (h + kv) * hd), 'v_proj': ((h + kv) * hd, (h + 2 * kv) * hd)}
  rules = dict(expert_rules(config))
  for name, (lo, hi) in spans.items():
    rules[f'self_attn/{name}/kernel'] = same_name('attention.query_key_value.weight',
                                                  lambda w, lo=lo, hi=hi: w[lo:hi].T)
    rules[f'self_attn/{name}/bias'] = same_name('attention.query_key_value.bias', lambda b, lo=lo, hi=hi: b[lo:hi])
  rules.update({
      'self_attn/o_proj/kernel': same_name('attention.dense.weight', transpose),
      'self_attn/o_proj/bias': same_name('attention.dense.bias'),
      'self_attn/q_norm/weight': same_name('attention.query_layernorm.weight'),
      'self_attn/k_norm/weight': same_name('attention.key_layernorm.weight'),
      'mlp/gate/e_score_correction_bias': same_name('mlp.gate.expert_bias'),
  })
  return WeightMap(layer_rules=rules, model_rules={'embed_tokens/embedding': same_name('word_embeddings.weight')},
                   skip_for=mtp_skip)


MAPS = {
    'qwen3_moe': qwen3_moe_map,
    'glm4_moe': glm4_moe_map,
    'gpt_oss': gpt_oss_map,
    'bailing_moe': bailing_moe_map,
}
