"""`maxact-jax intervene`: replace residual channels at chosen layers; the cost in loss and KL.

    maxact-jax intervene --model_path=DIR --channels=2:37 --mode=zero|channel_mean|massive_mean|massive_zero \
        [--controls=1] [--data_path=F]

Runs the unmodified model and the intervened ones on the same batches in one
step (the intervention goes through the capture interceptor, not a copy of
the model) and writes <output_dir>/json/<model>_intervention.json. All the
work is in `maxact_jax.intervene`.
"""

from __future__ import annotations

from absl import flags

from maxact_jax import fixtures, intervene
from maxact_jax.commands import common

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
common.define_data_flags(FLAGS, max_samples=64, max_seq_len=512)
flags.DEFINE_list('channels', None, 'Residual channels to replace, layer:channel, comma-separated; the layer '
                  'may be a range A-B (inclusive), e.g. 2:37 or 2-5:37,3:100. Layer L means the output of '
                  'decoder layer L (the layer_L_hidden tap).', flag_values=FLAGS)
flags.DEFINE_string('mode', 'zero', 'What replaces the chosen channels. ' + '; '.join(
    f'{m}: {intervene.MODE_MEANING[m]}' for m in intervene.MODES) + '. The mean modes take one more pass. '
    '(`mean`, the old name of channel_mean, is refused with a message: it read as Sun et al.\'s experiment.)',
    flag_values=FLAGS)
flags.DEFINE_integer('controls', 1, 'Also replace this many sets of random channels (as many, at the same '
                     'layers, none of the requested ones), as a baseline.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed of the random control channels.', flag_values=FLAGS)
flags.DEFINE_string('output_dir', 'runs/intervene', 'Results go to <output_dir>/json/.', flag_values=FLAGS)
flags.DEFINE_string('source_tokenizer', None, 'Tokenizer that made the input_ids of --data_path (see measure).',
                    flag_values=FLAGS)


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  common.check_positive('max_samples', FLAGS.max_samples)
  common.check_positive('max_seq_len', FLAGS.max_seq_len)
  common.check_positive('batch_size', FLAGS.batch_size, allow_none=False)
  model_path = FLAGS.model_path or fixtures.ensure_demo_checkpoint()
  result = intervene.intervene(intervene.InterveneOptions(
      model_path=model_path, output_dir=FLAGS.output_dir, channels=FLAGS.channels, mode=FLAGS.mode,
      controls=FLAGS.controls, seed=FLAGS.seed, data_path=FLAGS.data_path, max_samples=FLAGS.max_samples,
      max_seq_len=FLAGS.max_seq_len, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
      source_tokenizer=FLAGS.source_tokenizer, tokenizer=FLAGS.tokenizer))
  for line in intervene.summary_lines(result.doc):
    print(line)
  print(f'results: {result.path}')
  return 0
