"""Bad input, for every command: one `error:` line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from maxact_jax import cli
from tests.test_config_and_converter import copy_checkpoint, edit_config


def run_cli(capsys, *args):
  code = cli.main(['maxact-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


def assert_one_error(code, err, pattern):
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2, (code, err)
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert 'Traceback' not in err
  import re
  assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def bad_inputs(checkpoint, ids_corpus, tmp_path):
  """(flags, expected message) for each kind of bad input."""
  good = checkpoint('qwen3')
  cases = {}
  cases['missing checkpoint'] = ([f'--model_path={tmp_path}/nope'], 'does not exist')
  unreadable = copy_checkpoint(good, tmp_path / 'unreadable')
  with open(os.path.join(unreadable, 'config.json'), 'w') as f:
    f.write('{"model_type": "qwen3",')
  cases['unreadable config'] = ([f'--model_path={unreadable}'], 'not valid JSON')
  unknown_type = copy_checkpoint(good, tmp_path / 'unknown_type')
  edit_config(unknown_type, model_type='falcon_mamba')
  cases['unknown model_type'] = ([f'--model_path={unknown_type}'], "unknown model_type 'falcon_mamba'")
  unknown_field = copy_checkpoint(good, tmp_path / 'unknown_field')
  edit_config(unknown_field, use_parallel_residual=True)
  cases['unknown config field'] = ([f'--model_path={unknown_field}'], 'unknown config field.*use_parallel_residual')
  corrupt = copy_checkpoint(good, tmp_path / 'corrupt')
  with open(os.path.join(corrupt, 'model.safetensors'), 'r+b') as f:
    f.truncate(1000)
  cases['corrupt safetensors'] = ([f'--model_path={corrupt}'], 'truncated or corrupt|not a valid safetensors')
  cases['missing data file'] = ([f'--model_path={good}', f'--data_path={tmp_path}/none.jsonl'], 'does not exist')
  malformed = tmp_path / 'malformed.jsonl'
  malformed.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5\n')
  cases['malformed corpus line'] = ([f'--model_path={good}', f'--data_path={malformed}'], r'malformed.jsonl:2: malformed JSON')
  beyond = tmp_path / 'beyond.jsonl'
  beyond.write_text(json.dumps({'input_ids': [1, 2, 9999]}) + '\n')
  cases['token id beyond vocab'] = ([f'--model_path={good}', f'--data_path={beyond}'], 'token id 9999 outside the vocabulary')
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  cases['empty corpus'] = ([f'--model_path={good}', f'--data_path={empty}'], 'corpus is empty')
  cases['batch size 0'] = ([f'--model_path={good}', f'--data_path={ids_corpus}', '--batch_size=0'], 'batch_size must be a positive')
  cases['negative shape cost'] = ([f'--model_path={good}', f'--data_path={ids_corpus}', '--shape_cost_tokens=-1'], 'shape_cost_tokens must be 0 or positive')
  cases['unknown dtype'] = ([f'--model_path={good}', f'--data_path={ids_corpus}', '--dtype=int4'], 'dtype=int4 is not supported')
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  cases['output path is a file'] = ([f'--model_path={good}', f'--data_path={ids_corpus}', f'--output_dir={a_file}'], 'exists and is not a directory')
  cases['not a number'] = ([f'--model_path={good}', '--batch_size=many'], 'batch_size')
  cases['unknown flag'] = ([f'--model_path={good}', '--sizes=100'], 'sizes')
  return cases


def test_measure_bad_inputs(bad_inputs, capsys, tmp_path):
  out_dir = tmp_path / 'out'
  for name, (args, pattern) in bad_inputs.items():
    if not any(a.startswith('--output_dir') for a in args):
      args = args + [f'--output_dir={out_dir}']
    code, _, err = run_cli(capsys, 'measure', '--progress=false', *args)
    assert_one_error(code, err, pattern)
    written = os.listdir(out_dir / 'json') if (out_dir / 'json').exists() else []
    assert written == [], (name, written)


def test_crosscheck_bad_input(capsys, tmp_path):
  code, _, err = run_cli(capsys, 'crosscheck', f'--model_path={tmp_path}/nope')
  assert_one_error(code, err, 'does not exist')


def test_unknown_command(capsys):
  code, _, err = run_cli(capsys, 'measur')
  assert_one_error(code, err, "unknown command 'measur'")


def test_real_process_exit_code_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'maxact_jax.cli', 'measure', f'--model_path={tmp_path}/nope',
                         f'--output_dir={tmp_path}/o'], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f'error: model path {tmp_path}/nope does not exist']


def test_measure_writes_both_files(capsys, checkpoint, ids_corpus, tmp_path):
  code, out, _ = run_cli(capsys, 'measure', f'--model_path={checkpoint("llama")}', f'--data_path={ids_corpus}',
                         f'--output_dir={tmp_path}', '--dtype=float32', '--progress=false',
                         '--shape_cost_tokens=0')  # tiny corpus: bucket it fully
  assert code == 0
  files = sorted(os.listdir(tmp_path / 'json'))
  assert files == ['llama_activation_stats.json', 'llama_anatomy.json', 'llama_channel_absmax.npz',
                   'llama_top5_stats.json']
  assert 'global max activation' in out
  doc = json.loads((tmp_path / 'json' / 'llama_activation_stats.json').read_text())
  assert doc['model_type'] == 'llama' and doc['num_samples'] == 12
  assert doc['run']['padding_ratio'] < 0.5


@pytest.mark.parametrize('command, flags', [
    ('measure', ['--model_path={ckpt}', '--output_dir={file}']),
    ('crosscheck', ['--model_path={ckpt}', '--output_dir={file}']),
    ('quant', ['--model_path={ckpt}', '--output_dir={file}']),
    ('bootstrap', ['--data_path={file}', '--output_dir={file}', '--sizes=2']),
    ('report', ['--results_dir={file}']),
    ('anatomy', ['--model_path={ckpt}', '--output_dir={file}']),
    ('intervene', ['--model_path={ckpt}', '--output_dir={file}']),
    ('convert', ['--model_path={ckpt}', '--output_dir={file}']),
    ('plan', ['--model_path={file}']),
    ('sweep', ['--configs={file}', '--output_dir={file}']),
    ('bench', ['--output_dir={file}']),
    ('corpus', ['--output_path={tmp}/no/such/dir/c.jsonl', '--num_samples=0']),
])
def test_every_command_turns_bad_paths_into_one_error_line(command, flags, checkpoint, tmp_path, capsys):
  """A plain file where a directory belongs (or a non-checkpoint): one `error:` line, exit 2."""
  bad = tmp_path / 'a_file'
  bad.write_text('not a directory\n')
  ckpt = checkpoint('qwen3')
  capsys.readouterr()  # building the checkpoint prints progress
  args = [f.format(ckpt=ckpt, file=bad, tmp=tmp_path) for f in flags]
  code, _, err = run_cli(capsys, command, *args)
  assert_one_error(code, err, '.')
  assert bad.read_text() == 'not a directory\n'  # nothing written over it
