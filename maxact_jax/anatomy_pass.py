"""The anatomy's device pass: the token x channel surface of one layer for one sample.

`measure` keeps only reduced statistics; the surface needs the raw residual
stream, so one sample runs again through the model under the capture
interceptor with `raw_hidden_handler` (every `layer_{i}_hidden` tap sown in
float32, nothing else). `maxact_jax.anatomy_job` calls it; the analysis it
feeds lives in `maxact_jax.anatomy`, the figure in `maxact_jax.plots`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import capture
from maxact_jax.models import transformer


def raw_hidden_handler(call, x):
  """Sow the residual stream (`hidden` taps) as float32; every other tap untouched."""
  if call.in_layer and call.suffix == 'hidden':
    return x, x.astype('float32')
  return x, None


def surface(config, params, dtype, token_ids: np.ndarray, layer: int, tokens: int,
            around: int | None = None) -> dict[str, np.ndarray]:
  """|x| of layer `layer`'s output for one sample: [window, D] float32 and its positions.

  The sample's prefix up to the window's end runs once (causal attention: the
  prefix gives the same activations as the whole sample). The window holds
  `tokens` positions: from 0 when the peak (or `around`) falls among the first
  `tokens`, else centred on it. Every residual layer is sown ([L, T, D]) and
  one is kept; the prefix is at most max(tokens, around + 1) long.
  """
  ids = np.asarray(token_ids, np.int32)
  n = min(len(ids), max(tokens, (around or 0) + 1))
  model = transformer.build(config, dtype)

  @jax.jit
  def run(p, i, v):
    with nn.intercept_methods(capture.interceptor(raw_hidden_handler)):
      _, sown = model.apply({'params': p}, i, v, mutable=[capture.COLLECTION])
    return sown[capture.COLLECTION]

  sown = run(params, jnp.asarray(ids[None, :n]), jnp.ones((1, n), bool))
  absx = np.abs(np.asarray(capture.collect(config, jax.device_get(sown))[f'layer_{layer}_hidden'][0]))
  focus = around if around is not None else int(np.unravel_index(np.argmax(absx), absx.shape)[0])
  start = 0 if focus < tokens else min(focus - tokens // 2, n - tokens)
  window = absx[start:start + tokens]
  return {'abs': window.astype(np.float32), 'positions': np.arange(start, start + len(window)),
          'token_ids': ids[start:start + len(window)]}
