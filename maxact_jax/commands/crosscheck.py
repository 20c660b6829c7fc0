"""`maxact-jax crosscheck`: every tap against transformers (PyTorch) on a sample batch.

Exit status 0 when every tap is within tolerance, 1 otherwise (the first
diverging tap in forward order is named), 2 on bad input.
"""

from __future__ import annotations

from absl import flags

from maxact_jax import crosscheck, fixtures
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS, dtype='float32')
flags.DEFINE_string('data_path', None, 'Corpus to take the sample batch from (default: the built-in corpus).',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_samples', 4, 'Samples in the batch.', flag_values=FLAGS)
flags.DEFINE_integer('max_seq_len', 64, 'Truncate samples to this many tokens.', flag_values=FLAGS)
flags.DEFINE_string('output_dir', 'runs/crosscheck', 'crosscheck.json goes here.', flag_values=FLAGS)
flags.DEFINE_float('tolerance', None, 'Relative tolerance (default: 1e-4 in float32, looser otherwise).',
                   flag_values=FLAGS)


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  common.check_positive('num_samples', FLAGS.num_samples, allow_none=False)
  common.check_positive('max_seq_len', FLAGS.max_seq_len, allow_none=False)
  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_path, data_path=FLAGS.data_path, num_samples=FLAGS.num_samples,
      max_seq_len=FLAGS.max_seq_len, dtype=FLAGS.dtype, output_dir=FLAGS.output_dir,
      tolerance=FLAGS.tolerance, tokenizer=FLAGS.tokenizer))
  print(crosscheck.format_report(report))
  return 0 if report['passed'] else 1
