"""Measure's step: a jitted pass that reduces every tap on device, and a float64 host merge.

`make_stats_step` builds the step: the model runs under the capture
interceptor with `reduce_handler`, so each tap leaves the device as a few
small arrays (`maxact_jax.parallel` builds it for the pmap and mesh layouts,
`measure --parallelism`). `run` drives batches through it, overlapping the host merge of
batch i with the device work of batch i + 1 (JAX dispatches asynchronously);
`Accumulator` is that merge. `CompiledSteps` and `check_memory` compile a
layout's step ahead of time and refuse a batch that cannot fit;
`load_params` reads a checkpoint's parameters placed for a layout. The
`measure` job (`maxact_jax.measure`) and the other jobs that run the model
over a corpus (quant, intervene, crosscheck, bench) are built on these.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

import converters
from maxact_jax import anatomy, capture, data, parallel, stats
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.models import transformer

DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32, 'float16': jnp.float16}


def make_stats_step(config: ModelConfig, dtype: Any, top_k: int = stats.TOP_K,
                    with_anatomy: bool = True) -> Callable:
  """jit(params, input_ids [B,T], valid [B,T]) -> the sown `taps` tree of partials (one device;
  `parallel.make_step` builds it for every layout).

  `with_anatomy`: the residual stream's partials also carry its per-channel max |x|
  and per-token Sun flags (see `maxact_jax.anatomy`).
  """
  return jax.jit(parallel.stats_body(config, dtype, top_k, with_anatomy))


def make_forward(config: ModelConfig, dtype: Any) -> Callable:
  """jit(params, input_ids, valid) -> final hidden states: the same pass without capture."""
  model = transformer.build(config, dtype)
  return jax.jit(lambda params, ids, valid: model.apply({'params': params}, ids, valid))


class Accumulator:
  """Host-side merge of per-batch partials into one TapStats per tap, and the
  residual stream's per-token flags into the token attribution of each rule."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.taps: dict[str, stats.TapStats] = {}
    self.attributions = anatomy.new_attributions()  # one per rule (anatomy.TOKEN_RULES)
    self.batches = 0
    self.tokens = 0

  def add(self, sown: Any, batch: data.Batch) -> None:
    partials = capture.collect(self.config, jax.device_get(sown))
    for rule, flags in anatomy.take_flags(partials).items():
      self.attributions[rule].add(flags, batch.input_ids, batch.valid)
    n_tokens = batch.num_tokens
    for name, partial in partials.items():
      tap = self.taps.get(name)
      if tap is None:
        tap = self.taps[name] = stats.new_state(partial)
      tap.update(partial, batch.sample_ids, n_tokens)
    self.batches += 1
    self.tokens += n_tokens


def run(step: Callable, params: Any, batches: Iterable[tuple[int, data.Batch]], acc: Accumulator,
        on_merged: Callable[[int, data.Batch], None] | None = None) -> Accumulator:
  """Drive (index, batch) pairs through the step, in order, merging each batch on
  the host while the device runs the next one (JAX dispatches asynchronously).
  `on_merged(index, batch)` runs after each merge (progress, state checkpoints)."""
  pending = None

  def merge(item):
    out, index, batch = item
    acc.add(out, batch)
    if on_merged:
      on_merged(index, batch)

  for index, batch in batches:
    out = step(params, batch.input_ids, batch.valid)
    if pending is not None:
      merge(pending)
    pending = (out, index, batch)
  if pending is not None:
    merge(pending)
  return acc


class CompiledSteps:
  """A layout's step (`parallel.Step`) compiled ahead of time for each batch shape,
  so its memory can be checked before the run and the compile time is known."""

  def __init__(self, step: 'parallel.Step', params: Any):
    self.step, self.params = step, params
    self.compiled: dict[tuple[int, int], Any] = {}
    self.compile_s = 0.0

  def get(self, shape: tuple[int, int]):
    if shape not in self.compiled:
      t0 = time.perf_counter()
      sharding = self.step.batch_sharding
      ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
      valid = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)
      self.compiled[shape] = self.step.lower(self.params, ids, valid).compile()
      self.compile_s += time.perf_counter() - t0
    return self.compiled[shape]

  def __call__(self, params, input_ids, valid):
    compiled = self.get(tuple(np.shape(input_ids)))
    return compiled(params, self.step.put_batch(input_ids), self.step.put_batch(valid))


def step_memory_bytes(compiled) -> int | None:
  """Device memory one call of a compiled step needs: arguments, outputs, temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes - m.alias_size_in_bytes)


def device_memory_bytes() -> int:
  """What one device can hold: the accelerator's limit, or the host's memory on CPU."""
  try:
    mem = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    mem = {}
  if mem.get('bytes_limit'):
    return int(mem['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_memory(steps: CompiledSteps, plan: data.BatchPlan, capacity: int, headroom: float = 0.9) -> int | None:
  """Compile the largest batch shape and refuse a run that cannot fit on one device.

  The estimate comes from XLA's memory analysis of the compiled step. On
  refusal the error suggests a batch size that fits: first guessed by scaling
  the memory that grows with the batch, then confirmed by compiling it.
  """
  budget = headroom * capacity
  batch, length = max(plan.shapes, key=lambda st: st[0] * st[1])
  need = step_memory_bytes(steps.get((batch, length)))
  if need is None or need <= budget:
    return need
  gb = lambda n: f'{n / 2**30:.3g} GB'
  fixed = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(steps.params))
  rows = min(batch - 1, int((budget - fixed) // max((need - fixed) / batch, 1)))
  while rows >= 1 and step_memory_bytes(steps.get((rows, length))) > budget:
    rows -= 1  # the guess was optimistic: confirm by compiling, one row less each time
  if rows >= 1:
    hint = f'try --batch_size={rows}'
  else:
    hint = ('the parameters alone do not fit: shard the model over devices (--parallelism=mesh) '
            'or shorten --max_seq_len')
  raise UserError(f'a batch of shape {(batch, length)} needs about {gb(need)} of device memory, more than the '
                  f'{gb(capacity)} available ({int(headroom * 100)}% usable); {hint}')


def load_params(model_path: str, config: ModelConfig, dtype_name: str, step: parallel.Step | None = None) -> Any:
  """Parameters of a checkpoint directory, in the named dtype (placed for `step`'s layout);
  a warning line when the dtype is wider than the one the weights are stored in."""
  warning = converters.weights.upcast_warning(converters.weights_info(model_path), dtype_name, model_path)
  if warning:
    print(warning, file=sys.stderr)
  if step is None:
    return converters.load_params(model_path, config, DTYPES[dtype_name])
  return converters.load_params(model_path, config, DTYPES[dtype_name], place=step.place, sharding=step.sharding)


__all__ = ['DTYPES', 'Accumulator', 'CompiledSteps', 'check_memory', 'device_memory_bytes', 'load_params',
           'make_forward', 'make_stats_step', 'run', 'step_memory_bytes']
