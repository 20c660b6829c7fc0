"""The `measure` job: load, run, merge, write every tap of a checkpoint on a corpus.

`measure` is the whole job behind `maxact-jax measure`: it reads the config
and the corpus, picks the layout (`maxact_jax.plan`), drives the batches
through measure's step (`maxact_jax.measure_step`), writes the results in the
reference's schema (`maxact_jax.results`) and the outlier anatomy's files
beside them (`maxact_jax.anatomy`), and keeps a resumable state
(`maxact_jax.runstate`) on request.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
from tqdm import tqdm

import converters
from maxact_jax import anatomy, data, parallel, results, runstate
from maxact_jax.config import ModelConfig, read_config_json
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.measure_step import (DTYPES, Accumulator, CompiledSteps, check_memory, device_memory_bytes,
                                     load_params, run)
from maxact_jax.plan import resolve_layout


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
  shape_cost_tokens: int = data.SHAPE_COST_TOKENS
  progress: bool = True
  checkpoint_every: int = 0  # save a resumable state every N batches (0: never)
  resume: bool = False
  device_memory_gb: float | None = None  # override the device's memory for the guard
  source_tokenizer: str | None = None  # re-tokenize input_ids decoded with this tokenizer
  tokenizer: str | None = None  # a tokenizer directory to use instead of the checkpoint's own
  # Scale-out (maxact_jax.parallel): layout, and the multi-host runtime.
  parallelism: str = parallel.AUTO
  mesh_shape: str | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300

  @property
  def tokenizer_source(self) -> str:
    """Where the checkpoint's tokenizer comes from: --tokenizer, else the checkpoint."""
    return self.tokenizer or self.model_path


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
  anatomy_paths: tuple[str, str] | None = None  # <model>_channel_absmax.npz, <model>_anatomy.json


def load_measure_corpus(opts: MeasureOptions, config: ModelConfig) -> data.Corpus:
  """The corpus of --data_path, or the built-in one cut to token budgets in the
  checkpoint's tokenizer (which keeps padding under 5%)."""
  if opts.data_path:
    return data.load_corpus(opts.data_path, vocab_size=config.vocab_size, max_samples=opts.max_samples,
                            max_seq_len=opts.max_seq_len, model_dir=opts.tokenizer_source,
                            source_tokenizer=opts.source_tokenizer)
  return data.load_builtin(data.Tokenizer(opts.tokenizer_source), vocab_size=config.vocab_size,
                           num_samples=opts.max_samples, max_seq_len=opts.max_seq_len)


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
  name = results.model_name_of(opts.model_path)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  config = load_config(opts.model_path)
  converters.check_checkpoint(opts.model_path, config, DTYPES[opts.dtype])  # fail fast, headers only
  corpus = load_measure_corpus(opts, config)
  plan = data.plan_batches(corpus.lengths, opts.batch_size, opts.max_shapes,
                            shape_cost_tokens=opts.shape_cost_tokens)
  fingerprint = runstate.fingerprint(model_path=opts.model_path, samples=corpus.samples, options={
      'batch_size': opts.batch_size, 'max_seq_len': opts.max_seq_len, 'max_samples': opts.max_samples,
      'dtype': opts.dtype, 'max_shapes': opts.max_shapes,
      'shape_cost_tokens': opts.shape_cost_tokens, 'data_path': opts.data_path or 'builtin'})
  state_file = runstate.state_path(opts.output_dir, name)
  acc = Accumulator(config)
  start = 0
  if opts.resume:
    start, acc.taps, extra = runstate.load(state_file, fingerprint)
    acc.batches, acc.tokens = start, int(extra.get('tokens', 0))
    saved = extra.get('attributions', {})
    acc.attributions = {rule: anatomy.TokenAttribution.from_state(saved.get(rule, {}))
                        for rule in anatomy.TOKEN_RULES}
  timings['data_s'] = time.perf_counter() - t0
  layout = resolve_layout(opts.parallelism, opts.mesh_shape, config, DTYPES[opts.dtype], opts.batch_size,
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

  steps = CompiledSteps(step, params)
  capacity = int(opts.device_memory_gb * 2**30) if opts.device_memory_gb else device_memory_bytes()
  step_bytes = check_memory(steps, plan, capacity)

  def checkpoint(index: int, batch: data.Batch) -> None:
    if bar:
      bar.update(batch.num_tokens)
    done = index + 1
    if writer and opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < len(plan.groups):
      runstate.save(state_file, fingerprint_=fingerprint, next_batch=done, taps=acc.taps,
                    extra={'tokens': acc.tokens,
                           'attributions': {r: a.state() for r, a in acc.attributions.items()}})

  bar = _progress(corpus.num_tokens, name, initial=acc.tokens) if opts.progress and writer else None
  t0 = time.perf_counter()
  batches = enumerate(data.iter_batches(corpus, plan, config.pad_token_id or 0))
  run(steps, params, ((i, b) for i, b in batches if i >= start), acc, on_merged=checkpoint)
  timings['run_s'] = time.perf_counter() - t0
  timings['compile_s'] = steps.compile_s
  if bar:
    bar.close()

  tokenizer = data.Tokenizer.maybe(opts.tokenizer_source)
  run_info = {
      'tool': 'maxact-jax',
      'dtype': opts.dtype,
      'batch_size': opts.batch_size,
      'max_samples': opts.max_samples,
      'source_tokenizer': opts.source_tokenizer,
      'tokenizer': opts.tokenizer,
      'weights': converters.weights_info(opts.model_path),
      'batch_shapes': [list(s) for s in plan.shapes],
      'num_batches': len(plan.groups),
      'resumed_at_batch': start,
      'tokens': corpus.num_tokens,
      'padding_ratio': plan.padding_ratio(corpus.lengths),
      'truncated_samples': corpus.truncated,
      'truncated_tokens': corpus.tokens_dropped,
      'step_memory_bytes': step_bytes,
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
  paths, anatomy_paths = ('', ''), None
  if writer:  # every process holds the same merged statistics; one writes them
    paths = results.write_documents(opts.output_dir, name, doc, top_doc)
    table = anatomy.TokenTable.build(config.vocab_size, tokenizer, anatomy.bos_token_id(opts.model_path, tokenizer))
    anatomy_paths = anatomy.write_measure_outputs(opts.output_dir, doc, acc.taps, acc.attributions, corpus, table)
    if os.path.exists(state_file):
      os.remove(state_file)  # the results are complete: nothing left to resume
  return Measurement(config, acc, corpus, plan, doc, top_doc, paths, timings, anatomy_paths)


def _progress(total: int, name: str, initial: int = 0):
  return tqdm(total=total, initial=initial, unit='tok', unit_scale=True, desc=f'  {name}', file=sys.stderr,
              dynamic_ncols=True, mininterval=0.5)


def layer_table(doc: dict) -> str:
  """The per-layer residual-stream table printed after a run.

  The peak token's max |x| against two medians, the two rules of Sun et al.'s criterion:
  its own median |x| (`/token med`, the reference's sun_peak_token_ratio) and the median |x|
  of the layer output of its sequence (`/layer med`, layer_median_peak_ratio); then how many
  tokens pass each rule (> 100 and > 1000x that median).
  """
  per = doc['per_layer_stats']
  lines = [f'{"layer":>5} {"rms":>10} {"abs_mean":>10} {"max":>12} {"min":>12} {"peak/token med":>14} '
           f'{"peak/layer med":>14} {"pass token":>10} {"pass layer":>10}']
  nan = float('nan')
  count = lambda v: f'{int(v):,}' if isinstance(v, (int, float)) else '—'
  for i in range(doc['num_hidden_layers']):
    s = per.get(f'layer_{i}_hidden')
    if not s:
      continue
    lines.append(f'{i:>5} {s["rms"]:>10.4g} {s["abs_mean"]:>10.4g} {s["max"]:>12.6g} {s["min"]:>12.6g} '
                 f'{s.get("sun_peak_token_ratio", nan):>14.4g} {s.get("layer_median_peak_ratio", nan):>14.4g} '
                 f'{count(s.get("sun_n_pass")):>10} {count(s.get("layer_median_n_pass")):>10}')
  return '\n'.join(lines)


def summary_lines(m: Measurement) -> list[str]:
  doc = m.doc
  run_info = doc.get('run', {})
  lines = [
      f'model {doc["model_name"]} ({doc["model_type"]}, {doc["num_hidden_layers"]} layers, hidden '
      f'{doc["hidden_size"]}), dtype {run_info.get("dtype")}',
      data.describe_corpus(m.corpus),
      f'{run_info.get("num_batches")} batches of {doc["run"]["batch_size"]} in '
      f'{len(run_info.get("batch_shapes", []))} shapes, padding {100 * run_info.get("padding_ratio", 0):.1f}%',
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


__all__ = ['MeasureOptions', 'Measurement', 'load_measure_corpus', 'measure', 'layer_table', 'summary_lines',
           'planted_report']
