"""`maxact-jax bench` on a few samples: every figure the issue asks for, and its corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maxact_jax import bench, cli, data, fixtures_gguf
from maxact_jax.families import load_config


def test_bench_writes_its_figures_and_an_input_ids_corpus(tmp_path, capsys):
  out = tmp_path / 'bench'
  code = cli.main(['maxact-jax', 'bench', f'--output_dir={out}', '--num_samples=6', '--repeats=1',
                   '--end_to_end=false', '--cases=random', '--dtypes=float32,bfloat16'])
  table = capsys.readouterr().out
  assert code == 0 and 'overhead_ratio' in table and 'random/bfloat16' in table
  result = json.loads((out / 'bench.json').read_text())
  assert set(result['cases']) == {'random/float32', 'random/bfloat16'}
  assert result['cases']['random/bfloat16']['dtype'] == 'bfloat16'
  top = result['cases']['random/float32']  # at the top level too, as earlier versions wrote it
  assert all(result[k] == v for k, v in top.items())
  for key in ('overhead_ratio', 'padding_ratio', 'compiled_shapes', 'model_path', 'data_path', 'forward_s',
              'stats_step_s', 'torch_forward_s', 'mfu', 'compile_s'):
    assert key in result, key
  assert 1 <= result['compiled_shapes'] <= 8 and 0 <= result['padding_ratio'] < 1
  assert result['overhead_ratio'] > 0 and 0 < result['mfu'] < 2
  rows = [json.loads(line) for line in open(result['data_path'])]
  lengths = np.array([len(r['input_ids']) for r in rows])
  assert len(rows) == 6 and lengths.min() >= bench.MIN_LEN and lengths.max() <= bench.MAX_LEN
  assert np.median(lengths) > 512  # the built-in length plan at twice its budgets (512 at most at once)
  corpus = data.load_corpus(result['data_path'], vocab_size=bench.VOCAB)
  assert corpus.num_tokens == result['tokens'] == lengths.sum()


def test_the_real_model_case_reads_the_smollm2_gguf_and_its_own_tokens(tmp_path):
  """The `smollm2` case: the test suite's real model (its GGUF file as installed) on 32
  built-in samples of at most 512 tokens in its own tokenizer, input_ids as both
  pipelines read them."""
  model_path, data_path = bench.case_inputs('smollm2', bench.BenchOptions(str(tmp_path)))
  assert model_path == fixtures_gguf.smollm2_gguf()
  corpus = data.load_corpus(data_path, vocab_size=load_config(model_path).vocab_size)
  assert len(corpus.lengths) == bench.REAL_SAMPLES == 32 and max(corpus.lengths) <= bench.REAL_MAX_LEN == 512
  assert min(corpus.lengths) >= 8
  assert bench.case_inputs('smollm2', bench.BenchOptions(str(tmp_path)))[1] == data_path  # built once


def test_unknown_cases_and_dtypes_are_refused(tmp_path, capsys):
  for flag, pattern in (('--cases=random,llama', "unknown case 'llama'"), ('--dtypes=float64', "'float64' is not")):
    code = cli.main(['maxact-jax', 'bench', f'--output_dir={tmp_path}/b', flag])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: ') and pattern in err and err.count('\n') == 1, err


@pytest.mark.slow
def test_bench_on_the_real_model_in_both_dtypes(tmp_path, capsys):
  out = tmp_path / 'bench'
  code = cli.main(['maxact-jax', 'bench', f'--output_dir={out}', '--repeats=1', '--end_to_end=false',
                   '--cases=smollm2', '--dtypes=float32,bfloat16'])
  assert code == 0
  doc = json.loads((out / 'bench.json').read_text())
  assert set(doc['cases']) == {'smollm2/float32', 'smollm2/bfloat16'}
  for name, r in doc['cases'].items():
    assert r['dtype'] == name.split('/')[1] and r['model_path'].endswith('.gguf')
    assert r['overhead_ratio'] > 0 and r['torch_forward_s'] > 0 and 0 < r['mfu'] < 2
