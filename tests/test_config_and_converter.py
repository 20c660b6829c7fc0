"""Config whitelist, converter completeness, checkpoint layouts, full-size shapes."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import converters
from converters import safetensors_io
from maxact_jax import capture
from maxact_jax.errors import UserError
from maxact_jax.families import load_config, parse_config
from maxact_jax.models import transformer
from tests.conftest import REAL_CONFIGS

DENSE_REAL = ['Qwen2.5-1.5B-Instruct', 'Qwen2.5-7B', 'Qwen2.5-7B-Instruct', 'Qwen2.5-32B',
              'Qwen2.5-32B-Instruct', 'Qwen3-1.7B', 'Qwen3-8B', 'Qwen3-32B']


def copy_checkpoint(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def edit_config(model_dir: str, **changes) -> None:
  path = os.path.join(model_dir, 'config.json')
  with open(path) as f:
    raw = json.load(f)
  for k, v in changes.items():
    if v is None:
      raw.pop(k, None)
    else:
      raw[k] = v
  with open(path, 'w') as f:
    json.dump(raw, f)


# -- config whitelist --------------------------------------------------------


def test_unknown_config_field_is_refused(checkpoint, tmp_path):
  d = copy_checkpoint(checkpoint('qwen3'), tmp_path / 'm')
  edit_config(d, attn_temperature_tuning=True)
  with pytest.raises(UserError, match='unknown config field.*attn_temperature_tuning'):
    load_config(d)


def test_unknown_model_type_is_refused():
  with pytest.raises(UserError, match="unknown model_type 'mamba'"):
    parse_config({'model_type': 'mamba'})


def test_unsupported_value_of_a_known_field_is_refused():
  raw = {'model_type': 'llama', 'vocab_size': 8, 'hidden_size': 8, 'num_hidden_layers': 1,
         'num_attention_heads': 2, 'intermediate_size': 8, 'pretraining_tp': 2}
  with pytest.raises(UserError, match="'pretraining_tp' = 2 is not supported"):
    parse_config(raw)


def test_missing_required_field_is_named():
  with pytest.raises(UserError, match="missing required field 'vocab_size'"):
    parse_config({'model_type': 'qwen3', 'hidden_size': 8, 'num_attention_heads': 2})


def test_qwen2_sliding_window_layers_follow_max_window_layers():
  raw = {'model_type': 'qwen2', 'vocab_size': 8, 'hidden_size': 8, 'num_hidden_layers': 4,
         'num_attention_heads': 2, 'intermediate_size': 8, 'use_sliding_window': True,
         'sliding_window': 16, 'max_window_layers': 2}
  c = parse_config(raw)
  assert c.layer_types == ('full_attention',) * 2 + ('sliding_attention',) * 2
  assert c.sliding_window == 16


@pytest.mark.parametrize('name', DENSE_REAL)
def test_real_configs_build_at_full_size(name):
  config = load_config(os.path.join(REAL_CONFIGS, name))
  params = transformer.abstract_params(config, jnp.bfloat16)
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  assert n == meta_parameter_count(os.path.join(REAL_CONFIGS, name))
  plans = converters.plan(config, converters.weight_map(config), jnp.bfloat16)
  assert len({k for p in plans for r in p.recipes for k in r.keys}) == len(meta_state_keys(name))


def meta_model(model_dir: str):
  import torch
  import transformers
  cfg = transformers.AutoConfig.from_pretrained(model_dir)
  with torch.device('meta'):
    return transformers.AutoModelForCausalLM.from_config(cfg)


def meta_parameter_count(model_dir: str) -> int:
  return sum(p.numel() for p in meta_model(model_dir).parameters())


def meta_state_keys(name: str) -> list[str]:
  model = meta_model(os.path.join(REAL_CONFIGS, name))
  keys = list(model.state_dict())
  if model.config.tie_word_embeddings:
    keys.remove('lm_head.weight')
  return keys


@pytest.mark.parametrize('name', ['Qwen3-8B', 'Qwen2.5-1.5B-Instruct'])
def test_real_config_key_coverage_is_exact(name):
  config = load_config(os.path.join(REAL_CONFIGS, name))
  plans = converters.plan(config, converters.weight_map(config), jnp.bfloat16)
  ours = sorted(k for p in plans for r in p.recipes for k in r.keys)
  assert ours == sorted(meta_state_keys(name))


def test_full_tap_list_per_family(checkpoint):
  for model_type in ('llama', 'qwen2', 'qwen3'):
    config = load_config(checkpoint(model_type))
    want = ['embedding_output']
    for i in range(config.num_hidden_layers):
      want += [f'layer_{i}_attn_output', f'layer_{i}_mlp_gate', f'layer_{i}_mlp_output', f'layer_{i}_hidden']
    want.append('final_layernorm')
    assert capture.tap_names(config) == want


# -- converter completeness and layouts ---------------------------------------


def read_all(model_dir: str) -> dict[str, np.ndarray]:
  ckpt = safetensors_io.Checkpoint(model_dir)
  return {k: np.array(ckpt.read(k)) for k in ckpt.keys()}


def rewrite(model_dir: str, tensors: dict[str, np.ndarray]) -> None:
  for f in os.listdir(model_dir):
    if f.endswith('.safetensors') or f.endswith('.index.json'):
      os.remove(os.path.join(model_dir, f))
  safetensors_io.write_safetensors(os.path.join(model_dir, 'model.safetensors'), tensors)


def test_unused_checkpoint_tensor_is_refused(checkpoint, tmp_path):
  d = copy_checkpoint(checkpoint('qwen3'), tmp_path / 'm')
  tensors = read_all(d)
  tensors['model.layers.0.mlp.extra_proj.weight'] = np.zeros((2, 2), np.float32)
  rewrite(d, tensors)
  with pytest.raises(UserError, match='model.layers.0.mlp.extra_proj.weight is not used'):
    converters.load_params(d, load_config(d))


def test_missing_checkpoint_tensor_is_refused(checkpoint, tmp_path):
  d = copy_checkpoint(checkpoint('qwen3'), tmp_path / 'm')
  tensors = read_all(d)
  del tensors['model.layers.2.self_attn.k_norm.weight']
  rewrite(d, tensors)
  with pytest.raises(UserError, match='missing tensor model.layers.2.self_attn.k_norm.weight'):
    converters.load_params(d, load_config(d))


def test_shape_mismatch_is_refused(checkpoint, tmp_path):
  d = copy_checkpoint(checkpoint('qwen3'), tmp_path / 'm')
  tensors = read_all(d)
  tensors['model.layers.1.mlp.up_proj.weight'] = tensors['model.layers.1.mlp.up_proj.weight'][:-1]
  rewrite(d, tensors)
  with pytest.raises(UserError, match=r'model.layers.1.mlp.up_proj.weight has shape \(64, 159\)'):
    converters.load_params(d, load_config(d))


def test_sharded_checkpoint_loads_like_the_single_file(checkpoint, tmp_path):
  import transformers
  src = checkpoint('llama')
  model = transformers.AutoModelForCausalLM.from_pretrained(src)
  sharded = str(tmp_path / 'sharded')
  model.save_pretrained(sharded, max_shard_size='20KB')
  assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json'))
  a = converters.load_params(src, load_config(src))
  b = converters.load_params(sharded, load_config(sharded))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_checkpoints(checkpoint, dtype):
  d = checkpoint('qwen2', name=f'qwen2-{dtype}', dtype=dtype)
  params = converters.load_params(d, load_config(d), jnp.float32)
  ckpt = safetensors_io.Checkpoint(d)
  src = ckpt.read('model.layers.1.self_attn.q_proj.weight')
  assert src.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.float16)
  np.testing.assert_array_equal(params['model']['layers']['self_attn']['q_proj']['kernel'][1],
                                src.astype(np.float32).T)
  bias = ckpt.read('model.layers.0.self_attn.q_proj.bias').astype(np.float32)
  np.testing.assert_array_equal(params['model']['layers']['self_attn']['q_proj']['bias'][0], bias)


def test_tied_embeddings_have_no_head(checkpoint):
  d = checkpoint('qwen3', name='qwen3-tied', tie_word_embeddings=True)
  config = load_config(d)
  assert config.tie_word_embeddings
  params = converters.load_params(d, config)
  assert 'lm_head' not in params


def test_bf16_conversion_rounds_like_torch(checkpoint, tmp_path):
  import torch
  d = copy_checkpoint(checkpoint('llama'), tmp_path / 'm')
  params = converters.load_params(d, load_config(d), jnp.bfloat16)
  src = safetensors_io.Checkpoint(d).read('model.embed_tokens.weight')
  want = torch.from_numpy(np.array(src)).to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(params['model']['embed_tokens']['embedding'], np.float32), want)


@pytest.mark.parametrize('damage', ['truncate', 'header'])
def test_corrupt_safetensors_is_a_clear_error(checkpoint, tmp_path, damage):
  d = copy_checkpoint(checkpoint('llama'), tmp_path / 'm')
  path = os.path.join(d, 'model.safetensors')
  with open(path, 'rb') as f:
    blob = f.read()
  blob = blob[:len(blob) // 2] if damage == 'truncate' else blob[:8] + b'{not json' + blob[17:]
  with open(path, 'wb') as f:
    f.write(blob)
  with pytest.raises(UserError, match='model.safetensors is (truncated or corrupt|not a valid safetensors file)'):
    converters.load_params(d, load_config(d))
