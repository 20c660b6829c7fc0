"""The reference pipeline's semantics in PyTorch: hooks on transformers modules.

Two uses: `crosscheck` compares raw tap outputs between this side and the
JAX side, and the tests and benchmark run `ReferenceStats`, an independent
PyTorch implementation of the paper pipeline's statistics (its per-sample
loops, torch.median's lower median, torch.topk, its histogram arithmetic and
its hook placement), to check our numbers against and to time against.

Hooks sit where the reference puts them: the backbone's embedding module, each
decoder layer's output, its attention module (`self_attn`, `attention` or
`linear_attn`), its MLP (or MoE block, whose tuple output also yields router
logits) and the MLP's `gate_proj` or the MoE's router (`gate` or `router`),
and the final norm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable

import numpy as np
import torch

from maxact_jax import gguf_file, stats
from maxact_jax.config import read_config_json
from maxact_jax.errors import UserError

TapCallback = Callable[[str, torch.Tensor], None]


def text_backbone(model: torch.nn.Module) -> torch.nn.Module:
  """The module holding `.layers`, through CausalLM and multimodal wrappers."""
  base = getattr(model, 'model', model)
  if hasattr(base, 'layers'):
    return base
  lang = getattr(base, 'language_model', None)
  if lang is not None:
    inner = getattr(lang, 'model', lang)
    if hasattr(inner, 'layers'):
      return inner
    if hasattr(lang, 'layers'):
      return lang
  return base


def _is_moe(mlp: torch.nn.Module) -> bool:
  name = type(mlp).__name__
  return 'SparseMoe' in name or 'MoeBlock' in name or hasattr(mlp, 'experts')


def _first(out):
  return out[0] if isinstance(out, tuple) else out


def router_output(out, prefer_logits: bool):
  """The router hook's tensor: its first output, as the reference takes it.

  Ling's remote-code gate returns (topk_idx, topk_weight, logits), so the
  reference's moe_gate for bailing_moe holds expert *indices*. With
  `prefer_logits` (crosscheck), an integer first output is replaced by the
  router's logits (its widest floating output), which is what our moe_gate holds.
  """
  first = _first(out)
  if prefer_logits and isinstance(out, tuple) and torch.is_tensor(first) and not first.is_floating_point():
    floats = [t for t in out if torch.is_tensor(t) and t.is_floating_point()]
    if floats:
      return max(floats, key=lambda t: t.shape[-1])
  return first


def register_taps(model: torch.nn.Module, callback: TapCallback, router_logits: bool = False) -> list:
  """Forward hooks that call `callback(tap_name, tensor)`; returns the handles.

  router_logits: take a router's logits where its first output is integer
  (see `router_output`); False reproduces the reference exactly.
  """
  base = text_backbone(model)
  handles = []

  def hook(module, fn):
    handles.append(module.register_forward_hook(lambda m, i, o: fn(o)))

  embed = getattr(base, 'embed_tokens', None) or getattr(base, 'word_embeddings', None)
  if embed is not None:
    hook(embed, lambda o: callback('embedding_output', o))
  for i, layer in enumerate(getattr(base, 'layers', [])):
    hook(layer, lambda o, i=i: callback(f'layer_{i}_hidden', _first(o)))
    attn = getattr(layer, 'self_attn', None) or getattr(layer, 'attention', None) or getattr(layer, 'linear_attn', None)
    if attn is not None:
      hook(attn, lambda o, i=i: callback(f'layer_{i}_attn_output', _first(o)))
    mlp = getattr(layer, 'mlp', None)
    if mlp is None:
      continue
    if _is_moe(mlp):
      def moe_out(o, i=i):
        if isinstance(o, tuple) and len(o) >= 2:
          callback(f'layer_{i}_mlp_output', o[0])
          callback(f'layer_{i}_router_logits', _first(o[1]))
        else:
          callback(f'layer_{i}_mlp_output', _first(o))
      hook(mlp, moe_out)
      router = getattr(mlp, 'gate', None) or getattr(mlp, 'router', None)
      if router is not None:
        hook(router, lambda o, i=i: callback(f'layer_{i}_moe_gate', router_output(o, router_logits)))
    else:
      hook(mlp, lambda o, i=i: callback(f'layer_{i}_mlp_output', o))
      if hasattr(mlp, 'gate_proj'):
        hook(mlp.gate_proj, lambda o, i=i: callback(f'layer_{i}_mlp_gate', o))
  if hasattr(base, 'norm'):
    hook(base.norm, lambda o: callback('final_layernorm', o))
  return handles


def remove(handles: list) -> None:
  for h in handles:
    h.remove()


# ---------------------------------------------------------------------------
# The reference statistics, in PyTorch, sample by sample.


class ReferenceStats:
  """Per-tap running statistics with the reference's arithmetic.

  `set_mask` before each batch; `update(name, tensor)` from the hooks;
  `finalize()` gives {tap: fields} like the reference's summary.
  """

  def __init__(self, top_k: int = stats.TOP_K):
    self.k = top_k
    self.basic: dict[str, dict[str, Any]] = {}
    self.sun: dict[str, dict[str, Any]] = {}
    self.top_abs: dict[str, torch.Tensor] = {}
    self.top_signed: dict[str, torch.Tensor] = {}
    self.mask: torch.Tensor | None = None

  def set_mask(self, mask: torch.Tensor) -> None:
    self.mask = mask.bool()

  def _basic(self, name):
    if name not in self.basic:
      self.basic[name] = {'sum': 0.0, 'sum_sq': 0.0, 'abs_sum': 0.0, 'max': -math.inf, 'min': math.inf, 'count': 0}
    return self.basic[name]

  def _sun_state(self, name):
    if name not in self.sun:
      self.sun[name] = {'peak_abs': 0.0, 'peak_median': 0.0, 'max_ratio': 0.0, 'max_ratio_abs': 0.0,
                        'max_ratio_median': 0.0, 'n_tokens': 0, 'n_pass': 0, 'sum_ratio': 0.0,
                        'sum_ratio_sq': 0.0, 'hist': torch.zeros(stats.HIST_BINS, dtype=torch.int64),
                        'zero': 0, 'total': 0}
    return self.sun[name]

  def update(self, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    mask = self.mask
    eligible = stats.is_activation_tap(name)
    if mask is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
      flat = t.float().reshape(-1)
      if flat.numel() == 0:
        return
      s = self._basic(name)
      s['sum'] += float(flat.sum().double())
      s['sum_sq'] += float((flat * flat).sum().double())
      s['abs_sum'] += float(flat.abs().sum().double())
      s['max'] = max(s['max'], float(flat.max()))
      s['min'] = min(s['min'], float(flat.min()))
      s['count'] += flat.numel()
      return
    if t.dim() == 3 and eligible:
      self._update_sun(name, t, mask)
    for b in range(t.shape[0]):
      valid = mask[b]
      if not valid.any():
        continue
      x = t[b].float()
      m = valid.reshape(-1, *([1] * (x.dim() - 1)))
      masked = x * m.float()
      s = self._basic(name)
      s['sum'] += float(masked.sum().double())
      s['sum_sq'] += float((masked * masked).sum().double())
      s['abs_sum'] += float(masked.abs().sum().double())
      s['max'] = max(s['max'], float(x.where(m, torch.tensor(-math.inf)).max()))
      s['min'] = min(s['min'], float(x.where(m, torch.tensor(math.inf)).min()))
      s['count'] += int(valid.sum()) * int(np.prod(x.shape[1:]))
      if x.dim() == 2 and eligible:
        scores = torch.where(m, x.abs(), torch.tensor(-1.0)).reshape(-1)
        k = min(self.k, scores.numel())
        vals, idx = scores.topk(k)
        signed = x.reshape(-1).gather(0, idx)
        if name not in self.top_abs:
          self.top_abs[name] = torch.zeros(self.k)
          self.top_signed[name] = torch.zeros(self.k)
        all_abs = torch.cat([self.top_abs[name], vals])
        all_signed = torch.cat([self.top_signed[name], signed])
        _, keep = all_abs.topk(min(self.k, all_abs.numel()))
        self.top_abs[name] = all_abs[keep]
        self.top_signed[name] = all_signed[keep]

  def _update_sun(self, name, t, mask):
    if t.shape[-1] < 2:
      return
    s = self._sun_state(name)
    for b in range(t.shape[0]):
      valid = mask[b]
      if not valid.any():
        continue
      a = t[b].float().abs()
      tok_max = a.amax(dim=-1)
      tok_med = a.median(dim=-1).values  # the lower middle value for even sizes
      ratio = tok_max / tok_med.clamp_min(torch.finfo(torch.float32).tiny)
      v_max, v_med, v_ratio = tok_max[valid], tok_med[valid], ratio[valid]
      i = int(v_max.argmax())
      if float(v_max[i]) > s['peak_abs']:
        s['peak_abs'], s['peak_median'] = float(v_max[i]), float(v_med[i])
      j = int(v_ratio.argmax())
      if float(v_ratio[j]) > s['max_ratio']:
        s['max_ratio'], s['max_ratio_abs'], s['max_ratio_median'] = float(v_ratio[j]), float(v_max[j]), float(v_med[j])
      s['n_tokens'] += int(v_max.numel())
      s['n_pass'] += int(((v_max > stats.SUN_T_VAL) & (v_ratio > stats.SUN_T_RATIO)).sum())
      r64 = v_ratio.double()
      s['sum_ratio'] += float(r64.sum())
      s['sum_ratio_sq'] += float((r64 * r64).sum())
      flat = a[valid].reshape(-1)
      zero = flat <= 0.0
      nonzero = flat[~zero]
      if nonzero.numel():
        span = stats.HIST_LOG_MAX - stats.HIST_LOG_MIN
        idx = ((torch.log10(nonzero) - stats.HIST_LOG_MIN) / span * stats.HIST_BINS).floor().long()
        s['hist'].scatter_add_(0, idx.clamp(0, stats.HIST_BINS - 1), torch.ones_like(idx))
      s['zero'] += int(zero.sum())
      s['total'] += int(flat.numel())

  def finalize(self) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, s in self.basic.items():
      n = s['count']
      if not n:
        continue
      mean, mean_sq = s['sum'] / n, s['sum_sq'] / n
      out[name] = {'mean': mean, 'std': max(0.0, mean_sq - mean**2) ** 0.5, 'abs_mean': s['abs_sum'] / n,
                   'rms': mean_sq**0.5, 'max': s['max'], 'min': s['min'], 'count': n}
    for name, s in self.sun.items():
      e = out.setdefault(name, {})
      nt = s['n_tokens']
      mean_r = s['sum_ratio'] / nt if nt else 0.0
      std_r = max(0.0, s['sum_ratio_sq'] / nt - mean_r**2) ** 0.5 if nt else 0.0
      e.update({
          'sun_peak_abs': s['peak_abs'], 'sun_peak_token_median': s['peak_median'],
          'sun_peak_token_ratio': s['peak_abs'] / s['peak_median'] if s['peak_median'] > 0 else 0.0,
          'sun_max_ratio': s['max_ratio'], 'sun_max_ratio_abs': s['max_ratio_abs'],
          'sun_max_ratio_median': s['max_ratio_median'], 'sun_mean_ratio': mean_r, 'sun_std_ratio': std_r,
          'sun_n_tokens': nt, 'sun_n_pass': s['n_pass'], 'sun_t_val': stats.SUN_T_VAL,
          'sun_t_ratio': stats.SUN_T_RATIO,
      })
      if s['total']:
        state = stats.TapStats(full=True)
        state.hist, state.hist_zero, state.hist_count = s['hist'].numpy(), s['zero'], s['total']
        for q, key in ((0.5, 'abs_median'), (0.25, 'abs_q25'), (0.75, 'abs_q75'), (0.9, 'abs_q90'),
                       (0.99, 'abs_q99'), (0.999, 'abs_q999')):
          e[key] = state.quantile(q)
        e['abs_hist_count'] = s['total']
        e['abs_hist_zero_frac'] = s['zero'] / s['total']
    for name, abs_t in self.top_abs.items():
      e = out.setdefault(name, {})
      vals, signed = abs_t.tolist(), self.top_signed[name].tolist()
      e.update({'topk_abs': vals, 'topk_signed': signed, 'top_k': len(vals),
                'topk_abs_mean': sum(vals) / len(vals), 'topk_signed_mean': sum(signed) / len(signed)})
    return out

  def histograms(self) -> dict[str, np.ndarray]:
    return {name: s['hist'].numpy() for name, s in self.sun.items()}


def reference_batches(samples: list[list[int]], batch_size: int, pad_id: int = 0):
  """The reference's batching: sort by length (stable), chunk, pad on the right."""
  ordered = [s for _, s in sorted(enumerate(samples), key=lambda x: len(x[1]))]
  for i in range(0, len(ordered), batch_size):
    chunk = ordered[i:i + batch_size]
    width = max(len(s) for s in chunk)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], dtype=torch.long)
    yield ids, mask


def remote_code_modules(model_path: str) -> list[str]:
  """The Python modules a checkpoint's config.json `auto_map` names (remote code)."""
  try:
    with open(os.path.join(model_path, 'config.json'), encoding='utf-8') as f:
      auto_map = json.load(f).get('auto_map') or {}
  except (OSError, ValueError):
    return []
  refs = [v for v in auto_map.values() if isinstance(v, str)]
  return sorted({ref.split('--')[-1].rsplit('.', 1)[0] for ref in refs})


def has_remote_code(model_path: str) -> bool:
  """True when the checkpoint ships the modeling code its auto_map names (Ling 2.0 does)."""
  modules = remote_code_modules(model_path)
  return bool(modules) and all(os.path.isfile(os.path.join(model_path, m + '.py')) for m in modules)


def load_hf_model(model_path: str, dtype: str = 'float32', attn_implementation: str | None = 'eager'):
  """transformers' model of a checkpoint directory on the CPU, for comparison.

  A checkpoint that ships its own modeling code (config.json auto_map and the
  named .py files, as Ling 2.0's do) is loaded with it (trust_remote_code), as the
  reference pipeline does.
  """
  # Seconds to import; only loading a model needs it.
  import transformers  # pylint: disable=import-outside-toplevel

  kwargs: dict[str, Any] = {'dtype': getattr(torch, dtype)}
  if attn_implementation:
    kwargs['attn_implementation'] = attn_implementation
  gguf_path = gguf_file.find(model_path)
  if gguf_path:
    return load_hf_gguf(gguf_path, kwargs)
  if has_remote_code(model_path):
    kwargs['trust_remote_code'] = True
  else:
    model_type = read_config_json(model_path).get('model_type')
    if model_type not in transformers.CONFIG_MAPPING:
      raise UserError(f'{model_path}: transformers {transformers.__version__} has no {model_type!r} model and the '
                      'checkpoint ships no modeling code (config.json auto_map): nothing to compare against')
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
  except ValueError:
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
  return model.eval()


def load_hf_gguf(gguf_path: str, kwargs: dict[str, Any]):
  """transformers' own GGUF load (its config, its dequantization, its undoing of
  llama.cpp's changes): the reference a GGUF checkpoint is checked against."""
  import transformers  # pylint: disable=import-outside-toplevel

  folder, name = os.path.split(os.path.abspath(gguf_path))
  # Unpacked at load into a plain dense model in the asked dtype, as the paper's
  # pipeline runs a model: transformers otherwise keeps the weights in GGUF blocks and
  # computes every matmul in float32 (a bfloat16 run would be float32 products with
  # casts, and several times slower on the CPU).
  kwargs = dict(kwargs, quantization_config=transformers.GgufConfig(dequantize=True))
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
  except (ValueError, NotImplementedError) as e:
    raise UserError(f'{gguf_path}: transformers {transformers.__version__} cannot load this GGUF file '
                    f'({str(e).splitlines()[0]}): nothing to compare against') from None
  return model.eval()


def run_reference(model, samples: list[list[int]], batch_size: int = 8, pad_id: int = 0) -> dict[str, dict]:
  """The reference pipeline on `samples` (token id lists): hooks, base model, finalize."""
  acc = ReferenceStats()
  handles = register_taps(model, acc.update)
  base = text_backbone(model) if not hasattr(model, 'model') else model.model
  try:
    with torch.no_grad():
      for ids, mask in reference_batches(samples, batch_size, pad_id):
        acc.set_mask(mask)
        base(input_ids=ids, attention_mask=mask)
  finally:
    remove(handles)
  return acc.finalize()


# ---------------------------------------------------------------------------
# The reference pipeline end to end, as a process (`python -m maxact_jax.torch_reference`):
# what the benchmark times against, run the way the paper runs it.


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description='The reference pipeline (PyTorch): per-tap statistics.')
  parser.add_argument('--model_path', required=True)
  parser.add_argument('--data_path', required=True, help='jsonl with input_ids per line')
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--max_samples', type=int, default=2000)
  parser.add_argument('--max_seq_len', type=int, default=32768)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args(argv)
  samples = []
  with open(args.data_path) as f:
    for i, line in enumerate(f):
      if i >= args.max_samples:
        break
      samples.append(json.loads(line)['input_ids'][:args.max_seq_len])
  model = load_hf_model(args.model_path, args.dtype, attn_implementation=None)
  pad_id = getattr(model.config, 'pad_token_id', None) or 0
  summary = run_reference(model, samples, args.batch_size, pad_id)
  value, location = stats.global_max(summary)
  name = os.path.basename(os.path.normpath(args.model_path))
  os.makedirs(os.path.join(args.output_dir, 'json'), exist_ok=True)
  with open(os.path.join(args.output_dir, 'json', f'{name}_activation_stats.json'), 'w') as f:
    json.dump({'model_name': name, 'num_samples': len(samples), 'global_max_activation': value,
               'global_max_location': location, 'per_layer_stats': summary}, f)
  print(f'global max activation {value:.6g} at {location}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
