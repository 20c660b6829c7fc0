"""Taps: every module call the reference hooks, seen through `nn.intercept_methods`.

The interceptor names each module call after the reference's forward hooks
(`embedding_output`, `layer_{i}_attn_output`, ...), hands the call's output to a
*handler*, and sows what the handler returns into the `taps` collection. The
handler decides what a tap becomes:

- `reduce_handler`: the statistics of `maxact_jax.stats.tap_partial`, reduced on
  device (the measurement step; raw activations never leave the device);
- `raw_handler`: the activation itself (crosscheck against PyTorch);
- a custom handler may also *replace* the output (interventions), since the
  model continues with whatever the handler gives back.

Inside a scanned segment the sown values are stacked along the repeat axis;
`collect` un-stacks them and names them per layer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax import stats
from maxact_jax.config import ModelConfig
from maxact_jax.models import transformer

Array = jax.Array

# Module path relative to the decoder layer -> tap suffix (layer_{i}_<suffix>).
LAYER_TAPS: dict[tuple[str, ...], str] = {
    (): 'hidden',
    ('self_attn',): 'attn_output',
    ('linear_attn',): 'attn_output',
    ('attention',): 'attn_output',
    ('mlp',): 'mlp_output',
    ('mlp', 'gate_proj'): 'mlp_gate',
    ('mlp', 'gate'): 'moe_gate',
    ('mlp', 'router'): 'moe_gate',
    # Gated DeltaNet internals (beyond the reference): the output gate's pre-activation
    # and the delta rule's read-out before the gated norm.
    ('linear_attn', 'in_proj_z'): 'linear_attn_gate',
    ('linear_attn', 'delta_rule'): 'linear_attn_core',
    # Probe points of the MoE block (models/moe.py).
    ('mlp', 'router_logits'): 'router_logits',
    ('mlp', 'moe_experts'): 'moe_experts',
}
# Taps whose value is a dict with their own reduction (not an activation array).
STRUCTURED_TAPS = {'moe_experts': stats.moe_partial}
# Module path relative to the backbone -> tap name.
MODEL_TAPS: dict[tuple[str, ...], str] = {
    ('embed_tokens',): 'embedding_output',
    ('norm',): 'final_layernorm',
}
# Forward order of the taps inside one layer: the order in which the reference's
# hooks first fire (a hook fires when its module returns). The JSON keeps it.
LAYER_TAP_ORDER = ('attn_output', 'mlp_gate', 'moe_gate', 'mlp_output', 'router_logits', 'hidden')

COLLECTION = 'taps'


@dataclasses.dataclass(frozen=True)
class TapCall:
  """One intercepted tap: its name inside the layer (or model) and the layer index."""

  suffix: str  # 'hidden', 'attn_output', ... or a model-level name
  in_layer: bool
  layer_index: Array | None  # traced int32 inside a scanned layer


Handler = Callable[[TapCall, Array], tuple[Array, Any]]
"""(tap, output) -> (output to continue with, value to sow or None)."""


@dataclasses.dataclass(frozen=True)
class ModuleCall:
  """One intercepted module call: the module, where it sits, and the layer it runs in.

  `path` is the module's path relative to its decoder layer (`in_layer`) or to
  the backbone, e.g. ('self_attn', 'o_proj') or ('norm',); None for modules
  outside both (the language-model head).
  """

  module: nn.Module
  path: tuple[str, ...] | None
  in_layer: bool
  layer_index: Array | None  # traced int32 inside a scanned layer


CallHandler = Callable[[ModuleCall, Callable, tuple, dict], Any]
"""(call, next_fun, args, kwargs) -> the call's output (usually next_fun(*args, **kwargs))."""


def module_path(module: nn.Module) -> tuple[tuple[str, ...] | None, bool]:
  """A module's path relative to its decoder layer or the backbone, and whether it is in a layer."""
  rel: list[str] = []
  m = module
  while m is not None:
    if getattr(m, 'IS_LAYER', False):
      return tuple(reversed(rel)), True
    if getattr(m, 'IS_BACKBONE', False):
      return tuple(reversed(rel)), False
    rel.append(m.name)
    m = m.parent
  return None, False


def tap_suffix(call: ModuleCall) -> str | None:
  """The tap a module call is (its suffix inside the layer, or its model-level name), or None."""
  if call.path is None:
    return None
  return (LAYER_TAPS if call.in_layer else MODEL_TAPS).get(call.path)


def module_interceptor(on_call: CallHandler):
  """An `nn.intercept_methods` interceptor that hands every module `__call__` inside
  the model to `on_call`, with the module's path and the traced layer index."""
  layer_stack: list[Array] = []

  def intercept(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    module = context.module
    path, in_layer = module_path(module)
    if getattr(module, 'IS_LAYER', False):
      layer_index = args[1][2]  # xs = (window, rope_index, layer_index)
      layer_stack.append(layer_index)
      try:
        return on_call(ModuleCall(module, path, in_layer, layer_index), next_fun, args, kwargs)
      finally:
        layer_stack.pop()
    layer_index = layer_stack[-1] if in_layer and layer_stack else None
    return on_call(ModuleCall(module, path, in_layer, layer_index), next_fun, args, kwargs)

  return intercept


def interceptor(handler: Handler):
  """An `nn.intercept_methods` interceptor that routes every tap through `handler`."""

  def on_call(call: ModuleCall, next_fun, args, kwargs):
    out = next_fun(*args, **kwargs)
    suffix = tap_suffix(call)
    if suffix is None:
      return out
    value = out[0] if isinstance(out, tuple) else out
    new_value, sown = handler(TapCall(suffix, call.in_layer, call.layer_index), value)
    if sown is not None:
      call.module.sow(COLLECTION, suffix, sown)
    if new_value is not value:
      out = (new_value,) + tuple(out[1:]) if isinstance(out, tuple) else new_value
    return out

  return module_interceptor(on_call)


_LAYER_NAME = re.compile(r'^layer_(\d+)_(.+)$')


def split_tap(name: str) -> tuple[str, str, int | None]:
  """A collected name: 'layer_3_hidden' -> ('layer', 'hidden', 3); 'final_layernorm' -> ('model', name, None)."""
  m = _LAYER_NAME.match(name)
  if m:
    return 'layer', m.group(2), int(m.group(1))
  return 'model', name, None


def full_stats_for(suffix: str, in_layer: bool) -> bool:
  name = f'layer_0_{suffix}' if in_layer else suffix
  return stats.is_activation_tap(name)


def reduce_handler(valid: Array, top_k: int = stats.TOP_K, anatomy: bool = False) -> Handler:
  """Sow each tap's on-device statistics (the measurement step).

  Each tap is reduced where it is produced, so XLA can free the activation
  right after (stacking a layer's same-shaped taps into one vmapped reduction
  was measured slower on CPU: 1.51x vs 1.33x the bare forward pass, and a
  longer compile).

  With `anatomy`, the residual stream (`hidden`) also keeps its per-channel
  max |x| and per-token Sun flags (`stats.ANATOMY_KEYS`).
  """

  def handle(call: TapCall, x: Array):
    if call.suffix in STRUCTURED_TAPS:
      return x, STRUCTURED_TAPS[call.suffix](x, valid)
    full = full_stats_for(call.suffix, call.in_layer) and x.ndim == 3
    keep = anatomy and full and call.in_layer and call.suffix == 'hidden'
    return x, stats.tap_partial(x, valid, full=full, top_k=top_k, anatomy=keep)

  return handle


def raw_handler(dtype=jnp.float32) -> Handler:
  """Sow each tap's raw output (for comparisons on small batches only)."""

  def handle(call: TapCall, x: Array):
    del call
    return x, jax.tree_util.tree_map(lambda a: a.astype(dtype), x)

  return handle


# ---------------------------------------------------------------------------
# Naming the sown tree.


def collect(config: ModelConfig, sown: dict[str, Any]) -> dict[str, Any]:
  """Flatten the `taps` collection to {tap name: value} in forward order.

  Values sown inside a scanned segment have a leading repeat axis, which is
  split here into one entry per layer.
  """
  segments = {s.name: s for s in transformer.plan_segments(config)}
  per_layer: dict[int, dict[str, Any]] = {}
  model_level: dict[str, Any] = {}
  backbone = sown.get('model', {})

  def walk(tree: dict[str, Any], seg: transformer.Segment | None, slot: int):
    for key, sub in tree.items():
      if isinstance(sub, tuple):  # a sown leaf: (value,)
        value = sub[0]
        if seg is None:
          model_level[key] = value
          continue
        for r in range(seg.repeats):
          layer = seg.layer(r, slot)
          per_layer.setdefault(layer, {})[key] = jax.tree_util.tree_map(lambda a: _row(a, r), value)
      elif seg is None and key in segments:
        walk(sub, segments[key], 0)
      elif seg is not None and seg.period > 1 and key.startswith('slot_') and slot == 0 and key[5:].isdigit():
        walk(sub, seg, int(key[5:]))
      else:
        walk(sub, seg, slot)

  walk(backbone, None, 0)
  out: dict[str, Any] = {}
  if 'embedding_output' in model_level:
    out['embedding_output'] = model_level.pop('embedding_output')
  for layer in sorted(per_layer):
    taps = per_layer[layer]
    for suffix in sorted(taps, key=lambda s: (LAYER_TAP_ORDER.index(s) if s in LAYER_TAP_ORDER
                                              else len(LAYER_TAP_ORDER) - 1, s)):
      out[f'layer_{layer}_{suffix}'] = taps[suffix]
  if 'final_layernorm' in model_level:
    out['final_layernorm'] = model_level.pop('final_layernorm')
  out.update(model_level)
  return out


def _row(a, r: int):
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
  return a[r]


def tap_names(config: ModelConfig) -> list[str]:
  """The full list of taps of a model, in forward order, without running it."""
  model = transformer.build(config, jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  valid = jax.ShapeDtypeStruct((1, 4), jnp.bool_)
  params = transformer.abstract_params(config)

  def run(p, i, v):
    with nn.intercept_methods(interceptor(lambda call, x: (x, jnp.zeros((), jnp.float32)))):
      _, sown = model.apply({'params': p}, i, v, mutable=[COLLECTION])
    return sown[COLLECTION]

  sown = jax.eval_shape(run, params, ids, valid)
  return list(collect(config, sown))


def to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)
