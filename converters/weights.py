"""What a checkpoint's weights are stored as: the `run.weights` record of results.

A measurement of a Q4 GGUF file must never be mistaken for one of the bf16
model it was quantized from, nor a float32 run on bf16-stored weights for one on
the float32 weights they were rounded from. `info(model_path)` says, from the
headers alone:

- `format`: gguf, safetensors or orbax (a converted model directory);
- `quant_types`: the storage type of each tensor and how many tensors have it
  (GGML type names such as Q4_1 and F32 for GGUF, safetensors dtype names such as
  BF16 otherwise, the converted dtype for orbax);
- `stored_dtype`: the narrowest float dtype that holds every stored weight
  exactly: a GGUF file's quantized blocks dequantize to float32 numbers, float16
  and bfloat16 tensors are what they are (both together need float32);
- for orbax, `source`: the same record of the checkpoint it was converted from.

`upcast_warning` is the line to print when a run asks for a wider dtype than the
weights were stored in.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from converters import orbax_io
from converters.safetensors_io import DTYPES, Checkpoint
from maxact_jax import gguf_file

# GGML types that are floats as stored; every other (quantized) type is dequantized to float32.
GGML_FLOATS = {'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'F64': 'float64'}
WIDTH = {'float64': 8, 'float32': 4, 'float16': 2, 'bfloat16': 2, 'float8_e4m3fn': 1, 'float8_e5m2': 1}


def stored_dtype(dtypes: set[str]) -> str | None:
  """The narrowest float dtype holding every one of `dtypes` exactly (float16 and
  bfloat16 together need float32)."""
  dtypes = {d for d in dtypes if d in WIDTH}
  if not dtypes:
    return None
  if len(dtypes) == 1:
    return next(iter(dtypes))
  widest = max(dtypes, key=WIDTH.get)
  if WIDTH[widest] <= 2 and {'float16', 'bfloat16'} <= dtypes:
    return 'float32'
  return widest


def _sorted_counts(counts: collections.Counter) -> dict[str, int]:
  return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def info(model_path: str) -> dict[str, Any]:
  """`run.weights` of the checkpoint at `model_path` (see the module docstring)."""
  if orbax_io.is_orbax_dir(model_path):
    meta = orbax_io.read_metadata(model_path)
    return meta.get('weights') or {'format': 'orbax', 'stored_dtype': meta.get('dtype'),
                                   'quant_types': {str(meta.get('dtype')).upper(): len(meta.get('params', {}))}}
  path = gguf_file.find(model_path)
  if path:
    gf = gguf_file.open_file(path)
    counts = gf.quant_counts()
    return {'format': 'gguf', 'file': gf.identity()['name'], 'quant_types': counts,
            'stored_dtype': stored_dtype({GGML_FLOATS.get(t, 'float32') for t in counts})}
  ckpt = Checkpoint(model_path)
  names = {np.dtype(v): k for k, v in DTYPES.items()}
  counts = collections.Counter(names[np.dtype(t.dtype)] for t in ckpt.tensors.values())
  return {'format': 'safetensors', 'quant_types': _sorted_counts(counts),
          'stored_dtype': stored_dtype({np.dtype(t.dtype).name for t in ckpt.tensors.values()})}


def upcast_warning(record: dict[str, Any], dtype_name: str, where: str) -> str | None:
  """A warning line when `dtype_name` is wider than the dtype the weights are stored in."""
  stored = record.get('stored_dtype')
  if stored not in WIDTH or dtype_name not in WIDTH or WIDTH[dtype_name] <= WIDTH[stored]:
    return None
  return (f'warning: the weights of {where} are stored in {stored}; --dtype={dtype_name} computes with them '
          f'upcast, not with the {dtype_name} weights they may have been rounded from')


__all__ = ['info', 'stored_dtype', 'upcast_warning']
