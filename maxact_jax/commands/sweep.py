"""`maxact-jax sweep`: measure a list of configs (flagfiles), skipping finished ones, then report.

    maxact-jax sweep --flagfile=configs/sweep_paper.flags [--root=/path/with/models_and_datasets]
    maxact-jax sweep --configs=configs/paper/Qwen3-8B.flags,configs/paper/Qwen3-32B.flags --output_dir=runs/x

Exit status 0 when every config was measured or skipped and the report was
written; 1 when a model failed (the others still ran) or no report could be
written; 2 on bad input (a missing or malformed config), before anything runs.
Each config is read here, with the measure command's own flag set
(`read_config`); the measuring and the report are in `maxact_jax.sweep`.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from maxact_jax import measure, results, sweep
from maxact_jax.commands import measure as measure_command
from maxact_jax.errors import UserError

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


def read_config(path: str, overrides: Sequence[str] = (), root: str | None = None) -> measure.MeasureOptions:
  """The MeasureOptions a measure flagfile stands for.

  overrides: 'flag=value' items applied after the file (e.g. 'max_samples=64').
  root: relative --model_path and --data_path are taken relative to it.
  """
  if not os.path.isfile(path):
    raise UserError(f'config {path} does not exist')
  fv: flags.FlagValues = measure_command.FLAGS
  argv = ['sweep', f'--flagfile={path}']
  for item in overrides:
    if '=' not in item:
      raise UserError(f'--overrides item {item!r} is not flag=value')
    argv.append('--' + item.lstrip('-'))
  fv.unparse_flags()
  try:
    try:
      fv(argv)
    except flags.Error as e:
      raise UserError(f'{path}: {str(e).splitlines()[0]}') from None
    if not fv.model_path:
      raise UserError(f'{path} sets no --model_path')
    if fv.crosscheck:
      raise UserError(f'{path} sets --crosscheck: a sweep only measures (run crosscheck on its own)')
    try:
      opts = measure_command.options(fv)
    except UserError as e:
      raise UserError(f'{path}: {e}') from None
  finally:
    fv.unparse_flags()  # leave the measure command's flags as a fresh process has them
  if root:
    if not os.path.isabs(opts.model_path):
      opts.model_path = os.path.join(root, opts.model_path)
    if opts.data_path and not os.path.isabs(opts.data_path):
      opts.data_path = os.path.join(root, opts.data_path)
  return opts


def plan(config_paths: Sequence[str], output_dir: str, overrides: Sequence[str] = (),
         root: str | None = None, progress: bool | None = None) -> list[sweep.SweepEntry]:
  """Read every config first: a bad one stops the sweep before anything runs."""
  if not config_paths:
    raise UserError('no configs given (--configs=a.flags,b.flags or --flagfile=configs/sweep_paper.flags)')
  entries, seen = [], {}
  for path in config_paths:
    opts = read_config(path, overrides, root)
    opts.output_dir = output_dir
    if progress is not None:
      opts.progress = progress
    name = results.model_name_of(opts.model_path)
    if name in seen:
      raise UserError(f'{path} and {seen[name]} both measure a model named {name}: their results would collide')
    seen[name] = path
    entries.append(sweep.SweepEntry(path, name, opts))
  return entries


def run() -> int:
  entries = plan(FLAGS.configs or [], FLAGS.output_dir, FLAGS.overrides, FLAGS.root, FLAGS.progress)
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
