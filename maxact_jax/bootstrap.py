"""Bootstrap subsets of a corpus, and how stable a measurement is across them.

The paper checks that its global maxima do not hinge on the particular 5,000
samples by measuring random subsets. Here a subset of size n keeps the
corpus's category mix: each category gets its largest-remainder share of n
(within one sample of exact), drawn without replacement inside the subset.
Repeat r of size n is a pure function of (records, seed, n, r), so files are
byte-identical for a seed and adding a size or a repeat leaves the others
unchanged.

`stability_summary` turns the activation-stats documents measured on those
subsets into the spread of the global maximum and of its location.
"""

from __future__ import annotations

import collections
import math
import os
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

from maxact_jax import data
from maxact_jax.corpus import allocate
from maxact_jax.errors import UserError

UNCATEGORIZED = 'uncategorized'


def category_of(record: Mapping[str, Any]) -> str:
  """The record's category; records without one (or with a non-string one) count as 'uncategorized'."""
  category = record.get('category')
  return category if isinstance(category, str) and category else UNCATEGORIZED


def subset_indices(categories: Sequence[str], size: int, seed: int, repeat: int) -> list[int]:
  """Indices (into the corpus, ascending) of repeat `repeat` of size `size`.

  Raises:
    UserError: `size` larger than the corpus (subsets are drawn without replacement) or below 1.
  """
  n = len(categories)
  if size < 1:
    raise UserError(f'subset sizes must be positive, got {size}')
  if size > n:
    raise UserError(f'subset size {size} is larger than the corpus ({n} samples); subsets are drawn '
                    'without replacement, so sizes must be at most the corpus size')
  by_category: dict[str, list[int]] = collections.defaultdict(list)
  for i, c in enumerate(categories):
    by_category[c].append(i)
  counts = {c: len(by_category[c]) for c in sorted(by_category)}
  quota = allocate(counts, size)
  rng = random.Random(f'maxact-jax bootstrap/{seed}/{size}/{repeat}')
  chosen: list[int] = []
  for c in counts:  # sorted: the draw does not depend on the corpus's category order
    chosen += rng.sample(by_category[c], quota[c])
  return sorted(chosen)


def subsets(records: Sequence[Mapping[str, Any]], sizes: Sequence[int], repeats: int,
            seed: int) -> Iterator[tuple[int, int, list[Mapping[str, Any]]]]:
  """(size, repeat, records of that subset in corpus order) for every size and repeat."""
  if repeats < 1:
    raise UserError(f'repeats must be at least 1, got {repeats}')
  categories = [category_of(r) for r in records]
  for size in sizes:
    subset_indices(categories, size, seed, 0)  # fail on a bad size before writing anything
  for size in sizes:
    for r in range(repeats):
      yield size, r, [records[i] for i in subset_indices(categories, size, seed, r)]


def subset_path(output_dir: str, size: int, repeat: int) -> str:
  return os.path.join(output_dir, str(size), f'r{repeat}.jsonl')


def write_subsets(records: Sequence[Mapping[str, Any]], sizes: Sequence[int], repeats: int, seed: int,
                  output_dir: str,
                  measure_fn: Callable[[str, int, int], dict] | None = None) -> dict[int, list[dict]]:
  """Write `<output_dir>/<size>/r<i>.jsonl` for every size and repeat.

  `measure_fn(path, size, repeat)`, when given, measures one subset file and
  returns its activation-stats document; the documents come back per size
  (in repeat order), ready for `stability_summary`. Without it nothing is
  measured and the result is empty.
  """
  results: dict[int, list[dict]] = {}
  for size, r, subset in subsets(records, sizes, repeats, seed):
    path = subset_path(output_dir, size, r)
    data.write_jsonl(subset, path)
    if measure_fn is not None:
      results.setdefault(size, []).append(measure_fn(path, size, r))
  return results


# ---------------------------------------------------------------------------
# Stability of a measurement across subsets.


def stability_summary(results: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[int, dict[str, Any]]:
  """Spread of the global maximum and of its location over the repeats of each size.

  Args:
    results: size -> activation-stats documents (one per repeat), each with
      `global_max_activation` (signed) and `global_max_location`.

  Returns:
    size -> {'repeats', 'abs_max_min', 'abs_max_max', 'abs_max_mean',
    'abs_max_std' (population std over repeats), 'relative_spread'
    ((max - min) / mean of |global max|; 0 when the mean is 0), 'locations'
    (sorted distinct locations), 'most_common_location' (ties: the first in
    sorted order), 'location_agreement' (share of repeats at the most common
    location)}.

  Raises:
    UserError: a size without documents or a document missing a key.
  """
  summary: dict[int, dict[str, Any]] = {}
  for size in sorted(results):
    docs = results[size]
    if not docs:
      raise UserError(f'no measurements for subset size {size}')
    values, locations = [], []
    for i, doc in enumerate(docs):
      try:
        values.append(abs(float(doc['global_max_activation'])))
        locations.append(str(doc['global_max_location']))
      except (KeyError, TypeError, ValueError):
        raise UserError(f'size {size}, repeat {i}: the document lacks a numeric global_max_activation '
                        'and a global_max_location') from None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    counts = collections.Counter(locations)
    top = max(sorted(counts), key=lambda loc: counts[loc])  # max keeps the first of equal counts
    summary[size] = {
        'repeats': len(values),
        'abs_max_min': min(values),
        'abs_max_max': max(values),
        'abs_max_mean': mean,
        'abs_max_std': std,
        'relative_spread': (max(values) - min(values)) / mean if mean else 0.0,
        'locations': sorted(counts),
        'most_common_location': top,
        'location_agreement': counts[top] / len(values),
    }
  return summary
