"""Shared fixtures: tiny checkpoints built by transformers, a tokenizer, corpora.

Checkpoints are built once per test session (random init, fixed seed) and
cached under pytest's session temp directory.
"""

from __future__ import annotations

import json
import os
import tempfile

# One persistent XLA compilation cache for the whole test session (and the
# subprocesses it starts): the same tiny models compile once, not once per test.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='maxact-test-xla-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from maxact_jax import fixtures  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real config.json files of the paper's checkpoints (configs/real/SOURCES.md says
# where each came from) and the paper's published result files (tests/data/
# reference-results/SOURCES.md): both live in the repository, so a clone needs nothing
# beside it.
REAL_CONFIGS = os.path.join(REPO, 'configs', 'real')
REFERENCE_RESULTS = os.path.join(REPO, 'tests', 'data', 'reference-results')


class CheckpointFactory:
  """Builds tiny checkpoints on demand, once per (name, arguments)."""

  def __init__(self, root):
    self.root = root
    self.cache: dict[str, str] = {}

  def __call__(self, model_type: str, name: str | None = None, **overrides) -> str:
    key = name or model_type + ''.join(f'-{k}={v}' for k, v in sorted(overrides.items()))
    if key not in self.cache:
      out = str(self.root / key.replace('/', '_'))
      fixtures.tiny_checkpoint(model_type, out, seed=0, **overrides)
      self.cache[key] = out
    return self.cache[key]


@pytest.fixture(scope='session')
def checkpoint(tmp_path_factory) -> CheckpointFactory:
  return CheckpointFactory(tmp_path_factory.mktemp('ckpt'))


@pytest.fixture(scope='session')
def tokenizer_dir(tmp_path_factory) -> str:
  from maxact_jax.corpus import builtin_corpus
  texts = [r['text'] for r in builtin_corpus()[:200]]
  return fixtures.train_tokenizer(texts, str(tmp_path_factory.mktemp('tok')), vocab_size=512)


def write_ids_corpus(path, samples: list[list[int]]) -> str:
  with open(path, 'w') as f:
    for s in samples:
      f.write(json.dumps({'input_ids': [int(i) for i in s]}) + '\n')
  return str(path)


@pytest.fixture
def ids_corpus(tmp_path):
  """A token-id corpus in the reference format: varied lengths, vocab 256."""
  lengths = [5, 17, 9, 33, 12, 3, 21, 8, 40, 16, 11, 27]
  return write_ids_corpus(tmp_path / 'ids.jsonl', fixtures.random_token_ids(256, lengths, seed=1))


class MoECheckpointFactory:
  """Tiny MoE checkpoints (maxact_jax.fixtures_moe), built once per (name, arguments);
  'bailing_moe' gives (Ling-layout checkpoint, the glm4_moe reference model)."""

  def __init__(self, root):
    self.root = root
    self.cache: dict[str, object] = {}

  def __call__(self, model_type: str, **overrides):
    from maxact_jax import fixtures_moe
    key = model_type + ''.join(f'-{k}={v}' for k, v in sorted(overrides.items()))
    if key not in self.cache:
      out = str(self.root / key.replace('/', '_'))
      if model_type == 'bailing_moe':
        self.cache[key] = fixtures_moe.ling_checkpoint(out, seed=0, **overrides)
      else:
        self.cache[key] = fixtures_moe.moe_checkpoint(model_type, out, seed=0, **overrides)
    return self.cache[key]


@pytest.fixture(scope='session')
def moe_checkpoint(tmp_path_factory) -> MoECheckpointFactory:
  return MoECheckpointFactory(tmp_path_factory.mktemp('moe_ckpt'))
