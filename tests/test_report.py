"""Tests of the cross-model report (maxact_jax/report.py) and its command.

The reference files are the paper's own results, in tests/data/reference-results. The paper's MoE/dense ratios need three checkpoints
that are not there (Qwen3-32B, Qwen3.5-27B, Qwen3.5-35B-A3B): minimal
synthetic files carry their published peaks (35,328 at layer_44_hidden;
1,848 at layer_63_hidden; 132 at layer_39_hidden).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from maxact_jax import cli, report, report_render
from maxact_jax.errors import UserError
from tests.conftest import REAL_CONFIGS as _REAL_CONFIGS, REFERENCE_RESULTS

REF = Path(REFERENCE_RESULTS)
REAL_CONFIGS = Path(_REAL_CONFIGS)

# (model, signed global max, location) of the 7 reference activation-stats files.
REF_PEAKS = {
    'gemma-2b': (-2992.0, 'layer_11_hidden (min)', 'residual'),
    'gemma-3-4b-it': (245760.0, 'layer_29_hidden (max)', 'residual'),
    'gpt-oss-20b': (-145408.0, 'layer_23_mlp_output (min)', 'moe'),
    'Ling-mini-5T': (-7648.0, 'layer_14_hidden (min)', 'residual'),
    'Qwen3-8B': (17664.0, 'layer_16_hidden (max)', 'residual'),
    'Qwen3-30B-A3B': (1512.0, 'layer_3_hidden (max)', 'residual'),
    'Qwen3.5-0.8B': (122.0, 'final_layernorm (max)', 'final_norm'),
}


@pytest.fixture(scope='module')
def ref_dir() -> Path:
  return REF


@pytest.fixture(scope='module')
def ref_summary(ref_dir):
  return report.build_summary(ref_dir)


def by_name(entries, name):
  (found,) = [e for e in entries if e.get('model_name', e.get('moe')) == name]
  return found


def synthetic(path: Path, name: str, model_type: str, n_layers: int, peak: float, peak_layer: int,
              moe: bool = False, **extra) -> None:
  """A minimal activation-stats file: the residual stream peaks at `peak_layer`."""
  pls = {'embedding_output': {'max': 0.5, 'min': -0.5}}
  for i in range(n_layers):
    v = peak if i == peak_layer else 10.0 + i
    pls[f'layer_{i}_attn_output'] = {'max': 3.0, 'min': -2.0}
    if moe:
      pls[f'layer_{i}_moe_gate'] = {'max': 0.9, 'min': 0.0}
    pls[f'layer_{i}_mlp_output'] = {'max': 5.0, 'min': -4.0}
    pls[f'layer_{i}_hidden'] = {'max': v, 'min': -1.0}
  pls['final_layernorm'] = {'max': 50.0, 'min': -40.0}
  data = {'model_name': name, 'model_type': model_type, 'num_hidden_layers': n_layers,
          'hidden_size': 64, 'global_max_activation': peak,
          'global_max_location': f'layer_{peak_layer}_hidden (max)', 'per_layer_stats': pls, **extra}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))


@pytest.fixture(scope='module')
def paper_dir(ref_dir, tmp_path_factory) -> Path:
  """The local reference files plus the three missing checkpoints, in nested folders."""
  root = tmp_path_factory.mktemp('paper')
  for f in ref_dir.glob('*.json'):
    (root / 'local' / f.name).parent.mkdir(exist_ok=True)
    os.symlink(f, root / 'local' / f.name)
  synthetic(root / 'Qwen3' / 'json' / 'Qwen3-32B_activation_stats.json', 'Qwen3-32B', 'qwen3', 64,
            35328.0, 44)
  synthetic(root / 'Qwen3.5' / 'json' / 'Qwen3.5-27B_activation_stats.json', 'Qwen3.5-27B', 'qwen3_5',
            64, 1848.0, 63)
  synthetic(root / 'Qwen3.5' / 'json' / 'Qwen3.5-35B-A3B_activation_stats.json', 'Qwen3.5-35B-A3B',
            'qwen3_5_moe', 40, 132.0, 39, moe=True)
  return root


# ---------------------------------------------------------------------------
# Small functions.


def test_parsers():
  assert report.parse_location('layer_23_mlp_output (min)') == ('layer_23_mlp_output', 'min')
  assert report.parse_location('final_layernorm (max)') == ('final_layernorm', 'max')
  assert report.layer_of('layer_16_hidden') == 16
  assert report.layer_of('final_layernorm') is None
  assert [report.tap_component(t) for t in (
      'embedding_output', 'layer_0_attn_output', 'layer_0_mlp_output', 'layer_2_hidden',
      'final_layernorm', 'layer_1_router_logits')] == [
          'embedding', 'attention', 'mlp', 'residual', 'final_norm', 'other']
  assert report.tap_component('layer_5_mlp_output', moe_layer=True) == 'moe'


@pytest.mark.parametrize('name, params, family', [
    ('Qwen3-32B', (32.0, None), 'Qwen3'),
    ('Qwen3-30B-A3B', (30.0, 3.0), 'Qwen3'),
    ('Qwen3.5-35B-A3B', (35.0, 3.0), 'Qwen3.5'),
    ('Qwen3.5-0.8B', (0.8, None), 'Qwen3.5'),
    ('gemma-2b', (2.0, None), 'gemma'),
    ('gemma-2-9b', (9.0, None), 'gemma-2'),
    ('gemma-3-4b-it', (4.0, None), 'gemma-3'),
    ('Qwen2.5-VL-7B-Instruct', (7.0, None), 'Qwen2.5-VL'),
    ('gpt-oss-20b', (20.0, None), 'gpt-oss'),
    ('Ling-mini-5T', (None, None), 'Ling-mini'),
])
def test_names(name, params, family):
  assert report.params_from_name(name) == params
  assert report.family_from_name(name) == family


def test_estimate_params_by_hand():
  # 2 layers, h=8, 2 heads of 4 (kv 1), MLP 16, vocab 10, untied.
  cfg = {'hidden_size': 8, 'num_hidden_layers': 2, 'vocab_size': 10, 'num_attention_heads': 2,
         'num_key_value_heads': 1, 'intermediate_size': 16, 'tie_word_embeddings': False}
  attn = 8 * 8 + 2 * 8 * 4 + 8 * 8
  assert report.estimate_params(cfg) == 2 * (attn + 3 * 8 * 16) + 2 * 10 * 8
  # MoE: 4 experts of width 6, router, first layer dense.
  moe = {**cfg, 'num_experts': 4, 'moe_intermediate_size': 6, 'first_k_dense_replace': 1}
  assert report.estimate_params(moe) == (2 * attn + 3 * 8 * 16 + 4 * 3 * 8 * 6 + 4 * 8 + 2 * 10 * 8)
  assert report.estimate_params({'hidden_size': 8}) is None


@pytest.mark.parametrize('model, published', [
    ('Qwen3-32B', 32.8e9), ('Qwen3-30B-A3B', 30.5e9), ('Qwen3-8B', 8.19e9),
    ('gpt-oss-20b', 20.9e9), ('gemma-2b', 2.51e9)])
def test_estimate_params_real_configs(model, published):
  path = REAL_CONFIGS / model / 'config.json'
  n = report.estimate_params(json.loads(path.read_text()))
  assert abs(n / published - 1) < 0.01, n


# ---------------------------------------------------------------------------
# The paper's own files.


def test_reference_models(ref_summary):
  models = ref_summary['models']
  assert sorted(m['model_name'] for m in models) == sorted(REF_PEAKS)  # quant_sanity files ignored
  for name, (value, location, component) in REF_PEAKS.items():
    m = by_name(models, name)
    assert (m['global_max_activation'], m['global_max_location'], m['component']) == (
        value, location, component)
    assert m['global_max_abs'] == abs(value)
  q = by_name(models, 'Qwen3-8B')
  assert (q['num_hidden_layers'], q['hidden_size'], q['max_layer']) == (36, 4096, 16)
  assert q['peak_relative_depth'] == pytest.approx(16 / 35)
  assert [m['model_name'] for m in models if m['is_moe']] == ['gpt-oss-20b', 'Ling-mini-5T',
                                                              'Qwen3-30B-A3B']
  # Ling: layer 0 is a dense MLP, layers 1-20 are MoE; layer 20 is past the 20 main layers.
  ling = by_name(models, 'Ling-mini-5T')
  assert ling['component_peaks']['mlp'] == 10.4375
  assert ling['component_peaks']['moe'] == 7424.0
  assert ling['extra_layers'] == [20]
  assert ling['residual_layerwise']['layer'] == list(range(20))
  assert by_name(models, 'Qwen3.5-0.8B')['sun_pass'] is False
  assert by_name(models, 'Qwen3-8B')['sun_pass'] is True
  # Residual stream layerwise max |x| = max(|max|, |min|).
  gemma = by_name(models, 'gemma-2b')['residual_layerwise']
  assert gemma['max_abs'][:3] == [324.0, 346.0, 400.0] and gemma['max_abs'][11] == 2992.0


def test_reference_residual_stream_count(ref_summary):
  rs = ref_summary['residual_stream_max']
  assert (rs['count'], rs['total']) == (5, 7)
  elsewhere = {e['model_name']: (e['location'], e['component'], e['residual_ties'])
               for e in rs['elsewhere']}
  assert elsewhere == {
      'gpt-oss-20b': ('layer_23_mlp_output (min)', 'moe', True),  # layer_23_hidden is -145,408 too
      'Qwen3.5-0.8B': ('final_layernorm (max)', 'final_norm', False),
  }


def test_reference_pairs(ref_summary):
  # Only Qwen3-8B is there for Qwen3-30B-A3B: paired, flagged as a size mismatch.
  (pair,) = ref_summary['moe_dense_pairs']
  assert (pair['moe'], pair['dense'], pair['source'], pair['size_mismatch']) == (
      'Qwen3-30B-A3B', 'Qwen3-8B', 'auto', True)
  assert pair['ratio'] == pytest.approx(17664 / 1512)
  assert {u['moe']: u['reason'] for u in ref_summary['moe_unpaired']} == {
      'gpt-oss-20b': 'no dense model of family gpt-oss in the results',
      'Ling-mini-5T': 'no dense model of family Ling-mini in the results',
  }


def test_paper_pair_ratios(paper_dir):
  summary = report.build_summary(paper_dir)
  pairs = {p['moe']: p for p in summary['moe_dense_pairs']}
  assert set(pairs) == {'Qwen3-30B-A3B', 'Qwen3.5-35B-A3B'}
  q3, q35 = pairs['Qwen3-30B-A3B'], pairs['Qwen3.5-35B-A3B']
  assert (q3['dense'], q3['moe_peak'], q3['dense_peak']) == ('Qwen3-32B', 1512.0, 35328.0)
  assert round(q3['ratio'], 1) == 23.4
  assert (q35['dense'], q35['moe_peak'], q35['dense_peak']) == ('Qwen3.5-27B', 132.0, 1848.0)
  assert round(q35['ratio'], 1) == 14.0
  assert not q3['size_mismatch'] and not q35['size_mismatch']
  # MoE by model_type, by its router taps and by its name.
  assert by_name(summary['models'], 'Qwen3.5-35B-A3B')['moe_evidence'] == [
      'model_type qwen3_5_moe', 'router taps', 'name -A<n>B']
  rs = summary['residual_stream_max']
  assert (rs['count'], rs['total']) == (8, 10)
  assert by_name(summary['models'], 'Qwen3-32B')['files']['activation_stats'] == (
      'Qwen3/json/Qwen3-32B_activation_stats.json')
  assert report.headline(summary).splitlines() == [
      '10 models; residual stream carries the global max in 8 of 10',
      'Qwen3-32B / Qwen3-30B-A3B: 23.4x',
      'Qwen3.5-27B / Qwen3.5-35B-A3B: 14.0x',
      'gpt-oss-20b: not paired (no dense model of family gpt-oss in the results)',
      'Ling-mini-5T: not paired (no dense model of family Ling-mini in the results)',
  ]


def test_pairs_override(paper_dir):
  summary = report.build_summary(paper_dir, pairs='Qwen3-30B-A3B:Qwen3-8B')
  pairs = {p['moe']: p for p in summary['moe_dense_pairs']}
  assert (pairs['Qwen3-30B-A3B']['dense'], pairs['Qwen3-30B-A3B']['source']) == ('Qwen3-8B', 'override')
  assert pairs['Qwen3-30B-A3B']['ratio'] == pytest.approx(17664 / 1512)
  assert pairs['Qwen3.5-35B-A3B']['dense'] == 'Qwen3.5-27B'  # others stay automatic
  with pytest.raises(UserError, match="'Qwen3-99B', which is not among the models"):
    report.build_summary(paper_dir, pairs='Qwen3-30B-A3B:Qwen3-99B')
  with pytest.raises(UserError, match='is not MOE:DENSE'):
    report.build_summary(paper_dir, pairs='Qwen3-30B-A3B')


def test_topk_scan_qwen3_8b(ref_summary):
  (scan,) = ref_summary['topk_scan']
  assert (scan['model_name'], scan['k'], scan['top1'], scan['top1_signed']) == (
      'Qwen3-8B', 100, 17664.0, 17664.0)
  # bf16 saturation: the same 17,664 in the residual stream of layers 16..33.
  assert scan['saturation']['count'] == 18
  assert scan['saturation']['layers_at_max'] == list(range(16, 34))
  assert scan['concentration']['top1_over_top5_mean'] == 1.0
  assert scan['concentration']['top1_over_topk_mean'] == pytest.approx(17664 / 17198.08)
  assert scan['sign_consistency'] == 1.0
  assert [h['layer'] for h in scan['hot_layers']] == [16, 17, 18]
  layer16 = {r['layer']: r for r in scan['per_layer']}[16]
  assert (layer16['top1'], layer16['top5_mean']) == (17664.0, 17177.6)
  assert layer16['top1_over_top5_mean'] == pytest.approx(17664 / 17177.6)
  assert len(scan['per_layer']) == 36
  assert ref_summary['no_topk'] == ['gemma-2b', 'gemma-3-4b-it', 'gpt-oss-20b', 'Ling-mini-5T',
                                    'Qwen3-30B-A3B', 'Qwen3.5-0.8B']


def test_global_topk_recomputed_matches_file(ref_dir):
  data = json.loads((ref_dir / 'Qwen3-8B_top5_stats.json').read_text())
  a, s = report.global_topk(data['per_layer_stats'])
  assert a == data['global_top5_abs'] and s == data['global_top5_signed']
  del data['global_top5_abs'], data['global_top5_signed']
  scan = report.topk_scan(data)
  assert (scan['global_source'], scan['saturation']['count']) == ('recomputed', 18)


def test_topk_scan_signs_and_hot_layers():
  pls = {
      'layer_0_hidden': {'topk_abs': [9.0, 4.0], 'topk_signed': [-9.0, 4.0]},
      'layer_1_hidden': {'topk_abs': [9.0, 8.0], 'topk_signed': [-9.0, -8.0]},
      'layer_1_mlp_output': {'topk_abs': [10.0, 0.0], 'topk_signed': [-10.0, 0.0]},  # one padding 0
      'layer_1_router_logits': {'topk_abs': [99.0], 'topk_signed': [99.0]},  # not an activation
  }
  scan = report.topk_scan({'per_layer_stats': pls})
  assert (scan['k'], scan['top1_signed'], scan['saturation']['count']) == (2, -10.0, 1)
  assert scan['sign_consistency'] == 1.0  # -10, -9
  assert [(h['layer'], h['tap']) for h in scan['hot_layers']] == [(1, 'layer_1_mlp_output'),
                                                                   (0, 'layer_0_hidden')]
  assert [r['top1_over_top5_mean'] for r in scan['per_layer']] == [9 / 6.5, 9 / 8.5]


# ---------------------------------------------------------------------------
# Writing.


def test_write_report(ref_summary, tmp_path):
  out = tmp_path / 'out'
  written = report_render.write_report(ref_summary, out)
  assert sorted(written) == ['component_peaks.png', 'report.html', 'report.md',
                             'residual_layerwise.png', 'summary.json', 'topk_scan.png']
  assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files left
  for name in ('component_peaks.png', 'residual_layerwise.png', 'topk_scan.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads((out / 'summary.json').read_text()) == ref_summary
  md = (out / 'report.md').read_text()
  assert ('| gpt-oss-20b | gpt_oss | MoE | 20B | -145,408 | `layer_23_mlp_output (min)` | MoE | 1.00 |'
          in md)
  assert 'carries the global maximum in 5 of 7 models' in md
  assert '| Qwen3-30B-A3B | Qwen3-8B | 1,512 | 17,664 | 11.7x |' in md
  assert 'Ling-mini-5T: not paired (no dense model of family Ling-mini in the results).' in md
  assert '| Qwen3-8B | 100 | 17,664 | 18 of 100 | L16–L33 (18) | 1.000 | 1.027 | 100% |' in md
  page = (out / 'report.html').read_text()
  for img in ('residual_layerwise.png', 'component_peaks.png', 'topk_scan.png'):
    assert f'<img src="{img}"' in page
  assert '<td>Qwen3.5-0.8B</td><td>qwen3_5</td><td>dense</td><td>0.8B</td><td>122</td>' in page
  assert 'http' not in page and str(out) not in page  # self-contained, relative images


def test_write_report_from_dir_with_pairs(paper_dir, tmp_path):
  report_render.write_report(paper_dir, tmp_path, pairs='Qwen3.5-35B-A3B:Qwen3.5-0.8B')
  summary = json.loads((tmp_path / 'summary.json').read_text())
  pair = by_name(summary['moe_dense_pairs'], 'Qwen3.5-35B-A3B')
  assert (pair['dense'], pair['ratio']) == ('Qwen3.5-0.8B', 122 / 132)


def test_non_finite_peak_is_valid_json(tmp_path):
  synthetic(tmp_path / 'r' / 'Big-1B_activation_stats.json', 'Big-1B', 'qwen3', 4, math.inf, 2)
  report_render.write_report(tmp_path / 'r', tmp_path / 'o')
  text = (tmp_path / 'o' / 'summary.json').read_text()
  summary = json.loads(text, parse_constant=lambda c: pytest.fail(f'non-standard JSON {c}'))
  assert summary['models'][0]['global_max_abs'] == 'inf'


def test_file_param_counts_win_over_name(tmp_path):
  synthetic(tmp_path / 'Foo-7B_activation_stats.json', 'Foo-7B', 'qwen3', 4, 100.0, 1,
            total_params=7.6e9)
  (m,) = report.build_summary(tmp_path)['models']
  assert (m['total_params_b'], m['params_source']) == (7.6, 'file:total_params')


# ---------------------------------------------------------------------------
# Bad input.


def test_user_errors(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    report.build_summary(tmp_path / 'missing')
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(UserError, match='is not a directory'):
    report.build_summary(tmp_path / 'a_file')
  with pytest.raises(UserError, match='no \\*_activation_stats.json files under'):
    report.build_summary(tmp_path)
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'X-1B_activation_stats.json').write_text('{"model_name": ')
  with pytest.raises(UserError, match='X-1B_activation_stats.json is not valid JSON'):
    report.build_summary(bad)
  (bad / 'X-1B_activation_stats.json').write_text('{"model_name": "X-1B"}')
  with pytest.raises(UserError, match='no per_layer_stats'):
    report.build_summary(bad)
  dup = tmp_path / 'dup'
  synthetic(dup / 'a' / 'M-1B_activation_stats.json', 'M-1B', 'qwen3', 2, 5.0, 1)
  synthetic(dup / 'b' / 'M-1B_activation_stats.json', 'M-1B', 'qwen3', 2, 5.0, 1)
  with pytest.raises(UserError, match='two result files for model M-1B'):
    report.build_summary(dup)
  summary = report.build_summary(dup / 'a')
  with pytest.raises(UserError, match='exists and is not a directory'):
    report_render.write_report(summary, tmp_path / 'a_file')


def test_command(ref_dir, tmp_path, capsys):
  assert cli.main(['maxact-jax', 'report', f'--results_dir={ref_dir}', f'--output_dir={tmp_path / "o"}']) == 0
  assert json.loads((tmp_path / 'o' / 'summary.json').read_text())['residual_stream_max']['count'] == 5
  assert '7 models; residual stream carries the global max in 5 of 7' in capsys.readouterr().out
  assert cli.main(['maxact-jax', 'report', f'--output_dir={tmp_path / "o"}']) == 2
  assert capsys.readouterr().err == 'error: --results_dir is required (a folder holding *_activation_stats.json files)\n'
  assert cli.main(['maxact-jax', 'report', f'--results_dir={tmp_path / "nope"}', f'--output_dir={tmp_path / "o"}']) == 2
  assert 'does not exist' in capsys.readouterr().err
