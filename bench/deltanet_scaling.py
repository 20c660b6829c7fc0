"""How the Gated DeltaNet layer's time grows with sequence length (it should be linear).

One `linear_attn` layer (projections, causal conv, chunked gated delta rule, gated
norm, output projection) is jitted once per length and timed on random input;
compilation is excluded. Printed per length: the median time, the time per
token, and per-token time relative to the shortest length; then the slope of
log(time) against log(length), which is 1 for linear growth and 2 for
quadratic. The default shapes are small enough for a laptop CPU; pass
`--config` with a checkpoint's config.json to time its real linear-attention
shapes (e.g. configs/real/Qwen3.5-9B on an accelerator).

  python bench/deltanet_scaling.py [--config=configs/real/Qwen3.5-9B/config.json] [--lengths=512,...,8192]
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxact_jax.config import LinearAttentionConfig, ModelConfig, RopeConfig  # noqa: E402
from maxact_jax.families import load_config  # noqa: E402
from maxact_jax.models import deltanet  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'checkpoint directory or config.json whose linear-attention shapes to use')
flags.DEFINE_list('lengths', ['512', '1024', '2048', '4096', '8192'], 'sequence lengths')
flags.DEFINE_integer('batch_size', 1, 'rows per call')
flags.DEFINE_integer('repeats', 5, 'timed calls per length (the median is reported)')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'model dtype (the kernel is float32 always)')
flags.DEFINE_string('output', 'runs/bench/deltanet_scaling.json', 'where to write the results (JSON)')

# Small default shapes: Qwen3.5's layout (value heads = 2 x key heads) at 1/8 of its width.
SMALL = ModelConfig(
    model_type='qwen3_5_text', vocab_size=16, hidden_size=512, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, intermediate_size=0, rms_norm_eps=1e-6,
    rope=RopeConfig(theta=1e7, partial_rotary_factor=0.25), layer_types=('linear_attention',),
    linear_attention=LinearAttentionConfig(num_key_heads=4, num_value_heads=8, key_head_dim=64,
                                           value_head_dim=64, conv_kernel_dim=4))


def model_config() -> ModelConfig:
  if not FLAGS.config:
    return SMALL
  path = FLAGS.config[:-len('config.json')] if FLAGS.config.endswith('config.json') else FLAGS.config
  return load_config(path.rstrip('/') or '.')


def time_length(layer, params, config: ModelConfig, length: int, dtype) -> dict:
  b = FLAGS.batch_size
  x = jax.random.normal(jax.random.PRNGKey(length), (b, length, config.hidden_size), dtype)
  valid = jnp.ones((b, length), bool)
  fn = jax.jit(layer.apply)
  t0 = time.perf_counter()
  fn(params, x, valid).block_until_ready()  # compile + first run
  compile_s = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(FLAGS.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn(params, x, valid).block_until_ready()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  median = float(np.median(times))
  # Process CPU time (all threads): the work done, much less sensitive than wall time to
  # other processes sharing the machine.
  cpu_median = float(np.median(cpu))
  return {'length': length, 'median_s': median, 'per_token_us': 1e6 * median / (b * length),
          'min_s': float(min(times)), 'cpu_s': cpu_median, 'cpu_per_token_us': 1e6 * cpu_median / (b * length),
          'first_call_s': compile_s}


def main(argv):
  del argv
  config = model_config()
  dtype = jnp.dtype(FLAGS.dtype)
  lengths = sorted(int(n) for n in FLAGS.lengths)
  layer = deltanet.GatedDeltaNet(config, dtype)
  la = config.linear_attention
  params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, config.hidden_size), dtype), jnp.ones((1, 8), bool))
  print(f'Gated DeltaNet layer: hidden {config.hidden_size}, {la.num_key_heads} key / {la.num_value_heads} value '
        f'heads of {la.key_head_dim} / {la.value_head_dim}, chunk {deltanet.CHUNK_SIZE}, batch {FLAGS.batch_size}, '
        f'{FLAGS.dtype}, {jax.devices()[0].platform}')
  rows = []
  print(f'{"tokens":>7} {"median s":>10} {"us/token":>10} {"vs first":>9} {"exponent":>9} {"cpu us/token":>13}')
  for n in lengths:
    row = time_length(layer, params, config, n, dtype)
    row['per_token_vs_first'] = row['per_token_us'] / (rows[0]['per_token_us'] if rows else row['per_token_us'])
    # Local growth exponent from the previous length: 1 where time is linear in length.
    row['exponent'] = (float(np.log(row['median_s'] / rows[-1]['median_s']) / np.log(n / rows[-1]['length']))
                       if rows else None)
    rows.append(row)
    exponent = f'{row["exponent"]:>9.2f}' if row['exponent'] is not None else f'{"":>9}'
    print(f'{n:>7} {row["median_s"]:>10.4f} {row["per_token_us"]:>10.2f} {row["per_token_vs_first"]:>9.2f} '
          f'{exponent} {row["cpu_per_token_us"]:>13.2f}')
  slope = float(np.polyfit(np.log(lengths), np.log([r['median_s'] for r in rows]), 1)[0])
  cpu_slope = float(np.polyfit(np.log(lengths), np.log([max(r['cpu_s'], 1e-9) for r in rows]), 1)[0])
  print(f'log-log slope vs length (1 = linear, 2 = quadratic): wall time {slope:.3f}, CPU time {cpu_slope:.3f}')
  out = {'config': FLAGS.config or 'small default', 'batch_size': FLAGS.batch_size, 'dtype': FLAGS.dtype,
         'platform': jax.devices()[0].platform, 'chunk_size': deltanet.CHUNK_SIZE, 'rows': rows,
         'loglog_slope': slope, 'loglog_slope_cpu': cpu_slope}
  if FLAGS.output:
    os.makedirs(os.path.dirname(FLAGS.output) or '.', exist_ok=True)
    with open(FLAGS.output, 'w') as f:
      json.dump(out, f, indent=2)
    print(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
