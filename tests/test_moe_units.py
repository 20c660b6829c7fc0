"""MoE pieces on their own: dispatch, routing, MXFP4, checkpoint layouts, configs, statistics."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from converters import mxfp4
from converters.safetensors_io import Checkpoint, write_safetensors
from maxact_jax import stats, torch_reference
from maxact_jax.config import MoEConfig
from maxact_jax.errors import UserError
from maxact_jax.families import load_config, parse_config
from maxact_jax.models import moe
from tests.conftest import REAL_CONFIGS

# ---------------------------------------------------------------------------
# Dispatch: every (token, expert) assignment goes through its expert, none dropped.


def _reference_ffn(x, experts, w_gu, b_gu, w_d, b_d, act):
  """Row by row in float64 numpy."""
  out = []
  for row, e in zip(np.asarray(x, np.float64), np.asarray(experts)):
    h = row @ w_gu[e] + b_gu[e]
    g, u = np.split(h, 2)
    out.append(act(g, u) @ w_d[e] + b_d[e])
  return np.stack(out)


@pytest.mark.parametrize('impl, tile', [('tiled', None), ('tiled', 4), ('tiled', 256), ('ragged', None)])
@pytest.mark.parametrize('skewed', [False, True])
def test_grouped_ffn_matches_row_by_row(impl, tile, skewed):
  rng = np.random.default_rng(0)
  e, d, i, m = 6, 16, 8, 45
  # Skewed: most rows to expert 4, experts 0 and 2 empty.
  experts = (np.where(rng.random(m) < 0.8, 4, rng.choice([1, 3, 5], m)) if skewed else rng.integers(0, e, m))
  experts = np.sort(experts)
  x = rng.standard_normal((m, d)).astype(np.float32)
  w_gu, w_d = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((e, d, 2 * i), (e, i, d)))
  b_gu, b_d = (rng.standard_normal(s).astype(np.float32) for s in ((e, 2 * i), (e, d)))
  sizes = jnp.asarray(np.bincount(experts, minlength=e), jnp.int32)
  act = moe.expert_activation(MoEConfig(e, 2, i, swiglu_limit=1.0, swiglu_alpha=1.702))
  params = tuple(jnp.asarray(a) for a in (w_gu, b_gu, w_d, b_d))
  prec = jax.lax.Precision.HIGHEST
  if impl == 'tiled':
    got = moe.grouped_ffn_tiled(jnp.asarray(x), jnp.asarray(experts), sizes, params, act, prec, tile=tile)
  else:
    got = moe.grouped_ffn_ragged(jnp.asarray(x), jnp.asarray(experts), sizes, params, act, prec)

  def np_act(g, u):
    g = np.minimum(g, 1.0)
    u = np.clip(u, -1.0, 1.0)
    return (u + 1) * g / (1 + np.exp(-1.702 * g))

  want = _reference_ffn(x, experts, w_gu, b_gu, w_d, b_d, np_act)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_experts_module_same_under_both_dispatches(monkeypatch):
  cfg = MoEConfig(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16)
  mod = moe.Experts(cfg, jnp.float32)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((37, 24)), jnp.float32)
  index = jnp.asarray(np.stack([rng.choice(8, 3, replace=False) for _ in range(37)]), jnp.int32)
  weights = jnp.asarray(rng.random((37, 3)), jnp.float32)
  params = mod.init(jax.random.PRNGKey(0), x, index, weights)
  outs = {}
  for impl in ('tiled', 'ragged'):
    monkeypatch.setenv(moe.DISPATCH_ENV, impl)
    outs[impl] = mod.apply(params, x, index, weights)
  np.testing.assert_allclose(outs['tiled'][0], outs['ragged'][0], rtol=1e-5, atol=1e-6)
  # Per assignment: expert index[n, k]'s own output on token n.
  w = params['params']
  n, k = 5, 2
  e = int(index[n, k])
  h = x[n] @ w['gate_up_proj'][e]
  y = (jax.nn.silu(h[:16]) * h[16:]) @ w['down_proj'][e]
  np.testing.assert_allclose(outs['tiled'][1][n, k], y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs['tiled'][0], jnp.einsum('NKD,NK->ND', outs['tiled'][1], weights), rtol=1e-5,
                             atol=1e-6)


def test_tile_rows():
  assert moe.tile_rows(8192, 64) == 64
  assert moe.tile_rows(32768, 64) == 128
  assert moe.tile_rows(20, 8) == 8


# ---------------------------------------------------------------------------
# Routing by hand.


def test_group_limited_top_k_by_hand():
  # 8 experts in 4 groups of 2; keep 2 groups; 2 experts per token.
  m = MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=4, router='sigmoid_group_topk',
                n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
  # Sigmoid scores: expert 0 is the single best but its group-mate is weak; groups 1
  # (experts 2, 3) and 3 (experts 6, 7) have the best top-2 sums.
  scores = np.array([[0.95, 0.01, 0.80, 0.75, 0.3, 0.3, 0.70, 0.72]], np.float32)
  logits = jnp.asarray(np.log(scores / (1 - scores)))
  weights, index, probs = moe.route(m, logits, None)
  assert sorted(np.asarray(index[0]).tolist()) == [2, 3]
  s = jax.nn.sigmoid(logits)[0]
  np.testing.assert_allclose(np.sort(weights[0]), np.sort(np.asarray([s[2], s[3]]) / (s[2] + s[3]) * 2.5), rtol=1e-6)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
  # A selection-only bias moves the choice but not the combine weights' source.
  bias = jnp.asarray([0, 0, 0, 0, 0, 0, 0.5, 0.5], jnp.float32)
  weights, index, _ = moe.route(m, logits, bias)
  assert sorted(np.asarray(index[0]).tolist()) == [6, 7]
  np.testing.assert_allclose(np.sort(weights[0]), np.sort(np.asarray([s[6], s[7]]) / (s[6] + s[7]) * 2.5), rtol=1e-6)


def test_softmax_routers_by_hand():
  logits = jnp.asarray([[2.0, 0.0, 1.0, -1.0]])
  qwen = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4, norm_topk_prob=False)
  w, i, p = moe.route(qwen, logits, None)
  full = np.exp([2.0, 0.0, 1.0, -1.0]) / np.exp([2.0, 0.0, 1.0, -1.0]).sum()
  np.testing.assert_allclose(w[0], full[[0, 2]], rtol=1e-6)
  assert np.asarray(i[0]).tolist() == [0, 2]
  w, _, _ = moe.route(dataclasses.replace(qwen, norm_topk_prob=True), logits, None)
  np.testing.assert_allclose(w[0], full[[0, 2]] / full[[0, 2]].sum(), rtol=1e-6)
  gpt = dataclasses.replace(qwen, router='topk_softmax')
  w, _, p = moe.route(gpt, logits, None)
  np.testing.assert_allclose(w[0], np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum(), rtol=1e-6)
  np.testing.assert_allclose(p[0], full, rtol=1e-6)


# ---------------------------------------------------------------------------
# MXFP4.


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_mxfp4_dequantization_is_bit_exact_against_transformers(dtype):
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors

  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)
  scales = rng.integers(100, 150, (3, 10, 4), dtype=np.uint8)
  scales[0, 0, 0], scales[0, 1, 0] = 0, 254  # the extremes of the exponent range (2**-127, 2**127)
  theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=getattr(torch, dtype))
  ours = np.stack([mxfp4.dequantize(blocks[e], scales[e]).T for e in range(3)])  # [E, cols, rows] like theirs
  ours = jnp.asarray(ours).astype(dtype)
  want = theirs.view(torch.int16 if dtype == 'bfloat16' else torch.int32).numpy()
  got = np.asarray(ours).view(np.int16 if dtype == 'bfloat16' else np.int32)
  assert theirs.shape == ours.shape
  np.testing.assert_array_equal(got, want)


def test_mxfp4_pack_round_trip():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((5, 64)).astype(np.float32)
  blocks, scales = mxfp4.quantize(w)
  assert blocks.shape == (5, 2, 16) and scales.shape == (5, 2)
  back = mxfp4.dequantize(blocks, scales)
  # E2M1 has 1 mantissa bit: within a quarter of the block's scale step of the input.
  step = np.ldexp(1.0, scales.astype(int) - 127)
  assert np.all(np.abs(back - w).reshape(5, 2, 32) <= step[..., None] * 1.0 + 1e-12)
  np.testing.assert_array_equal(mxfp4.dequantize(*mxfp4.quantize(back)), back)


def _tensors(model_dir):
  ckpt = Checkpoint(model_dir)
  return {k: np.array(ckpt.read(k)) for k in ckpt.keys()}


def _write_checkpoint(src_dir, out_dir, tensors):
  os.makedirs(out_dir, exist_ok=True)
  shutil.copy(os.path.join(src_dir, 'config.json'), os.path.join(out_dir, 'config.json'))
  write_safetensors(os.path.join(out_dir, 'model.safetensors'), tensors)
  return out_dir


def _same_params(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_gpt_oss_mxfp4_checkpoint_loads_as_transformers_dequantizes_it(moe_checkpoint, tmp_path):
  """Experts packed as *_blocks / *_scales load to exactly the weights transformers'
  dequantisation gives (written as a plain checkpoint and loaded by the plain rule)."""
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors

  src = moe_checkpoint('gpt_oss')
  tensors = _tensors(src)
  packed, plain = dict(tensors), dict(tensors)
  for key in [k for k in tensors if k.endswith(('experts.gate_up_proj', 'experts.down_proj'))]:
    blocks, scales = mxfp4.quantize(tensors[key].transpose(0, 2, 1))  # [E, out, in] rows are outputs
    del packed[key]
    packed[key + '_blocks'], packed[key + '_scales'] = blocks, scales
    plain[key] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                            dtype=torch.float32).numpy()
  config = load_config(src)
  for dtype in (jnp.float32, jnp.bfloat16):
    a = converters.load_params(_write_checkpoint(src, str(tmp_path / 'packed'), packed), config, dtype)
    b = converters.load_params(_write_checkpoint(src, str(tmp_path / 'plain'), plain), config, dtype)
    _same_params(a, b)
  assert not np.array_equal(np.asarray(a['model']['layers']['mlp']['experts']['down_proj']),
                            converters.load_params(src, config, jnp.bfloat16)['model']['layers']['mlp']['experts'][
                                'down_proj'])  # quantisation did change the weights


def test_fused_expert_layout_loads_like_per_expert(moe_checkpoint, tmp_path):
  """transformers' in-memory fused layout (mlp.experts.gate_up_proj [E, 2I, D]) and the
  hub's per-expert tensors give the same parameters."""
  from maxact_jax import fixtures_moe

  model = fixtures_moe.moe_model('qwen3_moe', seed=0)
  fused = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert 'model.layers.0.mlp.experts.gate_up_proj' in fused
  src = moe_checkpoint('qwen3_moe')
  config = load_config(src)
  _same_params(converters.load_params(_write_checkpoint(src, str(tmp_path / 'fused'), fused), config),
               converters.load_params(src, config))


def test_key_coverage_errors_name_the_tensor(moe_checkpoint, tmp_path):
  src, _ = moe_checkpoint('bailing_moe')
  tensors = _tensors(src)
  config = load_config(src)
  missing = dict(tensors)
  del missing['model.layers.2.mlp.experts.5.up_proj.weight']
  with pytest.raises(UserError, match=r'missing tensor model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'):
    converters.load_params(_write_checkpoint(src, str(tmp_path / 'missing'), missing), config)
  # Without MTP layers in the config, the MTP tensors are unexplained.
  no_mtp = _write_checkpoint(src, str(tmp_path / 'no_mtp'), tensors)
  raw = json.load(open(os.path.join(no_mtp, 'config.json')))
  raw['num_nextn_predict_layers'] = 0
  json.dump(raw, open(os.path.join(no_mtp, 'config.json'), 'w'))
  with pytest.raises(UserError, match=r'model\.layers\.3\..* is not used by the bailing_moe weight map'):
    converters.load_params(no_mtp, load_config(no_mtp))


# ---------------------------------------------------------------------------
# Configs.


def _ling_raw(**changes):
  from maxact_jax import fixtures_moe

  raw = fixtures_moe.ling_config(fixtures_moe.moe_model('glm4_moe').config)
  raw.update(changes)
  return raw


@pytest.mark.parametrize('changes, message', [
    ({'n_group': 3}, 'n_group 3 does not divide the 8 experts'),
    ({'topk_group': 5}, 'topk_group 5 must be between 1 and n_group 4'),
    ({'num_experts_per_tok': 9}, 'num_experts_per_tok 9 must be between 1 and the number of experts 8'),
    ({'score_function': 'softmax'}, "'score_function' = 'softmax' is not supported"),
    ({'use_sliding_window': True}, "'use_sliding_window' = True is not supported"),
    ({'moe_layer_freq': 2}, 'unknown config field.*moe_layer_freq'),
])
def test_bailing_config_errors(changes, message):
  with pytest.raises(UserError, match=message):
    parse_config(_ling_raw(**changes))


def test_bailing_config_reads_what_the_remote_code_reads():
  c = parse_config(_ling_raw(norm_topk_prob=False, moe_shared_expert_intermediate_size=999))
  # The remote code always renormalises and sizes the shared expert from
  # moe_intermediate_size * num_shared_experts.
  assert c.moe.norm_topk_prob and c.moe.shared_expert_intermediate_size == 32
  assert c.mlp_layer_kinds == ('dense', 'moe', 'moe') and c.mtp_layers == 1
  assert c.rope.partial_rotary_factor == 0.5 and c.qk_norm and not c.qkv_bias


def test_qwen3_moe_sparse_step_and_expert_count_names():
  base = {'model_type': 'qwen3_moe', 'vocab_size': 32, 'hidden_size': 16, 'num_hidden_layers': 4,
          'num_attention_heads': 2, 'intermediate_size': 8, 'moe_intermediate_size': 4, 'num_experts_per_tok': 2}
  c = parse_config({**base, 'num_experts': 4, 'decoder_sparse_step': 2, 'mlp_only_layers': [3]})
  assert c.mlp_layer_kinds == ('dense', 'moe', 'dense', 'dense')
  assert parse_config({**base, 'num_local_experts': 4}).moe.num_experts == 4  # transformers 5 writes this name
  with pytest.raises(UserError, match='disagree'):
    parse_config({**base, 'num_experts': 4, 'num_local_experts': 6})


def test_gpt_oss_quantization_config():
  raw = json.load(open(os.path.join(REAL_CONFIGS, 'gpt-oss-20b', 'config.json')))
  c = parse_config(raw)
  assert c.moe.num_experts == 32 and c.moe.swiglu_alpha == 1.702 and c.attention_sinks and c.norm_weight_fp32
  assert c.layer_types[:2] == ('sliding_attention', 'full_attention') and c.sliding_window == 128
  assert c.rope.rope_type == 'yarn' and not c.rope.truncate
  raw['quantization_config'] = {'quant_method': 'fp8'}
  with pytest.raises(UserError, match="'quant_method' = 'fp8' is not supported"):
    parse_config(raw)


# ---------------------------------------------------------------------------
# The PyTorch side.


def test_remote_code_detection(moe_checkpoint, tmp_path):
  src, _ = moe_checkpoint('bailing_moe')
  assert torch_reference.remote_code_modules(src) == ['configuration_bailing_moe_v2', 'modeling_bailing_moe_v2']
  assert not torch_reference.has_remote_code(src)
  with pytest.raises(UserError, match="has no 'bailing_moe' model and the checkpoint ships no modeling code"):
    torch_reference.load_hf_model(src)
  with_code = shutil.copytree(src, tmp_path / 'with_code')
  for name in ('configuration_bailing_moe_v2.py', 'modeling_bailing_moe_v2.py'):
    (with_code / name).write_text('')
  assert torch_reference.has_remote_code(str(with_code))


def test_router_hook_prefers_logits_over_indices():
  logits = torch.randn(6, 8)
  idx = logits.topk(2).indices
  out = (idx, torch.rand(6, 2), logits)
  assert torch_reference.router_output(out, prefer_logits=False) is idx  # the reference's choice
  assert torch_reference.router_output(out, prefer_logits=True) is logits


# ---------------------------------------------------------------------------
# MoE statistics: associative merge.


def _probe(rng, b, t, k=2, e=5, d=7):
  return {'index': jnp.asarray(np.stack([[rng.choice(e, k, replace=False) for _ in range(t)] for _ in range(b)]),
                               jnp.int32),
          'weight': jnp.asarray(rng.random((b, t, k)), jnp.float32),
          'probs': jax.nn.softmax(jnp.asarray(rng.standard_normal((b, t, e)), jnp.float32)),
          'expert_out': jnp.asarray(rng.standard_normal((b, t, k, d)), jnp.float32),
          'output': jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32),
          'shared': jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)}


def test_moe_stats_merge_is_associative_and_ignores_padding():
  rng = np.random.default_rng(3)
  batches = []
  for n in range(3):
    v = _probe(rng, 2, 5)
    valid = np.ones((2, 5), bool)
    valid[1, 3:] = False
    v['output'] = v['output'].at[1, 4, 2].set(1e4)  # padding: never the block maximum
    batches.append((jax.tree_util.tree_map(np.asarray, stats.moe_partial(v, jnp.asarray(valid))),
                    np.array([2 * n, 2 * n + 1])))
  one = stats.MoEStats(5, 2)
  for p, ids in batches:
    one.update(p, ids)
  parts = [stats.MoEStats(5, 2) for _ in batches]
  for s, (p, ids) in zip(parts, batches):
    s.update(p, ids)
  merged = parts[2].merge(parts[0]).merge(parts[1])
  a, b = one.finalize(), merged.finalize()
  assert a == b
  assert a['tokens'] == 3 * 8 and sum(a['expert_tokens']) == 3 * 8 * 2
  assert abs(a['block_max']['value']) < 1e4
  entry = a['block_max']
  assert entry['dominant_expert'] in entry['experts'] + ['shared']


def test_crosscheck_skips_only_taps_past_the_decoder_stack():
  from maxact_jax import crosscheck

  assert crosscheck.past_stack('layer_20_hidden', 20) and crosscheck.past_stack('layer_21_moe_gate', 20)
  assert not crosscheck.past_stack('layer_19_hidden', 20)
  assert not crosscheck.past_stack('final_layernorm', 20) and not crosscheck.past_stack('embedding_output', 20)


def test_gated_shared_expert_block_matches_qwen2_moe():
  """The Qwen-MoE style gated shared expert (sigmoid(shared_expert_gate(x)) *
  shared_expert(x)), block against block: transformers' Qwen2MoeSparseMoeBlock."""
  import transformers
  from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

  from maxact_jax import fixtures_moe
  from maxact_jax.config import ModelConfig, RopeConfig

  cfg = transformers.Qwen2MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, norm_topk_prob=False)
  torch.manual_seed(0)
  block = Qwen2MoeSparseMoeBlock(cfg).float()
  with torch.no_grad():
    for p in block.parameters():
      p.normal_(0, 0.2)
  fixtures_moe.jitter_constants(block)
  t = lambda w: jnp.asarray(w.detach().numpy().T)
  e = block.experts
  params = {
      'gate': {'kernel': t(block.gate.weight)},
      'experts': {'gate_up_proj': jnp.asarray(e.gate_up_proj.detach().numpy().transpose(0, 2, 1)),
                  'down_proj': jnp.asarray(e.down_proj.detach().numpy().transpose(0, 2, 1))},
      'shared_expert': {n: {'kernel': t(getattr(block.shared_expert, n).weight)}
                        for n in ('gate_proj', 'up_proj', 'down_proj')},
      'shared_expert_gate': {'kernel': t(block.shared_expert_gate.weight)},
  }
  config = ModelConfig(model_type='test', vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=32, intermediate_size=16, rms_norm_eps=1e-6,
                       rope=RopeConfig(theta=1e4),
                       moe=MoEConfig(8, 2, 16, norm_topk_prob=False, shared_expert_intermediate_size=24,
                                     shared_expert_gate=True))
  x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
  ours = moe.MoEBlock(config, jnp.float32).apply({'params': params}, jnp.asarray(x))
  with torch.no_grad():
    want = block(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-5, atol=1e-5)
