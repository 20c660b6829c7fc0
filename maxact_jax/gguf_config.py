"""A GGUF file's metadata as the Hugging Face config.json of its family.

The result is a plain config dict that goes through the same whitelist parsers
as any config.json (`maxact_jax.config`, `maxact_jax.families`), so a GGUF
checkpoint becomes exactly the `ModelConfig` its Hugging Face checkpoint would.
Most fields are renames (`COMMON_FIELDS`, `ARCH_FIELDS`); the rest follow rules
written once below, each from what llama.cpp's converter writes and its loader
reads:

- head_dim: `attention.key_length`, else `rope.dimension_count` (llama writes the
  rotary width, which is the head width for these families), else hidden / heads;
- tie_word_embeddings: llama.cpp writes `output.weight` only when it is not the
  embedding, and its loader reuses the embedding when it is absent;
- vocab_size: the rows of `token_embd.weight` (gemma3's converter cuts the
  embedding to the tokenizer's size: those rows are all the file has);
- rope scaling: `rope.scaling.type` none or linear; a Llama-3-style
  `rope_freqs.weight` tensor (one factor per frequency) becomes the `llama3`
  rope scaling whose factors it holds, checked to reproduce every factor;
- gemma2/gemma3 `query_pre_attn_scalar`: not in the file; llama.cpp scales by
  hidden / heads for the 27B models (46 and 62 layers) and by head_dim otherwise,
  unless `attention.scale` says; gemma3 slides 5 of every 6 layers with a local
  rope base of 10000 when the file has a sliding window.

Every `<arch>.*` key must be known (read, or listed in `INERT_KEYS`): a key this
module does not know may change the model, and guessing is how parity breaks.

Architectures: llama, qwen2, qwen3, gemma, gemma2, gemma3 (as gemma3_text). Not
(yet) the others the project measures: qwen2moe/qwen3moe and gpt-oss store
their experts stacked in one tensor per projection (a different weight layout),
qwen35/qwen35moe carry llama.cpp rewrites of the linear-attention tensors
(reordered value heads, -exp(A_log), +1 on all but one norm) that would each
need undoing, and bailing-moe the same; the rest have no family here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from maxact_jax.errors import UserError
from maxact_jax.gguf_file import GGUFFile

# GGUF general.architecture -> the model_type whose parser reads the config.
MODEL_TYPES = {
    'llama': 'llama',
    'qwen2': 'qwen2',
    'qwen3': 'qwen3',
    'gemma': 'gemma',
    'gemma2': 'gemma2',
    'gemma3': 'gemma3_text',  # GGUF files hold the text model only (transformers reads them the same way)
}
GEMMA_ARCHS = ('gemma', 'gemma2', 'gemma3')

# <arch>.<key> -> config.json field, the same for every architecture.
COMMON_FIELDS = {
    'block_count': 'num_hidden_layers',
    'embedding_length': 'hidden_size',
    'feed_forward_length': 'intermediate_size',
    'attention.head_count': 'num_attention_heads',
    'attention.head_count_kv': 'num_key_value_heads',
    'attention.layer_norm_rms_epsilon': 'rms_norm_eps',
    'context_length': 'max_position_embeddings',
}
ARCH_FIELDS = {
    'gemma2': {'attention.sliding_window': 'sliding_window', 'attn_logit_softcapping': 'attn_logit_softcapping',
               'final_logit_softcapping': 'final_logit_softcapping'},
    'gemma3': {'final_logit_softcapping': 'final_logit_softcapping'},
}
# <arch>.<key> read by the rules of this module.
RULE_KEYS = ('vocab_size', 'attention.key_length', 'attention.value_length', 'rope.dimension_count',
             'rope.freq_base', 'rope.freq_base_swa', 'rope.scaling.type', 'rope.scaling.factor', 'rope.scale_linear',
             'attention.scale', 'attention.sliding_window', 'attention.sliding_window_pattern')
# <arch>.<key> that do not change the forward pass on token input.
INERT_KEYS = {
    'rope.scaling.finetuned': 'whether the model was fine-tuned at the scaled length',
    'rope.scaling.original_context_length': 'used by yarn/longrope only, which are refused',
}
# The llama.cpp tensor (not a weight) whose values become config fields.
ROPE_FREQS = 'rope_freqs.weight'
# llama.cpp's Gemma 2/3 27B checks (llama-model.cpp): layer counts of the 27B models.
GEMMA_27B_LAYERS = {'gemma2': 46, 'gemma3': 62}
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6)
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp: rope_freq_base_train_swa when the file has none


def architecture(gf: GGUFFile) -> str:
  arch = gf.architecture
  if arch not in MODEL_TYPES:
    raise UserError(f'{gf.path}: GGUF architecture {arch!r} is not supported (supported: '
                    f'{", ".join(MODEL_TYPES)})')
  return arch


def config_dict(gf: GGUFFile) -> dict[str, Any]:
  """The config.json of the file's model (raises on an unknown architecture or key, and
  on metadata that contradicts the tensors)."""
  arch = architecture(gf)
  check_keys(gf, arch)
  key = lambda name, default=None, types=(int, float): gf.get(gf.arch_key(name), default, types)  # noqa: E731
  cfg: dict[str, Any] = {'model_type': MODEL_TYPES[arch]}
  for name, field in {**COMMON_FIELDS, **ARCH_FIELDS.get(arch, {})}.items():
    value = key(name)
    if value is not None:
      cfg[field] = value
  for required in ('num_hidden_layers', 'hidden_size', 'num_attention_heads'):
    if required not in cfg:
      name = next(k for k, v in COMMON_FIELDS.items() if v == required)
      raise UserError(f'{gf.path}: GGUF metadata has no {gf.arch_key(name)}')
  cfg['head_dim'] = head_dim(gf, cfg)
  embed = gf.tensors.get('token_embd.weight')
  if embed is None:
    raise UserError(f'{gf.path}: GGUF file has no token_embd.weight tensor')
  cfg['vocab_size'] = embed.shape[0]
  cfg['tie_word_embeddings'] = 'output.weight' not in gf.tensors
  cfg['rope_theta'] = key('rope.freq_base', 10000.0)
  scaling = rope_scaling(gf, cfg)
  if scaling is not None:
    cfg['rope_scaling'] = scaling
  for field, meta in (('bos_token_id', 'bos_token_id'), ('eos_token_id', 'eos_token_id'),
                      ('pad_token_id', 'padding_token_id')):
    value = gf.get(f'tokenizer.ggml.{meta}', None, (int,))
    if value is not None and 0 <= value < cfg['vocab_size']:
      cfg[field] = value
  if arch in ('llama', 'qwen3'):
    cfg['attention_bias'] = any(_is_block(n, 'attn_q.bias') for n in gf.tensors)
  if arch == 'llama':
    cfg['mlp_bias'] = any(_is_block(n, 'ffn_gate.bias') for n in gf.tensors)
  if arch in ('gemma2', 'gemma3'):
    cfg['query_pre_attn_scalar'] = query_pre_attn_scalar(gf, arch, cfg)
  if arch == 'gemma3':
    cfg.update(gemma3_layers(gf, cfg))
  check_tensors(gf, cfg)
  return cfg


def check_keys(gf: GGUFFile, arch: str) -> None:
  known = {*COMMON_FIELDS, *ARCH_FIELDS.get(arch, {}), *RULE_KEYS, *INERT_KEYS}
  prefix = arch + '.'
  unknown = sorted(k for k in gf.keys() if k.startswith(prefix) and k[len(prefix):] not in known)
  if unknown:
    raise UserError(f'{gf.path}: unknown GGUF metadata key(s) {", ".join(unknown)} for architecture {arch!r}; '
                    'maxact-jax does not know how they change the model')


def head_dim(gf: GGUFFile, cfg: dict[str, Any]) -> int:
  get = lambda name: gf.get(gf.arch_key(name), None, (int,))  # noqa: E731
  key_length, value_length, rotary = get('attention.key_length'), get('attention.value_length'), get(
      'rope.dimension_count')
  if key_length is not None:
    dim = key_length
  elif rotary is not None:
    dim = rotary
  else:
    if not cfg['num_attention_heads'] or cfg['hidden_size'] % cfg['num_attention_heads']:
      raise UserError(f'{gf.path}: GGUF metadata states no head width and {gf.arch_key("embedding_length")} '
                      f'{cfg["hidden_size"]} is not a multiple of the {cfg["num_attention_heads"]} heads')
    dim = cfg['hidden_size'] // cfg['num_attention_heads']
  if value_length is not None and value_length != dim:
    raise UserError(f'{gf.path}: {gf.arch_key("attention.value_length")} {value_length} differs from the key '
                    f'width {dim}; value heads of another width are not supported')
  if rotary is not None and rotary != dim:
    raise UserError(f'{gf.path}: {gf.arch_key("rope.dimension_count")} {rotary} differs from the head width '
                    f'{dim}: partial rotary embeddings are not supported for {gf.architecture!r}')
  return dim


def rope_scaling(gf: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any] | None:
  """The config's rope_scaling: llama.cpp's `rope.scaling.type` (none, linear), the older
  `rope.scale_linear`, or the factors of a `rope_freqs.weight` tensor (llama3)."""
  kind = gf.get(gf.arch_key('rope.scaling.type'), 'none', (str,))
  linear = gf.get(gf.arch_key('rope.scale_linear'), None, (int, float))
  if kind not in ('none', 'linear'):
    raise UserError(f'{gf.path}: {gf.arch_key("rope.scaling.type")} {kind!r} is not supported (supported: none, '
                    'linear, and the llama3 factors of a rope_freqs tensor)')
  scaling = None
  if kind == 'linear' or linear is not None:
    factor = linear if linear is not None else gf.get(gf.arch_key('rope.scaling.factor'), types=(int, float))
    scaling = {'rope_type': 'linear', 'factor': float(factor)}
  if ROPE_FREQS in gf.tensors:
    if gf.architecture != 'llama':
      raise UserError(f'{gf.path}: a {ROPE_FREQS} tensor in a {gf.architecture!r} file is not supported')
    if scaling is not None:
      raise UserError(f'{gf.path}: both linear rope scaling and a {ROPE_FREQS} tensor: cannot represent both')
    factors = np.asarray(gf.read(ROPE_FREQS), np.float64).reshape(-1)
    scaling = llama3_scaling(factors, cfg['rope_theta'], cfg['head_dim'], f'{gf.path}: {ROPE_FREQS}')
  return scaling


def _frequencies(theta: float, head_dim: int) -> np.ndarray:
  """The rope frequencies as llama.cpp's converter computes them (float32 torch:
  1 / theta ** (arange(0, dim, 2) / dim))."""
  exponents = (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(np.float64)
  return (1.0 / np.power(np.float64(np.float32(theta)), exponents).astype(np.float32)).astype(np.float64)


def llama3_factors(freqs: np.ndarray, factor: float, low: float, high: float, old_len: float) -> np.ndarray:
  """llama.cpp's rope_freqs (one divisor per frequency) of llama3 rope scaling."""
  wavelen = 2 * math.pi / freqs
  smooth = (old_len / wavelen - low) / (high - low)
  out = 1.0 / ((1 - smooth) / factor + smooth)
  out = np.where(wavelen > old_len / low, factor, out)
  return np.where(wavelen < old_len / high, 1.0, out)


def llama3_scaling(factors: np.ndarray, theta: float, dim: int, where: str) -> dict[str, Any] | None:
  """The llama3 rope parameters whose frequency divisors are `factors`.

  llama.cpp stores, per frequency, 1 (high frequencies), `factor` (low ones) or
  1 / ((1 - s) / factor + s) between, with s = old_len / (wavelength * (high -
  low)) - low / (high - low) affine in 1 / wavelength. The plateau gives
  `factor`, the points between give that line; low, high and old_len enter only
  through its slope and intercept, so low = 1 is chosen (Llama 3's value) and the
  others follow. The result is accepted only if it gives back every factor.
  """
  if factors.shape != (dim // 2,):
    raise UserError(f'{where} has {factors.size} entries, the head width {dim} needs {dim // 2}')
  if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
    return None
  freqs = _frequencies(theta, dim)
  factor = float(factors.max())
  between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
  if factor <= 1 or between.sum() < 2 or np.any(factors < 1 - 1e-6):
    raise UserError(f'{where} does not have the shape of llama3 rope scaling (ones, then a smooth rise, then '
                    'a plateau, with at least two points on the rise): cannot represent it')
  s = (factor / factors[between] - 1) / (factor - 1)
  inv_wavelen = freqs[between] / (2 * math.pi)
  slope, intercept = np.polyfit(inv_wavelen, s, 1)  # s = slope / wavelength + intercept
  low = 1.0
  high = low - low / intercept if intercept < 0 else float('nan')
  old_len = slope * (high - low)
  if not (math.isfinite(high) and high > low and old_len > 0):
    raise UserError(f'{where}: its rise is not that of llama3 rope scaling: cannot represent it')
  if abs(high - round(high)) < 1e-3:
    high = float(round(high))  # the fit of float32 factors gives 4.0000003 for Llama 3's 4
  old_len = int(round(slope * (high - low)))
  params = {'rope_type': 'llama3', 'factor': factor, 'low_freq_factor': low, 'high_freq_factor': high,
            'original_max_position_embeddings': old_len}
  again = llama3_factors(freqs, factor, low, high, old_len)
  if not np.allclose(again, factors, rtol=1e-5, atol=0):
    worst = float(np.max(np.abs(again / factors - 1)))
    raise UserError(f'{where}: the nearest llama3 rope scaling ({params}) differs from the stored factors by '
                    f'{worst:.2g} (relative): cannot represent it')
  return params


def query_pre_attn_scalar(gf: GGUFFile, arch: str, cfg: dict[str, Any]) -> float:
  scale = gf.get(gf.arch_key('attention.scale'), None, (int, float))
  if scale is not None:
    if scale <= 0:
      raise UserError(f'{gf.path}: {gf.arch_key("attention.scale")} must be positive, got {scale}')
    return 1.0 / float(scale) ** 2
  if cfg['num_hidden_layers'] == GEMMA_27B_LAYERS[arch]:
    return cfg['hidden_size'] // cfg['num_attention_heads']
  return cfg['head_dim']


def gemma3_layers(gf: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any]:
  """Sliding layers and local rope of a gemma3 file, as llama.cpp runs it."""
  n = cfg['num_hidden_layers']
  window = gf.get(gf.arch_key('attention.sliding_window'), None, (int,))
  pattern = gf.get(gf.arch_key('attention.sliding_window_pattern'), None, (list,))
  if not window:
    return {'sliding_window': None, 'layer_types': ['full_attention'] * n}
  out: dict[str, Any] = {
      'sliding_window': window,
      'rope_local_base_freq': gf.get(gf.arch_key('rope.freq_base_swa'), GEMMA3_LOCAL_ROPE_BASE, (int, float)),
  }
  if pattern is None:
    out['sliding_window_pattern'] = GEMMA3_SLIDING_PATTERN
  else:
    if len(pattern) != n or not all(isinstance(p, bool) for p in pattern):
      raise UserError(f'{gf.path}: {gf.arch_key("attention.sliding_window_pattern")} must hold one bool per '
                      f'layer ({n})')
    out['layer_types'] = ['sliding_attention' if p else 'full_attention' for p in pattern]
  return out


_BLOCK = re.compile(r'blk\.(\d+)\.(.+)$')


def _is_block(name: str, suffix: str) -> bool:
  m = _BLOCK.match(name)
  return bool(m) and m.group(2) == suffix


def check_tensors(gf: GGUFFile, cfg: dict[str, Any]) -> None:
  """The metadata against the tensors' shapes: one clear error where they disagree."""
  where = gf.path
  hidden, layers = cfg['hidden_size'], cfg['num_hidden_layers']
  heads, kv = cfg['num_attention_heads'], cfg.get('num_key_value_heads', cfg['num_attention_heads'])
  meta = lambda name: gf.arch_key(name)  # noqa: E731
  embed = gf.tensors['token_embd.weight'].shape
  if len(embed) != 2 or embed[1] != hidden:
    raise UserError(f'{where}: GGUF metadata {meta("embedding_length")} = {hidden} contradicts token_embd.weight '
                    f'of shape {embed}')
  stated_vocab = gf.get(meta('vocab_size'), None, (int,))
  if stated_vocab is not None and stated_vocab != embed[0]:
    raise UserError(f'{where}: GGUF metadata {meta("vocab_size")} = {stated_vocab} contradicts token_embd.weight '
                    f'of shape {embed}')
  n_tokens = gf.length('tokenizer.ggml.tokens')
  if n_tokens > embed[0]:
    raise UserError(f'{where}: the GGUF vocabulary has {n_tokens} tokens but token_embd.weight only {embed[0]} rows')
  blocks = sorted({int(m.group(1)) for m in map(_BLOCK.match, gf.tensors) if m})
  if blocks and (blocks[-1] >= layers or len(blocks) != layers):
    raise UserError(f'{where}: GGUF metadata {meta("block_count")} = {layers} contradicts the tensors, which hold '
                    f'{len(blocks)} blocks (blk.{blocks[0]} to blk.{blocks[-1]})')
  expected = {
      'attn_q.weight': (heads * cfg['head_dim'], hidden, 'attention.head_count'),
      'attn_k.weight': (kv * cfg['head_dim'], hidden, 'attention.head_count_kv'),
      'attn_v.weight': (kv * cfg['head_dim'], hidden, 'attention.head_count_kv'),
  }
  if 'intermediate_size' in cfg:
    expected['ffn_up.weight'] = (cfg['intermediate_size'], hidden, 'feed_forward_length')
  for suffix, (rows, cols, key) in expected.items():
    info = gf.tensors.get(f'blk.0.{suffix}')
    if info is not None and info.shape != (rows, cols):
      raise UserError(f'{where}: GGUF metadata ({meta(key)}, head width {cfg["head_dim"]}) implies blk.0.{suffix} '
                      f'of shape {(rows, cols)}, the tensor has {info.shape}')


__all__ = ['GEMMA_ARCHS', 'MODEL_TYPES', 'ROPE_FREQS', 'architecture', 'config_dict', 'llama3_factors',
           'llama3_scaling']
