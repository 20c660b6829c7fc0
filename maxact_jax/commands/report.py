"""`maxact-jax report`: the cross-model report over a folder of result files.

Reads every *_activation_stats.json under --results_dir (and the matching
*_top5_stats.json) and writes summary.json, report.md, report.html and the
plots into --output_dir. The numbers are in `maxact_jax.report`, the documents in
`maxact_jax.report_render`.
"""

from __future__ import annotations

from absl import flags

from maxact_jax import report, report_render
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()

_RESULTS_DIR = flags.DEFINE_string(
    'results_dir', None,
    'Folder searched recursively for *_activation_stats.json (ours or the reference '
    "repository's) and the matching *_top5_stats.json.", flag_values=FLAGS)
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where summary.json, report.md, report.html and the PNG plots are written.', flag_values=FLAGS)
_PAIRS = flags.DEFINE_string(
    'pairs', None,
    'MoE:dense pairs that replace the automatic match, comma separated, e.g. '
    'Qwen3-30B-A3B:Qwen3-32B,Qwen3.5-35B-A3B:Qwen3.5-27B.', flag_values=FLAGS)


def run() -> int:
  """Build the summary, write the report, print the headline numbers."""
  if not _RESULTS_DIR.value:
    raise UserError('--results_dir is required (a folder holding *_activation_stats.json files)')
  if not _OUTPUT_DIR.value:
    raise UserError('--output_dir is required (where the report is written)')
  summary = report.build_summary(_RESULTS_DIR.value, pairs=_PAIRS.value)
  written = report_render.write_report(summary, _OUTPUT_DIR.value)
  print(report.headline(summary))
  print(f'wrote {", ".join(sorted(written))} to {_OUTPUT_DIR.value}')
  return 0
