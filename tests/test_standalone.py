"""The repository stands alone: no file of the project reaches outside it.

Tests, benchmarks, scripts, configs and docs read only what the clone holds (the
real configs under configs/real, the paper's result files under
tests/data/reference-results). This guard fails on any file that names a path
above the repository: a `../` step out of it, a parent of the repository root
taken in code, or the team's sibling `shared/` folder.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REAL_CONFIGS, REFERENCE_RESULTS, REPO

# Each pattern names a way a file can point outside the repository.
OUTSIDE = [
    (re.compile(r'(?<!\.)\.\./'), 'a relative path that climbs out of its folder (../)'),
    (re.compile(r"""['"]\.\.['"]"""), "a '..' path component"),
    (re.compile(r'\bparents\[\s*[1-9]'), 'a parent of a file taken with Path.parents'),
    (re.compile(r'dirname\(\s*REPO\s*\)'), 'the folder above the repository root'),
    (re.compile(r'\bshared/(real-configs|reference-results|DESIGN|STYLE|hooks)\b'),
     'the sibling shared/ folder'),
    (re.compile(r"""(join\(.*|/\s*)['"]shared['"]"""), 'a path component named shared'),
]
# Files that may name such paths as data, not as something to read.
ALLOWED = {
    'tests/test_standalone.py',  # this guard spells the patterns out
    'configs/real/SOURCES.md',  # provenance of the configs: where they were found
}
TEXT_SUFFIXES = ('.py', '.md', '.toml', '.cfg', '.ini', '.flags', '.txt', '.sh', '.json', '.yaml', '.yml')


def project_files(root: str) -> list[str]:
  """The files a clone holds: git's list where this is a checkout (tracked and
  untracked-but-not-ignored), else every file but the ignored build outputs."""
  try:
    out = subprocess.run(['git', '-C', root, 'ls-files', '-co', '--exclude-standard'], check=True,
                         capture_output=True, text=True).stdout
    return sorted(set(out.split('\n')) - {''})
  except (OSError, subprocess.CalledProcessError):
    skip = {'.git', '.venv', 'runs', '__pycache__', 'build'}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith('.egg-info')]
      found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    return sorted(found)


def outside_references(root: str) -> list[str]:
  """'file:line: what' for every line of a project file that points outside the repository."""
  hits = []
  for rel in project_files(root):
    name = os.path.basename(rel)
    if rel in ALLOWED or not (rel.endswith(TEXT_SUFFIXES) or name in ('Makefile', 'run')):
      continue
    path = os.path.join(root, rel)
    if not os.path.isfile(path) or (rel.endswith('.json') and os.path.getsize(path) > 200_000):
      continue
    with open(path, encoding='utf-8', errors='replace') as f:
      for lineno, line in enumerate(f, 1):
        for pattern, what in OUTSIDE:
          if pattern.search(line):
            hits.append(f'{rel}:{lineno}: {what}: {line.strip()[:120]}')
  return hits


def test_no_file_names_a_path_outside_the_repository():
  hits = outside_references(REPO)
  assert not hits, 'files that read outside the repository:\n' + '\n'.join(hits)


@pytest.mark.parametrize('line', [
    "SHARED = os.path.join(os.path.dirname(REPO), 'shared')",
    "REF = Path(__file__).resolve().parents[2] / 'shared' / 'reference-results'",
    'python bench/compile_time.py --model_path=../shared/real-configs/Qwen3-32B',
    "open(os.path.join(os.path.dirname(__file__), '..', 'data.json'))",
    'see shared/real-configs/SOURCES.md',
])
def test_the_guard_catches_each_way_out(tmp_path, line):
  """Every pattern fires on the kind of line that broke a fresh clone before."""
  (tmp_path / 'tests').mkdir()
  (tmp_path / 'tests' / 'test_x.py').write_text(f'import os\n{line}\n')
  hits = outside_references(str(tmp_path))
  assert hits and hits[0].startswith('tests/test_x.py:2:'), hits


def test_the_data_the_suite_reads_is_in_the_repository():
  configs = sorted(d for d in os.listdir(REAL_CONFIGS) if os.path.isfile(os.path.join(REAL_CONFIGS, d, 'config.json')))
  assert len(configs) >= 17 and 'Qwen3-8B' in configs and 'gpt-oss-20b' in configs
  results = sorted(os.listdir(REFERENCE_RESULTS))
  assert 'Qwen3-8B_activation_stats.json' in results and 'SOURCES.md' in results
  for d in (REAL_CONFIGS, REFERENCE_RESULTS):
    assert os.path.commonpath([REPO, os.path.realpath(d)]) == os.path.realpath(REPO)
