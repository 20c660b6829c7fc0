"""Sizing a run before any weight is read: parameter counts, taps, memory, layout.

Everything here works from config.json alone: the model is built under
`jax.eval_shape` (`transformer.abstract_params`), so a new family plans as soon
as it builds. `maxact-jax plan` prints it; `measure --parallelism=auto` uses
`choose` to pick its layout.

Memory per device is an estimate, stated as such: the weights exactly (each
parameter's shard under the layout's sharding rule), the activations from a
formula for the peak inside one decoder layer (the layer stack is a scan, so
one layer's temporaries are live at a time):

  residual stream in and out        2 * rows*T*D * s
  + the largest of
    attention   rows*T*(2H+2K)*hd * s  +  rows*H*T*T * (8 + 2s)   (scores: the
                eager attention materialises [H, T, T] logits and probabilities,
                float32 and activation dtype)
    MLP         3 * rows*T*I * s   (gate, up, their product; MoE: top_k experts
                per token and the shared expert)
    statistics  6 * rows*T*D * 4   (float32 copies of an activation tap: the
                value, |x|, the sort for the lower median, top-K scores)

with s the activation dtype's bytes. Usable memory is 90% of the device's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from maxact_jax import capture, parallel
from maxact_jax.config import LINEAR_ATTENTION, SLIDING_ATTENTION, ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.models import transformer
from maxact_jax.parallel import AUTO, MESH, NONE, PMAP, param_spec

HEADROOM = 0.9  # fraction of a device's memory a plan may fill
MAX_ROWS_PER_DEVICE = 64  # largest per-device batch the planner proposes
GiB = float(1 << 30)


@functools.lru_cache(maxsize=32)
def _leaves(config: ModelConfig, dtype: Any) -> tuple[tuple[tuple[str, ...], jax.ShapeDtypeStruct], ...]:
  """(path, ShapeDtypeStruct) of every parameter, built once per config under eval_shape."""
  params = transformer.abstract_params(config, dtype)
  return tuple((tuple(getattr(k, 'key', str(k)) for k in key_path), leaf)
               for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0])


def is_expert_param(config: ModelConfig, path: tuple[str, ...]) -> bool:
  """Routed-expert weights: the `experts` module of an MoE block (not the shared expert)."""
  return config.moe is not None and 'experts' in path


def param_counts(config: ModelConfig) -> tuple[int, int]:
  """(total, active) parameters; an expert weight counts top_k / num_experts of itself as active."""
  total, active = 0, 0.0
  for path, leaf in _leaves(config, jnp.dtype(jnp.float32)):
    n = math.prod(leaf.shape)
    total += n
    active += n * config.moe.num_experts_per_tok / config.moe.num_experts if is_expert_param(config, path) else n
  return total, int(round(active))


def weight_bytes(config: ModelConfig, dtype: Any, kind: str, sizes: dict[str, int] | None = None) -> int:
  """Bytes of parameters one device holds under a layout (kind none/pmap: all of them)."""
  item = jnp.dtype(dtype).itemsize
  total = 0
  for path, leaf in _leaves(config, jnp.dtype(dtype)):
    shape = list(leaf.shape)
    if kind == MESH:
      for dim, axis in enumerate(param_spec(config, path, shape, sizes or {})):
        if axis is not None:
          shape[dim] = -(-shape[dim] // sizes[axis])
    total += math.prod(shape) * item
  return total


def activation_bytes(config: ModelConfig, dtype: Any, rows: int, seq: int) -> int:
  """Estimated peak activation bytes of one device running `rows` x `seq` tokens (see module doc)."""
  s = jnp.dtype(dtype).itemsize
  c = config
  tokens = rows * seq
  resid = 2 * tokens * c.hidden_size * s
  parts = [6 * tokens * c.hidden_size * 4]
  if any(t != LINEAR_ATTENTION for t in c.layer_types):
    h, k, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    parts.append(tokens * (2 * h + 2 * k) * hd * s + rows * h * seq * seq * (8 + 2 * s))
  if c.linear_attention is not None:
    la = c.linear_attention
    width = 2 * la.num_key_heads * la.key_head_dim + 2 * la.num_value_heads * la.value_head_dim
    parts.append(3 * tokens * width * s)
  if 'dense' in c.mlp_layer_kinds:
    parts.append(3 * tokens * c.intermediate_size * s + 4 * tokens * c.intermediate_size * 4)
  if c.moe is not None:
    m = c.moe
    width = m.num_experts_per_tok * m.moe_intermediate_size + m.shared_expert_intermediate_size
    parts.append(3 * tokens * width * s + tokens * m.num_experts * 4)
  return resid + max(parts)


MATRICES = ('kernel', 'gate_up_proj', 'down_proj')  # the parameter names of matmul weights


def matmul_params_per_token(config: ModelConfig) -> float:
  """Weights one token multiplies in the decoder stack: every Linear kernel and expert
  matrix of the layers (an expert's times top_k / num_experts); not the embedding (a
  lookup) nor the LM head (the statistics step computes no logits)."""
  total = 0.0
  params = transformer.abstract_params(config, jnp.float32)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params['model'])[0]:
    path = tuple(getattr(k, 'key', str(k)) for k in key_path)
    if path[-1] in MATRICES:
      share = (config.moe.num_experts_per_tok / config.moe.num_experts
               if is_expert_param(config, path) else 1.0)
      total += math.prod(leaf.shape) * share
  return total


def model_flops(config: ModelConfig, rows: int, seq: int) -> float:
  """Model FLOPs of one forward pass over rows x seq tokens, the measure of MFU: 2 per
  weight per token (`matmul_params_per_token`), plus 4 x heads x head_dim per visible
  (query, key) pair of causal attention (half the full square; a sliding window's
  band), plus the delta rule of linear-attention layers (its state products and the
  chunk's intra products). Padding counts as computed."""
  tokens = rows * seq
  flops = 2.0 * tokens * matmul_params_per_token(config)
  h, hd = config.num_attention_heads, config.head_dim
  for kind in config.layer_types:
    if kind == LINEAR_ATTENTION:
      la = config.linear_attention
      # The delta rule per token and value head: three state products (dk x dv) and
      # the chunk's intra products (64 keys, dk and dv wide), at 2 FLOPs each.
      per = 2 * (3 * la.key_head_dim * la.value_head_dim + 64 * (la.key_head_dim + la.value_head_dim))
      flops += tokens * la.num_value_heads * per
      continue
    window = config.sliding_window if kind == SLIDING_ATTENTION and config.sliding_window else seq
    w = min(window, seq)
    pairs = w * (w + 1) / 2 + (seq - w) * w  # visible (query, key) pairs of one row
    flops += 4.0 * rows * pairs * h * hd
  return flops


def device_memory() -> tuple[int, str]:
  """(bytes, where the figure comes from) of one local device."""
  dev = jax.local_devices()[0]
  try:
    limit = (dev.memory_stats() or {}).get('bytes_limit')
  except Exception:  # backends without memory stats raise various errors
    limit = None
  if limit:
    return int(limit), f'{dev.platform} device memory'
  try:
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    host = 16 << 30
  return int(host), f'host memory ({dev.platform} devices report none)'


@dataclasses.dataclass
class LayoutEstimate:
  kind: str
  mesh_shape: dict[str, int]
  rows_per_device: int
  weights: int
  activations: int

  @property
  def total(self) -> int:
    return self.weights + self.activations

  def to_json(self, usable: int) -> dict[str, Any]:
    return {'parallelism': self.kind, 'mesh_shape': self.mesh_shape, 'rows_per_device': self.rows_per_device,
            'weights_bytes': self.weights, 'activations_bytes': self.activations, 'total_bytes': self.total,
            'fits': self.total <= usable}


@dataclasses.dataclass
class Choice:
  parallelism: str
  mesh_shape: dict[str, int]
  batch_size: int
  fits: bool
  reason: str


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def max_fitting_seq(config: ModelConfig, dtype: Any, kind: str, sizes: dict[str, int], usable: int,
                    seq: int) -> int:
  """The longest row (tokens, below `seq`) whose one-row estimate fits `usable` bytes; 0 if none."""
  lo, hi = 0, seq
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if estimate(config, dtype, kind, sizes, 1, mid).total <= usable:
      lo = mid
    else:
      hi = mid - 1
  return lo


def estimate(config: ModelConfig, dtype: Any, kind: str, sizes: dict[str, int], rows: int, seq: int) -> LayoutEstimate:
  return LayoutEstimate(kind, dict(sizes), rows, weight_bytes(config, dtype, kind, sizes),
                        activation_bytes(config, dtype, rows, seq))


def choose(config: ModelConfig, dtype: Any, num_devices: int, device_bytes: int, seq: int,
           batch_size: int | None = None) -> tuple[Choice, dict[str, LayoutEstimate]]:
  """The layout and batch size a run would use, and the per-device estimates of both layouts.

  pmap (or none on one device) when the weights and one row of activations fit
  one device; otherwise the mesh with the smallest fsdp that fits, the rest of
  the devices on data. The batch is the largest power-of-two rows per data
  shard that fits (at most `batch_size` when given).
  """
  usable = int(device_bytes * HEADROOM)
  single = NONE if num_devices == 1 else PMAP
  one = estimate(config, dtype, single, {'data': num_devices}, 1, seq)
  need = (f'{one.weights / GiB:.1f} GiB of weights and one row of activations '
          f'({one.activations / GiB:.2f} GiB at {seq} tokens)')
  if one.total <= usable or num_devices == 1:
    kind, sizes = single, ({} if single == NONE else {'data': num_devices})
    verb = 'fit' if one.total <= usable else 'do not fit'
    reason = f'{need} {verb} one device of {device_bytes / GiB:.1f} GiB'
  else:
    kind = MESH
    sizes = {'data': 1, 'fsdp': num_devices, 'tensor': 1}
    for fsdp in _divisors(num_devices):
      trial = {'data': num_devices // fsdp, 'fsdp': fsdp, 'tensor': 1}
      if estimate(config, dtype, MESH, trial, 1, seq).total <= usable:
        sizes = trial
        break
    reason = (f'{need} do not fit one device of {device_bytes / GiB:.1f} GiB: weights sharded over '
              f'fsdp={sizes["fsdp"]}')
  data_parallel = num_devices if kind == PMAP else (1 if kind == NONE else sizes['data'] * sizes['fsdp'])
  cap = max(1, batch_size // data_parallel) if batch_size else MAX_ROWS_PER_DEVICE
  rows, fits = 1, False
  r = 1
  while r <= cap:
    if estimate(config, dtype, kind, sizes, r, seq).total <= usable:
      rows, fits = r, True
    r *= 2
  if batch_size and fits and batch_size % data_parallel == 0 and estimate(
      config, dtype, kind, sizes, batch_size // data_parallel, seq).total <= usable:
    rows = batch_size // data_parallel
  if not fits:
    longest = max_fitting_seq(config, dtype, kind, sizes, usable, seq)
    reason += (f'; even one row of {seq} tokens per device does not fit: --max_seq_len={longest} would'
               if longest else '; the weights alone do not fit')
  choice = Choice(kind, sizes, rows * data_parallel, fits, reason)
  mesh_sizes = sizes if kind == MESH else {'data': 1, 'fsdp': num_devices, 'tensor': 1}
  mesh_rows = max(1, rows * data_parallel // (mesh_sizes['data'] * mesh_sizes['fsdp']))
  layouts = {
      PMAP: estimate(config, dtype, PMAP, {'data': num_devices}, max(1, rows * data_parallel // num_devices), seq),
      MESH: estimate(config, dtype, MESH, mesh_sizes, mesh_rows, seq),
  }
  return choice, layouts


def resolve_layout(parallelism: str, mesh_shape: str | None, config: ModelConfig, dtype: Any,
                   batch_size: int, seq: int) -> parallel.Layout:
  """The layout of `measure --parallelism=...`; `auto` decides with `choose` and says why."""
  if parallelism not in parallel.PARALLELISMS:
    raise UserError(f'--parallelism={parallelism} is not one of {", ".join(parallel.PARALLELISMS)}')
  if mesh_shape and parallelism not in (MESH, AUTO):
    raise UserError(f'--mesh_shape applies to --parallelism=mesh, not {parallelism}')
  n = jax.device_count()
  if parallelism == AUTO:
    if mesh_shape:
      return parallel.make_layout(MESH, mesh_shape, reason='auto: --mesh_shape was given')
    if n == 1:
      return parallel.make_layout(NONE, reason='auto: one device')
    device_bytes, source = device_memory()
    choice, _ = choose(config, dtype, n, device_bytes, seq, batch_size)
    return parallel.make_layout(choice.parallelism, choice.mesh_shape if choice.parallelism == MESH else None,
                                reason=f'auto: {choice.reason} ({source})')
  if parallelism == MESH and not mesh_shape:
    return parallel.make_layout(MESH, None, reason='--parallelism=mesh: every device on fsdp (default --mesh_shape)')
  return parallel.make_layout(parallelism, mesh_shape, reason=f'--parallelism={parallelism}')


def plan(config: ModelConfig, dtype_name: str, num_devices: int, device_bytes: int, seq: int,
         batch_size: int | None = None, memory_source: str = '') -> dict[str, Any]:
  """Everything `maxact-jax plan` reports, as a JSON-ready dict."""
  dtype = jnp.dtype(dtype_name)
  total, active = param_counts(config)
  choice, layouts = choose(config, dtype, num_devices, device_bytes, seq, batch_size)
  usable = int(device_bytes * HEADROOM)
  return {
      'model_type': config.model_type,
      'num_hidden_layers': config.num_hidden_layers,
      'hidden_size': config.hidden_size,
      'dtype': dtype_name,
      'params': {'total': total, 'active': active, 'bytes': total * dtype.itemsize},
      'taps': capture.tap_names(config),
      'num_devices': num_devices,
      'device_memory_bytes': device_bytes,
      'device_memory_source': memory_source,
      'usable_bytes_per_device': usable,
      'max_seq_len': seq,
      'layouts': {k: v.to_json(usable) for k, v in layouts.items()},
      'choice': dataclasses.asdict(choice),
  }


def group_taps(taps: list[str]) -> list[str]:
  """Tap names as lines, consecutive layers with the same taps folded into one
  `layers a-b: suffix, ...` line (the full list, exactly, in fewer lines)."""
  pattern = re.compile(r'layer_(\d+)_(.+)$')
  lines: list[str] = []
  run: tuple[int, int, tuple[str, ...]] | None = None
  per_layer: list[tuple[int, list[str]]] = []
  for t in taps:
    m = pattern.match(t)
    if m is None:
      per_layer.append((-1, [t]))
    elif per_layer and per_layer[-1][0] == int(m.group(1)):
      per_layer[-1][1].append(m.group(2))
    else:
      per_layer.append((int(m.group(1)), [m.group(2)]))

  def flush():
    if run is not None:
      a, b, suffixes = run
      head = f'layer {a}' if a == b else f'layers {a}-{b}'
      lines.append(f'{head}: {", ".join(suffixes)}')

  for layer, names in per_layer:
    if layer < 0:
      flush()
      run = None
      lines.append(names[0])
    elif run is not None and run[2] == tuple(names) and run[1] == layer - 1:
      run = (run[0], layer, run[2])
    else:
      flush()
      run = (layer, layer, tuple(names))
  flush()
  return lines


def format_plan(p: dict[str, Any], name: str = '') -> str:
  """The human-readable plan."""
  gib = lambda b: f'{b / GiB:.2f} GiB'
  taps = p['taps']
  lines = [
      f'model {name or p["model_type"]}: model_type {p["model_type"]}, {p["num_hidden_layers"]} layers, '
      f'hidden {p["hidden_size"]}',
      f'parameters: {p["params"]["total"]:,} total, {p["params"]["active"]:,} active per token '
      f'({gib(p["params"]["bytes"])} in {p["dtype"]})',
      f'taps ({len(taps)}, in forward order; --json lists every name):',
  ]
  lines += ['  ' + line for line in group_taps(taps)]
  lines.append(f'per device ({p["num_devices"]} device{"s" if p["num_devices"] > 1 else ""}, {gib(p["device_memory_bytes"])} each from '
               f'{p["device_memory_source"]}; {gib(p["usable_bytes_per_device"])} usable), '
               f'{p["max_seq_len"]} tokens per row:')
  for kind, e in p['layouts'].items():
    shape = ','.join(f'{k}={v}' for k, v in e['mesh_shape'].items())
    lines.append(f'  {kind:<4} ({shape}), {e["rows_per_device"]} rows/device: weights {gib(e["weights_bytes"])} + '
                 f'activations ~{gib(e["activations_bytes"])} = {gib(e["total_bytes"])}'
                 f'{"" if e["fits"] else "  DOES NOT FIT"}')
  c = p['choice']
  shape = ','.join(f'{k}={v}' for k, v in c['mesh_shape'].items())
  lines.append(f'would choose: --parallelism={c["parallelism"]}'
               + (f' --mesh_shape={shape}' if c['parallelism'] == MESH else '')
               + f' --batch_size={c["batch_size"]}' + ('' if c['fits'] else ' (DOES NOT FIT)'))
  lines.append(f'  because {c["reason"]}')
  return '\n'.join(lines)


__all__ = ['Choice', 'MATRICES', 'activation_bytes', 'choose', 'device_memory', 'format_plan', 'is_expert_param',
           'matmul_params_per_token', 'model_flops', 'param_counts', 'plan', 'resolve_layout', 'weight_bytes']
