"""A GGUF file read as a checkpoint that holds Hugging Face tensor names.

`GGUFCheckpoint` presents the tensors of a GGUF file the way
`safetensors_io.Checkpoint` presents a safetensors directory: `keys()` are the
Hugging Face names the family's declarative weight map already uses
(`model.layers.3.self_attn.q_proj.weight`), `read(key)` gives the tensor as
transformers would hold it. So the weight maps, their coverage checks (every
tensor used, every parameter filled, every shape right) and the streaming orbax
conversion apply to GGUF files unchanged.

Two tables say everything:

- `NAMES`: llama.cpp's tensor names (the `gguf` package's own `TENSOR_NAMES`)
  to Hugging Face names, per architecture: one table for the llama-style blocks,
  one for the Gemma 2/3 sandwich norms, where llama.cpp's `ffn_norm` is the norm
  before the MLP and `post_attention_norm` the one after attention;
- `UNDO`: what llama.cpp's converter (convert_hf_to_gguf.py) changed, and its
  inverse: the q/k projection rows of llama files were permuted from the
  rotate-half rope layout of transformers to llama.cpp's interleaved one
  (`unpermute`, with the key-value head count for k), and the Gemma norms were
  stored as 1 + weight (llama.cpp multiplies by the stored weight; transformers
  by 1 + weight), so 1 is taken off again.

Tensors are dequantized by the gguf package when read (float32 for quantized
types; float32, float16 and bfloat16 tensors as stored) and cast to the run's
dtype by the weight map.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import gguf
import numpy as np

from maxact_jax import gguf_config, gguf_tokenizer
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.gguf_file import open_file

T = gguf.MODEL_TENSOR


def _name(tensor: gguf.MODEL_TENSOR) -> str:
  return gguf.TENSOR_NAMES[tensor]


# llama.cpp block tensor -> the Hugging Face module under `<prefix>layers.{i}.`.
LLAMA_BLOCK = {
    T.ATTN_NORM: 'input_layernorm',
    T.ATTN_Q: 'self_attn.q_proj',
    T.ATTN_K: 'self_attn.k_proj',
    T.ATTN_V: 'self_attn.v_proj',
    T.ATTN_OUT: 'self_attn.o_proj',
    T.ATTN_Q_NORM: 'self_attn.q_norm',
    T.ATTN_K_NORM: 'self_attn.k_norm',
    T.FFN_NORM: 'post_attention_layernorm',
    T.FFN_GATE: 'mlp.gate_proj',
    T.FFN_UP: 'mlp.up_proj',
    T.FFN_DOWN: 'mlp.down_proj',
}
SANDWICH_BLOCK = {
    **{k: v for k, v in LLAMA_BLOCK.items() if k != T.FFN_NORM},
    T.ATTN_POST_NORM: 'post_attention_layernorm',
    T.FFN_PRE_NORM: 'pre_feedforward_layernorm',  # llama.cpp's blk.{i}.ffn_norm
    T.FFN_POST_NORM: 'post_feedforward_layernorm',
}
NAMES = {arch: (SANDWICH_BLOCK if arch in ('gemma2', 'gemma3') else LLAMA_BLOCK) for arch in gguf_config.MODEL_TYPES}
# llama.cpp global tensor -> what it is in the Hugging Face checkpoint ('prefix': under
# the backbone's prefix; 'head': the lm_head).
GLOBAL = {
    T.TOKEN_EMBD: ('prefix', 'embed_tokens'),
    T.OUTPUT_NORM: ('prefix', 'norm'),
    T.OUTPUT: ('head', None),
}
# Tensors that are not weights of the model: read into the config by gguf_config.
CONSUMED = {gguf_config.ROPE_FREQS: 'rope frequency factors, read into the config as llama3 rope scaling'}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation (rows of each head: pairs interleaved
  -> first half, second half): reshape [head, dim/2, 2, ...] -> swap -> [head, 2, dim/2, ...]."""
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise UserError(f'a q/k projection of {rows} rows cannot hold {n_head} heads of even width')
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def minus_one(w: np.ndarray) -> np.ndarray:
  """A Gemma norm weight stored as 1 + w, back to w (in float32)."""
  return (np.asarray(w, np.float32) - np.float32(1.0)).astype(np.float32)


# Per architecture: (regex over the Hugging Face name, inverse of llama.cpp's change).
Undo = Callable[[np.ndarray, ModelConfig], np.ndarray]
UNDO: dict[str, tuple[tuple[str, Undo], ...]] = {
    'llama': ((r'\.self_attn\.q_proj\.(weight|bias)$', lambda w, c: unpermute(w, c.num_attention_heads)),
              (r'\.self_attn\.k_proj\.(weight|bias)$', lambda w, c: unpermute(w, c.num_key_value_heads))),
    **{arch: ((r'norm\.weight$', lambda w, c: minus_one(w)),) for arch in gguf_config.GEMMA_ARCHS},
}

_BLOCK = re.compile(r'blk\.(\d+)\.(.+)\.(weight|bias)$')
_GLOBAL = re.compile(r'([a-z_]+)\.(weight|bias)$')


def hf_names(tensor_names, arch: str, config: ModelConfig) -> dict[str, str]:
  """Hugging Face name -> GGUF name of every weight tensor; an unknown tensor is an error."""
  block = {_name(t).format(bid='{i}').split('.', 2)[2]: hf for t, hf in NAMES[arch].items()}
  top = {_name(t): where for t, where in GLOBAL.items()}
  head = config.lm_head_key.rsplit('.', 1)[0]
  out: dict[str, str] = {}
  for name in tensor_names:
    if name in CONSUMED:
      continue
    m = _BLOCK.match(name)
    if m and m.group(2) in block:
      hf = f'{config.weight_prefix}layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}'
    elif (g := _GLOBAL.match(name)) and g.group(1) in top:
      kind, rel = top[g.group(1)]
      hf = f'{config.weight_prefix}{rel}.{g.group(2)}' if kind == 'prefix' else f'{head}.{g.group(2)}'
    else:
      raise UserError(f'GGUF tensor {name} is not part of the llama.cpp {arch!r} layout maxact-jax reads')
    out[hf] = name
  return out


class GGUFCheckpoint:
  """The tensors of a GGUF file under Hugging Face names (the interface of
  `safetensors_io.Checkpoint`: keys, shape, read, read_copy, header_digests, close)."""

  def __init__(self, path: str, config: ModelConfig):
    self.model_dir = path  # where errors point
    self.gf = open_file(path)
    self.config = config
    arch = gguf_config.architecture(self.gf)
    try:
      self._names = hf_names(self.gf.tensors, arch, config)
    except UserError as e:
      raise UserError(f'{path}: {e}') from None
    self._undo = [(re.compile(pattern), fn) for pattern, fn in UNDO.get(arch, ())]

  def keys(self) -> list[str]:
    return list(self._names)

  def __contains__(self, key: str) -> bool:
    return key in self._names

  def gguf_name(self, key: str) -> str:
    return self._names[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self.gf.tensors[self._names[key]].shape

  def read(self, key: str) -> np.ndarray:
    """The tensor as transformers holds it: dequantized, llama.cpp's changes undone."""
    arr = self.gf.read(self._names[key])
    for pattern, fn in self._undo:
      if pattern.search(key):
        arr = fn(arr, self.config)
    return arr

  def read_copy(self, key: str) -> np.ndarray:
    """`read` into a buffer of its own (not a view of the mapped file)."""
    arr = self.read(key)
    return np.array(arr) if not arr.flags.owndata else arr

  def header_digests(self) -> list[dict[str, Any]]:
    ident = self.gf.identity()
    return [{'name': ident['name'], 'bytes': ident['bytes'], 'header_sha256': ident['header_sha256']}]

  def close(self) -> None:
    pass


def describing_files(path: str) -> dict[str, bytes]:
  """The files a Hugging Face directory would hold beside the weights, made from the
  GGUF file's metadata: config.json, and tokenizer.json when the file has a vocabulary."""
  gf = open_file(path)
  files = {'config.json': (json.dumps(gguf_config.config_dict(gf), indent=2) + '\n').encode()}
  if gf.has('tokenizer.ggml.model'):
    files['tokenizer.json'] = gguf_tokenizer.build(gf).to_str(pretty=True).encode()
  return files


__all__ = ['CONSUMED', 'GGUFCheckpoint', 'describing_files', 'NAMES', 'UNDO', 'hf_names', 'minus_one', 'unpermute']
