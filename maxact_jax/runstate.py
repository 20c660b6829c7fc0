"""Resumable runs: the merged statistics and the corpus position, saved atomically.

A long run saves its state every N batches to `<output_dir>/state/`: the
float64 state of every tap and the index of the next batch, in one .npz file
written to a temporary name and renamed, so a kill at any instant leaves the
last good state. The state carries a fingerprint of everything that decides
the numbers (the checkpoint's config and tensor headers, the corpus's token
ids, the flags that shape batches); `--resume` refuses a state whose
fingerprint differs, naming what changed. Batches are merged in the same
order as in an uninterrupted run, so the final statistics are identical.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from maxact_jax import atomic, gguf_file, stats
from maxact_jax.errors import UserError

# 2: the residual stream's per-channel maxima and the token attribution (maxact_jax.anatomy).
# 3: the token attribution under both rules (layer-median and per-token), the layer-median state.
FORMAT = 3


def file_digest(path: str, limit: int | None = None) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    h.update(f.read(limit) if limit else f.read())
  return h.hexdigest()


def checkpoint_digest(model_dir: str) -> str:
  """Hash of config.json and every safetensors file's name, size and header (a GGUF
  file: its name, size and header)."""
  h = hashlib.sha256()
  gguf_path = gguf_file.find(model_dir)
  if gguf_path:
    ident = gguf_file.open_file(gguf_path).identity()
    h.update(f'{ident["name"]}:{ident["bytes"]}:{ident["header_sha256"]}'.encode())
    return h.hexdigest()
  for name in sorted(os.listdir(model_dir)):
    path = os.path.join(model_dir, name)
    if name == 'config.json' or name.endswith('.index.json'):
      h.update(name.encode() + file_digest(path).encode())
    elif name.endswith('.safetensors'):
      size = os.path.getsize(path)
      with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = f.read(min(n, size))
      h.update(f'{name}:{size}:'.encode() + header)
  return h.hexdigest()


def corpus_digest(samples: list[np.ndarray]) -> str:
  h = hashlib.sha256()
  for s in samples:
    h.update(np.asarray(len(s), np.int64).tobytes())
    h.update(np.ascontiguousarray(s, np.int32).tobytes())
  return h.hexdigest()


def fingerprint(*, model_path: str, samples: list[np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
  return {
      'format': FORMAT,
      'checkpoint': checkpoint_digest(model_path),
      'corpus': corpus_digest(samples),
      **{k: options[k] for k in sorted(options)},
  }


def state_path(output_dir: str, model_name: str) -> str:
  return os.path.join(output_dir, 'state', f'{model_name}_measure_state.npz')


def _encode(value):
  """JSON-able form of a TapStats attribute (tuples become tagged lists)."""
  if isinstance(value, tuple):
    return {'__tuple__': [_encode(v) for v in value]}
  if isinstance(value, float) and not np.isfinite(value):
    return {'__float__': repr(value)}
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return _encode(float(value))
  if isinstance(value, dict):
    return {k: _encode(v) for k, v in value.items()}
  return value


def _decode(value):
  if isinstance(value, dict):
    if '__tuple__' in value:
      return tuple(_decode(v) for v in value['__tuple__'])
    if '__float__' in value:
      return float(value['__float__'])
    return {k: _decode(v) for k, v in value.items()}
  return value


def save(path: str, *, fingerprint_: dict, next_batch: int, taps: dict[str, stats.TapStats],
         extra: dict[str, Any] | None = None) -> None:
  """Write the state atomically (temporary file in the same directory, then rename)."""
  arrays: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {'fingerprint': fingerprint_, 'next_batch': next_batch, 'taps': {},
                          'extra': extra or {}}
  for t_index, (name, tap) in enumerate(taps.items()):
    scalars = {}
    for key, value in tap.state_dict().items():
      if isinstance(value, np.ndarray):
        arrays[f't{t_index}.{key}'] = value
        scalars[key] = {'__array__': f't{t_index}.{key}'}
      else:
        scalars[key] = _encode(value)
    meta['taps'][name] = scalars
  buf = io.BytesIO()
  np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
  atomic.write_bytes(path, buf.getvalue())


def load(path: str, expected: dict[str, Any]) -> tuple[int, dict[str, stats.TapStats], dict[str, Any]]:
  """(next batch, tap states, extra) of a saved state that matches `expected`."""
  if not os.path.isfile(path):
    raise UserError(f'--resume: no saved state at {path} (run with --checkpoint_every=N first)')
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(bytes(z['__meta__']).decode())
      arrays = {k: z[k] for k in z.files if k != '__meta__'}
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    raise UserError(f'--resume: cannot read the saved state {path}: {e}') from None
  saved = meta.get('fingerprint', {})
  changed = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
  if changed:
    raise UserError(f'--resume: the saved state in {path} was made with a different '
                    f'{", ".join(changed)}; rerun without --resume to start over')
  taps = {}
  for name, scalars in meta['taps'].items():
    state = {}
    for key, value in scalars.items():
      state[key] = arrays[value['__array__']] if isinstance(value, dict) and '__array__' in value else _decode(value)
    taps[name] = stats.TapStats.from_state_dict(state)
  return int(meta['next_batch']), taps, meta.get('extra', {})
