"""Read safetensors checkpoints into numpy, one tensor at a time, without torch.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. Files are memory
mapped, so reading a tensor touches only its own bytes; bfloat16 and float8
come through ml_dtypes, as JAX itself uses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from maxact_jax.errors import UserError

DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'U16': np.uint16, 'U32': np.uint32, 'U64': np.uint64, 'BOOL': np.bool_,
}
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'


class TensorInfo:
  __slots__ = ('file', 'dtype', 'shape', 'start', 'end')

  def __init__(self, file: str, dtype, shape: tuple[int, ...], start: int, end: int):
    self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


def read_header(path: str) -> tuple[dict, int]:
  """(header dict, data offset) of one safetensors file, or a one-line UserError."""
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      raw_len = f.read(8)
      if len(raw_len) < 8:
        raise UserError(f'{path} is not a safetensors file (too short)')
      (n,) = struct.unpack('<Q', raw_len)
      if n <= 0 or 8 + n > size:
        raise UserError(f'{path} is not a valid safetensors file (header length {n} exceeds the file)')
      header = json.loads(f.read(n))
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}') from None
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise UserError(f'{path} is not a valid safetensors file (corrupt header)') from None
  if not isinstance(header, dict):
    raise UserError(f'{path} is not a valid safetensors file (header is not an object)')
  return header, 8 + n


class Checkpoint:
  """All tensors of a checkpoint directory: model.safetensors or a sharded set."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    files = self._files(model_dir)
    self.tensors: dict[str, TensorInfo] = {}
    self._maps: dict[str, np.memmap] = {}
    for name in files:
      path = os.path.join(model_dir, name)
      header, base = read_header(path)
      size = os.path.getsize(path)
      for key, info in header.items():
        if key == '__metadata__':
          continue
        try:
          dtype = DTYPES[info['dtype']]
          shape = tuple(int(d) for d in info['shape'])
          start, end = (base + int(o) for o in info['data_offsets'])
        except (KeyError, TypeError, ValueError):
          raise UserError(f'{path}: tensor {key!r} has an unsupported or malformed entry {info!r}') from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - start != nbytes or end > size or start < base:
          raise UserError(f'{path} is truncated or corrupt: tensor {key!r} does not fit its byte range')
        self.tensors[key] = TensorInfo(path, dtype, shape, start, end)

  @staticmethod
  def _files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
      try:
        with open(index, encoding='utf-8') as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f'{index} is not a valid safetensors index') from None
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
      if missing:
        raise UserError(f'{model_dir}: shard {missing[0]} named in {INDEX_FILE} is missing')
      return files
    if os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
      return [SINGLE_FILE]
    others = sorted(f for f in os.listdir(model_dir) if f.endswith('.safetensors'))
    if others:
      return others
    raise UserError(f'{model_dir} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)')

  def keys(self) -> list[str]:
    return list(self.tensors)

  def __contains__(self, key: str) -> bool:
    return key in self.tensors

  def shape(self, key: str) -> tuple[int, ...]:
    return self.tensors[key].shape

  def read(self, key: str) -> np.ndarray:
    """A read-only view of one tensor (no copy until it is transformed).

    The view maps the file: the pages it touches stay resident while the
    mapping lives, so reading every tensor this way grows the process's RSS to
    the checkpoint size (page cache, reclaimable, but counted). `read_copy`
    does not.
    """
    info = self.tensors[key]
    mm = self._maps.get(info.file)
    if mm is None:
      mm = self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode='r')
    return mm[info.start:info.end].view(info.dtype).reshape(info.shape)

  def read_copy(self, key: str) -> np.ndarray:
    """One tensor read into a fresh buffer with plain file reads (no mapping):
    memory is this tensor's bytes and is freed with the array (streaming convert)."""
    info = self.tensors[key]
    buf = np.empty(info.end - info.start, np.uint8)
    with open(info.file, 'rb') as f:
      f.seek(info.start)
      if f.readinto(memoryview(buf)) != buf.size:
        raise UserError(f'{info.file} is truncated: tensor {key!r} could not be read')
    return buf.view(info.dtype).reshape(info.shape)

  def header_digests(self) -> list[dict]:
    """Identity of every file: name, size and the sha256 of its header (names, dtypes,
    shapes and byte ranges of all tensors), cheap to compute on any checkpoint size."""
    out = []
    for path in sorted({info.file for info in self.tensors.values()}):
      with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        digest = hashlib.sha256(f.read(n)).hexdigest()
      out.append({'name': os.path.basename(path), 'bytes': os.path.getsize(path), 'header_sha256': digest})
    return out

  def close(self) -> None:
    self._maps.clear()


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor made only when it is written: `make()` -> array of `shape` and `dtype`."""

  shape: tuple[int, ...]
  dtype: Any
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(path: str, tensors: dict[str, np.ndarray | LazyTensor],
                      metadata: dict[str, str] | None = None) -> None:
  """Write numpy arrays as a safetensors file (tests, synthetic checkpoints).

  A `LazyTensor` value is made, written and dropped one at a time, so a
  checkpoint larger than memory can be written with memory for one tensor.
  """
  names = {np.dtype(v): k for k, v in DTYPES.items()}
  header: dict = {'__metadata__': metadata or {'format': 'pt'}}
  offset = 0
  for key, arr in tensors.items():
    n = arr.nbytes
    header[key] = {'dtype': names[np.dtype(arr.dtype)], 'shape': list(arr.shape), 'data_offsets': [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for key, arr in tensors.items():
      if isinstance(arr, LazyTensor):
        made = arr.make()
        if tuple(made.shape) != tuple(arr.shape) or made.dtype != np.dtype(arr.dtype):
          raise ValueError(f'{key}: made {made.shape} {made.dtype}, declared {arr.shape} {arr.dtype}')
        arr = made
      f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # no bytes copy
      del arr
