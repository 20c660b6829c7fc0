"""Compile time of the full-size stats step, from config.json alone (no weights).

Lowers and compiles the Qwen3-32B measurement step (every tap reduced on
device) with `jax.ShapeDtypeStruct` parameters and inputs, at full depth and at
a shallow depth of the same config: the decoder stack is one `nn.scan` per
segment, so the compile time does not grow with the number of layers. Also
prints XLA's own memory analysis of the compiled step beside `maxact-jax
plan`'s activation estimate for the same shapes.

  python bench/compile_time.py [--model_path=configs/real/Qwen3-32B]
      [--depths=4,64] [--batch_size=1] [--seq_len=2048] [--dtype=bfloat16]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from maxact_jax import parallel, plan  # pylint: disable=wrong-import-position
from maxact_jax.config import read_config_json  # pylint: disable=wrong-import-position
from maxact_jax.families import parse_config  # pylint: disable=wrong-import-position
from maxact_jax.models import transformer  # pylint: disable=wrong-import-position

DEFAULT_MODEL = os.path.join(REPO, 'configs', 'real', 'Qwen3-32B')


def compile_once(raw: dict, depth: int | None, dtype, batch: int, seq: int) -> dict:
  raw = dict(raw)
  if depth is not None:
    raw['num_hidden_layers'] = depth
    raw.pop('layer_types', None)
    raw['max_window_layers'] = min(raw.get('max_window_layers', depth), depth)
  config = parse_config(raw)
  params = transformer.abstract_params(config, dtype)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  valid = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
  step = jax.jit(parallel.stats_body(config, dtype))
  t0 = time.perf_counter()
  lowered = step.lower(params, ids, valid)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out = {'layers': config.num_hidden_layers, 'lower_s': round(t1 - t0, 2), 'compile_s': round(t2 - t1, 2),
         'total_s': round(t2 - t0, 2)}
  try:
    mem = compiled.memory_analysis()
    out['xla_temp_bytes'] = int(mem.temp_size_in_bytes)
    out['xla_argument_bytes'] = int(mem.argument_size_in_bytes)
  except Exception:  # not every backend reports it
    pass
  out['plan_activation_estimate_bytes'] = plan.activation_bytes(config, dtype, batch, seq)
  out['plan_weight_bytes'] = plan.weight_bytes(config, dtype, 'none')
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--model_path', default=DEFAULT_MODEL)
  ap.add_argument('--depths', default='4,full', help='comma separated layer counts; "full" = the config\'s own')
  ap.add_argument('--batch_size', type=int, default=1)
  ap.add_argument('--seq_len', type=int, default=2048)
  ap.add_argument('--dtype', default='bfloat16')
  args = ap.parse_args()
  raw = read_config_json(args.model_path)
  dtype = jnp.dtype(args.dtype)
  runs = []
  for d in args.depths.split(','):
    depth = None if d.strip() == 'full' else int(d)
    runs.append(compile_once(raw, depth, dtype, args.batch_size, args.seq_len))
    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
  print(json.dumps({'model': os.path.basename(os.path.normpath(args.model_path)), 'dtype': args.dtype,
                    'batch_size': args.batch_size, 'seq_len': args.seq_len, 'backend': jax.default_backend(),
                    'cpu_count': os.cpu_count(), 'jax_version': jax.__version__, 'runs': runs}, indent=2))


if __name__ == '__main__':
  main()
