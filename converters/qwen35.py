"""Weight maps of Qwen3.5 (qwen3_5, qwen3_5_moe; text-only and multimodal).

Flax submodules carry the checkpoint's names (`linear_attn.in_proj_qkv`,
`linear_attn.conv1d.weight` in torch's [C, 1, K] layout, `A_log`, `dt_bias`,
`mlp.gate.weight`), so the default rule covers almost everything. What is
special:

- Where the text model sits. Hub checkpoints and transformers' save_pretrained
  of the multimodal model put it under `model.language_model.`; save_pretrained
  of a text-only model built from a text config writes `model.`, but a text-only
  model loaded from a multimodal checkpoint writes `model.language_model.` back.
  Both prefixes are accepted; the checkpoint's own keys decide.
- Skipped on purpose: the vision tower (`model.visual.*`, the corpus is text)
  and the multi-token-prediction head of the hub checkpoints (`mtp.*`, not on
  the forward pass; transformers drops it on load too).
- MoE experts come in two layouts. Hub checkpoints store them fused, as
  transformers 5 holds them in memory: `mlp.experts.gate_up_proj` [E, 2I, D]
  (gate rows first) and `mlp.experts.down_proj` [E, D, I]. transformers 5's
  save_pretrained reverts its qwen2_moe-style conversion and writes one tensor
  per expert: `mlp.experts.{e}.{gate,up,down}_proj.weight`. Both are read; the
  Flax block keeps [E, D, 2I] / [E, I, D], the layout its grouped matmuls read.
"""

from converters import moe
from converters.weight_map import Layout, WeightMap
from maxact_jax.config import ModelConfig


SKIP = (
    (r'model\.visual\.', 'vision tower: only the language model is measured (text corpus)'),
    (r'mtp\.', 'multi-token-prediction head: not on the forward pass (transformers drops it too)'),
)

# Where the text model sits; the checkpoint's embedding tensor decides.
LAYOUTS = (
    Layout('text model', weight_prefix='model.', lm_head_key='lm_head.weight', skip=SKIP),
    Layout('multimodal', weight_prefix='model.language_model.', lm_head_key='lm_head.weight', skip=SKIP),
)

MAP = WeightMap(layouts=LAYOUTS)


def moe_map(config: ModelConfig) -> WeightMap:
  """The MoE map: experts fused (hub) or one tensor per expert (save_pretrained),
  the layouts every Qwen-style MoE shares (converters/moe.py)."""
  return WeightMap(layer_rules=moe.expert_rules(config), layouts=LAYOUTS)


MAPS = {
    'qwen3_5': MAP,
    'qwen3_5_text': MAP,
    'qwen3_5_moe': moe_map,
    'qwen3_5_moe_text': moe_map,
}
