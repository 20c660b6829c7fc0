"""A model against variants of it, next token by next token: device metrics, host merge, summary.

`next_token_metrics` reduces, per predicted position, the next-token loss of
the base model and of each variant, KL(base || variant) of their next-token
distributions and whether the top-1 prediction survives, from their final
hidden states and heads (a variant may have a head of its own: a rotated
model's). `EvalAccumulator` merges them on the host in float64, overall and by
the class of the predicting token (`maxact_jax.anatomy.CLASSES`); `base_summary`
and `variant_summary` write them down. `intervene` (channel replacement) and
`qeval` (quantization) both compare this way.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import anatomy, data
from maxact_jax.models import transformer

Array = jax.Array

# Positions whose logits are computed at once (bounds the [B, chunk, vocab] logits).
LOGITS_CHUNK = 256


def next_token_metrics(h0: Array, hv: Array, input_ids: Array, valid: Array,
                       log_probs0: Callable[[Array], Array], log_probs_v: Callable[[Array], Array],
                       chunk: int = LOGITS_CHUNK) -> dict[str, Array]:
  """Per predicted position, a base model against variants, from their final hidden states.

  h0 [B, T, D] (the base), hv [V, B, T, D] (the variants); `log_probs0` and
  `log_probs_v` map hidden states [..., D] to float32 next-token
  log-probabilities [..., vocab] (the base's and the variants' heads). Returns,
  over the T - 1 predicted positions (position t predicts token t + 1): `ok`
  [B, T-1] (both valid), `nll_base` [B, T-1], and per variant `nll`, `kl`
  (KL(base || variant), nats) [V, B, T-1] and `agree` (same argmax) [V, B, T-1].
  Logits are computed `chunk` positions at a time, so a large vocabulary never
  holds [B, T, vocab] for more than one chunk.
  """
  b, t = input_ids.shape
  n_var = hv.shape[0]
  h0, hv = h0[:, :-1], hv[:, :, :-1]
  targets = input_ids[:, 1:]
  ok = valid[:, :-1] & valid[:, 1:]
  n = t - 1
  if n == 0:  # one-token batch: nothing to predict
    zeros = jnp.zeros((n_var, b, 0))
    return {'ok': ok, 'nll_base': zeros[0], 'nll': zeros, 'kl': zeros, 'agree': zeros.astype(bool)}
  c = min(chunk, n)
  pad = -n % c
  padded = lambda a, axis: jnp.pad(a, [(0, pad if i == axis else 0) for i in range(a.ndim)])
  # [chunks, ...] leading axis for lax.map.
  h0c = padded(h0, 1).reshape(b, -1, c, h0.shape[-1]).swapaxes(0, 1)
  hvc = padded(hv, 2).reshape(n_var, b, -1, c, hv.shape[-1]).transpose(2, 0, 1, 3, 4)
  tc = padded(targets, 1).reshape(b, -1, c).swapaxes(0, 1)

  def metrics(args):
    h0_, hv_, t_ = args
    lp0 = log_probs0(h0_)  # [B, c, V]
    nll0 = -jnp.take_along_axis(lp0, t_[..., None], axis=-1)[..., 0]
    p0 = jnp.exp(lp0)
    top0 = jnp.argmax(lp0, axis=-1)
    nll, kl, agree = [], [], []
    for v in range(n_var):
      lpv = log_probs_v(hv_[v])
      nll.append(-jnp.take_along_axis(lpv, t_[..., None], axis=-1)[..., 0])
      # KL(base || variant); 0 * log 0 terms are 0 (p0 underflows to exactly 0). KL >= 0: the
      # float32 sum over nearly equal distributions can end at -1e-7, which is rounding.
      kl.append(jnp.maximum(jnp.sum(jnp.where(p0 > 0, p0 * (lp0 - lpv), 0.0), axis=-1), 0.0))
      agree.append(jnp.argmax(lpv, axis=-1) == top0)
    return nll0, jnp.stack(nll), jnp.stack(kl), jnp.stack(agree)

  nll0, nll, kl, agree = jax.lax.map(metrics, (h0c, hvc, tc))
  # [chunks, B, c] -> [B, T-1]; [chunks, V, B, c] -> [V, B, T-1].
  nll0 = nll0.transpose(1, 0, 2).reshape(b, -1)[:, :n]
  nll, kl, agree = (a.transpose(1, 2, 0, 3).reshape(n_var, b, -1)[:, :, :n] for a in (nll, kl, agree))
  return {'ok': ok, 'nll_base': nll0, 'nll': nll, 'kl': kl, 'agree': agree}


def head_log_probs(model: transformer.CausalLM, params: Any) -> Callable[[Array], Array]:
  """Final hidden states [..., D] -> float32 next-token log-probabilities [..., vocab]."""

  def log_probs(h):
    logits = model.apply({'params': params}, h, method='head')
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return log_probs


class EvalAccumulator:
  """float64 sums of the per-position metrics, overall and by class of the predicting token."""

  def __init__(self, n_variants: int, table: anatomy.TokenTable):
    self.table = table
    k = len(anatomy.CLASSES)
    self.count = np.zeros(k, np.int64)
    self.nll_base = np.zeros(k)
    self.nll = np.zeros((n_variants, k))
    self.kl = np.zeros((n_variants, k))
    self.agree = np.zeros((n_variants, k), np.int64)
    self.kl_max = np.full(n_variants, -1.0)
    self.kl_max_at: list[tuple[int, int] | None] = [None] * n_variants
    self.kl_values: list[list[np.ndarray]] = [[] for _ in range(n_variants)]  # for quantiles

  def add(self, out: Any, batch: data.Batch) -> None:
    o = jax.device_get(out)
    ok = np.asarray(o['ok'], bool)
    ids = batch.input_ids[:, :-1]
    first = np.zeros(ids.shape, bool)
    first[:, 0] = True
    cls = self.table.classify(ids, first)[ok]
    add = lambda acc, vals: np.add.at(acc, cls, np.asarray(vals, np.float64)[ok])
    np.add.at(self.count, cls, 1)
    add(self.nll_base, o['nll_base'])
    for v in range(len(self.kl_max)):
      add(self.nll[v], o['nll'][v])
      add(self.kl[v], o['kl'][v])
      self.kl_values[v].append(np.asarray(o['kl'][v], np.float64)[ok])
      np.add.at(self.agree[v], cls, np.asarray(o['agree'][v], np.int64)[ok])
      kl = np.where(ok, np.asarray(o['kl'][v], np.float64), -np.inf)
      row, pos = np.unravel_index(int(np.argmax(kl)), kl.shape)
      # Ties and order: batches come in corpus order of their first sample, so keep the first maximum.
      if kl[row, pos] > self.kl_max[v]:
        self.kl_max[v] = float(kl[row, pos])
        self.kl_max_at[v] = (int(batch.sample_ids[row]), int(pos))

  def kl_quantile(self, v: int, q: float) -> float | None:
    """The q-quantile of variant v's per-position KL (numpy's linear interpolation)."""
    values = np.concatenate(self.kl_values[v]) if self.kl_values[v] else np.zeros(0)
    return float(np.quantile(values, q)) if values.size else None


# ---------------------------------------------------------------------------
# Summaries.


def _summary(nll: np.ndarray, count: np.ndarray) -> dict[str, float | None]:
  n = int(count.sum())
  loss = float(nll.sum() / n) if n else None
  return {'loss': loss, 'perplexity': (math.exp(loss) if loss is not None and loss < 700 else None)}


def base_summary(acc: EvalAccumulator) -> dict[str, Any]:
  """Loss and perplexity of the base model, overall and by class of the predicting token."""
  return {**_summary(acc.nll_base, acc.count),
          'by_class': {cls: {'positions': int(acc.count[k]), 'loss': float(acc.nll_base[k] / acc.count[k])}
                       for k, cls in enumerate(anatomy.CLASSES) if acc.count[k]}}


def variant_summary(acc: EvalAccumulator, v: int, base: dict[str, Any], describe: Callable) -> dict[str, Any]:
  """Variant v against the base: loss, perplexity, their change, KL (mean, max and where),
  top-1 agreement, and the same by class of the predicting token."""
  s = _summary(acc.nll[v], acc.count)
  n = int(acc.count.sum())
  entry = {
      **s,
      'delta_loss': (s['loss'] - base['loss']) if s['loss'] is not None else None,
      'perplexity_ratio': (s['perplexity'] / base['perplexity']
                           if s['perplexity'] and base['perplexity'] else None),
      'kl_mean': float(acc.kl[v].sum() / n) if n else None,
      'kl_max': float(acc.kl_max[v]) if acc.kl_max_at[v] else None,
      # Where the largest KL sits: the predicting token (its sample, position, id, text).
      'kl_max_at': (describe((*acc.kl_max_at[v], 0)) if acc.kl_max_at[v] else None),
      'top1_agreement': float(acc.agree[v].sum() / n) if n else None,
      'by_class': {},
  }
  if entry['kl_max_at']:
    entry['kl_max_at'].pop('channel', None)
  for k, cls in enumerate(anatomy.CLASSES):
    m = int(acc.count[k])
    if m:
      entry['by_class'][cls] = {
          'positions': m,
          'delta_loss': float((acc.nll[v, k] - acc.nll_base[k]) / m),
          'kl_mean': float(acc.kl[v, k] / m),
          'top1_agreement': float(acc.agree[v, k] / m),
      }
  return entry
