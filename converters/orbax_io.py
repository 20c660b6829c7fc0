"""Convert once to an orbax checkpoint; restore it straight into any sharding.

A converted model directory is itself a valid `--model_path`:

  config.json, tokenizer files, ...  copied from the Hugging Face directory (a GGUF
                                     file: the config.json and tokenizer.json its
                                     metadata describes)
  maxact_checkpoint.json             what this is: the source checkpoint's identity
                                     (path, model_type, size and header sha256 of each
                                     safetensors or GGUF file), the converter version,
                                     the dtype, every parameter's shape and what the
                                     weights were stored as (`weights`, see weights.py)
  params/                            an orbax `StandardCheckpointer` checkpoint
                                     (tensorstore zarr arrays, one per Flax parameter)

Restoring goes through `StandardCheckpointer.restore` against
`jax.ShapeDtypeStruct` targets that carry each parameter's sharding, so every
device (every process) reads only its own shard.

Conversion streams: orbax writes the checkpoint's structure and metadata from
placeholders, then each parameter's tensorstore array is created at its full
shape with one chunk per layer, and every layer's slice is converted from the
safetensors file (read into a fresh buffer, not a mapping) and written straight
into it. Peak host memory is about one checkpoint tensor, whatever the model
size (bench/convert_memory.py measures it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from importlib import metadata
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging as absl_logging

from converters.weight_map import (WeightMap, build_row, check_coverage, open_checkpoint, plan, row_shape,
                                   unflatten)
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.models import transformer

FORMAT = 'maxact-orbax'
CONVERTER_VERSION = 1  # bump when the layout or a conversion rule changes
METADATA_FILE = 'maxact_checkpoint.json'
PARAMS_DIR = 'params'
# Files of a Hugging Face directory that are weights, not copied beside the params.
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.gguf', '.h5', '.msgpack', '.ckpt')
WEIGHT_FILES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')
CHUNK_BYTES = 16 << 20  # at most this many bytes per tensorstore chunk (a block of rows of one layer)


def is_orbax_dir(model_dir: str) -> bool:
  return os.path.isfile(os.path.join(model_dir, METADATA_FILE))


def _quiet_orbax():
  """Orbax logs routine progress as absl warnings; keep stderr for real problems."""
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger('absl').setLevel(logging.ERROR)


def config_identity(config: ModelConfig) -> dict[str, Any]:
  """The parsed config as JSON: what the parameters were made for (harmless edits to
  config.json, such as inert fields, do not change it)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _libc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    return libc if hasattr(libc, 'malloc_trim') and hasattr(libc, 'mallopt') else None
  except OSError:
    return None


def map_large_buffers() -> None:
  """Give every buffer of 4 MiB or more its own mapping, returned to the system when freed.

  glibc otherwise raises its mmap threshold after the first large free (up to
  32 MiB) and serves later chunk-sized buffers from its heaps, in every
  thread's arena, where freed memory stays resident: the RSS of a long
  conversion creeps up by a tensor or so per parameter. (glibc only;
  elsewhere a no-op.)
  """
  libc = _libc()
  if libc is not None:
    libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (a fixed value also stops the dynamic raise)


def release_freed_memory() -> None:
  """Return freed heap pages to the system (glibc malloc_trim; elsewhere a no-op)."""
  libc = _libc()
  if libc is not None:
    libc.malloc_trim(0)


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
  """Rows (along the first axis) of one tensorstore chunk: at most CHUNK_BYTES each."""
  if not shape:
    return 1
  row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
  return max(1, min(shape[0], CHUNK_BYTES // row_bytes))


def write_blocks(target, src: np.ndarray, rows: int, dtype: np.dtype) -> None:
  """Write `src` into the tensorstore `target` one chunk of rows at a time.

  Each block is cast (bf16 <-> f32 round to nearest even, as torch does) and
  written before the next is made, so beyond `src` itself only one chunk is
  held; a chunk-aligned block is written whole (no read-modify-write).
  """
  if src.ndim == 0:
    target.write(np.asarray(src, dtype)).result()
    return
  for start in range(0, src.shape[0], rows):
    block = contiguous(src[start:start + rows], dtype)
    target[start:start + block.shape[0]].write(block).result()
    del block


def contiguous(a: np.ndarray, dtype: np.dtype, tile: int = 256) -> np.ndarray:
  """A C-contiguous copy of `a` in `dtype`; a transposed 2-D view is copied tile by tile.

  numpy copies a transposed (column-strided) view element by element across
  rows, touching a new cache line per element; 256 x 256 tiles make the same
  copy about 3x faster (Linear weights are all transposed on the way in).
  """
  if a.ndim != 2 or a.flags.c_contiguous or a.strides[-1] == a.itemsize:
    return np.ascontiguousarray(a, dtype=dtype)
  out = np.empty(a.shape, dtype)
  for i in range(0, a.shape[0], tile):
    for j in range(0, a.shape[1], tile):
      out[i:i + tile, j:j + tile] = a[i:i + tile, j:j + tile]
  return out


def _target_dir(out_dir: str) -> None:
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise UserError(f'--output_dir {out_dir} exists and is not an empty directory')


def convert(model_dir: str, out_dir: str, dtype: Any, wmap: WeightMap,
            log: Callable[[str], None] | None = None, source_weights: dict[str, Any] | None = None,
            files: dict[str, bytes] | None = None) -> dict[str, Any]:
  """Convert the checkpoint at `model_dir` (safetensors or GGUF) to an orbax model directory.

  `source_weights`: what the source's weights were stored as (recorded, and carried
  into the results of every run on the converted directory); `files`: name -> bytes
  written beside the parameters after the non-weight files of `model_dir` are copied
  (a GGUF file's config.json and tokenizer.json; a --tokenizer's files). Written
  under `<out_dir>.partial` and renamed at the end: an interrupted conversion never
  leaves a directory that looks complete.
  """
  # About 1 s to import; only converted directories need it.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  _quiet_orbax()
  map_large_buffers()
  log = log or (lambda s: None)
  config = load_config(model_dir)
  if is_orbax_dir(model_dir):
    raise UserError(f'{model_dir} is already a converted orbax model directory')
  _target_dir(out_dir)
  ckpt = open_checkpoint(model_dir, config)
  plans = plan(config, wmap, dtype)
  check_coverage(plans, ckpt.keys(), wmap, config, model_dir)
  tmp = os.path.abspath(out_dir.rstrip('/') + '.partial')
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  params_dir = os.path.join(tmp, PARAMS_DIR)
  np_dtype = np.dtype(jnp.dtype(dtype))
  t0 = time.perf_counter()

  # Phase 1: orbax writes the tree's structure and metadata from rank-preserving
  # one-element placeholders (no weight bytes), as plain zarr arrays (no OCDBT)
  # so that each parameter is a tensorstore array of its own.
  placeholders = unflatten({p.path: np.zeros((1,) * len(p.shape), np_dtype) for p in plans})
  with ocp.StandardCheckpointer(use_ocdbt=False) as ck:
    ck.save(params_dir, placeholders)
    ck.wait_until_finished()
  with open(os.path.join(params_dir, '_METADATA'), encoding='utf-8') as f:
    tree_meta = json.load(f)
  if tree_meta.get('use_ocdbt') or tree_meta.get('use_zarr3'):
    raise RuntimeError(f'orbax wrote an unexpected layout ({params_dir}/_METADATA): '
                       'expected plain zarr arrays without OCDBT')

  # Phase 2: each array re-created at full shape (orbax's own zarr metadata, with
  # the real shape and layer-sized chunks), filled one recipe (layer) at a time.
  ctx = ts.Context({'cache_pool': {'total_bytes_limit': 0}, 'file_io_sync': False})
  for i, p in enumerate(plans):
    where = os.path.join(params_dir, '.'.join(p.path))
    with open(os.path.join(where, '.zarray'), encoding='utf-8') as f:
      meta = json.load(f)
    rows = chunk_rows(row_shape(p), np_dtype.itemsize)
    meta['shape'] = list(p.shape)
    meta['chunks'] = ([1] if p.stacked else []) + ([rows] + list(row_shape(p)[1:]) if row_shape(p) else [])
    spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': where}, 'metadata': meta}
    array = ts.open(spec, create=True, delete_existing=True, context=ctx).result()
    for r in range(len(p.recipes)):
      src = build_row(ckpt.read_copy, p, r, model_dir)
      write_blocks(array[r] if p.stacked else array, src, rows, np_dtype)
      del src
      release_freed_memory()
    log(f'  [{i + 1}/{len(plans)}] {p.name} {tuple(p.shape)}')

  copied = []
  for name in sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else ():
    src = os.path.join(model_dir, name)
    if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES) and name not in WEIGHT_FILES:
      shutil.copy2(src, os.path.join(tmp, name))
      copied.append(name)
  for name, blob in (files or {}).items():
    with open(os.path.join(tmp, name), 'wb') as f:
      f.write(blob)
    copied.append(name)
  config_json = os.path.join(tmp, 'config.json')
  meta = {
      'format': FORMAT,
      'converter_version': CONVERTER_VERSION,
      'tool_version': _tool_version(),
      'created_unix': int(time.time()),
      'dtype': np_dtype.name,
      'model_type': config.model_type,
      'source': {
          'path': os.path.abspath(model_dir),
          'model_type': config.model_type,
          'config_sha256': _sha256(config_json) if os.path.isfile(config_json) else None,
          'files': ckpt.header_digests(),
      },
      'config': config_identity(config),
      'params': {p.name: {'shape': list(p.shape), 'dtype': np_dtype.name} for p in plans},
      'weights': {'format': 'orbax', 'stored_dtype': np_dtype.name,
                  'quant_types': {np_dtype.name.upper(): len(plans)}, 'source': source_weights},
      'copied_files': sorted(set(copied)),
      'convert_s': round(time.perf_counter() - t0, 3),
  }
  with open(os.path.join(tmp, METADATA_FILE), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2)
  ckpt.close()
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty, checked above
  os.replace(tmp, out_dir)
  return meta


def _tool_version() -> str:
  try:
    return metadata.version('maxact-jax')
  except metadata.PackageNotFoundError:
    return 'unknown'


def read_metadata(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, METADATA_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path}: {e}') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise UserError(f'{path} is not a {FORMAT} metadata file')
  if meta.get('converter_version') != CONVERTER_VERSION:
    raise UserError(f'{model_dir} was converted by converter version {meta.get("converter_version")}, '
                    f'this is version {CONVERTER_VERSION}: convert it again')
  return meta


def check(model_dir: str, config: ModelConfig, dtype: Any = None) -> dict[str, Any]:
  """Refuse an orbax directory whose parameters were not made for this config.

  Three checks, cheapest first: the recorded config against config.json, the
  recorded parameter shapes against the model built from config.json, and
  orbax's own metadata of the stored arrays against those shapes.
  """
  del dtype  # any dtype restores (orbax casts)
  # About 1 s to import; only converted directories need it.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  meta = read_metadata(model_dir)
  src = meta.get('source', {}).get('path', '?')
  if meta.get('model_type') != config.model_type or meta.get('config') != config_identity(config):
    mine = config_identity(config)
    theirs = meta.get('config') or {}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    raise UserError(f'{model_dir}: the parameters were converted from {src} (model_type '
                    f'{meta.get("model_type")!r}) for another config than {model_dir}/config.json '
                    f'(differs in: {", ".join(diff[:5])}); convert this model again')
  want = param_shapes(config)
  recorded = {k: v['shape'] for k, v in meta.get('params', {}).items()}
  _compare(model_dir, want, recorded, 'recorded in ' + METADATA_FILE)
  _quiet_orbax()
  params_dir = os.path.join(model_dir, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise UserError(f'{model_dir} has no {PARAMS_DIR}/ orbax checkpoint')
  try:
    with ocp.StandardCheckpointer() as ck:
      stored = ck.metadata(params_dir)
  except Exception as e:  # orbax raises assorted errors on damaged directories
    raise UserError(f'{params_dir} is not a readable orbax checkpoint: {str(e).splitlines()[0]}') from None
  tree = getattr(stored, 'item_metadata', stored)
  tree = getattr(tree, 'tree', tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  stored_shapes = {'/'.join(str(getattr(k, 'key', k)) for k in kp): list(getattr(v, 'shape', ()))
                   for kp, v in flat}
  _compare(model_dir, want, stored_shapes, 'stored in ' + PARAMS_DIR + '/')
  return meta


def param_shapes(config: ModelConfig) -> dict[str, list[int]]:
  """'a/b/c' -> shape of every parameter of the model config.json builds (abstract, no weights)."""
  flat = jax.tree_util.tree_flatten_with_path(transformer.abstract_params(config))[0]
  return {'/'.join(k.key for k in kp): list(a.shape) for kp, a in flat}


def _compare(model_dir: str, want: dict[str, list[int]], got: dict[str, list[int]], what: str) -> None:
  for name, shape in want.items():
    if name not in got:
      raise UserError(f'{model_dir}: parameter {name} is missing from the parameters {what}: '
                      'not a conversion of this model')
    if list(got[name]) != list(shape):
      raise UserError(f'{model_dir}: parameter {name} has shape {tuple(got[name])} {what}, but '
                      f'config.json builds {tuple(shape)}: not a conversion of this model')
  extra = sorted(set(got) - set(want))
  if extra:
    raise UserError(f'{model_dir}: parameter {extra[0]} {what} is not part of the model config.json builds')


def restore(model_dir: str, config: ModelConfig, dtype: Any,
            sharding: Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding] | None = None) -> dict:
  """The parameters, restored by orbax straight into their shardings (cast to `dtype`)."""
  # About 1 s to import; only converted directories need it.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  check(model_dir, config)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = transformer.abstract_params(config, dtype)
  targets = jax.tree_util.tree_map_with_path(
      lambda kp, a: jax.ShapeDtypeStruct(
          a.shape, a.dtype,
          sharding=sharding(tuple(k.key for k in kp), a.shape) if sharding else default), shapes)
  _quiet_orbax()
  with ocp.StandardCheckpointer() as ck:
    return ck.restore(os.path.join(model_dir, PARAMS_DIR), targets)


__all__ = ['CONVERTER_VERSION', 'FORMAT', 'METADATA_FILE', 'check', 'convert', 'is_orbax_dir', 'read_metadata',
           'restore']
