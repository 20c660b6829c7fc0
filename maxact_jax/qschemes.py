"""Quantization schemes of `qeval`: the grammar of a scheme's name and what it means.

A scheme is written `BASE[+MOD]...` (README, "Quantization impact"):

- BASE: `none` (no quantization: transforms only), `w<W>a<A>`, `w<W>` (weights
  only) or `a<A>` (activations only), with W, A one of 2..8 (symmetric
  INT<bits>), `fp8` (e4m3) or `16` (bfloat16), or a preset;
- activation scale: `token` (per-token dynamic, the default), `tensor`
  (per-tensor dynamic: one scale per batch), `static` (per-tensor static, the
  calibrated max |x|), `clip<q>` (per-tensor static, the calibrated q-quantile
  of |x|, as `quant` calibrates it);
- weight scale: `wchannel` (per output channel, the default), `wtensor`,
  `g<N>` (groups of N input channels per output channel);
- transforms: `smooth<alpha>` (SmoothQuant), `rotate[<seed>]` (a randomized
  Hadamard rotation of the residual stream), `rotdown[<seed>]` (an online one of
  the down projections' input);
- extra sites: `router` (the MoE router and shared-expert gate), `attn` (the
  attention products' operands q, k, v).

The number formats and scales are `fakequant`'s (scale = threshold /
(2^(bits-1) - 1) for INT, threshold / 448 for FP8 e4m3 with a saturating cast,
round half to even); `16` is a round trip through bfloat16.
"""

from __future__ import annotations

import dataclasses
import re

from maxact_jax import fakequant
from maxact_jax.errors import UserError
from maxact_jax.fakequant import ACT_SCALES, BF16, NONE, ActSpec, WeightSpec

INT_BITS = (2, 8)  # the INT<bits> formats a scheme may ask for

# Named presets, as what deployers run: each is a name for its expansion.
PRESETS: dict[str, str] = {
    'w8a8': 'w8a8',  # INT8 per-channel weights, INT8 per-token dynamic activations
    'w8a8-static': 'w8a8+static',  # ... per-tensor static activations (calibrated max |x|)
    'fp8-dynamic': 'wfp8afp8',  # FP8 e4m3 per-channel weights, per-token dynamic activations
    'fp8-static': 'wfp8afp8+wtensor+static',  # FP8 per-tensor weights, per-tensor static activations
    'a8-naive': 'a8+tensor',  # weights untouched, INT8 per-tensor dynamic activations
    'w4a16': 'w4a16+g128',  # INT4 weights in groups of 128, activations untouched
    'w4a4': 'w4a4',  # INT4 per-channel weights, INT4 per-token dynamic activations
}
DEFAULT_SCHEMES = ('none', 'w8a8', 'w8a8-static', 'w8a8-static+clip0.999', 'a8-naive', 'fp8-dynamic',
                   'fp8-static', 'w4a16', 'w4a4', 'w4a4+rotate', 'w8a8-static+smooth0.5',
                   'w8a8-static+smooth0.8')

_BASE_RE = re.compile(r'^(?:w(\d+|fp8))?(?:a(\d+|fp8))?$')
_NUMBER = r'(\d+(?:\.\d*)?|\.\d+)'


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One scheme of the command line: `name` as given, what it means."""

  name: str
  weights: WeightSpec
  acts: ActSpec
  rotate: int | None = None  # the seed of the residual rotation, or None
  rotate_down: int | None = None  # the seed of the down projections' input rotation, or None
  smooth: float | None = None  # SmoothQuant's alpha, or None
  router: bool = False
  attention: bool = False

  @property
  def transforms(self) -> tuple[str, ...]:
    """The weight transforms, in the order they are applied (rotations first)."""
    out = []
    if self.rotate is not None:
      out.append(f'rotate{self.rotate}')
    if self.rotate_down is not None:
      out.append(f'rotdown{self.rotate_down}')
    if self.smooth is not None:
      out.append(f'smooth{self.smooth:g}')
    return tuple(out)

  def describe(self) -> dict:
    w, a = self.weights, self.acts
    return {
        'weights': {'format': w.fmt, 'scale': w.scale if w.fmt not in (NONE, BF16) else None,
                    'group': w.group},
        'activations': {'format': a.fmt, 'scale': a.scale if a.fmt not in (NONE, BF16) else None,
                        'threshold': (None if not a.static else
                                      'max_abs' if a.clip is None else fakequant.policy_name('clip', a.clip))},
        'rotate_seed': self.rotate,
        'rotate_down_seed': self.rotate_down,
        'smooth_alpha': self.smooth,
        'router': self.router,
        'attention': self.attention,
    }


def _fmt_of(token: str, side: str, scheme: str) -> str:
  if token == 'fp8':
    return fakequant.FP8_E4M3.name
  bits = int(token)
  if bits == 16:
    return BF16
  if not INT_BITS[0] <= bits <= INT_BITS[1]:
    raise UserError(f'scheme {scheme!r}: {side} bits {bits} out of range (INT {INT_BITS[0]} to {INT_BITS[1]}, '
                    f'16 for bfloat16, or fp8)')
  return f'int{bits}'


def parse_scheme(name: str) -> Scheme:
  """A scheme from its command-line name (see the module docstring and the README)."""
  text = name.strip()
  if not text:
    raise UserError('an empty scheme name (schemes are comma-separated, e.g. --schemes=w8a8,w4a4+rotate)')
  base, *mods = text.split('+')
  base, *preset_mods = PRESETS.get(base, base).split('+')
  mods = [(m, True) for m in preset_mods] + [(m, False) for m in mods]  # the user's win over a preset's
  if base == NONE:
    wfmt = afmt = NONE
  else:
    m = _BASE_RE.match(base)
    if not m or not base:
      raise UserError(f'unknown scheme {name!r}: a scheme is none, w<bits>a<bits>, w<bits> or a<bits> (bits 2-8, '
                      f'16 or fp8) or one of {", ".join(PRESETS)}, followed by +modifiers')
    wfmt = _fmt_of(m.group(1), 'weight', name) if m.group(1) else NONE
    afmt = _fmt_of(m.group(2), 'activation', name) if m.group(2) else NONE
  act_scale = clip = weight_scale = group = rotate = rotate_down = smooth = None
  router = attention = False
  seen: set[str] = set()

  def once(kind: str, mod: str, from_preset: bool):
    if kind in seen:
      raise UserError(f'scheme {name!r}: more than one {kind} modifier ({mod!r})')
    if not from_preset:
      seen.add(kind)

  for mod, from_preset in mods:
    if mod in ACT_SCALES:
      once('activation scale', mod, from_preset)
      act_scale, clip = mod, None
    elif (cm := re.fullmatch(r'clip' + _NUMBER, mod)):
      once('activation scale', mod, from_preset)
      act_scale, clip = 'static', float(cm.group(1))
      if not 0.0 < clip < 1.0:
        raise UserError(f'scheme {name!r}: the clip quantile must be in (0, 1), got {clip:g}')
    elif mod in ('wchannel', 'wtensor'):
      once('weight scale', mod, from_preset)
      weight_scale, group = mod[1:], None
    elif (gm := re.fullmatch(r'g(\d+)', mod)):
      once('weight scale', mod, from_preset)
      weight_scale, group = 'group', int(gm.group(1))
      if group < 1:
        raise UserError(f'scheme {name!r}: the weight group size must be positive, got {group}')
    elif (sm := re.fullmatch(r'smooth' + _NUMBER, mod)):
      once('smooth', mod, from_preset)
      smooth = float(sm.group(1))
      if not 0.0 <= smooth <= 1.0:
        raise UserError(f'scheme {name!r}: SmoothQuant alpha must be in [0, 1], got {smooth:g}')
    elif (rm := re.fullmatch(r'rotate(\d*)', mod)):
      once('rotate', mod, from_preset)
      rotate = int(rm.group(1) or 0)
    elif (rm := re.fullmatch(r'rotdown(\d*)', mod)):
      once('rotdown', mod, from_preset)
      rotate_down = int(rm.group(1) or 0)
    elif mod == 'router':
      once('router', mod, from_preset)
      router = True
    elif mod == 'attn':
      once('attn', mod, from_preset)
      attention = True
    else:
      raise UserError(f'scheme {name!r}: unknown modifier {mod!r} (token, tensor, static, clip<q>, wchannel, '
                      f'wtensor, g<N>, smooth<alpha>, rotate[<seed>], rotdown[<seed>], router, attn)')
  if act_scale is not None and afmt in (NONE, BF16):
    raise UserError(f'scheme {name!r}: an activation scale ({act_scale}) needs quantized activations '
                    f'(a2-a8 or afp8)')
  if weight_scale is not None and wfmt in (NONE, BF16):
    raise UserError(f'scheme {name!r}: a weight scale needs quantized weights (w2-w8 or wfp8)')
  if (router or attention) and afmt == NONE and wfmt == NONE:
    raise UserError(f'scheme {name!r}: router/attn quantize nothing without a format')
  return Scheme(name=text, weights=WeightSpec(wfmt, weight_scale or 'channel', group),
                acts=ActSpec(afmt, act_scale or 'token', clip), rotate=rotate, rotate_down=rotate_down, smooth=smooth,
                router=router, attention=attention)


def parse_schemes(names: list[str]) -> list[Scheme]:
  if not names:
    raise UserError('--schemes is empty: give at least one scheme, e.g. --schemes=w8a8,w4a4+rotate')
  schemes = [parse_scheme(n) for n in names]
  dup = {s.name for s in schemes if [t.name for t in schemes].count(s.name) > 1}
  if dup:
    raise UserError(f'--schemes names {sorted(dup)[0]!r} twice')
  return schemes


