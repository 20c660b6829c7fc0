"""Fake quantization: the number formats and scales every quantizing command shares.

- `Format`: a symmetric target, INT<bits> (scale = threshold / (2^(bits-1) - 1),
  round half to even) or FP8 e4m3 (scale = threshold / 448, a saturating cast
  that rounds to nearest even), with `quant`'s (the reference's) arithmetic;
- the reference's clip threshold: the q-quantile of |x| read off a linear
  histogram over [0, max |x|] (`linear_bins`, `linear_hist_quantile`);
- scales as deployments choose them (`qeval`): activations per token, per
  tensor (dynamic) or with a calibrated static threshold; weights per output
  channel, per matrix or per group of input channels; and the 16-bit "format",
  a round trip through bfloat16.

Pure array arithmetic (jax.numpy on device, numpy on the host): no model, no pass.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BF16 = 'bf16'
NONE = 'none'
ACT_SCALES = ('token', 'tensor', 'static')
WEIGHT_SCALES = ('channel', 'tensor', 'group')

# Float formats whose largest finite value an activation must stay under.
FLOAT_LIMITS = {
    'fp8_e4m3': float(jnp.finfo(jnp.float8_e4m3fn).max),  # 448
    'fp16': float(jnp.finfo(jnp.float16).max),  # 65504
    'bf16': float(jnp.finfo(jnp.bfloat16).max),  # 3.39e38
}


@dataclasses.dataclass(frozen=True)
class Format:
  """A symmetric fake-quantization target: INT<bits> or FP8 e4m3."""

  name: str
  kind: str  # 'int' or 'fp8'
  qmax: float  # the largest code: 2^(bits-1) - 1, or 448

  def quantize(self, x: Array, threshold: Array, scale: Array) -> Array:
    """Fake-quantize x (float32) with a threshold and scale broadcastable to it.

    Where the threshold is not positive the result is 0 (the reference skips
    such a per-tensor policy; per-channel and per-token scales map it to 0).
    """
    # Parity with the reference: clamp to the threshold, divide by the scale,
    # round half to even (torch.round == jnp.round), clamp the codes, multiply
    # back, all in float32.
    y = jnp.clip(x, -threshold, threshold) / scale
    if self.kind == 'int':
      q = jnp.clip(jnp.round(y), -self.qmax, self.qmax)
    else:
      q = jnp.clip(y, -self.qmax, self.qmax).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return jnp.where(threshold > 0, q * scale, 0.0)


def int_format(bits: int) -> Format:
  return Format(f'int{bits}', 'int', float(2 ** (bits - 1) - 1))


FP8_E4M3 = Format('fp8_e4m3', 'fp8', FLOAT_LIMITS['fp8_e4m3'])



def policy_name(policy: str, clip_quantile: float) -> str:
  """'max_abs', 'clip_q0.999' (the reference's name) or 'clip_q0.999_loghist'."""
  if policy == 'clip':
    return f'clip_q{clip_quantile:g}'
  if policy == 'clip_loghist':
    return f'clip_q{clip_quantile:g}_loghist'
  return policy



def linear_hist_quantile(hist: np.ndarray, upper: float, q: float) -> float:
  """The reference's clip threshold: the lower edge of the bin holding the
  ceil(q * n)-th smallest |x|, in a histogram of len(hist) bins over [0, upper]."""
  total = int(hist.sum())
  if total == 0:
    return 0.0
  target = max(1, math.ceil(q * total))
  idx = int(np.searchsorted(np.cumsum(hist), target, side='left'))
  return upper * idx / max(1, len(hist) - 1)



def linear_bins(a: Array, upper: Array, bins: int) -> Array:
  """The reference's bin of each |x| in a linear histogram over [0, upper]: int32, same shape."""
  # Parity with the reference: (|x| / upper) * (bins - 1) in float32, floored, clamped.
  return jnp.clip(jnp.floor(a / upper * (bins - 1)), 0, bins - 1).astype(jnp.int32)



@dataclasses.dataclass(frozen=True)
class ActSpec:
  """How the input of a linear layer is fake-quantized."""

  fmt: str  # 'int<b>', 'fp8_e4m3', 'bf16' or 'none'
  scale: str = 'token'  # ACT_SCALES
  clip: float | None = None  # static only: the calibrated |x| quantile (None: max |x|)

  @property
  def static(self) -> bool:
    return self.scale == 'static'


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """How the weight of a linear layer is fake-quantized (round to nearest)."""

  fmt: str
  scale: str = 'channel'  # WEIGHT_SCALES
  group: int | None = None



# ---------------------------------------------------------------------------
# Scales as deployments choose them.


def format_of(fmt: str) -> Format | None:
  """The `Format` behind a format name (None for bf16 and none)."""
  if fmt == FP8_E4M3.name:
    return FP8_E4M3
  if fmt.startswith('int'):
    return int_format(int(fmt[3:]))
  return None


def format_bits(fmt: str) -> int | None:
  """INT<bits> -> bits; None for the float formats."""
  return int(fmt[3:]) if fmt.startswith('int') else None


def cast_bf16(x: Array) -> Array:
  """The 16-bit "format": round to bfloat16 and back (exact in a bfloat16 run)."""
  return x.astype(jnp.bfloat16).astype(x.dtype)


def fake_quant(x32: Array, fmt: Format, threshold: Array) -> Array:
  """Symmetric fake quantization of float32 x with a threshold broadcastable to it."""
  return fmt.quantize(x32, threshold, threshold / fmt.qmax)


def act_threshold(a: Array, mask: Array, spec: ActSpec, static: Array | None) -> Array:
  """The threshold each element of |x| (float32 [..., F]) is scaled with: per token
  ([..., 1], max over the last axis), per tensor (the max over the masked rows), or
  the static one. `mask` [..., 1] marks the real rows (padding does not count)."""
  if spec.scale == 'token':
    return a.max(axis=-1, keepdims=True)
  if spec.scale == 'tensor':
    return jnp.where(mask, a, 0.0).max()
  return static


def quantize_act(x: Array, spec: ActSpec, mask: Array, static: Array | None = None) -> tuple[Array, dict]:
  """Fake-quantize a linear layer's input x [..., F]; mask [...] or [..., 1] marks the real rows.

  Returns (x dequantized, in x's dtype; partial statistics over the masked rows:
  `count` elements, `max_abs`, `sum_ratio` = sum |x| / threshold (the levels the
  bulk keeps), `clipped` (|x| > threshold), `sum_threshold` and `groups` (the
  mean threshold of the scales used)).
  """
  x32 = x.astype(jnp.float32)
  a = jnp.abs(x32)
  m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape[:-1] + (1,))
  full = jnp.broadcast_to(m, x.shape)
  out = {'count': full.sum(dtype=jnp.int32), 'max_abs': jnp.where(full, a, 0.0).max()}
  fmt = format_of(spec.fmt)
  if fmt is None:
    return (cast_bf16(x) if spec.fmt == BF16 else x), out
  t = act_threshold(a, m, spec, static)
  q = fake_quant(x32, fmt, t).astype(x.dtype)
  t_full = jnp.broadcast_to(t, x.shape)
  ratio = jnp.where(full & (t_full > 0), a / jnp.where(t_full > 0, t_full, 1.0), 0.0)
  out.update(sum_ratio=ratio.sum(), clipped=(full & (a > t_full)).sum(dtype=jnp.int32))
  if spec.scale == 'token':
    out.update(sum_threshold=jnp.where(m, t, 0.0).sum(), groups=m.sum(dtype=jnp.int32))
  else:
    out.update(sum_threshold=jnp.asarray(t, jnp.float32), groups=jnp.ones((), jnp.int32))
  return q, out


def weight_threshold(a: Array, spec: WeightSpec) -> Array:
  """Thresholds of |W| [..., in, out]: per output channel [..., 1, out], per tensor [..., 1, 1],
  or per group of `spec.group` input channels [..., in, out] (each element gets its group's)."""
  if spec.scale == 'channel':
    return a.max(axis=-2, keepdims=True)
  if spec.scale == 'tensor':
    return a.max(axis=(-2, -1), keepdims=True)
  g = spec.group
  n_in = a.shape[-2]
  pad = -n_in % g  # a last, shorter group: zeros never raise a max
  ap = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)])
  t = ap.reshape(a.shape[:-2] + ((n_in + pad) // g, g, a.shape[-1])).max(axis=-2, keepdims=True)
  t = jnp.broadcast_to(t, a.shape[:-2] + ((n_in + pad) // g, g, a.shape[-1]))
  return t.reshape(a.shape[:-2] + (n_in + pad, a.shape[-1]))[..., :n_in, :]


def quantize_weight(w: Array, spec: WeightSpec) -> Array:
  """Fake-quantize a kernel [..., in, out] (round to nearest), in its own dtype."""
  fmt = format_of(spec.fmt)
  if fmt is None:
    return cast_bf16(w) if spec.fmt == BF16 else w
  w32 = w.astype(jnp.float32)
  return fake_quant(w32, fmt, weight_threshold(jnp.abs(w32), spec)).astype(w.dtype)


def on_grid(values: np.ndarray, scale: np.ndarray, fmt: str, tol: float = 1e-4) -> bool:
  """Whether dequantized values lie on a format's grid: value / scale an integer code in
  [-qmax, qmax] (INT), or a finite e4m3 number (FP8)."""
  f = format_of(fmt)
  codes = np.asarray(values, np.float64) / np.where(scale > 0, scale, 1.0)
  if f.kind == 'int':
    return bool(np.all(np.abs(codes - np.round(codes)) <= tol) and np.all(np.abs(codes) <= f.qmax + tol))
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency; only this check needs it)
  c32 = codes.astype(np.float32)
  back = c32.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return bool(np.all(np.abs(back - c32) <= tol * np.maximum(1.0, np.abs(c32))) and np.all(np.abs(c32) <= f.qmax * (1 + tol)))
