"""bench/device_check.py (`make device-check`): the one command a machine with an accelerator runs.

Here on the CPU: its pieces (a step whose packages are missing is reported and
skipped, a step over its time is killed and recorded, the summary), and, marked
slow, the whole script at `--small` shapes, as `make device-check SMALL=1` runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, 'bench', 'device_check.py')


@pytest.fixture(scope='module')
def device_check():
  # A script outside the packages (it must run with nothing installed): loaded from its file.
  spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_step_over_its_time_is_killed_and_recorded(device_check, tmp_path):
  log = tmp_path / 'slow.log'
  r = device_check.run_process([sys.executable, '-c', 'import time; print("started", flush=True); time.sleep(60)'],
                               str(log), 2, dict(os.environ))
  assert r['status'] == 'timed out after 2 s' and r['seconds'] < 30
  assert 'started' in log.read_text()


def test_missing_packages_are_named_and_the_step_is_not_run(device_check, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(device_check.STEP_PACKAGES, 'measure', ('no_such_package_for_device_check',))
  code = device_check.main([f'--output_dir={tmp_path}', '--small', '--only=env,measure'])
  assert code == 1  # not everything ran
  doc = json.loads((tmp_path / 'device_check.json').read_text())
  assert doc['steps']['env']['status'] == 'ok'
  assert doc['steps']['env']['detail'].startswith('1 x cpu (cpu)')
  assert doc['steps']['measure'] == {'status': 'not run',
                                     'detail': 'missing package(s): no_such_package_for_device_check'}
  env = json.loads((tmp_path / 'env.json').read_text())
  assert env['backend'] == 'cpu' and env['versions']['jax'][0].isdigit()
  summary = (tmp_path / 'summary.md').read_text()
  assert '| measure | not run |' in summary and 'no_such_package_for_device_check' in summary
  assert summary in capsys.readouterr().out


def test_unknown_steps_are_refused(device_check, tmp_path):
  with pytest.raises(SystemExit) as e:
    device_check.main([f'--output_dir={tmp_path}', '--only=env,qwen4'])
  assert e.value.code == 2


@pytest.mark.slow
def test_small_device_check_passes_on_the_cpu(tmp_path):
  """Every step at CPU shapes, as `make device-check SMALL=1` runs it: from the source
  tree (the repository on PYTHONPATH, no console script)."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, SCRIPT, f'--output_dir={tmp_path}', '--small'], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads((tmp_path / 'device_check.json').read_text())
  assert list(doc['steps']) == ['env', 'parity', 'measure', 'qwen3-8b', 'qwen3-32b', 'qwen3-30b-a3b']
  assert all(r['status'] == 'ok' for r in doc['steps'].values()), doc
  assert 'passed' in doc['steps']['parity']['detail']
  for step, layers in (('qwen3-8b', 36), ('qwen3-32b', 64), ('qwen3-30b-a3b', 48)):
    b = doc['steps'][step]['bench']
    assert (b['num_layers'], b['config_layers'], b['seq_len'], b['dtype']) == (1, layers, 256, 'bfloat16')
    assert b['mfu'] > 0 and b['step_memory_bytes'] > 0
  assert doc['steps']['qwen3-30b-a3b']['bench']['moe_dispatch'] == 'tiled'  # the CPU's; ragged_dot on GPU/TPU
  assert (tmp_path / 'summary.md').read_text().count('| ok |') == 6
