"""`maxact-jax bootstrap`: category-stratified random subsets of a corpus.

Writes `<output_dir>/<size>/r<i>.jsonl` for every size and repeat i, plus
`<output_dir>/manifest.json` (source, seed, sizes, repeats, per-size category
counts). Each subset keeps the corpus's category mix (largest-remainder
allocation: every category within one sample of its exact share) and is
drawn without replacement, in corpus order; the same seed gives
byte-identical files. Records without a category form one more category,
'uncategorized' (a corpus with none is then a plain random subset).
With --model_path, every subset is also measured (results under
`<output_dir>/<size>/r<i>/json/`) and `<output_dir>/stability.json` says how
much the global maximum and its location move across the repeats of each
size, as the paper's bootstrap experiment does.
"""

from __future__ import annotations

import collections
import json
import os

from absl import flags

from maxact_jax import bootstrap
from maxact_jax import data
from maxact_jax.corpus import allocate
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
flags.DEFINE_string('model_path', None, 'Also measure every subset with this checkpoint and write '
                    'stability.json (the spread of the global maximum across repeats).', flag_values=FLAGS)
flags.DEFINE_string('dtype', 'bfloat16', 'With --model_path: dtype of the measurement.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'With --model_path: sequences per batch.', flag_values=FLAGS)
flags.DEFINE_integer('max_seq_len', 32768, 'With --model_path: truncate samples to this many tokens.',
                     flag_values=FLAGS)


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
  measure_fn = None
  if FLAGS.model_path:
    common.check_dtype(FLAGS.dtype)
    common.check_positive('batch_size', FLAGS.batch_size, allow_none=False)
    common.check_positive('max_seq_len', FLAGS.max_seq_len, allow_none=False)
    measure_fn = _measure_fn()
  documents = bootstrap.write_subsets(records, sizes, FLAGS.repeats, FLAGS.seed, FLAGS.output_dir, measure_fn)
  counts = collections.Counter(categories)
  counts = {c: counts[c] for c in sorted(counts)}
  manifest = {
      'data_path': FLAGS.data_path,
      'corpus_samples': len(records),
      'corpus_categories': counts,
      'seed': FLAGS.seed,
      'repeats': FLAGS.repeats,
      'sizes': {str(s): allocate(counts, s) for s in sizes},
  }
  data.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + '\n',
                  os.path.join(FLAGS.output_dir, 'manifest.json'))
  for s in sizes:
    print(f'size {s}: {FLAGS.repeats} subsets in {FLAGS.output_dir}/{s}/ '
          f'({", ".join(f"{c} {n}" for c, n in manifest["sizes"][str(s)].items())})')
  if documents:
    summary = bootstrap.stability_summary(documents)
    data.write_text(json.dumps({str(k): v for k, v in summary.items()}, indent=2) + '\n',
                    os.path.join(FLAGS.output_dir, 'stability.json'))
    for size, row in summary.items():
      print(f'size {size}: |global max| {row["abs_max_min"]:.6g} .. {row["abs_max_max"]:.6g} '
            f'(relative spread {row["relative_spread"]:.3g}); most common location '
            f'{row["most_common_location"]} in {row["location_agreement"]:.0%} of repeats')
  return 0


def _measure_fn():
  """measure_fn(path, size, repeat) for bootstrap.write_subsets: one measure per subset."""
  # Start-up: JAX only when measuring.
  from maxact_jax import measure  # pylint: disable=import-outside-toplevel

  def measure_subset(path: str, size: int, repeat: int) -> dict:
    out = os.path.join(FLAGS.output_dir, str(size), f'r{repeat}')
    m = measure.measure(measure.MeasureOptions(
        model_path=FLAGS.model_path, output_dir=out, data_path=path, max_samples=None,
        max_seq_len=FLAGS.max_seq_len, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, progress=False))
    return m.doc

  return measure_subset
