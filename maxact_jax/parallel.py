"""The stats step on many devices and hosts: the pmap and mesh layouts, multi-host runs.

Three layouts of the same step (`stats_body`: the model under the capture
interceptor, every tap reduced on device by `stats.tap_partial`):

- `none`: one device, `jax.jit`.
- `pmap`: parameters replicated, the batch split over every device along a
  `data` axis, and each tap's partial combined across devices *inside the step*
  with collectives (`stats.combine_across`: all_gather of per-row sums, first
  best of the extremes with their shifted row coordinates, top-K of the
  gathered top-Ks). Written with `jax.shard_map` under `jax.jit`, which is what
  `jax.pmap` itself is built on since JAX 0.8 and its documented successor;
  inputs stay global `jax.Array`s, so the same code runs multi-host.
- `mesh`: `jax.jit` over a `Mesh` with axes (data, fsdp, tensor): each weight
  matrix [.., in, out] is sharded `in` over fsdp and `out` over tensor, the
  batch over (data, fsdp); XLA's SPMD partitioner places the communication and
  the taps reduce over the global batch exactly as on one device.

Each returns the sown partial tree of the whole batch, replicated on every
device, so the host merge (`measure_step.Accumulator`) is the same for all three.

Statistics equal a single-device run bit for bit when every device computes
the same shapes as the single device did (batch rows per device = the
single-device batch size, `tensor` = 1): XLA:CPU picks its matmul kernel by
shape, so a different number of rows per device moves float32 results by
an ulp or so (measured: 1.5e-6 relative on the tiny models); a `tensor` axis
splits matmuls by columns, with the same effect. The merge itself is exact.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize`; every
process plans the same batches from the same corpus, puts only the rows its
devices hold on them (`jax.make_array_from_callback`), and the layouts span
all processes' devices, so every process ends with the same merged statistics
and process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import socket
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxact_jax import capture, stats
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.models import transformer

NONE, PMAP, MESH, AUTO = 'none', 'pmap', 'mesh', 'auto'
PARALLELISMS = (AUTO, NONE, PMAP, MESH)
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over both in the mesh layout
DATA = 'data'


# ---------------------------------------------------------------------------
# Layouts.


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the step runs: its kind, the device mesh, and why it was chosen."""

  kind: str
  mesh: Mesh | None = None  # pmap: axes ('data',); mesh: MESH_AXES
  reason: str = dataclasses.field(default='', compare=False)  # not part of the identity (step cache)

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.devices.size

  @property
  def data_parallel(self) -> int:
    """How many ways the batch is split: the global batch must be a multiple of it."""
    if self.mesh is None:
      return 1
    return math.prod(self.mesh.shape[a] for a in self.mesh.axis_names if a in BATCH_AXES)

  @property
  def mesh_shape(self) -> dict[str, int]:
    return {} if self.mesh is None else dict(self.mesh.shape)

  def describe(self) -> str:
    if self.kind == NONE:
      return 'none (one device)'
    shape = ','.join(f'{k}={v}' for k, v in self.mesh_shape.items())
    procs = jax.process_count()
    hosts = f' on {procs} processes' if procs > 1 else ''
    return f'{self.kind} over {self.num_devices} devices{hosts} ({shape})'


def parse_mesh_shape(text: str | None, num_devices: int) -> dict[str, int]:
  """`data=2,fsdp=2,tensor=2` or `2,2,2` (data, fsdp, tensor) -> axis sizes.

  Omitted axes are 1; one axis may be -1 (the rest of the devices). The sizes
  must multiply to the number of devices.
  """
  if not text:
    return {'data': 1, 'fsdp': num_devices, 'tensor': 1}
  parts = [p.strip() for p in text.split(',') if p.strip()]
  sizes: dict[str, int] = {}
  try:
    if all('=' in p or ':' in p for p in parts):
      for p in parts:
        name, value = (s.strip() for s in p.replace(':', '=').split('=', 1))
        if name not in MESH_AXES:
          raise UserError(f'--mesh_shape={text}: unknown axis {name!r} (axes: {", ".join(MESH_AXES)})')
        if name in sizes:
          raise UserError(f'--mesh_shape={text}: axis {name!r} given twice')
        sizes[name] = int(value)
    else:
      if len(parts) > len(MESH_AXES):
        raise UserError(f'--mesh_shape={text}: at most {len(MESH_AXES)} sizes ({", ".join(MESH_AXES)})')
      sizes = {name: int(v) for name, v in zip(MESH_AXES, parts)}
  except ValueError:
    raise UserError(f'--mesh_shape={text}: sizes must be integers, e.g. data=2,fsdp=2,tensor=2') from None
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  fill = [a for a, v in sizes.items() if v == -1]
  if len(fill) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise UserError(f'--mesh_shape={text}: sizes must be positive (one may be -1: the rest of the devices)')
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % known:
      raise UserError(f'--mesh_shape={text}: {known} does not divide the {num_devices} devices')
    sizes[fill[0]] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    verb = 'does not divide' if num_devices % total else 'uses only part of'
    raise UserError(f'--mesh_shape={text} needs {total} devices, which {verb} the {num_devices} devices '
                    f'available (the sizes must multiply to {num_devices})')
  return sizes


def make_layout(kind: str, mesh_shape: str | dict[str, int] | None = None,
                devices: Sequence[jax.Device] | None = None, reason: str = '') -> Layout:
  """A layout over `devices` (default: every device of every process)."""
  devices = list(devices if devices is not None else jax.devices())
  if kind == NONE:
    if jax.process_count() > 1:
      raise UserError('--parallelism=none runs on one device; with several processes use pmap, mesh or auto')
    return Layout(NONE, None, reason)
  if kind == PMAP:
    return Layout(PMAP, Mesh(np.array(devices), (DATA,)), reason)
  if kind == MESH:
    sizes = mesh_shape if isinstance(mesh_shape, dict) else parse_mesh_shape(mesh_shape, len(devices))
    grid = np.array(devices).reshape([sizes[a] for a in MESH_AXES])
    return Layout(MESH, Mesh(grid, MESH_AXES), reason)
  raise UserError(f'--parallelism={kind} is not one of {", ".join(PARALLELISMS)}')


def param_spec(config: ModelConfig, path: Sequence[str], shape: Sequence[int], sizes: Mapping[str, int]) -> P:
  """The mesh layout's rule for one parameter, generic over families.

  A weight matrix [..., in, out] (Linear kernels, expert stacks, embeddings)
  puts `in` on fsdp and `out` on tensor; a layer-stacked leading axis, expert
  axes and vectors (norms, biases) stay replicated. An axis that does not
  divide a dimension is left off that dimension. (Sharding the contraction
  dimension over fsdp makes XLA gather each layer's weights before its matmul,
  so the arithmetic is the single device's.)
  """
  segments = {s.name for s in transformer.plan_segments(config)}
  lead = 1 if len(path) > 1 and path[0] == 'model' and path[1] in segments else 0
  dims: list[str | None] = [None] * len(shape)
  if len(shape) - lead >= 2:
    for axis, dim in (('fsdp', len(shape) - 2), ('tensor', len(shape) - 1)):
      size = sizes.get(axis, 1)
      if size > 1 and shape[dim] % size == 0:
        dims[dim] = axis
  return P(*dims)


# ---------------------------------------------------------------------------
# The step.


def stats_body(config: ModelConfig, dtype: Any, top_k: int = stats.TOP_K, anatomy: bool = True) -> Callable:
  """(params, input_ids [B, T], valid [B, T]) -> the sown `taps` tree of partials (not jitted);
  `anatomy`: the residual stream's partials also carry the outlier-anatomy extras."""
  model = transformer.build(config, dtype)

  def body(params, input_ids, valid):
    with nn.intercept_methods(capture.interceptor(capture.reduce_handler(valid, top_k, anatomy))):
      _, sown = model.apply({'params': params}, input_ids, valid, mutable=[capture.COLLECTION])
    return sown[capture.COLLECTION]

  return body


# Tap suffix -> (partial, axis_name, top_k) -> combined partial, for taps whose
# partial is not `stats.tap_partial`'s (a structured tap, e.g. an MoE block's
# routing statistics, registers its rule here). The rest use stats.combine_across.
COMBINERS: dict[str, Callable[[dict, str, int], dict]] = {'moe_experts': stats.moe_combine_across}


def combine_tree(config: ModelConfig, sown: Any, axis_name: str, top_k: int = stats.TOP_K) -> Any:
  """Every tap of a sown tree combined across `axis_name` (the pmap layout).

  Taps sown inside a scanned segment carry a leading layer axis: the combine
  is vmapped over it, so each segment's taps cross devices in one collective
  per field rather than one per layer.
  """
  segments = {s.name for s in transformer.plan_segments(config)}

  def combine(suffix: str, partial: dict) -> dict:
    rule = COMBINERS.get(suffix)
    if rule is not None:
      return rule(partial, axis_name, top_k)
    if not isinstance(partial, Mapping) or not {'count', 'max', 'max_at'} <= set(partial):
      raise ValueError(f'the pmap layout has no rule to combine tap {suffix!r} across devices: register '
                       'one in parallel.COMBINERS (the mesh layout needs none)')
    return stats.combine_across(partial, axis_name, top_k)

  def walk(tree, stacked: bool, key: str):
    if isinstance(tree, tuple):  # a sown leaf: (partial,)
      fn = functools.partial(combine, key)
      return tuple(jax.vmap(fn)(v) if stacked else fn(v) for v in tree)
    return {k: walk(v, stacked or k in segments, k) for k, v in tree.items()}

  return walk(sown, False, '')


class Step:
  """The stats step of one layout: `step(params, input_ids, valid)` -> sown partials.

  Same contract as `measure_step.make_stats_step`'s function, for every layout:
  host (or device) [B, T] inputs in, the whole batch's partials out. Also says
  where each parameter goes (`sharding`, `place`), for the loaders.
  """

  def __init__(self, config: ModelConfig, dtype: Any, layout: Layout, top_k: int = stats.TOP_K):
    self.config, self.dtype, self.layout, self.top_k = config, dtype, layout, top_k
    body = stats_body(config, dtype, top_k)
    mesh = layout.mesh
    if layout.kind == NONE:
      self._fn = jax.jit(body)
      self._batch_sharding = None
    elif layout.kind == PMAP:
      def per_device(params, ids, valid):
        return combine_tree(config, body(params, ids, valid), DATA, top_k)

      # The combined partials are the same on every device (all_gather, then the
      # same selection everywhere); the replication checker cannot prove that.
      mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA), P(DATA)), out_specs=P(),
                             check_vma=False)
      self._fn = jax.jit(mapped)
      self._batch_sharding = NamedSharding(mesh, P(DATA))
    elif layout.kind == MESH:
      self._fn = jax.jit(body, out_shardings=NamedSharding(mesh, P()))
      self._batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    else:
      raise ValueError(layout.kind)

  def sharding(self, path: Sequence[str], shape: Sequence[int]) -> jax.sharding.Sharding:
    mesh = self.layout.mesh
    if self.layout.kind == NONE:
      return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if self.layout.kind == PMAP:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, param_spec(self.config, path, shape, mesh.shape))

  def place(self, path: Sequence[str], host: np.ndarray) -> jax.Array:
    """One host parameter onto its devices; each process fills only its own shards."""
    if self.layout.kind == NONE:  # committed, like an orbax restore: one compiled step for both
      return jax.device_put(host, self.sharding(path, host.shape))
    return jax.make_array_from_callback(host.shape, self.sharding(path, host.shape), lambda idx: host[idx])

  def abstract_params(self) -> Any:
    """The parameter tree as ShapeDtypeStructs carrying their shardings (restore targets)."""
    shapes = transformer.abstract_params(self.config, self.dtype)
    return jax.tree_util.tree_map_with_path(
        lambda kp, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding(_keys(kp), a.shape)), shapes)

  @property
  def batch_sharding(self) -> jax.sharding.Sharding | None:
    """Where a [B, T] batch goes (None: the default device)."""
    return self._batch_sharding

  def put_batch(self, a: Any) -> jax.Array:
    """[B, T] host array -> a global array split like the layout's batch; each
    process transfers only the rows its devices hold."""
    if self._batch_sharding is None:
      return jnp.asarray(a)
    host = np.asarray(a)
    if host.shape[0] % self.layout.data_parallel:
      raise UserError(f'batch of {host.shape[0]} rows cannot be split over {self.layout.data_parallel} '
                      'data-parallel devices (--batch_size must be a multiple of it)')
    return jax.make_array_from_callback(host.shape, self._batch_sharding, lambda idx: host[idx])

  def __call__(self, params: Any, input_ids: Any, valid: Any) -> Any:
    return self._fn(params, self.put_batch(input_ids), self.put_batch(valid))

  def lower(self, params: Any, input_ids: Any, valid: Any):
    """jit-lower with abstract arguments (compile-time checks, benchmarks)."""
    return self._fn.lower(params, input_ids, valid)


def _keys(key_path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in key_path)


@functools.lru_cache(maxsize=8)
def make_step(config: ModelConfig, dtype: Any, layout: Layout, top_k: int = stats.TOP_K) -> Step:
  """The step of a layout; cached, so repeated runs in one process compile once."""
  return Step(config, dtype, layout, top_k)


# ---------------------------------------------------------------------------
# Multi-host.


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--coordinator_address={address} must be host:port, e.g. 10.0.0.2:8476')
  return host.strip('[]'), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Poll until a TCP connection to the coordinator opens, or raise after timeout_s.

  jax.distributed.initialize aborts the whole process (a C++ fatal error) when
  it cannot reach the coordinator; probing first turns that into a one-line error.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      break
    time.sleep(0.25)
  why = getattr(last, 'strerror', None) or last
  raise UserError(f'cannot reach the coordinator at {address} within {timeout_s:g} s ({why}); '
                  'is process 0 running and the address reachable from this host?')


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = 300) -> bool:
  """jax.distributed.initialize with checked arguments and a bounded wait.

  Returns True when this is a multi-process run. Must run before JAX touches
  any device.
  """
  if num_processes in (None, 1) and not coordinator_address:
    if process_id not in (None, 0):
      raise UserError(f'--process_id={process_id} needs --num_processes and --coordinator_address')
    return False
  if not coordinator_address:
    raise UserError('--num_processes > 1 needs --coordinator_address (host:port of process 0)')
  if num_processes is None or num_processes < 1:
    raise UserError(f'--num_processes must be a positive integer, got {num_processes}')
  if process_id is None or not 0 <= process_id < num_processes:
    raise UserError(f'--process_id must be in [0, {num_processes}), got {process_id}')
  if timeout_s < 1:
    raise UserError(f'--initialization_timeout must be at least 1 second, got {timeout_s}')
  host, port = _split_address(coordinator_address)
  if process_id == 0:
    # If the other processes never join, jax.distributed aborts the process after
    # the timeout with its own (C++) message: say beforehand what it waits for.
    print(f'process 0 of {num_processes}: serving the coordinator on port {port}, waiting up to '
          f'{timeout_s} s for every process to join', file=sys.stderr, flush=True)
    try:  # the coordinator service binds this port: fail clearly if it cannot
      with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('', port))
    except OSError as e:
      raise UserError(f'process 0 cannot serve the coordinator on port {port}: {e.strerror or e}') from None
  else:
    wait_for_coordinator(coordinator_address, timeout_s)
  try:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(timeout_s))
  except RuntimeError as e:  # e.g. called after JAX initialised its devices
    raise UserError(f'cannot start the distributed runtime: {str(e).splitlines()[0]}') from None
  return True


def is_writer() -> bool:
  """Whether this process writes results (process 0)."""
  return jax.process_index() == 0


__all__ = ['Layout', 'Step', 'combine_tree', 'initialize_distributed', 'is_writer', 'make_layout', 'make_step',
           'param_spec', 'parse_mesh_shape', 'stats_body', 'wait_for_coordinator', 'PARALLELISMS', 'MESH_AXES']
