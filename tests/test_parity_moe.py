"""MoE families (qwen3_moe, gpt_oss, glm4_moe, bailing_moe): every tap against PyTorch.

The tiny checkpoints come from transformers itself with every constant parameter
jittered (biases, sinks, correction biases, norm weights), experts of order-one
output, a dense layer among the MoE ones, and (gpt-oss) a sliding window shorter
than the samples and a SwiGLU clamp that bites. bailing_moe is checked against the
transformers glm4_moe model its Ling-layout checkpoint was converted from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maxact_jax import capture, crosscheck, data, fixtures, measure_step, stats, torch_reference
from maxact_jax.families import load_config
from maxact_jax.models import transformer
from tests import parity_utils
from tests.conftest import write_ids_corpus

IDS_LENGTHS = [5, 17, 9, 33, 12, 3, 21, 8, 40, 16, 11, 27]  # as conftest's ids_corpus

MEASURED = ['qwen3_moe', 'gpt_oss', 'glm4_moe']
E = 8  # experts in every tiny checkpoint
K = 2

# The full tap list of each tiny model, in forward order (layer_1 of qwen3_moe is
# dense through mlp_only_layers; layer_0 of glm4_moe and bailing_moe is dense
# through first_k_dense_replace).
MOE_LAYER = ['attn_output', 'moe_gate', 'mlp_output', 'router_logits', 'hidden', 'moe_experts']
DENSE_LAYER = ['attn_output', 'mlp_gate', 'mlp_output', 'hidden']
KINDS = {
    'qwen3_moe': [MOE_LAYER, DENSE_LAYER, MOE_LAYER],
    'gpt_oss': [MOE_LAYER, MOE_LAYER, MOE_LAYER],
    'glm4_moe': [DENSE_LAYER, MOE_LAYER, MOE_LAYER],
    'bailing_moe': [DENSE_LAYER, MOE_LAYER, MOE_LAYER],
}


def expected_taps(model_type: str) -> list[str]:
  names = ['embedding_output']
  for i, suffixes in enumerate(KINDS[model_type]):
    names += [f'layer_{i}_{s}' for s in suffixes]
  return names + ['final_layernorm']


def model_dir_of(moe_checkpoint, model_type):
  out = moe_checkpoint(model_type)
  return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize('model_type', list(KINDS))
def test_tap_list(model_type, moe_checkpoint):
  assert capture.tap_names(load_config(model_dir_of(moe_checkpoint, model_type))) == expected_taps(model_type)


@pytest.fixture(scope='module')
def measured(moe_checkpoint, tmp_path_factory):
  """measure (one batch shape: one compilation) and the reference pipeline, once per family."""
  root = tmp_path_factory.mktemp('moe_measure')
  corpus = write_ids_corpus(root / 'ids.jsonl', fixtures.random_token_ids(256, IDS_LENGTHS, seed=1))
  cache = {}

  def get(model_type):
    if model_type not in cache:
      model_dir = moe_checkpoint(model_type)
      hf_model = torch_reference.load_hf_model(model_dir)
      doc, top_doc, ref = parity_utils.measure_and_reference(
          model_dir, corpus, str(root / model_type), batch_size=4, hf_model=hf_model, max_shapes=1)
      cache[model_type] = (doc, top_doc, ref, hf_model, corpus)
    return cache[model_type]

  return get


@pytest.mark.parametrize('model_type', MEASURED)
def test_measure_matches_reference_pipeline(model_type, measured):
  doc, top_doc, ref, _, ids_corpus = measured(model_type)
  activation = [name for name in ref if stats.is_activation_tap(name)]
  assert activation == [n for n in expected_taps(model_type) if stats.is_activation_tap(n)]
  checked = parity_utils.assert_stats_match(doc, top_doc, ref, taps=activation)
  assert checked > 25 * len(activation)
  parity_utils.assert_same_global_max(doc, ref)
  # The router taps exist on both sides (gpt-oss's MoE block also returns its routing weights).
  ref_router = {n for n in ref if not stats.is_activation_tap(n)}
  assert ref_router <= set(doc['per_layer_stats'])
  assert any(n.endswith('_moe_gate') for n in ref_router)
  assert (model_type == 'gpt_oss') == any(n.endswith('_router_logits') for n in ref_router)
  # MoE statistics for every MoE layer, over every valid token.
  moe_layers = [n for n in expected_taps(model_type) if n.endswith('_moe_experts')]
  assert sorted(doc['moe']) == sorted(moe_layers)
  tokens = sum(len(s) for s in data.load_corpus(ids_corpus, vocab_size=256).samples)
  for entry in doc['moe'].values():
    assert entry['tokens'] == tokens and sum(entry['expert_tokens']) == tokens * K


def _hf_router_outputs(model, samples, batch_size=4):
  """Per MoE layer, on valid tokens: the router's (logits, top-k weights, top-k index)
  and the MoE block's input."""
  out: dict[int, list] = {}
  hooks = []
  for i, layer in enumerate(torch_reference.text_backbone(model).layers):
    if not hasattr(layer.mlp, 'experts'):
      continue
    router = layer.mlp.gate if hasattr(layer.mlp, 'gate') else layer.mlp.router
    hooks.append(router.register_forward_hook(lambda m, a, o, i=i: out.setdefault(i, []).append(o + (a[0],))))
  valid = []
  with torch.no_grad():
    for ids, mask in torch_reference.reference_batches(samples, batch_size):
      model.model(input_ids=ids, attention_mask=mask)
      valid.append(mask.bool().reshape(-1))
  for h in hooks:
    h.remove()
  v = torch.cat(valid)
  return {i: tuple(torch.cat([o[j].reshape(-1, o[j].shape[-1]) for o in outs])[v] for j in range(4))
          for i, outs in out.items()}


def _expert_outputs_max(experts, x, index):
  """max |expert e's own output| over the tokens routed to it, from transformers' weights."""
  with torch.no_grad():
    best = torch.full((experts.num_experts,), -1.0, dtype=torch.float64)
    for e in range(experts.num_experts):
      rows = x[(index == e).any(-1)].double()
      if len(rows):
        gate, up = (rows @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].double().T
        best[e] = y.abs().max()
  return best.numpy()


def test_router_taps_and_moe_statistics(measured):
  """moe_gate / router_logits are counted over valid tokens only (the reference counts
  padding: its router outputs are [B*T, E], which its mask does not fit); per-expert
  token counts, maxima and router entropy agree with transformers' own routing."""
  doc, _, ref, model, ids_corpus = measured('qwen3_moe')
  samples = [s.tolist() for s in data.load_corpus(ids_corpus, vocab_size=256).samples]
  n_valid = sum(len(s) for s in samples)
  n_padded = sum(ids.numel() for ids, _ in torch_reference.reference_batches(samples, 4))
  assert n_padded > n_valid
  routers = _hf_router_outputs(model, samples)
  assert sorted(routers) == [0, 2]
  for i, (logits, weights, index, x) in routers.items():
    ours = doc['per_layer_stats'][f'layer_{i}_moe_gate']
    assert ours['count'] == n_valid * E and ref[f'layer_{i}_moe_gate']['count'] == n_padded * E
    np.testing.assert_allclose([ours['max'], ours['min'], ours['mean']],
                               [float(logits.max()), float(logits.min()), float(logits.double().mean())], rtol=1e-5)
    assert doc['per_layer_stats'][f'layer_{i}_router_logits']['count'] == n_valid * E
    moe = doc['moe'][f'layer_{i}_moe_experts']
    assert moe['expert_tokens'] == np.bincount(index.reshape(-1).numpy(), minlength=E).tolist()
    per_expert_weight = np.bincount(index.reshape(-1).numpy(), weights.reshape(-1).double().numpy(), minlength=E)
    np.testing.assert_allclose(np.array(moe['expert_mean_weight']) * moe['expert_tokens'], per_expert_weight,
                               rtol=1e-5)
    p = torch.softmax(logits.double(), -1)
    entropy = -(p * p.log()).sum(-1)
    np.testing.assert_allclose([moe['router_entropy_mean'], moe['router_entropy_max'], moe['router_entropy_min']],
                               [float(entropy.mean()), float(entropy.max()), float(entropy.min())], rtol=1e-5)
    # The block's largest |output| is the mlp_output tap's extreme, and the chosen
    # experts' weighted contributions at that element add up to it.
    s = doc['per_layer_stats'][f'layer_{i}_mlp_output']
    block = moe['block_max']
    assert abs(block['value']) == pytest.approx(max(abs(s['max']), abs(s['min'])), rel=1e-6)
    assert sum(block['contributions']) == pytest.approx(block['value'], rel=1e-5, abs=1e-6)
    assert block['dominant_expert'] in block['experts']
    assert block['token_id'] == doc['extremes'][f'layer_{i}_mlp_output'][
        'max' if abs(s['max']) >= abs(s['min']) else 'min']['token_id']
    want = _expert_outputs_max(torch_reference.text_backbone(model).layers[i].mlp.experts, x, index)
    got = np.array([-1.0 if m is None else m for m in moe['expert_max_abs_output']])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Routing weights are renormalised (<= 1): the dominant expert's own output is at
    # least as large somewhere as its weighted contribution here.
    assert moe['expert_max_abs_output'][block['dominant_expert']] >= abs(block['dominant_contribution'])


@pytest.mark.parametrize('model_type', list(KINDS))
def test_crosscheck_passes(model_type, moe_checkpoint, ids_corpus, tmp_path):
  out = moe_checkpoint(model_type)
  model_dir, hf_model = out if isinstance(out, tuple) else (out, None)
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=ids_corpus, num_samples=6, max_seq_len=40, output_dir=str(tmp_path)),
      hf_model=hf_model)
  parity_utils.assert_crosscheck_passed(report)
  assert report['skipped_taps'] == []
  compared = [n for n in expected_taps(model_type)
              if not n.endswith('_moe_experts') and not (n.endswith('_router_logits') and model_type != 'gpt_oss')]
  assert list(report['taps']) == compared
  # Order-one activations: the float32 tolerance is tight relative to them.
  assert min(r['ref_max_abs'] for n, r in report['taps'].items() if n.endswith('_mlp_output')) > 0.5


@pytest.mark.parametrize('where, first', [
    (('mlp', 'experts', 'down_proj'), 'layer_2_mlp_output'),
    (('mlp', 'gate', 'kernel'), 'layer_2_moe_gate'),
    (('mlp', 'gate', 'e_score_correction_bias'), 'layer_2_mlp_output'),
])
def test_crosscheck_names_the_perturbed_tap(where, first, moe_checkpoint, ids_corpus):
  """A 1% change in layer 2's experts, router, or (Ling's expert_bias, read through
  its own weight-map rule) selection bias is caught at that layer's tap."""
  model_dir, glm = moe_checkpoint('bailing_moe')
  config = load_config(model_dir)
  params = measure_step.load_params(model_dir, config, 'float32')
  seg = next(s for s in transformer.plan_segments(config) if s.start <= 2 < s.stop)
  repeat, slot = seg.locate(2)
  node = params['model'][seg.name]
  for key in ((seg.slot_name(slot),) if seg.period > 1 else ()) + where[:-1]:
    node = node[key]
  value = np.array(node[where[-1]])
  if where[-1] == 'e_score_correction_bias':
    value[repeat, 0] += 0.3  # expert 0 becomes a favourite of the selection
  else:
    value[repeat] *= 1.01
  node[where[-1]] = value
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=ids_corpus, num_samples=6, max_seq_len=40), params=params, hf_model=glm)
  assert not report['passed']
  assert report['first_failure'] == first
  assert report['taps']['layer_1_mlp_output']['passed']
  if first.endswith('mlp_output'):
    assert report['taps']['layer_2_moe_gate']['passed']
