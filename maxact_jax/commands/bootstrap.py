"""`maxact-jax bootstrap`: category-stratified random subsets of a corpus.

Writes `<output_dir>/<size>/r<i>.jsonl` for every size and repeat i, plus
`<output_dir>/manifest.json` (source, seed, sizes, repeats, per-size category
counts). Each subset keeps the corpus's category mix (largest-remainder
allocation: every category within one sample of its exact share) and is
drawn without replacement, in corpus order; the same seed gives
byte-identical files. Records without a category form one more category,
'uncategorized' (a corpus with none is then a plain random subset).
Measuring the subsets and summarising the spread of the global maximum is
`maxact_jax.bootstrap.write_subsets(..., measure_fn)` and `stability_summary`.
"""

from __future__ import annotations

import collections
import json
import os

from absl import flags

from maxact_jax import bootstrap
from maxact_jax import data
from maxact_jax.commands import common
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()

flags.DEFINE_string('data_path', None, f'Corpus to draw from: {data.FORMATS_HELP}. Records without a '
                    f'category count as one category, "{bootstrap.UNCATEGORIZED}".', flag_values=FLAGS)
flags.DEFINE_list('sizes', None, 'Subset sizes, comma-separated (e.g. 1000,2000); each at most the corpus '
                  'size, since subsets are drawn without replacement (a larger size is an error naming the '
                  'corpus size).', flag_values=FLAGS)
flags.DEFINE_integer('repeats', 5, 'Subsets drawn per size.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed of the draws: the same seed gives byte-identical files.',
                     flag_values=FLAGS)
flags.DEFINE_string('output_dir', None, 'Folder for <size>/r<i>.jsonl and manifest.json.', flag_values=FLAGS)


def parse_sizes(values: list[str] | None) -> list[int]:
  """Positive integer sizes, duplicates dropped, in the order given."""
  if not values:
    raise UserError('--sizes is required (comma-separated subset sizes, e.g. --sizes=1000,2000)')
  sizes: list[int] = []
  for v in values:
    try:
      size = int(v)
    except ValueError:
      raise UserError(f'--sizes: {v!r} is not an integer') from None
    if size < 1:
      raise UserError(f'--sizes: subset sizes must be positive, got {size}')
    if size not in sizes:
      sizes.append(size)
  return sizes


def run() -> int:
  if not FLAGS.data_path:
    raise UserError('--data_path is required (the corpus to draw subsets from)')
  if not FLAGS.output_dir:
    raise UserError('--output_dir is required (where to write the subsets)')
  sizes = parse_sizes(FLAGS.sizes)
  common.check_positive('repeats', FLAGS.repeats, allow_none=False)
  records = data.read_corpus_records(FLAGS.data_path)
  categories = [bootstrap.category_of(r) for r in records]
  too_big = [s for s in sizes if s > len(records)]
  if too_big:
    raise UserError(f'subset size {too_big[0]} is larger than the corpus ({len(records)} samples in '
                    f'{FLAGS.data_path}); subsets are drawn without replacement')
  bootstrap.write_subsets(records, sizes, FLAGS.repeats, FLAGS.seed, FLAGS.output_dir)
  counts = collections.Counter(categories)
  counts = {c: counts[c] for c in sorted(counts)}
  manifest = {
      'data_path': FLAGS.data_path,
      'corpus_samples': len(records),
      'corpus_categories': counts,
      'seed': FLAGS.seed,
      'repeats': FLAGS.repeats,
      'sizes': {str(s): bootstrap.allocate(counts, s) for s in sizes},
  }
  data.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + '\n',
                  os.path.join(FLAGS.output_dir, 'manifest.json'))
  for s in sizes:
    print(f'size {s}: {FLAGS.repeats} subsets in {FLAGS.output_dir}/{s}/ '
          f'({", ".join(f"{c} {n}" for c, n in manifest["sizes"][str(s)].items())})')
  return 0
