"""The `anatomy` job: re-derive the outlier channels under a chosen rule, the surface, the views.

Reads what `maxact-jax measure` wrote for a model under <output_dir>/json/
(the activation results, `<model>_channel_absmax.npz` and
`<model>_anatomy.json`), applies the channel rule (`maxact_jax.anatomy`),
runs one sample again for the token x channel surface of one layer
(`maxact_jax.anatomy_pass`), rewrites `<model>_anatomy.json` and writes the
views (`maxact_jax.plots`) to <output_dir>/anatomy/.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from maxact_jax import anatomy, anatomy_pass, atomic, data, measure, measure_step, plots, results
from maxact_jax.errors import UserError
from maxact_jax.families import load_config


@dataclasses.dataclass
class AnatomyOptions:
  model_path: str
  output_dir: str
  rule: anatomy.ChannelRule = anatomy.ChannelRule()
  surface: bool = True
  sample: int | None = None  # default: the sample of the global maximum
  layer: int | None = None  # default: the layer of the global maximum (or of the first outlier channel)
  surface_tokens: int = 64
  data_path: str | None = None  # default, with max_samples / max_seq_len: what measure used
  max_samples: int | None = None
  max_seq_len: int | None = None
  dtype: str | None = None  # default: measure's dtype


@dataclasses.dataclass
class AnatomyResult:
  doc: dict
  path: str
  views: dict[str, str]  # view name -> PNG path


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise UserError(f'no {what} at {path}: run `maxact-jax measure` with the same --model_path and --output_dir '
                    'first')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def run_anatomy(opts: AnatomyOptions) -> AnatomyResult:
  """Read measure's outputs, apply the channel rule, compute the surface, render the views."""
  opts.rule.check()
  name = results.model_name_of(opts.model_path)
  p = anatomy.paths(opts.output_dir, name)
  doc = _read_json(p['activation'], 'measure result')
  anat = _read_json(p['anatomy'], 'anatomy file (written by measure)')
  if not os.path.isfile(p['channels']):
    raise UserError(f'no per-channel maxima at {p["channels"]}: run `maxact-jax measure` first')
  layers, absmax, medians = anatomy.read_channels(p['channels'])
  anat['outlier_channels'] = anatomy.outlier_channels(layers, absmax, medians, opts.rule)
  anat['layerwise'] = anatomy.layerwise_top(layers, absmax, medians)
  views_dir = os.path.join(opts.output_dir, 'anatomy')
  os.makedirs(views_dir, exist_ok=True)
  views: dict[str, str] = {}

  if opts.surface:
    sample, layer = anatomy.default_focus(doc, anat)
    sample = opts.sample if opts.sample is not None else sample
    layer = opts.layer if opts.layer is not None else layer
    if sample is None or layer is None:
      raise UserError('no residual-stream peak to show: give --sample and --layer')
    config = load_config(opts.model_path)
    if not 0 <= layer < config.num_hidden_layers:
      raise UserError(f'--layer={layer} does not exist (the model has {config.num_hidden_layers} layers)')
    run_info = doc.get('run', {})
    data_path = opts.data_path or (None if doc.get('data_path') in (None, 'builtin') else doc['data_path'])
    mopts = measure.MeasureOptions(
        model_path=opts.model_path, output_dir=opts.output_dir, data_path=data_path,
        max_samples=opts.max_samples or run_info.get('max_samples') or doc.get('num_samples'),
        max_seq_len=opts.max_seq_len or doc.get('max_seq_len'), source_tokenizer=run_info.get('source_tokenizer'),
        tokenizer=run_info.get('tokenizer'))
    corpus = measure.load_measure_corpus(mopts, config)
    if not 0 <= sample < len(corpus.samples):
      raise UserError(f'--sample={sample} is not in the corpus ({len(corpus.samples)} samples)')
    dtype_name = opts.dtype or run_info.get('dtype') or 'float32'
    params = measure_step.load_params(opts.model_path, config, dtype_name)
    around = None
    peak = next((e for e in anat.get('residual_peaks', []) if e['layer'] == layer and e.get('sample') == sample),
                None)
    if peak is not None:
      around = peak['position']
    surf = anatomy_pass.surface(config, params, measure_step.DTYPES[dtype_name], corpus.samples[sample], layer,
                                opts.surface_tokens, around)
    tokenizer = data.Tokenizer.maybe(mopts.tokenizer_source)
    texts = tokenizer.decode_each(surf['token_ids']) if tokenizer else None
    surf.update(sample=sample, layer=layer)
    anatomy.write_npz(p['surface'], abs=surf['abs'], positions=surf['positions'], token_ids=surf['token_ids'],
                      sample=np.int64(sample), layer=np.int64(layer),
                      **({'tokens': np.array(texts, dtype=str)} if texts else {}))
    pt, pc = np.unravel_index(int(np.argmax(surf['abs'])), surf['abs'].shape)
    anat['surface'] = {'sample': sample, 'layer': layer, 'positions': [int(surf['positions'][0]),
                                                                        int(surf['positions'][-1])],
                       'dtype': dtype_name, 'peak': {'position': int(surf['positions'][pt]), 'channel': int(pc),
                                                     'token_id': int(surf['token_ids'][pt]),
                                                     'token': texts[pt] if texts else None,
                                                     'abs': float(surf['abs'][pt, pc])},
                       'file': os.path.basename(p['surface'])}
    views['surface'] = os.path.join(views_dir, f'{name}_surface.png')
    _write_png(views['surface'], plots.plot_surface({**surf, 'tokens': texts}, name))
  for key, png in (('layerwise', plots.plot_layerwise(anat['layerwise'], name)),
                   ('channels', plots.plot_channels(layers, absmax, anat['outlier_channels']['channels'], name))):
    if png is not None:
      views[key] = os.path.join(views_dir, f'{name}_{key}.png')
      _write_png(views[key], png)
  anat['views'] = {k: os.path.relpath(v, os.path.dirname(p['anatomy'])) for k, v in views.items()}
  results.atomic_write_json(p['anatomy'], anat)
  return AnatomyResult(anat, p['anatomy'], views)


def _write_png(path: str, png: bytes) -> None:
  atomic.write_bytes(path, png)
