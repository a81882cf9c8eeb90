"""How VGG's convolutions and pools become XLA operations, without asking which device runs them.

`conv` is XLA's own convolution and reduce-window max-pool. `matmul` writes each 3x3
convolution as one matrix product over image patches (`conv_as_matmul`) and each 2x2
max-pool as a reshape and a max (`max_pool_2x2`): the same numbers to float rounding, several
times faster on XLA's CPU backend, whose convolutions run well below its GEMM rate
(docs/performance.md). `for_backend` says which to use on a backend; the caller asks the
backend (`ftlab.run.build_model`), this module never does.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from jax import lax

from ftlab.errors import ConfigError

LOWERINGS = ('conv', 'matmul')


def for_backend(choice: str, backend: str) -> str:
  """`conv` or `matmul` for a config's choice: `auto` is `matmul` on the `cpu` backend (where
  XLA's convolutions are slow) and `conv` elsewhere; the others are themselves.

  Raises:
    ValueError: a choice other than `auto`, `conv` or `matmul`.
  """
  if choice not in ('auto', *LOWERINGS):
    raise ConfigError(f'conv_lowering {choice!r} is not one of {["auto", *LOWERINGS]}')
  if choice == 'auto':
    return 'matmul' if backend == 'cpu' else 'conv'
  return choice


def conv_as_matmul(
  lhs: jnp.ndarray,
  rhs: jnp.ndarray,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jnp.ndarray:
  """`lax.conv_general_dilated` for NHWC images and HWIO kernels as one matrix product.

  The kh*kw shifted views of the padded image are concatenated along channels (the
  patches, `[B, H, W, kh*kw*C]`) and multiplied by the kernel reshaped to
  `[kh*kw*C, features]`; autodiff turns this into matrix products and slice-adds. On CPU,
  XLA runs these as multi-threaded GEMMs several times faster than its convolution (forward
  and both gradients). Anything but stride 1, no dilation and one feature group (not used by
  VGG) falls back to `lax.conv_general_dilated`. A drop-in for `nn.Conv(conv_general_dilated=)`.
  """
  # Only the case VGG uses is rewritten; anything else goes to XLA's convolution, whose
  # semantics the rewrite would otherwise have to reproduce in full.
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  ones = (1,) * (lhs.ndim - 2)
  if (
    lhs.ndim != 4
    or given != nhwc
    or tuple(window_strides) != ones
    or tuple(lhs_dilation or ones) != ones
    or tuple(rhs_dilation or ones) != ones
    or feature_group_count != 1
  ):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  kh, kw, channels, features = rhs.shape
  if isinstance(padding, str):
    # The pads XLA itself would use for 'SAME' (uneven for even kernels), so both lowerings
    # see the same borders.
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
  x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  # kh*kw times the input's memory (9x for VGG's 3x3): the price of one large GEMM, paid per
  # layer and freed after it.
  patches = jnp.concatenate(
    [x[:, i : i + out_h, j : j + out_w] for i in range(kh) for j in range(kw)], axis=-1
  )
  # The (i, j, c) order of the patches is the row-major order of the HWIO kernel.
  return lax.dot_general(
    patches,
    rhs.reshape(kh * kw * channels, features),
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def max_pool_2x2(x_BHWC: jnp.ndarray) -> jnp.ndarray:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` as a reshape and a max (odd edges dropped, as
  'VALID'). Its gradient is elementwise, where XLA's select-and-scatter is slow on CPU; on a
  tie (measure zero in float32; zeros after ReLU get no gradient anyway) it splits the
  gradient evenly instead of giving it to the first maximum."""
  b, h, w, c = x_BHWC.shape
  # Odd edges are cropped before the reshape, which needs even sides; reduce-window 'VALID'
  # drops the same row and column.
  x = x_BHWC[:, : h - h % 2, : w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
