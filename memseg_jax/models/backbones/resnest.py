"""ResNeSt backbone (split attention, radix 2), dilated for segmentation: MCIBI's S-101-D8.

The reference is `ssseg/modules/models/backbones/resnest.py` (a subclass of its ResNet) with the
class defaults every MCIBI ResNeSt config uses: groups 1, radix 2, reduction factor 4, the
deep 3x3 stem with 128 output channels (64, 64, 128), "pytorch" style, an average pool after
conv2 in strided blocks ("avd": conv2 keeps stride 1, a 3x3/2 average pool follows it; only
layer2.0 at output stride 8) and average-pool shortcuts ("avg_down": the shortcut of the first
block of every layer is AvgPool(stride) -> 1x1 conv -> BN, the pool present even at stride 1
where it is the identity). Depth 50 or 101; output stride 8 (layer3/layer4 dilated 2/4, the
first block of each with half the dilation), 16 or 32 as in the ResNet. The backbone always
uses ReLU (a config's head activation never reaches it, as in the reference).

Submodule names mirror the reference state_dict: `stem_0`/`stem_1` ... `stem_6`/`stem_7`,
`layer2_0/conv1`, `bn1`, `conv2` (the split-attention conv: `conv`, `bn0`, `fc1`, `bn1`,
`fc2`), `conv3`, `bn3`, `downsample_1` (1x1 conv) and `downsample_2` (BN; index 0 of the
reference Sequential is the pool). `torch_module_path` gives memseg_jax.convert these names,
since its generic rule would read the split-attention's `conv` as a ConvBNAct child.
"""

import re
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The strides and dilations per output stride are the ResNet's (`output_strides` is exported).
from memseg_jax.models.backbones.resnet import (  # noqa: F401  (output_strides: re-exported)
    OUTPUT_STRIDE_SETTINGS, deep_stem, output_strides)
from memseg_jax.models.layers import BatchNorm, conv, downsample_valid, mask_invalid

SUPPORTS_VALID_HW = True

# Blocks per stage (all Bottlenecks) of each supported depth.
ARCH_SETTINGS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4
RADIX = 2
REDUCTION_FACTOR = 4


def check_config(cfg) -> None:
  """Raises ValueError naming the `config.model.backbone` key this backbone cannot build."""
  if cfg.get('depth') not in ARCH_SETTINGS:
    raise ValueError(f"config.model.backbone.depth={cfg.get('depth')!r} is not one of "
                     f"{', '.join(str(d) for d in ARCH_SETTINGS)} (ResNeSt)")
  if cfg.get('output_stride') not in OUTPUT_STRIDE_SETTINGS:
    raise ValueError(f"config.model.backbone.output_stride={cfg.get('output_stride')!r} is not "
                     f"one of {', '.join(str(s) for s in OUTPUT_STRIDE_SETTINGS)}")
  stem = cfg.get('stem_channels', 128)
  if not isinstance(stem, int) or stem <= 0 or stem % 2:
    raise ValueError(f'config.model.backbone.stem_channels={stem!r} must be a positive even '
                     'integer')


def build(cfg, **layer_kwargs) -> 'ResNeSt':
  """The ResNeSt of `config.model.backbone` (type 'resnest': depth, output_stride, ...)."""
  return ResNeSt(depth=cfg['depth'], output_stride=cfg['output_stride'],
                 contract_dilation=cfg.get('contract_dilation', True),
                 stem_channels=cfg.get('stem_channels', 128), **layer_kwargs)


def imagenet_state_dict(state_dict):
  """open-mmlab `resnest*_d2`: the backbone's own names plus the ImageNet classifier `fc.*`."""
  kept = {k: v for k, v in state_dict.items() if not k.startswith('fc.')}
  return kept, sorted(set(state_dict) - set(kept))


def torch_module_path(modules: Tuple[str, ...]) -> str:
  """('layer2_0', 'conv2', 'conv') -> 'layer2.0.conv2.conv': `name_N` <-> `name.N`, nothing else."""
  return '.'.join(part for name in modules for part in re.split(r'_(?=\d+(?:_|$))', name))


def _count_per_window(size: int, out: int, stride: int, valid):
  """Elements of each length-`stride` window that lie inside the valid length (>= 1).

  `valid` None: the array's own length (a static (out,) numpy count); else (B,) traced lengths
  -> (B, out).
  """
  starts = np.arange(out) * stride
  if valid is None:
    return np.minimum(size - starts, stride).astype(np.float32)
  return jnp.clip(valid[:, None] - starts[None, :], 1, stride).astype(jnp.float32)


def avg_pool_ceil_exclude_pad(x, stride: int, valid=None):
  """torch AvgPool2d(kernel=stride, stride=stride, ceil_mode=True, count_include_pad=False).

  x (B, H, W, C) -> (B, ceil(H/s), ceil(W/s), C). Where H or W is not a multiple of s the last
  window averages only the elements it covers; with `valid` (B, 2) the covered elements are
  those of the valid region, so its outputs equal the unpadded image's.
  """
  if stride == 1:
    return x
  b, h, w, c = x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  x = mask_invalid(x, valid)
  x = jnp.pad(x, ((0, 0), (0, oh * stride - h), (0, ow * stride - w), (0, 0)))
  sums = x.reshape(b, oh, stride, ow, stride, c).sum(axis=(2, 4), dtype=jnp.float32)
  if valid is None:
    count = np.outer(_count_per_window(h, oh, stride, None),
                     _count_per_window(w, ow, stride, None))[None, :, :, None]
  else:
    count = (_count_per_window(h, oh, stride, valid[:, 0])[:, :, None, None]
             * _count_per_window(w, ow, stride, valid[:, 1])[:, None, :, None])
  return (sums / count).astype(x.dtype)


def avg_pool_3x3_s2(x, valid=None):
  """torch AvgPool2d(3, stride=2, padding=1) (count_include_pad=True: always / 9).

  x (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C). The zero padding is part of every sum; with
  `valid` the input is zeroed outside the valid region, which then reads as that padding.
  """
  x = mask_invalid(x, valid)
  sums = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, 3, 3, 1),
                               (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return (sums / 9.0).astype(x.dtype)


def _batch_norm(module: nn.Module, name: str) -> BatchNorm:
  """A BatchNorm with `module`'s normalisation settings (train, axis_name, momentum, eps, dtype)."""
  return BatchNorm(use_running_average=not module.train, axis_name=module.axis_name,
                   momentum=module.bn_momentum, epsilon=module.bn_eps, dtype=module.dtype,
                   name=name)


class _Layer(nn.Module):
  """Shared normalisation / compute fields."""
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _bn(self, name):
    return _batch_norm(self, name)

  def _conv(self, features, kernel_size, **kwargs):
    return conv(features, kernel_size, dtype=self.dtype, conv_impl=self.conv_impl, **kwargs)


class SplitAttentionConv2d(_Layer):
  """The reference's SplitAttentionConv2d with radix 2, groups 1.

  A 3x3 convolution in 2 groups gives 2 * width channels laid out [split 0 | split 1]; the
  attention pools the sum of the splits over the image, passes it through fc1 (1x1, bias) ->
  BN -> ReLU -> fc2 (1x1, bias) and a softmax over the two splits per channel (rSoftmax), and
  returns the attention-weighted sum of the splits, (B, H, W, width).
  """
  width: int = 64
  dilation: int = 1

  @nn.compact
  def __call__(self, x, valid=None):
    b = x.shape[0]
    inter = max(self.width * RADIX // REDUCTION_FACTOR, 32)
    x = self._conv(self.width * RADIX, 3, dilation=self.dilation, groups=RADIX,
                   name='conv')(mask_invalid(x, valid))
    x = nn.relu(self._bn('bn0')(x))                                   # (B, H, W, 2w)
    splits = x.reshape(*x.shape[:3], RADIX, self.width)               # (B, H, W, 2, w)
    gap = mask_invalid(splits.sum(axis=3), valid).astype(jnp.float32)  # (B, H, W, w)
    if valid is None:
      gap = jnp.mean(gap, axis=(1, 2), keepdims=True)
    else:   # the image pool of the valid region only
      area = (valid[:, 0] * valid[:, 1]).astype(jnp.float32)[:, None, None, None]
      gap = jnp.sum(gap, axis=(1, 2), keepdims=True) / area
    gap = gap.astype(self.dtype)                                      # (B, 1, 1, w)
    gap = self._conv(inter, 1, use_bias=True, in_features=self.width, name='fc1')(gap)
    gap = nn.relu(self._bn('bn1')(gap))
    atten = self._conv(self.width * RADIX, 1, use_bias=True, in_features=inter,
                       name='fc2')(gap)                               # (B, 1, 1, 2w)
    atten = jax.nn.softmax(atten.reshape(b, 1, 1, RADIX, self.width).astype(jnp.float32),
                           axis=3).astype(splits.dtype)
    return jnp.sum(atten * splits, axis=3)                            # (B, H, W, w)


class Bottleneck(_Layer):
  """1x1 -> split-attention 3x3 [-> 3x3/2 avg pool when strided] -> 1x1 (x4) -> BN, + shortcut.

  The split-attention conv ends in its own BN + ReLU; there is no BN/ReLU between it and conv3
  (the reference deletes the base block's bn2).
  """
  planes: int = 64
  stride: int = 1
  dilation: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, valid=None):
    width = self.planes
    out = self._conv(width, 1, name='conv1')(x)
    out = nn.relu(self._bn('bn1')(out))
    out = SplitAttentionConv2d(width=width, dilation=self.dilation, train=self.train,
                               axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                               bn_eps=self.bn_eps, dtype=self.dtype, conv_impl=self.conv_impl,
                               name='conv2')(out, valid)
    if self.stride > 1:
      if self.stride != 2:
        raise ValueError(f'ResNeSt block: stride {self.stride} (only 1 and 2 occur)')
      out = avg_pool_3x3_s2(out, valid)
    out = self._conv(self.planes * EXPANSION, 1, name='conv3')(out)
    out = self._bn('bn3')(out)
    identity = x
    if self.downsample:
      identity = avg_pool_ceil_exclude_pad(x, self.stride, valid)
      identity = self._conv(self.planes * EXPANSION, 1, name='downsample_1')(identity)
      identity = self._bn('downsample_2')(identity)
    return nn.relu(out + identity)


class ResNeSt(_Layer):
  """ResNeSt. Returns the outputs of the stages listed in `out_indices` (0 = layer1).

  With the default (0, 1, 2, 3) the outputs are C2..C5 (256, 512, 1024, 2048 channels); MCIBI's
  head reads C5 and its auxiliary head C4, each (B, ceil(H/os), ceil(W/os), C). With `valid`
  (B, 2), the true sizes of zero-padded images, the valid region of each output equals the
  unpadded computation (layers.py): convolutions read zeros outside it, the split-attention
  pools average over it, and the shortcut pools divide by the valid elements of each window.
  """
  depth: int = 101
  output_stride: int = 8
  contract_dilation: bool = True
  out_indices: Sequence[int] = (0, 1, 2, 3)
  stem_channels: int = 128

  @nn.compact
  def __call__(self, x, valid=None):  # x: (B, H, W, 3); valid: None or (B, 2) int
    check_config({'depth': self.depth, 'output_stride': self.output_stride,
                  'stem_channels': self.stem_channels})
    num_blocks = ARCH_SETTINGS[self.depth]
    strides, dilations = OUTPUT_STRIDE_SETTINGS[self.output_stride]

    x, valid = deep_stem(self, x, valid, self.stem_channels)

    outputs = []
    in_channels = self.stem_channels
    for i in range(4):
      planes = 64 * 2 ** i
      block_dilations = [dilations[i]] * num_blocks[i]
      if self.contract_dilation and dilations[i] > 1:
        block_dilations[0] = dilations[i] // 2
      for j in range(num_blocks[i]):
        stride = strides[i] if j == 0 else 1
        downsample = j == 0 and (stride != 1 or in_channels != planes * EXPANSION)
        x = Bottleneck(planes=planes, stride=stride, dilation=block_dilations[j],
                       downsample=downsample, train=self.train, axis_name=self.axis_name,
                       bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype,
                       conv_impl=self.conv_impl, name=f'layer{i + 1}_{j}')(x, valid)
        valid = downsample_valid(valid, stride)
      in_channels = planes * EXPANSION
      if i in self.out_indices:
        outputs.append(x)
    return tuple(outputs)
