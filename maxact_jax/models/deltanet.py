"""Gated DeltaNet linear attention (the `linear_attention` layers of Qwen3.5).

One layer, as transformers' `Qwen3_5GatedDeltaNet` computes it on its torch
path (the one it takes on CPU and whenever the fla / causal-conv1d kernels are
absent):

  x -> in_proj_qkv -> depthwise causal conv1d (kernel K) -> act -> q | k | v
  x -> in_proj_z (output gate), in_proj_b (beta = sigmoid), in_proj_a (decay)
  g = -exp(A_log) * softplus(a + dt_bias)              log decay per value head
  q, k L2-normalised per head, q scaled by dk ** -0.5
  S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T   (delta rule)
  o_t = S_t^T q_t
  out_proj(gated RMSNorm(o, z))

The recurrence runs in its chunked form: within a chunk of C tokens the delta
rule's sequential writes are condensed by the UT transform (a unit lower
triangular solve), and a `jax.lax.scan` over chunks carries the state
[dk, dv] per head, so time and memory are linear in the sequence length.

Padding: transformers zeroes padded positions before the projections. Here
in addition a padded position neither decays nor writes the state (g = 0,
beta = 0 there), so whatever stands in padded slots, and wherever they are,
the state a valid token reads is the one of its own sample's valid prefix.

Shapes: B batch, T positions, D hidden, Hk key heads, Hv value heads (a key
head serves Hv // Hk consecutive value heads), dk / dv head dims, C chunk
size, N = ceil(T / C) chunks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax.config import ModelConfig
from maxact_jax.models import layers

Array = jax.Array
DType = Any

CHUNK_SIZE = 64  # transformers' torch_chunk_gated_delta_rule default
L2_EPS = 1e-6  # transformers' l2norm (aligned with the fla library)
HIGHEST = jax.lax.Precision.HIGHEST  # the kernel is float32 in every model dtype


def l2norm(x: Array, eps: float = L2_EPS) -> Array:
  """x * rsqrt(sum(x^2) + eps) over the last axis: transformers' / fla's form."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def softplus(x: Array) -> Array:
  """torch.nn.functional.softplus (beta 1, threshold 20): x itself above 20."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _prepare(q: Array, k: Array, v: Array, g: Array, beta: Array):
  """Shared prologue of both forms: heads grouped, float32, q/k normalised, q scaled.

  Returns q, k [B, T, Hv, dk], v [B, T, Hv, dv], g, beta [B, T, Hv], all float32.
  """
  hk, hv = k.shape[2], v.shape[2]
  if hv != hk:
    # torch repeat_interleave: key head i serves value heads i*r .. i*r + r-1.
    q = jnp.repeat(q, hv // hk, axis=2)
    k = jnp.repeat(k, hv // hk, axis=2)
  q, k, v, g, beta = (a.astype(jnp.float32) for a in (q, k, v, g, beta))
  q, k = l2norm(q), l2norm(k)
  q = q * jnp.float32(q.shape[-1] ** -0.5)
  return q, k, v, g, beta


def unit_lower_inverse(a: Array) -> Array:
  """(I + strictly-lower(a))^-1 for [..., C, C], by forward substitution on the rows.

  transformers' own export path for the same inverse: row i of -L becomes
  row_i + row_i @ (rows < i, already inverted). It agrees with its default
  torch.linalg.solve_triangular to ~4e-7 relative; XLA:CPU expands
  triangular_solve into a loop about 100x slower than this one.
  """
  c = a.shape[-1]
  m = -jnp.tril(a, -1)

  def row(i, m):
    r = m[..., i, :]  # nonzero only left of the diagonal; rows above i are final
    return m.at[..., i, :].set(r + jnp.einsum('...j,...jk->...k', r, m, precision=HIGHEST))

  m = jax.lax.fori_loop(1, c, row, m)
  return m + jnp.eye(c, dtype=m.dtype)


def chunk_gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array,
                           chunk_size: int = CHUNK_SIZE,
                           initial_state: Array | None = None) -> tuple[Array, Array]:
  """The gated delta rule, chunked: (output [B, T, Hv, dv] f32, final state [B, Hv, dk, dv]).

  Args:
    q, k: [B, T, Hk, dk] (before L2 normalisation).
    v: [B, T, Hv, dv].
    g: [B, T, Hv] log decay (<= 0); the state is multiplied by exp(g_t) at step t.
    beta: [B, T, Hv] write strength in [0, 1].
    chunk_size: C.
    initial_state: [B, Hv, dk, dv] or None (zeros).

  The arithmetic follows transformers' `torch_chunk_gated_delta_rule` step by
  step (the same cumulative log decays, the same masked pairwise decays, the
  same UT transform, the same state update order), in float32.
  """
  q, k, v, g, beta = _prepare(q, k, v, g, beta)
  b, t, h, dk = k.shape
  dv = v.shape[-1]
  c = chunk_size
  pad = (-t) % c
  if pad:
    # Zero-padded tail (as transformers): beta = 0 and g = 0 there write nothing.
    widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
    q, k, v, g, beta = (jnp.pad(a, widths(a)) for a in (q, k, v, g, beta))
  n = (t + pad) // c

  def chunks(a: Array) -> Array:  # [B, N*C, H, ...] -> [B, H, N, C, ...]
    a = a.reshape((b, n, c, h) + a.shape[3:])
    return jnp.moveaxis(a, 3, 1)

  q, k, v, g, beta = (chunks(a) for a in (q, k, v, g, beta))
  v_beta = v * beta[..., None]
  k_beta = k * beta[..., None]
  cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C]: log decay from the chunk start to position i
  lower = jnp.tril(jnp.ones((c, c), bool))
  # exp(cum_i - cum_j) for j <= i; the upper triangle is -inf before exp (exactly 0 after).
  pairwise = jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  einsum = lambda spec, x, y: jnp.einsum(spec, x, y, precision=HIGHEST)
  ut = einsum('bhnid,bhnjd->bhnij', k_beta, k) * pairwise
  intra = einsum('bhnid,bhnjd->bhnij', q, k) * pairwise  # diagonal included
  decayed_k_beta = k_beta * jnp.exp(cum)[..., None]
  # The UT transform: (I + strictly-lower(ut))^-1 applied to both right-hand sides (the
  # diagonal of ut is ignored, as torch.linalg.solve_triangular(unitriangular=True)).
  inverse = unit_lower_inverse(ut)
  new_values = einsum('bhnij,bhnjd->bhnid', inverse, v_beta)  # [B, H, N, C, dv]
  k_cumdecay = einsum('bhnij,bhnjd->bhnid', inverse, decayed_k_beta)  # [B, H, N, C, dk]
  q = q * jnp.exp(cum)[..., None]
  k = k * jnp.exp(cum[..., -1:] - cum)[..., None]
  chunk_decay = jnp.exp(cum[..., -1])[..., None, None]  # [B, H, N, 1, 1]

  def step(state, xs):
    nv, kc, qc, kk, att, decay = xs
    v_new = nv - einsum('bhcd,bhde->bhce', kc, state)
    out = einsum('bhcd,bhde->bhce', qc, state) + einsum('bhij,bhje->bhie', att, v_new)
    state = state * decay + einsum('bhcd,bhce->bhde', kk, v_new)
    return state, out

  if initial_state is None:
    initial_state = jnp.zeros((b, h, dk, dv), jnp.float32)
  xs = tuple(jnp.moveaxis(a, 2, 0) for a in (new_values, k_cumdecay, q, k, intra, chunk_decay))
  state, out = jax.lax.scan(step, initial_state.astype(jnp.float32), xs)
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * c, dv)[:, :, :t]  # [B, H, T, dv]
  return jnp.moveaxis(out, 1, 2), state


def recurrent_gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array,
                               initial_state: Array | None = None) -> tuple[Array, Array]:
  """The same rule one token at a time (transformers' `torch_recurrent_gated_delta_rule`).

  Quadratic-free but sequential in T: the definition the chunked form is tested against.
  """
  q, k, v, g, beta = _prepare(q, k, v, g, beta)
  b, _, h, dk = k.shape
  dv = v.shape[-1]

  def step(state, xs):
    qt, kt, vt, gt, bt = xs  # [B, H, d], [B, H]
    state = state * jnp.exp(gt)[..., None, None]
    kv_mem = jnp.sum(state * kt[..., None], axis=-2)
    delta = (vt - kv_mem) * bt[..., None]
    state = state + kt[..., None] * delta[..., None, :]
    return state, jnp.sum(state * qt[..., None], axis=-2)

  if initial_state is None:
    initial_state = jnp.zeros((b, h, dk, dv), jnp.float32)
  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
  state, out = jax.lax.scan(step, initial_state.astype(jnp.float32), xs)
  return jnp.moveaxis(out, 0, 1), state


class CausalConv1d(nn.Module):
  """Depthwise causal convolution over time, weight in torch's Conv1d layout [C, 1, K].

  out[t] = act(sum_j w[:, j] * x[t - K + 1 + j]), zeros before the start: transformers'
  causal_conv1d_fn fallback (F.conv1d with K - 1 padding, first T outputs).
  """

  features: int
  kernel_size: int
  activation: str
  dtype: DType

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, T, C] -> [B, T, C]."""
    kk = self.kernel_size
    bound = 1.0 / np.sqrt(kk)
    weight = self.param('weight', nn.initializers.uniform(2 * bound), (self.features, 1, kk), self.dtype)
    t = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (kk - 1, 0), (0, 0))).astype(jnp.float32)
    w = weight[:, 0, :].astype(jnp.float32)
    # Accumulated in float32 and rounded once, as torch's conv kernels do for bf16.
    out = sum(xp[:, j:j + t, :] * w[:, j] for j in range(kk))
    return layers.ACTIVATIONS[self.activation](out.astype(x.dtype))


class DeltaRule(nn.Module):
  """The chunked gated delta rule as a parameterless module call, so that its output
  (the state read-out entering the gated norm, which rescales it away) is a tap."""

  dtype: DType
  chunk_size: int = CHUNK_SIZE

  @nn.compact
  def __call__(self, q: Array, k: Array, v: Array, g: Array, beta: Array) -> Array:
    """-> [B, T, Hv, dv] in the model dtype (transformers returns the kernel output in the
    input dtype)."""
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta, self.chunk_size)
    return out.astype(self.dtype)


class GatedRMSNorm(nn.Module):
  """RMSNorm of x, then times silu(gate): transformers' Qwen3_5RMSNormGated (fla's
  FusedRMSNormGated). Plain weight (initialised to ones), norm before the gate."""

  eps: float
  dtype: DType

  @nn.compact
  def __call__(self, x: Array, gate: Array) -> Array:
    weight = self.param('weight', nn.initializers.ones, (x.shape[-1],), self.dtype)
    input_dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    # As transformers: weight times the normalised value in the input dtype, then the
    # float32 gate, then back to the input dtype.
    h = weight * h.astype(input_dtype)
    h = h * jax.nn.silu(gate.astype(jnp.float32))
    return h.astype(input_dtype)


def _a_log_init(key, shape, dtype):
  """log(A) with A ~ U(1, 16): a spread of fast and slow decays (transformers draws
  A ~ U(0.01, 16)); only shape checks and tests without a checkpoint see it."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class GatedDeltaNet(nn.Module):
  """A Gated DeltaNet token mixer; called as `linear_attn` inside a decoder layer."""

  config: ModelConfig
  dtype: DType
  chunk_size: int = CHUNK_SIZE

  @nn.compact
  def __call__(self, x: Array, valid: Array) -> Array:
    """x [B, T, D], valid [B, T] bool -> [B, T, D]."""
    c = self.config
    la = c.linear_attention
    b, t, _ = x.shape
    hk, hv, dk, dv = la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim
    key_dim, value_dim = hk * dk, hv * dv
    proj = lambda n, name: layers.dense(n, name, dtype=self.dtype)

    # transformers' apply_mask_to_padding_states: padded positions enter as zeros (a
    # where, not its multiply, so that not even a non-finite padded value survives).
    x = jnp.where(valid[..., None], x, jnp.zeros_like(x))
    mixed = proj(2 * key_dim + value_dim, 'in_proj_qkv')(x)
    z = proj(value_dim, 'in_proj_z')(x)
    b_logits = proj(hv, 'in_proj_b')(x)
    a = proj(hv, 'in_proj_a')(x)
    mixed = CausalConv1d(2 * key_dim + value_dim, la.conv_kernel_dim, c.hidden_act, self.dtype,
                         name='conv1d')(mixed)
    q = mixed[..., :key_dim].reshape(b, t, hk, dk)
    k = mixed[..., key_dim:2 * key_dim].reshape(b, t, hk, dk)
    v = mixed[..., 2 * key_dim:].reshape(b, t, hv, dv)

    a_log = self.param('A_log', _a_log_init, (hv,), self.dtype)
    dt_bias = self.param('dt_bias', nn.initializers.ones, (hv,), self.dtype)
    beta = jax.nn.sigmoid(b_logits)  # in the model dtype, as transformers
    # float32 whatever the model dtype (transformers: "A might be -inf" in fp16 otherwise).
    g = -jnp.exp(a_log.astype(jnp.float32)) * softplus(a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    # A padded position neither decays nor writes the recurrent state.
    g = jnp.where(valid[..., None], g, 0.0)
    beta = jnp.where(valid[..., None], beta, jnp.zeros_like(beta))

    core = DeltaRule(self.dtype, self.chunk_size, name='delta_rule')(q, k, v, g, beta)
    out = GatedRMSNorm(c.rms_norm_eps, self.dtype, name='norm')(core, z.reshape(b, t, hv, dv))
    return proj(c.hidden_size, 'out_proj')(out.reshape(b, t, value_dim))
