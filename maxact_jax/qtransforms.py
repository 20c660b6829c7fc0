"""Weight transforms of `qeval` that leave the model's function unchanged: SmoothQuant
smoothing and a QuaRot-style rotation of the residual stream.

Both rest on the structure of a pre-norm decoder layer, written down here once
(`READS`, `WRITES`): every linear layer of a block either *reads* the block's
normalised input (q/k/v, gate/up, the router, the experts' gate_up, ...) or
*writes* into the residual stream (o_proj, down_proj, the experts' down_proj).

- Smoothing (SmoothQuant, Xiao et al. 2023) divides input channel j of a
  block's normalised input by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and
  multiplies row j of every reading weight by s_j: the norm's weight takes the
  1 / s_j ((1 + w) norms: 1 + w' = (1 + w) / s_j).
- Rotation (QuaRot, Ashkboos et al. 2024) first folds every norm's weight into
  the weights that read it (the final norm's into lm_head, which is untied from
  the embedding if it was tied), so each norm is a plain x / rms(x) and commutes
  with an orthogonal Q (rms(xQ) = rms(x)); then the embedding and every writing
  weight are multiplied by Q on the right (the residual stream becomes x Q) and
  every reading weight by Q^T on the left. Sandwich-norm families (a norm
  between a block's output and the residual add) cannot be rotated this way.
- Q is a randomized Hadamard matrix, diag(random signs) H / sqrt(n), where a
  Hadamard matrix of order n can be built here: Sylvester's for powers of two,
  Paley's constructions (I: order q + 1, q = 3 mod 4 prime; II: order 2(q + 1),
  q = 1 mod 4 prime) and Kronecker products of them (576 = 36 x 16 with Paley II
  for q = 17). Otherwise (n not a multiple of 4, or no construction known here)
  the largest Hadamard factor of n is taken as a Kronecker product with a Haar
  random orthogonal matrix of the remaining factor. Why: a single outlier
  channel of size v becomes the entries v Q_j. of one row, and a Hadamard
  matrix makes them all v / sqrt(n), the smallest largest entry an orthogonal
  matrix can have; a random orthogonal n x n matrix has a largest entry about
  sqrt(2 ln(n^2) / n) (0.21 for n = 576 against 1 / 24 = 0.042), and a
  Kronecker product with a small random block keeps most of the Hadamard's
  spread (`incoherence` gives the figure).
- The down projections' input (`rotate_down`, QuaRot's online rotation): the
  intermediate activation of every MLP is multiplied by Q on the fly (a few
  small products, one per Kronecker factor) and every down projection by Q^T:
  the residual rotation never reaches this input, where massive activations
  are born.

All arithmetic is float32 (matmuls at HIGHEST precision) and the results are
cast back to the parameters' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxact_jax.config import ModelConfig
from maxact_jax.errors import UserError
from maxact_jax.models import transformer

Array = jax.Array
Params = dict[str, Any]
HIGHEST = jax.lax.Precision.HIGHEST

# A block of a decoder layer -> its linear weights that read the block's normalised
# input, and those that write into the residual stream. `experts/...` names are
# parameters themselves (the stacked experts); others are modules holding `kernel`.
READS: dict[str, tuple[str, ...]] = {
    'self_attn': ('q_proj', 'k_proj', 'v_proj'),
    'linear_attn': ('in_proj_qkv', 'in_proj_z', 'in_proj_b', 'in_proj_a'),
    'mlp': ('gate_proj', 'up_proj', 'gate', 'router', 'experts/gate_up_proj', 'shared_expert/gate_proj',
            'shared_expert/up_proj', 'shared_experts/gate_proj', 'shared_experts/up_proj', 'shared_expert_gate'),
}
WRITES: dict[str, tuple[str, ...]] = {
    'self_attn': ('o_proj',),
    'linear_attn': ('out_proj',),
    'mlp': ('down_proj', 'experts/down_proj', 'shared_expert/down_proj', 'shared_experts/down_proj'),
}
# Readers that make routing decisions rather than compute activations: kept in the
# run's dtype unless a scheme asks for them (`+router`).
GATES = ('gate', 'router', 'shared_expert_gate')
# Parameters of a block that neither read nor write the residual stream (untouched by
# the transforms): per-head norms, attention sinks, the linear attention's internals,
# routing biases, and the biases of reading weights.
INTERNAL = {
    'self_attn': ('q_norm', 'k_norm', 'sinks'),
    'linear_attn': ('conv1d', 'A_log', 'dt_bias', 'norm'),
    'mlp': ('gate/e_score_correction_bias', 'gate/bias', 'router/bias', 'experts/gate_up_proj_bias'),
}
# The recorded linear inputs (qeval's sites) that are a block's normalised input.
READ_SITES = {
    'self_attn': ('self_attn.qkv_proj',),
    'linear_attn': ('linear_attn.in_proj',),
    'mlp': ('mlp.gate_up_proj', 'mlp.experts.gate_up_proj'),
}
ATTENTION_NORM = 'input_layernorm'


def mlp_norm(layer: Params) -> str:
  """The norm before the MLP block: pre_feedforward_layernorm (sandwich norms) or post_attention_layernorm."""
  return 'pre_feedforward_layernorm' if 'pre_feedforward_layernorm' in layer else 'post_attention_layernorm'


def _get(tree: Params, path: str):
  for k in path.split('/'):
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: Params, path: str, value) -> None:
  keys = path.split('/')
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def _copy(tree):
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _stacked(name: str) -> bool:
  return name.startswith('experts/')


def kernel_path(name: str) -> str:
  return name if _stacked(name) else f'{name}/kernel'


def bias_path(name: str) -> str:
  return f'{name}_bias' if _stacked(name) else f'{name}/bias'


@dataclasses.dataclass
class LayerView:
  """One decoder layer kind inside a scanned segment: its parameter subtree (leaves
  stacked along the segment's repeats) and the model layer of each repeat."""

  tree: Params
  layers: np.ndarray  # [repeats] layer indices

  def blocks(self) -> Iterator[tuple[str, str]]:
    """(block, the norm before it) for every block of the layer."""
    for block in ('self_attn', 'linear_attn'):
      if block in self.tree:
        yield block, ATTENTION_NORM
    if 'mlp' in self.tree:
      yield 'mlp', mlp_norm(self.tree)

  def readers(self, block: str) -> list[str]:
    return [f'{block}/{kernel_path(n)}' for n in READS[block] if _get(self.tree[block], kernel_path(n)) is not None]

  def writers(self, block: str) -> list[tuple[str, str | None]]:
    """(kernel path, bias path or None) of the block's writing weights."""
    out = []
    for n in WRITES[block]:
      if _get(self.tree[block], kernel_path(n)) is not None:
        bias = bias_path(n) if _get(self.tree[block], bias_path(n)) is not None else None
        out.append((f'{block}/{kernel_path(n)}', None if bias is None else f'{block}/{bias}'))
    return out

  def check_complete(self) -> None:
    """Every parameter of every block is a reader, a writer or a known internal: a family
    with a weight of another role cannot be transformed without a rule for it."""
    for block, _ in self.blocks():
      known = set()
      for n in READS[block]:
        known |= {kernel_path(n), bias_path(n)}
      for n in WRITES[block]:
        known |= {kernel_path(n), bias_path(n)}
      for path, _ in jax.tree_util.tree_flatten_with_path(self.tree[block])[0]:
        name = '/'.join(str(getattr(p, 'key', p)) for p in path)
        if name not in known and not any(name == i or name.startswith(i + '/') for i in INTERNAL[block]):
          raise UserError(f'no rule for the parameter {block}/{name}: it cannot be smoothed or rotated here')


def layer_views(config: ModelConfig, params: Params) -> Iterator[LayerView]:
  """Every decoder layer kind of the model (mutable subtrees of `params`)."""
  for seg in transformer.plan_segments(config):
    seg_tree = params['model'][seg.name]
    for slot in range(seg.period):
      tree = seg_tree if seg.period == 1 else seg_tree[seg.slot_name(slot)]
      yield LayerView(tree, np.array([seg.layer(r, slot) for r in range(seg.repeats)]))


def _f32(a):
  return jnp.asarray(a, jnp.float32)


def _scale_rows(w: Array, s: Array) -> Array:
  """w [R, ..., in, out] with input row j of repeat r times s[r, j] (s [R, in])."""
  s = s.reshape(s.shape[:1] + (1,) * (w.ndim - 3) + s.shape[1:] + (1,))
  return (_f32(w) * s).astype(w.dtype)


# ---------------------------------------------------------------------------
# Smoothing.


def smoothing_factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
  """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); 1 where either is 0
  (a channel that never fires, or that no weight reads, is left alone)."""
  x = np.asarray(x_max, np.float64)
  w = np.asarray(w_max, np.float64)
  ok = (x > 0) & (w > 0)
  s = np.where(ok, np.power(np.where(ok, x, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1.0 - alpha), 1.0)
  return s.astype(np.float32)


def smooth(config: ModelConfig, params: Params, input_max: dict[str, dict[int, np.ndarray]],
           alpha: float) -> tuple[Params, dict[str, np.ndarray]]:
  """Smooth every block's normalised input with strength alpha.

  input_max: per recorded site (`READ_SITES`), layer -> per-channel max |x| [D] on
  the calibration samples. Returns the new parameters and the factors s per
  block site ('layer_{i}_<site>' -> [D]).
  """
  params = _copy(params)
  offset = config.norm_offset
  factors = {}
  for view in layer_views(config, params):
    view.check_complete()
    for block, norm in view.blocks():
      sites = [s for s in READ_SITES[block] if s in input_max]
      x_max = np.stack([np.max([input_max[s][int(l)] for s in sites if int(l) in input_max[s]], axis=0)
                        for l in view.layers])  # [R, D]
      readers = view.readers(block)
      w_max = np.max([np.abs(np.asarray(_get(view.tree, r), np.float32)).max(
          axis=tuple(range(1, _get(view.tree, r).ndim - 2)) + (-1,)) for r in readers], axis=0)  # [R, D]
      s = smoothing_factors(x_max, w_max, alpha)
      for r, layer in enumerate(view.layers):
        factors[f'layer_{int(layer)}_{sites[0]}'] = s[r]
      s = jnp.asarray(s)
      w = view.tree[norm]['weight']
      view.tree[norm]['weight'] = ((offset + _f32(w)) / s - offset).astype(w.dtype)
      for r in readers:
        _set(view.tree, r, _scale_rows(_get(view.tree, r), s))
  return params, factors


# ---------------------------------------------------------------------------
# Rotation.


def _is_prime(n: int) -> bool:
  return n >= 2 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
  squares = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley1(q: int) -> np.ndarray:
  """Order q + 1 (q = 3 mod 4 prime): I + [[0, 1^T], [-1, Q]] (skew)."""
  s = np.zeros((q + 1, q + 1), np.int64)
  s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
  return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
  """Order 2(q + 1) (q = 1 mod 4 prime): from the symmetric conference matrix C,
  C x [[1, 1], [1, -1]] + I x [[1, -1], [-1, -1]]."""
  c = np.zeros((q + 1, q + 1), np.int64)
  c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
  return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


_H2 = np.array([[1, 1], [1, -1]], np.int64)
# A rotation applied on the fly multiplies by its Kronecker factors one at a time;
# consecutive factors are merged up to this order (fewer passes, small products).
MAX_FACTOR = 64


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[np.ndarray, ...] | None:
  """Hadamard matrices (+-1) whose Kronecker product is one of order n, or None where
  none is built here: Sylvester steps first (order 2), then Paley I or II of the order
  left, then a product of two smaller ones."""
  if n == 1:
    return ()
  if n == 2:
    return (_H2,)
  if n % 4:
    return None  # none exists
  half = hadamard_factors(n // 2)
  if half is not None:
    return (_H2,) + half
  if _is_prime(n - 1) and (n - 1) % 4 == 3:
    return (_paley1(n - 1),)
  if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
    return (_paley2(n // 2 - 1),)
  for a in range(3, int(math.isqrt(n)) + 1):
    if n % a == 0:
      fa, fb = hadamard_factors(a), hadamard_factors(n // a)
      if fa is not None and fb is not None:
        return fa + fb
  return None


def _kron_all(factors) -> np.ndarray:
  return functools.reduce(np.kron, factors, np.ones((1, 1), np.int64))


def hadamard(n: int) -> np.ndarray | None:
  """A Hadamard matrix of order n (entries +-1, H H^T = n I), or None where none is built here."""
  factors = hadamard_factors(n)
  return None if factors is None else _kron_all(factors)


def random_orthogonal(n: int, rng: np.random.RandomState) -> np.ndarray:
  """A Haar-distributed random orthogonal matrix (QR of a Gaussian, signs fixed)."""
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))[None, :]


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
  """An orthogonal Q = diag(signs) (F_1 x ... x F_k) of order n, the F_i orthogonal blocks."""

  signs: np.ndarray  # [n] +-1
  factors: tuple[np.ndarray, ...]  # float64, orders multiplying to n
  how: str

  def matrix(self) -> np.ndarray:
    """Q [n, n], float64."""
    return self.signs[:, None] * _kron_all(self.factors)

  def apply(self, x: Array) -> Array:
    """x Q over the last axis, one Kronecker factor at a time (float32, in x's dtype)."""
    sizes = tuple(f.shape[0] for f in self.factors)
    y = (_f32(x) * jnp.asarray(self.signs, jnp.float32)).reshape(x.shape[:-1] + sizes)
    for i, f in enumerate(self.factors):
      axis = y.ndim - len(sizes) + i
      y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(f, jnp.float32), axes=[[axis], [0]], precision=HIGHEST), -1, axis)
    return y.reshape(x.shape).astype(x.dtype)


def _merged(factors: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
  out: list[np.ndarray] = []
  for f in factors:
    if out and out[-1].shape[0] * f.shape[0] <= MAX_FACTOR:
      out[-1] = np.kron(out[-1], f)
    else:
      out.append(np.asarray(f, np.float64))
  return tuple(out)


def rotation(n: int, seed: int = 0) -> Rotation:
  """diag(random signs) H / sqrt(n), or where no Hadamard matrix of order n is built here,
  the largest Hadamard factor of n Kronecker a Haar random orthogonal block of the rest
  (see the module docstring)."""
  rng = np.random.RandomState(seed)
  signs = rng.choice([-1.0, 1.0], n)
  factors = hadamard_factors(n)
  if factors is not None:
    return Rotation(signs, _merged([f / math.sqrt(f.shape[0]) for f in factors]), f'randomized Hadamard of order {n}')
  best = max(d for d in range(1, n + 1) if n % d == 0 and hadamard_factors(d) is not None)
  block = random_orthogonal(n // best, rng)
  return Rotation(signs, _merged([f / math.sqrt(f.shape[0]) for f in hadamard_factors(best)] + [block]),
                  f'Hadamard of order {best} x random orthogonal of order {n // best}')


def rotation_matrix(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
  """(Q [n, n] float64 orthogonal, how it was built): `rotation`'s, as a matrix."""
  r = rotation(n, seed)
  return r.matrix(), r.how


def incoherence(q: np.ndarray) -> float:
  """sqrt(n) max |Q_ij|: 1 for a Hadamard matrix (the least possible), larger otherwise."""
  return float(math.sqrt(q.shape[0]) * np.abs(q).max())


def fold_norms(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
  """Every norm's weight into the weights that read it; the norms become x / rms(x).

  The final norm goes into lm_head; a tied lm_head is untied first (the
  embedding is then no longer its transpose), so the config comes back untied.
  """
  params = _copy(params)
  offset = config.norm_offset
  for view in layer_views(config, params):
    view.check_complete()
    for block, norm in view.blocks():
      if config.sandwich_norms:
        raise UserError(f'{config.model_type} has norms between its blocks and the residual stream '
                        '(sandwich norms): the rotation cannot be folded through them')
      w = view.tree[norm]['weight']
      eff = offset + _f32(w)  # [R, D]
      for r in view.readers(block):
        _set(view.tree, r, _scale_rows(_get(view.tree, r), eff))
      view.tree[norm]['weight'] = jnp.full(w.shape, 1.0 - offset, w.dtype)
  if config.tie_word_embeddings:
    emb = params['model']['embed_tokens']['embedding']
    params['lm_head'] = {'kernel': jnp.transpose(emb)}
    config = dataclasses.replace(config, tie_word_embeddings=False)
  w = params['model']['norm']['weight']
  head = params['lm_head']['kernel']
  params['lm_head']['kernel'] = (_f32(head) * (offset + _f32(w))[:, None]).astype(head.dtype)
  params['model']['norm']['weight'] = jnp.full(w.shape, 1.0 - offset, w.dtype)
  return config, params


def rotate(config: ModelConfig, params: Params, seed: int = 0) -> tuple[ModelConfig, Params, str]:
  """Fold the norms, then rotate the residual stream by Q (`rotation_matrix`):
  returns the (untied) config, the parameters and how Q was built."""
  config, params = fold_norms(config, params)
  rot = rotation(config.hidden_size, seed)
  how = rot.how
  q = jnp.asarray(rot.matrix(), jnp.float32)
  right = lambda a: jnp.einsum('...d,dk->...k', _f32(a), q, precision=HIGHEST).astype(a.dtype)  # x Q
  left = lambda a: jnp.einsum('dk,...do->...ko', q, _f32(a), precision=HIGHEST).astype(a.dtype)  # Q^T W
  emb = params['model']['embed_tokens']
  emb['embedding'] = right(emb['embedding'])
  params['lm_head']['kernel'] = left(params['lm_head']['kernel'])
  for view in layer_views(config, params):
    for block, _ in view.blocks():
      for r in view.readers(block):
        _set(view.tree, r, left(_get(view.tree, r)))
      for k, b in view.writers(block):
        _set(view.tree, k, right(_get(view.tree, k)))
        if b is not None:
          _set(view.tree, b, right(_get(view.tree, b)))
  return config, params, how


def rotate_down(config: ModelConfig, params: Params, seed: int = 0) -> tuple[Params, dict[int, Rotation]]:
  """QuaRot's online rotation of the down projections' input: every MLP writing weight
  (down_proj, the experts' and shared experts') of input width n becomes Q_n^T W, so
  that the model computes the same function when its input is multiplied by Q_n on the
  fly (`Rotation.apply`, at qeval's down_proj sites). Returns the new parameters and
  Q_n by width n."""
  params = _copy(params)
  rotations: dict[int, Rotation] = {}
  for view in layer_views(config, params):
    if 'mlp' not in view.tree:
      continue
    for path, _ in view.writers('mlp'):
      w = _get(view.tree, path)
      rot = rotations.setdefault(w.shape[-2], rotation(w.shape[-2], seed))
      _set(view.tree, path, jnp.swapaxes(rot.apply(jnp.swapaxes(w, -1, -2)), -1, -2))  # (W^T Q)^T = Q^T W
  return params, rotations


def linear_kernels(config: ModelConfig, params: Params, gates: bool) -> list[tuple[LayerView, str]]:
  """Every linear weight of every decoder layer (readers and writers; routers and
  shared-expert gates only with `gates`): the weights a scheme quantizes."""
  out = []
  for view in layer_views(config, params):
    for block, _ in view.blocks():
      names = [n for n in READS[block] + WRITES[block] if gates or n not in GATES]
      out += [(view, f'{block}/{kernel_path(n)}') for n in names
              if _get(view.tree[block], kernel_path(n)) is not None]
  return out


def map_kernels(config: ModelConfig, params: Params, fn, gates: bool) -> Params:
  """A copy of params with fn applied to every linear kernel (see `linear_kernels`)."""
  params = _copy(params)
  for view, path in linear_kernels(config, params, gates):
    _set(view.tree, path, fn(_get(view.tree, path)))
  return params
