"""Qwen3.5 hybrids: the Gated DeltaNet kernel, padding, parity with PyTorch, checkpoint
layouts, and the real configs at full size.

Tiny checkpoints have 4 layers (3 Gated DeltaNet + 1 gated full attention) and the
corpora hold sequences of up to 150 tokens, so the recurrent state crosses the
64-token chunk boundaries (the fixture spreads the decays so that it matters).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from converters.safetensors_io import Checkpoint, write_safetensors
from converters.weight_map import check_coverage, plan, resolve_layout
from maxact_jax import capture, crosscheck, fixtures, measure_step
from maxact_jax.config import FULL_ATTENTION, LINEAR_ATTENTION
from maxact_jax.errors import UserError
from maxact_jax.families import load_config, parse_config
from maxact_jax.models import deltanet, transformer
from tests import parity_utils
from tests.conftest import REAL_CONFIGS, REFERENCE_RESULTS, write_ids_corpus

TEXT, MOE = 'qwen3_5_text', 'qwen3_5_moe_text'
LENGTHS = [150, 37, 96, 64, 130, 5, 70, 21]  # up to 3 chunks, ragged: padding in every batch


@pytest.fixture(scope='module')
def long_corpus(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp('q35') / 'long.jsonl'
  return write_ids_corpus(path, fixtures.random_token_ids(256, LENGTHS, seed=2))


@pytest.fixture(scope='module')
def hf_text_model(checkpoint):
  from maxact_jax import torch_reference
  return torch_reference.load_hf_model(checkpoint(TEXT), 'float32')


def _rand_rule_inputs(seed=0, b=2, t=150, hk=2, hv=4, dk=16, dv=8):
  r = np.random.RandomState(seed)
  q, k = (r.randn(b, t, hk, dk).astype(np.float32) for _ in range(2))
  v = r.randn(b, t, hv, dv).astype(np.float32)
  # Decays from ~1000 tokens down to ~3 across heads, so states outlive a chunk.
  rate = np.logspace(-3, -0.5, hv).astype(np.float32)
  g = -(rate * r.uniform(0.5, 1.5, (b, t, hv))).astype(np.float32)
  beta = r.uniform(0, 1, (b, t, hv)).astype(np.float32)
  return q, k, v, g, beta


# ---------------------------------------------------------------------------
# The kernel, against hand arithmetic, its own recurrent form and transformers.


def test_delta_rule_by_hand():
  """Two steps of one head with dk = dv = 1, written out."""
  q = np.array([1.0, -2.0], np.float32).reshape(1, 2, 1, 1)
  k = np.array([3.0, 0.5], np.float32).reshape(1, 2, 1, 1)
  v = np.array([2.0, -1.0], np.float32).reshape(1, 2, 1, 1)
  g = np.array([-0.1, -0.7], np.float32).reshape(1, 2, 1)
  beta = np.array([0.9, 0.4], np.float32).reshape(1, 2, 1)
  unit = lambda x: x / math.sqrt(x * x + deltanet.L2_EPS)
  k1, k2, q1, q2 = unit(3.0), unit(0.5), unit(1.0), unit(-2.0)
  s1 = 0.9 * 2.0 * k1  # empty state: S1 = k1 beta1 v1
  s2 = math.exp(-0.7) * s1
  s2 = s2 + k2 * 0.4 * (-1.0 - s2 * k2)  # delta rule: write the error of the read
  want = np.array([s1 * q1, s2 * q2])
  for rule in (deltanet.chunk_gated_delta_rule, deltanet.recurrent_gated_delta_rule):
    out, state = rule(q, k, v, g, beta)
    np.testing.assert_allclose(np.asarray(out).ravel(), want, rtol=1e-6)
    np.testing.assert_allclose(float(np.asarray(state).ravel()[0]), s2, rtol=1e-6)


def test_chunked_rule_matches_recurrent_and_transformers():
  import torch
  from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

  inputs = _rand_rule_inputs()
  rec, rec_state = jax.jit(deltanet.recurrent_gated_delta_rule)(*inputs)
  scale = float(np.abs(np.asarray(rec)).max())
  t = [torch.from_numpy(a) for a in inputs]
  ref, ref_state = hf.torch_chunk_gated_delta_rule(*t, output_final_state=True, use_qk_l2norm_in_kernel=True)
  chunked = jax.jit(deltanet.chunk_gated_delta_rule, static_argnums=5)
  for chunk in (16, 64):  # 150 tokens: 10 and 3 chunks, the last one partial
    out, state = chunked(*inputs, chunk)
    assert np.abs(np.asarray(out) - np.asarray(rec)).max() < 2e-6 * scale
    assert np.abs(np.asarray(state) - np.asarray(rec_state)).max() < 2e-6 * np.abs(np.asarray(rec_state)).max()
    if chunk == 64:
      assert np.abs(np.asarray(out) - ref.numpy()).max() < 2e-6 * scale
      assert np.abs(np.asarray(state) - ref_state.numpy()).max() < 2e-6 * np.abs(ref_state.numpy()).max()
  # The state really is carried: the last chunk's output changes with the first chunk's values.
  q, k, v, g, beta = inputs
  v2 = v.copy()
  v2[:, :10] += 1.0
  out2, _ = chunked(q, k, v2, g, beta, 64)
  assert np.abs(np.asarray(out2)[:, 140:] - np.asarray(rec)[:, 140:]).max() > 1e-3 * scale


def test_causal_conv_and_softplus_match_torch():
  import torch

  r = np.random.RandomState(0)
  x = r.randn(2, 9, 6).astype(np.float32)
  conv = deltanet.CausalConv1d(6, 4, 'silu', jnp.float32)
  params = conv.init(jax.random.PRNGKey(0), x)
  w = np.asarray(params['params']['weight'])
  ref = torch.nn.functional.conv1d(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(w.copy()), padding=3,
                                   groups=6)[:, :, :9]
  ref = torch.nn.functional.silu(ref).transpose(1, 2).numpy()
  np.testing.assert_allclose(np.asarray(conv.apply(params, x)), ref, rtol=1e-6, atol=1e-6)
  z = np.array([-30.0, -1.0, 0.0, 3.0, 19.9, 20.0, 20.1, 60.0], np.float32)
  np.testing.assert_allclose(np.asarray(deltanet.softplus(z)),
                             torch.nn.functional.softplus(torch.from_numpy(z)).numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------
# Padding never feeds back into valid tokens.


def test_deltanet_layer_ignores_padding_wherever_it_is(checkpoint):
  config = load_config(checkpoint(TEXT))
  layer = deltanet.GatedDeltaNet(config, jnp.float32)
  r = np.random.RandomState(0)
  n, width = 70, 100
  s = r.randn(1, n, config.hidden_size).astype(np.float32)
  params = layer.init(jax.random.PRNGKey(1), s, np.ones((1, n), bool))
  run = jax.jit(layer.apply)
  alone = np.asarray(run(params, s, np.ones((1, n), bool)))[0]
  # Right padding with garbage (NaN included) and left padding, in one batch.
  x = (1e3 * r.randn(2, width, config.hidden_size)).astype(np.float32)
  x[0, :n], x[1, width - n:] = s[0], s[0]
  x[0, -1] = np.nan
  valid = np.zeros((2, width), bool)
  valid[0, :n], valid[1, width - n:] = True, True
  out = np.asarray(run(params, x, valid))
  scale = np.abs(alone).max()
  assert np.isfinite(out[valid]).all()
  assert np.abs(out[0, :n] - alone).max() <= 2e-6 * scale
  # Left padding moves the chunk boundaries, hence other rounding; a leak would be O(1).
  assert np.abs(out[1, width - n:] - alone).max() <= 1e-5 * scale
  # Same shape, other garbage: bit for bit the same valid outputs.
  x2 = x.copy()
  x2[~valid] = r.randn(int((~valid).sum()), config.hidden_size)
  out2 = np.asarray(run(params, x2, valid))
  np.testing.assert_array_equal(out2[valid], out[valid])


def _raw_forward(model_dir: str):
  config = load_config(model_dir)
  params = measure_step.load_params(model_dir, config, 'float32')
  model = transformer.build(config, jnp.float32)

  @jax.jit
  def forward(ids, valid):
    with nn.intercept_methods(capture.interceptor(capture.raw_handler())):
      _, sown = model.apply({'params': params}, ids, valid, mutable=[capture.COLLECTION])
    return sown[capture.COLLECTION]

  return lambda ids, valid: capture.collect(config, jax.device_get(forward(ids, valid)))


def _stats_of_row(taps: dict[str, np.ndarray], valid: np.ndarray, row: int) -> dict[str, dict]:
  """Each tap's statistics over the valid positions of one batch row (the reference's
  arithmetic, torch_reference.ReferenceStats)."""
  import torch
  from maxact_jax import torch_reference

  acc = torch_reference.ReferenceStats()
  acc.set_mask(torch.from_numpy(valid[row:row + 1]))
  for name, x in taps.items():
    acc.update(name, torch.from_numpy(np.ascontiguousarray(x[row:row + 1])))
  return acc.finalize()


def _assert_internals_match_transformers(hf_model, ids: np.ndarray, taps: dict[str, np.ndarray]) -> None:
  """The extra taps against transformers' tensors: in_proj_z's output, and the kernel's
  output as it enters the gated norm (a pre-hook on `norm`, which sees it as [B*T*Hv, dv])."""
  import torch

  layer = hf_model.model.layers[1].linear_attn
  seen = {}

  def keep(name, tensor) -> None:  # a hook returning non-None would replace the tensor
    seen[name] = tensor.detach().numpy().copy()

  hooks = [layer.in_proj_z.register_forward_hook(lambda m, i, o: keep('gate', o)),
           layer.norm.register_forward_pre_hook(lambda m, i: keep('core', i[0]))]
  try:
    with torch.no_grad():
      hf_model(input_ids=torch.from_numpy(ids[None].astype(np.int64)))
  finally:
    for h in hooks:
      h.remove()
  for suffix in ('gate', 'core'):
    ours = taps[f'layer_1_linear_attn_{suffix}']
    ref = seen[suffix].reshape(ours.shape)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), suffix


def test_padded_sample_gives_its_own_statistics(checkpoint, hf_text_model):
  """A 70-token sample alone, and right-padded to 200 tokens between longer samples."""
  forward = _raw_forward(checkpoint(TEXT))
  r = np.random.RandomState(3)
  n, width = 70, 200
  s = r.randint(0, 256, n).astype(np.int32)
  alone = forward(s[None], np.ones((1, n), bool))
  _assert_internals_match_transformers(hf_text_model, s, alone)
  ids = r.randint(0, 256, (3, width)).astype(np.int32)
  ids[1, :n] = s  # the tail of row 1 is padding holding arbitrary token ids
  valid = np.ones((3, width), bool)
  valid[1, n:] = False
  valid[2, 150:] = False
  padded = forward(ids, valid)
  assert list(padded) == list(alone)
  for name in alone:
    a, b = alone[name][0], padded[name][1, :n]
    # Not bit for bit across batch shapes: XLA's matmul blocking depends on the shape
    # (dense qwen3 differs by the same ~5e-7); a leak would be of order one.
    assert np.abs(a - b).max() <= 2e-6 * np.abs(a).max(), name
  ours, theirs = _stats_of_row(alone, np.ones((1, n), bool), 0), _stats_of_row(padded, valid, 1)
  for name in ours:
    for field, want in ours[name].items():
      got = theirs[name][field]
      if field in parity_utils.EXACT_FIELDS:
        assert got == want, (name, field)
      elif field in parity_utils.QUANTILES:  # histogram bins: the same bin or its edge
        assert abs(math.log10(got) - math.log10(want)) <= parity_utils.HIST_BIN, (name, field)
      elif isinstance(want, float):
        assert abs(got - want) <= 1e-5 * max(abs(want), ours[name]['rms']), (name, field, got, want)
      elif isinstance(want, list):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * abs(want[0]), err_msg=f'{name}.{field}')
  # Same shape, other padding contents and other neighbours: bit for bit.
  ids2 = r.randint(0, 256, (3, width)).astype(np.int32)
  ids2[1, :n] = s
  again = forward(ids2, valid)
  for name in alone:
    np.testing.assert_array_equal(again[name][1, :n], padded[name][1, :n], err_msg=name)


# ---------------------------------------------------------------------------
# Parity with transformers and with the reference pipeline.


def test_measure_matches_reference_pipeline(checkpoint, long_corpus, hf_text_model, tmp_path):
  model_dir = checkpoint(TEXT)
  # One batch of 8 (one compiled shape): 8 ragged samples up to 150 tokens.
  doc, top_doc, ref = parity_utils.measure_and_reference(model_dir, long_corpus, str(tmp_path), batch_size=8,
                                                         hf_model=hf_text_model)
  checked = parity_utils.assert_stats_match(doc, top_doc, ref)
  parity_utils.assert_same_global_max(doc, ref)
  config = load_config(model_dir)
  assert config.layer_types == (LINEAR_ATTENTION,) * 3 + (FULL_ATTENTION,)
  names = capture.tap_names(config)
  assert names == list(doc['per_layer_stats'])
  assert [t for t in names if t in ref] == list(ref)  # the reference's taps, in its order
  linear = [i for i, kind in enumerate(config.layer_types) if kind == LINEAR_ATTENTION]
  assert [t for t in names if t not in ref] == [f'layer_{i}_linear_attn_{s}' for i in linear for s in ('core', 'gate')]
  la, per = config.linear_attention, doc['per_layer_stats']
  assert per['layer_0_linear_attn_core']['count'] == sum(LENGTHS) * la.num_value_heads * la.value_head_dim
  n = config.num_hidden_layers
  assert len(ref) == 2 + 4 * n
  # Every field: 30 per activation tap (7 basic, 12 Sun, 8 quantile, 3 top-K), 7 per gate tap.
  assert checked == 30 * (2 + 3 * n) + 7 * n


@pytest.mark.slow
def test_moe_measure_matches_reference_pipeline(checkpoint, tmp_path):
  """MoE taps through the measurement step. Samples of equal length: the reference keeps
  router logits as [B*T, E], which does not match its [B, T] mask, so on padded batches
  it counts padded positions in `moe_gate` (ours are masked; see the report of issue 6)."""
  model_dir = checkpoint(MOE)
  corpus = write_ids_corpus(tmp_path / 'equal.jsonl', fixtures.random_token_ids(256, [100] * 8, seed=2))
  doc, top_doc, ref = parity_utils.measure_and_reference(model_dir, corpus, str(tmp_path), batch_size=8)
  parity_utils.assert_stats_match(doc, top_doc, ref)
  parity_utils.assert_same_global_max(doc, ref)
  assert [t for t in ref if t.startswith('layer_0_')] == [
      'layer_0_attn_output', 'layer_0_moe_gate', 'layer_0_mlp_output', 'layer_0_hidden']


def _assert_crosscheck(report):
  parity_utils.assert_crosscheck_passed(report, max_rel_err=None)
  assert report['batch_shape'][1] > deltanet.CHUNK_SIZE  # several chunks
  # Relative to each tap's own scale (the contract's max(1, .) is lenient on small taps).
  worst = max(r['max_abs_err'] / r['ref_max_abs'] for r in report['taps'].values() if r['ref_max_abs'])
  assert worst < 1e-5, crosscheck.format_report(report)


def test_crosscheck_passes_text_model(checkpoint, long_corpus, hf_text_model):
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=checkpoint(TEXT), data_path=long_corpus, num_samples=8, max_seq_len=200), hf_model=hf_text_model)
  _assert_crosscheck(report)
  assert len(report['taps']) == 2 + 4 * 4


def test_crosscheck_passes_multimodal_moe(checkpoint, long_corpus):
  """The hub's shape of checkpoint: an image-text model (vision tower skipped), MoE
  experts as transformers 5 saves them (one tensor per expert)."""
  model_dir = checkpoint('qwen3_5_moe')
  keys = Checkpoint(model_dir).keys()
  assert any(k.startswith('model.visual.') for k in keys)
  assert 'model.language_model.layers.0.mlp.experts.0.gate_proj.weight' in keys
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=long_corpus, num_samples=8, max_seq_len=200))
  _assert_crosscheck(report)
  assert [n for n in report['taps'] if n.startswith('layer_0_')] == [
      'layer_0_attn_output', 'layer_0_moe_gate', 'layer_0_mlp_output', 'layer_0_hidden']


def test_crosscheck_names_the_perturbed_linear_attention(checkpoint, long_corpus, hf_text_model):
  model_dir = checkpoint(TEXT)
  config = load_config(model_dir)
  params = measure_step.load_params(model_dir, config, 'float32')
  group = params['model']['layers']  # one scanned period: slot_0..slot_3 = layers 0..3
  group['slot_1']['linear_attn']['A_log'] = np.asarray(group['slot_1']['linear_attn']['A_log']) + 0.05
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=long_corpus, num_samples=8, max_seq_len=200),
      params=params, hf_model=hf_text_model)
  assert not report['passed']
  assert report['first_failure'] == 'layer_1_attn_output'
  assert report['taps']['layer_0_hidden']['passed']


# ---------------------------------------------------------------------------
# Checkpoint layouts and configs.


def test_checkpoint_layouts_give_the_same_params(checkpoint, tmp_path):
  """save_pretrained's per-expert layout, the hub's fused layout (plus its mtp head),
  and a text-only model re-saved from the multimodal one all load to the same tree."""
  import torch
  import transformers

  source = checkpoint('qwen3_5_moe')
  hf = transformers.AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
  hub = tmp_path / 'hub'
  hub.mkdir()
  tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
  assert 'model.language_model.layers.0.mlp.experts.gate_up_proj' in tensors  # fused in memory
  tensors['mtp.fc.weight'] = np.zeros((4, 4), np.float32)
  write_safetensors(str(hub / 'model.safetensors'), tensors)
  shutil.copy(os.path.join(source, 'config.json'), hub / 'config.json')
  text_only = str(tmp_path / 'text')
  transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(text_only)
  assert load_config(text_only).model_type == MOE
  assert any(k.startswith('model.language_model.layers.') for k in Checkpoint(text_only).keys())

  want = measure_step.load_params(source, load_config(source), 'float32')
  for other in (str(hub), text_only):
    got = measure_step.load_params(other, load_config(other), 'float32')
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_layout_resolution_refuses_two_text_models():
  config = parse_config(_real('Qwen3.5-9B'))
  wmap = converters.weight_map(config)
  assert resolve_layout(config, wmap, ['model.embed_tokens.weight'], 'x')[0].weight_prefix == 'model.'
  assert resolve_layout(config, wmap, ['model.language_model.embed_tokens.weight'], 'x')[0].weight_prefix == \
      'model.language_model.'
  with pytest.raises(UserError, match='it has several of'):
    resolve_layout(config, wmap, ['model.embed_tokens.weight', 'model.language_model.embed_tokens.weight'], 'x')


def _real(name: str) -> dict:
  path = os.path.join(REAL_CONFIGS, name, 'config.json')
  with open(path) as f:
    return json.load(f)


def test_config_fields_of_a_real_checkpoint():
  config = parse_config(_real('Qwen3.5-9B'))
  assert config.weight_prefix == 'model.language_model.'
  assert config.layer_types == (LINEAR_ATTENTION, LINEAR_ATTENTION, LINEAR_ATTENTION, FULL_ATTENTION) * 8
  assert (config.rope.theta, config.rope.partial_rotary_factor) == (1e7, 0.25)
  assert config.norm_offset == 1.0 and config.attn_output_gate and config.qk_norm
  la = config.linear_attention
  assert (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim, la.conv_kernel_dim) == (
      16, 32, 128, 128, 4)
  raw = _real('Qwen3.5-9B')
  text = dict(raw['text_config'])
  del text['layer_types']
  text['full_attention_interval'] = 2
  assert parse_config({**raw, 'text_config': text}).layer_types[:4] == (
      LINEAR_ATTENTION, FULL_ATTENTION, LINEAR_ATTENTION, FULL_ATTENTION)
  for bad, match in ((dict(mlp_only_layers=[1]), 'mlp_only_layers'), (dict(attn_output_gate=False), 'attn_output_gate'),
                     (dict(shiny_new_field=1), 'shiny_new_field')):
    with pytest.raises(UserError, match=match):
      parse_config({**raw, 'text_config': {**raw['text_config'], **bad}})
  moe = parse_config(_real('Qwen3.5-35B-A3B'))
  assert (moe.moe.num_experts, moe.moe.num_experts_per_tok, moe.moe.shared_expert_intermediate_size) == (256, 8, 512)


@pytest.mark.parametrize('name', ['Qwen3.5-9B', 'Qwen3.5-27B', 'Qwen3.5-35B-A3B'])
def test_real_config_full_size(name):
  """eval_shape at full size: transformers' parameter count and exact key coverage of the
  hub's tensor names (transformers' on the meta device, plus the hub's mtp head)."""
  import torch
  import transformers

  raw = _real(name)
  config = parse_config(raw)
  hf_config = transformers.AutoConfig.from_pretrained(os.path.join(REAL_CONFIGS, name))
  (segment,) = transformer.plan_segments(config)
  assert segment.period == 4 and segment.repeats == config.num_hidden_layers // 4
  with torch.device('meta'):
    hf = transformers.AutoModelForImageTextToText.from_config(hf_config)
  names = list(hf.state_dict())
  text = [k for k in names if not k.startswith('model.visual.')]
  hub = names + ['mtp.fc.weight', 'mtp.layers.0.mlp.experts.0.gate_proj.weight']
  config, wmap = resolve_layout(config, converters.weight_map(config), hub, name)
  plans = plan(config, wmap, jnp.bfloat16, hub)  # the Flax tree comes from jax.eval_shape
  ours = sum(math.prod(p.shape) for p in plans)
  assert ours == sum(hf.state_dict()[k].numel() for k in text)
  check_coverage(plans, hub, wmap, config, name)
  assert {k for p in plans for r in p.recipes for k in r.keys} == set(text)
  with pytest.raises(UserError, match='not used'):
    check_coverage(plans, hub + ['model.language_model.layers.0.linear_attn.extra'], wmap, config, name)


def test_tap_list_follows_the_reference_result():
  """The reference's Qwen3.5-0.8B result: four taps per layer, in this order."""
  path = os.path.join(REFERENCE_RESULTS, 'Qwen3.5-0.8B_activation_stats.json')
  with open(path) as f:
    ref = list(json.load(f)['per_layer_stats'])
  config = parse_config(fixtures.make_config(TEXT).to_dict())
  names = capture.tap_names(config)
  suffixes = lambda taps: [n.split('_', 2)[2] for n in taps if n.startswith('layer_0_')]
  assert suffixes(ref) == ['attn_output', 'mlp_gate', 'mlp_output', 'hidden']
  # Ours: the same four in the same order, then the extra linear-attention taps.
  assert suffixes(names) == suffixes(ref) + ['linear_attn_core', 'linear_attn_gate']
  assert [t for t in names if t.startswith('layer_3_')] == [f'layer_3_{s}' for s in suffixes(ref)]
  assert names[0] == ref[0] == 'embedding_output' and names[-1] == ref[-1] == 'final_layernorm'
