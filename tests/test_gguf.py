"""GGUF checkpoints: tiny files of every supported family, written the way llama.cpp's
converter writes them (maxact_jax.fixtures_gguf), read back exactly and through
measure, the tokenizer from the metadata, conversion, run.weights, bad files."""

from __future__ import annotations

import json
import os
import shutil
import struct

import gguf
import numpy as np
import pytest

import converters
from converters import gguf_io, safetensors_io
from maxact_jax import (crosscheck, data, fixtures, fixtures_gguf, gguf_config, gguf_file, measure, measure_step,
                        torch_reference)
from maxact_jax.corpus import builtin_corpus
from maxact_jax.errors import UserError
from maxact_jax.families import load_config, parse_config
from tests.parity_utils import assert_crosscheck_passed
from tests.test_cli import assert_one_error, run_cli

FAMILIES = ['llama', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3_text']
GEMMA = ('gemma', 'gemma2', 'gemma3_text')


class GGUFFactory:
  """(source checkpoint directory, GGUF file) per family and variant, written once."""

  def __init__(self, root, tokenizer_dir):
    self.root, self.tokenizer_dir, self.cache = root, tokenizer_dir, {}

  def __call__(self, model_type: str, variant: str = '', qtype: str = 'F32', **overrides) -> tuple[str, str]:
    key = f'{model_type}{variant}-{qtype}'
    if key not in self.cache:
      src = str(self.root / key)
      overrides = {**fixtures_gguf.REPRESENTABLE.get(model_type, {}), **overrides}
      fixtures.tiny_checkpoint(model_type, src, seed=0, tokenizer_dir=self.tokenizer_dir, **overrides)
      path = fixtures_gguf.write_gguf(src, str(self.root / f'{key}.gguf'), tokenizer_dir=self.tokenizer_dir,
                                      qtype=qtype, name=key)
      self.cache[key] = (src, path)
    return self.cache[key]


@pytest.fixture(scope='module')
def gguf_pair(tmp_path_factory, tokenizer_dir) -> GGUFFactory:
  return GGUFFactory(tmp_path_factory.mktemp('gguf'), tokenizer_dir)


def same_config(a, b) -> None:
  """Configs equal but for what a GGUF file stores differently: rms_norm_eps as a
  float32, the padding id of its tokenizer."""
  import dataclasses
  a = dataclasses.replace(a, rms_norm_eps=float(np.float32(a.rms_norm_eps)), pad_token_id=None)
  b = dataclasses.replace(b, rms_norm_eps=float(np.float32(b.rms_norm_eps)), pad_token_id=None)
  assert a == b


# -- reading: exact round trip, then the model -----------------------------


@pytest.mark.parametrize('model_type', FAMILIES)
def test_tiny_gguf_round_trips_exactly(model_type, gguf_pair):
  """Every tensor comes back as the source checkpoint holds it: bit for bit, except the
  Gemma norms llama.cpp stores as 1 + w, which come back within half an ulp of 1 + w."""
  src, path = gguf_pair(model_type)
  same_config(load_config(src), load_config(path))
  ours = gguf_io.GGUFCheckpoint(path, load_config(path))
  ref = safetensors_io.Checkpoint(src)
  expected = set(ref.keys()) - ({'lm_head.weight'} if model_type in GEMMA else set())
  assert set(ours.keys()) == expected
  for key in expected:
    got, want = ours.read(key), ref.read(key)
    assert got.dtype == np.float32 and got.shape == want.shape, key
    if model_type in GEMMA and key.endswith('norm.weight'):
      np.testing.assert_allclose(got, want, rtol=0, atol=np.float32(2.0**-24) * 2, err_msg=key)
      assert not np.array_equal(got, want + 1)  # the +1 is undone
    else:
      np.testing.assert_array_equal(got, want, err_msg=key)
  if model_type == 'llama':  # the file really holds llama.cpp's permuted rows
    gf = gguf_file.open_file(path)
    q = ref.read('model.layers.0.self_attn.q_proj.weight')
    assert not np.array_equal(gf.read('blk.0.attn_q.weight'), q)
    np.testing.assert_array_equal(gf.read('blk.0.attn_q.weight'), fixtures_gguf.permute(q, 4))


@pytest.mark.parametrize('model_type', FAMILIES)
def test_tiny_gguf_crosschecks_against_its_source(model_type, gguf_pair, ids_corpus):
  """The GGUF-loaded Flax model against transformers' model of the source checkpoint,
  float32, every tap."""
  src, path = gguf_pair(model_type)
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(model_path=path, data_path=ids_corpus),
                                 hf_model=torch_reference.load_hf_model(src, 'float32'))
  assert_crosscheck_passed(report, max_rel_err=5e-6)


@pytest.mark.parametrize('model_type', ['llama', 'gemma3_text'])
def test_measure_on_gguf_matches_measure_on_its_source(model_type, gguf_pair, ids_corpus, tmp_path):
  src, path = gguf_pair(model_type)
  docs = {}
  for name, where in (('src', src), ('gguf', path)):
    docs[name] = measure.measure(measure.MeasureOptions(
        model_path=where, output_dir=str(tmp_path / name), data_path=ids_corpus, batch_size=6, dtype='float32',
        progress=False)).doc
  a, b = docs['src']['per_layer_stats'], docs['gguf']['per_layer_stats']
  assert list(a) == list(b)
  for tap in a:
    for field in ('max', 'min', 'rms', 'abs_mean', 'sun_peak_token_ratio'):
      if field not in a[tap]:
        continue  # Sun ratios: activation taps only
      assert abs(a[tap][field] - b[tap][field]) <= 1e-5 * max(1.0, abs(a[tap][field])), (tap, field)
  assert docs['gguf']['global_max_location'] == docs['src']['global_max_location']
  weights = docs['gguf']['run']['weights']
  assert weights['format'] == 'gguf' and weights['stored_dtype'] == 'float32'
  assert weights['quant_types'] == {'F32': len(gguf_file.open_file(path).tensors)}
  assert docs['src']['run']['weights'] == {'format': 'safetensors', 'quant_types': {'F32': len(
      safetensors_io.Checkpoint(src).keys())}, 'stored_dtype': 'float32'}


def test_llama3_rope_freqs_become_the_rope_scaling(gguf_pair, ids_corpus):
  """A Llama-3-style file's rope_freqs tensor (one divisor per frequency) is read back as
  the llama3 rope scaling that made it, and the model matches its source."""
  src, path = gguf_pair('llama', '-llama3', rope_parameters=fixtures_gguf.LLAMA3_ROPE)
  assert gguf_config.ROPE_FREQS in gguf_file.open_file(path).tensors
  ours, source = load_config(path), load_config(src)
  assert ours.rope == source.rope and ours.rope.rope_type == 'llama3'
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(model_path=path, data_path=ids_corpus),
                                 hf_model=torch_reference.load_hf_model(src, 'float32'))
  assert_crosscheck_passed(report, max_rel_err=5e-6)


def test_llama3_scaling_from_factors_and_what_cannot_be_represented():
  params = dict(fixtures_gguf.LLAMA3_ROPE)
  factors = fixtures_gguf.rope_freqs(params, 16).astype(np.float64)
  got = gguf_config.llama3_scaling(factors, params['rope_theta'], 16, 'f')
  assert got == {k: v for k, v in params.items() if k != 'rope_theta'}
  # Llama 3.1's own parameters at full size (head_dim 128, theta 500000).
  real = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192,
          'rope_theta': 500000.0}
  got = gguf_config.llama3_scaling(fixtures_gguf.rope_freqs(real, 128).astype(np.float64), 500000.0, 128, 'f')
  assert got == {'rope_type': 'llama3', **{k: v for k, v in real.items() if k != 'rope_theta'}}
  assert gguf_config.llama3_scaling(np.ones(8), 10000.0, 16, 'f') is None
  with pytest.raises(UserError, match='cannot represent'):
    gguf_config.llama3_scaling(np.linspace(1, 3, 8), 10000.0, 16, 'f')


def test_gemma3_embedding_cut_to_the_tokenizer(tokenizer_dir, tmp_path):
  """llama.cpp cuts gemma3's embedding to the tokenizer's size: the model's vocabulary is
  those rows (the cut rows belong to no token), every tap as before."""
  src = str(tmp_path / 'src')
  fixtures.tiny_checkpoint('gemma3_text', src, vocab_size=520, **fixtures_gguf.REPRESENTABLE['gemma3_text'])
  path = fixtures_gguf.write_gguf(src, str(tmp_path / 'cut.gguf'), tokenizer_dir=tokenizer_dir)
  n = data.Tokenizer(tokenizer_dir).vocab_size
  assert load_config(src).vocab_size == 520 and load_config(path).vocab_size == n < 520
  embed = gguf_io.GGUFCheckpoint(path, load_config(path)).read('model.embed_tokens.weight')
  np.testing.assert_array_equal(embed, safetensors_io.Checkpoint(src).read('model.embed_tokens.weight')[:n])


def test_quantized_gguf_against_transformers_own_gguf_load(gguf_pair, ids_corpus):
  """A Q8_0 file: the package's dequantization on both sides, so the taps agree as in
  float32; run.weights names the quantization."""
  src, path = gguf_pair('llama', qtype='Q8_0')
  info = converters.weights_info(path)
  assert info['format'] == 'gguf' and info['stored_dtype'] == 'float32'
  assert info['quant_types'] == {'Q8_0': 23, 'F32': 7}  # 7 matrices x 3 layers, embedding, head; 2 norms x 3 + 1
  weight = gguf_io.GGUFCheckpoint(path, load_config(path)).read('model.layers.1.mlp.up_proj.weight')
  source = safetensors_io.Checkpoint(src).read('model.layers.1.mlp.up_proj.weight')
  assert 0 < np.abs(weight - source).max() <= np.abs(source).max() / 127  # Q8_0: 8 bits per block of 32
  report = crosscheck.crosscheck(crosscheck.CrosscheckOptions(model_path=path, data_path=ids_corpus))
  assert_crosscheck_passed(report, max_rel_err=5e-6)


def test_directory_holding_one_gguf_and_the_choices_of_find(gguf_pair, tmp_path):
  _, path = gguf_pair('qwen3')
  folder = tmp_path / 'dir'
  folder.mkdir()
  shutil.copy(path, folder / 'model.gguf')
  (folder / 'README.md').write_text('a model\n')
  assert gguf_file.find(str(folder)) == str(folder / 'model.gguf')
  assert load_config(str(folder)) == load_config(path)
  (folder / 'model.safetensors').write_bytes(b'')
  assert gguf_file.find(str(folder)) is None  # safetensors: a Hugging Face directory
  os.remove(folder / 'model.safetensors')
  shutil.copy(path, folder / 'other.gguf')
  with pytest.raises(UserError, match='holds 2 GGUF files'):
    gguf_file.find(str(folder))


# -- the tokenizer from the metadata ----------------------------------------


@pytest.fixture(scope='module')
def corpus_texts() -> list[str]:
  return [r['text'] for r in builtin_corpus()]


def hf_gguf_tokenizer(path: str):
  import transformers
  folder, name = os.path.split(os.path.abspath(path))
  return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_byte_level_tokenizer_matches_its_source_and_transformers(gguf_pair, tokenizer_dir, corpus_texts):
  _, path = gguf_pair('qwen3')
  ours = data.Tokenizer(path).encode(corpus_texts)
  assert ours == data.Tokenizer(tokenizer_dir).encode(corpus_texts)
  assert ours == hf_gguf_tokenizer(path)(corpus_texts)['input_ids']


@pytest.mark.parametrize('model_type', ['llama', 'gemma2'])
def test_sentencepiece_tokenizer_matches_transformers(model_type, corpus_texts, tmp_path):
  """A SentencePiece-style (`llama` kind) vocabulary: merges rebuilt from the scores
  (Gemma: from the order), ▁ for spaces, byte fallback, BOS."""
  vocab = fixtures_gguf.sentencepiece_vocabulary(corpus_texts[:300])
  src = str(tmp_path / 'src')
  fixtures.tiny_checkpoint(model_type, src, vocab_size=len(vocab['tokens']),
                           **fixtures_gguf.REPRESENTABLE.get(model_type, {}))
  path = fixtures_gguf.write_gguf(src, str(tmp_path / 'spm.gguf'), spm_vocab=vocab)
  ours = data.Tokenizer(path).encode(corpus_texts)
  assert all(ids[0] == vocab['bos'] for ids in ours)
  assert any(vocab['tokens'][i].startswith('<0x') for ids in ours for i in ids)  # byte fallback at work
  assert ours == hf_gguf_tokenizer(path)(corpus_texts)['input_ids']


def test_tokenizer_override_and_a_file_without_vocabulary(gguf_pair, tokenizer_dir, tmp_path, capsys):
  """--tokenizer=DIR replaces the file's own; a file without one says what to do."""
  src, _ = gguf_pair('qwen3')
  bare = fixtures_gguf.write_gguf(src, str(tmp_path / 'bare.gguf'))  # no vocabulary
  out = tmp_path / 'out'
  code, _, err = run_cli(capsys, 'measure', f'--model_path={bare}', f'--output_dir={out}', '--max_samples=2',
                         '--progress=false')
  assert_one_error(code, err, 'has no tokenizer.*--tokenizer')
  code, stdout, _ = run_cli(capsys, 'measure', f'--model_path={bare}', f'--tokenizer={tokenizer_dir}',
                            f'--output_dir={out}', '--max_samples=2', '--max_seq_len=32', '--dtype=float32',
                            '--progress=false')
  assert code == 0 and 'global max activation' in stdout
  doc = json.loads((out / 'json' / 'bare_activation_stats.json').read_text())
  assert doc['run']['tokenizer'] == tokenizer_dir


# -- conversion, run.weights, the upcast warning -----------------------------


def test_convert_gguf_to_orbax_carries_identity_and_weights(gguf_pair, ids_corpus, tmp_path, capsys):
  src, path = gguf_pair('llama', qtype='Q8_0')
  out = tmp_path / 'orbax'
  code, stdout, _ = run_cli(capsys, 'convert', f'--model_path={path}', f'--output_dir={out}')
  assert code == 0 and 'of gguf: 23 Q8_0, 7 F32' in stdout
  assert sorted(os.listdir(out)) == ['config.json', 'maxact_checkpoint.json', 'params', 'tokenizer.json']
  meta = json.loads((out / 'maxact_checkpoint.json').read_text())
  ident = gguf_file.open_file(path).identity()
  assert meta['source']['files'] == [{'name': os.path.basename(path), 'bytes': os.path.getsize(path),
                                      'header_sha256': ident['header_sha256']}]
  assert meta['weights']['source']['quant_types'] == {'Q8_0': 23, 'F32': 7}
  assert load_config(str(out)) == load_config(path)
  # Stored in bfloat16 (convert's default): a float32 run says so and records it.
  m = measure.measure(measure.MeasureOptions(model_path=str(out), output_dir=str(tmp_path / 'm'),
                                             data_path=ids_corpus, dtype='float32', progress=False))
  err = capsys.readouterr().err
  assert 'warning: the weights of' in err and 'stored in bfloat16; --dtype=float32' in err
  weights = m.doc['run']['weights']
  assert weights['format'] == 'orbax' and weights['stored_dtype'] == 'bfloat16'
  assert weights['source'] == {'format': 'gguf', 'file': os.path.basename(path),
                               'quant_types': {'Q8_0': 23, 'F32': 7}, 'stored_dtype': 'float32'}
  # The crosscheck of the converted directory goes back to its GGUF source.
  assert crosscheck.reference_checkpoint(str(out)) == meta['source']['path']


def test_no_warning_when_the_dtype_is_not_wider(gguf_pair, capsys):
  _, path = gguf_pair('qwen3')
  measure_step.load_params(path, load_config(path), 'float32')
  assert 'warning' not in capsys.readouterr().err


# -- every command reads a GGUF checkpoint ------------------------------------


def test_every_command_reads_a_gguf_file(gguf_pair, ids_corpus, tmp_path, capsys):
  _, path = gguf_pair('qwen3')
  out = tmp_path / 'out'
  common = [f'--model_path={path}', f'--output_dir={out}']
  for command, extra in (
      ('measure', ['--max_samples=8', '--max_seq_len=48', '--dtype=float32', '--progress=false']),
      ('anatomy', ['--surface_tokens=16']),
      ('intervene', [f'--data_path={ids_corpus}', '--channels=1:3', '--controls=0', '--dtype=float32']),
      ('quant', [f'--data_path={ids_corpus}', '--calibration_samples=4', '--eval_samples=4', '--progress=false']),
  ):
    code, stdout, err = run_cli(capsys, command, *common, *extra)
    assert code == 0, (command, err)
  code, stdout, _ = run_cli(capsys, 'plan', f'--model_path={path}', '--json')
  assert code == 0 and json.loads(stdout)['model_name'] == 'qwen3-F32'
  flagfile = tmp_path / 'm.flags'
  flagfile.write_text(f'--model_path={os.path.basename(path)}\n--max_samples=2\n--max_seq_len=16\n')
  code, stdout, err = run_cli(capsys, 'sweep', f'--configs={flagfile}', f'--root={os.path.dirname(path)}',
                              f'--output_dir={tmp_path / "sweep"}', '--dry_run')
  assert code == 0, err
  names = sorted(os.listdir(out / 'json'))
  assert 'qwen3-F32_activation_stats.json' in names and 'qwen3-F32_intervention.json' in names
  assert 'qwen3-F32_quant_sanity.json' in names
  for suffix in ('activation_stats', 'intervention', 'quant_sanity'):  # each result says what the weights were
    doc = json.loads((out / 'json' / f'qwen3-F32_{suffix}.json').read_text())
    assert doc['run']['weights']['format'] == 'gguf', suffix


# -- bad GGUF input: one error line, exit 2, nothing written ------------------


def _patch(path: str, out: str, offset: int, blob: bytes) -> str:
  raw = bytearray(open(path, 'rb').read())
  raw[offset:offset + len(blob)] = blob
  with open(out, 'wb') as f:
    f.write(raw)
  return out


def _tensor_type_offset(path: str, name: str) -> int:
  """Where the GGML type of tensor `name` sits in the tensor table: after its name, its
  dimension count and dimensions."""
  raw = open(path, 'rb').read()
  at = raw.index(struct.pack('<Q', len(name)) + name.encode()) + 8 + len(name)
  (n_dims,) = struct.unpack('<I', raw[at:at + 4])
  return at + 4 + 8 * n_dims


def _rewrite(path: str, out: str, **changes) -> str:
  """The file again, with metadata keys changed (None: removed) or added."""
  reader = gguf.GGUFReader(path)
  arch = reader.fields['general.architecture'].contents()
  writer = gguf.GGUFWriter(out, changes.pop('architecture', arch))
  for key, field in reader.fields.items():
    if key.startswith('GGUF.') or key == 'general.architecture':
      continue
    new = changes.pop(key, field.contents())
    if new is None:
      continue
    kind = field.types[0]
    sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(key, new, kind, sub_type=sub)
  for key, value in changes.items():
    writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
  for t in reader.tensors:
    writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return out


@pytest.fixture
def bad_gguf(gguf_pair, tmp_path) -> dict[str, tuple[str, str]]:
  """(file, expected message) for each kind of bad GGUF input."""
  _, good = gguf_pair('qwen3')
  size = os.path.getsize(good)
  data_offset = gguf_file.open_file(good).data_offset
  cases = {}
  cases['wrong magic'] = (_patch(good, str(tmp_path / 'magic.gguf'), 0, b'GGUX'), 'is not a GGUF file')
  head = tmp_path / 'header.gguf'
  head.write_bytes(open(good, 'rb').read()[:data_offset // 2])
  cases['truncated header'] = (str(head), 'truncated or corrupt: its header runs past the end')
  tail = tmp_path / 'tail.gguf'
  tail.write_bytes(open(good, 'rb').read()[:size - 100])
  cases['tensor past the end'] = (str(tail), 'truncated or corrupt: the data of a tensor runs past the end')
  offset = _tensor_type_offset(good, 'blk.1.ffn_up.weight')
  cases['unknown quant type'] = (_patch(good, str(tmp_path / 'qtype.gguf'), offset, struct.pack('<I', 99)),
                                 'unknown GGML quantization type 99')
  q81 = tmp_path / 'q81.gguf'
  w = gguf.GGUFWriter(str(q81), 'qwen3')
  w.add_tensor('token_embd.weight', np.zeros((4, 40), np.uint8),  # 4 rows of one 32-value Q8_1 block
               raw_dtype=gguf.GGMLQuantizationType.Q8_1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  cases['unsupported quant type'] = (str(q81), 'token_embd.weight has quantization type Q8_1.*cannot dequantize')
  cases['unknown architecture'] = (_rewrite(good, str(tmp_path / 'arch.gguf'), architecture='phi3'),
                                   "architecture 'phi3' is not supported")
  cases['block count contradicts tensors'] = (
      _rewrite(good, str(tmp_path / 'blocks.gguf'), **{'qwen3.block_count': 5}),
      'block_count = 5 contradicts the tensors, which hold 3 blocks')
  cases['head count contradicts tensors'] = (
      _rewrite(good, str(tmp_path / 'heads.gguf'), **{'qwen3.attention.head_count': 8}),
      r'implies blk.0.attn_q.weight of shape \(128, 64\), the tensor has \(64, 64\)')
  cases['width contradicts tensors'] = (
      _rewrite(good, str(tmp_path / 'width.gguf'), **{'qwen3.embedding_length': 96}),
      'embedding_length = 96 contradicts token_embd.weight')
  cases['part of a split file'] = (_rewrite(good, str(tmp_path / 'split.gguf'), **{'split.count': 3}),
                                   r'part 1 of a GGUF split into 3 files; merge them')
  cases['unknown metadata key'] = (
      _rewrite(good, str(tmp_path / 'key.gguf'), **{'qwen3.expert_count': 8}),
      r'unknown GGUF metadata key\(s\) qwen3.expert_count')
  return cases


def test_bad_gguf_files(bad_gguf, ids_corpus, capsys, tmp_path):
  out = tmp_path / 'out'
  for name, (path, pattern) in bad_gguf.items():
    code, _, err = run_cli(capsys, 'measure', f'--model_path={path}', f'--data_path={ids_corpus}',
                           f'--output_dir={out}', '--progress=false')
    assert_one_error(code, err, pattern)
    written = os.listdir(out / 'json') if (out / 'json').exists() else []
    assert written == [], (name, written)
  # convert writes nothing either
  code, _, err = run_cli(capsys, 'convert', f'--model_path={bad_gguf["tensor past the end"][0]}',
                         f'--output_dir={tmp_path / "conv"}')
  assert_one_error(code, err, 'truncated or corrupt')
  assert not os.path.exists(tmp_path / 'conv') and not os.path.exists(str(tmp_path / 'conv') + '.partial')


# -- the config whitelist: generic fields -------------------------------------


def test_generic_pretrained_config_fields_are_accepted_and_others_refused(checkpoint):
  with open(os.path.join(checkpoint('llama'), 'config.json')) as f:
    raw = json.load(f)
  base = parse_config(raw)
  generic = {'_model_name_or_path': 'SmolLM2', 'unk_token_id': 0, '_commit_hash': 'abc', 'num_labels': 2,
             'mask_token_id': 3, 'experts_implementation': None}
  assert parse_config({**raw, **generic}) == base
  with pytest.raises(UserError, match='unknown config field.*use_parallel_residual'):
    parse_config({**raw, **generic, 'use_parallel_residual': True})
