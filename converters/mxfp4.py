"""MXFP4 (OCP microscaling FP4) dequantisation in numpy, as gpt-oss checkpoints store experts.

A weight [rows, cols] is stored as `*_blocks` uint8 [rows, G, 16] (two E2M1 values
per byte, low nibble first: 32 values per block of the row) and `*_scales` uint8
[rows, G] (an E8M0 exponent per block, biased by 127). The value of nibble q in a
block with scale s is FP4[q] * 2**(s - 127).

transformers (integrations/mxfp4.py) computes exactly this in torch: a lookup table,
then `ldexp`, i.e. the product with 2.0**(s - 127) evaluated in float32, rounded once
to the target dtype. We do the same product in float32 (so even the E8M0 NaN code
255 behaves alike: 2**128 overflows to inf, and 0 * inf is NaN) and let the caller
cast; the result is bit-identical (tests/test_moe_units.py checks it against
transformers' own function).
"""

from __future__ import annotations

import numpy as np

# E2M1 code -> value (sign bit, 2 exponent bits, 1 mantissa bit).
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """float32 [..., G * 32] from blocks uint8 [..., G, 16] and scales uint8 [..., G]."""
  blocks = np.asarray(blocks, np.uint8)
  scales = np.asarray(scales, np.uint8)
  if blocks.shape[:-1] != scales.shape:
    raise ValueError(f'MXFP4 blocks {blocks.shape} do not match scales {scales.shape}')
  values = np.empty(blocks.shape[:-1] + (2 * blocks.shape[-1],), np.float32)
  values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
  values[..., 1::2] = FP4_VALUES[blocks >> 4]
  with np.errstate(over='ignore', invalid='ignore'):
    factor = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    values *= factor[..., None]
  return values.reshape(scales.shape[:-1] + (-1,))


def quantize(weight: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Pack float weights [..., cols] as (blocks [..., G, 16], scales [..., G]): a test
  helper (round to the nearest E2M1 value after a power-of-two block scale)."""
  w = np.asarray(weight, np.float32)
  *lead, cols = w.shape
  if cols % block:
    raise ValueError(f'{cols} columns are not a multiple of the block size {block}')
  g = w.reshape(*lead, cols // block, block)
  amax = np.abs(g).max(-1)
  exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
  exp = np.clip(exp, -127, 127)
  scaled = g / np.ldexp(np.float32(1.0), exp)[..., None]
  codes = np.abs(np.abs(scaled)[..., None] - FP4_VALUES[:8]).argmin(-1).astype(np.uint8)  # magnitude code
  codes |= np.where(scaled < 0, 8, 0).astype(np.uint8)
  blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
  return blocks, (exp + 127).astype(np.uint8)
