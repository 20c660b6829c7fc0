"""`maxact-jax bench --config_path`: the statistics step at a real model's size, from its config.json alone.

No weights are read: the parameters are random-initialised on the device(s), in
the layout a measurement would use (`jax.jit` with `out_shardings`: each device
creates its own shards, nothing passes through the host, and a sharded layout
never gathers them on one device), and the batch is synthetic token ids. In one
run it times, at `--batch_size` x `--seq_len`:

- the statistics step and the same forward pass without capture, interleaved
  (`overhead_ratio` = their medians' ratio), each compiled once first
  (`compile_s`, `forward_compile_s`);
- tokens/s, the model FLOP/s (`model_flops_per_step`: 2 per weight per token in
  the projections, MLPs and active experts, plus 4 x heads x head_dim per visible
  query-key pair of causal attention, i.e. half the full square; the embedding
  lookup and the unused LM head count nothing) and the MFU against the devices'
  peak for the dtype: a table of vendors' dense peaks (`PEAK_TFLOPS`), else this
  machine's measured matmul rate in that dtype;
- the compiled step's memory (XLA's memory analysis) and the device's peak
  memory in use (on CPU, which reports none, the process's peak RSS);
- projections: the step per layer when `--num_layers` cut the depth, and the
  hours the paper's full measurement would take at this rate (5,000 samples of
  the built-in corpus's length plan scaled so its longest budget is `--seq_len`;
  the rate at full rows of `--seq_len`, so an upper bound: shorter rows attend
  over less).

Before anything is compiled, the planner's estimate (`maxact_jax.plan`) refuses a
batch that cannot fit and names one that does; after compiling, XLA's analysis of
the step does the same. MoE configs run the dispatch `measure` runs (ragged_dot on
accelerators, tiled matmuls on the CPU). The results join `bench.json` under
`sizes`, beside the checkpoint bench's fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import atomic, corpus, measure_step, parallel, plan, results
from maxact_jax.config import ModelConfig, read_config_json
from maxact_jax.errors import UserError
from maxact_jax.families import parse_config
from maxact_jax.models import moe, transformer

# Dense peak TFLOP/s per device by dtype, from the vendors' datasheets; matched
# against jax's device_kind. Devices not listed: the measured matmul peak.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    'H100': {'bfloat16': 989.0, 'float16': 989.0},
    'H200': {'bfloat16': 989.0, 'float16': 989.0},
    'TPU v5 lite': {'bfloat16': 197.0},  # v5e
    'TPU v5e': {'bfloat16': 197.0},
    'TPU v5p': {'bfloat16': 459.0},
    'TPU v5': {'bfloat16': 459.0},  # v5p reports 'TPU v5'
    'TPU v6 lite': {'bfloat16': 918.0},  # v6e
    'TPU v6e': {'bfloat16': 918.0},
}
PAPER_SAMPLES = 5000  # the paper's corpus
SIZES_KEY = 'sizes'  # bench.json's section for these results


@dataclasses.dataclass
class SizeOptions:
  config_path: str
  output_dir: str = 'runs/bench'
  num_layers: int | None = None  # None: the config's depth
  dtype: str = 'bfloat16'
  batch_size: int = 8
  seq_len: int = 4096
  steps: int = 3
  parallelism: str = parallel.AUTO
  mesh_shape: str | None = None
  device_memory_gb: float | None = None  # override the device's memory (the fit checks)
  seed: int = 0


# ---------------------------------------------------------------------------
# The model: a config.json, its depth cut, its FLOPs.


def load_bench_config(path: str, num_layers: int | None = None) -> tuple[ModelConfig, str]:
  """(config, name) of a config.json file or of the directory holding one; the depth cut
  to `num_layers` (the first layers: their kinds, windows and MLPs as in the model)."""
  model_dir = path if os.path.isdir(path) else os.path.dirname(path) or '.'
  if not os.path.isdir(path) and os.path.basename(path) != 'config.json':
    raise UserError(f'--config_path={path}: expected a config.json file or a directory holding one')
  raw = read_config_json(model_dir)
  config = parse_config(raw, os.path.join(model_dir, 'config.json'))
  name = os.path.basename(os.path.normpath(model_dir))
  if num_layers is not None:
    if num_layers < 1:
      raise UserError(f'--num_layers must be a positive integer, got {num_layers}')
    if num_layers > config.num_hidden_layers:
      raise UserError(f'--num_layers={num_layers} is more than the {config.num_hidden_layers} layers of '
                      f'{name}')
    config = dataclasses.replace(config, num_hidden_layers=num_layers,
                                 layer_types=config.layer_types[:num_layers],
                                 mlp_layer_kinds=config.mlp_layer_kinds[:num_layers])
  return config, name


# ---------------------------------------------------------------------------
# The device: its peak, its memory.


def _device_kind() -> str:
  return jax.local_devices()[0].device_kind


def table_peak(device_kind: str, dtype: str) -> float | None:
  """A device's dense peak FLOP/s in `dtype` from PEAK_TFLOPS, or None (the longest
  matching name wins: 'TPU v5 lite' before 'TPU v5')."""
  for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      tflops = PEAK_TFLOPS[name].get(dtype)
      return None if tflops is None else tflops * 1e12
  return None


def peak_memory() -> tuple[int | None, str]:
  """(bytes, what they are): the device's peak memory in use, or on a backend that
  reports none (the CPU) the process's peak resident memory."""
  try:
    peak = (jax.local_devices()[0].memory_stats() or {}).get('peak_bytes_in_use')
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    peak = None
  if peak:
    return int(peak), 'device peak_bytes_in_use'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host process peak RSS (no device figure)'


def check_fits(config: ModelConfig, dtype: Any, layout: parallel.Layout, rows: int, seq: int,
               capacity: int) -> plan.LayoutEstimate:
  """The planner's estimate of one device's memory; a batch over it is refused, before
  anything is compiled, with the largest batch that fits (or a shorter row)."""
  usable = int(capacity * plan.HEADROOM)
  sizes = layout.mesh_shape
  per_device = max(1, rows // layout.data_parallel)
  est = plan.estimate(config, dtype, layout.kind, sizes, per_device, seq)
  if est.total <= usable:
    return est
  fit = per_device - 1
  while fit >= 1 and plan.estimate(config, dtype, layout.kind, sizes, fit, seq).total > usable:
    fit -= 1
  gib = lambda n: f'{n / 2**30:.3g} GiB'
  if fit >= 1:
    hint = f'--batch_size={fit * layout.data_parallel} fits'
  else:
    longest = plan.max_fitting_seq(config, dtype, layout.kind, sizes, usable, seq)
    hint = (f'even one row does not: --seq_len={longest} would' if longest else
            'the weights alone do not fit: shard them (--parallelism=mesh over more devices)')
  raise UserError(f'a batch of {rows} x {seq} tokens needs about {gib(est.total)} per device (weights '
                  f'{gib(est.weights)}, activations ~{gib(est.activations)}), more than the {gib(usable)} usable '
                  f'of {gib(capacity)}; {hint}')


# ---------------------------------------------------------------------------
# The run.


def hashed_uniform(shape: tuple[int, ...], dtype: Any, seed: int, scale: float) -> jax.Array:
  """Pseudo-random values uniform in [-scale, scale), made where they are computed
  (inside jit: on the device): each element from a counter hash of its coordinates
  and the seed (murmur3's 32-bit finalizer applied per axis). jax.random's threefry
  took ~50 s and 11 GB of host memory for one 151936 x 4096 embedding on 2 CPU
  cores; this takes seconds and no memory beside the output."""
  def mix(x):
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)

  x = jnp.full(shape, seed * 0x9E3779B1 % 2**32, jnp.uint32)
  for axis in range(len(shape)):
    x = mix(x ^ jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(0x9E3779B1))
  unit = (x >> 8).astype(jnp.float32) * np.float32(2.0**-24)  # [0, 1), 24 random bits
  return ((2 * unit - 1) * scale).astype(dtype)


def leaf_fill(config: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, float]:
  """How the bench fills one parameter: ('uniform', scale) for matrices, with the
  variance of lecun_normal (1 / fan_in; the embedding 0.02**2, transformers'
  initializer_range); ('const', c) for the rest: norm weights at their identity
  (1, or 0 for (1 + w) norms), biases and the other vectors at 0."""
  if path[-1] == 'embedding':
    return 'uniform', 0.02 * math.sqrt(3)
  if path[-1] in plan.MATRICES:
    return 'uniform', math.sqrt(3 / shape[-2])
  if path[-1] == 'weight' and any(p.endswith('norm') for p in path[:-1]):
    return 'const', 0.0 if config.norm_offset else 1.0
  return 'const', 0.0


def init_params(config: ModelConfig, dtype: Any, step: parallel.Step, seed: int = 0) -> Any:
  """Random parameters made on the device(s): one jitted call per parameter with the
  layout's sharding as out_shardings, so each device computes its own shards and
  nothing passes through the host. No LM head: the statistics step computes no logits."""
  shapes = dict(step.abstract_params())
  shapes.pop('lm_head', None)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for i, (key_path, leaf) in enumerate(leaves):
    path = tuple(getattr(k, 'key', str(k)) for k in key_path)
    kind, value = leaf_fill(config, path, leaf.shape)
    if kind == 'uniform':
      make = functools.partial(hashed_uniform, leaf.shape, leaf.dtype, seed * 100003 + i, value)
    else:
      make = functools.partial(jnp.full, leaf.shape, value, leaf.dtype)
    out.append(jax.jit(make, out_shardings=leaf.sharding)())
  return jax.block_until_ready(jax.tree_util.tree_unflatten(treedef, out))


def _compile(fn, params, ids, valid) -> tuple[Any, float]:
  t = time.perf_counter()
  compiled = fn.lower(params, ids, valid).compile()
  return compiled, time.perf_counter() - t


def _time(fn, *args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def bench_size(opts: SizeOptions) -> dict[str, Any]:
  """The whole `maxact-jax bench --config_path`; returns its result (also in bench.json)."""
  if opts.dtype not in measure_step.DTYPES:
    raise UserError(f'--dtype={opts.dtype} is not supported (choose from {", ".join(measure_step.DTYPES)})')
  for flag in ('batch_size', 'seq_len', 'steps'):
    if getattr(opts, flag) < 1:
      raise UserError(f'--{flag} must be a positive integer, got {getattr(opts, flag)}')
  results.ensure_output_dir(opts.output_dir)
  config, name = load_bench_config(opts.config_path, opts.num_layers)
  full_layers = load_bench_config(opts.config_path)[0].num_hidden_layers
  dtype = measure_step.DTYPES[opts.dtype]
  rows, seq = opts.batch_size, opts.seq_len
  layout = plan.resolve_layout(opts.parallelism, opts.mesh_shape, config, dtype, rows, seq)
  if rows % layout.data_parallel:
    raise UserError(f'--batch_size={rows} is not a multiple of the {layout.data_parallel} data-parallel '
                    f'devices of {layout.describe()}')
  capacity = int(opts.device_memory_gb * 2**30) if opts.device_memory_gb else measure_step.device_memory_bytes()
  estimate = check_fits(config, dtype, layout, rows, seq, capacity)  # before compiling anything

  step = parallel.make_step(config, dtype, layout)
  t0 = time.perf_counter()
  params = init_params(config, dtype, step, opts.seed)
  init_s = time.perf_counter() - t0
  rng = np.random.default_rng(opts.seed)
  host_ids = rng.integers(0, config.vocab_size, (rows, seq), dtype=np.int32)
  ids, valid = step.put_batch(host_ids), step.put_batch(np.ones((rows, seq), bool))
  stats_step, compile_s = _compile(step, params, ids, valid)
  step_bytes = measure_step.step_memory_bytes(stats_step)
  if step_bytes is not None and step_bytes > plan.HEADROOM * capacity:
    raise UserError(f'the compiled step needs {step_bytes / 2**30:.3g} GiB per device (XLA\'s analysis), more '
                    f'than the {plan.HEADROOM * capacity / 2**30:.3g} GiB usable: try a smaller --batch_size')
  forward, forward_compile_s = _compile(measure_step.make_forward(config, dtype), params, ids, valid)
  first = {'stats': _time(stats_step, params, ids, valid), 'forward': _time(forward, params, ids, valid)}
  times: dict[str, list[float]] = {'stats': [], 'forward': []}
  for _ in range(opts.steps):  # interleaved, so a slow moment of a shared machine hits both
    times['forward'].append(_time(forward, params, ids, valid))
    times['stats'].append(_time(stats_step, params, ids, valid))
  stats_s, forward_s = statistics.median(times['stats']), statistics.median(times['forward'])

  devices = layout.num_devices
  kind = _device_kind()
  peak = table_peak(kind, opts.dtype)
  peak_source = f'table ({kind}, {opts.dtype})'
  if peak is None:
    peak = measure_step.matmul_peak_flops(dtype)
    peak_source = f'measured ({kind}, {opts.dtype} matmul)'
  flops = plan.model_flops(config, rows, seq)
  tokens_per_s = rows * seq / stats_s
  per_layer_s = stats_s / config.num_hidden_layers
  full_step_s = per_layer_s * full_layers
  paper_tokens = PAPER_SAMPLES * corpus.length_plan_mean(seq / corpus.LENGTH_PLAN[-1][2])
  peak_bytes, peak_bytes_source = peak_memory()
  result = {
      'config_path': opts.config_path,
      'model': name,
      'model_type': config.model_type,
      'num_layers': config.num_hidden_layers,
      'config_layers': full_layers,
      'dtype': opts.dtype,
      'batch_size': rows,
      'seq_len': seq,
      'steps': opts.steps,
      'backend': jax.default_backend(),
      'device_kind': kind,
      'num_devices': devices,
      'parallelism': layout.kind,
      'layout': layout.describe(),
      'layout_reason': layout.reason,
      'moe_dispatch': moe.dispatch_impl() if config.moe is not None else None,
      'init_s': init_s,
      'compile_s': compile_s,
      'forward_compile_s': forward_compile_s,
      'first_call_s': first,
      'stats_step_s': stats_s,
      'forward_s': forward_s,
      'stats_step_times_s': times['stats'],
      'forward_times_s': times['forward'],
      'overhead_ratio': stats_s / forward_s,
      'tokens_per_s': tokens_per_s,
      'model_flops_per_step': flops,
      'model_flops_per_s': flops / stats_s,
      'peak_flops_per_device': peak,
      'peak_source': peak_source,
      'mfu': flops / stats_s / (peak * devices),
      'forward_mfu': flops / forward_s / (peak * devices),
      'planner_estimate_bytes_per_device': estimate.total,
      'step_memory_bytes': step_bytes,
      'peak_memory_bytes': peak_bytes,
      'peak_memory_source': peak_bytes_source,
      'device_memory_bytes': capacity,
      'per_layer_s': per_layer_s,
      'full_depth_step_s': full_step_s,
      'paper_tokens': paper_tokens,
      'paper_hours': paper_tokens / (rows * seq / full_step_s) / 3600,
      'finished_at': time.time(),
  }
  write_result(opts.output_dir, result)
  return result


def result_key(result: dict[str, Any]) -> str:
  """bench.json's key of one size run: model, depth, dtype, batch shape, devices."""
  return (f'{result["model"]}/L{result["num_layers"]}/{result["dtype"]}/{result["batch_size"]}x{result["seq_len"]}'
          f'/{result["num_devices"]}x{result["backend"]}')


def write_result(output_dir: str, result: dict[str, Any]) -> str:
  """Add `result` to <output_dir>/bench.json under `sizes`, keeping every other field."""
  path = os.path.join(output_dir, 'bench.json')
  doc: dict[str, Any] = {}
  if os.path.isfile(path):
    try:
      with open(path, encoding='utf-8') as f:
        doc = json.load(f)
    except ValueError:
      doc = {}
  doc.setdefault(SIZES_KEY, {})[result_key(result)] = result
  atomic.write_json(path, doc)
  return path


ROWS = (
    ('model', 'model', '{}'),
    ('num_layers', 'layers run (of the config\'s)', None),
    ('dtype', 'dtype', '{}'),
    ('batch_size', 'batch', None),
    ('layout', 'layout', '{}'),
    ('device_kind', 'device', None),
    ('moe_dispatch', 'MoE dispatch', '{}'),
    ('init_s', 'random init on device (s)', '{:.2f}'),
    ('compile_s', 'compile, statistics step (s)', '{:.1f}'),
    ('forward_compile_s', 'compile, bare forward (s)', '{:.1f}'),
    ('stats_step_s', 'statistics step, median (s)', '{:.4g}'),
    ('forward_s', 'bare forward, median (s)', '{:.4g}'),
    ('overhead_ratio', 'overhead_ratio (stats / forward)', '{:.3f}'),
    ('tokens_per_s', 'tokens/s (statistics step)', '{:,.0f}'),
    ('model_flops_per_s', 'model FLOP/s', '{:.4g}'),
    ('peak_flops_per_device', 'peak FLOP/s per device', '{:.4g}'),
    ('peak_source', 'peak from', '{}'),
    ('mfu', 'MFU (statistics step)', '{:.3f}'),
    ('forward_mfu', 'MFU (bare forward)', '{:.3f}'),
    ('planner_estimate_bytes_per_device', 'planner estimate per device (GiB)', 'gib'),
    ('step_memory_bytes', 'compiled step, XLA memory analysis (GiB)', 'gib'),
    ('peak_memory_bytes', 'peak memory in use (GiB)', 'gib'),
    ('per_layer_s', 'statistics step per layer (s)', '{:.4g}'),
    ('full_depth_step_s', 'projected step at full depth (s)', '{:.4g}'),
    ('paper_hours', "paper's measurement (5,000 samples), projected (h)", '{:.3g}'),
)


def format_table(r: dict[str, Any]) -> str:
  lines = []
  width = max(len(label) for _, label, _ in ROWS)
  for key, label, fmt in ROWS:
    value = r.get(key)
    if value is None:
      continue
    if key == 'num_layers':
      text = f'{value} of {r["config_layers"]}'
    elif key == 'batch_size':
      text = f'{value} x {r["seq_len"]} tokens'
    elif key == 'device_kind':
      text = f'{r["num_devices"]} x {value} ({r["backend"]})'
    elif fmt == 'gib':
      text = f'{value / 2**30:.3f}'
      if key == 'peak_memory_bytes':
        text += f' ({r["peak_memory_source"]})'
    else:
      text = fmt.format(value)
    lines.append(f'{label:<{width}}  {text}')
  return '\n'.join(lines)


__all__ = ['PEAK_TFLOPS', 'SizeOptions', 'bench_size', 'format_table', 'load_bench_config', 'table_peak']
