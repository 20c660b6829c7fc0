"""The built-in corpus: size, mix, determinism, token budgets and the padding they buy."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from maxact_jax import corpus
from maxact_jax import data
from maxact_jax.errors import UserError

from tests.corpus_helpers import assert_one_error, run_cli, train_tokenizer


@pytest.fixture(scope='module')
def default_corpus() -> tuple[list[dict[str, str]], float]:
  corpus.stdlib_material.cache_clear()  # time a cold build, standard-library parsing included
  start = time.perf_counter()
  samples = corpus.builtin_corpus(0)
  return samples, time.perf_counter() - start


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory, default_corpus) -> str:
  """A byte-level BPE (4,000 tokens) trained on part of the built-in corpus."""
  samples, _ = default_corpus
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.json')
  return train_tokenizer([s['text'] for s in samples[:600]], path, vocab_size=4000)


def test_builtin_corpus_meets_the_numbers(default_corpus):
  samples, seconds = default_corpus
  stats = corpus.corpus_stats(samples)
  assert stats['samples'] >= 1000
  assert stats['chars'] > 1_000_000
  shares = stats['category_shares']
  assert len(shares) >= 5 and min(shares.values()) >= 0.05, shares
  assert stats['duplicate_rate'] < 0.01
  assert stats['chars_min'] < 100 and stats['chars_max'] > 1000  # tens to a few thousand characters
  assert all(set(s) == {'text', 'category'} and s['text'].strip() for s in samples)
  assert seconds < 10, f'the built-in corpus took {seconds:.1f} s to build'


def test_builtin_corpus_is_deterministic(default_corpus):
  samples, _ = default_corpus
  assert corpus.builtin_corpus(0) == samples
  other = corpus.builtin_corpus(1)
  assert {s['text'] for s in other} != {s['text'] for s in samples}


def test_num_samples_keeps_the_category_mix():
  samples = corpus.builtin_corpus(2, num_samples=150)
  stats = corpus.corpus_stats(samples)
  assert stats['samples'] == 150
  expected = corpus.allocate(corpus.CATEGORY_WEIGHTS, 150)
  assert stats['categories'] == {c: expected[c] for c in sorted(expected)}
  for bad in (0, corpus.MAX_NUM_SAMPLES + 1):
    with pytest.raises(UserError, match='1 to'):
      corpus.builtin_corpus(0, num_samples=bad)


def test_generators_alone_meet_the_numbers(monkeypatch):
  """An installation without standard-library sources (or run with -OO) still gets a full corpus."""
  monkeypatch.setattr(corpus, 'stdlib_material', lambda: ((), ()))
  stats = corpus.corpus_stats(corpus.builtin_corpus(0, num_samples=1000))
  assert stats['samples'] == 1000 and stats['chars'] > 1_000_000 / 2.5
  assert min(stats['category_shares'].values()) >= 0.05 and stats['duplicate_rate'] < 0.01


def test_stdlib_material_is_read_not_imported():
  prose, code = corpus.stdlib_material()
  assert sum(len(s) for s in prose) > 100 and sum(len(s) for s in code) > 100
  assert any(u.startswith('class json.decoder.JSONDecoder') for s in prose for u in s)


def test_cut_respects_the_byte_budget_and_words():
  assert corpus.cut('short text', 100) == 'short text'
  assert corpus.cut('alpha beta gamma delta', 13) == 'alpha beta'
  cut = corpus.cut('日本語のテキスト' * 10, 20)  # 3 bytes a character: never half a character
  assert len(cut.encode('utf-8')) <= 20 and cut == '日本語のテキスト'[:6]
  assert corpus.fill(iter(['aaaa', 'bbbb', 'cccc']), 10, sep=' ') == 'aaaa bbbb'


def test_token_budgets_keep_padding_low(default_corpus, tokenizer_path):
  """At batch size 8, 8 shapes pad at most 5% of the processed tokens on the built-in corpus."""
  tok = data.Tokenizer(tokenizer_path)
  built = data.load_builtin(tok, vocab_size=tok.vocab_size)
  lengths = built.lengths
  assert len(lengths) == len(default_corpus[0])
  plan = data.plan_batches(lengths, batch_size=8)
  assert len(plan.shapes) <= 8
  assert plan.padding_ratio(lengths) <= 0.05, (plan.padding_ratio(lengths), plan.shapes)
  # Token lengths follow the plan: nothing over the longest budget (+1 where a merge spans the cut),
  # 80% of the samples in the long band.
  longest = corpus.LENGTH_PLAN[-1][2]
  assert lengths.max() <= longest + 1
  assert np.mean(lengths >= corpus.LENGTH_PLAN[-1][1] - 1) > 0.7
  assert 'none truncated' in data.describe_corpus(built)
  assert len({s.tobytes() for s in built.samples}) > 0.99 * len(built.samples)  # cut texts stay distinct


def test_byte_budgets_alone_pad_more(default_corpus, tokenizer_path):
  """Why the plan is in tokens: the portable (byte-cut) corpus pads about twice as much."""
  tok = data.Tokenizer(tokenizer_path)
  lengths = np.array([len(ids) for ids in tok.encode([s['text'] for s in default_corpus[0][:1000]])])
  assert data.plan_batches(lengths, 8).padding_ratio(lengths) > 0.05


def test_tokenizer_cut_lands_on_the_budget(tokenizer_path):
  tok = data.Tokenizer(tokenizer_path)
  texts = ['The quick brown fox jumps over the lazy dog. ' * 40, 'def f(x):\n    return x\n' * 50, '短い']
  budgets = [37, 64, 10]
  cut = tok.cut(texts, budgets)
  assert cut[2] == texts[2]  # already within budget
  for text, piece, budget in zip(texts[:2], cut[:2], budgets[:2]):
    assert text.startswith(piece)
    assert abs(len(tok.encode([piece])[0]) - budget) <= 1


def test_corpus_command_writes_byte_identical_files(tmp_path, capsys):
  paths = [tmp_path / 'a.jsonl', tmp_path / 'b.jsonl', tmp_path / 'c.jsonl']
  for path, seed in zip(paths, (3, 3, 4)):
    code, out, err = run_cli(capsys, 'corpus', f'--output_path={path}', f'--seed={seed}', '--num_samples=200')
    assert code == 0, err
    assert 'wrote 200 samples' in out
  assert paths[0].read_bytes() == paths[1].read_bytes()
  assert paths[0].read_bytes() != paths[2].read_bytes()
  records = [json.loads(line) for line in paths[0].read_text(encoding='utf-8').splitlines()]
  assert records == corpus.builtin_corpus(3, num_samples=200)
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]  # no temporary file left behind


def test_corpus_command_with_tokenizer_matches_measure(tmp_path, capsys, tokenizer_path):
  path = tmp_path / 'tok.jsonl'
  code, _, err = run_cli(capsys, 'corpus', f'--output_path={path}', '--num_samples=120',
                         f'--tokenizer={tokenizer_path}')
  assert code == 0, err
  tok = data.Tokenizer(tokenizer_path)
  from_file = data.load_corpus(str(path), vocab_size=tok.vocab_size, tokenizer=tok)
  built = data.load_builtin(tok, vocab_size=tok.vocab_size, num_samples=120)
  assert [s.tolist() for s in from_file.samples] == [s.tolist() for s in built.samples]
  assert from_file.categories == built.categories


@pytest.mark.parametrize('args, fragments', [
    ((), ('--output_path is required',)),
    (('--output_path=OUT', '--num_samples=0'), ('--num_samples must be a positive integer',)),
    (('--output_path=BLOCKED/corpus.jsonl',), ('cannot write',)),
    (('--output_path=OUT', '--tokenizer=NOWHERE'), ('has no tokenizer.json',)),
])
def test_corpus_command_bad_input(tmp_path, capsys, args, fragments):
  (tmp_path / 'BLOCKED').write_text('a file where a folder should be')
  args = [a.replace('OUT', str(tmp_path / 'out.jsonl')).replace('BLOCKED', str(tmp_path / 'BLOCKED'))
          .replace('NOWHERE', str(tmp_path / 'nowhere')) for a in args]
  code, _, err = run_cli(capsys, 'corpus', *args)
  assert_one_error(code, err, *fragments)
