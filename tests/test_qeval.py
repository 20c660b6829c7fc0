"""qeval: scheme grammar, fake-quantization grids by hand, transforms that keep the function,
the planted outlier, and the metrics against numpy.

The planted-outlier checkpoint is a tiny qwen3 (hidden 64, 3 layers) whose MLP unit 0
of layer 1 fires on BOS (token 1, first in every sample) and writes about 1400 into
residual channel 13 (`fixtures.plant_outlier`, as the demo checkpoint): the down
projection of layer 1 then reads ~36 on BOS against ~0.1 elsewhere, and from layer 2
on the normalised residual stream (the q/k/v and gate/up inputs) holds sqrt(64) = 8
in channel 13 on BOS against ~2.5 at most elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxact_jax import capture, cli, fakequant, fixtures, fixtures_moe, measure_step, qeval, qschemes, qtransforms
from maxact_jax.families import load_config, parse_config
from maxact_jax.errors import UserError
from maxact_jax.models import moe, transformer
from tests.conftest import write_ids_corpus

BOS, LAYER, CHANNEL = 1, 1, 13
N_CALIB, N_EVAL = 8, 24


# ---------------------------------------------------------------------------
# The grammar.


def test_presets_expand_to_their_definitions():
  s = qschemes.parse_scheme
  w8a8 = s('w8a8')
  assert (w8a8.weights, w8a8.acts) == (fakequant.WeightSpec('int8', 'channel'), fakequant.ActSpec('int8', 'token'))
  assert s('w8a8-static').acts == fakequant.ActSpec('int8', 'static', None)
  assert s('w8a8-static+clip0.999').acts == fakequant.ActSpec('int8', 'static', 0.999)  # the user's modifier wins
  assert s('fp8-dynamic').weights == fakequant.WeightSpec('fp8_e4m3', 'channel')
  assert s('fp8-dynamic').acts == fakequant.ActSpec('fp8_e4m3', 'token')
  assert s('fp8-static').weights == fakequant.WeightSpec('fp8_e4m3', 'tensor')
  assert s('fp8-static').acts == fakequant.ActSpec('fp8_e4m3', 'static')
  a8 = s('a8-naive')
  assert (a8.weights.fmt, a8.acts) == ('none', fakequant.ActSpec('int8', 'tensor'))
  w4a16 = s('w4a16')
  assert (w4a16.weights, w4a16.acts.fmt) == (fakequant.WeightSpec('int4', 'group', 128), 'bf16')
  assert s('w4a16+wchannel').weights == fakequant.WeightSpec('int4', 'channel', None)
  assert (s('w4a4').weights.fmt, s('w4a4').acts) == ('int4', fakequant.ActSpec('int4', 'token'))
  r = s('w4a4+rotate')
  assert r.rotate == 0 and r.smooth is None and r.transforms == ('rotate0',)
  sm = s('w8a8-static+smooth0.5')
  assert sm.smooth == 0.5 and sm.acts.static and sm.transforms == ('smooth0.5',)
  both = s('none+smooth0.8+rotate7+rotdown')
  assert both.transforms == ('rotate7', 'rotdown0', 'smooth0.8')  # rotations first, whatever the order written
  assert s('w6afp8+g32+tensor+router+attn').describe() == {
      'weights': {'format': 'int6', 'scale': 'group', 'group': 32},
      'activations': {'format': 'fp8_e4m3', 'scale': 'tensor', 'threshold': None},
      'rotate_seed': None, 'rotate_down_seed': None, 'smooth_alpha': None, 'router': True, 'attention': True}
  assert s('w3').acts.fmt == 'none' and s('a16').weights.fmt == 'none'
  assert [x.name for x in qschemes.parse_schemes(list(qschemes.DEFAULT_SCHEMES))] == list(qschemes.DEFAULT_SCHEMES)


@pytest.mark.parametrize('name, pattern', [
    ('w8a9', 'activation bits 9 out of range'),
    ('w1a8', 'weight bits 1 out of range'),
    ('int8', 'unknown scheme'),
    ('', 'empty scheme'),
    ('w8a8+smooth1.5', r'alpha must be in \[0, 1\], got 1.5'),
    ('w8a8+clip1', r'clip quantile must be in \(0, 1\)'),
    ('w8a8+static+token', 'more than one activation scale'),
    ('w8a8+g0', 'group size must be positive'),
    ('w8a8+rotate+rotate', 'more than one rotate'),
    ('w8a16+static', 'needs quantized activations'),
    ('a8+wtensor', 'needs quantized weights'),
    ('w8a8+foo', "unknown modifier 'foo'"),
])
def test_bad_schemes(name, pattern):
  with pytest.raises(UserError, match=pattern):
    qschemes.parse_scheme(name)


def test_duplicate_and_empty_scheme_lists():
  with pytest.raises(UserError, match='twice'):
    qschemes.parse_schemes(['w8a8', 'w8a8'])
  with pytest.raises(UserError, match='empty'):
    qschemes.parse_schemes([])


# ---------------------------------------------------------------------------
# Grids on hand-made tensors.


def quant_act(x, spec, mask=None, static=None):
  x = jnp.asarray(x, jnp.float32)
  mask = jnp.ones(x.shape[:-1], bool) if mask is None else jnp.asarray(mask)
  q, s = fakequant.quantize_act(x, spec, mask, None if static is None else jnp.float32(static))
  return np.asarray(q), jax.tree_util.tree_map(np.asarray, s)


def test_activation_scales_by_hand():
  x = np.array([[0.5, -1.27, 0.004, 0.3],  # per-token t = 1.27: step 0.01
                [2.54, 0.011, -0.02, 1.0],  # t = 2.54: step 0.02
                [100.0, 7.0, 7.0, 7.0]], np.float32)  # a padding row: never counts
  mask = np.array([True, True, False])
  q, s = quant_act(x, fakequant.ActSpec('int8', 'token'), mask)
  np.testing.assert_allclose(q[:2], [[0.5, -1.27, 0.0, 0.3], [2.54, 0.02, -0.02, 1.0]], atol=1e-6)
  assert s['count'] == 8 and s['clipped'] == 0 and s['max_abs'] == pytest.approx(2.54)
  # levels: 2^8 x mean |x| / t over the real elements; mean threshold over the real tokens.
  ratio = (0.5 + 1.27 + 0.004 + 0.3) / 1.27 + (2.54 + 0.011 + 0.02 + 1.0) / 2.54
  assert s['sum_ratio'] == pytest.approx(ratio, rel=1e-6)
  assert s['sum_threshold'] / s['groups'] == pytest.approx((1.27 + 2.54) / 2)
  # Per-tensor dynamic: one threshold for the batch, the padding row's 100 not included.
  q, s = quant_act(x, fakequant.ActSpec('int8', 'tensor'), mask)
  np.testing.assert_allclose(q[0], [0.5, -1.28, 0.0, 0.3], atol=1e-6)  # step 0.02 now
  assert s['sum_threshold'] == pytest.approx(2.54) and s['groups'] == 1
  # Static: the calibrated threshold clips; 1.27 / 127 = 0.01.
  q, s = quant_act(x, fakequant.ActSpec('int8', 'static'), mask, static=1.27)
  np.testing.assert_allclose(q[1], [1.27, 0.01, -0.02, 1.0], atol=1e-6)
  assert s['clipped'] == 1  # 2.54 > 1.27
  # INT4: codes -7..7, t = 7 per token: round half to even.
  q, _ = quant_act(np.array([[2.5, 3.5, -7.0, 0.49]]), fakequant.ActSpec('int4', 'token'))
  np.testing.assert_array_equal(q, [[2.0, 4.0, -7.0, 0.0]])
  # FP8 e4m3 per token: t = 448 -> scale 1, round to the e4m3 grid (17 -> 16, a tie to even).
  q, _ = quant_act(np.array([[448.0, 17.0, 0.3, -1e-3]]), fakequant.ActSpec('fp8_e4m3', 'token'))
  np.testing.assert_array_equal(q, [[448.0, 16.0, 0.3125, -2.0 ** -9]])
  # 16-bit: a round trip through bfloat16.
  q, _ = quant_act(np.array([[1.0 + 2 ** -9, 3.0]]), fakequant.ActSpec('bf16'))
  np.testing.assert_array_equal(q, [[1.0, 3.0]])
  # A token of zeros: threshold 0, everything 0, no division by zero.
  q, s = quant_act(np.zeros((1, 4)), fakequant.ActSpec('int8', 'token'))
  assert not q.any() and s['sum_ratio'] == 0


def test_weight_scales_by_hand():
  w = np.array([[0.5, -4.0],
                [-1.27, 1.0],
                [0.004, 2.0],
                [0.3, 0.03]], np.float32)  # [in 4, out 2]
  q = lambda spec: np.asarray(fakequant.quantize_weight(jnp.asarray(w), spec))
  # Per output channel (column here, HF's row): t = 1.27 and 4.0.
  np.testing.assert_allclose(q(fakequant.WeightSpec('int8', 'channel'))[:, 0], [0.5, -1.27, 0.0, 0.3], atol=1e-6)
  np.testing.assert_allclose(q(fakequant.WeightSpec('int8', 'channel'))[:, 1],
                             np.round(w[:, 1] / (4 / 127)) * (4 / 127), atol=1e-6)
  # Per tensor: t = 4 for both columns.
  np.testing.assert_allclose(q(fakequant.WeightSpec('int8', 'tensor')), np.round(w / (4 / 127)) * (4 / 127), atol=1e-6)
  # Groups of 3 input channels: rows 0-2 and a last group of row 3 alone (exact: its own max).
  g = q(fakequant.WeightSpec('int4', 'group', 3))
  np.testing.assert_allclose(g[:3, 0], np.round(w[:3, 0] / (1.27 / 7)) * (1.27 / 7), atol=1e-6)
  np.testing.assert_allclose(g[3], w[3], atol=1e-7)
  # A stacked kernel [layers, experts, in, out] is quantized per matrix.
  stacked = jnp.asarray(np.stack([w, 2 * w])[None])
  out = np.asarray(fakequant.quantize_weight(stacked, fakequant.WeightSpec('int8', 'tensor')))
  np.testing.assert_allclose(out[0, 1], 2 * out[0, 0], rtol=1e-6)


@pytest.mark.parametrize('fmt', ['int8', 'int4', 'int3', 'fp8_e4m3'])
@pytest.mark.parametrize('scale', ['token', 'tensor', 'static'])
def test_quantized_activations_lie_on_the_grid(fmt, scale):
  rng = np.random.RandomState(0)
  x = (rng.standard_normal((3, 5, 32)) * np.exp(rng.uniform(-3, 3, (3, 5, 1)))).astype(np.float32)
  mask = rng.rand(3, 5) > 0.2
  spec = fakequant.ActSpec(fmt, scale)
  static = 0.7 * float(np.abs(x).max())
  q, _ = quant_act(x, spec, mask, static if scale == 'static' else None)
  qmax = fakequant.format_of(fmt).qmax
  t = {'token': np.abs(x).max(-1, keepdims=True), 'tensor': np.abs(x)[mask].max(),
       'static': np.float32(static)}[scale]
  scale_ = np.broadcast_to(np.float32(t) / np.float32(qmax), x.shape)
  assert fakequant.on_grid(q[mask], scale_[mask], fmt)
  assert not fakequant.on_grid(x[mask], scale_[mask], fmt)  # the check can fail


@pytest.mark.parametrize('spec', [fakequant.WeightSpec('int8', 'channel'), fakequant.WeightSpec('int4', 'tensor'),
                                  fakequant.WeightSpec('int4', 'group', 5), fakequant.WeightSpec('fp8_e4m3', 'channel')])
def test_quantized_weights_lie_on_the_grid(spec):
  w = np.random.RandomState(1).standard_normal((2, 13, 7)).astype(np.float32)
  q = np.asarray(fakequant.quantize_weight(jnp.asarray(w), spec))
  t = np.asarray(fakequant.weight_threshold(jnp.abs(jnp.asarray(w)), spec))
  scale = np.broadcast_to(t / np.float32(fakequant.format_of(spec.fmt).qmax), w.shape)
  assert fakequant.on_grid(q, scale, spec.fmt)


# ---------------------------------------------------------------------------
# Rotations and smoothing factors.


@pytest.mark.parametrize('n', [1, 2, 4, 12, 20, 24, 28, 36, 60, 64, 576, 896, 960, 1536])
def test_hadamard_matrices(n):
  h = qtransforms.hadamard(n)
  assert h is not None and set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
  q, how = qtransforms.rotation_matrix(n, seed=3)
  np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
  assert how.startswith('randomized Hadamard') and qtransforms.incoherence(q) == pytest.approx(1.0)
  # Applied factor by factor (as on the fly), the same product.
  r = qtransforms.rotation(n, seed=3)
  assert all(f.shape[0] <= max(qtransforms.MAX_FACTOR, n if len(r.factors) == 1 else 0) for f in r.factors)
  x = np.random.RandomState(0).standard_normal((2, 3, n)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(r.apply(jnp.asarray(x))), x @ q, atol=1e-5)


def test_rotation_without_a_hadamard_matrix():
  for n in (6, 18, 52, 92):  # not a multiple of 4; 52 and 92 have none built here (no Paley order)
    assert qtransforms.hadamard(n) is None
  q, how = qtransforms.rotation_matrix(18, seed=0)
  np.testing.assert_allclose(q @ q.T, np.eye(18), atol=1e-12)
  assert how == 'Hadamard of order 2 x random orthogonal of order 9'
  q, how = qtransforms.rotation_matrix(184, seed=0)
  assert how == 'Hadamard of order 8 x random orthogonal of order 23'
  # The Kronecker keeps the spread of a single outlier channel closer to a Hadamard's than a
  # random orthogonal matrix of the whole size does.
  rng = np.random.RandomState(0)
  assert qtransforms.incoherence(q) < qtransforms.incoherence(qtransforms.random_orthogonal(184, rng))


def test_smoothing_factors_by_hand():
  s = qtransforms.smoothing_factors(np.array([16.0, 1.0, 0.0, 4.0]), np.array([0.25, 4.0, 1.0, 0.0]), 0.5)
  # sqrt(16 / 0.25) = 8, sqrt(1 / 4) = 0.5; a channel never active or never read: 1.
  np.testing.assert_allclose(s, [8.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(qtransforms.smoothing_factors(np.array([9.0]), np.array([3.0]), 1.0), [9.0])
  np.testing.assert_allclose(qtransforms.smoothing_factors(np.array([9.0]), np.array([3.0]), 0.0), [1 / 3])


# ---------------------------------------------------------------------------
# Transforms that keep the function (float32, random weights, random norm weights).


def tiny_config(model_type: str, **overrides):
  if model_type in fixtures_moe.TINY_MOE:
    hf = fixtures.config_class(model_type)(vocab_size=256, **{**fixtures_moe.TINY_MOE[model_type], **overrides})
  else:
    hf = fixtures.make_config(model_type, **overrides)
  return parse_config(hf.to_dict(), model_type)


def jittered_params(config, seed=0):
  """Random weights of the model's shapes (numpy, no compiled init); norm weights and biases
  random too (transformers starts them constant, which would hide a misplaced fold)."""
  rng = np.random.RandomState(seed)
  abstract = transformer.abstract_params(config)

  def draw(path, s):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if 'norm' in name:
      a = (1.0 - config.norm_offset) + 0.3 * rng.standard_normal(s.shape)
    elif len(s.shape) >= 2 and 'embedding' not in name and 'conv1d' not in name:
      a = rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])
    else:
      a = 0.3 * rng.standard_normal(s.shape)
    return jnp.asarray(a, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def fake_input_max(config, rng):
  return {s: {l: rng.uniform(0.05, 20.0, config.hidden_size) for l in range(config.num_hidden_layers)}
          for sites in qtransforms.READ_SITES.values() for s in sites}


@pytest.mark.parametrize('model_type, overrides', [
    ('qwen3', {}), ('llama', {'tie_word_embeddings': True}), ('gemma', {}), ('qwen3_moe', {}), ('gpt_oss', {}),
    ('qwen3_5_moe_text', {}),
])
def test_rotation_and_smoothing_leave_the_logits_unchanged(model_type, overrides):
  """float32: within 1e-5 of the largest logit, for (1+w) norms, tied embeddings, MoE with
  biases and sinks, and a hybrid with linear attention and a gated shared expert.

  The hybrid's chunked delta rule is ill-conditioned in float32: weights moved by one
  ulp (relative 1.2e-7) already move its logits by about 1e-5 of the largest. There the
  bound is ten times that sensitivity, measured here.
  """
  config = tiny_config(model_type)
  if overrides:
    config = parse_config({**fixtures.make_config(model_type).to_dict(), **overrides}, model_type)
  params = jittered_params(config)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(0, 256, (2, 24)), jnp.int32)
  valid = jnp.ones((2, 24), bool).at[1, 19:].set(False)
  fns = {}

  def logits(c, p):  # one compiled forward per config (rotation unties the head)
    if c not in fns:
      fns[c] = jax.jit(lambda p_, c=c: transformer.build(c).apply({'params': p_}, ids, valid, logits=True))
    return np.asarray(fns[c](p))[np.asarray(valid)]

  ref = logits(config, params)
  tol = 1e-5 * np.abs(ref).max()
  if config.linear_attention is not None:
    key = jax.random.PRNGKey(5)
    ulp = jax.tree_util.tree_map(lambda a: a * (1 + 1.2e-7 * jax.random.normal(key, a.shape)), params)
    sensitivity = np.abs(logits(config, ulp) - ref).max()
    assert sensitivity > 0.3 * tol  # the premise: its own float32 noise is near the bound
    tol = max(tol, 10 * sensitivity)
  c_rot, p_rot, how = qtransforms.rotate(config, params, seed=1)
  assert how.startswith('randomized Hadamard') and not c_rot.tie_word_embeddings
  assert np.abs(logits(c_rot, p_rot) - ref).max() <= tol
  p_smooth, factors = qtransforms.smooth(config, params, fake_input_max(config, rng), 0.5)
  assert len(factors) == 2 * config.num_hidden_layers and all((f > 0).all() for f in factors.values())
  assert np.abs(logits(config, p_smooth) - ref).max() <= tol
  p_both, _ = qtransforms.smooth(c_rot, p_rot, fake_input_max(config, rng), 0.8)
  assert np.abs(logits(c_rot, p_both) - ref).max() <= tol
  # The transforms did something: the weights moved.
  first = lambda p: np.asarray(jax.tree_util.tree_leaves(p['model'][transformer.plan_segments(config)[0].name])[0])
  assert not np.allclose(first(p_rot), first(params)) and not np.allclose(first(p_smooth), first(params))


@pytest.mark.parametrize('model_type', ['qwen3', 'qwen3_moe', 'qwen3_5_moe_text'])
def test_online_down_rotation_leaves_the_logits_unchanged(model_type):
  """Down projections folded with Q^T, their input multiplied by Q on the fly at the down_proj
  sites (dense MLPs, experts, shared experts): the same logits (float32, 1e-5), a spread input."""
  config = tiny_config(model_type)
  params = jittered_params(config)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(0, 256, (2, 20)), jnp.int32)
  valid = jnp.ones((2, 20), bool).at[0, 15:].set(False)
  model = transformer.build(config)
  ref = np.asarray(jax.jit(lambda p: model.apply({'params': p}, ids, valid, logits=True))(params))[np.asarray(valid)]
  rotated, rotations = qtransforms.rotate_down(config, params, seed=2)
  widths = {config.intermediate_size} | ({config.moe.moe_intermediate_size} if config.moe else set())
  if config.moe and config.moe.shared_expert_intermediate_size:
    widths.add(config.moe.shared_expert_intermediate_size)
  assert set(rotations) <= widths and len(rotations) >= 1
  seen = []

  def identity(site, x, mask, layer):
    del mask, layer
    seen.append(site)
    return x, None

  op = qeval.with_online(identity, rotations)

  @jax.jit
  def forward(p):
    with nn.intercept_methods(capture.module_interceptor(
        qeval.site_handler(op, valid, frozenset({'linear', 'experts'})))):
      return model.apply({'params': p}, ids, valid, logits=True)

  out = np.asarray(forward(rotated))[np.asarray(valid)]
  tol = 1e-5 * np.abs(ref).max()
  if config.linear_attention is not None:
    tol *= 10  # the hybrid's own float32 sensitivity (see the test above)
  assert np.abs(out - ref).max() <= tol
  assert any(s.endswith('down_proj') for s in seen)
  # Without the online half, the folded weights alone change the model.
  plain = np.asarray(jax.jit(lambda p: model.apply({'params': p}, ids, valid, logits=True))(rotated))[np.asarray(valid)]
  assert np.abs(plain - ref).max() > 100 * tol


def test_sandwich_norms_smooth_but_do_not_rotate():
  config = tiny_config('gemma2')
  params = jittered_params(config)
  with pytest.raises(UserError, match='sandwich norms'):
    qtransforms.rotate(config, params)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1, 16)), jnp.int32)
  valid = jnp.ones((1, 16), bool)
  forward = jax.jit(lambda p: transformer.build(config).apply({'params': p}, ids, valid, logits=True))
  logits = lambda p: np.asarray(forward(p))
  smoothed, _ = qtransforms.smooth(config, params, fake_input_max(config, np.random.RandomState(1)), 0.5)
  ref = logits(params)
  assert np.abs(logits(smoothed) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize('impl', ['ragged', 'tiled'])
def test_hooked_experts_equal_the_fused_ones(impl, monkeypatch):
  """The hidden hook's two tile loops compute the same experts; the hook sees every real row."""
  monkeypatch.setenv(moe.DISPATCH_ENV, impl)
  config = tiny_config('gpt_oss')
  m = config.moe
  rng = np.random.RandomState(0)
  e, i, d = m.num_experts, m.moe_intermediate_size, config.hidden_size
  params = {'gate_up_proj': jnp.asarray(rng.standard_normal((e, d, 2 * i)), jnp.float32) * 0.1,
            'down_proj': jnp.asarray(rng.standard_normal((e, i, d)), jnp.float32) * 0.1,
            'gate_up_proj_bias': jnp.asarray(rng.standard_normal((e, 2 * i)), jnp.float32) * 0.1,
            'down_proj_bias': jnp.asarray(rng.standard_normal((e, d)), jnp.float32) * 0.1}
  n = 40
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  index = jnp.asarray(np.stack([rng.choice(e, 2, replace=False) for _ in range(n)]), jnp.int32)
  weights = jnp.asarray(rng.rand(n, 2), jnp.float32)
  token_valid = jnp.asarray(np.arange(n) < 33)
  seen = {}

  def hidden(h, mask):
    seen['rows'] = int(mask.sum())
    return h

  plain = moe.experts_forward(m, jnp.float32, params, x, index, weights)
  hooked = moe.experts_forward(m, jnp.float32, params, x, index, weights, hidden=hidden, token_valid=token_valid)
  np.testing.assert_allclose(np.asarray(hooked[0]), np.asarray(plain[0]), rtol=1e-6, atol=1e-6)
  assert seen['rows'] == 33 * 2


# ---------------------------------------------------------------------------
# The planted outlier, end to end.


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
  """(checkpoint dir, corpus path, samples): BOS first in every sample."""
  root = tmp_path_factory.mktemp('qeval')
  rng = np.random.RandomState(3)
  samples = [[BOS] + rng.randint(3, 256, int(n) - 1).tolist() for n in rng.randint(24, 64, N_CALIB + N_EVAL)]
  model = fixtures.random_model(fixtures.make_config('qwen3'), seed=0)
  fixtures.plant_outlier(model, layer=LAYER, channel=CHANNEL, token_id=BOS, probe_ids=samples[:N_CALIB])
  ckpt = fixtures.save_checkpoint(model, str(root / 'planted-tiny'))
  return ckpt, write_ids_corpus(root / 'ids.jsonl', samples), samples


@pytest.fixture(scope='module')
def planted_run(planted, tmp_path_factory):
  """The CLI on the planted checkpoint: per-token against per-tensor static, a rotation, 16 bits."""
  ckpt, corpus, _ = planted
  out = tmp_path_factory.mktemp('qeval_out')
  code = cli.main(['maxact-jax', 'qeval', f'--model_path={ckpt}', f'--data_path={corpus}', f'--output_dir={out}',
                   '--schemes=w8a8,w8a8-static,none+rotate,w16a16,w8a8-static+rotdown', f'--calibration_samples={N_CALIB}',
                   f'--eval_samples={N_EVAL}', '--batch_size=8', '--dtype=float32', '--max_shapes=1',
                   '--progress=false'])
  assert code == 0
  with open(os.path.join(out, 'json', 'planted-tiny_qeval.json')) as f:
    return json.load(f)


def test_results_schema(planted_run):
  doc = planted_run
  assert set(doc['baseline']) >= {'loss', 'perplexity'}
  assert list(doc['schemes']) == ['w8a8', 'w8a8-static', 'none+rotate', 'w16a16', 'w8a8-static+rotdown']
  for s in doc['schemes'].values():
    assert set(s) >= {'loss', 'perplexity', 'delta_loss', 'kl_mean', 'kl_p99', 'kl_max', 'kl_max_at',
                      'top1_agreement', 'linear_inputs'}
    assert s['kl_mean'] <= s['kl_p99'] <= s['kl_max'] or s['kl_max'] < 1e-6
    assert s['perplexity'] == pytest.approx(math.exp(s['loss']))
    assert s['delta_loss'] == pytest.approx(s['loss'] - doc['baseline']['loss'])
  sites = doc['schemes']['w8a8']['linear_inputs']
  assert set(sites) == {f'layer_{i}_{s}' for i in range(3)
                        for s in ('self_attn.qkv_proj', 'self_attn.o_proj', 'mlp.gate_up_proj', 'mlp.down_proj')}
  for e in sites.values():
    assert set(e) >= {'threshold', 'max_abs', 'max_abs_base', 'levels', 'clip_rate'}
  assert doc['calibration_samples'] == N_CALIB and doc['eval_samples'] == N_EVAL and doc['eval_first_sample'] == N_CALIB
  # The global maximum: the planted channel after layer 1, seen on the calibration samples.
  assert doc['global_max_source'] == 'calibration' and doc['global_max_activation'] > 1000
  assert doc['global_max_location'].startswith('layer_')


def test_planted_outlier_per_tensor_static_loses_more_than_per_token(planted_run):
  token, static = planted_run['schemes']['w8a8'], planted_run['schemes']['w8a8-static']
  # The planted unit's value (~36 on BOS) sets the static threshold of layer 1's down projection:
  # its bulk keeps a fraction of one level, per-token scales keep it (BOS has its own scale).
  down = 'layer_1_mlp.down_proj'
  assert static['linear_inputs'][down]['threshold'] > 30
  assert static['linear_inputs'][down]['levels'] < 1 < 5 < token['linear_inputs'][down]['levels']
  assert static['kl_mean'] > 20 * token['kl_mean']
  assert static['kl_p99'] > 10 * token['kl_p99']
  assert static['top1_agreement'] < token['top1_agreement']
  assert abs(static['delta_loss']) > abs(token['delta_loss'])


def test_planted_outlier_rotation_spreads_the_channel(planted_run):
  rot = planted_run['schemes']['none+rotate']
  # Without quantization the rotation changes nothing the model computes ...
  assert rot['kl_max'] < 1e-5 and abs(rot['delta_loss']) < 1e-5 and rot['top1_agreement'] == 1.0
  # ... but the normalised residual stream no longer has its planted channel: from layer 2 on, the
  # q/k/v and gate/up inputs' max |x| (sqrt(64) = 8 on BOS before) falls to the bulk's, the level of
  # layer 0, before the outlier (the largest of ~1000 tokens' Gaussian-like entries, about 4).
  for site in ('self_attn.qkv_proj', 'mlp.gate_up_proj'):
    e = rot['linear_inputs'][f'layer_2_{site}']
    bulk = rot['linear_inputs'][f'layer_0_{site}']['max_abs_base']
    assert e['max_abs_base'] == pytest.approx(8.0, rel=0.01) and bulk < 5
    assert e['max_abs'] < 0.6 * e['max_abs_base'] and e['max_abs'] < 1.2 * bulk
  # The inputs the rotation does not touch (inside the blocks) keep theirs.
  e = rot['linear_inputs']['layer_1_mlp.down_proj']
  assert e['max_abs'] == pytest.approx(e['max_abs_base'], rel=1e-4)


def test_planted_outlier_online_down_rotation_spreads_the_planted_unit(planted_run):
  """The planted unit's ~36 in layer 1's down_proj input, spread over its 160 channels by the
  online rotation: the static threshold drops, the bulk keeps its levels, the KL falls."""
  static, rot = planted_run['schemes']['w8a8-static'], planted_run['schemes']['w8a8-static+rotdown']
  down = 'layer_1_mlp.down_proj'
  assert rot['linear_inputs'][down]['max_abs'] < 0.25 * rot['linear_inputs'][down]['max_abs_base']
  assert rot['linear_inputs'][down]['threshold'] < 0.25 * static['linear_inputs'][down]['threshold']
  assert rot['linear_inputs'][down]['levels'] > 10 * static['linear_inputs'][down]['levels']
  assert rot['kl_mean'] < 0.2 * static['kl_mean']
  assert rot['rotation_down'] == {'160': 'randomized Hadamard of order 160'}


def test_sixteen_bits_stay_within_bfloat16_noise(planted_run):
  s = planted_run['schemes']['w16a16']
  assert s['kl_mean'] < 1e-4 and s['top1_agreement'] > 0.97 and abs(s['delta_loss']) < 1e-3
  assert s['kl_mean'] > 1e-9  # a float32 run: the 16-bit round trip is not the identity


def test_metrics_against_numpy_on_one_batch(planted, tmp_path):
  """One evaluation batch: loss, KL (mean, p99, max and where), top-1 from the logits in numpy."""
  ckpt, corpus, samples = planted
  r = qeval.qeval(qeval.QevalOptions(model_path=ckpt, output_dir=str(tmp_path), schemes=['w4a4'], data_path=corpus,
                                     calibration_samples=2, eval_samples=4, eval_start=5, batch_size=4,
                                     dtype='float32', max_seq_len=None, progress=False))
  doc = r.doc
  config = load_config(ckpt)
  params = measure_step.load_params(ckpt, config, 'float32')
  scheme = qschemes.parse_scheme('w4a4')
  q_params = qtransforms.map_kernels(config, params, lambda w: fakequant.quantize_weight(w, scheme.weights), False)
  batch = samples[5:9]
  t = max(len(s) for s in batch)
  ids = np.zeros((4, t), np.int32)
  valid = np.zeros((4, t), bool)
  for i, s in enumerate(batch):
    ids[i, :len(s)], valid[i, :len(s)] = s, True
  model = transformer.build(config, jnp.float32)
  base = model.apply({'params': params}, ids, valid, logits=True)
  with nn.intercept_methods(capture.module_interceptor(
      qeval.site_handler(qeval.scheme_op(scheme.acts, {}), jnp.asarray(valid), frozenset({'linear', 'experts'})))):
    h = model.apply({'params': q_params}, ids, valid)
  quantized = model.apply({'params': q_params}, h, method='head')

  def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lp0, lpq = log_softmax(base)[:, :-1], log_softmax(quantized)[:, :-1]
  ok = valid[:, :-1] & valid[:, 1:]
  tgt = ids[:, 1:]
  nll0 = -np.take_along_axis(lp0, tgt[..., None], -1)[..., 0][ok]
  nllq = -np.take_along_axis(lpq, tgt[..., None], -1)[..., 0][ok]
  kl = (np.exp(lp0) * (lp0 - lpq)).sum(-1)
  s = doc['schemes']['w4a4']
  assert doc['predicted_positions'] == ok.sum()
  assert doc['baseline']['loss'] == pytest.approx(nll0.mean(), rel=1e-5)
  assert s['loss'] == pytest.approx(nllq.mean(), rel=1e-5)
  assert s['delta_loss'] == pytest.approx(nllq.mean() - nll0.mean(), rel=1e-3, abs=1e-5)
  assert s['kl_mean'] == pytest.approx(kl[ok].mean(), rel=1e-3)
  assert s['kl_p99'] == pytest.approx(np.quantile(kl[ok], 0.99), rel=1e-3)
  assert s['kl_max'] == pytest.approx(kl[ok].max(), rel=1e-3)
  row, pos = np.unravel_index(np.argmax(np.where(ok, kl, -1)), kl.shape)
  assert (s['kl_max_at']['sample'], s['kl_max_at']['position']) == (5 + row, pos)
  assert s['kl_max_at']['token_id'] == ids[row, pos]
  agree = (lp0.argmax(-1) == lpq.argmax(-1))[ok]
  assert abs(s['top1_agreement'] - agree.mean()) <= 1.0 / ok.sum()
  assert s['kl_mean'] > 1e-3  # w4a4 moves the predictions: the comparison means something


def test_quantized_linear_inputs_lie_on_the_grid_inside_the_model(planted):
  """The values every linear layer reads under w4a4 / fp8 per token are codes times the token's scale."""
  ckpt, _, samples = planted
  config = load_config(ckpt)
  params = measure_step.load_params(ckpt, config, 'float32')
  ids = np.zeros((2, 30), np.int32)
  valid = np.zeros((2, 30), bool)
  for i, s in enumerate(samples[:2]):
    n = min(len(s), 30)
    ids[i, :n], valid[i, :n] = s[:n], True
  model = transformer.build(config, jnp.float32)
  for fmt in ('int4', 'fp8_e4m3'):
    spec = fakequant.ActSpec(fmt, 'token')

    def op(site, x, mask, layer, spec=spec):
      del site, layer
      xq, _ = fakequant.quantize_act(x, spec, mask)
      return xq, {'x': x, 'xq': xq}

    with nn.intercept_methods(capture.module_interceptor(
        qeval.site_handler(op, jnp.asarray(valid), frozenset({'linear', 'experts'})))):
      _, sown = model.apply({'params': params}, ids, valid, mutable=[capture.COLLECTION])
    taps = capture.collect(config, jax.device_get(sown[capture.COLLECTION]))
    assert len(taps) == 12
    qmax = fakequant.format_of(fmt).qmax
    for name, v in taps.items():
      x, xq = np.asarray(v['x'])[valid], np.asarray(v['xq'])[valid]
      scale = np.abs(x).max(-1, keepdims=True) / np.float32(qmax)
      assert fakequant.on_grid(xq, np.broadcast_to(scale, xq.shape), fmt), (fmt, name)
      assert not np.array_equal(xq, x)


# ---------------------------------------------------------------------------
# MoE.


def test_moe_experts_quantized_and_counted(moe_checkpoint, planted, tmp_path):
  ckpt = moe_checkpoint('qwen3_moe')
  _, corpus, _ = planted
  doc = qeval.qeval(qeval.QevalOptions(model_path=ckpt, output_dir=str(tmp_path),
                                       schemes=['a8-naive', 'w8a8-static+smooth0.5', 'none+rotate'], data_path=corpus,
                                       calibration_samples=N_CALIB, eval_samples=8, batch_size=4, dtype='float32',
                                       max_seq_len=None, max_shapes=1, progress=False)).doc
  config = load_config(ckpt)
  k = config.moe.num_experts_per_tok
  moe_layers = [i for i, kind in enumerate(config.mlp_layer_kinds) if kind == 'moe']
  assert sorted(doc['expert_tokens_calibration']) == [f'layer_{i}_mlp.experts' for i in moe_layers]
  for counts in doc['expert_tokens_calibration'].values():
    assert len(counts) == config.moe.num_experts and sum(counts) == k * doc['calibration_tokens']
  static = doc['schemes']['w8a8-static+smooth0.5']['linear_inputs']
  for i in moe_layers:
    for site in ('mlp.experts.gate_up_proj', 'mlp.experts.down_proj'):
      e = static[f'layer_{i}_{site}']
      assert e['threshold_kind'] == 'static' and e['threshold'] > 0 and 0 < e['levels'] < 256
    # Smoothing divides the experts' (block) input per channel: its max |x| changes.
    e = static[f'layer_{i}_mlp.experts.gate_up_proj']
    assert e['max_abs'] != pytest.approx(e['max_abs_base'], rel=1e-3)
  naive = doc['schemes']['a8-naive']['linear_inputs'][f'layer_{moe_layers[0]}_mlp.experts.down_proj']
  assert naive['threshold_kind'] == 'mean per batch' and naive['clip_rate'] == 0
  rot = doc['schemes']['none+rotate']
  assert rot['kl_max'] < 1e-5 and rot['top1_agreement'] == 1.0


# ---------------------------------------------------------------------------
# Bad input.


def test_bad_input_one_error_line(planted, tmp_path, capsys):
  ckpt, corpus, _ = planted
  common = [f'--model_path={ckpt}', f'--data_path={corpus}', f'--output_dir={tmp_path / "out"}', '--progress=false']
  n = N_CALIB + N_EVAL
  for args, pattern in [(['--schemes=w8a8,int3'], "unknown scheme 'int3'"),
                        (['--schemes=w9a8'], 'weight bits 9 out of range'),
                        (['--schemes=w8a8+smooth1.2'], r'alpha must be in \[0, 1\]'),
                        (['--schemes=w8a8+smooth-0.5'], 'unknown modifier'),
                        (['--calibration_samples=8', '--eval_start=4'], 'overlaps the calibration samples'),
                        ([f'--calibration_samples={n}'], f'the corpus has {n} samples'),
                        ([f'--eval_samples={n}'], f'the corpus has {n} samples'),
                        (['--eval_samples=0'], 'eval_samples must be a positive'),
                        (['--dtype=int8'], 'dtype=int8 is not supported')]:
    code = cli.main(['maxact-jax', 'qeval', *common, *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (args, err)
    assert re.search(pattern, lines[0]), lines[0]
  assert not os.path.exists(tmp_path / 'out' / 'json' / 'planted-tiny_qeval.json')
  with pytest.raises(UserError, match='sandwich norms'):
    qeval.qeval(qeval.QevalOptions(model_path=fixtures.tiny_checkpoint('gemma2', str(tmp_path / 'g2')),
                                   output_dir=str(tmp_path / 'g'), schemes=['w4a4+rotate'], progress=False))


# ---------------------------------------------------------------------------
# The report's section.


def test_rank_correlation_by_hand():
  from maxact_jax import report
  assert report.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert report.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties share their mean rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3).
  rx, ry = np.array([0, 1.5, 1.5, 3]), np.arange(4.0)
  assert report.rank_correlation([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
  assert report.rank_correlation([1, 2], [1, 2]) is None  # too few
  assert report.rank_correlation([1, 2, 3], [7, 7, 7]) is None  # constant


def test_report_quantization_section(planted_run, tmp_path):
  """Measured models take their global max from the measure result, others from qeval's calibration;
  the section's table, correlation and plot are written."""
  import shutil
  from maxact_jax import report, report_render
  from tests.conftest import REFERENCE_RESULTS
  root = tmp_path / 'results'
  root.mkdir()
  for name in ('Qwen3-8B', 'gemma-2b'):
    shutil.copy(os.path.join(REFERENCE_RESULTS, f'{name}_activation_stats.json'), root)
  base = dict(planted_run)
  kls = {'Qwen3-8B': 0.5, 'gemma-2b': 0.05, 'planted-tiny': None}
  for name, kl in kls.items():
    doc = json.loads(json.dumps(base))
    doc['model_name'] = name
    if kl is not None:
      doc['schemes']['w8a8-static']['kl_mean'] = kl
    with open(root / f'{name}_qeval.json', 'w') as f:
      json.dump(doc, f)
  summary = report.build_summary(root)
  q = summary['quantization']
  assert q['schemes'] == ['w8a8', 'w8a8-static', 'none+rotate', 'w16a16', 'w8a8-static+rotdown']
  by_name = {m['model_name']: m for m in q['models']}
  measured = {m['model_name']: m['global_max_abs'] for m in summary['models']}
  assert by_name['Qwen3-8B']['global_max_abs'] == measured['Qwen3-8B'] and by_name['Qwen3-8B']['global_max_source'] == 'measure'
  assert by_name['planted-tiny']['global_max_source'] == 'qeval calibration'
  assert by_name['planted-tiny']['global_max_abs'] == pytest.approx(abs(planted_run['global_max_activation']))
  row = by_name['gemma-2b']['schemes']['w8a8-static']
  assert row['kl_mean'] == 0.05 and row['delta_loss'] == planted_run['schemes']['w8a8-static']['delta_loss']
  assert row['min_levels_site'] == 'layer_1_mlp.down_proj'
  xs = [by_name[n]['global_max_abs'] for n in ('Qwen3-8B', 'gemma-2b', 'planted-tiny')]
  ys = [by_name[n]['schemes']['w8a8-static']['kl_mean'] for n in ('Qwen3-8B', 'gemma-2b', 'planted-tiny')]
  assert q['correlation']['w8a8-static'] == {'models': 3,
                                             'spearman_kl_vs_global_max': report.rank_correlation(xs, ys)}
  written = report_render.write_report(summary, tmp_path / 'report')
  assert report_render.PLOT_QUANT in written
  md = (tmp_path / 'report' / 'report.md').read_text()
  assert '## Quantization impact' in md and '| gemma-2b |' in md and 'Spearman' in md
  assert md.count('quantization_impact.png') == 1
