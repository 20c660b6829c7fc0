"""Cross-framework check: every tap of the Flax model against transformers (PyTorch).

The same checkpoint runs through transformers on the CPU with forward hooks at
the reference's taps and through the Flax model with the raw-capture
interceptor, on one sample batch. Per tap, over valid positions: the max-abs
error, the error relative to max(1, max|ref|), the cosine similarity and
whether the maximum sits at the same place. Logits: KL(ref || ours) and top-1
/ top-5 agreement. In float32 a tap passes when its max-abs error is at most
1e-4 * max(1, max|ref|) and its maximum is at the same place (or at a place
whose value ties within that tolerance); other dtypes are reported against
looser bounds. The first failing tap in forward order is where the bug is.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from converters import orbax_io
from maxact_jax import capture, data, gguf_file, measure_step, results
from maxact_jax.errors import UserError
from maxact_jax.families import load_config
from maxact_jax.models import transformer

# Relative tolerance per dtype: float32 is the contract; bf16/fp16 are reported.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 5e-2, 'float16': 1e-2}


@dataclasses.dataclass
class CrosscheckOptions:
  model_path: str
  data_path: str | None = None
  num_samples: int = 4
  max_seq_len: int = 64
  dtype: str = 'float32'
  output_dir: str | None = None
  tolerance: float | None = None
  tokenizer: str | None = None  # instead of the checkpoint's own


def sample_batch(opts: CrosscheckOptions, vocab_size: int) -> data.Batch:
  """The first `num_samples` samples of the corpus (or the built-in one), as one batch."""
  if opts.data_path:
    corpus = data.load_corpus(opts.data_path, vocab_size=vocab_size, max_samples=opts.num_samples,
                              max_seq_len=opts.max_seq_len, model_dir=opts.tokenizer or opts.model_path)
  else:
    corpus = data.load_builtin(data.Tokenizer(opts.tokenizer or opts.model_path), vocab_size=vocab_size,
                               num_samples=opts.num_samples, max_seq_len=opts.max_seq_len)
  group = np.arange(len(corpus.samples))
  return data.make_batch(corpus, group, int(corpus.lengths.max()), len(group))


def torch_taps(model, batch: data.Batch) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Raw tap outputs and logits from transformers, as float32 numpy."""
  # Optional PyTorch side; measuring never imports it.
  import torch  # pylint: disable=import-outside-toplevel

  # It imports torch (the optional PyTorch side).
  from maxact_jax import torch_reference  # pylint: disable=import-outside-toplevel

  taps: dict[str, np.ndarray] = {}

  def keep(name, t):
    taps.setdefault(name, t.detach().float().numpy().copy())

  handles = torch_reference.register_taps(model, keep, router_logits=True)
  try:
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                  attention_mask=torch.from_numpy(batch.valid.astype(np.int64)))
  finally:
    torch_reference.remove(handles)
  return taps, out.logits.float().numpy()


def jax_taps(model_path: str, batch: data.Batch, dtype: str, params=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Raw tap outputs and logits from the Flax model, as float32 numpy."""
  config = load_config(model_path)
  if params is None:
    params = measure_step.load_params(model_path, config, dtype)
  model = transformer.build(config, measure_step.DTYPES[dtype])

  @jax.jit
  def forward(p, ids, valid):
    with nn.intercept_methods(capture.interceptor(capture.raw_handler())):
      logits, sown = model.apply({'params': p}, ids, valid, logits=True, mutable=[capture.COLLECTION])
    return logits.astype(jnp.float32), sown[capture.COLLECTION]

  logits, sown = forward(params, jnp.asarray(batch.input_ids), jnp.asarray(batch.valid))
  return capture.collect(config, jax.device_get(sown)), np.asarray(logits)


def compare_tap(ours: np.ndarray, ref: np.ndarray, valid: np.ndarray, tol: float) -> dict[str, Any]:
  """Element-wise comparison over valid positions of a [B, T, ...] tap."""
  if ref.shape != ours.shape and ref.size == ours.size:
    ref = ref.reshape(ours.shape)  # e.g. router logits [B*T, E] vs [B, T, E]
  if ref.shape != ours.shape:
    return {'passed': False, 'error': f'shape {ours.shape} vs reference {ref.shape}'}
  m = valid.reshape(valid.shape + (1,) * (ref.ndim - 2))
  m = np.broadcast_to(m, ref.shape)
  a, r = ours[m].astype(np.float64), ref[m].astype(np.float64)
  ref_max = float(np.abs(r).max()) if r.size else 0.0
  err = float(np.abs(a - r).max()) if r.size else 0.0
  bound = tol * max(1.0, ref_max)
  denom = float(np.linalg.norm(a) * np.linalg.norm(r))
  cosine = float(a @ r / denom) if denom > 0 else 1.0
  i_ref, i_ours = int(np.argmax(r)), int(np.argmax(a))
  same_place = i_ref == i_ours or abs(a[i_ref] - a[i_ours]) <= bound
  return {
      'passed': bool(err <= bound and same_place),
      'max_abs_err': err,
      'rel_err': err / max(1.0, ref_max),
      'ref_max_abs': ref_max,
      'cosine': cosine,
      'argmax_same': i_ref == i_ours,
      'argmax_tie': i_ref != i_ours and same_place,
  }


def compare_logits(ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
  a, r = ours[valid].astype(np.float64), ref[valid].astype(np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  la, lr = log_softmax(a), log_softmax(r)
  kl = float((np.exp(lr) * (lr - la)).sum(-1).mean())
  top1 = float((a.argmax(-1) == r.argmax(-1)).mean())
  k = min(5, a.shape[-1])
  ta, tr = np.argsort(-a, -1)[:, :k], np.argsort(-r, -1)[:, :k]
  top5 = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tr)]))
  return {'kl': kl, 'top1_agreement': top1, 'top5_overlap': top5, 'max_abs_err': float(np.abs(a - r).max())}


def reference_checkpoint(model_path: str) -> str:
  """The Hugging Face directory transformers loads: a converted orbax directory's recorded
  source (so the check covers the conversion too), else the directory itself."""
  if not orbax_io.is_orbax_dir(model_path):
    return model_path
  source = orbax_io.read_metadata(model_path).get('source', {}).get('path', '')
  if not (os.path.isfile(os.path.join(source, 'config.json')) or gguf_file.find(source)):
    raise UserError(f'{model_path} is a converted orbax directory; transformers needs its source checkpoint, '
                    f'recorded as {source or "(none)"}, which is not there')
  return source


def crosscheck(opts: CrosscheckOptions, params=None, hf_model=None) -> dict[str, Any]:
  """Compare every tap; returns the report (also written to crosscheck.json)."""
  if opts.dtype not in TOLERANCE:
    raise UserError(f'--dtype={opts.dtype} is not supported (choose from {", ".join(TOLERANCE)})')
  if opts.num_samples < 1:
    raise UserError(f'--num_samples must be a positive integer, got {opts.num_samples}')
  config = load_config(opts.model_path)
  tol = opts.tolerance if opts.tolerance is not None else TOLERANCE[opts.dtype]
  batch = sample_batch(opts, config.vocab_size)
  if hf_model is None:
    # It imports torch (the optional PyTorch side).
    from maxact_jax import torch_reference  # pylint: disable=import-outside-toplevel

    hf_model = torch_reference.load_hf_model(reference_checkpoint(opts.model_path), opts.dtype)
  ref_taps, ref_logits = torch_taps(hf_model, batch)
  our_taps, our_logits = jax_taps(opts.model_path, batch, opts.dtype, params)
  rows, first_failure = {}, None
  for name, ours in our_taps.items():
    if name not in ref_taps:
      continue  # taps the reference does not have (extra capture) are not compared
    row = compare_tap(ours, ref_taps[name], batch.valid, tol)
    rows[name] = row
    if not row['passed'] and first_failure is None:
      first_failure = name
  # Taps of layers past the decoder stack: MTP layers some remote code runs inside
  # the base model (Ling 2.0); not part of the forward pass we measure.
  skipped = [name for name in ref_taps if name not in our_taps and past_stack(name, config.num_hidden_layers)]
  missing = [name for name in ref_taps if name not in our_taps and name not in skipped]
  logits = compare_logits(our_logits, ref_logits, batch.valid)
  passed = first_failure is None and not missing
  report = {
      'model_path': opts.model_path,
      'model_type': config.model_type,
      'dtype': opts.dtype,
      'tolerance': tol,
      'batch_shape': list(batch.input_ids.shape),
      'valid_tokens': batch.num_tokens,
      'passed': passed,
      'first_failure': first_failure or (missing[0] if missing else None),
      'missing_taps': missing,
      'skipped_taps': skipped,
      'taps': rows,
      'logits': logits,
  }
  if opts.output_dir:
    os.makedirs(opts.output_dir, exist_ok=True)
    results.atomic_write_json(os.path.join(opts.output_dir, 'crosscheck.json'), report)
  return report


def past_stack(name: str, num_layers: int) -> bool:
  """A `layer_{i}_...` tap with i beyond the decoder stack (an MTP layer, not measured)."""
  parts = name.split('_')
  return len(parts) > 2 and parts[0] == 'layer' and parts[1].isdigit() and int(parts[1]) >= num_layers


def format_report(report: dict[str, Any]) -> str:
  lines = [f'crosscheck {report["model_path"]} ({report["model_type"]}, {report["dtype"]}, batch '
           f'{report["batch_shape"]}, tolerance {report["tolerance"]:g} x max(1, max|ref|))',
           f'{"tap":<28} {"max|ref|":>11} {"max abs err":>12} {"rel err":>10} {"cosine":>10}  argmax  ok']
  for name, r in report['taps'].items():
    if 'error' in r:
      lines.append(f'{name:<28} {r["error"]}')
      continue
    where = 'same' if r['argmax_same'] else ('tie' if r['argmax_tie'] else 'DIFF')
    lines.append(f'{name:<28} {r["ref_max_abs"]:>11.4g} {r["max_abs_err"]:>12.3g} {r["rel_err"]:>10.3g} '
                 f'{r["cosine"]:>10.7f}  {where:<6}  {"ok" if r["passed"] else "FAIL"}')
  lg = report['logits']
  lines.append(f'logits: KL {lg["kl"]:.3g}, top-1 agreement {lg["top1_agreement"]:.3f}, '
               f'top-5 overlap {lg["top5_overlap"]:.3f}, max abs err {lg["max_abs_err"]:.3g}')
  if report.get('skipped_taps'):
    lines.append(f'not compared (MTP layers past the decoder stack): {", ".join(report["skipped_taps"])}')
  if report['missing_taps']:
    lines.append(f'taps missing on the JAX side: {", ".join(report["missing_taps"])}')
  if report['passed']:
    lines.append(f'PASS: all {len(report["taps"])} taps within tolerance')
  else:
    lines.append(f'FAIL: first diverging tap in forward order: {report["first_failure"]}')
  return '\n'.join(lines)
