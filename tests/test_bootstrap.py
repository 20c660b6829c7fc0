"""Bootstrap subsets: allocation, proportions, determinism, bad input, and the stability summary."""

from __future__ import annotations

import collections
import json
import math
import random

import numpy as np

import pytest

from maxact_jax import bootstrap, corpus
from maxact_jax.errors import UserError

from tests.corpus_helpers import assert_one_error, run_cli


def make_records(counts: dict[str, int]) -> list[dict]:
  """Records interleaved across categories, each text unique."""
  out = [{'text': f'{c} sample {i}', 'category': c} for c, n in counts.items() for i in range(n)]
  random.Random(0).shuffle(out)
  return out


def write_corpus(path, records) -> str:
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


COUNTS = {'code': 130, 'math': 37, 'prose': 251, 'web': 82}


# ---------------------------------------------------------------------------
# allocate.


def test_allocate_hand_computed():
  # exact shares 3.5, 2.1, 1.4: floors 3, 2, 1 leave one sample, for the largest remainder (a: 0.5).
  assert corpus.allocate({'a': 5, 'b': 3, 'c': 2}, 7) == {'a': 4, 'b': 2, 'c': 1}
  # equal remainders: the mapping's order decides, deterministically.
  assert corpus.allocate({'x': 1, 'y': 1, 'z': 1}, 2) == {'x': 1, 'y': 1, 'z': 0}
  assert corpus.allocate({'a': 5, 'b': 0}, 3) == {'a': 3, 'b': 0}
  assert corpus.allocate({'a': 0.25, 'b': 0.75}, 10) == {'a': 3, 'b': 7}  # 2.5 -> 3 wins the tie by order


@pytest.mark.parametrize('seed', range(20))
def test_allocate_is_within_one_of_exact(seed):
  rng = random.Random(seed)
  counts = {f'c{i}': rng.randrange(0, 500) for i in range(rng.randrange(1, 9))}
  counts['last'] = rng.randrange(1, 500)
  size = rng.randrange(0, sum(counts.values()) + 1)
  out = corpus.allocate(counts, size)
  assert sum(out.values()) == size
  total = sum(counts.values())
  for c, n in counts.items():
    assert abs(out[c] - size * n / total) < 1
    assert out[c] <= n  # never more than the category holds when size <= total


def test_allocate_bad_input():
  with pytest.raises(UserError, match='empty corpus'):
    corpus.allocate({}, 3)
  with pytest.raises(UserError, match='non-negative'):
    corpus.allocate({'a': 3}, -1)


# ---------------------------------------------------------------------------
# subsets.


def test_subsets_keep_proportions_and_draw_without_replacement():
  records = make_records(COUNTS)
  total = len(records)
  got = list(bootstrap.subsets(records, [100, 250, total], repeats=3, seed=0))
  assert [(s, r) for s, r, _ in got] == [(s, r) for s in (100, 250, total) for r in range(3)]
  for size, _, subset in got:
    assert len(subset) == size
    texts = [r['text'] for r in subset]
    assert len(set(texts)) == size  # without replacement
    order = {r['text']: i for i, r in enumerate(records)}
    assert [order[t] for t in texts] == sorted(order[t] for t in texts)  # corpus order
    per = collections.Counter(r['category'] for r in subset)
    for c, n in COUNTS.items():
      assert abs(per[c] - size * n / total) < 1, (size, c, per[c])
  full = [sub for s, _, sub in got if s == total]
  assert all(sub == records for sub in full)


def test_subsets_are_deterministic_and_repeats_differ():
  records = make_records(COUNTS)
  a = list(bootstrap.subsets(records, [120], repeats=4, seed=7))
  b = list(bootstrap.subsets(records, [120], repeats=4, seed=7))
  assert a == b
  assert len({tuple(r['text'] for r in sub) for _, _, sub in a}) == 4
  c = list(bootstrap.subsets(records, [120], repeats=4, seed=8))
  assert c != a
  # A size's draws do not depend on which other sizes are asked for.
  alone = list(bootstrap.subsets(records, [120], repeats=2, seed=7))
  mixed = [x for x in bootstrap.subsets(records, [50, 120], repeats=2, seed=7) if x[0] == 120]
  assert alone == mixed


def test_records_without_category_form_one_category():
  records = make_records({'code': 30}) + [{'text': f'plain {i}'} for i in range(10)]
  for _, _, subset in bootstrap.subsets(records, [20], repeats=3, seed=0):
    per = collections.Counter(bootstrap.category_of(r) for r in subset)
    assert per == {'code': 15, 'uncategorized': 5}
  no_categories = [{'text': f'plain {i}'} for i in range(10)]
  assert len(next(bootstrap.subsets(no_categories, [4], 1, 0))[2]) == 4


def test_size_larger_than_the_corpus():
  with pytest.raises(UserError, match=r'subset size 11 is larger than the corpus \(10 samples\)'):
    list(bootstrap.subsets(make_records({'a': 10}), [5, 11], repeats=1, seed=0))


# ---------------------------------------------------------------------------
# stability_summary.


def doc(value: float, location: str) -> dict:
  return {'global_max_activation': value, 'global_max_location': location}


def test_stability_summary_hand_computed():
  results = {
      2000: [doc(-10.0, 'layer_3_hidden (min)'), doc(10.0, 'layer_3_hidden (min)'),
             doc(12.0, 'layer_5_hidden (max)'), doc(8.0, 'layer_3_hidden (min)')],
      1000: [doc(5.0, 'b (max)'), doc(5.0, 'a (max)')],
  }
  out = bootstrap.stability_summary(results)
  assert list(out) == [1000, 2000]
  s = out[2000]
  assert s['repeats'] == 4 and s['abs_max_min'] == 8.0 and s['abs_max_max'] == 12.0
  assert s['abs_max_mean'] == 10.0
  assert math.isclose(s['abs_max_std'], math.sqrt((0 + 0 + 4 + 4) / 4))
  assert math.isclose(s['relative_spread'], 0.4)
  assert s['locations'] == ['layer_3_hidden (min)', 'layer_5_hidden (max)']
  assert s['most_common_location'] == 'layer_3_hidden (min)' and s['location_agreement'] == 0.75
  t = out[1000]  # a tie between locations: the first in sorted order
  assert t['most_common_location'] == 'a (max)' and t['location_agreement'] == 0.5
  assert t['abs_max_std'] == 0.0 and t['relative_spread'] == 0.0
  assert bootstrap.stability_summary({5: [doc(0.0, 'x (max)')]})[5]['relative_spread'] == 0.0


def test_stability_summary_bad_input():
  with pytest.raises(UserError, match='no measurements for subset size 3'):
    bootstrap.stability_summary({3: []})
  with pytest.raises(UserError, match='size 3, repeat 1: the document lacks'):
    bootstrap.stability_summary({3: [doc(1.0, 'x (max)'), {'global_max_location': 'x'}]})


def test_write_subsets_feeds_measure_fn(tmp_path):
  """The hook the measure pipeline plugs into: one document per subset file, summarised per size."""
  records = make_records(COUNTS)
  seen = []

  def measure_fn(path: str, size: int, repeat: int) -> dict:
    lines = open(path).read().splitlines()
    seen.append((size, repeat, len(lines)))
    return doc(100.0 + repeat, 'layer_1_hidden (max)')

  results = bootstrap.write_subsets(records, [40, 80], 2, 0, str(tmp_path), measure_fn)
  assert seen == [(40, 0, 40), (40, 1, 40), (80, 0, 80), (80, 1, 80)]
  summary = bootstrap.stability_summary(results)
  assert summary[80]['abs_max_min'] == 100.0 and summary[80]['location_agreement'] == 1.0


# ---------------------------------------------------------------------------
# The command.


def test_bootstrap_command(tmp_path, capsys):
  data_path = write_corpus(tmp_path / 'c.jsonl', make_records(COUNTS))
  outs = [tmp_path / 'run1', tmp_path / 'run2']
  for out in outs:
    code, stdout, err = run_cli(capsys, 'bootstrap', f'--data_path={data_path}', '--sizes=100,250',
                                '--repeats=3', '--seed=5', f'--output_dir={out}')
    assert code == 0, err
    assert 'size 100: 3 subsets' in stdout
  for size in (100, 250):
    for r in range(3):
      a, b = (out / str(size) / f'r{r}.jsonl' for out in outs)
      assert a.read_bytes() == b.read_bytes()
      rows = [json.loads(line) for line in a.read_text().splitlines()]
      assert len(rows) == size
      per = collections.Counter(row['category'] for row in rows)
      assert all(abs(per[c] - size * n / 500) < 1 for c, n in COUNTS.items())
  manifest = json.loads((outs[0] / 'manifest.json').read_text())
  assert manifest['sizes']['100'] == corpus.allocate(dict(sorted(COUNTS.items())), 100)
  assert manifest['corpus_samples'] == 500 and manifest['seed'] == 5


def test_bootstrap_command_reads_parquet_and_uncategorized(tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({'input_ids': [[1, i] for i in range(30)]}), tmp_path / 'c.parquet')
  code, _, err = run_cli(capsys, 'bootstrap', f'--data_path={tmp_path / "c.parquet"}', '--sizes=10',
                         '--repeats=1', f'--output_dir={tmp_path / "out"}')
  assert code == 0, err
  rows = [json.loads(line) for line in (tmp_path / 'out' / '10' / 'r0.jsonl').read_text().splitlines()]
  assert len(rows) == 10 and all(set(r) == {'input_ids'} for r in rows)
  assert json.loads((tmp_path / 'out' / 'manifest.json').read_text())['corpus_categories'] == {'uncategorized': 30}


@pytest.mark.parametrize('make, args, fragments', [
    (lambda p: write_corpus(p / 'c.jsonl', make_records({'a': 20})), ('--sizes=10,25',),
     ('subset size 25 is larger than the corpus (20 samples',)),
    (lambda p: (p / 'c.csv').write_text('text\nx\n') and str(p / 'c.csv'), ('--sizes=1',),
     ('unknown corpus format',)),
    (lambda p: write_corpus(p / 'c.jsonl', [{'text': 'x'}, {'title': 'y'}]), ('--sizes=1',),
     ('c.jsonl:2: record has neither input_ids nor text',)),
    (lambda p: write_corpus(p / 'c.jsonl', [{'text': 'x'}]), ('--sizes=1,abc',),
     ("--sizes: 'abc' is not an integer",)),
    (lambda p: write_corpus(p / 'c.jsonl', [{'text': 'x'}]), ('--sizes=0',), ('subset sizes must be positive',)),
    (lambda p: write_corpus(p / 'c.jsonl', [{'text': 'x'}]), (), ('--sizes is required',)),
    (lambda p: write_corpus(p / 'c.jsonl', [{'text': 'x'}]), ('--sizes=1', '--repeats=0'),
     ('--repeats must be a positive integer',)),
    (lambda p: str(p / 'absent.jsonl'), ('--sizes=1',), ('does not exist',)),
    (lambda p: write_corpus(p / 'c.jsonl', [{'text': 'x'}]), ('--sizes=1', '--bogus=1'), ('bogus',)),
])
def test_bootstrap_command_bad_input(tmp_path, capsys, make, args, fragments):
  data_path = make(tmp_path)
  code, _, err = run_cli(capsys, 'bootstrap', f'--data_path={data_path}', *args, f'--output_dir={tmp_path / "o"}')
  assert_one_error(code, err, *fragments)
  assert not (tmp_path / 'o').exists()  # nothing written on bad input


def test_bootstrap_command_requires_paths(tmp_path, capsys):
  code, _, err = run_cli(capsys, 'bootstrap', '--sizes=1', f'--output_dir={tmp_path}')
  assert_one_error(code, err, '--data_path is required')
  data_path = write_corpus(tmp_path / 'c.jsonl', [{'text': 'x'}])
  code, _, err = run_cli(capsys, 'bootstrap', f'--data_path={data_path}', '--sizes=1')
  assert_one_error(code, err, '--output_dir is required')


def test_bootstrap_measures_each_subset_and_summarises_stability(checkpoint, tmp_path, capsys):
  from maxact_jax import cli, fixtures
  rng = np.random.RandomState(5)
  path = tmp_path / 'ids.jsonl'
  rows = [{'input_ids': ids, 'category': 'ab'[i % 2]}
          for i, ids in enumerate(fixtures.random_token_ids(256, rng.randint(4, 30, 20).tolist(), seed=2))]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  model = checkpoint('llama')
  capsys.readouterr()
  out = tmp_path / 'boot'
  code = cli.main(['maxact-jax', 'bootstrap', f'--data_path={path}', '--sizes=6,10', '--repeats=2',
                   f'--output_dir={out}', f'--model_path={model}', '--dtype=float32', '--batch_size=4'])
  assert code == 0, capsys.readouterr().err
  summary = json.loads((out / 'stability.json').read_text())
  assert set(summary) == {'6', '10'}
  for size in ('6', '10'):
    row = summary[size]
    assert row['repeats'] == 2
    docs = [json.loads((out / size / f'r{r}' / 'json' / 'llama_activation_stats.json').read_text()) for r in (0, 1)]
    values = [abs(d['global_max_activation']) for d in docs]
    assert row['abs_max_min'] == pytest.approx(min(values)) and row['abs_max_max'] == pytest.approx(max(values))
    assert all(d['num_samples'] == int(size) for d in docs)
  assert 'most common location' in capsys.readouterr().out
