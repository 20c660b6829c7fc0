"""Outlier anatomy and interventions on a tiny checkpoint with a planted outlier.

The checkpoint is a llama of 3 layers (hidden 128) with MLP biases, whose
MLP unit 0 of layer 1 fires on token 201 only and writes about 1400 into
residual channel 13 (`fixtures.plant_outlier`; the gate's bias is its
threshold, so ordinary tokens get nothing in that channel beyond the random
model's own ~0.03). Corpus A holds token 201 exactly once, at sample
4, position 9: every location field must point there. Corpus B holds it at
every 7th position of 12 samples, always followed by token 202, for the
interventions, which are checked against transformers with forward hooks
doing the same replacement. So that the model *uses* the outlier, as trained
models do, its LM head reads channel 13 into the logit of 202: with the
massive value the trigger's final state is nearly one-hot on channel 13 and
202 is predicted after it; a random-init head alone hardly reads any channel
(zeroing the channel then moves the loss by only +0.004, KL 0.08 nats).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from maxact_jax import anatomy, cli, data, fixtures, intervene, measure
from maxact_jax.errors import UserError
from tests.conftest import write_ids_corpus

TRIGGER, LAYER, CHANNEL, SAMPLE, POSITION = 201, 1, 13, 4, 9
HIDDEN = 128
FOLLOWER = 202  # always after the trigger in corpus B; the head reads CHANNEL into its logit
LENGTHS = [14, 22, 9, 30, 17, 25, 12, 19]


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
  """(checkpoint dir, corpus A path, corpus B path, corpus B samples)."""
  root = tmp_path_factory.mktemp('anatomy')
  rng = np.random.RandomState(7)
  pool = np.array([i for i in range(3, 256) if i not in (TRIGGER, FOLLOWER)])
  samples_a = [rng.choice(pool, n).tolist() for n in LENGTHS]
  samples_a[SAMPLE][POSITION] = TRIGGER
  samples_b = [rng.choice(pool, 40).tolist() for _ in range(12)]
  for s in samples_b:
    s[3::7] = [TRIGGER] * len(s[3::7])
    s[4::7] = [FOLLOWER] * len(s[4::7])
  model = fixtures.random_model(fixtures.make_config('llama', hidden_size=HIDDEN, mlp_bias=True), seed=0)
  fixtures.plant_outlier(model, layer=LAYER, channel=CHANNEL, token_id=TRIGGER, probe_ids=samples_a + samples_b)
  import torch
  with torch.no_grad():
    model.lm_head.weight[FOLLOWER, CHANNEL] = 1.0  # about 11 (sqrt(hidden)) for a state one-hot on CHANNEL
  ckpt = fixtures.save_checkpoint(model, str(root / 'planted'))
  return (ckpt, write_ids_corpus(root / 'a.jsonl', samples_a), write_ids_corpus(root / 'b.jsonl', samples_b),
          samples_b)


@pytest.fixture(scope='module')
def measured(planted, tmp_path_factory):
  ckpt, corpus_a, _, _ = planted
  out = tmp_path_factory.mktemp('measured')
  m = measure.measure(measure.MeasureOptions(model_path=ckpt, output_dir=str(out), data_path=corpus_a,
                                             batch_size=4, dtype='float32', max_seq_len=None, progress=False))
  return m, str(out)


WANT = {'sample': SAMPLE, 'position': POSITION, 'channel': CHANNEL, 'token_id': TRIGGER}


def located(loc: dict) -> dict:
  return {k: loc.get(k) for k in WANT}


def test_every_location_points_at_the_planted_outlier(measured):
  m, _ = measured
  doc, per, ext = m.doc, m.doc['per_layer_stats'], m.doc['extremes']
  # Ordinary before the planted layer; from it on, the planted (sample, position, channel, token).
  assert max(abs(per['layer_0_hidden']['max']), abs(per['layer_0_hidden']['min'])) < 5
  for layer in (1, 2):
    assert per[f'layer_{layer}_hidden']['max'] > 1000
    assert located(ext[f'layer_{layer}_hidden']['max']) == WANT
    assert located(m.top_doc['topk_locations'][f'layer_{layer}_hidden'][0]) == WANT
    assert m.top_doc['per_layer_stats'][f'layer_{layer}_hidden']['topk_abs'][0] == per[f'layer_{layer}_hidden']['max']
  assert located(doc['global_max_detail']) == WANT and int(doc['global_max_detail']['tap'].split('_')[1]) >= LAYER
  # 168 tokens x 128 channels fill the top-100: no entry is the reference's zero padding (null).
  locs = m.top_doc['topk_locations']['layer_2_hidden']
  assert len(locs) == 100 and all(loc is not None for loc in locs)

  # Only the residual stream keeps per-channel maxima (the others share its vmapped reduction).
  assert m.acc.taps['layer_1_hidden'].chan_absmax is not None
  assert all(t.chan_absmax is None for name, t in m.acc.taps.items() if not name.endswith('_hidden'))

  channels_path, anatomy_path = m.anatomy_paths
  with np.load(channels_path) as z:
    absmax, layers = z['channel_absmax'], z['layers']
  assert absmax.shape == (3, HIDDEN) and layers.tolist() == [0, 1, 2]
  assert np.argmax(absmax[1]) == CHANNEL and np.argmax(absmax[2]) == CHANNEL and absmax[0].max() < 5
  assert absmax[1, CHANNEL] == np.float32(per['layer_1_hidden']['max'])  # the same float32 maximum
  second = np.sort(absmax[1])[-2]
  assert second < 5  # one channel carries it

  an = json.load(open(anatomy_path))
  (oc,) = an['outlier_channels']['channels']
  assert (oc['channel'], oc['first_layer'], oc['last_layer'], oc['disappears_at'], oc['layers_over']) == \
      (CHANNEL, 1, 2, None, 2)
  assert an['outlier_channels']['channels_over_per_layer'] == [0, 1, 1]
  peaks = {p['layer']: p for p in an['residual_peaks']}
  assert located(peaks[1]) == WANT and located(peaks[2]) == WANT
  # Both token rules find the trigger and nothing else: its state is one massive channel over ~0.03,
  # far above its own median and the median of its sequence's layer output alike.
  assert an['token_attribution']['criterion']['name'] == 'layer_median'
  assert an['token_attribution_token_median']['criterion']['name'] == 'token_median'
  for ta in (an['token_attribution'], an['token_attribution_token_median']):
    assert ta['flagged_tokens'] == 1 and ta['tokens'] == sum(LENGTHS)
    (top,) = ta['top_token_ids']
    assert (top['token_id'], top['flagged'], top['occurrences']) == (TRIGGER, 1, 1)
    assert ta['top_positions'] == [{'position': POSITION, 'flagged': 1}]
    assert ta['per_layer']['flagged'] == [0, 1, 1] and ta['layers_flagged'] == {'2': 1}
    assert ta['classes']['other']['flagged'] == 1 and ta['classes']['first']['total'] == len(LENGTHS)
  lw = an['layerwise']
  assert lw['top1_channel'][1:] == [CHANNEL, CHANNEL] and lw['top1'][1] > 200 * lw['top2'][1]

  # Both rules agree on the planted channel; asking for every layer finds none (it starts at layer 1).
  medians = anatomy.layer_medians(doc, [0, 1, 2])
  for rule in (anatomy.ChannelRule('mad'), anatomy.ChannelRule('sun')):
    assert [c['channel'] for c in anatomy.outlier_channels([0, 1, 2], absmax, medians, rule)['channels']] == [CHANNEL]
  assert anatomy.outlier_channels([0, 1, 2], absmax, medians, anatomy.ChannelRule(min_layer_share=1.0))['channels'] == []


def test_layer_median_fields_match_torch_median_of_each_sequence(planted, measured):
  """The layer-median rule's figures against torch.median over each sample's layer output, the
  computation of Sun et al.'s code, one sample at a time through transformers."""
  import torch
  import transformers
  ckpt, corpus_a, _, _ = planted
  m, _ = measured
  samples = [json.loads(line)['input_ids'] for line in open(corpus_a)]
  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  want = {layer: {'n_pass': 0, 'medians': [], 'peak': (-1.0, None)} for layer in range(3)}
  outputs = {}
  for layer in range(3):  # hooks: transformers' last hidden_states entry has the final norm applied
    model.model.layers[layer].register_forward_hook(
        lambda module, args, out, layer=layer: outputs.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
  with torch.no_grad():
    for s in samples:
      model(input_ids=torch.tensor([s]))
      for layer in range(3):
        a = outputs[layer][0].abs()  # [T, D], the output of decoder layer `layer`
        med = float(a.median())  # torch's lower median over the whole sequence's layer output
        tok = a.amax(dim=-1)
        w = want[layer]
        w['n_pass'] += int(((tok > 100) & (tok / med > 1000)).sum())
        w['medians'].append(med)
        if float(tok.max()) > w['peak'][0]:
          w['peak'] = (float(tok.max()), med)
  for layer in range(3):
    got, w = m.doc['per_layer_stats'][f'layer_{layer}_hidden'], want[layer]
    assert got['layer_median_n_pass'] == w['n_pass'] == (1 if layer else 0)
    assert got['layer_median_n_seq'] == len(samples)
    assert got['layer_median_seq_mean'] == pytest.approx(np.mean(w['medians']), rel=1e-5)
    assert got['layer_median_peak_median'] == pytest.approx(w['peak'][1], rel=1e-5)
    assert got['layer_median_peak_ratio'] == pytest.approx(w['peak'][0] / w['peak'][1], rel=1e-4)
    assert got['sun_n_pass'] == (1 if layer else 0)  # the reference's field, unchanged


def test_anatomy_command_surface_views_and_report(measured, capsys, tmp_path):
  m, out = measured
  model_path = m.doc['model_path']
  assert cli.main(['maxact-jax', 'anatomy', f'--model_path={model_path}', f'--output_dir={out}']) == 0
  printed = capsys.readouterr().out
  assert f'outlier channels' in printed and f'{CHANNEL} (layers 1-2' in printed
  # Both token rules, each named: the attribution's layer-median rule first, the reference's beside it.
  rules = [line for line in printed.splitlines() if line.startswith('tokens with a massive activation')]
  assert len(rules) == 2 and 'layer-median rule' in rules[0] and 'per-token rule' in rules[1], rules
  assert all(f': 1 of {sum(LENGTHS)};' in line for line in rules)
  an = json.load(open(os.path.join(out, 'json', 'planted_anatomy.json')))
  # The global maximum sits in layer 1's MLP output; the surface shows the largest residual peak's layer.
  s = an['surface']
  peak_layer = max((1, 2), key=lambda l: m.doc['per_layer_stats'][f'layer_{l}_hidden']['max'])
  assert (s['sample'], s['layer']) == (SAMPLE, peak_layer)
  assert (s['peak']['position'], s['peak']['channel'], s['peak']['token_id']) == (POSITION, CHANNEL, TRIGGER)
  with np.load(os.path.join(out, 'json', 'planted_surface.npz')) as z:
    absx, positions = z['abs'], z['positions']
  # The window: the first 64 positions of sample 4 (its 17 tokens), |x| of that layer's output.
  assert absx.shape == (LENGTHS[SAMPLE], HIDDEN) and positions.tolist() == list(range(LENGTHS[SAMPLE]))
  assert np.unravel_index(np.argmax(absx), absx.shape) == (POSITION, CHANNEL)
  assert absx[POSITION, CHANNEL] == pytest.approx(m.doc['per_layer_stats'][f'layer_{peak_layer}_hidden']['max'],
                                                  rel=1e-5)
  for view in ('surface', 'layerwise', 'channels'):
    path = os.path.join(out, 'anatomy', f'planted_{view}.png')
    assert os.path.getsize(path) > 10_000, path

  # Another rule, no surface: the outlier list follows the rule.
  assert cli.main(['maxact-jax', 'anatomy', f'--model_path={model_path}', f'--output_dir={out}', '--rule=mad',
                   '--surface=false', '--min_layer_share=1.0']) == 0
  an = json.load(open(os.path.join(out, 'json', 'planted_anatomy.json')))
  assert an['outlier_channels']['rule']['kind'] == 'mad' and an['outlier_channels']['channels'] == []
  assert cli.main(['maxact-jax', 'anatomy', f'--model_path={model_path}', f'--output_dir={out}',
                   '--surface=false']) == 0

  # The report finds the anatomy beside the results and renders its section and views.
  rep = tmp_path / 'report'
  assert cli.main(['maxact-jax', 'report', f'--results_dir={out}', f'--output_dir={rep}']) == 0
  md = (rep / 'report.md').read_text()
  assert '## Outlier anatomy: planted' in md and f'| {CHANNEL} | 2 (67%) | L1 | L2 | — |' in md
  assert 'in at least one layer, layer-median rule (Sun et al.' in md and 'in at least one layer, per-token rule' in md
  for view in ('layerwise', 'channels', 'surface'):
    assert f'![planted: {view}](anatomy_planted_{view}.png)' in md
    assert (rep / f'anatomy_planted_{view}.png').stat().st_size > 10_000
  summary = json.loads((rep / 'summary.json').read_text())
  assert summary['models'][0]['anatomy']['outlier_channels'][0]['channel'] == CHANNEL


def torch_massive(h):
  """[B, T, D] -> [B, T] bool: where channel CHANNEL is massive by the layer-median rule, computed as
  Sun et al.'s code does: torch.median of |x| over one sequence's whole layer output."""
  import torch
  med = torch.stack([row.abs().median() for row in h])  # the lower median of each sequence's [T, D]
  a = h[..., CHANNEL].abs()
  return (a > 100) & (a / med[:, None] > 1000)


def torch_losses(ckpt: str, samples: list[list[int]], replace: float | None, massive_only: bool = False):
  """transformers with a forward hook on decoder layer LAYER setting channel CHANNEL to `replace` (at
  every position, or only where it is massive): (mean next-token loss, mean KL(base || replaced), share
  of unchanged argmax, elements replaced), or the base loss."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  ids = torch.tensor(samples)
  replaced = []

  def logprobs():
    with torch.no_grad():
      return model(input_ids=ids).logits[:, :-1].log_softmax(-1).double()

  def hook(module, args, out):
    h = (out[0] if isinstance(out, tuple) else out).clone()
    where = torch_massive(h) if massive_only else torch.ones(h.shape[:2], dtype=torch.bool)
    h[..., CHANNEL] = torch.where(where, torch.tensor(replace, dtype=h.dtype), h[..., CHANNEL])
    replaced.append(int(where.sum()))
    return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

  base = logprobs()
  handle = model.model.layers[LAYER].register_forward_hook(hook)
  edited = logprobs()
  handle.remove()
  target = ids[:, 1:, None]
  nll = lambda lp: float(-lp.gather(-1, target).mean())
  kl = float((base.exp() * (base - edited)).sum(-1).mean())
  return nll(base), nll(edited), kl, float((base.argmax(-1) == edited.argmax(-1)).double().mean()), replaced[0]


def test_zeroing_the_planted_channel_costs_loss_a_random_one_does_not(planted, tmp_path):
  ckpt, _, corpus_b, samples_b = planted
  r = intervene.intervene(intervene.InterveneOptions(
      model_path=ckpt, output_dir=str(tmp_path), channels=[f'{LAYER}:{CHANNEL}'], mode='zero', controls=2,
      data_path=corpus_b, batch_size=4, dtype='float32'))
  doc = r.doc
  req, *controls = doc['variants']
  assert doc['predicted_positions'] == 12 * 39
  assert req['channels'] == [{'layer': 1, 'channel': 13, 'value': 0.0, 'replaced': 12 * 40}]
  # Figures (float32, 468 positions): base loss 4.714 (the follower is predicted after each of the 72
  # triggers); zeroing 1:13: +0.851, KL 0.851 nats, top-1 kept 62%; random channels 1:8 and 1:122:
  # -0.0001 and -0.0011, KL 2.5e-4 and 1.5e-4, top-1 kept 88% and 95% (a random-init model's flat
  # distributions let the argmax flip easily).
  assert req['delta_loss'] > 0.5 and req['kl_mean'] > 0.5
  for c in controls:
    assert c['channels'][0]['layer'] == LAYER and c['channels'][0]['channel'] != CHANNEL
    assert abs(c['delta_loss']) < 0.01 and c['kl_mean'] < 1e-3
    assert req['kl_mean'] > 1000 * c['kl_mean'] and req['delta_loss'] > 100 * abs(c['delta_loss'])
    assert req['top1_agreement'] < c['top1_agreement'] - 0.2
  # The loss moves where the outlier was read: the positions that predict the follower.
  followers = [i for s in samples_b for i, t in enumerate(s[1:]) if t == FOLLOWER]
  assert len(followers) == 72 and req['kl_max_at']['token_id'] == TRIGGER
  assert req['perplexity'] == pytest.approx(math.exp(req['loss'])) and req['perplexity'] > doc['base']['perplexity']
  assert os.path.isfile(r.path) and json.load(open(r.path))['variants'][0]['name'] == 'requested'

  # The same replacement done by transformers through a forward hook.
  base_loss, zero_loss, kl, agree, _ = torch_losses(ckpt, samples_b, 0.0)
  assert doc['base']['loss'] == pytest.approx(base_loss, rel=1e-5)
  assert req['loss'] == pytest.approx(zero_loss, rel=1e-5)
  assert req['kl_mean'] == pytest.approx(kl, rel=1e-3)
  assert req['top1_agreement'] == pytest.approx(agree)


def test_channel_mean_mode_uses_the_corpus_mean_of_the_channel(planted, tmp_path):
  ckpt, _, corpus_b, samples_b = planted
  r = intervene.intervene(intervene.InterveneOptions(
      model_path=ckpt, output_dir=str(tmp_path), channels=[f'{LAYER}:{CHANNEL}'], mode='channel_mean', controls=0,
      data_path=corpus_b, batch_size=4, dtype='float32'))
  (req,) = r.doc['variants']
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(samples_b), output_hidden_states=True).hidden_states[LAYER + 1]
  mean = float(hidden[..., CHANNEL].double().mean())  # 6 of 40 tokens carry ~1420: the mean is ~220
  assert req['channels'][0]['value'] == pytest.approx(mean, rel=1e-5) and mean > 100
  _, loss, kl, _, replaced = torch_losses(ckpt, samples_b, req['channels'][0]['value'])
  assert req['loss'] == pytest.approx(loss, rel=1e-5) and req['kl_mean'] == pytest.approx(kl, rel=1e-3)
  assert req['replaced'] == req['channels'][0]['replaced'] == replaced == 12 * 40  # every position


def test_massive_modes_replace_the_massive_values_where_they_occur(planted, tmp_path):
  """Sun et al.'s experiment: the trigger's massive value in channel 13, and only it, set to the mean
  of the massive values (the model barely notices) or to 0 (the follower is no longer predicted); both
  against the same replacement by a transformers hook that finds the positions with torch.median."""
  import torch
  import transformers
  ckpt, _, corpus_b, samples_b = planted
  run = lambda mode, controls=0: intervene.intervene(intervene.InterveneOptions(
      model_path=ckpt, output_dir=str(tmp_path), channels=[f'{LAYER}:{CHANNEL}'], mode=mode, controls=controls,
      data_path=corpus_b, batch_size=4, dtype='float32')).doc
  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(samples_b), output_hidden_states=True).hidden_states[LAYER + 1]
  where = torch_massive(hidden)
  triggers = torch.tensor(samples_b) == TRIGGER
  assert torch.equal(where, triggers)  # the rule finds exactly the 72 triggers
  mean = float(hidden[..., CHANNEL][where].double().mean())  # ~1420: they stay massive

  doc = run('massive_mean', controls=1)
  (req, control) = doc['variants']
  assert doc['mode_meaning'] == intervene.MODE_MEANING['massive_mean']
  (ch,) = req['channels']
  assert ch['value'] == pytest.approx(mean, rel=1e-5) and mean > 1000
  assert ch['massive_values'] == ch['replaced'] == req['replaced'] == 72
  base_loss, loss, kl, agree, replaced = torch_losses(ckpt, samples_b, ch['value'], massive_only=True)
  assert replaced == 72
  assert doc['base']['loss'] == pytest.approx(base_loss, rel=1e-5) and req['loss'] == pytest.approx(loss, rel=1e-5)
  assert req['kl_mean'] == pytest.approx(kl, rel=1e-3, abs=1e-7) and req['top1_agreement'] == pytest.approx(agree)
  # The mean of the massive values leaves the model nearly as it was; a random channel has no massive
  # value to replace.
  assert abs(req['delta_loss']) < 0.01 and req['kl_mean'] < 0.01 and req['top1_agreement'] > 0.95
  assert control['replaced'] == 0 and control['channels'][0]['value'] is None and control['kl_mean'] == 0

  doc = run('massive_zero')
  (req,) = doc['variants']
  _, loss, kl, agree, replaced = torch_losses(ckpt, samples_b, 0.0, massive_only=True)
  assert req['replaced'] == replaced == 72 and req['channels'][0]['value'] == 0.0
  assert req['loss'] == pytest.approx(loss, rel=1e-5) and req['kl_mean'] == pytest.approx(kl, rel=1e-3)
  assert req['top1_agreement'] == pytest.approx(agree)
  assert req['delta_loss'] > 0.5  # as zeroing the whole channel: the massive value was what the head read


def test_intervene_and_anatomy_refuse_bad_input(planted, capsys, tmp_path):
  ckpt = planted[0]
  for flags, message in (
      (['--channels=3:1'], 'layer 3 does not exist'),
      (['--channels=1:128'], 'channel 128 does not exist'),
      (['--channels=1-0:5'], 'runs backwards'),
      (['--channels=x'], 'is not layer:channel'),
      (['--channels=1:2', '--mode=half'], 'mode'),
      (['--channels=1:2', '--mode=mean'], 'now channel_mean'),  # the old name, refused with both names
  ):
    code = cli.main(['maxact-jax', 'intervene', f'--model_path={ckpt}', f'--output_dir={tmp_path}', *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  code = cli.main(['maxact-jax', 'anatomy', f'--model_path={ckpt}', f'--output_dir={tmp_path}/nothing'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'run `maxact-jax measure`' in err[0]


# ---------------------------------------------------------------------------
# The device-side additions and the host-side pieces, by hand.


def test_channel_maxima_and_token_flags_by_hand():
  import jax
  from maxact_jax import stats
  x = np.full((2, 3, 4), 0.01, np.float32)
  x[0, 1] = [500.0, 0.1, -0.2, 0.3]   # median (lower) 0.2: ratio 2500 -> flagged
  x[0, 2] = [-150.0, 1.0, 1.0, 1.0]   # ratio 150 -> not
  x[1, 0] = [0.01, -90.0, 0.0, 0.0]   # median 0: ratio 90 / tiny, but 90 < 100 -> not
  x[1, 1, 2] = np.nan                 # NaN enters no maximum
  x[1, 2] = [1e4, 1e4, 1e4, 1e4]      # padding: ignored
  valid = np.array([[True, True, True], [True, True, False]])
  p = jax.jit(stats.tap_partial, static_argnames=('full', 'anatomy'))(x, valid, full=True, anatomy=True)
  np.testing.assert_array_equal(np.asarray(p['chan_absmax']), [500.0, 90.0, 1.0, 1.0])
  np.testing.assert_array_equal(np.asarray(p['sun_tok']), [[False, True, False], [False, False, False]])
  assert int(np.asarray(p['sun_n_pass']).sum()) == 1
  a, b = stats.TapStats(full=True), stats.TapStats(full=True)
  a.update({k: np.asarray(v) for k, v in p.items()}, np.array([0, 1]), 5)
  b.update({**{k: np.asarray(v) for k, v in p.items()}, 'chan_absmax': np.array([1.0, 2.0, 3.0, 900.0], np.float32)},
           np.array([2, 3]), 5)
  np.testing.assert_array_equal(a.merge(b).chan_absmax, [500.0, 90.0, 3.0, 900.0])


def test_the_two_token_rules_by_hand():
  """A token whose whole state is large passes the layer-median rule only; a token with one large
  channel among tiny ones, in a sequence of ordinary ones, passes the per-token rule only."""
  import jax
  from maxact_jax import stats
  x = np.zeros((2, 4, 4), np.float32)
  # Row 0: token 0 is large everywhere: its own (lower) median is 200, ratio 2.5 -> not by the token's
  # own median. The row's 16 values sorted: 0.1 x 8, 0.2 x 4, 150, 200, 300, 500; the lower median
  # (the 8th) is 0.1 (the mean of the middle two would be 0.15): 500 / 0.1 = 5000 -> flagged.
  x[0] = [[500, -200, 150, 300], [0.1] * 4, [-0.1] * 4, [0.2] * 4]
  # Row 1, three valid tokens: token 1 is 150 among 0.01s, 15000x its own median -> flagged by the
  # per-token rule; the row's 12 values: 0.01 x 3, 1 x 4, 2 x 4, 150: lower median 1, ratio 150 ->
  # not by the layer median. The padding (1e4) would move that median to 2 if it counted.
  x[1] = [[1] * 4, [150, 0.01, 0.01, -0.01], [2] * 4, [1e4] * 4]
  valid = np.array([[True] * 4, [True, True, True, False]])
  p = jax.jit(stats.tap_partial, static_argnames=('full', 'anatomy'))(x, valid, full=True, anatomy=True)
  p = {k: np.asarray(v) for k, v in p.items()}
  np.testing.assert_array_equal(p['layer_median_tok'], [[True, False, False, False], [False] * 4])
  np.testing.assert_array_equal(p['sun_tok'], [[False] * 4, [False, True, False, False]])
  np.testing.assert_allclose(p['layer_median_seq_sum'], [0.1, 1.0], rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(stats.sequence_median(np.abs(x), valid)), np.float32([0.1, 1.0]))
  s = stats.TapStats(full=True)
  s.update(p, np.array([0, 1]), 7)
  f = s.finalize()
  assert (f['layer_median_n_pass'], f['sun_n_pass'], f['layer_median_n_seq']) == (1, 1, 2)
  assert f['sun_peak_abs'] == 500 and f['sun_peak_token_ratio'] == pytest.approx(2.5)
  assert f['layer_median_peak_median'] == pytest.approx(0.1) and f['layer_median_peak_ratio'] == pytest.approx(5000)
  assert f['layer_median_seq_mean'] == pytest.approx(0.55)
  # Merging keeps the peak token's own sequence median with it, in either order.
  other = stats.TapStats(full=True)
  other.update({**p, 'sun_peak_abs': np.float32(600), 'layer_median_peak': np.float32(3.0)}, np.array([2, 3]), 7)
  for merged in (stats.TapStats.from_state_dict(s.state_dict()).merge(other),
                 stats.TapStats.from_state_dict(other.state_dict()).merge(s)):
    g = merged.finalize()
    assert (g['layer_median_n_pass'], g['layer_median_n_seq'], g['layer_median_peak_median']) == (2, 4, 3.0)
  # The per-rule flags go to each rule's attribution.
  flags = anatomy.take_flags({'layer_0_hidden': dict(p)})
  assert flags['layer_median'][0].tolist() == p['layer_median_tok'].tolist()
  assert flags['token_median'][0].tolist() == p['sun_tok'].tolist()
  # An anatomy file written before the layer-median rule holds the per-token rule without naming it.
  assert anatomy.attribution_rule({'criterion': {'sun_t_val': 100.0, 'sun_t_ratio': 1000.0}}) == 'token_median'
  assert anatomy.attribution_rule({'criterion': {'name': 'layer_median'}}) == 'layer_median'


def test_parse_and_control_channels():
  assert intervene.parse_channels(['2-4:7', '3:7', '0:1'], 6, 16) == [(0, 1), (2, 7), (3, 7), (4, 7)]
  pairs = [(2, 7), (2, 9), (5, 7)]
  ctrl = intervene.control_channels(pairs, 16, seed=0)
  assert [l for l, _ in ctrl] == [2, 2, 5] and not {c for _, c in ctrl} & {7, 9}
  assert ctrl == intervene.control_channels(pairs, 16, seed=0) != intervene.control_channels(pairs, 16, seed=1)
  mask, value = intervene.edit_tables(pairs, 6, 16, np.full((6, 16), 2.5, np.float32))
  assert mask.sum() == 3 and mask[2, 9] and value[2, 9] == 2.5 and value[0, 0] == 0.0


def test_channel_rules_by_hand():
  absmax = np.array([[1.0, 1.0, 2.0, 1.0, 1.0],     # layer 0: nothing
                     [1.0, 150.0, 2.0, 1.0, 90.0],  # layer 1: ch 1 (sun); ch 4 < 100 (sun), but far out (mad)
                     [1.0, 200.0, 2.0, 500.0, 1.0],
                     [1.0, 1.5, 2.0, 600.0, 1.0]])
  medians = np.array([0.1, 0.1, 0.1, 1.0])  # layer 3: 600 < 1000 x 1.0
  sun = anatomy.channel_mask(absmax, medians, anatomy.ChannelRule('sun'))
  assert np.argwhere(sun).tolist() == [[1, 1], [2, 1], [2, 3]]
  mad = anatomy.channel_mask(absmax, medians, anatomy.ChannelRule('mad', mad_k=10))
  # Layer 1: median 2, MAD 1 -> z(90) = 88 / 1.4826 = 59, z(150) = 100; layer 3: MAD 0.5 -> z(600) = 807;
  # layer 0: MAD 0, mean deviation 0.2 -> z(2) = 1 / (0.2 * 1.2533) = 4.
  assert np.argwhere(mad).tolist() == [[1, 1], [1, 4], [2, 1], [2, 3], [3, 3]]
  flat = anatomy.channel_mask(np.ones((1, 5)), np.ones(1), anatomy.ChannelRule('mad'))
  assert not flat.any()
  found = anatomy.outlier_channels([0, 1, 2, 3], absmax, medians, anatomy.ChannelRule('mad', min_layer_share=0.5))
  assert [(c['channel'], c['first_layer'], c['last_layer'], c['disappears_at'], c['contiguous'])
          for c in found['channels']] == [(3, 2, 3, None, True), (1, 1, 2, 3, True)]
  assert found['min_layers'] == 2 and found['channels_over_per_layer'] == [0, 2, 2, 1]


def test_token_attribution_counts_classes_and_merges():
  table = anatomy.TokenTable(np.array([anatomy.BOS, anatomy.OTHER, anatomy.NEWLINE, anatomy.DELIMITER,
                                       anatomy.SPECIAL, anatomy.OTHER], np.int8), None, 0)
  ids = np.array([[0, 1, 2, 3], [1, 5, 3, 0]])
  valid = np.array([[True, True, True, True], [True, True, True, False]])
  flags = {0: np.array([[True, False, True, False], [True, False, False, True]]),  # (1, 3) is padding
           1: np.array([[True, False, False, False], [False, False, True, False]])}
  one, two = anatomy.TokenAttribution(), anatomy.TokenAttribution()
  one.add({0: flags[0][:1], 1: flags[1][:1]}, ids[:1], valid[:1])
  two.add({0: flags[0][1:], 1: flags[1][1:]}, ids[1:], valid[1:])
  both = anatomy.TokenAttribution.from_state(json.loads(json.dumps(one.state()))).merge(two)
  whole = anatomy.TokenAttribution()
  whole.add(flags, ids, valid)
  assert both.state() == whole.state()
  corpus = data.Corpus([np.array([0, 1, 2, 3]), np.array([1, 5, 3])], [None, None], 'x')
  s = whole.summary(corpus, table, 2)
  counts = {c: (v['flagged'], v['total']) for c, v in s['classes'].items()}
  # Flagged anywhere: BOS at (0, 0), newline at (0, 2), id 1 first at (1, 0), delimiter at (1, 2).
  assert counts == {'bos': (1, 1), 'first': (1, 1), 'special': (0, 0), 'newline': (1, 1), 'delimiter': (1, 2),
                    'other': (0, 2)}
  assert s['per_layer']['flagged'] == [3, 2] and s['flagged_tokens'] == 4 and s['layers_flagged'] == {'1': 3, '2': 1}
  assert [(t['token_id'], t['flagged'], t['occurrences']) for t in s['top_token_ids']][:2] == [(0, 1, 1), (1, 1, 2)]
  assert [anatomy.text_class(t) for t in ('\n', ' .', '),', 'a.', ' ', 'x')] == [  # pylint: disable=protected-access
      anatomy.NEWLINE, anatomy.DELIMITER, anatomy.DELIMITER, anatomy.OTHER, anatomy.OTHER, anatomy.OTHER]


def test_channel_rule_checks():
  with pytest.raises(UserError, match='not a channel rule'):
    anatomy.ChannelRule('iqr').check()
  with pytest.raises(UserError, match='min_layer_share'):
    anatomy.ChannelRule(min_layer_share=0).check()
