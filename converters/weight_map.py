"""The shared machinery of the declarative weight maps.

Flax submodules carry the Hugging Face names, so most parameters map by one
rule: the Flax path `a/b/kernel` is the checkpoint tensor `a.b.weight`,
transposed; `embedding`, `weight`, `bias` keep their name. A family's map
(`WeightMap`) lists only what differs: renamed or fused tensors, tensors
stacked from several checkpoint entries (MoE experts), dequantisation, and the
checkpoint tensors it skips on purpose (a vision tower), each with a reason.

`plan` turns a config into one `ParamPlan` per Flax parameter before any
weight is read, and refuses a checkpoint with a tensor left unused or a
parameter left unfilled. `load` then streams tensor by tensor: each Flax
parameter is assembled in one host buffer, handed to the device and released,
so the host never holds two copies of the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from converters.gguf_io import GGUFCheckpoint
from converters.safetensors_io import Checkpoint
from maxact_jax import gguf_file
from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.models import transformer


def identity(a: np.ndarray) -> np.ndarray:
  return a


def transpose(a: np.ndarray) -> np.ndarray:
  """HF Linear weight [out, in] -> Flax kernel [in, out]."""
  return a.T


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One Flax array (or one layer's row of a stacked array) from checkpoint tensors."""

  keys: tuple[str, ...]
  build: Callable[..., np.ndarray] = identity  # (*tensors) -> array


@dataclasses.dataclass(frozen=True)
class OneOf:
  """Alternative checkpoint layouts of one array (per-expert tensors or one fused
  tensor; MXFP4 blocks and scales or plain weights): the first option whose tensors
  all exist in the checkpoint is used (`resolve`)."""

  options: tuple[Recipe, ...]

  @property
  def keys(self) -> tuple[str, ...]:
    return self.options[0].keys


# A rule maps (checkpoint name of the tensor's owner, e.g. 'model.layers.3.') to a
# Recipe (or OneOf); it is keyed by the Flax path relative to its layer or to the backbone.
Rule = Callable[[str], 'Recipe | OneOf']


def same_name(hf_rel: str, build: Callable[..., np.ndarray] = identity) -> Rule:
  return lambda prefix: Recipe((prefix + hf_rel,), build)


@dataclasses.dataclass(frozen=True)
class Layout:
  """One key layout of a multimodal checkpoint: where its text model sits.

  The same model can come with different tensor names: the hub's original
  names (Gemma3 `language_model.model.layers...`, Qwen2.5-VL `model.layers...`)
  or transformers 5's module names (`model.language_model.layers...`, what
  `save_pretrained(save_original_format=False)` writes). Each is an explicit
  rule; the checkpoint's embedding tensor tells which one applies.
  """

  name: str
  weight_prefix: str  # the backbone's prefix (ModelConfig.weight_prefix)
  lm_head_key: str
  # (regex, reason): the tensors of this layout deliberately left unloaded.
  skip: tuple[tuple[str, str], ...] = ()

  @property
  def anchor(self) -> str:
    """The tensor whose presence identifies the layout."""
    return self.weight_prefix + 'embed_tokens.weight'


@dataclasses.dataclass(frozen=True)
class WeightMap:
  """What a family's checkpoint layout adds to the default naming rule."""

  layer_rules: dict[str, Rule] = dataclasses.field(default_factory=dict)
  model_rules: dict[str, Rule] = dataclasses.field(default_factory=dict)
  # (regex over checkpoint keys, reason): tensors deliberately left unloaded.
  skip: tuple[tuple[str, str], ...] = ()
  # More such (regex, reason) pairs that depend on the config (e.g. MTP layer indices).
  skip_for: Callable[[ModelConfig], tuple[tuple[str, str], ...]] | None = None
  # Checkpoint name of the layer stack under the backbone prefix.
  layers_name: str = 'layers'
  # Alternative key layouts (multimodal checkpoints); empty: the config's prefix.
  layouts: tuple[Layout, ...] = ()


def resolve_layout(config: ModelConfig, wmap: WeightMap, keys: Iterable[str],
                   where: str) -> tuple[ModelConfig, WeightMap]:
  """The config and map for the checkpoint's key layout (unchanged without `layouts`)."""
  if not wmap.layouts:
    return config, wmap
  keys = set(keys)
  found = [layout for layout in wmap.layouts if layout.anchor in keys]
  if len(found) != 1:
    expected = ' or '.join(f'{l.anchor} ({l.name})' for l in wmap.layouts)
    what = 'has none' if not found else 'has several'
    raise UserError(f'{where}: cannot tell the {config.model_type} checkpoint layout: it {what} of {expected}')
  layout = found[0]
  return (dataclasses.replace(config, weight_prefix=layout.weight_prefix, lm_head_key=layout.lm_head_key),
          dataclasses.replace(wmap, skip=wmap.skip + layout.skip))


LEAF_RENAMES = {'kernel': ('weight', transpose), 'embedding': ('weight', identity)}


def default_rule(flax_rel: Sequence[str]) -> Rule:
  *owner, leaf = flax_rel
  hf_leaf, build = LEAF_RENAMES.get(leaf, (leaf, identity))
  return same_name('.'.join([*owner, hf_leaf]), build)


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: Any
  recipes: tuple[Recipe, ...]  # one per row when stacked
  stacked: bool

  @property
  def name(self) -> str:
    return '/'.join(self.path)


def _rule(rules: dict[str, Rule], rel: Sequence[str]) -> Rule:
  return rules.get('/'.join(rel)) or default_rule(rel)


def one_of(*rules: Rule) -> Rule:
  """A rule for a tensor the family's checkpoints store in several ways (fused or
  per-expert experts, say): the first option the checkpoint holds is used."""
  return lambda prefix: OneOf(tuple(rule(prefix) for rule in rules))


def plan(config: ModelConfig, wmap: WeightMap, dtype: Any = jnp.float32,
         available: Iterable[str] | None = None) -> list[ParamPlan]:
  """One ParamPlan per Flax parameter of the model built from `config`.

  `available` (the checkpoint's tensor names) picks among OneOf alternatives.
  """
  abstract = transformer.abstract_params(config, dtype)
  segments = {s.name: s for s in transformer.plan_segments(config)}
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  plans = []
  for key_path, leaf in flat:
    path = tuple(k.key for k in key_path)
    if path[0] == 'lm_head':
      recipe = Recipe((config.lm_head_key,), transpose)
      plans.append(ParamPlan(path, leaf.shape, leaf.dtype, (recipe,), False))
      continue
    assert path[0] == 'model', path
    seg = segments.get(path[1])
    if seg is None:
      recipes = (_rule(wmap.model_rules, path[1:])(config.weight_prefix),)
      plans.append(ParamPlan(path, leaf.shape, leaf.dtype, recipes, False))
      continue
    slot, rel = 0, path[2:]
    if seg.period > 1:
      slot, rel = int(path[2][len('slot_'):]), path[3:]
    owners = [f'{config.weight_prefix}{wmap.layers_name}.{seg.layer(r, slot)}.' for r in range(seg.repeats)]
    rule = _rule(wmap.layer_rules, rel)
    recipes = tuple(rule(owner) for owner in owners)
    plans.append(ParamPlan(path, leaf.shape, leaf.dtype, recipes, True))
  return resolve(plans, available) if available is not None else plans


def resolve(plans: Iterable[ParamPlan], available: Iterable[str]) -> list[ParamPlan]:
  """Pick, for every OneOf, the first layout whose tensors the checkpoint has (else the
  first layout, so that a missing tensor is reported in its terms)."""
  available = set(available)

  def pick(r):
    if not isinstance(r, OneOf):
      return r
    return next((o for o in r.options if all(k in available for k in o.keys)), r.options[0])

  return [dataclasses.replace(p, recipes=tuple(pick(r) for r in p.recipes)) for p in plans]


def skip_patterns(wmap: WeightMap, config: ModelConfig) -> tuple[tuple[str, str], ...]:
  return tuple(wmap.skip) + (tuple(wmap.skip_for(config)) if wmap.skip_for else ())


def check_coverage(plans: Iterable[ParamPlan], available: Iterable[str], wmap: WeightMap,
                   config: ModelConfig, where: str) -> None:
  """Every referenced tensor exists; every tensor is referenced or skipped on purpose."""
  available = set(available)
  plans = resolve(plans, available)
  wanted = [k for p in plans for r in p.recipes for k in r.keys]
  missing = [k for k in wanted if k not in available]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise UserError(f'{where}: checkpoint is missing tensor {missing[0]}{more}')
  skips = [re.compile(pattern) for pattern, _ in skip_patterns(wmap, config)]
  if config.tie_word_embeddings:
    # A tied checkpoint may still store the head; it is the embedding by definition.
    skips.append(re.compile(re.escape(config.lm_head_key) + '$'))
  used = set(wanted)
  unused = sorted(k for k in available - used if not any(s.match(k) for s in skips))
  if unused:
    more = f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''
    raise UserError(f'{where}: checkpoint tensor {unused[0]}{more} is not used by the '
                    f'{config.model_type} weight map')


def _np_dtype(dtype) -> np.dtype:
  return np.dtype(jnp.dtype(dtype))


def row_shape(p: ParamPlan) -> tuple[int, ...]:
  """Shape of one recipe's output: a layer's row of a stacked parameter, or the whole one."""
  return tuple(p.shape[1:]) if p.stacked else tuple(p.shape)


def build_row(read: Callable[[str], np.ndarray], p: ParamPlan, r: int, where: str) -> np.ndarray:
  """Recipe r of a parameter from the tensors `read` returns, shape-checked (not yet cast)."""
  recipe = p.recipes[r]
  arr = recipe.build(*(read(k) for k in recipe.keys))
  if tuple(arr.shape) != row_shape(p):
    what = ', '.join(recipe.keys)
    raise UserError(f'{where}: tensor {what} has shape {tuple(arr.shape)} after conversion, '
                    f'but {p.name} needs {row_shape(p)}')
  return arr


def build_param(ckpt: Checkpoint, p: ParamPlan) -> np.ndarray:
  """Assemble one Flax parameter in a single host buffer."""
  out = np.empty(p.shape, _np_dtype(p.dtype))
  for r in range(len(p.recipes)):
    target = out[r] if p.stacked else out
    target[...] = build_row(ckpt.read, p, r, ckpt.model_dir)  # casts (bf16 <-> f32 by round-to-nearest-even, like torch)
  return out


def open_checkpoint(model_path: str, config: ModelConfig) -> Checkpoint | GGUFCheckpoint:
  """The checkpoint's tensors under Hugging Face names: a GGUF file (see gguf_io), else
  the safetensors of a Hugging Face directory."""
  path = gguf_file.find(model_path)
  return GGUFCheckpoint(path, config) if path else Checkpoint(model_path)


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def load(model_dir: str, config: ModelConfig, wmap: WeightMap, dtype: Any = jnp.float32,
         place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None) -> dict:
  """Stream a checkpoint into a Flax parameter tree.

  `place(path, host_array)` puts each finished parameter where it belongs
  (default: `jax.device_put`); the host buffer is dropped right after.
  """
  ckpt = open_checkpoint(model_dir, config)
  config, wmap = resolve_layout(config, wmap, ckpt.keys(), model_dir)
  plans = plan(config, wmap, dtype, ckpt.keys())
  check_coverage(plans, ckpt.keys(), wmap, config, model_dir)
  place = place or (lambda path, a: jax.device_put(a))
  flat = {}
  for p in plans:
    host = build_param(ckpt, p)
    flat[p.path] = place(p.path, host)
    del host
  ckpt.close()
  return unflatten(flat)
