"""Full-size checks with the paper checkpoints' real config.json, no weights loaded.

For gemma-2b, gemma-3-4b-it, gemma-3-27b-it, Qwen2.5-VL-3B/7B-Instruct (from
configs/real) and a gemma2 config written with the fields the released
gemma-2 checkpoints use:
- our ModelConfig reads what transformers reads (dimensions, layer kinds,
  windows, query scale, rope frequencies per layer kind, soft-caps, tying);
- the Flax model builds at full size under jax.eval_shape with exactly as many
  parameters as transformers' text model on the meta device;
- the converter's key map covers exactly the tensor names of the checkpoint,
  in both key layouts: transformers' module names (the meta model's
  state_dict) and the hub's original names (that state_dict reverted by
  transformers' own save-time conversion), with every skipped tensor a vision
  or projector tensor (or the tied head).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

import converters
from converters.weight_map import check_coverage, plan, resolve_layout
from maxact_jax import torch_reference
from maxact_jax.config import SLIDING_ATTENTION
from maxact_jax.families import parse_config
from maxact_jax.models import layers, transformer
from tests.conftest import REAL_CONFIGS

REAL = ['gemma-2b', 'gemma-3-4b-it', 'gemma-3-27b-it', 'Qwen2.5-VL-3B-Instruct', 'Qwen2.5-VL-7B-Instruct']
# Not a verified copy of google/gemma-2-9b's file (none is in configs/real): its
# public architecture with the legacy fields the released gemma-2 configs carry.
GEMMA2_9B = {
    'architectures': ['Gemma2ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
    'attn_logit_softcapping': 50.0, 'bos_token_id': 2, 'cache_implementation': 'hybrid', 'eos_token_id': 1,
    'final_logit_softcapping': 30.0, 'head_dim': 256, 'hidden_act': 'gelu_pytorch_tanh',
    'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 3584, 'initializer_range': 0.02,
    'intermediate_size': 14336, 'max_position_embeddings': 8192, 'model_type': 'gemma2',
    'num_attention_heads': 16, 'num_hidden_layers': 42, 'num_key_value_heads': 8, 'pad_token_id': 0,
    'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06, 'rope_theta': 10000.0, 'sliding_window': 4096,
    'sliding_window_size': 4096, 'torch_dtype': 'float32', 'use_cache': True, 'vocab_size': 256000,
}
CONFIGS = REAL + ['gemma2-9b-fields']
# Where each multimodal layout keeps the tensors the measurement skips on purpose.
SKIPPED_PREFIXES = {
    'gemma3': {'hub': ('vision_tower.', 'multi_modal_projector.'),
               'modules': ('model.vision_tower.', 'model.multi_modal_projector.')},
    'qwen2_5_vl': {'hub': ('visual.',), 'modules': ('model.visual.',)},
}


def raw_config(name: str) -> dict:
  if name == 'gemma2-9b-fields':
    return dict(GEMMA2_9B)
  with open(os.path.join(REAL_CONFIGS, name, 'config.json')) as f:
    return json.load(f)


class Reference:
  """transformers' view of one config: its config object and a meta-device model."""

  def __init__(self, name: str):
    raw = raw_config(name)
    self.config = transformers.AutoConfig.for_model(**raw)
    with torch.device('meta'):
      try:
        self.model = transformers.AutoModelForCausalLM.from_config(self.config)
      except ValueError:  # qwen2_5_vl has no causal-LM class
        self.model = transformers.AutoModelForImageTextToText.from_config(self.config)
    self.text = self.config.get_text_config()
    self.backbone = torch_reference.text_backbone(self.model)
    self.tied = self.model.lm_head.weight is self.model.get_input_embeddings().weight

  def tensor_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a checkpoint as save_pretrained writes it: 'modules' keeps
    transformers 5's module names, 'hub' reverts them to the original names (the default)."""
    state = remove_tied_weights_from_state_dict(self.model.state_dict(), self.model)
    if layout == 'hub':
      state = revert_weight_conversion(self.model, state)
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope='module')
def reference():
  cache: dict[str, Reference] = {}

  def get(name: str) -> Reference:
    if name not in cache:
      cache[name] = Reference(name)
    return cache[name]

  return get


@pytest.mark.parametrize('name', CONFIGS)
def test_config_reads_what_transformers_reads(name, reference):
  ours = parse_config(raw_config(name), name)
  ref = reference(name)
  t = ref.text
  attn = ref.backbone.layers[0].self_attn
  assert (ours.vocab_size, ours.hidden_size, ours.num_hidden_layers, ours.intermediate_size) == (
      t.vocab_size, t.hidden_size, t.num_hidden_layers, t.intermediate_size)
  assert (ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (
      t.num_attention_heads, t.num_key_value_heads, attn.head_dim)
  assert ours.rms_norm_eps == t.rms_norm_eps
  # Gemma's MLP reads hidden_act, Gemma2/3's hidden_activation.
  assert ours.hidden_act == (t.hidden_activation if t.model_type in ('gemma2', 'gemma3_text') else t.hidden_act)
  assert ours.scale == attn.scaling
  assert ours.tie_word_embeddings == ref.tied
  assert ours.layer_types == tuple(getattr(t, 'layer_types', None) or ('full_attention',) * t.num_hidden_layers)
  for i, kind in enumerate(ours.layer_types):
    want = ref.backbone.layers[i].self_attn.sliding_window if hasattr(attn, 'sliding_window') else None
    assert (ours.sliding_window if kind == SLIDING_ATTENTION else None) == want, i
  # Soft-caps: gemma2's attention applies its cap; the causal-LM heads cap their logits
  # (Gemma3ForConditionalGeneration does not).
  want_attn_cap = t.attn_logit_softcapping if t.model_type == 'gemma2' else None
  assert ours.attn_logit_softcap == want_attn_cap
  head_caps = isinstance(ref.model, (transformers.Gemma2ForCausalLM, transformers.Gemma3ForCausalLM))
  assert ours.final_logit_softcap == (t.final_logit_softcapping if head_caps else None)
  embed = ref.model.get_input_embeddings()
  assert ours.embed_scale == hasattr(embed, 'scalar_embed_scale')
  if ours.embed_scale:
    assert embed.scalar_embed_scale == ours.hidden_size**0.5


@pytest.mark.parametrize('name', CONFIGS)
def test_rope_frequencies_are_transformers(name, reference):
  """Per layer kind, the inverse frequencies of transformers' rotary module (built on
  the CPU from the same config) and its attention scaling.

  torch's float32 pow is faithful, not correctly rounded, so a frequency may differ by
  one ulp; numpy's float32 power differed in about 20% of them, the rounded float64
  power in about 1%.
  """
  ours = parse_config(raw_config(name), name)
  ref = reference(name)
  rotary_cls = type(ref.backbone.rotary_emb)
  rotary = rotary_cls(ref.text)
  for kind in sorted(set(ours.layer_types)):
    rope = ours.local_rope if (kind == SLIDING_ATTENTION and ours.local_rope is not None) else ours.rope
    if hasattr(rotary, f'{kind}_inv_freq'):  # gemma3: one rope per layer kind
      want, want_scaling = getattr(rotary, f'{kind}_inv_freq'), getattr(rotary, f'{kind}_attention_scaling')
    else:
      want, want_scaling = rotary.inv_freq, rotary.attention_scaling
    inv_freq, scaling = layers.inv_frequencies(rope, ours.head_dim)
    want = want.numpy()
    np.testing.assert_array_max_ulp(inv_freq, want, maxulp=1)
    assert np.mean(inv_freq != want) <= 0.02, f'{name} {kind}: {np.sum(inv_freq != want)} of {want.size} differ'
    assert scaling == want_scaling


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('name', CONFIGS)
def test_full_size_parameter_count_is_transformers(name, reference):
  ours = parse_config(raw_config(name), name)
  abstract = transformer.abstract_params(ours)  # jax.eval_shape: no weights allocated
  ref = reference(name)
  text = sum(p.numel() for p in ref.backbone.parameters())
  head = 0 if ref.tied else ref.model.lm_head.weight.numel()
  assert count(abstract) == text + head
  assert ('lm_head' in abstract) == (not ref.tied)


def layout_cases():
  return [(name, layout) for name in CONFIGS for layout in ('hub', 'modules')]


@pytest.mark.parametrize('name,layout', layout_cases())
def test_key_map_covers_the_checkpoint_exactly(name, layout, reference):
  ours = parse_config(raw_config(name), name)
  ref = reference(name)
  shapes = ref.tensor_shapes(layout)
  keys = list(shapes)
  wmap = converters.weight_map(ours)
  config, wmap = resolve_layout(ours, wmap, keys, name)
  plans = plan(config, wmap)
  check_coverage(plans, keys, wmap, config, name)  # no tensor missing, none unused unless skipped by rule
  used = {k for p in plans for r in p.recipes for k in r.keys}
  skipped = set(keys) - used
  prefixes = SKIPPED_PREFIXES.get(ours.model_type, {}).get(layout, ())
  assert all(k.startswith(prefixes) for k in skipped), sorted(skipped)[:5]
  assert bool(skipped) == bool(prefixes)  # multimodal: the vision side exists and is skipped, all of it
  # Every recipe's tensor has the shape its Flax parameter needs (on zero-stride views, no memory).
  for p in plans:
    target = p.shape[1:] if p.stacked else p.shape
    for recipe in p.recipes:
      views = [np.broadcast_to(np.float32(0), shapes[k]) for k in recipe.keys]
      assert recipe.build(*views).shape == target, (p.name, recipe.keys)
