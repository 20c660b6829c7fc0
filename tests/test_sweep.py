"""`sweep`: configs run in order, finished ones skipped, a failure does not stop the rest; the paper configs."""

from __future__ import annotations

import json
import os
import re

from maxact_jax import cli, sweep
from maxact_jax.commands import measure as measure_command
from maxact_jax.commands import sweep as sweep_command
from tests.conftest import REPO

PAPER_CHECKPOINTS = [
    'Qwen2.5-1.5B', 'Qwen2.5-7B', 'Qwen2.5-32B', 'Qwen2.5-1.5B-Instruct', 'Qwen2.5-7B-Instruct',
    'Qwen2.5-32B-Instruct', 'Qwen2.5-VL-3B-Instruct', 'Qwen2.5-VL-7B-Instruct', 'Qwen2.5-VL-32B-Instruct',
    'Qwen3-1.7B', 'Qwen3-8B', 'Qwen3-32B', 'Qwen3-30B-A3B', 'Qwen3.5-0.8B', 'Qwen3.5-9B', 'Qwen3.5-27B',
    'Qwen3.5-35B-A3B', 'gemma-2b', 'gemma-2-9b', 'gemma-2-27b', 'gemma-3-4b-it', 'gemma-3-27b-it', 'gpt-oss-20b',
    'Ling-mini-5T', 'Ling-mini-10T', 'Ling-mini-15T', 'Ling-mini-20T']


def run_cli(capsys, *args):
  code = cli.main(['maxact-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


def write_flags(path, **values) -> str:
  path.write_text('# a test config\n' + ''.join(f'--{k}={v}\n' for k, v in values.items()))
  return str(path)


def test_sweep_runs_skips_and_survives_a_failure(checkpoint, ids_corpus, tmp_path, capsys):
  qwen3, llama = checkpoint('qwen3'), checkpoint('llama')
  common = dict(data_path=ids_corpus, batch_size=12, max_samples=12, dtype='float32', progress='false')
  a = write_flags(tmp_path / 'a.flags', model_path=qwen3, output_dir=tmp_path / 'ignored', **common)
  # Relative to --root: the checkpoints' parent folder.
  b = write_flags(tmp_path / 'b.flags', model_path=os.path.basename(llama), **common)
  bad = write_flags(tmp_path / 'bad.flags', model_path=tmp_path / 'no-such-model', **common)
  out_dir = tmp_path / 'out'
  root = os.path.dirname(llama)
  code, out, _ = run_cli(capsys, 'sweep', f'--configs={a},{bad},{b}', f'--output_dir={out_dir}', f'--root={root}')
  assert code == 1, out
  assert re.search(r'\[2/3\] no-such-model: FAILED: .*does not exist', out), out
  assert 'measured 2, skipped 0 (results exist), failed 1' in out
  json_dir = out_dir / 'json'
  names = sorted(os.listdir(json_dir))
  assert names == [f'{m}_{f}' for m in ('llama', 'qwen3') for f in (
      'activation_stats.json', 'anatomy.json', 'channel_absmax.npz', 'top5_stats.json')]
  assert not (tmp_path / 'ignored').exists()  # the sweep's --output_dir wins
  with open(out_dir / 'report' / 'summary.json') as f:
    summary = json.load(f)
  assert sorted(m['model_name'] for m in summary['models']) == ['llama', 'qwen3']
  assert (out_dir / 'report' / 'report.html').is_file()
  with open(json_dir / 'qwen3_activation_stats.json') as f:
    doc = json.load(f)
  assert doc['num_samples'] == 12 and doc['run']['dtype'] == 'float32' and doc['run']['batch_size'] == 12

  # Second run: both finished -> skipped; a broken result file counts as unfinished.
  mtimes = {n: os.path.getmtime(json_dir / n) for n in names}
  (json_dir / 'llama_top5_stats.json').write_text('{"per_layer_stats": {')
  code, out, _ = run_cli(capsys, 'sweep', f'--configs={a},{b}', f'--output_dir={out_dir}', f'--root={root}')
  assert code == 0, out
  assert '[1/2] qwen3: results exist, skipped' in out and '[2/2] llama: measuring' in out
  assert os.path.getmtime(json_dir / 'qwen3_activation_stats.json') == mtimes['qwen3_activation_stats.json']
  assert sweep.finished(str(out_dir), 'llama')
  code, out, _ = run_cli(capsys, 'sweep', f'--configs={a},{b}', f'--output_dir={out_dir}', f'--root={root}')
  assert code == 0 and 'measured 0, skipped 2' in out, out
  assert {n: os.path.getmtime(json_dir / n) for n in names if n.startswith('qwen3')} == {
      n: t for n, t in mtimes.items() if n.startswith('qwen3')}


def test_sweep_bad_input_stops_before_running(checkpoint, ids_corpus, tmp_path, capsys):
  good = write_flags(tmp_path / 'good.flags', model_path=checkpoint('qwen3'), data_path=ids_corpus)
  twin = write_flags(tmp_path / 'twin.flags', model_path=checkpoint('qwen3'), batch_size=2)
  unknown = write_flags(tmp_path / 'unknown.flags', model_path='m', sizes=3)
  no_model = write_flags(tmp_path / 'no_model.flags', batch_size=2)
  bad_value = write_flags(tmp_path / 'bad_value.flags', model_path='m', batch_size=0)
  out_dir = tmp_path / 'out'
  capsys.readouterr()  # building the checkpoint writes progress bars
  for configs, pattern in [([f'{tmp_path}/none.flags'], 'config .*none.flags does not exist'),
                           ([good, unknown], r'unknown.flags: .*sizes'),
                           ([no_model], 'no_model.flags sets no --model_path'),
                           ([bad_value], 'bad_value.flags: --batch_size must be a positive integer'),
                           ([good, twin], 'both measure a model named qwen3'),
                           ([], 'no configs given')]:
    args = [f'--configs={",".join(configs)}'] if configs else []
    code, _, err = run_cli(capsys, 'sweep', *args, f'--output_dir={out_dir}')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), (configs, err)
  assert not out_dir.exists()
  code, _, err = run_cli(capsys, 'sweep', f'--configs={good}', '--overrides=batch_size')
  assert code == 2 and "'batch_size' is not flag=value" in err
  # The measure command's flags are left as a fresh process has them.
  assert measure_command.FLAGS['model_path'].value is None and not measure_command.FLAGS.is_parsed()


def test_paper_configs(capsys, tmp_path, monkeypatch):
  """One flagfile per paper checkpoint, as the paper ran them, all listed by sweep_paper.flags."""
  monkeypatch.chdir(REPO)
  paper = os.path.join('configs', 'paper')
  assert sorted(os.listdir(paper)) == sorted(f'{n}.flags' for n in PAPER_CHECKPOINTS)
  entries = sweep_command.plan([os.path.join(paper, f'{n}.flags') for n in PAPER_CHECKPOINTS], str(tmp_path),
                               root='/m')
  for e in entries:
    o = e.options
    assert o.model_path == f'/m/models/{e.name}'
    assert re.fullmatch(r'/m/datasets/eval_diverse_5k_[a-z0-9_.-]+\.jsonl', o.data_path)
    assert (o.max_samples, o.max_seq_len, o.dtype) == (5000, 32768, 'bfloat16')
  by_name = {e.name: e.options for e in entries}
  assert by_name['Qwen3-8B'].batch_size == 16 and by_name['gemma-2-27b'].batch_size == 1
  assert by_name['Ling-mini-20T'].data_path.endswith('_ling.jsonl')
  assert by_name['gemma-3-27b-it'].data_path.endswith('_gemma3.jsonl')
  assert by_name['gemma-2b'].data_path.endswith('_gemma2.jsonl')
  code, out, _ = run_cli(capsys, 'sweep', '--flagfile=configs/sweep_paper.flags', f'--output_dir={tmp_path}',
                         '--dry_run')
  assert code == 0
  lines = out.strip().splitlines()
  assert [l.split()[1] for l in lines] == PAPER_CHECKPOINTS
  assert all(l.startswith('measure ') for l in lines)
