"""GGUF files (llama.cpp's checkpoint format) as checkpoints: where one is, its header
read and checked, its tensors dequantized, its identity.

A GGUF file is one self-contained checkpoint: a header of typed key/value
metadata (the architecture's hyper-parameters under `<arch>.*`, the vocabulary
under `tokenizer.ggml.*`), a table of tensors (name, shape, quantization type,
offset) and the tensor data. The `gguf` package, which llama.cpp maintains,
parses the header (`GGUFReader`) and dequantizes every block format it knows
(`gguf.quants.dequantize`); this module adds the checks that turn a damaged or
unsupported file into one `UserError` line, and what the rest of the project
asks of a checkpoint: its metadata as plain values, each tensor as a numpy array
(`read`), and an identity to record beside results (`identity`).

Three modules build on it: `gguf_config` (the metadata as an HF-style
config.json), `gguf_tokenizer` (the vocabulary as a `tokenizers` tokenizer) and
`converters/gguf_io.py` (the tensors under the Hugging Face names the weight
maps use, with llama.cpp's conversion changes undone).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
from importlib import metadata
import re
from typing import Any

import gguf
import ml_dtypes
import numpy as np

from maxact_jax.errors import UserError

SUFFIX = '.gguf'
MAGIC = b'GGUF'
_REQUIRED = object()


def find(model_path: str | None) -> str | None:
  """The GGUF file `model_path` names, or None when it is not a GGUF checkpoint.

  A `.gguf` file, or a directory holding exactly one `.gguf` file and no
  safetensors weights (a directory with safetensors is a Hugging Face
  checkpoint directory, whatever else it holds).
  """
  if not model_path:
    return None
  if os.path.isfile(model_path):
    return model_path if model_path.endswith(SUFFIX) else None
  if not os.path.isdir(model_path):
    return None
  names = os.listdir(model_path)
  ggufs = sorted(n for n in names if n.endswith(SUFFIX) and os.path.isfile(os.path.join(model_path, n)))
  if not ggufs or any(n.endswith('.safetensors') for n in names):
    return None
  if len(ggufs) > 1:
    shown = ', '.join(ggufs[:3]) + (', ...' if len(ggufs) > 3 else '')
    raise UserError(f'{model_path} holds {len(ggufs)} GGUF files ({shown}): give the one to read as --model_path')
  return os.path.join(model_path, ggufs[0])


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of the file: name, GGML type, shape in numpy order (the file lists
  dimensions innermost first), and where its bytes are."""

  name: str
  qtype: gguf.GGMLQuantizationType
  shape: tuple[int, ...]
  offset: int
  nbytes: int

  @property
  def type_name(self) -> str:
    return self.qtype.name


@functools.cache
def dequantizable() -> frozenset[gguf.GGMLQuantizationType]:
  """The GGML types the installed gguf package can turn into floats (probed through its
  public `dequantize` on one zero block; the package raises NotImplementedError for the rest)."""
  ok = set()
  for qtype in gguf.GGMLQuantizationType:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
      gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
      continue
    ok.add(qtype)
  return frozenset(ok)


def _header_error(path: str, e: Exception) -> UserError:
  """A one-line message for what GGUFReader raised on a damaged header."""
  text = str(e).splitlines()[0] if str(e) else type(e).__name__
  if 'GGMLQuantizationType' in text:
    numbers = re.findall(r'\d+', text.split(' is not a valid')[0])  # "np.uint32(99) is not a valid ..."
    return UserError(f'{path}: a tensor has unknown GGML quantization type {numbers[-1] if numbers else "?"} '
                     f'(gguf {_gguf_version()} does not know it; a newer gguf package may)')
  if 'version' in text:
    return UserError(f'{path}: unsupported GGUF version ({text})')
  if 'Duplicate' in text or 'duplicated' in text:
    return UserError(f'{path} is corrupt: {text}')
  size = os.path.getsize(path)
  if 'cannot reshape' in text:  # the header was read; a tensor's bytes were not all there
    return UserError(f'{path} is truncated or corrupt: the data of a tensor runs past the end of the file '
                     f'({size} bytes)')
  return UserError(f'{path} is truncated or corrupt: its header runs past the end of the file or is malformed '
                   f'({size} bytes)')


def _gguf_version() -> str:
  try:
    return metadata.version('gguf')
  except metadata.PackageNotFoundError:
    return '?'


class GGUFFile:
  """One GGUF file, its header parsed and checked (use `open_file`, which caches)."""

  def __init__(self, path: str):
    self.path = path
    try:
      self.size = os.path.getsize(path)
      with open(path, 'rb') as f:
        head = f.read(4)
    except OSError as e:
      raise UserError(f'cannot read {path}: {e.strerror or e}') from None
    if head != MAGIC:
      raise UserError(f'{path} is not a GGUF file (it starts with {head!r}, a GGUF file with {MAGIC!r})')
    try:
      self._reader = gguf.GGUFReader(path, 'r')
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
      raise _header_error(path, e) from None
    self.data_offset = int(self._reader.data_offset)
    self.tensors: dict[str, TensorInfo] = {}
    for t in self._reader.tensors:
      info = TensorInfo(t.name, gguf.GGMLQuantizationType(t.tensor_type), tuple(int(d) for d in reversed(t.shape)),
                        int(t.data_offset), int(t.n_bytes))
      if info.offset < self.data_offset or info.offset + info.nbytes > self.size:
        raise UserError(f'{path} is truncated or corrupt: tensor {info.name} needs bytes {info.offset} to '
                        f'{info.offset + info.nbytes}, the file has {self.size}')
      self.tensors[info.name] = info
    unsupported = sorted({t.type_name for t in self.tensors.values() if t.qtype not in dequantizable()})
    if unsupported:
      first = next(t for t in self.tensors.values() if t.type_name == unsupported[0])
      raise UserError(f'{path}: tensor {first.name} has quantization type {unsupported[0]}, which the gguf package '
                      f'({_gguf_version()}) cannot dequantize (supported: '
                      f'{", ".join(sorted(q.name for q in dequantizable()))})')
    self.architecture = self.get('general.architecture', types=(str,))
    if self.get('split.count', 1, (int,)) > 1:
      raise UserError(f'{path} is part {self.get("split.no", 0, (int,)) + 1} of a GGUF split into '
                      f'{self.get("split.count")} files; merge them into one first (llama.cpp: '
                      'llama-gguf-split --merge)')

  # -- metadata ------------------------------------------------------------

  def keys(self) -> list[str]:
    return [k for k in self._reader.fields if not k.startswith('GGUF.')]

  def has(self, key: str) -> bool:
    return key in self._reader.fields

  def get(self, key: str, default: Any = _REQUIRED, types: type | tuple[type, ...] | None = None) -> Any:
    """The value of metadata `key` as Python (str, int, float, bool, or a list of them)."""
    field = self._reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise UserError(f'{self.path}: GGUF metadata has no {key}')
      return default
    try:
      value = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:
      raise UserError(f'{self.path}: GGUF metadata {key} is unreadable ({e})') from None
    if types is not None:
      ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
      if not ok:
        raise UserError(f'{self.path}: GGUF metadata {key} = {_short(value)} is not a '
                        f'{" or ".join(t.__name__ for t in _as_tuple(types))}')
    return value

  def length(self, key: str) -> int:
    """The number of entries of an array-valued metadata key (without decoding them)."""
    field = self._reader.fields.get(key)
    return 0 if field is None else len(field.data)

  def arch_key(self, name: str) -> str:
    return f'{self.architecture}.{name}'

  # -- tensors -------------------------------------------------------------

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` as floats, in numpy order: float32, float16 and bfloat16 tensors as
    stored (a view of the file), every quantized type dequantized to float32 by the gguf
    package."""
    info = self.tensors[name]
    data = self._reader.tensors[self._index[name]].data
    if info.qtype == gguf.GGMLQuantizationType.F32:
      return np.asarray(data, np.float32)
    if info.qtype == gguf.GGMLQuantizationType.F16:
      return np.asarray(data, np.float16)
    if info.qtype == gguf.GGMLQuantizationType.BF16:
      return np.asarray(data).view(ml_dtypes.bfloat16).reshape(info.shape)
    out = gguf.quants.dequantize(data, info.qtype)
    if tuple(out.shape) != info.shape:
      raise UserError(f'{self.path}: tensor {name} dequantized to shape {tuple(out.shape)}, '
                      f'its header says {info.shape}')
    return out

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {t.name: i for i, t in enumerate(self._reader.tensors)}

  # -- identity ------------------------------------------------------------

  def quant_counts(self) -> dict[str, int]:
    """GGML type name -> number of tensors stored in it, most frequent first."""
    counts = collections.Counter(t.type_name for t in self.tensors.values())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

  def header_sha256(self) -> str:
    """sha256 of the header (metadata and tensor table, everything before the data):
    cheap on any file size, and it changes with any tensor's name, type, shape or place."""
    h = hashlib.sha256()
    with open(self.path, 'rb') as f:
      h.update(f.read(self.data_offset))
    return h.hexdigest()

  def identity(self) -> dict[str, Any]:
    return {
        'name': os.path.basename(self.path),
        'bytes': self.size,
        'header_sha256': self.header_sha256(),
        'architecture': self.architecture,
        'model_name': self.get('general.name', None, (str,)),
        'quant_types': self.quant_counts(),
    }


def _as_tuple(types) -> tuple:
  return types if isinstance(types, tuple) else (types,)


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
  del size, mtime_ns  # part of the cache key: a rewritten file is read again
  return GGUFFile(path)


def open_file(path: str) -> GGUFFile:
  """The parsed file, once per process (the header of a large vocabulary takes seconds
  to parse; every command reads it for the config, the tokenizer and the weights)."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}') from None
  return _open_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


__all__ = ['GGUFFile', 'SUFFIX', 'TensorInfo', 'dequantizable', 'find', 'open_file']
