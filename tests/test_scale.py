"""Scale-out: layouts on 8 devices (in a subprocess), multi-host, orbax conversion, plan, compile time.

The multi-device checks live in tests/test_parallel_devices.py and run here in
a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8, so this
session keeps its single device. Everything else runs in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from converters import orbax_io
from maxact_jax import capture, families, parallel, plan
from maxact_jax.config import read_config_json
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from tests.conftest import REAL_CONFIGS, REPO
from tests.test_cli import assert_one_error, run_cli
from tests.test_config_and_converter import edit_config, meta_model

DEVICE_TESTS = os.path.join(REPO, 'tests', 'test_parallel_devices.py')


def run_device_tests(marker: str) -> str:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-m', marker, '-p', 'no:cacheprovider', DEVICE_TESTS],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert ' skipped' not in out, out[-2000:]  # the 8 devices were there
  return out


def test_layouts_on_eight_devices_give_the_single_device_statistics():
  out = run_device_tests('not slow')
  assert re.search(r"\b8 passed\b", out), out[-2000:]


@pytest.mark.slow
def test_tensor_parallel_layout_on_eight_devices():
  out = run_device_tests('slow')
  assert re.search(r'\b1 passed\b', out), out[-2000:]


# -- layouts and their bad input ---------------------------------------------


def test_mesh_shapes_parse_and_bad_ones_are_refused():
  assert parallel.parse_mesh_shape('data=2,fsdp=2,tensor=2', 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert parallel.parse_mesh_shape('2,4', 8) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert parallel.parse_mesh_shape('fsdp=-1,tensor=2', 8) == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert parallel.parse_mesh_shape(None, 8) == {'data': 1, 'fsdp': 8, 'tensor': 1}
  for text, pattern in [('3,2', 'needs 6 devices, which does not divide the 8 devices'),
                        ('2,2', 'needs 4 devices, which uses only part of the 8 devices'),
                        ('fsdp=-1,tensor=3', '3 does not divide the 8 devices'),
                        ('data=2,expert=4', "unknown axis 'expert'"), ('2,x', 'must be integers'),
                        ('1,2,2,2', 'at most 3 sizes'), ('data=0,fsdp=8', 'must be positive')]:
    with pytest.raises(UserError, match=pattern):
      parallel.parse_mesh_shape(text, 8)


def test_param_spec_shards_matrices_and_keeps_vectors_and_the_layer_axis(checkpoint):
  config = load_config(checkpoint('qwen3'))
  sizes = {'data': 1, 'fsdp': 4, 'tensor': 2}
  spec = lambda path, shape: tuple(parallel.param_spec(config, path, shape, sizes))
  assert spec(('model', 'layers', 'self_attn', 'q_proj', 'kernel'), (3, 64, 64)) == (None, 'fsdp', 'tensor')
  assert spec(('model', 'layers', 'input_layernorm', 'weight'), (3, 64)) == (None, None)
  assert spec(('model', 'embed_tokens', 'embedding'), (256, 64)) == ('fsdp', 'tensor')
  assert spec(('lm_head', 'kernel'), (64, 256)) == ('fsdp', 'tensor')
  assert spec(('model', 'layers', 'self_attn', 'k_proj', 'kernel'), (3, 64, 30)) == (None, 'fsdp', 'tensor')
  assert spec(('model', 'layers', 'self_attn', 'k_proj', 'kernel'), (3, 62, 31)) == (None, None, None)


def test_pmap_refuses_a_tap_it_has_no_combine_rule_for(checkpoint):
  config = load_config(checkpoint('qwen3'))
  sown = {'model': {'layers': {'mlp': {'mystery_tap': ({'expert_count': jnp.zeros((3, 4), jnp.int32)},)}}}}
  with pytest.raises(ValueError, match="no rule to combine tap 'mystery_tap' across devices: register one in "
                     r'parallel.COMBINERS \(the mesh layout needs none\)'):
    parallel.combine_tree(config, sown, 'data')


def test_measure_refuses_a_mesh_shape_that_does_not_divide_the_devices(capsys, checkpoint, ids_corpus, tmp_path):
  src = checkpoint('qwen3')
  capsys.readouterr()  # building a checkpoint prints progress
  code, _, err = run_cli(capsys, 'measure', f'--model_path={src}', f'--data_path={ids_corpus}',
                         f'--output_dir={tmp_path}', '--parallelism=mesh', '--mesh_shape=data=3,fsdp=2',
                         '--progress=false')
  assert_one_error(code, err, r'--mesh_shape=data=3,fsdp=2 needs 6 devices, which does not divide the 1 devices')
  assert os.listdir(tmp_path / 'json') == []
  code, _, err = run_cli(capsys, 'measure', f'--model_path={src}', f'--data_path={ids_corpus}',
                         f'--output_dir={tmp_path}', '--parallelism=pmap', '--mesh_shape=2,2', '--progress=false')
  assert_one_error(code, err, '--mesh_shape applies to --parallelism=mesh, not pmap')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_is_a_bounded_wait_then_one_line(checkpoint, ids_corpus, tmp_path):
  port = free_port()  # nothing listens there
  t0 = time.monotonic()
  proc = subprocess.run(
      [sys.executable, '-m', 'maxact_jax.cli', 'measure', f'--model_path={checkpoint("qwen3")}',
       f'--data_path={ids_corpus}', f'--output_dir={tmp_path}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', '--process_id=1', '--initialization_timeout=2'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f'error: cannot reach the coordinator at 127.0.0.1:{port} within 2 s (Connection refused); '
      'is process 0 running and the address reachable from this host?']
  assert time.monotonic() - t0 < 60


def test_distributed_flags_are_checked_before_anything_starts():
  for args, pattern in [((None, 2, 0), 'needs --coordinator_address'),
                        (('127.0.0.1:1234', 2, 2), r'--process_id must be in \[0, 2\), got 2'),
                        (('localhost', 2, 1), 'must be host:port'),
                        ((None, None, 3), '--process_id=3 needs --num_processes')]:
    with pytest.raises(UserError, match=pattern):
      parallel.initialize_distributed(*args, timeout_s=2)
  assert parallel.initialize_distributed(None, None, None) is False


# -- convert: orbax model directories -------------------------------------------


def test_convert_round_trip_metadata_and_side_files(checkpoint, tokenizer_dir, tmp_path, capsys):
  src = str(tmp_path / 'hf')
  shutil.copytree(checkpoint('llama'), src)
  shutil.copy(os.path.join(tokenizer_dir, 'tokenizer.json'), src)
  out = tmp_path / 'orbax'
  code, printed, err = run_cli(capsys, 'convert', f'--model_path={src}', f'--output_dir={out}', '--dtype=float32')
  assert code == 0, err
  assert f'to {out} in float32' in printed
  assert sorted(os.listdir(out)) == ['config.json', 'generation_config.json', 'maxact_checkpoint.json', 'params',
                                     'tokenizer.json']
  assert not os.path.exists(str(out) + '.partial')
  meta = json.loads((out / 'maxact_checkpoint.json').read_text())
  assert meta['format'] == 'maxact-orbax' and meta['converter_version'] == orbax_io.CONVERTER_VERSION
  assert meta['model_type'] == 'llama' and meta['source']['path'] == os.path.abspath(src)
  with open(os.path.join(src, 'model.safetensors'), 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header_sha = hashlib.sha256(f.read(n)).hexdigest()
  assert meta['source']['files'] == [{'name': 'model.safetensors', 'bytes': os.path.getsize(f.name),
                                      'header_sha256': header_sha}]
  config = load_config(str(out))
  want = converters.load_params(src, config, jnp.float32)
  got = converters.load_params(str(out), config, jnp.float32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, want, got)
  # bf16 restored from the float32 orbax arrays rounds exactly as the safetensors loader does.
  want16 = converters.load_params(src, config, jnp.bfloat16)
  got16 = converters.load_params(str(out), config, jnp.bfloat16)
  assert jax.tree_util.tree_leaves(got16)[0].dtype == jnp.bfloat16
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                                    np.asarray(b, np.float32)), want16, got16)
  # Each stacked parameter is one chunk per layer (or less), so slices restore alone.
  zarray = json.loads((out / 'params' / 'model.layers.mlp.down_proj.kernel' / '.zarray').read_text())
  assert zarray['shape'] == [3, 160, 64] and zarray['chunks'] == [1, 160, 64]


def test_convert_refuses_a_used_output_dir_and_an_orbax_source(checkpoint, tmp_path, capsys):
  src = checkpoint('qwen3')
  capsys.readouterr()  # building a checkpoint prints progress
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'x').write_text('x')
  code, _, err = run_cli(capsys, 'convert', f'--model_path={src}', f'--output_dir={tmp_path}/busy')
  assert_one_error(code, err, 'exists and is not an empty directory')
  code, _, err = run_cli(capsys, 'convert', f'--model_path={src}')
  assert_one_error(code, err, '--output_dir is required')
  out = str(tmp_path / 'o')
  converters.convert(src, out, jnp.bfloat16)
  code, _, err = run_cli(capsys, 'convert', f'--model_path={out}', f'--output_dir={tmp_path}/again')
  assert_one_error(code, err, 'already a converted orbax model directory')


@pytest.fixture(scope='module')
def two_orbax_dirs(checkpoint, tmp_path_factory):
  root = tmp_path_factory.mktemp('orbax')
  out = {}
  for model_type in ('llama', 'qwen3'):
    out[model_type] = str(root / model_type)
    converters.convert(checkpoint(model_type), out[model_type], jnp.float32)
  return out


def test_orbax_dir_of_another_model_is_refused(two_orbax_dirs, ids_corpus, tmp_path, capsys):
  # config.json of another model beside the parameters.
  swapped = str(tmp_path / 'swapped_config')
  shutil.copytree(two_orbax_dirs['qwen3'], swapped)
  shutil.copy(os.path.join(two_orbax_dirs['llama'], 'config.json'), os.path.join(swapped, 'config.json'))
  code, _, err = run_cli(capsys, 'measure', f'--model_path={swapped}', f'--data_path={ids_corpus}',
                         f'--output_dir={tmp_path}/out', '--progress=false')
  assert_one_error(code, err, r'the parameters were converted from .*qwen3.* \(model_type \'qwen3\'\) for another '
                   r'config than .*config.json \(differs in: .*model_type.*\); convert this model again')
  # The same model type with another shape: the recorded config differs.
  resized = str(tmp_path / 'resized')
  shutil.copytree(two_orbax_dirs['qwen3'], resized)
  edit_config(resized, intermediate_size=128)
  with pytest.raises(UserError, match=r'for another config .*differs in: intermediate_size'):
    converters.load_params(resized, load_config(resized))
  # Parameters of another model under this model's metadata.
  swapped_params = str(tmp_path / 'swapped_params')
  shutil.copytree(two_orbax_dirs['qwen3'], swapped_params)
  shutil.rmtree(os.path.join(swapped_params, 'params'))
  shutil.copytree(os.path.join(two_orbax_dirs['llama'], 'params'), os.path.join(swapped_params, 'params'))
  with pytest.raises(UserError, match=r'parameter model/layers/self_attn/k_norm/weight is missing from the '
                     r'parameters stored in params/: not a conversion of this model'):
    converters.check_checkpoint(swapped_params, load_config(swapped_params))
  # A harmless edit (an inert field) is not a different model.
  inert = str(tmp_path / 'inert')
  shutil.copytree(two_orbax_dirs['qwen3'], inert)
  edit_config(inert, use_cache=False)
  converters.check_checkpoint(inert, load_config(inert))


def test_crosscheck_of_an_orbax_dir_runs_transformers_on_its_source(two_orbax_dirs, ids_corpus, tmp_path):
  from maxact_jax import crosscheck
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=two_orbax_dirs['llama'], data_path=ids_corpus, num_samples=4, max_seq_len=24,
      output_dir=str(tmp_path)))
  assert report['passed'] and max(r['rel_err'] for r in report['taps'].values()) < 1e-5
  moved = str(tmp_path / 'moved')
  shutil.copytree(two_orbax_dirs['llama'], moved)
  meta_path = os.path.join(moved, orbax_io.METADATA_FILE)
  meta = json.loads(open(meta_path).read())
  meta['source']['path'] = str(tmp_path / 'gone')
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  with pytest.raises(UserError, match='transformers needs its source checkpoint, recorded as .*gone, which is not'):
    crosscheck.crosscheck(crosscheck.CrosscheckOptions(model_path=moved, data_path=ids_corpus))


def test_streaming_conversion_peak_memory_is_about_one_tensor(tmp_path):
  """bench/convert_memory.py on a small checkpoint: beyond the largest tensor, a few chunks."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'convert_memory.py'), '--size_gb=0.3',
                         '--shrink=2', f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout)
  assert r['verified'] and r['layers'] == 3
  assert r['checkpoint_bytes'] > 10 * r['largest_tensor_bytes']
  # The source tensor, one chunk being cast, tensorstore's copy and its encoding, and slack.
  assert r['peak_minus_before_bytes'] < r['largest_tensor_bytes'] + 4 * orbax_io.CHUNK_BYTES + (32 << 20), r
  assert r['peak_minus_before_bytes'] < 0.5 * r['checkpoint_bytes'], r


@pytest.mark.slow
def test_streaming_conversion_of_a_checkpoint_over_2_gb(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'convert_memory.py'), '--size_gb=2.2',
                         f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout)
  assert r['checkpoint_bytes'] >= 2e9 and r['verified']
  assert r['peak_minus_before_bytes'] < 2.5 * r['largest_tensor_bytes'], r
  assert r['peak_minus_before_bytes'] < 0.15 * r['checkpoint_bytes'], r


# -- plan ------------------------------------------------------------------------

REAL = sorted(d for d in os.listdir(REAL_CONFIGS) if os.path.isfile(os.path.join(REAL_CONFIGS, d, 'config.json')))


def text_model_counts(model_dir: str) -> tuple[int, int]:
  """(total, active) parameters of the language model transformers builds on the meta device.

  Multimodal wrappers: the decoder (`get_decoder()`) plus the head; the vision
  tower is not part of what is measured. Active: routed-expert weights count
  top_k / num_experts of themselves (everything else, embeddings included,
  counts whole: gpt-oss-20b is 4.19B active here, 3.6B in its model card,
  which leaves the embeddings out).
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    model = meta_model(model_dir)
  except ValueError:  # vision-language wrappers have no causal-LM auto class
    with torch.device('meta'):
      model = transformers.AutoModelForImageTextToText.from_config(
          transformers.AutoConfig.from_pretrained(model_dir))
  decoder = model.get_decoder()
  named = dict(decoder.named_parameters())
  cfg = model.config.get_text_config()
  head = model.get_output_embeddings()
  if head.weight is not model.get_input_embeddings().weight:  # an untied head
    named.update({f'lm_head.{k}': v for k, v in head.named_parameters()})
  total = sum(p.numel() for p in named.values())
  experts = sum(p.numel() for k, p in named.items() if '.experts.' in k)
  num_experts = getattr(cfg, 'num_experts', None) or getattr(cfg, 'num_local_experts', None)
  active = total if not experts else total - experts + experts * cfg.num_experts_per_tok / num_experts
  return total, int(round(active))


@pytest.mark.parametrize('name', REAL)
def test_every_supported_real_config_plans_from_config_json_alone(name, tmp_path, capsys):
  model_type = read_config_json(os.path.join(REAL_CONFIGS, name)).get('model_type')
  if model_type not in families.PARSERS:
    pytest.skip(f'model_type {model_type!r} has no family in this tree yet')
  only_config = tmp_path / name
  only_config.mkdir()
  shutil.copy(os.path.join(REAL_CONFIGS, name, 'config.json'), only_config)
  code, out, err = run_cli(capsys, 'plan', f'--model_path={only_config}', '--num_devices=8',
                           '--device_memory_gb=80', '--max_seq_len=4096', '--json')
  assert code == 0, err
  p = json.loads(out)
  total, active = text_model_counts(os.path.join(REAL_CONFIGS, name))
  assert p['params']['total'] == total
  assert p['params']['active'] == active
  config = load_config(str(only_config))
  assert p['taps'] == capture.tap_names(config)
  assert p['taps'][0] == 'embedding_output' and p['taps'][-1] == 'final_layernorm'
  assert p['layouts']['pmap']['weights_bytes'] == total * 2
  assert p['layouts']['mesh']['weights_bytes'] < total * 2 / p['layouts']['mesh']['mesh_shape']['fsdp'] * 1.01
  assert p['choice']['parallelism'] in ('pmap', 'mesh') and p['choice']['batch_size'] >= 1


def test_plan_prints_counts_taps_layouts_and_a_choice(capsys, tmp_path):
  d = tmp_path / 'Qwen3-32B'
  d.mkdir()
  shutil.copy(os.path.join(REAL_CONFIGS, 'Qwen3-32B', 'config.json'), d)
  code, out, err = run_cli(capsys, 'plan', f'--model_path={d}', '--num_devices=8', '--device_memory_gb=80',
                           '--max_seq_len=4096')
  assert code == 0, err
  assert 'model Qwen3-32B: model_type qwen3, 64 layers, hidden 5120' in out
  assert 'parameters: 32,762,123,264 total, 32,762,123,264 active per token (61.02 GiB in bfloat16)' in out
  assert 'taps (258, in forward order' in out
  assert '  layers 0-63: attn_output, mlp_gate, mlp_output, hidden' in out
  # 61 GiB of bf16 weights plus a 4096-token row do not fit one 80 GiB device: the mesh does.
  assert re.search(r'pmap \(data=8\).*DOES NOT FIT', out)
  assert 'would choose: --parallelism=mesh --mesh_shape=data=4,fsdp=2,tensor=1' in out
  code, out, err = run_cli(capsys, 'plan', f'--model_path={d}', '--num_devices=8', '--device_memory_gb=80',
                           '--max_seq_len=1024', '--batch_size=16')
  assert 'would choose: --parallelism=pmap --batch_size=16' in out
  code, _, err = run_cli(capsys, 'plan', f'--model_path={tmp_path}/nope')
  assert_one_error(code, err, 'does not exist')


def test_choose_follows_the_memory(checkpoint):
  config = load_config(checkpoint('qwen3'))
  weights = plan.weight_bytes(config, jnp.float32, 'pmap')
  one_row = plan.activation_bytes(config, jnp.float32, 1, 64)
  roomy, _ = plan.choose(config, jnp.float32, 4, device_bytes=100 * (weights + one_row), seq=64)
  assert roomy.parallelism == 'pmap' and roomy.fits and roomy.batch_size == 4 * plan.MAX_ROWS_PER_DEVICE
  tight, layouts = plan.choose(config, jnp.float32, 4, device_bytes=int((weights / 2 + 1.2 * one_row) / 0.9), seq=64)
  assert tight.parallelism == 'mesh' and tight.mesh_shape == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert tight.fits and tight.batch_size == 4
  assert not layouts['pmap'].to_json(10**12)['fits'] or layouts['pmap'].weights == weights
  hopeless, _ = plan.choose(config, jnp.float32, 1, device_bytes=weights // 2, seq=64)
  assert not hopeless.fits and 'the weights alone do not fit' in hopeless.reason
  short, _ = plan.choose(config, jnp.float32, 1, device_bytes=int((weights + one_row) / 0.9) + 4096, seq=4096)
  assert not short.fits and re.search(r'--max_seq_len=(\d+) would', short.reason)
  longest = int(re.search(r'--max_seq_len=(\d+) would', short.reason).group(1))
  assert 64 <= longest < 4096


# -- compile time ------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_qwen3_32b_step_compiles_in_under_90_s():
  sys.path.insert(0, os.path.join(REPO, 'bench'))
  import compile_time  # pylint: disable=import-outside-toplevel
  raw = read_config_json(os.path.join(REAL_CONFIGS, 'Qwen3-32B'))
  shallow = compile_time.compile_once(raw, 4, jnp.bfloat16, 1, 2048)
  full = compile_time.compile_once(raw, None, jnp.bfloat16, 1, 2048)
  assert full['layers'] == 64
  assert full['total_s'] < 90, full
  assert full['total_s'] < 2 * shallow['total_s'] + 10, (shallow, full)  # does not grow with depth
