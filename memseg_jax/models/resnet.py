"""ResNet "v1c" backbone (deep 3x3 stem, stride on the 3x3 conv), dilated for segmentation.

This is the backbone of every MCIBI ResNet config: depth 18 (BasicBlock), 50 or 101
(Bottleneck), output stride 8 (layer3/layer4 dilated 2/4), 16 or 32. With
`contract_dilation` the first block of a dilated stage uses half the stage's dilation, which is
what the ImageNet-pretrained weights expect. The backbone always uses ReLU (a config's head
activation, e.g. LIP's leaky ReLU, never reaches it).

Submodule names mirror the reference state_dict so `memseg_jax.convert` maps keys with one
rule (`name_N` <-> `name.N`): `stem_0`/`stem_1` (conv/BN of the first stem layer), `stem_3`,
`stem_4`, `stem_6`, `stem_7`; `layer1_0/conv1`, `.../bn1`, ..., `.../downsample_0` (1x1 conv) and
`.../downsample_1` (BN).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from memseg_jax.models.layers import BatchNorm, conv, downsample_valid, mask_invalid

# (block, blocks per stage) for each supported depth.
ARCH_SETTINGS = {
    18: ('basic', (2, 2, 2, 2)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}
# output stride -> (strides, dilations) of layer1..layer4.
OUTPUT_STRIDE_SETTINGS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


def stage_channels(depth: int) -> Tuple[int, int, int, int]:
  """Output channels of layer1..layer4 (e.g. (256, 512, 1024, 2048) for depth 50)."""
  if depth not in ARCH_SETTINGS:
    raise ValueError(f'model.backbone.depth: unsupported depth {depth} (expected one of '
                     f'{sorted(ARCH_SETTINGS)})')
  expansion = EXPANSION[ARCH_SETTINGS[depth][0]]
  return tuple(64 * 2 ** i * expansion for i in range(4))


def _batch_norm(module: nn.Module, name: str) -> BatchNorm:
  """A BatchNorm with `module`'s normalisation settings (train, axis_name, momentum, eps, dtype)."""
  return BatchNorm(use_running_average=not module.train, axis_name=module.axis_name,
                   momentum=module.bn_momentum, epsilon=module.bn_eps, dtype=module.dtype,
                   name=name)


class _Block(nn.Module):
  """Shared fields of the two residual blocks."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  def _bn(self, name):
    return _batch_norm(self, name)

  def _shortcut(self, x, out_channels):
    if not self.downsample:
      return x
    x = conv(out_channels, 1, stride=self.stride, dtype=self.dtype, name='downsample_0')(x)
    return self._bn('downsample_1')(x)


class BasicBlock(_Block):
  """3x3 (stride, dilation) -> BN ReLU -> 3x3 (dilation 1, as in the reference) -> BN, + id."""

  @nn.compact
  def __call__(self, x, valid=None):
    out = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
               name='conv1')(mask_invalid(x, valid))
    out = nn.relu(self._bn('bn1')(out))
    out = mask_invalid(out, downsample_valid(valid, self.stride))
    # The reference BasicBlock never dilates its second conv (padding 1, dilation 1).
    out = conv(self.planes, 3, dtype=self.dtype, name='conv2')(out)
    out = self._bn('bn2')(out)
    return nn.relu(out + self._shortcut(x, self.planes))


class Bottleneck(_Block):
  """1x1 -> 3x3 (stride, dilation; "pytorch" style) -> 1x1 (x4), BN after each, + shortcut."""

  @nn.compact
  def __call__(self, x, valid=None):
    out = conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(self._bn('bn1')(out))
    out = mask_invalid(out, valid)
    out = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
               name='conv2')(out)
    out = nn.relu(self._bn('bn2')(out))
    out = conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(out)
    out = self._bn('bn3')(out)
    return nn.relu(out + self._shortcut(x, self.planes * 4))


class ResNet(nn.Module):
  """ResNet-v1c. Returns the outputs of the stages listed in `out_indices` (0 = layer1).

  With the default (2, 3) the outputs are C4 (auxiliary head) and C5 (the segmentation head),
  each (B, ceil(H/os), ceil(W/os), C). With `valid` (B, 2), the true sizes of zero-padded
  images, the valid region of each output equals the unpadded computation (layers.py); the
  padded region holds unspecified values.
  """
  depth: int = 50
  output_stride: int = 8
  contract_dilation: bool = True
  out_indices: Sequence[int] = (2, 3)
  stem_channels: int = 64
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  def _bn(self, name):
    return _batch_norm(self, name)

  @nn.compact
  def __call__(self, x, valid=None):  # x: (B, H, W, 3); valid: None or (B, 2) int
    if self.depth not in ARCH_SETTINGS:
      raise ValueError(f'model.backbone.depth: unsupported depth {self.depth} (expected one of '
                       f'{sorted(ARCH_SETTINGS)})')
    if self.output_stride not in OUTPUT_STRIDE_SETTINGS:
      raise ValueError(f'model.backbone.output_stride: unsupported value {self.output_stride} '
                       f'(expected one of {sorted(OUTPUT_STRIDE_SETTINGS)})')
    block_type, num_blocks = ARCH_SETTINGS[self.depth]
    block_cls = BasicBlock if block_type == 'basic' else Bottleneck
    expansion = EXPANSION[block_type]
    strides, dilations = OUTPUT_STRIDE_SETTINGS[self.output_stride]

    # Deep stem: the reference Sequential is (conv, BN, ReLU) x 3, indices 0/1, 3/4, 6/7.
    half = self.stem_channels // 2
    x = conv(half, 3, stride=2, dtype=self.dtype, name='stem_0')(mask_invalid(x, valid))
    valid = downsample_valid(valid, 2)
    x = nn.relu(self._bn('stem_1')(x))
    x = conv(half, 3, dtype=self.dtype, name='stem_3')(mask_invalid(x, valid))
    x = nn.relu(self._bn('stem_4')(x))
    x = conv(self.stem_channels, 3, dtype=self.dtype, name='stem_6')(mask_invalid(x, valid))
    x = nn.relu(self._bn('stem_7')(x))
    # flax's max_pool pads with -inf, like PyTorch's MaxPool2d(3, 2, padding=1). Masked zeros
    # change nothing: every window holds a valid post-ReLU value >= 0.
    x = nn.max_pool(mask_invalid(x, valid), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    valid = downsample_valid(valid, 2)

    outputs = []
    in_channels = self.stem_channels
    for i in range(4):
      planes = 64 * 2 ** i
      block_dilations = [dilations[i]] * num_blocks[i]
      if self.contract_dilation and dilations[i] > 1:
        block_dilations[0] = dilations[i] // 2
      for j in range(num_blocks[i]):
        stride = strides[i] if j == 0 else 1
        downsample = j == 0 and (stride != 1 or in_channels != planes * expansion)
        x = block_cls(planes, stride=stride, dilation=block_dilations[j], downsample=downsample,
                      train=self.train, axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                      bn_eps=self.bn_eps, dtype=self.dtype, name=f'layer{i + 1}_{j}')(x, valid)
        valid = downsample_valid(valid, stride)
      in_channels = planes * expansion
      if i in self.out_indices:
        outputs.append(x)
    return tuple(outputs)
