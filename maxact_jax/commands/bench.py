"""`maxact-jax bench`: statistics overhead, speed and the PyTorch pipeline, in one run."""

from __future__ import annotations

from absl import flags

from maxact_jax import bench
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
flags.DEFINE_string('output_dir', 'runs/bench', 'bench.json, the bench checkpoint and corpus go here.',
                    flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'Sequences per batch.', flag_values=FLAGS)
flags.DEFINE_integer('num_samples', bench.NUM_SAMPLES, 'Samples in the bench corpus.', flag_values=FLAGS)
flags.DEFINE_integer('repeats', 2, 'Timed passes over the batches (the best is kept).', flag_values=FLAGS)
flags.DEFINE_boolean('end_to_end', True, 'Also time `maxact-jax measure` and the paper pipeline as '
                     'processes (cold compilation cache).', flag_values=FLAGS)


def run() -> int:
  common.check_positive('batch_size', FLAGS.batch_size, allow_none=False)
  common.check_positive('num_samples', FLAGS.num_samples, allow_none=False)
  common.check_positive('repeats', FLAGS.repeats, allow_none=False)
  result = bench.bench(bench.BenchOptions(FLAGS.output_dir, FLAGS.batch_size, FLAGS.num_samples, FLAGS.repeats,
                                          FLAGS.end_to_end))
  print(bench.format_table(result))
  print(f'wrote {FLAGS.output_dir}/bench.json')
  return 0
