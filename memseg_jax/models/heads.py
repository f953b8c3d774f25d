"""Segmentation heads: the context-within-image modules (ASPP, PPM) and the classifier heads.

- `ASPP`: parallel atrous branches + a global-pool branch, concatenated, 3x3 CBR (DeepLabV3).
- `PPM`: the pyramid pooling module of PSPNet (adaptive average pooling with PyTorch's bin
  boundaries, 1x1 CBR per scale, bilinear back, concatenated with the input, 3x3 CBR).
- `DecoderHead`: CBR (1x1 for the MCIBI decoders, 3x3 for the auxiliary head) -> Dropout2d ->
  1x1 classifier with bias. This is `decoder_stage1`, `decoder_stage2` and the FCN auxiliary head.
- `ClassifierHead`: Dropout2d -> 1x1 classifier (the plain DeepLabV3 decoder).
- `AuxiliaryDecoder`: the reference's `DefaultAuxiliaryDecoder` in general form (several 3x3
  CBRs, each optionally followed by a nearest upsampling), e.g. the ViT-L heads. The FCN
  auxiliary head (one CBR, no upsampling) stays a `DecoderHead`, with its names.
- `NamedDecoderHead`: the same as `DecoderHead` with the children the MCIBI++ reference names
  (`conv1`, `bn1`, `conv2`): its `decoder_pr`, `decoder_cwi`, `decoder_cls`.
- `UPerNetFPN` (lateral 1x1 CBRs, top-down bilinear additions, 3x3 fpn CBRs, everything resized
  to the finest level and concatenated) and `UPerNetHead` (PPM on the last level + the FPN +
  the decoder): UPerNet (reference `upernet.py`) and the FPN of the MCIBI++ UPerNet variant.
  Both share their parent's scope (`nn.share_scope`), so their children carry the reference's
  top-level names (`ppm_net`, `lateral_convs.N`, `fpn_convs.N`, `decoder`).
- `resize_bilinear_valid`: `ops.resize_bilinear` of zero-padded inputs, per image from its valid
  size to its valid output size (padded evaluation of the FPN's 1/8 -> 1/4 steps).

Children are named after the reference state_dict: list entries `name_N`, a conv + BN + act
`ConvBNAct` (`conv`, `bn`), the classifier conv `classifier`. The pooling branches carry the
pooling layer at index 0 of their reference Sequential; `memseg_jax.convert` accounts for it.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from memseg_jax import ops
from memseg_jax.models.layers import (BatchNorm, ConvBNAct, Dropout2d, conv, get_activation,
                                      mask_invalid)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) averaging matrix of `nn.AdaptiveAvgPool2d` along one axis.

  Bin i spans [floor(i * in / out), ceil((i + 1) * in / out)): bins may overlap when `in_size`
  is not a multiple of `out_size`, exactly as in PyTorch.
  """
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, out_size: int):
  """AdaptiveAvgPool2d(out_size) of an NHWC tensor: (B, H, W, C) -> (B, s, s, C)."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[-3], out_size))
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[-2], out_size))
  # Averages are taken in float32 whatever the compute dtype, like the global pool of ASPP.
  pooled = jnp.einsum('ih,bhwc,jw->bijc', ph, x.astype(jnp.float32), pw,
                      precision=lax.Precision.HIGHEST)
  return pooled.astype(x.dtype)


def adaptive_pool_matrix_valid(valid, size: int, out_size: int):
  """(B, out_size, size) `adaptive_pool_matrix(valid[b], out_size)` padded with zero columns.

  For zero-padded evaluation (valid (B,) int traced): the bins are those of the valid length.
  """
  i = jnp.arange(out_size)[None, :, None]
  v = valid[:, None, None]
  start = (i * v) // out_size
  end = -((-(i + 1) * v) // out_size)
  pos = jnp.arange(size)[None, None, :]
  inside = (pos >= start) & (pos < end)
  return jnp.where(inside, 1.0 / jnp.maximum(end - start, 1), 0.0).astype(jnp.float32)


def upsample_matrix_valid(valid, in_size: int, size: int):
  """(B, size, in_size) bilinear (align_corners=False) matrix from in_size to valid[b] rows.

  The in-graph counterpart of `ops.interp_matrix(in_size, valid[b])` (rows past valid[b]
  hold unspecified weights): source coordinates are computed in float32, which can differ
  from the reference's double-precision product in the last bit of a weight.
  """
  v = valid.astype(jnp.float32)[:, None]
  scale = jnp.float32(in_size) / v                                      # (B, 1)
  dst = jnp.arange(size, dtype=jnp.float32)[None, :]
  src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)                     # (B, size)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  lam = jnp.where(i0 == in_size - 1, 0.0, src - i0.astype(jnp.float32))
  cols = jnp.arange(in_size)[None, None, :]
  return ((cols == i0[..., None]) * (1.0 - lam)[..., None]
          + (cols == i1[..., None]) * lam[..., None]).astype(jnp.float32)


class _Head(nn.Module):
  """Fields every head shares (normalisation, activation and dtype settings)."""
  act: str = 'relu'
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _cbr(self, features, kernel_size=1, dilation=1, name=None):
    return ConvBNAct(features, kernel_size, dilation=dilation, act=self.act, train=self.train,
                     axis_name=self.axis_name, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                     dtype=self.dtype, conv_impl=self.conv_impl, name=name)


class ASPP(_Head):
  """Atrous spatial pyramid pooling: (B, H, W, Cin) -> (B, H, W, features)."""
  features: int = 512
  dilations: Sequence[int] = (1, 12, 24, 36)

  @nn.compact
  def __call__(self, x, valid=None):
    """x (B, H, W, Cin); `valid` (B, 2): the true sizes of zero-padded inputs (layers.py)."""
    h, w = x.shape[1:3]
    x = mask_invalid(x, valid)
    outputs = []
    for i, d in enumerate(self.dilations):
      # A dilation-1 branch is a 1x1 conv; the others are 3x3 with padding = dilation.
      k = 1 if d == 1 else 3
      outputs.append(self._cbr(self.features, k, dilation=d, name=f'parallel_branches_{i}')(x))
    if valid is None:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    else:   # the image pool of the valid region only
      area = (valid[:, 0] * valid[:, 1]).astype(jnp.float32)[:, None, None, None]
      pooled = jnp.sum(x.astype(jnp.float32), axis=(1, 2), keepdims=True) / area
    pooled = pooled.astype(x.dtype)
    pooled = self._cbr(self.features, 1, name='global_branch')(pooled)       # (B, 1, 1, C)
    outputs.append(ops.resize_bilinear(pooled, (h, w)))
    x = jnp.concatenate(outputs, axis=-1)
    return self._cbr(self.features, 3, name='bottleneck')(x, valid)


class PPM(_Head):
  """Pyramid pooling module: (B, H, W, Cin) -> (B, H, W, features)."""
  features: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)

  @nn.compact
  def __call__(self, x, valid=None):
    """x (B, H, W, Cin); `valid` (B, 2): the true sizes of zero-padded inputs (layers.py)."""
    h, w = x.shape[1:3]
    levels = [x]
    for i, s in enumerate(self.pool_scales):
      if valid is None:
        pooled = adaptive_avg_pool(x, s)
      else:   # bins of the valid region, and back up to the valid size
        ph = adaptive_pool_matrix_valid(valid[:, 0], h, s)
        pw = adaptive_pool_matrix_valid(valid[:, 1], w, s)
        pooled = jnp.einsum('bih,bhwc,bjw->bijc', ph, x.astype(jnp.float32), pw,
                            precision=lax.Precision.HIGHEST).astype(x.dtype)
      out = self._cbr(self.features, 1, name=f'branches_{i}')(pooled)
      if valid is None:
        levels.append(ops.resize_bilinear(out, (h, w)))
      else:
        uh = upsample_matrix_valid(valid[:, 0], s, h)
        uw = upsample_matrix_valid(valid[:, 1], s, w)
        levels.append(jnp.einsum('bhi,bijc,bwj->bhwc', uh, out.astype(jnp.float32), uw,
                                 precision=lax.Precision.HIGHEST).astype(out.dtype))
    x = jnp.concatenate(levels, axis=-1)
    return self._cbr(self.features, 3, name='bottleneck')(x, valid)


class DecoderHead(_Head):
  """conv (no bias) -> BN -> act -> Dropout2d -> 1x1 conv with bias: (B, H, W, C) -> (B, H, W, K).

  `kernel_size` 1 gives the MCIBI decoders, 3 the FCN auxiliary head. Children `conv`, `bn`,
  `classifier` are indices 0, 1 and 4 of the reference Sequential.
  """
  num_classes: int = 150
  features: int = 512
  kernel_size: int = 1
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x):
    x = conv(self.features, self.kernel_size, dtype=self.dtype, conv_impl=self.conv_impl,
             name='conv')(x)
    x = BatchNorm(use_running_average=not self.train, axis_name=self.axis_name,
                  momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype, name='bn')(x)
    x = get_activation(self.act)(x)
    x = Dropout2d(self.dropout, deterministic=not self.train)(x)
    return conv(self.num_classes, 1, use_bias=True, in_features=self.features, dtype=self.dtype,
                conv_impl=self.conv_impl, name='classifier')(x)


class ClassifierHead(nn.Module):
  """Dropout2d -> 1x1 conv with bias (DeepLabV3's decoder; the classifier is index 1)."""
  num_classes: int = 150
  dropout: float = 0.1
  train: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    x = Dropout2d(self.dropout, deterministic=not self.train)(x)
    return conv(self.num_classes, 1, use_bias=True, in_features=in_features, dtype=self.dtype,
                conv_impl=self.conv_impl, name='classifier')(x)


def upsample_nearest(x, scale: int):
  """nn.Upsample(scale_factor=scale) (mode 'nearest') for an integer scale: (B, sH, sW, C)."""
  return jnp.repeat(jnp.repeat(x, scale, axis=1), scale, axis=2)


class AuxiliaryDecoder(_Head):
  """`num_convs` x [3x3 conv, BN, act, (x`upsample` nearest)] -> Dropout2d -> 1x1 conv with bias.

  Children are named by their index in the reference Sequential (the activation, upsampling
  and dropout hold no parameters): with upsampling, conv/BN of block j are `4j`/`4j+1` and the
  classifier `4 * num_convs + 1` (ViT-L: 0, 1, 4, 5, 9); without, `3j`/`3j+1` and
  `3 * num_convs + 1`.
  """
  num_classes: int = 150
  features: int = 512
  num_convs: int = 2
  upsample: int = 0           # nearest upsampling factor after each CBR; 0: none
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x):
    step = 4 if self.upsample else 3
    for j in range(self.num_convs):
      if j > 0 and self.upsample:
        x = upsample_nearest(x, int(self.upsample))
      x = conv(self.features, 3, dtype=self.dtype, conv_impl=self.conv_impl, name=str(step * j))(x)
      x = BatchNorm(use_running_average=not self.train, axis_name=self.axis_name,
                    momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype,
                    name=str(step * j + 1))(x)
      x = get_activation(self.act)(x)
    x = Dropout2d(self.dropout, deterministic=not self.train)(x)
    in_features = self.features if self.num_convs else x.shape[-1]
    x = conv(self.num_classes, 1, use_bias=True, in_features=in_features, dtype=self.dtype,
             conv_impl=self.conv_impl, name=str(step * self.num_convs + 1))(x)
    # The last upsampling comes after the dropout and the 1x1 classifier, not before as in the
    # reference: nearest upsampling only replicates pixels, and a per-pixel linear map and a
    # per-channel mask give the same values on replicated pixels, so the result is identical
    # while the (B, 16h, 16w, 512) input of the classifier (1 GiB per head at a 512 crop,
    # batch 2) is never formed.
    if self.upsample and self.num_convs:
      x = upsample_nearest(x, int(self.upsample))
    return x


def _valid_resize_taps(valid_in, valid_out, in_size: int, out_size: int):
  """(i0, i1, lam1), each (B, out_size): bilinear (align_corners=False) from valid_in[b] to
  valid_out[b] entries along one axis, like `ops.resize_taps(valid_in[b], valid_out[b])`.

  Entries past valid_out[b] hold unspecified (in-range) taps. Source coordinates are computed
  in float32 (PyTorch: in double, then rounded), a last-bit difference at most.
  """
  v_in = jnp.asarray(valid_in, jnp.int32)[:, None]
  scale = v_in.astype(jnp.float32) / jnp.maximum(valid_out, 1).astype(jnp.float32)[:, None]
  dst = jnp.arange(out_size, dtype=jnp.float32)[None, :]
  src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)                     # (B, out)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), v_in - 1)
  i1 = jnp.minimum(i0 + 1, v_in - 1)
  lam = jnp.where(i0 == v_in - 1, 0.0, src - i0.astype(jnp.float32))
  return jnp.clip(i0, 0, in_size - 1), jnp.clip(i1, 0, in_size - 1), lam


def resize_bilinear_valid(x, size, valid_in, valid_out):
  """`ops.resize_bilinear(x, size)` for zero-padded images, each over its valid region.

  Args:
    x: (B, h, w, C); image b occupies the top-left valid_in[b] of its map.
    size: (H, W) of the output array.
    valid_in, valid_out: (B, 2) valid sizes of input and output, or both None (then this is
      `ops.resize_bilinear(x, size)`).

  Returns:
    (B, H, W, C) whose top-left valid_out[b] is image b's valid input resized to that size
    (what the unpadded image gives); the rest is unspecified.
  """
  if valid_in is None:
    return ops.resize_bilinear(x, size)
  out = x
  for axis, n in ((1, int(size[0])), (2, int(size[1]))):
    i0, i1, lam = _valid_resize_taps(valid_in[:, axis - 1], valid_out[:, axis - 1],
                                     out.shape[axis], n)
    shape = (out.shape[0], n, 1, 1) if axis == 1 else (out.shape[0], 1, n, 1)
    x0 = jnp.take_along_axis(out, i0.reshape(shape), axis=axis)
    x1 = jnp.take_along_axis(out, i1.reshape(shape), axis=axis)
    lam = lam.reshape(shape).astype(out.dtype)
    out = x0 * (1 - lam) + x1 * lam
  return out


class NamedDecoderHead(_Head):
  """conv1 (no bias) -> bn1 -> act -> Dropout2d -> conv2 (1x1, bias): (B, H, W, C) -> (B, H, W, K).

  The MCIBI++ decoders (`decoder_pr`, `decoder_cwi`, `decoder_cls`), whose reference
  Sequentials name their children (`conv1`, `bn1`, `act1`, `dropout`, `conv2`). `kernel_size`
  1 or 3 (padding 1); with `valid` (padded evaluation) a 3x3 conv1 reads zeros outside it.
  """
  num_classes: int = 150
  features: int = 512
  kernel_size: int = 1
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, valid=None):
    if self.kernel_size > 1:
      x = mask_invalid(x, valid)
    x = conv(self.features, self.kernel_size, dtype=self.dtype, conv_impl=self.conv_impl,
             name='conv1')(x)
    x = BatchNorm(use_running_average=not self.train, axis_name=self.axis_name,
                  momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype, name='bn1')(x)
    x = get_activation(self.act)(x)
    # Per-sample channel masks drawn from this step's key. (The reference's MCIBI++ reseeds
    # torch's global generators in every forward, so its masks repeat every iteration; that
    # side effect is deliberately not reproduced: memory.py's module docstring.)
    x = Dropout2d(self.dropout, deterministic=not self.train)(x)
    return conv(self.num_classes, 1, use_bias=True, in_features=self.features, dtype=self.dtype,
                conv_impl=self.conv_impl, name='conv2')(x)


class UPerNetFPN(_Head):
  """The FPN of UPerNet, in its parent's scope: (lower levels, top) -> fused finest level.

  `lateral_convs_i`: 1x1 CBR on lower level i -> `feats_channels`; the top level (which must
  have `feats_channels` channels) is appended as is; top-down, level i-1 += level i resized
  bilinearly to it; `fpn_convs_i`: 3x3 CBR `feats_channels` -> `out_channels` on the lower
  levels, none on the top; every level resized to the finest and concatenated:
  (B, H1, W1, (n - 1) * out_channels + feats_channels).
  """
  feats_channels: int = 512
  out_channels: int = 512

  def setup(self):
    # The parent's scope: children appear as `lateral_convs_0`, ... beside the parent's own.
    if self.parent is not None:
      nn.share_scope(self.parent, self)

  @nn.compact
  def __call__(self, lower, top, valids=None):
    """lower: [(B, Hi, Wi, Ci)] finest first; top (B, Ht, Wt, feats_channels); valids: None or
    one (B, 2) valid size per level, `lower` then `top` (padded evaluation)."""
    if top.shape[-1] != self.feats_channels:
      raise ValueError(f'UPerNetFPN: the top level has {top.shape[-1]} channels, the laterals '
                       f'{self.feats_channels}; they must match to be added')
    valids = list(valids) if valids is not None else [None] * (len(lower) + 1)
    laterals = [self._cbr(self.feats_channels, 1, name=f'lateral_convs_{i}')(x)
                for i, x in enumerate(lower)]
    laterals.append(top)
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear_valid(
          laterals[i], laterals[i - 1].shape[1:3], valids[i], valids[i - 1])
    outputs = [self._cbr(self.out_channels, 3, name=f'fpn_convs_{i}')(laterals[i], valids[i])
               for i in range(len(laterals) - 1)]
    outputs.append(laterals[-1])
    size = outputs[0].shape[1:3]
    outputs = [outputs[0]] + [resize_bilinear_valid(x, size, valids[i], valids[0])
                              for i, x in enumerate(outputs[1:], start=1)]
    return jnp.concatenate(outputs, axis=-1)


class UPerNetHead(_Head):
  """UPerNet (reference `UPerNet`), in its parent's scope: backbone levels -> logits at level 0.

  `ppm_net` (PPM on the last level, `pool_scales`) is the FPN's top; `UPerNetFPN` with
  `feats_channels` throughout; `decoder` = 3x3 CBR -> Dropout2d -> 1x1 classifier with bias.
  The reference's decoder Sequential holds the classifier at index 4: its Flax module is
  `decoder_4` (the converter's generic `name_N` rule), the CBR `decoder` (indices 0, 1).
  """
  num_classes: int = 150
  feats_channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1

  def setup(self):
    if self.parent is not None:   # see UPerNetFPN.setup
      nn.share_scope(self.parent, self)

  @nn.compact
  def __call__(self, features, valids=None):
    """features: the backbone levels finest first; valids: None or their (B, 2) valid sizes."""
    valids = list(valids) if valids is not None else [None] * len(features)
    common = dict(act=self.act, train=self.train, axis_name=self.axis_name,
                  bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype,
                  conv_impl=self.conv_impl)
    top = PPM(features=self.feats_channels, pool_scales=tuple(self.pool_scales), name='ppm_net',
              **common)(features[-1], valids[-1])
    fused = UPerNetFPN(feats_channels=self.feats_channels, out_channels=self.feats_channels,
                       name='fpn', **common)(features[:-1], top, valids)
    x = self._cbr(self.feats_channels, 3, name='decoder')(fused, valids[0])
    x = Dropout2d(self.dropout, deterministic=not self.train)(x)
    return conv(self.num_classes, 1, use_bias=True, in_features=self.feats_channels,
                dtype=self.dtype, conv_impl=self.conv_impl, name='decoder_4')(x)
