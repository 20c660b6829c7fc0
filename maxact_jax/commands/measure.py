"""`maxact-jax measure`: every tap of a checkpoint on a corpus, in the reference's schema."""

from __future__ import annotations

from absl import flags

from maxact_jax import fixtures, measure
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
common.define_data_flags(FLAGS)
flags.DEFINE_string('output_dir', 'runs/measure', 'Results go to <output_dir>/json/.', flag_values=FLAGS)
flags.DEFINE_boolean('progress', True, 'Show a progress bar with tokens/s.', flag_values=FLAGS)
flags.DEFINE_boolean('crosscheck', False, 'First check every tap against transformers on a sample batch.',
                     flag_values=FLAGS)


def options(fv: flags.FlagValues) -> measure.MeasureOptions:
  """The (checked) MeasureOptions of a parsed measure flag set; `sweep` reads flagfiles with it."""
  common.check_dtype(fv.dtype)
  common.check_positive('batch_size', fv.batch_size, allow_none=False)
  common.check_positive('max_samples', fv.max_samples)
  common.check_positive('max_seq_len', fv.max_seq_len)
  return measure.MeasureOptions(
      model_path=fv.model_path, output_dir=fv.output_dir, data_path=fv.data_path, max_samples=fv.max_samples,
      max_seq_len=fv.max_seq_len, batch_size=fv.batch_size, dtype=fv.dtype, progress=fv.progress)


def run() -> int:
  opts = options(FLAGS)
  model_path = opts.model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  if FLAGS.crosscheck:
    from maxact_jax import crosscheck  # pylint: disable=import-outside-toplevel
    report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
        model_path=model_path, data_path=FLAGS.data_path, dtype=FLAGS.dtype,
        output_dir=FLAGS.output_dir, max_seq_len=min(FLAGS.max_seq_len or 256, 256)))
    print(crosscheck.format_report(report))
    if not report['passed']:
      print('crosscheck failed: not measuring')
      return 1
  m = measure.measure(opts)
  print(measure.layer_table(m.doc))
  for line in measure.summary_lines(m):
    print(line)
  planted = fixtures.planted_info(model_path)
  if planted:
    print(measure.planted_report(m.doc, planted))
  print(f'results: {m.paths[0]}\n         {m.paths[1]}')
  return 0
