"""Tiny checkpoints made by transformers itself: test fixtures and the demo model.

Nothing can be downloaded, so every checkpoint the tests and the demo use is
built here: a transformers config with a few layers, random init with a fixed
seed, `save_pretrained` to safetensors, and a byte-level BPE tokenizer trained
with the `tokenizers` library on the built-in corpus. The demo checkpoint has
a planted outlier: one MLP unit of a known layer fires on the BOS token and
writes a large value into a known residual channel, the way massive
activations look in real models (a few tokens, one channel, from one layer on).

This module imports torch (inside the functions); the measurement path does not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from maxact_jax.corpus import builtin_corpus
from maxact_jax.errors import UserError

BOS = '<|bos|>'
EOS = '<|eos|>'
PAD = '<|pad|>'

# Small but complete shapes per family (GQA, several layers).
TINY: dict[str, dict[str, Any]] = {
    'llama': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
    'qwen2': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2),
    'qwen3': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
    # Gemma: MQA as gemma-2b.
    'gemma': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16),
    # Gemma2/3: windows shorter than the test sequences, query_pre_attn_scalar != head_dim,
    # soft-caps and a weight scale (initializer_range) at which the caps bend the logits.
    'gemma2': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=3.0, final_logit_softcapping=2.0, initializer_range=0.2),
    'gemma3_text': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
                        rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                                            'rope_theta': 1_000_000.0},
                                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0}},
                        final_logit_softcapping=2.0, initializer_range=0.2),
    'qwen2_5_vl': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, rope_scaling={'type': 'mrope', 'mrope_section': [2, 3, 3]}),
    # Hybrids: 3 linear-attention layers then 1 full-attention layer (full_attention_interval 4);
    # 2 key heads serving 4 value heads; rotary on a quarter of each head (4 of 16 dims).
    'qwen3_5_text': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                         linear_key_head_dim=16, linear_value_head_dim=16),
    'qwen3_5_moe_text': dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=48),
}


def spread_linear_attention_decays(model) -> None:
  """Gated DeltaNet heads with decay rates A from 1e-3 to 1 (memories of ~1000 tokens
  down to ~1). transformers draws A ~ U(0.01, 16), so nearly every head forgets within a
  few tokens and a recurrent state carried across 64-token chunks would go untested."""
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel

  with torch.no_grad():
    for module in model.modules():
      if hasattr(module, 'A_log') and hasattr(module, 'dt_bias'):
        module.A_log.copy_(torch.log(torch.logspace(-3, 0, module.A_log.numel())))


# model_type -> adjustments applied after transformers' random init.
POST_INIT = {
    'qwen3_5_text': (spread_linear_attention_decays,),
    'qwen3_5_moe_text': (spread_linear_attention_decays,),
    'qwen3_5': (spread_linear_attention_decays,),
    'qwen3_5_moe': (spread_linear_attention_decays,),
}
TINY['gemma3'] = TINY['gemma3_text']
TINY['qwen3_5'] = TINY['qwen3_5_text']
TINY['qwen3_5_moe'] = TINY['qwen3_5_moe_text']


@dataclasses.dataclass(frozen=True)
class Multimodal:
  """A multimodal wrapper: the text shape goes into text_config, beside a tiny vision tower."""

  vision: dict[str, Any]
  top: dict[str, Any] = dataclasses.field(default_factory=dict)


MULTIMODAL: dict[str, Multimodal] = {
    'gemma3': Multimodal(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14), dict(mm_tokens_per_image=4)),
    'qwen2_5_vl': Multimodal(dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)),
    'qwen3_5': Multimodal(dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)),
    'qwen3_5_moe': Multimodal(dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)),
}
# Families whose RMSNorm weights start at zero ((1 + w) norms): random fixtures give
# them random weights, so that a norm applied in the wrong place cannot go unseen.
ZERO_INIT_NORMS = frozenset({'gemma', 'gemma2', 'gemma3_text', 'gemma3'})


def config_class(model_type: str):
  # Optional PyTorch side; measuring never imports it.
  import transformers  # pylint: disable=import-outside-toplevel

  return transformers.AutoConfig.for_model(model_type).__class__


def make_config(model_type: str, vocab_size: int = 256, **overrides):
  """A tiny transformers config of `model_type` (overrides win)."""
  kwargs = copy.deepcopy(TINY.get(model_type, {}))
  kwargs.update(vocab_size=vocab_size, tie_word_embeddings=False)
  kwargs.update(overrides)
  wrapper = MULTIMODAL.get(model_type)
  if wrapper is not None:
    tie = kwargs.pop('tie_word_embeddings')
    return config_class(model_type)(text_config=kwargs, vision_config=dict(wrapper.vision),
                                    tie_word_embeddings=tie, **wrapper.top)
  return config_class(model_type)(**kwargs)


def random_model(config, seed: int = 0, dtype: str = 'float32'):
  """transformers' own random init of `config`, deterministic for `seed`."""
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  auto = (transformers.AutoModelForImageTextToText if config.model_type in MULTIMODAL
          else transformers.AutoModelForCausalLM)
  model = auto.from_config(config, dtype=getattr(torch, dtype))
  if config.model_type in ZERO_INIT_NORMS:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith('norm.weight'):
          p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype))
  for adjust in POST_INIT.get(config.model_type, ()):
    adjust(model)
  return model.eval()


def save_checkpoint(model, out_dir: str, tokenizer_dir: str | None = None, max_shard_size: str | None = None,
                    original_format: bool = True) -> str:
  """save_pretrained; `original_format=False` keeps transformers 5's module key names
  (e.g. `model.language_model.layers...`) instead of the hub's original ones."""
  os.makedirs(out_dir, exist_ok=True)
  kwargs: dict[str, Any] = {'max_shard_size': max_shard_size} if max_shard_size else {}
  if not original_format:
    kwargs['save_original_format'] = False
  model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
  if tokenizer_dir:
    for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src):
        with open(src, 'rb') as f, open(os.path.join(out_dir, name), 'wb') as g:
          g.write(f.read())
  return out_dir


def tiny_checkpoint(model_type: str, out_dir: str, *, seed: int = 0, vocab_size: int = 256,
                    dtype: str = 'float32', tokenizer_dir: str | None = None, original_format: bool = True,
                    **overrides) -> str:
  """Build and save a random-init tiny checkpoint; returns its directory."""
  if tokenizer_dir:
    vocab_size = tokenizer_vocab_size(tokenizer_dir)
  model = random_model(make_config(model_type, vocab_size, **overrides), seed, dtype)
  return save_checkpoint(model, out_dir, tokenizer_dir, original_format=original_format)


# ---------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 2048) -> str:
  """A byte-level BPE tokenizer that prepends BOS, saved as tokenizer.json."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(single=f'{BOS} $A', pair=f'{BOS} $A {BOS} $B',
                                                     special_tokens=[(BOS, bos_id)])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, 'tokenizer.json'))
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': BOS, 'eos_token': EOS,
               'pad_token': PAD, 'model_max_length': 1 << 20}, f, indent=2)
  return out_dir


def tokenizer_vocab_size(tokenizer_dir: str) -> int:
  return Tokenizer.from_file(os.path.join(tokenizer_dir, 'tokenizer.json')).get_vocab_size()


def token_id(tokenizer_dir: str, token: str) -> int:
  return Tokenizer.from_file(os.path.join(tokenizer_dir, 'tokenizer.json')).token_to_id(token)


# ---------------------------------------------------------------------------
# Planted outlier.


@dataclasses.dataclass(frozen=True)
class PlantedOutlier:
  layer: int
  channel: int
  token_id: int
  unit: int  # the MLP intermediate unit that fires
  strength: float  # the down_proj weight written into the channel

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def plant_outlier(model, *, layer: int, channel: int, token_id: int, unit: int = 0,
                  strength: float = 40.0, fire: float = 6.0, marker_scale: float = 30.0,
                  probe_ids: list[list[int]] | None = None) -> PlantedOutlier:
  """Make MLP unit `unit` of `layer` fire on `token_id` only and write into `channel`.

  In a random-init model the attention outputs dominate every token's
  residual stream and are shared mixtures, so no direction of the normalised
  hidden state separates one token from the rest by much: a unit aligned with
  the trigger's mean state also fires on many ordinary tokens (10% of the
  built-in corpus's tokens at the demo's layer 2 passed Sun's criterion).
  Two steps make the trigger stand apart, as a trained BOS does:

  1. the trigger's embedding row is scaled by `marker_scale`, so that its own
     residual stream is dominated by its embedding (other tokens see it only
     through the normalised attention values, which do not scale);
  2. the unit's gate and up rows point along the trigger's mean normalised
     state minus the mean state of every other token (measured on
     `probe_ids`), so the component common to all tokens does not fire it.

  The rows are scaled so the trigger's pre-activation is `fire`;
  down_proj[channel, unit] = strength then puts silu(fire) * fire * strength
  (about 1436 for the defaults) into the residual channel for the trigger,
  and at most about 70 for any other token of the built-in corpus in the demo
  (their projection stays under a quarter of the trigger's; a negative
  projection gives at most 0.48 * strength through silu's dip). Without a
  bias the unit still writes a background of a few units into the channel
  for ordinary tokens (their small projections, squared by gate * up).

  When the MLP has biases (llama's `mlp_bias`), the gate gets a threshold
  instead: pre-activation fire + gain * (r - 1) with gain = 4 * fire, where r
  is the token's projection relative to the trigger's. The trigger still gets
  `fire`; a token at r = 0.25 gets -12 * fire / 6, where silu is ~0, so the
  background vanishes too.
  """
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel

  decoder = model.model.layers[layer]
  with torch.no_grad():
    model.model.embed_tokens.weight[token_id] *= marker_scale
  captured = []
  hook = decoder.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
  probe_ids = probe_ids or [[token_id] + list(range(3, 40))]
  with torch.no_grad():
    for ids in probe_ids:
      model(input_ids=torch.tensor([ids]))
  hook.remove()
  states = torch.cat([h[0] for h in captured])
  is_trigger = torch.cat([torch.tensor(ids) == token_id for ids in probe_ids])
  direction = states[is_trigger].mean(0) - states[~is_trigger].mean(0)
  scale = fire / float(states[is_trigger].mean(0) @ direction)
  with torch.no_grad():
    mlp = decoder.mlp
    if mlp.gate_proj.bias is not None:
      gain = 4.0 * fire
      mlp.gate_proj.weight[unit] = direction * scale * gain / fire
      mlp.gate_proj.bias[unit] = fire - gain
      mlp.up_proj.bias[unit] = 0.0
    else:
      mlp.gate_proj.weight[unit] = direction * scale
    mlp.up_proj.weight[unit] = direction * scale
    mlp.down_proj.weight[:, unit] = 0.0
    mlp.down_proj.weight[channel, unit] = strength
  return PlantedOutlier(layer, channel, token_id, unit, strength)


# ---------------------------------------------------------------------------
# The demo checkpoint.

DEMO_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32)
# The MoE demo: the same attention, a qwen3_moe block (16 experts, 2 per token) in every
# layer, no planted outlier: the report sets it beside the dense demo.
DEMO_MOE = dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=192, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[])
DEMO_KINDS = ('dense', 'moe')
DEMO_OUTLIER = dict(layer=2, channel=37, unit=11)
DEMO_INFO = 'maxact_demo.json'
# 2: the planted unit fires on BOS only (marker embedding, direction against the mean).
# 3: a demo kind (dense or moe) is recorded.
DEMO_VERSION = 3


def build_demo_checkpoint(out_dir: str, kind: str = 'dense', seed: int = 0) -> str:
  """The built-in default model: a qwen3-shaped random init with a planted outlier on
  BOS (`kind='dense'`), or its qwen3_moe sibling without one (`kind='moe'`)."""
  texts = [r['text'] for r in builtin_corpus(seed=seed)[:600]]  # enough to train a 4k vocabulary
  tmp = out_dir + '.partial'
  tok_dir = train_tokenizer(texts, tmp, vocab_size=4096)
  vocab = tokenizer_vocab_size(tok_dir)
  info: dict[str, Any] = {'seed': seed, 'kind': kind, 'version': DEMO_VERSION}
  if kind == 'moe':
    model = random_model(make_config('qwen3_moe', vocab, **DEMO_SHAPE, **DEMO_MOE), seed)
  else:
    model = random_model(make_config('qwen3', vocab, **DEMO_SHAPE), seed)
    bos = token_id(tok_dir, BOS)
    tok = Tokenizer.from_file(os.path.join(tok_dir, 'tokenizer.json'))
    probes = [e.ids[:64] for e in tok.encode_batch(texts[:8])]
    info['planted_outlier'] = plant_outlier(model, token_id=bos, probe_ids=probes, **DEMO_OUTLIER).to_json()
  info['model_type'] = model.config.model_type
  save_checkpoint(model, tmp)
  with open(os.path.join(tmp, DEMO_INFO), 'w') as f:
    json.dump(info, f, indent=2)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


def demo_checkpoint_dir(kind: str = 'dense') -> str:
  """Where a demo checkpoint lives: under $MAXACT_DEMO_DIR or the project's runs/:
  demo-checkpoint (dense) and demo-moe-checkpoint (MoE)."""
  root = os.environ.get('MAXACT_DEMO_DIR') or os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'runs')
  return os.path.join(root, 'demo-checkpoint' if kind == 'dense' else f'demo-{kind}-checkpoint')


def ensure_demo_checkpoint(path: str | None = None, kind: str = 'dense') -> str:
  if kind not in DEMO_KINDS:
    raise UserError(f'--demo={kind}: the demo checkpoints are {", ".join(DEMO_KINDS)}')
  path = path or demo_checkpoint_dir(kind)
  if demo_version(path) != DEMO_VERSION:  # missing, or built by an older version: (re)build
    try:
      # Is the optional PyTorch side installed?
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise UserError('building the demo checkpoint needs torch and transformers '
                      '(pip install maxact-jax[torch]); or pass --model_path') from None
    print(f'building the {kind} demo checkpoint in {path} (once) ...', flush=True)
    build_demo_checkpoint(path, kind)
  return path


def demo_version(model_dir: str) -> int | None:
  """The version of the demo checkpoint in `model_dir` (None when there is none; 1 before versions)."""
  path = os.path.join(model_dir, DEMO_INFO)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get('version', 1)


def planted_info(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, DEMO_INFO)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get('planted_outlier')


def random_token_ids(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab_size, n).tolist() for n in lengths]
