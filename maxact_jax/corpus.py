"""The built-in corpus: multi-domain text that works offline on any machine.

`builtin_corpus(seed)` returns samples `{'text', 'category'}` in seven
categories (CATEGORY_WEIGHTS): prose, code, math, structured data, dialogue,
multilingual text and markup. Prose and code come partly from the running
Python's standard library (its docstrings and source files, read with `ast`,
never imported), the rest from the seeded generators in
`maxact_jax.corpus_gen` and `maxact_jax.corpus_lang`; no text is downloaded
or stored in the repository.

Length plan, in tokens. Like the reference's evaluation corpus (documents cut
to token budgets, most at the longest budget, a few shorter for variety),
each sample draws a budget from LENGTH_PLAN: 80% are long documents of 448 to
512 tokens, the rest tens to hundreds of tokens. Every document is generated
to GENERATED_BYTES_PER_TOKEN bytes per budget token, then cut:
- given the checkpoint's tokenizer (`cut_to_tokens`, what `measure` does),
  at its budget in that tokenizer's tokens, so token lengths sit in a few
  narrow bands whatever the tokenizer, and batches waste little on padding
  (a plan of 8 shapes at batch size 8 pads a few percent, where a corpus cut
  in bytes pads 10-12%: bytes per token differ twofold between prose and
  digit-heavy text, and by how much depends on the tokenizer);
- without a tokenizer (the portable text that `maxact-jax corpus` writes),
  at PORTABLE_BYTES_PER_TOKEN UTF-8 bytes per budget token, at a word
  boundary. Budgets count UTF-8 bytes rather than characters because bytes
  track tokens across scripts far better (a CJK character is 3 bytes).
Both cuts are prefixes of the same documents.

Determinism: for a given seed and Python version the samples are identical,
byte for byte; the standard-library part follows the Python version (its
docstrings and sources change between releases), the generated part does not.
"""

from __future__ import annotations

import ast
import codecs
import collections
import functools
import math
import os
import random
import statistics
import sysconfig
from typing import Callable, Iterator, Mapping, Sequence

from maxact_jax import corpus_gen
from maxact_jax import corpus_lang
from maxact_jax.errors import UserError

DEFAULT_NUM_SAMPLES = 2500
MAX_NUM_SAMPLES = 100_000
CATEGORY_WEIGHTS = {
    'prose': 0.20,
    'code': 0.20,
    'math': 0.12,
    'structured': 0.14,
    'dialogue': 0.12,
    'multilingual': 0.12,
    'markup': 0.10,
}
GENERATORS: dict[str, Callable[[random.Random], Iterator[str]]] = {
    'prose': corpus_gen.prose,
    'code': corpus_gen.code,
    'math': corpus_gen.mathematics,
    'structured': corpus_gen.structured,
    'dialogue': corpus_gen.dialogue,
    'multilingual': corpus_lang.multilingual,
    'markup': corpus_gen.markup,
}
# Share of the prose and code quotas taken from the standard library (while it lasts).
STDLIB_SHARE = {'prose': 0.6, 'code': 0.5}
# Pure-Python standard-library files (one a Python version lacks, or a trimmed install, is skipped).
STDLIB_FILES = (
    'argparse.py', 'ast.py', 'bisect.py', 'calendar.py', 'collections/__init__.py', 'configparser.py',
    'contextlib.py', 'copy.py', 'csv.py', 'dataclasses.py', 'difflib.py', 'email/message.py',
    'email/utils.py', 'enum.py', 'fnmatch.py', 'fractions.py', 'functools.py', 'gettext.py', 'glob.py',
    'gzip.py', 'heapq.py', 'html/parser.py', 'http/client.py', 'inspect.py', 'ipaddress.py',
    'json/decoder.py', 'json/encoder.py', 'json/__init__.py', 'logging/__init__.py', 'mailbox.py',
    'optparse.py', 'pathlib.py', 'pprint.py', 'queue.py', 'random.py', 'shlex.py', 'shutil.py',
    'statistics.py', 'string.py', 'tarfile.py', 'tempfile.py', 'textwrap.py', 'threading.py', 'timeit.py',
    'tokenize.py', 'traceback.py', 'typing.py', 'unittest/case.py', 'urllib/parse.py', 'uuid.py',
    'warnings.py', 'zipfile.py', 'this.py',
)

# Length plan, in tokens: (share of samples, low, high); long documents dominate.
LENGTH_PLAN = ((0.08, 8, 100), (0.12, 100, 448), (0.80, 448, 512))
GENERATED_BYTES_PER_TOKEN = 6  # material generated per budget token: enough for nearly every tokenizer
PORTABLE_BYTES_PER_TOKEN = 4  # the cut without a tokenizer

# cut_to_tokens(texts, budgets) -> texts: each text cut to at most its budget of tokens.
TokenCutter = Callable[[Sequence[str], Sequence[int]], list[str]]

# ---------------------------------------------------------------------------
# Standard-library material.


def _doc_units(tree: ast.Module, module: str) -> list[str]:
  """Docstrings of a module and its classes and functions (methods too), each under a heading."""
  units = []
  doc = ast.get_docstring(tree)
  if doc and len(doc) >= 40:
    units.append(f'Module {module}\n\n{doc}')

  def visit(body: list[ast.stmt], prefix: str) -> None:
    for node in body:
      if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      name = f'{prefix}{node.name}'
      if isinstance(node, ast.ClassDef):
        bases = ', '.join(ast.unparse(b) for b in node.bases)
        heading = f'class {name}' + (f'({bases})' if bases else '')
      else:
        heading = f'{name}({ast.unparse(node.args)})'
      doc = ast.get_docstring(node)
      if doc and len(doc) >= 40:
        units.append(f'{heading}\n\n{doc}')
      if isinstance(node, ast.ClassDef):
        visit(node.body, f'{name}.')

  visit(tree.body, f'{module}.')
  return units


@functools.lru_cache(maxsize=None)
def stdlib_material(files: tuple[str, ...] = STDLIB_FILES) -> tuple[tuple[tuple[str, ...], ...],
                                                                     tuple[tuple[str, ...], ...]]:
  """(prose streams, code streams): per standard-library file, its documentation units and code units.

  A documentation unit is a module, class or function docstring under a
  heading naming the object; a code unit is one top-level statement's source.
  Files that are missing or do not parse (a trimmed installation) are skipped.
  """
  root = sysconfig.get_paths()['stdlib']
  prose, code = [], []
  for rel in files:
    try:
      with open(os.path.join(root, rel), encoding='utf-8') as f:
        source = f.read()
      tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
      continue
    module = rel[:-3].replace('/', '.').removesuffix('.__init__')
    if module == 'this':  # the Zen of Python, stored ROT13-encoded
      encoded = next((n.value.value for n in tree.body if isinstance(n, ast.Assign)
                      and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)), None)
      if encoded:
        prose.append(('The Zen of Python\n\n' + codecs.decode(encoded, 'rot13'),))
      continue
    docs = _doc_units(tree, module)
    lines = source.splitlines()
    units = ['\n'.join(lines[n.lineno - 1:n.end_lineno]) for n in tree.body
             if getattr(n, 'end_lineno', None) is not None]
    if docs:
      prose.append(tuple(docs))
    if units:
      code.append(tuple(u for u in units if u.strip()))
  return tuple(prose), tuple(code)


class _StdlibSource:
  """Documents cut from standard-library streams, never reusing a unit."""

  def __init__(self, streams: Sequence[Sequence[str]], rng: random.Random):
    self._streams = [list(s) for s in streams]
    self._cursor = [0] * len(self._streams)
    self._rng = rng

  def document(self) -> Iterator[str] | None:
    live = [i for i, s in enumerate(self._streams) if self._cursor[i] < len(s)]
    if not live:
      return None
    i = live[self._rng.randrange(len(live))]

    def units() -> Iterator[str]:
      while self._cursor[i] < len(self._streams[i]):
        self._cursor[i] += 1
        yield self._streams[i][self._cursor[i] - 1]
    return units()


# ---------------------------------------------------------------------------
# Assembly.


def _utf8_len(text: str) -> int:
  return len(text.encode('utf-8'))


def cut(text: str, budget: int) -> str:
  """`text` cut to at most `budget` UTF-8 bytes, at a whitespace boundary where one is near.

  Never splits a character; a text without a space near the end (CJK) is cut between characters.
  """
  data = text.encode('utf-8')
  if len(data) <= budget:
    return text
  head = data[:budget].decode('utf-8', errors='ignore')
  space = max(head.rfind(' '), head.rfind('\n'))
  if space > 0 and (len(head) - space <= 40 or space >= 0.8 * len(head)):  # not far back (CJK has no spaces)
    head = head[:space]
  return head.rstrip()


def fill(units: Iterator[str], budget: int, sep: str = '\n\n') -> str:
  """Join units until `budget` UTF-8 bytes; the unit that overflows is cut."""
  parts: list[str] = []
  size = 0
  for unit in units:
    add = _utf8_len(unit) + (len(sep) if parts else 0)
    if size + add > budget:
      parts.append(unit)
      return cut(sep.join(parts), budget)
    parts.append(unit)
    size += add
    if size >= budget:
      break
  return sep.join(parts)


def _budget(rng: random.Random) -> int:
  """A token budget drawn from LENGTH_PLAN: uniform in a narrow band, log-uniform in a wide one."""
  r, acc = rng.random(), 0.0
  for share, low, high in LENGTH_PLAN:
    acc += share
    if r < acc:
      break
  if high <= 2 * low:
    return rng.randrange(low, high + 1)
  return int(round(low * (high / low) ** rng.random()))


def _category_documents(category: str, count: int, seed: int, seen: set[str],
                        length_scale: int = 1) -> list[tuple[str, int, str]]:
  """(document, token budget, portable cut) of `count` samples, distinct in their portable cut."""
  rng = random.Random(f'maxact-jax corpus/{seed}/{category}')
  stdlib = None
  stdlib_quota = 0
  if category in STDLIB_SHARE:
    prose, code = stdlib_material()
    stdlib = _StdlibSource(prose if category == 'prose' else code, rng)
    stdlib_quota = int(round(STDLIB_SHARE[category] * count))
  out: list[tuple[str, int, str]] = []
  misses = 0
  while len(out) < count:
    budget = _budget(rng) * length_scale
    units = stdlib.document() if stdlib is not None and len(out) < stdlib_quota else None
    if units is None:
      units = GENERATORS[category](rng)
    document = fill(units, budget * GENERATED_BYTES_PER_TOKEN).strip()
    portable = cut(document, budget * PORTABLE_BYTES_PER_TOKEN)
    if len(portable) < 10 or portable in seen:  # too short to be a sample, or already there: draw again
      misses += 1
      if misses > 10 * count + 100:
        raise RuntimeError(f'the {category} generator keeps repeating itself')
      continue
    seen.add(portable)
    out.append((document, budget, portable))
  return out


def allocate(category_counts: Mapping[str, float], size: int) -> dict[str, int]:
  """Split `size` over categories in proportion to their counts (largest remainder).

  Every category gets floor(exact) or ceil(exact) of its exact share
  size * count / total, so it is within one of exact; the leftover units go
  to the largest remainders, ties broken by category order (the mapping's
  order), so the answer is deterministic. Works with fractional weights too.

  Raises:
    UserError: a negative size or count, or no positive count.
  """
  if size < 0:
    raise UserError(f'subset size must be non-negative, got {size}')
  if any(c < 0 for c in category_counts.values()):
    raise UserError('category counts must be non-negative')
  total = sum(category_counts.values())
  if total <= 0:
    raise UserError('cannot allocate over an empty corpus')
  exact = {c: size * n / total for c, n in category_counts.items()}
  out = {c: math.floor(x) for c, x in exact.items()}
  order = sorted(category_counts, key=lambda c: -(exact[c] - out[c]))  # stable: keeps mapping order on ties
  for c in order[:size - sum(out.values())]:
    out[c] += 1
  return out


def builtin_corpus(seed: int = 0, num_samples: int | None = None,
                   cut_to_tokens: TokenCutter | None = None, length_scale: int = 1) -> list[dict[str, str]]:
  """Samples with `text` and `category`, in an order shuffled by `seed`.

  Args:
    seed: fixes every generated byte and the order.
    num_samples: corpus size (default DEFAULT_NUM_SAMPLES); the categories keep
      their shares (largest-remainder allocation of CATEGORY_WEIGHTS).
    cut_to_tokens: the measured checkpoint's tokenizer as a function
      (texts, budgets) -> texts cut to at most that many tokens each
      (`maxact_jax.data.Tokenizer.cut`); None cuts at
      PORTABLE_BYTES_PER_TOKEN bytes per budget token instead.
    length_scale: every budget times this (the same length plan, longer
      documents: the bench's corpus of up to 1,024 tokens is scale 2).

  Raises:
    UserError: num_samples outside 1..MAX_NUM_SAMPLES.
  """
  n = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
  if not 1 <= n <= MAX_NUM_SAMPLES:
    raise UserError(f'the built-in corpus has 1 to {MAX_NUM_SAMPLES} samples, asked for {n}')
  quotas = allocate(CATEGORY_WEIGHTS, n)
  seen: set[str] = set()
  docs: list[tuple[str, int, str]] = []
  categories: list[str] = []
  for category in CATEGORY_WEIGHTS:
    docs += _category_documents(category, quotas[category], seed, seen, length_scale)
    categories += [category] * quotas[category]
  if cut_to_tokens is None:
    texts = [portable for _, _, portable in docs]
  else:
    texts = cut_to_tokens([d for d, _, _ in docs], [b for _, b, _ in docs])
  samples = [{'text': t, 'category': c} for t, c in zip(texts, categories)]
  random.Random(f'maxact-jax corpus/{seed}/order').shuffle(samples)
  return samples


# ---------------------------------------------------------------------------
# Description.


def corpus_stats(samples: Sequence[dict[str, str]]) -> dict[str, object]:
  """Sizes, category shares and duplicate rate of a list of {'text', 'category'} samples."""
  lengths = [len(s['text']) for s in samples]
  counts = collections.Counter(s.get('category') or 'uncategorized' for s in samples)
  distinct = len({s['text'] for s in samples})
  return {
      'samples': len(samples),
      'chars': sum(lengths),
      'utf8_bytes': sum(_utf8_len(s['text']) for s in samples),
      'chars_min': min(lengths, default=0),
      'chars_median': statistics.median(lengths) if lengths else 0,
      'chars_max': max(lengths, default=0),
      'categories': {c: counts[c] for c in sorted(counts)},
      'category_shares': {c: counts[c] / len(samples) for c in sorted(counts)},
      'duplicate_rate': 1 - distinct / len(samples) if samples else 0.0,
  }
