"""The layering holds: import-linter's contracts (pyproject.toml) are kept, and every module has its place.

The drawing is the "layers" contract in pyproject.toml [tool.importlinter] and the
README's Layout section; `lint-imports` checks it with the other contracts (the
measurement path never imports torch, nothing below the jobs imports a job, no
import cycle, ...). On a break, the failure shows lint-imports' report: the
contract and the offending import chain, file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import grimp
import pytest
from importlinter import api

from tests.conftest import REPO

PYPROJECT = os.path.join(REPO, 'pyproject.toml')
ROOT_PACKAGES = ('maxact_jax', 'converters')


def _contract(contract_id: str) -> dict:
  contracts = api.read_configuration(PYPROJECT)['contracts_options']
  return next(c for c in contracts if c.get('id') == contract_id)


def _layer_modules(contract_id: str) -> list[str]:
  """Every module named in a layers contract, siblings split out."""
  return [m.strip() for line in _contract(contract_id)['layers'] for m in re.split(r'[|:]', line)]


def test_import_contracts_are_kept():
  # The console script of the environment running the tests (make setup installs it: dev extra).
  lint_imports = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
  proc = subprocess.run([lint_imports, '--no-cache', PYPROJECT], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False)
  if proc.returncode != 0:
    report = proc.stdout[proc.stdout.find('Contracts'):] if 'Contracts' in proc.stdout else proc.stdout
    pytest.fail(f'an import contract is broken (lint-imports):\n{report}\n{proc.stderr}', pytrace=False)


def test_every_module_has_its_place_in_the_drawing():
  placed = _layer_modules('layers')
  graph = grimp.build_graph(*ROOT_PACKAGES)
  # maxact_jax/__init__.py is empty: the package itself needs no place.
  unplaced = sorted(m for m in graph.modules
                    if m != 'maxact_jax' and not any(m == p or m.startswith(p + '.') for p in placed))
  assert not unplaced, (f'{", ".join(unplaced)}: not in the drawing. Give each a line in the "layers" contract '
                        '(pyproject.toml [tool.importlinter]) and in the README\'s Layout section.')


def test_the_readme_names_every_module_of_the_drawing():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  layout = text[text.index('## Layout'):]
  files = []
  for module in _layer_modules('layers'):
    parts = module.split('.')
    path = os.path.join(REPO, *parts)
    files.append(f'`{parts[-1]}/`' if os.path.isdir(path) else f'`{parts[-1]}.py`')
  files += [f'`{m}.py`' for m in _layer_modules('converters-layers')]
  missing = [f for f in files if f not in layout]
  assert not missing, f'the README\'s Layout section does not name {", ".join(missing)}'
