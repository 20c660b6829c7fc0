"""Every figure of the project: PNG bytes drawn with matplotlib's object API on an Agg canvas.

No pyplot and no global backend: `figure` makes a Figure on its own Agg
canvas, `png` renders it to bytes, `log_axis` is the log-scale axis the
magnitude plots share. The cross-model report's plots (`plot_residual`,
`plot_components`, `plot_topk`, `plot_quantization`, from a report summary) and the views of the
outlier anatomy (`plot_surface`, `plot_layerwise`, `plot_channels`) are drawn
here, for `maxact_jax.report_render` and the `anatomy` job alike.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator
# Registers the '3d' projection.
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  pylint: disable=unused-import

from maxact_jax.anatomy import token_label
from maxact_jax.report import fmt_value


def figure(width: float, height: float) -> Figure:
  """A Figure (inches) on its own Agg canvas."""
  fig = Figure(figsize=(width, height), dpi=110)
  FigureCanvasAgg(fig)
  return fig


def png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight')
  return buf.getvalue()


def log_axis(ax, label: str) -> None:
  """A log-scale y axis with decade ticks and light grid lines."""
  ax.set_yscale('log')
  ax.yaxis.set_major_locator(LogLocator(base=10))
  ax.set_ylabel(label)
  ax.grid(True, which='major', axis='y', alpha=0.35)
  ax.grid(True, which='minor', axis='y', alpha=0.1)


# ---------------------------------------------------------------------------
# The cross-model report's plots.


_LINESTYLES = ('-', '--', '-.', ':')


def _style(i: int) -> dict[str, Any]:
  """A distinct (colour, line style) for the i-th model: 10 colours x 4 styles."""
  colors = matplotlib.colormaps['tab10'].colors
  return {'color': colors[i % len(colors)], 'linestyle': _LINESTYLES[(i // len(colors)) % len(_LINESTYLES)]}


def _styles(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """One style per model, by its place in the models table, shared by all plots."""
  return {m['model_name']: _style(i) for i, m in enumerate(summary['models'])}


def plot_residual(summary: Mapping[str, Any]) -> bytes | None:
  """Layerwise max |x| of the residual stream, one line per model, by relative depth."""
  models = [m for m in summary['models'] if m['residual_layerwise']['layer']]
  if not models:
    return None
  styles = _styles(summary)
  fig = figure(11, max(6.0, 0.22 * len(models) + 1))
  ax = fig.add_subplot()
  for m in models:
    rl = m['residual_layerwise']
    pts = [(l, v) for l, v in zip(rl['layer'], rl['max_abs'])
           if isinstance(v, (int, float)) and 0 < v < math.inf]
    if not pts:
      continue
    n = m['num_hidden_layers'] or (pts[-1][0] + 1)
    xs = [l / max(n - 1, 1) for l, _ in pts]
    ys = [v for _, v in pts]
    peak = max(range(len(ys)), key=ys.__getitem__)
    style = styles[m['model_name']]
    ax.plot(xs, ys, linewidth=1.6, label=f'{m["model_name"]} (max {fmt_value(ys[peak])})', **style)
    ax.plot([xs[peak]], [ys[peak]], marker='o', markersize=5, color=style['color'])
  ax.set_xlim(-0.02, 1.02)
  ax.set_xlabel('relative depth: layer index / (number of layers - 1)')
  log_axis(ax, 'max |x| of the layer output (residual stream)')
  ax.set_title('Residual stream: largest |activation| per layer')
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
  return png(fig)


def plot_components(summary: Mapping[str, Any]) -> bytes | None:
  """Grouped bars: peak |x| per component (embedding, attention, MLP/MoE, residual, final norm)."""
  models = summary['models']
  if not models:
    return None
  groups = [('embedding', ('embedding',)), ('attention', ('attention',)), ('MLP / MoE', ('mlp', 'moe')),
            ('residual stream', ('residual',)), ('final norm', ('final_norm',))]
  colors = ('#8c8c8c', '#2ca02c', '#ff7f0e', '#1f77b4', '#9467bd')
  n = len(models)
  width = 0.8 / len(groups)
  fig = figure(max(8.0, 0.8 * n + 2), 5.5)
  ax = fig.add_subplot()
  for g, ((label, comps), color) in enumerate(zip(groups, colors)):
    xs, ys = [], []
    for i, m in enumerate(models):
      vals = [m['component_peaks'][c] for c in comps if c in m['component_peaks']]
      v = max(vals) if vals else None
      if v is not None and 0 < v < math.inf:
        xs.append(i - 0.4 + width * (g + 0.5))
        ys.append(v)
    ax.bar(xs, ys, width=width, color=color, label=label)
  ax.set_xticks(range(n))
  ax.set_xticklabels([m['model_name'] for m in models], rotation=30, ha='right')
  ax.set_xlim(-0.6, n - 0.4)
  log_axis(ax, 'peak |x| (max over the component\'s taps)')
  ax.set_title('Peak |activation| per component')
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
  return png(fig)


def plot_topk(summary: Mapping[str, Any]) -> bytes | None:
  """Top-1 / mean(top-5) per residual layer; saturation of the global top-K per model."""
  scans = summary['topk_scan']
  if not scans:
    return None
  styles = _styles(summary)
  fig = figure(14, max(5.2, 0.3 * len(scans) + 1.5))
  ax, bx = fig.subplots(1, 2, gridspec_kw={'width_ratios': [2.2, 1], 'wspace': 0.45})
  for s in scans:
    rows = [r for r in s['per_layer'] if r['top1_over_top5_mean'] is not None]
    if not rows:
      continue
    n = s['num_layers'] or (rows[-1]['layer'] + 1)
    rows = [r for r in rows if r['layer'] < n]
    ax.plot([r['layer'] / max(n - 1, 1) for r in rows], [r['top1_over_top5_mean'] for r in rows],
            linewidth=1.6, marker='.', label=s['model_name'], **styles[s['model_name']])
  ax.axhline(1.0, color='#999', linewidth=0.8)
  ax.set_xlim(-0.02, 1.02)
  ax.set_xlabel('relative depth: layer index / (number of layers - 1)')
  ax.set_ylabel('top-1 / mean of top-5 |x| (residual stream)')
  ax.set_title('Concentration of the largest activations per layer')
  ax.grid(True, alpha=0.3)
  ax.legend(loc='upper right', fontsize=9, frameon=False, ncol=1 if len(scans) <= 8 else 2)

  names = [s['model_name'] for s in scans]
  counts = [s['saturation']['count'] for s in scans]
  ys = range(len(scans))
  bx.barh(ys, counts, height=0.6, color=[styles[s['model_name']]['color'] for s in scans])
  for y, s in zip(ys, scans):
    bx.text(s['saturation']['count'], y, f'  {s["saturation"]["count"]} of {s["k"]} at '
            f'{fmt_value(s["top1_signed"])}', va='center', fontsize=9)
  bx.set_yticks(list(ys))
  bx.set_yticklabels(names)
  bx.set_ylim(max(len(scans), 4) - 0.5, -0.5)  # first model on top; thin bars when few
  bx.set_xlim(0, max(s['k'] for s in scans) * 1.5)
  bx.set_xlabel('entries of the global top-K equal to the top-1')
  bx.set_title('Saturation')
  bx.grid(True, axis='x', alpha=0.3)
  return png(fig)


_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', '<', '>', 'h', 'p')


def plot_quantization(summary: Mapping[str, Any]) -> bytes | None:
  """Quantization impact against the global maximum: one point per model and scheme, KL mean
  (log) and change in loss (symlog) over the model's global max |x| (log); colour = scheme,
  marker = model."""
  q = summary.get('quantization')
  if not q or not q['models']:
    return None
  colors = matplotlib.colormaps['tab20'].colors
  fig = figure(14, 5.6)
  ax, bx = fig.subplots(1, 2, gridspec_kw={'wspace': 0.28})
  for si, scheme in enumerate(q['schemes']):
    for mi, m in enumerate(q['models']):
      s = m['schemes'].get(scheme)
      if s is None or not m['global_max_abs']:
        continue
      style = dict(color=colors[si % len(colors)], marker=_MARKERS[mi % len(_MARKERS)], s=46, alpha=0.9,
                   edgecolors='#333', linewidths=0.4)
      if s['kl_mean'] is not None and s['kl_mean'] > 0:  # log axis: a zero KL has no point
        ax.scatter([m['global_max_abs']], [s['kl_mean']], **style)
      if s['delta_loss'] is not None:
        bx.scatter([m['global_max_abs']], [s['delta_loss']], **style)
  for a in (ax, bx):
    a.set_xscale('log')
    a.set_xlabel('global max |activation| of the model (log)')
    a.grid(True, which='major', alpha=0.3)
  log_axis(ax, 'KL(unquantized || quantized), mean nats per token')
  ax.set_title('Next-token KL per scheme')
  bx.set_yscale('symlog', linthresh=1e-3)
  bx.axhline(0.0, color='#999', linewidth=0.8)
  bx.set_ylabel('change in next-token loss, nats (symlog)')
  bx.set_title('Loss change per scheme')
  handles = [bx.scatter([], [], color=colors[i % len(colors)], marker='o', s=46, label=scheme)
             for i, scheme in enumerate(q['schemes'])]
  handles += [bx.scatter([], [], color='#bbb', marker=_MARKERS[i % len(_MARKERS)], s=46, edgecolors='#333',
                         label=m['model_name']) for i, m in enumerate(q['models'])]
  bx.legend(handles=handles, loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  return png(fig)


# ---------------------------------------------------------------------------
# The views of the outlier anatomy.


def _pool_columns(a: np.ndarray, max_cols: int) -> tuple[np.ndarray, int]:
  """Max-pool the last axis into at most `max_cols` blocks (a peak never vanishes); (pooled, block)."""
  block = max(1, math.ceil(a.shape[-1] / max_cols))
  pad = -a.shape[-1] % block
  if pad:
    a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1)
  return a.reshape(a.shape[:-1] + (-1, block)).max(axis=-1), block


def plot_surface(surf: Mapping[str, Any], model_name: str) -> bytes:
  """Sun et al.'s figure 1: |x| over token position x channel of one layer, as a 3-D surface and a heat map."""
  absx = np.asarray(surf['abs'], np.float64)
  positions = np.asarray(surf['positions'])
  t, d = absx.shape
  pt, pc = np.unravel_index(int(np.argmax(absx)), absx.shape)
  texts = list(surf.get('tokens') or [None] * t)
  peak_label = (f'channel {pc}, token {token_label(texts[pt], int(surf["token_ids"][pt]))} at position '
                f'{positions[pt]}: |x| = {absx[pt, pc]:.4g}')
  pooled, block = _pool_columns(absx, 256)
  fig = figure(15, 6.2)
  ax = fig.add_subplot(1, 2, 1, projection='3d')
  cx = (np.arange(pooled.shape[1]) * block + (block - 1) / 2) if block > 1 else np.arange(d)
  xx, yy = np.meshgrid(cx, positions)
  ax.plot_surface(xx, yy, pooled, cmap='viridis', linewidth=0, antialiased=False, rcount=min(t, 128),
                  ccount=min(pooled.shape[1], 256))
  ax.set_xlabel('channel')
  ax.set_ylabel('token position')
  ax.set_zlabel('|x|')
  ax.view_init(elev=28, azim=-60)
  ax.text(pc, positions[pt], absx[pt, pc] * 1.04, f'channel {pc}', color='#b2182b', fontsize=10)
  ax.set_title(f'|x| of the layer {surf["layer"]} output (residual stream)', fontsize=10)

  bx = fig.add_subplot(1, 2, 2)
  img = bx.imshow(np.log10(np.maximum(pooled, 1e-3)), aspect='auto', origin='upper', cmap='magma',
                  interpolation='nearest', extent=(-0.5, pooled.shape[1] * block - 0.5, positions[-1] + 0.5,
                                                   positions[0] - 0.5))
  bx.set_xlabel('channel' + (f' (max over blocks of {block})' if block > 1 else ''))
  bx.set_ylabel('token position')
  if t <= 40:
    bx.set_yticks(positions)
    bx.set_yticklabels([f'{p} {(token_label(x, int(i)))[:14]}'
                        for p, x, i in zip(positions, texts, surf['token_ids'])], fontsize=7)
  bx.annotate(f'channel {pc}', xy=(pc, positions[pt]), textcoords='offset points', color='white', fontsize=10,
              xytext=(25 if pc < d / 2 else -95, -30 if pt < t / 2 else 30),
              arrowprops={'arrowstyle': '->', 'color': 'white'})
  fig.colorbar(img, ax=bx, label='log10 |x|')
  bx.set_title('the same as a heat map (log colour scale)', fontsize=10)
  fig.suptitle(f'{model_name}: sample {surf["sample"]}, layer {surf["layer"]}. Peak: {peak_label}', fontsize=11)
  return png(fig)


def plot_layerwise(layerwise: Mapping[str, Sequence[float]], model_name: str) -> bytes | None:
  """Sun et al.'s figure 2 over a corpus: the three largest per-channel max |x| of each layer's
  output against its median |x|, log scale."""
  if not layerwise.get('layer'):
    return None
  fig = figure(9, 5)
  ax = fig.add_subplot()
  layers = layerwise['layer']
  for key, style in (('top1', dict(color='#b2182b', marker='o')), ('top2', dict(color='#ef8a62', marker='s')),
                     ('top3', dict(color='#fddbc7', marker='^', markeredgecolor='#999')),
                     ('median', dict(color='#2166ac', marker='.', linestyle='--'))):
    ys = [v if v and v > 0 else math.nan for v in layerwise[key]]
    ax.plot(layers, ys, linewidth=1.6, label={'median': 'median |x| (all elements)'}.get(
        key, f'top-{key[-1]} channel: its max |x|'), **style)
  # Name the top channel where it changes (and at the peak layer).
  tops, chans = layerwise['top1'], layerwise['top1_channel']
  for i, (layer, v, c) in enumerate(zip(layers, tops, chans)):
    if v and (i == 0 or chans[i - 1] != c):
      ax.annotate(f'ch {c}', (layer, v), textcoords='offset points', xytext=(4, 6), fontsize=8, color='#b2182b')
  log_axis(ax, '|x| in the residual stream (layer output)')
  peak = max((v for v in tops if v), default=None)
  if peak:
    ax.set_ylim(top=peak * 4)  # room for the channel labels
  ax.set_xlabel('layer')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title(f'{model_name}: the three largest channels per layer against the median')
  ax.legend(loc='best', fontsize=9)
  return png(fig)


def plot_channels(layers: Sequence[int], absmax: np.ndarray, channels: Sequence[Mapping[str, Any]],
                  model_name: str, label_top: int = 8) -> bytes | None:
  """The per-channel max |x| of every layer's output as a heat map (layers x channels, log colour)."""
  if not len(layers):
    return None
  absmax = np.asarray(absmax, np.float64)
  pooled, block = _pool_columns(absmax, 1024)
  d = absmax.shape[1]
  fig = figure(12, max(3.5, min(9.0, 0.12 * len(layers) + 2.5)))
  ax = fig.add_subplot()
  img = ax.imshow(np.log10(np.maximum(pooled, 1e-3)), aspect='auto', origin='lower', cmap='magma',
                  interpolation='nearest', extent=(-0.5, pooled.shape[1] * block - 0.5, layers[0] - 0.5,
                                                   layers[-1] + 0.5))
  ax.set_xlim(-0.5, d - 0.5)
  ax.set_xlabel('residual channel' + (f' (max over blocks of {block})' if block > 1 else ''))
  ax.set_ylabel('layer')
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(img, ax=ax, label='log10 of the max |x| over the corpus')
  top = [c['channel'] for c in channels[:label_top]]
  if top:
    sec = ax.secondary_xaxis('top')
    sec.set_xticks(top)
    sec.set_xticklabels([str(c) for c in top], fontsize=8, rotation=90 if len(top) > 4 else 0)
    sec.set_xlabel('persistent outlier channels', fontsize=9)
  ax.set_title(f'{model_name}: per-channel max |x| of each layer output', pad=28 if top else 6)
  return png(fig)
