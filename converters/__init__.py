"""Hugging Face checkpoints to Flax parameters, through one declarative map per model_type."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from converters import dense, moe
from converters.weight_map import WeightMap, load, plan
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError

# model_type -> its WeightMap, or a function of the config that builds it (a map whose
# tensor names depend on sizes: per-expert keys, fused-QKV row ranges).
MAPS: dict[str, WeightMap | Callable[[ModelConfig], WeightMap]] = {
    **dense.MAPS,
    **moe.MAPS,
}


def weight_map(config: ModelConfig) -> WeightMap:
  try:
    entry = MAPS[config.model_type]
  except KeyError:
    raise UserError(f'no weight map for model_type {config.model_type!r}') from None
  return entry if isinstance(entry, WeightMap) else entry(config)


def load_params(model_dir: str, config: ModelConfig, dtype: Any = jnp.float32,
                place: Callable | None = None) -> dict:
  """Flax parameters of the checkpoint in `model_dir`, in `dtype`."""
  return load(model_dir, config, weight_map(config), dtype, place)


__all__ = ['MAPS', 'WeightMap', 'load_params', 'plan', 'weight_map']
