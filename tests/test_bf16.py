"""bfloat16, the default dtype: the same rounding as PyTorch's bf16, and the CPU's native bf16 dots.

Every product of the model asks for a float32 result and rounds it once to bf16
(`layers.matmul`/`layers.einsum`): what torch's bf16 matmul and F.linear (addmm: the
bias joins the float32 accumulator before the rounding) compute, and what lets
XLA:CPU hand bf16 operands to its bf16 kernel instead of converting them (the
weights too) to float32 at every step.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maxact_jax import measure_step
from maxact_jax.families import load_config
from maxact_jax.models import layers, transformer
from tests import parity_utils


def _bf16(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(a).to(torch.bfloat16)


@pytest.mark.parametrize('bias', [False, True])
def test_linear_rounds_where_torch_does(bias):
  rng = np.random.default_rng(0)
  x, w, b = rng.standard_normal((2, 40, 576)), rng.standard_normal((192, 576)), 3 * rng.standard_normal(192)
  x, w, b = (a.astype(np.float32) for a in (x, w, b))
  want = torch.nn.functional.linear(_bf16(x), _bf16(w), _bf16(b) if bias else None).float().numpy()
  tx, tw, tb = (jnp.asarray(_bf16(a).float().numpy(), jnp.bfloat16) for a in (x, w.T.copy(), b))
  got = np.asarray(layers.matmul(tx, tw, jnp.bfloat16, tb if bias else None).astype(jnp.float32))
  # The same products summed in another order: the float32 sums differ in their last
  # bits, so a few results round the other way (one bf16 ulp); rounding the bias
  # separately (the old way) moved about a third of them.
  ulp = 2.0 ** (np.floor(np.log2(np.abs(want) + 1e-30)) - 7)  # bf16 keeps 8 significant bits
  assert np.all(np.abs(got - want) <= ulp)
  assert np.mean(got == want) > 0.99


def test_attention_products_round_where_torch_does():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 3, 50, 64)).astype(np.float32), rng.standard_normal((2, 3, 70, 64)).astype(np.float32)
  want = torch.matmul(_bf16(q), _bf16(k).transpose(-1, -2)).float().numpy()
  got = layers.einsum('bhqd,bhkd->bhqk', jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  assert np.mean(np.asarray(got.astype(jnp.float32)) == want) > 0.99


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in an optimized HLO module's text, except
  those asked for at float32's full precision: products the model computes in
  float32 on purpose whatever its dtype (the MoE combine, float32 routers, the delta
  rule)."""
  types = dict(re.findall(r'%(\S+) = (\w+)\[', hlo))
  dots = re.findall(r' dot\(%(\S+?), %(\S+?)\)(.*)', hlo)
  return [(types.get(a, '?'), types.get(b, '?')) for a, b, rest in dots if 'operand_precision={highest' not in rest]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the form of XLA:CPU\'s compiled dots')
@pytest.mark.parametrize('model_type', ['qwen3', 'qwen3_moe'])
def test_bf16_step_runs_bf16_dots_on_the_cpu(model_type, checkpoint, moe_checkpoint):
  """The compiled bf16 statistics step keeps every dot's operands in bf16: no float32
  copy of a weight or an activation feeds a matmul (XLA:CPU makes one for a dot whose
  result is bf16)."""
  model_dir = moe_checkpoint(model_type) if model_type.endswith('_moe') else checkpoint(model_type)
  config = load_config(model_dir)
  step = measure_step.make_stats_step(config, jnp.bfloat16)
  params = transformer.abstract_params(config, jnp.bfloat16)
  ids, valid = jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 300), jnp.bool_)
  operands = _dot_operand_types(step.lower(params, ids, valid).compile().as_text())
  assert operands, 'no dot found in the compiled step'
  assert all(pair == ('bf16', 'bf16') for pair in operands), operands


@pytest.mark.parametrize('model_type', ['qwen2', 'qwen3'])
def test_bf16_measure_matches_the_reference_in_bf16(model_type, checkpoint, ids_corpus, tmp_path):
  model_dir = checkpoint(model_type)
  doc, top_doc, ref = parity_utils.measure_and_reference(model_dir, ids_corpus, str(tmp_path), batch_size=6,
                                                         dtype='bfloat16')
  assert doc['run']['dtype'] == 'bfloat16'
  n_layers = load_config(model_dir).num_hidden_layers
  # 13 per activation tap (basic, Sun's peak, quantiles, top-K), 7 per mlp_gate tap.
  assert parity_utils.assert_stats_close_bf16(doc, top_doc, ref) >= 13 * (len(ref) - n_layers) + 7 * n_layers
