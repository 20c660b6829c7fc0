"""Corpus formats (JSON lines, Parquet, datasets directories), re-tokenization and describe_corpus.

Every loader reads a file it did not write: Parquet is written with pyarrow,
datasets directories with `datasets.Dataset.save_to_disk`.
"""

from __future__ import annotations

import json
import os

import pytest

from maxact_jax import data
from maxact_jax.errors import UserError

from tests.corpus_helpers import train_tokenizer

TEXTS = ['The cat sat on the mat.', 'def f(x):\n    return x * 2\n', '{"a": [1, 2, 3]}', 'Grüße aus Köln! 你好。',
         'Solve 3x + 4 = 10 for x.']
CATEGORIES = ['prose', 'code', 'structured', 'multilingual', 'math']
IDS = [[1, 5, 9, 2], [1, 7], [1, 3, 3, 3, 3, 8], [1, 11, 12], [1, 4, 4]]


@pytest.fixture(scope='module')
def tokenizers_dir(tmp_path_factory):
  """Two different tokenizers trained here: a source (byte-level BPE) and a target (WordPiece)."""
  from maxact_jax.corpus import builtin_corpus

  texts = [s['text'] for s in builtin_corpus(0, num_samples=200)] + TEXTS
  root = tmp_path_factory.mktemp('toks')
  source = train_tokenizer(texts, str(root / 'source' / 'tokenizer.json'), vocab_size=1500)
  target = train_tokenizer(texts, str(root / 'target' / 'tokenizer.json'), vocab_size=1200, kind='wordpiece')
  return source, target


def write_jsonl(path, records) -> str:
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
  return str(path)


def records(path) -> list[dict]:
  return [r for _, r in data.read_records(str(path))]


# ---------------------------------------------------------------------------
# Formats.


def test_jsonl_text_and_ids(tmp_path):
  text = write_jsonl(tmp_path / 't.jsonl', [{'text': t, 'category': c} for t, c in zip(TEXTS, CATEGORIES)])
  ids = write_jsonl(tmp_path / 'i.jsonl', [{'input_ids': i} for i in IDS])
  assert records(text) == [{'text': t, 'category': c} for t, c in zip(TEXTS, CATEGORIES)]
  corpus = data.load_corpus(ids, vocab_size=16, max_samples=3)
  assert [s.tolist() for s in corpus.samples] == IDS[:3] and corpus.categories == [None] * 3


def test_parquet_written_by_pyarrow(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = tmp_path / 'c.parquet'
  table = pa.table({'input_ids': pa.array(IDS, pa.list_(pa.int64())), 'category': CATEGORIES,
                    'extra': list(range(5))})
  pq.write_table(table, path, row_group_size=2)  # several row groups
  corpus = data.load_corpus(str(path), vocab_size=16)
  assert [s.tolist() for s in corpus.samples] == IDS
  assert corpus.categories == CATEGORIES
  assert records(path)[0] == {'input_ids': IDS[0], 'category': 'prose'}  # extra columns are not read

  text_path = tmp_path / 't.parquet'
  pq.write_table(pa.table({'text': TEXTS, 'category': [None, 'code', None, 'x', 'y']}), text_path)
  assert records(text_path)[:2] == [{'text': TEXTS[0]}, {'text': TEXTS[1], 'category': 'code'}]


def test_datasets_directory_written_by_save_to_disk(tmp_path, tokenizers_dir):
  import datasets

  path = tmp_path / 'ds'
  datasets.Dataset.from_dict({'text': TEXTS, 'category': CATEGORIES}).save_to_disk(str(path))
  assert (path / 'state.json').is_file() and (path / 'dataset_info.json').is_file()
  assert records(path) == [{'text': t, 'category': c} for t, c in zip(TEXTS, CATEGORIES)]
  tok = data.Tokenizer(tokenizers_dir[1])
  corpus = data.load_corpus(str(path), vocab_size=tok.vocab_size, tokenizer=tok)
  assert [s.tolist() for s in corpus.samples] == tok.encode(TEXTS)

  ids_path = tmp_path / 'ids'
  datasets.Dataset.from_dict({'input_ids': IDS}).save_to_disk(str(ids_path), num_shards=2)  # two arrow files
  assert [s.tolist() for s in data.load_corpus(str(ids_path), vocab_size=16).samples] == IDS


def test_datasets_dict_with_one_split_or_several(tmp_path):
  import datasets

  one = tmp_path / 'one'
  datasets.DatasetDict({'train': datasets.Dataset.from_dict({'input_ids': IDS})}).save_to_disk(str(one))
  assert [r['input_ids'] for r in records(one)] == IDS
  two = tmp_path / 'two'
  datasets.DatasetDict({'train': datasets.Dataset.from_dict({'input_ids': IDS}),
                        'test': datasets.Dataset.from_dict({'input_ids': IDS[:1]})}).save_to_disk(str(two))
  with pytest.raises(UserError, match=r'splits test, train: give one split\'s directory'):
    records(two)
  assert len(records(two / 'test')) == 1


def test_formats_agree(tmp_path, tokenizers_dir):
  """The same corpus in three formats loads to the same token ids."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = {'text': TEXTS, 'category': CATEGORIES}
  jsonl = write_jsonl(tmp_path / 'c.jsonl', [{'text': t, 'category': c} for t, c in zip(TEXTS, CATEGORIES)])
  pq.write_table(pa.table(rows), tmp_path / 'c.parquet')
  datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / 'c_ds'))
  tok = data.Tokenizer(tokenizers_dir[0])
  loaded = [data.load_corpus(p, vocab_size=tok.vocab_size, tokenizer=tok)
            for p in (jsonl, str(tmp_path / 'c.parquet'), str(tmp_path / 'c_ds'))]
  for corpus in loaded[1:]:
    assert [s.tolist() for s in corpus.samples] == [s.tolist() for s in loaded[0].samples]
    assert corpus.categories == loaded[0].categories == CATEGORIES


# ---------------------------------------------------------------------------
# Bad input: one clear message each.


def test_bad_corpora(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  cases = []
  (tmp_path / 'c.csv').write_text('text\nhello\n')
  cases.append((tmp_path / 'c.csv', r'unknown corpus format: .*c\.csv \(expected JSON lines'))
  (tmp_path / 'plain').mkdir()
  cases.append((tmp_path / 'plain', 'is a directory but not a datasets save_to_disk directory'))
  cases.append((tmp_path / 'missing.jsonl', 'does not exist'))
  write_jsonl(tmp_path / 'neither.jsonl', [{'text': 'ok'}, {'body': 'no text here'}])
  cases.append((tmp_path / 'neither.jsonl', r'neither.jsonl:2: record has neither input_ids nor text'))
  write_jsonl(tmp_path / 'floats.jsonl', [{'input_ids': [1.5, 2]}])
  cases.append((tmp_path / 'floats.jsonl', 'input_ids must be a list of integers'))
  (tmp_path / 'array.json').write_text(json.dumps([{'text': 'a'}]))
  cases.append((tmp_path / 'array.json', 'holds a JSON array; expected JSON lines'))
  pq.write_table(pa.table({'body': ['x']}), tmp_path / 'nocols.parquet')
  cases.append((tmp_path / 'nocols.parquet', r'has neither a text nor an input_ids column \(columns: body\)'))
  (tmp_path / 'junk.parquet').write_bytes(b'not parquet at all')
  cases.append((tmp_path / 'junk.parquet', 'cannot read .* as Parquet'))
  for path, message in cases:
    with pytest.raises(UserError, match=message):
      data.load_corpus(str(path), vocab_size=100)


# ---------------------------------------------------------------------------
# Re-tokenization: ids of one tokenizer, re-encoded with the checkpoint's.


def test_retokenize_ids_of_a_source_tokenizer(tmp_path, tokenizers_dir):
  source_path, target_path = tokenizers_dir
  source, target = data.Tokenizer(source_path), data.Tokenizer(target_path)
  ids = source.encode(TEXTS)
  path = write_jsonl(tmp_path / 'ref.jsonl', [{'input_ids': i, 'category': c} for i, c in zip(ids, CATEGORIES)])
  for src in (os.path.dirname(source_path), source_path):  # a checkpoint directory or the file itself
    corpus = data.load_corpus(path, vocab_size=target.vocab_size, tokenizer=target, source_tokenizer=src)
    assert [s.tolist() for s in corpus.samples] == target.encode(TEXTS)  # byte-level BPE decodes exactly
    assert corpus.categories == CATEGORIES
  # Without the source tokenizer the ids are taken as the checkpoint's own.
  assert [s.tolist() for s in data.load_corpus(path, vocab_size=source.vocab_size).samples] == ids


def test_retokenize_rejects_ids_outside_the_source_vocabulary(tmp_path, tokenizers_dir):
  source_path, target_path = tokenizers_dir
  path = write_jsonl(tmp_path / 'ref.jsonl', [{'input_ids': [0, 10 ** 6]}])
  with pytest.raises(UserError, match=r'token id 1000000 is outside the source tokenizer\'s vocabulary'):
    data.load_corpus(path, vocab_size=10, model_dir=os.path.dirname(target_path), source_tokenizer=source_path)
  with pytest.raises(UserError, match='has no tokenizer.json'):
    data.load_corpus(path, vocab_size=10, source_tokenizer=str(tmp_path))


# ---------------------------------------------------------------------------
# describe_corpus.


def test_describe_corpus_reports_truncation(tmp_path):
  path = write_jsonl(tmp_path / 'i.jsonl', [{'input_ids': i, 'category': c} for i, c in zip(IDS, CATEGORIES)]
                     + [{'input_ids': [1, 2]}])
  line = data.describe_corpus(data.load_corpus(path, vocab_size=16, max_seq_len=3))
  assert '\n' not in line
  assert '6 samples, 16 tokens, length min/median/max 2/3/3' in line
  assert ('6 categories (code 1, math 1, multilingual 1, prose 1, structured 1, uncategorized 1)' in line)
  assert line.endswith('2 samples truncated at --max_seq_len (4 tokens dropped)')
  full = data.describe_corpus(data.load_corpus(path, vocab_size=16))
  assert full.endswith('none truncated') and '6 samples, 20 tokens, length min/median/max 2/3/6' in full
