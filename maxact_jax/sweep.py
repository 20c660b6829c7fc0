"""Sweeps: `measure` over a list of flagfiles, skipping finished models, then the report.

Each config is an absl flagfile of the measure command (configs/paper/ holds one
per checkpoint of the paper, as the paper ran it). The sweep command
(`maxact_jax.commands.sweep`) reads each with the measure command's own flag
set, so a config means exactly what `maxact-jax measure --flagfile=<config>`
means, into a `SweepEntry`. The sweep then

- puts every result into one output folder (its own --output_dir wins over a
  config's), so that the report covers them all;
- skips a model whose two result files are present and valid JSON (a crashed
  or interrupted run never leaves one behind: results are written atomically);
- carries on after a model fails, lists the failures at the end and returns
  them, so the caller can exit non-zero;
- writes the cross-model report (`maxact_jax.report_render`) over the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from typing import Any, Callable, Sequence

from maxact_jax import measure, report_render, results
from maxact_jax.errors import UserError

ACTIVATION_SUFFIX = '_activation_stats.json'
TOP5_SUFFIX = '_top5_stats.json'


@dataclasses.dataclass
class SweepEntry:
  config_path: str
  name: str  # the model name: its checkpoint directory's name, as the result files are named
  options: measure.MeasureOptions


@dataclasses.dataclass
class SweepResult:
  measured: list[str]
  skipped: list[str]
  failed: list[tuple[str, str]]  # (model name, one-line reason)
  report_files: dict[str, Any]
  report_error: str | None = None

  @property
  def ok(self) -> bool:
    return not self.failed and self.report_error is None


def _valid_json_object(path: str) -> bool:
  try:
    with open(path, encoding='utf-8') as f:
      doc = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(doc, dict) and isinstance(doc.get('per_layer_stats'), dict)


def finished(output_dir: str, name: str) -> bool:
  """Both result files of a model are present and valid."""
  json_dir = os.path.join(output_dir, 'json')
  return all(_valid_json_object(os.path.join(json_dir, name + suffix)) for suffix in (ACTIVATION_SUFFIX, TOP5_SUFFIX))


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')


def run(entries: Sequence[SweepEntry], output_dir: str, report_dir: str, pairs: str | None = None,
        log: Callable[[str], None] = print) -> SweepResult:
  """Measure each unfinished entry, then write the report over `output_dir`."""
  result = SweepResult([], [], [], {})
  results.ensure_output_dir(output_dir)
  n = len(entries)
  for i, entry in enumerate(entries, 1):
    head = f'[{i}/{n}] {entry.name}'
    if finished(output_dir, entry.name):
      log(f'{head}: results exist, skipped')
      result.skipped.append(entry.name)
      continue
    log(f'{head}: measuring ({entry.config_path})')
    t0 = time.perf_counter()
    try:
      m = measure.measure(entry.options)
    except KeyboardInterrupt:
      raise
    except UserError as e:
      result.failed.append((entry.name, str(e)))
      log(f'{head}: FAILED: {e}')
      continue
    except Exception as e:  # pylint: disable=broad-except  # one model's crash must not stop the sweep
      result.failed.append((entry.name, _one_line(e)))
      log(f'{head}: FAILED: {_one_line(e)}\n' + ''.join(traceback.format_exception(e)[-3:]).rstrip())
      continue
    result.measured.append(entry.name)
    log(f'{head}: global max {m.doc["global_max_activation"]:.6g} at {m.doc["global_max_location"]} '
        f'({time.perf_counter() - t0:.1f} s)')
  try:
    result.report_files = report_render.write_report(output_dir, report_dir, pairs)
  except UserError as e:
    result.report_error = str(e)
  return result


def summary_lines(result: SweepResult, report_dir: str) -> list[str]:
  lines = [f'measured {len(result.measured)}, skipped {len(result.skipped)} (results exist), '
           f'failed {len(result.failed)}']
  lines += [f'  FAILED {name}: {reason}' for name, reason in result.failed]
  if result.report_error:
    lines.append(f'no report: {result.report_error}')
  else:
    lines.append(f'report: {os.path.join(report_dir, "report.html")}')
  return lines
