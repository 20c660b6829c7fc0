"""pmap, mesh, orbax restore and two processes give the single device's statistics.

Needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 set before
JAX starts. tests/test_scale.py runs this module in such a subprocess; in the
ordinary 1-device session it is skipped.

Every layout runs the same rows per device as the single-device baseline
(batch 2 there; 2 rows on each device here) and one padded length
(max_shapes=1): XLA:CPU chooses matmul kernels by shape, so equal shapes give
equal float32 arithmetic and the statistics must agree bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maxact_jax import fixtures, measure, parallel, plan, stats
from maxact_jax.families import load_config
from tests.conftest import REPO, write_ids_corpus

DEVICES = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason=f'needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}); '
    'tests/test_scale.py runs this module in a subprocess that has them')

LENGTHS = [5, 17, 9, 33, 12, 3, 21, 8, 40, 16, 11, 27]
SCALE_FIELDS = ('mean', 'std', 'abs_mean', 'rms', 'sun_mean_ratio', 'sun_std_ratio')


def assert_same_statistics(a: dict, a_top: dict, b: dict, b_top: dict, rel: float = 1e-5,
                           exact_extremes: bool = True, n_taps: int | None = 2 + 4 * 3) -> None:
  """max/min/top-K/counts/histogram quantiles and every location identical; sums within `rel`."""
  assert set(a['per_layer_stats']) == set(b['per_layer_stats'])
  assert n_taps is None or len(a['per_layer_stats']) == n_taps
  for tap, sa in a['per_layer_stats'].items():
    sb = b['per_layer_stats'][tap]
    assert set(sa) == set(sb), tap
    for field, va in sa.items():
      vb = sb[field]
      if field in SCALE_FIELDS or not exact_extremes:
        # A mean near zero is a cancellation: measure it against the tap's rms.
        scale = max(abs(va), sa['rms'] if field == 'mean' else 0.0, 1e-30)
        assert abs(va - vb) <= rel * scale, (tap, field, va, vb)
      else:
        assert va == vb, (tap, field, va, vb)
    if tap not in a_top['per_layer_stats']:  # taps without top-K (gates)
      assert tap not in b_top['per_layer_stats']
    elif exact_extremes:
      assert a_top['per_layer_stats'][tap] == b_top['per_layer_stats'][tap], tap
    else:
      for field in ('topk_abs', 'topk_signed'):
        np.testing.assert_allclose(b_top['per_layer_stats'][tap][field], a_top['per_layer_stats'][tap][field],
                                   rtol=rel, err_msg=f'{tap}.{field}')
  assert a['extremes'] == b['extremes']
  assert a['global_max_activation'] == b['global_max_activation'] or not exact_extremes
  assert a['global_max_location'] == b['global_max_location']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
  return write_ids_corpus(tmp_path_factory.mktemp('corpus') / 'ids.jsonl', fixtures.random_token_ids(256, LENGTHS, seed=1))


@pytest.fixture(scope='module')
def runner(checkpoint, corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  done: dict = {}

  def run(name: str, parallelism: str, batch_size: int, mesh_shape: str | None = None, model_path: str | None = None):
    if name not in done:
      m = measure.measure(measure.MeasureOptions(
          model_path=model_path or checkpoint('qwen3'), output_dir=str(root / name), data_path=corpus,
          batch_size=batch_size, dtype='float32', max_shapes=1, progress=False, parallelism=parallelism,
          mesh_shape=mesh_shape))
      done[name] = m
    return done[name]

  return run


@pytest.fixture(scope='module')
def baseline(runner):
  m = runner('none', 'none', 2)
  assert m.doc['run']['layout'] == 'none (one device)'
  return m


def test_pmap_gives_the_single_device_statistics(runner, baseline):
  m = runner('pmap', 'pmap', 16)
  assert m.doc['run']['mesh_shape'] == {'data': 8}
  assert_same_statistics(baseline.doc, baseline.top_doc, m.doc, m.top_doc)


def test_mesh_gives_the_single_device_statistics(runner, baseline, checkpoint):
  m = runner('mesh', 'mesh', 16, 'data=2,fsdp=4')
  assert m.doc['run']['mesh_shape'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert_same_statistics(baseline.doc, baseline.top_doc, m.doc, m.top_doc)
  # The weights really are split: a quarter of each matrix per device.
  config = load_config(checkpoint('qwen3'))
  step = parallel.make_step(config, jnp.float32, parallel.make_layout('mesh', 'data=2,fsdp=4'))
  down = step.sharding(('model', 'layers', 'mlp', 'down_proj', 'kernel'), (3, 160, 64))
  assert down.spec == P(None, 'fsdp', None)
  assert down.shard_shape((3, 160, 64)) == (3, 40, 64)
  full = plan.weight_bytes(config, jnp.float32, 'pmap')
  assert plan.weight_bytes(config, jnp.float32, 'mesh', {'data': 2, 'fsdp': 4, 'tensor': 1}) < full / 3


@pytest.mark.slow
def test_mesh_with_a_tensor_axis_agrees_to_float32_rounding(runner, baseline):
  # Splitting matmuls by columns changes their shapes per device: equal to an ulp or so.
  m = runner('tensor', 'mesh', 8, 'data=2,fsdp=2,tensor=2')
  assert_same_statistics(baseline.doc, baseline.top_doc, m.doc, m.top_doc, rel=1e-5, exact_extremes=False)


def test_auto_picks_pmap_when_the_model_fits_one_device(checkpoint):
  config = load_config(checkpoint('qwen3'))
  layout = plan.resolve_layout('auto', None, config, jnp.float32, 16, 40)
  assert layout.kind == 'pmap' and layout.num_devices == DEVICES
  assert 'fit one device' in layout.reason
  small = plan.choose(config, jnp.float32, DEVICES, device_bytes=plan.weight_bytes(config, jnp.float32, 'pmap'),
                      seq=40)[0]
  assert small.parallelism == 'mesh' and small.mesh_shape['fsdp'] > 1
  assert 'do not fit one device' in small.reason


@pytest.fixture(scope='module')
def orbax_dir(checkpoint, tmp_path_factory) -> str:
  import converters
  out = str(tmp_path_factory.mktemp('orbax') / 'qwen3')
  converters.convert(checkpoint('qwen3'), out, jnp.float32)
  return out


def test_orbax_round_trip_restores_into_each_layout(runner, baseline, orbax_dir):
  for name, parallelism, batch, shape in [('orbax-none', 'none', 2, None), ('orbax-pmap', 'pmap', 16, None),
                                          ('orbax-mesh', 'mesh', 16, 'data=2,fsdp=4')]:
    m = runner(name, parallelism, batch, shape, model_path=orbax_dir)
    assert_same_statistics(baseline.doc, baseline.top_doc, m.doc, m.top_doc)


def test_combine_across_devices_equals_one_device_with_ties_and_nans():
  rng = np.random.RandomState(0)
  x = rng.standard_normal((8, 6, 16)).astype(np.float32)
  x[1, 2, 3] = x[5, 0, 7] = 9.0  # the max tied on two devices: the smaller row wins
  x[6, 1, :] = -9.0  # the min tied across a whole token
  x[3, 4, 2] = np.nan
  x[2, :] = x[4, :]  # identical rows: every statistic tied between devices
  valid = np.ones((8, 6), bool)
  valid[7, 3:] = False
  mesh = parallel.make_layout('pmap').mesh
  single = jax.jit(lambda a, v: stats.tap_partial(a, v, full=True, top_k=20))(x, valid)

  def per_device(a, v):
    return stats.combine_across(stats.tap_partial(a, v, full=True, top_k=20), 'data', top_k=20)

  combined = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P(),
                                   check_vma=False))(x, valid)
  assert set(combined) == set(single)
  for k in single:
    np.testing.assert_array_equal(np.asarray(combined[k]), np.asarray(single[k]), err_msg=k)
  assert tuple(np.asarray(combined['max_at'])) == (1, 2, 3)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(model_path: str, corpus: str, out, *flags: str) -> tuple[dict, dict]:
  """`maxact-jax measure` as two processes on 127.0.0.1 with 2 devices each; (doc, top doc)."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', PYTHONPATH=REPO)
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'maxact_jax.cli', 'measure', f'--model_path={model_path}', f'--data_path={corpus}',
       f'--output_dir={out}', '--dtype=float32', '--batch_size=8', '--max_shapes=1', '--progress=false',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
       '--initialization_timeout=120', *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, text in zip(procs, outs):
    assert p.returncode == 0, text[-3000:]
  assert 'results:' in outs[0] and 'results:' not in outs[1]  # process 0 writes, once
  name = os.path.basename(model_path)
  assert sorted(os.listdir(out / 'json')) == [f'{name}_activation_stats.json', f'{name}_anatomy.json',
                                              f'{name}_channel_absmax.npz', f'{name}_top5_stats.json']
  return (json.loads((out / 'json' / f'{name}_activation_stats.json').read_text()),
          json.loads((out / 'json' / f'{name}_top5_stats.json').read_text()))


def test_two_processes_pmap_write_the_single_device_statistics(baseline, checkpoint, corpus, tmp_path):
  # Collectives cross the processes; each feeds the rows of its own devices.
  doc, top = run_two_processes(checkpoint('qwen3'), corpus, tmp_path, '--parallelism=pmap')
  assert doc['run']['num_processes'] == 2 and doc['run']['mesh_shape'] == {'data': 4}
  assert_same_statistics(baseline.doc, baseline.top_doc, doc, top)


def test_two_processes_restore_orbax_into_a_global_mesh(baseline, orbax_dir, corpus, tmp_path):
  # Each process restores only its shards of the fsdp-sharded weights.
  doc, top = run_two_processes(orbax_dir, corpus, tmp_path, '--parallelism=mesh', '--mesh_shape=data=2,fsdp=2')
  assert doc['run']['num_processes'] == 2 and doc['run']['mesh_shape'] == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert_same_statistics(baseline.doc, baseline.top_doc, doc, top)


def test_pmap_moe_gives_the_single_device_statistics(moe_checkpoint, corpus, tmp_path):
  # The MoE block's routing statistics (a structured tap) cross devices with their own rule.
  model_dir = moe_checkpoint('qwen3_moe')
  runs = {}
  for parallelism, batch in (('none', 2), ('pmap', 16)):
    runs[parallelism] = measure.measure(measure.MeasureOptions(
        model_path=model_dir, output_dir=str(tmp_path / parallelism), data_path=corpus, batch_size=batch,
        dtype='float32', max_shapes=1, progress=False, parallelism=parallelism))
  one, many = runs['none'], runs['pmap']
  assert any(name.endswith('_router_logits') for name in one.doc['per_layer_stats'])
  assert_same_statistics(one.doc, one.top_doc, many.doc, many.top_doc, n_taps=None)
  assert one.doc['moe']

  def same(a, b, where):  # integers and locations exact, float sums to float32 rounding
    if isinstance(a, dict):
      assert set(a) == set(b), where
      for k in a:
        same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, list):
      assert len(a) == len(b), where
      for i, (x, y) in enumerate(zip(a, b)):
        same(x, y, f'{where}[{i}]')
    elif isinstance(a, float):
      assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
      assert a == b, where

  same(one.doc['moe'], many.doc['moe'], 'moe')
