"""`maxact-jax sweep`: measure a list of configs (flagfiles), skipping finished ones, then report.

    maxact-jax sweep --flagfile=configs/sweep_paper.flags [--root=/path/with/models_and_datasets]
    maxact-jax sweep --configs=configs/paper/Qwen3-8B.flags,configs/paper/Qwen3-32B.flags --output_dir=runs/x

Exit status 0 when every config was measured or skipped and the report was
written; 1 when a model failed (the others still ran) or no report could be
written; 2 on bad input (a missing or malformed config), before anything runs.
All the work is in `maxact_jax.sweep`.
"""

from __future__ import annotations

import os

from absl import flags

from maxact_jax import sweep

FLAGS = flags.FlagValues()
flags.DEFINE_list('configs', None, 'Measure flagfiles, in order (e.g. configs/paper/Qwen3-8B.flags,...).',
                  flag_values=FLAGS)
flags.DEFINE_string('output_dir', 'runs/sweep', 'Every model\'s results go to <output_dir>/json/ (this wins over '
                    'a config\'s --output_dir).', flag_values=FLAGS)
flags.DEFINE_string('report_dir', None, 'Where the report is written. Default: <output_dir>/report.',
                    flag_values=FLAGS)
flags.DEFINE_string('root', None, 'Relative --model_path and --data_path of the configs are taken relative to '
                    'this folder (default: the current directory), e.g. one holding models/ and datasets/.',
                    flag_values=FLAGS)
flags.DEFINE_list('overrides', [], 'measure flags applied to every config, e.g. max_samples=64,dtype=float32.',
                  flag_values=FLAGS)
flags.DEFINE_string('pairs', None, 'MoE:dense pairs for the report (see `maxact-jax report --help`).',
                    flag_values=FLAGS)
flags.DEFINE_boolean('dry_run', False, 'List what would be measured or skipped, run nothing.', flag_values=FLAGS)
flags.DEFINE_boolean('progress', None, 'Progress bars (default: as each config says).', flag_values=FLAGS)


def run() -> int:
  entries = sweep.plan(FLAGS.configs or [], FLAGS.output_dir, FLAGS.overrides, FLAGS.root, FLAGS.progress)
  report_dir = FLAGS.report_dir or os.path.join(FLAGS.output_dir, 'report')
  if FLAGS.dry_run:
    for e in entries:
      state = 'skip (results exist)' if sweep.finished(FLAGS.output_dir, e.name) else 'measure'
      o = e.options
      print(f'{state:<21} {e.name:<24} {o.model_path}  data={o.data_path or "builtin"} '
            f'max_samples={o.max_samples} max_seq_len={o.max_seq_len} batch_size={o.batch_size} dtype={o.dtype}')
    return 0
  result = sweep.run(entries, FLAGS.output_dir, report_dir, FLAGS.pairs)
  for line in sweep.summary_lines(result, report_dir):
    print(line)
  return 0 if result.ok else 1
