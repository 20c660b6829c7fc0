"""`maxact-jax bench --config_path`: the step at a real model's size, from config.json alone.

On CPU a full-width Qwen3-8B cut to two layers runs the whole path (random
weights made on the device, both steps compiled and timed, the memory figures,
the MFU); speed is a benchmark's business, not a test's.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import pytest

from maxact_jax import bench_size, plan
from tests.conftest import REAL_CONFIGS
from tests.test_cli import assert_one_error, run_cli

QWEN3_8B = os.path.join(REAL_CONFIGS, 'Qwen3-8B', 'config.json')


def test_qwen3_8b_two_layers_on_cpu(capsys, tmp_path):
  out = tmp_path / 'bench'
  code, table, err = run_cli(capsys, 'bench', f'--config_path={QWEN3_8B}', '--num_layers=2', '--seq_len=512',
                             '--batch_size=1', '--steps=1', f'--output_dir={out}')
  assert code == 0, err
  assert 'MFU (statistics step)' in table and 'XLA memory analysis' in table
  doc = json.loads((out / 'bench.json').read_text())
  (key, r), = doc[bench_size.SIZES_KEY].items()
  assert key == 'Qwen3-8B/L2/bfloat16/1x512/1xcpu'
  assert (r['num_layers'], r['config_layers'], r['batch_size'], r['seq_len'], r['dtype']) == (2, 36, 1, 512,
                                                                                               'bfloat16')
  # The model FLOPs, counted by hand from the config: q/k/v/o and the SwiGLU MLP per
  # layer, and causal attention (512 * 513 / 2 visible pairs, 32 heads of 128).
  d, heads, kv, hd, inter = 4096, 32, 8, 128, 12288
  per_layer = d * (heads + 2 * kv) * hd + heads * hd * d + 3 * d * inter
  want = 2 * 2 * 512 * per_layer + 2 * 4 * (512 * 513 / 2) * heads * hd
  assert r['model_flops_per_step'] == pytest.approx(want, rel=1e-9)
  # The memory: XLA's analysis holds the two layers' and the embedding's bf16 weights
  # (the LM head is not made: the step computes no logits), and no float32 copy of
  # them (XLA:CPU made one, twice their size, before the layers sliced their
  # stacked weights as bits: layers.to_bits).
  weights = 2 * (2 * per_layer + 151936 * d)
  assert weights < r['step_memory_bytes'] < 2 * weights
  assert r['peak_memory_bytes'] >= weights and r['peak_memory_source'].startswith('host')
  assert r['planner_estimate_bytes_per_device'] > weights
  for field in ('mfu', 'forward_mfu', 'tokens_per_s', 'overhead_ratio', 'compile_s', 'paper_hours'):
    assert r[field] > 0, field
  assert r['peak_source'].startswith('measured')
  assert r['full_depth_step_s'] == pytest.approx(r['stats_step_s'] * 18)


def test_bad_inputs(capsys, tmp_path, monkeypatch):
  refused = tmp_path / 'refused'
  refused.mkdir()
  raw = json.loads(open(QWEN3_8B).read())
  raw['use_parallel_residual'] = True
  (refused / 'config.json').write_text(json.dumps(raw))
  code, _, err = run_cli(capsys, 'bench', f'--config_path={refused}/config.json', f'--output_dir={tmp_path}/o')
  assert_one_error(code, err, 'unknown config field.*use_parallel_residual')

  code, _, err = run_cli(capsys, 'bench', f'--config_path={tmp_path}/none/config.json', f'--output_dir={tmp_path}/o')
  assert_one_error(code, err, 'does not exist')

  code, _, err = run_cli(capsys, 'bench', f'--config_path={QWEN3_8B}', '--num_layers=37', f'--output_dir={tmp_path}/o')
  assert_one_error(code, err, r'--num_layers=37 is more than the 36 layers of Qwen3-8B')

  code, _, err = run_cli(capsys, 'bench', '--num_layers=2', f'--output_dir={tmp_path}/o')
  assert_one_error(code, err, '--num_layers apply with --config_path only')

  # A batch that cannot fit: refused before anything is compiled, naming one that fits.
  def no_compile(*args):
    raise AssertionError('compiled before refusing')

  monkeypatch.setattr(bench_size, '_compile', no_compile)
  code, _, err = run_cli(capsys, 'bench', f'--config_path={QWEN3_8B}', '--num_layers=2', '--seq_len=4096',
                         '--batch_size=64', '--device_memory_gb=24', f'--output_dir={tmp_path}/o')
  assert_one_error(code, err, r'a batch of 64 x 4096 tokens needs about .* --batch_size=\d+ fits')
  fits = int(err.split('--batch_size=')[1].split()[0])
  config, _ = bench_size.load_bench_config(QWEN3_8B, 2)
  usable = 24 * 2**30 * plan.HEADROOM
  assert 1 <= fits < 64
  assert plan.estimate(config, jnp.bfloat16, 'none', {}, fits, 4096).total <= usable
  assert plan.estimate(config, jnp.bfloat16, 'none', {}, fits + 1, 4096).total > usable
  assert not os.path.exists(tmp_path / 'o' / 'bench.json')
  shutil.rmtree(tmp_path / 'o', ignore_errors=True)
