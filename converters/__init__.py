"""Hugging Face checkpoints to Flax parameters, through one declarative map per model_type."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from converters import dense, gemma, moe, orbax_io, qwen35, qwen_vl
from converters.weight_map import WeightMap, check_coverage, load, open_checkpoint, plan, resolve_layout
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError

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


def convert(model_dir: str, out_dir: str, dtype: Any = jnp.bfloat16, log: Callable | None = None) -> dict:
  """Convert a safetensors checkpoint once to an orbax model directory (see orbax_io)."""
  from maxact_jax.config import load_config  # pylint: disable=import-outside-toplevel

  return orbax_io.convert(model_dir, out_dir, dtype, weight_map(load_config(model_dir)), log)


__all__ = ['MAPS', 'WeightMap', 'check_checkpoint', 'convert', 'load_params', 'plan', 'weight_map']
