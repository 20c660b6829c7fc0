"""Cross-model report, its documents: summary.json, report.md, report.html and the plots.

`write_report` renders a summary from `maxact_jax.report.build_summary` (or
builds it from a results folder first) into

- `summary.json`;
- `report.md` and `report.html` (self-contained, images referenced relatively);
- PNG plots: `residual_layerwise.png`, `component_peaks.png`, `topk_scan.png`,
  and `quantization_impact.png` when `qeval` results are there (a "Quantization
  impact" section: KL and loss change per scheme against the global maximum);
- per model with an outlier anatomy: an "Outlier anatomy" section (outlier
  channels, the tokens that carry the massive activations) with
  `anatomy_<model>_{layerwise,channels,surface}.png`.

Nothing here computes a number the summary does not hold; the figures are
drawn by `maxact_jax.plots`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maxact_jax import anatomy, atomic, plots
from maxact_jax.errors import UserError
from maxact_jax.report import (COMPONENT_LABELS, N_ANATOMY_CHANNELS, PAIR_SIZE_TOLERANCE, build_summary, fmt_params,
                               fmt_ratio, fmt_value)

SUMMARY_FILE = 'summary.json'
PLOT_RESIDUAL = 'residual_layerwise.png'
PLOT_COMPONENTS = 'component_peaks.png'
PLOT_TOPK = 'topk_scan.png'
PLOT_QUANT = 'quantization_impact.png'
ANATOMY_VIEWS = ('layerwise', 'channels', 'surface')


def anatomy_plot_name(model_name: str, view: str) -> str:
  return f'anatomy_{re.sub(r"[^A-Za-z0-9._-]", "_", model_name)}_{view}.png'


def anatomy_plots(summary: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, bytes]:
  """The anatomy views of one model: {file name: PNG}, from the summary and the .npz files it names."""
  a = model.get('anatomy')
  if not a:
    return {}
  name = model['model_name']
  out = {}
  if a.get('layerwise'):
    png = plots.plot_layerwise(a['layerwise'], name)
    if png:
      out[anatomy_plot_name(name, 'layerwise')] = png
  root = Path(summary['results_dir'])
  if a.get('channels_file') and (root / a['channels_file']).is_file():
    layers, absmax, _ = anatomy.read_channels(str(root / a['channels_file']))
    png = plots.plot_channels(layers, absmax, a.get('outlier_channels') or [], name)
    if png:
      out[anatomy_plot_name(name, 'channels')] = png
  if a.get('surface_file') and (root / a['surface_file']).is_file():
    try:
      with np.load(root / a['surface_file'], allow_pickle=False) as z:
        surf = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise UserError(f'cannot read {root / a["surface_file"]}: {e}') from None
    surf['sample'], surf['layer'] = int(surf['sample']), int(surf['layer'])
    if 'tokens' in surf:
      surf['tokens'] = [str(t) for t in surf['tokens']]
    out[anatomy_plot_name(name, 'surface')] = plots.plot_surface(surf, name)
  return out


def _anatomy_sections(summary: Mapping[str, Any], plot_files: Sequence[str]) -> list[tuple[str, list['_Block']]]:
  sections = []
  for m in summary['models']:
    a = m.get('anatomy')
    if not a:
      continue
    blocks: list[_Block] = []
    g = a.get('global_max')
    if g:
      blocks.append(f'Global max {fmt_value(g.get("value"))} in `{g.get("tap")}` ({g.get("which")}): sample '
                    f'{g.get("sample")}, position {g.get("position")}, channel {g.get("channel")}, token '
                    f'`{g.get("token")!r}` (id {g.get("token_id")}).')
    if a.get('rule'):
      blocks.append(f'Outlier channels: {a["rule"]}, in at least {a["min_layers"]} of {a["num_layers"]} layers: '
                    f'{a["n_outlier_channels"]} found' + (f' (the first {N_ANATOMY_CHANNELS} by peak)'
                                                          if a['n_outlier_channels'] > N_ANATOMY_CHANNELS else '')
                    + '.')
    if a.get('outlier_channels'):
      blocks.append(_Table(
          ['channel', 'layers over', 'appears at', 'last over', 'gone at', 'peak magnitude', 'peak layer'],
          [[str(c['channel']), f'{c["layers_over"]} ({c["share_of_layers"]:.0%})', f'L{c["first_layer"]}',
            f'L{c["last_layer"]}', '—' if c['disappears_at'] is None else f'L{c["disappears_at"]}',
            fmt_value(c['peak_abs']), f'L{c["peak_layer"]}'] for c in a['outlier_channels']]))
    for t in a.get('tokens') or []:
      if not t.get('total'):
        continue
      classes = ', '.join(f'{c} {v["flagged"]:,} of {v["total"]:,}' for c, v in t['classes'].items() if v['total'])
      text = (f'Tokens with a massive activation in at least one layer, {t["rule_label"]}: {t["flagged"]:,} of '
              f'{t["total"]:,}; by class: {classes}.')
      if t['top_token_ids']:
        text += ' Most often: ' + ', '.join(f'`{e["token"]!r}` ({e["flagged"]:,} of {e["occurrences"]:,})'
                                             if e.get('token') is not None else f'id {e["token_id"]} ({e["flagged"]:,})'
                                             for e in t['top_token_ids']) + '.'
      blocks.append(text)
    captions = {
        'layerwise': 'The three largest per-channel max |x| of each layer output against its median |x| (log scale).',
        'channels': 'Per-channel max |x| of every layer output (log colour); persistent outlier channels on top.',
        'surface': 'Token x channel |x| of one layer output for one sample, as a surface and a heat map.',
    }
    for view in ANATOMY_VIEWS:
      file = anatomy_plot_name(m['model_name'], view)
      if file in plot_files:
        blocks += [captions[view], _Image(file, f'{m["model_name"]}: {view}')]
    sections.append((f'Outlier anatomy: {m["model_name"]}', blocks))
  return sections


# ---------------------------------------------------------------------------
# Writing.


def _jsonable(x: Any) -> Any:
  """Non-finite floats become strings ('inf', '-inf', 'nan'): JSON has no such numbers."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def write_json(path: Path, obj: Any) -> None:
  atomic.write_bytes(path, (json.dumps(_jsonable(obj), indent=2, allow_nan=False) + '\n').encode('utf-8'))


@dataclasses.dataclass
class _Table:
  headers: list[str]
  rows: list[list[str]]


@dataclasses.dataclass
class _Image:
  src: str
  alt: str


_Block = str | _Table | _Image  # a str is a paragraph


def _sections(summary: Mapping[str, Any], plot_files: Sequence[str]) -> list[tuple[str, list[_Block]]]:
  """The report's content, rendered to Markdown and HTML by the writers below."""
  models = summary['models']
  rs = summary['residual_stream_max']
  found = [f'{len(models)} models from `{summary["results_dir"]}`.',
           f'The residual stream (`layer_i_hidden`) carries the global maximum in '
           f'{rs["count"]} of {rs["total"]} models.']
  if rs['elsewhere']:
    found.append('Elsewhere: ' + '; '.join(
        f'{e["model_name"]} in `{e["location"]}` ({COMPONENT_LABELS.get(e["component"], e["component"])}'
        + (', tied by the residual stream, which reaches the same |x| later in the layer'
           if e['residual_ties'] else '') + ')'
        for e in rs['elsewhere']) + '.')
  for p in summary['moe_dense_pairs']:
    found.append(f'{p["dense"]} peaks {fmt_ratio(p["ratio"])} higher than {p["moe"]} '
                 f'({fmt_value(p["dense_peak"])} vs {fmt_value(p["moe_peak"])})'
                 + (f'; the sizes differ ({fmt_params(p["dense_params_b"])} vs '
                    f'{fmt_params(p["moe_params_b"])}): the nearest dense model present'
                    if p['size_mismatch'] else '') + '.')
  sections: list[tuple[str, list[_Block]]] = [('Findings', found)]

  rows = [[m['model_name'], str(m['model_type']), 'MoE' if m['is_moe'] else 'dense',
           fmt_params(m['total_params_b']), fmt_value(m['global_max_activation']),
           f'`{m["global_max_location"]}`', COMPONENT_LABELS.get(m['component'], m['component']),
           '—' if m['peak_relative_depth'] is None else f'{m["peak_relative_depth"]:.2f}']
          for m in models]
  sections.append(('Models', [
      'Global max is the signed value of largest magnitude over the activation taps '
      '(embedding, attention, MLP/MoE, residual stream, final norm); depth is its layer / (layers - 1).',
      _Table(['model', 'type', 'dense/MoE', 'params', 'global max', 'location', 'component', 'depth'],
             rows)]))

  pair_blocks: list[_Block] = []
  if summary['moe_dense_pairs']:
    pair_blocks.append(_Table(
        ['MoE', 'dense', 'MoE peak', 'dense peak', 'dense / MoE', 'matched by'],
        [[p['moe'], p['dense'], fmt_value(p['moe_peak']), fmt_value(p['dense_peak']),
          fmt_ratio(p['ratio']),
          'override' if p['source'] == 'override' else
          f'family, nearest size ({fmt_params(p["moe_params_b"])} / {fmt_params(p["dense_params_b"])}'
          + (f', sizes differ more than {PAIR_SIZE_TOLERANCE:g}x' if p['size_mismatch'] else '') + ')']
         for p in summary['moe_dense_pairs']]))
  else:
    pair_blocks.append('No MoE model could be paired with a dense model.')
  for u in summary['moe_unpaired']:
    pair_blocks.append(f'{u["moe"]}: not paired ({u["reason"]}).')
  sections.append(('MoE vs dense', pair_blocks))

  plot_blocks: list[_Block] = []
  titles = {PLOT_RESIDUAL: 'residual stream per layer', PLOT_COMPONENTS: 'peaks per component',
            PLOT_TOPK: 'top-K scan'}
  captions = {
      PLOT_RESIDUAL: 'Residual stream: max |x| of each layer output, by relative depth (log scale).',
      PLOT_COMPONENTS: 'Peak |x| per component and model (log scale).',
      PLOT_TOPK: 'Top-K scan: top-1 / mean of top-5 of each residual layer; entries of the '
                 'global top-K equal to the top-1.',
  }
  for p in plot_files:
    if p != PLOT_QUANT:  # in its own section
      plot_blocks += [captions.get(p, p), _Image(p, titles.get(p, p))]
  sections.append(('Plots', plot_blocks))

  scans = summary['topk_scan']
  scan_blocks: list[_Block] = [
      'Over each model\'s global top-K |x| (union of the per-tap top-K lists): saturation counts the '
      'entries equal to the top-1 (a bf16 value repeated, often the same outlier carried through '
      'many layers); concentration is top-1 / mean of the top-5 and of the top-K; sign consistency '
      'is the share of the top-K with the sign of the top-1; hot layers hold the largest per-layer top-1.']
  if scans:
    scan_blocks.append(_Table(
        ['model', 'K', 'top-1', 'saturation', 'layers at top-1', 'top1/top5', 'top1/topK',
         'same sign', 'hot layers'],
        [[s['model_name'], str(s['k']), fmt_value(s['top1_signed']),
          f'{s["saturation"]["count"]} of {s["k"]}', _layer_span(s['saturation']['layers_at_max']),
          f'{s["concentration"]["top1_over_top5_mean"]:.3f}',
          f'{s["concentration"]["top1_over_topk_mean"]:.3f}', f'{s["sign_consistency"]:.0%}',
          ', '.join(f'L{h["layer"]} ({fmt_value(h["top1"])})' for h in s['hot_layers'])]
         for s in scans]))
  if summary['no_topk']:
    scan_blocks.append('No top-K data for: ' + ', '.join(summary['no_topk']) + '.')
  sections.append(('Top-K scan', scan_blocks))
  return sections + _quantization_sections(summary, plot_files) + _anatomy_sections(summary, plot_files)


def _quantization_sections(summary: Mapping[str, Any], plot_files: Sequence[str]) -> list[tuple[str, list[_Block]]]:
  """KL and loss change per scheme against each model's global maximum (`maxact-jax qeval`)."""
  q = summary.get('quantization')
  if not q:
    return []
  blocks: list[_Block] = [
      'Every linear layer\'s input and weight fake-quantized per scheme (`maxact-jax qeval`; the schemes '
      'are defined in the README), the model\'s next-token predictions against the unquantized model\'s '
      'on the same tokens: the paper\'s claim, that the maximum activations decide what low-bit '
      'deployment costs, put to a test. KL is KL(unquantized || quantized) in nats per predicted token; '
      'min levels is the fewest INT levels the bulk of a linear input spans (2^b x mean |x| / threshold; '
      'under 1 the bulk rounds to zero), and where.']
  rows = []
  for m in q['models']:
    for scheme in q['schemes']:
      s = m['schemes'].get(scheme)
      if s is None:
        continue
      rows.append([m['model_name'], f'{fmt_value(m["global_max_abs"])}', scheme,
                   '—' if s['delta_loss'] is None else f'{s["delta_loss"]:+.3g}',
                   '—' if s['kl_mean'] is None else f'{s["kl_mean"]:.3g}',
                   '—' if s['kl_p99'] is None else f'{s["kl_p99"]:.3g}',
                   '—' if s['top1_agreement'] is None else f'{s["top1_agreement"]:.1%}',
                   '—' if s['min_levels'] is None else f'{s["min_levels"]:.3g} (`{s["min_levels_site"]}`)'])
  blocks.append(_Table(['model', 'global max', 'scheme', 'Δloss', 'KL mean', 'KL p99', 'top-1 kept', 'min levels'],
                       rows))
  corr = [(scheme, c) for scheme, c in q['correlation'].items() if c['spearman_kl_vs_global_max'] is not None]
  if corr:
    blocks.append('Rank correlation (Spearman) of KL with the global maximum across models: ' + '; '.join(
        f'{scheme} {c["spearman_kl_vs_global_max"]:+.2f} ({c["models"]} models)' for scheme, c in corr) + '.')
  else:
    blocks.append('Fewer than 3 models per scheme: no rank correlation of KL with the global maximum.')
  if PLOT_QUANT in plot_files:
    blocks += ['KL mean (left, log) and loss change (right, symlog) per scheme (colour) and model (marker) '
               'over the model\'s global max |x|.', _Image(PLOT_QUANT, 'quantization impact')]
  return [('Quantization impact', blocks)]


def _layer_span(layers: Sequence[int]) -> str:
  if not layers:
    return '—'
  if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
    return f'L{layers[0]}–L{layers[-1]} ({len(layers)})'
  return ', '.join(f'L{i}' for i in layers)


def render_markdown(summary: Mapping[str, Any], plot_files: Sequence[str]) -> str:
  out = ['# maxact-jax cross-model report', '']
  for title, blocks in _sections(summary, plot_files):
    out += [f'## {title}', '']
    for b in blocks:
      if isinstance(b, _Table):
        out.append('| ' + ' | '.join(b.headers) + ' |')
        out.append('|' + '|'.join('---' for _ in b.headers) + '|')
        out += ['| ' + ' | '.join(c.replace('|', '\\|') for c in r) + ' |' for r in b.rows]
      elif isinstance(b, _Image):
        out.append(f'![{b.alt}]({b.src})')
      else:
        out.append(b)
      out.append('')
  return '\n'.join(out)


def _inline_html(text: str) -> str:
  # `code` spans are the only Markdown the blocks use.
  parts = html.escape(text).split('`')
  return ''.join(f'<code>{p}</code>' if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
td:nth-child(n+2) { font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def render_html(summary: Mapping[str, Any], plot_files: Sequence[str]) -> str:
  out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
         '<title>maxact-jax cross-model report</title>', f'<style>{_CSS}</style>', '</head><body>',
         '<h1>maxact-jax cross-model report</h1>']
  for title, blocks in _sections(summary, plot_files):
    out.append(f'<h2>{html.escape(title)}</h2>')
    for b in blocks:
      if isinstance(b, _Table):
        out.append('<table><thead><tr>' + ''.join(f'<th>{html.escape(h)}</th>' for h in b.headers) +
                   '</tr></thead><tbody>')
        out += ['<tr>' + ''.join(f'<td>{_inline_html(c)}</td>' for c in r) + '</tr>' for r in b.rows]
        out.append('</tbody></table>')
      elif isinstance(b, _Image):
        out.append(f'<img src="{html.escape(b.src)}" alt="{html.escape(b.alt)}">')
      else:
        out.append(f'<p>{_inline_html(b)}</p>')
  out.append('</body></html>')
  return '\n'.join(out) + '\n'


def write_report(summary_or_dir: Mapping[str, Any] | str | os.PathLike[str],
                 output_dir: str | os.PathLike[str],
                 pairs: str | Sequence[tuple[str, str]] | None = None) -> dict[str, Path]:
  """Write summary.json, report.md, report.html and the plots into `output_dir`.

  `summary_or_dir` is a summary from `build_summary` or a results folder to
  build it from (with `pairs`). Returns the written files by name.
  """
  if isinstance(summary_or_dir, Mapping):
    summary = summary_or_dir
  else:
    summary = build_summary(summary_or_dir, pairs)
  out = Path(output_dir)
  if out.exists() and not out.is_dir():
    raise UserError(f'output dir {out} exists and is not a directory')
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create output dir {out}: {e}') from None

  written: dict[str, Path] = {}
  plot_files = []
  for name, make in ((PLOT_RESIDUAL, plots.plot_residual), (PLOT_COMPONENTS, plots.plot_components),
                     (PLOT_TOPK, plots.plot_topk), (PLOT_QUANT, plots.plot_quantization)):
    png = make(summary)
    if png is not None:
      atomic.write_bytes(out / name, png)
      written[name] = out / name
      plot_files.append(name)
  for m in summary['models']:
    for name, png in anatomy_plots(summary, m).items():
      atomic.write_bytes(out / name, png)
      written[name] = out / name
      plot_files.append(name)
  write_json(out / SUMMARY_FILE, summary)
  written[SUMMARY_FILE] = out / SUMMARY_FILE
  for name, text in (('report.md', render_markdown(summary, plot_files)),
                     ('report.html', render_html(summary, plot_files))):
    atomic.write_bytes(out / name, text.encode('utf-8'))
    written[name] = out / name
  return written
