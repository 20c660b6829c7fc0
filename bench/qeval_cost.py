"""Benchmark: what one qeval scheme pass costs against a plain forward pass on the same batches.

The plain pass is the jitted forward with the language-model head and the
next-token loss (what any evaluation of the model runs); the bare backbone
forward (no head) is timed too. A scheme pass is `qeval`'s: the model with
fake-quantized weights, every linear input fake-quantized through the
interceptor with its statistics reduced on device, and the next-token metrics
(loss, KL, top-1) against the baseline's kept hidden states, so the head runs
twice. The issue's bar: a scheme pass within about 1.5x the plain pass.

  PYTHONPATH=. python bench/qeval_cost.py [--model_path=DIR] [--samples=32] [--max_seq_len=512] \
      [--schemes=w8a8,w8a8-static,w4a4+rotate] [--repeats=5]

Default model: the demo checkpoint (built on first use). After a warm-up run of
every pass (compilation excluded) the passes run interleaved, plain, scheme 1,
scheme 2, ..., --repeats times; reported are each pass's median and, per
scheme, the median of its ratios to the plain pass of the same round, so that
a machine shared with other work slows both sides alike. Prints a table and
writes runs/bench/qeval_cost.json.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

flags.DEFINE_string('model_path', None, 'Checkpoint (default: the demo checkpoint).')
flags.DEFINE_string('data_path', None, 'Corpus (default: the built-in one).')
flags.DEFINE_integer('calibration_samples', 8, 'Calibration samples (for the static schemes).')
flags.DEFINE_integer('samples', 32, 'Evaluation samples timed.')
flags.DEFINE_integer('max_seq_len', 512, 'Truncate samples to this many tokens.')
flags.DEFINE_integer('batch_size', 8, 'Sequences per batch.')
flags.DEFINE_integer('max_shapes', 2, 'Padded batch lengths.')
flags.DEFINE_string('dtype', 'float32', 'float32 or bfloat16.')
flags.DEFINE_list('schemes', ['w8a8', 'w8a8-static', 'w4a4+rotate'], 'Schemes to time.')
flags.DEFINE_integer('repeats', 5, 'Timed rounds.')
flags.DEFINE_string('output', 'runs/bench/qeval_cost.json', 'Where the JSON results go.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from maxact_jax import data, fakequant, fixtures, measure, measure_step, next_token, qeval, qschemes, qtransforms
  from maxact_jax.families import load_config
  from maxact_jax.models import transformer

  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  config = load_config(model_path)
  dtype = measure_step.DTYPES[FLAGS.dtype]
  n_cal = FLAGS.calibration_samples
  corpus = measure.load_measure_corpus(measure.MeasureOptions(
      model_path=model_path, output_dir='runs/bench', data_path=FLAGS.data_path,
      max_samples=n_cal + FLAGS.samples, max_seq_len=FLAGS.max_seq_len), config)
  calib, evals = qeval.split_samples(corpus, n_cal, n_cal, FLAGS.samples)
  opts = qeval.QevalOptions(model_path=model_path, output_dir='runs/bench', batch_size=FLAGS.batch_size,
                            max_shapes=FLAGS.max_shapes, progress=False)
  pad = config.pad_token_id or 0
  params = measure_step.load_params(model_path, config, FLAGS.dtype)
  runner = qeval._Runner(evals, opts, pad, 'bench')  # pylint: disable=protected-access
  batches = list(data.iter_batches(evals, runner.plan, pad))
  calibrations = qeval.Calibrations(config, dtype, params,
                                    qeval._Runner(calib, opts, pad, 'bench'))  # pylint: disable=protected-access

  model = transformer.build(config, dtype)

  @jax.jit
  def plain(p, ids, valid):
    h = model.apply({'params': p}, ids, valid)
    lp = next_token.head_log_probs(model, p)(h[:, :-1])
    nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(valid[:, :-1] & valid[:, 1:], nll, 0.0).sum()

  backbone = measure_step.make_forward(config, dtype)
  base_step = qeval.make_baseline_step(config, dtype)
  hidden = [base_step(params, b.input_ids, b.valid)[0] for b in batches]

  passes = {'plain': lambda: [plain(params, b.input_ids, b.valid) for b in batches],
            'backbone': lambda: [backbone(params, b.input_ids, b.valid) for b in batches]}
  for name in FLAGS.schemes:
    scheme = qschemes.parse_scheme(name)
    s_config, t_params, info = calibrations.model(scheme.transforms)
    s_params = qtransforms.map_kernels(s_config, t_params, lambda w, s=scheme: fakequant.quantize_weight(w, s.weights),
                                       gates=scheme.router) if scheme.weights.fmt != fakequant.NONE else t_params
    static = calibrations.thresholds(scheme.transforms, scheme.acts.clip) if scheme.acts.static else None
    table = qeval.layer_table(config, static) if static else {}
    step = qeval.make_scheme_step(config, s_config, dtype, scheme, info.get('online'))
    passes[name] = (lambda step=step, s_params=s_params, table=table:
                    [step(params, s_params, b.input_ids, b.valid, h, table) for b, h in zip(batches, hidden)])

  def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t

  for fn in passes.values():  # compile every shape once
    timed(fn)
  times = {name: [] for name in passes}
  for _ in range(FLAGS.repeats):
    for name, fn in passes.items():
      times[name].append(timed(fn))
  tokens = sum(b.num_tokens for b in batches)
  rows = {}
  for name, ts in times.items():
    ratios = [t / p for t, p in zip(ts, times['plain'])]
    rows[name] = {'median_s': statistics.median(ts), 'tokens_per_s': tokens / statistics.median(ts),
                  'ratio_to_plain': statistics.median(ratios), 'times_s': ts}
  result = {'model_path': model_path, 'dtype': FLAGS.dtype, 'tokens': tokens,
            'batch_shapes': [list(s) for s in runner.plan.shapes], 'devices': [str(d) for d in jax.devices()],
            'repeats': FLAGS.repeats, 'passes': rows}
  os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
  with open(FLAGS.output, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'{tokens:,} tokens in {len(batches)} batches of shapes {runner.plan.shapes}, {FLAGS.dtype}, '
        f'{jax.devices()[0].platform}; medians of {FLAGS.repeats} interleaved rounds')
  print(f'{"pass":<16} {"median s":>9} {"tokens/s":>10} {"x plain":>8}')
  for name, r in rows.items():
    print(f'{name:<16} {r["median_s"]:>9.3f} {r["tokens_per_s"]:>10,.0f} {r["ratio_to_plain"]:>8.2f}')
  print(f'written {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
