"""`maxact-jax corpus`: write the built-in corpus as JSON lines (`text`, `category`).

The file is what `measure` uses when no --data_path is given: with
--tokenizer (the checkpoint's), exactly the same samples; without it, the
same documents cut at 4 UTF-8 bytes per budget token instead of at token
boundaries. The same seed gives a byte-identical file (on one Python version).
"""

from __future__ import annotations

import time

from absl import flags

from maxact_jax import corpus
from maxact_jax import data
from maxact_jax.commands import common
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()

flags.DEFINE_string('output_path', None, 'Where to write the corpus (JSON lines); written to a temporary '
                    'file, then renamed.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed of the generated text and of the order: the same seed gives a '
                     'byte-identical file.', flag_values=FLAGS)
flags.DEFINE_integer('num_samples', None, f'Number of samples (default {corpus.DEFAULT_NUM_SAMPLES}); the '
                     'category shares stay the same.', flag_values=FLAGS)
flags.DEFINE_string('tokenizer', None, 'Cut each document to its token budget in this tokenizer (a '
                    'checkpoint directory or a tokenizer.json), as measure does with the checkpoint\'s; '
                    'default: 4 UTF-8 bytes per budget token.', flag_values=FLAGS)


def run() -> int:
  if not FLAGS.output_path:
    raise UserError('--output_path is required (where to write the corpus)')
  common.check_positive('num_samples', FLAGS.num_samples)
  start = time.perf_counter()
  cutter = data.Tokenizer(FLAGS.tokenizer).cut if FLAGS.tokenizer else None
  samples = corpus.builtin_corpus(FLAGS.seed, FLAGS.num_samples, cut_to_tokens=cutter)
  data.write_jsonl(samples, FLAGS.output_path)
  stats = corpus.corpus_stats(samples)
  shares = ', '.join(f'{c} {n}' for c, n in stats['categories'].items())
  print(f'wrote {stats["samples"]:,} samples, {stats["chars"]:,} characters, to {FLAGS.output_path} '
        f'in {time.perf_counter() - start:.1f} s; categories: {shares}')
  return 0
