"""Peak host memory of `maxact-jax convert` on a synthetic checkpoint larger than 2 GB.

Writes a Qwen3-shaped checkpoint (Qwen3-8B's layer shapes, fewer layers and a
smaller vocabulary, bf16, sharded with an index like a real download) in a
temporary directory, streaming one tensor at a time
(`safetensors_io.write_safetensors` with `LazyTensor`s), then converts it to
an orbax model directory in a fresh subprocess and reports that process's peak
resident set size (VmHWM, reset after the imports) against its RSS before converting,
the checkpoint size and its largest tensor. Finally one converted layer is read
back and compared with its source tensor.

  python bench/convert_memory.py [--size_gb=2.2] [--shrink=1] [--compare_load] [--workdir=DIR] [--keep]

Prints one JSON object. The test suite runs it small (tests/test_scale.py) and
at full size when slow tests are selected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from converters import safetensors_io  # pylint: disable=wrong-import-position

BASE_CONFIG = {  # Qwen3-8B's layer shapes (configs/real/Qwen3-8B/config.json)
    'architectures': ['Qwen3ForCausalLM'], 'model_type': 'qwen3', 'attention_bias': False, 'head_dim': 128,
    'hidden_act': 'silu', 'hidden_size': 4096, 'intermediate_size': 12288, 'max_position_embeddings': 40960,
    'max_window_layers': 36, 'num_attention_heads': 32, 'num_key_value_heads': 8, 'rms_norm_eps': 1e-06,
    'rope_scaling': None, 'rope_theta': 1000000, 'sliding_window': None, 'tie_word_embeddings': False,
    'torch_dtype': 'bfloat16', 'use_sliding_window': False, 'vocab_size': 16384,
}
SHARD_BYTES = 1 << 30


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  d, i, hd = cfg['hidden_size'], cfg['intermediate_size'], cfg['head_dim']
  q, kv = cfg['num_attention_heads'] * hd, cfg['num_key_value_heads'] * hd
  shapes = {'model.embed_tokens.weight': (cfg['vocab_size'], d)}
  for n in range(cfg['num_hidden_layers']):
    p = f'model.layers.{n}.'
    shapes.update({
        p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,),
        p + 'self_attn.q_proj.weight': (q, d), p + 'self_attn.k_proj.weight': (kv, d),
        p + 'self_attn.v_proj.weight': (kv, d), p + 'self_attn.o_proj.weight': (d, q),
        p + 'self_attn.q_norm.weight': (hd,), p + 'self_attn.k_norm.weight': (hd,),
        p + 'mlp.gate_proj.weight': (i, d), p + 'mlp.up_proj.weight': (i, d), p + 'mlp.down_proj.weight': (d, i),
    })
  shapes['model.norm.weight'] = (d,)
  shapes['lm_head.weight'] = (cfg['vocab_size'], d)
  return shapes


def make(shape: tuple[int, ...], seed: int):
  """A deterministic bf16 tensor, made only when written: random sign and mantissa
  bits under a fixed exponent, so |x| lies in [2^-7, 2^-6) (fast to make, finite)."""

  def build():
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits &= 0x807F  # sign and mantissa
    bits |= 120 << 7  # exponent 2^-7
    return bits.view(ml_dtypes.bfloat16)

  return safetensors_io.LazyTensor(shape, ml_dtypes.bfloat16, build)


def write_checkpoint(out: str, size_gb: float, shrink: int = 1) -> dict:
  base = dict(BASE_CONFIG)
  for key in ('hidden_size', 'intermediate_size', 'num_attention_heads', 'num_key_value_heads', 'vocab_size'):
    base[key] //= shrink
  per_layer = sum(np.prod(s) for k, s in tensor_shapes({**base, 'num_hidden_layers': 1}).items()
                  if '.layers.' in k) * 2
  fixed = 2 * base['vocab_size'] * base['hidden_size'] * 2
  layers = max(1, int(np.ceil((size_gb * 1e9 - fixed) / per_layer)))
  cfg = {**base, 'num_hidden_layers': layers}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2)
  shapes = tensor_shapes(cfg)
  shards, cur, size = [], {}, 0
  for seed, (key, shape) in enumerate(shapes.items()):
    t = make(shape, seed)
    if cur and size + t.nbytes > SHARD_BYTES:
      shards.append(cur)
      cur, size = {}, 0
    cur[key] = t
    size += t.nbytes
  shards.append(cur)
  weight_map = {}
  for n, shard in enumerate(shards):
    name = f'model-{n + 1:05d}-of-{len(shards):05d}.safetensors'
    safetensors_io.write_safetensors(os.path.join(out, name), shard)
    weight_map.update({k: name for k in shard})
  total = sum(int(np.prod(s)) * 2 for s in shapes.values())
  with open(os.path.join(out, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  largest = max(int(np.prod(s)) * 2 for s in shapes.values())
  return {'layers': layers, 'tensors': len(shapes), 'shards': len(shards), 'checkpoint_bytes': total,
          'largest_tensor_bytes': largest}


CHILD = r'''
import json, sys, time
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp
import orbax.checkpoint, tensorstore  # noqa: F401  (imported before the baseline)
import converters
jax.devices()  # the runtime starts before the baseline too (orbax asks it for the process index)

def status(field):  # kB figures of /proc/self/status, in bytes
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))

before = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
  f.write('5')  # reset the peak (VmHWM) to the current RSS: imports' transients do not count
t0 = time.perf_counter()
if {dst!r}:
  converters.convert({src!r}, {dst!r}, jnp.bfloat16)
else:  # the in-memory loader measure uses, for comparison
  from maxact_jax.families import load_config
  params = converters.load_params({src!r}, load_config({src!r}), jnp.bfloat16)
print(json.dumps({{'rss_before_bytes': before, 'peak_rss_bytes': status('VmHWM'),
                  'convert_s': time.perf_counter() - t0}}))
'''


def verify(src: str, dst: str, layer: int) -> bool:
  """One layer's down_proj read back through tensorstore equals the source tensor, transposed."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  ckpt = safetensors_io.Checkpoint(src)
  want = np.asarray(ckpt.read_copy(f'model.layers.{layer}.mlp.down_proj.weight')).T
  arr = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                               'path': os.path.join(dst, 'params', 'model.layers.mlp.down_proj.kernel')}}).result()
  return bool(np.array_equal(arr[layer].read().result(), want))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size_gb', type=float, default=2.2)
  ap.add_argument('--workdir', default=None)
  ap.add_argument('--keep', action='store_true')
  ap.add_argument('--compare_load', action='store_true',
                  help='also measure converters.load_params (everything in host memory) on the same checkpoint')
  ap.add_argument('--shrink', type=int, default=1, help='divide the hidden, MLP, head and vocabulary sizes by this')
  args = ap.parse_args()
  work = args.workdir or tempfile.mkdtemp(prefix='maxact-convert-bench-')
  src, dst = os.path.join(work, 'hf'), os.path.join(work, 'orbax')
  try:
    t0 = time.perf_counter()
    info = write_checkpoint(src, args.size_gb, args.shrink)
    info['write_s'] = round(time.perf_counter() - t0, 1)
    child = subprocess.run([sys.executable, '-c', CHILD.format(repo=REPO, src=src, dst=dst)],
                           capture_output=True, text=True, check=False)
    if child.returncode:
      sys.exit(f'convert failed:\n{child.stderr[-3000:]}')
    result = json.loads(child.stdout.strip().splitlines()[-1])
    info.update(result)
    info['peak_minus_before_bytes'] = result['peak_rss_bytes'] - result['rss_before_bytes']
    info['peak_over_largest_tensor'] = round(info['peak_minus_before_bytes'] / info['largest_tensor_bytes'], 2)
    info['peak_over_checkpoint'] = round(info['peak_minus_before_bytes'] / info['checkpoint_bytes'], 3)
    info['orbax_bytes'] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    info['verified'] = verify(src, dst, info['layers'] - 1)
    if args.compare_load:
      child = subprocess.run([sys.executable, '-c', CHILD.format(repo=REPO, src=src, dst='')],
                             capture_output=True, text=True, check=False)
      if child.returncode:
        sys.exit(f'load failed:\n{child.stderr[-3000:]}')
      loaded = json.loads(child.stdout.strip().splitlines()[-1])
      info['load_params_peak_minus_before_bytes'] = loaded['peak_rss_bytes'] - loaded['rss_before_bytes']
    info['convert_s'] = round(info['convert_s'], 1)
    print(json.dumps(info, indent=2))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
