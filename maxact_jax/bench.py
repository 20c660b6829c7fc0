"""`maxact-jax bench`: the statistics' cost, the tool's speed, and the PyTorch pipeline it replaces.

One run on this machine, ratios measured side by side:

- `overhead_ratio`: the jitted statistics step against the same jitted forward
  pass without capture, over the same batches (compiled beforehand, so this is
  the cost of the statistics alone);
- `torch_forward_s`: transformers' eager forward (no hooks) on the same batches;
- `mfu`: the statistics step's model FLOPs per second against this machine's
  measured float32 matmul peak;
- end to end, as processes started from scratch with an empty compilation cache:
  `maxact-jax measure` against the paper's pipeline
  (`python -m maxact_jax.torch_reference`) on the same checkpoint and corpus
  (`speedup_vs_reference`, `tokens_per_s`);
- `padding_ratio`, `compiled_shapes`, `compile_s`.

The bench checkpoint is a random-init qwen3 (hidden 512, 8 layers, 8 heads, 4
kv heads, intermediate 1536, vocab 8192); the corpus is 256 samples of the
built-in corpus (its own length plan at twice the budgets), 32 to 1,024 tokens,
in the reference's input_ids format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import atomic, data, fixtures, measure_step, results
from maxact_jax.config import ModelConfig
from maxact_jax.corpus import builtin_corpus
from maxact_jax.families import load_config

SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             intermediate_size=1536)
VOCAB = 8192
NUM_SAMPLES = 256
MIN_LEN, MAX_LEN = 32, 1024
# In the corpus file's name: a bench directory kept from an earlier definition of the
# corpus gets a new file rather than silently timing the old one.
CORPUS_VERSION = 2


@dataclasses.dataclass
class BenchOptions:
  output_dir: str
  batch_size: int = 8
  num_samples: int = NUM_SAMPLES
  repeats: int = 2  # timed passes over the batches (the best is kept)
  end_to_end: bool = True  # also time the two pipelines as processes


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


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
  """This machine's float32 matmul rate through XLA (GFLOP/s), best of many: a shared
  machine's slow moments would otherwise pass for its peak (measured before and
  after the timed passes, the larger kept)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def forward_flops(config: ModelConfig, batches: list[data.Batch]) -> float:
  """Model FLOPs of the batches (padded shapes, as computed): 2 per weight per token in
  the projections and MLPs, plus the attention scores and their weighted sum."""
  c = config
  per_layer = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
               + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
  total = 0.0
  for b in batches:
    rows, t = b.input_ids.shape
    total += 2 * per_layer * rows * t * c.num_hidden_layers
    total += 4 * rows * t * t * c.num_attention_heads * c.head_dim * c.num_hidden_layers
  return total


def _timed_passes(fn, params, batches, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    outs = [fn(params, jnp.asarray(b.input_ids), jnp.asarray(b.valid)) for b in batches]
    jax.block_until_ready(outs)
    best = min(best, time.perf_counter() - t)
  return best


def torch_forward_seconds(model_dir: str, batches: list[data.Batch], repeats: int) -> float:
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel

  # It imports torch (the optional PyTorch side).
  from maxact_jax import torch_reference  # pylint: disable=import-outside-toplevel

  model = torch_reference.load_hf_model(model_dir, 'float32', attn_implementation=None)
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


def end_to_end(model_dir: str, data_path: str, out: str, batch_size: int) -> dict[str, float]:
  """Both pipelines as fresh processes; ours with an empty compilation cache."""
  env = dict(os.environ)
  with tempfile.TemporaryDirectory(prefix='maxact-bench-xla-') as cache:
    env['JAX_COMPILATION_CACHE_DIR'] = cache
    ours = _process_seconds([sys.executable, '-m', 'maxact_jax.cli', 'measure', f'--model_path={model_dir}',
                             f'--data_path={data_path}', f'--output_dir={out}/ours', '--dtype=float32',
                             f'--batch_size={batch_size}', '--progress=false'], env)
  ref = _process_seconds([sys.executable, '-m', 'maxact_jax.torch_reference', f'--model_path={model_dir}',
                          f'--data_path={data_path}', f'--output_dir={out}/reference', '--dtype=float32',
                          f'--batch_size={batch_size}'], env)
  return {'measure_s': ours, 'reference_s': ref}


def bench(opts: BenchOptions) -> dict[str, Any]:
  results.ensure_output_dir(opts.output_dir)  # a file there is a UserError
  model_dir = build_checkpoint(os.path.join(opts.output_dir, 'bench-qwen3'))
  corpus_name = f'bench_ids_v{CORPUS_VERSION}_{opts.num_samples}.jsonl'
  data_path = build_corpus(model_dir, os.path.join(opts.output_dir, corpus_name), opts.num_samples)
  config = load_config(model_dir)
  corpus = data.load_corpus(data_path, vocab_size=config.vocab_size)
  plan = data.plan_batches(corpus.lengths, opts.batch_size)  # as measure plans them
  batches = list(data.iter_batches(corpus, plan, config.pad_token_id or 0))
  params = measure_step.load_params(model_dir, config, 'float32')
  forward = measure_step.make_forward(config, jnp.float32)
  step = measure_step.make_stats_step(config, jnp.float32)
  compile_s = {'forward': 0.0, 'stats': 0.0}
  for shape in plan.shapes:  # compile every shape first: the timed passes measure execution
    ids, valid = jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool)
    for name, fn in (('forward', forward), ('stats', step)):
      t = time.perf_counter()
      jax.block_until_ready(fn(params, ids, valid))
      compile_s[name] += time.perf_counter() - t
  peak = matmul_peak_gflops()
  forward_s = _timed_passes(forward, params, batches, opts.repeats)
  stats_s = _timed_passes(step, params, batches, opts.repeats)
  peak = max(peak, matmul_peak_gflops())
  flops = forward_flops(config, batches)
  result: dict[str, Any] = {
      'model_path': model_dir,
      'data_path': data_path,
      'tokens': corpus.num_tokens,
      'batch_size': opts.batch_size,
      'compiled_shapes': len(plan.shapes),
      'padding_ratio': plan.padding_ratio(corpus.lengths),
      'compile_s': compile_s['stats'],
      'forward_compile_s': compile_s['forward'],
      'forward_s': forward_s,
      'stats_step_s': stats_s,
      'overhead_ratio': stats_s / forward_s,
      'torch_forward_s': torch_forward_seconds(model_dir, batches, opts.repeats),
      'matmul_peak_gflops': peak,
      'stats_gflops': flops / stats_s / 1e9,
      'mfu': flops / stats_s / 1e9 / peak,
  }
  if opts.end_to_end:
    e2e = end_to_end(model_dir, data_path, os.path.join(opts.output_dir, 'runs'), opts.batch_size)
    result.update(e2e)
    result['speedup_vs_reference'] = e2e['reference_s'] / e2e['measure_s']
    result['tokens_per_s'] = corpus.num_tokens / e2e['measure_s']
  atomic.write_json(os.path.join(opts.output_dir, 'bench.json'), result)
  return result


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
    ('matmul_peak_gflops', 'matmul peak GFLOP/s', '{:.1f}'),
    ('mfu', 'mfu', '{:.2f}'),
    ('measure_s', 'maxact-jax measure, end to end (s)', '{:.1f}'),
    ('reference_s', "the paper's pipeline, end to end (s)", '{:.1f}'),
    ('speedup_vs_reference', 'speedup vs the paper pipeline', '{:.2f}x'),
    ('tokens_per_s', 'tokens/s of measure, end to end', '{:,.0f}'),
)


def format_table(result: dict[str, Any]) -> str:
  width = max(len(label) for _, label, _ in ROWS)
  return '\n'.join(f'{label:<{width}}  {fmt.format(result[key])}' for key, label, fmt in ROWS if key in result)
