"""Hugging Face checkpoints to Flax parameters, through one declarative map per model_type."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax.numpy as jnp

from converters import dense, gemma, gguf_io, moe, orbax_io, qwen35, qwen_vl, weights
from converters.weight_map import WeightMap, check_coverage, load, open_checkpoint, plan, resolve_layout
from maxact_jax import gguf_file
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.families import load_config

# model_type -> its WeightMap, or a function of the config giving one (a map whose
# keys depend on sizes, e.g. one checkpoint tensor per expert).
MAPS: dict[str, WeightMap | Callable[[ModelConfig], WeightMap]] = {
    **dense.MAPS,
    **gemma.MAPS,
    **qwen_vl.MAPS,
    **qwen35.MAPS,
    **moe.MAPS,
}


def weight_map(config: ModelConfig) -> WeightMap:
  try:
    entry = MAPS[config.model_type]
  except KeyError:
    raise UserError(f'no weight map for model_type {config.model_type!r}') from None
  return entry if isinstance(entry, WeightMap) else entry(config)


def check_checkpoint(model_dir: str, config: ModelConfig, dtype: Any = jnp.float32) -> None:
  """Read only the headers: every tensor is readable and the map covers them exactly
  (an orbax directory: its parameters were converted for this config)."""
  if orbax_io.is_orbax_dir(model_dir):
    orbax_io.check(model_dir, config)
    return
  keys = open_checkpoint(model_dir, config).keys()
  config, wmap = resolve_layout(config, weight_map(config), keys, model_dir)
  check_coverage(plan(config, wmap, dtype, keys), keys, wmap, config, model_dir)


def load_params(model_dir: str, config: ModelConfig, dtype: Any = jnp.float32,
                place: Callable | None = None, sharding: Callable | None = None) -> dict:
  """Flax parameters of the checkpoint in `model_dir` (safetensors or converted orbax), in `dtype`.

  place(path, host array) -> device array puts each streamed safetensors
  parameter; sharding(path, shape) -> Sharding is the restore target of each
  orbax parameter. Without them, parameters go to the default device.
  """
  if orbax_io.is_orbax_dir(model_dir):
    return orbax_io.restore(model_dir, config, dtype, sharding)
  return load(model_dir, config, weight_map(config), dtype, place)


def convert(model_dir: str, out_dir: str, dtype: Any = jnp.bfloat16, log: Callable | None = None,
            tokenizer: str | None = None) -> dict:
  """Convert a safetensors or GGUF checkpoint once to an orbax model directory (see
  orbax_io); `tokenizer`: a directory whose tokenizer files replace the checkpoint's."""
  config = load_config(model_dir)
  gguf_path = gguf_file.find(model_dir)
  files = gguf_io.describing_files(gguf_path) if gguf_path else {}
  if tokenizer:
    files.update(tokenizer_files(tokenizer))
  return orbax_io.convert(model_dir, out_dir, dtype, weight_map(config), log, source_weights=weights.info(model_dir),
                          files=files)


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def tokenizer_files(tokenizer_dir: str) -> dict[str, bytes]:
  """The tokenizer files of a directory (tokenizer.json at least), to copy elsewhere."""
  if not os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILES[0])):
    raise UserError(f'--tokenizer={tokenizer_dir} has no {TOKENIZER_FILES[0]}')
  out = {}
  for name in TOKENIZER_FILES:
    path = os.path.join(tokenizer_dir, name)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[name] = f.read()
  return out


def weights_info(model_path: str) -> dict:
  """What the checkpoint's weights are stored as (results' `run.weights`; see weights.py)."""
  return weights.info(model_path)


__all__ = ['MAPS', 'WeightMap', 'check_checkpoint', 'convert', 'load_params', 'plan', 'weight_map', 'weights_info']
