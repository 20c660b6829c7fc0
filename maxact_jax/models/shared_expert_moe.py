"""A softmax top-k mixture of experts with a sigmoid-gated shared expert.

The MoE block of Qwen3.5-MoE (transformers' `Qwen3_5MoeSparseMoeBlock`):

  logits = gate(x)                               [B, T, E]   (the `moe_gate` tap)
  p = softmax(logits) in float32; top-k of p, renormalised to sum 1, cast back
  routed = sum_k p_k * down_e(act(gate_e(x)) * up_e(x))
  out = routed + sigmoid(shared_expert_gate(x)) * shared_expert(x)

Its routing is Qwen3-MoE's (softmax, top-k, renormalised) plus Qwen2-MoE's gated
shared expert, so this block is meant to merge into the general MoE block of
`maxact_jax/models/moe.py` (issue 5); until then it serves the configurations
whose MoEConfig it supports and refuses the others.

Experts are computed sparsely: the (token, expert) pairs are sorted by expert
and each expert's rows go through one grouped matmul (`jax.lax.ragged_dot`),
so the cost is that of the k chosen experts, not of all E.

Parameters (HF names): gate/weight [E, D] (torch layout), experts/gate_up_proj
[E, D, 2I] and experts/down_proj [E, I, D] (transposed from the checkpoint's
[E, 2I, D] / [E, D, I] by the weight map, so the matmuls need no transpose),
shared_expert/{gate,up,down}_proj, shared_expert_gate/kernel [D, 1].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxact_jax.config import ModelConfig, MoEConfig
from maxact_jax.errors import UserError
from maxact_jax.models import layers

Array = jax.Array
DType = Any


def check_supported(moe: MoEConfig) -> None:
  """One-line refusal of the MoE variants this block does not compute."""
  unsupported = {
      'router': moe.router != 'softmax_topk', 'router_bias': moe.router_bias,
      'expert_bias': moe.expert_bias, 'score_correction_bias': moe.score_correction_bias,
      'n_group': moe.n_group != 1, 'routed_scaling_factor': moe.routed_scaling_factor != 1.0,
      'swiglu_limit': moe.swiglu_limit is not None,
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise UserError(f'the shared-expert MoE block does not support {", ".join(bad)} (see models/moe.py)')


class TopKRouter(nn.Module):
  """Router logits and the top-k routing weights (transformers' SoftmaxTopKRouter)."""

  num_experts: int
  top_k: int
  norm_topk_prob: bool
  dtype: DType

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    """x [B, T, D] -> (logits [B, T, E], weights [B, T, k], expert indices [B, T, k])."""
    weight = self.param('weight', nn.initializers.normal(0.02), (self.num_experts, x.shape[-1]), self.dtype)
    logits = jnp.einsum('BTD,ED->BTE', x, weight, precision=layers.precision_for(self.dtype))
    # transformers: softmax in float32, top-k of the probabilities, renormalised,
    # then cast to the logits' dtype.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, index = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      top = top / jnp.sum(top, axis=-1, keepdims=True)
    return logits, top.astype(logits.dtype), index


class Experts(nn.Module):
  """E gated-MLP experts applied to each token's chosen k, as grouped matmuls."""

  num_experts: int
  intermediate_size: int
  act: str
  dtype: DType

  @nn.compact
  def __call__(self, x: Array, weights: Array, index: Array) -> Array:
    """x [N, D], weights / index [N, k] -> sum over k of weight * expert(x), [N, D]."""
    n, d = x.shape
    k = index.shape[-1]
    e, i = self.num_experts, self.intermediate_size
    init = nn.initializers.normal(0.02)
    gate_up = self.param('gate_up_proj', init, (e, d, 2 * i), self.dtype)
    down = self.param('down_proj', init, (e, i, d), self.dtype)
    prec = layers.precision_for(self.dtype)
    flat = index.reshape(-1)  # [N*k]: the (token, slot) pairs
    order = jnp.argsort(flat, stable=True)  # grouped by expert
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[token], gate_up, sizes, precision=prec)  # [N*k, 2I]
    # transformers chunks gate_up_proj's output in two: gate first, then up.
    h = layers.ACTIVATIONS[self.act](h[:, :i]) * h[:, i:]
    y = jax.lax.ragged_dot(h, down, sizes, precision=prec)  # [N*k, D]
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, d), y.dtype).at[token].add(y)


class SharedExpertMoE(nn.Module):
  """The MoE block; called as `mlp` inside a decoder layer."""

  config: ModelConfig
  dtype: DType

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, T, D] -> [B, T, D]."""
    c, moe = self.config, self.config.moe
    b, t, d = x.shape
    _, weights, index = TopKRouter(moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob,
                                   self.dtype, name='gate')(x)
    routed = Experts(moe.num_experts, moe.moe_intermediate_size, c.hidden_act, self.dtype, name='experts')(
        x.reshape(b * t, d), weights.reshape(b * t, -1), index.reshape(b * t, -1)).reshape(b, t, d)
    if moe.shared_expert_intermediate_size:
      shared = layers.GatedMLP(d, moe.shared_expert_intermediate_size, c.hidden_act, self.dtype,
                               name='shared_expert')(x)
      if moe.shared_expert_gate:
        shared = jax.nn.sigmoid(layers.dense(1, 'shared_expert_gate', dtype=self.dtype)(x)) * shared
      routed = routed + shared
    return routed
