"""Float32 runs ask every matmul for full float32 precision, on every backend.

GPUs compute a float32 dot in TF32 by default and TPUs in bf16 passes, either of
which misses the float32 contract's 1e-4; the one setting that prevents it is
`layers.precision_for` (applied by the model's matmul helpers). Here: every
dot_general of the float32 statistics step and of the crosscheck's forward pass
(logits included), for every family, carries precision HIGHEST in the program
JAX hands to XLA, whatever the backend; in bfloat16 the backend's default.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from maxact_jax import fixtures, fixtures_moe, parallel
from maxact_jax.families import parse_config
from maxact_jax.models import transformer

FAMILIES = [t for t in fixtures.TINY if not t.endswith('_text')] + list(fixtures_moe.TINY_MOE)


def _programs(model_type: str, dtype) -> list[str]:
  """StableHLO of the statistics step and of the forward pass with logits, lowered
  from abstract shapes (nothing compiled, no weights)."""
  overrides = fixtures_moe.TINY_MOE.get(model_type, {})
  config = parse_config(fixtures.make_config(model_type, 256, **overrides).to_dict())
  params = transformer.abstract_params(config, dtype)
  ids, valid = jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 300), jnp.bool_)
  model = transformer.build(config, dtype)
  stats_step = jax.jit(parallel.stats_body(config, dtype))
  forward = jax.jit(lambda p, i, v: model.apply({'params': p}, i, v, logits=True))
  return [f.lower(params, ids, valid).as_text() for f in (stats_step, forward)]


def _dot_precisions(program: str) -> list[str]:
  dots = [line for line in program.splitlines() if 'stablehlo.dot_general' in line]
  return [(re.search(r'precision = \[([^\]]*)\]', line) or [None, 'DEFAULT'])[1] for line in dots]


@pytest.mark.parametrize('model_type', FAMILIES)
def test_float32_dots_run_at_full_precision(model_type):
  for program in _programs(model_type, jnp.float32):
    precisions = _dot_precisions(program)
    assert precisions, 'no dot found'
    assert set(precisions) == {'HIGHEST, HIGHEST'}, precisions


def test_bfloat16_dots_keep_the_backend_default():
  precisions = [p for program in _programs('qwen3', jnp.bfloat16) for p in _dot_precisions(program)]
  assert precisions and set(precisions) == {'DEFAULT, DEFAULT'}
