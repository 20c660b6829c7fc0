"""Resume after kill -9, NaN/Inf accounting, determinism, the memory guard."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maxact_jax import cli, data, fixtures, measure, runstate
from maxact_jax.errors import UserError
from tests.conftest import write_ids_corpus


def stats_of(doc: dict) -> dict:
  """Everything that must not depend on how the run went (timings excluded)."""
  return {k: v for k, v in doc.items() if k != 'run'}


def options(model_dir, data_path, out, **kw):
  return measure.MeasureOptions(model_path=model_dir, output_dir=str(out), data_path=data_path,
                                batch_size=2, dtype='float32', progress=False, **kw)


@pytest.fixture
def long_corpus(tmp_path):
  rng = np.random.RandomState(3)
  lengths = rng.randint(3, 60, 24).tolist()
  return write_ids_corpus(tmp_path / 'long.jsonl', fixtures.random_token_ids(256, lengths, seed=4))


def test_kill_minus_nine_then_resume_gives_identical_statistics(checkpoint, long_corpus, tmp_path):
  model_dir = checkpoint('qwen3')
  whole = measure.measure(options(model_dir, long_corpus, tmp_path / 'whole'))
  n_batches = whole.doc['run']['num_batches']
  out = tmp_path / 'killed'
  kill_after = random.Random(os.getpid()).randint(2, n_batches - 3)
  cmd = [sys.executable, '-m', 'maxact_jax.cli', 'measure', f'--model_path={model_dir}',
         f'--data_path={long_corpus}', f'--output_dir={out}', '--batch_size=2', '--dtype=float32',
         '--progress=false', '--checkpoint_every=1']
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  state = runstate.state_path(str(out), os.path.basename(model_dir))
  deadline = time.time() + 300
  reached = None
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(state):
      try:
        with np.load(state) as z:
          reached = json.loads(bytes(z['__meta__']).decode())['next_batch']
      except (OSError, ValueError, KeyError):
        reached = None  # never happens with atomic writes, but a read can race the rename
      if reached is not None and reached >= kill_after:
        break
    time.sleep(0.005)
  assert proc.poll() is None, f'the run ended before it could be killed: {proc.stderr.read()}'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(out / 'json' / 'qwen3_activation_stats.json')
  resumed = measure.measure(options(model_dir, long_corpus, out, resume=True, checkpoint_every=1))
  assert resumed.doc['run']['resumed_at_batch'] >= kill_after
  assert stats_of(resumed.doc) == stats_of(whole.doc)
  assert resumed.top_doc == whole.top_doc
  # The anatomy too: per-channel maxima (saved with the tap states) and the token attribution of each rule
  # (in the state's extra).
  with np.load(whole.anatomy_paths[0]) as a, np.load(resumed.anatomy_paths[0]) as b:
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a.files)
  assert json.load(open(whole.anatomy_paths[1])) == json.load(open(resumed.anatomy_paths[1]))
  assert set(whole.acc.attributions) == {'layer_median', 'token_median'}
  for rule, attribution in whole.acc.attributions.items():
    assert resumed.acc.attributions[rule].state() == attribution.state(), rule
  assert not os.path.exists(state)  # a finished run leaves nothing to resume


def test_resume_refuses_other_flags_or_checkpoint(checkpoint, long_corpus, tmp_path):
  model_dir = checkpoint('qwen3')
  m = measure.measure(options(model_dir, long_corpus, tmp_path))
  path = runstate.state_path(str(tmp_path), 'qwen3')
  fp = runstate.fingerprint(model_path=model_dir, samples=m.corpus.samples, options={'batch_size': 2})
  runstate.save(path, fingerprint_=fp, next_batch=1, taps=m.acc.taps, extra={'tokens': 10})
  with pytest.raises(UserError, match='made with a different data_path, dtype, max_samples, max_seq_len, max_shapes, shape_cost_tokens;'):
    measure.measure(options(model_dir, long_corpus, tmp_path, resume=True))
  # A state saved with exactly these flags, then another checkpoint of the same name.
  fp = runstate.fingerprint(model_path=model_dir, samples=m.corpus.samples, options={
      'batch_size': 2, 'max_seq_len': 32768, 'max_samples': 2000, 'dtype': 'float32', 'max_shapes': 8,
      'shape_cost_tokens': data.SHAPE_COST_TOKENS, 'data_path': long_corpus})
  runstate.save(path, fingerprint_=fp, next_batch=1, taps=m.acc.taps, extra={'tokens': 10})
  import shutil
  impostor = tmp_path / 'elsewhere' / 'qwen3'
  shutil.copytree(checkpoint('qwen3', name='qwen3-other', num_hidden_layers=2), impostor)
  with pytest.raises(UserError, match='made with a different checkpoint;'):
    measure.measure(options(str(impostor), long_corpus, tmp_path, resume=True))
  with pytest.raises(UserError, match='no saved state'):
    measure.measure(options(checkpoint('llama'), long_corpus, tmp_path, resume=True))


def test_state_round_trip_is_exact(checkpoint, long_corpus, tmp_path):
  m = measure.measure(options(checkpoint('qwen3'), long_corpus, tmp_path))
  path = str(tmp_path / 'state.npz')
  fp = {'format': 1, 'x': 'y'}
  runstate.save(path, fingerprint_=fp, next_batch=7, taps=m.acc.taps, extra={'tokens': 5})
  start, taps, extra = runstate.load(path, fp)
  assert (start, extra) == (7, {'tokens': 5})
  for name, tap in m.acc.taps.items():
    assert taps[name].finalize() == tap.finalize()
    assert taps[name].locations() == tap.locations()


def test_two_runs_are_identical(checkpoint, long_corpus, tmp_path):
  a = measure.measure(options(checkpoint('llama'), long_corpus, tmp_path / 'a'))
  b = measure.measure(options(checkpoint('llama'), long_corpus, tmp_path / 'b'))
  assert stats_of(a.doc) == stats_of(b.doc) and a.top_doc == b.top_doc


def test_planted_nan_and_inf_are_counted_and_flagged(checkpoint, tmp_path, capsys):
  import shutil
  from converters import safetensors_io
  model_dir = str(tmp_path / 'poisoned')
  shutil.copytree(checkpoint('llama'), model_dir)
  ckpt = safetensors_io.Checkpoint(model_dir)
  tensors = {k: np.array(ckpt.read(k)) for k in ckpt.keys()}
  ckpt.close()
  emb = tensors['model.embed_tokens.weight']
  emb[7, 3] = np.inf  # token 7 overflows in one channel
  emb[9, 0] = np.nan  # token 9 carries a NaN
  safetensors_io.write_safetensors(os.path.join(model_dir, 'model.safetensors'), tensors)
  corpus = write_ids_corpus(tmp_path / 'c.jsonl', [[1, 7, 2, 9, 3], [4, 5, 6]])
  code = cli.main(['maxact-jax', 'measure', f'--model_path={model_dir}', f'--data_path={corpus}',
                   f'--output_dir={tmp_path / "out"}', '--dtype=float32', '--progress=false'])
  out = capsys.readouterr().out
  assert code == 0
  doc = json.loads((tmp_path / 'out' / 'json' / 'poisoned_activation_stats.json').read_text())
  emb_stats = doc['per_layer_stats']['embedding_output']
  assert emb_stats['nan_count'] == 1 and emb_stats['posinf_count'] == 1
  assert emb_stats['max'] == float('inf')  # the overflow is the maximum, not hidden
  assert doc['nonfinite']['embedding_output'] == {'nan': 1, 'posinf': 1, 'neginf': 0}
  assert np.isfinite(emb_stats['mean'])  # moments over finite values
  assert 'layer_0_hidden' in doc['nonfinite']  # NaN propagates through the layers, counted
  assert 'WARNING non-finite values' in out


def test_memory_guard_refuses_what_cannot_fit(checkpoint, long_corpus, tmp_path, capsys):
  checkpoint('qwen3')
  capsys.readouterr()
  code = cli.main(['maxact-jax', 'measure', f'--model_path={checkpoint("qwen3")}', f'--data_path={long_corpus}',
                   f'--output_dir={tmp_path}', '--batch_size=8', '--progress=false', '--device_memory_gb=0.003'])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.startswith('error: a batch of shape (8, ') and 'of device memory, more than the 0.003 GB' in err
  assert not os.path.exists(tmp_path / 'json' / 'qwen3_activation_stats.json')
  rows = int(err.split('try --batch_size=')[1])
  assert 1 <= rows < 8
  # The suggestion fits: the same run with that batch size passes the guard and completes.
  code = cli.main(['maxact-jax', 'measure', f'--model_path={checkpoint("qwen3")}', f'--data_path={long_corpus}',
                   f'--output_dir={tmp_path}', f'--batch_size={rows}', '--progress=false',
                   '--device_memory_gb=0.003'])
  assert code == 0, capsys.readouterr().err
  # Parameters that cannot fit at all get the other advice.
  code = cli.main(['maxact-jax', 'measure', f'--model_path={checkpoint("qwen3")}', f'--data_path={long_corpus}',
                   f'--output_dir={tmp_path}', '--progress=false', '--device_memory_gb=0.0001'])
  assert code == 2 and 'the parameters alone do not fit' in capsys.readouterr().err
