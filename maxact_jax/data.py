"""Corpora in, length-bucketed batches out.

A corpus file holds one sample per record: token ids (`input_ids`, the
reference's format) or `text` (tokenized here with the checkpoint's own
tokenizer), with an optional `category`. Batches are padded on the right with
a validity mask, so padding never enters a statistic; the number of distinct
batch shapes (one XLA compilation each) is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from maxact_jax.errors import UserError

TOKENIZER_FILE = 'tokenizer.json'


@dataclasses.dataclass
class Corpus:
  """Token ids of every sample, in corpus order (the sample index is the list index)."""

  samples: list[np.ndarray]
  categories: list[str | None]
  source: str
  truncated: int = 0  # samples cut at max_seq_len
  tokens_dropped: int = 0  # tokens removed by that cut

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(s) for s in self.samples], np.int64)

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, record) of every non-empty line; a malformed line is a UserError."""
  try:
    f = open(path, encoding='utf-8')
  except OSError as e:
    raise UserError(f'cannot read data file {path}: {e.strerror or e}') from None
  with f:
    try:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f'{path}:{lineno}: malformed JSON line ({e.msg})') from None
        if not isinstance(record, dict):
          raise UserError(f'{path}:{lineno}: expected a JSON object per line')
        yield lineno, record
    except UnicodeDecodeError:
      raise UserError(f'{path} is not UTF-8 text') from None


def read_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, record) pairs of a corpus file; the format follows the file."""
  if not path:
    raise UserError('no --data_path given')
  if not os.path.exists(path):
    raise UserError(f'data file {path} does not exist')
  if os.path.isdir(path):
    raise UserError(f'data path {path} is a directory, expected a .jsonl file')
  for lineno, record in iter_jsonl(path):
    yield f'{path}:{lineno}', record


class Tokenizer:
  """The checkpoint's tokenizer (tokenizer.json via the `tokenizers` library)."""

  def __init__(self, model_dir: str):
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise UserError(f'{model_dir} has no {TOKENIZER_FILE}: text corpora need the checkpoint\'s tokenizer '
                      '(or give token ids with input_ids)')
    import tokenizers  # pylint: disable=import-outside-toplevel
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exceptions on bad files
      raise UserError(f'cannot load {path}: {e}') from None

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

  def decode_token(self, token_id: int) -> str:
    return self._tok.decode([int(token_id)], skip_special_tokens=False)

  @classmethod
  def maybe(cls, model_dir: str) -> 'Tokenizer | None':
    return cls(model_dir) if os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)) else None


def load_corpus(path: str, *, vocab_size: int, max_samples: int | None = None,
                max_seq_len: int | None = None, tokenizer: Tokenizer | None = None,
                model_dir: str | None = None) -> Corpus:
  """Read, tokenize and truncate a corpus; every id is checked against the vocabulary."""
  ids_list: list[list[int] | None] = []
  texts: list[tuple[int, str]] = []
  categories: list[str | None] = []
  for where, record in read_records(path):
    if max_samples is not None and len(ids_list) >= max_samples:
      break
    category = record.get('category')
    if 'input_ids' in record:
      ids = record['input_ids']
      if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f'{where}: input_ids must be a list of integers')
      ids_list.append(ids)
    elif 'text' in record:
      if not isinstance(record['text'], str):
        raise UserError(f'{where}: text must be a string')
      texts.append((len(ids_list), record['text']))
      ids_list.append(None)
    else:
      raise UserError(f'{where}: record has neither input_ids nor text')
    categories.append(category if isinstance(category, str) else None)
  if texts:
    if tokenizer is None:
      if model_dir is None:
        raise UserError(f'{path} holds text but no tokenizer is available')
      tokenizer = Tokenizer(model_dir)
    for (i, _), ids in zip(texts, tokenizer.encode([t for _, t in texts])):
      ids_list[i] = ids
  samples, truncated, dropped = [], 0, 0
  for i, ids in enumerate(ids_list):
    arr = np.asarray(ids, np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
      bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
      raise UserError(f'{path}: sample {i} has token id {bad} outside the vocabulary (size {vocab_size})')
    if max_seq_len is not None and arr.size > max_seq_len:
      truncated += 1
      dropped += arr.size - max_seq_len
      arr = arr[:max_seq_len]
    samples.append(arr.astype(np.int32))
  nonempty = [i for i, s in enumerate(samples) if s.size]
  if not nonempty:
    raise UserError(f'{path}: the corpus is empty (no samples with tokens)')
  if len(nonempty) < len(samples):
    samples = [samples[i] for i in nonempty]
    categories = [categories[i] for i in nonempty]
  return Corpus(samples, categories, path, truncated, dropped)


# ---------------------------------------------------------------------------
# Batching.


@dataclasses.dataclass(frozen=True)
class Batch:
  input_ids: np.ndarray  # [B, T] int32, right-padded
  valid: np.ndarray  # [B, T] bool
  sample_ids: np.ndarray  # [B] int64 corpus index; -1 for filler rows

  @property
  def num_tokens(self) -> int:
    return int(self.valid.sum())


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  groups: list[np.ndarray]  # sample indices of each batch
  lengths: list[int]  # padded length of each batch
  batch_size: int

  @property
  def shapes(self) -> list[tuple[int, int]]:
    return sorted({(self.batch_size, t) for t in self.lengths})

  def padding_ratio(self, corpus_lengths: np.ndarray) -> float:
    processed = self.batch_size * sum(self.lengths)
    valid = sum(int(corpus_lengths[g].sum()) for g in self.groups)
    return 1.0 - valid / processed if processed else 0.0


def plan_batches(lengths: np.ndarray, batch_size: int, max_shapes: int = 8,
                 pad_multiple: int = 1) -> BatchPlan:
  """Length-bucketed batches of exactly `batch_size` rows, at most `max_shapes` lengths.

  Samples are sorted longest first and cut into batches of `batch_size` (the
  last, shortest batch is filled with empty rows); then the batches' natural
  lengths are grouped into at most `max_shapes` padded lengths by dynamic
  programming, minimising the padded tokens processed.
  """
  if batch_size < 1:
    raise UserError(f'batch size must be at least 1, got {batch_size}')
  order = np.argsort(-lengths, kind='stable')
  # Rows ascend by sample index inside a batch: ties between equal values then
  # resolve to the smallest sample on device as on the host (see stats.TapStats).
  groups = [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
  natural = [int(-(-lengths[g].max() // pad_multiple) * pad_multiple) for g in groups]
  # Batches are in non-increasing natural length: choose cut points so each run of
  # batches shares its first (longest) batch's length.
  n = len(natural)
  k_max = min(max_shapes, n)
  inf = float('inf')
  # cost[k][i]: best cost of covering batches i..n-1 with k lengths.
  cost = np.full((k_max + 1, n + 1), inf)
  cut = np.zeros((k_max + 1, n + 1), np.int64)
  cost[:, n] = 0.0
  nat = np.asarray(natural, np.float64)
  for k in range(1, k_max + 1):
    for i in range(n - 1, -1, -1):
      # run i..j-1 padded to nat[i]; remaining j..n-1 with k-1 lengths.
      js = np.arange(i + 1, n + 1)
      totals = nat[i] * (js - i) + cost[k - 1, js]
      best = int(np.argmin(totals))
      cost[k, i], cut[k, i] = totals[best], js[best]
  lengths_out, i, k = [], 0, k_max
  while i < n:
    j = int(cut[k, i])
    lengths_out.extend([natural[i]] * (j - i))
    i, k = j, k - 1
  return BatchPlan(groups, lengths_out, batch_size)


def make_batch(corpus: Corpus, group: np.ndarray, length: int, batch_size: int, pad_id: int = 0) -> Batch:
  ids = np.full((batch_size, length), pad_id, np.int32)
  valid = np.zeros((batch_size, length), bool)
  sample_ids = np.full((batch_size,), -1, np.int64)
  for row, s in enumerate(group):
    toks = corpus.samples[s]
    ids[row, :len(toks)] = toks
    valid[row, :len(toks)] = True
    sample_ids[row] = s
  return Batch(ids, valid, sample_ids)


def iter_batches(corpus: Corpus, plan: BatchPlan, pad_id: int = 0) -> Iterator[Batch]:
  for group, length in zip(plan.groups, plan.lengths):
    yield make_batch(corpus, group, length, plan.batch_size, pad_id)
