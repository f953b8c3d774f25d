"""Resizing with PyTorch's `F.interpolate` semantics, the one resize helper of the project.

Everything that resizes a feature map or logits (losses, the ASPP image-pool branch, the
memory update, test-time scaling) goes through `resize_bilinear`, so the project has one
convention: NHWC, bilinear, `align_corners=False` unless asked otherwise, no antialiasing
(PyTorch's `interpolate` does not antialias when it downsamples; `jax.image.resize` does unless
told not to). `interp_matrix` exposes the same weights as a dense (out, in) matrix for code
that wants to fold the interpolation into other linear algebra (the fused memory update).

Index and weight tables are computed with numpy on static shapes, so the jitted graph is two
gathers and two lerps per call.
"""

from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np


def _source_index(in_size: int, out_size: int, align_corners: bool,
                  scale_factor: Optional[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(i0, i1, lambda1) for each output index, as PyTorch's upsample_bilinear2d computes them."""
  # PyTorch's CPU kernel: scale in float32, `scale * (dst + 0.5) - 0.5` in double, the result
  # stored as float32. Reproducing that keeps results equal to ~1 ulp rather than ~1e-5.
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
    src = (np.float64(scale) * dst).astype(np.float32)
  else:
    # PyTorch uses 1/scale_factor when the caller gave a scale factor (and did not ask to
    # recompute it), otherwise in/out. The two differ when in*scale is not an integer.
    if scale_factor is not None:
      scale = np.float32(1.0 / scale_factor)
    else:
      scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam1 = (src - i0.astype(np.float32)).astype(np.float32)
  lam1 = np.where(i0 == in_size - 1, np.float32(0.0), lam1)
  return i0, i1, lam1


def resize_taps(in_size: int, out_size: int, *, align_corners: bool = False,
                scale_factor: Optional[float] = None):
  """Numpy (i0, i1, lam1) per output index: out[o] = (1 - lam1) in[i0] + lam1 in[i1].

  The exact weights `resize_bilinear` uses, for code that gathers with them itself.
  """
  return _source_index(in_size, out_size, align_corners, scale_factor)


def interp_matrix(in_size: int, out_size: int, *, align_corners: bool = False,
                  scale_factor: Optional[float] = None) -> np.ndarray:
  """Dense (out_size, in_size) float32 matrix M with resize_1d(x) = M @ x."""
  i0, i1, lam1 = _source_index(in_size, out_size, align_corners, scale_factor)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam1)
  np.add.at(m, (rows, i1), lam1)
  return m


def _resize_axis(x, axis: int, out_size: int, align_corners: bool,
                 scale_factor: Optional[float]):
  in_size = x.shape[axis]
  if in_size == out_size and scale_factor in (None, 1.0):
    return x
  i0, i1, lam1 = _source_index(in_size, out_size, align_corners, scale_factor)
  shape = [1] * x.ndim
  shape[axis] = out_size
  lam1 = jnp.asarray(lam1.reshape(shape), dtype=x.dtype)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
  return x0 * (1 - lam1) + x1 * lam1


def resize_bilinear_axis(x, axis: int, out_size: int, *, align_corners: bool = False):
  """`resize_bilinear` along one axis only (the same weights and arithmetic)."""
  return _resize_axis(x, axis, out_size, align_corners, None)


def resize_bilinear(x, size: Optional[Sequence[int]] = None, *, scale_factor: Optional[float] = None,
                    align_corners: bool = False):
  """Bilinear resize of an NHWC (or HWC) array like `F.interpolate(mode='bilinear')`.

  Args:
    x: (..., H, W, C) array.
    size: (out_h, out_w). Exactly one of `size` and `scale_factor` is given.
    scale_factor: a float; the output size is floor(in * scale_factor) and source
      coordinates are mapped with 1/scale_factor, as PyTorch does.
    align_corners: PyTorch's flag (False everywhere in the reference).
  """
  if (size is None) == (scale_factor is None):
    raise ValueError('give exactly one of size and scale_factor')
  h_axis, w_axis = x.ndim - 3, x.ndim - 2
  if size is None:
    out_h = int(np.floor(x.shape[h_axis] * scale_factor))
    out_w = int(np.floor(x.shape[w_axis] * scale_factor))
  else:
    out_h, out_w = int(size[0]), int(size[1])
  x = _resize_axis(x, h_axis, out_h, align_corners, scale_factor)
  x = _resize_axis(x, w_axis, out_w, align_corners, scale_factor)
  return x
