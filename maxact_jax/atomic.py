"""Atomic file writes: every file this project writes goes through here.

Data goes to a temporary file in the target's folder, is flushed to disk, and
is renamed over the target, so a reader (or a run killed at any instant) sees
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from maxact_jax.errors import UserError


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror or e}') from None
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise UserError(f'cannot write {path}: {e.strerror or e}') from None
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str | os.PathLike, data: Any, allow_nan: bool = True) -> None:
  write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=allow_nan) + '\n')
