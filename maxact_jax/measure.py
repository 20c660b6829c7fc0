"""The measurement: a jitted step that reduces every tap on device, a float64 host merge.

`make_stats_step` builds the step: the model runs under the capture
interceptor with `reduce_handler`, so each tap leaves the device as a few
small arrays (`maxact_jax.parallel` builds it for the pmap and mesh layouts,
`measure --parallelism`). `run` drives batches through it, overlapping the host merge of
batch i with the device work of batch i + 1 (JAX dispatches asynchronously),
and `measure` is the whole job behind `maxact-jax measure`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import capture, data, parallel, results, stats
from maxact_jax.config import ModelConfig, load_config, read_config_json
from maxact_jax.errors import UserError
from maxact_jax.models import transformer

DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32, 'float16': jnp.float16}


def make_stats_step(config: ModelConfig, dtype: Any, top_k: int = stats.TOP_K) -> Callable:
  """jit(params, input_ids [B,T], valid [B,T]) -> the sown `taps` tree of partials (one device;
  `parallel.make_step` builds it for every layout)."""
  return jax.jit(parallel.stats_body(config, dtype, top_k))


def make_forward(config: ModelConfig, dtype: Any) -> Callable:
  """jit(params, input_ids, valid) -> final hidden states: the same pass without capture."""
  model = transformer.build(config, dtype)
  return jax.jit(lambda params, ids, valid: model.apply({'params': params}, ids, valid))


class Accumulator:
  """Host-side merge of per-batch partials into one TapStats per tap."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.taps: dict[str, stats.TapStats] = {}
    self.batches = 0
    self.tokens = 0

  def add(self, sown: Any, batch: data.Batch) -> None:
    partials = capture.collect(self.config, jax.device_get(sown))
    n_tokens = batch.num_tokens
    for name, partial in partials.items():
      tap = self.taps.get(name)
      if tap is None:
        tap = self.taps[name] = stats.TapStats(full='hist' in partial)
      tap.update(partial, batch.sample_ids, n_tokens)
    self.batches += 1
    self.tokens += n_tokens


def run(step: Callable, params: Any, batches: Iterable[data.Batch], acc: Accumulator,
        on_batch: Callable[[data.Batch], None] | None = None) -> Accumulator:
  """Drive batches through the step, merging each batch while the next one runs."""
  pending = None
  for batch in batches:
    out = step(params, jnp.asarray(batch.input_ids), jnp.asarray(batch.valid))
    if pending is not None:
      acc.add(*pending)
      if on_batch:
        on_batch(pending[1])
    pending = (out, batch)
  if pending is not None:
    acc.add(*pending)
    if on_batch:
      on_batch(pending[1])
  return acc


# ---------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class MeasureOptions:
  model_path: str
  output_dir: str
  data_path: str | None = None
  max_samples: int | None = 2000
  max_seq_len: int | None = 32768
  batch_size: int = 8
  dtype: str = 'bfloat16'
  max_shapes: int = 8
  progress: bool = True
  # Scale-out (maxact_jax.parallel): layout, and the multi-host runtime.
  parallelism: str = parallel.AUTO
  mesh_shape: str | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300


@dataclasses.dataclass
class Measurement:
  config: ModelConfig
  acc: Accumulator
  corpus: data.Corpus
  plan: data.BatchPlan
  doc: dict
  top_doc: dict
  paths: tuple[str, str]
  timings: dict[str, float]


def load_params(model_path: str, config: ModelConfig, dtype_name: str, step: parallel.Step | None = None) -> Any:
  """Parameters of a checkpoint directory, in the named dtype (placed for `step`'s layout)."""
  import converters  # pylint: disable=import-outside-toplevel

  if step is None:
    return converters.load_params(model_path, config, DTYPES[dtype_name])
  return converters.load_params(model_path, config, DTYPES[dtype_name], place=step.place, sharding=step.sharding)


def load_measure_corpus(opts: MeasureOptions, config: ModelConfig) -> data.Corpus:
  if opts.data_path:
    return data.load_corpus(opts.data_path, vocab_size=config.vocab_size, max_samples=opts.max_samples,
                            max_seq_len=opts.max_seq_len, model_dir=opts.model_path)
  from maxact_jax import corpus as builtin  # pylint: disable=import-outside-toplevel

  records = builtin.builtin_corpus(num_samples=opts.max_samples)
  tokenizer = data.Tokenizer(opts.model_path)
  ids = tokenizer.encode([r['text'] for r in records])
  samples, truncated, dropped = [], 0, 0
  for row in ids:
    arr = np.asarray(row, np.int32)
    if arr.size and int(arr.max()) >= config.vocab_size:
      raise UserError(f'the tokenizer of {opts.model_path} produces ids beyond the vocabulary '
                      f'({int(arr.max())} >= {config.vocab_size})')
    if opts.max_seq_len and arr.size > opts.max_seq_len:
      truncated, dropped = truncated + 1, dropped + arr.size - opts.max_seq_len
      arr = arr[:opts.max_seq_len]
    samples.append(arr)
  return data.Corpus(samples, [r.get('category') for r in records], 'builtin', truncated, dropped)


def header(opts: MeasureOptions, config: ModelConfig, corpus: data.Corpus) -> dict[str, Any]:
  raw = read_config_json(opts.model_path)
  return {
      'model_name': results.model_name_of(opts.model_path),
      'model_path': opts.model_path,
      'model_type': raw.get('model_type', config.model_type),
      'num_hidden_layers': config.num_hidden_layers,
      'hidden_size': config.hidden_size,
      'data_path': opts.data_path or 'builtin',
      'num_samples': len(corpus.samples),
      'max_seq_len': opts.max_seq_len,
  }


def describer(corpus: data.Corpus, tokenizer: data.Tokenizer | None) -> Callable:
  """(sample, position, channel) -> location fields with the token id and its text."""

  def describe(at):
    sample, position, channel = (int(v) for v in at)
    out: dict[str, Any] = {'sample': sample, 'position': position, 'channel': channel}
    if 0 <= sample < len(corpus.samples) and position < len(corpus.samples[sample]):
      token = int(corpus.samples[sample][position])
      out['token_id'] = token
      if tokenizer is not None:
        out['token'] = tokenizer.decode_token(token)
      if corpus.categories[sample] is not None:
        out['category'] = corpus.categories[sample]
    return out

  return describe


def measure(opts: MeasureOptions) -> Measurement:
  """Load, run, merge, write: the whole `maxact-jax measure`."""
  if opts.dtype not in DTYPES:
    raise UserError(f'--dtype={opts.dtype} is not supported (choose from {", ".join(DTYPES)})')
  if opts.batch_size < 1:
    raise UserError(f'--batch_size must be a positive integer, got {opts.batch_size}')
  # Before JAX touches a device: the multi-host runtime, if asked for.
  parallel.initialize_distributed(opts.coordinator_address, opts.num_processes, opts.process_id,
                                  opts.initialization_timeout)
  writer = parallel.is_writer()
  if writer:
    results.ensure_output_dir(opts.output_dir)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  config = load_config(opts.model_path)
  import converters  # pylint: disable=import-outside-toplevel
  converters.check_checkpoint(opts.model_path, config, DTYPES[opts.dtype])  # fail fast, headers only
  corpus = load_measure_corpus(opts, config)
  plan = data.plan_batches(corpus.lengths, opts.batch_size, opts.max_shapes)
  timings['data_s'] = time.perf_counter() - t0
  from maxact_jax import plan as planner  # pylint: disable=import-outside-toplevel
  layout = planner.resolve_layout(opts.parallelism, opts.mesh_shape, config, DTYPES[opts.dtype], opts.batch_size,
                                  int(max(plan.lengths)))
  if opts.batch_size % layout.data_parallel:
    raise UserError(f'--batch_size={opts.batch_size} is not a multiple of the {layout.data_parallel} '
                    f'data-parallel devices of {layout.describe()}')
  if opts.progress and writer:
    print(f'parallelism: {layout.describe()}: {layout.reason}', file=sys.stderr)
  step = parallel.make_step(config, DTYPES[opts.dtype], layout)
  t0 = time.perf_counter()
  params = load_params(opts.model_path, config, opts.dtype, step)
  timings['load_s'] = time.perf_counter() - t0

  pad_id = config.pad_token_id or 0
  acc = Accumulator(config)
  bar = _progress(corpus.num_tokens, results.model_name_of(opts.model_path)) if opts.progress and writer else None
  t0 = time.perf_counter()
  run(step, params, data.iter_batches(corpus, plan, pad_id), acc,
      on_batch=(lambda b: bar.update(b.num_tokens)) if bar else None)
  timings['run_s'] = time.perf_counter() - t0
  if bar:
    bar.close()

  tokenizer = data.Tokenizer.maybe(opts.model_path)
  run_info = {
      'tool': 'maxact-jax',
      'dtype': opts.dtype,
      'batch_size': opts.batch_size,
      'batch_shapes': [list(s) for s in plan.shapes],
      'num_batches': len(plan.groups),
      'tokens': corpus.num_tokens,
      'padding_ratio': plan.padding_ratio(corpus.lengths),
      'truncated_samples': corpus.truncated,
      'truncated_tokens': corpus.tokens_dropped,
      'devices': [str(d) for d in jax.devices()],
      'parallelism': layout.kind,
      'layout': layout.describe(),
      'layout_reason': layout.reason,
      'mesh_shape': layout.mesh_shape,
      'num_processes': jax.process_count(),
      'jax_version': jax.__version__,
      **{k: round(v, 3) for k, v in timings.items()},
  }
  doc, top_doc = results.build_documents(header=header(opts, config, corpus), taps=acc.taps,
                                         describe=describer(corpus, tokenizer), run_info=run_info)
  paths = ('', '')
  if writer:  # every process holds the same merged statistics; one writes them
    paths = results.write_documents(opts.output_dir, results.model_name_of(opts.model_path), doc, top_doc)
  return Measurement(config, acc, corpus, plan, doc, top_doc, paths, timings)


def _progress(total: int, name: str):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, unit='tok', unit_scale=True, desc=f'  {name}', file=sys.stderr,
              dynamic_ncols=True, mininterval=0.5)


def layer_table(doc: dict) -> str:
  """The per-layer residual-stream table printed after a run."""
  per = doc['per_layer_stats']
  lines = [f'{"layer":>5} {"rms":>10} {"abs_mean":>10} {"max":>12} {"min":>12} {"max|x|/median":>14}']
  for i in range(doc['num_hidden_layers']):
    s = per.get(f'layer_{i}_hidden')
    if not s:
      continue
    ratio = s.get('sun_peak_token_ratio', float('nan'))
    lines.append(f'{i:>5} {s["rms"]:>10.4g} {s["abs_mean"]:>10.4g} {s["max"]:>12.6g} {s["min"]:>12.6g} '
                 f'{ratio:>14.4g}')
  return '\n'.join(lines)


def summary_lines(m: Measurement) -> list[str]:
  doc = m.doc
  run_info = doc.get('run', {})
  lines = [
      f'model {doc["model_name"]} ({doc["model_type"]}, {doc["num_hidden_layers"]} layers, hidden '
      f'{doc["hidden_size"]}), dtype {run_info.get("dtype")}',
      f'corpus {doc["data_path"]}: {doc["num_samples"]} samples, {run_info.get("tokens")} tokens, '
      f'{run_info.get("truncated_samples", 0)} truncated at {doc["max_seq_len"]} tokens; '
      f'{run_info.get("num_batches")} batches in {len(run_info.get("batch_shapes", []))} shapes, '
      f'padding {100 * run_info.get("padding_ratio", 0):.1f}%',
  ]
  detail = doc.get('global_max_detail', {})
  where = ''
  if detail:
    where = f' — sample {detail.get("sample")}, position {detail.get("position")}, channel {detail.get("channel")}'
    if 'token' in detail:
      where += f', token {detail["token"]!r} (id {detail.get("token_id")})'
  if run_info.get('layout'):
    lines.append(f'parallelism {run_info["layout"]}: {run_info.get("layout_reason", "")}')
  lines.append(f'global max activation {doc["global_max_activation"]:.6g} at {doc["global_max_location"]}{where}')
  if doc.get('nonfinite'):
    bad = ', '.join(f'{k} (nan {v["nan"]}, +inf {v["posinf"]}, -inf {v["neginf"]})'
                    for k, v in list(doc['nonfinite'].items())[:5])
    lines.append(f'WARNING non-finite values (overflow?) in: {bad}')
  tokens_s = run_info.get('tokens', 0) / max(m.timings.get('run_s', 0), 1e-9)
  lines.append(f'{tokens_s:,.0f} tokens/s over {m.timings.get("run_s", 0):.1f} s (compilation included)')
  return lines


def planted_report(doc: dict, planted: dict) -> str:
  """Did the measurement find the demo's planted outlier? The first layer whose
  residual-stream maximum sits in the planted channel, at the planted token."""
  found = None
  for i in range(doc['num_hidden_layers']):
    name = f'layer_{i}_hidden'
    s = doc['per_layer_stats'].get(name)
    if not s:
      continue
    which = 'max' if abs(s['max']) >= abs(s['min']) else 'min'
    loc = doc['extremes'][name][which]
    if loc['channel'] == planted['channel'] and abs(s[which]) > 100 * s.get('abs_median', 1.0):
      found = (i, loc)
      break
  want = f"layer {planted['layer']}, channel {planted['channel']}, token id {planted['token_id']}"
  if found is None:
    return f'planted outlier ({want}): NOT found'
  i, loc = found
  ok = i == planted['layer'] and loc.get('token_id') == planted['token_id']
  return (f"planted outlier ({want}): {'found' if ok else 'MISMATCH'} at layer {i}, channel "
          f"{loc['channel']}, token id {loc.get('token_id')} (sample {loc['sample']}, position {loc['position']})")


__all__ = ['Accumulator', 'MeasureOptions', 'Measurement', 'make_forward', 'make_stats_step', 'measure',
           'run', 'layer_table', 'summary_lines']
