"""qwen2_5_vl text backbone: crosscheck through the full multimodal model, both key
layouts, the reference statistics, and the mrope reduction to 1-D rope checked
against transformers' own rotary module."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maxact_jax import crosscheck, fixtures
from maxact_jax.families import load_config, parse_config
from maxact_jax.models import layers
from tests import parity_utils


@pytest.mark.parametrize('original_format', [True, False], ids=['hub', 'modules'])
def test_crosscheck_passes(original_format, checkpoint, ids_corpus):
  model_dir = checkpoint('qwen2_5_vl', original_format=original_format)
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(
      model_path=model_dir, data_path=ids_corpus, num_samples=6, max_seq_len=40))
  parity_utils.assert_crosscheck_passed(report)
  assert len(report['taps']) == 2 + 4 * load_config(model_dir).num_hidden_layers


@pytest.mark.slow
def test_measure_matches_reference_pipeline(checkpoint, ids_corpus, tmp_path):
  parity_utils.assert_measure_matches_reference(checkpoint('qwen2_5_vl'), ids_corpus, str(tmp_path))


def transformers_rotary(config, positions: torch.Tensor):
  """transformers' Qwen2_5_VLRotaryEmbedding on position rows [3, B, T]: (cos, sin [B, T, h], inv_freq)."""
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # pylint: disable=import-outside-toplevel

  rotary = modeling_qwen2_5_vl.Qwen2_5_VLRotaryEmbedding(config.text_config)
  cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
  return cos.numpy(), sin.numpy(), rotary.inv_freq


def test_mrope_of_text_is_1d_rope():
  """For text-only input transformers builds the three mrope position rows from the same
  positions; its rotary tables are then exactly those of 1-D rope, and ours match them."""
  hf_config = fixtures.make_config('qwen2_5_vl')
  assert list(hf_config.text_config.rope_parameters['mrope_section']) == [2, 3, 3]  # three real sections
  ours = parse_config(hf_config.to_dict(), 'qwen2_5_vl config')
  t = 48
  text_rows = torch.arange(t).view(1, 1, t).expand(3, 2, t)
  cos, sin, inv_freq = transformers_rotary(hf_config, text_rows)
  # transformers' own arithmetic, without the three sections: bit for bit the same tables.
  freqs = text_rows[0][..., None].float() * inv_freq
  emb = torch.cat([freqs, freqs], dim=-1)
  np.testing.assert_array_equal(cos, emb.cos().numpy())
  np.testing.assert_array_equal(sin, emb.sin().numpy())
  # Ours: the same inverse frequencies, and tables within an ulp (XLA's cos is not torch's).
  our_inv_freq, scaling = layers.inv_frequencies(ours.rope, ours.head_dim)
  np.testing.assert_array_equal(our_inv_freq, inv_freq.numpy())
  assert scaling == 1.0
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  our_cos, our_sin = layers.rope_tables(ours.rope, ours.head_dim, positions, jnp.float32)
  np.testing.assert_allclose(np.asarray(our_cos), cos, rtol=0, atol=2.5e-7)
  np.testing.assert_allclose(np.asarray(our_sin), sin, rtol=0, atol=2.5e-7)
  # The comparison can fail: an image-like layout (height row shifted) changes the section it feeds.
  image_rows = text_rows.clone()
  image_rows[1] += 5
  cos_image, _, _ = transformers_rotary(hf_config, image_rows)
  assert np.abs(cos_image - cos).max() > 0.1
