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

SUPPORTS_VALID_HW = True

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


def check_config(cfg) -> None:
  """Raises ValueError naming the `config.model.backbone` key this backbone cannot build."""
  if cfg.get('depth') not in ARCH_SETTINGS:
    raise ValueError(f"config.model.backbone.depth={cfg.get('depth')!r} is not one of "
                     f"{', '.join(str(d) for d in ARCH_SETTINGS)}")
  if cfg.get('output_stride') not in OUTPUT_STRIDE_SETTINGS:
    raise ValueError(f"config.model.backbone.output_stride={cfg.get('output_stride')!r} is not "
                     f"one of {', '.join(str(s) for s in OUTPUT_STRIDE_SETTINGS)}")


def output_strides(cfg) -> Tuple[int, int, int, int]:
  """Strides of layer1..layer4 (4, 8, 8, 8 at output stride 8)."""
  strides, _ = OUTPUT_STRIDE_SETTINGS[cfg['output_stride']]
  out, total = [], 4                                   # stem conv (2) and max-pool (2)
  for s in strides:
    total *= s
    out.append(total)
  return tuple(out)


def build(cfg, **layer_kwargs) -> 'ResNet':
  """The ResNet of `config.model.backbone` (type 'resnet': depth, output_stride, ...)."""
  return ResNet(depth=cfg['depth'], output_stride=cfg['output_stride'],
                contract_dilation=cfg.get('contract_dilation', True),
                stem_channels=cfg.get('stem_channels', 64), **layer_kwargs)


def imagenet_state_dict(state_dict):
  """open-mmlab `resnet*_v1c`: everything but the ImageNet classifier `fc.*` is the backbone."""
  kept = {k: v for k, v in state_dict.items() if not k.startswith('fc.')}
  return kept, sorted(set(state_dict) - set(kept))


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
  conv_impl: str = 'auto'

  def _bn(self, name):
    return _batch_norm(self, name)

  def _conv(self, features, kernel_size, **kwargs):
    return conv(features, kernel_size, dtype=self.dtype, conv_impl=self.conv_impl, **kwargs)

  def _shortcut(self, x, out_channels):
    if not self.downsample:
      return x
    x = self._conv(out_channels, 1, stride=self.stride, name='downsample_0')(x)
    return self._bn('downsample_1')(x)


class BasicBlock(_Block):
  """3x3 (stride, dilation) -> BN ReLU -> 3x3 (dilation 1, as in the reference) -> BN, + id."""

  @nn.compact
  def __call__(self, x, valid=None):
    out = self._conv(self.planes, 3, stride=self.stride, dilation=self.dilation,
                     name='conv1')(mask_invalid(x, valid))
    out = nn.relu(self._bn('bn1')(out))
    out = mask_invalid(out, downsample_valid(valid, self.stride))
    # The reference BasicBlock never dilates its second conv (padding 1, dilation 1).
    out = self._conv(self.planes, 3, name='conv2')(out)
    out = self._bn('bn2')(out)
    return nn.relu(out + self._shortcut(x, self.planes))


class Bottleneck(_Block):
  """1x1 -> 3x3 (stride, dilation; "pytorch" style) -> 1x1 (x4), BN after each, + shortcut."""

  @nn.compact
  def __call__(self, x, valid=None):
    out = self._conv(self.planes, 1, name='conv1')(x)
    out = nn.relu(self._bn('bn1')(out))
    out = mask_invalid(out, valid)
    out = self._conv(self.planes, 3, stride=self.stride, dilation=self.dilation,
                     name='conv2')(out)
    out = nn.relu(self._bn('bn2')(out))
    out = self._conv(self.planes * 4, 1, name='conv3')(out)
    out = self._bn('bn3')(out)
    return nn.relu(out + self._shortcut(x, self.planes * 4))



def deep_stem(module, x, valid, stem_channels: int):
  """The v1c/ResNeSt deep stem, (conv, BN, ReLU) x 3 then a 3x3/2 max pool: (x, valid) at 1/4.

  Called from `module`'s compact `__call__` (its `_conv` / `_bn` make the layers); the reference
  Sequential's indices 0/1, 3/4, 6/7 name them.
  """
  half = stem_channels // 2
  x = module._conv(half, 3, stride=2, name='stem_0')(mask_invalid(x, valid))
  valid = downsample_valid(valid, 2)
  x = nn.relu(module._bn('stem_1')(x))
  x = module._conv(half, 3, name='stem_3')(mask_invalid(x, valid))
  x = nn.relu(module._bn('stem_4')(x))
  x = module._conv(stem_channels, 3, name='stem_6')(mask_invalid(x, valid))
  x = nn.relu(module._bn('stem_7')(x))
  # flax's max_pool pads with -inf, like PyTorch's MaxPool2d(3, 2, padding=1). Masked zeros
  # change nothing: every window holds a valid post-ReLU value >= 0.
  x = nn.max_pool(mask_invalid(x, valid), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return x, downsample_valid(valid, 2)

class ResNet(nn.Module):
  """ResNet-v1c. Returns the outputs of the stages listed in `out_indices` (0 = layer1).

  With the default (0, 1, 2, 3) the outputs are C2..C5; MCIBI's head reads C5 and its auxiliary
  head C4, each (B, ceil(H/os), ceil(W/os), C) (`output_strides`). With `valid` (B, 2), the
  true sizes of zero-padded images, the valid region of each output equals the unpadded
  computation (layers.py); the padded region holds unspecified values.
  """
  depth: int = 50
  output_stride: int = 8
  contract_dilation: bool = True
  out_indices: Sequence[int] = (0, 1, 2, 3)
  stem_channels: int = 64
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
        downsample = j == 0 and (stride != 1 or in_channels != planes * expansion)
        x = block_cls(planes, stride=stride, dilation=block_dilations[j], downsample=downsample,
                      train=self.train, axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                      bn_eps=self.bn_eps, dtype=self.dtype, conv_impl=self.conv_impl,
                      name=f'layer{i + 1}_{j}')(x, valid)
        valid = downsample_valid(valid, stride)
      in_channels = planes * expansion
      if i in self.out_indices:
        outputs.append(x)
    return tuple(outputs)
