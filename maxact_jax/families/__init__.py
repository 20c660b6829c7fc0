"""Family specs: how each model_type's config.json becomes a ModelConfig.

A family is a short parse function over a `ConfigReader` (the whitelist); the
model is assembled from shared blocks in `maxact_jax/models/`, and the weight
map lives in `converters/`. Register a new family by adding its parsers here.
`load_config` (a checkpoint directory) and `parse_config` (a config.json
already read) dispatch on model_type to the family that understands it.
"""

from __future__ import annotations

import os
from typing import Any

from maxact_jax import gguf_file
from maxact_jax.config import ConfigReader, ModelConfig, read_config_json
from maxact_jax.errors import UserError
from maxact_jax.families import dense, gemma, moe, qwen35, qwen_vl

PARSERS = {
    **dense.PARSERS,
    **gemma.PARSERS,
    **qwen_vl.PARSERS,
    **qwen35.PARSERS,
    **moe.PARSERS,
}


def parse_config(raw: dict[str, Any], where: str = 'config.json') -> ModelConfig:
  """Dispatch on model_type to the family that understands it."""
  model_type = raw.get('model_type')
  parser = PARSERS.get(model_type)
  if parser is None:
    raise UserError(f'{where}: unknown model_type {model_type!r} (supported: '
                    f'{", ".join(sorted(PARSERS))})')
  reader = ConfigReader(raw, where)
  config = parser(reader)
  reader.finish()
  return config


def load_config(model_dir: str) -> ModelConfig:
  """The ModelConfig of a checkpoint directory, a GGUF file or a converted directory."""
  where = gguf_file.find(model_dir) or os.path.join(model_dir or '', 'config.json')
  return parse_config(read_config_json(model_dir), where)


__all__ = ['PARSERS', 'load_config', 'parse_config']
