"""`maxact-jax bench` on a few samples: every figure the issue asks for, and its corpus."""

from __future__ import annotations

import json

import numpy as np

from maxact_jax import bench, cli, data


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
