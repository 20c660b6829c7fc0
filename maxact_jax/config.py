"""Model configuration read from a checkpoint's config.json through a whitelist.

Each family (see `maxact_jax/families/`) reads the fields it understands with a
`ConfigReader`; a field that no family rule consumed is an error, never a
silent guess. The result is one frozen `ModelConfig` that the Flax model, the
converters and the planner share. This module holds the types, the reader and
the raw config.json; `maxact_jax.families.load_config` dispatches on model_type
to the family that parses it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from maxact_jax import gguf_config, gguf_file
from maxact_jax.errors import UserError

# Layer kinds, per layer (ModelConfig.layer_types).
FULL_ATTENTION = 'full_attention'
SLIDING_ATTENTION = 'sliding_attention'
LINEAR_ATTENTION = 'linear_attention'


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters, in the vocabulary of transformers' rope_parameters."""

  theta: float
  rope_type: str = 'default'  # default | linear | llama3 | yarn
  factor: float = 1.0
  partial_rotary_factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts block parameters (None on dense models)."""

  num_experts: int
  num_experts_per_tok: int
  moe_intermediate_size: int
  router: str = 'softmax_topk'  # how scores become routing weights; see models/moe.py ROUTERS
  norm_topk_prob: bool = True
  router_bias: bool = False  # a bias on the router projection (gpt-oss)
  expert_bias: bool = False  # experts' projections carry biases (gpt-oss)
  score_correction_bias: bool = False  # selection-only bias (sigmoid routers)
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  shared_expert_intermediate_size: int = 0
  shared_expert_gate: bool = False
  swiglu_limit: float | None = None  # gpt-oss clamped SwiGLU
  swiglu_alpha: float | None = None
  # The HF name of the router module: 'gate' (qwen3_moe, glm4_moe, bailing_moe) or 'router' (gpt-oss).
  router_name: str = 'gate'
  # Router matmul in float32 (input and weight upcast), as glm4_moe / bailing_moe do.
  router_fp32: bool = False
  # Router weight and correction bias stored in float32 whatever the model dtype
  # (transformers' _keep_in_fp32_modules_strict for glm4_moe).
  router_fp32_params: bool = False
  # What `layer_{i}_router_logits` holds: 'logits' (raw router logits [B, T, E]) or
  # 'topk_weights' (the routing weights [B, T, K]: what gpt-oss's MoE block returns
  # as its second output, hence what the reference recorded under that name).
  router_logits_tap: str = 'logits'


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
  """Gated DeltaNet linear-attention parameters (Qwen3.5 hybrid layers)."""

  num_key_heads: int
  num_value_heads: int
  key_head_dim: int
  value_head_dim: int
  conv_kernel_dim: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the Flax model needs, and nothing it does not."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float
  rope: RopeConfig
  hidden_act: str = 'silu'
  tie_word_embeddings: bool = False
  pad_token_id: int | None = None
  # Attention.
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_logit_softcap: float | None = None
  attention_sinks: bool = False
  attn_output_gate: bool = False
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  local_rope: RopeConfig | None = None  # rope of sliding layers where it differs
  # MLP / MoE.
  mlp_bias: bool = False
  moe: MoEConfig | None = None
  mlp_layer_kinds: tuple[str, ...] = ()  # per layer: 'dense' | 'moe'
  linear_attention: LinearAttentionConfig | None = None
  # Gemma-style options.
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight)
  embed_scale: bool = False  # embeddings times sqrt(hidden) inside the embedding module (the tap sees it)
  sandwich_norms: bool = False  # post-attention and pre/post feed-forward norms
  final_logit_softcap: float | None = None
  # RMSNorm multiplies the float32-normalised input by the weight before casting back
  # (gpt-oss), instead of casting first (llama).
  norm_weight_fp32: bool = False
  # Multi-token-prediction layers stored after the decoder stack (model.layers.{N + j}):
  # not part of the forward pass, so their tensors are skipped by the converter.
  mtp_layers: int = 0
  # Where the language model's tensors sit in the checkpoint (multimodal wrappers).
  weight_prefix: str = 'model.'
  lm_head_key: str = 'lm_head.weight'

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, 'layer_types', (FULL_ATTENTION,) * self.num_hidden_layers)
    if not self.mlp_layer_kinds:
      kind = 'moe' if self.moe is not None else 'dense'
      object.__setattr__(self, 'mlp_layer_kinds', (kind,) * self.num_hidden_layers)
    for name in ('layer_types', 'mlp_layer_kinds'):
      if len(getattr(self, name)) != self.num_hidden_layers:
        raise UserError(
            f'config: {name} has {len(getattr(self, name))} entries for '
            f'{self.num_hidden_layers} layers')

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim**-0.5


# ---------------------------------------------------------------------------
# Reading config.json.

# Fields that never change the forward pass of a decoder on token input, accepted by
# name wherever they appear. Grouped by where they come from; anything else a family
# does not read is refused (ConfigReader.finish).
INERT_FIELDS = frozenset({
    # transformers' PretrainedConfig: the generic attributes every config carries
    # (identity and serialization, output switches, task-head labels, the attention
    # and experts kernels chosen at load time), as transformers 4 and 5 write them.
    # `_model_name_or_path` is the GGUF file's general.name (transformers' GGUF load).
    'architectures', 'auto_map', 'transformers_version', 'torch_dtype', 'dtype', '_name_or_path',
    'name_or_path', '_model_name_or_path', '_commit_hash', 'model_name', 'use_cache', 'return_dict',
    'use_return_dict', 'output_attentions', 'output_hidden_states', 'torchscript', 'use_bfloat16',
    'tf_legacy_loss', 'pruned_heads', 'chunk_size_feed_forward', 'problem_type', 'id2label', 'label2id',
    'num_labels', 'finetuning_task', 'task_specific_params', 'prefix', 'tokenizer_class',
    'is_encoder_decoder', 'tie_encoder_decoder', 'is_decoder', 'add_cross_attention',
    'cross_attention_hidden_size', 'keys_to_ignore_at_inference', 'quantization_config_name',
    '_attn_implementation', '_attn_implementation_autoset', 'attn_implementation',
    '_experts_implementation', 'experts_implementation',
    # Token ids: which id is BOS, EOS, UNK, ... is the tokenizer's and generate()'s business;
    # the forward pass takes ids (pad_token_id, which a family may read, is not here).
    'bos_token_id', 'eos_token_id', 'unk_token_id', 'sep_token_id', 'cls_token_id', 'mask_token_id',
    'decoder_start_token_id', 'image_token_index',
    # Generation defaults (transformers 4 kept them on the config; generate() reads them).
    'max_length', 'min_length', 'max_new_tokens', 'do_sample', 'early_stopping', 'num_beams',
    'num_beam_groups', 'diversity_penalty', 'temperature', 'top_k', 'top_p', 'typical_p',
    'repetition_penalty', 'length_penalty', 'no_repeat_ngram_size', 'encoder_no_repeat_ngram_size',
    'bad_words_ids', 'num_return_sequences', 'output_scores', 'return_dict_in_generate',
    'forced_bos_token_id', 'forced_eos_token_id', 'remove_invalid_values',
    'exponential_decay_length_penalty', 'suppress_tokens', 'begin_suppress_tokens',
    # Training only: initialisation, dropout (off in evaluation), auxiliary losses.
    'initializer_range', 'attention_dropout', 'hidden_dropout', 'dropout', 'output_router_logits',
    'router_aux_loss_coef', 'router_z_loss_coef', 'chunk_size',
})

_REQUIRED = object()


class ConfigReader:
  """Reads config fields, remembering which ones were understood.

  `finish()` raises on any field nobody consumed: a config field this project
  does not know may change the model, and guessing is how parity breaks.
  """

  def __init__(self, raw: dict[str, Any], where: str = 'config.json'):
    if not isinstance(raw, dict):
      raise UserError(f'{where}: expected a JSON object')
    self.raw = raw
    self.where = where
    self.used: set[str] = {'model_type'}

  @property
  def model_type(self) -> str:
    return self.raw.get('model_type', '')

  def has(self, key: str) -> bool:
    return self.raw.get(key) is not None

  def get(self, key: str, default: Any = _REQUIRED, types: type | tuple[type, ...] | None = None):
    self.used.add(key)
    value = self.raw.get(key)
    if value is None:
      if default is _REQUIRED:
        raise UserError(f'{self.where}: missing required field {key!r} for model_type {self.model_type!r}')
      return default
    if types is not None and not isinstance(value, types):
      raise UserError(f'{self.where}: field {key!r} has value {value!r}, expected {_type_names(types)}')
    if isinstance(value, bool) and types in (int, float, (int, float)):
      raise UserError(f'{self.where}: field {key!r} has value {value!r}, expected a number')
    return value

  def int(self, key: str, default: Any = _REQUIRED) -> int:
    value = self.get(key, default, (int,))
    if value is not default and (isinstance(value, bool) or value < 0):
      raise UserError(f'{self.where}: field {key!r} must be a non-negative integer, got {value!r}')
    return value

  def float(self, key: str, default: Any = _REQUIRED) -> float:
    value = self.get(key, default, (int, float))
    return float(value) if value is not None else value

  def bool(self, key: str, default: Any = _REQUIRED) -> bool:
    return self.get(key, default, (bool,))

  def expect(self, key: str, allowed: tuple[Any, ...], default: Any = None):
    """A field whose only supported values are `allowed` (absent means `default`)."""
    value = self.get(key, default)
    if value not in allowed:
      raise UserError(
          f'{self.where}: field {key!r} = {value!r} is not supported for model_type '
          f'{self.model_type!r} (supported: {", ".join(map(repr, allowed))})')
    return value

  def ignore(self, *keys: str) -> None:
    """Fields known not to change the forward pass of this family."""
    self.used.update(keys)

  def sub(self, key: str) -> 'ConfigReader':
    """A reader over a nested object (text_config, rope_scaling)."""
    self.used.add(key)
    value = self.raw.get(key)
    if not isinstance(value, dict):
      raise UserError(f'{self.where}: field {key!r} must be an object')
    return ConfigReader(value, f'{self.where}:{key}')

  def finish(self) -> None:
    unknown = sorted(k for k in self.raw if k not in self.used and k not in INERT_FIELDS)
    if unknown:
      raise UserError(
          f'{self.where}: unknown config field(s) {", ".join(unknown)} for model_type '
          f'{self.model_type!r}; maxact-jax does not know how they change the model')


def _type_names(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return ' or '.join(t.__name__ for t in types)


def read_rope(reader: ConfigReader, head_dim: int, *, theta_key: str = 'rope_theta',
              default_theta: float = 10000.0, default_partial: float = 1.0,
              ignore: tuple[str, ...] = ()) -> RopeConfig:
  """Rope parameters from either the transformers-5 `rope_parameters` object or the
  older `rope_theta` + `rope_scaling` fields.

  `default_partial` is the family's partial rotary factor when the config names none
  (transformers: a value inside rope_parameters wins over a top-level field, which wins
  over the config class's default). `ignore` lists rope fields the family has checked
  do not change a text-only forward pass (e.g. Qwen3.5's mrope sections).
  """
  max_pos = reader.get('max_position_embeddings', None, (int,))
  partial = reader.float('partial_rotary_factor', default_partial)
  if reader.has('rope_parameters'):
    params = reader.sub('rope_parameters')
    theta = params.float('rope_theta', reader.float(theta_key, default_theta))
    reader.ignore(theta_key)
    scaling = params
    rope_type = params.get('rope_type', params.get('type', 'default'))
  else:
    theta = reader.float(theta_key, default_theta)
    if reader.has('rope_scaling'):
      scaling = reader.sub('rope_scaling')
      rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
    else:
      reader.ignore('rope_scaling')
      scaling = ConfigReader({})
      rope_type = 'default'
  scaling.ignore('type', 'rope_type', 'rope_theta', *ignore)
  partial = scaling.float('partial_rotary_factor', partial)
  kwargs: dict[str, Any] = {}
  if rope_type == 'default':
    pass
  elif rope_type == 'linear':
    kwargs['factor'] = scaling.float('factor')
  elif rope_type == 'llama3':
    kwargs.update(
        factor=scaling.float('factor'),
        low_freq_factor=scaling.float('low_freq_factor'),
        high_freq_factor=scaling.float('high_freq_factor'),
        original_max_position_embeddings=scaling.int('original_max_position_embeddings'))
  elif rope_type == 'yarn':
    kwargs.update(
        factor=scaling.float('factor'),
        original_max_position_embeddings=scaling.int('original_max_position_embeddings'),
        beta_fast=scaling.float('beta_fast', 32.0),
        beta_slow=scaling.float('beta_slow', 1.0),
        truncate=scaling.bool('truncate', True),
        attention_factor=scaling.float('attention_factor', None),
        mscale=scaling.float('mscale', None),
        mscale_all_dim=scaling.float('mscale_all_dim', None),
        max_position_embeddings=max_pos)
  else:
    raise UserError(f'{reader.where}: rope type {rope_type!r} is not supported '
                    '(supported: default, linear, llama3, yarn)')
  scaling.finish()
  rope = RopeConfig(theta=theta, rope_type=rope_type, partial_rotary_factor=partial, **kwargs)
  if int(head_dim * partial) % 2:
    raise UserError(f'{reader.where}: rotary dimension {head_dim * partial} must be even')
  return rope


def read_config_json(model_dir: str) -> dict[str, Any]:
  """The raw config.json of a checkpoint directory (for a GGUF file, the config.json
  its metadata describes: see gguf_config), with one-line errors."""
  if not model_dir:
    raise UserError('no --model_path given')
  gguf_path = gguf_file.find(model_dir)
  if gguf_path:
    return gguf_config.config_dict(gguf_file.open_file(gguf_path))
  if not os.path.exists(model_dir):
    raise UserError(f'model path {model_dir} does not exist')
  if not os.path.isdir(model_dir):
    raise UserError(f'model path {model_dir} is not a directory (expected a checkpoint directory)')
  path = os.path.join(model_dir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{model_dir} has no config.json: not a Hugging Face checkpoint directory')
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read {path}: {e}') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(raw, dict) or 'model_type' not in raw:
    raise UserError(f'{path} has no model_type field')
  return raw


def default_head_dim(reader: ConfigReader) -> int:
  hidden = reader.int('hidden_size')
  heads = reader.int('num_attention_heads')
  if heads == 0 or (not reader.has('head_dim') and hidden % heads):
    raise UserError(f'{reader.where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}')
  return reader.int('head_dim', hidden // heads)


__all__ = [
    'ConfigReader', 'LinearAttentionConfig', 'ModelConfig', 'MoEConfig', 'RopeConfig',
    'read_config_json', 'read_rope', 'default_head_dim',
    'FULL_ATTENTION', 'SLIDING_ATTENTION', 'LINEAR_ATTENTION',
]
