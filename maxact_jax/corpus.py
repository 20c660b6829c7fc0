"""The built-in corpus: text that works offline on any machine.

Assembled from what every Python installation carries (the standard library's
documentation strings and source code), so a measurement runs with no
download. `builtin_corpus(seed)` is deterministic for a seed.
"""

from __future__ import annotations

import importlib
import inspect
import random

MODULES = ('json', 'csv', 'textwrap', 'argparse', 'collections', 'functools', 'statistics',
           'fractions', 'decimal', 'heapq', 'bisect', 'string', 'calendar', 'difflib')


def _prose_and_code() -> list[dict[str, str]]:
  out = []
  for name in MODULES:
    module = importlib.import_module(name)
    for obj_name, obj in sorted(vars(module).items()):
      if obj_name.startswith('_') or not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue
      doc = inspect.getdoc(obj)
      if doc and len(doc) > 80:
        out.append({'text': doc, 'category': 'prose'})
      try:
        src = inspect.getsource(obj)
      except (OSError, TypeError):
        continue
      if 200 < len(src) < 4000:
        out.append({'text': src, 'category': 'code'})
  return out


def builtin_corpus(seed: int = 0, num_samples: int | None = None) -> list[dict[str, str]]:
  """Samples with `text` and `category`, shuffled deterministically by `seed`."""
  samples = _prose_and_code()
  rng = random.Random(seed)
  rng.shuffle(samples)
  return samples[:num_samples] if num_samples else samples
