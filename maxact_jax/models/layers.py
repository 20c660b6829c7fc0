"""Shared building blocks: RMSNorm, rotary embeddings, attention, gated MLP.

Submodules are named after the Hugging Face PyTorch modules (`q_proj`,
`input_layernorm`, `mlp.gate_proj`) so that weight maps read one to one and
taps carry the names the reference hooks use.

Shapes: B batch, T query positions, S key positions, D hidden, H query heads,
K key/value heads, G = H // K query heads per key/value head, h head_dim.
Numerical parity choices with transformers are noted where they are made.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax.config import ModelConfig, RopeConfig

Array = jax.Array
DType = Any


# ---------------------------------------------------------------------------
# Matmuls: one policy for every product of the model (`precision_for`,
# `accumulation_for`), applied by `einsum`, `matmul` and `Linear`.


def precision_for(dtype: DType):
  """float32 runs ask for full-precision matmuls on every backend (TPUs default to
  bf16 passes, GPUs to TF32, either of which misses the float32 contract's 1e-4).
  16-bit runs take the backend's default: their operands are already 16-bit."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def accumulation_for(dtype: DType):
  """The result type a product of `dtype` operands is asked for: float32 for 16-bit
  floats (then rounded once to `dtype`, where torch's bf16/fp16 matmul rounds), None
  (the operands' type) otherwise.

  Same numbers as a 16-bit result (every backend accumulates 16-bit products in
  float32 and rounds once), but a faster program on the CPU: XLA:CPU computes a dot
  with a bf16 *result* by converting both operands to float32 (the weights too, at
  every call) and running its float32 kernel, whereas a float32 result lets it hand
  the bf16 operands to its native bf16 kernel (YNNPACK's, avx512_bf16 where the CPU
  has it; measured in the README's Performance section).
  """
  return jnp.float32 if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else None


def einsum(spec: str, a: Array, b: Array, dtype: DType) -> Array:
  """jnp.einsum of two `dtype` operands under the matmul policy, result in `dtype`."""
  out = jnp.einsum(spec, a, b, precision=precision_for(dtype), preferred_element_type=accumulation_for(dtype))
  return out.astype(dtype)


def matmul(a: Array, b: Array, dtype: DType, bias: Array | None = None) -> Array:
  """a [..., K] @ b [K, N] (+ bias [N]) under the matmul policy, result in `dtype`.

  The bias joins the float32 accumulator before the one rounding (torch's addmm,
  which F.linear with a bias is on the CPU).
  """
  acc = accumulation_for(dtype)
  out = jnp.matmul(a, b, precision=precision_for(dtype), preferred_element_type=acc)
  if bias is not None:
    out = out + bias.astype(out.dtype)
  return out.astype(dtype)


def _linear_params(module: nn.Module, in_features: int, features: int, dtype: DType,
                   use_bias: bool) -> tuple[Array, Array | None]:
  # The names, shapes and initialisers of flax's nn.Dense.
  kernel = module.param('kernel', nn.initializers.lecun_normal(), (in_features, features), dtype)
  bias = module.param('bias', nn.initializers.zeros, (features,), dtype) if use_bias else None
  return kernel, bias


class Linear(nn.Dense):
  """flax's nn.Dense (its fields, parameter names and initialisers: code that finds
  the model's Linears by `isinstance(m, nn.Dense)` finds these) applied by `matmul`:
  the product asked for a float32 result of 16-bit operands, the bias added before
  the one rounding to `dtype` (torch's F.linear)."""

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel, bias = _linear_params(self, inputs.shape[-1], self.features, self.param_dtype, self.use_bias)
    return matmul(inputs.astype(self.dtype), kernel.astype(self.dtype), self.dtype, bias)


def dense(features: int, name: str, *, dtype: DType, use_bias: bool = False) -> Linear:
  """A Linear with the HF name; kernel is [in, out] (the transpose of HF's weight)."""
  return Linear(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, precision=precision_for(dtype),
                name=name)


class Probe(nn.Module):
  """An identity module: a named point where the capture interceptor sees a value."""

  @nn.compact
  def __call__(self, x):
    return x


class DenseParams(nn.Module):
  """The parameters of a `dense` Linear (same names and shapes), without applying it:
  several projections of one input are then one matmul (`fused_dense`)."""

  features: int
  dtype: DType
  use_bias: bool = False

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array | None]:
    return _linear_params(self, in_features, self.features, self.dtype, self.use_bias)


def fused_dense(x: Array, projections: list[tuple[str, int]], *, dtype: DType, use_bias: bool = False) -> list[Array]:
  """Linears of the same input, each with its own HF name and parameters, as one
  matmul over their concatenated kernels: the narrow ones (GQA's k and v) run
  far below the matmul rate on their own. Each output column is the same dot
  product as the separate Linear's, in the same dtype."""
  params = [DenseParams(n, dtype, use_bias, name=name)(x.shape[-1]) for name, n in projections]
  kernel = jnp.concatenate([k for k, _ in params], axis=1).astype(dtype)
  bias = jnp.concatenate([b for _, b in params]) if use_bias else None
  y = matmul(x.astype(dtype), kernel, dtype, bias)
  return jnp.split(y, np.cumsum([n for _, n in projections])[:-1].tolist(), axis=-1)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, computed in float32 like transformers.

  Llama-style (offset 0): normalise in f32, cast back to the input dtype, then
  multiply by the weight in that dtype. Gemma-style (offset 1): multiply by
  (1 + weight) in f32, then cast. `upcast_weight` (gpt-oss): multiply by the
  weight in f32, then cast.
  """

  eps: float
  dtype: DType
  offset: float = 0.0
  upcast_weight: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    weight = self.param('weight', init, (x.shape[-1],), self.dtype)
    input_dtype = x.dtype
    h = x.astype(jnp.float32)
    # jnp.mean then lax.rsqrt, as torch: mean of squares, rsqrt(var + eps).
    var = jnp.mean(h * h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(var + self.eps)
    if self.offset or self.upcast_weight:
      return (h * (self.offset + weight.astype(jnp.float32))).astype(input_dtype)
    return weight * h.astype(input_dtype)


# ---------------------------------------------------------------------------
# Moving 16-bit floats as their bits. XLA:CPU computes a bf16 (or fp16) gather or
# dynamic-slice in float32 (its float-normalization pass): it converts the whole
# operand first, and out of a loop when the operand does not change in it (loop-
# invariant code motion). A layer stack scanned over its stacked weights then
# converts every weight of every layer to float32 at every call (twice the weights'
# bytes in temporaries: about 30 GB for Qwen3-8B's 16 GB of bf16 weights), an
# embedding lookup the whole table. Moved as uint16, the bits stay 16-bit (XLA:CPU
# still copies a stack once per call, in its own size). On GPU and TPU, which slice
# bf16 natively, the bitcasts change nothing.

_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def to_bits(tree: Any) -> Any:
  """Every 16-bit float leaf of `tree` bitcast to uint16; other leaves as they are."""
  return jax.tree_util.tree_map(
      lambda a: jax.lax.bitcast_convert_type(a, _BITS[a.dtype]) if a.dtype in _BITS else a, tree)


def from_bits(tree: Any, dtype: DType) -> Any:
  """The inverse of `to_bits` for a model of `dtype`: uint16 leaves back to `dtype`."""
  if jnp.dtype(dtype) not in _BITS:
    return tree
  return jax.tree_util.tree_map(
      lambda a: jax.lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a, tree)


def take(a: Array, indices: Array, axis: int = 0) -> Array:
  """jnp.take that moves 16-bit floats as their bits (see above)."""
  if a.dtype not in _BITS:
    return jnp.take(a, indices, axis=axis)
  return jax.lax.bitcast_convert_type(jnp.take(to_bits(a), indices, axis=axis), a.dtype)


class Embedding(nn.Module):
  """Token embedding (transformers' `embed_tokens`): the table is the parameter
  `embedding` [V, D], with nn.Embed's name and initialiser.

  `scale` (Gemma's sqrt(hidden)) multiplies inside the module, as transformers'
  Gemma*TextScaledWordEmbedding does, so that the `embedding_output` tap (the
  embedding module's output) is the scaled value on both sides.
  """

  num_embeddings: int
  features: int
  scale: float | None
  dtype: DType

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    """ids [B, T] int -> [B, T, D]."""
    table = self.param('embedding', nn.linear.default_embed_init, (self.num_embeddings, self.features),
                       self.dtype)
    x = take(table.astype(self.dtype), ids, axis=0)
    if self.scale is None:
      return x
    # Parity: transformers keeps the scale as a float32 buffer and casts it to the
    # weight dtype before the multiply (sqrt(3072) becomes 55.5 in bf16).
    return x * jnp.asarray(np.float32(self.scale)).astype(self.dtype)


# ---------------------------------------------------------------------------
# Rotary embeddings.


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
  return int(head_dim * rope.partial_rotary_factor)


def inv_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [rot/2] (float32) and the cos/sin scaling, as transformers'
  rope initialisers compute them (in float32 where they do)."""
  dim = rotary_dim(rope, head_dim)
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  # theta ** exponent: torch's float32 pow is faithful (<= 1 ulp); numpy's float32 power
  # is not, and differed from torch in about 20% of the frequencies of the paper's
  # configs. The float64 power rounded to float32 differs in about 1% (by 1 ulp, checked
  # in tests/test_real_configs_gemma_qwen_vl.py).
  pos_freqs = np.power(np.float64(np.float32(rope.theta)), exponents.astype(np.float64)).astype(np.float32)
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  scaling = 1.0
  if rope.rope_type == 'linear':
    inv_freq = (inv_freq / np.float32(rope.factor)).astype(np.float32)
  elif rope.rope_type == 'llama3':
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rope.factor), inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - rope.low_freq_factor)
              / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  elif rope.rope_type == 'yarn':
    inv_freq, scaling = _yarn(rope, dim, pos_freqs)
  return inv_freq, scaling


def _yarn(rope: RopeConfig, dim: int, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
  factor = rope.factor

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = rope.attention_factor
  if attention_factor is None:
    if rope.mscale and rope.mscale_all_dim:
      attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
    else:
      attention_factor = mscale(factor)
  base, orig = rope.theta, rope.original_max_position_embeddings

  def correction_dim(rotations):
    return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolation = (1 - ramp).astype(np.float32)
  inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
  inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  inv_freq = (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)
  return inv_freq, attention_factor


def rope_tables(rope: RopeConfig, head_dim: int, positions: Array, dtype: DType) -> tuple[Array, Array]:
  """cos, sin [B, T, rot] in `dtype`, for integer positions [B, T].

  As transformers: the angle is position * inv_freq in float32, cos/sin in
  float32 times the attention scaling, then cast to the activation dtype.
  """
  inv_freq, scaling = inv_frequencies(rope, head_dim)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, N, h]; rotates the first `rot` dims of each head (partial rotary)."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos + rotated * sin
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ---------------------------------------------------------------------------
# Attention.


def attention_mask(valid: Array, window: Array | int | None = None) -> Array:
  """Boolean [B, 1, 1, T, S] mask: causal, key not padding, inside the sliding window.

  `window` (traced or static) of 0 or None means full attention; otherwise a key is
  visible when q - k < window, transformers' sliding-window rule.
  """
  t = valid.shape[1]
  q = jnp.arange(t)[:, None]
  k = jnp.arange(t)[None, :]
  mask = (k <= q)[None] & valid[:, None, :]
  if window is not None:
    window = jnp.asarray(window)
    mask = mask & ((window <= 0) | (q - k < window))[None]
  return mask[:, None, None]


# Sequences longer than this go through the blocked attention (no [T, S] matrix,
# key blocks past the diagonal skipped); shorter ones through the direct one.
ATTENTION_BLOCK = 256


class Attention(nn.Module):
  """Multi-head attention with GQA, optional q/k norm, rope, soft-capping and sinks."""

  config: ModelConfig
  dtype: DType

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, valid: Array, window: Array | int | None = None) -> Array:
    c = self.config
    b, t, _ = x.shape
    h, k, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q_out = h * hd * (2 if c.attn_output_gate else 1)
    q, key, value = fused_dense(x, [('q_proj', q_out), ('k_proj', k * hd), ('v_proj', k * hd)], dtype=self.dtype,
                                use_bias=c.qkv_bias)
    if c.attn_output_gate:
      # Qwen3.5 packs [query | gate] per head in q_proj.
      q, gate = jnp.split(q.reshape(b, t, h, 2 * hd), 2, axis=-1)
      gate = gate.reshape(b, t, h * hd)
    q = q.reshape(b, t, h, hd)
    key, value = key.reshape(b, t, k, hd), value.reshape(b, t, k, hd)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, c.norm_weight_fp32, name='q_norm')(q)
      key = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, c.norm_weight_fp32, name='k_norm')(key)
    # The operands of the attention products, as named points (qeval's `+attn` quantizes them).
    q = Probe(name='q')(apply_rope(q, cos, sin))
    key = Probe(name='k')(apply_rope(key, cos, sin))
    value = Probe(name='v')(value)
    q = q.reshape(b, t, k, h // k, hd)
    sinks = self.param('sinks', nn.initializers.zeros, (h,), self.dtype) if c.attention_sinks else None
    if t > ATTENTION_BLOCK:
      out = blocked_attention(q, key, value, valid, window, c, self.dtype, sinks, ATTENTION_BLOCK)
    else:
      out = direct_attention(q, key, value, attention_mask(valid, window), c, self.dtype, sinks)
    out = out.reshape(b, t, h * hd)
    if c.attn_output_gate:
      out = out * jax.nn.sigmoid(gate)
    return dense(c.hidden_size, 'o_proj', dtype=self.dtype, use_bias=c.o_bias)(out)


def _scaled_logits(q: Array, key: Array, c: ModelConfig, dtype: DType, spec: str) -> Array:
  # As transformers' eager path: logits in the activation dtype, times the scale,
  # then the optional soft-cap.
  logits = einsum(spec, q, key, dtype) * jnp.asarray(c.scale, dtype)
  if c.attn_logit_softcap:
    cap = jnp.asarray(c.attn_logit_softcap, dtype)
    logits = jnp.tanh(logits / cap) * cap
  return logits


def direct_attention(q: Array, key: Array, value: Array, mask: Array, c: ModelConfig, dtype: DType,
                     sinks: Array | None) -> Array:
  """softmax(q k^T) v with the whole [T, S] matrix: q [B,T,K,G,h], key/value [B,S,K,h] -> [B,T,K,G,h]."""
  _, _, k, g, _ = q.shape
  logits = _scaled_logits(q, key, c, dtype, 'BTKGh,BSKh->BKGTS')
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  if sinks is not None:
    # gpt-oss (transformers' eager): one learned logit per head joins every row's
    # softmax and is dropped after it. The concatenation and the max subtraction
    # happen in the activation dtype (no float32 upcast there, unlike the plain
    # path); the softmax itself accumulates in float32, as torch's CPU kernel does.
    sink = jnp.broadcast_to(sinks.astype(logits.dtype).reshape(1, k, g, 1, 1), logits.shape[:-1] + (1,))
    combined = jnp.concatenate([logits, sink], axis=-1)
    combined = combined - jnp.max(combined, axis=-1, keepdims=True)
    probs = jax.nn.softmax(combined.astype(jnp.float32), axis=-1)[..., :-1]
  else:
    # Softmax in float32, then back to the activation dtype (transformers' eager).
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return einsum('BKGTS,BSKh->BTKGh', probs.astype(dtype), value, dtype)


def blocked_attention(q: Array, key: Array, value: Array, valid: Array, window: Array | int | None,
                      c: ModelConfig, dtype: DType, sinks: Array | None, block: int) -> Array:
  """The same attention, one block of queries at a time against the key blocks it
  can see (causal, inside the sliding window), with a running softmax in float32.

  Memory is O(T * block) instead of O(T^2), and key blocks after the diagonal
  (or before the window) are never computed. The result equals the direct
  path's up to float rounding (the softmax is accumulated block by block).
  q [B,T,K,G,h], key/value [B,S,K,h], valid [B,S] -> [B,T,K,G,h].

  Heads go in front once, outside the loops, so every block product is a plain
  batched matmul; without a sliding window the causal mask is applied on the
  diagonal block only (the blocks before it are wholly visible, up to padding).
  """
  b, t, k, g, hd = q.shape
  pad = -t % block
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    key = jnp.pad(key, ((0, 0), (0, pad), (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), (0, pad), (0, 0), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
  n = (t + pad) // block
  qt = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, h]
  kt = jnp.transpose(key, (0, 2, 1, 3)).reshape(b, k, n, block, hd)  # [B, K, n, blk, h]
  vt = jnp.transpose(value, (0, 2, 1, 3)).reshape(b, k, n, block, hd)
  validb = valid.reshape(b, n, block)
  offsets = jnp.arange(block, dtype=jnp.int32)
  neg = jnp.finfo(jnp.float32).min
  windowed = window is not None
  window = jnp.asarray(0 if window is None else window, jnp.int32)

  def query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(qt, i * block, block, axis=3)  # [B, K, G, bq, h]
    q_pos = i * block + offsets

    def key_block(j, carry, causal: bool):
      m, l, acc = carry
      s = _scaled_logits(q_i, kt[:, :, j], c, dtype, 'BKGqh,BKkh->BKGqk').astype(jnp.float32)
      mask = validb[:, j][:, None, None, None, :]
      if causal:
        k_pos = j * block + offsets
        visible = k_pos[None, :] <= q_pos[:, None]
        if windowed:
          visible &= (window <= 0) | (q_pos[:, None] - k_pos[None, :] < window)
        mask = mask & visible
      s = jnp.where(mask, s, neg)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      scale = jnp.exp(m - m_new)
      l = l * scale + p.sum(axis=-1)
      pv = einsum('BKGqk,BKkh->BKGqh', p.astype(dtype), vt[:, :, j], dtype)
      return m_new, l, acc * scale[..., None] + pv.astype(jnp.float32)

    init = (jnp.full((b, k, g, block), neg, jnp.float32), jnp.zeros((b, k, g, block), jnp.float32),
            jnp.zeros((b, k, g, block, hd), jnp.float32))
    if windowed:  # every block may cut the window: the full mask everywhere
      first = jnp.where(window > 0, jnp.maximum(i * block - window + 1, 0) // block, 0)
      m, l, acc = jax.lax.fori_loop(first, i + 1, lambda j, cr: key_block(j, cr, True), init)
    else:
      carry = jax.lax.fori_loop(0, i, lambda j, cr: key_block(j, cr, False), init)
      m, l, acc = key_block(i, carry, True)
    if sinks is not None:  # the sink joins the normaliser only
      l = l + jnp.exp(sinks.astype(jnp.float32).reshape(1, k, g, 1) - m)
    return (acc / l[..., None]).astype(dtype)  # [B, K, G, bq, h]

  out = jax.lax.map(query_block, jnp.arange(n))  # [n, B, K, G, bq, h]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, n * block, k, g, hd)
  return out[:, :t]


# ---------------------------------------------------------------------------
# MLP.

ACTIVATIONS = {
    'silu': jax.nn.silu,
    # transformers' "gelu_pytorch_tanh" / "gelu_new": the tanh approximation.
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
}


class GatedMLP(nn.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x)): SwiGLU / GeGLU."""

  hidden_size: int
  intermediate_size: int
  act: str
  dtype: DType
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gate = dense(self.intermediate_size, 'gate_proj', dtype=self.dtype, use_bias=self.use_bias)(x)
    up = dense(self.intermediate_size, 'up_proj', dtype=self.dtype, use_bias=self.use_bias)(x)
    h = ACTIVATIONS[self.act](gate) * up
    return dense(self.hidden_size, 'down_proj', dtype=self.dtype, use_bias=self.use_bias)(h)
