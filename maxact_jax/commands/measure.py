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


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  common.check_positive('batch_size', FLAGS.batch_size, allow_none=False)
  common.check_positive('max_samples', FLAGS.max_samples)
  common.check_positive('max_seq_len', FLAGS.max_seq_len)
  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  if FLAGS.crosscheck:
    from maxact_jax import crosscheck  # pylint: disable=import-outside-toplevel
    report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
        model_path=model_path, data_path=FLAGS.data_path, dtype=FLAGS.dtype,
        output_dir=FLAGS.output_dir, max_seq_len=min(FLAGS.max_seq_len or 256, 256)))
    print(crosscheck.format_report(report))
    if not report['passed']:
      print('crosscheck failed: not measuring')
      return 1
  opts = measure.MeasureOptions(
      model_path=model_path, output_dir=FLAGS.output_dir, data_path=FLAGS.data_path,
      max_samples=FLAGS.max_samples, max_seq_len=FLAGS.max_seq_len, batch_size=FLAGS.batch_size,
      dtype=FLAGS.dtype, progress=FLAGS.progress)
  m = measure.measure(opts)
  print(measure.layer_table(m.doc))
  for line in measure.summary_lines(m):
    print(line)
  planted = fixtures.planted_info(model_path)
  if planted:
    print(measure.planted_report(m.doc, planted))
  print(f'results: {m.paths[0]}\n         {m.paths[1]}')
  return 0
