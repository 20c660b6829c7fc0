"""The mixture-of-experts block: router, token dispatch to the experts, shared experts.

One block serves every MoE family; a family is a `MoEConfig`:

- `softmax_topk` (qwen3_moe): softmax over all experts in float32, top-k,
  optionally renormalised (norm_topk_prob);
- `topk_softmax` (gpt-oss): top-k of the raw logits (the router has a bias),
  softmax over those k values only;
- `sigmoid_group_topk` (glm4_moe, bailing_moe / Ling 2.0): sigmoid scores in
  float32; a selection-only correction bias; DeepSeek-V3 group-limited top-k
  (each group scored by the sum of its two best biased scores, the best
  `topk_group` of `n_group` groups kept); combine weights are the unbiased
  scores of the chosen experts, renormalised (+1e-20) and times
  `routed_scaling_factor`.

Dispatch never computes every expert for every token: the N*K (token, expert)
assignments are sorted by expert and each expert's rows go through its own
weights. Two equivalent implementations, chosen per backend:

- `ragged`: `jax.lax.ragged_dot` (a native grouped matmul on GPU and TPU);
- `tiled`: on the CPU, where XLA lowers ragged_dot to a dense masked product
  (E times the work), each expert's rows are padded to a multiple of a tile and
  a while loop runs one (tile x D) @ (D x F) matmul per *used* tile.

Both are static-shape and jittable; capacity is exactly N*K (no token is
dropped). Shapes: B batch, T positions, N = B*T tokens, D hidden, E experts,
K experts per token, I expert width, M = N*K assignments.

Two named probe points let the capture interceptor see what it needs without
the block knowing about statistics: `router_logits` and `moe_experts` (the
routing, per-assignment expert outputs and the block output, which the
statistics handler reduces on device to per-expert counts and maxima, the
expert behind the block's maximum, and router entropy).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxact_jax.config import ModelConfig, MoEConfig
from maxact_jax.models import layers

Array = jax.Array
DType = Any

ROUTERS = ('softmax_topk', 'topk_softmax', 'sigmoid_group_topk')
EXPERT_ACTIVATIONS = ('silu', 'clamped_swiglu')
DISPATCH_ENV = 'MAXACT_MOE_DISPATCH'  # 'ragged' | 'tiled' | unset (by backend)


# ---------------------------------------------------------------------------
# Routing.


def _top2_group_mask(choice: Array, n_group: int, topk_group: int) -> Array:
  """Boolean [..., E]: experts inside the `topk_group` best of `n_group` groups."""
  e = choice.shape[-1]
  grouped = choice.reshape(choice.shape[:-1] + (n_group, e // n_group))
  group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [..., G]
  _, keep = jax.lax.top_k(group_scores, topk_group)
  group_mask = jax.nn.one_hot(keep, n_group, dtype=jnp.bool_).any(-2)  # [..., G]
  return jnp.repeat(group_mask, e // n_group, axis=-1)


def route(m: MoEConfig, logits: Array, correction: Array | None) -> tuple[Array, Array, Array]:
  """(weights [..., K], expert index [..., K] int32, probabilities [..., E] f32).

  The probabilities are the router's distribution over all experts, for the
  entropy statistic: softmax of the logits (softmax routers, gpt-oss included:
  its combine weights only softmax the top k), normalised sigmoid scores for
  sigmoid routers.
  """
  k = m.num_experts_per_tok
  if m.router == 'softmax_topk':
    # qwen3_moe: softmax in float32, top-k, renormalise, then back to the logits' dtype.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, index = jax.lax.top_k(probs, k)
    if m.norm_topk_prob:
      top = top / top.sum(-1, keepdims=True)
    return top.astype(logits.dtype), index, probs
  if m.router == 'topk_softmax':
    # gpt-oss: top-k of the logits, softmax over those k in the logits' dtype (torch
    # accumulates a bf16 softmax in float32 on CPU: so do we, then cast).
    top, index = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(logits.dtype)
    return weights, index, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if m.router == 'sigmoid_group_topk':
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores if correction is None else scores + correction.astype(jnp.float32)
    if m.n_group > 1 and m.topk_group < m.n_group:
      # Both glm4_moe (transformers 5) and Ling's remote code fill the other groups with -inf.
      choice = jnp.where(_top2_group_mask(choice, m.n_group, m.topk_group), choice, -jnp.inf)
    _, index = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, index, axis=-1)
    if m.norm_topk_prob:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * m.routed_scaling_factor  # stays float32, as in both references
    return weights, index, scores / scores.sum(-1, keepdims=True)
  raise ValueError(f'unknown router {m.router!r}')


class Router(nn.Module):
  """The router module (HF `mlp.gate` / `mlp.router`): returns (logits, weights, index, probs).

  Its first output, the raw logits [B, T, E], is the `moe_gate` tap: what the HF
  router module returns first in transformers 5 (qwen3_moe, gpt-oss, glm4_moe).
  """

  moe: MoEConfig
  dtype: DType

  @nn.compact
  def __call__(self, x: Array):
    m = self.moe
    pdtype = jnp.float32 if m.router_fp32_params else self.dtype
    kernel = self.param('kernel', nn.initializers.normal(0.02), (x.shape[-1], m.num_experts), pdtype)
    if m.router_fp32:
      # glm4_moe / Ling: F.linear(x.float(), weight.float()).
      logits = jnp.einsum('BTD,DE->BTE', x.astype(jnp.float32), kernel.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
    else:
      # F.linear in the model dtype: float32 accumulation, the bias added before the
      # one rounding to the model dtype (torch's addmm), so that near-tied experts
      # are ranked on the same values.
      bias = self.param('bias', nn.initializers.zeros, (m.num_experts,), pdtype) if m.router_bias else None
      logits = layers.matmul(x, kernel.astype(self.dtype), self.dtype, bias)
    if m.router_fp32 and m.router_bias:
      logits = logits + self.param('bias', nn.initializers.zeros, (m.num_experts,), pdtype).astype(logits.dtype)
    correction = None
    if m.score_correction_bias:
      correction = self.param('e_score_correction_bias', nn.initializers.zeros, (m.num_experts,), pdtype)
    weights, index, probs = route(m, logits, correction)
    return logits, weights, index, probs


# ---------------------------------------------------------------------------
# Dispatch.


def expert_activation(m: MoEConfig) -> Callable[[Array, Array], Array]:
  """(gate, up) -> the expert's hidden activation."""
  if m.swiglu_limit is not None:
    limit, alpha = m.swiglu_limit, m.swiglu_alpha

    def clamped(gate, up):
      # gpt-oss: gate clamped above, up on both sides, gate * sigmoid(alpha * gate) * (up + 1).
      gate = jnp.minimum(gate, jnp.asarray(limit, gate.dtype))
      up = jnp.clip(up, jnp.asarray(-limit, up.dtype), jnp.asarray(limit, up.dtype))
      return (up + 1) * (gate * jax.nn.sigmoid(gate * jnp.asarray(alpha, gate.dtype)))

    return clamped
  return lambda gate, up: jax.nn.silu(gate) * up


def dispatch_impl() -> str:
  """'ragged' on GPU/TPU (native grouped matmul), 'tiled' on the CPU; $MAXACT_MOE_DISPATCH overrides."""
  forced = os.environ.get(DISPATCH_ENV)
  if forced:
    if forced not in ('ragged', 'tiled'):
      raise ValueError(f'{DISPATCH_ENV}={forced!r}: expected ragged or tiled')
    return forced
  return 'tiled' if jax.default_backend() == 'cpu' else 'ragged'


def tile_rows(assignments: int, num_experts: int) -> int:
  """Rows per tile: about half an expert's average load, a power of two in [8, 128].

  Padding wastes at most one partial tile per expert, so smaller tiles waste
  less; larger tiles run the CPU's matmul closer to its peak. Measured on a
  2-core CPU (bench/moe_dispatch.py, D 1024, I 512, 64 experts, top-4): 64 rows
  best at 2048 tokens, 128 at 8192; 256 was slower at both.
  """
  avg = max(assignments / max(num_experts, 1) / 2, 1.0)
  return int(min(128, max(8, 2 ** int(math.floor(math.log2(avg))))))


def sort_assignments(index: Array, num_experts: int) -> tuple[Array, Array, Array]:
  """Sort the N*K assignments by expert (stable: token order within an expert).

  Returns (order [M]: assignment of each sorted row, expert of each sorted row [M],
  group sizes [E] int32).
  """
  flat = index.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, flat[order], sizes


def _expert_hidden(x, w_gate_up, b_gate_up, act, dtype):
  """One expert's hidden activation on rows x [m, D]: act(x W_gu + b) [m, I] (`layers.matmul`'s policy)."""
  gate, up = jnp.split(layers.matmul(x, w_gate_up, dtype, b_gate_up), 2, axis=-1)
  return act(gate, up)


def _expert_out(h, w_down, b_down, dtype):
  """One expert's output on hidden rows h [m, I]: h W_d + b [m, D] (`layers.matmul`'s policy)."""
  return layers.matmul(h, w_down, dtype, b_down)


def _ffn(x, w_gate_up, b_gate_up, w_down, b_down, act, dtype):
  """One expert's FFN on rows x [m, D]: act(x W_gu + b) W_d + b."""
  return _expert_out(_expert_hidden(x, w_gate_up, b_gate_up, act, dtype), w_down, b_down, dtype)


Hidden = Callable[[Array, Array], Array]
"""(hidden rows [R, I], mask [R] of the rows that hold a real assignment) -> the rows
the down projection reads. A point where a caller may change (e.g. fake-quantize)
every expert's hidden activation as one tensor."""


def grouped_ffn_ragged(x, experts, sizes, params, act, dtype, restore=None, hidden: Hidden | None = None,
                       row_valid=None):
  """All experts' FFNs on expert-sorted rows x [M, D] with `jax.lax.ragged_dot`
  (`layers.matmul`'s policy: precision, accumulation, the bias before the rounding).

  Returns the output rows in sorted order, or permuted by `restore` ([M] indices
  into the sorted rows) when given. `hidden` sees the [M, I] hidden rows (with
  `row_valid` [M], default all) before the down projection.
  """
  w_gu, b_gu, w_d, b_d = params

  def product(a, w, bias):
    out = jax.lax.ragged_dot(a, w, sizes, precision=layers.precision_for(dtype),
                             preferred_element_type=layers.accumulation_for(dtype))
    if bias is not None:
      out = out + bias[experts].astype(out.dtype)
    return out.astype(dtype)

  gate, up = jnp.split(product(x, w_gu, b_gu), 2, axis=-1)
  h = act(gate, up)
  if hidden is not None:
    h = hidden(h, jnp.ones(h.shape[:1], bool) if row_valid is None else row_valid)
  y = product(h, w_d, b_d)
  return y if restore is None else y[restore]


def grouped_ffn_tiled(x, experts, sizes, params, act, dtype, restore=None, tile: int | None = None,
                      hidden: Hidden | None = None, row_valid=None):
  """All experts' FFNs on expert-sorted rows x [M, D], one tile of rows at a time.

  Each expert's rows are padded to a multiple of `tile`; tile t belongs to one
  expert, and only the tiles in use run (a while loop with a traced trip count).
  Returns the output rows in sorted order, or permuted by `restore` (one gather
  from the padded layout instead of two). With `hidden`, the tiles run in two
  loops (hidden rows of every tile, then `hidden` on all of them at once, then
  the down projections), so that it sees the whole tensor.
  """
  w_gu, b_gu, w_d, b_d = params
  m, d = x.shape
  e = sizes.shape[0]
  tile = tile or tile_rows(m, e)
  padded = (sizes + tile - 1) // tile * tile
  padded_end = jnp.cumsum(padded)
  start = jnp.cumsum(sizes) - sizes
  rows = padded_end[experts] - padded[experts] + jnp.arange(m) - start[experts]  # padded row of each row
  num_tiles = -(-m // tile) + e  # sum_e ceil(g_e / tile) never exceeds this
  xp = jnp.zeros((num_tiles * tile, d), x.dtype).at[rows].set(x)
  tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_tiles) * tile, side='right'), e - 1)
  # An expert's weights by their bits (layers.take): a bf16 slice with an index from
  # the loop would have XLA:CPU convert every expert to float32 first.
  pick = lambda a, j: None if a is None else layers.take(a, j)
  used = padded_end[-1] // tile

  def body(t, out):
    xt = jax.lax.dynamic_slice_in_dim(xp, t * tile, tile)
    j = tile_expert[t]
    y = _ffn(xt, pick(w_gu, j), pick(b_gu, j), pick(w_d, j), pick(b_d, j), act, dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), t * tile, 0)

  def hidden_body(t, hp):
    j = tile_expert[t]
    h = _expert_hidden(jax.lax.dynamic_slice_in_dim(xp, t * tile, tile), pick(w_gu, j), pick(b_gu, j), act, dtype)
    return jax.lax.dynamic_update_slice_in_dim(hp, h.astype(hp.dtype), t * tile, 0)

  def out_body(t, out):
    j = tile_expert[t]
    y = _expert_out(jax.lax.dynamic_slice_in_dim(hp, t * tile, tile), pick(w_d, j), pick(b_d, j), dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), t * tile, 0)

  out = jnp.zeros((num_tiles * tile, w_d.shape[-1]), x.dtype)
  if hidden is None:
    out = jax.lax.fori_loop(0, used, body, out)
  else:
    hp = jax.lax.fori_loop(0, used, hidden_body, jnp.zeros((num_tiles * tile, w_d.shape[-2]), x.dtype))
    mask = jnp.zeros((num_tiles * tile,), bool).at[rows].set(True if row_valid is None else row_valid)
    hp = hidden(hp, mask)
    out = jax.lax.fori_loop(0, used, out_body, out)
  return out[rows if restore is None else rows[restore]]


def experts_forward(m: MoEConfig, dtype: DType, params: dict[str, Array], x: Array, index: Array, weights: Array,
                    hidden: Hidden | None = None, token_valid: Array | None = None) -> tuple[Array, Array]:
  """The routed experts on tokens x [N, D] with routing index/weights [N, K], given their
  parameters (`Experts`' names): (combined [N, D], per-assignment outputs [N, K, D]).

  `hidden` (see `Hidden`) sees every expert's hidden rows before the down projection;
  `token_valid` [N] says which tokens are real (default: all), for its mask.
  """
  n, d = x.shape
  e, k = m.num_experts, m.num_experts_per_tok
  order, experts, sizes = sort_assignments(index, e)
  token = order // k
  rows = x[token]  # [M, D]
  w = (params['gate_up_proj'], params.get('gate_up_proj_bias'), params['down_proj'], params.get('down_proj_bias'))
  grouped = grouped_ffn_ragged if dispatch_impl() == 'ragged' else grouped_ffn_tiled
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  extra = {} if hidden is None else {'hidden': hidden,
                                     'row_valid': None if token_valid is None else token_valid[token]}
  y = grouped(rows, experts, sizes, w, expert_activation(m), dtype, restore=inverse, **extra).reshape(n, k, d)
  # Combine in float32 and cast once (Ling's moe_infer does this; transformers'
  # qwen3_moe/glm4_moe/gpt-oss accumulate with index_add_ in the model dtype: equal
  # in float32, within a bf16 rounding per add otherwise).
  combined = jnp.einsum('NKD,NK->ND', y.astype(jnp.float32), weights.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
  return combined.astype(dtype), y


class Experts(nn.Module):
  """The routed experts (HF `mlp.experts`), stacked: gate_up_proj [E, D, 2I] holds
  [gate | up] halves, down_proj [E, I, D]; gpt-oss adds biases."""

  moe: MoEConfig
  dtype: DType

  @nn.compact
  def __call__(self, x: Array, index: Array, weights: Array) -> tuple[Array, Array]:
    """x [N, D], index [N, K], weights [N, K] -> (combined [N, D], per-assignment outputs [N, K, D])."""
    m = self.moe
    d = x.shape[-1]
    e, i = m.num_experts, m.moe_intermediate_size
    init = nn.initializers.normal(0.02)
    params = {'gate_up_proj': self.param('gate_up_proj', init, (e, d, 2 * i), self.dtype),
              'down_proj': self.param('down_proj', init, (e, i, d), self.dtype)}
    if m.expert_bias:
      params['gate_up_proj_bias'] = self.param('gate_up_proj_bias', nn.initializers.zeros, (e, 2 * i), self.dtype)
      params['down_proj_bias'] = self.param('down_proj_bias', nn.initializers.zeros, (e, d), self.dtype)
    return experts_forward(m, self.dtype, params, x, index, weights)


class MoEBlock(nn.Module):
  """The MoE MLP (HF `mlp`): routed experts plus an optional shared expert."""

  config: ModelConfig
  dtype: DType

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, m = self.config, self.config.moe
    b, t, d = x.shape
    k = m.num_experts_per_tok
    logits, weights, index, probs = Router(m, self.dtype, name=m.router_name)(x)
    layers.Probe(name='router_logits')(logits if m.router_logits_tap == 'logits' else weights)
    routed, per_assignment = Experts(m, self.dtype, name='experts')(
        x.reshape(-1, d), index.reshape(-1, k), weights.reshape(-1, k))
    out = routed.reshape(b, t, d)
    probe = {'index': index.astype(jnp.int32), 'weight': weights.astype(jnp.float32), 'probs': probs,
             'expert_out': per_assignment.reshape(b, t, k, d)}
    if m.shared_expert_intermediate_size:
      if m.shared_expert_gate:
        # Qwen-MoE style: sigmoid(shared_expert_gate(x)) * shared_expert(x).
        shared = layers.GatedMLP(d, m.shared_expert_intermediate_size, c.hidden_act, self.dtype,
                                 name='shared_expert')(x)
        shared = jax.nn.sigmoid(layers.dense(1, 'shared_expert_gate', dtype=self.dtype)(x)) * shared
      else:
        # glm4_moe / Ling: an ungated shared expert of width moe_intermediate_size * n_shared.
        shared = layers.GatedMLP(d, m.shared_expert_intermediate_size, c.hidden_act, self.dtype,
                                 name='shared_experts')(x)
      out = out + shared
      probe['shared'] = shared
    probe['output'] = out
    layers.Probe(name='moe_experts')(probe)
    return out
