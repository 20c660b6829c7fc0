"""`maxact-jax measure`: every tap of a checkpoint on a corpus, in the reference's schema."""

from __future__ import annotations

from absl import flags

from maxact_jax import fixtures, measure
from maxact_jax.commands import common
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
common.define_data_flags(FLAGS)
flags.DEFINE_string('output_dir', 'runs/measure', 'Results go to <output_dir>/json/.', flag_values=FLAGS)
flags.DEFINE_boolean('progress', True, 'Show a progress bar with tokens/s.', flag_values=FLAGS)
flags.DEFINE_integer('checkpoint_every', 0, 'Save a resumable state under <output_dir>/state/ every N '
                     'batches (0: never).', flag_values=FLAGS)
flags.DEFINE_boolean('resume', False, 'Continue from the state saved by --checkpoint_every (refused if the '
                     'checkpoint, corpus or batching flags differ).', flag_values=FLAGS)
flags.DEFINE_float('device_memory_gb', None, 'Memory of one device for the memory guard (default: what '
                   'the device reports; the host memory on CPU).', flag_values=FLAGS)
flags.DEFINE_string('source_tokenizer', None, 'Tokenizer (directory or tokenizer.json) that made the '
                    'input_ids of --data_path: they are decoded with it and re-encoded with the '
                    "checkpoint's tokenizer, as the paper did from Llama-2 ids.", flag_values=FLAGS)
flags.DEFINE_boolean('crosscheck', False, 'First check every tap against transformers on a sample batch.',
                     flag_values=FLAGS)


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  common.check_positive('batch_size', FLAGS.batch_size, allow_none=False)
  common.check_positive('max_samples', FLAGS.max_samples)
  common.check_positive('max_seq_len', FLAGS.max_seq_len)
  if FLAGS.checkpoint_every < 0:
    raise UserError(f'--checkpoint_every must be 0 or positive, got {FLAGS.checkpoint_every}')
  if FLAGS.device_memory_gb is not None and FLAGS.device_memory_gb <= 0:
    raise UserError(f'--device_memory_gb must be positive, got {FLAGS.device_memory_gb}')
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
      dtype=FLAGS.dtype, progress=FLAGS.progress, checkpoint_every=FLAGS.checkpoint_every,
      resume=FLAGS.resume, device_memory_gb=FLAGS.device_memory_gb, source_tokenizer=FLAGS.source_tokenizer)
  m = measure.measure(opts)
  print(measure.layer_table(m.doc))
  for line in measure.summary_lines(m):
    print(line)
  planted = fixtures.planted_info(model_path)
  if planted:
    print(measure.planted_report(m.doc, planted))
  print(f'results: {m.paths[0]}\n         {m.paths[1]}')
  return 0
