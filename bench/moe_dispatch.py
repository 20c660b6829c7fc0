"""Benchmark: the MoE layer against the dense MLP with the same active FLOPs.

The MoE block of maxact_jax/models/moe.py (router, sort by expert, grouped expert
FFNs, combine) with E experts and top-K routing runs N tokens; the dense
equivalent is one SwiGLU MLP of width K * moe_intermediate_size on the same N
tokens: the same matmul FLOPs as the routed experts. The issue's bar: with 64
experts and top-4, the MoE layer within 2x of the dense one.

  PYTHONPATH=. python bench/moe_dispatch.py [--tokens=2048,8192] [--dispatch=tiled]

Prints a table and writes runs/bench/moe_dispatch.json. After a warm-up
(compilation excluded) the two layers run alternately --repeats times; reported
are each one's minimum time and the median of the paired ratios, so that a
machine shared with other work slows both sides alike.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_list('tokens', ['2048', '8192'], 'Token counts N (batch * sequence) to time.')
flags.DEFINE_integer('hidden', 1024, 'Hidden size D.')
flags.DEFINE_integer('experts', 64, 'Experts E.')
flags.DEFINE_integer('top_k', 4, 'Experts per token K.')
flags.DEFINE_integer('moe_intermediate', 512, 'Expert width I (the dense equivalent has width K * I).')
flags.DEFINE_integer('repeats', 7, 'Timed runs per point (the minimum is reported).')
flags.DEFINE_string('dispatch', None, 'Force a dispatch implementation: tiled or ragged (default: by backend).')
flags.DEFINE_string('dtype', 'float32', 'float32 or bfloat16.')
flags.DEFINE_string('output', 'runs/bench/moe_dispatch.json', 'Where the JSON results go.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.dispatch:
    os.environ['MAXACT_MOE_DISPATCH'] = FLAGS.dispatch
  import jax
  import jax.numpy as jnp
  import numpy as np

  from maxact_jax.config import ModelConfig, MoEConfig, RopeConfig
  from maxact_jax.models import layers, moe

  dtype = jnp.dtype(FLAGS.dtype)
  d, e, k, i = FLAGS.hidden, FLAGS.experts, FLAGS.top_k, FLAGS.moe_intermediate
  config = ModelConfig(model_type='bench', vocab_size=8, hidden_size=d, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=d, intermediate_size=k * i, rms_norm_eps=1e-6,
                       rope=RopeConfig(theta=1e4),
                       moe=MoEConfig(num_experts=e, num_experts_per_tok=k, moe_intermediate_size=i, norm_topk_prob=True))
  moe_block = moe.MoEBlock(config, dtype)
  dense_block = layers.GatedMLP(d, k * i, 'silu', dtype)

  def once(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t

  rows = []
  for n in (int(t) for t in FLAGS.tokens):
    x = jax.random.normal(jax.random.PRNGKey(n), (1, n, d), dtype)
    moe_params = moe_block.init(jax.random.PRNGKey(1), x)
    dense_params = dense_block.init(jax.random.PRNGKey(2), x)
    run_moe, run_dense = jax.jit(moe_block.apply), jax.jit(dense_block.apply)
    once(run_moe, moe_params, x), once(run_dense, dense_params, x)  # compile, warm up
    pairs = [(once(run_moe, moe_params, x), once(run_dense, dense_params, x)) for _ in range(FLAGS.repeats)]
    t_moe, t_dense = min(p[0] for p in pairs), min(p[1] for p in pairs)
    flops = 2 * n * d * 3 * k * i  # the routed experts' (and the dense MLP's) matmul FLOPs
    rows.append({'tokens': n, 'moe_s': t_moe, 'dense_s': t_dense,
                 'ratio': float(np.median([m / dn for m, dn in pairs])), 'ratio_of_minima': t_moe / t_dense,
                 'tile_rows': moe.tile_rows(n * k, e), 'dense_gflops_per_s': flops / t_dense / 1e9,
                 'moe_gflops_per_s': flops / t_moe / 1e9})
    r = rows[-1]
    print(f'N={n:>6}  moe {1e3 * t_moe:9.2f} ms  dense {1e3 * t_dense:9.2f} ms  ratio {r["ratio"]:5.2f} '
          f'(of minima {r["ratio_of_minima"]:4.2f}; tile {r["tile_rows"]}, dense {r["dense_gflops_per_s"]:.0f} '
          'GFLOP/s)', flush=True)
  result = {
      'backend': jax.default_backend(), 'devices': [str(dv) for dv in jax.devices()],
      'dispatch': moe.dispatch_impl(), 'dtype': FLAGS.dtype, 'hidden': d, 'experts': e, 'top_k': k,
      'moe_intermediate': i, 'dense_width': k * i, 'repeats': FLAGS.repeats, 'points': rows,
      'max_ratio': max(r['ratio'] for r in rows), 'cpu_count': os.cpu_count(),
      'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
  }
  os.makedirs(os.path.dirname(FLAGS.output) or '.', exist_ok=True)
  with open(FLAGS.output, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'dispatch {result["dispatch"]} on {result["backend"]}: worst MoE/dense ratio {result["max_ratio"]:.2f} '
        f'(bar: 2.0) -> {FLAGS.output}')
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main))
