"""Corpora in, length-bucketed batches out.

A corpus holds one sample per record: token ids (`input_ids`, the
reference's format) or `text` (tokenized here with the checkpoint's own
tokenizer), with an optional `category`. The format follows the path:
JSON lines (`.jsonl`, `.ndjson`, `.json`), Parquet (`.parquet`), or a Hugging
Face `datasets` directory written by `save_to_disk` (its Arrow stream files
are read with pyarrow, so measuring needs no `datasets` package). Token ids
of another tokenizer (the reference published Llama-2 ids) can be decoded
with that `source_tokenizer` and re-encoded with the checkpoint's.

Batches are padded on the right with a validity mask, so padding never
enters a statistic; the number of distinct batch shapes (one XLA compilation
each) is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tokenizers

from maxact_jax import atomic, gguf_file, gguf_tokenizer
from maxact_jax.corpus import builtin_corpus
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
          if lineno == 1 and line.strip() == '[':
            raise UserError(f'{path} holds a JSON array; expected JSON lines (one object per line)') from None
          raise UserError(f'{path}:{lineno}: malformed JSON line ({e.msg})') from None
        if not isinstance(record, dict):
          if lineno == 1 and isinstance(record, list):
            raise UserError(f'{path} holds a JSON array; expected JSON lines (one object per line)')
          raise UserError(f'{path}:{lineno}: expected a JSON object per line')
        yield lineno, record
    except UnicodeDecodeError:
      raise UserError(f'{path} is not UTF-8 text') from None


JSONL_SUFFIXES = ('.jsonl', '.ndjson', '.json')
FORMATS_HELP = ('JSON lines (.jsonl), Parquet (.parquet) or a Hugging Face datasets directory '
                '(save_to_disk: dataset_info.json, state.json, data-*.arrow)')


def _pyarrow():
  try:
    # Optional: Arrow and Parquet corpora only.
    import pyarrow  # pylint: disable=import-outside-toplevel
    import pyarrow.ipc  # pylint: disable=import-outside-toplevel,unused-import
    import pyarrow.parquet  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError('reading Parquet or datasets directories needs pyarrow (pip install pyarrow)') from None
  return pyarrow


def _check_columns(path: str, names: Sequence[str]) -> list[str]:
  """The corpus columns present; a table with neither text nor input_ids is a UserError."""
  if 'input_ids' not in names and 'text' not in names:
    raise UserError(f'{path} has neither a text nor an input_ids column (columns: {", ".join(names) or "none"})')
  return [c for c in ('input_ids', 'text', 'category') if c in names]


def _iter_table_batches(path: str, batches: Iterator[Any], first_row: int = 0
                        ) -> Iterator[tuple[str, dict[str, Any]]]:
  row = first_row
  for batch in batches:
    for record in batch.to_pylist():
      row += 1
      yield f'{path}: row {row}', {k: v for k, v in record.items() if v is not None}


def iter_parquet(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, record) of every row of a Parquet file, read batch by batch."""
  pa = _pyarrow()
  try:
    f = pa.parquet.ParquetFile(path)
  except (OSError, pa.ArrowException) as e:
    raise UserError(f'cannot read {path} as Parquet: {str(e).splitlines()[0]}') from None
  columns = _check_columns(path, f.schema_arrow.names)
  yield from _iter_table_batches(path, f.iter_batches(batch_size=1024, columns=columns))


def iter_datasets_dir(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, record) of a `datasets` save_to_disk directory, its Arrow stream files in state.json order."""
  if os.path.isfile(os.path.join(path, 'dataset_dict.json')):
    splits = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, 'state.json')))
    if len(splits) != 1:
      example = os.path.join(path, splits[0] if splits else 'train')
      raise UserError(f'{path} is a datasets DatasetDict with splits {", ".join(splits) or "(none)"}: '
                      f'give one split\'s directory, e.g. --data_path={example}')
    path = os.path.join(path, splits[0])
  state_path = os.path.join(path, 'state.json')
  if not os.path.isfile(state_path):
    raise UserError(f'data path {path} is a directory but not a datasets save_to_disk directory '
                    f'(no state.json); expected {FORMATS_HELP}')
  try:
    with open(state_path, encoding='utf-8') as f:
      files = [d['filename'] for d in json.load(f)['_data_files']]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'cannot read the data file list of {state_path}: {e}') from None
  pa = _pyarrow()
  row = 0
  for name in files:
    file_path = os.path.join(path, name)
    try:
      try:  # datasets writes the Arrow IPC stream format; accept the file format too
        reader = pa.ipc.open_stream(pa.memory_map(file_path))
        batches = iter(reader)
      except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(file_path))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowException) as e:
      raise UserError(f'cannot read {file_path} as Arrow: {str(e).splitlines()[0]}') from None
    columns = _check_columns(path, reader.schema.names)
    for where, record in _iter_table_batches(path, (b.select(columns) for b in batches), row):
      row += 1
      yield where, record


def read_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, record) pairs of a corpus; the format follows the path (see FORMATS_HELP)."""
  if not path:
    raise UserError('no --data_path given')
  if not os.path.exists(path):
    raise UserError(f'data path {path} does not exist')
  if os.path.isdir(path):
    yield from iter_datasets_dir(path)
    return
  lower = path.lower()
  if lower.endswith('.parquet'):
    yield from iter_parquet(path)
  elif lower.endswith(JSONL_SUFFIXES):
    for lineno, record in iter_jsonl(path):
      yield f'{path}:{lineno}', record
  else:
    raise UserError(f'unknown corpus format: {path} (expected {FORMATS_HELP})')


class Tokenizer:
  """A tokenizer.json read with the `tokenizers` library: the checkpoint's, or a source corpus's.

  `path` is a checkpoint directory holding tokenizer.json, or the file itself; or a
  GGUF checkpoint, whose tokenizer is built from its metadata (gguf_tokenizer).
  """

  def __init__(self, path: str):
    gguf_path = gguf_file.find(path)
    if gguf_path:
      self._tok = gguf_tokenizer.build(gguf_file.open_file(gguf_path))
      self.path = gguf_path
      return
    file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
      raise UserError(f'{path} has no {TOKENIZER_FILE}: text corpora need the checkpoint\'s tokenizer '
                      '(or give token ids with input_ids)')
    try:
      self._tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # the library raises plain Exceptions on bad files
      raise UserError(f'cannot load {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    self.path = file

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

  def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
    """Texts of token-id sequences, special tokens (BOS, EOS, padding) left out."""
    return self._tok.decode_batch([list(map(int, x)) for x in ids], skip_special_tokens=True)

  def decode_token(self, token_id: int) -> str:
    return self._tok.decode([int(token_id)], skip_special_tokens=False)

  def decode_each(self, ids: Sequence[int]) -> list[str]:
    """The text of each token on its own (special tokens kept), in one batch call."""
    return self._tok.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def special_ids(self) -> set[int]:
    """Ids of the tokenizer's special added tokens (BOS, EOS, padding, chat markers)."""
    return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  def cut(self, texts: Sequence[str], budgets: Sequence[int]) -> list[str]:
    """Each text cut at a token boundary so that it encodes to about `budget` tokens, specials included.

    The cut falls at the end of the last whole token that fits; re-encoding a
    cut text gives the same count, give or take a token where a merge spans the cut.
    """
    out = []
    for text, enc, budget in zip(texts, self._tok.encode_batch(list(texts), add_special_tokens=True), budgets):
      if len(enc.ids) <= budget:
        out.append(text)
        continue
      ends = [end for (_, end), special in zip(enc.offsets, enc.special_tokens_mask) if not special]
      keep = max(1, budget - (len(enc.ids) - len(ends)))
      out.append(text[:ends[keep - 1]])
    return out

  @classmethod
  def maybe(cls, model_dir: str) -> 'Tokenizer | None':
    gguf_path = gguf_file.find(model_dir)
    if gguf_path:
      return cls(gguf_path) if gguf_file.open_file(gguf_path).has('tokenizer.ggml.model') else None
    return cls(model_dir) if os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)) else None


def check_record(where: str, record: dict[str, Any]) -> str:
  """'input_ids' or 'text': which the record holds (input_ids wins); a malformed record is a UserError."""
  if 'input_ids' in record:
    ids = record['input_ids']
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
      raise UserError(f'{where}: input_ids must be a list of integers')
    return 'input_ids'
  if 'text' in record:
    if not isinstance(record['text'], str):
      raise UserError(f'{where}: text must be a string')
    return 'text'
  raise UserError(f'{where}: record has neither input_ids nor text')


def read_corpus_records(path: str) -> list[dict[str, Any]]:
  """Every record of a corpus, checked (each holds text or input_ids), as read."""
  records = []
  for where, record in read_records(path):
    check_record(where, record)
    records.append(record)
  if not records:
    raise UserError(f'{path}: the corpus is empty (no records)')
  return records


def _as_tokenizer(tok: 'Tokenizer | str | None') -> 'Tokenizer | None':
  return Tokenizer(tok) if isinstance(tok, str) else tok


def load_corpus(path: str, *, vocab_size: int, max_samples: int | None = None,
                max_seq_len: int | None = None, tokenizer: Tokenizer | None = None,
                model_dir: str | None = None, source_tokenizer: 'Tokenizer | str | None' = None) -> Corpus:
  """Read, tokenize and truncate a corpus; every id is checked against the vocabulary.

  Args:
    path: the corpus (see FORMATS_HELP).
    vocab_size: the checkpoint's vocabulary size.
    max_samples: use at most this many records, in file order.
    max_seq_len: cut longer samples (counted in Corpus.truncated and tokens_dropped).
    tokenizer, model_dir: the checkpoint's tokenizer, or where to find it;
      needed when the corpus holds text or source_tokenizer is given.
    source_tokenizer: the tokenizer (a directory or tokenizer.json) that wrote
      the corpus's input_ids, when it is not the checkpoint's: those ids are
      decoded with it and the text re-encoded with the checkpoint's tokenizer
      (how the paper moved its Llama-2 corpus to each family).
  """
  source = _as_tokenizer(source_tokenizer)
  ids_list: list[list[int] | None] = []
  texts: list[tuple[int, str]] = []
  foreign: list[tuple[int, list[int]]] = []  # ids of the source tokenizer, to decode
  categories: list[str | None] = []
  for where, record in read_records(path):
    if max_samples is not None and len(ids_list) >= max_samples:
      break
    category = record.get('category')
    kind = check_record(where, record)
    if kind == 'input_ids':
      ids = record['input_ids']
      if source is not None:
        if ids and (min(ids) < 0 or max(ids) >= source.vocab_size):
          bad = next(i for i in ids if i < 0 or i >= source.vocab_size)
          raise UserError(f'{where}: token id {bad} is outside the source tokenizer\'s vocabulary '
                          f'({source.path}, size {source.vocab_size})')
        foreign.append((len(ids_list), ids))
        ids_list.append(None)
      else:
        ids_list.append(ids)
    else:
      texts.append((len(ids_list), record['text']))
      ids_list.append(None)
    categories.append(category if isinstance(category, str) else None)
  if foreign:
    texts += zip([i for i, _ in foreign], source.decode([ids for _, ids in foreign]))
  if texts:
    if tokenizer is None:
      if model_dir is None:
        raise UserError(f'{path} holds text but no tokenizer is available')
      tokenizer = Tokenizer(model_dir)
    for (i, _), ids in zip(texts, tokenizer.encode([t for _, t in texts])):
      ids_list[i] = ids
  return _make_corpus(ids_list, categories, path, vocab_size, max_seq_len)


def load_builtin(tokenizer: Tokenizer, *, vocab_size: int, seed: int = 0, num_samples: int | None = None,
                 max_seq_len: int | None = None) -> Corpus:
  """The built-in corpus, its documents cut to their token budgets in the checkpoint's tokenizer."""
  samples = builtin_corpus(seed, num_samples, cut_to_tokens=tokenizer.cut)
  ids = tokenizer.encode([s['text'] for s in samples])
  return _make_corpus(ids, [s['category'] for s in samples], f'built-in corpus (seed {seed})',
                      vocab_size, max_seq_len)


def _make_corpus(ids_list: Sequence[Sequence[int] | None], categories: list[str | None], source: str,
                 vocab_size: int, max_seq_len: int | None) -> Corpus:
  samples, truncated, dropped = [], 0, 0
  for i, ids in enumerate(ids_list):
    arr = np.asarray(ids, np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
      bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
      raise UserError(f'{source}: sample {i} has token id {bad} outside the vocabulary (size {vocab_size})')
    if max_seq_len is not None and arr.size > max_seq_len:
      truncated += 1
      dropped += arr.size - max_seq_len
      arr = arr[:max_seq_len]
    samples.append(arr.astype(np.int32))
  nonempty = [i for i, s in enumerate(samples) if s.size]
  if not nonempty:
    raise UserError(f'{source}: the corpus is empty (no samples with tokens)')
  if len(nonempty) < len(samples):
    samples = [samples[i] for i in nonempty]
    categories = [categories[i] for i in nonempty]
  return Corpus(samples, categories, source, truncated, dropped)


def describe_corpus(corpus: Corpus) -> str:
  """One line: samples, tokens, length min/median/max, categories, truncation."""
  lengths = corpus.lengths
  counts: dict[str, int] = {}
  for c in corpus.categories:
    counts[c or 'uncategorized'] = counts.get(c or 'uncategorized', 0) + 1
  cats = ', '.join(f'{c} {counts[c]}' for c in sorted(counts))
  line = (f'{corpus.source}: {len(lengths):,} samples, {corpus.num_tokens:,} tokens, '
          f'length min/median/max {lengths.min()}/{int(np.median(lengths))}/{lengths.max()}; '
          f'{len(counts)} categories ({cats}); ')
  if corpus.truncated:
    line += (f'{corpus.truncated:,} samples truncated at --max_seq_len '
             f'({corpus.tokens_dropped:,} tokens dropped)')
  else:
    line += 'none truncated'
  return line


def write_text(text: str, path: str) -> None:
  """Write atomically (see maxact_jax.atomic); the corpus side needs no JAX."""
  atomic.write_text(path, text)


def write_jsonl(samples: Sequence[Mapping[str, Any]], path: str) -> None:
  """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
  write_text(''.join(json.dumps(dict(s), ensure_ascii=False) + '\n' for s in samples), path)


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


# What one more compiled batch shape must save in padded tokens to be worth its
# compilation. On 2 CPU cores a step compiles in about 2.7 s, the time the bench
# checkpoint takes to process some 5,000 tokens; on accelerators a compile buys
# far more tokens. The default is the cautious side of that: shapes are dropped
# only where they save little (the built-in corpus keeps all 8).
SHAPE_COST_TOKENS = 2048


def plan_batches(lengths: np.ndarray, batch_size: int, max_shapes: int = 8,
                 pad_multiple: int = 1, shape_cost_tokens: int = SHAPE_COST_TOKENS) -> BatchPlan:
  """Length-bucketed batches of exactly `batch_size` rows, at most `max_shapes` lengths.

  Samples are sorted longest first and cut into batches of `batch_size` (the
  last, shortest batch is filled with empty rows); then the batches' natural
  lengths are grouped into padded lengths by dynamic programming: for each
  number of lengths up to `max_shapes`, the grouping that processes the fewest
  (padded) tokens, and of those the number of lengths k that minimises
  processed tokens + k * `shape_cost_tokens` (0: always the fewest tokens).
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
  # cost[k][i]: fewest rows x length covering batches i..n-1 with at most k lengths.
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
  ks = np.arange(1, k_max + 1)
  k = int(ks[np.argmin(batch_size * cost[1:, 0] + shape_cost_tokens * ks)]) if n else 0
  lengths_out, i = [], 0
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
