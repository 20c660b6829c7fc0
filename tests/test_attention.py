"""The blocked attention equals the direct one: causal, padding, sliding window, sinks, soft-cap."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxact_jax.config import ModelConfig, RopeConfig
from maxact_jax.models import layers

BASE = ModelConfig(model_type='llama', vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, intermediate_size=8, rms_norm_eps=1e-6,
                   rope=RopeConfig(theta=1e4))


@pytest.mark.parametrize('t,block,window,softcap,sinks', [
    (40, 8, 0, None, False),    # several blocks, a ragged last one
    (40, 16, 6, None, False),   # sliding window shorter than a block
    (33, 8, 20, 3.0, False),    # window spanning blocks, soft-capping
    (24, 8, 0, None, True),     # attention sinks
    (8, 8, 0, None, False),     # a single block
])
def test_blocked_equals_direct(t, block, window, softcap, sinks):
  c = dataclasses.replace(BASE, attn_logit_softcap=softcap, attention_sinks=sinks)
  rng = np.random.RandomState(t + block)
  b, k, g, h = 3, 2, 2, 8
  q = jnp.asarray(rng.randn(b, t, k, g, h), jnp.float32)
  key = jnp.asarray(rng.randn(b, t, k, h), jnp.float32)
  value = jnp.asarray(rng.randn(b, t, k, h), jnp.float32)
  lengths = [t, t - 5, 3]
  valid = jnp.asarray(np.arange(t)[None, :] < np.array(lengths)[:, None])
  sink = jnp.asarray(rng.randn(k * g), jnp.float32) if sinks else None
  want = layers.direct_attention(q, key, value, layers.attention_mask(valid, window), c, jnp.float32, sink)
  got = layers.blocked_attention(q, key, value, valid, window, c, jnp.float32, sink, block)
  for row, n in enumerate(lengths):  # padding queries are never measured
    np.testing.assert_allclose(np.asarray(got[row, :n]), np.asarray(want[row, :n]), rtol=2e-6, atol=2e-6)


def test_long_sequences_take_the_blocked_path(monkeypatch):
  calls = []
  real = layers.blocked_attention
  monkeypatch.setattr(layers, 'blocked_attention', lambda *a, **kw: calls.append(1) or real(*a, **kw))
  monkeypatch.setattr(layers, 'ATTENTION_BLOCK', 8)
  attn = layers.Attention(BASE, jnp.float32)
  x = jnp.ones((1, 20, 32))
  cos, sin = layers.rope_tables(BASE.rope, 8, jnp.arange(20)[None], jnp.float32)
  params = attn.init(jax.random.PRNGKey(0), x, cos, sin, jnp.ones((1, 20), bool))
  attn.apply(params, x, cos, sin, jnp.ones((1, 20), bool))
  assert calls


@pytest.mark.parametrize('family', ['qwen3', 'gemma2', 'gpt_oss'])
def test_models_agree_with_transformers_through_the_blocked_path(family, checkpoint, moe_checkpoint, ids_corpus,
                                                                 monkeypatch):
  from maxact_jax import crosscheck
  monkeypatch.setattr(layers, 'ATTENTION_BLOCK', 8)  # 40-token samples: five query blocks
  model_dir = moe_checkpoint(family) if family == 'gpt_oss' else checkpoint(family)
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(model_path=model_dir, data_path=ids_corpus,
                                                              num_samples=6, max_seq_len=40))
  assert report['passed'], crosscheck.format_report(report)
  assert report['batch_shape'][1] > 3 * 8  # several query blocks
