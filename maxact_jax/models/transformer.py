"""The decoder: embeddings, a scanned stack of decoder layers, the final norm.

The layer stack is compiled once per *segment*: a run of layers with the same
parameter structure, scanned with `nn.scan` so compile time does not grow with
depth. A segment may have a period of several layer kinds (hybrid models repeat
e.g. three linear-attention layers and one full-attention layer); per-layer
differences that share parameters (sliding vs full attention, local vs global
rope) travel as scanned per-layer inputs. Taps sown inside a segment come out
stacked along the repeat axis and are named per layer by `Segment.layer`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax.config import LINEAR_ATTENTION, SLIDING_ATTENTION, ModelConfig
from maxact_jax.models import deltanet, layers, moe

Array = jax.Array

# Variable collections that are stacked along the scan axis of a segment.
TAP_COLLECTIONS = ('taps',)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers start .. start + repeats * len(kinds) - 1, scanned `repeats` times."""

  name: str
  start: int
  kinds: tuple[str, ...]
  repeats: int

  @property
  def period(self) -> int:
    return len(self.kinds)

  @property
  def stop(self) -> int:
    return self.start + self.repeats * self.period

  def layer(self, repeat: int, slot: int = 0) -> int:
    return self.start + repeat * self.period + slot

  def slot_name(self, slot: int) -> str | None:
    """Name of the submodule holding `slot` (None when the period is 1)."""
    return None if self.period == 1 else f'slot_{slot}'

  def locate(self, layer: int) -> tuple[int, int]:
    """(repeat, slot) of a layer index inside this segment."""
    return divmod(layer - self.start, self.period)


def layer_kind(config: ModelConfig, i: int) -> str:
  """The parameter structure of layer i: attention kind / MLP kind."""
  attn = 'linear' if config.layer_types[i] == LINEAR_ATTENTION else 'attn'
  return f'{attn}/{config.mlp_layer_kinds[i]}'


def plan_segments(config: ModelConfig) -> tuple[Segment, ...]:
  """Split the layers into as few scanned segments as the structure allows.

  Tries, in order: one uniform run; a uniform prefix (e.g. first dense layers)
  then a periodic rest; a periodic whole. Falls back to maximal uniform runs.
  """
  kinds = [layer_kind(config, i) for i in range(config.num_hidden_layers)]
  n = len(kinds)

  def periodic(start: int) -> tuple[str, ...] | None:
    rest = kinds[start:]
    for p in range(1, len(rest) + 1):
      if len(rest) % p == 0 and all(rest[i] == rest[i % p] for i in range(len(rest))):
        return tuple(rest[:p])
    return None

  def build(parts: list[tuple[int, tuple[str, ...]]]) -> tuple[Segment, ...]:
    segs, names = [], (['layers'] if len(parts) == 1 else [f'segment_{k}' for k in range(len(parts))])
    for name, (start, period) in zip(names, parts):
      stop = parts[len(segs) + 1][0] if len(segs) + 1 < len(parts) else n
      segs.append(Segment(name, start, period, (stop - start) // len(period)))
    return tuple(segs)

  whole = periodic(0)
  if whole is not None and len(whole) <= 8:
    return build([(0, whole)])
  first = 0
  while first < n and kinds[first] == kinds[0]:
    first += 1
  rest = periodic(first)
  if rest is not None and len(rest) <= 8:
    return build([(0, (kinds[0],)), (first, rest)])
  runs, start = [], 0
  for i in range(1, n + 1):
    if i == n or kinds[i] != kinds[start]:
      runs.append((start, (kinds[start],)))
      start = i
  return build(runs)


def _attention(config: ModelConfig, dtype, ctx: 'StepContext', window: Array, rope_index: Array):
  cos, sin = ctx.rope(rope_index)
  attn = layers.Attention(config, dtype, name='self_attn')
  return lambda h: attn(h, cos, sin, ctx.valid, window)


def _linear_attention(config: ModelConfig, dtype, ctx: 'StepContext', window: Array, rope_index: Array):
  del window, rope_index  # no positions: the recurrence orders the tokens
  attn = deltanet.GatedDeltaNet(config, dtype, name='linear_attn')
  return lambda h: attn(h, ctx.valid)


def _dense_mlp(config: ModelConfig, dtype, ctx: 'StepContext'):
  del ctx
  return layers.GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, dtype,
                         use_bias=config.mlp_bias, name='mlp')


def _moe_mlp(config: ModelConfig, dtype, ctx: 'StepContext'):
  del ctx
  return moe.MoEBlock(config, dtype, name='mlp')


# Layer kind -> factory of the block, called inside DecoderLayer's compact scope.
# A family with a new attention or MLP block adds its factory here.
ATTENTION_BLOCKS: dict[str, Callable[..., Callable[[Array], Array]]] = {
    'attn': _attention,
    'linear': _linear_attention,
}
MLP_BLOCKS: dict[str, Callable[..., Callable[[Array], Array]]] = {
    'dense': _dense_mlp,
    'moe': _moe_mlp,
}


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer; the `hidden` tap is its output (the residual stream).

  Called in nn.scan's form: (x, xs, ctx) -> (x, None), with xs the layer's
  (sliding window, rope-table index, layer index) scalars. The layer index is
  not used here; the capture interceptor reads it from the call's arguments.
  """

  config: ModelConfig
  dtype: Any
  kind: str = 'attn/dense'
  IS_LAYER = True

  @nn.compact
  def __call__(self, x: Array, xs: tuple[Array, Array, Array], ctx: 'StepContext'):
    window, rope_index, _ = xs
    c = self.config
    norm = lambda name: layers.RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, c.norm_weight_fp32,
                                       name=name)
    attn_kind, mlp_kind = self.kind.split('/')
    h = norm('input_layernorm')(x)
    h = ATTENTION_BLOCKS[attn_kind](c, self.dtype, ctx, window, rope_index)(h)
    if c.sandwich_norms:
      h = norm('post_attention_layernorm')(h)
    x = x + h
    h = norm('pre_feedforward_layernorm' if c.sandwich_norms else 'post_attention_layernorm')(x)
    h = MLP_BLOCKS[mlp_kind](c, self.dtype, ctx)(h)
    if c.sandwich_norms:
      h = norm('post_feedforward_layernorm')(h)
    return x + h, None


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What every layer sees besides the residual stream: the valid mask and rope tables."""

  valid: Array  # [B, T] bool
  cos: Array  # [R, B, T, rot]: one table per distinct rope (R = 1 or 2)
  sin: Array

  def rope(self, index: Array) -> tuple[Array, Array]:
    return self.cos[index], self.sin[index]


jax.tree_util.register_dataclass(StepContext, data_fields=['valid', 'cos', 'sin'], meta_fields=[])


class LayerGroup(nn.Module):
  """One period of a hybrid segment: `len(kinds)` layers in order, as `slot_{j}`."""

  config: ModelConfig
  dtype: Any
  kinds: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array, xs: tuple[Array, Array, Array], ctx: 'StepContext'):
    for j, kind in enumerate(self.kinds):
      x, _ = DecoderLayer(self.config, self.dtype, kind, name=f'slot_{j}')(
          x, tuple(a[j] for a in xs), ctx)
    return x, None


def per_layer_inputs(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
  """Sliding window (0 = full) and rope-table index of every layer."""
  windows = np.array([config.sliding_window or 0 if t == SLIDING_ATTENTION else 0
                      for t in config.layer_types], np.int32)
  use_local = config.local_rope is not None
  rope_index = np.array([1 if use_local and t == SLIDING_ATTENTION else 0 for t in config.layer_types],
                        np.int32)
  return windows, rope_index


def _bits_outside(module: type[nn.Module], dtype: Any, inner: bool, init: bool) -> type[nn.Module]:
  """The scan slices each layer's weights out of their stacks as uint16 bits
  (`layers.to_bits`: XLA:CPU would otherwise convert every stacked bf16 weight to
  float32 at every call); the parameters stay in `dtype` outside the scan and inside
  the layer. `inner`: the layer side (bits in, `dtype` within), else the stack side;
  `init`: while initialising (the new parameters go through the inverse map)."""
  to_dtype = functools.partial(layers.from_bits, dtype=dtype)
  trans_in, trans_out = (to_dtype, layers.to_bits) if inner else (layers.to_bits, to_dtype)
  return nn.map_variables(module, 'params', trans_in_fn=trans_in, trans_out_fn=trans_out, init=init)


class Transformer(nn.Module):
  """The decoder backbone (transformers' `model`): returns the final-norm output."""

  config: ModelConfig
  dtype: Any = jnp.float32
  IS_BACKBONE = True

  @nn.compact
  def __call__(self, input_ids: Array, valid: Array) -> Array:
    c = self.config
    b, t = input_ids.shape
    # Gemma scales inside the embedding module, so the embedding tap sees the scaled value.
    embed = layers.Embedding(c.vocab_size, c.hidden_size, c.hidden_size**0.5 if c.embed_scale else None, self.dtype,
                             name='embed_tokens')
    x = embed(input_ids)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ropes = [c.rope] + ([c.local_rope] if c.local_rope is not None else [])
    tables = [layers.rope_tables(r, c.head_dim, positions, self.dtype) for r in ropes]
    ctx = StepContext(valid=valid, cos=jnp.stack([cs for cs, _ in tables]),
                      sin=jnp.stack([sn for _, sn in tables]))
    windows, rope_index = per_layer_inputs(c)
    for seg in plan_segments(c):
      idx = np.arange(seg.start, seg.stop).reshape(seg.repeats, seg.period)
      xs = (windows[idx], rope_index[idx], idx.astype(np.int32))
      if seg.period == 1:
        body, args, xs = DecoderLayer, (c, self.dtype, seg.kinds[0]), tuple(a[:, 0] for a in xs)
      else:
        body, args = LayerGroup, (c, self.dtype, seg.kinds)
      scan = nn.scan(_bits_outside(body, self.dtype, True, self.is_initializing()),
                     variable_axes={'params': 0, **{col: 0 for col in TAP_COLLECTIONS}},
                     split_rngs={'params': True},
                     in_axes=(0, nn.broadcast),
                     length=seg.repeats)
      scan = _bits_outside(scan, self.dtype, False, self.is_initializing())
      x, _ = scan(*args, name=seg.name)(x, tuple(jnp.asarray(a) for a in xs), ctx)
    return layers.RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, c.norm_weight_fp32, name='norm')(x)


class CausalLM(nn.Module):
  """Backbone plus the language-model head (used for logits: crosscheck, interventions)."""

  config: ModelConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.model = Transformer(self.config, self.dtype)
    if not self.config.tie_word_embeddings:
      self.lm_head = layers.dense(self.config.vocab_size, 'lm_head', dtype=self.dtype)

  def __call__(self, input_ids: Array, valid: Array, logits: bool = False) -> Array:
    h = self.model(input_ids, valid)
    if not logits:
      return h
    return self.head(h)

  def head(self, h: Array) -> Array:
    """[..., D] final-norm output -> [..., V] logits (tied or own head, final soft-cap).

    Callable on its own (`apply(..., method='head')`), e.g. on chunks of positions.
    """
    if self.config.tie_word_embeddings:
      out = self.model.variables['params']['embed_tokens']['embedding']
      out = layers.einsum('...D,VD->...V', h, out.astype(self.dtype), self.dtype)
    else:
      out = self.lm_head(h)
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      out = jnp.tanh(out / cap) * cap
    return out


def build(config: ModelConfig, dtype: Any = jnp.float32) -> CausalLM:
  return CausalLM(config, dtype)


def abstract_params(config: ModelConfig, dtype: Any = jnp.float32, batch: int = 1, seq: int = 8):
  """The parameter tree as ShapeDtypeStructs, built without allocating any weights."""
  model = build(config, dtype)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  valid = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
  variables = jax.eval_shape(lambda i, v: model.init(jax.random.PRNGKey(0), i, v, logits=True), ids, valid)
  return variables['params']


def random_params(config: ModelConfig, dtype: Any = jnp.float32, seed: int = 0):
  """Random-init parameters (for tests and shape checks, not for measurement)."""
  model = build(config, dtype)
  ids = jnp.zeros((1, 4), jnp.int32)
  return model.init(jax.random.PRNGKey(seed), ids, jnp.ones((1, 4), bool), logits=True)['params']

